//! The daemon's one way out, and the signals that ask for it.
//!
//! Whatever ends the main loop — the shutdown future (SIGTERM, SIGINT or SIGHUP under
//! `hyper2kvm daemon`, a test's own future in-process) or an error the loop cannot go on from
//! — ends here, in this order: the cause is logged; claiming stops; running jobs may finish
//! for DRAIN_SECONDS (none after an error), then are cancelled and release their own claims;
//! a job still running [`CANCEL_GRACE`] later (a read stuck in the kernel on a hung NFS
//! server ignores cancellation) has its claim released by the daemon, within
//! [`RELEASE_LIMIT`], and its thread is left to the caller's
//! `Runtime::shutdown_timeout(`[`RUNTIME_GRACE`]`)`.
//!
//! Nothing here may wait without a bound: under systemd the unit stays "stopping" (and the
//! producer's claims stay taken) for as long as it does.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use super::{watchdog_tick, Daemon, DaemonError};
use crate::queue::LockRecord;
use crate::service;

/// After running jobs were cancelled, how long they may take to stop and release their own
/// claims (a cancelled conversion stops at its next read; a release is a few renames on NFS).
pub const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// How long the daemon's own release of the claims of jobs that did not stop may take; what
/// is not released by then waits out its lease.
pub const RELEASE_LIMIT: Duration = Duration::from_secs(10);

/// How long the caller's `Runtime::shutdown_timeout` waits for blocking threads: those of jobs
/// that ignored cancellation, whose claims are already released.
pub const RUNTIME_GRACE: Duration = Duration::from_secs(1);

/// How often, while stopping, systemd is asked for more time (EXTEND_TIMEOUT_USEC), and how
/// much each time.
const EXTEND_EVERY: Duration = Duration::from_secs(5);
const EXTEND_BY: Duration = Duration::from_secs(15);

/// Why the main loop ended.
pub(super) enum Exit {
    /// The shutdown future completed.
    Asked,
    /// An error the loop cannot go on from.
    Fatal(DaemonError),
}

/// The shutdown future of `hyper2kvm daemon`: the first SIGTERM, SIGINT or SIGHUP. SIGHUP
/// stops like SIGTERM (docs/OPERATIONS.md): the configuration is read at start only, and its
/// default action would kill the daemon with claims and staging left. Installed at once, so a
/// signal that comes while the daemon starts is not lost; must be called inside the runtime.
pub fn signals() -> Result<impl Future<Output = ()>, DaemonError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: stopping"),
            _ = sigint.recv() => info!("SIGINT: stopping"),
            _ = sighup.recv() => {
                info!("SIGHUP: stopping as on SIGTERM (the configuration is read at start only; restart to apply a change)");
            }
        }
    })
}

impl Daemon {
    /// Stops the daemon whatever ended its loop; returns the error that did, if one did.
    pub(super) async fn shut_down(
        &mut self,
        exit: Exit,
        watchdog: &mut Option<tokio::time::Interval>,
    ) -> Result<(), DaemonError> {
        self.health.stopping();
        // The cause first: what follows may take long, and under systemd may be cut short.
        let (drain_limit, result) = match exit {
            Exit::Asked => (self.ctx.config.drain_timeout, Ok(())),
            Exit::Fatal(e) => {
                error!("stopping: {e}");
                (Duration::ZERO, Err(e))
            }
        };
        self.drain(drain_limit, watchdog).await;
        self.release_stuck().await;
        info!("stopped");
        result
    }

