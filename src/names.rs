//! Names derived from a manifest: whether `vm_name` may name result files, which VM a result
//! name belongs to, and the libvirt domain name. The result file names themselves are
//! [`crate::output_layout`]'s.
//!
//! `source.vm_name` is used verbatim for result files because HyperSDK polls for the raw name
//! (spaces included); it only has to be a safe single path component.

use crate::output_layout::OutputLayout;

use thiserror::Error;

/// Longest `vm_name` accepted, in bytes. Leaves room for `-<disk id>.qcow2` and temp suffixes
/// within the usual 255-byte file name limit.
pub(crate) const MAX_VM_NAME_BYTES: usize = 200;

/// The longest file name Linux filesystems (and NFS) accept, in bytes.
pub(crate) const MAX_FILE_NAME_BYTES: usize = 255;

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

/// The VM names whose results could include the qcow2 file `file_name`: `V` for its boot
/// disk `V.qcow2`, and each `P` for a data disk `P-<disk id>.qcow2`, so every prefix of the
/// stem that ends before a `-`. Results of different VMs can share a name this way (VM `web`'s
/// disk `disk-1` and VM `web-disk-1`'s boot disk are both `web-disk-1.qcow2`). Empty for any
/// other file: `.json`, `.xml` and `.error` names belong to one VM only.
pub(crate) fn possible_owners(file_name: &str) -> Vec<&str> {
    let Some(stem) = file_name.strip_suffix(".qcow2") else { return Vec::new() };
    let mut owners: Vec<&str> = stem.match_indices('-').map(|(i, _)| &stem[..i]).filter(|p| !p.is_empty()).collect();
    owners.push(stem);
    owners
}

/// The VM other than `vm_name` whose published report (`V.json` in OUTPUT_DIR) lists
/// `file_name` among its disks, if any: that file is that VM's result, not an earlier result of
/// `vm_name`'s. Reports that cannot be read or parsed are passed over.
pub(crate) fn other_vms_result(output: &OutputLayout, file_name: &str, vm_name: &str) -> Option<String> {
    possible_owners(file_name).into_iter().filter(|owner| *owner != vm_name).find_map(|owner| {
        let bytes = crate::publish::read_small(&output.report(owner)).ok()?;
        let report: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let lists_it = report
            .get("disks")?
            .as_array()?
            .iter()
            .any(|d| d.get("output").and_then(|o| o.as_str()) == Some(file_name));
        (report.get("vm_name")?.as_str()? == owner && lists_it).then(|| owner.to_owned())
    })
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
    fn a_qcow2_name_may_belong_to_the_vm_of_any_dash_prefix() {
        assert_eq!(possible_owners("web-disk-1.qcow2"), ["web", "web-disk", "web-disk-1"]);
        assert_eq!(possible_owners("web.qcow2"), ["web"]);
        assert_eq!(possible_owners("-x-.qcow2"), ["-x", "-x-"]);
        assert!(possible_owners("web-disk-1.json").is_empty());
    }

    #[test]
    fn a_file_listed_in_another_vms_report_is_that_vms() {
        let out = tempfile::tempdir().unwrap();
        let layout = OutputLayout::new(out.path(), &out.path().join(".hyper2kvm-tmp"));
        let report = |vm: &str, outputs: &[&str]| {
            let disks: Vec<_> = outputs.iter().map(|o| serde_json::json!({ "output": o })).collect();
            std::fs::write(layout.report(vm), serde_json::json!({ "vm_name": vm, "disks": disks }).to_string())
                .unwrap();
        };
        report("web", &["web.qcow2", "web-disk-1.qcow2"]);
        assert_eq!(other_vms_result(&layout, "web-disk-1.qcow2", "web-disk-1").as_deref(), Some("web"));
        assert_eq!(other_vms_result(&layout, "web-disk-1.qcow2", "web"), None, "its own earlier result");
        assert_eq!(other_vms_result(&layout, "web-disk-2.qcow2", "web-disk-2"), None, "not listed");
        report("db-disk-1", &["db-disk-1.qcow2"]);
        assert_eq!(other_vms_result(&layout, "db-disk-1.qcow2", "db").as_deref(), Some("db-disk-1"));
        std::fs::write(out.path().join("x.json"), b"{not json").unwrap();
        assert_eq!(other_vms_result(&layout, "x-1.qcow2", "y"), None);
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
