//! Job records (`done/` and `failed/`): what `status` reads, and what shows from outside that
//! each manifest was done once. The per-job event logs are in [`crate::events`].
//!
//! It writes a record once a job has ended and reads them back; it decides no outcome.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::layout::{Layout, Outcome};

pub(crate) use crate::events::EventLog;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Done,
    Failed,
}

/// The record of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    /// The name results are published under (may be unsafe, and then was not used).
    pub vm_name: String,
    pub host: String,
    pub instance: Option<String>,
    /// The lock generation the job ended under: above 1 means it was taken over.
    #[serde(default = "first_generation")]
    pub generation: u64,
    pub state: JobState,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The manifest's file name in WATCH_DIR.
    pub manifest_name: String,
    /// Stage reached (the failing stage for a failed job).
    pub stage: String,
    /// The published boot disk, or the `.error` file, when there is one.
    pub result_file: Option<PathBuf>,
    /// First line of the error, for failed jobs.
    pub error: Option<String>,
    /// The rest of the cause chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<String>,
    /// Sizes of the source disk files in bytes, boot disk first (done jobs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_bytes: Vec<u64>,
}

fn first_generation() -> u64 {
    1
}

/// Writes a file under a temporary name, fsyncs it, and renames it into place.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Every finished job recorded under `done/` and `failed/`, oldest first.
pub(crate) fn finished_jobs(layout: &Layout) -> Vec<JobRecord> {
    let mut jobs: Vec<JobRecord> = [Outcome::Done, Outcome::Failed]
        .into_iter()
        .flat_map(|o| dated_dirs(&layout.outcome_root(o)))
        .flat_map(|(_, dir)| read_records(&dir))
        .collect();
    jobs.sort_by_key(|j| (j.finished_at, j.job_id.clone()));
    jobs
}

fn read_records(dir: &Path) -> Vec<JobRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".json") && !name.ends_with(".manifest.json") && !name.starts_with('.')
        })
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect()
}

/// `(date, path)` of each `YYYY-MM-DD` directory under `root`.
fn dated_dirs(root: &Path) -> Vec<(NaiveDate, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let date = NaiveDate::parse_from_str(&e.file_name().to_string_lossy(), "%Y-%m-%d").ok()?;
            Some((date, e.path()))
        })
        .collect()
}

/// Removes the dated directories of `outcome` older than `days` days. Returns how many went.
pub(crate) fn prune(layout: &Layout, outcome: Outcome, days: u32, today: NaiveDate) -> std::io::Result<usize> {
    let mut removed = 0;
    for (date, dir) in dated_dirs(&layout.outcome_root(outcome)) {
        if (today - date).num_days() > i64::from(days) {
            std::fs::remove_dir_all(dir)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_only_old_dated_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.ensure().unwrap();
        for date in ["2026-01-01", "2026-01-05", "2026-01-08"] {
            std::fs::create_dir_all(layout.outcome_dir(Outcome::Done, date)).unwrap();
        }
        std::fs::create_dir_all(layout.outcome_root(Outcome::Done).join("not-a-date")).unwrap();
        let today = NaiveDate::from_ymd_opt(2026, 1, 8).unwrap();
        assert_eq!(prune(&layout, Outcome::Done, 3, today).unwrap(), 1);
        assert!(!layout.outcome_dir(Outcome::Done, "2026-01-01").exists());
        assert!(layout.outcome_dir(Outcome::Done, "2026-01-05").exists());
        assert!(layout.outcome_root(Outcome::Done).join("not-a-date").exists());
    }

    #[test]
    fn write_atomically_replaces_the_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
