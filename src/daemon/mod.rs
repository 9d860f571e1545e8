//! The daemon: start-up, the main loop and its jobs' supervisors, and the one shutdown path.
//!
//! [`run`] prepares the directories, recovers this host's orphaned claims and then goes round
//! the main loop (`Daemon`): scan the queue (always by polling, faster with inotify), claim
//! manifests while a slot is free and OUTPUT_DIR can take a result, and run each job under a
//! `JobSupervisor` (`supervisor.rs`: the job on a blocking thread, its heartbeat beside it). The
//! loop ends when the caller's shutdown future completes or on an error it cannot go on from;
//! either way it leaves through the one shutdown path (`shutdown.rs`), which logs the cause,
//! drains and releases within bounds.
//!
//! It owns the daemon's lifecycle and its running set, and nothing about a job's stages
//! ([`crate::job`]) or the queue's protocol ([`crate::queue`]). It must not install signal
//! handlers (the caller turns signals into the shutdown future: [`signals`]), and must not
//! leave its loop except through that path.

mod shutdown;
mod supervisor;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use shutdown::Exit;
pub use shutdown::{signals, CANCEL_GRACE, RELEASE_LIMIT, RUNTIME_GRACE};
use supervisor::JobSupervisor;

use crate::config::Config;
use crate::convert::auto::Auto;
use crate::convert::JobControl;
use crate::host::Identity;
use crate::job::{self, JobContext, JobEnd};
use crate::libvirt;
use crate::logging::{self, LogFormat};
use crate::manifest::ManifestFile;
use crate::metrics::{self, Health, Metrics, MetricsError, QueueOperation};
use crate::publish;
use crate::queue::{self, Claim, Layout, LockRecord, Outcome, Queue, Scanner};
use crate::service;
use crate::source::SourceRoots;

/// How many renamed-in manifest names may wait for the main loop; more are dropped (those
/// files then wait for the settle period).
const RENAMED_BACKLOG: usize = 1024;

/// How often retention is applied while running.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How long, beyond two POLL_INTERVALs, the main loop may go without a round before
/// `/healthz` calls it stalled: a scan of a large queue on a slow NFS server may take a while.
const STALL_GRACE: Duration = Duration::from_secs(60);

/// How often, at most, OUTPUT_DIR is checked for room before claiming (a file written, fsynced,
/// renamed and removed: a few round trips on NFS).
const ROOM_CHECK_EVERY: Duration = Duration::from_secs(1);

/// After a job went back to the queue because its answer could not be published, how long
/// nothing is claimed even when OUTPUT_DIR looks fine again: a failure the check cannot see
/// must not turn into a claim-fail-release loop.
const REQUEUE_HOLD: Duration = Duration::from_secs(10);

/// Why the daemon cannot start.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// A directory the daemon needs could not be created, or TEMP_DIR could not be compared with OUTPUT_DIR.
    #[error("cannot create {what} {path}: {source}; {}", directory_hint(.source))]
    Directory {
        /// Which one: `WATCH_DIR`, `OUTPUT_DIR`, `TEMP_DIR` or the queue state directory.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why `create_dir_all` (or the filesystem comparison) failed.
        source: std::io::Error,
    },
    /// TEMP_DIR and OUTPUT_DIR are on different filesystems, so results cannot be renamed into place.
    #[error("TEMP_DIR {temp} is not on the same filesystem as OUTPUT_DIR {output}; results could not be published atomically, so set TEMP_DIR to a directory on the output filesystem")]
    TempOnOtherFilesystem {
        /// TEMP_DIR as configured.
        temp: String,
        /// OUTPUT_DIR as configured.
        output: String,
    },
    /// TEMP_DIR is a symbolic link at start-up.
    #[error("TEMP_DIR {0} is a symbolic link; set TEMP_DIR to the directory it points to (hyper2kvm replaces a symlink planted there while it runs, so it refuses one at start)")]
    TempIsSymlink(String),
    /// The SIGTERM, SIGINT or SIGHUP handler could not be installed.
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    /// The tokio runtime could not be created.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Listing WATCH_DIR failed with an error that is not transient; the daemon stops.
    #[error("cannot scan WATCH_DIR {path}: {source}")]
    Scan {
        /// WATCH_DIR as configured.
        path: String,
        /// The error, one that is not transient.
        source: std::io::Error,
    },
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

