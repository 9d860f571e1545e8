//! Prometheus metrics (METRICS_ADDR): what the daemon counts, how it records it, and the
//! registry that `/metrics` exposes.
//!
//! This module owns the metric names, help texts, label values and buckets, and the recording
//! methods the daemon and its jobs call. It must not do I/O or know about HTTP: `http.rs` serves
//! what [`Metrics::encode`] returns, and `health.rs` owns what `/healthz` answers.
//!
//! The metrics are named `hyper2kvm_*` after the Prometheus naming guide and carry no VM names
//! or job ids, so their number stays the same however many jobs pass (the table is in
//! docs/OPERATIONS.md). They are exposed in the OpenMetrics text format that `prometheus-client`
//! writes, which every Prometheus since 2.5 scrapes.

mod health;
mod http;

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::convert::Progress;
use crate::job::JobEnd;

pub(crate) use health::Health;
pub(crate) use http::{MetricsError, Server};

/// `hyper2kvm_job_duration_seconds` buckets: jobs take seconds (a small disk) to hours (a
/// large VM; CONVERSION_TIMEOUT defaults to one hour).
const DURATION_BUCKETS: [f64; 14] =
    [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0];

/// `hyper2kvm_vmdk_size_bytes` buckets: source disks from a small appliance (64 MiB) to a
/// large database server (16 TiB), by powers of four.
const SIZE_BUCKETS: [f64; 10] = [
    64.0 * MIB,
    256.0 * MIB,
    1024.0 * MIB,
    4096.0 * MIB,
    16384.0 * MIB,
    65536.0 * MIB,
    262144.0 * MIB,
    1048576.0 * MIB,
    4194304.0 * MIB,
    16777216.0 * MIB,
];
const MIB: f64 = 1048576.0;

/// The `stage` label values of `hyper2kvm_migration_failures_total`: the job's stages
/// ([`crate::job::Stage`]), created at zero.
pub(crate) const FAILURE_STAGES: [&str; 10] =
    ["manifest", "source", "checksum", "inspect", "convert", "guest", "validate", "libvirt", "publish", "internal"];

/// One label, from a fixed set of values: no series per VM or per job.
type Label = [(&'static str, &'static str); 1];

/// How a job ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobResult {
    /// Published `V.qcow2`.
    Done,
    /// Published `V.error` (or recorded the failure).
    Failed,
    /// Given back to the queue at shutdown.
    Released,
    /// Its lock was taken over; nothing was published.
    Abandoned,
}

impl JobResult {
    const ALL: [JobResult; 4] = [JobResult::Done, JobResult::Failed, JobResult::Released, JobResult::Abandoned];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobResult::Done => "done",
            JobResult::Failed => "failed",
            JobResult::Released => "released",
            JobResult::Abandoned => "abandoned",
        }
    }

    fn label(self) -> Label {
        [("result", self.as_str())]
    }
}

impl From<&JobEnd> for JobResult {
    fn from(end: &JobEnd) -> JobResult {
        match end {
            JobEnd::Done(_) => JobResult::Done,
            JobEnd::Failed(_) => JobResult::Failed,
            JobEnd::Released | JobEnd::Requeued => JobResult::Released,
            JobEnd::Abandoned => JobResult::Abandoned,
        }
    }
}

/// A queue operation that failed and will be retried, as the `operation` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOperation {
    /// WATCH_DIR could not be listed (a transient error; the poll retries).
    Scan,
    /// A ready manifest could not be claimed.
    Claim,
    /// The locks could not be read to look for stale claims.
    StaleCheck,
    /// A stale claim could not be taken over.
    Takeover,
}

impl QueueOperation {
    const ALL: [QueueOperation; 4] =
        [QueueOperation::Scan, QueueOperation::Claim, QueueOperation::StaleCheck, QueueOperation::Takeover];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueOperation::Scan => "scan",
            QueueOperation::Claim => "claim",
            QueueOperation::StaleCheck => "stale_check",
            QueueOperation::Takeover => "takeover",
        }
    }

    fn label(self) -> Label {
        [("operation", self.as_str())]
    }
}

