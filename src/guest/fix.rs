//! Fixing the guest for KVM with `virt-v2v-in-place` (virt-v2v 2.2): it rebuilds the
//! initramfs with virtio drivers, remaps block devices in fstab and the boot loader, removes
//! VMware tools, and for Windows installs virtio drivers (given VIRTIO_WIN). All the VM's disks
//! go together, described by a libvirt domain XML (`-i libvirtxml`), so that a root spread
//! over several disks (LVM) is found. The images are changed in place: only staged copies,
//! never a source, may be given.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::files::format_of;
use super::tools::{absolute, Cancel, Tools};
use super::GuestError;

/// How to run the fix.
pub struct FixOptions<'a> {
    /// Where the tool's log and the input domain XML go (the job's directory).
    pub work_dir: PathBuf,
    /// The fix is stopped (its whole process group) after this long.
    pub timeout: Duration,
    /// Asked while the tool runs; `true` stops it.
    pub cancel: Cancel<'a>,
}

/// What the fix did.
#[derive(Debug, Clone, Serialize)]
pub struct FixReport {
    /// The tool's whole log (stdout and stderr).
    pub log: PathBuf,
    /// How long virt-v2v-in-place ran, in seconds of wall-clock time.
    pub seconds: f64,
    /// `kvm` or `tcg`: how libguestfs ran its appliance.
    pub accel: String,
}

/// Runs `virt-v2v-in-place` on all of `images` (first disk first). The images must be
/// writable copies; they are modified.
pub fn fix(tools: &Tools, images: &[PathBuf], options: &FixOptions<'_>) -> Result<FixReport, GuestError> {
    let work = absolute(&options.work_dir);
    std::fs::create_dir_all(&work).map_err(super::io_error("cannot create", &work))?;
    let images: Vec<PathBuf> = images.iter().map(|p| absolute(p)).collect();
    let xml_path = work.join("v2v-input.xml");
    std::fs::write(&xml_path, input_domain(&images)).map_err(super::io_error("cannot write", &xml_path))?;
    let mut cmd = tools.command("virt-v2v-in-place");
    cmd.args(["-i", "libvirtxml"]).arg(&xml_path);
    // The disks are named inside the XML, not on the command line: tell the wrapper.
    cmd.env("GUEST_TOOLS_BIND", bind_list(&images));
    if let Some(virtio_win) = &tools.virtio_win {
        // virt-v2v reads it from its environment (an ISO or a directory); the wrapper makes it
        // visible inside its root (scripts/guest-tools-run.sh).
        cmd.env("VIRTIO_WIN", absolute(virtio_win));
    }
    let log = work.join("virt-v2v-in-place.log");
    let started = Instant::now();
    tools.run_logged("virt-v2v-in-place", cmd, &log, options.timeout, options.cancel)?;
    let accel = if tools.kvm_usable() { "kvm" } else { "tcg" };
    Ok(FixReport { log, seconds: started.elapsed().as_secs_f64(), accel: accel.into() })
}

/// The directories of the images, colon-separated (scripts/guest-tools-run.sh binds them).
fn bind_list(images: &[PathBuf]) -> String {
    let mut dirs: Vec<String> = images.iter().filter_map(|p| p.parent()).map(|d| d.display().to_string()).collect();
    dirs.sort();
    dirs.dedup();
    dirs.join(":")
}

/// A libvirt domain naming the disks as a VMware VM has them (SCSI, sda, sdb, ...), which is
/// what `-i libvirtxml` reads; the guest's own firmware is found by inspection.
pub(crate) fn input_domain(images: &[PathBuf]) -> String {
    let mut xml = String::from(
        "<domain type='kvm'>\n  <name>hyper2kvm-fix</name>\n  <memory unit='MiB'>2048</memory>\n  <vcpu>1</vcpu>\n  <os><type arch='x86_64'>hvm</type></os>\n  <devices>\n",
    );
    for (i, image) in images.iter().enumerate() {
        let format = format_of(image).unwrap_or("raw");
        let _ = write!(
            xml,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{format}'/>\n      <source file='{}'/>\n      <target dev='sd{}' bus='scsi'/>\n    </disk>\n",
            escape(&image.display().to_string()),
            disk_letters(i)
        );
    }
    xml.push_str("  </devices>\n</domain>\n");
    xml
}

