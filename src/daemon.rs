//! The daemon's main loop: scan the queue (always by polling, faster with inotify), claim
//! manifests while a slot is free, run each job on a blocking thread with a heartbeat beside
//! it, and on SIGTERM stop claiming, drain, then release what is left.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::Config;
use crate::convert::JobControl;
use crate::engine::Auto;
use crate::host::Identity;
use crate::job::{self, JobContext, JobEnd};
use crate::libvirt;
use crate::metrics::{self, ByteSampler, Health, Metrics, MetricsError, QueueOperation};
use crate::publish;
use crate::queue::{self, Beat, Claim, Layout, Outcome, Queue, Scanner};
use crate::service;
use crate::source::SourceRoots;

/// How often retention is applied while running.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How often a running job's progress is looked at: it advances the byte counters of the
/// metrics, and with VERBOSE_PROGRESS a line is logged when it crossed another
/// [`PROGRESS_STEP`].
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Percent between two progress lines.
const PROGRESS_STEP: f64 = 5.0;

/// How long, beyond two POLL_INTERVALs, the main loop may go without a round before
/// `/healthz` calls it stalled: a scan of a large queue on a slow NFS server may take a while.
const STALL_GRACE: Duration = Duration::from_secs(60);

/// Why the daemon cannot start.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cannot create {what} {path}: {source}; {}", directory_hint(.source))]
    Directory { what: &'static str, path: String, source: std::io::Error },
    #[error("TEMP_DIR {temp} is not on the same filesystem as OUTPUT_DIR {output}; results could not be published atomically, so set TEMP_DIR to a directory on the output filesystem")]
    TempOnOtherFilesystem { temp: String, output: String },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot scan WATCH_DIR {path}: {source}")]
    Scan { path: String, source: std::io::Error },
    /// METRICS_ADDR cannot be served.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// What to do about a directory the daemon cannot create. Under the packaged units the usual
/// causes are the sandbox (read-only outside ReadWritePaths=) and the hyper2kvm user's rights.
fn directory_hint(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EROFS) => {
            "it is read-only for this daemon: under systemd, add it to ReadWritePaths= in a drop-in \
             (systemctl edit hyper2kvm@INSTANCE, see docs/OPERATIONS.md)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "give the user the daemon runs as (hyper2kvm under systemd) write access to its parent, or create it \
             owned by that user"
        }
        _ => "create it or fix its permissions",
    }
}

/// Counters behind the STATUS line.
#[derive(Debug, Default)]
struct Counters {
    done: u64,
    failed: u64,
    waiting: usize,
    last: Option<String>,
}

/// A running daemon's state.
struct Daemon {
    ctx: Arc<JobContext>,
    queue: Queue,
    scanner: Scanner,
    running: JoinSet<(String, JobEnd)>,
    controls: HashMap<String, JobControl>,
    counters: Counters,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(2 * config.poll_interval + STALL_GRACE));
    // Bound first: a taken address is a configuration error, told before anything is touched.
    let server = match config.metrics_addr {
        Some(addr) => {
            let server = metrics::Server::start(addr, metrics.clone(), health.clone())?;
            info!(address = %addr, "serving Prometheus metrics on /metrics and health on /healthz");
            Some(server)
        }
        None => None,
    };
    prepare_directories(&config)?;
    if config.libvirt_integration {
        probe_libvirt(config.libvirt_uri.clone());
    }
    let identity = Identity::current(config.instance.clone());
    let layout = Layout::new(&config.watch_dir);
    let ctx = Arc::new(JobContext {
        roots: SourceRoots::for_daemon(&config),
        converter: Arc::new(Auto::default()),
        identity,
        config: config.clone(),
    });
    let queue = Queue::new(layout.clone());
    recover_orphans(&ctx, &queue);
    prune(&config, &layout);
    let mut daemon = Daemon {
        scanner: Scanner::new(&config.watch_dir, config.settle, config.invalid_manifest_grace),
        ctx,
        queue,
        running: JoinSet::new(),
        controls: HashMap::new(),
        counters: Counters::default(),
        metrics,
        health,
    };
    let served = daemon.serve().await;
    if let Some(server) = server {
        server.stop();
    }
    served
}

