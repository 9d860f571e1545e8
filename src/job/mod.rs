//! The life of one job, from a claimed manifest to published results or an `.error`.
//!
//! Stages: `manifest` (validate) → `source` (confine to SOURCE_ROOTS) → `checksum` →
//! `inspect` (format, size, referenced files, also confined) → `convert` (into a private
//! staging directory) → `domain` (XML and report) → `libvirt` (with LIBVIRT_INTEGRATION: the
//! disks placed in the pool, the domain defined) → `publish` (fenced renames, the boot disk
//! last). Every failure becomes a [`Failure`] whose summary is the `.error` file's first line.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tracing::{info, warn};

use crate::checksum;
use crate::config::{Config, DEFAULT_COMPRESS_LEVEL};
use crate::convert::{Compression, ConversionRequest, ConvertError, Converter, ImageInfo, JobControl};
use crate::host::Identity;
use crate::image::vmdk;
use crate::image::{ova, ImageError};
use crate::libvirt::domain_xml::{self, Acceleration, DomainDisk, NetworkAttachment};
use crate::libvirt::pool::{DefaultPool, DiskFile, DISK_MODE};
use crate::libvirt::register::{self, Registration, Request};
use crate::libvirt::{Connection, LibvirtError};
use crate::manifest::{self, DiskSpec, DiskType, JobSpec, ManifestFile, SourceFormat};
use crate::names;
use crate::publish::{self, Staging};
use crate::queue::{Claim, EventLog, JobRecord, JobState, Layout, Outcome};
use crate::report::{DiskReport, Report};
use crate::source::SourceRoots;

use failures::{convert_failure, reference_failure, source_failure};

mod failures;

/// What every job of a daemon shares.
pub struct JobContext {
    pub config: Arc<Config>,
    pub identity: Identity,
    pub converter: Arc<dyn Converter>,
    pub roots: SourceRoots,
}

/// Where in its life a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Manifest,
    Source,
    Checksum,
    Inspect,
    Convert,
    Domain,
    Libvirt,
    Publish,
    /// A bug in hyper2kvm (a panic) rather than anything about the job's input.
    Internal,
}

impl Stage {
    /// The name used in logs (`STAGE=`), records and `.error` files.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Manifest => "manifest",
            Stage::Source => "source",
            Stage::Checksum => "checksum",
            Stage::Inspect => "inspect",
            Stage::Convert => "convert",
            Stage::Domain => "domain",
            Stage::Libvirt => "libvirt",
            Stage::Publish => "publish",
            Stage::Internal => "internal",
        }
    }
}

/// A job that cannot complete: a sentence for a person, then the causes.
#[derive(Debug, Clone)]
pub struct Failure {
    pub stage: Stage,
    pub summary: String,
    pub causes: Vec<String>,
}

impl Failure {
    fn new(stage: Stage, summary: impl Into<String>) -> Failure {
        Failure { stage, summary: summary.into(), causes: Vec::new() }
    }

    fn because(mut self, cause: impl ToString) -> Failure {
        self.causes.push(cause.to_string());
        self
    }
}

/// Why a job stopped short of an outcome.
enum Stop {
    Failed(Failure),
    /// The daemon is stopping: give the job back to the queue.
    Cancelled,
    /// Another daemon owns the job now: publish nothing.
    LostLock,
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Stop {
        Stop::Failed(f)
    }
}

/// How a job ended, for the daemon's counters and logs.
#[derive(Debug)]
pub enum JobEnd {
    Done(JobRecord),
    Failed(JobRecord),
    /// Given back to the queue untouched (shutdown).
    Released,
    /// Given back to the queue because its answer (results or `.error`) could not be
    /// published: OUTPUT_DIR is full, read-only or gone. It is retried once it can take one.
    Requeued,
    /// The lock was lost; nothing was published.
    Abandoned,
}

/// Runs a claimed job to its end. Never panics on bad input; every error is an outcome.
/// `manifest` is the claimed manifest as read once ([`ManifestFile::read`]): the job parses,
/// names and archives those bytes, whatever happens to the file meanwhile.
pub fn run(ctx: &JobContext, claim: Claim, manifest: &ManifestFile, control: &JobControl) -> JobEnd {
    let vm_name = manifest.vm_name().to_owned();
    // Only a taken-over job can have been published under its id; a fresh claim's id is new.
    if claim.record().generation > 1 && published_as(ctx, &claim, &vm_name) {
        return record_published(ctx, claim, &vm_name);
    }
    let started_at = Utc::now();
    let manifest_name = manifest.name();
    let safe_name = names::check_vm_name(&vm_name).is_ok();
    let events = EventLog::new(claim.event_log(), claim.job_id());
    let instance = ctx.identity.instance.as_deref().unwrap_or("");
    let span = tracing::info_span!("job", instance, job_id = %claim.job_id(), vm_name = %vm_name);
    let _entered = span.enter();
    info!(stage = "claim", manifest = %manifest_name, "claimed");
    events.append("claim", &format!("claimed {manifest_name}"), None);
    let ending = Ending { ctx, manifest, vm_name: &vm_name, safe_name, started_at, events: &events };

    let staging = match prepare(ctx, &claim, safe_name.then_some(&vm_name)) {
        Ok(staging) => staging,
        Err(stop) => {
            // Without a staging directory in TEMP_DIR the .error is staged in OUTPUT_DIR
            // itself, so the poller still gets its answer.
            let fallback = Staging::create_in(&ctx.config.output_dir, &format!(".hyper2kvm-error-{}", claim.job_id()));
            let end = ending.conclude(claim, fallback.as_ref().ok(), Err(stop));
            fallback.map(Staging::remove).unwrap_or_default();
            return end;
        }
    };
    let outcome = isolated(|| execute(ctx, &claim, manifest, &staging, control, &events));
    let end = ending.conclude(claim, Some(&staging), outcome);
    staging.remove();
    end
}

