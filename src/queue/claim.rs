//! Claims and lock files: the only code that decides who owns a job.
//!
//! A claim is (1) a lock file created with `O_EXCL` holding the owner record, then (2) a rename
//! of the manifest from WATCH_DIR into `claimed/<job>.json`. Exactly one renamer of a name can
//! win; the winner confirms by looking at the claimed path rather than trusting the return
//! code, because NFS can report a retransmitted rename as failed when it succeeded (and the
//! reverse). The lock's mtime is the heartbeat. Multi-host takeover builds on this interface.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::layout::{Layout, Outcome};
use super::records::{self, JobRecord};
use crate::host::{self, Identity};

/// The owner record stored in a lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub job_id: String,
    #[serde(flatten)]
    pub owner: Identity,
    /// Raised by each takeover; a daemon whose generation is superseded must not publish.
    pub generation: u64,
    pub claimed_at: DateTime<Utc>,
    /// The manifest's file name in WATCH_DIR before the claim.
    pub manifest_name: String,
}

/// A job this daemon owns.
#[derive(Debug)]
pub struct Claim {
    layout: Layout,
    record: LockRecord,
}

/// A fresh job id: UTC time for sorting, 64 random bits for uniqueness across hosts.
pub fn new_job_id() -> String {
    format!("{}-{}", Utc::now().format("%Y%m%dT%H%M%SZ"), host::random_hex())
}

