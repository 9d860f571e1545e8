//! The libvirt domain XML for a converted VM.
//!
//! The XML is written to `V.xml` and may be `virsh define`d on a host other than this one, so it
//! names no host paths except the disks: firmware comes from libvirt's auto-selection and the
//! emulator from the host's capabilities. What the manifest does not say is chosen so that the
//! guest boots without drivers it may not have (Windows gets SATA and e1000e).

use std::path::PathBuf;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::mac::MacAddress;
use crate::manifest::{Firmware, Hardware, JobSpec, NicSpec};
use crate::names;

pub use super::devices::{Devices, NicModel};

/// The namespace libosinfo's metadata lives in (what virt-install writes).
const LIBOSINFO_NS: &str = "http://libosinfo.org/xmlns/libvirt/domain/1.0";

/// Memory for a VM whose manifest does not give a usable `vm.mem_gb`, in MiB.
const DEFAULT_MEMORY_MIB: u64 = 2048;

/// Anything above this is not a real VM (and would be refused by QEMU anyway), in MiB.
const MAX_MEMORY_MIB: f64 = 16.0 * 1024.0 * 1024.0;

/// vCPUs for a VM whose manifest does not give a usable `vm.cpu`.
const DEFAULT_VCPUS: u32 = 2;

/// libvirt's schema stores the vCPU count as an unsigned short.
const MAX_VCPUS: u32 = u16::MAX as u32;

/// Versioned so that a deliberate change of the derivation cannot collide with the old one.
const UUID_NAMESPACE: &[u8] = b"hyper2kvm:libvirt-domain-uuid:v1";

/// Where the VM's NICs attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkAttachment {
    /// A host bridge such as `virbr0` or `br0` (`<interface type='bridge'>`).
    Bridge(String),
    /// A libvirt virtual network by name (`<interface type='network'>`).
    Network(String),
}

/// One converted disk, in boot order (index 0 is the boot disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// The qcow2 image the domain uses; should be absolute, as libvirt requires.
    pub path: PathBuf,
    /// The bus the guest sees the disk on, usually [`disk_bus_for`] of the VM.
    pub target_bus: DiskBus,
}

/// The bus a disk is attached to in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk (`vdX`): fastest, needs virtio drivers in the guest.
    Virtio,
    /// SATA/AHCI (`sdX`): slower, but every OS boots from it with its own drivers.
    Sata,
}

/// Chooses the disk bus for a guest: SATA for guests that cannot boot from virtio without drivers
/// (Windows, judged by hardware.os_version like "windows9_64Guest"/"windows2019srv_64Guest" or os_hint containing "win"), else virtio.
pub fn disk_bus_for(hw: &Hardware) -> DiskBus {
    if is_windows(hw) {
        DiskBus::Sata
    } else {
        DiskBus::Virtio
    }
}

/// A stable UUID (RFC 4122 version 5 style, formatted 8-4-4-4-12 lower-case hex) derived from source.vm_id
/// (falling back to vm_name when vm_id is None), so re-submitting the same VM redefines the same domain.
///
/// The provider and the libvirt domain name are hashed as well: vSphere ids such as `vm-42` repeat
/// across vCenters, and libvirt refuses to define a domain whose UUID already belongs to a domain
/// of another name, so a renamed VM must get a new UUID along with its new name.
pub fn domain_uuid(spec: &JobSpec) -> String {
    let (kind, id) = match &spec.vm_id {
        Some(id) => ("vm_id", id.as_str()),
        None => ("vm_name", spec.vm_name.as_str()),
    };
    let domain_name = names::domain_name(&spec.vm_name);
    let mut hasher = Sha256::new();
    hasher.update(UUID_NAMESPACE);
    for field in [spec.provider.as_deref().unwrap_or(""), kind, id, domain_name.as_str()] {
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        hasher.update((field.len() as u64).to_le_bytes());
        hasher.update(field.as_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Acceleration {
    /// KVM (`<domain type='kvm'>`): what every production host has.
    #[default]
    Kvm,
    /// QEMU's emulator (`<domain type='qemu'>`), for a host without KVM, where libvirt refuses
    /// to define a KVM domain at all.
    Emulated,
}

impl Acceleration {
    fn domain_type(self) -> &'static str {
        match self {
            Acceleration::Kvm => "kvm",
            Acceleration::Emulated => "qemu",
        }
    }
}

/// The domain XML text, for a KVM host: [`domain_xml_with`] as the tests call it.
///
/// `disks` are attached in the order given, with boot order 1, 2, …; every entry of `spec.nics`
/// becomes one NIC on `attach` (one NIC without a fixed MAC when the manifest lists none).
#[cfg(test)]
pub(crate) fn domain_xml(spec: &JobSpec, disks: &[DomainDisk], attach: &NetworkAttachment) -> String {
    domain_xml_with(spec, disks, attach, Acceleration::Kvm)
}

/// The domain XML text, for a host with the given acceleration.
pub fn domain_xml_with(
    spec: &JobSpec,
    disks: &[DomainDisk],
    attach: &NetworkAttachment,
    accel: Acceleration,
) -> String {
    domain_xml_for(spec, disks, attach, accel, &Devices::choose(&spec.hardware, None, false))
}

/// The domain XML text with the firmware, NIC model, OS id and Windows specifics of `devices`
/// (the disks carry their own bus: usually `devices.disk_bus`).
pub fn domain_xml_for(
    spec: &JobSpec,
    disks: &[DomainDisk],
    attach: &NetworkAttachment,
    accel: Acceleration,
    devices: &Devices,
) -> String {
    let (boot, windows) = (devices.firmware, devices.windows);
    let mut xml = XmlWriter::default();
    xml.open("domain", &[("type", accel.domain_type())]);
    write_identity(&mut xml, spec);
    write_metadata(&mut xml, devices.osinfo.as_deref());
    write_resources(&mut xml, &spec.hardware);
    write_os(&mut xml, boot, devices.machine);
    write_features(&mut xml, boot, windows);
    write_clock(&mut xml, windows);
    xml.text("on_poweroff", &[], "destroy");
    xml.text("on_reboot", &[], "restart");
    xml.text("on_crash", &[], "destroy");
    xml.open("devices", &[]);
    write_disks(&mut xml, disks);
    write_nics(&mut xml, &spec.nics, attach, devices.nic_model.as_str());
    write_other_devices(&mut xml, windows);
    xml.finish()
}

/// The OS id for tools such as virt-manager and `virt-install --osinfo`: libvirt keeps
/// `<metadata>` as given.
fn write_metadata(xml: &mut XmlWriter, osinfo: Option<&str>) {
    let Some(id) = osinfo else { return };
    xml.open("metadata", &[]);
    xml.open("libosinfo:libosinfo", &[("xmlns:libosinfo", LIBOSINFO_NS)]);
    xml.empty("libosinfo:os", &[("id", id)]);
    xml.close();
    xml.close();
}

/// How the guest boots, reduced to what the XML needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFirmware {
    /// Legacy BIOS (libvirt's default, SeaBIOS): a plain `<os>`.
    Bios,
    /// UEFI, libvirt choosing the OVMF build (`<os firmware='efi'>`).
    Uefi {
        /// Secure boot on, as the manifest's `vm.secureboot` asks.
        secure_boot: bool,
    },
}

impl BootFirmware {
    /// The firmware the manifest's hardware says.
    pub fn of(hw: &Hardware) -> Self {
        match hw.firmware {
            Some(Firmware::Uefi) => Self::Uefi { secure_boot: hw.secureboot },
            // Secure boot exists only with UEFI, so a manifest that enables it without naming
            // the firmware describes a UEFI guest; booting its disk with BIOS would fail.
            None if hw.secureboot => Self::Uefi { secure_boot: true },
            _ => Self::Bios,
        }
    }
}

/// Whether the manifest describes a Windows guest (its vSphere guest id or OS hint).
pub(crate) fn is_windows(hw: &Hardware) -> bool {
    // Every vSphere guest id for Windows starts with "win": windows9_64Guest, winNetStandardGuest…
    let by_version = hw.os_version.as_deref().is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("win"));
    let by_hint = hw.os_hint.as_deref().is_some_and(hint_says_windows);
    by_version || by_hint
}

