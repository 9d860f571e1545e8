//! The life of one job, from a claimed manifest to published results or an `.error`.
//!
//! Owns one claimed job from [`run`] to its [`JobEnd`]: a `Job` value holds what the stages
//! share (the daemon's [`JobContext`], the [`Claim`], the [`JobControl`], the event log, the
//! manifest as read once and the names derived from it), and its methods are the stages, in
//! order: `Job::prepare` → `Job::execute` (`stages.rs`: manifest → source → checksum →
//! inspect → convert → guest → validate (`guest.rs`) → domain → libvirt → publish) →
//! `Job::conclude` (here: record the job done or failed, publish its `.error`, or give it back). Every failure becomes a [`Failure`]
//! whose summary is the `.error` file's first line, worded in `failures.rs`.
//!
//! What it must not do: claim, heartbeat or schedule (the daemon's), parse manifests itself
//! (`ManifestFile` is read once by the daemon and passed in), or publish anything once the
//! claim is no longer this daemon's (every rename is fenced).

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use crate::config::Config;
use crate::convert::{Converter, JobControl};
use crate::host::Identity;
use crate::manifest::{self, JobSpec, ManifestFile};
use crate::names;
use crate::output_layout;
use crate::publish::{self, Staging};
use crate::queue::{Claim, EventLog, JobRecord, JobState, Layout, Outcome};
use crate::report::Report;
use crate::source::SourceRoots;

mod failures;
mod guest;
mod pass;
mod stages;

/// What every job of a daemon shares.
pub struct JobContext {
    /// The daemon's configuration, as loaded at start-up.
    pub config: Arc<Config>,
    /// Who this daemon is (host, boot id, pid, instance): the owner written into each claim's lock.
    pub identity: Identity,
    /// What converts each source disk to qcow2 (the daemon's: native where possible, qemu-img otherwise).
    pub converter: Arc<dyn Converter>,
    /// The resolved SOURCE_ROOTS: where a manifest's disks may be read from.
    pub roots: SourceRoots,
    /// The guest tools behind GUEST_TOOLS_WRAPPER, shared so that KVM is probed once.
    pub guest_tools: Arc<crate::guest::Tools>,
}

/// Where in its life a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Manifest,
    Source,
    Checksum,
    Inspect,
    Convert,
    /// Inspecting and fixing the guest on the staged disks.
    Guest,
    /// Checking the staged outputs: `qemu-img check`, the boot check.
    Validate,
    Libvirt,
    Publish,
    /// A bug in hyper2kvm (a panic) rather than anything about the job's input.
    Internal,
}

impl Stage {
    /// Every stage, in the order a job meets them.
    #[cfg(test)]
    pub(crate) const ALL: [Stage; 10] = [
        Stage::Manifest,
        Stage::Source,
        Stage::Checksum,
        Stage::Inspect,
        Stage::Convert,
        Stage::Guest,
        Stage::Validate,
        Stage::Libvirt,
        Stage::Publish,
        Stage::Internal,
    ];

    /// The name used in logs (`STAGE=`), records and `.error` files.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Stage::Manifest => "manifest",
            Stage::Source => "source",
            Stage::Checksum => "checksum",
            Stage::Inspect => "inspect",
            Stage::Convert => "convert",
            Stage::Guest => "guest",
            Stage::Validate => "validate",
            Stage::Libvirt => "libvirt",
            Stage::Publish => "publish",
            Stage::Internal => "internal",
        }
    }
}

/// A job that cannot complete: a sentence for a person, then the causes.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub stage: Stage,
    pub summary: String,
    pub causes: Vec<String>,
    /// A directory of logs in the staging directory (the guest tools') to keep with the
    /// job's record; the summary and causes name it until it is moved.
    pub logs: Option<PathBuf>,
}

