//! Which devices the domain gives the guest, and why: from the guest's inspection when there is
//! one (after the fix, when the job fixed it), else from the manifest's hardware. virtio only
//! where the guest can drive it; everything else gets devices every OS has drivers for.
//! The reasons go into `V.json` (docs/GUEST.md, "Device choice").

use serde::{Serialize, Serializer};

use super::domain_xml::{is_windows, BootFirmware, DiskBus};
use crate::guest::GuestInfo;
use crate::manifest::{Firmware, Hardware};

/// The machine type: PCIe (virtio devices on PCIe ports), what virt-v2v and virt-install pick
/// for the guests hyper2kvm converts.
const MACHINE: &str = "q35";

/// The virtio-win driver files for the disk and the NIC, as virt-v2v installs them into
/// `System32/drivers` (lower case: Windows file names are compared without case).
const WINDOWS_VIRTIO_DISK: &str = "viostor.sys";
const WINDOWS_VIRTIO_NET: &str = "netkvm.sys";

/// libosinfo's URIs for the short ids libguestfs gives (`debian12` → `http://debian.org/debian/12`),
/// by the short id's prefix. A short id of another family gets no `<metadata>`: a made-up URI
/// would mislead the tools that read it.
const OSINFO_FAMILIES: &[(&str, &str)] = &[
    ("debian", "http://debian.org/debian/"),
    ("ubuntu", "http://ubuntu.com/ubuntu/"),
    ("fedora", "http://fedoraproject.org/fedora/"),
    ("rhel", "http://redhat.com/rhel/"),
    ("centos", "http://centos.org/centos/"),
    ("win", "http://microsoft.com/win/"),
];

/// The NIC model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// virtio-net: needs the guest's virtio_net (Linux) or netkvm (Windows) driver.
    Virtio,
    /// Intel 82574: Windows and Linux drive it with their own drivers.
    E1000e,
}

impl NicModel {
    /// The `<model type>` value.
    pub fn as_str(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000e => "e1000e",
        }
    }
}

/// Why each device was chosen: one short sentence each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceReasons {
    pub firmware: String,
    pub disk_bus: String,
    pub nic_model: String,
    pub machine: String,
    pub osinfo: String,
}

/// The devices of the domain (the `devices` object of `V.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Devices {
    /// `bios` or `uefi`.
    #[serde(serialize_with = "firmware_name")]
    pub firmware: BootFirmware,
    /// UEFI secure boot (only from the manifest: inspection cannot tell).
    pub secure_boot: bool,
    /// virtio when every kernel (or Windows' viostor driver) can boot from it, else SATA.
    pub disk_bus: DiskBus,
    /// virtio when the guest has a virtio-net driver, else e1000e.
    pub nic_model: NicModel,
    /// Always `q35`.
    pub machine: &'static str,
    /// libosinfo's URI for the guest's OS, written into `<metadata>`.
    pub osinfo: Option<String>,
    /// Whether the guest is Windows (Hyper-V enlightenments, local-time clock, VGA).
    pub windows: bool,
    /// Why each device was chosen, one sentence each (`reasons` in `V.json`).
    pub reasons: DeviceReasons,
}

fn firmware_name<S: Serializer>(firmware: &BootFirmware, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(match firmware {
        BootFirmware::Bios => "bios",
        BootFirmware::Uefi { .. } => "uefi",
    })
}

impl Devices {
    /// Chooses the devices from the manifest's hardware and, when the guest was inspected, from
    /// what inspection found; `virtio_win` says whether VIRTIO_WIN is configured (a Windows
    /// guest gets virtio only with it, and only when its drivers are found in the guest).
    /// Without inspection the choice is the manifest's alone, as before inspection existed.
    pub fn choose(hw: &Hardware, guest: Option<&GuestInfo>, virtio_win: bool) -> Devices {
        let (firmware, firmware_reason) = firmware(hw, guest);
        let (osinfo, osinfo_reason) = osinfo(guest);
        let (disk_bus, nic_model, disk_reason, nic_reason, windows) = match guest {
            None => by_manifest(hw),
            Some(g) if g.os_type == "linux" => linux(g),
            Some(g) if g.os_type == "windows" => windows(g, virtio_win),
            Some(g) => other(g),
        };
        Devices {
            firmware,
            secure_boot: matches!(firmware, BootFirmware::Uefi { secure_boot: true }),
            disk_bus,
            nic_model,
            machine: MACHINE,
            osinfo,
            windows,
            reasons: DeviceReasons {
                firmware: firmware_reason,
                disk_bus: disk_reason,
                nic_model: nic_reason,
                machine: "q35: PCIe, as virt-v2v and virt-install choose for a converted guest".into(),
                osinfo: osinfo_reason,
            },
        }
    }
}

type Choice = (DiskBus, NicModel, String, String, bool);

