//! The devices of a libvirt domain XML (`V.xml`) that the boot check reproduces in qemu:
//! machine, firmware, memory, each disk's bus in order, each NIC's model and MAC, and whether
//! the domain has a serial port. What the boot check cannot reproduce faithfully (another
//! machine type, secure boot, an IDE or USB disk, an unknown NIC model) is refused with a
//! reason rather than booted on different hardware, which would prove nothing about the domain.
//!
//! Everything else in the XML (graphics, video, channels, rng, the NIC's bridge or network) is
//! left out on purpose: the check boots isolated, on qemu's user networking.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::boot_check::Firmware;
use crate::mac::MacAddress;

/// A domain XML larger than this is not one hyper2kvm wrote.
const MAX_XML_BYTES: usize = 1024 * 1024;
/// q35's built-in AHCI controller has six ports; libvirt adds a second controller beyond.
const MAX_SATA_DISKS: usize = 6;
/// PCI devices the check puts behind their own PCIe root ports, as libvirt does.
const MAX_PCI_DEVICES: usize = 64;

/// The bus a disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// `virtio-blk-pci`.
    Virtio,
    /// q35's built-in AHCI controller (`ide-hd` on `ide.N`).
    Sata,
    /// A SCSI controller of [`BootDevices::scsi_model`] (`scsi-hd`).
    Scsi,
}

/// The SCSI controller model, for SCSI disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScsiModel {
    /// `virtio-scsi-pci`.
    VirtioScsi,
    /// `lsi53c895a`: libvirt's choice on x86 when the XML names no model.
    #[default]
    Lsilogic,
}

/// A NIC's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// `virtio-net-pci`.
    Virtio,
    /// Intel 82574 (`e1000e`).
    E1000e,
    /// Intel 82540EM (`e1000`).
    E1000,
    /// libvirt's default on x86 when the XML names no model.
    Rtl8139,
}

impl NicModel {
    /// The qemu device.
    pub fn device(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000e => "e1000e",
            NicModel::E1000 => "e1000",
            NicModel::Rtl8139 => "rtl8139",
        }
    }
}

/// One NIC: its model and the MAC its first packets are recognised by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Nic {
    /// From the interface's `<model type>`; rtl8139 when it names none.
    pub model: NicModel,
    /// From the interface's `<mac address>`; the one qemu would give the n-th NIC when it names none.
    pub mac: MacAddress,
}

/// The guest-visible devices the boot check gives the images.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BootDevices {
    /// One bus per image, in order; images past the end of the list are virtio disks.
    pub disks: Vec<DiskBus>,
    /// The model of the SCSI controller that SCSI disks sit on; lsilogic when the XML names none.
    pub scsi_model: ScsiModel,
    /// One per `<interface>`, in order.
    pub nics: Vec<Nic>,
    /// Whether the machine has a serial port (ttyS0) whose output is read.
    pub serial: bool,
}

impl Default for BootDevices {
    /// What the check used before it read domains: virtio disks, one virtio NIC (with the MAC
    /// qemu would give it), a serial port.
    fn default() -> Self {
        BootDevices { disks: Vec::new(), scsi_model: ScsiModel::default(), nics: vec![default_nic(0)], serial: true }
    }
}

/// The MAC qemu gives the n-th NIC without one (52:54:00:12:34:56, …57, …).
fn default_nic(n: usize) -> Nic {
    let last = 0x56u8.wrapping_add(n as u8);
    Nic { model: NicModel::Virtio, mac: MacAddress::new([0x52, 0x54, 0x00, 0x12, 0x34, last]) }
}

/// What the boot check takes from a domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// UEFI when `<os firmware='efi'>` or an `<os><loader>` is given, else BIOS.
    pub firmware: Firmware,
    /// `<memory>` converted to MiB (its unit defaults to KiB).
    pub memory_mib: u64,
    /// The disks' buses, the SCSI model, the NICs and the serial port.
    pub devices: BootDevices,
}

