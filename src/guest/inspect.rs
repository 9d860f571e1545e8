//! What the guest is: libguestfs' `virt-inspector` (its XML read with quick-xml) for the
//! operating system, then the guest's own boot files ([`super::files`]) for the boot loader,
//! the firmware it boots with, and each kernel's virtio drivers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use quick_xml::events::Event;
use quick_xml::Reader;
use serde::Serialize;

use super::files::{self, GuestFiles};
use super::tools::{absolute, Cancel, Tools};
use super::GuestError;

/// Application names that are VMware's guest tools.
const VMWARE_TOOLS: &[&str] = &["open-vm-tools", "open-vm-tools-desktop", "vmware-tools", "VMware Tools"];

/// The guest, as far as inspection can tell.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GuestInfo {
    /// `linux`, `windows`, ... (libguestfs' `name`).
    pub os_type: String,
    /// `debian`, `rhel`, `ubuntu`, `windows`, ...
    pub distro: String,
    /// `major.minor`.
    pub version: String,
    /// The product's own name (e.g. `12.2`, `Windows Server 2019 Standard`).
    pub product_name: String,
    /// libosinfo's id (e.g. `debian12`): the OS id for libvirt's metadata.
    pub osinfo: String,
    /// `x86_64`, `i386`, `aarch64`, ...
    pub arch: String,
    /// The guest's host name as virt-inspector read it from its configuration (empty when it found none).
    pub hostname: String,
    /// The root file system's device as libguestfs named it.
    pub root: String,
    /// `grub2`, `grub-legacy`, `systemd-boot`, `windows` or `unknown`.
    pub boot_loader: String,
    /// `bios` or `uefi`.
    pub firmware: String,
    /// Mount points from the guest's fstab as libguestfs resolved them: (device, path).
    pub mountpoints: Vec<(String, String)>,
    /// Installed VMware tools packages.
    pub vmware_tools: Vec<String>,
    /// Every kernel in `/boot`.
    pub kernels: Vec<Kernel>,
    /// Windows: the virtio-win drivers in `System32/drivers` (`viostor.sys`, `netkvm.sys`,
    /// ...), as virt-v2v installs them from VIRTIO_WIN; empty for other guests.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub virtio_drivers: Vec<String>,
}

/// One installed kernel and its virtio support.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Kernel {
    /// The kernel release, from its `vmlinuz-VERSION` file in `/boot` (e.g. `6.1.0-18-amd64`).
    pub version: String,
    /// `virtio_blk` is built in (`CONFIG_VIRTIO_BLK=y` in `/boot/config-VERSION`).
    pub virtio_builtin: bool,
    /// `/lib/modules/VERSION/.../virtio_blk.ko*` exists.
    pub virtio_module: bool,
    /// The initramfs file name, if the kernel has one.
    pub initrd: Option<String>,
    /// The virtio modules `lsinitramfs` lists in it.
    pub initrd_virtio: Vec<String>,
    /// Whether this kernel can find a virtio disk at boot: built in, or the module in its
    /// initramfs.
    pub boots_on_virtio: bool,
    /// virtio_net is built in (`CONFIG_VIRTIO_NET=y`) or a module under `/lib/modules/VERSION`
    /// (loaded after boot, so it need not be in the initramfs).
    pub virtio_net: bool,
}

/// What `virt-inspector` says about the first operating system it finds.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Inspected {
    pub name: String,
    pub distro: String,
    pub major: String,
    pub minor: String,
    pub product_name: String,
    pub osinfo: String,
    pub arch: String,
    pub hostname: String,
    pub root: String,
    pub mountpoints: Vec<(String, String)>,
    pub applications: Vec<String>,
}

/// Inspects the guest on `images` (all the VM's disks, first disk first). `scratch` receives
/// the tools' logs and the copy of `/boot`.
pub fn inspect(
    tools: &Tools,
    images: &[PathBuf],
    scratch: &Path,
    limit: Duration,
    cancel: Cancel<'_>,
) -> Result<GuestInfo, GuestError> {
    let scratch = absolute(scratch);
    std::fs::create_dir_all(&scratch).map_err(|source| GuestError::Io {
        what: "cannot create",
        path: scratch.clone(),
        source,
    })?;
    let mut cmd = tools.command("virt-inspector");
    files::add_disks(&mut cmd, images);
    let xml = tools.run_output("virt-inspector", cmd, &scratch.join("virt-inspector.log"), limit, cancel)?;
    let os = parse_inspector(&xml)?.ok_or_else(|| GuestError::NotRecognised {
        images: super::capped(&images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(), 4),
    })?;
    let found = files::read(tools, images, &scratch, limit, cancel)?;
    let kernels = kernels(tools, &found, &scratch, limit, cancel)?;
    Ok(assemble(os, &found, kernels))
}