/// Whether OUTPUT_DIR can take a result now, looked at before claiming.
#[derive(Debug, Default)]
struct Room {
    checked: Option<Instant>,
    /// Why nothing is claimed, while that is so.
    problem: Option<String>,
    /// No claims before this, after a job could not publish its answer.
    hold_until: Option<Instant>,
}

/// What runs a claimed job on its blocking thread: [`job::run`] in the daemon. Tests put a
/// stand-in here, such as one that ignores cancellation as a read stuck in the kernel does.
#[doc(hidden)]
pub type JobWork = Arc<dyn Fn(&JobContext, Claim, &ManifestFile, &JobControl) -> JobEnd + Send + Sync>;

/// A job the loop started and has not seen end.
struct Running {
    control: JobControl,
    /// Its claim, for the shutdown path to release should the job not stop.
    record: LockRecord,
}

/// A running daemon's state: the main loop.
struct Daemon {
    ctx: Arc<JobContext>,
    queue: Queue,
    scanner: Scanner,
    running: JoinSet<(String, JobEnd)>,
    jobs: HashMap<String, Running>,
    work: JobWork,
    counters: Counters,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    room: Room,
}

/// `hyper2kvm daemon`: logging as configured, then [`run`] on a runtime of its own until
/// SIGTERM, SIGINT or SIGHUP ([`signals`]), and the runtime ended within [`RUNTIME_GRACE`].
pub fn serve(config: Config, log_format: LogFormat) -> Result<(), DaemonError> {
    logging::init(config.log_level, log_format, config.instance.as_deref());
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let runtime = tokio::runtime::Runtime::new().map_err(DaemonError::Runtime)?;
    let served = runtime.block_on(async { run(config, signals()?).await });
    // Bounded: a job that ignored cancellation still holds a blocking thread, and its claim
    // is already released.
    runtime.shutdown_timeout(RUNTIME_GRACE);
    served
}

/// Runs the daemon until `shutdown` completes (under `hyper2kvm daemon`: [`signals`]) or an
/// error stops it; either way running jobs are drained or released within bounds before it
/// returns. The caller should end its runtime with `shutdown_timeout(`[`RUNTIME_GRACE`]`)`: a
/// job that ignored cancellation may still hold a blocking thread.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    run_with(config, shutdown, Arc::new(job::run)).await
}

/// [`run`], with `work` running each claimed job.
#[doc(hidden)]
pub async fn run_with(config: Config, shutdown: impl Future<Output = ()>, work: JobWork) -> Result<(), DaemonError> {
    raise_open_files_limit();
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
    crate::capabilities::publish_metric(config.clone(), metrics.clone());
    if config.libvirt_integration {
        probe_libvirt(config.libvirt_uri.clone());
    }
    let identity = Identity::current(config.instance.clone());
    let layout = Layout::new(&config.watch_dir);
    let ctx = Arc::new(job_context(&config, identity));
    let queue = Queue::new(layout.clone());
    recover_orphans(&ctx, &queue);
    prune(&config, &layout);
    let mut daemon = Daemon {
        scanner: Scanner::new(&config.watch_dir, config.settle, config.invalid_manifest_grace),
        ctx,
        queue,
        running: JoinSet::new(),
        jobs: HashMap::new(),
        work,
        counters: Counters::default(),
        metrics,
        health,
        room: Room::default(),
    };
    let served = daemon.serve(shutdown).await;
    if let Some(server) = server {
        server.stop();
    }
    served
}

