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

    #[test]
    fn bind_list_names_each_directory_once() {
        assert_eq!(bind_list(&[PathBuf::from("/a/x"), PathBuf::from("/a/y"), PathBuf::from("/b/z")]), "/a:/b");
    }
}