/// The hint is free text; matching words that start with "win" (or "windows" anywhere) keeps
/// "darwin" from counting as Windows.
fn hint_says_windows(hint: &str) -> bool {
    let hint = hint.to_ascii_lowercase();
    hint.contains("windows") || hint.split(|c: char| !c.is_ascii_alphanumeric()).any(|word| word.starts_with("win"))
}

fn memory_mib(hw: &Hardware) -> u64 {
    match hw.mem_gb.map(|gb| (gb * 1024.0).round()) {
        // The range check also rejects NaN and infinity ("inf" parses as a number).
        Some(mib) if (1.0..=MAX_MEMORY_MIB).contains(&mib) => mib as u64,
        _ => DEFAULT_MEMORY_MIB,
    }
}

fn vcpus(hw: &Hardware) -> u32 {
    hw.cpu.filter(|n| (1..=MAX_VCPUS).contains(n)).unwrap_or(DEFAULT_VCPUS)
}

fn write_identity(xml: &mut XmlWriter, spec: &JobSpec) {
    xml.text("name", &[], &names::domain_name(&spec.vm_name));
    xml.text("uuid", &[], &domain_uuid(spec));
    // libvirt's schema allows no line breaks in a title.
    let title: String = spec.vm_name.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect();
    if !title.is_empty() {
        xml.text("title", &[], &title);
    }
    let description = format!(
        "Converted by hyper2kvm. Source provider: {}; source VM id: {}.",
        spec.provider.as_deref().unwrap_or("unknown"),
        spec.vm_id.as_deref().unwrap_or("unknown"),
    );
    xml.text("description", &[], &description);
}

fn write_resources(xml: &mut XmlWriter, hw: &Hardware) {
    let memory = memory_mib(hw).to_string();
    xml.text("memory", &[("unit", "MiB")], &memory);
    xml.text("currentMemory", &[("unit", "MiB")], &memory);
    let vcpus = vcpus(hw).to_string();
    xml.text("vcpu", &[("placement", "static")], &vcpus);
    // One socket of N cores: libvirt's default of N one-core sockets leaves client editions of
    // Windows, which are licensed for at most two sockets, using only two vCPUs.
    xml.open("cpu", &[("mode", "host-model")]);
    xml.empty("topology", &[("sockets", "1"), ("cores", &vcpus), ("threads", "1")]);
    xml.close();
}

