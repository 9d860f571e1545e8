//! Booting the result once in a throwaway qemu (`-snapshot`: the image never changes) with the
//! devices of the VM's domain (q35, each disk's bus, each NIC's model and MAC, OVMF for UEFI:
//! [`BootSpec::from_domain_xml`]), and deciding from what the guest does:
//!
//! - its serial console: a `login:` prompt is a boot; a kernel panic, the initramfs' "ALERT!"
//!   and `(initramfs)` shell, or systemd's emergency mode is a failure;
//! - its first network packets, for guests that say nothing on a serial console: a DHCP
//!   request, an IPv6 router solicitation or an ARP from the guest's MAC means its userspace
//!   brought the network up (qemu's `filter-dump` writes them to a pcap file, read as it
//!   grows: [`super::pcap`]). Weaker than a login prompt, and the report says which decided;
//! - neither within BOOT_CHECK_SECONDS: undecided, which is not a boot.
//!
//! The console and the packets are the evidence, kept in files beside each other.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::domain::{self, BootDevices, DiskBus, ScsiModel};
use super::files::format_of;
use super::pcap;
use super::qmp::PanicWatch;
use super::tools::{absolute, kill_group, Cancel, Tools};
use super::GuestError;

/// Console text that means the guest is up.
const BOOTED: &[&str] = &["login:"];
/// Console text that means it will not come up.
const FAILED: &[&str] = &[
    "Kernel panic",
    "ALERT!",
    "(initramfs)",
    "emergency mode",
    "Give root password for maintenance",
    "dracut:/#",
    "Entering emergency mode",
    // GRUB without its configuration (seen only when GRUB also writes to the serial port).
    "grub rescue>",
    "grub> ",
];

/// How long a guest whose console talks has, after its first packet, to show a console sign
/// before the packet decides: a login prompt follows DHCP within seconds even under TCG.
const NETWORK_GRACE: Duration = Duration::from_secs(60);
/// The console log file keeps this much of the guest's console.
const MAX_CONSOLE_LOG: usize = 16 * 1024 * 1024;
/// The console text kept to look for signs in (checked every 250 ms).
const MAX_CONSOLE_SEEN: usize = 1024 * 1024;
/// How many of the guest's first packets the report lists.
const REPORTED_PACKETS: usize = 8;

/// The machine's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (qemu's SeaBIOS).
    Bios,
    /// UEFI: OVMF's code and variables from Debian 12's `ovmf` package, as pflash drives.
    Uefi,
}

/// What to boot and how long to wait.
pub struct BootSpec<'a> {
    /// The VM's disks, first disk first, on the buses of `devices.disks`.
    pub images: Vec<PathBuf>,
    /// From the domain's `<os>`; for `hyper2kvm fix`, UEFI when the guest has `/boot/efi/EFI`.
    pub firmware: Firmware,
    /// The guest's memory in MiB: the domain's, or 1024 for `hyper2kvm fix --boot-check`.
    pub memory_mib: u64,
    /// The console goes here; qemu's own messages to `CONSOLE.qemu.log` and the guest's
    /// packets to `CONSOLE.pcap`.
    pub console_log: PathBuf,
    /// BOOT_CHECK_SECONDS: how long the guest has to show that it booted.
    pub budget: Duration,
    /// Stops the boot early (job cancelled, lease lost, daemon stopping).
    pub cancel: Cancel<'a>,
    /// The guest-visible devices; `BootDevices::default()` is virtio disks, one virtio NIC and a
    /// serial port.
    pub devices: BootDevices,
}