/// Moves an earlier job's results for this VM aside, so that they cannot answer this job's
/// poller whatever happens next, and creates the job's staging directory.
fn prepare(ctx: &JobContext, claim: &Claim, safe_vm_name: Option<&String>) -> Result<Staging, Stop> {
    if let Some(vm_name) = safe_vm_name {
        move_aside_stale(ctx, claim, vm_name, &[])?;
    }
    Staging::create(&ctx.config.temp_dir, &staging_name(claim))
        .map_err(|e| failures::staging_failure(&ctx.config.temp_dir, e))
}

/// What the end of a job needs besides its claim and outcome.
struct Ending<'a> {
    ctx: &'a JobContext,
    manifest: &'a ManifestFile,
    vm_name: &'a str,
    safe_name: bool,
    started_at: chrono::DateTime<Utc>,
    events: &'a EventLog,
}

impl Ending<'_> {
    fn conclude(&self, claim: Claim, staging: Option<&Staging>, outcome: Result<(JobSpec, Report), Stop>) -> JobEnd {
        let Ending { ctx, manifest, vm_name, safe_name, started_at, events } = *self;
        if matches!(outcome, Ok(_) | Err(Stop::Failed(_))) {
            keep_parsed_manifest(&claim, manifest);
        }
        match outcome {
            Ok((spec, report)) => done(ctx, claim, &spec, &report, started_at, events),
            Err(Stop::Failed(failure)) => fail(ctx, claim, staging, vm_name, safe_name, failure, started_at, events),
            Err(Stop::Cancelled) => {
                info!(stage = "release", "stopping: the job goes back to the queue");
                if let Err(e) = claim.release() {
                    warn!(error = %e, "could not release the claim; it will be retaken when its lease expires");
                }
                JobEnd::Released
            }
            Err(Stop::LostLock) => {
                warn!(
                    stage = "publish",
                    "the lock was taken over by another daemon; abandoning the job without publishing"
                );
                JobEnd::Abandoned
            }
        }
    }
}

/// Records as done a job whose earlier owner published every result but died before it could
/// record them (between the boot disk's rename and `finish`; see [`published_by_this_job`]),
/// rather than converting it a second time.
pub fn record_published(ctx: &JobContext, claim: Claim, vm_name: &str) -> JobEnd {
    if !claim.still_owned() {
        return JobEnd::Abandoned;
    }
    info!(
        job_id = %claim.job_id(),
        vm_name = %vm_name,
        stage = "done",
        "an earlier owner published this job's results but did not record them; recording the job as done"
    );
    let events = EventLog::new(claim.event_log(), claim.job_id());
    events.append("done", "published by an earlier owner of the job; recorded as done", Some(100.0));
    let boot = ctx.config.output_dir.join(names::boot_disk_file(vm_name));
    let record = record(ctx, &claim, vm_name, JobState::Done, Utc::now(), "done", Some(boot), None);
    finish(claim, record, JobEnd::Done)
}

/// The VM name, when `V.json` in OUTPUT_DIR names this job and `V.qcow2` (published after
/// it, last of all) is there.
pub fn published_by_this_job(ctx: &JobContext, claim: &Claim) -> Option<String> {
    let manifest = ManifestFile::read(&claim.manifest_path(), &claim.record().manifest_name);
    published_as(ctx, claim, manifest.vm_name()).then(|| manifest.vm_name().to_owned())
}

/// Whether `V.json` in OUTPUT_DIR names this job and `V.qcow2` is there, for `vm_name`.
fn published_as(ctx: &JobContext, claim: &Claim, vm_name: &str) -> bool {
    if names::check_vm_name(vm_name).is_err() {
        return false;
    }
    let out = &ctx.config.output_dir;
    let names_this_job = || -> Option<bool> {
        let report: serde_json::Value =
            serde_json::from_slice(&publish::read_small(&out.join(names::report_file(vm_name))).ok()?).ok()?;
        Some(report.get("job_id")?.as_str()? == claim.job_id())
    };
    names_this_job() == Some(true)
        && std::fs::symlink_metadata(out.join(names::boot_disk_file(vm_name))).is_ok_and(|m| m.is_file())
}

/// Puts back the bytes the job parsed as its claimed manifest, which `Claim::finish` archives
/// under `done/` or `failed/`, when the file was changed while the job ran: the record must say
/// what was converted. Nothing is written in the usual case, where the file is unchanged.
fn keep_parsed_manifest(claim: &Claim, manifest: &ManifestFile) {
    let Some(parsed) = manifest.bytes() else { return };
    let path = claim.manifest_path();
    if manifest::read_file(&path).is_ok_and(|now| now == parsed) || !claim.still_owned() {
        return;
    }
    warn!(stage = "record", "the claimed manifest was changed while the job ran; archiving the bytes the job used");
    if let Err(e) = crate::queue::records::write_atomically(&path, parsed) {
        warn!(error = %e, "could not put back the manifest the job used; the archive holds the changed file");
    }
}

/// Runs a job's work so that a panic — a bug, whatever the input — fails this job with an
/// `.error` instead of unwinding out of the job's thread: that would leave the claim to be
/// retaken after every lease, and the same manifest would hit the same bug for ever.
fn isolated<T>(work: impl FnOnce() -> Result<T, Stop>) -> Result<T, Stop> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = crate::engine::pipeline::panic_message(panic.as_ref());
        Err(Stop::Failed(failures::internal(&message)))
    })
}

/// Each generation of a job stages apart, so a new owner never meets the files of a frozen
/// old one.
fn staging_name(claim: &Claim) -> String {
    format!("{}.g{}", claim.job_id(), claim.record().generation)
}

