//! Reading the guest's own boot files, read-only, in one libguestfs session: `/boot` copied
//! out (kernels, their configs, initramfs images, the GRUB configuration), `/etc/fstab` and
//! `/etc/default/grub`, the partition table type, the EFI system partition's contents and
//! which kernels have a virtio_blk module. Then `lsinitramfs` lists each initramfs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::tools::{absolute, Cancel, Tools};
use super::GuestError;

/// What [`read`] found. Missing files are `None` or empty, never errors: a Windows guest has
/// no `/boot` and no fstab.
#[derive(Debug, Clone, Default)]
pub struct GuestFiles {
    /// The local copy of the guest's `/boot` (absent when the guest has none).
    pub boot: PathBuf,
    /// `/etc/fstab`.
    pub fstab: Option<String>,
    /// `/etc/default/grub`.
    pub default_grub: Option<String>,
    /// `msdos` or `gpt` for the first disk.
    pub parttype: Option<String>,
    /// Entries under `/boot/efi/EFI` (an EFI system partition with boot loaders).
    pub efi_entries: Vec<String>,
    /// Paths of virtio_blk modules under `/lib/modules`.
    pub virtio_modules: Vec<String>,
    /// Paths of virtio_net modules under `/lib/modules`.
    pub virtio_net_modules: Vec<String>,
    /// Windows: the driver files in `System32/drivers` (virtio-win's among them once
    /// virt-v2v installed them).
    pub windows_drivers: Vec<String>,
}

const MARK: &str = "@@hyper2kvm@@";

/// The guestfish script: every command prefixed with `-` so that a missing file does not end
/// the session, each answer introduced by a marker line.
fn script(boot: &Path) -> String {
    let sections: [(&str, String); 8] = [
        ("fstab", "cat /etc/fstab".into()),
        ("default_grub", "cat /etc/default/grub".into()),
        ("parttype", "part-get-parttype /dev/sda".into()),
        ("efi", "glob-expand /boot/efi/EFI/*".into()),
        ("virtio_modules", "glob-expand /lib/modules/*/kernel/drivers/block/virtio_blk.ko*".into()),
        ("virtio_net_modules", "glob-expand /lib/modules/*/kernel/drivers/net/virtio_net.ko*".into()),
        // Windows' file names keep their case on NTFS and guestfish's glob is case-sensitive:
        // the spellings Windows Vista and later use (2003 and XP are not virt-v2v guests).
        ("windows_drivers", "glob-expand /Windows/System32/drivers/*.sys".into()),
        ("windows_drivers", "glob-expand /Windows/system32/drivers/*.sys".into()),
    ];
    let mut text = String::new();
    for (name, command) in sections {
        text.push_str(&format!("-echo {MARK}{name}\n-{command}\n"));
    }
    text.push_str(&format!("-echo {MARK}boot\n-copy-out /boot {}\n-echo {MARK}end\n", boot.display()));
    text
}

/// `--format=` for an image by its name; libguestfs otherwise guesses, and warns.
pub(crate) fn format_of(image: &Path) -> Option<&'static str> {
    match image.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => Some("qcow2"),
        Some("raw") | Some("img") => Some("raw"),
        _ => None,
    }
}

/// Adds `-a IMAGE` (with its format) for every disk, in order.
pub(crate) fn add_disks(cmd: &mut std::process::Command, images: &[PathBuf]) {
    for image in images {
        if let Some(format) = format_of(image) {
            cmd.arg(format!("--format={format}"));
        }
        cmd.arg("-a").arg(absolute(image));
    }
}

