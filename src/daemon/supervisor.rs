//! One running job's supervisor: the job on a blocking thread and, beside it, the heartbeat
//! that keeps its claim and the sampling of its progress for the metrics.
//!
//! It owns nothing of the daemon: it reports how the job ended, and never decides when a job
//! stops — the main loop and the shutdown path do that through the job's [`JobControl`]. When
//! its task is aborted (a job that ignored cancellation, at shutdown), the heartbeat stops with
//! it and the job's thread is left to the runtime's bounded shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::JobWork;
use crate::convert::JobControl;
use crate::job::{JobContext, JobEnd};
use crate::manifest::ManifestFile;
use crate::metrics::{ByteSampler, Metrics};
use crate::queue::{Beat, Claim};

/// How often a running job's progress is looked at: it advances the byte counters of the
/// metrics, and with VERBOSE_PROGRESS a line is logged when it crossed another
/// [`PROGRESS_STEP`].
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Percent between two progress lines.
const PROGRESS_STEP: f64 = 5.0;

/// Watches over one claimed job until it ends.
pub(super) struct JobSupervisor {
    pub(super) job_id: String,
    pub(super) ctx: Arc<JobContext>,
    pub(super) claim: Claim,
    /// The claimed manifest, read once: the job parses, names and archives these bytes.
    pub(super) manifest: ManifestFile,
    pub(super) control: JobControl,
    pub(super) metrics: Arc<Metrics>,
    /// What runs on the blocking thread: [`crate::job::run`], or a test's stand-in.
    pub(super) work: JobWork,
}

impl JobSupervisor {
    /// Runs the job to its end, beating its heartbeat every third of the lease; returns the
    /// job id and how the job ended.
    pub(super) async fn run(self) -> (String, JobEnd) {
        let JobSupervisor { job_id, ctx, claim, manifest, control, metrics, work } = self;
        let heartbeat_every = ctx.config.lease / 3;
        let heartbeat = claim.heartbeat();
        let verbose = ctx.config.verbose_progress;
        let job_control = control.clone();
        let started = Instant::now();
        let mut work = tokio::task::spawn_blocking(move || work(&ctx, claim, &manifest, &job_control));
        let mut beat = tokio::time::interval(heartbeat_every);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        let mut reported = 0u32;
        let mut sampler = ByteSampler::default();
        let mut lost = false;
        loop {
            tokio::select! {
                end = &mut work => {
                    let end = end.unwrap_or_else(|e| {
                        error!(error = %e, "the job's thread failed; its claim stays until its lease expires");
                        JobEnd::Abandoned
                    });
                    sampler.sample(&control.progress, &metrics);
                    metrics.job_ended((&end).into(), started.elapsed(), control.progress.output_bytes());
                    metrics.migration_ended(&end, started.elapsed());
                    return (job_id, end);
                }
                _ = beat.tick() => {
                    let beat = heartbeat.clone();
                    match tokio::task::spawn_blocking(move || beat.beat()).await {
                        // Ending: the job removed its own lock on the way out; nothing was lost.
                        Ok(Beat::Alive | Beat::Ending) => {}
                        Ok(Beat::Lost) => {
                            if !lost {
                                lost = true;
                                metrics.lock_lost();
                            }
                            warn!(stage = "heartbeat", "the lock is gone: another daemon took the job over; abandoning it");
                            control.abandon();
                        }
                        Ok(Beat::Unknown) | Err(_) => metrics.heartbeat_error(),
                    }
                }
                _ = progress.tick() => {
                    sampler.sample(&control.progress, &metrics);
                    if verbose {
                        report_progress(&control, &mut reported);
                    }
                }
            }
        }
    }
}

/// Logs progress every [`PROGRESS_STEP`] percent when VERBOSE_PROGRESS is on.
fn report_progress(control: &JobControl, reported: &mut u32) {
    if let Some(percent) = control.progress.percent() {
        let step = (percent / PROGRESS_STEP).floor() as u32;
        if step > *reported {
            *reported = step;
            info!(stage = "convert", percent = format!("{percent:.0}"), "converting: {percent:.0}%");
        }
    }
}
