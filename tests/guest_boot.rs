//! The boot check's network signal on the real guest (issue 12; scripts/guest-fixture.sh, the
//! same cached fixture and tools root as tests/guest.rs): a guest with no serial console says
//! nothing on ttyS0, so only its first network packets can show that it came up.
//!
//! "No serial console" is given the way a VMware VM usually has it: the domain hyper2kvm
//! writes (`libvirt::domain_xml`, for real) without its `<serial>`/`<console>`, so the machine
//! has no serial port and the host reads nothing from the guest (qemu `-serial none`), whatever
//! the guest's kernel command line asks for. The fixed guest must then be decided booted by
//! its first frame (systemd-networkd brings its link up); the unfixed guest, which stops in
//! its initramfs, must not be decided booted. A guest that panics without a console is caught
//! by qemu's pvpanic device. Needs root, debootstrap, loop devices and the Debian mirror, or
//! SKIPS saying why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyper2kvm::guest::{boot_check, BootOutcome, BootReport, BootSpec, Evidence, Tools};
use hyper2kvm::internals::libvirt::domain_xml::{
    domain_xml_with, Acceleration, DiskBus, DomainDisk, NetworkAttachment,
};
use hyper2kvm::internals::manifest::{DiskSpec, DiskType, Hardware, JobSpec, NicSpec, SourceFormat};

/// The fixture's VMware MAC, kept by the domain.
const MAC: &str = "00:50:56:8a:12:34";

#[path = "common/guest.rs"]
mod setup;
use setup::{machine, Machine};

fn hyper2kvm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hyper2kvm"));
    cmd.args(["--config-dir", "/nonexistent"]);
    cmd
}

/// V.xml for the fixture as the daemon writes it (a Debian guest: virtio disk and NIC, its
/// VMware MAC), serial port and console included.
fn domain() -> String {
    let disk = DiskSpec {
        id: "disk-0".into(),
        source_format: SourceFormat::Ova,
        local_path: PathBuf::from("/exports/debian12-vmware.ova"),
        bytes: None,
        sha256: None,
        boot_order_hint: None,
        label: None,
        disk_type: DiskType::Boot,
        ova_disk: Some(0),
    };
    let spec = JobSpec {
        vm_name: "debian12-vmware".into(),
        vm_id: None,
        provider: Some("vsphere".into()),
        hardware: Hardware { mem_gb: Some(1.0), os_version: Some("debian12_64Guest".into()), ..Hardware::default() },
        disks: vec![disk],
        nics: vec![NicSpec { id: None, mac: Some(MAC.parse().unwrap()), network: Some("VM Network".into()) }],
        compress: None,
        compress_level: None,
    };
    let disks =
        [DomainDisk { path: "/var/lib/hyper2kvm/output/debian12-vmware.qcow2".into(), target_bus: DiskBus::Virtio }];
    domain_xml_with(&spec, &disks, &NetworkAttachment::Network("default".into()), Acceleration::Kvm)
}

/// [`domain`] less the serial port and console: a machine without a serial port.
fn domain_without_serial() -> String {
    let xml = domain();
    let start = xml.find("    <serial").expect("the domain has a serial port");
    let end = xml.find("</console>\n").expect("the domain has a console") + "</console>\n".len();
    let without = format!("{}{}", &xml[..start], &xml[end..]);
    assert!(!without.contains("<serial") && !without.contains("<console"), "{without}");
    without
}

fn boot(m: &Machine, image: &Path, dir: &Path, budget: Duration) -> BootReport {
    boot_with(m, &domain_without_serial(), image, dir, budget)
}

fn boot_with(m: &Machine, xml: &str, image: &Path, dir: &Path, budget: Duration) -> BootReport {
    let tools = Tools::new(m.wrapper.split_whitespace().map(str::to_owned).collect());
    let spec = BootSpec::from_domain_xml(xml, vec![image.to_path_buf()], dir.join("console.log"), budget, &|| false)
        .expect("the boot check reproduces hyper2kvm's own domain");
    assert_eq!(spec.devices.serial, xml.contains("<serial"));
    let report = boot_check(&tools, &spec).expect("boot check ran");
    eprintln!(
        "boot check: {:?} by {:?} after {:.1} s ({}); first packet at {:?} s: {:?}",
        report.outcome,
        report.decided_by,
        report.seconds,
        report.accel,
        report.first_packet_seconds,
        report.first_packets
    );
    report
}

