//! Checking a fixed guest from its own files, not from the fixing tool's exit status: what it
//! will boot from must agree with the virtio disks the domain gives it. fstab's root and the
//! boot loader's `root=` must name the disk in a way that survives the move from SCSI/SATA to
//! virtio (UUID=, LABEL=, PARTUUID=, /dev/mapper/..., /dev/disk/by-..., or /dev/vdX), and the
//! initramfs of every kernel must hold virtio_blk (or the kernel have it built in).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::files::{self, GuestFiles};
use super::inspect::virtio_in;
use super::tools::{Cancel, Tools};
use super::GuestError;

/// The evidence, kept in V.json by the daemon and printed by `hyper2kvm fix`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Verification {
    /// Everything agreed.
    pub ok: bool,
    /// The device fstab mounts at `/`.
    pub fstab_root: Option<String>,
    /// Every distinct `root=` of the boot loader's kernel lines.
    pub boot_roots: Vec<String>,
    /// Per kernel: (version, virtio modules in its initramfs, built in).
    pub initramfs: Vec<InitramfsEvidence>,
    /// What does not agree, one sentence each.
    pub problems: Vec<String>,
}

/// One kernel's initramfs, as `lsinitramfs` listed it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct InitramfsEvidence {
    /// The kernel release, from its `vmlinuz-VERSION` file in the guest's `/boot`.
    pub kernel: String,
    /// The initramfs' file name in `/boot`; `None` when the kernel has none.
    pub initrd: Option<String>,
    /// The virtio modules `lsinitramfs` listed in that initramfs.
    pub virtio: Vec<String>,
    /// `virtio_blk` is built into the kernel (`CONFIG_VIRTIO_BLK=y` in `/boot/config-VERSION`).
    pub builtin: bool,
}

/// Reads the fixed guest on `images` read-only and checks it; `scratch` receives the copy of
/// `/boot` and the logs. A Windows guest (no fstab, no `/boot`) is not checked here.
pub fn verify(
    tools: &Tools,
    images: &[PathBuf],
    scratch: &Path,
    limit: Duration,
    cancel: Cancel<'_>,
) -> Result<Verification, GuestError> {
    let found = files::read(tools, images, scratch, limit, cancel)?;
    let mut initramfs = Vec::new();
    for version in files::kernel_versions(&found.boot) {
        let config = std::fs::read_to_string(found.boot.join(format!("config-{version}"))).unwrap_or_default();
        let builtin = config.lines().any(|l| l.trim() == "CONFIG_VIRTIO_BLK=y");
        let initrd = files::initrd_of(&found.boot, &version);
        let virtio = match &initrd {
            Some(path) => virtio_in(&files::initramfs_list(tools, path, scratch, limit, cancel)?),
            None => Vec::new(),
        };
        let initrd = initrd.and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        initramfs.push(InitramfsEvidence { kernel: version, initrd, virtio, builtin });
    }
    Ok(judge(&found, initramfs))
}