fn prepare_directories(config: &Config) -> Result<(), DaemonError> {
    let create = |what: &'static str, path: &std::path::Path| {
        std::fs::create_dir_all(path).map_err(|source| DaemonError::Directory {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    create("WATCH_DIR", &config.watch_dir)?;
    create("OUTPUT_DIR", &config.output_dir)?;
    create("TEMP_DIR", &config.temp_dir)?;
    let layout = Layout::new(&config.watch_dir);
    layout.ensure().map_err(|source| DaemonError::Directory {
        what: "the queue state directory",
        path: layout.state_dir().display().to_string(),
        source,
    })?;
    match publish::check_same_filesystem(&config.temp_dir, &config.output_dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(DaemonError::TempOnOtherFilesystem {
            temp: config.temp_dir.display().to_string(),
            output: config.output_dir.display().to_string(),
        }),
        Err(source) => {
            Err(DaemonError::Directory { what: "TEMP_DIR", path: config.temp_dir.display().to_string(), source })
        }
    }
}

/// Says at start-up whether libvirt is there, so a missing libvirtd shows before the first job
/// fails on it. On a thread of its own: a remote URI may take long to answer, and neither
/// start-up nor shutdown should wait for it.
fn probe_libvirt(uri: String) {
    let probe = move || match libvirt::probe(&uri) {
        Ok(version) => info!(uri = %uri, version = %version, "libvirt is reachable; converted VMs will be registered"),
        Err(e) => warn!(uri = %uri, "{}; jobs will fail at stage libvirt until it is", e.with_libvirt_message()),
    };
    if let Err(e) = std::thread::Builder::new().name("libvirt-probe".into()).spawn(probe) {
        warn!(error = %e, "could not start the libvirt probe");
    }
}

/// Releases claims left by an earlier incarnation of this daemon on this host (a crash or a
/// kill -9), so they are retaken now instead of after a lease.
fn recover_orphans(ctx: &JobContext, queue: &Queue) {
    for (_, record) in queue.locks() {
        let owner = &record.owner;
        let ours = owner.host == ctx.identity.host;
        let previous_life =
            owner.boot_id != ctx.identity.boot_id || owner.pid == ctx.identity.pid || !process_alive(owner.pid);
        if ours && previous_life {
            let job_id = record.job_id.clone();
            info!(job_id = %job_id, pid = owner.pid, "releasing a claim left by an earlier run of this daemon");
            remove_staging(&ctx.config.temp_dir, &job_id);
            // A job that got as far as publishing everything is recorded, not redone.
            let claim = queue.adopt(record);
            if let Some(vm_name) = job::published_by_this_job(ctx, &claim) {
                job::record_published(ctx, claim, &vm_name);
                continue;
            }
            if let Err(e) = claim.release() {
                warn!(job_id = %job_id, error = %e, "could not release an orphaned claim");
            }
        }
    }
}

/// Removes every generation's staging directory of a job.
fn remove_staging(temp_dir: &std::path::Path, job_id: &str) {
    let prefix = format!("{job_id}.g");
    let Ok(entries) = std::fs::read_dir(temp_dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether `pid` is a live hyper2kvm process in this PID namespace.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim().starts_with("hyper2kvm"))
}

/// The next WATCHDOG=1 is due; never, when systemd asked for no watchdog.
async fn watchdog_tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn prune(config: &Config, layout: &Layout) {
    let today = Utc::now().date_naive();
    for (outcome, days) in [(Outcome::Done, config.retention_days), (Outcome::Failed, config.failed_retention_days)] {
        match queue::records::prune(layout, outcome, days, today) {
            Ok(0) => {}
            Ok(n) => info!(removed = n, ?outcome, "pruned old job records"),
            Err(e) => warn!(error = %e, ?outcome, "could not prune old job records"),
        }
    }
}

impl Daemon {
    async fn serve(&mut self) -> Result<(), DaemonError> {
        let config = self.ctx.config.clone();
        let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
        let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
        let _watcher = config.use_inotify.then(|| watch_events(&config.watch_dir, wake_tx)).flatten();
        let mut watchdog = service::watchdog_interval().map(tokio::time::interval);
        let mut prune_timer = tokio::time::interval(PRUNE_EVERY);
        info!(
            instance = config.instance.as_deref().unwrap_or(""),
            watch_dir = %config.watch_dir.display(),
            output_dir = %config.output_dir.display(),
            max_concurrent = config.max_concurrent,
            "hyper2kvm daemon started"
        );
        debug!(
            poll_interval = ?config.poll_interval,
            settle = ?config.settle,
            lease = ?config.lease,
            conversion_timeout = ?config.conversion_timeout,
            temp_dir = %config.temp_dir.display(),
            source_roots = ?config.source_roots,
            inotify = config.use_inotify,
            "configuration"
        );
        let mut next = self.scan_and_claim()?;
        self.went_round();
        let mut status = self.status_line();
        service::ready(&status);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                Some(()) = wake_rx.recv() => debug!("woken by a local file event"),
                Some(joined) = self.running.join_next(), if !self.running.is_empty() => self.record_end(joined),
                _ = watchdog_tick(&mut watchdog) => service::watchdog(),
                _ = prune_timer.tick() => prune(&config, &self.queue.layout),
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
            next = self.scan_and_claim()?;
            self.went_round();
            // Only changes: the loop goes round every POLL_INTERVAL and on every wake-up.
            let line = self.status_line();
            if line != status {
                service::status(&line);
                status = line;
            }
        }
        self.health.stopping();
        self.drain(&mut watchdog).await;
        Ok(())
    }

    /// The main loop went round: `/healthz` hears of it and the queue gauges are brought up to
    /// date.
    fn went_round(&self) {
        self.health.alive();
        self.metrics.set_queue(self.running.len(), self.counters.waiting);
    }

    /// Scans once and claims as many ready manifests as there are free slots. Returns how
    /// long to wait before the next scan.
    fn scan_and_claim(&mut self) -> Result<Duration, DaemonError> {
        let config = self.ctx.config.clone();
        let scan = match self.scanner.scan() {
            Ok(scan) => scan,
            Err(source) if queue::fs::is_transient(&source) => {
                self.metrics.queue_error(QueueOperation::Scan);
                warn!(error = %source, "WATCH_DIR could not be read; retrying at the next poll");
                return Ok(config.poll_interval);
            }
            Err(source) => return Err(DaemonError::Scan { path: config.watch_dir.display().to_string(), source }),
        };
        self.counters.waiting = scan.waiting;
        // Stale jobs first: they are older, and their producers are already waiting.
        self.take_over_stale();
        for candidate in scan.ready {
            if self.running.len() >= config.max_concurrent {
                break;
            }
            self.scanner.forget(&candidate.name);
            match self.queue.claim(&candidate, &self.ctx.identity) {
                Ok(Some(claim)) => self.start(claim, false),
                Ok(None) => debug!(manifest = %candidate.name, "another daemon took the manifest first"),
                Err(e) => {
                    self.metrics.queue_error(QueueOperation::Claim);
                    warn!(manifest = %candidate.name, error = %e, "could not claim; will retry");
                }
            }
        }
        let next = scan.next_check.map_or(config.poll_interval, |d| d.min(config.poll_interval));
        Ok(next.max(Duration::from_millis(20)))
    }

    /// Takes over jobs whose owner stopped heartbeating (crashed, frozen, cut off), while a
    /// slot is free.
    fn take_over_stale(&mut self) {
        let lease = self.ctx.config.lease;
        if self.running.len() >= self.ctx.config.max_concurrent {
            return;
        }
        let stale = match self.queue.stale(lease) {
            Ok(stale) => stale,
            Err(e) => {
                self.metrics.queue_error(QueueOperation::StaleCheck);
                warn!(error = %e, "could not look for stale claims; will retry");
                return;
            }
        };
        for job in stale {
            if self.running.len() >= self.ctx.config.max_concurrent {
                break;
            }
            match self.queue.take_over(&job, &self.ctx.identity, lease) {
                Ok(Some(claim)) => {
                    info!(job_id = %job.job_id, age_seconds = job.age.as_secs_f64(), generation = claim.record().generation, "took over a stale job");
                    remove_staging(&self.ctx.config.temp_dir, &job.job_id);
                    self.start(claim, true);
                }
                Ok(None) => debug!(job_id = %job.job_id, "another daemon took the stale job, or its owner is alive"),
                Err(e) => {
                    self.metrics.queue_error(QueueOperation::Takeover);
                    warn!(job_id = %job.job_id, error = %e, "could not take over a stale job");
                }
            }
        }
    }

    /// Runs a claimed job (`taken_over`: a stale claim of another daemon) on a blocking
    /// thread, with its heartbeat and progress sampling beside it.
    fn start(&mut self, claim: Claim, taken_over: bool) {
        self.metrics.job_started(taken_over);
        let job_id = claim.job_id().to_owned();
        let control = JobControl::new(self.ctx.config.conversion_timeout);
        self.controls.insert(job_id.clone(), control.clone());
        let ctx = self.ctx.clone();
        let heartbeat_every = ctx.config.lease / 3;
        let heartbeat = claim.heartbeat();
        let verbose = ctx.config.verbose_progress;
        // The same fields as job::run's span, so the journal's JOB_ID/VM_NAME filters find
        // the heartbeat and progress lines too.
        let manifest = std::fs::read(claim.manifest_path()).unwrap_or_default();
        let vm_name = crate::manifest::vm_name_hint(&manifest, &claim.record().manifest_name);
        let span = tracing::info_span!(
            "job",
            instance = ctx.identity.instance.as_deref().unwrap_or(""),
            job_id = %job_id,
            vm_name = %vm_name
        );
        let job_control = control.clone();
        let metrics = self.metrics.clone();
        let started = std::time::Instant::now();
        self.running.spawn(
            async move {
                let mut work = tokio::task::spawn_blocking(move || job::run(&ctx, claim, &job_control));
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
                            return (job_id, end);
                        }
                        _ = beat.tick() => {
                            let beat = heartbeat.clone();
                            match tokio::task::spawn_blocking(move || beat.beat()).await {
                                Ok(Beat::Alive) => {}
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
            .instrument(span),
        );
    }

    fn record_end(&mut self, joined: Result<(String, JobEnd), tokio::task::JoinError>) {
        let Ok((job_id, end)) = joined else {
            error!("a job task panicked");
            return;
        };
        self.controls.remove(&job_id);
        match end {
            JobEnd::Done(record) => {
                self.counters.done += 1;
                self.counters.last = Some(format!("{} ok", record.vm_name));
            }
            JobEnd::Failed(record) => {
                self.counters.failed += 1;
                self.counters.last = Some(format!("{} failed", record.vm_name));
            }
            JobEnd::Released | JobEnd::Abandoned => {}
        }
    }

    fn status_line(&self) -> String {
        let mut line = format!(
            "{} running, {} queued, {} done, {} failed",
            self.running.len(),
            self.counters.waiting,
            self.counters.done,
            self.counters.failed
        );
        if let Some(last) = &self.counters.last {
            line.push_str(&format!("; last: {last}"));
        }
        line
    }

    /// Stops claiming; lets running jobs finish within DRAIN_SECONDS (asking systemd for the
    /// time), then cancels the rest, whose claims are released back to the queue.
    ///
    /// The watchdog keeps being fed: systemd ignores it once it sent SIGTERM, but not when the
    /// stop began with SIGINT, and a drain can outlast WatchdogSec many times over.
    async fn drain(&mut self, watchdog: &mut Option<tokio::time::Interval>) {
        let limit = self.ctx.config.drain_timeout;
        if self.running.is_empty() {
            info!("stopping: no job is running");
            service::stopping(Duration::from_secs(5), "stopping");
            return;
        }
        info!(running = self.running.len(), limit_seconds = limit.as_secs_f64(), "stopping: draining running jobs");
        let deadline = tokio::time::Instant::now() + limit;
        let mut extend = tokio::time::interval(Duration::from_secs(5));
        let mut cancelled = false;
        while !self.running.is_empty() {
            tokio::select! {
                Some(joined) = self.running.join_next() => {
                    self.record_end(joined);
                    self.metrics.set_queue(self.running.len(), self.counters.waiting);
                }
                _ = extend.tick() => {
                    let doing = if cancelled { "releasing" } else { "draining" };
                    service::stopping(Duration::from_secs(15), &format!("{doing}: {}", self.status_line()));
                }
                _ = watchdog_tick(watchdog) => service::watchdog(),
                // Past the limit, cancel, and keep asking for time while the cancelled
                // conversions stop and their claims are released.
                _ = tokio::time::sleep_until(deadline), if !cancelled => {
                    warn!(running = self.running.len(), "drain limit reached: releasing unfinished jobs to the queue");
                    for control in self.controls.values() {
                        control.cancel();
                    }
                    cancelled = true;
                }
            }
        }
        info!("stopped");
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

/// Local inotify wake-ups. Other NFS clients' writes are invisible to inotify, which is why
/// polling continues regardless.
fn watch_events(dir: &std::path::Path, wake: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |_event| {
        let _ = wake.try_send(());
    })
    .map_err(|e| warn!(error = %e, "inotify unavailable; polling only"))
    .ok()?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| warn!(error = %e, "cannot watch WATCH_DIR with inotify; polling only"))
        .ok()?;
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_errors_say_what_to_do_under_systemd() {
        let error = |errno| DaemonError::Directory {
            what: "WATCH_DIR",
            path: "/mnt/q".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        let read_only = error(libc::EROFS).to_string();
        assert!(read_only.starts_with("cannot create WATCH_DIR /mnt/q: "), "{read_only}");
        assert!(read_only.contains("ReadWritePaths="), "{read_only}");
        assert!(error(libc::EACCES).to_string().contains("hyper2kvm"));
        assert!(error(libc::ENOSPC).to_string().ends_with("create it or fix its permissions"));
    }
}