fn assemble(os: Inspected, found: &GuestFiles, kernels: Vec<Kernel>) -> GuestInfo {
    let vmware_tools =
        os.applications.iter().filter(|a| VMWARE_TOOLS.iter().any(|t| t.eq_ignore_ascii_case(a))).cloned().collect();
    let version = if os.minor.is_empty() { os.major.clone() } else { format!("{}.{}", os.major, os.minor) };
    GuestInfo {
        boot_loader: boot_loader(&os.name, &found.boot),
        firmware: firmware(found),
        os_type: os.name,
        distro: os.distro,
        version,
        product_name: os.product_name,
        osinfo: os.osinfo,
        arch: os.arch,
        hostname: os.hostname,
        root: os.root,
        mountpoints: os.mountpoints,
        vmware_tools,
        kernels,
        virtio_drivers: virtio_drivers(&found.windows_drivers),
    }
}

/// The virtio-win driver file names (`viostor.sys`, `netkvm.sys`, ...) among Windows' drivers:
/// virtio-win names its drivers `vio*` except the network one.
pub(crate) fn virtio_drivers(paths: &[String]) -> Vec<String> {
    let mut names: Vec<String> = paths
        .iter()
        .filter_map(|p| p.rsplit('/').next())
        .map(str::to_ascii_lowercase)
        .filter(|n| n.ends_with(".sys") && (n.starts_with("vio") || n.starts_with("netkvm")))
        .collect();
    names.sort();
    names.dedup();
    names
}

fn boot_loader(os_type: &str, boot: &Path) -> String {
    let loader = if os_type == "windows" {
        "windows"
    } else if boot.join("grub/grub.cfg").is_file() || boot.join("grub2/grub.cfg").is_file() {
        "grub2"
    } else if boot.join("grub/menu.lst").is_file() || boot.join("grub/grub.conf").is_file() {
        "grub-legacy"
    } else if boot.join("loader/entries").is_dir() {
        "systemd-boot"
    } else {
        "unknown"
    };
    loader.into()
}

/// UEFI when the disk has a GPT label and an EFI system partition with boot loaders in it;
/// BIOS otherwise (a GPT disk booted by BIOS GRUB has a bios_grub partition and no ESP).
fn firmware(found: &GuestFiles) -> String {
    let uefi = !found.efi_entries.is_empty() && found.parttype.as_deref() != Some("msdos");
    if uefi { "uefi" } else { "bios" }.into()
}

/// Each kernel's virtio support, from its config, its modules and its initramfs.
fn kernels(
    tools: &Tools,
    found: &GuestFiles,
    scratch: &Path,
    limit: Duration,
    cancel: Cancel<'_>,
) -> Result<Vec<Kernel>, GuestError> {
    let mut out = Vec::new();
    for version in files::kernel_versions(&found.boot) {
        let config = std::fs::read_to_string(found.boot.join(format!("config-{version}"))).unwrap_or_default();
        let virtio_builtin = config.lines().any(|l| l.trim() == "CONFIG_VIRTIO_BLK=y");
        let in_modules = |paths: &[String]| paths.iter().any(|m| m.contains(&format!("/modules/{version}/")));
        let virtio_module = in_modules(&found.virtio_modules);
        let virtio_net =
            config.lines().any(|l| l.trim() == "CONFIG_VIRTIO_NET=y") || in_modules(&found.virtio_net_modules);
        let initrd = files::initrd_of(&found.boot, &version);
        let initrd_virtio = match &initrd {
            Some(path) => virtio_in(&files::initramfs_list(tools, path, scratch, limit, cancel)?),
            None => Vec::new(),
        };
        let boots_on_virtio = virtio_builtin || initrd_virtio.iter().any(|m| m == "virtio_blk");
        out.push(Kernel {
            version,
            virtio_builtin,
            virtio_module,
            initrd: initrd.and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
            initrd_virtio,
            boots_on_virtio,
            virtio_net,
        });
    }
    Ok(out)
}

