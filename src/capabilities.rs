//! `hyper2kvm capabilities`: what this host can do, for operators and for HyperSDK's checks.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// What was found on this host.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub version: &'static str,
    /// `qemu-img --version`'s first line, when it runs.
    pub qemu_img: Option<String>,
    pub input_formats: Vec<&'static str>,
    pub output_formats: Vec<&'static str>,
    pub compression: Vec<&'static str>,
    /// libvirt registration is not in this build; domain XML is written for `virsh define`.
    pub libvirt_registration: bool,
    /// UEFI firmware descriptors for libvirt's auto-selection were found.
    pub uefi_firmware: bool,
}

/// Probes the host.
pub fn probe() -> Capabilities {
    let qemu_img = Command::new("qemu-img")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned));
    Capabilities {
        version: env!("CARGO_PKG_VERSION"),
        input_formats: if qemu_img.is_some() { vec!["vmdk", "raw", "qcow2", "vhd", "vhdx", "vdi"] } else { vec![] },
        qemu_img,
        output_formats: vec!["qcow2"],
        compression: vec!["zlib", "zstd"],
        libvirt_registration: false,
        uefi_firmware: Path::new("/usr/share/qemu/firmware").is_dir() || Path::new("/usr/share/OVMF").is_dir(),
    }
}

/// A readable listing.
pub fn render(c: &Capabilities) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    format!(
        "hyper2kvm {}\nqemu-img: {}\ninput formats: {}\noutput formats: {}\ncompression: {}\nlibvirt registration: {}\nUEFI firmware: {}\n",
        c.version,
        c.qemu_img.as_deref().unwrap_or("not found (install qemu-utils)"),
        c.input_formats.join(", "),
        c.output_formats.join(", "),
        c.compression.join(", "),
        yes_no(c.libvirt_registration),
        yes_no(c.uefi_firmware),
    )
}