fn execute(
    ctx: &JobContext,
    claim: &Claim,
    manifest: &ManifestFile,
    staging: &Staging,
    control: &JobControl,
    events: &EventLog,
) -> Result<(JobSpec, Report), Stop> {
    let started_at = Utc::now();
    let clock = Instant::now();
    let (spec, mut warnings) = manifest.parse().map_err(|e| Failure::new(Stage::Manifest, e.to_string()))?;
    for warning in &warnings {
        warn!(stage = Stage::Manifest.as_str(), "{warning}");
        events.append(Stage::Manifest.as_str(), warning, None);
    }
    let spec = expand_ova_disks(ctx, spec, control, events)?;
    let disk_ids: Vec<&str> = spec.disks.iter().map(|d| d.id.as_str()).collect();
    move_aside_stale(ctx, claim, &spec.vm_name, &disk_ids)?;

    let sources = prepare_sources(ctx, &spec, control, events, &mut warnings)?;

    let compression = compression_for(&ctx.config, &spec, &mut warnings, ctx.converter.as_ref());
    let mut disks = Vec::with_capacity(sources.len());
    for (index, source) in sources.iter().enumerate() {
        events.append(Stage::Convert.as_str(), &format!("converting {}", source.disk.id), control.progress.percent());
        // Per disk, so that the daemon's byte counters add up the whole job.
        control.progress.start_disk(source.info.virtual_size);
        let convert = || convert_disk(ctx, &spec, index, source, staging, compression, control);
        disks.push(crate::events::with_progress_events(events, control, &source.disk.id, convert)?);
    }

    let registration =
        if ctx.config.libvirt_integration { Some(register_domain(ctx, claim, &spec, staging, events)?) } else { None };
    let xml = match &registration {
        Some(registration) => registration.xml.clone(),
        None => build_domain_xml(&ctx.config, &spec, &output_paths(&ctx.config, &spec), Acceleration::Kvm),
    };
    let mut report = new_report(ctx, claim, &spec, disks, warnings, registration.as_ref());
    report.started_at = started_at;
    report.seconds = clock.elapsed().as_secs_f64();
    events.append(Stage::Publish.as_str(), "publishing", Some(100.0));
    publish_results(ctx, claim, &spec, &xml, &report, staging)?;
    if let Some(warning) = registration.as_ref().and_then(Registration::after_publish) {
        warn!(stage = Stage::Libvirt.as_str(), "{warning}");
    }
    Ok((spec, report))
}

/// The job's report, finished now; the caller sets when it started and its duration.
fn new_report(
    ctx: &JobContext,
    claim: &Claim,
    spec: &JobSpec,
    disks: Vec<DiskReport>,
    mut warnings: Vec<String>,
    registration: Option<&Registration>,
) -> Report {
    if let Some(registration) = registration {
        warnings.extend(registration.warnings.iter().cloned());
    }
    let now = Utc::now();
    Report {
        job_id: claim.job_id().to_owned(),
        vm_name: spec.vm_name.clone(),
        instance: ctx.identity.instance.clone(),
        host: ctx.identity.host.clone(),
        converter: ctx.converter.name(),
        started_at: now,
        finished_at: now,
        seconds: 0.0,
        disks,
        domain_name: names::domain_name(&spec.vm_name),
        domain_uuid: domain_xml::domain_uuid(spec),
        domain_disks: registration.map_or_else(|| output_paths(&ctx.config, spec), |r| r.disk_paths.clone()),
        libvirt_uri: registration.map(|r| r.uri.clone()),
        libvirt_pool: registration.map(|r| r.pool.clone()),
        libvirt_pool_created: registration.is_some_and(|r| r.pool_created),
        domain_xml: names::domain_xml_file(&spec.vm_name),
        warnings,
    }
}

/// The `libvirt` stage: places the disks in LIBVIRT_POOL and defines the domain. On failure
/// the converted disks are kept in OUTPUT_DIR/.hyper2kvm-unregistered/<job>/ and the failure
/// says so.
fn register_domain(
    ctx: &JobContext,
    claim: &Claim,
    spec: &JobSpec,
    staging: &Staging,
    events: &EventLog,
) -> Result<Registration, Stop> {
    let config = &ctx.config;
    let (domain_name, uuid) = (names::domain_name(&spec.vm_name), domain_xml::domain_uuid(spec));
    events.append(Stage::Libvirt.as_str(), &format!("registering domain {domain_name}"), Some(100.0));
    fence(claim)?;
    let disks = staged_disks(spec, staging);
    let tag = staging_name(claim);
    let default_pool = DefaultPool::virt_install();
    let request = Request {
        domain_name: &domain_name,
        uuid: &uuid,
        pool: &config.libvirt_pool,
        default_pool: &default_pool,
        output_dir: &config.output_dir,
        autostart: config.libvirt_autostart,
        tag: &tag,
        disks: &disks,
    };
    let registered = Connection::open(&config.libvirt_uri).and_then(|conn| {
        register::register(&conn, &request, |paths, accel| build_domain_xml(config, spec, paths, accel))
    });
    let registration = registered.map_err(|e| keep_unregistered(ctx, claim, spec, staging, &disks, &e))?;
    info!(
        stage = Stage::Libvirt.as_str(),
        domain = %registration.name,
        uuid = %registration.uuid,
        uri = %registration.uri,
        autostart = registration.autostart,
        redefined = registration.redefined,
        pool = %registration.pool,
        pool_created = registration.pool_created,
        "registered domain"
    );
    for warning in &registration.warnings {
        warn!(stage = Stage::Libvirt.as_str(), "{warning}");
    }
    Ok(registration)
}

