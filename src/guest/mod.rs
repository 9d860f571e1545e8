//! The guest inside the converted disks: inspect it, fix it for KVM, verify the fix from the
//! guest's own files, and boot it once to see that it comes up (issue 12; docs/GUEST.md).
//!
//! Everything here drives the field's standard tools (libguestfs' `virt-inspector` and
//! `guestfish`, `virt-v2v-in-place`, `qemu-system-x86_64`) as child processes through
//! [`Tools`], which puts GUEST_TOOLS_WRAPPER in front of each command line so that they can
//! live in a separate root (scripts/guest-tools-run.sh) where the host's packages conflict.
//! The one-shot commands `hyper2kvm inspect --guest` and `hyper2kvm fix` call this module; the
//! daemon's job stage is meant to call the same functions.

pub mod boot_check;
pub mod domain;
pub mod files;
pub mod fix;
pub mod inspect;
pub mod oneshot;
pub mod pcap;
mod qmp;
pub mod tools;
pub mod verify;

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use boot_check::{boot_check, BootOutcome, BootReport, BootSpec, Evidence, Firmware};
pub use domain::BootDevices;
pub use fix::{fix, FixOptions, FixReport};
pub use inspect::{inspect, GuestInfo};
pub use tools::{Cancel, Tools};
pub use verify::{verify, Verification};

/// How many lines of a tool's log an error message carries.
pub const LOG_TAIL_LINES: usize = 12;

/// Why a guest could not be inspected, fixed, verified or boot-checked. The first line of each
/// message is a sentence a person can act on.
#[derive(Debug, Error)]
pub enum GuestError {
    /// A tool the step needs is not installed (or not in the wrapper's root).
    #[error("{tool} is not installed: install {package} (Debian 12), or set GUEST_TOOLS_WRAPPER to run the guest tools from a root that has them")]
    ToolMissing {
        /// The program that is missing (or exited 127 behind the wrapper).
        tool: String,
        /// The Debian 12 package that provides it.
        package: &'static str,
    },
    /// The tool could not be started for another reason.
    #[error("could not start {tool}: {source}")]
    Spawn {
        /// The program, as named on its command line (`virt-inspector`, `guestfish`, …).
        tool: String,
        /// Why it could not be started.
        #[source]
        source: std::io::Error,
    },
    /// Inspection found no operating system on the disks.
    #[error("no operating system was recognised on {images}: the disks may be data disks, encrypted, or not all of the VM's disks; check the disk list")]
    NotRecognised {
        /// The disk images inspected, at most four named.
        images: String,
    },
    /// The tool ran and failed.
    #[error("{tool} failed ({status}); its log is {log}; last lines:\n{tail}")]
    ToolFailed {
        /// The program, as named on its command line (`virt-inspector`, `guestfish`, …).
        tool: String,
        /// How it ended: `exit status N`, `killed by signal N`, or what it failed to do.
        status: String,
        /// The file its stderr (and stdout where it is not parsed) went to.
        log: PathBuf,
        /// The last [`LOG_TAIL_LINES`] lines of that log.
        tail: String,
    },
    /// The tool did not finish in time and was killed with its whole process group.
    #[error("{tool} did not finish within {} s and was stopped; raise CONVERSION_TIMEOUT or check the log {log}", .limit.as_secs())]
    Timeout {
        /// The program, as named on its command line (`virt-inspector`, `guestfish`, …).
        tool: String,
        /// How long it was allowed to run.
        limit: Duration,
        /// The file its output went to.
        log: PathBuf,
    },
    /// Cancelled from outside (job cancelled, lease lost, daemon stopping).
    #[error("{tool} was cancelled and its process group stopped")]
    Cancelled {
        /// The program, as named on its command line (`virt-inspector`, `guestfish`, …).
        tool: String,
    },
    /// The tool's output could not be understood.
    #[error("could not understand {tool}'s output: {reason}")]
    Output {
        /// The program, as named on its command line (`virt-inspector`, `guestfish`, …).
        tool: String,
        /// What was wrong with the output.
        reason: String,
    },
    /// The boot check cannot give the guest the devices of its domain.
    #[error("the boot check cannot reproduce the domain: {reason}")]
    Unreproducible {
        /// What of the domain cannot be given (the disks do not match, a bus is unknown, …).
        reason: String,
    },
    /// Reading or writing a local file failed.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        /// What was being done: `cannot create`, `cannot write`.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// `a, b, c (and N more)`: at most `max` items of a list, for messages.
pub(crate) fn capped<T: std::fmt::Display>(items: &[T], max: usize) -> String {
    let mut text = items.iter().take(max).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    if items.len() > max {
        text.push_str(&format!(" (and {} more)", items.len() - max));
    }
    text
}

/// `map_err` for a local file operation: [`GuestError::Io`] naming the file.
pub(crate) fn io_error(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> GuestError {
    let path = path.to_path_buf();
    move |source| GuestError::Io { what, path, source }
}

/// A fix and its verification, as the one-shot `hyper2kvm fix` and the daemon's job stage
/// record them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Repair {
    /// What virt-v2v-in-place did, and its log.
    pub fix: FixReport,
    /// Guest files hyper2kvm rewrote after the tool because they still named SCSI/SATA disks.
    pub mended: Vec<String>,
    /// The verification of the final state (after mending, when anything was mended).
    pub verification: Verification,
}

/// Fixes `images` with virt-v2v-in-place, then verifies the result from the guest's files;
/// device names the tool left pointing at SCSI/SATA disks are rewritten ([`verify::mend`])
/// and the guest verified again (the evidence is in the answer; a guest that does not agree is `verification.ok == false`,
/// not an error: the caller decides). Logs and the copy of `/boot` go under `work_dir`.
pub fn repair(
    tools: &Tools,
    images: &[PathBuf],
    work_dir: &std::path::Path,
    timeout: Duration,
    cancel: Cancel<'_>,
) -> Result<Repair, GuestError> {
    let started = std::time::Instant::now();
    let fix = fix(tools, images, &FixOptions { work_dir: work_dir.to_path_buf(), timeout, cancel })?;
    let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_secs(60));
    let mut verification = verify(tools, images, &work_dir.join("verify"), left, cancel)?;
    let mut mended = Vec::new();
    if !verification.ok {
        mended = verify::mend(tools, images, &work_dir.join("mend"), left, cancel)?;
        if !mended.is_empty() {
            let _ = std::fs::remove_dir_all(work_dir.join("verify"));
            verification = verify(tools, images, &work_dir.join("verify"), left, cancel)?;
        }
    }
    Ok(Repair { fix, mended, verification })
}
