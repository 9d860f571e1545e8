//! A real guest (issue 12): Debian 12 set up as a VMware guest is (scripts/guest-fixture.sh),
//! exported as an OVA, converted by `hyper2kvm convert`, then inspected, boot-checked on the
//! virtio devices hyper2kvm's domain gives it (it must NOT boot: its initramfs has no virtio
//! and its fstab and kernel command line name /dev/sda1), fixed with virt-v2v-in-place,
//! verified from its own files, and boot-checked again (it must reach `login:`).
//!
//! The guest tools run from a Debian 12 root (scripts/guest-tools-root.sh) through
//! scripts/guest-tools-run.sh, as GUEST_TOOLS_WRAPPER. Both the root and the fixture need
//! root, debootstrap, loop devices and the Debian mirror; they are built once and cached. On
//! a machine without root or debootstrap each test says why on stderr and SKIPS; where they
//! are there, a setup that fails fails the test. Without usable KVM every boot is emulated:
//! minutes each (docs/PERFORMANCE.md, "Guest fixing").

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyper2kvm::guest::{boot_check, BootOutcome, BootSpec, Firmware, Tools};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hyper2kvm")
}

/// The tools root and the fixture OVA, or why this machine cannot build them.
struct Machine {
    wrapper: String,
    ova: PathBuf,
}

fn skip(reason: &str) -> Option<Machine> {
    eprintln!("\n*** SKIPPED: {reason} ***\n");
    None
}

/// Builds (or finds cached) the tools root and the fixture. Panics when the machine should be
/// able to and the build fails.
fn machine() -> Option<Machine> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("the real guest fixture needs root (debootstrap, loop devices, chroot)");
    }
    if !Path::new("/usr/sbin/debootstrap").exists() {
        return skip("debootstrap is not installed (scripts/install-deps.sh installs it)");
    }
    if !Path::new("/dev/loop-control").exists() {
        return skip("no loop devices (/dev/loop-control) to build the guest disk on");
    }
    // The tests run in parallel processes: one builds, the others wait for its cache.
    let lock = std::fs::File::create("/var/cache/hyper2kvm-guest-tests.lock").expect("create the build lock");
    // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    let root = script("guest-tools-root.sh");
    let ova = PathBuf::from(script("guest-fixture.sh"));
    drop(lock);
    assert!(ova.is_file(), "guest-fixture.sh printed {ova:?}, which is not a file");
    Some(Machine { wrapper: format!("{REPO}/scripts/guest-tools-run.sh {root} --"), ova })
}

/// Runs a cached-build script and returns the path it prints; a failure fails the test.
fn script(name: &str) -> String {
    let started = Instant::now();
    let out = Command::new(format!("{REPO}/scripts/{name}")).output().expect("start the script");
    assert!(out.status.success(), "{name} failed (setup): {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `hyper2kvm convert` of the fixture OVA to `dir/vm.qcow2`.
fn converted(m: &Machine, dir: &Path) -> PathBuf {
    let out = dir.join("vm.qcow2");
    let started = Instant::now();
    let status = Command::new(bin())
        .args(["--config-dir", "/nonexistent", "convert"])
        .arg(&m.ova)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "hyper2kvm convert of the fixture OVA failed");
    eprintln!("convert: {:.1} s", started.elapsed().as_secs_f64());
    out
}

fn hyper2kvm(m: &Machine) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["--config-dir", "/nonexistent"]).env("GUEST_TOOLS_WRAPPER", &m.wrapper);
    cmd
}

/// Boots the image once on virtio (BIOS: the fixture is a GRUB/BIOS guest).
fn boot(m: &Machine, image: &Path, dir: &Path) -> hyper2kvm::guest::BootReport {
    let tools = Tools::new(m.wrapper.split_whitespace().map(str::to_owned).collect());
    let spec = BootSpec {
        images: vec![image.to_path_buf()],
        firmware: Firmware::Bios,
        memory_mib: 1024,
        console_log: dir.join("console.log"),
        budget: Duration::from_secs(900),
        cancel: &|| false,
        devices: hyper2kvm::guest::BootDevices::default(),
    };
    let report = boot_check(&tools, &spec).expect("boot check ran");
    eprintln!("boot check: {:?} after {:.1} s ({})", report.outcome, report.seconds, report.accel);
    report
}