fn write_os(xml: &mut XmlWriter, boot: BootFirmware, machine: &str) {
    match boot {
        BootFirmware::Bios => xml.open("os", &[]),
        BootFirmware::Uefi { .. } => xml.open("os", &[("firmware", "efi")]),
    }
    xml.text("type", &[("arch", "x86_64"), ("machine", machine)], "hvm");
    match boot {
        BootFirmware::Bios => {}
        BootFirmware::Uefi { secure_boot: true } => {
            xml.open("firmware", &[]);
            xml.empty("feature", &[("enabled", "yes"), ("name", "secure-boot")]);
            xml.empty("feature", &[("enabled", "yes"), ("name", "enrolled-keys")]);
            xml.close();
            xml.empty("loader", &[("secure", "yes")]);
        }
        // Without this, auto-selection may pick a firmware with Microsoft keys enrolled, and a
        // guest that never ran with secure boot (unsigned kernel or bootloader) would not boot.
        BootFirmware::Uefi { secure_boot: false } => {
            xml.open("firmware", &[]);
            xml.empty("feature", &[("enabled", "no"), ("name", "secure-boot")]);
            xml.close();
        }
    }
    xml.close();
}

fn write_features(xml: &mut XmlWriter, boot: BootFirmware, windows: bool) {
    xml.open("features", &[]);
    xml.empty("acpi", &[]);
    xml.empty("apic", &[]);
    if windows {
        // The Hyper-V enlightenments every Windows guest understands natively; without them
        // Windows on KVM is noticeably slower.
        xml.open("hyperv", &[]);
        xml.empty("relaxed", &[("state", "on")]);
        xml.empty("vapic", &[("state", "on")]);
        xml.empty("spinlocks", &[("state", "on"), ("retries", "8191")]);
        xml.close();
    }
    if boot == (BootFirmware::Uefi { secure_boot: true }) {
        // Secure-boot firmware keeps its variable store safe only in SMM; libvirt requires it.
        xml.empty("smm", &[("state", "on")]);
    }
    xml.close();
}

fn write_clock(xml: &mut XmlWriter, windows: bool) {
    // Windows keeps the hardware clock in local time; everything else in UTC.
    let offset = if windows { "localtime" } else { "utc" };
    xml.open("clock", &[("offset", offset)]);
    // The timer policy libvirt's own tools use for KVM guests: catch up after the host was
    // busy rather than let guest time drift, and no HPET, which only costs CPU.
    xml.empty("timer", &[("name", "rtc"), ("tickpolicy", "catchup")]);
    xml.empty("timer", &[("name", "pit"), ("tickpolicy", "delay")]);
    xml.empty("timer", &[("name", "hpet"), ("present", "no")]);
    if windows {
        xml.empty("timer", &[("name", "hypervclock"), ("present", "yes")]);
    }
    xml.close();
}

fn write_disks(xml: &mut XmlWriter, disks: &[DomainDisk]) {
    let (mut virtio_count, mut sata_count) = (0, 0);
    for (index, disk) in disks.iter().enumerate() {
        let (prefix, bus, nth) = match disk.target_bus {
            DiskBus::Virtio => ("vd", "virtio", &mut virtio_count),
            DiskBus::Sata => ("sd", "sata", &mut sata_count),
        };
        let dev = format!("{prefix}{}", disk_letters(*nth));
        *nth += 1;
        let path = disk.path.to_string_lossy();
        let order = (index + 1).to_string();
        xml.open("disk", &[("type", "file"), ("device", "disk")]);
        xml.empty("driver", &[("name", "qemu"), ("type", "qcow2"), ("discard", "unmap")]);
        xml.empty("source", &[("file", &path)]);
        xml.empty("target", &[("dev", &dev), ("bus", bus)]);
        xml.empty("boot", &[("order", &order)]);
        xml.close();
    }
}

/// The letters libvirt and Linux use after `vd`/`sd`: a…z, aa…zz, aaa…
fn disk_letters(mut index: usize) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(char::from(b'a' + (index % 26) as u8));
        if index < 26 {
            break;
        }
        index = index / 26 - 1;
    }
    letters.iter().rev().collect()
}

fn write_nics(xml: &mut XmlWriter, nics: &[NicSpec], attach: &NetworkAttachment, model: &str) {
    let mut used_macs: Vec<MacAddress> = Vec::new();
    let macs: Vec<Option<MacAddress>> = if nics.is_empty() {
        vec![None]
    } else {
        nics.iter()
            .map(|nic| {
                // A manifest's MACs are checked already; an OVF's may be unusable or shared.
                // Two NICs with one MAC break the guest's network; the second gets a fresh one.
                let mac = nic.mac.filter(|m| m.is_usable_for_nic() && !used_macs.contains(m));
                used_macs.extend(mac);
                mac
            })
            .collect()
    };
    for mac in macs {
        write_nic(xml, attach, mac.map(|m| m.to_string()).as_deref(), model);
    }
}

fn write_nic(xml: &mut XmlWriter, attach: &NetworkAttachment, mac: Option<&str>, model: &str) {
    match attach {
        NetworkAttachment::Bridge(bridge) => {
            xml.open("interface", &[("type", "bridge")]);
            xml.empty("source", &[("bridge", bridge)]);
        }
        NetworkAttachment::Network(network) => {
            xml.open("interface", &[("type", "network")]);
            xml.empty("source", &[("network", network)]);
        }
    }
    if let Some(mac) = mac {
        xml.empty("mac", &[("address", mac)]);
    }
    xml.empty("model", &[("type", model)]);
    xml.close();
}

