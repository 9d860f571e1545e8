//! Claims, lock files, heartbeats, takeover and fencing: the only code that decides who owns
//! a job. docs/QUEUE.md states the protocol step by step with the invariant each step keeps.
//!
//! - **Claim**: a lock file created with `O_EXCL` holding the owner record, then a rename of
//!   the manifest into `claimed/<job>.json`. Exactly one renamer of a name wins; the winner
//!   confirms by looking, because NFS can report a retransmitted rename wrongly either way.
//! - **Heartbeat**: the owner touches the lock (server-stamped mtime) every LEASE_SECONDS/3.
//! - **Takeover**: a lock older than the lease by the *file server's* clock is renamed aside
//!   (one renamer wins), re-checked for a heartbeat that raced in (then restored), and
//!   replaced by a lock with generation + 1 for the same job.
//! - **Fence**: before every publishing rename the owner touches its lock and re-reads it; a
//!   missing lock or another owner/generation means the job is lost: publish nothing.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::fs::{self, QueueFs, RealFs};
use super::layout::{Layout, Outcome};
use super::records::{self, JobRecord};
use super::scan::Candidate;
use crate::host::{self, Identity};

/// Suffix of a lock file; anything else in `locks/` is a lock being taken over.
const LOCK_SUFFIX: &str = ".lock";

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

/// The queue as one daemon sees it: its layout and the filesystem operations it uses.
#[derive(Debug, Clone)]
pub struct Queue {
    pub layout: Layout,
    fs: Arc<dyn QueueFs>,
}

/// A job this daemon owns.
#[derive(Debug)]
pub struct Claim {
    queue: Queue,
    record: LockRecord,
}

/// A lock whose heartbeat is older than the lease, or a claimed manifest left without a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub job_id: String,
    /// Age by the file server's clock.
    pub age: Duration,
    /// Whether a lock file exists (false: a takeover or claim died half-way).
    pub has_lock: bool,
}

/// A fresh job id: UTC time for sorting, 64 random bits for uniqueness across hosts.
pub fn new_job_id() -> String {
    format!("{}-{}", Utc::now().format("%Y%m%dT%H%M%SZ"), host::random_hex())
}

fn io_invalid(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, e)
}

impl Queue {
    /// The queue under `layout` on the real filesystem.
    pub fn new(layout: Layout) -> Queue {
        Queue { layout, fs: Arc::new(RealFs) }
    }

    /// The queue with another filesystem (fault injection in tests).
    pub fn with_fs(layout: Layout, fs: Arc<dyn QueueFs>) -> Queue {
        Queue { layout, fs }
    }

    /// Tries to claim the manifest the scan judged ready. `Ok(None)` means another daemon
    /// took it first, which is normal, or that the file under its name is no longer the one
    /// judged: another daemon claimed that one and the producer wrote the next manifest under
    /// the same name, perhaps half-way. Such a file goes back to the queue to settle.
    pub fn claim(&self, candidate: &Candidate, owner: &Identity) -> std::io::Result<Option<Claim>> {
        let Some(claim) = self.claim_name(&candidate.name, owner)? else { return Ok(None) };
        match fs::retry("checking a claim", || self.fs.fingerprint(&claim.manifest_path())) {
            Ok(now) if now != candidate.fingerprint => {
                tracing::info!(
                    manifest = %candidate.name,
                    job_id = %claim.job_id(),
                    "the manifest was replaced between scan and claim; returned to the queue to settle"
                );
                claim.release()?;
                Ok(None)
            }
            // The rename made the file ours whatever a stat says; the job reads it next.
            _ => Ok(Some(claim)),
        }
    }

    /// Claims whatever file is named `name` in WATCH_DIR.
    fn claim_name(&self, name: &str, owner: &Identity) -> std::io::Result<Option<Claim>> {
        let record = LockRecord {
            job_id: new_job_id(),
            owner: owner.clone(),
            generation: 1,
            claimed_at: Utc::now(),
            manifest_name: name.to_owned(),
        };
        let lock = self.layout.lock_file(&record.job_id);
        self.fs.create_exclusive(&lock, &serde_json::to_vec_pretty(&record)?)?;
        let claimed = self.layout.claimed_manifest(&record.job_id);
        let renamed = self.fs.rename(&self.layout.watch_dir().join(name), &claimed);
        // Look, whatever rename said: the claimed path is the truth.
        if fs::retry("confirming a claim", || self.fs.exists(&claimed))? {
            if let Err(e) = renamed {
                tracing::warn!(job_id = %record.job_id, error = %e, "rename reported an error but the claim is in place");
            }
            return Ok(Some(Claim { queue: self.clone(), record }));
        }
        remove_if_present(self.fs.as_ref(), &lock)?;
        match renamed {
            // Permanent failures (EACCES, EXDEV …) are worth reporting; losing the race is not.
            Err(e) if e.kind() != ErrorKind::NotFound && !fs::is_transient(&e) => Err(e),
            _ => Ok(None),
        }
    }

    /// Reads a lock file's owner record.
    pub fn read_lock(&self, path: &Path) -> std::io::Result<LockRecord> {
        serde_json::from_slice(&self.fs.read(path)?).map_err(io_invalid)
    }

