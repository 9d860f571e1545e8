//! Where queue state lives: `WATCH_DIR/.hyper2kvm/`, on the same filesystem as the queue so
//! that every move between them is an atomic rename.
//!
//! ```text
//! WATCH_DIR/
//!   artifact-manifest.json          dropped by a producer, waiting
//!   .hyper2kvm/
//!     claimed/<job>.json            manifest taken by a daemon (renamed here at claim)
//!     locks/<job>.lock              owner record; mtime is the heartbeat
//!     logs/<job>.log                event log of a running job (JSON lines)
//!     done/<YYYY-MM-DD>/<job>.json  record of a finished job (+ .manifest.json, .log)
//!     failed/<YYYY-MM-DD>/<job>.json
//!     quarantine/<lock file>.<random>  damaged lock records, kept for inspection (never read)
//! ```
//!
//! A job id has the form `<YYYYMMDDTHHMMSSZ>-<16 hex digits>` (see `lock::is_job_id`); only
//! names of that form in `claimed/` and `locks/` are jobs, so no job id can be a path.

use std::path::{Path, PathBuf};

/// Paths of the queue's state directories.
#[derive(Debug, Clone)]
pub struct Layout {
    watch_dir: PathBuf,
    state: PathBuf,
}

/// The two ends of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Done,
    Failed,
}

impl Outcome {
    fn dir_name(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
        }
    }
}

impl Layout {
    /// The layout under `watch_dir`.
    pub fn new(watch_dir: &Path) -> Layout {
        Layout { watch_dir: watch_dir.to_owned(), state: watch_dir.join(".hyper2kvm") }
    }

    /// Creates every directory that is missing.
    pub fn ensure(&self) -> std::io::Result<()> {
        for dir in [
            self.claimed_dir(),
            self.locks_dir(),
            self.logs_dir(),
            self.outcome_root(Outcome::Done),
            self.outcome_root(Outcome::Failed),
            self.quarantine_dir(),
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    pub fn watch_dir(&self) -> &Path {
        &self.watch_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn claimed_dir(&self) -> PathBuf {
        self.state.join("claimed")
    }

    pub fn locks_dir(&self) -> PathBuf {
        self.state.join("locks")
    }

    /// Where damaged lock records are moved by the takeover that meets them.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.state.join("quarantine")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.state.join("logs")
    }

    /// `done/` or `failed/`, holding one directory per day.
    pub fn outcome_root(&self, outcome: Outcome) -> PathBuf {
        self.state.join(outcome.dir_name())
    }

    /// The dated directory where a job finishing on `date` (`YYYY-MM-DD`) is recorded.
    pub fn outcome_dir(&self, outcome: Outcome, date: &str) -> PathBuf {
        self.outcome_root(outcome).join(date)
    }

    /// The record of a job that ended on `finished_at`'s UTC day.
    pub fn record_file(&self, outcome: Outcome, finished_at: chrono::DateTime<chrono::Utc>, job_id: &str) -> PathBuf {
        self.outcome_dir(outcome, &finished_at.format("%Y-%m-%d").to_string()).join(format!("{job_id}.json"))
    }

    pub fn claimed_manifest(&self, job_id: &str) -> PathBuf {
        self.claimed_dir().join(format!("{job_id}.json"))
    }

    pub fn lock_file(&self, job_id: &str) -> PathBuf {
        self.locks_dir().join(format!("{job_id}.lock"))
    }

    pub fn event_log(&self, job_id: &str) -> PathBuf {
        self.logs_dir().join(format!("{job_id}.log"))
    }
}

/// Whether a name in WATCH_DIR may be a manifest: `*.json`, not hidden, not a temp or lock file.
pub(crate) fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && name.ends_with(".json")
        && ![".tmp", ".part", ".lock"].iter().any(|suffix| name.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names() {
        assert!(is_manifest_name("artifact-manifest.json"));
        assert!(is_manifest_name("vm 1.json"));
        assert!(!is_manifest_name(".artifact-manifest.json"));
        assert!(!is_manifest_name("x.json.tmp"));
        assert!(!is_manifest_name("x.tmp"));
        assert!(!is_manifest_name("x.part"));
        assert!(!is_manifest_name("x.lock"));
        assert!(!is_manifest_name("README"));
    }
}