fn firmware(hw: &Hardware, guest: Option<&GuestInfo>) -> (BootFirmware, String) {
    let manifest = BootFirmware::of(hw);
    if guest.is_some_and(|g| g.firmware == "uefi") {
        return (
            BootFirmware::Uefi { secure_boot: hw.secureboot },
            "uefi: inspection found EFI boot loaders on a GPT disk".into(),
        );
    }
    let said = match (hw.firmware, manifest) {
        (Some(Firmware::Uefi), _) => "the manifest's vm.firmware is uefi",
        (None, BootFirmware::Uefi { .. }) => "the manifest enables secure boot, which only UEFI has",
        (Some(Firmware::Bios), _) => "the manifest's vm.firmware is bios",
        (None, BootFirmware::Bios) => "the manifest names no firmware",
    };
    let name = if manifest == BootFirmware::Bios { "bios" } else { "uefi" };
    let reason = match guest {
        // Windows' system partition is not mounted, so inspection cannot see its boot loaders.
        Some(_) => format!("{name}: inspection found no EFI boot loaders and {said}"),
        None => format!("{name}: {said} (no inspection)"),
    };
    (manifest, reason)
}

fn by_manifest(hw: &Hardware) -> Choice {
    if is_windows(hw) {
        let why = "the manifest names a Windows guest, which has no virtio driver of its own (no inspection)";
        (DiskBus::Sata, NicModel::E1000e, format!("sata: {why}"), format!("e1000e: {why}"), true)
    } else {
        let why = "the manifest names no Windows guest (no inspection)";
        (DiskBus::Virtio, NicModel::Virtio, format!("virtio: {why}"), format!("virtio: {why}"), false)
    }
}

fn linux(g: &GuestInfo) -> Choice {
    let kernels = g.kernels.len();
    let (disk_bus, disk) = match g.kernels.iter().find(|k| !k.boots_on_virtio) {
        _ if kernels == 0 => (DiskBus::Sata, "sata: inspection found no kernel in /boot to check for virtio".into()),
        Some(k) => {
            (DiskBus::Sata, format!("sata: kernel {} has no virtio_blk built in or in its initramfs", k.version))
        }
        None => {
            (DiskBus::Virtio, format!("virtio: every kernel ({kernels}) has virtio_blk built in or in its initramfs"))
        }
    };
    let (nic_model, nic) = match g.kernels.iter().find(|k| !k.virtio_net) {
        _ if kernels == 0 => (NicModel::E1000e, "e1000e: inspection found no kernel to check for virtio_net".into()),
        Some(k) => (NicModel::E1000e, format!("e1000e: kernel {} has no virtio_net", k.version)),
        None => (NicModel::Virtio, format!("virtio: every kernel ({kernels}) has virtio_net")),
    };
    (disk_bus, nic_model, disk, nic, false)
}

fn windows(g: &GuestInfo, virtio_win: bool) -> Choice {
    let has = |file: &str| g.virtio_drivers.iter().any(|d| d.eq_ignore_ascii_case(file));
    let pick = |file: &str, what: &str| -> (bool, String) {
        if !virtio_win {
            (false, format!("Windows without VIRTIO_WIN: no virtio {what} driver was installed"))
        } else if has(file) {
            (true, format!("VIRTIO_WIN is set and the guest has virtio-win's {file}"))
        } else {
            (
                false,
                format!("VIRTIO_WIN is set but the guest has no {file} (the fix did not run or did not install it)"),
            )
        }
    };
    let (disk_virtio, disk) = pick(WINDOWS_VIRTIO_DISK, "storage");
    let (net_virtio, nic) = pick(WINDOWS_VIRTIO_NET, "network");
    let disk_bus = if disk_virtio { DiskBus::Virtio } else { DiskBus::Sata };
    let nic_model = if net_virtio { NicModel::Virtio } else { NicModel::E1000e };
    (disk_bus, nic_model, format!("{}: {disk}", bus_name(disk_bus)), format!("{}: {nic}", nic_model.as_str()), true)
}

fn other(g: &GuestInfo) -> Choice {
    let why = format!("inspection found {:?}, whose virtio support hyper2kvm does not check", g.os_type);
    (DiskBus::Sata, NicModel::E1000e, format!("sata: {why}"), format!("e1000e: {why}"), false)
}

fn bus_name(bus: DiskBus) -> &'static str {
    match bus {
        DiskBus::Virtio => "virtio",
        DiskBus::Sata => "sata",
    }
}

fn osinfo(guest: Option<&GuestInfo>) -> (Option<String>, String) {
    let Some(g) = guest else { return (None, "none: no inspection".into()) };
    let short = g.osinfo.trim();
    if short.is_empty() || short == "unknown" {
        return (None, "none: inspection gave no libosinfo id".into());
    }
    match osinfo_uri(short) {
        Some(uri) => (Some(uri), format!("inspection's libosinfo id {short}")),
        None => (None, format!("none: no libosinfo URI is known here for the id {short}")),
    }
}