    /// Lets running jobs finish within `limit`, then cancels them and waits [`CANCEL_GRACE`]
    /// for them to stop and release their claims. Asks systemd for time meanwhile, and keeps
    /// feeding the watchdog: systemd ignores it once it sent SIGTERM, but not when the stop
    /// began otherwise, and a drain can outlast WatchdogSec many times over.
    async fn drain(&mut self, limit: Duration, watchdog: &mut Option<tokio::time::Interval>) {
        if self.running.is_empty() {
            info!("stopping: no job is running");
            service::stopping(Duration::from_secs(5), "stopping");
            return;
        }
        if limit.is_zero() {
            info!(running = self.running.len(), "stopping: releasing running jobs to the queue");
        } else {
            info!(running = self.running.len(), limit_seconds = limit.as_secs_f64(), "stopping: draining running jobs");
        }
        let deadline = tokio::time::Instant::now() + limit;
        let give_up = deadline + CANCEL_GRACE;
        let mut extend = tokio::time::interval(EXTEND_EVERY);
        let mut cancelled = false;
        while !self.running.is_empty() {
            tokio::select! {
                Some(joined) = self.running.join_next() => {
                    self.record_end(joined);
                    self.metrics.set_queue(self.running.len(), self.counters.waiting);
                }
                _ = extend.tick() => {
                    let doing = if cancelled { "releasing" } else { "draining" };
                    service::stopping(EXTEND_BY, &format!("{doing}: {}", self.status_line()));
                }
                _ = watchdog_tick(watchdog) => service::watchdog(),
                _ = tokio::time::sleep_until(deadline), if !cancelled => {
                    if !limit.is_zero() {
                        warn!(running = self.running.len(), "drain limit reached: releasing unfinished jobs to the queue");
                    }
                    for job in self.jobs.values() {
                        job.control.cancel();
                    }
                    cancelled = true;
                }
                _ = tokio::time::sleep_until(give_up) => break,
            }
        }
    }

    /// Releases the claims of jobs that did not stop within [`CANCEL_GRACE`] of being
    /// cancelled, so that they are retaken at once rather than after a lease. Their
    /// supervisors are stopped first, so no heartbeat touches a lock being given back; their
    /// threads go on until the runtime is shut down, and whatever such a thread tries after
    /// that finds no claim: it cannot publish.
    async fn release_stuck(&mut self) {
        // A job that ended in the last moment is recorded, not released again.
        while let Some(joined) = self.running.try_join_next() {
            self.record_end(joined);
        }
        if self.running.is_empty() {
            return;
        }
        self.running.abort_all();
        let stuck: Vec<LockRecord> = self.jobs.drain().map(|(_, job)| job.record).collect();
        let shown: Vec<&str> = stuck.iter().take(10).map(|record| record.job_id.as_str()).collect();
        warn!(
            jobs = stuck.len(),
            job_ids = ?shown,
            "{} job(s) did not stop within {} s of being cancelled (a read stuck in the kernel, such as on a hung NFS server); releasing their claims and leaving them behind",
            stuck.len(),
            CANCEL_GRACE.as_secs()
        );
        let queue = self.queue.clone();
        let layout = self.ctx.config.output_layout();
        let release = tokio::task::spawn_blocking(move || {
            for record in stuck {
                let (job_id, generation) = (record.job_id.clone(), record.generation);
                match queue.adopt(record).release() {
                    Ok(()) => info!(job_id = %job_id, "released the claim of a job that did not stop"),
                    Err(e) => {
                        warn!(job_id = %job_id, error = %e, "could not release the claim; it will be retaken when its lease expires")
                    }
                }
                // This generation's only: a daemon that took the job over stages its own.
                remove_own_staging(&layout, &job_id, generation);
            }
        });
        if tokio::time::timeout(RELEASE_LIMIT, release).await.is_err() {
            warn!(
                "releasing took longer than {} s; the claims not released yet will be retaken when their leases expire",
                RELEASE_LIMIT.as_secs()
            );
        }
    }
}

/// Removes the staging directory of one generation of a job, as [`super::remove_staging`] does
/// for all: never through a symlink planted at TEMP_DIR.
fn remove_own_staging(layout: &crate::output_layout::OutputLayout, job_id: &str, generation: u64) {
    if crate::publish::own_dir(layout.temp_dir()).is_ok() {
        let _ = std::fs::remove_dir_all(layout.staging(job_id, generation));
    }
}
