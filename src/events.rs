//! Progress events of a job, as JSON Lines: `{job_id, timestamp, phase, progress_percent,
//! message}`, one object a line, appended while the job runs.
//!
//! A daemon job writes them to `WATCH_DIR/.hyper2kvm/logs/<job>.log` (moved beside its record
//! in `done/` or `failed/` when it ends); a `hyper2kvm run` job to
//! `<artifacts.output_path>/<job>.events.jsonl`. `hyper2kvm events` finds either ([`locate`]),
//! prints them and follows them by polling ([`follow`]): the queue is usually on NFS, where
//! another host's appends raise no inotify event.
//!
//! It records and shows; it decides nothing about a job, and a failed append never fails one
//! (it is logged at debug level).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::Config;
use crate::convert::JobControl;
use crate::queue::layout::{Layout, Outcome};

/// One line of a job's event log.
///
/// Lines written before these names existed (`at`, `stage`, `percent`, no `job_id`) still
/// read: the old names are aliases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The job the event belongs to (empty in lines written before it was recorded).
    #[serde(default)]
    pub job_id: String,
    /// When the event happened (UTC, RFC 3339).
    #[serde(alias = "at")]
    pub timestamp: DateTime<Utc>,
    /// The job's stage: `claim`, `checksum`, `inspect`, `convert`, `libvirt`, `publish`, `done`
    /// or `failed` for a daemon job; `validate`, `inspect`, `convert`, `completed`, `failed`, `cancelled`
    /// for a `run` job.
    #[serde(alias = "stage")]
    pub phase: String,
    /// How far the job's current conversion is, when known (0–100).
    #[serde(alias = "percent")]
    pub progress_percent: Option<f64>,
    /// What happened, for a person.
    pub message: String,
}

/// Appends events to a job's log. Failures to log never fail the job.
#[derive(Debug, Clone)]
pub struct EventLog {
    path: PathBuf,
    job_id: String,
}

impl EventLog {
    /// The log of job `job_id` at `path` (created at the first append).
    pub fn new(path: PathBuf, job_id: &str) -> EventLog {
        EventLog { path, job_id: job_id.to_owned() }
    }

    /// Appends one event. One `write` of a whole line to a file opened for appending, so that
    /// a reader never sees two events interleaved.
    pub fn append(&self, phase: &str, message: &str, percent: Option<f64>) {
        let event = Event {
            job_id: self.job_id.clone(),
            timestamp: Utc::now(),
            phase: phase.to_owned(),
            progress_percent: percent.map(|p| (p * 10.0).round() / 10.0),
            message: message.to_owned(),
        };
        let Ok(mut line) = serde_json::to_vec(&event) else { return };
        line.push(b'\n');
        let result = OpenOptions::new().create(true).append(true).open(&self.path).and_then(|mut f| f.write_all(&line));
        if let Err(e) = result {
            tracing::debug!(path = %self.path.display(), error = %e, "could not append to the job's event log");
        }
    }

    /// The newest event, if any.
    pub fn last(path: &Path) -> Option<Event> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().rev().find_map(|l| serde_json::from_str(l).ok())
    }
}

/// Every [`PROGRESS_STEP`] percent of a conversion, one `convert` event.
pub const PROGRESS_STEP: f64 = 10.0;

/// How often a running conversion's progress is looked at for events.
const PROGRESS_POLL: Duration = Duration::from_millis(500);

/// Runs `work` (a conversion advancing `control`'s progress) while a thread appends a
/// `convert` event to `log` each time the conversion passes another [`PROGRESS_STEP`]
/// percent, so that a follower sees a long conversion move.
pub fn with_progress_events<T>(log: &EventLog, control: &JobControl, label: &str, work: impl FnOnce() -> T) -> T {
    let finished = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut reported = 0u32;
            while !finished.load(Ordering::SeqCst) {
                std::thread::park_timeout(PROGRESS_POLL);
                let Some(percent) = control.progress.percent() else { continue };
                let step = (percent / PROGRESS_STEP).floor() as u32;
                // The next disk of a job starts again from 0.
                reported = reported.min(step);
                if step > reported && percent < 100.0 {
                    reported = step;
                    log.append("convert", &format!("converting {label}: {percent:.0}%"), Some(percent));
                }
            }
        });
        let result = work();
        finished.store(true, Ordering::SeqCst);
        watcher.thread().unpark();
        let _ = watcher.join();
        result
    })
}

