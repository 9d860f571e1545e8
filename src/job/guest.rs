//! The job's guest stage (issue 12; docs/GUEST.md): after every disk is converted into the
//! staging directory and before the domain is built or anything is published, the staged
//! images are inspected, fixed with virt-v2v-in-place and verified (`pipeline.inspect`,
//! `pipeline.fix`), checked with `qemu-img check` (`pipeline.validate`) and booted once
//! (BOOT_CHECK), as the manifest and the configuration ask.
//!
//! Everything runs on the job's own (blocking) thread, inside its lease: the daemon's heartbeat
//! goes on beside it, and the tools are stopped — their whole process group — when the job is
//! cancelled or its claim is no longer this daemon's. What it must not do: touch a source (only
//! the staged copies), publish, or word an `.error` itself (`failures.rs` does).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::failures;
use super::stages::{build_domain_xml, output_paths};
use super::{Job, Stage, Stop};
use crate::config::BootCheck;
use crate::convert::ConvertError;
use crate::guest::{self, BootOutcome, BootSpec, Evidence, GuestError, GuestInfo, Repair};
use crate::libvirt::domain_xml::Acceleration;
use crate::manifest::{FixStep, FstabMode, JobSpec, Pipeline};
use crate::publish::Staging;
use crate::report::{FixOption, FixRecord, GuestAsked, GuestReport, IntegrityCheck, Skipped, StepRecord};

/// The guest stage's work directory inside the job's staging directory.
pub(super) const WORK_DIR: &str = "guest";

/// How often the claim's lock is read while a tool runs (the cancel check itself runs every
/// 200 ms): often enough to stop a fix well within a lease, seldom enough for NFS.
const OWNERSHIP_EVERY: Duration = Duration::from_secs(2);

/// Memory for the boot check's throwaway VM, at most: it only has to reach a login prompt,
/// and the host runs other jobs.
const BOOT_CHECK_MAX_MIB: u64 = 4096;

/// What the guest stage leaves for the rest of the job.
pub(super) struct GuestOutcome {
    pub report: GuestReport,
    /// The inspection, for the domain.
    pub info: Option<GuestInfo>,
}

/// Whether a job is to be stopped, for the tools' cancel check: the job cancelled, the
/// heartbeat's verdict that the lock is gone, or the lock read now and then.
struct StopCheck<'a> {
    job: &'a Job<'a>,
    last_read: Mutex<Instant>,
    lost: AtomicBool,
}

impl StopCheck<'_> {
    fn stop_now(&self) -> bool {
        if matches!(self.job.control.check(), Err(ConvertError::Cancelled | ConvertError::LockLost)) {
            return true;
        }
        let Ok(mut last) = self.last_read.lock() else { return false };
        if last.elapsed() >= OWNERSHIP_EVERY {
            *last = Instant::now();
            if !self.job.claim.still_owned() {
                self.lost.store(true, Ordering::SeqCst);
            }
        }
        self.lost.load(Ordering::SeqCst)
    }

    /// The stop a cancelled tool means.
    fn stop(&self) -> Stop {
        if self.lost.load(Ordering::SeqCst) || matches!(self.job.control.check(), Err(ConvertError::LockLost)) {
            Stop::LostLock
        } else {
            Stop::Cancelled
        }
    }
}

impl<'j> Job<'j> {
    /// The guest stage on the staged `images` (boot disk first, as `spec.disks`).
    pub(super) fn guest_stage(
        &'j self,
        spec: &JobSpec,
        pipeline: &Pipeline,
        images: &[PathBuf],
        staging: &Staging,
        warnings: &mut Vec<String>,
    ) -> Result<GuestOutcome, Stop> {
        let boot_check = self.ctx.config.boot_check;
        let mut run = GuestRun {
            job: self,
            images,
            work: staging.path(WORK_DIR),
            check: StopCheck { job: self, last_read: Mutex::new(Instant::now()), lost: AtomicBool::new(false) },
            report: GuestReport {
                asked: GuestAsked { pipeline: pipeline.clone(), boot_check },
                skipped: skipped_options(pipeline),
                ..GuestReport::default()
            },
            warnings,
        };
        let fix = pipeline.fix.enabled;
        let mut info = None;
        // The boot check needs no inspection: it boots the devices of V.xml, whatever chose them.
        if pipeline.inspect.enabled || fix {
            info = run.inspect(fix)?;
        }
        if fix {
            let repaired = run.fix(&pipeline.fix)?;
            if let Some(info) = info.as_mut() {
                after_fix(info, &repaired);
            }
        }
        if pipeline.validate.enabled && pipeline.validate.check_image_integrity {
            run.check_integrity(spec)?;
        }
        if boot_check != BootCheck::Off {
            run.boot(spec, info.as_ref(), boot_check)?;
        }
        run.report.inspect.clone_from(&info);
        Ok(GuestOutcome { report: run.report, info })
    }
}