/// Reads the devices of `xml`; `Err` says what the boot check cannot reproduce.
pub fn parse(xml: &str) -> Result<Domain, String> {
    if xml.len() > MAX_XML_BYTES {
        return Err(format!("the domain XML is larger than {MAX_XML_BYTES} bytes"));
    }
    let mut state = State::default();
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                state.element(&path, &e)?;
                path.push(String::from_utf8_lossy(e.name().as_ref()).into_owned());
            }
            Ok(Event::Empty(e)) => {
                state.element(&path, &e)?;
                path.push(String::from_utf8_lossy(e.name().as_ref()).into_owned());
                state.end(&path);
                path.pop();
            }
            Ok(Event::Text(t)) => {
                let text = t.unescape().map_err(|e| format!("the domain XML is not valid: {e}"))?;
                state.text(&path, text.trim());
            }
            Ok(Event::End(_)) => {
                state.end(&path);
                path.pop();
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("the domain XML is not valid: {e}")),
        }
    }
    state.finish()
}

/// What has been read so far, and the element being read.
#[derive(Default)]
struct State {
    seen_domain: bool,
    machine: Option<String>,
    efi: bool,
    secure_boot: bool,
    memory_unit: Option<String>,
    memory: Option<String>,
    disks: Vec<DiskBus>,
    scsi_model: Option<ScsiModel>,
    /// The interface being read: (model, MAC).
    nic: Option<(Option<String>, Option<String>)>,
    nics: Vec<Nic>,
    serial: bool,
    /// The first thing found that the check cannot reproduce.
    refused: Option<String>,
}

fn attr(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.try_get_attribute(name).ok().flatten().and_then(|a| a.unescape_value().ok()).map(|v| v.trim().to_owned())
}

impl State {
    fn element(&mut self, path: &[String], e: &BytesStart<'_>) -> Result<(), String> {
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        let parent: Vec<&str> = path.iter().map(String::as_str).collect();
        match (parent.as_slice(), name.as_str()) {
            ([], "domain") => self.seen_domain = true,
            ([], other) => return Err(format!("the XML is a <{other}>, not a libvirt <domain>")),
            (["domain"], "memory") => self.memory_unit = attr(e, "unit"),
            (["domain"], "os") => self.efi |= attr(e, "firmware").as_deref() == Some("efi"),
            (["domain", "os"], "type") => self.machine = attr(e, "machine"),
            (["domain", "os"], "loader") => {
                self.efi = true;
                self.secure_boot |= attr(e, "secure").as_deref() == Some("yes");
            }
            (["domain", "os", "firmware"], "feature") => {
                let on = attr(e, "enabled").as_deref() == Some("yes");
                self.secure_boot |= on && attr(e, "name").as_deref() == Some("secure-boot");
            }
            (["domain", "devices"], "disk") => self.disk(e)?,
            (["domain", "devices", "disk"], "target") => self.disk_target(e)?,
            (["domain", "devices"], "controller") => self.controller(e)?,
            (["domain", "devices"], "interface") => self.nic = Some((None, None)),
            (["domain", "devices", "interface"], "model") => {
                if let Some(nic) = &mut self.nic {
                    nic.0 = attr(e, "type");
                }
            }
            (["domain", "devices", "interface"], "mac") => {
                if let Some(nic) = &mut self.nic {
                    nic.1 = attr(e, "address");
                }
            }
            (["domain", "devices"], "serial" | "console") => self.serial = true,
            _ => {}
        }
        Ok(())
    }

    fn disk(&mut self, e: &BytesStart<'_>) -> Result<(), String> {
        match attr(e, "device").as_deref() {
            None | Some("disk") => Ok(()),
            Some(other) => Err(format!("the domain has a {other} device; the boot check boots disks only")),
        }
    }

    fn disk_target(&mut self, e: &BytesStart<'_>) -> Result<(), String> {
        let bus = match attr(e, "bus").as_deref() {
            Some("virtio") => DiskBus::Virtio,
            Some("sata") => DiskBus::Sata,
            Some("scsi") => DiskBus::Scsi,
            Some(other) => {
                return Err(format!("a disk is on the {other} bus; the boot check reproduces virtio, sata and scsi"))
            }
            None => return Err("a disk names no bus; the boot check needs one (virtio, sata or scsi)".into()),
        };
        self.disks.push(bus);
        Ok(())
    }

    fn controller(&mut self, e: &BytesStart<'_>) -> Result<(), String> {
        if attr(e, "type").as_deref() != Some("scsi") {
            return Ok(());
        }
        let model = match attr(e, "model").as_deref() {
            Some("virtio-scsi") => ScsiModel::VirtioScsi,
            None | Some("lsilogic") => ScsiModel::Lsilogic,
            Some(other) => {
                return Err(format!(
                    "the SCSI controller is a {other}; the boot check reproduces virtio-scsi and lsilogic"
                ))
            }
        };
        if self.scsi_model.is_some_and(|m| m != model) {
            return Err("the domain has SCSI controllers of two models; the boot check reproduces one".into());
        }
        self.scsi_model = Some(model);
        Ok(())
    }