/// Rewrites what the fixing tool left naming SCSI/SATA disks (`/dev/sdX`, `/dev/hdX`) to the
/// virtio names (`/dev/vdX`) in the guest's fstab, `/etc/default/grub` and GRUB
/// configuration: the mapping virt-v2v itself uses for fstab, since the domain keeps the disks'
/// order on the virtio bus. virt-v2v 2.2 leaves a Debian guest's grub.cfg alone when
/// `/etc/default/grub` names no device ("could not determine a way to update the configuration
/// of Grub2"), so a guest whose grub.cfg says root=/dev/sda1 keeps it. Returns the guest paths
/// it changed (none: nothing written).
pub fn mend(
    tools: &Tools,
    images: &[PathBuf],
    scratch: &Path,
    limit: Duration,
    cancel: Cancel<'_>,
) -> Result<Vec<String>, GuestError> {
    let scratch = super::tools::absolute(scratch);
    let found = files::read(tools, images, &scratch.join("before"), limit, cancel)?;
    let out = scratch.join("mended");
    std::fs::create_dir_all(&out).map_err(super::io_error("cannot create", &out))?;
    let mut edits: Vec<(String, PathBuf)> = Vec::new();
    let mut consider = |guest_path: &str, text: Option<String>| -> Result<(), GuestError> {
        let Some(text) = text else { return Ok(()) };
        let mended = to_virtio_names(&text);
        if mended != text {
            let local = out.join(guest_path.trim_start_matches('/').replace('/', "_"));
            std::fs::write(&local, mended).map_err(super::io_error("cannot write", &local))?;
            edits.push((guest_path.to_owned(), local));
        }
        Ok(())
    };
    consider("/etc/fstab", found.fstab.clone())?;
    consider("/etc/default/grub", found.default_grub.clone())?;
    for cfg in ["grub/grub.cfg", "grub2/grub.cfg"] {
        consider(&format!("/boot/{cfg}"), std::fs::read_to_string(found.boot.join(cfg)).ok())?;
    }
    if edits.is_empty() {
        return Ok(Vec::new());
    }
    let script: String = edits.iter().map(|(guest, local)| format!("upload {} {guest}\n", local.display())).collect();
    let script_path = out.join("mend.guestfish");
    std::fs::write(&script_path, script).map_err(super::io_error("cannot write", &script_path))?;
    let mut cmd = tools.command("guestfish");
    cmd.arg("-i");
    files::add_disks(&mut cmd, images);
    cmd.arg("-f").arg(&script_path);
    tools.run_logged("guestfish", cmd, &out.join("guestfish.log"), limit, cancel)?;
    Ok(edits.into_iter().map(|(guest, _)| guest).collect())
}

/// `/dev/sdaN` and `/dev/hdaN` become `/dev/vdaN`.
pub(crate) fn to_virtio_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("/dev/") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 5..];
        let disk = (tail.starts_with("sd") || tail.starts_with("hd"))
            && tail[2..].chars().next().is_some_and(|c| c.is_ascii_lowercase());
        out.push_str(if disk { "/dev/vd" } else { "/dev/" });
        rest = if disk { &tail[2..] } else { tail };
    }
    out.push_str(rest);
    out
}

/// Compares the files with what a virtio domain needs.
pub(crate) fn judge(found: &GuestFiles, initramfs: Vec<InitramfsEvidence>) -> Verification {
    let fstab_root = found.fstab.as_deref().and_then(fstab_root);
    let grub =
        ["grub/grub.cfg", "grub2/grub.cfg"].iter().find_map(|p| std::fs::read_to_string(found.boot.join(p)).ok());
    let boot_roots = grub.as_deref().map(boot_roots).unwrap_or_default();
    let mut problems = Vec::new();
    match &fstab_root {
        None => problems.push("fstab has no entry for /".to_string()),
        Some(dev) if !survives_virtio(dev) => {
            problems.push(format!("fstab mounts / from {dev}, which a virtio disk does not provide"))
        }
        Some(_) => {}
    }
    if grub.is_none() {
        problems.push("no GRUB configuration (boot/grub/grub.cfg) was found".to_string());
    }
    for root in boot_roots.iter().filter(|r| !survives_virtio(r)) {
        problems.push(format!("the boot loader passes root={root}, which a virtio disk does not provide"));
    }
    if initramfs.is_empty() {
        problems.push("no kernel was found in /boot".to_string());
    }
    for k in &initramfs {
        if !k.builtin && !k.virtio.iter().any(|m| m == "virtio_blk") {
            problems.push(format!("the initramfs of kernel {} has no virtio_blk", k.kernel));
        }
    }
    Verification { ok: problems.is_empty(), fstab_root, boot_roots, initramfs, problems }
}

/// Whether a device name still finds the disk once it is virtio.
pub(crate) fn survives_virtio(dev: &str) -> bool {
    ["UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=", "/dev/mapper/", "/dev/disk/by-", "/dev/vd", "ZFS="]
        .iter()
        .any(|p| dev.starts_with(p))
        || (dev.starts_with("/dev/")
            && dev.matches('/').count() == 3
            && !dev.starts_with("/dev/sd")
            && !dev.starts_with("/dev/hd"))
}

