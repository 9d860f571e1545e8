//! Booting the result once in a throwaway qemu (`-snapshot`: the image never changes) with the
//! devices hyper2kvm's domain gives it (q35, virtio disks, a virtio NIC, OVMF for UEFI), and
//! deciding from the guest's serial console: a `login:` prompt is a boot; a kernel panic, the
//! initramfs' "ALERT!" and `(initramfs)` shell, or systemd's emergency mode is a failure. The
//! console is also the evidence, kept in a file.
//!
//! Only guests with a console on ttyS0 say anything here; a guest without one runs out the
//! time and is reported as undecided (docs/GUEST.md: the network signal is still to do).

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::files::format_of;
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

/// The machine's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

/// What to boot and how long to wait.
pub struct BootSpec<'a> {
    /// The VM's disks, first disk first (attached as virtio disks).
    pub images: Vec<PathBuf>,
    pub firmware: Firmware,
    pub memory_mib: u64,
    /// The console goes here (and qemu's own messages to `CONSOLE.qemu.log`).
    pub console_log: PathBuf,
    /// BOOT_CHECK_SECONDS: how long the guest has to reach a login prompt.
    pub budget: Duration,
    pub cancel: Cancel<'a>,
}

/// How the boot ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "signal")]
pub enum BootOutcome {
    /// The console showed this sign of a booted guest.
    Booted(String),
    /// The console showed this sign of a failed boot.
    Failed(String),
    /// Neither within the budget (a guest without a serial console ends here too).
    Undecided,
}

/// The evidence.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// `"outcome": "booted" | "failed" | "undecided"` and `"signal"`: the console text seen.
    #[serde(flatten)]
    pub outcome: BootOutcome,
    pub seconds: f64,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub console_log: PathBuf,
    /// The console's last lines (at most 20).
    pub console_tail: Vec<String>,
}

/// Paths of OVMF in Debian 12's `ovmf` package.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Boots the images once and reads the console.
pub fn boot_check(tools: &Tools, spec: &BootSpec<'_>) -> Result<BootReport, GuestError> {
    let kvm = tools.kvm_usable();
    let console_log = absolute(&spec.console_log);
    let qemu_log = console_log.with_extension("qemu.log");
    let qemu_err = File::create(&qemu_log).map_err(super::io_error("cannot write", &qemu_log))?;
    let mut console = File::create(&console_log).map_err(super::io_error("cannot write", &console_log))?;
    let mut cmd = tools.command("qemu-system-x86_64");
    cmd.args(qemu_args(spec, kvm)).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(qemu_err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = Instant::now();
    let mut child = tools.spawn("qemu-system-x86_64", &mut cmd)?;
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = child.stdout.take().map(|mut out| {
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = console.write_all(&buf[..n]);
                if let Ok(mut s) = seen.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        })
    });
    let outcome = loop {
        let text = seen.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(outcome) = decide(&text) {
            break outcome;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break decide(&seen.lock().map(|s| s.clone()).unwrap_or_default()).unwrap_or(BootOutcome::Undecided);
        }
        if (spec.cancel)() {
            kill_group(&mut child);
            return Err(GuestError::Cancelled { tool: "qemu-system-x86_64".into() });
        }
        if started.elapsed() >= spec.budget {
            break BootOutcome::Undecided;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let seconds = started.elapsed().as_secs_f64();
    kill_group(&mut child);
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    let text = seen.lock().map(|s| s.clone()).unwrap_or_default();
    if outcome == BootOutcome::Undecided && text.is_empty() {
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
        seconds,
        accel: if kvm { "kvm" } else { "tcg" }.into(),
        console_log,
        console_tail: console_tail(&text, 20),
    })
}

/// The qemu command line: q35, the disks on virtio-blk, a virtio NIC on user networking, the
/// console on stdout, every write to a temporary snapshot.
fn qemu_args(spec: &BootSpec<'_>, kvm: bool) -> Vec<String> {
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
        "stdio",
        "-snapshot",
        "-no-reboot",
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-pci,netdev=net0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["-m".into(), spec.memory_mib.to_string()]);
    if spec.firmware == Firmware::Uefi {
        args.extend(["-drive".into(), format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}")]);
        args.extend(["-drive".into(), format!("if=pflash,format=raw,unit=1,file={OVMF_VARS}")]);
    }
    for (i, image) in spec.images.iter().enumerate() {
        let format = format_of(image).unwrap_or("raw");
        let path = absolute(image).display().to_string().replace(',', ",,");
        args.extend(["-drive".into(), format!("file={path},format={format},if=none,id=disk{i}")]);
        let boot = if i == 0 { ",bootindex=1" } else { "" };
        args.extend(["-device".into(), format!("virtio-blk-pci,drive=disk{i}{boot}")]);
    }
    args
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
            seconds: 1.0,
            accel: "tcg".into(),
            console_log: PathBuf::from("/c"),
            console_tail: console_tail("\u{1b}[0;32m  OK  \u{1b}[0m] Reached target\r\nx login: ", 20),
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!((v["outcome"].as_str(), v["signal"].as_str()), (Some("booted"), Some("login:")));
        assert_eq!(v["console_tail"][0], "  OK  ] Reached target");
        let undecided = BootReport { outcome: BootOutcome::Undecided, ..report };
        assert_eq!(serde_json::to_value(&undecided).unwrap()["outcome"], "undecided");
    }

    #[test]
    fn nothing_yet_is_no_decision() {
        assert_eq!(decide("Booting `Debian GNU/Linux'\nLoading initial ramdisk ..."), None);
    }

    #[test]
    fn uefi_adds_ovmf_and_disks_are_virtio() {
        let spec = BootSpec {
            images: vec![PathBuf::from("/o/vm.qcow2"), PathBuf::from("/o/vm-disk2.qcow2")],
            firmware: Firmware::Uefi,
            memory_mib: 1024,
            console_log: PathBuf::from("/o/console.log"),
            budget: Duration::from_secs(1),
            cancel: &super::super::tools::never,
        };
        let args = qemu_args(&spec, false).join(" ");
        assert!(args.contains("-accel tcg"));
        assert!(args.contains("-snapshot"));
        assert!(args.contains(OVMF_CODE));
        assert!(args
            .contains("file=/o/vm.qcow2,format=qcow2,if=none,id=disk0 -device virtio-blk-pci,drive=disk0,bootindex=1"));
        assert!(args.ends_with("virtio-blk-pci,drive=disk1"));
    }
}