/// One run of the guest stage: the job, its staged images, and what has been recorded so far.
struct GuestRun<'a, 'w> {
    job: &'a Job<'a>,
    images: &'a [PathBuf],
    /// `<staging>/guest`: the tools' logs and scratch files.
    work: PathBuf,
    check: StopCheck<'a>,
    report: GuestReport,
    warnings: &'w mut Vec<String>,
}

impl GuestRun<'_, '_> {
    /// The time left of CONVERSION_TIMEOUT, or the job's timeout failure when none is.
    fn time_left(&self) -> Result<Duration, Stop> {
        match self.job.control.remaining() {
            left if left.is_zero() => Err(failures::guest_time_out()),
            left => Ok(left),
        }
    }

    /// A tool's error as the job's stop: cancelled or lost, else the `.error`.
    fn failed(&self, stage: Stage, error: GuestError) -> Stop {
        match error {
            GuestError::Cancelled { .. } => self.check.stop(),
            error => failures::guest_failure(stage, &error, &self.work),
        }
    }

    fn accel(&self) -> String {
        if self.job.ctx.guest_tools.kvm_usable() { "kvm" } else { "tcg" }.to_owned()
    }

    /// Records a step's time in `V.json` and the job's events.
    fn step_done(&mut self, step: &'static str, started: Instant, accel: Option<String>, what: &str) {
        let seconds = started.elapsed().as_secs_f64();
        let how = accel.as_deref().map(|a| format!(" ({a})")).unwrap_or_default();
        let message = format!("{step}: {what} in {seconds:.0} s{how}");
        info!(stage = Stage::Guest.as_str(), step, seconds, accel = accel.as_deref().unwrap_or(""), "{message}");
        self.job.events.append(Stage::Guest.as_str(), &message, None);
        self.report.steps.push(StepRecord { step, seconds, accel });
    }

    fn skip(&mut self, step: &str, reason: String) {
        warn!(stage = Stage::Guest.as_str(), step, "{reason}");
        self.warnings.push(format!("guest {step}: {reason}"));
        self.report.skipped.push(Skipped { step: step.to_owned(), reason });
    }

    /// Inspects the staged guest. An unrecognised guest is a failure when a later step needs
    /// the guest (`needed`), otherwise a warning.
    fn inspect(&mut self, needed: bool) -> Result<Option<GuestInfo>, Stop> {
        let left = self.time_left()?;
        let started = Instant::now();
        self.job.events.append(Stage::Guest.as_str(), "inspect: inspecting the guest", None);
        let tools = &self.job.ctx.guest_tools;
        let cancel = || self.check.stop_now();
        match guest::inspect(tools, self.images, &self.work.join("inspect"), left, &cancel) {
            Ok(info) => {
                let what = format!(
                    "{} {} ({}), {}, {}",
                    info.distro, info.version, info.arch, info.boot_loader, info.firmware
                );
                self.step_done("inspect", started, Some(self.accel()), &what);
                Ok(Some(info))
            }
            Err(GuestError::NotRecognised { images }) if !needed => {
                self.skip(
                    "inspect",
                    format!("no operating system was recognised on {images}; nothing else asked for it"),
                );
                Ok(None)
            }
            // The staged paths are gone once the job ends: name the manifest's disks.
            Err(GuestError::NotRecognised { .. }) => {
                Err(self.failed(Stage::Guest, GuestError::NotRecognised { images: self.disk_names() }))
            }
            Err(e) => Err(self.failed(Stage::Guest, e)),
        }
    }

    /// `the converted disks a, b`: the staged files are named after the manifest's disk ids.
    fn disk_names(&self) -> String {
        let ids: Vec<String> =
            self.images.iter().filter_map(|p| p.file_stem()).map(|s| s.to_string_lossy().into_owned()).collect();
        format!("the converted disks {}", guest::capped(&ids, 4))
    }