/// Why `hyper2kvm events` cannot show a job.
#[derive(Debug, Error)]
pub enum EventsError {
    /// The job id given is empty, hidden, has a `/` or a control character, or is too long.
    #[error("{0:?} is not a job id (a job id is a file name: no '/', not starting with '.')")]
    BadJobId(String),
    /// Neither the queue nor the output directory has a log, record, lock or state of the job.
    #[error("no job {job_id} was found: not in the queue's state directory {queue} nor as a run job in {output}; check the id (hyper2kvm status lists the daemon's jobs) and --watch-dir/--output-dir")]
    Unknown {
        /// The job id looked for.
        job_id: String,
        /// The queue's state directory looked in (`WATCH_DIR/.hyper2kvm`).
        queue: String,
        /// The output directory looked in for a `run` job.
        output: String,
    },
    /// The job's event log exists but could not be opened or read.
    #[error("cannot read the events of job {job_id} from {path}: {source}")]
    Read {
        /// The job whose events were read.
        job_id: String,
        /// The event log's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Printing the events to standard output failed (a closed pipe, say).
    #[error("cannot write the events: {0}")]
    Write(std::io::Error),
    /// `--poll` is not a number of seconds (NaN).
    #[error(transparent)]
    Poll(#[from] std::time::TryFromFloatSecsError),
}

/// Where a job's events are, and how to tell that it has ended.
#[derive(Debug, Clone)]
pub enum Located {
    /// A daemon job, under WATCH_DIR/.hyper2kvm.
    Queue {
        /// The queue's layout under WATCH_DIR.
        layout: Layout,
        /// The daemon job's id.
        job_id: String,
    },
    /// A `hyper2kvm run` job, in its output path.
    Run {
        /// The run's output directory (`artifacts.output_path`), where its events file is.
        dir: PathBuf,
        /// The run job's id.
        job_id: String,
    },
}

/// The events file of a `run` job `job_id` writing to `dir`.
pub fn run_events_file(dir: &Path, job_id: &str) -> PathBuf {
    dir.join(format!("{job_id}.events.jsonl"))
}

/// Refuses a job id that could name a file elsewhere than where it is looked for.
pub fn check_job_id(job_id: &str) -> Result<(), EventsError> {
    let bad = job_id.is_empty()
        || job_id.starts_with('.')
        || job_id.contains('/')
        || job_id.chars().any(char::is_control)
        || job_id.len() > 200;
    if bad {
        Err(EventsError::BadJobId(job_id.to_owned()))
    } else {
        Ok(())
    }
}

/// Finds job `job_id`: first in the queue under `watch_dir` (running, or recorded in `done/`
/// or `failed/`), then as a `run` job writing to `output_dir`.
pub fn locate(job_id: &str, watch_dir: &Path, output_dir: &Path) -> Result<Located, EventsError> {
    check_job_id(job_id)?;
    let layout = Layout::new(watch_dir);
    let queue = Located::Queue { layout: layout.clone(), job_id: job_id.to_owned() };
    if queue.log_path().is_some() || queue.is_terminal() || layout.lock_file(job_id).exists() {
        return Ok(queue);
    }
    let run = Located::Run { dir: output_dir.to_owned(), job_id: job_id.to_owned() };
    if run.log_path().is_some() || crate::worker::state::state_file(output_dir, job_id).exists() {
        return Ok(run);
    }
    Err(EventsError::Unknown {
        job_id: job_id.to_owned(),
        queue: layout.state_dir().display().to_string(),
        output: output_dir.display().to_string(),
    })
}

impl Located {
    fn job_id(&self) -> &str {
        match self {
            Located::Queue { job_id, .. } | Located::Run { job_id, .. } => job_id,
        }
    }

    /// The job's event log where it is now: a daemon job's moves from `logs/` to beside its
    /// record when the job ends.
    pub fn log_path(&self) -> Option<PathBuf> {
        match self {
            Located::Queue { layout, job_id } => {
                let running = layout.event_log(job_id);
                if running.exists() {
                    return Some(running);
                }
                record_file(layout, job_id).map(|record| record.with_file_name(format!("{job_id}.log")))
            }
            Located::Run { dir, job_id } => Some(run_events_file(dir, job_id)).filter(|p| p.exists()),
        }
    }

    /// Whether the job has ended: its record is in `done/` or `failed/`, or its run state is
    /// completed, failed or cancelled.
    pub fn is_terminal(&self) -> bool {
        match self {
            Located::Queue { layout, job_id } => record_file(layout, job_id).is_some(),
            Located::Run { dir, job_id } => {
                crate::worker::state::JobStateFile::read(&crate::worker::state::state_file(dir, job_id))
                    .is_ok_and(|s| s.state.is_terminal())
            }
        }
    }

    /// Whether a daemon job is gone without an end: given back to the queue at a daemon's
    /// shutdown (its log removed, its manifest requeued under a new job id).
    fn is_released(&self) -> bool {
        match self {
            Located::Queue { layout, job_id } => {
                !layout.event_log(job_id).exists() && !layout.lock_file(job_id).exists() && !self.is_terminal()
            }
            Located::Run { .. } => false,
        }
    }
}

/// The record of a finished daemon job, in any dated directory of `done/` or `failed/`.
fn record_file(layout: &Layout, job_id: &str) -> Option<PathBuf> {
    [Outcome::Done, Outcome::Failed].into_iter().find_map(|outcome| {
        let days = std::fs::read_dir(layout.outcome_root(outcome)).ok()?;
        days.flatten().map(|day| day.path().join(format!("{job_id}.json"))).find(|p| p.is_file())
    })
}

/// Which events to show, and how.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only events of this phase.
    pub phase: Option<String>,
    /// As JSON lines (the log's own format) rather than one readable line each.
    pub json: bool,
}

impl Filter {
    fn show(&self, event: &Event, out: &mut impl Write) -> std::io::Result<()> {
        if self.phase.as_deref().is_some_and(|p| p != event.phase) {
            return Ok(());
        }
        if self.json {
            let line = serde_json::to_string(event).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
        } else {
            let percent = event.progress_percent.map(|p| format!("{p:>5.1}%")).unwrap_or_else(|| " ".repeat(6));
            let at = event.timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            writeln!(out, "{at}  {:<9} {percent}  {}", event.phase, event.message)?;
        }
        out.flush()
    }
}

/// Reads a log from `offset` on, showing each complete line; returns the offset after the
/// last complete line (a line still being written is read again next time).
fn show_from(
    path: &Path,
    offset: u64,
    job_id: &str,
    filter: &Filter,
    out: &mut impl Write,
) -> Result<u64, EventsError> {
    let read_error = |source| EventsError::Read { job_id: job_id.to_owned(), path: path.display().to_string(), source };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        // Moved between the look and the open: read again at the next round.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(e) => return Err(read_error(e)),
    };
    file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_READ).read_to_end(&mut bytes).map_err(read_error)?;
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    for line in bytes[..complete].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        // A line that is not an event (a torn write after a crash) is skipped, not fatal.
        if let Ok(event) = serde_json::from_slice::<Event>(line) {
            filter.show(&event, out).map_err(EventsError::Write)?;
        }
    }
    Ok(offset + complete as u64)
}

