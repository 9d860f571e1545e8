//! A `run` job's state machine, persisted in `<output_path>/<job_id>.state.json`:
//! created → validated → running → completed | failed | cancelled, each transition in the
//! history with its time and reason. The file is replaced atomically (temporary name, fsync,
//! rename) at each transition, so a reader — `hyper2kvm events --follow`, a controller polling
//! the volume — sees one whole state or the previous one.
//!
//! It records transitions and refuses the ones the machine does not allow; [`super::run`]
//! decides them.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::queue::records::write_atomically;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The spec was read far enough to name the job and its output path; the state file is written.
    Created,
    /// The spec is valid and its operation supported; no attempt has started yet.
    Validated,
    /// An attempt is running, or the job waits out a backoff before the next one.
    Running,
    /// The operation succeeded (exit status 0).
    Completed,
    /// The spec was invalid or unsupported, or the last attempt failed or timed out.
    Failed,
    /// A signal (SIGTERM, SIGINT) stopped the job; nothing was written under the output's name.
    Cancelled,
}

impl State {
    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Completed | State::Failed | State::Cancelled)
    }

    /// The name as the state file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Validated => "validated",
            State::Running => "running",
            State::Completed => "completed",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// Whether the machine may go from `self` to `next`. `running → running` is a retry; a
    /// job may be created again after any state (the same spec run again, e.g. by a restarted
    /// pod); a job that cannot be validated fails from `created`.
    pub fn may_become(self, next: State) -> bool {
        use State::*;
        matches!(
            (self, next),
            (_, Created)
                | (Created, Validated)
                | (Created, Failed)
                | (Validated, Running)
                | (Validated, Failed)
                | (Validated, Cancelled)
                | (Running, Running)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Cancelled)
        )
    }
}

/// One transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The state entered.
    pub state: State,
    /// When (UTC).
    pub at: DateTime<Utc>,
    /// Why, for a person: the attempt, the error, the signal.
    pub reason: String,
}

/// The state file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStateFile {
    /// The spec's `job_id`.
    pub job_id: String,
    /// The operation, when the spec named a known one.
    pub operation: Option<String>,
    /// The current state: the last transition's.
    pub state: State,
    /// The attempt running or last run (1 for the first).
    pub attempt: u32,
    /// When the file was last written.
    pub updated_at: DateTime<Utc>,
    /// Every transition, oldest first (the middle dropped beyond 200).
    pub history: Vec<Transition>,
}

/// The history kept: a job retried many times, or re-run many times, keeps its first and
/// latest transitions.
const MAX_HISTORY: usize = 200;

/// `<output_path>/<job_id>.state.json`.
pub fn state_file(output_path: &Path, job_id: &str) -> PathBuf {
    output_path.join(format!("{job_id}.state.json"))
}

/// `<output_path>/<job_id>.result.json`.
pub fn result_file(output_path: &Path, job_id: &str) -> PathBuf {
    output_path.join(format!("{job_id}.result.json"))
}

impl JobStateFile {
    /// Reads a state file.
    pub fn read(path: &Path) -> std::io::Result<JobStateFile> {
        let bytes = crate::publish::read_small(path)?;
        serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// A job's state machine and the file it is kept in.
#[derive(Debug)]
pub struct Machine {
    path: PathBuf,
    file: JobStateFile,
}

impl Machine {
    /// A job `created` now: a new file, or the history of an earlier run of the same job
    /// continued (a state file that cannot be read is started afresh).
    pub fn create(output_path: &Path, job_id: &str, operation: Option<&str>) -> std::io::Result<Machine> {
        let path = state_file(output_path, job_id);
        let earlier = JobStateFile::read(&path).ok();
        let reason = match &earlier {
            Some(e) => format!("run again; the previous run ended {}", e.state.as_str()),
            None => "job spec read".to_owned(),
        };
        let now = Utc::now();
        let mut file = earlier.unwrap_or_else(|| JobStateFile {
            job_id: job_id.to_owned(),
            operation: None,
            state: State::Created,
            attempt: 0,
            updated_at: now,
            history: Vec::new(),
        });
        file.operation = operation.map(str::to_owned);
        file.attempt = 0;
        let mut machine = Machine { path, file };
        machine.push(State::Created, &reason)?;
        Ok(machine)
    }

    /// Goes to `next` for `reason` and writes the file. A transition the machine does not
    /// allow is a bug, refused.
    pub fn transition(&mut self, next: State, reason: &str) -> std::io::Result<()> {
        if self.file.history.last().is_some() && !self.file.state.may_become(next) {
            return Err(std::io::Error::other(format!(
                "job state cannot go from {} to {}",
                self.file.state.as_str(),
                next.as_str()
            )));
        }
        self.push(next, reason)
    }

    /// Starts attempt `attempt` (running).
    pub fn start_attempt(&mut self, attempt: u32, reason: &str) -> std::io::Result<()> {
        self.file.attempt = attempt;
        self.transition(State::Running, reason)
    }

    fn push(&mut self, state: State, reason: &str) -> std::io::Result<()> {
        let now = Utc::now();
        self.file.state = state;
        self.file.updated_at = now;
        self.file.history.push(Transition { state, at: now, reason: reason.to_owned() });
        if self.file.history.len() > MAX_HISTORY {
            self.file.history.drain(MAX_HISTORY / 2..self.file.history.len() - MAX_HISTORY / 2);
        }
        let bytes = serde_json::to_vec_pretty(&self.file).map_err(std::io::Error::other)?;
        write_atomically(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_written_with_their_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Machine::create(dir.path(), "j", Some("convert")).unwrap();
        m.transition(State::Validated, "valid").unwrap();
        m.start_attempt(1, "attempt 1 of 2").unwrap();
        m.start_attempt(2, "attempt 2 of 2").unwrap();
        m.transition(State::Completed, "done").unwrap();
        let file = JobStateFile::read(&state_file(dir.path(), "j")).unwrap();
        let states: Vec<&str> = file.history.iter().map(|t| t.state.as_str()).collect();
        assert_eq!(states, ["created", "validated", "running", "running", "completed"]);
        assert_eq!(file.history[3].reason, "attempt 2 of 2");
        assert_eq!((file.state, file.attempt), (State::Completed, 2));
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn forbidden_transitions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Machine::create(dir.path(), "j", None).unwrap();
        assert!(m.transition(State::Running, "skipping validation").is_err());
        assert!(m.transition(State::Completed, "from nowhere").is_err());
        m.transition(State::Failed, "invalid spec").unwrap();
        assert!(m.transition(State::Running, "after the end").is_err());
        assert!(!State::Completed.may_become(State::Failed));
    }

    #[test]
    fn a_second_run_continues_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Machine::create(dir.path(), "j", None).unwrap();
        m.transition(State::Failed, "invalid").unwrap();
        let m = Machine::create(dir.path(), "j", Some("inspect")).unwrap();
        assert_eq!(m.file.history.len(), 3);
        assert_eq!(m.file.history[2].reason, "run again; the previous run ended failed");
    }
}
