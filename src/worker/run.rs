//! `hyper2kvm run JOB.json`: one job of the Worker Job Protocol v1, from its spec to its
//! result, through the state machine of [`super::state`].
//!
//! The operations reuse the one-shot commands' code ([`crate::convert::oneshot`]): `convert`
//! publishes its qcow2 under its final name only once it is whole. Each attempt has the spec's
//! time limit; a failed attempt is retried after a backoff that doubles, unless the image
//! itself is at fault (corrupt, unsupported), which another attempt would not change.
//! SIGINT and SIGTERM cancel the job: the conversion stops, its partial file is removed, and
//! the job ends `cancelled`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, warn};

use super::spec::{self, Invalid, JobSpec, Operation};
use super::state::{self, Machine, State};
use crate::config::LogLevel;
use crate::convert::{oneshot, ConvertError, JobControl};
use crate::events::{self, EventLog};
use crate::logging::{self, LogFormat};
use crate::queue::records::write_atomically;

/// Exit status: the job completed.
pub const EXIT_COMPLETED: u8 = 0;
/// Exit status: the job failed (after its retries).
pub const EXIT_FAILED: u8 = 1;
/// Exit status: the command line or the job spec is invalid; nothing ran.
pub const EXIT_INVALID: u8 = 2;
/// Exit status: the operation is valid but this build cannot do it (`offline_fix`).
pub const EXIT_UNSUPPORTED: u8 = 3;
/// Exit status: the last attempt ran past `execution_policy.timeout_seconds` (as timeout(1)).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit status of a job cancelled by a signal: 128 + the signal, as a shell reports a process
/// the signal ended (130 for SIGINT, 143 for SIGTERM).
pub const EXIT_SIGNAL_BASE: u8 = 128;

/// A spec larger than this is not a job spec.
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Without `timeout_seconds`, an attempt has no time limit (a year).
const NO_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// How often a backoff wait looks for a signal.
const WAIT_STEP: Duration = Duration::from_millis(100);

/// How a `run` ended: its exit status and a line for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnd {
    /// The process's exit status: `EXIT_COMPLETED`, `EXIT_FAILED`, `EXIT_INVALID`, …, or 128 + a signal.
    pub exit_code: u8,
    /// The reason, for stderr, when the job did not complete.
    pub message: Option<String>,
    /// The result JSON (one line), for stdout, when one was written.
    pub result: Option<String>,
}

/// The result file's contents: `<output_path>/<job_id>.result.json`.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    /// The spec's `job_id`.
    pub job_id: String,
    /// The spec's `version` (empty for a spec too invalid to tell).
    pub version: String,
    /// The operation, when the spec named a known one.
    pub operation: Option<Operation>,
    /// The terminal state.
    pub state: State,
    /// The exit status `run` ends with.
    pub exit_code: u8,
    /// Attempts made (0 when none started).
    pub attempts: u32,
    /// When `hyper2kvm run` started, before the spec was read (UTC).
    pub started_at: DateTime<Utc>,
    /// When the job reached its terminal state (UTC).
    pub finished_at: DateTime<Utc>,
    /// From the first attempt to the end, retries and waits included.
    pub seconds: f64,
    /// The image, for a valid spec.
    pub image: Option<ImageView>,
    /// For `convert`: the qcow2 files written (an OVA's other disks beside the first).
    pub outputs: Vec<OutputFile>,
    /// For `inspect`: what `hyper2kvm inspect --json` prints.
    pub inspection: Option<serde_json::Value>,
    /// Why the job did not complete: one sentence.
    pub error: Option<String>,
    /// The spec's unknown keys, ignored.
    pub warnings: Vec<String>,
}

/// The image as the result names it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageView {
    /// `image.path` from the spec (absolute).
    pub path: PathBuf,
    /// The format read (`image.format` or the guess).
    pub format: &'static str,
}

/// One file a job wrote.
#[derive(Debug, Clone, Serialize)]
pub struct OutputFile {
    /// The file's path in `output_path`.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
}

/// `hyper2kvm run JOB.json`: logs on stderr at `log_level` (default info), [`run`], the result
/// as one JSON line on stdout, the reason on stderr, and the job's own exit status.
pub fn command(spec_path: &Path, log_level: Option<&str>, log_format: LogFormat) -> ExitCode {
    let level = log_level.and_then(LogLevel::parse).unwrap_or(LogLevel::Info);
    logging::init(level, log_format, None);
    let end = run(spec_path);
    if let Some(result) = &end.result {
        println!("{result}");
    }
    if let Some(message) = &end.message {
        eprintln!("hyper2kvm: {message}");
    }
    ExitCode::from(end.exit_code)
}

