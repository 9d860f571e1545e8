//! Claims, lock files, heartbeats, takeover and fencing: the only code that decides who owns
//! a job. docs/QUEUE.md states the protocol step by step with the invariant each step keeps.
//!
//! - **Claim**: a lock file created with `O_EXCL` holding the owner record, then a rename of
//!   the manifest into `claimed/<job>.json`. Exactly one renamer of a name wins; the winner
//!   confirms by looking, because NFS can report a retransmitted rename wrongly either way.
//! - **Heartbeat**: the owner touches the lock (server-stamped mtime) every LEASE_SECONDS/3.
//! - **Takeover**: a lock older than the lease by the *file server's* clock is renamed aside
//!   (one renamer wins), re-checked for a heartbeat that raced in (then restored), and
//!   replaced by a lock with generation + 1 for the same job. While a lock is aside, the aside
//!   stands for it: its mtime is the job's heartbeat, and a heartbeat or fence that finds the
//!   lock missing waits a moment for it to be restored.
//! - **Release**: the owner moves its lock aside (one renamer wins) and gives the manifest back
//!   only if the lock moved is still its own.
//! - **Fence**: before every publishing rename the owner touches its lock and re-reads it; a
//!   missing lock or another owner/generation means the job is lost: publish nothing.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;

use super::fs::{self, QueueFs, RealFs};
use super::layout::{Layout, Outcome};
pub(crate) use super::lock::LockRecord;
use super::lock::{
    is_base_manifest_name, is_job_id, job_of_lock_file, new_job_id, LockRecordError, ASIDE_INFIX, LOCK_SUFFIX,
    MAX_LOCK_RECORD_BYTES,
};
use super::records::{self, JobRecord};
use super::scan::Candidate;
use crate::host::{self, Identity};

/// The manifest name used where a record's is unknown: HyperSDK's fixed one.
const FALLBACK_MANIFEST_NAME: &str = "artifact-manifest.json";

/// How long a heartbeat or fence that finds its lock missing waits for a taker to put it back.
/// A taker restores a live owner's lock within a few file operations; far longer than that
/// means the taker died, and its aside is judged by age like any lock.
const RESTORE_WAIT: Duration = Duration::from_secs(2);
const RESTORE_POLL: Duration = Duration::from_millis(150);

/// The queue as one daemon sees it: its layout and the filesystem operations it uses.
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    pub layout: Layout,
    fs: Arc<dyn QueueFs>,
}

/// A job this daemon owns.
#[derive(Debug)]
pub struct Claim {
    queue: Queue,
    record: LockRecord,
    /// Set by this claim's own finish or release just before it removes (or moves) the lock,
    /// so that a heartbeat racing it does not mistake that for a takeover.
    ending: Arc<AtomicBool>,
}

/// A lock whose heartbeat is older than the lease, or a claimed manifest left without a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stale {
    pub job_id: String,
    /// Age by the file server's clock.
    pub age: Duration,
    /// Whether a lock file exists (false: a takeover, release or claim died half-way; the age is
    /// then the newest aside's, or the manifest's where no aside is left).
    pub has_lock: bool,
}

/// A lock whose record cannot be trusted, as an I/O error of kind `InvalidData`.
fn damaged(e: LockRecordError) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, e)
}

/// Why a lock was read as damaged, if that is what `e` says.
fn damage_of(e: &std::io::Error) -> Option<&LockRecordError> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<LockRecordError>())
}

impl Queue {
    /// The queue under `layout` on the real filesystem.
    pub(crate) fn new(layout: Layout) -> Queue {
        Queue { layout, fs: Arc::new(RealFs) }
    }

    /// The queue with another filesystem (fault injection in tests).
    #[cfg(test)]
    pub(crate) fn with_fs(layout: Layout, fs: Arc<dyn QueueFs>) -> Queue {
        Queue { layout, fs }
    }