impl<'a> BootSpec<'a> {
    /// The boot of `images` (the staged or published qcow2s, in the order of the domain's
    /// disks: the XML names the final paths, which may not exist yet) with the machine,
    /// firmware, memory, disk buses, NICs and serial port of the domain XML `xml` (V.xml).
    /// A domain the check cannot reproduce faithfully is an error saying why.
    pub fn from_domain_xml(
        xml: &str,
        images: Vec<PathBuf>,
        console_log: PathBuf,
        budget: Duration,
        cancel: Cancel<'a>,
    ) -> Result<BootSpec<'a>, GuestError> {
        let refused = |reason: String| GuestError::Unreproducible { reason };
        let domain = domain::parse(xml).map_err(refused)?;
        if domain.devices.disks.len() != images.len() {
            return Err(refused(format!(
                "the domain has {} disks and {} images were given",
                domain.devices.disks.len(),
                images.len()
            )));
        }
        Ok(BootSpec {
            images,
            firmware: domain.firmware,
            memory_mib: domain.memory_mib,
            console_log,
            budget,
            cancel,
            devices: domain.devices,
        })
    }
}

/// How the boot ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "signal")]
pub enum BootOutcome {
    /// The console or the network showed this sign of a booted guest.
    Booted(String),
    /// The console showed this sign of a failed boot.
    Failed(String),
    /// Neither within the budget (a guest without a serial console or network ends here).
    Undecided,
}

/// What decided the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Evidence {
    /// The serial console's text.
    Console,
    /// The guest's first network packet (no console sign came).
    Network,
    /// The guest reported a panic to qemu's `pvpanic` device.
    Panic,
    /// Nothing: the time ran out, or qemu ended.
    None,
}

/// The evidence.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// `"outcome": "booted" | "failed" | "undecided"` and `"signal"`: the console text or the
    /// packet seen.
    #[serde(flatten)]
    pub outcome: BootOutcome,
    /// Which of the guest's signals decided.
    pub decided_by: Evidence,
    /// Seconds from starting qemu to the decision (or to the end of the budget).
    pub seconds: f64,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The file the guest's serial console was written to.
    pub console_log: PathBuf,
    /// The console's last lines (at most 20).
    pub console_tail: Vec<String>,
    /// The guest's packets (`filter-dump` of its first NIC; `.nicN.pcap` beside it for more).
    pub packets_log: PathBuf,
    /// The guest's first packets, `MAC: kind` (at most 8), and when the first was seen.
    pub first_packets: Vec<String>,
    /// Seconds from starting qemu to the guest's first packet; `None` when it sent none.
    pub first_packet_seconds: Option<f64>,
}