    /// `fix.backup`, then virt-v2v-in-place and the verification of its work.
    fn fix(&mut self, asked: &FixStep) -> Result<Repair, Stop> {
        let backup = if asked.backup { self.backup()? } else { Vec::new() };
        let left = self.time_left()?;
        self.job.events.append(Stage::Guest.as_str(), "fix: virt-v2v-in-place on the staged disks", None);
        let tools = &self.job.ctx.guest_tools;
        let cancel = || self.check.stop_now();
        let started = Instant::now();
        let repaired = guest::repair(tools, self.images, &self.work.join("fix"), left, &cancel)
            .map_err(|e| self.failed(Stage::Guest, e))?;
        let fix_seconds = repaired.fix.seconds;
        let message = format!("fix: virt-v2v-in-place in {fix_seconds:.0} s ({})", repaired.fix.accel);
        self.job.events.append(Stage::Guest.as_str(), &message, None);
        self.report.steps.push(StepRecord {
            step: "fix",
            seconds: fix_seconds,
            accel: Some(repaired.fix.accel.clone()),
        });
        let verdict =
            if repaired.verification.ok { "agrees with virtio disks" } else { "does NOT agree with virtio disks" };
        let mended = match repaired.mended.len() {
            0 => String::new(),
            n => format!(", {n} file(s) mended after the tool"),
        };
        let what = format!("the guest {verdict}{mended}");
        // The verification's share: the whole repair less the tool's run.
        let verify_started = started + Duration::from_secs_f64(fix_seconds.min(started.elapsed().as_secs_f64()));
        self.step_done("verify", verify_started, Some(repaired.fix.accel.clone()), &what);
        if !repaired.verification.ok {
            return Err(failures::not_repaired(&repaired.verification.problems, &repaired.fix.log, &self.work));
        }
        let options = fix_options(asked);
        for option in options.iter().filter(|o| o.asked == serde_json::Value::Bool(false) || o.asked == "noop") {
            let reason =
                format!("pipeline.fix.{} = {} cannot be honoured: {}", option.option, option.asked, option.note);
            self.warnings.push(reason.clone());
            warn!(stage = Stage::Guest.as_str(), "{reason}");
        }
        self.report.fix = Some(FixRecord {
            done: true,
            tool: repaired.fix.clone(),
            mended: repaired.mended.clone(),
            verification: repaired.verification.clone(),
            options,
            backup,
        });
        Ok(repaired)
    }

    /// Copies of the staged images before the fix (the fix changes them in place), in
    /// `<staging>/guest/backup/`: kept until the job ends, when the staging directory goes.
    /// `std::fs::copy` clones the extents (copy_file_range) where the filesystem can.
    fn backup(&mut self) -> Result<Vec<PathBuf>, Stop> {
        let started = Instant::now();
        let dir = self.work.join("backup");
        std::fs::create_dir_all(&dir).map_err(|e| failures::backup_failed(&dir, e))?;
        let mut copies = Vec::with_capacity(self.images.len());
        for image in self.images {
            let copy = dir.join(image.file_name().unwrap_or_default());
            std::fs::copy(image, &copy).map_err(|e| failures::backup_failed(&copy, e))?;
            copies.push(copy);
        }
        self.step_done("backup", started, None, &format!("{} staged disk(s) copied", copies.len()));
        Ok(copies)
    }

    /// `pipeline.validate.check_image_integrity`: `qemu-img check` of every staged output.
    fn check_integrity(&mut self, spec: &JobSpec) -> Result<(), Stop> {
        let started = Instant::now();
        let mut checks = Vec::with_capacity(self.images.len());
        for (index, image) in self.images.iter().enumerate() {
            let left = self.time_left()?;
            let output = super::stages::output_name(spec, index);
            let cancel = || self.check.stop_now();
            let check = qemu_img_check(image, &output, &self.work, left, &cancel).map_err(|e| match e {
                GuestError::Cancelled { .. } => self.check.stop(),
                e => failures::integrity_unchecked(&output, &e, &self.work),
            })?;
            if !check.ok {
                return Err(failures::integrity_failed(&output, &check.result));
            }
            checks.push(check);
        }
        let what = format!("qemu-img check of {} output(s): clean", checks.len());
        self.report.validate = Some(crate::report::ValidateRecord { image_integrity: checks });
        self.step_done("validate", started, None, &what);
        Ok(())
    }