    /// Tries to claim the manifest the scan judged ready. `Ok(None)` means another daemon
    /// took it first, which is normal, or that the file under its name is no longer the one
    /// judged: another daemon claimed that one and the producer wrote the next manifest under
    /// the same name, perhaps half-way. Such a file goes back to the queue to settle.
    pub(crate) fn claim(&self, candidate: &Candidate, owner: &Identity) -> std::io::Result<Option<Claim>> {
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
            return Ok(Some(Claim::new(self.clone(), record)));
        }
        remove_if_present(self.fs.as_ref(), &lock)?;
        match renamed {
            // Permanent failures (EACCES, EXDEV …) are worth reporting; losing the race is not.
            Err(e) if e.kind() != ErrorKind::NotFound && !fs::is_transient(&e) => Err(e),
            _ => Ok(None),
        }
    }

    /// Reads a lock file's owner record, checked against the file's name: an error of kind
    /// `InvalidData` carrying a [`LockRecordError`] when the lock is damaged.
    pub(crate) fn read_lock(&self, path: &Path) -> std::io::Result<LockRecord> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let bytes = match self.fs.read(path, MAX_LOCK_RECORD_BYTES) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::InvalidData || e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(damaged(LockRecordError::NotAFile))
            }
            Err(e) => return Err(e),
        };
        LockRecord::parse(&bytes, name).map_err(damaged)
    }

    /// Every lock older than `lease`, and every claimed manifest without a lock for that long,
    /// judged against the file server's clock. Locks left without a claimed manifest are swept
    /// on the way (see [`Queue::sweep_orphans`]).
    pub(crate) fn stale(&self, lease: Duration) -> std::io::Result<Vec<Stale>> {
        let now = self.server_now()?;
        self.sweep_orphans(now, lease);
        let mut stale = Vec::new();
        for job_id in list_ids(&self.layout.claimed_dir(), ".json")? {
            // A lock that vanished between listing and stat was finished or taken: skip it.
            let (has_lock, stamp) = match self.fs.modified(&self.layout.lock_file(&job_id)) {
                Ok(t) => (true, t),
                Err(e) if e.kind() == ErrorKind::NotFound => match self.lockless_stamp(&job_id) {
                    Ok(Some(t)) => (false, t),
                    _ => continue,
                },
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

    /// The heartbeat of a claim without a lock. A lock aside is one a takeover or release is
    /// working on — a live owner's, perhaps, about to be restored — so its mtime stands for
    /// the lock's. Only without any is the manifest's (the producer's write time) used.
    fn lockless_stamp(&self, job_id: &str) -> std::io::Result<Option<SystemTime>> {
        if let Some(t) = self.newest_aside(job_id)? {
            return Ok(Some(t));
        }
        match self.fs.modified(&self.layout.claimed_manifest(job_id)) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes over a stale job. `Ok(None)` when another daemon won, or the owner proved alive.
    pub(crate) fn take_over(&self, stale: &Stale, me: &Identity, lease: Duration) -> std::io::Result<Option<Claim>> {
        let job_id = &stale.job_id;
        let aside = self.aside_path(job_id);
        let previous = if stale.has_lock {
            self.move_stale_lock(job_id, &aside, lease)?
        } else {
            self.previous_without_lock(job_id, lease)?
        };
        let Some(previous) = previous else { return Ok(None) };
        // A parsed record's generation is below u64::MAX; checked anyway, never wrapped to 0.
        let created = previous
            .generation
            .checked_add(1)
            .ok_or_else(|| damaged(LockRecordError::Generation(previous.generation)))
            .map(|generation| LockRecord { owner: me.clone(), generation, claimed_at: Utc::now(), ..previous })
            .and_then(|record| {
                let bytes = serde_json::to_vec_pretty(&record)?;
                self.fs.create_exclusive(&self.layout.lock_file(job_id), &bytes).map(|()| record)
            });
        match created {
            Ok(record) => {
                self.remove_asides(job_id);
                Ok(Some(Claim::new(self.clone(), record)))
            }
            // Another taker created the lock first; the record we moved aside is obsolete.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let _ = remove_if_present(self.fs.as_ref(), &aside);
                Ok(None)
            }
            Err(e) => {
                // Without the lock put back, the next taker would not know the generation.
                if stale.has_lock {
                    self.restore(job_id, &aside);
                }
                Err(e)
            }
        }
    }

    /// Renames a stale lock aside and returns its record, or `None` when another taker won or
    /// the owner proved alive. Whenever the takeover does not go on, the lock is put back:
    /// every error after the rename would otherwise leave the job looking lockless.
    fn move_stale_lock(&self, job_id: &str, aside: &Path, lease: Duration) -> std::io::Result<Option<LockRecord>> {
        let renamed = self.fs.rename(&self.layout.lock_file(job_id), aside);
        match fs::retry("confirming a takeover", || self.fs.exists(aside)) {
            Ok(true) => {}
            Ok(false) => {
                if let Some(e) = renamed.err().filter(|e| e.kind() != ErrorKind::NotFound) {
                    tracing::warn!(job_id, error = %e, "could not move a stale lock aside");
                }
                return Ok(None);
            }
            Err(e) => {
                self.restore(job_id, aside);
                return Err(e);
            }
        }
        let judged = match self.judge_aside(job_id, aside, lease) {
            // Another taker, judging the job by this aside's age, finished first and removed it.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            judged => judged,
        };
        if !matches!(judged, Ok(Some(_))) {
            self.restore(job_id, aside);
        }
        judged
    }

    /// The record of a stale lock just moved aside, if the takeover may go on.
    fn judge_aside(&self, job_id: &str, aside: &Path, lease: Duration) -> std::io::Result<Option<LockRecord>> {
        let now = self.server_now()?;
        // The owner may have heartbeated between our judgement and the rename.
        if fs::age(fs::retry("checking a stale lock", || self.fs.modified(aside))?, now) <= lease {
            return Ok(None);
        }
        match fs::retry("reading a stale lock", || self.read_lock(aside)) {
            Ok(previous) => Ok(Some(previous)),
            // Unparseable: torn by a daemon that died creating it, so no owner ever ran under
            // it, and the asides its takeover had not yet removed hold the generation before.
            // Or damaged (planted, rewritten): nothing in it can be trusted. Either way it goes
            // to quarantine (with the other damaged asides) and the job is taken over from
            // the records left aside, or from the claimed manifest alone.
            Err(e) if damage_of(&e).is_some() => {
                tracing::warn!(job_id, error = %e, "a stale lock is damaged; taking over from the records left aside");
                Ok(self.highest_aside(job_id)?.or_else(|| self.record_from_manifest(job_id)))
            }
            // Taking over without the generation could hand the new owner the old one's.
            Err(e) if e.kind() != ErrorKind::NotFound => {
                tracing::warn!(job_id, error = %e, "could not read a stale lock; leaving the job for a later takeover");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The record to take over from for a claim without a lock, unless a lock aside shows that
    /// a takeover or release is under way (a lock aside younger than the lease).
    fn previous_without_lock(&self, job_id: &str, lease: Duration) -> std::io::Result<Option<LockRecord>> {
        let now = self.server_now()?;
        if self.newest_aside(job_id)?.is_some_and(|t| fs::age(t, now) <= lease) {
            return Ok(None);
        }
        Ok(self.highest_aside(job_id)?.or_else(|| self.record_from_manifest(job_id)))
    }

    /// Puts a lock moved aside back, by link: it fails rather than replace a lock another
    /// taker created meanwhile. The aside is removed only once a lock is there again; if not,
    /// it stays, for [`Queue::stale`] to judge by age and the next taker to read.
    fn restore(&self, job_id: &str, aside: &Path) {
        let lock = self.layout.lock_file(job_id);
        let linked = fs::retry("restoring a lock", || self.fs.hard_link(aside, &lock));
        // Look, whatever link said: a retransmitted link reports EEXIST after succeeding.
        match fs::retry("confirming a restored lock", || self.fs.exists(&lock)) {
            Ok(true) => {
                if let Err(e) = remove_if_present(self.fs.as_ref(), aside) {
                    tracing::warn!(job_id, error = %e, "could not remove a lock moved aside");
                }
            }
            _ if linked.as_ref().is_err_and(|e| e.kind() == ErrorKind::NotFound) => {
                tracing::debug!(job_id, "the lock moved aside is gone; nothing to restore");
            }
            looked => tracing::warn!(
                job_id,
                link = ?linked.err(),
                look = ?looked.err(),
                "could not restore a lock moved aside; it stays aside and is judged by its age"
            ),
        }
    }

    /// The newest record among locks moved aside by a takeover that did not finish. Damaged
    /// ones (unparseable, or disagreeing with their file name) are moved to quarantine, and
    /// vanished ones skipped: a record that cannot be read now may carry the highest
    /// generation, so any other error stops the takeover.
    fn highest_aside(&self, job_id: &str) -> std::io::Result<Option<LockRecord>> {
        let mut highest: Option<LockRecord> = None;
        for path in self.asides(job_id) {
            match fs::retry("reading a lock moved aside", || self.read_lock(&path)) {
                Ok(r) if highest.as_ref().is_none_or(|h| r.generation > h.generation) => highest = Some(r),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => match damage_of(&e) {
                    Some(why) => self.quarantine(job_id, &path, why),
                    None => return Err(e),
                },
            }
        }
        Ok(highest)
    }

    /// Moves a damaged lock (or aside) into `quarantine/`, kept for whoever looks into how it
    /// got there, and out of `locks/`, so that it is never read again. A lock that cannot be
    /// moved stays an aside, removed with the others once the takeover has its new lock.
    fn quarantine(&self, job_id: &str, path: &Path, why: &LockRecordError) {
        let dir = self.layout.quarantine_dir();
        let target =
            dir.join(format!("{}.{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("lock"), host::random_hex()));
        match std::fs::create_dir_all(&dir).and_then(|()| self.fs.rename(path, &target)) {
            Ok(()) => tracing::warn!(
                job_id,
                reason = %why,
                quarantined = %target.display(),
                "a damaged lock record was moved to quarantine; the job is taken over from what is left"
            ),
            Err(e) => {
                tracing::warn!(job_id, reason = %why, error = %e, "could not move a damaged lock record to quarantine")
            }
        }
    }

    /// The mtime of the newest lock moved aside for `job_id`, if any.
    fn newest_aside(&self, job_id: &str) -> std::io::Result<Option<SystemTime>> {
        let mut newest = None;
        for path in self.asides(job_id) {
            match fs::retry("checking a lock moved aside", || self.fs.modified(&path)) {
                Ok(t) => newest = newest.max(Some(t)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(newest)
    }

    /// A record for a claimed manifest whose every lock is gone (a claim interrupted after
    /// the rename): generation 0, so the takeover makes it 1. The manifest's name in WATCH_DIR
    /// went with the lock; HyperSDK's fixed name stands in for it. It only names the file a
    /// release puts back (`<stem>.requeued-<job>.json`, unique by the job id whatever the
    /// stem) and the VM in `status` until the manifest is read.
    fn record_from_manifest(&self, job_id: &str) -> Option<LockRecord> {
        self.fs.exists(&self.layout.claimed_manifest(job_id)).ok()?.then(|| LockRecord {
            job_id: job_id.to_owned(),
            owner: Identity { host: String::new(), boot_id: String::new(), pid: 0, instance: None },
            generation: 0,
            claimed_at: Utc::now(),
            manifest_name: FALLBACK_MANIFEST_NAME.to_owned(),
        })
    }

    fn aside_path(&self, job_id: &str) -> PathBuf {
        self.layout.locks_dir().join(format!("{job_id}{ASIDE_INFIX}{}", host::random_hex()))
    }

    fn asides(&self, job_id: &str) -> Vec<PathBuf> {
        let prefix = format!("{job_id}{ASIDE_INFIX}");
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

    /// Removes what a crash leaves in `locks/` for a job with no claimed manifest: a lock
    /// whose claim died between its `O_EXCL` create and its rename (a phantom claim in
    /// `status` forever, else), or an aside a release or takeover did not get to remove.
    /// Only past the lease by the server's clock, so a claim in progress is never touched.
    fn sweep_orphans(&self, now: SystemTime, lease: Duration) {
        let Ok(entries) = std::fs::read_dir(self.layout.locks_dir()) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(job_id) = job_of_lock_file(&name) else { continue };
            if !self.orphaned(job_id, &entry.path(), now, lease) {
                continue;
            }
            if name.ends_with(LOCK_SUFFIX) {
                self.sweep_lock(job_id);
            } else if remove_if_present(self.fs.as_ref(), &entry.path()).is_ok() {
                tracing::info!(job_id, "removed a lock left aside for a job that is no longer claimed");
            }
        }
    }

    fn orphaned(&self, job_id: &str, path: &Path, now: SystemTime, lease: Duration) -> bool {
        let old = self.fs.modified(path).is_ok_and(|t| fs::age(t, now) > lease);
        old && matches!(self.fs.exists(&self.layout.claimed_manifest(job_id)), Ok(false))
    }

    /// Removes an orphaned lock by moving it aside first, so that of several sweepers one
    /// acts, and so that a claim completing late (frozen between lock and rename) is seen.
    fn sweep_lock(&self, job_id: &str) {
        let aside = self.aside_path(job_id);
        let _ = self.fs.rename(&self.layout.lock_file(job_id), &aside);
        if !matches!(fs::retry("confirming a sweep", || self.fs.exists(&aside)), Ok(true)) {
            return;
        }
        match fs::retry("checking an orphaned lock", || self.fs.exists(&self.layout.claimed_manifest(job_id))) {
            Ok(false) => match remove_if_present(self.fs.as_ref(), &aside) {
                Ok(()) => tracing::info!(job_id, "removed an orphaned lock (a claim died before moving its manifest)"),
                Err(e) => tracing::warn!(job_id, error = %e, "could not remove an orphaned lock"),
            },
            _ => self.restore(job_id, &aside),
        }
    }

    /// The file server's now, for judging lock ages.
    fn server_now(&self) -> std::io::Result<SystemTime> {
        fs::retry("reading the file server's clock", || self.fs.server_now(&self.layout.locks_dir()))
    }

    /// Touches a job's lock and reads it back. A lock found missing while a taker holds it
    /// aside is waited for: the taker restores it at once if its owner proves alive.
    fn refresh(&self, job_id: &str) -> std::io::Result<LockRecord> {
        match self.touch_and_read(job_id) {
            Err(e) if e.kind() == ErrorKind::NotFound && self.lock_reappears(job_id) => self.touch_and_read(job_id),
            other => other,
        }
    }

    fn touch_and_read(&self, job_id: &str) -> std::io::Result<LockRecord> {
        let lock = self.layout.lock_file(job_id);
        fs::retry("refreshing the lock", || self.fs.touch(&lock))?;
        fs::retry("reading the lock", || self.read_lock(&lock))
    }

    /// Whether a missing lock is back within [`RESTORE_WAIT`]; given up at once when no lock is
    /// aside. The asides are listed before the lock is looked at, because a restore links the
    /// lock back before it removes the aside.
    fn lock_reappears(&self, job_id: &str) -> bool {
        let lock = self.layout.lock_file(job_id);
        let deadline = Instant::now() + RESTORE_WAIT;
        loop {
            let aside_left = !self.asides(job_id).is_empty();
            if matches!(self.fs.exists(&lock), Ok(true)) {
                return true;
            }
            if !aside_left || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(RESTORE_POLL);
        }
    }

    /// Every lock record, for status and restart recovery.
    pub(crate) fn locks(&self) -> Vec<(PathBuf, LockRecord)> {
        list_ids(&self.layout.locks_dir(), LOCK_SUFFIX)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| {
                let path = self.layout.lock_file(&id);
                match self.read_lock(&path) {
                    Ok(record) => Some((path, record)),
                    Err(e) => {
                        // Damaged: left for a takeover to quarantine once it is past the lease.
                        if let Some(why) = damage_of(&e) {
                            tracing::warn!(job_id = %id, reason = %why, "ignoring a damaged lock");
                        }
                        None
                    }
                }
            })
            .collect()
    }

    /// Rebuilds a claim from a lock record found on disk (restart recovery).
    pub(crate) fn adopt(&self, record: LockRecord) -> Claim {
        Claim::new(self.clone(), record)
    }
}

/// Job ids of the files in `dir` named `<job id><suffix>`. Any other name is not a job's
/// (a job id is only ever taken from a file name of this form).
fn list_ids(dir: &Path, suffix: &str) -> std::io::Result<Vec<String>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(suffix).filter(|id| is_job_id(id)) {
            ids.push(id.to_owned());
        }
    }
    Ok(ids)
}

impl Claim {
    fn new(queue: Queue, record: LockRecord) -> Claim {
        Claim { queue, record, ending: Arc::default() }
    }

    /// The claimed job's id, taken from its lock file's name.
    pub fn job_id(&self) -> &str {
        &self.record.job_id
    }

    /// The owner record in the claim's lock: owner, generation, claim time, manifest name.
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
        Heartbeat { queue: self.queue.clone(), record: self.record.clone(), ending: self.ending.clone() }
    }

    /// Whether this daemon still owns the job: the lock exists, is freshly touched by us, and
    /// carries our owner record and generation. Transient errors are retried; an answer that
    /// cannot be had counts as lost, because publishing without ownership is the worse mistake.
    /// Touch first: a takeover that renames the lock after this sees a fresh heartbeat and
    /// backs off; one that renamed it before makes the touch fail, and the lock is waited for.
    pub fn still_owned(&self) -> bool {
        self.queue.refresh(&self.record.job_id).is_ok_and(|current| self.is_ours(&current))
    }

    fn is_ours(&self, lock: &LockRecord) -> bool {
        self.record.same_holder(lock)
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
        self.ending.store(true, Ordering::SeqCst);
        remove_if_present(self.queue.fs.as_ref(), &layout.lock_file(job_id))?;
        Ok(record_path)
    }

    /// Gives the job back to the queue untouched, for another daemon (or this one, later) to
    /// take at once: the manifest returns to WATCH_DIR as `<stem>.requeued-<job>.json`. Never
    /// under its original name: HyperSDK rewrites that fixed name in place as soon as it looks
    /// free, and would overwrite a manifest put back there.
    ///
    /// Only the owner may release, and ownership is judged on the lock moved aside, where no
    /// taker can reach it: a job taken over meanwhile is left to its new owner (`Ok`, with a
    /// warning), its manifest and lock untouched.
    pub fn release(self) -> std::io::Result<()> {
        let Some(aside) = self.hold_lock()? else { return Ok(()) };
        if let Err(e) = self.requeue() {
            self.queue.restore(&self.record.job_id, &aside);
            return Err(e);
        }
        let fs = self.queue.fs.as_ref();
        remove_if_present(fs, &self.event_log())?;
        remove_if_present(fs, &aside)
    }

    /// Moves the lock aside if it is still ours, and returns where to; `None` (after a
    /// warning, with the lock left or put back) if it is not.
    fn hold_lock(&self) -> std::io::Result<Option<PathBuf>> {
        let queue = &self.queue;
        let job_id = &self.record.job_id;
        // Touched first, so that the aside looks alive to `stale` while the release runs.
        match queue.refresh(job_id) {
            Ok(current) if self.is_ours(&current) => {}
            Ok(current) => return Ok(self.not_ours(Some(&current))),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(self.not_ours(None)),
            Err(e) => return Err(e),
        }
        let aside = queue.aside_path(job_id);
        self.ending.store(true, Ordering::SeqCst);
        let _ = queue.fs.rename(&queue.layout.lock_file(job_id), &aside);
        // Looked at, whatever rename said; then the check that counts, on the lock moved
        // aside: a takeover could have run between the touch and the rename.
        let held = fs::retry("confirming a release", || queue.fs.exists(&aside)).and_then(|moved| {
            if moved {
                fs::retry("reading the lock to release", || queue.read_lock(&aside)).map(Some)
            } else {
                Ok(None)
            }
        });
        match held {
            Ok(Some(lock)) if self.is_ours(&lock) => return Ok(Some(aside)),
            Ok(None) => return Ok(self.not_ours(None)),
            _ => queue.restore(job_id, &aside),
        }
        held.map(|lock| self.not_ours(lock.as_ref()))
    }

    fn not_ours(&self, current: Option<&LockRecord>) -> Option<PathBuf> {
        tracing::warn!(
            job_id = %self.record.job_id,
            owner = ?current.map(|c| (&c.owner.host, c.owner.pid, c.generation)),
            "not releasing a job this daemon no longer owns; it is left to its current owner"
        );
        None
    }

    /// Puts the claimed manifest back into WATCH_DIR under its requeued name.
    fn requeue(&self) -> std::io::Result<()> {
        let fs = self.queue.fs.as_ref();
        let claimed = self.manifest_path();
        if !fs::retry("looking for the claimed manifest", || fs.exists(&claimed))? {
            return Ok(());
        }
        // Only a base name: a record adopted from disk is checked on reading, but this name
        // becomes a path in WATCH_DIR whatever the record's origin.
        let name = &self.record.manifest_name;
        let base = if is_base_manifest_name(name) { name.as_str() } else { FALLBACK_MANIFEST_NAME };
        let stem = base.trim_end_matches(".json");
        // A manifest released before keeps its first job id rather than growing a chain.
        let stem = stem.split(".requeued-").next().unwrap_or(stem);
        let requeued = self.queue.layout.watch_dir().join(format!("{stem}.requeued-{}.json", self.record.job_id));
        // link, not rename: it fails rather than replace anything already there.
        match fs.hard_link(&claimed, &requeued) {
            // AlreadyExists: the name carries this job's id, so it is our own link (a
            // retransmitted reply, or a release interrupted after linking).
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            // fs.protected_hardlinks forbids linking a file another user owns, and the
            // producer's manifest usually is one (the system test found this). The name
            // carries this job's id, so a rename cannot replace anyone else's file.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return fs.rename(&claimed, &requeued),
            Err(e) => return Err(e),
        }
        fs::retry("removing a released claim", || remove_if_present(fs, &claimed)).inspect_err(|_| {
            // Two copies would be converted twice: take back the one in the queue.
            let _ = remove_if_present(fs, &requeued);
        })
    }
}

/// Refreshes one lock's mtime, from a task that runs beside the job.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    queue: Queue,
    record: LockRecord,
    ending: Arc<AtomicBool>,
}

/// What a heartbeat found.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    Alive,
    /// The lock is gone: another daemon took the job over.
    Lost,
    /// Could not tell (transient errors persisted); try again at the next beat.
    Unknown,
    /// The job's own finish or release has removed the lock, or is removing it: the job is
    /// ending, nothing was taken from it.
    Ending,
}

impl Heartbeat {
    /// Touches the lock, then checks it is still ours: after a takeover the path holds the
    /// new owner's lock, which a touch alone would not notice. A lock a taker has moved aside
    /// is waited for before the job is called lost.
    pub fn beat(&self) -> Beat {
        match self.queue.refresh(&self.record.job_id) {
            Ok(current) if self.record.same_holder(&current) => Beat::Alive,
            // Read after the refresh: the flag is set before the lock goes, so a lock found
            // gone (or moved) by our own job's end always sees it set.
            _ if self.ending.load(Ordering::SeqCst) => Beat::Ending,
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
