//! `hyper2kvm capabilities`: what this host can do, for operators and for HyperSDK's checks.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::config::Config;
use crate::libvirt;

/// What was found on this host.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub version: &'static str,
    /// `qemu-img --version`'s first line, when it runs.
    pub qemu_img: Option<String>,
    pub input_formats: Vec<&'static str>,
    pub output_formats: Vec<&'static str>,
    pub compression: Vec<&'static str>,
    /// This build can register domains with libvirt (LIBVIRT_INTEGRATION).
    pub libvirt_registration: bool,
    /// LIBVIRT_INTEGRATION as configured: jobs register their domain.
    pub libvirt_integration: bool,
    /// LIBVIRT_URI as configured.
    pub libvirt_uri: String,
    /// A connection to LIBVIRT_URI could be opened just now.
    pub libvirt_reachable: bool,
    /// libvirt's version at LIBVIRT_URI, when reachable.
    pub libvirt_version: Option<String>,
    /// Why LIBVIRT_URI is not reachable, when it is not.
    pub libvirt_error: Option<String>,
    /// UEFI firmware descriptors for libvirt's auto-selection were found.
    pub uefi_firmware: bool,
}

/// Probes the host, and libvirt at the configured LIBVIRT_URI.
pub fn probe(config: &Config) -> Capabilities {
    let qemu_img = Command::new("qemu-img")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned));
    let libvirt = libvirt::probe(&config.libvirt_uri);
    Capabilities {
        version: env!("CARGO_PKG_VERSION"),
        input_formats: if qemu_img.is_some() { vec!["vmdk", "raw", "qcow2", "vhd", "vhdx", "vdi"] } else { vec![] },
        qemu_img,
        output_formats: vec!["qcow2"],
        compression: vec!["zlib", "zstd"],
        libvirt_registration: true,
        libvirt_integration: config.libvirt_integration,
        libvirt_uri: config.libvirt_uri.clone(),
        libvirt_reachable: libvirt.is_ok(),
        libvirt_version: libvirt.as_ref().ok().cloned(),
        libvirt_error: libvirt.err().map(|e| e.with_libvirt_message()),
        uefi_firmware: Path::new("/usr/share/qemu/firmware").is_dir() || Path::new("/usr/share/OVMF").is_dir(),
    }
}

/// A readable listing.
pub fn render(c: &Capabilities) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    format!(
        "hyper2kvm {}\nqemu-img: {}\ninput formats: {}\noutput formats: {}\ncompression: {}\nlibvirt registration: {} (LIBVIRT_INTEGRATION={})\nlibvirt: {}\nUEFI firmware: {}\n",
        c.version,
        c.qemu_img.as_deref().unwrap_or("not found (install qemu-utils)"),
        c.input_formats.join(", "),
        c.output_formats.join(", "),
        c.compression.join(", "),
        yes_no(c.libvirt_registration),
        c.libvirt_integration,
        libvirt_line(c),
        yes_no(c.uefi_firmware),
    )
}

fn libvirt_line(c: &Capabilities) -> String {
    match (&c.libvirt_version, &c.libvirt_error) {
        (Some(version), _) => format!("reachable at {} (libvirt {version})", c.libvirt_uri),
        (None, Some(error)) => error.clone(),
        (None, None) => format!("not reachable at {}", c.libvirt_uri),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Overrides;

    fn config_with_uri(uri: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let overrides = Overrides {
            config_dir: Some(dir.path().to_owned()),
            flags: vec![("LIBVIRT_URI".to_owned(), uri.to_owned())],
        };
        Config::load(&overrides, &BTreeMap::<String, String>::new()).unwrap()
    }

    #[test]
    fn libvirt_reachability_is_probed_at_the_configured_uri() {
        let caps = probe(&config_with_uri("test:///default"));
        assert!(caps.libvirt_registration);
        assert!(caps.libvirt_reachable, "{caps:?}");
        assert!(caps.libvirt_version.is_some() && caps.libvirt_error.is_none(), "{caps:?}");
        assert!(render(&caps).contains("libvirt: reachable at test:///default (libvirt "), "{}", render(&caps));

        let uri = "qemu+unix:///system?socket=/nonexistent/sock";
        let caps = probe(&config_with_uri(uri));
        assert!(!caps.libvirt_reachable);
        let error = caps.libvirt_error.as_deref().unwrap_or_default();
        assert!(error.starts_with(&format!("libvirt at {uri} is not reachable: is libvirtd running? (")), "{error}");
        let json = serde_json::to_value(&caps).unwrap();
        for key in ["libvirt_registration", "libvirt_integration", "libvirt_uri", "libvirt_reachable", "uefi_firmware"]
        {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
    }
}