/// The staged disks with their final names, boot disk first.
fn staged_disks(spec: &JobSpec, staging: &Staging) -> Vec<DiskFile> {
    (0..spec.disks.len())
        .map(|i| DiskFile { staged: staging.path(&staged_disk(&spec.disks[i])), name: output_name(spec, i) })
        .collect()
}

/// A registration failed: the converted disks (and a `V.xml` for them in OUTPUT_DIR) are
/// moved where no poller looks, and the failure names that place.
fn keep_unregistered(
    ctx: &JobContext,
    claim: &Claim,
    spec: &JobSpec,
    staging: &Staging,
    disks: &[DiskFile],
    error: &LibvirtError,
) -> Stop {
    if !claim.still_owned() {
        return Stop::LostLock;
    }
    let dir = ctx.config.output_dir.join(publish::UNREGISTERED_DIR).join(claim.job_id());
    let xml = build_domain_xml(&ctx.config, spec, &output_paths(&ctx.config, spec), Acceleration::Kvm);
    let kept = publish::keep(&dir, disks.iter().map(|d| (d.staged.as_path(), d.name.as_str())))
        .and_then(|()| staging.write_new("unregistered.xml", xml.as_bytes()))
        .and_then(|_| staging.publish("unregistered.xml", &dir, &names::domain_xml_file(&spec.vm_name)));
    let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    Stop::Failed(failures::unregistered(error, &kept.map(|_| ()), &names, &dir))
}

/// Replaces each `source_format: "ova"` disk by the archive's disks (the first in its place,
/// so an OVA that is the boot disk gives `V.qcow2`; the others `V-<ovf disk id>.qcow2`), after
/// confining the OVA, verifying its checksum and its `.mf`. OVF hardware fills whatever the
/// manifest's `vm` block and `nics` leave out. A `local_path` that is an OVF descriptor (an
/// unpacked export) is replaced by its disk files instead ([`open_verified_ovf`]).
fn expand_ova_disks(
    ctx: &JobContext,
    mut spec: JobSpec,
    control: &JobControl,
    events: &EventLog,
) -> Result<JobSpec, Stop> {
    if !spec.disks.iter().any(|d| d.source_format == SourceFormat::Ova) {
        return Ok(spec);
    }
    let mut disks = Vec::new();
    for disk in std::mem::take(&mut spec.disks) {
        if disk.source_format != SourceFormat::Ova {
            disks.push(disk);
            continue;
        }
        let path = ctx.roots.confine(&disk.local_path).map_err(|e| source_failure(&disk, &e))?;
        if let Some(expected) = disk.sha256 {
            events.append(Stage::Checksum.as_str(), &format!("verifying {}", disk.id), None);
            verify_checksum(ctx, &disk, &path, &expected, control)?;
        }
        if ova::unpacked::is_ovf_descriptor(&path) {
            let package = open_verified_ovf(ctx, &disk, &path)?;
            fill_hardware(&mut spec, &package.hardware);
            disks.extend(package.disks.into_iter().enumerate().map(|(index, file)| DiskSpec {
                id: file.disk_id,
                source_format: file.source_format,
                local_path: file.path,
                bytes: None,
                sha256: None,
                boot_order_hint: disk.boot_order_hint,
                label: Some(file.ovf_disk_id),
                disk_type: if index == 0 { disk.disk_type } else { DiskType::Data },
                ova_disk: None,
            }));
            continue;
        }
        let package = open_verified_ova(&disk, &path)?;
        fill_hardware(&mut spec, &package.hardware);
        for (index, member) in package.disks.iter().enumerate() {
            disks.push(DiskSpec {
                id: member.disk_id.clone(),
                source_format: SourceFormat::Ova,
                local_path: disk.local_path.clone(),
                bytes: None,
                sha256: None,
                boot_order_hint: disk.boot_order_hint,
                label: Some(member.ovf_disk_id.clone()),
                disk_type: if index == 0 { disk.disk_type } else { DiskType::Data },
                ova_disk: Some(index),
            });
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(clash) = disks.iter().find(|d| !seen.insert(d.id.clone())) {
        return Err(failures::ova_disk_id_clash(&clash.id).into());
    }
    for disk in &disks {
        manifest::check_result_name(&spec.vm_name, &disk.id)
            .map_err(|e| Failure::new(Stage::Manifest, e.to_string()))?;
    }
    spec.disks = disks;
    Ok(spec)
}

fn open_verified_ova(disk: &DiskSpec, path: &Path) -> Result<ova::OvaPackage, Stop> {
    let package = ova::open(path, &ova::Limits::default()).map_err(|e| failures::ova_unreadable(disk, path, &e))?;
    if package.manifest.is_some() {
        ova::verify_manifest(&package).map_err(|e| failures::ova_manifest_mismatch(path, &e))?;
    }
    if package.disks.is_empty() {
        return Err(failures::ova_without_disks(path).into());
    }
    Ok(package)
}

/// An unpacked OVF export (`local_path` is its `.ovf`): every file it reads besides the
/// descriptor — the `.mf`, the disks, what the `.mf` lists — confined to SOURCE_ROOTS before
/// it is opened, the `.mf` verified. A refused file fails the job as any refused extent does.
fn open_verified_ovf(ctx: &JobContext, disk: &DiskSpec, path: &Path) -> Result<ova::unpacked::UnpackedOvf, Stop> {
    let refused = std::cell::RefCell::new(None);
    let confine = |file: &Path| {
        ctx.roots.confine(file).map_err(|e| {
            let message = ImageError::Corrupt(e.to_string());
            refused.replace(Some((file.to_owned(), e)));
            message
        })
    };
    let failure = |stage: Stage, e: ImageError| -> Stop {
        if let Some((_, e)) = refused.take() {
            return reference_failure(stage, disk, &e).into();
        }
        match stage {
            Stage::Checksum => failures::ovf_manifest_mismatch(path, &e).into(),
            _ => failures::ovf_unreadable(stage, disk, path, &e).into(),
        }
    };
    let limits = ova::Limits::default();
    let package = ova::unpacked::open(path, &limits, &confine).map_err(|e| failure(Stage::Inspect, e))?;
    if package.manifest.is_some() {
        ova::unpacked::verify_manifest(&package, &confine).map_err(|e| failure(Stage::Checksum, e))?;
    }
    if package.disks.is_empty() {
        return Err(failures::ovf_without_disks(path).into());
    }
    Ok(package)
}

fn fill_hardware(spec: &mut JobSpec, hardware: &ova::OvfHardware) {
    let ovf = hardware.to_manifest_hardware();
    let hw = &mut spec.hardware;
    hw.cpu = hw.cpu.or(ovf.cpu);
    hw.mem_gb = hw.mem_gb.or(ovf.mem_gb);
    hw.firmware = hw.firmware.or(ovf.firmware);
    hw.secureboot = hw.secureboot || ovf.secureboot;
    hw.os_hint = hw.os_hint.take().or(ovf.os_hint);
    hw.os_version = hw.os_version.take().or(ovf.os_version);
    if spec.nics.is_empty() {
        spec.nics = hardware.to_nics();
    }
}

fn inspect_ova_disk(path: &Path, index: usize) -> Result<ImageInfo, ConvertError> {
    let info = crate::engine::inspect_ova_disk(path, index).map_err(crate::engine::pipeline::image_error)?;
    // The members are read in place: nothing outside the OVA, already confined, is opened.
    Ok(ImageInfo { format: "vmdk".into(), referenced_files: Vec::new(), ..info.into() })
}

/// A disk whose source passed every check.
struct PreparedSource<'a> {
    disk: &'a DiskSpec,
    path: PathBuf,
    info: ImageInfo,
    verified: bool,
}

/// Confines, verifies and inspects every disk before any conversion starts, so that a bad
/// disk fails the job in seconds rather than after the others were converted.
fn prepare_sources<'a>(
    ctx: &JobContext,
    spec: &'a JobSpec,
    control: &JobControl,
    events: &EventLog,
    warnings: &mut Vec<String>,
) -> Result<Vec<PreparedSource<'a>>, Stop> {
    let mut prepared = Vec::with_capacity(spec.disks.len());
    for disk in &spec.disks {
        let path = ctx.roots.confine(&disk.local_path).map_err(|e| source_failure(disk, &e))?;
        if let (Some(expected), Ok(meta)) = (disk.bytes, std::fs::metadata(&path)) {
            if expected != meta.len() {
                warnings.push(format!("disk {}: manifest says {expected} bytes, the file has {}", disk.id, meta.len()));
            }
        }
        let verified = match disk.sha256 {
            Some(expected) => {
                events.append(Stage::Checksum.as_str(), &format!("verifying {}", disk.id), None);
                verify_checksum(ctx, disk, &path, &expected, control)?;
                true
            }
            None => false,
        };
        let info = match disk.ova_disk {
            Some(index) => inspect_ova_disk(&path, index),
            None => ctx.converter.inspect(&path, disk.source_format, &ctx.roots, control),
        }
        .map_err(|e| convert_failure(Stage::Inspect, disk, &path, e))?;
        for referenced in &info.referenced_files {
            ctx.roots.confine(referenced).map_err(|e| reference_failure(Stage::Inspect, disk, &e))?;
        }
        if !ctx.converter.reads_natively(disk.source_format) {
            check_structure(disk, &path, &info.referenced_files)?;
        }
        prepared.push(PreparedSource { disk, path, info, verified });
    }
    Ok(prepared)
}