/// Paths of OVMF in Debian 12's `ovmf` package (also what `capabilities` looks for).
pub(crate) const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub(crate) const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Boots the images once and watches the console and the network.
pub fn boot_check(tools: &Tools, spec: &BootSpec<'_>) -> Result<BootReport, GuestError> {
    let kvm = tools.kvm_usable();
    let console_log = absolute(&spec.console_log);
    let qemu_log = console_log.with_extension("qemu.log");
    let packets_log = console_log.with_extension("pcap");
    let qemu_err = File::create(&qemu_log).map_err(super::io_error("cannot write", &qemu_log))?;
    let console = File::create(&console_log).map_err(super::io_error("cannot write", &console_log))?;
    // An old capture must not count for this boot.
    for n in 0..spec.devices.nics.len() {
        let _ = std::fs::remove_file(packets_file(&packets_log, n));
    }
    let panic_watch = PanicWatch::new();
    let mut cmd = tools.command("qemu-system-x86_64");
    cmd.args(qemu_args(spec, kvm, &packets_log, panic_watch.as_ref().map(PanicWatch::socket).as_deref()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(qemu_err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = Instant::now();
    let mut child = tools.spawn("qemu-system-x86_64", &mut cmd)?;
    if let Some(watch) = &panic_watch {
        watch.start();
    }
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = child.stdout.take().map(|out| copy_console(out, console, Arc::clone(&seen)));
    let macs: Vec<_> = spec.devices.nics.iter().map(|n| n.mac).collect();
    let files = (0..macs.len()).map(|n| packets_file(&packets_log, n)).collect();
    let mut watch = Watch { files, macs: &macs, first: None, packets: Vec::new() };
    let (outcome, decided_by) = loop {
        let text = seen.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(outcome) = decide(&text) {
            break (outcome, Evidence::Console);
        }
        if panic_watch.as_ref().is_some_and(PanicWatch::panicked) {
            break (BootOutcome::Failed("pvpanic: the guest reported a panic".into()), Evidence::Panic);
        }
        if let Some((sign, at)) = watch.poll(started) {
            // A guest whose console talks gets a little longer to say more than a packet does.
            if text.is_empty() || at.elapsed() >= NETWORK_GRACE {
                break (BootOutcome::Booted(sign), Evidence::Network);
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            let text = seen.lock().map(|s| s.clone()).unwrap_or_default();
            break decide(&text).map_or((BootOutcome::Undecided, Evidence::None), |o| (o, Evidence::Console));
        }
        if (spec.cancel)() {
            kill_group(&mut child);
            return Err(GuestError::Cancelled { tool: "qemu-system-x86_64".into() });
        }
        if started.elapsed() >= spec.budget {
            break (BootOutcome::Undecided, Evidence::None);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let seconds = started.elapsed().as_secs_f64();
    kill_group(&mut child);
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    watch.poll(started);
    let text = seen.lock().map(|s| s.clone()).unwrap_or_default();
    if outcome == BootOutcome::Undecided && text.is_empty() && watch.packets.is_empty() {
        let tail = super::tools::tail(&qemu_log);
        if !tail.trim().is_empty() && started.elapsed() < spec.budget {
            return Err(GuestError::ToolFailed {
                tool: "qemu-system-x86_64".into(),
                status: "ended without console output".into(),
                log: qemu_log,
                tail,
            });
        }
    }
    Ok(BootReport {
        outcome,
        decided_by,
        seconds,
        accel: if kvm { "kvm" } else { "tcg" }.into(),
        console_log,
        console_tail: console_tail(&text, 20),
        packets_log,
        first_packets: watch.packets,
        first_packet_seconds: watch.first.map(|f| f.seconds),
    })
}

/// Copies the console into its log and into `seen`, on a thread of its own. The console is
/// the guest's (hostile) output: the log keeps its first [`MAX_CONSOLE_LOG`] bytes, and `seen`
/// its last [`MAX_CONSOLE_SEEN`] or so, which is what the signs are looked for in.
fn copy_console(
    mut out: impl Read + Send + 'static,
    mut log: File,
    seen: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut logged = 0usize;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            let keep = n.min(MAX_CONSOLE_LOG.saturating_sub(logged));
            if keep > 0 && log.write_all(&buf[..keep]).is_ok() {
                logged += keep;
            }
            if let Ok(mut s) = seen.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                if s.len() > MAX_CONSOLE_SEEN {
                    let mut cut = s.len() - MAX_CONSOLE_SEEN / 2;
                    while !s.is_char_boundary(cut) {
                        cut += 1;
                    }
                    s.drain(..cut);
                }
            }
        }
    })
}

/// The pcap files qemu writes (one per NIC), and the guest's first packets in them.
struct Watch<'a> {
    files: Vec<PathBuf>,
    macs: &'a [crate::mac::MacAddress],
    first: Option<FirstPacket>,
    packets: Vec<String>,
}

/// The first packet's sign and when it was seen.
struct FirstPacket {
    sign: String,
    at: Instant,
    seconds: f64,
}

impl Watch<'_> {
    /// The first packet's sign and when it was seen, once there is one.
    fn poll(&mut self, started: Instant) -> Option<(String, Instant)> {
        if self.packets.len() < REPORTED_PACKETS {
            self.read(started);
        }
        self.first.as_ref().map(|f| (f.sign.clone(), f.at))
    }

    fn read(&mut self, started: Instant) {
        let mut found = Vec::new();
        for file in &self.files {
            let Ok(file) = File::open(file) else { continue };
            let mut bytes = Vec::new();
            if file.take(pcap::MAX_READ_BYTES as u64).read_to_end(&mut bytes).is_err() {
                continue;
            }
            // A file qemu did not write as pcap is no signal; the capture stays as evidence.
            found.extend(pcap::guest_packets(&bytes, self.macs).unwrap_or_default());
        }
        self.packets = found.iter().take(REPORTED_PACKETS).map(|p| format!("{}: {}", p.mac, p.kind)).collect();
        if let (None, Some(p)) = (&self.first, found.iter().find(|p| !p.firmware)) {
            let sign = format!("network: {} from {}", p.kind, p.mac);
            self.first = Some(FirstPacket { sign, at: Instant::now(), seconds: started.elapsed().as_secs_f64() });
        }
    }
}