fn write_other_devices(xml: &mut XmlWriter, windows: bool) {
    xml.empty("controller", &[("type", "usb"), ("model", "qemu-xhci")]);
    xml.open("serial", &[("type", "pty")]);
    xml.empty("target", &[("port", "0")]);
    xml.close();
    xml.open("console", &[("type", "pty")]);
    xml.empty("target", &[("type", "serial"), ("port", "0")]);
    xml.close();
    xml.open("channel", &[("type", "unix")]);
    xml.empty("target", &[("type", "virtio"), ("name", "org.qemu.guest_agent.0")]);
    xml.close();
    xml.empty("input", &[("type", "tablet"), ("bus", "usb")]);
    // Loopback only: the console is for an operator on this host (or an SSH tunnel), and VNC
    // has no authentication by default.
    xml.open("graphics", &[("type", "vnc"), ("port", "-1"), ("autoport", "yes"), ("listen", "127.0.0.1")]);
    xml.empty("listen", &[("type", "address"), ("address", "127.0.0.1")]);
    xml.close();
    xml.open("video", &[]);
    // Windows has no virtio-gpu driver out of the box; VGA works everywhere.
    xml.empty("model", &[("type", if windows { "vga" } else { "virtio" })]);
    xml.close();
    xml.open("rng", &[("model", "virtio")]);
    xml.text("backend", &[("model", "random")], "/dev/urandom");
    xml.close();
}

/// A minimal XML writer: two-space indentation and escaping. Attribute values are single-quoted,
/// as libvirt writes them.
#[derive(Default)]
struct XmlWriter {
    out: String,
    open: Vec<&'static str>,
}

impl XmlWriter {
    fn open(&mut self, name: &'static str, attrs: &[(&str, &str)]) {
        self.start_tag(name, attrs);
        self.out.push_str(">\n");
        self.open.push(name);
    }

    fn empty(&mut self, name: &'static str, attrs: &[(&str, &str)]) {
        self.start_tag(name, attrs);
        self.out.push_str("/>\n");
    }

    fn text(&mut self, name: &'static str, attrs: &[(&str, &str)], text: &str) {
        self.start_tag(name, attrs);
        self.out.push('>');
        escape_into(&mut self.out, text, false);
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    fn close(&mut self) {
        if let Some(name) = self.open.pop() {
            self.indent();
            self.out.push_str("</");
            self.out.push_str(name);
            self.out.push_str(">\n");
        }
    }

    fn finish(mut self) -> String {
        while !self.open.is_empty() {
            self.close();
        }
        self.out
    }

    fn start_tag(&mut self, name: &str, attrs: &[(&str, &str)]) {
        self.indent();
        self.out.push('<');
        self.out.push_str(name);
        for (key, value) in attrs {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("='");
            escape_into(&mut self.out, value, true);
            self.out.push('\'');
        }
    }

    fn indent(&mut self) {
        for _ in 0..self.open.len() {
            self.out.push_str("  ");
        }
    }
}

/// Escapes `text` for XML 1.0. Whitespace in attributes is written as character references
/// because a parser turns literal tabs and line breaks there into spaces; a literal CR in text
/// would become LF. Characters XML 1.0 cannot carry at all (other control characters) become
/// U+FFFD, since the alternative is a document no parser accepts.
fn escape_into(out: &mut String, text: &str, attribute: bool) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            '\t' if attribute => out.push_str("&#9;"),
            '\n' if attribute => out.push_str("&#10;"),
            '\t' | '\n' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::manifest::{DiskSpec, DiskType, SourceFormat};
    use std::path::Path;
    use std::process::Command;

    pub(crate) fn disk_spec(id: &str) -> DiskSpec {
        DiskSpec {
            id: id.to_owned(),
            source_format: SourceFormat::Vmdk,
            local_path: PathBuf::from(format!("/exports/{id}.vmdk")),
            bytes: None,
            sha256: None,
            boot_order_hint: None,
            label: None,
            disk_type: DiskType::Unknown,
            ova_disk: None,
        }
    }

    fn spec(vm_name: &str, hardware: Hardware) -> JobSpec {
        JobSpec {
            vm_name: vm_name.to_owned(),
            vm_id: Some("vm-42".to_owned()),
            provider: Some("vsphere".to_owned()),
            hardware,
            disks: vec![disk_spec("disk-0")],
            nics: Vec::new(),
            compress: None,
            compress_level: None,
        }
    }

    fn nic(mac: Option<&str>) -> NicSpec {
        NicSpec { id: None, mac: mac.and_then(|m| m.parse().ok()), network: Some("VM Network".to_owned()) }
    }

    fn disk(path: &str, target_bus: DiskBus) -> DomainDisk {
        DomainDisk { path: PathBuf::from(path), target_bus }
    }

    fn bridge() -> NetworkAttachment {
        NetworkAttachment::Bridge("virbr0".to_owned())
    }

    fn uefi(secureboot: bool) -> Hardware {
        Hardware { firmware: Some(Firmware::Uefi), secureboot, ..Hardware::default() }
    }

    fn windows_hw() -> Hardware {
        Hardware { os_version: Some("windows2019srv_64Guest".to_owned()), ..uefi(true) }
    }

    fn xml_for(spec: &JobSpec) -> String {
        let bus = disk_bus_for(&spec.hardware);
        domain_xml(spec, &[disk("/var/lib/hyper2kvm/output/web01.qcow2", bus)], &bridge())
    }

    #[test]
    fn memory_and_cpu_default_when_absent() {
        let xml = xml_for(&spec("web01", Hardware::default()));
        assert!(xml.contains("<memory unit='MiB'>2048</memory>"), "{xml}");
        assert!(xml.contains("<currentMemory unit='MiB'>2048</currentMemory>"), "{xml}");
        assert!(xml.contains("<vcpu placement='static'>2</vcpu>"), "{xml}");
        assert!(xml.contains("<cpu mode='host-model'>"), "{xml}");
    }