/// The daemon's metrics and their registry. Cheap to update from any thread (atomics).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs_started: Counter,
    jobs_finished: Family<Label, Counter>,
    jobs_running: Gauge,
    queue_manifests: Gauge,
    claims_taken_over: Counter,
    conversion_bytes: Counter,
    output_bytes: Counter,
    job_duration: Family<Label, Histogram, fn() -> Histogram>,
    heartbeat_errors: Counter,
    locks_lost: Counter,
    queue_errors: Family<Label, Counter>,
    migration_duration: Family<Label, Histogram, fn() -> Histogram>,
    migrations: Family<Label, Counter>,
    migration_failures: Family<Label, Counter>,
    vmdk_size: Histogram,
    capability_info: Family<Vec<(String, String)>, Gauge>,
}

/// A migration's end, as `hyper2kvm_migration_total`'s `result` label says it.
const MIGRATION_RESULTS: [&str; 2] = ["success", "failure"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered at zero (labelled ones with each of their values, so that
    /// `rate()` and alerts see a series from the start rather than from the first event).
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::with_prefix("hyper2kvm"),
            jobs_started: Counter::default(),
            jobs_finished: Family::default(),
            jobs_running: Gauge::default(),
            queue_manifests: Gauge::default(),
            claims_taken_over: Counter::default(),
            conversion_bytes: Counter::default(),
            output_bytes: Counter::default(),
            job_duration: Family::new_with_constructor(duration_histogram),
            heartbeat_errors: Counter::default(),
            locks_lost: Counter::default(),
            queue_errors: Family::default(),
            migration_duration: Family::new_with_constructor(duration_histogram),
            migrations: Family::default(),
            migration_failures: Family::default(),
            vmdk_size: Histogram::new(SIZE_BUCKETS),
            capability_info: Family::default(),
        };
        // Creating a series is all that is wanted here; the guards are dropped at once.
        for result in JobResult::ALL {
            let _ = metrics.jobs_finished.get_or_create(&result.label());
            let _ = metrics.job_duration.get_or_create(&result.label());
        }
        for operation in QueueOperation::ALL {
            let _ = metrics.queue_errors.get_or_create(&operation.label());
        }
        for result in MIGRATION_RESULTS {
            let _ = metrics.migrations.get_or_create(&[("result", result)]);
            let _ = metrics.migration_duration.get_or_create(&[("result", result)]);
        }
        for stage in FAILURE_STAGES {
            let _ = metrics.migration_failures.get_or_create(&[("stage", stage)]);
        }
        metrics.register()
    }

    /// Registers every metric (the handles share their values with the registry's copies).
    fn register(mut self) -> Metrics {
        let registry = &mut self.registry;
        registry.register(
            "build",
            "The version of the hyper2kvm daemon",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "jobs_started",
            "Jobs this daemon started: claimed manifests and stale claims taken over",
            self.jobs_started.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs this daemon ended, by result: done, failed, released (back to the queue at shutdown), abandoned (lock taken over)",
            self.jobs_finished.clone(),
        );
        registry.register("jobs_running", "Jobs running in this daemon now", self.jobs_running.clone());
        registry.register(
            "queue_manifests",
            "Manifests waiting in WATCH_DIR at the last scan (settling or ready, not yet claimed)",
            self.queue_manifests.clone(),
        );
        registry.register(
            "claims_taken_over",
            "Stale claims (lock older than LEASE_SECONDS) this daemon took over from another owner",
            self.claims_taken_over.clone(),
        );
        registry.register_with_unit(
            "conversion",
            "Guest bytes converted by this daemon's jobs, counted while they run (work of jobs that later fail or are released included)",
            Unit::Bytes,
            self.conversion_bytes.clone(),
        );
        registry.register_with_unit(
            "output",
            "Bytes of the qcow2 disk images this daemon published",
            Unit::Bytes,
            self.output_bytes.clone(),
        );
        registry.register_with_unit(
            "job_duration",
            "How long jobs took, from claim to their end, by result",
            Unit::Seconds,
            self.job_duration.clone(),
        );
        registry.register(
            "heartbeat_errors",
            "Heartbeats that could not refresh or check a job's lock (retried at the next beat)",
            self.heartbeat_errors.clone(),
        );
        registry.register(
            "locks_lost",
            "Jobs whose heartbeat found their lock taken over by another daemon",
            self.locks_lost.clone(),
        );
        registry.register(
            "queue_errors",
            "Queue operations that failed and will be retried, by operation: scan, claim, stale_check, takeover",
            self.queue_errors.clone(),
        );
        registry.register_with_unit(
            "migration_duration",
            "How long migrations took, from claim to V.qcow2 or V.error, by result: success, failure",
            Unit::Seconds,
            self.migration_duration.clone(),
        );
        registry.register(
            "migration",
            "Migrations this daemon ended, by result: success (V.qcow2 published), failure (V.error)",
            self.migrations.clone(),
        );
        registry.register(
            "migration_failures",
            "Failed migrations by the stage that failed: manifest, source, checksum, inspect, convert, domain, libvirt, publish, internal",
            self.migration_failures.clone(),
        );
        registry.register_with_unit(
            "vmdk_size",
            "Sizes of the source disk files of successful migrations, one observation per disk",
            Unit::Bytes,
            self.vmdk_size.clone(),
        );
        registry.register(
            "worker_capability_info",
            "What this worker can do, as `hyper2kvm capabilities` found it at start-up (value 1)",
            self.capability_info.clone(),
        );
        self
    }

    /// A migration ended after `duration`: done jobs count as successes (and their source
    /// disks' sizes are observed), failed ones as failures of their stage. Jobs given back or
    /// abandoned are not migrations that ended.
    pub fn migration_ended(&self, end: &JobEnd, duration: Duration) {
        let (result, record) = match end {
            JobEnd::Done(record) => ("success", record),
            JobEnd::Failed(record) => ("failure", record),
            JobEnd::Released | JobEnd::Requeued | JobEnd::Abandoned => return,
        };
        self.migrations.get_or_create(&[("result", result)]).inc();
        self.migration_duration.get_or_create(&[("result", result)]).observe(duration.as_secs_f64());
        if result == "success" {
            for bytes in &record.source_bytes {
                self.vmdk_size.observe(*bytes as f64);
            }
        } else {
            // A stage outside the fixed set (a record from a newer version) is counted as
            // internal rather than creating a series.
            let stage = FAILURE_STAGES.iter().find(|s| **s == record.stage).copied().unwrap_or("internal");
            self.migration_failures.get_or_create(&[("stage", stage)]).inc();
        }
    }

    /// Sets `hyper2kvm_worker_capability_info` to these labels (replacing earlier ones).
    pub fn set_capabilities(&self, labels: Vec<(String, String)>) {
        self.capability_info.clear();
        self.capability_info.get_or_create(&labels).set(1);
    }

    /// A job started; `taken_over` when it was a stale claim of another daemon.
    pub fn job_started(&self, taken_over: bool) {
        self.jobs_started.inc();
        if taken_over {
            self.claims_taken_over.inc();
        }
    }

    /// A job ended after `duration`; a done job published `output_bytes` of qcow2.
    pub fn job_ended(&self, result: JobResult, duration: Duration, output_bytes: u64) {
        self.jobs_finished.get_or_create(&result.label()).inc();
        self.job_duration.get_or_create(&result.label()).observe(duration.as_secs_f64());
        if result == JobResult::Done {
            self.output_bytes.inc_by(output_bytes);
        }
    }

    /// The jobs running and the manifests waiting, as the daemon's loop last saw them.
    pub fn set_queue(&self, running: usize, waiting: usize) {
        self.jobs_running.set(i64::try_from(running).unwrap_or(i64::MAX));
        self.queue_manifests.set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// A heartbeat could not tell whether the lock is still ours.
    pub fn heartbeat_error(&self) {
        self.heartbeat_errors.inc();
    }

    /// A heartbeat found the lock taken over.
    pub fn lock_lost(&self) {
        self.locks_lost.inc();
    }

    /// A queue operation failed (and will be retried).
    pub fn queue_error(&self, operation: QueueOperation) {
        self.queue_errors.get_or_create(&operation.label()).inc();
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(8 * 1024);
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Feeds one job's [`Progress`] into `hyper2kvm_conversion_bytes_total` while it runs:
/// each sample adds what the job converted since the previous one.
#[derive(Debug, Default)]
pub(crate) struct ByteSampler {
    counted: u64,
}

impl ByteSampler {
    /// Adds the job's progress since the last sample. [`Progress::job_bytes`] may dip for a
    /// moment between two disks; only growth past what was counted is added, so nothing is
    /// counted twice.
    pub(crate) fn sample(&mut self, progress: &Progress, metrics: &Metrics) {
        let now = progress.job_bytes();
        if now > self.counted {
            metrics.conversion_bytes.inc_by(now - self.counted);
            self.counted = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// The value of the sample named exactly `series` in an exposition.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn metrics_are_named_after_the_guide_and_labelled_sparingly() {
        let metrics = Metrics::new();
        let text = metrics.encode().unwrap();
        assert_eq!(value(&text, "hyper2kvm_jobs_finished_total{result=\"done\"}"), Some(0.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_jobs_finished_total{result=\"abandoned\"}"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_queue_errors_total{operation=\"stale_check\"}"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_conversion_bytes_total"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_output_bytes_total"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_jobs_running"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_queue_manifests"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_claims_taken_over_total"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_heartbeat_errors_total"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_locks_lost_total"), Some(0.0));
        let build = format!("hyper2kvm_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
        assert_eq!(value(&text, &build), Some(1.0), "{text}");
        assert!(text.contains("hyper2kvm_job_duration_seconds_bucket{le=\"60.0\",result=\"done\"} 0\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("hyper2kvm_"), "{line}");
            let labels = line.split_once('{').map_or("", |(_, rest)| rest);
            for label in labels.split(',').filter(|l| l.contains('=')) {
                let key = label.split('=').next().unwrap();
                assert!(["result", "operation", "version", "le", "stage"].contains(&key), "unexpected label in {line}");
            }
        }
    }

    #[test]
    fn migrations_are_counted_by_result_stage_and_source_size() {
        let metrics = Metrics::new();
        let text = metrics.encode().unwrap();
        assert_eq!(value(&text, "hyper2kvm_migration_total{result=\"success\"}"), Some(0.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_migration_failures_total{stage=\"convert\"}"), Some(0.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_vmdk_size_bytes_count"), Some(0.0), "{text}");
        let record = |state, stage: &str, source_bytes: Vec<u64>| crate::queue::JobRecord {
            job_id: "20260101T000000Z-0000000000000000".into(),
            vm_name: "secret-vm".into(),
            host: "h".into(),
            instance: None,
            generation: 1,
            state,
            started_at: chrono::Utc::now(),
            finished_at: None,
            manifest_name: "m.json".into(),
            stage: stage.into(),
            result_file: None,
            error: None,
            causes: Vec::new(),
            source_bytes,
        };
        use crate::queue::JobState;
        let gib = 1u64 << 30;
        metrics.migration_ended(
            &JobEnd::Done(record(JobState::Done, "done", vec![gib, 3 * gib])),
            Duration::from_secs(90),
        );
        metrics.migration_ended(&JobEnd::Failed(record(JobState::Failed, "checksum", vec![])), Duration::from_secs(2));
        metrics.migration_ended(
            &JobEnd::Failed(record(JobState::Failed, "from-the-future", vec![])),
            Duration::from_secs(2),
        );
        metrics.migration_ended(&JobEnd::Released, Duration::from_secs(5));
        metrics.set_capabilities(vec![("kvm".into(), "no".into())]);
        metrics.set_capabilities(vec![("kvm".into(), "yes".into()), ("execution_mode".into(), "container".into())]);
        let text = metrics.encode().unwrap();
        assert_eq!(value(&text, "hyper2kvm_migration_total{result=\"success\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_migration_total{result=\"failure\"}"), Some(2.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_migration_failures_total{stage=\"checksum\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_migration_failures_total{stage=\"internal\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_migration_duration_seconds_count{result=\"success\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_migration_duration_seconds_sum{result=\"success\"}"), Some(90.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_vmdk_size_bytes_count"), Some(2.0), "{text}");
        assert_eq!(value(&text, "hyper2kvm_vmdk_size_bytes_sum"), Some(4.0 * gib as f64), "{text}");
        assert_eq!(value(&text, "hyper2kvm_vmdk_size_bytes_bucket{le=\"1073741824.0\"}"), Some(1.0), "{text}");
        assert_eq!(
            value(&text, "hyper2kvm_worker_capability_info{kvm=\"yes\",execution_mode=\"container\"}"),
            Some(1.0),
            "{text}"
        );
        assert!(!text.contains("kvm=\"no\"") && !text.contains("secret-vm"), "{text}");
    }

    #[test]
    fn job_ends_are_counted_by_result() {
        let metrics = Metrics::new();
        metrics.job_started(false);
        metrics.job_started(true);
        metrics.job_ended(JobResult::Done, Duration::from_secs(42), 1000);
        metrics.job_ended(JobResult::Failed, Duration::from_secs(1), 500);
        metrics.set_queue(1, 3);
        metrics.queue_error(QueueOperation::Claim);
        metrics.heartbeat_error();
        metrics.lock_lost();
        let text = metrics.encode().unwrap();
        assert_eq!(value(&text, "hyper2kvm_jobs_started_total"), Some(2.0));
        assert_eq!(value(&text, "hyper2kvm_claims_taken_over_total"), Some(1.0));
        assert_eq!(value(&text, "hyper2kvm_jobs_finished_total{result=\"done\"}"), Some(1.0));
        assert_eq!(value(&text, "hyper2kvm_jobs_finished_total{result=\"failed\"}"), Some(1.0));
        assert_eq!(value(&text, "hyper2kvm_jobs_finished_total{result=\"released\"}"), Some(0.0));
        // Only published (done) jobs count output.
        assert_eq!(value(&text, "hyper2kvm_output_bytes_total"), Some(1000.0));
        assert_eq!(value(&text, "hyper2kvm_job_duration_seconds_sum{result=\"done\"}"), Some(42.0));
        assert_eq!(value(&text, "hyper2kvm_job_duration_seconds_bucket{le=\"60.0\",result=\"done\"}"), Some(1.0));
        assert_eq!(value(&text, "hyper2kvm_job_duration_seconds_bucket{le=\"30.0\",result=\"done\"}"), Some(0.0));
        assert_eq!(value(&text, "hyper2kvm_jobs_running"), Some(1.0));
        assert_eq!(value(&text, "hyper2kvm_queue_manifests"), Some(3.0));
        assert_eq!(value(&text, "hyper2kvm_queue_errors_total{operation=\"claim\"}"), Some(1.0));
        assert_eq!(value(&text, "hyper2kvm_heartbeat_errors_total"), Some(1.0));
        assert_eq!(value(&text, "hyper2kvm_locks_lost_total"), Some(1.0));
    }

    #[test]
    fn conversion_bytes_advance_during_a_job_and_add_up_its_disks() {
        let metrics = Metrics::new();
        let progress = Progress::default();
        let mut sampler = ByteSampler::default();
        let counted = |metrics: &Metrics| value(&metrics.encode().unwrap(), "hyper2kvm_conversion_bytes_total");
        progress.start_disk(1000);
        progress.done_bytes.store(400, Ordering::Relaxed);
        sampler.sample(&progress, &metrics);
        assert_eq!(counted(&metrics), Some(400.0));
        // The first disk ends unseen and the second one starts: its converter restarts at 0.
        progress.done_bytes.store(1000, Ordering::Relaxed);
        progress.start_disk(500);
        progress.done_bytes.store(100, Ordering::Relaxed);
        sampler.sample(&progress, &metrics);
        assert_eq!(counted(&metrics), Some(1100.0));
        progress.done_bytes.store(500, Ordering::Relaxed);
        sampler.sample(&progress, &metrics);
        sampler.sample(&progress, &metrics);
        assert_eq!(counted(&metrics), Some(1500.0));
        assert_eq!(progress.job_bytes(), 1500);
    }
}