/// The capture of the n-th NIC: `CONSOLE.pcap`, then `CONSOLE.nic1.pcap`, …
fn packets_file(packets_log: &Path, nic: usize) -> PathBuf {
    match nic {
        0 => packets_log.to_path_buf(),
        n => packets_log.with_extension(format!("nic{n}.pcap")),
    }
}

/// The qemu command line: the domain's machine and devices, every write to a temporary
/// snapshot, the console on stdout, each NIC on isolated user networking with its traffic
/// dumped to `packets`.
fn qemu_args(spec: &BootSpec<'_>, kvm: bool, packets: &Path, qmp: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = [
        "-machine",
        "q35",
        "-accel",
        if kvm { "kvm" } else { "tcg" },
        "-cpu",
        if kvm { "host" } else { "max" },
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        if spec.devices.serial { "stdio" } else { "none" },
        "-snapshot",
        "-no-reboot",
        // Boot the disks only, never the network, in SeaBIOS and OVMF alike.
        "-boot",
        "strict=on",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["-m".into(), spec.memory_mib.to_string()]);
    if let Some(socket) = qmp {
        // A panic stops the guest (rather than ending qemu) and is reported on QMP.
        let socket = socket.display().to_string().replace(',', ",,");
        args.extend(["-qmp".into(), format!("unix:{socket},server=on,wait=off")]);
        args.extend(["-device".into(), "pvpanic".into(), "-action".into(), "panic=pause".into()]);
    }
    if spec.firmware == Firmware::Uefi {
        args.extend(["-drive".into(), format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}")]);
        args.extend(["-drive".into(), format!("if=pflash,format=raw,unit=1,file={OVMF_VARS}")]);
    }
    let mut ports = RootPorts::default();
    for (i, nic) in spec.devices.nics.iter().enumerate() {
        let port = ports.next(&mut args);
        args.extend(["-netdev".into(), format!("user,id=net{i},restrict=on")]);
        // No option ROM: the firmware's network boot would send DHCP requests from the
        // guest's MAC before any operating system runs.
        let device = format!("{},netdev=net{i},mac={},bus={port},romfile=", nic.model.device(), nic.mac);
        args.extend(["-device".into(), device]);
        let dump = absolute(&packets_file(packets, i)).display().to_string().replace(',', ",,");
        args.extend(["-object".into(), format!("filter-dump,id=dump{i},netdev=net{i},file={dump}")]);
    }
    disk_args(spec, &mut ports, &mut args);
    args
}

/// The disks on their buses, the first one booted.
fn disk_args(spec: &BootSpec<'_>, ports: &mut RootPorts, args: &mut Vec<String>) {
    let (mut sata, mut scsi) = (0, None::<&str>);
    for (i, image) in spec.images.iter().enumerate() {
        let format = format_of(image).unwrap_or("raw");
        let path = absolute(image).display().to_string().replace(',', ",,");
        args.extend(["-drive".into(), format!("file={path},format={format},if=none,id=disk{i}")]);
        let boot = if i == 0 { ",bootindex=1" } else { "" };
        let device = match spec.devices.disks.get(i).copied().unwrap_or(DiskBus::Virtio) {
            DiskBus::Virtio => format!("virtio-blk-pci,drive=disk{i},bus={}{boot}", ports.next(args)),
            DiskBus::Sata => {
                sata += 1;
                format!("ide-hd,drive=disk{i},bus=ide.{}{boot}", sata - 1)
            }
            DiskBus::Scsi => {
                let controller = *scsi.get_or_insert_with(|| scsi_controller(spec.devices.scsi_model, ports, args));
                format!("scsi-hd,drive=disk{i},bus={controller}.0{boot}")
            }
        };
        args.extend(["-device".into(), device]);
    }
}

