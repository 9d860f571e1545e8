//! What the libvirt host can run, read from its capabilities XML (`virsh capabilities`).
//!
//! libvirt refuses to define a `<domain type='kvm'>` on a host whose emulator cannot use KVM
//! (no /dev/kvm: nested cloud VMs, containers, CI). Importing there is still useful — the VM is
//! defined and can be moved or started under emulation — so the registration asks first.

use quick_xml::events::Event;
use quick_xml::reader::Reader;

use super::domain_xml::Acceleration;

/// The libvirt domain types a host offers for x86_64 HVM guests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCapabilities {
    /// Domain types (`kvm`, `qemu`) listed for x86_64 HVM guests.
    pub x86_64_domain_types: Vec<String>,
}

impl HostCapabilities {
    /// Parses `virConnectGetCapabilities` output. Unknown or malformed parts are skipped: the
    /// answer only chooses between `kvm` and `qemu`, and libvirt validates the result anyway.
    pub fn parse(xml: &str) -> HostCapabilities {
        let mut reader = Reader::from_str(xml);
        let mut caps = HostCapabilities::default();
        let (mut in_guest, mut hvm, mut x86_64) = (false, false, false);
        let mut guest_types = Vec::new();
        let mut in_os_type = false;
        loop {
            match reader.read_event() {
                Ok(Event::Start(e)) | Ok(Event::Empty(e)) => match e.name().as_ref() {
                    b"guest" => (in_guest, hvm, x86_64, guest_types) = (true, false, false, Vec::new()),
                    b"os_type" if in_guest => in_os_type = true,
                    b"arch" if in_guest => x86_64 = attribute(&e, b"name").as_deref() == Some("x86_64"),
                    b"domain" if in_guest => guest_types.extend(attribute(&e, b"type")),
                    _ => {}
                },
                Ok(Event::Text(t)) if in_os_type => hvm = t.unescape().is_ok_and(|s| s.trim() == "hvm"),
                Ok(Event::End(e)) => match e.name().as_ref() {
                    b"os_type" => in_os_type = false,
                    b"guest" => {
                        if hvm && x86_64 {
                            caps.x86_64_domain_types.append(&mut guest_types);
                        }
                        in_guest = false;
                    }
                    _ => {}
                },
                Ok(Event::Eof) | Err(_) => break,
                _ => {}
            }
        }
        caps.x86_64_domain_types.dedup();
        caps
    }

    /// Whether x86_64 guests can run with KVM acceleration.
    pub fn has_kvm(&self) -> bool {
        self.x86_64_domain_types.iter().any(|t| t == "kvm")
    }

    /// The acceleration to define domains with: emulation only where the host offers QEMU
    /// without KVM. Anything else (KVM present, or a driver such as libvirt's test driver that
    /// offers neither) keeps KVM, and libvirt judges.
    pub fn acceleration(&self) -> Acceleration {
        let emulator_only = !self.has_kvm() && self.x86_64_domain_types.iter().any(|t| t == "qemu");
        if emulator_only {
            Acceleration::Emulated
        } else {
            Acceleration::Kvm
        }
    }
}

fn attribute(e: &quick_xml::events::BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITHOUT_KVM: &str = "<capabilities><host><cpu><arch>x86_64</arch></cpu></host>
      <guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/><domain type='kvm'/></arch></guest>
      <guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>
        <emulator>/usr/bin/qemu-system-x86_64</emulator><domain type='qemu'/></arch></guest>
    </capabilities>";

    #[test]
    fn a_host_without_kvm_offers_only_qemu_for_x86_64() {
        let caps = HostCapabilities::parse(WITHOUT_KVM);
        assert_eq!(caps.x86_64_domain_types, ["qemu"]);
        assert!(!caps.has_kvm(), "KVM offered for i686 only does not count");
        assert_eq!(caps.acceleration(), Acceleration::Emulated);
    }

    #[test]
    fn a_kvm_host_offers_kvm() {
        let xml = WITHOUT_KVM.replace(
            "<domain type='qemu'/></arch></guest>\n    </capabilities>",
            "<domain type='qemu'/><domain type='kvm'/></arch></guest></capabilities>",
        );
        assert!(HostCapabilities::parse(&xml).has_kvm());
        assert_eq!(HostCapabilities::parse(&xml).acceleration(), Acceleration::Kvm);
    }

    #[test]
    fn garbage_offers_nothing() {
        assert!(!HostCapabilities::parse("<capabilities><guest><arch name='x86_64'>").has_kvm());
        assert!(!HostCapabilities::parse("not xml <<<").has_kvm());
        let test_driver = "<capabilities><guest><os_type>hvm</os_type><arch name='x86_64'><domain type='test'/></arch></guest></capabilities>";
        assert_eq!(HostCapabilities::parse(test_driver).acceleration(), Acceleration::Kvm, "libvirt judges");
    }
}