    #[test]
    fn memory_and_cpu_come_from_the_manifest() {
        let hw = Hardware { cpu: Some(8), mem_gb: Some(1.5), ..Hardware::default() };
        let xml = xml_for(&spec("web01", hw));
        assert!(xml.contains("<memory unit='MiB'>1536</memory>"), "{xml}");
        assert!(xml.contains("<currentMemory unit='MiB'>1536</currentMemory>"), "{xml}");
        assert!(xml.contains("<vcpu placement='static'>8</vcpu>"), "{xml}");
        assert!(xml.contains("<topology sockets='1' cores='8' threads='1'/>"), "{xml}");
    }

    #[test]
    fn memory_rounds_and_unusable_values_fall_back() {
        let mem = |gb: f64| memory_mib(&Hardware { mem_gb: Some(gb), ..Hardware::default() });
        assert_eq!(mem(0.3), 307);
        assert_eq!(mem(16.0), 16384);
        assert_eq!(mem(f64::INFINITY), DEFAULT_MEMORY_MIB);
        assert_eq!(mem(f64::NAN), DEFAULT_MEMORY_MIB);
        assert_eq!(mem(0.0001), DEFAULT_MEMORY_MIB);
        let cpus = |n: u32| vcpus(&Hardware { cpu: Some(n), ..Hardware::default() });
        assert_eq!(cpus(4), 4);
        assert_eq!(cpus(0), DEFAULT_VCPUS);
        assert_eq!(cpus(1_000_000), DEFAULT_VCPUS);
    }

    #[test]
    fn bios_is_the_default_firmware() {
        let xml = xml_for(&spec("web01", Hardware::default()));
        assert!(xml.contains("<os>"), "{xml}");
        assert!(xml.contains("<type arch='x86_64' machine='q35'>hvm</type>"), "{xml}");
        assert!(!xml.contains("firmware"), "{xml}");
        assert!(!xml.contains("<loader"), "{xml}");
        assert!(!xml.contains("<smm"), "{xml}");
        assert!(!xml.contains("<boot dev"), "{xml}");
        assert!(xml.contains("<boot order='1'/>"), "{xml}");
    }

    #[test]
    fn uefi_uses_firmware_auto_selection_without_secure_boot() {
        let xml = xml_for(&spec("web01", uefi(false)));
        assert!(xml.contains("<os firmware='efi'>"), "{xml}");
        assert!(xml.contains("<feature enabled='no' name='secure-boot'/>"), "{xml}");
        assert!(!xml.contains("enrolled-keys"), "{xml}");
        assert!(!xml.contains("<loader"), "{xml}");
        assert!(!xml.contains("<smm"), "{xml}");
        assert!(!xml.contains("/usr/share"), "no firmware path may be hard-coded: {xml}");
    }

    #[test]
    fn secure_boot_asks_for_enrolled_keys_smm_and_a_secure_loader() {
        let xml = xml_for(&spec("web01", uefi(true)));
        assert!(xml.contains("<os firmware='efi'>"), "{xml}");
        assert!(xml.contains("<feature enabled='yes' name='secure-boot'/>"), "{xml}");
        assert!(xml.contains("<feature enabled='yes' name='enrolled-keys'/>"), "{xml}");
        assert!(xml.contains("<loader secure='yes'/>"), "{xml}");
        assert!(xml.contains("<smm state='on'/>"), "{xml}");
    }

    #[test]
    fn secure_boot_implies_uefi_only_when_firmware_is_not_given() {
        let implied = Hardware { secureboot: true, ..Hardware::default() };
        assert_eq!(BootFirmware::of(&implied), BootFirmware::Uefi { secure_boot: true });
        let bios = Hardware { firmware: Some(Firmware::Bios), secureboot: true, ..Hardware::default() };
        assert_eq!(BootFirmware::of(&bios), BootFirmware::Bios);
        let xml = xml_for(&spec("web01", bios));
        assert!(!xml.contains("<smm"), "{xml}");
    }

    #[test]
    fn windows_guests_get_sata_e1000e_vga_and_local_time() {
        let by_hint = Hardware { os_hint: Some("Microsoft Windows Server 2019".to_owned()), ..Hardware::default() };
        for hw in [
            Hardware { os_version: Some("windows9_64Guest".to_owned()), ..Hardware::default() },
            Hardware { os_version: Some("winNetStandardGuest".to_owned()), ..Hardware::default() },
            windows_hw(),
            by_hint,
            Hardware { os_hint: Some("win".to_owned()), ..Hardware::default() },
        ] {
            assert_eq!(disk_bus_for(&hw), DiskBus::Sata, "{hw:?}");
        }
        let xml = xml_for(&spec("dc01", windows_hw()));
        assert!(xml.contains("<target dev='sda' bus='sata'/>"), "{xml}");
        assert!(xml.contains("<model type='e1000e'/>"), "{xml}");
        assert!(xml.contains("<model type='vga'/>"), "{xml}");
        assert!(xml.contains("<clock offset='localtime'>"), "{xml}");
        assert!(xml.contains("<hyperv>"), "{xml}");
        assert!(!xml.contains("<model type='virtio'/>"), "{xml}");
    }

    #[test]
    fn other_guests_get_virtio_and_utc() {
        for hw in [
            Hardware::default(),
            Hardware { os_version: Some("ubuntu64Guest".to_owned()), ..Hardware::default() },
            Hardware { os_hint: Some("darwin".to_owned()), ..Hardware::default() },
        ] {
            assert_eq!(disk_bus_for(&hw), DiskBus::Virtio, "{hw:?}");
        }
        let xml = xml_for(&spec("web01", Hardware::default()));
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"), "{xml}");
        assert!(xml.contains("<model type='virtio'/>"), "{xml}");
        assert!(xml.contains("<clock offset='utc'>"), "{xml}");
        assert!(!xml.contains("hyperv"), "{xml}");
    }