/// libosinfo's URI for a short id of a known family.
pub(crate) fn osinfo_uri(short: &str) -> Option<String> {
    OSINFO_FAMILIES.iter().find_map(|(prefix, base)| {
        let version = short.strip_prefix(prefix)?;
        let ok = !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.')
            && version.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
        ok.then(|| format!("{base}{version}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::inspect::tests::{guest, DEBIAN, WINDOWS};
    use crate::guest::inspect::Kernel;

    fn kernel(version: &str, boots_on_virtio: bool, virtio_net: bool) -> Kernel {
        Kernel { version: version.into(), boots_on_virtio, virtio_net, ..Kernel::default() }
    }

    /// The suite's Debian 12 fixture after the fix: both kernels have virtio.
    fn fixed_debian() -> GuestInfo {
        guest(DEBIAN, false, vec![kernel("6.1.0-28-amd64", true, true), kernel("6.1.0-9-amd64", true, true)], &[])
    }

    fn windows_with(drivers: &[&str]) -> GuestInfo {
        guest(WINDOWS, false, Vec::new(), drivers)
    }

    fn uefi_hw() -> Hardware {
        Hardware { firmware: Some(Firmware::Uefi), ..Hardware::default() }
    }

    #[test]
    fn without_inspection_the_manifest_decides_as_before() {
        let linux = Devices::choose(&Hardware::default(), None, true);
        assert_eq!((linux.disk_bus, linux.nic_model, linux.windows), (DiskBus::Virtio, NicModel::Virtio, false));
        assert_eq!((linux.firmware, linux.osinfo.as_deref()), (BootFirmware::Bios, None));
        assert!(linux.reasons.disk_bus.contains("no inspection"), "{:?}", linux.reasons);
        let hw = Hardware { os_version: Some("windows2019srv_64Guest".into()), ..uefi_hw() };
        let win = Devices::choose(&hw, None, true);
        assert_eq!((win.disk_bus, win.nic_model, win.windows), (DiskBus::Sata, NicModel::E1000e, true));
        assert_eq!(win.firmware, BootFirmware::Uefi { secure_boot: false });
        assert_eq!(win.reasons.firmware, "uefi: the manifest's vm.firmware is uefi (no inspection)");
    }

    #[test]
    fn a_linux_guest_whose_kernels_all_have_virtio_gets_virtio() {
        let d = Devices::choose(&Hardware::default(), Some(&fixed_debian()), false);
        assert_eq!((d.disk_bus, d.nic_model, d.machine), (DiskBus::Virtio, NicModel::Virtio, "q35"));
        assert_eq!(d.osinfo.as_deref(), Some("http://debian.org/debian/12"));
        assert_eq!(d.reasons.disk_bus, "virtio: every kernel (2) has virtio_blk built in or in its initramfs");
        assert_eq!(d.reasons.osinfo, "inspection's libosinfo id debian12");
        assert!(!d.windows);
    }

    #[test]
    fn one_kernel_without_virtio_keeps_sata() {
        // The fixture before the fix: virtio_blk is a module, not in the initramfs.
        let unfixed =
            guest(DEBIAN, false, vec![kernel("6.1.0-28-amd64", true, true), kernel("6.1.0-9-amd64", false, true)], &[]);
        let d = Devices::choose(&Hardware::default(), Some(&unfixed), true);
        assert_eq!((d.disk_bus, d.nic_model), (DiskBus::Sata, NicModel::Virtio));
        assert_eq!(d.reasons.disk_bus, "sata: kernel 6.1.0-9-amd64 has no virtio_blk built in or in its initramfs");
        let no_net = guest(DEBIAN, false, vec![kernel("4.19.0-1-amd64", true, false)], &[]);
        let d = Devices::choose(&Hardware::default(), Some(&no_net), false);
        assert_eq!((d.disk_bus, d.nic_model), (DiskBus::Virtio, NicModel::E1000e));
        assert_eq!(d.reasons.nic_model, "e1000e: kernel 4.19.0-1-amd64 has no virtio_net");
        let no_kernels = guest(DEBIAN, false, Vec::new(), &[]);
        let d = Devices::choose(&Hardware::default(), Some(&no_kernels), false);
        assert_eq!((d.disk_bus, d.nic_model), (DiskBus::Sata, NicModel::E1000e));
    }

    #[test]
    fn firmware_is_uefi_when_inspection_or_the_manifest_says_so() {
        let uefi_guest = guest(DEBIAN, true, vec![kernel("6.1.0-28-amd64", true, true)], &[]);
        let bios_hw = Hardware { firmware: Some(Firmware::Bios), ..Hardware::default() };
        let d = Devices::choose(&bios_hw, Some(&uefi_guest), false);
        assert_eq!(d.firmware, BootFirmware::Uefi { secure_boot: false });
        assert_eq!(d.reasons.firmware, "uefi: inspection found EFI boot loaders on a GPT disk");
        let secure = Hardware { secureboot: true, ..Hardware::default() };
        assert!(Devices::choose(&secure, Some(&uefi_guest), false).secure_boot);
        // Windows' system partition is not mounted by inspection: the manifest still counts.
        let d = Devices::choose(&uefi_hw(), Some(&windows_with(&[])), false);
        assert_eq!(d.firmware, BootFirmware::Uefi { secure_boot: false });
        assert_eq!(
            d.reasons.firmware,
            "uefi: inspection found no EFI boot loaders and the manifest's vm.firmware is uefi"
        );
        let d = Devices::choose(&Hardware::default(), Some(&fixed_debian()), false);
        assert_eq!(d.firmware, BootFirmware::Bios);
    }

    #[test]
    fn windows_without_virtio_win_keeps_sata_and_e1000e_and_says_so() {
        // Even with virtio drivers found: without VIRTIO_WIN the fix installed none.
        let d = Devices::choose(&Hardware::default(), Some(&windows_with(&["viostor.sys", "netkvm.sys"])), false);
        assert_eq!((d.disk_bus, d.nic_model, d.windows), (DiskBus::Sata, NicModel::E1000e, true));
        assert_eq!(d.reasons.disk_bus, "sata: Windows without VIRTIO_WIN: no virtio storage driver was installed");
        assert_eq!(d.reasons.nic_model, "e1000e: Windows without VIRTIO_WIN: no virtio network driver was installed");
        assert_eq!(d.osinfo.as_deref(), Some("http://microsoft.com/win/7"));
    }

    #[test]
    fn windows_with_virtio_win_gets_virtio_only_for_the_drivers_it_has() {
        let d = Devices::choose(&Hardware::default(), Some(&windows_with(&["viostor.sys", "netkvm.sys"])), true);
        assert_eq!((d.disk_bus, d.nic_model), (DiskBus::Virtio, NicModel::Virtio));
        assert_eq!(d.reasons.disk_bus, "virtio: VIRTIO_WIN is set and the guest has virtio-win's viostor.sys");
        let d = Devices::choose(&Hardware::default(), Some(&windows_with(&["netkvm.sys"])), true);
        assert_eq!((d.disk_bus, d.nic_model), (DiskBus::Sata, NicModel::Virtio));
        let d = Devices::choose(&Hardware::default(), Some(&windows_with(&[])), true);
        assert_eq!((d.disk_bus, d.nic_model), (DiskBus::Sata, NicModel::E1000e));
        assert!(d.reasons.disk_bus.contains("has no viostor.sys (the fix did not run"), "{:?}", d.reasons);
    }

    #[test]
    fn another_os_gets_sata_and_e1000e() {
        let mut bsd = guest(DEBIAN, false, Vec::new(), &[]);
        bsd.os_type = "freebsd".into();
        bsd.osinfo = "freebsd13.1".into();
        let d = Devices::choose(&Hardware::default(), Some(&bsd), true);
        assert_eq!((d.disk_bus, d.nic_model, d.osinfo.as_deref()), (DiskBus::Sata, NicModel::E1000e, None));
        assert_eq!(d.reasons.osinfo, "none: no libosinfo URI is known here for the id freebsd13.1");
    }

    #[test]
    fn osinfo_uris_follow_libosinfo() {
        for (short, uri) in [
            ("debian12", Some("http://debian.org/debian/12")),
            ("ubuntu22.04", Some("http://ubuntu.com/ubuntu/22.04")),
            ("rhel9.2", Some("http://redhat.com/rhel/9.2")),
            ("centos7.0", Some("http://centos.org/centos/7.0")),
            ("fedora38", Some("http://fedoraproject.org/fedora/38")),
            ("win2k19", Some("http://microsoft.com/win/2k19")),
            ("win10", Some("http://microsoft.com/win/10")),
            ("centos-stream9", None),
            ("debian", None),
            ("debian12'/><x", None),
        ] {
            assert_eq!(osinfo_uri(short).as_deref(), uri, "{short}");
        }
    }

    #[test]
    fn devices_serialize_with_their_reasons() {
        let d = Devices::choose(&uefi_hw(), Some(&fixed_debian()), false);
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["firmware"], "uefi");
        assert_eq!(json["disk_bus"], "virtio");
        assert_eq!(json["nic_model"], "virtio");
        assert_eq!(json["machine"], "q35");
        assert_eq!(json["osinfo"], "http://debian.org/debian/12");
        assert!(json["reasons"]["disk_bus"].as_str().is_some_and(|r| r.starts_with("virtio: every kernel")));
    }
}