fn scsi_controller(model: ScsiModel, ports: &mut RootPorts, args: &mut Vec<String>) -> &'static str {
    let device = match model {
        ScsiModel::VirtioScsi => format!("virtio-scsi-pci,id=scsi0,bus={}", ports.next(args)),
        // A conventional PCI device: on the root complex, not behind a PCIe root port.
        ScsiModel::Lsilogic => "lsi53c895a,id=scsi0,bus=pcie.0".to_owned(),
    };
    args.extend(["-device".into(), device]);
    "scsi0"
}

/// PCIe root ports as libvirt adds them on q35 (functions of slots 2, 3, …), one per PCI
/// device; the NICs come first, so the first NIC is on bus 1 (`enp1s0`) as under libvirt.
#[derive(Default)]
struct RootPorts(usize);

impl RootPorts {
    /// Adds the next root port and returns its id, the bus for one device.
    fn next(&mut self, args: &mut Vec<String>) -> String {
        let n = self.0;
        self.0 += 1;
        let (slot, function) = (2 + n / 8, n % 8);
        let multi = if function == 0 { ",multifunction=on" } else { "" };
        args.extend([
            "-device".into(),
            format!(
                "pcie-root-port,id=port{n},bus=pcie.0,chassis={},port=0x{:x},addr=0x{slot:x}.0x{function:x}{multi}",
                n + 1,
                0x10 + n
            ),
        ]);
        format!("port{n}")
    }
}

/// The first sign, failure signs winning when both appear (a shell prompt after a panic
/// message is still a failure).
pub(crate) fn decide(console: &str) -> Option<BootOutcome> {
    if let Some(sign) = FAILED.iter().find(|s| console.contains(*s)) {
        return Some(BootOutcome::Failed((*sign).into()));
    }
    BOOTED.iter().find(|s| console.contains(*s)).map(|s| BootOutcome::Booted((*s).into()))
}