/// The one-shot `hyper2kvm fix --boot-check` on the converted fixture (its verification read
/// from the guest's files, then a boot with a console: `login:`), and the fixed image booted
/// again on a machine without a serial port, where its first network packets decide. One
/// fix for both, as each costs minutes under software emulation (the daemon's own fix is
/// tests/guest_daemon.rs).
#[test]
fn guest_fix_boots_with_a_console_and_without_one() {
    let Some(m) = machine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = m.converted(dir.path());
    let work = dir.path().join("work");
    let started = Instant::now();
    let out = hyper2kvm()
        .env("GUEST_TOOLS_WRAPPER", &m.wrapper)
        .args(["fix", "--json", "--boot-check", "--boot-check-seconds", "900", "--work-dir"])
        .arg(&work)
        .arg(&image)
        .output()
        .unwrap();
    eprintln!("fix --boot-check: {:.1} s", started.elapsed().as_secs_f64());
    let fixed: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fix printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "fix failed: {}", String::from_utf8_lossy(&out.stderr));
    let v = &fixed["verification"];
    assert_eq!(v["ok"], true, "{v:#}");
    let initramfs = v["initramfs"].as_array().unwrap();
    assert!(!initramfs.is_empty());
    for k in initramfs {
        assert!(k["virtio"].as_array().unwrap().iter().any(|m| m == "virtio_blk"), "{k:#}");
    }
    assert_ne!(v["fstab_root"], "/dev/sda1", "fstab still names the VMware disk");
    for root in v["boot_roots"].as_array().unwrap() {
        assert_ne!(root, "/dev/sda1", "the boot loader still names the VMware disk");
    }
    assert_eq!(fixed["boot_check"]["outcome"], "booted", "{:#}", fixed["boot_check"]);
    assert_eq!(fixed["boot_check"]["signal"], "login:");
    assert!(work.join("virt-v2v-in-place.log").is_file());

    let report = boot(&m, &image, dir.path(), Duration::from_secs(600));
    assert_eq!(report.decided_by, Evidence::Network, "{report:#?}");
    let BootOutcome::Booted(signal) = &report.outcome else { panic!("not booted: {report:#?}") };
    assert!(signal.starts_with("network: ") && signal.ends_with(&format!("from {MAC}")), "{signal}");
    assert!(report.console_tail.is_empty(), "a machine without a serial port shows no console");
    assert!(report.first_packets.iter().all(|p| p.starts_with(MAC)), "{:?}", report.first_packets);
    assert!(std::fs::metadata(&report.packets_log).map(|m| m.len() > 24).unwrap_or(false), "the capture is kept");
}

#[test]
fn guest_boot_without_console_unfixed_is_not_booted() {
    let Some(m) = machine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = m.converted(dir.path());
    // Several times what the fixed guest needs for its first packet (docs/GUEST.md).
    let report = boot(&m, &image, dir.path(), Duration::from_secs(240));
    assert_eq!(report.outcome, BootOutcome::Undecided, "{report:#?}");
    assert_eq!(report.decided_by, Evidence::None);
    assert!(report.first_packets.is_empty(), "{:?}", report.first_packets);
}

/// A guest that panics with no console: a boot sector that does what a panicking kernel's
/// pvpanic driver does (writes "panicked" to port 0x505), booted with the same domain.
#[test]
fn guest_boot_sees_a_panic_without_a_console() {
    let Some(m) = machine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("panics.img");
    let mut disk = vec![0u8; 1024 * 1024];
    // mov dx, 0x505; mov al, 1; out dx, al; hlt; jmp back to the hlt
    disk[..9].copy_from_slice(&[0xba, 0x05, 0x05, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd]);
    disk[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(&image, disk).unwrap();
    let report = boot(&m, &image, dir.path(), Duration::from_secs(120));
    assert_eq!(report.outcome, BootOutcome::Failed("pvpanic: the guest reported a panic".into()), "{report:#?}");
    assert_eq!(report.decided_by, Evidence::Panic);
}