/// Runs the job described by the file at `spec_path`.
pub fn run(spec_path: &Path) -> RunEnd {
    let started = Utc::now();
    // For the whole run, not only while converting: a signal during a backoff or an
    // inspection cancels the job as well, and is recorded.
    let _signals = oneshot::Interrupt::install();
    let bytes = match read_spec(spec_path) {
        Ok(bytes) => bytes,
        Err(e) => return invalid_end(format!("cannot read the job spec {}: {e}", spec_path.display())),
    };
    match spec::parse(&bytes) {
        Ok(spec) => Job::start(spec, started),
        Err(invalid) => record_invalid(&invalid, started),
    }
}

fn read_spec(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    // Followed if a symlink: a Kubernetes ConfigMap mounts its keys as symlinks.
    std::fs::File::open(path)?.take(MAX_SPEC_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(std::io::Error::other(format!("it is larger than {MAX_SPEC_BYTES} bytes")));
    }
    Ok(bytes)
}

fn invalid_end(message: String) -> RunEnd {
    RunEnd { exit_code: EXIT_INVALID, message: Some(message), result: None }
}

/// A spec that cannot run: recorded as failed in its state file when it names its job and
/// output path well enough, told on stderr in every case.
fn record_invalid(invalid: &Invalid, started: DateTime<Utc>) -> RunEnd {
    let message = invalid.to_string();
    let (Some(job_id), Some(output)) = (&invalid.job_id, &invalid.output_path) else {
        return invalid_end(message);
    };
    if std::fs::create_dir_all(output).is_err() {
        return invalid_end(message);
    }
    let events = EventLog::new(events::run_events_file(output, job_id), job_id);
    let result = Machine::create(output, job_id, None).and_then(|mut machine| {
        events.append("failed", &message, None);
        let result = JobResult {
            job_id: job_id.clone(),
            version: String::new(),
            operation: None,
            state: State::Failed,
            exit_code: EXIT_INVALID,
            attempts: 0,
            started_at: started,
            finished_at: Utc::now(),
            seconds: 0.0,
            image: None,
            outputs: Vec::new(),
            inspection: None,
            error: Some(message.clone()),
            warnings: Vec::new(),
        };
        let line = write_result(output, &result)?;
        machine.transition(State::Failed, &message)?;
        Ok(line)
    });
    RunEnd { exit_code: EXIT_INVALID, message: Some(message), result: result.ok() }
}

/// Writes the result file; returns it as one line.
fn write_result(output: &Path, result: &JobResult) -> std::io::Result<String> {
    let pretty = serde_json::to_vec_pretty(result).map_err(std::io::Error::other)?;
    write_atomically(&state::result_file(output, &result.job_id), &pretty)?;
    serde_json::to_string(result).map_err(std::io::Error::other)
}

/// Why an attempt did not complete.
#[derive(Debug)]
enum AttemptError {
    /// Another attempt could succeed (I/O, space, a tool, the time limit).
    Transient(String),
    /// The image is at fault; another attempt would fail the same way.
    Permanent(String),
    /// The time limit passed.
    TimedOut,
    /// A signal asked the job to stop.
    Cancelled,
}

/// What an attempt produced.
enum Produced {
    Outputs(Vec<OutputFile>),
    Inspection(serde_json::Value),
}

/// A job being run.
struct Job {
    spec: JobSpec,
    machine: Machine,
    events: EventLog,
    started: DateTime<Utc>,
    clock: Instant,
}

impl Job {
    fn start(spec: JobSpec, started: DateTime<Utc>) -> RunEnd {
        let output = spec.output_path.clone();
        if let Err(e) = std::fs::create_dir_all(&output) {
            return RunEnd {
                exit_code: EXIT_FAILED,
                message: Some(format!(
                    "cannot create artifacts.output_path {}: {e}; check that the volume is mounted and writable",
                    output.display()
                )),
                result: None,
            };
        }
        if let Some(done) = already_completed(&spec) {
            return done;
        }
        let machine = match Machine::create(&output, &spec.job_id, Some(spec.operation.as_str())) {
            Ok(machine) => machine,
            Err(e) => {
                return RunEnd {
                    exit_code: EXIT_FAILED,
                    message: Some(format!(
                        "cannot write the job's state file in {}: {e}; check that it is writable",
                        output.display()
                    )),
                    result: None,
                }
            }
        };
        let events = EventLog::new(events::run_events_file(&output, &spec.job_id), &spec.job_id);
        let mut job = Job { spec, machine, events, started, clock: Instant::now() };
        job.execute()
    }