fn console_tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<String> = text
        .lines()
        .map(|l| without_escapes(l).chars().filter(|c| !c.is_control()).take(200).collect::<String>())
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The line without terminal escape sequences (`ESC [ ... letter`: systemd's colours).
fn without_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_prompt_is_a_boot() {
        let c = "Debian GNU/Linux 12 debian12-vmware ttyS0\n\ndebian12-vmware login: ";
        assert_eq!(decide(c), Some(BootOutcome::Booted("login:".into())));
    }

    #[test]
    fn the_initramfs_shell_is_a_failure() {
        let c = "Gave up waiting for root file system device.\nALERT!  /dev/sda1 does not exist.  Dropping to a shell!\n(initramfs) ";
        assert_eq!(decide(c), Some(BootOutcome::Failed("ALERT!".into())));
    }

    #[test]
    fn a_grub_prompt_is_a_failure() {
        let c = "GNU GRUB  version 2.06-13+deb12u2\r\n\r\n   Minimal BASH-like line editing is supported.\r\ngrub> ";
        assert_eq!(decide(c), Some(BootOutcome::Failed("grub> ".into())));
    }

    #[test]
    fn the_report_says_outcome_and_signal_at_its_top() {
        let report = BootReport {
            outcome: BootOutcome::Booted("login:".into()),
            decided_by: Evidence::Console,
            seconds: 1.0,
            accel: "tcg".into(),
            console_log: PathBuf::from("/c"),
            console_tail: console_tail("\u{1b}[0;32m  OK  \u{1b}[0m] Reached target\r\nx login: ", 20),
            packets_log: PathBuf::from("/c.pcap"),
            first_packets: Vec::new(),
            first_packet_seconds: None,
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!((v["outcome"].as_str(), v["signal"].as_str()), (Some("booted"), Some("login:")));
        assert_eq!(v["console_tail"][0], "  OK  ] Reached target");
        let undecided = BootReport { outcome: BootOutcome::Undecided, ..report };
        assert_eq!(serde_json::to_value(&undecided).unwrap()["outcome"], "undecided");
    }

    #[test]
    fn a_console_that_never_stops_is_capped_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let seen = Arc::new(Mutex::new(String::new()));
        let flood = std::io::repeat(b'x').take(MAX_CONSOLE_LOG as u64 + 5 * MAX_CONSOLE_SEEN as u64);
        let tail = std::io::Cursor::new(b"\nALERT! /dev/sda1 does not exist".to_vec());
        copy_console(flood.chain(tail), File::create(&log).unwrap(), Arc::clone(&seen)).join().unwrap();
        let text = seen.lock().unwrap().clone();
        assert!(text.len() <= MAX_CONSOLE_SEEN, "{}", text.len());
        assert_eq!(decide(&text), Some(BootOutcome::Failed("ALERT!".into())));
        assert_eq!(std::fs::metadata(&log).unwrap().len(), MAX_CONSOLE_LOG as u64);
    }

    #[test]
    fn nothing_yet_is_no_decision() {
        assert_eq!(decide("Booting `Debian GNU/Linux'\nLoading initial ramdisk ..."), None);
    }

    use crate::libvirt::domain_xml::{domain_xml, DiskBus as XmlBus, DomainDisk, NetworkAttachment};
    use crate::manifest::{DiskSpec, DiskType, Hardware, JobSpec, NicSpec, SourceFormat};

    fn job(hardware: Hardware, macs: &[&str]) -> JobSpec {
        let disk = DiskSpec {
            id: "disk-0".into(),
            source_format: SourceFormat::Vmdk,
            local_path: PathBuf::from("/exports/disk-0.vmdk"),
            bytes: None,
            sha256: None,
            boot_order_hint: None,
            label: None,
            disk_type: DiskType::Unknown,
            ova_disk: None,
        };
        let nics = macs.iter().map(|m| NicSpec { id: None, mac: m.parse().ok(), network: None }).collect();
        JobSpec {
            vm_name: "web01".into(),
            vm_id: Some("vm-42".into()),
            provider: Some("vsphere".into()),
            hardware,
            disks: vec![disk],
            nics,
            compress: None,
            compress_level: None,
        }
    }

    /// V.xml as the daemon writes it, the disks at their final paths.
    fn v_xml(hardware: Hardware, buses: &[XmlBus], macs: &[&str]) -> String {
        let disks: Vec<DomainDisk> = buses
            .iter()
            .enumerate()
            .map(|(i, bus)| DomainDisk {
                path: PathBuf::from(format!("/var/lib/hyper2kvm/output/d{i}.qcow2")),
                target_bus: *bus,
            })
            .collect();
        domain_xml(&job(hardware, macs), &disks, &NetworkAttachment::Bridge("br0".into()))
    }

    fn staged(n: usize) -> Vec<PathBuf> {
        (0..n).map(|i| PathBuf::from(format!("/staging/d{i}.qcow2"))).collect()
    }

    fn spec_of(xml: &str, images: usize) -> Result<BootSpec<'static>, GuestError> {
        let console = PathBuf::from("/staging/console.log");
        BootSpec::from_domain_xml(xml, staged(images), console, Duration::from_secs(1), &super::super::tools::never)
    }

    fn args_of(spec: &BootSpec<'_>) -> String {
        qemu_args(spec, false, Path::new("/staging/console.pcap"), Some(Path::new("/tmp/q/qmp.sock"))).join(" ")
    }

    #[test]
    fn a_linux_domain_boots_with_its_memory_virtio_disks_and_macs() {
        let hw = Hardware { mem_gb: Some(1.5), ..Hardware::default() };
        let xml = v_xml(hw, &[XmlBus::Virtio, XmlBus::Virtio], &["00:50:56:aa:bb:01", "00:50:56:aa:bb:02"]);
        let spec = spec_of(&xml, 2).unwrap();
        assert_eq!((spec.firmware, spec.memory_mib), (Firmware::Bios, 1536));
        let args = args_of(&spec);
        for part in [
            "-machine q35 -accel tcg -cpu max",
            "-serial stdio -snapshot -no-reboot -boot strict=on",
            "-m 1536 -qmp unix:/tmp/q/qmp.sock,server=on,wait=off -device pvpanic -action panic=pause",
            "-device pcie-root-port,id=port0,bus=pcie.0,chassis=1,port=0x10,addr=0x2.0x0,multifunction=on",
            "-netdev user,id=net0,restrict=on -device virtio-net-pci,netdev=net0,mac=00:50:56:aa:bb:01,bus=port0,romfile=",
            "-object filter-dump,id=dump0,netdev=net0,file=/staging/console.pcap",
            "-device virtio-net-pci,netdev=net1,mac=00:50:56:aa:bb:02,bus=port1",
            "file=/staging/console.nic1.pcap",
            "-drive file=/staging/d0.qcow2,format=qcow2,if=none,id=disk0",
            "-device virtio-blk-pci,drive=disk0,bus=port2,bootindex=1",
        ] {
            assert!(args.contains(part), "{part}\n{args}");
        }
        assert!(args.ends_with("-device virtio-blk-pci,drive=disk1,bus=port3"), "{args}");
        assert!(!args.contains("/var/lib/hyper2kvm/output"), "the staged images are booted, not the XML's paths");
        assert!(!args.contains("pflash"), "{args}");
    }

    #[test]
    fn a_uefi_windows_domain_without_secure_boot_gets_ovmf_sata_and_e1000e() {
        let hw = Hardware {
            firmware: Some(crate::manifest::Firmware::Uefi),
            os_version: Some("windows2019srv_64Guest".into()),
            ..Hardware::default()
        };
        let xml = v_xml(hw, &[XmlBus::Sata, XmlBus::Sata], &[]);
        let spec = spec_of(&xml, 2).unwrap();
        assert_eq!(spec.firmware, Firmware::Uefi);
        let args = args_of(&spec);
        assert!(args.contains(OVMF_CODE) && args.contains(OVMF_VARS), "{args}");
        assert!(args.contains("-device ide-hd,drive=disk0,bus=ide.0,bootindex=1"), "{args}");
        assert!(args.contains("-device ide-hd,drive=disk1,bus=ide.1"), "{args}");
        // No MAC in the XML: the one qemu would give, so that the packets can be told apart.
        assert!(args.contains("-device e1000e,netdev=net0,mac=52:54:00:12:34:56,bus=port0"), "{args}");
        assert!(!args.contains("virtio-blk"), "{args}");
    }

    #[test]
    fn a_loader_means_uefi_as_firmware_efi_does() {
        let xml = v_xml(Hardware::default(), &[XmlBus::Virtio], &[]);
        assert_eq!(spec_of(&xml, 1).unwrap().firmware, Firmware::Bios);
        let loader = "<os>\n    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>";
        assert!(xml.contains("<os>\n"), "{xml}");
        let spec = spec_of(&xml.replacen("<os>", loader, 1), 1).unwrap();
        assert_eq!(spec.firmware, Firmware::Uefi);
        assert!(args_of(&spec).contains(OVMF_CODE));
    }

    #[test]
    fn what_the_check_cannot_reproduce_is_refused_with_a_reason() {
        let secure =
            Hardware { firmware: Some(crate::manifest::Firmware::Uefi), secureboot: true, ..Hardware::default() };
        let err = spec_of(&v_xml(secure, &[XmlBus::Virtio], &[]), 1).err().unwrap().to_string();
        assert!(err.starts_with("the boot check cannot reproduce the domain: "), "{err}");
        assert!(err.contains("secure boot"), "{err}");
        let xml = v_xml(Hardware::default(), &[XmlBus::Virtio], &[]);
        let err = spec_of(&xml, 2).err().unwrap().to_string();
        assert!(err.contains("the domain has 1 disks and 2 images were given"), "{err}");
        for (from, to, reason) in [
            ("machine='q35'", "machine='pc-i440fx-7.2'", "q35 only"),
            ("bus='virtio'/>", "bus='ide'/>", "the ide bus"),
            ("<model type='virtio'/>\n    </interface>", "<model type='ne2k_pci'/>\n    </interface>", "ne2k_pci"),
            ("device='disk'", "device='cdrom'", "cdrom"),
            ("<memory unit='MiB'>2048", "<memory unit='MiB'>lots", "not a number"),
            ("<domain type='kvm'>", "<pool type='kvm'>", "not a libvirt <domain>"),
            ("</domain>", "</domain><", "not valid"),
        ] {
            assert!(xml.contains(from), "{from}\n{xml}");
            let err = spec_of(&xml.replace(from, to), 1).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(reason), "{to}: {err}");
        }
    }

    #[test]
    fn a_domain_without_a_serial_port_boots_without_one() {
        let xml = v_xml(Hardware::default(), &[XmlBus::Virtio], &[]);
        let start = xml.find("<serial").unwrap();
        let end = xml.find("</console>").unwrap() + "</console>".len();
        let spec = spec_of(&format!("{}{}", &xml[..start], &xml[end..]), 1).unwrap();
        assert!(!spec.devices.serial);
        assert!(args_of(&spec).contains("-serial none"));
        assert!(spec_of(&xml, 1).unwrap().devices.serial);
    }

    #[test]
    fn scsi_disks_go_on_one_controller_of_the_domains_model() {
        // What a domain with SCSI disks looks like: virtio-scsi named, or no model (lsilogic).
        let xml = v_xml(Hardware::default(), &[XmlBus::Virtio, XmlBus::Virtio], &[])
            .replace("bus='virtio'/>", "bus='scsi'/>")
            .replace("<devices>\n", "<devices>\n    <controller type='scsi' model='virtio-scsi'/>\n");
        let args = args_of(&spec_of(&xml, 2).unwrap());
        assert_eq!(args.matches("virtio-scsi-pci,id=scsi0").count(), 1, "{args}");
        assert!(args.contains("-device scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1"), "{args}");
        assert!(args.contains("-device scsi-hd,drive=disk1,bus=scsi0.0"), "{args}");
        let lsi = xml.replace(" model='virtio-scsi'", "");
        assert!(args_of(&spec_of(&lsi, 2).unwrap()).contains("-device lsi53c895a,id=scsi0,bus=pcie.0"));
    }

    #[test]
    fn the_default_devices_are_what_the_check_used_before() {
        let spec = BootSpec {
            images: staged(2),
            firmware: Firmware::Bios,
            memory_mib: 1024,
            console_log: PathBuf::from("/staging/console.log"),
            budget: Duration::from_secs(1),
            cancel: &super::super::tools::never,
            devices: BootDevices::default(),
        };
        let args = args_of(&spec);
        assert!(args.contains("-serial stdio"), "{args}");
        assert!(args.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"), "{args}");
        assert_eq!(args.matches("virtio-blk-pci").count(), 2, "{args}");
    }

    #[test]
    fn the_report_says_which_signal_decided() {
        let report = BootReport {
            outcome: BootOutcome::Booted("network: DHCP request from 52:54:00:12:34:56".into()),
            decided_by: Evidence::Network,
            seconds: 1.0,
            accel: "tcg".into(),
            console_log: PathBuf::from("/c"),
            console_tail: Vec::new(),
            packets_log: PathBuf::from("/c.pcap"),
            first_packets: vec!["52:54:00:12:34:56: DHCP request".into()],
            first_packet_seconds: Some(0.5),
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!((v["outcome"].as_str(), v["decided_by"].as_str()), (Some("booted"), Some("network")));
        assert_eq!(v["first_packets"][0], "52:54:00:12:34:56: DHCP request");
    }
}