/// Tries to claim the manifest `name` in WATCH_DIR. `Ok(None)` means another daemon (or the
/// producer) took it away first, which is normal.
pub fn claim(layout: &Layout, name: &str, owner: &Identity) -> std::io::Result<Option<Claim>> {
    let record = LockRecord {
        job_id: new_job_id(),
        owner: owner.clone(),
        generation: 1,
        claimed_at: Utc::now(),
        manifest_name: name.to_owned(),
    };
    let lock = layout.lock_file(&record.job_id);
    create_exclusive(&lock, &serde_json::to_vec_pretty(&record)?)?;
    let claimed = layout.claimed_manifest(&record.job_id);
    let rename_result = std::fs::rename(layout.watch_dir().join(name), &claimed);
    if claimed.exists() {
        if let Err(e) = rename_result {
            tracing::warn!(job_id = %record.job_id, error = %e, "rename reported an error but the claim is in place; keeping it");
        }
        return Ok(Some(Claim { layout: layout.clone(), record }));
    }
    remove_if_present(&lock)?;
    match rename_result {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Claim {
    pub fn job_id(&self) -> &str {
        &self.record.job_id
    }

    pub fn record(&self) -> &LockRecord {
        &self.record
    }

    /// Path of the claimed manifest.
    pub fn manifest_path(&self) -> PathBuf {
        self.layout.claimed_manifest(&self.record.job_id)
    }

    /// Path of the job's event log.
    pub fn event_log(&self) -> PathBuf {
        self.layout.event_log(&self.record.job_id)
    }

    /// The lock file's path, for a heartbeat task that outlives a borrow of the claim.
    pub fn lock_path(&self) -> PathBuf {
        self.layout.lock_file(&self.record.job_id)
    }

    /// Refreshes the lock's mtime, stamped by the file server's clock.
    pub fn heartbeat(&self) -> std::io::Result<()> {
        touch(&self.layout.lock_file(&self.record.job_id))
    }

    /// Whether the lock still exists and carries this claim's generation. Checked before every
    /// publishing rename: a daemon that lost its lock must publish nothing.
    pub fn still_owned(&self) -> std::io::Result<bool> {
        match read_lock(&self.layout.lock_file(&self.record.job_id)) {
            Ok(current) => Ok(current.owner == self.record.owner && current.generation == self.record.generation),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Records the job's end: the record and the manifest go to the dated `done/` or
    /// `failed/` directory, then the lock is removed (last, so a crash leaves the job owned).
    pub fn finish(self, record: &JobRecord) -> std::io::Result<PathBuf> {
        let outcome = if record.state == records::JobState::Done { Outcome::Done } else { Outcome::Failed };
        let dir = self
            .layout
            .outcome_dir(outcome, &record.finished_at.unwrap_or_else(Utc::now).format("%Y-%m-%d").to_string());
        std::fs::create_dir_all(&dir)?;
        let job_id = &self.record.job_id;
        let record_path = dir.join(format!("{job_id}.json"));
        records::write_atomically(&record_path, &serde_json::to_vec_pretty(record)?)?;
        move_if_present(&self.manifest_path(), &dir.join(format!("{job_id}.manifest.json")))?;
        move_if_present(&self.event_log(), &dir.join(format!("{job_id}.log")))?;
        remove_if_present(&self.layout.lock_file(job_id))?;
        Ok(record_path)
    }

    /// Gives the job back to the queue untouched, for another daemon (or this one, later) to
    /// take at once: the manifest returns to WATCH_DIR, never over a file of the same name.
    pub fn release(self) -> std::io::Result<()> {
        let job_id = &self.record.job_id;
        let claimed = self.manifest_path();
        if claimed.exists() {
            let original = self.layout.watch_dir().join(&self.record.manifest_name);
            if let Err(e) = std::fs::hard_link(&claimed, &original) {
                if e.kind() != ErrorKind::AlreadyExists {
                    return Err(e);
                }
                let stem = self.record.manifest_name.trim_end_matches(".json");
                std::fs::hard_link(&claimed, self.layout.watch_dir().join(format!("{stem}.requeued-{job_id}.json")))?;
            }
            std::fs::remove_file(&claimed)?;
        }
        remove_if_present(&self.event_log())?;
        remove_if_present(&self.layout.lock_file(job_id))
    }

    /// Rebuilds a claim from a lock file found on disk, for recovery after a restart.
    pub fn adopt(layout: &Layout, record: LockRecord) -> Claim {
        Claim { layout: layout.clone(), record }
    }
}

/// Reads a lock file's owner record.
pub fn read_lock(path: &Path) -> std::io::Result<LockRecord> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

/// Creates `path` with `contents`, failing if anything (a file or a planted symlink) is there.
pub fn create_exclusive(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o644).open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Refreshes a lock's mtime (the heartbeat), stamped by the file server's clock.
pub fn touch(path: &Path) -> std::io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    utimensat(None, path, &TimeSpec::UTIME_NOW, &TimeSpec::UTIME_NOW, UtimensatFlags::NoFollowSymlink)
        .map_err(std::io::Error::from)
}

fn move_if_present(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Layout, Identity) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.ensure().unwrap();
        (dir, layout, Identity::current(Some("t".into())))
    }

    #[test]
    fn a_claim_moves_the_manifest_and_writes_the_owner_record() {
        let (dir, layout, me) = setup();
        std::fs::write(dir.path().join("m.json"), b"{}").unwrap();
        let claim = claim(&layout, "m.json", &me).unwrap().expect("claim wins");
        assert!(!dir.path().join("m.json").exists());
        assert!(claim.manifest_path().exists());
        let lock = read_lock(&layout.lock_file(claim.job_id())).unwrap();
        assert_eq!(lock.owner, me);
        assert_eq!(lock.generation, 1);
        assert!(claim.still_owned().unwrap());
    }

    #[test]
    fn the_second_claimant_loses_quietly_and_leaves_no_lock() {
        let (dir, layout, me) = setup();
        std::fs::write(dir.path().join("m.json"), b"{}").unwrap();
        let _winner = claim(&layout, "m.json", &me).unwrap().expect("first claim wins");
        assert!(claim(&layout, "m.json", &me).unwrap().is_none());
        assert_eq!(std::fs::read_dir(layout.locks_dir()).unwrap().count(), 1);
    }

    #[test]
    fn a_lost_lock_is_not_owned() {
        let (dir, layout, me) = setup();
        std::fs::write(dir.path().join("m.json"), b"{}").unwrap();
        let claim = claim(&layout, "m.json", &me).unwrap().unwrap();
        std::fs::remove_file(layout.lock_file(claim.job_id())).unwrap();
        assert!(!claim.still_owned().unwrap());
    }

    #[test]
    fn release_returns_the_manifest_without_overwriting_a_new_one() {
        let (dir, layout, me) = setup();
        std::fs::write(dir.path().join("m.json"), b"{\"old\":1}").unwrap();
        let claim = claim(&layout, "m.json", &me).unwrap().unwrap();
        std::fs::write(dir.path().join("m.json"), b"{\"new\":1}").unwrap();
        let job_id = claim.job_id().to_owned();
        claim.release().unwrap();
        assert_eq!(std::fs::read(dir.path().join("m.json")).unwrap(), b"{\"new\":1}");
        let requeued = dir.path().join(format!("m.requeued-{job_id}.json"));
        assert_eq!(std::fs::read(requeued).unwrap(), b"{\"old\":1}");
        assert_eq!(std::fs::read_dir(layout.locks_dir()).unwrap().count(), 0);
    }

    #[test]
    fn heartbeat_advances_the_lock_mtime() {
        let (dir, layout, me) = setup();
        std::fs::write(dir.path().join("m.json"), b"{}").unwrap();
        let claim = claim(&layout, "m.json", &me).unwrap().unwrap();
        let lock = layout.lock_file(claim.job_id());
        let old = filetime_of(&lock);
        std::thread::sleep(std::time::Duration::from_millis(20));
        claim.heartbeat().unwrap();
        assert!(filetime_of(&lock) > old);
    }

    fn filetime_of(path: &Path) -> std::time::SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }
}