impl Failure {
    fn new(stage: Stage, summary: impl Into<String>) -> Failure {
        Failure { stage, summary: summary.into(), causes: Vec::new(), logs: None }
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
    /// Converted and published; its record (in `done/`).
    Done(JobRecord),
    /// Failed; its record (filed in `failed/`), with the failing stage and the error.
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
pub(crate) fn run(ctx: &JobContext, claim: Claim, manifest: &ManifestFile, control: &JobControl) -> JobEnd {
    let vm_name = manifest.vm_name().to_owned();
    // Only a taken-over job can have been published under its id; a fresh claim's id is new.
    if claim.record().generation > 1 && published_as(ctx, &claim, &vm_name) {
        return record_published(ctx, claim, &vm_name);
    }
    let instance = ctx.identity.instance.as_deref().unwrap_or("");
    let span = tracing::info_span!("job", instance, job_id = %claim.job_id(), vm_name = %vm_name);
    let _entered = span.enter();
    let job = Job::claimed(ctx, claim, manifest, control);
    match job.prepare() {
        Ok(staging) => {
            let outcome = isolated(|| job.execute(&staging));
            let end = job.conclude(Some(&staging), outcome);
            staging.remove();
            end
        }
        Err(stop) => {
            // Without a staging directory in TEMP_DIR the .error is staged in OUTPUT_DIR
            // itself, so the poller still gets its answer.
            let name = output_layout::error_staging_name(job.claim.job_id());
            let fallback = Staging::create_in(&ctx.config.output_dir, &name);
            let end = job.conclude(fallback.as_ref().ok(), Err(stop));
            fallback.map(Staging::remove).unwrap_or_default();
            end
        }
    }
}

/// One claimed job: what its stages share. The staging directory is not part of it but
/// handed to the stages that write into it, since a job can end without one.
struct Job<'a> {
    ctx: &'a JobContext,
    claim: Claim,
    control: &'a JobControl,
    events: EventLog,
    /// The claimed manifest as the daemon read it, once.
    manifest: &'a ManifestFile,
    /// As the manifest names the VM, before it is validated: records are named by it.
    vm_name: String,
    /// Whether `vm_name` can name files in OUTPUT_DIR (and so take an `.error`).
    safe_name: bool,
    started_at: DateTime<Utc>,
}

impl<'a> Job<'a> {
    /// The job as claimed: logged and its first event written.
    fn claimed(ctx: &'a JobContext, claim: Claim, manifest: &'a ManifestFile, control: &'a JobControl) -> Job<'a> {
        let vm_name = manifest.vm_name().to_owned();
        let events = EventLog::new(claim.event_log(), claim.job_id());
        let manifest_name = manifest.name();
        info!(stage = "claim", manifest = %manifest_name, "claimed");
        events.append("claim", &format!("claimed {manifest_name}"), None);
        Job {
            ctx,
            safe_name: names::check_vm_name(&vm_name).is_ok(),
            vm_name,
            claim,
            control,
            events,
            manifest,
            started_at: Utc::now(),
        }
    }
}

impl Job<'_> {
    /// Ends the job on its outcome: recorded done, recorded failed with an `.error` (staged in
    /// `staging`), given back to the queue, or abandoned to the lock's new owner.
    fn conclude(self, staging: Option<&Staging>, outcome: Result<(JobSpec, Report), Stop>) -> JobEnd {
        if matches!(outcome, Ok(_) | Err(Stop::Failed(_))) {
            self.keep_parsed_manifest();
        }
        match outcome {
            Ok((spec, report)) => self.done(&spec, &report),
            Err(Stop::Failed(failure)) => self.fail(staging, failure),
            Err(Stop::Cancelled) => {
                info!(stage = "release", "stopping: the job goes back to the queue");
                if let Err(e) = self.claim.release() {
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

    /// Puts back the bytes the job parsed as its claimed manifest, which `Claim::finish`
    /// archives under `done/` or `failed/`, when the file was changed while the job ran: the
    /// record must say what was converted. Nothing is written in the usual case, where the
    /// file is unchanged.
    fn keep_parsed_manifest(&self) {
        let Some(parsed) = self.manifest.bytes() else { return };
        let path = self.claim.manifest_path();
        if manifest::read_file(&path).is_ok_and(|now| now == parsed) || !self.claim.still_owned() {
            return;
        }
        warn!(stage = "record", "the claimed manifest was changed while the job ran; archiving the bytes the job used");
        if let Err(e) = crate::queue::records::write_atomically(&path, parsed) {
            warn!(error = %e, "could not put back the manifest the job used; the archive holds the changed file");
        }
    }

    fn done(self, spec: &JobSpec, report: &Report) -> JobEnd {
        let boot = self.ctx.config.output_layout().boot_disk(&spec.vm_name);
        info!(stage = "done", seconds = report.seconds, result = %boot.display(), "published");
        self.events.append("done", "published", Some(100.0));
        if self.ctx.config.cleanup_source {
            cleanup_sources(report);
        }
        let mut record = new_record(self.ctx, &self.claim, &spec.vm_name, self.started_at, JobState::Done, "done");
        record.result_file = Some(boot);
        record.source_bytes = report.disks.iter().map(|d| d.source_bytes).collect();
        finish(self.claim, record, JobEnd::Done)
    }

    fn fail(self, staging: Option<&Staging>, mut failure: Failure) -> JobEnd {
        let finished_at = Utc::now();
        self.keep_logs(&mut failure, finished_at);
        warn!(stage = failure.stage.as_str(), causes = ?failure.causes, "failed: {}", failure.summary);
        self.events.append(failure.stage.as_str(), &failure.summary, None);
        // The terminal event, as `done` is for a success: a follower need not know the stages.
        self.events.append("failed", &format!("failed at stage {}", failure.stage.as_str()), None);
        let stage = failure.stage.as_str();
        let mut record = new_record(self.ctx, &self.claim, &self.vm_name, self.started_at, JobState::Failed, stage);
        record.finished_at = Some(finished_at);
        record.error = Some(failure.summary.clone());
        record.causes = failure.causes.clone();
        if self.safe_name {
            let published = match staging {
                Some(staging) => self.publish_error(staging, &failure, &record),
                None => Err(std::io::Error::other("no staging directory could be created for it")),
            };
            match published {
                Ok(Some(path)) => record.result_file = Some(path),
                Ok(None) => return JobEnd::Abandoned,
                // Recorded as failed with no .error, the job would leave its poller waiting for
                // ever: it goes back to the queue instead, and the daemon claims nothing until
                // OUTPUT_DIR can take an answer again.
                Err(e) => return self.requeue(&e),
            }
        } else {
            warn!("vm_name is not a safe file name: the error is recorded under .hyper2kvm/failed only");
        }
        finish(self.claim, record, JobEnd::Failed)
    }

    /// Copies the failure's logs (the guest tools') out of the staging directory, which is
    /// cleared before the `.error` is published, to `<record>.logs/` beside the job's record
    /// in `failed/<date>/`, and points the summary and causes at the copies.
    fn keep_logs(&self, failure: &mut Failure, finished_at: DateTime<Utc>) {
        let Some(logs) = failure.logs.take() else { return };
        if !logs.is_dir() || !self.claim.still_owned() {
            return;
        }
        let layout = Layout::new(&self.ctx.config.watch_dir);
        let record = layout.record_file(Outcome::Failed, finished_at, self.claim.job_id());
        let kept = record.with_extension("logs");
        match copy_logs(&logs, &kept) {
            Ok(()) => {
                let (from, to) = (logs.display().to_string(), kept.display().to_string());
                failure.summary = failure.summary.replace(&from, &to);
                for cause in &mut failure.causes {
                    *cause = cause.replace(&from, &to);
                }
                failure.causes.push(format!("logs: {to}"));
            }
            Err(e) => {
                warn!(error = %e, from = %logs.display(), "could not keep the guest tools' logs with the job's record")
            }
        }
    }

    /// Gives a job whose answer could not be published back to the queue
    /// (`<stem>.requeued-<job>.json`), to be retried when OUTPUT_DIR can take it.
    fn requeue(self, error: &std::io::Error) -> JobEnd {
        warn!(
            stage = "requeue",
            error = %error,
            "could not publish the .error file; the job goes back to the queue and is retried once OUTPUT_DIR can take it"
        );
        self.events.append("requeue", &format!("could not publish the answer ({error}); back to the queue"), None);
        if let Err(e) = self.claim.release() {
            warn!(error = %e, "could not release the claim; it will be retaken when its lease expires");
        }
        JobEnd::Requeued
    }

    /// Publishes the `.error` for `failure` from `staging`; `None` when the lock was lost.
    fn publish_error(
        &self,
        staging: &Staging,
        failure: &Failure,
        record: &JobRecord,
    ) -> std::io::Result<Option<PathBuf>> {
        let config = &self.ctx.config;
        // The same path Claim::finish writes the record to, from the same timestamp.
        let finished_at = record.finished_at.unwrap_or_else(Utc::now);
        let record_path = Layout::new(&config.watch_dir).record_file(Outcome::Failed, finished_at, self.claim.job_id());
        let text = failures::error_text(&self.ctx.identity, self.claim.job_id(), failure, &record_path);
        // Partial outputs go first: a poller that sees the .error may check that nothing is left.
        if let Err(e) = staging.clear() {
            warn!(error = %e, "could not clear the staging directory before publishing the .error");
        }
        staging.write_new("error", text.as_bytes())?;
        if self.fence().is_err() {
            return Ok(None);
        }
        let path = staging.publish("error", &config.output_dir, &output_layout::error_file(&self.vm_name))?;
        publish::fsync_dir(&config.output_dir)?;
        Ok(Some(path))
    }
}

/// Records as done a job whose earlier owner published every result but died before it could
/// record them (between the boot disk's rename and `finish`; see [`published_by_this_job`]),
/// rather than converting it a second time.
pub(crate) fn record_published(ctx: &JobContext, claim: Claim, vm_name: &str) -> JobEnd {
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
    let boot = ctx.config.output_layout().boot_disk(vm_name);
    let mut record = new_record(ctx, &claim, vm_name, Utc::now(), JobState::Done, "done");
    record.result_file = Some(boot);
    finish(claim, record, JobEnd::Done)
}

/// The VM name, when `V.json` in OUTPUT_DIR names this job and `V.qcow2` (published after
/// it, last of all) is there.
pub(crate) fn published_by_this_job(ctx: &JobContext, claim: &Claim) -> Option<String> {
    let manifest = ManifestFile::read(&claim.manifest_path(), &claim.record().manifest_name);
    published_as(ctx, claim, manifest.vm_name()).then(|| manifest.vm_name().to_owned())
}

/// Whether `V.json` in OUTPUT_DIR names this job and `V.qcow2` is there, for `vm_name`.
fn published_as(ctx: &JobContext, claim: &Claim, vm_name: &str) -> bool {
    if names::check_vm_name(vm_name).is_err() {
        return false;
    }
    let layout = ctx.config.output_layout();
    let names_this_job = || -> Option<bool> {
        let report: serde_json::Value =
            serde_json::from_slice(&publish::read_small(&layout.report(vm_name)).ok()?).ok()?;
        Some(report.get("job_id")?.as_str()? == claim.job_id())
    };
    names_this_job() == Some(true) && std::fs::symlink_metadata(layout.boot_disk(vm_name)).is_ok_and(|m| m.is_file())
}

/// Runs a job's work so that a panic — a bug, whatever the input — fails this job with an
/// `.error` instead of unwinding out of the job's thread: that would leave the claim to be
/// retaken after every lease, and the same manifest would hit the same bug for ever.
fn isolated<T>(work: impl FnOnce() -> Result<T, Stop>) -> Result<T, Stop> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = crate::convert::native::pipeline::panic_message(panic.as_ref());
        Err(Stop::Failed(failures::internal(&message)))
    })
}

/// The job's record as of now, with no result, error or sizes yet.
fn new_record(
    ctx: &JobContext,
    claim: &Claim,
    vm_name: &str,
    started_at: DateTime<Utc>,
    state: JobState,
    stage: &str,
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
        result_file: None,
        error: None,
        causes: Vec::new(),
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

/// Largest log file kept with a failed job's record: a tool's log is a few hundred KiB.
const MAX_KEPT_LOG: u64 = 16 << 20;

/// Copies the text files of `from` (logs, the tools' input XML, console captures), not the
/// guest's files copied out for inspection (`boot/`) nor disk backups, to `to`, keeping the
/// tree.
fn copy_logs(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let kind = entry.file_type()?;
        if kind.is_dir() && name != "boot" && name != "backup" {
            copy_logs(&entry.path(), &to.join(&name))?;
        } else if kind.is_file() {
            let text = std::path::Path::new(&name)
                .extension()
                .is_some_and(|e| ["log", "xml", "json", "txt", "out"].iter().any(|t| e == *t));
            if text && entry.metadata()?.len() <= MAX_KEPT_LOG {
                std::fs::copy(entry.path(), to.join(&name))?;
            }
        }
    }
    Ok(())
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
    fn every_stage_has_its_own_failure_counter() {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, crate::metrics::FAILURE_STAGES, "a failure at a stage not counted is counted as internal");
    }

    #[test]
    fn work_that_does_not_panic_keeps_its_outcome() {
        assert!(matches!(isolated(|| Ok::<_, Stop>(5)), Ok(5)));
        assert!(matches!(isolated(|| Err::<(), _>(Stop::Cancelled)), Err(Stop::Cancelled)));
    }
}