    fn execute(&mut self) -> RunEnd {
        for warning in &self.spec.warnings {
            warn!(job_id = %self.spec.job_id, "{warning}");
            self.events.append("validate", &format!("warning: {warning}"), None);
        }
        if self.spec.operation == Operation::OfflineFix {
            let message = "The offline_fix operation is not supported by this build: hyper2kvm has no guest fixing yet; run convert, then repair the guest with a tool that does.";
            return self.end(State::Failed, EXIT_UNSUPPORTED, 0, Err(message.to_owned()));
        }
        let valid = format!("job spec version {} is valid", self.spec.version);
        self.events.append("validate", &valid, None);
        if let Err(e) = self.machine.transition(State::Validated, &valid) {
            return self.state_write_failed(&e);
        }
        let attempts = self.spec.policy.retries + 1;
        let mut attempt = 1;
        loop {
            if let Some(signal) = oneshot::interrupted() {
                return self.cancelled(signal, attempt - 1);
            }
            let reason = format!("attempt {attempt} of {attempts}");
            if let Err(e) = self.machine.start_attempt(attempt, &reason) {
                return self.state_write_failed(&e);
            }
            info!(job_id = %self.spec.job_id, operation = self.spec.operation.as_str(), "{reason}");
            let error = match self.attempt() {
                Ok(produced) => return self.end(State::Completed, EXIT_COMPLETED, attempt, Ok(produced)),
                Err(error) => error,
            };
            if let Some(signal) = oneshot::interrupted() {
                return self.cancelled(signal, attempt);
            }
            let (text, exit_code) = match &error {
                AttemptError::Cancelled => return self.cancelled(libc::SIGTERM, attempt),
                AttemptError::Permanent(text) => {
                    return self.end(State::Failed, EXIT_FAILED, attempt, Err(text.clone()));
                }
                AttemptError::TimedOut => (self.timeout_text(), EXIT_TIMED_OUT),
                AttemptError::Transient(text) => (text.clone(), EXIT_FAILED),
            };
            if attempt >= attempts {
                let text = if attempts > 1 { format!("{text} (after {attempts} attempts)") } else { text };
                return self.end(State::Failed, exit_code, attempt, Err(text));
            }
            attempt += 1;
            let wait = self.spec.policy.backoff_before(attempt);
            let note = format!("attempt {} failed: {text}; retrying in {:.1} s", attempt - 1, wait.as_secs_f64());
            warn!(job_id = %self.spec.job_id, "{note}");
            self.events.append("retry", &note, None);
            // A signal during the wait is seen at the top of the loop.
            wait_unless_signalled(wait);
        }
    }

    fn timeout_text(&self) -> String {
        let limit = self.spec.policy.timeout.unwrap_or(NO_LIMIT).as_secs_f64();
        format!(
            "The {} ran past execution_policy.timeout_seconds ({limit} s); raise it or check the speed of the storage.",
            self.spec.operation.as_str()
        )
    }

    /// One attempt at the operation, under the time limit.
    fn attempt(&self) -> Result<Produced, AttemptError> {
        let control = JobControl::new(self.spec.policy.timeout.unwrap_or(NO_LIMIT));
        let image = &self.spec.image;
        match self.spec.operation {
            Operation::Inspect => {
                self.events.append("inspect", &format!("inspecting {}", image.path.display()), None);
                let inspection = oneshot::inspect_with(&image.path, image.format, &control).map_err(classify)?;
                control.check().map_err(classify)?;
                self.events.append("inspect", "inspected", Some(100.0));
                Ok(Produced::Inspection(inspection))
            }
            Operation::Convert => {
                let destination = self.spec.output_path.join(&self.spec.output_name);
                if std::fs::symlink_metadata(&destination).is_ok() {
                    return Err(AttemptError::Permanent(format!(
                        "The output {} already exists; remove it or choose another parameters.output_name.",
                        destination.display()
                    )));
                }
                let what = format!("converting {} to {}", image.path.display(), destination.display());
                self.events.append("convert", &what, Some(0.0));
                let compression = self.spec.compression;
                let written = events::with_progress_events(&self.events, &control, &self.spec.output_name, || {
                    oneshot::convert_with(&image.path, image.format, &destination, compression, &control)
                })
                .map_err(classify)?;
                self.events.append("convert", "converted", Some(100.0));
                let outputs = written
                    .into_iter()
                    .map(|path| OutputFile { bytes: std::fs::metadata(&path).map_or(0, |m| m.len()), path })
                    .collect();
                Ok(Produced::Outputs(outputs))
            }
            Operation::OfflineFix => Err(AttemptError::Permanent("offline_fix is not supported".into())),
        }
    }