/// qemu-img reads grains past the end of a truncated sparse extent as zeros and succeeds, so
/// every sparse extent involved (the disk, its extents, its parents) is checked first.
fn check_structure(disk: &DiskSpec, path: &Path, referenced: &[PathBuf]) -> Result<(), Stop> {
    for file in std::iter::once(path).chain(referenced.iter().map(PathBuf::as_path)) {
        if !vmdk::is_sparse_extent(file) {
            continue;
        }
        if let Err(e) = vmdk::check_sparse_file(file) {
            let detail = if file == path { e.to_string() } else { format!("{}: {e}", file.display()) };
            return Err(convert_failure(Stage::Inspect, disk, path, ConvertError::Corrupt(detail)));
        }
    }
    Ok(())
}

/// Hashes the source through its confinement: a name swapped since it was confined cannot have
/// an outside file's digest shown in the `.error`.
fn verify_checksum(
    ctx: &JobContext,
    disk: &DiskSpec,
    path: &Path,
    expected: &[u8; 32],
    control: &JobControl,
) -> Result<(), Stop> {
    let file = ctx.roots.open(path).map_err(|e| source_failure(disk, &e))?.file;
    let actual = checksum::sha256_of(file, control).map_err(|e| convert_failure(Stage::Checksum, disk, path, e))?;
    if &actual != expected {
        return Err(failures::checksum_mismatch(disk, expected, &actual).into());
    }
    Ok(())
}

fn compression_for(
    config: &Config,
    spec: &JobSpec,
    warnings: &mut Vec<String>,
    converter: &dyn Converter,
) -> Option<Compression> {
    let wanted = spec.compress.unwrap_or(config.convert_options.compress);
    let level = spec.compress_level.unwrap_or(config.compress_level);
    let by_qemu_img: Vec<&str> =
        spec.disks.iter().filter(|d| !converter.reads_natively(d.source_format)).map(|d| d.id.as_str()).collect();
    if wanted && level != DEFAULT_COMPRESS_LEVEL && !by_qemu_img.is_empty() {
        warnings.push(format!(
            "compress level {level} is not honoured for {} (converted by qemu-img, which uses its own default)",
            by_qemu_img.join(", ")
        ));
    }
    wanted.then_some(Compression { kind: config.convert_options.compression_type, level })
}

