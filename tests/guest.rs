//! The real guest's one-shot commands (issue 12): Debian 12 set up as a VMware guest is
//! (scripts/guest-fixture.sh), exported as an OVA and converted by `hyper2kvm convert`, then
//! inspected by `hyper2kvm inspect --guest` (no virtio in its initramfs, VMware tools found);
//! and `hyper2kvm fix` without the tools, which says what to install. The fix itself and the
//! boots are in tests/guest_boot.rs (one-shot `fix --boot-check`, then a boot without a
//! serial console) and tests/guest_daemon.rs (the daemon's guest stage: fixed boots, unfixed
//! stops at "ALERT!").
//!
//! The guest tools run from a Debian 12 root (scripts/guest-tools-root.sh) through
//! scripts/guest-tools-run.sh, as GUEST_TOOLS_WRAPPER. Both the root and the fixture need
//! root, debootstrap, loop devices and the Debian mirror; they are built once and cached
//! (tests/common/guest.rs). On a machine without root or debootstrap each test says why on
//! stderr and SKIPS; where they are there, a setup that fails fails the test.

use std::process::Command;
use std::time::Instant;

#[path = "common/guest.rs"]
mod setup;
use setup::{machine, Machine};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hyper2kvm")
}

fn hyper2kvm(m: &Machine) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["--config-dir", "/nonexistent"]).env("GUEST_TOOLS_WRAPPER", &m.wrapper);
    cmd
}

#[test]
fn guest_inspect_finds_a_vmware_debian_without_virtio() {
    let Some(m) = machine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = m.converted(dir.path());
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