#[test]
fn guest_inspect_finds_a_vmware_debian_without_virtio() {
    let Some(m) = machine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = converted(&m, dir.path());
    let started = Instant::now();
    let out = hyper2kvm(&m).args(["inspect", "--guest", "--json"]).arg(&image).output().unwrap();
    eprintln!("inspect --guest: {:.1} s", started.elapsed().as_secs_f64());
    assert!(out.status.success(), "inspect --guest failed: {}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["os_type"], "linux", "{info:#}");
    assert_eq!(info["distro"], "debian");
    assert!(info["version"].as_str().unwrap().starts_with("12"), "{info:#}");
    assert_eq!(info["arch"], "x86_64");
    assert_eq!(info["hostname"], "debian12-vmware");
    assert_eq!(info["boot_loader"], "grub2");
    assert_eq!(info["firmware"], "bios");
    assert_eq!(info["vmware_tools"], serde_json::json!(["open-vm-tools"]));
    let kernels = info["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), 1, "{info:#}");
    assert_eq!(kernels[0]["virtio_module"], true, "the kernel ships virtio_blk as a module");
    assert_eq!(kernels[0]["initrd_virtio"], serde_json::json!([]), "no virtio in the initramfs");
    assert_eq!(kernels[0]["boots_on_virtio"], false);
}

#[test]
fn guest_unfixed_does_not_boot_on_virtio() {
    let Some(m) = machine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = converted(&m, dir.path());
    let report = boot(&m, &image, dir.path());
    assert_eq!(
        report.outcome,
        BootOutcome::Failed("ALERT!".into()),
        "the fixture must stop in the initramfs on virtio; console:\n{}",
        report.console_tail.join("\n")
    );
}

#[test]
fn guest_fix_makes_it_boot_on_virtio() {
    let Some(m) = machine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = converted(&m, dir.path());
    let work = dir.path().join("work");
    let started = Instant::now();
    let out = hyper2kvm(&m)
        .args(["fix", "--json", "--boot-check", "--boot-check-seconds", "900", "--work-dir"])
        .arg(&work)
        .arg(&image)
        .output()
        .unwrap();
    eprintln!("fix --boot-check: {:.1} s", started.elapsed().as_secs_f64());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fix printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("{report:#}");
    assert!(out.status.success(), "fix failed: {}", String::from_utf8_lossy(&out.stderr));
    let v = &report["verification"];
    assert_eq!(v["ok"], true, "{v:#}");
    let initramfs = v["initramfs"].as_array().unwrap();
    assert!(!initramfs.is_empty());
    for k in initramfs {
        assert!(k["virtio"].as_array().unwrap().iter().any(|m| m == "virtio_blk"), "{k:#}");
    }
    let fstab_root = v["fstab_root"].as_str().unwrap();
    assert_ne!(fstab_root, "/dev/sda1", "fstab still names the VMware disk");
    for root in v["boot_roots"].as_array().unwrap() {
        assert_ne!(root, "/dev/sda1", "the boot loader still names the VMware disk");
    }
    assert_eq!(report["boot_check"]["outcome"], "booted", "{:#}", report["boot_check"]);
    assert_eq!(report["boot_check"]["signal"], "login:");
    assert!(work.join("virt-v2v-in-place.log").is_file());
}

/// Runs anywhere: without the tools, `fix` says which package to install and changes nothing.
#[test]
fn guest_fix_without_the_tools_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vm.qcow2");
    std::fs::write(&image, b"not touched").unwrap();
    let out = Command::new(bin())
        .args(["--config-dir", "/nonexistent", "fix"])
        .arg(&image)
        .env("GUEST_TOOLS_WRAPPER", "/nonexistent/guest-tools-wrapper")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("hyper2kvm: virt-v2v-in-place is not installed: install virt-v2v and nbdkit (Debian 12)"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&image).unwrap(), b"not touched");
}
