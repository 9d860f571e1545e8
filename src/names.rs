//! Names derived from a manifest: result file names in OUTPUT_DIR and the libvirt domain name.
//!
//! `source.vm_name` is used verbatim for result files because HyperSDK polls for the raw name
//! (spaces included); it only has to be a safe single path component.

use thiserror::Error;

/// Longest `vm_name` accepted, in bytes. Leaves room for `-<disk id>.qcow2` and temp suffixes
/// within the usual 255-byte file name limit.
pub const MAX_VM_NAME_BYTES: usize = 200;

/// The longest file name Linux filesystems (and NFS) accept, in bytes.
pub const MAX_FILE_NAME_BYTES: usize = 255;

/// Why a `vm_name` cannot name result files.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnsafeName {
    #[error("it is empty")]
    Empty,
    #[error("it contains '/'")]
    Slash,
    #[error("it contains a NUL byte")]
    Nul,
    #[error("it contains a control character, which libvirt's XML cannot carry")]
    Control,
    #[error("it is '.' or '..'")]
    Dots,
    #[error("it starts with '.', which would hide the results")]
    LeadingDot,
    #[error("it is {0} bytes long; the limit is {MAX_VM_NAME_BYTES}")]
    TooLong(usize),
}

/// Checks that `name` can be used verbatim as one path component in OUTPUT_DIR.
pub fn check_vm_name(name: &str) -> Result<(), UnsafeName> {
    if name.is_empty() {
        return Err(UnsafeName::Empty);
    }
    if name == "." || name == ".." {
        return Err(UnsafeName::Dots);
    }
    if name.contains('/') {
        return Err(UnsafeName::Slash);
    }
    if name.contains('\0') {
        return Err(UnsafeName::Nul);
    }
    if name.chars().any(char::is_control) {
        return Err(UnsafeName::Control);
    }
    if name.starts_with('.') {
        return Err(UnsafeName::LeadingDot);
    }
    if name.len() > MAX_VM_NAME_BYTES {
        return Err(UnsafeName::TooLong(name.len()));
    }
    Ok(())
}

/// File name of the boot disk result: `V.qcow2`. Its appearance means success.
pub fn boot_disk_file(vm_name: &str) -> String {
    format!("{vm_name}.qcow2")
}

/// File name of a non-boot disk result: `V-<disk id>.qcow2`.
pub fn data_disk_file(vm_name: &str, disk_id: &str) -> String {
    format!("{vm_name}-{disk_id}.qcow2")
}

/// File name of the failure result: `V.error`.
pub fn error_file(vm_name: &str) -> String {
    format!("{vm_name}.error")
}

/// File name of the job report: `V.json`.
pub fn report_file(vm_name: &str) -> String {
    format!("{vm_name}.json")
}

/// File name of the domain XML: `V.xml`.
pub fn domain_xml_file(vm_name: &str) -> String {
    format!("{vm_name}.xml")
}

/// The libvirt domain name, sanitised exactly as HyperSDK does so both sides agree on it:
/// lower-case; spaces and `_` become `-`; only `[a-z0-9-]` kept; leading `-` and digits
/// trimmed; `vm` when nothing is left.
pub fn domain_name(vm_name: &str) -> String {
    let mapped: String = vm_name
        .to_lowercase()
        .chars()
        .map(|c| if c == ' ' || c == '_' { '-' } else { c })
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .collect();
    let trimmed = mapped.trim_start_matches(|c: char| c == '-' || c.is_ascii_digit());
    if trimmed.is_empty() {
        "vm".to_string()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_hypersdk_writes() {
        assert_eq!(check_vm_name("Ubuntu Server 22"), Ok(()));
        assert_eq!(check_vm_name("web01"), Ok(()));
    }

    #[test]
    fn rejects_unsafe_names() {
        assert_eq!(check_vm_name(""), Err(UnsafeName::Empty));
        assert_eq!(check_vm_name(".."), Err(UnsafeName::Dots));
        assert_eq!(check_vm_name("."), Err(UnsafeName::Dots));
        assert_eq!(check_vm_name("a/b"), Err(UnsafeName::Slash));
        assert_eq!(check_vm_name("a\0b"), Err(UnsafeName::Nul));
        assert_eq!(check_vm_name(".hidden"), Err(UnsafeName::LeadingDot));
        assert_eq!(check_vm_name("a\nb"), Err(UnsafeName::Control));
        let long = "x".repeat(201);
        assert_eq!(check_vm_name(&long), Err(UnsafeName::TooLong(201)));
        assert_eq!(check_vm_name(&"x".repeat(200)), Ok(()));
    }

    #[test]
    fn domain_name_matches_hypersdk_sanitising() {
        assert_eq!(domain_name("Ubuntu Server 22"), "ubuntu-server-22");
        assert_eq!(domain_name("My_VM"), "my-vm");
        assert_eq!(domain_name("42-web.example"), "webexample");
        assert_eq!(domain_name("---"), "vm");
        assert_eq!(domain_name("Ünïcode"), "ncode");
    }
}