/// The virtio module names (`virtio_blk`, `virtio_pci`, ...) in an initramfs listing.
pub(crate) fn virtio_in(listing: &[String]) -> Vec<String> {
    let mut names: Vec<String> = listing
        .iter()
        .filter_map(|path| {
            let file = path.rsplit('/').next()?;
            let stem = file.split(".ko").next()?;
            (file.contains(".ko") && stem.starts_with("virtio")).then(|| stem.to_owned())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Reads virt-inspector's XML: the first `<operatingsystem>` (None when there is none).
pub(crate) fn parse_inspector(xml: &str) -> Result<Option<Inspected>, GuestError> {
    let bad = |reason: String| GuestError::Output { tool: "virt-inspector".into(), reason };
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let mut os: Option<Inspected> = None;
    let mut done = false;
    let mut mount_dev = String::new();
    loop {
        match reader.read_event().map_err(|e| bad(e.to_string()))? {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if name == "operatingsystem" && os.is_none() && !done {
                    os = Some(Inspected::default());
                }
                if name == "mountpoint" {
                    mount_dev = attribute(&e, "dev");
                }
                path.push(name);
            }
            Event::End(e) => {
                if e.name().as_ref() == b"operatingsystem" && os.is_some() {
                    done = true;
                }
                path.pop();
            }
            Event::Text(t) if !done => {
                let Some(os) = os.as_mut() else { continue };
                let text = t.unescape().map_err(|e| bad(e.to_string()))?.trim().to_owned();
                record(os, &path, text, &mount_dev);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(os)
}

fn attribute(e: &quick_xml::events::BytesStart<'_>, key: &str) -> String {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == key.as_bytes())
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        .unwrap_or_default()
}

/// Stores one text node of an `<operatingsystem>` by where it is.
fn record(os: &mut Inspected, path: &[String], text: String, mount_dev: &str) {
    let Some(at) = path.iter().rposition(|p| p == "operatingsystem") else { return };
    let rel: Vec<&str> = path[at + 1..].iter().map(String::as_str).collect();
    match rel.as_slice() {
        ["name"] => os.name = text,
        ["distro"] => os.distro = text,
        ["major_version"] => os.major = text,
        ["minor_version"] => os.minor = text,
        ["product_name"] => os.product_name = text,
        ["osinfo"] => os.osinfo = text,
        ["arch"] => os.arch = text,
        ["hostname"] => os.hostname = text,
        ["root"] => os.root = text,
        ["mountpoints", "mountpoint"] => os.mountpoints.push((mount_dev.to_owned(), text)),
        ["applications", "application", "name"] => os.applications.push(text),
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// libguestfs' own inspector/example-windows.xml (the output of virt-inspector on its
    /// test Windows 7 image), with the `<osinfo>` libguestfs gives Windows 6.1 Client added.
    pub(crate) const WINDOWS: &str = r#"<?xml version="1.0"?>
<operatingsystems>
  <operatingsystem>
    <root>/dev/sda2</root>
    <name>windows</name>
    <arch>i386</arch>
    <distro>windows</distro>
    <product_name>Microsoft Windows 7 Phony Edition</product_name>
    <product_variant>Client</product_variant>
    <major_version>6</major_version>
    <minor_version>1</minor_version>
    <windows_systemroot>/Windows</windows_systemroot>
    <windows_current_control_set>ControlSet001</windows_current_control_set>
    <format>installed</format>
    <osinfo>win7</osinfo>
    <mountpoints>
      <mountpoint dev="/dev/sda2">/</mountpoint>
    </mountpoints>
    <filesystems>
      <filesystem dev="/dev/sda2">
        <type>ntfs</type>
      </filesystem>
    </filesystems>
    <drive_mappings>
      <drive_mapping name="C">/dev/sda2</drive_mapping>
    </drive_mappings>
    <applications>
      <application>
        <name>test1</name>
        <display_name>Test1 is not real software</display_name>
        <version>1.2.3</version>
      </application>
    </applications>
  </operatingsystem>
</operatingsystems>"#;

    /// A guest as [`inspect`] assembles it from virt-inspector's `xml` and what the boot files
    /// showed: the firmware, the kernels, and the files in Windows' `System32/drivers`.
    pub(crate) fn guest(xml: &str, uefi: bool, kernels: Vec<Kernel>, windows_drivers: &[&str]) -> GuestInfo {
        let os = parse_inspector(xml).unwrap().unwrap();
        let files = GuestFiles {
            parttype: Some(if uefi { "gpt" } else { "msdos" }.into()),
            efi_entries: if uefi { vec!["/boot/efi/EFI/debian".into()] } else { Vec::new() },
            windows_drivers: windows_drivers.iter().map(|d| format!("/Windows/System32/drivers/{d}")).collect(),
            ..GuestFiles::default()
        };
        assemble(os, &files, kernels)
    }

    pub(crate) const DEBIAN: &str = r#"<?xml version="1.0"?>
<operatingsystems>
  <operatingsystem>
    <root>/dev/sda1</root>
    <name>linux</name>
    <arch>x86_64</arch>
    <distro>debian</distro>
    <product_name>12.8</product_name>
    <major_version>12</major_version>
    <minor_version>8</minor_version>
    <hostname>debian12-vmware</hostname>
    <osinfo>debian12</osinfo>
    <mountpoints>
      <mountpoint dev="/dev/sda1">/</mountpoint>
    </mountpoints>
    <applications>
      <application><name>bash</name><version>5.2</version></application>
      <application><name>open-vm-tools</name><version>12.2.0</version></application>
    </applications>
  </operatingsystem>
</operatingsystems>"#;

    #[test]
    fn reads_the_first_operating_system() {
        let os = parse_inspector(DEBIAN).unwrap().unwrap();
        assert_eq!((os.name.as_str(), os.distro.as_str(), os.arch.as_str()), ("linux", "debian", "x86_64"));
        assert_eq!((os.major.as_str(), os.minor.as_str()), ("12", "8"));
        assert_eq!(os.mountpoints, vec![("/dev/sda1".to_string(), "/".to_string())]);
        assert_eq!(os.applications, vec!["bash".to_string(), "open-vm-tools".to_string()]);
        let info = assemble(os, &GuestFiles::default(), Vec::new());
        assert_eq!(info.vmware_tools, vec!["open-vm-tools".to_string()]);
        assert_eq!(info.version, "12.8");
    }

    #[test]
    fn a_disk_without_an_operating_system_is_not_recognised() {
        let tools = Tools::new(vec!["sh".into(), "-c".into(), "echo '<operatingsystems/>'".into()]).with_kvm(false);
        let dir = tempfile::tempdir().unwrap();
        let e = inspect(
            &tools,
            &[PathBuf::from("/x/data.qcow2")],
            dir.path(),
            Duration::from_secs(10),
            &super::super::tools::never,
        );
        let text = e.unwrap_err().to_string();
        assert!(text.starts_with("no operating system was recognised on /x/data.qcow2"), "{text}");
    }

    #[test]
    fn windows_virtio_drivers_are_picked_from_system32_drivers() {
        let info =
            guest(WINDOWS, false, Vec::new(), &["disk.sys", "VIOSTOR.SYS", "netkvm.sys", "vioscsi.sys", "ahcix.sys"]);
        assert_eq!((info.os_type.as_str(), info.osinfo.as_str()), ("windows", "win7"));
        assert_eq!(info.virtio_drivers, vec!["netkvm.sys".to_string(), "vioscsi.sys".into(), "viostor.sys".into()]);
        assert_eq!(info.boot_loader, "windows");
        assert!(guest(DEBIAN, false, Vec::new(), &[]).virtio_drivers.is_empty());
    }

    #[test]
    fn virtio_net_is_built_in_or_a_module_of_that_kernel() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["6.1.0-28-amd64", "6.1.0-9-amd64", "5.10.0-1-amd64"] {
            std::fs::write(dir.path().join(format!("vmlinuz-{v}")), "").unwrap();
        }
        std::fs::write(dir.path().join("config-5.10.0-1-amd64"), "CONFIG_VIRTIO_NET=y\n").unwrap();
        let found = GuestFiles {
            boot: dir.path().to_path_buf(),
            virtio_net_modules: vec!["/lib/modules/6.1.0-28-amd64/kernel/drivers/net/virtio_net.ko".into()],
            ..GuestFiles::default()
        };
        // No initramfs, so no tool runs.
        let tools = Tools::new(vec!["/nonexistent".into()]).with_kvm(false);
        let ks = kernels(&tools, &found, dir.path(), Duration::from_secs(5), &super::super::tools::never).unwrap();
        let net: Vec<(&str, bool)> = ks.iter().map(|k| (k.version.as_str(), k.virtio_net)).collect();
        assert_eq!(net, [("5.10.0-1-amd64", true), ("6.1.0-28-amd64", true), ("6.1.0-9-amd64", false)]);
    }

    #[test]
    fn no_operating_system_is_none() {
        assert_eq!(parse_inspector("<?xml version=\"1.0\"?>\n<operatingsystems/>\n").unwrap(), None);
    }

    #[test]
    fn broken_xml_is_an_error() {
        assert!(parse_inspector("<operatingsystems><operatingsystem><name>linux</nam>").is_err());
    }

    #[test]
    fn virtio_modules_are_named_from_the_listing() {
        let listing: Vec<String> = [
            "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/block/virtio_blk.ko",
            "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/virtio/virtio_pci.ko.xz",
            "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/ata/ahci.ko",
            "etc/virtio.conf",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(virtio_in(&listing), vec!["virtio_blk".to_string(), "virtio_pci".to_string()]);
    }

    #[test]
    fn firmware_is_uefi_only_with_an_esp_on_gpt() {
        let mut f = GuestFiles { parttype: Some("gpt".into()), ..Default::default() };
        assert_eq!(firmware(&f), "bios");
        f.efi_entries = vec!["/boot/efi/EFI/debian".into()];
        assert_eq!(firmware(&f), "uefi");
        f.parttype = Some("msdos".into());
        assert_eq!(firmware(&f), "bios");
    }
}