fn convert_disk(
    ctx: &JobContext,
    spec: &JobSpec,
    index: usize,
    source: &PreparedSource<'_>,
    staging: &Staging,
    compression: Option<Compression>,
    control: &JobControl,
) -> Result<DiskReport, Stop> {
    let disk = source.disk;
    let clock = Instant::now();
    let staged = staging.path(&staged_disk(disk));
    let request = ConversionRequest {
        source: &source.path,
        format: disk.source_format,
        destination: &staged,
        compression,
        ova_disk: disk.ova_disk,
        inspected_files: Some(&source.info.referenced_files),
        roots: &ctx.roots,
    };
    info!(stage = "convert", disk = %disk.id, source = %source.path.display(), "converting");
    ctx.converter.convert(&request, control).map_err(|e| convert_failure(Stage::Convert, disk, &source.path, e))?;
    let io_failure = |e: std::io::Error| convert_failure(Stage::Convert, disk, &source.path, ConvertError::Io(e));
    // libvirt's qemu user must read the disk wherever it is published or placed; the daemon's
    // umask must not decide that.
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(DISK_MODE)).map_err(io_failure)?;
    publish::fsync_file(&staged).map_err(io_failure)?;
    let digest =
        checksum::sha256_file(&staged, control).map_err(|e| convert_failure(Stage::Convert, disk, &source.path, e))?;
    let output_bytes = std::fs::metadata(&staged).map_err(io_failure)?.len();
    control.progress.add_output_bytes(output_bytes);
    Ok(DiskReport {
        id: disk.id.clone(),
        boot: index == 0,
        source_path: source.path.clone(),
        source_format: disk.source_format,
        detected_format: source.info.format.clone(),
        subformat: source.info.subformat.clone(),
        virtual_size: source.info.virtual_size,
        allocated_bytes: source.info.allocated_bytes,
        chain: source.info.chain.clone(),
        ddb: source.info.ddb.clone(),
        source_bytes: std::fs::metadata(&source.path).map(|m| m.len()).unwrap_or(0),
        output: output_name(spec, index),
        output_format: "qcow2",
        output_bytes,
        sha256: checksum::format_sha256(&digest),
        source_checksum_verified: source.verified,
        seconds: clock.elapsed().as_secs_f64(),
    })
}

/// `V.qcow2` for the boot disk (index 0), `V-<id>.qcow2` for the others.
fn output_name(spec: &JobSpec, index: usize) -> String {
    if index == 0 {
        names::boot_disk_file(&spec.vm_name)
    } else {
        names::data_disk_file(&spec.vm_name, &spec.disks[index].id)
    }
}

/// A disk's file name in the staging directory.
fn staged_disk(disk: &DiskSpec) -> String {
    format!("{}.qcow2", disk.id)
}

/// The published disks in OUTPUT_DIR, boot disk first.
fn output_paths(config: &Config, spec: &JobSpec) -> Vec<PathBuf> {
    (0..spec.disks.len()).map(|i| config.output_dir.join(output_name(spec, i))).collect()
}

/// The domain XML for a VM whose disks are at `paths` (boot disk first).
fn build_domain_xml(config: &Config, spec: &JobSpec, paths: &[PathBuf], accel: Acceleration) -> String {
    let bus = domain_xml::disk_bus_for(&spec.hardware);
    let disks: Vec<DomainDisk> = paths.iter().map(|path| DomainDisk { path: path.clone(), target_bus: bus }).collect();
    let attach = match &config.libvirt_network {
        Some(network) => NetworkAttachment::Network(network.clone()),
        None => NetworkAttachment::Bridge(config.libvirt_bridge.clone()),
    };
    domain_xml::domain_xml_with(spec, &disks, &attach, accel)
}

/// Publishes data disks, `V.xml`, `V.json`, then the boot disk last. The lock is re-checked
/// before each rename: a daemon that lost its job must not publish.
fn publish_results(
    ctx: &JobContext,
    claim: &Claim,
    spec: &JobSpec,
    xml: &str,
    report: &Report,
    staging: &Staging,
) -> Result<(), Stop> {
    let out = &ctx.config.output_dir;
    let failure = |e: std::io::Error| failures::publish_failure(out, e);
    let report_json = serde_json::to_vec_pretty(report).map_err(|e| failure(std::io::Error::other(e)))?;
    staging.write_new("domain.xml", xml.as_bytes()).map_err(failure)?;
    staging.write_new("report.json", &report_json).map_err(failure)?;
    let mut renames: Vec<(String, String)> = spec
        .disks
        .iter()
        .enumerate()
        .skip(1)
        .map(|(index, disk)| (staged_disk(disk), output_name(spec, index)))
        .collect();
    renames.push(("domain.xml".to_owned(), names::domain_xml_file(&spec.vm_name)));
    renames.push(("report.json".to_owned(), names::report_file(&spec.vm_name)));
    for (staged, name) in &renames {
        // Each rename fenced on its own: on a hard NFS mount any one of them may stall past
        // the lease, and the job's new owner may be publishing by then.
        fence(claim)?;
        staging.publish(staged, out, name).map_err(failure)?;
    }
    publish::fsync_dir(out).map_err(failure)?;
    fence(claim)?;
    staging.publish(&staged_disk(spec.boot_disk()), out, &output_name(spec, 0)).map_err(failure)?;
    publish::fsync_dir(out).map_err(failure)?;
    Ok(())
}

fn fence(claim: &Claim) -> Result<(), Stop> {
    if claim.still_owned() {
        Ok(())
    } else {
        Err(Stop::LostLock)
    }
}