/// Reads the guest's boot files into `scratch` (created if needed).
pub fn read(
    tools: &Tools,
    images: &[PathBuf],
    scratch: &Path,
    limit: Duration,
    cancel: Cancel<'_>,
) -> Result<GuestFiles, GuestError> {
    let scratch = absolute(scratch);
    let boot = scratch.join("boot");
    std::fs::create_dir_all(&boot).map_err(super::io_error("cannot create", &boot))?;
    let script_path = scratch.join("read-files.guestfish");
    std::fs::write(&script_path, script(&boot)).map_err(super::io_error("cannot write", &script_path))?;
    let mut cmd = tools.command("guestfish");
    cmd.args(["--ro", "-i"]);
    add_disks(&mut cmd, images);
    cmd.arg("-f").arg(&script_path);
    let log = scratch.join("guestfish.log");
    let out = tools.run_output("guestfish", cmd, &log, limit, cancel).map_err(|e| not_recognised(e, images))?;
    let sections = split(&out);
    let get = |name: &str| sections.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
    let lines = |name: &str| get(name).map(|t| t.lines().map(str::to_owned).collect()).unwrap_or_default();
    let all_lines = |name: &str| -> Vec<String> {
        sections.iter().filter(|(n, _)| n == name).flat_map(|(_, t)| t.lines().map(str::to_owned)).collect()
    };
    Ok(GuestFiles {
        boot: boot.join("boot"),
        fstab: get("fstab").filter(|t| !t.is_empty()),
        default_grub: get("default_grub").filter(|t| !t.is_empty()),
        parttype: get("parttype").map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()),
        efi_entries: lines("efi"),
        virtio_modules: lines("virtio_modules"),
        virtio_net_modules: lines("virtio_net_modules"),
        windows_drivers: all_lines("windows_drivers"),
    })
}

/// guestfish -i says so when it finds no operating system.
pub(crate) fn not_recognised(e: GuestError, images: &[PathBuf]) -> GuestError {
    match e {
        GuestError::ToolFailed { ref tail, .. } if tail.contains("no operating system") => {
            let names: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
            GuestError::NotRecognised { images: super::capped(&names, 4) }
        }
        e => e,
    }
}

/// Splits guestfish's output at the marker lines into (section, text).
fn split(out: &str) -> Vec<(String, String)> {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in out.lines() {
        if let Some(name) = line.strip_prefix(MARK) {
            sections.push((name.trim().to_owned(), String::new()));
        } else if let Some((_, text)) = sections.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    sections
}

/// The files `lsinitramfs` lists in an initramfs (run through the tools, which must have
/// initramfs-tools: it reads Debian's zstd images with their early microcode archive).
pub fn initramfs_list(
    tools: &Tools,
    initrd: &Path,
    scratch: &Path,
    limit: Duration,
    cancel: Cancel<'_>,
) -> Result<Vec<String>, GuestError> {
    let mut cmd = tools.command("lsinitramfs");
    cmd.arg(absolute(initrd));
    let name = initrd.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let log = absolute(scratch).join(format!("lsinitramfs-{name}.log"));
    let out = tools.run_output("lsinitramfs", cmd, &log, limit, cancel)?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// Kernel versions from the `vmlinuz-VERSION` files of a copied `/boot`, sorted.
pub fn kernel_versions(boot: &Path) -> Vec<String> {
    let mut versions: Vec<String> = std::fs::read_dir(boot)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(str::to_owned))
        .collect();
    versions.sort();
    versions
}

/// The initramfs of a kernel version in a copied `/boot` (Debian's or Red Hat's name).
pub fn initrd_of(boot: &Path, version: &str) -> Option<PathBuf> {
    [format!("initrd.img-{version}"), format!("initramfs-{version}.img")]
        .into_iter()
        .map(|n| boot.join(n))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_split_at_markers() {
        let out = format!("{MARK}fstab\n/dev/sda1 / ext4 defaults 0 1\n{MARK}parttype\nmsdos\n{MARK}efi\n{MARK}end\n");
        let s = split(&out);
        assert_eq!(s[0], ("fstab".into(), "/dev/sda1 / ext4 defaults 0 1\n".into()));
        assert_eq!(s[1], ("parttype".into(), "msdos\n".into()));
        assert_eq!(s[2], ("efi".into(), String::new()));
    }

    #[test]
    fn script_tolerates_missing_files() {
        assert!(script(Path::new("/x")).lines().all(|l| l.starts_with('-')));
    }
}