/// `a`..`z`, `aa`.. as Linux names disks.
pub(crate) fn disk_letters(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.reverse();
    String::from_utf8_lossy(&s).into_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_disk_is_in_the_domain_in_order() {
        let xml = input_domain(&[PathBuf::from("/s/a&b.qcow2"), PathBuf::from("/s/data.raw")]);
        assert!(xml.contains("<source file='/s/a&amp;b.qcow2'/>\n      <target dev='sda' bus='scsi'/>"));
        assert!(xml.contains("type='raw'/>\n      <source file='/s/data.raw'/>\n      <target dev='sdb'"));
    }

    #[test]
    fn disk_names_go_past_z() {
        assert_eq!(disk_letters(0), "a");
        assert_eq!(disk_letters(25), "z");
        assert_eq!(disk_letters(26), "aa");
        assert_eq!(disk_letters(27), "ab");
    }

    /// A GUEST_TOOLS_WRAPPER that records the environment and the command line it is given.
    fn recorder(dir: &std::path::Path) -> PathBuf {
        let script = dir.join("record.sh");
        let body = format!("#!/bin/sh\nenv > {0}/env\nprintf '%s\\n' \"$@\" > {0}/args\n", dir.display());
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        script
    }

    fn fix_with(tools: &Tools, dir: &std::path::Path) -> (String, String) {
        let image = dir.join("staged/vm.qcow2");
        let options = FixOptions {
            work_dir: dir.join("work"),
            timeout: Duration::from_secs(20),
            cancel: &super::super::tools::never,
        };
        fix(tools, &[image], &options).unwrap();
        (std::fs::read_to_string(dir.join("env")).unwrap(), std::fs::read_to_string(dir.join("args")).unwrap())
    }

    #[test]
    fn virtio_win_reaches_virt_v2v_in_place_through_the_wrapper() {
        let dir = tempfile::tempdir().unwrap();
        let wrapper = vec![recorder(dir.path()).display().to_string()];
        let iso = dir.path().join("virtio-win.iso");
        let mut tools = Tools::new(wrapper.clone()).with_kvm(false);
        tools.virtio_win = Some(iso.clone());
        let (env, args) = fix_with(&tools, dir.path());
        assert!(env.lines().any(|l| l == format!("VIRTIO_WIN={}", iso.display())), "{env}");
        assert!(env.lines().any(|l| l == format!("GUEST_TOOLS_BIND={}/staged", dir.path().display())), "{env}");
        assert!(args.starts_with("virt-v2v-in-place\n-i\nlibvirtxml\n"), "{args}");

        let tools = Tools::new(wrapper).with_kvm(false);
        let (env, _) = fix_with(&tools, dir.path());
        assert!(!env.lines().any(|l| l.starts_with("VIRTIO_WIN=")), "{env}");
    }

    /// scripts/guest-tools-run.sh makes VIRTIO_WIN visible in its root wherever it is on the
    /// host (here in a temporary directory the root does not have), for an ISO and a directory.
    /// Needs root (a mount namespace); the root is a minimal one with the host's /bin/sh.
    #[test]
    fn the_wrapper_binds_virtio_win_into_its_root() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("*** SKIPPED: needs root for the wrapper's mount namespace ***");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for file in ["/bin/sh", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"] {
            let target = root.join(&file[1..]);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(file, &target).unwrap_or_else(|e| panic!("copy {file}: {e}"));
        }
        for d in ["dev", "proc", "sys", "run"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join(".complete"), "").unwrap();
        let iso = dir.path().join("host/virtio-win.iso");
        let drivers = dir.path().join("host/virtio-win");
        std::fs::create_dir_all(&drivers).unwrap();
        std::fs::write(&iso, "iso-contents\n").unwrap();
        std::fs::write(drivers.join("marker"), "dir-contents\n").unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/guest-tools-run.sh");
        let show = r#"if [ -d "$VIRTIO_WIN" ]; then read l < "$VIRTIO_WIN/marker"; else read l < "$VIRTIO_WIN"; fi; echo "$VIRTIO_WIN $l""#;
        for (path, expected) in [
            (&iso, "/run/hyper2kvm-virtio-win.iso iso-contents"),
            (&drivers, "/run/hyper2kvm-virtio-win.d dir-contents"),
        ] {
            let out = std::process::Command::new(script)
                .arg(&root)
                .args(["--", "/bin/sh", "-c", show])
                .env("VIRTIO_WIN", path)
                .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
                .env_remove("GUEST_TOOLS_IN_NS")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(stdout.trim(), expected);
        }
    }

    #[test]
    fn bind_list_names_each_directory_once() {
        assert_eq!(bind_list(&[PathBuf::from("/a/x"), PathBuf::from("/a/y"), PathBuf::from("/b/z")]), "/a:/b");
    }
}