    /// BOOT_CHECK: boots the staged result once with the domain's devices.
    fn boot(&mut self, spec: &JobSpec, info: Option<&GuestInfo>, mode: BootCheck) -> Result<(), Stop> {
        let config = &self.job.ctx.config;
        let left = self.time_left()?;
        self.job.events.append(Stage::Validate.as_str(), "boot_check: booting the result once", None);
        let cancel = || self.check.stop_now();
        // The devices of the V.xml this job publishes (the paths differ: the staged images boot).
        let xml = build_domain_xml(config, spec, &output_paths(config, spec), Acceleration::Kvm, info);
        let budget = config.boot_check_seconds.min(left);
        let console_log = self.work.join("boot-check.console.log");
        let boot = boot_spec(&xml, self.images.to_vec(), console_log, budget, &cancel)
            .map_err(|e| self.failed(Stage::Validate, e))?;
        let started = Instant::now();
        let result = guest::boot_check(&self.job.ctx.guest_tools, &boot);
        let booted = result.map_err(|e| self.failed(Stage::Validate, e))?;
        let what = match &booted.outcome {
            BootOutcome::Booted(sign) => format!("booted ({sign:?}, from its {})", evidence(booted.decided_by)),
            BootOutcome::Failed(sign) => format!("did not boot ({sign:?}, from its {})", evidence(booted.decided_by)),
            BootOutcome::Undecided => {
                format!("undecided: no login prompt and no network packet within {:.0} s", budget.as_secs_f64())
            }
        };
        self.step_done("boot_check", started, Some(booted.accel.clone()), &what);
        let ok = matches!(booted.outcome, BootOutcome::Booted(_));
        self.report.boot_check = Some(booted.clone());
        match (ok, mode) {
            (true, _) | (false, BootCheck::Off) => Ok(()),
            (false, BootCheck::Warn) => {
                self.warnings.push(format!(
                    "BOOT_CHECK=warn: the guest {what}; its console is {}",
                    booted.console_log.display()
                ));
                Ok(())
            }
            (false, BootCheck::Require) => Err(failures::boot_failed(&booted, &self.work)),
        }
    }
}

/// Options of a step that is not enabled: recorded as skipped, not silently dropped.
fn skipped_options(pipeline: &Pipeline) -> Vec<Skipped> {
    let mut skipped = Vec::new();
    let mut off = |step: &str, options: &[(&str, bool)]| {
        for (option, _) in options.iter().filter(|(_, on)| *on) {
            skipped.push(Skipped {
                step: format!("{step}.{option}"),
                reason: format!("pipeline.{step}.enabled is not true"),
            });
        }
    };
    let (inspect, fix, validate) = (&pipeline.inspect, &pipeline.fix, &pipeline.validate);
    if !inspect.enabled {
        off("inspect", &[("collect_guest_info", inspect.collect_guest_info)]);
    }
    if !fix.enabled {
        off("fix", &[("backup", fix.backup)]);
    }
    if !validate.enabled {
        off("validate", &[("check_image_integrity", validate.check_image_integrity)]);
    }
    skipped
}

/// The manifest's repair switches against virt-v2v-in-place, which has none of them: it
/// always rebuilds the initramfs, updates the boot loader, remaps fstab and removes VMware
/// tools. A `false` (or fstab `noop`) cannot be honoured and is a warning.
pub(super) fn fix_options(asked: &FixStep) -> Vec<FixOption> {
    let json = |v: Option<bool>| v.map_or(serde_json::Value::Null, serde_json::Value::Bool);
    let fstab = asked.fstab_mode.map_or(serde_json::Value::Null, |m| serde_json::json!(m));
    let fstab_note = match asked.fstab_mode {
        Some(FstabMode::StabilizeAll) | None => {
            "virt-v2v-in-place remaps /dev/sdX and /dev/hdX to /dev/vdX (not to UUID=); UUID=, LABEL= and LVM names are kept"
        }
        Some(FstabMode::BypathOnly) => "virt-v2v-in-place remaps every /dev/sdX and /dev/hdX entry, not only by-path ones",
        Some(FstabMode::Noop) => "virt-v2v-in-place always remaps /dev/sdX and /dev/hdX entries in fstab",
    };
    vec![
        FixOption {
            option: "regen_initramfs",
            asked: json(asked.regen_initramfs),
            done: "always",
            note: "virt-v2v-in-place always rebuilds the initramfs with the virtio drivers".into(),
        },
        FixOption {
            option: "update_grub",
            asked: json(asked.update_grub),
            done: "always",
            note: "virt-v2v-in-place always updates the boot loader's device names; hyper2kvm mends what it leaves"
                .into(),
        },
        FixOption { option: "fstab_mode", asked: fstab, done: "always", note: fstab_note.into() },
        FixOption {
            option: "remove_vmware_tools",
            asked: json(asked.remove_vmware_tools),
            done: "always",
            note: "virt-v2v-in-place always removes VMware tools".into(),
        },
    ]
}