    #[test]
    fn disks_get_targets_per_bus_and_boot_order_by_position() {
        let disks = [
            disk("/out/a.qcow2", DiskBus::Virtio),
            disk("/out/b.qcow2", DiskBus::Virtio),
            disk("/out/c.qcow2", DiskBus::Sata),
        ];
        let xml = domain_xml(&spec("web01", Hardware::default()), &disks, &bridge());
        let a = xml.find("<source file='/out/a.qcow2'/>").expect("disk a");
        let b = xml.find("<source file='/out/b.qcow2'/>").expect("disk b");
        let c = xml.find("<source file='/out/c.qcow2'/>").expect("disk c");
        assert!(a < b && b < c, "{xml}");
        for (found, expected) in [
            ("<target dev='vda' bus='virtio'/>\n      <boot order='1'/>", true),
            ("<target dev='vdb' bus='virtio'/>\n      <boot order='2'/>", true),
            ("<target dev='sda' bus='sata'/>\n      <boot order='3'/>", true),
        ] {
            assert_eq!(xml.contains(found), expected, "{found}\n{xml}");
        }
        assert_eq!(xml.matches("<driver name='qemu' type='qcow2' discard='unmap'/>").count(), 3);
    }

    #[test]
    fn disk_letters_follow_the_kernel_scheme() {
        assert_eq!(disk_letters(0), "a");
        assert_eq!(disk_letters(25), "z");
        assert_eq!(disk_letters(26), "aa");
        assert_eq!(disk_letters(27), "ab");
        assert_eq!(disk_letters(701), "zz");
        assert_eq!(disk_letters(702), "aaa");
    }

    #[test]
    fn unusable_and_duplicate_macs_are_left_out() {
        // A manifest refuses both; an OVF's NICs arrive unchecked.
        let mut job = spec("web01", Hardware::default());
        job.nics =
            vec![nic(Some("00:50:56:AA:BB:CC")), nic(Some("01:00:5e:00:00:01")), nic(Some("005056aabbcc")), nic(None)];
        let xml = xml_for(&job);
        assert_eq!(xml.matches("<interface type='bridge'>").count(), 4, "{xml}");
        assert_eq!(xml.matches("<mac address=").count(), 1, "{xml}");
        assert!(xml.contains("<mac address='00:50:56:aa:bb:cc'/>"), "{xml}");
    }

    #[test]
    fn no_nics_in_the_manifest_gives_one_nic_without_mac() {
        let xml = xml_for(&spec("web01", Hardware::default()));
        assert_eq!(xml.matches("<interface ").count(), 1, "{xml}");
        assert!(!xml.contains("<mac "), "{xml}");
    }

    #[test]
    fn bridge_and_network_attachments() {
        let mut job = spec("web01", Hardware::default());
        job.nics = vec![nic(Some("00:50:56:00:00:01")), nic(Some("00:50:56:00:00:02"))];
        let disks = [disk("/out/web01.qcow2", DiskBus::Virtio)];
        let xml = domain_xml(&job, &disks, &NetworkAttachment::Bridge("br0".to_owned()));
        assert_eq!(xml.matches("<interface type='bridge'>\n      <source bridge='br0'/>").count(), 2, "{xml}");
        assert!(!xml.contains("type='network'"), "{xml}");
        let xml = domain_xml(&job, &disks, &NetworkAttachment::Network("default".to_owned()));
        assert_eq!(xml.matches("<interface type='network'>\n      <source network='default'/>").count(), 2, "{xml}");
        assert!(!xml.contains("type='bridge'"), "{xml}");
    }

    #[test]
    fn names_and_paths_are_escaped() {
        let name = "a&b<c>\"d'e f";
        let job = spec(name, Hardware::default());
        let disks = [disk("/out dir/a&b<c>\"d'e f.qcow2", DiskBus::Virtio)];
        let xml = domain_xml(&job, &disks, &bridge());
        assert!(xml.contains("<name>abcde-f</name>"), "{xml}");
        assert!(xml.contains("<title>a&amp;b&lt;c&gt;&quot;d&apos;e f</title>"), "{xml}");
        assert!(xml.contains("<source file='/out dir/a&amp;b&lt;c&gt;&quot;d&apos;e f.qcow2'/>"), "{xml}");
        assert!(!xml.contains("a&b"), "{xml}");
    }

    #[test]
    fn escaping_keeps_whitespace_and_replaces_what_xml_cannot_carry() {
        let mut out = String::new();
        escape_into(&mut out, "a\tb\nc\rd\u{1}e\u{FFFF}", true);
        assert_eq!(out, "a&#9;b&#10;c&#13;d\u{FFFD}e\u{FFFD}");
        out.clear();
        escape_into(&mut out, "a\tb\nc\rd", false);
        assert_eq!(out, "a\tb\nc&#13;d");
        let xml = xml_for(&spec("line\nbreak", Hardware::default()));
        assert!(xml.contains("<title>line break</title>"), "{xml}");
    }

    #[test]
    fn description_names_hyper2kvm_provider_and_id() {
        let xml = xml_for(&spec("web01", Hardware::default()));
        assert!(
            xml.contains(
                "<description>Converted by hyper2kvm. Source provider: vsphere; source VM id: vm-42.</description>"
            ),
            "{xml}"
        );
    }