/// At most this much of a log is read at once: a follower never holds a huge log in memory.
const MAX_READ: u64 = 4 << 20;

/// `hyper2kvm events`: the job's events so far on stdout ([`fn@print`]), or with `follow` until it
/// ends ([`follow`], polling every `poll_seconds`, kept within 0.05–60); a job given back to
/// the queue meanwhile is said on stderr.
pub fn command(
    config: &Config,
    job_id: &str,
    filter: &Filter,
    follow: bool,
    poll_seconds: f64,
) -> Result<(), EventsError> {
    let located = locate(job_id, &config.watch_dir, &config.output_dir)?;
    let mut out = std::io::stdout().lock();
    if !follow {
        return print(&located, filter, &mut out);
    }
    let poll = Duration::try_from_secs_f64(poll_seconds.clamp(0.05, 60.0))?;
    if self::follow(&located, filter, poll, &mut out)? == FollowEnd::Released {
        eprintln!("hyper2kvm: job {job_id} was given back to the queue; its manifest runs again under a new job id");
    }
    Ok(())
}

/// Prints the job's events so far.
pub fn print(located: &Located, filter: &Filter, out: &mut impl Write) -> Result<(), EventsError> {
    let Some(path) = located.log_path() else { return Ok(()) };
    let mut offset = 0;
    loop {
        let next = show_from(&path, offset, located.job_id(), filter, out)?;
        if next == offset {
            return Ok(());
        }
        offset = next;
    }
}

/// How a followed job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowEnd {
    /// It reached a terminal state.
    Ended,
    /// A daemon gave it back to the queue; its manifest will run again under a new job id.
    Released,
}

/// How long a follower waits, after a daemon job's record appeared, for its log to move
/// beside it (the daemon writes the record first).
const ARCHIVE_WAIT: Duration = Duration::from_secs(5);