/// The verification read the fixed guest's initramfs: the inspection's kernel facts, taken
/// before the fix, are brought up to date from it (the domain's disk bus depends on them).
fn after_fix(info: &mut GuestInfo, repaired: &Repair) {
    for kernel in &mut info.kernels {
        if let Some(seen) = repaired.verification.initramfs.iter().find(|e| e.kernel == kernel.version) {
            kernel.initrd_virtio.clone_from(&seen.virtio);
            kernel.boots_on_virtio = seen.builtin || seen.virtio.iter().any(|m| m == "virtio_blk");
        }
    }
}

/// What decided a boot check, as the guest's own signal is named in a sentence.
fn evidence(decided_by: Evidence) -> &'static str {
    match decided_by {
        Evidence::Console => "serial console",
        Evidence::Network => "first network packets",
        Evidence::Panic => "panic notifier (pvpanic)",
        Evidence::None => "silence",
    }
}

/// The boot check's spec from the domain XML this job publishes, its memory capped at
/// [`BOOT_CHECK_MAX_MIB`]: the check needs the guest to come up, not the VM's whole memory, and
/// a 64 GiB VM must not take 64 GiB of the conversion host.
fn boot_spec<'c>(
    xml: &str,
    images: Vec<PathBuf>,
    console_log: PathBuf,
    budget: Duration,
    cancel: guest::Cancel<'c>,
) -> Result<BootSpec<'c>, GuestError> {
    let mut boot = BootSpec::from_domain_xml(xml, images, console_log, budget, cancel)?;
    boot.memory_mib = boot.memory_mib.min(BOOT_CHECK_MAX_MIB);
    Ok(boot)
}