/// Moves the results of an earlier job for this VM (including this job's own disk names) out
/// of the poller's sight. Fenced before each move: a daemon frozen since its claim must not
/// move aside what the job's new owner has published meanwhile. `disk_ids` are the job's disks,
/// boot disk first (none before the manifest is parsed).
///
/// A result name of another VM (VM `web`'s disk `disk-1` and VM `web-disk-1` share
/// `web-disk-1.qcow2`) is never reused: the job is refused (docs/DECISIONS.md). Such a file is
/// left in place, unless it is this job's own `V.qcow2`, which HyperSDK checks before
/// `V.error` and would take for this job's success: that one is moved aside too.
fn move_aside_stale(ctx: &JobContext, claim: &Claim, vm_name: &str, disk_ids: &[&str]) -> Result<(), Stop> {
    let boot = names::boot_disk_file(vm_name);
    let mut stale =
        vec![boot.clone(), names::error_file(vm_name), names::report_file(vm_name), names::domain_xml_file(vm_name)];
    stale.extend(disk_ids.iter().map(|id| names::data_disk_file(vm_name, id)));
    let out = &ctx.config.output_dir;
    let taken = taken_name(ctx, claim, vm_name, disk_ids);
    let failure = |e| failures::move_aside_failure(vm_name, out, e);
    let mut moved = 0;
    // Only files that are there: each move costs a fence (a lock round trip on NFS).
    let movable = stale.iter().filter(|name| **name == boot || taken.as_ref().is_none_or(|t| t.name != **name));
    for name in movable.filter(|name| std::fs::symlink_metadata(out.join(name)).is_ok()) {
        fence(claim)?;
        moved += usize::from(publish::move_aside(out, name, claim.job_id()).map_err(failure)?.is_some());
    }
    if moved > 0 {
        info!(stage = "claim", moved, "moved earlier results aside");
    }
    match taken {
        Some(taken) => Err(Stop::Failed(taken.refusal(out, claim, vm_name))),
        None => Ok(()),
    }
}

/// A result name of this job that is another VM's.
struct TakenName {
    name: String,
    other_vm: String,
    /// Found in an older live claim's manifest rather than in a published report.
    live: bool,
}

/// The first name this job would publish (`V.qcow2`, `V-<id>.qcow2` of each data disk) that
/// another VM's published report lists or, failing that, that an older claim of another VM —
/// a job converting now, which has not published its report yet — will publish.
fn taken_name(ctx: &JobContext, claim: &Claim, vm_name: &str, disk_ids: &[&str]) -> Option<TakenName> {
    let publishes: Vec<String> = std::iter::once(names::boot_disk_file(vm_name))
        .chain(disk_ids.iter().skip(1).map(|id| names::data_disk_file(vm_name, id)))
        .collect();
    let out = &ctx.config.output_dir;
    let published = publishes.iter().find_map(|name| {
        let other_vm = names::other_vms_result(out, name, vm_name)?;
        Some(TakenName { name: name.clone(), other_vm, live: false })
    });
    published.or_else(|| older_claim_publishing(ctx, claim, vm_name, &publishes))
}

/// An older claim (by job id, which every daemon orders alike, so that of two colliding jobs
/// exactly one is refused) of another VM that will publish one of `publishes`. OVA disks are
/// known only once a job expands them, so only the manifest's own disks are compared.
fn older_claim_publishing(ctx: &JobContext, claim: &Claim, vm_name: &str, publishes: &[String]) -> Option<TakenName> {
    let claimed = Layout::new(&ctx.config.watch_dir).claimed_dir();
    std::fs::read_dir(claimed).ok()?.flatten().find_map(|entry| {
        let file_name = entry.file_name();
        let job_id = file_name.to_str()?.strip_suffix(".json")?;
        if !crate::queue::lock::is_job_id(job_id) || job_id >= claim.job_id() {
            return None;
        }
        let spec = manifest::parse(&publish::read_small(&entry.path()).ok()?, "claimed.json").ok()?;
        if spec.vm_name == vm_name {
            return None;
        }
        let name = (0..spec.disks.len()).map(|i| output_name(&spec, i)).find(|n| publishes.contains(n))?;
        Some(TakenName { name, other_vm: spec.vm_name, live: true })
    })
}

impl TakenName {
    /// The refusal of the job: the `.error`'s first line names the file and the other VM.
    fn refusal(&self, out: &Path, claim: &Claim, vm_name: &str) -> Failure {
        let TakenName { name, other_vm, live } = self;
        let aside = out.join(publish::SUPERSEDED_DIR).join(claim.job_id()).join(name);
        let moved = std::fs::symlink_metadata(&aside).is_ok();
        failures::taken_name(name, vm_name, other_vm, *live, moved.then_some(aside.as_path()))
    }
}

fn done(
    ctx: &JobContext,
    claim: Claim,
    spec: &JobSpec,
    report: &Report,
    started_at: chrono::DateTime<Utc>,
    events: &EventLog,
) -> JobEnd {
    let boot = ctx.config.output_dir.join(names::boot_disk_file(&spec.vm_name));
    info!(stage = "done", seconds = report.seconds, result = %boot.display(), "published");
    events.append("done", "published", Some(100.0));
    if ctx.config.cleanup_source {
        cleanup_sources(report);
    }
    let mut record = record(ctx, &claim, &spec.vm_name, JobState::Done, started_at, "done", Some(boot), None);
    record.source_bytes = report.disks.iter().map(|d| d.source_bytes).collect();
    finish(claim, record, JobEnd::Done)
}