/// The device of fstab's `/` line.
fn fstab_root(fstab: &str) -> Option<String> {
    fstab.lines().map(str::trim).filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut fields = l.split_whitespace();
        let dev = fields.next()?;
        (fields.next()? == "/").then(|| dev.to_owned())
    })
}

/// Every distinct `root=` on the `linux` lines of a grub.cfg.
fn boot_roots(grub_cfg: &str) -> Vec<String> {
    let mut roots: Vec<String> = grub_cfg
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("linux"))
        .flat_map(|l| {
            l.split_whitespace().filter_map(|w| w.strip_prefix("root=")).map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_with(cfg: &str) -> (tempfile::TempDir, GuestFiles) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("grub")).unwrap();
        std::fs::write(dir.path().join("grub/grub.cfg"), cfg).unwrap();
        let files = GuestFiles {
            boot: dir.path().to_path_buf(),
            fstab: Some("# comment\n/dev/sda1 / ext4 errors=remount-ro 0 1\n".into()),
            ..Default::default()
        };
        (dir, files)
    }

    fn kernel(virtio: &[&str]) -> Vec<InitramfsEvidence> {
        vec![InitramfsEvidence {
            kernel: "6.1.0-28-amd64".into(),
            initrd: Some("initrd.img-6.1.0-28-amd64".into()),
            virtio: virtio.iter().map(|s| s.to_string()).collect(),
            builtin: false,
        }]
    }

    #[test]
    fn a_vmware_guest_fails_on_all_three_counts() {
        let (_d, files) = boot_with("\tlinux /boot/vmlinuz-6.1.0-28-amd64 root=/dev/sda1 ro console=ttyS0\n");
        let v = judge(&files, kernel(&[]));
        assert!(!v.ok);
        assert_eq!(v.fstab_root.as_deref(), Some("/dev/sda1"));
        assert_eq!(v.boot_roots, vec!["/dev/sda1".to_string()]);
        assert_eq!(v.problems.len(), 3, "{:?}", v.problems);
    }

    #[test]
    fn a_fixed_guest_agrees() {
        let (_d, mut files) = boot_with("\tlinux /boot/vmlinuz-6.1.0-28-amd64 root=/dev/vda1 ro\n");
        files.fstab = Some("UUID=0b1e-77 / ext4 defaults 0 1\n".into());
        let v = judge(&files, kernel(&["virtio_blk", "virtio_pci"]));
        assert!(v.ok, "{:?}", v.problems);
    }

    #[test]
    fn scsi_and_ide_names_become_virtio_names() {
        let fstab = "/dev/sda1 / ext4 errors=remount-ro 0 1\n/dev/hdb2 /data xfs defaults 0 2\n/dev/mapper/vg-x /x ext4 defaults 0 2\n/dev/shm /s tmpfs defaults 0 0\n";
        assert_eq!(
            to_virtio_names(fstab),
            "/dev/vda1 / ext4 errors=remount-ro 0 1\n/dev/vdb2 /data xfs defaults 0 2\n/dev/mapper/vg-x /x ext4 defaults 0 2\n/dev/shm /s tmpfs defaults 0 0\n"
        );
        assert_eq!(to_virtio_names("linux /vmlinuz root=/dev/sda1 ro"), "linux /vmlinuz root=/dev/vda1 ro");
    }

    #[test]
    fn device_names_that_survive_virtio() {
        for ok in ["UUID=x", "LABEL=root", "/dev/vda1", "/dev/mapper/vg-root", "/dev/disk/by-uuid/x", "/dev/vg/root"] {
            assert!(survives_virtio(ok), "{ok}");
        }
        for bad in ["/dev/sda1", "/dev/hda1", "/dev/sdb"] {
            assert!(!survives_virtio(bad), "{bad}");
        }
    }
}