/// `qemu-img check` of one staged output, its JSON kept in the report. Exit 0 is clean, 3 is
/// leaked clusters only (harmless: space, not data); anything else is a damaged image.
fn qemu_img_check(
    image: &Path,
    output: &str,
    work: &Path,
    limit: Duration,
    cancel: guest::Cancel<'_>,
) -> Result<IntegrityCheck, GuestError> {
    std::fs::create_dir_all(work).map_err(guest::io_error("cannot create", work))?;
    let log = work.join(format!("qemu-img-check.{output}.log"));
    let out_path = log.with_extension("json");
    let out = std::fs::File::create(&out_path).map_err(guest::io_error("cannot write", &out_path))?;
    let err = std::fs::File::create(&log).map_err(guest::io_error("cannot write", &log))?;
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["check", "-f", "qcow2", "--output=json"]).arg(image);
    cmd.stdin(std::process::Stdio::null()).stdout(out).stderr(err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => GuestError::ToolMissing { tool: "qemu-img".into(), package: "qemu-utils" },
        _ => GuestError::Spawn { tool: "qemu-img".into(), source: e },
    })?;
    let status = guest::tools::wait_limited(&mut child, "qemu-img", limit, cancel, &log)?;
    let text = std::fs::read(&out_path).map_err(guest::io_error("cannot read", &out_path))?;
    let result: serde_json::Value = serde_json::from_slice(&text)
        .unwrap_or_else(|_| serde_json::json!({ "exit_status": status.code(), "stderr": guest::tools::tail(&log) }));
    let ok = matches!(status.code(), Some(0 | 3));
    if !ok && status.code() != Some(2) && result.get("check-errors").is_none() && result.get("corruptions").is_none() {
        return Err(GuestError::ToolFailed {
            tool: "qemu-img check".into(),
            status: format!("{status}"),
            log,
            tail: guest::tools::tail(&work.join(format!("qemu-img-check.{output}.log"))),
        });
    }
    Ok(IntegrityCheck { output: output.to_owned(), ok, result, seconds: started.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_repair_switch_is_recorded_as_always_done() {
        let asked = FixStep {
            enabled: true,
            update_grub: Some(true),
            regen_initramfs: Some(false),
            fstab_mode: Some(FstabMode::Noop),
            ..FixStep::default()
        };
        let options = fix_options(&asked);
        let names: Vec<&str> = options.iter().map(|o| o.option).collect();
        assert_eq!(names, ["regen_initramfs", "update_grub", "fstab_mode", "remove_vmware_tools"]);
        assert!(options.iter().all(|o| o.done == "always"));
        assert_eq!(options[0].asked, serde_json::json!(false));
        assert_eq!(options[1].asked, serde_json::json!(true));
        assert_eq!(options[2].asked, serde_json::json!("noop"));
        assert_eq!(options[3].asked, serde_json::Value::Null, "left out of the manifest");
        assert!(options[2].note.contains("always remaps"), "{}", options[2].note);
    }

    #[test]
    fn options_of_steps_not_enabled_are_skipped_with_the_reason() {
        let mut pipeline = Pipeline::default();
        pipeline.fix.backup = true;
        pipeline.validate.check_image_integrity = true;
        let skipped = skipped_options(&pipeline);
        let steps: Vec<&str> = skipped.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(steps, ["fix.backup", "validate.check_image_integrity"]);
        assert_eq!(skipped[1].reason, "pipeline.validate.enabled is not true");
        pipeline.fix.enabled = true;
        pipeline.validate.enabled = true;
        assert!(skipped_options(&pipeline).is_empty());
    }

    #[test]
    fn the_boot_check_uses_the_domains_devices_and_memory_within_bounds() {
        let manifest = br#"{"manifest_version": "1.0", "source": {"vm_name": "v"},
            "vm": {"mem_gb": 1, "firmware": "uefi"},
            "disks": [{"id": "d", "source_format": "raw", "local_path": "/x.raw"}]}"#;
        let mut spec = crate::manifest::parse(manifest, "m.json").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let overrides = crate::config::Overrides { config_dir: Some(dir.path().to_owned()), flags: Default::default() };
        let env = std::collections::BTreeMap::<String, String>::new();
        let config = crate::config::Config::load(&overrides, &env).unwrap();
        let xml =
            |spec: &JobSpec| build_domain_xml(&config, spec, &output_paths(&config, spec), Acceleration::Kvm, None);
        let spec_of = |xml: &str| {
            boot_spec(xml, vec!["/s/d.qcow2".into()], "/s/c.log".into(), Duration::from_secs(60), &|| false)
        };
        let boot = spec_of(&xml(&spec)).unwrap();
        assert_eq!(boot.memory_mib, 1024);
        assert_eq!(boot.firmware, guest::Firmware::Uefi);
        spec.hardware.mem_gb = Some(64.0);
        assert_eq!(spec_of(&xml(&spec)).unwrap().memory_mib, BOOT_CHECK_MAX_MIB);
    }

    #[test]
    fn a_fixed_guests_kernels_are_judged_from_the_verification() {
        let mut info = GuestInfo {
            kernels: vec![guest::inspect::Kernel { version: "6.1.0-18-amd64".into(), ..Default::default() }],
            ..GuestInfo::default()
        };
        let repaired = Repair {
            fix: guest::FixReport { log: PathBuf::from("/x"), seconds: 1.0, accel: "tcg".into() },
            mended: Vec::new(),
            verification: guest::Verification {
                ok: true,
                initramfs: vec![guest::verify::InitramfsEvidence {
                    kernel: "6.1.0-18-amd64".into(),
                    virtio: vec!["virtio_blk".into(), "virtio_pci".into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        assert!(!info.kernels[0].boots_on_virtio);
        after_fix(&mut info, &repaired);
        assert!(info.kernels[0].boots_on_virtio);
        assert_eq!(info.kernels[0].initrd_virtio, ["virtio_blk", "virtio_pci"]);
    }

    #[test]
    fn qemu_img_check_tells_a_clean_image_from_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("1M")
            .status()
            .unwrap();
        assert!(made.success());
        let check = qemu_img_check(&image, "v.qcow2", dir.path(), Duration::from_secs(30), &|| false).unwrap();
        assert!(check.ok, "{:?}", check.result);
        // Damage the refcount table's first entry: qemu-img reports it.
        let mut bytes = std::fs::read(&image).unwrap();
        let refcount_offset = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
        bytes[refcount_offset..refcount_offset + 8].copy_from_slice(&0u64.to_be_bytes());
        std::fs::write(&image, &bytes).unwrap();
        let check = qemu_img_check(&image, "v.qcow2", dir.path(), Duration::from_secs(30), &|| false).unwrap();
        assert!(!check.ok, "{:?}", check.result);
    }
}