    fn cancelled(&mut self, signal: i32, attempts: u32) -> RunEnd {
        let name = nix::sys::signal::Signal::try_from(signal).map_or("a signal", |s| s.as_str());
        let message = format!("The job was cancelled by {name}; nothing was written under the output's name.");
        let code = EXIT_SIGNAL_BASE.saturating_add(u8::try_from(signal).unwrap_or(15));
        self.end(State::Cancelled, code, attempts, Err(message))
    }

    fn state_write_failed(&self, e: &std::io::Error) -> RunEnd {
        RunEnd {
            exit_code: EXIT_FAILED,
            message: Some(format!("cannot write the job's state file in {}: {e}", self.spec.output_path.display())),
            result: None,
        }
    }

    /// Ends the job: its last event, its result file, then its terminal state — in that order,
    /// so that whoever sees the state sees the result and every event too.
    fn end(&mut self, state: State, exit_code: u8, attempts: u32, outcome: Result<Produced, String>) -> RunEnd {
        let spec = &self.spec;
        let (outputs, inspection, error) = match outcome {
            Ok(Produced::Outputs(outputs)) => (outputs, None, None),
            Ok(Produced::Inspection(value)) => (Vec::new(), Some(value), None),
            Err(error) => (Vec::new(), None, Some(error)),
        };
        let summary = match (&error, &outputs) {
            (Some(error), _) => error.clone(),
            (None, outputs) if !outputs.is_empty() => format!("completed: wrote {}", outputs[0].path.display()),
            (None, _) => "completed".to_owned(),
        };
        self.events.append(state.as_str(), &summary, (state == State::Completed).then_some(100.0));
        let result = JobResult {
            job_id: spec.job_id.clone(),
            version: spec.version.clone(),
            operation: Some(spec.operation),
            state,
            exit_code,
            attempts,
            started_at: self.started,
            finished_at: Utc::now(),
            seconds: self.clock.elapsed().as_secs_f64(),
            image: Some(ImageView { path: spec.image.path.clone(), format: spec.image.format.as_str() }),
            outputs,
            inspection,
            error: error.clone(),
            warnings: spec.warnings.clone(),
        };
        let written = write_result(&spec.output_path, &result);
        let recorded = self.machine.transition(state, &summary);
        match (written, recorded) {
            (Ok(line), Ok(())) => RunEnd { exit_code, message: error, result: Some(line) },
            (Err(e), _) | (_, Err(e)) => RunEnd {
                exit_code: if exit_code == EXIT_COMPLETED { EXIT_FAILED } else { exit_code },
                message: Some(format!(
                    "{summary}; and the job's result or state could not be written in {}: {e}",
                    spec.output_path.display()
                )),
                result: None,
            },
        }
    }
}

/// A spec whose job already completed (its state file says so and its result is there) is
/// not run again: a Kubernetes Job may start the same spec again when the pod that completed
/// it was lost before its completion was seen.
fn already_completed(spec: &JobSpec) -> Option<RunEnd> {
    let file = state::JobStateFile::read(&state::state_file(&spec.output_path, &spec.job_id)).ok()?;
    if file.state != State::Completed {
        return None;
    }
    let result = std::fs::read(state::result_file(&spec.output_path, &spec.job_id)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&result).ok()?;
    info!(job_id = %spec.job_id, "the job already completed; nothing to do");
    Some(RunEnd { exit_code: EXIT_COMPLETED, message: None, result: serde_json::to_string(&value).ok() })
}

/// Waits `wait`, or less when a signal comes.
fn wait_unless_signalled(wait: Duration) {
    let began = Instant::now();
    while began.elapsed() < wait && oneshot::interrupted().is_none() {
        std::thread::sleep(WAIT_STEP.min(wait.saturating_sub(began.elapsed())));
    }
}

/// Sorts a conversion error into what the retry policy needs.
fn classify(error: ConvertError) -> AttemptError {
    match error {
        ConvertError::TimedOut => AttemptError::TimedOut,
        ConvertError::Cancelled | ConvertError::LockLost => AttemptError::Cancelled,
        ConvertError::Corrupt(_) | ConvertError::Unsupported(_) => AttemptError::Permanent(sentence(&error)),
        other => AttemptError::Transient(sentence(&other)),
    }
}

/// An error's text as a sentence.
fn sentence(error: &ConvertError) -> String {
    let text = error.to_string();
    let mut chars = text.chars();
    let capital = chars.next().map(|c| c.to_uppercase().chain(chars).collect::<String>()).unwrap_or_default();
    if capital.ends_with(['.', '?', '!']) {
        capital
    } else {
        format!("{capital}.")
    }
}