    /// Every lock older than `lease`, and every claimed manifest without a lock for that long,
    /// judged against the file server's clock.
    pub fn stale(&self, lease: Duration) -> std::io::Result<Vec<Stale>> {
        let now = self.fs.server_now(&self.layout.locks_dir())?;
        let mut stale = Vec::new();
        for job_id in list_ids(&self.layout.claimed_dir(), ".json")? {
            let lock = self.layout.lock_file(&job_id);
            // A lock that vanished between listing and stat was finished or taken: skip it.
            let (has_lock, stamp) = match self.fs.modified(&lock) {
                Ok(t) => (true, t),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    match self.fs.modified(&self.layout.claimed_manifest(&job_id)) {
                        Ok(t) => (false, t),
                        Err(_) => continue,
                    }
                }
                Err(e) if fs::is_transient(&e) => continue,
                Err(e) => return Err(e),
            };
            let age = fs::age(stamp, now);
            if age > lease {
                stale.push(Stale { job_id, age, has_lock });
            }
        }
        Ok(stale)
    }

    /// Takes over a stale job. `Ok(None)` when another daemon won, or the owner proved alive.
    pub fn take_over(&self, stale: &Stale, me: &Identity, lease: Duration) -> std::io::Result<Option<Claim>> {
        let lock = self.layout.lock_file(&stale.job_id);
        let aside = self.layout.locks_dir().join(format!("{}.lock.taken-{}", stale.job_id, host::random_hex()));
        let previous = if stale.has_lock {
            let renamed = self.fs.rename(&lock, &aside);
            if !fs::retry("confirming a takeover", || self.fs.exists(&aside))? {
                if let Some(e) = renamed.as_ref().err().filter(|e| e.kind() != ErrorKind::NotFound) {
                    tracing::warn!(job_id = %stale.job_id, error = %e, "could not move a stale lock aside");
                }
                return Ok(None);
            }
            // The owner may have heartbeated between our judgement and the rename.
            let now = self.fs.server_now(&self.layout.locks_dir())?;
            if fs::age(self.fs.modified(&aside)?, now) <= lease {
                let _ = self.fs.hard_link(&aside, &lock);
                remove_if_present(self.fs.as_ref(), &aside)?;
                return Ok(None);
            }
            self.read_lock(&aside).ok()
        } else {
            self.highest_aside(&stale.job_id)
        };
        let Some(previous) = previous.or_else(|| self.record_from_manifest(&stale.job_id)) else {
            return Ok(None);
        };
        let record =
            LockRecord { owner: me.clone(), generation: previous.generation + 1, claimed_at: Utc::now(), ..previous };
        let created = self.fs.create_exclusive(&lock, &serde_json::to_vec_pretty(&record)?);
        self.remove_asides(&stale.job_id);
        match created {
            Ok(()) => Ok(Some(Claim { queue: self.clone(), record })),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The newest record among locks moved aside by a takeover that did not finish.
    fn highest_aside(&self, job_id: &str) -> Option<LockRecord> {
        self.asides(job_id).iter().filter_map(|p| self.read_lock(p).ok()).max_by_key(|r| r.generation)
    }

    /// A record for a claimed manifest whose every lock is gone (a claim interrupted after
    /// the rename): generation 0, so the takeover makes it 1.
    fn record_from_manifest(&self, job_id: &str) -> Option<LockRecord> {
        self.fs.exists(&self.layout.claimed_manifest(job_id)).ok()?.then(|| LockRecord {
            job_id: job_id.to_owned(),
            owner: Identity { host: String::new(), boot_id: String::new(), pid: 0, instance: None },
            generation: 0,
            claimed_at: Utc::now(),
            manifest_name: "artifact-manifest.json".to_owned(),
        })
    }

    fn asides(&self, job_id: &str) -> Vec<PathBuf> {
        let prefix = format!("{job_id}.lock.taken-");
        std::fs::read_dir(self.layout.locks_dir())
            .map(|d| {
                d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).map(|e| e.path()).collect()
            })
            .unwrap_or_default()
    }

    fn remove_asides(&self, job_id: &str) {
        for path in self.asides(job_id) {
            let _ = self.fs.remove_file(&path);
        }
    }

    /// Every lock record, for status and restart recovery.
    pub fn locks(&self) -> Vec<(PathBuf, LockRecord)> {
        list_ids(&self.layout.locks_dir(), LOCK_SUFFIX)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| {
                let path = self.layout.lock_file(&id);
                let record = self.read_lock(&path).ok()?;
                Some((path, record))
            })
            .collect()
    }

    /// Rebuilds a claim from a lock record found on disk (restart recovery).
    pub fn adopt(&self, record: LockRecord) -> Claim {
        Claim { queue: self.clone(), record }
    }
}