#[allow(clippy::too_many_arguments)]
fn fail(
    ctx: &JobContext,
    claim: Claim,
    staging: Option<&Staging>,
    vm_name: &str,
    safe_name: bool,
    failure: Failure,
    started_at: chrono::DateTime<Utc>,
    events: &EventLog,
) -> JobEnd {
    warn!(stage = failure.stage.as_str(), causes = ?failure.causes, "failed: {}", failure.summary);
    events.append(failure.stage.as_str(), &failure.summary, None);
    // The terminal event, as `done` is for a success: a follower need not know the stages.
    events.append("failed", &format!("failed at stage {}", failure.stage.as_str()), None);
    let mut record =
        record(ctx, &claim, vm_name, JobState::Failed, started_at, failure.stage.as_str(), None, Some(&failure));
    if safe_name {
        let published = match staging {
            Some(staging) => publish_error(ctx, &claim, staging, vm_name, &failure, &record),
            None => Err(std::io::Error::other("no staging directory could be created for it")),
        };
        match published {
            Ok(Some(path)) => record.result_file = Some(path),
            Ok(None) => return JobEnd::Abandoned,
            // Recorded as failed with no .error, the job would leave its poller waiting for
            // ever: it goes back to the queue instead, and the daemon claims nothing until
            // OUTPUT_DIR can take an answer again.
            Err(e) => return requeue(claim, events, &e),
        }
    } else {
        warn!("vm_name is not a safe file name: the error is recorded under .hyper2kvm/failed only");
    }
    finish(claim, record, JobEnd::Failed)
}

/// Gives a job whose answer could not be published back to the queue
/// (`<stem>.requeued-<job>.json`), to be retried when OUTPUT_DIR can take it.
fn requeue(claim: Claim, events: &EventLog, error: &std::io::Error) -> JobEnd {
    warn!(
        stage = "requeue",
        error = %error,
        "could not publish the .error file; the job goes back to the queue and is retried once OUTPUT_DIR can take it"
    );
    events.append("requeue", &format!("could not publish the answer ({error}); back to the queue"), None);
    if let Err(e) = claim.release() {
        warn!(error = %e, "could not release the claim; it will be retaken when its lease expires");
    }
    JobEnd::Requeued
}

fn publish_error(
    ctx: &JobContext,
    claim: &Claim,
    staging: &Staging,
    vm_name: &str,
    failure: &Failure,
    record: &JobRecord,
) -> std::io::Result<Option<PathBuf>> {
    // The same path Claim::finish writes the record to, from the same timestamp.
    let finished_at = record.finished_at.unwrap_or_else(Utc::now);
    let record_path = Layout::new(&ctx.config.watch_dir).record_file(Outcome::Failed, finished_at, claim.job_id());
    let text = failures::error_text(&ctx.identity, claim.job_id(), failure, &record_path);
    // Partial outputs go first: a poller that sees the .error may check that nothing is left.
    if let Err(e) = staging.clear() {
        warn!(error = %e, "could not clear the staging directory before publishing the .error");
    }
    staging.write_new("error", text.as_bytes())?;
    if fence(claim).is_err() {
        return Ok(None);
    }
    let path = staging.publish("error", &ctx.config.output_dir, &names::error_file(vm_name))?;
    publish::fsync_dir(&ctx.config.output_dir)?;
    Ok(Some(path))
}

#[allow(clippy::too_many_arguments)]
fn record(
    ctx: &JobContext,
    claim: &Claim,
    vm_name: &str,
    state: JobState,
    started_at: chrono::DateTime<Utc>,
    stage: &str,
    result_file: Option<PathBuf>,
    failure: Option<&Failure>,
) -> JobRecord {
    JobRecord {
        job_id: claim.job_id().to_owned(),
        vm_name: vm_name.to_owned(),
        host: ctx.identity.host.clone(),
        instance: ctx.identity.instance.clone(),
        generation: claim.record().generation,
        state,
        started_at,
        finished_at: Some(Utc::now()),
        manifest_name: claim.record().manifest_name.clone(),
        stage: stage.to_owned(),
        result_file,
        error: failure.map(|f| f.summary.clone()),
        causes: failure.map(|f| f.causes.clone()).unwrap_or_default(),
        source_bytes: Vec::new(),
    }
}

fn finish(claim: Claim, record: JobRecord, wrap: fn(JobRecord) -> JobEnd) -> JobEnd {
    // Recording moves the claimed manifest and removes the lock: only the owner may do that.
    // A daemon that lost the job (it was frozen, say, and its staging was cleaned up under it)
    // must not record a failure over the new owner's work.
    if !claim.still_owned() {
        warn!(stage = "record", "the lock was taken over by another daemon; abandoning the job without recording it");
        return JobEnd::Abandoned;
    }
    if let Err(e) = claim.finish(&record) {
        warn!(error = %e, "could not record the job's end under .hyper2kvm");
    }
    wrap(record)
}

/// CLEANUP_SOURCE: after a verified success, delete the source disk files.
fn cleanup_sources(report: &Report) {
    for disk in &report.disks {
        if let Err(e) = std::fs::remove_file(&disk.source_path) {
            warn!(path = %disk.source_path.display(), error = %e, "CLEANUP_SOURCE: could not remove the source");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_job_fails_it_at_stage_internal() {
        let out: Result<(), Stop> = isolated(|| panic!("boom at cluster 7"));
        let Err(Stop::Failed(failure)) = out else { panic!("a panic must become a failure") };
        assert_eq!(failure.stage, Stage::Internal);
        assert!(failure.summary.starts_with("hyper2kvm hit an internal error"), "{}", failure.summary);
        assert_eq!(failure.causes, ["panic: boom at cluster 7"]);
    }

    #[test]
    fn work_that_does_not_panic_keeps_its_outcome() {
        assert!(matches!(isolated(|| Ok::<_, Stop>(5)), Ok(5)));
        assert!(matches!(isolated(|| Err::<(), _>(Stop::Cancelled)), Err(Stop::Cancelled)));
    }
}