/// Raises the soft limit of open files to the hard one. A job holds a descriptor per VMDK
/// extent (a descriptor may name thousands), and the usual soft limit of 1024 let one such job
/// make a concurrent job fail with EMFILE. The daemon uses no `select(2)`, which is what the
/// low soft default protects.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not read the open files limit");
        return;
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    if soft >= hard {
        info!(soft, hard, "open files limit");
        return;
    }
    let raised = libc::rlimit { rlim_cur: hard, rlim_max: hard };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        info!(soft = hard, hard, was = soft, "raised the open files limit to the hard limit");
    } else {
        warn!(soft, hard, error = %std::io::Error::last_os_error(), "could not raise the open files limit");
    }
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
    if std::fs::symlink_metadata(&config.temp_dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(DaemonError::TempIsSymlink(config.temp_dir.display().to_string()));
    }
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

/// Removes every generation's staging directory of a job. Never through a symlink planted at
/// TEMP_DIR: it is replaced first ([`publish::own_dir`]).
fn remove_staging(temp_dir: &std::path::Path, job_id: &str) {
    if publish::own_dir(temp_dir).is_err() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(temp_dir) else { return };
    for entry in entries.flatten() {
        if crate::output_layout::is_staging_of(&entry.file_name().to_string_lossy(), job_id) {
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
    /// Goes round the main loop until `shutdown` completes or an error stops it, then leaves
    /// through the one shutdown path.
    async fn serve(&mut self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let config = self.ctx.config.clone();
        let (wake_tx, wake_rx) = mpsc::channel::<()>(1);
        let (renamed_tx, renamed_rx) = mpsc::channel::<String>(RENAMED_BACKLOG);
        let _watcher = config.use_inotify.then(|| watch_events(&config.watch_dir, wake_tx, renamed_tx)).flatten();
        let mut watchdog = service::watchdog_interval().map(tokio::time::interval);
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
        let exit = self.go_round(shutdown, Wakes { wake_rx, renamed_rx }, &mut watchdog).await;
        self.shut_down(exit, &mut watchdog).await
    }

    /// The main loop: a scan and claim every POLL_INTERVAL (sooner when a file settles or
    /// inotify wakes it), a job's end recorded as it comes. Returns why it ended.
    async fn go_round(
        &mut self,
        shutdown: impl Future<Output = ()>,
        mut wakes: Wakes,
        watchdog: &mut Option<tokio::time::Interval>,
    ) -> Exit {
        let config = self.ctx.config.clone();
        let mut prune_timer = tokio::time::interval(PRUNE_EVERY);
        tokio::pin!(shutdown);
        // A stop asked for while starting is heeded before anything is claimed.
        let asked = tokio::select! { biased; _ = &mut shutdown => true, _ = std::future::ready(()) => false };
        if asked {
            return Exit::Asked;
        }
        let mut next = match self.scan_and_claim() {
            Ok(next) => next,
            Err(e) => return Exit::Fatal(e),
        };
        self.went_round();
        let mut status = self.status_line();
        service::ready(&status);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Exit::Asked,
                _ = tokio::time::sleep(next) => {}
                Some(()) = wakes.wake_rx.recv() => debug!("woken by a local file event"),
                Some(joined) = self.running.join_next(), if !self.running.is_empty() => self.record_end(joined),
                _ = watchdog_tick(watchdog) => service::watchdog(),
                _ = prune_timer.tick() => prune(&config, &self.queue.layout),
            }
            while let Ok(name) = wakes.renamed_rx.try_recv() {
                self.scanner.arrived_by_rename(&name);
            }
            next = match self.scan_and_claim() {
                Ok(next) => next,
                Err(e) => return Exit::Fatal(e),
            };
            self.went_round();
            // Only changes: the loop goes round every POLL_INTERVAL and on every wake-up.
            let line = self.status_line();
            if line != status {
                service::status(&line);
                status = line;
            }
        }
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
        let next = scan.next_check.map_or(config.poll_interval, |d| d.min(config.poll_interval));
        let next = next.max(Duration::from_millis(20));
        // Looked at afresh before each claim: the last look may be a second old.
        if !self.has_room(!scan.ready.is_empty()) {
            return Ok(next);
        }
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
        Ok(next)
    }

    /// Whether a claimed job could publish its answer: OUTPUT_DIR and TEMP_DIR can take a
    /// file ([`publish::check_room`]) and no job was just given back for want of it. Looked at
    /// most every [`ROOM_CHECK_EVERY`] unless `afresh`; `/healthz` and the STATUS line say why
    /// not.
    fn has_room(&mut self, afresh: bool) -> bool {
        let now = Instant::now();
        if !afresh && self.room.checked.is_some_and(|at| now.duration_since(at) < ROOM_CHECK_EVERY) {
            return self.room.problem.is_none();
        }
        self.room.checked = Some(now);
        let config = &self.ctx.config;
        let tag = format!("{}-{}", self.ctx.identity.host, self.ctx.identity.pid);
        let problem = match publish::check_room(&config.output_dir, &config.temp_dir, config.min_free_bytes, &tag) {
            Err(e) => Some(e.to_string()),
            Ok(()) => self.room.hold_until.filter(|until| now < *until).map(|until| {
                format!(
                    "a job's answer could not be published in OUTPUT_DIR {}; claiming again in {} s",
                    config.output_dir.display(),
                    until.duration_since(now).as_secs() + 1
                )
            }),
        };
        match (&self.room.problem, &problem) {
            (None, Some(why)) => warn!("not claiming new jobs: {why}"),
            (Some(_), None) => info!("OUTPUT_DIR can take results again; claiming"),
            _ => {}
        }
        self.health.paused(problem.clone());
        self.room.problem = problem;
        self.room.problem.is_none()
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

    /// Runs a claimed job (`taken_over`: a stale claim of another daemon) under a
    /// [`JobSupervisor`]: on a blocking thread, with its heartbeat and progress sampling
    /// beside it.
    fn start(&mut self, claim: Claim, taken_over: bool) {
        self.metrics.job_started(taken_over);
        let job_id = claim.job_id().to_owned();
        let control = JobControl::new(self.ctx.config.conversion_timeout);
        self.jobs.insert(job_id.clone(), Running { control: control.clone(), record: claim.record().clone() });
        let ctx = self.ctx.clone();
        // The same fields as job::run's span, so the journal's JOB_ID/VM_NAME filters find
        // the heartbeat and progress lines too.
        // Read once, here: the job parses, names and archives these bytes.
        let manifest = crate::manifest::ManifestFile::read(&claim.manifest_path(), &claim.record().manifest_name);
        let vm_name = manifest.vm_name().to_owned();
        let span = tracing::info_span!(
            "job",
            instance = ctx.identity.instance.as_deref().unwrap_or(""),
            job_id = %job_id,
            vm_name = %vm_name
        );
        let supervisor = JobSupervisor {
            job_id,
            ctx,
            claim,
            manifest,
            control,
            metrics: self.metrics.clone(),
            work: self.work.clone(),
        };
        self.running.spawn(supervisor.run().instrument(span));
    }

    fn record_end(&mut self, joined: Result<(String, JobEnd), tokio::task::JoinError>) {
        let Ok((job_id, end)) = joined else {
            error!("a job task panicked");
            return;
        };
        self.jobs.remove(&job_id);
        match end {
            JobEnd::Done(record) => {
                self.counters.done += 1;
                self.counters.last = Some(format!("{} ok", record.vm_name));
            }
            JobEnd::Failed(record) => {
                self.counters.failed += 1;
                self.counters.last = Some(format!("{} failed", record.vm_name));
            }
            JobEnd::Requeued => {
                self.room.hold_until = Some(Instant::now() + REQUEUE_HOLD);
                self.room.checked = None;
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
        if let Some(why) = &self.room.problem {
            line.push_str(&format!("; not claiming: {why}"));
        }
        line
    }
}

/// Local inotify wake-ups, and the names of manifests renamed into WATCH_DIR (`renamed`),
/// which may skip the settle wait ([`Scanner::arrived_by_rename`]). Other NFS clients' writes
/// are invisible to inotify, which is why polling continues regardless. Neither channel
/// blocks the watcher: a name that does not fit is dropped, and that file waits for the settle
/// period as it would without inotify.
fn watch_events(
    dir: &std::path::Path,
    wake: mpsc::Sender<()>,
    renamed: mpsc::Sender<String>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Some(name) = event.ok().as_ref().and_then(renamed_in_manifest) {
            let _ = renamed.try_send(name);
        }
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

/// The file name of a manifest an event says was renamed into the watched directory
/// (`IN_MOVED_TO`; `Both` when its old name was in the directory too, listed first).
/// `IN_CLOSE_WRITE` is not enough: HyperSDK's `os.WriteFile` may close a file another writer
/// (or a retry) is still rewriting, and on NFS close says nothing about other clients.
fn renamed_in_manifest(event: &notify::Event) -> Option<String> {
    use notify::event::{EventKind, ModifyKind, RenameMode};
    if !matches!(event.kind, EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))) {
        return None;
    }
    let name = event.paths.last()?.file_name()?.to_str()?;
    queue::layout::is_manifest_name(name).then(|| name.to_owned())
}

/// What wakes the main loop besides its timers: a local file event, and the manifests renamed in.
struct Wakes {
    wake_rx: mpsc::Receiver<()>,
    renamed_rx: mpsc::Receiver<String>,
}

/// What every job of this daemon shares.
fn job_context(config: &Arc<Config>, identity: Identity) -> JobContext {
    JobContext {
        roots: SourceRoots::for_daemon(config),
        converter: Arc::new(Auto::default()),
        identity,
        guest_tools: Arc::new(crate::guest::Tools::for_config(config)),
        config: config.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jobs_guest_tools_carry_virtio_win() {
        let dir = tempfile::tempdir().unwrap();
        let virtio_win = dir.path().join("virtio-win");
        std::fs::create_dir(&virtio_win).unwrap();
        let overrides = crate::config::Overrides {
            config_dir: Some(dir.path().to_owned()),
            flags: [("VIRTIO_WIN".to_owned(), virtio_win.display().to_string())].into_iter().collect(),
        };
        let env = std::collections::BTreeMap::<String, String>::new();
        let config = Arc::new(Config::load(&overrides, &env).unwrap());
        let ctx = job_context(&config, Identity::current(None));
        assert_eq!(ctx.guest_tools.virtio_win.as_deref(), Some(virtio_win.as_path()));
    }

    #[test]
    fn only_manifests_renamed_in_are_reported() {
        use notify::event::{CreateKind, EventKind, ModifyKind, RenameMode};
        let event = |kind, paths: &[&str]| notify::Event {
            kind,
            paths: paths.iter().map(std::path::PathBuf::from).collect(),
            attrs: Default::default(),
        };
        let to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let from = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        assert_eq!(renamed_in_manifest(&event(to, &["/q/m.json"])).as_deref(), Some("m.json"));
        assert_eq!(renamed_in_manifest(&event(both, &["/q/m.json.tmp", "/q/m.json"])).as_deref(), Some("m.json"));
        assert_eq!(renamed_in_manifest(&event(both, &["/q/m.json", "/q/m.json.tmp"])), None);
        assert_eq!(renamed_in_manifest(&event(from, &["/q/m.json"])), None);
        assert_eq!(renamed_in_manifest(&event(EventKind::Create(CreateKind::File), &["/q/m.json"])), None);
        assert_eq!(renamed_in_manifest(&event(to, &[])), None);
    }

    #[test]
    fn staging_is_not_removed_through_a_symlinked_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (temp, outside) = (dir.path().join(".hyper2kvm-tmp"), dir.path().join("outside"));
        std::fs::create_dir_all(outside.join("J.g1")).unwrap();
        std::os::unix::fs::symlink(&outside, &temp).unwrap();
        remove_staging(&temp, "J");
        assert!(outside.join("J.g1").is_dir(), "nothing outside is removed");
        assert!(std::fs::symlink_metadata(&temp).unwrap().is_dir(), "TEMP_DIR is a real directory again");
    }

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