    fn text(&mut self, path: &[String], text: &str) {
        if path.len() == 2 && path[0] == "domain" && path[1] == "memory" {
            self.memory = Some(text.to_owned());
        }
    }

    fn end(&mut self, path: &[String]) {
        let is_interface = path.len() == 3 && path[1] == "devices" && path[2] == "interface";
        if !is_interface {
            return;
        }
        if let Some((model, mac)) = self.nic.take() {
            match nic(self.nics.len(), model, mac) {
                Ok(nic) => self.nics.push(nic),
                Err(reason) => self.refused = self.refused.take().or(Some(reason)),
            }
        }
    }

    fn finish(self) -> Result<Domain, String> {
        if let Some(reason) = self.refused {
            return Err(reason);
        }
        if !self.seen_domain {
            return Err("the XML has no <domain>".into());
        }
        match self.machine.as_deref() {
            Some(m) if m == "q35" || m.starts_with("pc-q35") => {}
            Some(other) => return Err(format!("the machine is {other}; the boot check reproduces q35 only")),
            None => return Err("the domain names no machine type; the boot check reproduces q35".into()),
        }
        if self.secure_boot {
            return Err("the domain boots with UEFI secure boot, which the boot check does not reproduce".into());
        }
        if self.disks.is_empty() {
            return Err("the domain has no disk".into());
        }
        if self.disks.iter().filter(|b| **b == DiskBus::Sata).count() > MAX_SATA_DISKS {
            return Err(format!("the domain has more than {MAX_SATA_DISKS} SATA disks (one AHCI controller)"));
        }
        if self.nics.len() + self.disks.len() > MAX_PCI_DEVICES {
            return Err(format!("the domain has more than {MAX_PCI_DEVICES} disks and NICs"));
        }
        let memory_mib = memory_mib(self.memory.as_deref(), self.memory_unit.as_deref())?;
        Ok(Domain {
            firmware: if self.efi { Firmware::Uefi } else { Firmware::Bios },
            memory_mib,
            devices: BootDevices {
                disks: self.disks,
                scsi_model: self.scsi_model.unwrap_or_default(),
                nics: self.nics,
                serial: self.serial,
            },
        })
    }
}

fn nic(index: usize, model: Option<String>, mac: Option<String>) -> Result<Nic, String> {
    let model = match model.as_deref() {
        Some("virtio") => NicModel::Virtio,
        Some("e1000e") => NicModel::E1000e,
        Some("e1000") => NicModel::E1000,
        None | Some("rtl8139") => NicModel::Rtl8139,
        Some(other) => {
            return Err(format!("a NIC is a {other}; the boot check reproduces virtio, e1000e, e1000 and rtl8139"))
        }
    };
    let mac = match mac {
        Some(text) => text.parse().map_err(|_| format!("a NIC's MAC address {text:?} is not a MAC address"))?,
        None => default_nic(index).mac,
    };
    Ok(Nic { model, mac })
}

/// `<memory unit='…'>N</memory>` in MiB (libvirt's default unit is KiB).
fn memory_mib(value: Option<&str>, unit: Option<&str>) -> Result<u64, String> {
    let value = value.ok_or("the domain gives no memory size")?;
    let n: u64 = value.parse().map_err(|_| format!("the memory size {value:?} is not a number"))?;
    let bytes_per = match unit.unwrap_or("KiB") {
        "b" | "bytes" => 1u64,
        "k" | "KiB" => 1 << 10,
        "KB" => 1000,
        "M" | "MiB" => 1 << 20,
        "MB" => 1_000_000,
        "G" | "GiB" => 1 << 30,
        "GB" => 1_000_000_000,
        "T" | "TiB" => 1 << 40,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("the memory unit {other:?} is not one libvirt knows")),
    };
    let mib = n.checked_mul(bytes_per).map(|b| b / (1 << 20)).ok_or("the memory size is too large")?;
    if mib < 64 {
        return Err(format!("the domain has {mib} MiB of memory, too little to boot"));
    }
    Ok(mib)
}