/// File stems in `dir` whose names end with `suffix`.
fn list_ids(dir: &Path, suffix: &str) -> std::io::Result<Vec<String>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(suffix).filter(|id| !id.starts_with('.')) {
            ids.push(id.to_owned());
        }
    }
    Ok(ids)
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
        self.queue.layout.claimed_manifest(&self.record.job_id)
    }

    /// Path of the job's event log.
    pub fn event_log(&self) -> PathBuf {
        self.queue.layout.event_log(&self.record.job_id)
    }

    /// A handle for the heartbeat task, which outlives borrows of the claim.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat { queue: self.queue.clone(), record: self.record.clone() }
    }

    /// Whether this daemon still owns the job: the lock exists, is freshly touched by us, and
    /// carries our owner record and generation. Transient errors are retried; an answer that
    /// cannot be had counts as lost, because publishing without ownership is the worse mistake.
    pub fn still_owned(&self) -> bool {
        let lock = self.queue.layout.lock_file(&self.record.job_id);
        // Touch first: a takeover that renames the lock after this sees a fresh heartbeat and
        // backs off; one that renamed it before makes the touch fail.
        if fs::retry("refreshing the lock", || self.queue.fs.touch(&lock)).is_err() {
            return false;
        }
        match fs::retry("reading the lock", || self.queue.read_lock(&lock)) {
            Ok(current) => current.owner == self.record.owner && current.generation == self.record.generation,
            Err(_) => false,
        }
    }

    /// Records the job's end: the record and the manifest go to the dated `done/` or
    /// `failed/` directory, then the lock is removed (last, so a crash leaves the job owned).
    pub fn finish(self, record: &JobRecord) -> std::io::Result<PathBuf> {
        let layout = &self.queue.layout;
        let outcome = if record.state == records::JobState::Done { Outcome::Done } else { Outcome::Failed };
        let record_path = layout.record_file(outcome, record.finished_at.unwrap_or_else(Utc::now), &self.record.job_id);
        let dir = record_path.parent().map(Path::to_owned).unwrap_or_default();
        std::fs::create_dir_all(&dir)?;
        let job_id = &self.record.job_id;
        records::write_atomically(&record_path, &serde_json::to_vec_pretty(record)?)?;
        move_if_present(&self.manifest_path(), &dir.join(format!("{job_id}.manifest.json")))?;
        move_if_present(&self.event_log(), &dir.join(format!("{job_id}.log")))?;
        remove_if_present(self.queue.fs.as_ref(), &layout.lock_file(job_id))?;
        Ok(record_path)
    }

    /// Gives the job back to the queue untouched, for another daemon (or this one, later) to
    /// take at once: the manifest returns to WATCH_DIR as `<stem>.requeued-<job>.json`. Never
    /// under its original name: HyperSDK rewrites that fixed name in place as soon as it looks
    /// free, and would overwrite a manifest put back there. Only an owner may release.
    pub fn release(self) -> std::io::Result<()> {
        let layout = &self.queue.layout;
        let job_id = &self.record.job_id;
        let claimed = self.manifest_path();
        if self.queue.fs.exists(&claimed)? {
            let stem = self.record.manifest_name.trim_end_matches(".json");
            // A manifest released before keeps its first job id rather than growing a chain.
            let stem = stem.split(".requeued-").next().unwrap_or(stem);
            let requeued = layout.watch_dir().join(format!("{stem}.requeued-{job_id}.json"));
            // link, not rename: it fails rather than replace anything already there.
            match self.queue.fs.hard_link(&claimed, &requeued) {
                Ok(()) => self.queue.fs.remove_file(&claimed)?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => self.queue.fs.remove_file(&claimed)?,
                // fs.protected_hardlinks forbids linking a file another user owns, and the
                // producer's manifest usually is one (the system test found this). The name
                // carries this job's id, so a rename cannot replace anyone else's file.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => self.queue.fs.rename(&claimed, &requeued)?,
                Err(e) => return Err(e),
            }
        }
        remove_if_present(self.queue.fs.as_ref(), &self.event_log())?;
        remove_if_present(self.queue.fs.as_ref(), &layout.lock_file(job_id))
    }
}

/// Refreshes one lock's mtime, from a task that runs beside the job.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    queue: Queue,
    record: LockRecord,
}

/// What a heartbeat found.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    Alive,
    /// The lock is gone: another daemon took the job over.
    Lost,
    /// Could not tell (transient errors persisted); try again at the next beat.
    Unknown,
}

impl Heartbeat {
    /// Touches the lock, then checks it is still ours: after a takeover the path holds the
    /// new owner's lock, which a touch alone would not notice.
    pub fn beat(&self) -> Beat {
        let lock = self.queue.layout.lock_file(&self.record.job_id);
        let touched = fs::retry("heartbeat", || self.queue.fs.touch(&lock))
            .and_then(|()| fs::retry("heartbeat", || self.queue.read_lock(&lock)));
        match touched {
            Ok(current) if current.owner == self.record.owner && current.generation == self.record.generation => {
                Beat::Alive
            }
            Ok(_) => Beat::Lost,
            Err(e) if e.kind() == ErrorKind::NotFound => Beat::Lost,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed; will retry");
                Beat::Unknown
            }
        }
    }
}

fn move_if_present(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn remove_if_present(fs: &dyn QueueFs, path: &Path) -> std::io::Result<()> {
    match fs.remove_file(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests;