/// Prints the job's events as they are appended, polling every `poll`, until the job reaches a
/// terminal state; then prints the last ones and returns.
pub fn follow(
    located: &Located,
    filter: &Filter,
    poll: Duration,
    out: &mut impl Write,
) -> Result<FollowEnd, EventsError> {
    let mut offset = 0;
    loop {
        // Looked at before reading: every event of an ended job was written before its end.
        let terminal = located.is_terminal();
        let released = !terminal && located.is_released();
        if let Some(path) = located.log_path() {
            offset = show_from(&path, offset, located.job_id(), filter, out)?;
        }
        if terminal {
            finish_archived(located, offset, filter, out)?;
            return Ok(FollowEnd::Ended);
        }
        if released {
            return Ok(FollowEnd::Released);
        }
        std::thread::sleep(poll);
    }
}

/// Reads the rest of an ended job's log once it is in its final place.
fn finish_archived(
    located: &Located,
    mut offset: u64,
    filter: &Filter,
    out: &mut impl Write,
) -> Result<(), EventsError> {
    if let Located::Queue { layout, job_id } = located {
        let began = std::time::Instant::now();
        while layout.event_log(job_id).exists() && began.elapsed() < ARCHIVE_WAIT {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if let Some(path) = located.log_path() {
        loop {
            let next = show_from(&path, offset, located.job_id(), filter, out)?;
            if next == offset {
                break;
            }
            offset = next;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_the_job_id_and_old_lines_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.log");
        std::fs::write(
            &path,
            "{\"at\":\"2026-01-02T03:04:05Z\",\"stage\":\"convert\",\"message\":\"old\",\"percent\":42.0}\n",
        )
        .unwrap();
        let log = EventLog::new(path.clone(), "job-1");
        log.append("publish", "publishing", Some(100.0));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[1]["job_id"], "job-1");
        assert_eq!(lines[1]["phase"], "publish");
        assert_eq!(lines[1]["progress_percent"], 100.0);
        assert!(lines[1]["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", lines[1]);
        let mut out = Vec::new();
        let located = Located::Run { dir: dir.path().to_owned(), job_id: "j".into() };
        std::fs::rename(&path, run_events_file(dir.path(), "j")).unwrap();
        print(&located, &Filter { phase: Some("convert".into()), json: true }, &mut out).unwrap();
        let old: Event = serde_json::from_slice(&out).unwrap();
        assert_eq!((old.phase.as_str(), old.progress_percent, old.message.as_str()), ("convert", Some(42.0), "old"));
    }

    #[test]
    fn the_newest_event_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new(dir.path().join("j.log"), "j");
        log.append("convert", "start", None);
        log.append("convert", "progress", Some(42.0));
        let last = EventLog::last(&dir.path().join("j.log")).unwrap();
        assert_eq!(last.progress_percent, Some(42.0));
    }

    #[test]
    fn a_line_being_written_is_left_for_the_next_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.log");
        let log = EventLog::new(path.clone(), "j");
        log.append("convert", "one", None);
        let whole = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"job_id\":\"j\",").unwrap();
        let mut out = Vec::new();
        let next = show_from(&path, 0, "j", &Filter::default(), &mut out).unwrap();
        assert_eq!(next, whole);
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);
    }

    #[test]
    fn job_ids_that_are_paths_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "a\nb"] {
            assert!(matches!(check_job_id(bad), Err(EventsError::BadJobId(_))), "{bad:?}");
        }
        assert!(check_job_id("20260101T000000Z-0123456789abcdef").is_ok());
    }

    #[test]
    fn an_unknown_job_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate("nope", &dir.path().join("q"), &dir.path().join("o")).unwrap_err();
        assert!(err.to_string().starts_with("no job nope was found"), "{err}");
    }

    #[test]
    fn progress_events_follow_the_conversion_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new(dir.path().join("j.log"), "j");
        let control = JobControl::new(Duration::from_secs(60));
        control.progress.total_bytes.store(100, Ordering::SeqCst);
        with_progress_events(&log, &control, "disk-0", || {
            for done in [5, 25, 55, 0, 35] {
                control.progress.done_bytes.store(done, Ordering::SeqCst);
                std::thread::sleep(PROGRESS_POLL * 3);
            }
        });
        let text = std::fs::read_to_string(&log.path).unwrap();
        let percents: Vec<f64> =
            text.lines().map(|l| serde_json::from_str::<Event>(l).unwrap().progress_percent.unwrap()).collect();
        assert_eq!(percents, [25.0, 55.0, 35.0], "{text}");
    }
}