    #[test]
    fn uuid_is_stable_and_version_5() {
        let a = spec("web01", Hardware::default());
        let uuid = domain_uuid(&a);
        assert_eq!(uuid, domain_uuid(&a.clone()));
        assert_eq!(uuid.len(), 36);
        let groups: Vec<&str> = uuid.split('-').collect();
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        assert!(uuid.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{uuid}");
        assert_eq!(&uuid[14..15], "5", "{uuid}");
        assert!(matches!(&uuid[19..20], "8" | "9" | "a" | "b"), "{uuid}");
        assert!(xml_for(&a).contains(&format!("<uuid>{uuid}</uuid>")));

        // Hardware and disks do not matter: a re-export with more memory redefines the domain.
        let mut more_memory = a.clone();
        more_memory.hardware.mem_gb = Some(64.0);
        more_memory.disks.push(disk_spec("disk-1"));
        assert_eq!(domain_uuid(&more_memory), uuid);

        let mut other_id = a.clone();
        other_id.vm_id = Some("vm-43".to_owned());
        assert_ne!(domain_uuid(&other_id), uuid);
        let mut other_vcenter = a.clone();
        other_vcenter.provider = Some("aws".to_owned());
        assert_ne!(domain_uuid(&other_vcenter), uuid);
    }

    #[test]
    fn uuid_falls_back_to_vm_name() {
        let mut a = spec("web01", Hardware::default());
        a.vm_id = None;
        let mut b = a.clone();
        assert_eq!(domain_uuid(&a), domain_uuid(&b));
        b.vm_name = "web02".to_owned();
        assert_ne!(domain_uuid(&a), domain_uuid(&b));
        let mut with_id = a.clone();
        with_id.vm_id = Some("web01".to_owned());
        assert_ne!(domain_uuid(&a), domain_uuid(&with_id), "an id equal to the name is still an id");
    }

    #[test]
    fn every_variant_contains_the_fixed_devices() {
        for hw in [Hardware::default(), uefi(false), uefi(true), windows_hw()] {
            let xml = xml_for(&spec("web01", hw));
            for needle in [
                "<domain type='kvm'>",
                "<features>\n    <acpi/>\n    <apic/>",
                "<on_poweroff>destroy</on_poweroff>",
                "<on_reboot>restart</on_reboot>",
                "<on_crash>destroy</on_crash>",
                "<serial type='pty'>\n      <target port='0'/>\n    </serial>",
                "<console type='pty'>\n      <target type='serial' port='0'/>\n    </console>",
                "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>\n      <listen type='address' address='127.0.0.1'/>",
                "<channel type='unix'>\n      <target type='virtio' name='org.qemu.guest_agent.0'/>",
                "<rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>",
                "<controller type='usb' model='qemu-xhci'/>",
                "<input type='tablet' bus='usb'/>",
            ] {
                assert!(xml.contains(needle), "{needle}\n{xml}");
            }
            assert!(xml.ends_with("  </devices>\n</domain>\n"), "{xml}");
        }
    }

    fn find_on_path(program: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
    }

    fn validate_with_libvirt_schema(validator: &Path, file: &Path) {
        let output = Command::new(validator).arg(file).arg("domain").output().expect("run virt-xml-validate");
        let xml = std::fs::read_to_string(file).unwrap_or_default();
        assert!(
            output.status.success(),
            "virt-xml-validate rejected {}:\n{}{}\n{xml}",
            file.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    /// The cases the schema test feeds to `virt-xml-validate`.
    fn schema_cases() -> Vec<(&'static str, String)> {
        let nics = vec![nic(Some("00:50:56:00:00:01")), nic(Some("bad")), nic(None)];
        let mut cases = Vec::new();
        for (label, hw) in [
            ("bios", Hardware { cpu: Some(4), mem_gb: Some(8.0), ..Hardware::default() }),
            ("uefi", uefi(false)),
            ("uefi-secureboot", uefi(true)),
            ("windows", windows_hw()),
        ] {
            let mut job = spec("Web Server & <Co> \"it's\"", hw);
            job.nics = nics.clone();
            let bus = disk_bus_for(&job.hardware);
            let disks = [
                disk("/var/lib/hyper2kvm/output/Web Server & <Co> \"it's\".qcow2", bus),
                disk("/var/lib/hyper2kvm/output/Web Server-data.qcow2", bus),
                disk("/var/lib/hyper2kvm/output/Web Server-logs.qcow2", DiskBus::Sata),
            ];
            cases.push((label, domain_xml(&job, &disks, &bridge())));
            // What a host without /dev/kvm defines (the system test's UEFI guest among them).
            cases.push((label, domain_xml_with(&job, &disks, &bridge(), Acceleration::Emulated)));
            let network = NetworkAttachment::Network("default".to_owned());
            let many: Vec<DomainDisk> = (0..28).map(|i| disk(&format!("/out/d{i}.qcow2"), bus)).collect();
            cases.push((label, domain_xml(&job, &many, &network)));
        }
        for (label, hw, devices) in inspected_cases() {
            let mut job = spec("Web Server & <Co> \"it's\"", hw);
            job.nics = nics.clone();
            let disks = [disk("/out/a.qcow2", devices.disk_bus), disk("/out/b.qcow2", devices.disk_bus)];
            for accel in [Acceleration::Kvm, Acceleration::Emulated] {
                cases.push((label, domain_xml_for(&job, &disks, &bridge(), accel, &devices)));
            }
        }
        cases
    }

    /// Devices chosen from inspected guests: every kind of choice [`Devices::choose`] makes.
    pub(crate) fn inspected_cases() -> Vec<(&'static str, Hardware, Devices)> {
        use crate::guest::inspect::tests::{guest, DEBIAN, WINDOWS};
        use crate::guest::inspect::Kernel;
        let fixed =
            Kernel { version: "6.1.0-28-amd64".into(), boots_on_virtio: true, virtio_net: true, ..Kernel::default() };
        let unfixed = Kernel { boots_on_virtio: false, ..fixed.clone() };
        let debian_uefi = guest(DEBIAN, true, vec![fixed.clone()], &[]);
        let debian_unfixed = guest(DEBIAN, false, vec![unfixed], &[]);
        let windows_fixed = guest(WINDOWS, false, Vec::new(), &["viostor.sys", "netkvm.sys"]);
        let windows_plain = guest(WINDOWS, false, Vec::new(), &[]);
        vec![
            (
                "inspected-linux-uefi",
                Hardware::default(),
                Devices::choose(&Hardware::default(), Some(&debian_uefi), false),
            ),
            (
                "inspected-linux-unfixed",
                Hardware::default(),
                Devices::choose(&Hardware::default(), Some(&debian_unfixed), false),
            ),
            ("inspected-windows-virtio", uefi(false), Devices::choose(&uefi(false), Some(&windows_fixed), true)),
            ("inspected-windows-secureboot", windows_hw(), Devices::choose(&windows_hw(), Some(&windows_plain), false)),
        ]
    }

    #[test]
    fn inspected_devices_shape_the_xml() {
        // The XML of one of the inspected cases, for a VM of that name.
        let xml_of = |wanted: &str, name: &str| {
            let (_, hw, devices) = inspected_cases().into_iter().find(|(l, _, _)| *l == wanted).unwrap();
            domain_xml_for(
                &spec(name, hw),
                &[disk("/o/a.qcow2", devices.disk_bus)],
                &bridge(),
                Acceleration::Kvm,
                &devices,
            )
        };
        let xml = xml_of("inspected-linux-uefi", "web01");
        assert!(xml.contains("<os firmware='efi'>\n    <type arch='x86_64' machine='q35'>hvm</type>"), "{xml}");
        assert!(xml.contains(
            "<metadata>\n    <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\n      \
             <libosinfo:os id='http://debian.org/debian/12'/>"
        ), "{xml}");
        assert!(xml.contains("<target dev='vda' bus='virtio'/>") && xml.contains("<model type='virtio'/>"), "{xml}");
        let xml = xml_of("inspected-linux-unfixed", "web01");
        assert!(xml.contains("<target dev='sda' bus='sata'/>") && !xml.contains("<os firmware='efi'>"), "{xml}");
        let xml = xml_of("inspected-windows-virtio", "dc01");
        assert!(
            xml.contains("<target dev='vda' bus='virtio'/>")
                && xml.contains(
                    "<interface type='bridge'>\n      <source bridge='virbr0'/>\n      <model type='virtio'/>"
                ),
            "{xml}"
        );
        assert!(xml.contains("<hyperv>") && xml.contains("<clock offset='localtime'>"), "{xml}");
        assert!(xml.contains("<libosinfo:os id='http://microsoft.com/win/7'/>"), "{xml}");
        let xml = xml_of("inspected-windows-secureboot", "dc01");
        assert!(xml.contains("<target dev='sda' bus='sata'/>") && xml.contains("<model type='e1000e'/>"), "{xml}");
        assert!(xml.contains("<loader secure='yes'/>"), "{xml}");
    }

    #[test]
    fn without_inspection_the_xml_has_no_metadata() {
        assert!(!xml_for(&spec("web01", Hardware::default())).contains("<metadata>"));
    }

    /// `virt-xml-validate`, or `None` when it is missing and HYPER2KVM_SKIP_XML_VALIDATE=1 says
    /// that is fine.
    fn validator() -> Option<PathBuf> {
        let Some(validator) = find_on_path("virt-xml-validate") else {
            if std::env::var("HYPER2KVM_SKIP_XML_VALIDATE").as_deref() == Ok("1") {
                eprintln!("virt-xml-validate not found; skipped because HYPER2KVM_SKIP_XML_VALIDATE=1");
                return None;
            }
            panic!(
                "virt-xml-validate is not on PATH: install libvirt-clients and libxml2-utils \
                 (apt-get install libvirt-clients libxml2-utils), or set HYPER2KVM_SKIP_XML_VALIDATE=1 to skip"
            );
        };
        Some(validator)
    }

    /// Asserts that libvirt's schema accepts `xml` as a domain.
    pub(crate) fn assert_schema_valid(xml: &str) {
        let Some(validator) = validator() else { return };
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("domain.xml");
        std::fs::write(&file, xml).expect("write xml");
        validate_with_libvirt_schema(&validator, &file);
    }

    /// The schema test is only as good as its cases: both domain types libvirt may be given.
    #[test]
    fn schema_cases_cover_kvm_and_emulated_domains() {
        let cases = schema_cases();
        for domain in ["<domain type='kvm'>", "<domain type='qemu'>"] {
            let with: Vec<&str> = cases.iter().filter(|(_, xml)| xml.starts_with(domain)).map(|(l, _)| *l).collect();
            for label in
                ["bios", "uefi", "uefi-secureboot", "windows", "inspected-linux-uefi", "inspected-windows-virtio"]
            {
                assert!(with.contains(&label), "no {label} case starts with {domain}");
            }
        }
    }

    #[test]
    fn generated_xml_passes_libvirt_schema_validation() {
        let Some(validator) = validator() else { return };
        let dir = tempfile::tempdir().expect("temp dir");
        for (index, (label, xml)) in schema_cases().into_iter().enumerate() {
            let file = dir.path().join(format!("{index}-{label}.xml"));
            std::fs::write(&file, xml).expect("write xml");
            validate_with_libvirt_schema(&validator, &file);
        }
    }
}
