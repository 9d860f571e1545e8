//! The lock protocol against the faults NFS produces, injected through [`QueueFs`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use super::*;

/// Faults to inject, consumed in order where they are counts.
#[derive(Debug, Default)]
struct Faults {
    /// Perform the rename, then report ENOENT (a retransmitted request whose first reply was lost).
    rename_fails_after_success: usize,
    /// Report success without renaming.
    rename_succeeds_without_effect: usize,
    /// ESTALE from exists/modified/read, this many times.
    estale: usize,
    /// EIO from touch, this many times (usize::MAX: forever).
    touch_eio: usize,
    /// EPERM from hard_link (fs.protected_hardlinks and a file another user owns), this many times.
    link_eperm: usize,
    /// Offset of the file server's clock from ours, applied to every server timestamp.
    server_clock_offset: i64,
    /// EIO from modified, this many times (usize::MAX: forever).
    modified_eio: usize,
    /// EIO from read, this many times (usize::MAX: forever).
    read_eio: usize,
    /// EIO from server_now, this many times.
    server_now_eio: usize,
}

#[derive(Debug, Default)]
struct FaultyFs {
    faults: Mutex<Faults>,
    log: Mutex<VecDeque<String>>,
}

impl FaultyFs {
    fn with(faults: Faults) -> Arc<FaultyFs> {
        Arc::new(FaultyFs { faults: Mutex::new(faults), log: Mutex::default() })
    }

    fn take(&self, pick: impl FnOnce(&mut Faults) -> &mut usize) -> bool {
        let mut faults = self.faults.lock().unwrap();
        let n = pick(&mut faults);
        if *n > 0 {
            if *n != usize::MAX {
                *n -= 1;
            }
            true
        } else {
            false
        }
    }

    fn skew(&self, t: SystemTime) -> SystemTime {
        let offset = self.faults.lock().unwrap().server_clock_offset;
        if offset >= 0 {
            t + Duration::from_secs(offset as u64)
        } else {
            t - Duration::from_secs(offset.unsigned_abs())
        }
    }

    fn estale(&self) -> std::io::Result<()> {
        if self.take(|f| &mut f.estale) {
            self.log.lock().unwrap().push_back("ESTALE".into());
            return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
        }
        Ok(())
    }

    fn eio(&self, pick: impl FnOnce(&mut Faults) -> &mut usize) -> std::io::Result<()> {
        if self.take(pick) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl QueueFs for FaultyFs {
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        if self.take(|f| &mut f.rename_succeeds_without_effect) {
            return Ok(());
        }
        RealFs.rename(from, to)?;
        if self.take(|f| &mut f.rename_fails_after_success) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(())
    }
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        if self.take(|f| &mut f.link_eperm) {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        RealFs.hard_link(from, to)
    }
    fn create_exclusive(&self, path: &Path, contents: &[u8]) -> std::io::Result<()> {
        RealFs.create_exclusive(path, contents)
    }
    fn read(&self, path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
        self.estale()?;
        self.eio(|f| &mut f.read_eio)?;
        RealFs.read(path, limit)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        RealFs.remove_file(path)
    }
    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        self.estale()?;
        RealFs.exists(path)
    }
    fn fingerprint(&self, path: &Path) -> std::io::Result<fs::Fingerprint> {
        self.estale()?;
        RealFs.fingerprint(path)
    }
    fn modified(&self, path: &Path) -> std::io::Result<SystemTime> {
        self.estale()?;
        self.eio(|f| &mut f.modified_eio)?;
        Ok(self.skew(RealFs.modified(path)?))
    }
    fn touch(&self, path: &Path) -> std::io::Result<()> {
        if self.take(|f| &mut f.touch_eio) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        RealFs.touch(path)
    }
    fn server_now(&self, dir: &Path) -> std::io::Result<SystemTime> {
        self.eio(|f| &mut f.server_now_eio)?;
        Ok(self.skew(RealFs.server_now(dir)?))
    }
}

struct Setup {
    dir: tempfile::TempDir,
    layout: Layout,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.ensure().unwrap();
    Setup { dir, layout }
}

fn host(name: &str) -> Identity {
    Identity { host: name.into(), boot_id: format!("boot-{name}"), pid: 1, instance: Some("t".into()) }
}

fn drop_manifest(s: &Setup, name: &str) {
    std::fs::write(s.dir.path().join(name), b"{}").unwrap();
}

/// The candidate a scan would hand over for `name` now (a default fingerprint if it is gone).
fn judged(s: &Setup, name: &str) -> Candidate {
    let fingerprint = RealFs.fingerprint(&s.dir.path().join(name)).unwrap_or_default();
    Candidate { name: name.into(), complete: true, fingerprint }
}

fn age_lock(s: &Setup, job_id: &str, seconds: u64) {
    let file = std::fs::File::options().write(true).open(s.layout.lock_file(job_id)).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(seconds)).unwrap();
}

fn age_file(path: &Path, seconds: u64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(seconds)).unwrap();
}

/// Everything in `locks/` whose name marks a lock moved aside.
fn asides(s: &Setup) -> Vec<PathBuf> {
    std::fs::read_dir(s.layout.locks_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".lock.taken-"))
        .collect()
}

fn requeued(s: &Setup) -> Vec<String> {
    std::fs::read_dir(s.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".requeued-"))
        .collect()
}

/// A job whose owner `a` stopped heartbeating past the lease, and a queue `b` that judged it stale.
fn stale_job(s: &Setup, b: &Queue) -> (Claim, Stale) {
    drop_manifest(s, "m.json");
    let owner = Queue::new(s.layout.clone()).claim(&judged(s, "m.json"), &host("a")).unwrap().unwrap();
    age_lock(s, owner.job_id(), 200);
    let mut stale = b.stale(LEASE).unwrap();
    assert_eq!(stale.len(), 1);
    (owner, stale.remove(0))
}

fn lock_on_disk(s: &Setup, job_id: &str) -> LockRecord {
    Queue::new(s.layout.clone()).read_lock(&s.layout.lock_file(job_id)).unwrap()
}

const LEASE: Duration = Duration::from_secs(90);

/// Job ids of the form daemons generate, for files planted by hand.
const ORPHAN: &str = "20260101T000000Z-0000000000000001";
const GONE: &str = "20260101T000000Z-0000000000000002";

#[test]
fn a_manifest_replaced_after_it_was_judged_goes_back_to_settle() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let seen = judged(&s, "m.json");
    // Another daemon claims the judged file; the producer writes its next manifest, half-way.
    std::fs::rename(s.dir.path().join("m.json"), s.dir.path().join("elsewhere")).unwrap();
    std::fs::write(s.dir.path().join("m.json"), b"{\"vm_na").unwrap();
    assert!(Queue::new(s.layout.clone()).claim(&seen, &host("a")).unwrap().is_none());
    let back: Vec<String> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("m.requeued-"))
        .collect();
    assert_eq!(back.len(), 1, "the new file is back in the queue under a requeued name");
    assert_eq!(std::fs::read(s.dir.path().join(&back[0])).unwrap(), b"{\"vm_na");
    assert_eq!(std::fs::read_dir(s.layout.locks_dir()).unwrap().count(), 0, "no lock is left");
    assert_eq!(std::fs::read_dir(s.layout.claimed_dir()).unwrap().count(), 0, "no claim is left");
}

#[test]
fn a_claim_moves_the_manifest_and_writes_the_owner_record() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let claim = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().expect("claim wins");
    assert!(!s.dir.path().join("m.json").exists());
    assert!(claim.manifest_path().exists());
    let lock = Queue::new(s.layout.clone()).read_lock(&s.layout.lock_file(claim.job_id())).unwrap();
    assert_eq!((lock.owner, lock.generation), (host("a"), 1));
    assert!(claim.still_owned());
}

#[test]
fn the_second_claimant_loses_quietly_and_leaves_no_lock() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let _winner = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    assert!(Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("b")).unwrap().is_none());
    assert_eq!(std::fs::read_dir(s.layout.locks_dir()).unwrap().count(), 1);
}

#[test]
fn a_rename_reported_failed_after_succeeding_still_wins_by_looking() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let fs = FaultyFs::with(Faults { rename_fails_after_success: 1, ..Faults::default() });
    let claim = Queue::with_fs(s.layout.clone(), fs).claim(&judged(&s, "m.json"), &host("a")).unwrap();
    assert!(claim.is_some(), "the claimed manifest is there, so the claim stands");
}

#[test]
fn a_rename_reported_successful_without_effect_loses_by_looking() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let fs = FaultyFs::with(Faults { rename_succeeds_without_effect: 1, ..Faults::default() });
    assert!(Queue::with_fs(s.layout.clone(), fs).claim(&judged(&s, "m.json"), &host("a")).unwrap().is_none());
    assert!(s.dir.path().join("m.json").exists(), "the manifest stays for someone else");
    assert_eq!(std::fs::read_dir(s.layout.locks_dir()).unwrap().count(), 0, "the lock is withdrawn");
}

#[test]
fn estale_is_retried_not_read_as_a_lost_lock() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let fs = FaultyFs::with(Faults::default());
    let claim = Queue::with_fs(s.layout.clone(), fs.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    fs.faults.lock().unwrap().estale = 2;
    assert!(claim.still_owned(), "two ESTALEs are retried");
    fs.faults.lock().unwrap().estale = 2;
    assert_eq!(claim.heartbeat().beat(), Beat::Alive);
    assert!(fs.log.lock().unwrap().len() >= 4);
}

#[test]
fn a_lock_that_cannot_be_refreshed_fences_the_owner() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let fs = FaultyFs::with(Faults::default());
    let claim = Queue::with_fs(s.layout.clone(), fs.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    fs.faults.lock().unwrap().touch_eio = usize::MAX;
    assert!(!claim.still_owned(), "persistent EIO: publishing without knowing is refused");
    assert_eq!(claim.heartbeat().beat(), Beat::Unknown, "but the heartbeat does not call it lost");
}

#[test]
fn takeover_raises_the_generation_and_fences_the_old_owner() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let a = Queue::new(s.layout.clone());
    let old = a.claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    age_lock(&s, old.job_id(), 200);
    let b = Queue::new(s.layout.clone());
    let stale = b.stale(LEASE).unwrap();
    assert_eq!(stale.len(), 1);
    assert!(stale[0].age >= Duration::from_secs(199));
    let new = b.take_over(&stale[0], &host("b"), LEASE).unwrap().expect("takeover wins");
    assert_eq!(new.job_id(), old.job_id());
    assert_eq!(new.record().generation, 2);
    assert!(!old.still_owned(), "the old owner is fenced");
    assert_eq!(old.heartbeat().beat(), Beat::Lost, "and its heartbeat notices");
    assert!(new.still_owned());
    assert!(b.stale(LEASE).unwrap().is_empty(), "the new lock is fresh");
    let leftovers: Vec<_> = std::fs::read_dir(s.layout.locks_dir()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "the old lock moved aside is removed");
}

#[test]
fn takeover_backs_off_when_the_owner_heartbeats_in_time() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let owner = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    age_lock(&s, owner.job_id(), 200);
    let b = Queue::new(s.layout.clone());
    let stale = b.stale(LEASE).unwrap();
    // The owner wakes up between the judgement and the takeover.
    assert_eq!(owner.heartbeat().beat(), Beat::Alive);
    assert!(b.take_over(&stale[0], &host("b"), LEASE).unwrap().is_none());
    assert!(owner.still_owned(), "the lock was restored to its owner");
}

#[test]
fn of_two_takers_only_one_wins() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let owner = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    age_lock(&s, owner.job_id(), 200);
    let (b, c) = (Queue::new(s.layout.clone()), Queue::new(s.layout.clone()));
    let stale_b = b.stale(LEASE).unwrap();
    let stale_c = c.stale(LEASE).unwrap();
    let won_b = b.take_over(&stale_b[0], &host("b"), LEASE).unwrap();
    let won_c = c.take_over(&stale_c[0], &host("c"), LEASE).unwrap();
    assert!(won_b.is_some() && won_c.is_none());
    assert!(won_b.unwrap().still_owned());
}

#[test]
fn staleness_follows_the_servers_clock_not_ours() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let claim = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    for offset in [-3600, 3600] {
        // Every timestamp this host sees comes from a server whose clock is an hour off ours.
        let skewed = Queue::with_fs(
            s.layout.clone(),
            FaultyFs::with(Faults { server_clock_offset: offset, ..Faults::default() }),
        );
        assert!(skewed.stale(LEASE).unwrap().is_empty(), "a fresh lock is fresh whatever our clock says ({offset})");
    }
    age_lock(&s, claim.job_id(), 200);
    let skewed =
        Queue::with_fs(s.layout.clone(), FaultyFs::with(Faults { server_clock_offset: -3600, ..Faults::default() }));
    assert_eq!(skewed.stale(LEASE).unwrap().len(), 1);
}

#[test]
fn a_claimed_manifest_left_without_a_lock_is_recovered() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let claim = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    let job_id = claim.job_id().to_owned();
    std::fs::remove_file(s.layout.lock_file(&job_id)).unwrap();
    let manifest = std::fs::File::options().write(true).open(s.layout.claimed_manifest(&job_id)).unwrap();
    manifest.set_modified(SystemTime::now() - Duration::from_secs(200)).unwrap();
    let b = Queue::new(s.layout.clone());
    let stale = b.stale(LEASE).unwrap();
    assert_eq!(stale, vec![Stale { job_id: job_id.clone(), age: stale[0].age, has_lock: false }]);
    let taken = b.take_over(&stale[0], &host("b"), LEASE).unwrap().expect("recovered");
    assert_eq!(taken.job_id(), job_id);
    assert!(taken.still_owned());
}

#[test]
fn release_of_a_manifest_the_daemon_may_not_link_renames_it_back() {
    let s = setup();
    std::fs::write(s.dir.path().join("m.json"), b"{\"producer\":1}").unwrap();
    let fs = FaultyFs::with(Faults { link_eperm: 1, ..Faults::default() });
    let claim = Queue::with_fs(s.layout.clone(), fs).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    let job_id = claim.job_id().to_owned();
    claim.release().unwrap();
    let requeued = s.dir.path().join(format!("m.requeued-{job_id}.json"));
    assert_eq!(std::fs::read(&requeued).unwrap(), b"{\"producer\":1}");
    assert_eq!(std::fs::read_dir(s.layout.claimed_dir()).unwrap().count(), 0, "no claim is left");
    assert_eq!(std::fs::read_dir(s.layout.locks_dir()).unwrap().count(), 0, "no lock is left");
}

#[test]
fn release_requeues_under_a_new_name_and_never_touches_the_producers_name() {
    let s = setup();
    std::fs::write(s.dir.path().join("m.json"), b"{\"old\":1}").unwrap();
    let claim = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    // The producer reuses its fixed name as soon as it is free.
    std::fs::write(s.dir.path().join("m.json"), b"{\"new\":1}").unwrap();
    let job_id = claim.job_id().to_owned();
    claim.release().unwrap();
    assert_eq!(std::fs::read(s.dir.path().join("m.json")).unwrap(), b"{\"new\":1}");
    let requeued = s.dir.path().join(format!("m.requeued-{job_id}.json"));
    assert_eq!(std::fs::read(&requeued).unwrap(), b"{\"old\":1}");
    assert_eq!(std::fs::read_dir(s.layout.locks_dir()).unwrap().count(), 0);
    // Released again, it keeps one requeued suffix.
    let again = Queue::new(s.layout.clone())
        .claim(&judged(&s, &format!("m.requeued-{job_id}.json")), &host("b"))
        .unwrap()
        .unwrap();
    let second = again.job_id().to_owned();
    again.release().unwrap();
    assert!(s.dir.path().join(format!("m.requeued-{second}.json")).exists());
}

#[test]
fn release_leaves_a_job_taken_over_meanwhile_to_its_new_owner() {
    let s = setup();
    let b = Queue::new(s.layout.clone());
    let (old, stale) = stale_job(&s, &b);
    let job_id = old.job_id().to_owned();
    let new = b.take_over(&stale, &host("b"), LEASE).unwrap().unwrap();
    // The frozen owner thaws into a drain and gives back what it believes is its job.
    old.release().unwrap();
    assert!(requeued(&s).is_empty(), "the new owner's manifest is not requeued");
    assert!(s.layout.claimed_manifest(&job_id).exists());
    assert_eq!(lock_on_disk(&s, &job_id), *new.record(), "the new owner's lock is untouched");
    assert!(asides(&s).is_empty());
    assert!(new.still_owned());
}

#[test]
fn release_of_a_lock_left_by_an_earlier_life_requeues_even_past_the_lease() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let q = Queue::new(s.layout.clone());
    let claim = q.claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    age_lock(&s, claim.job_id(), 200);
    let (_, record) = q.locks().remove(0);
    q.adopt(record).release().unwrap();
    assert_eq!(requeued(&s).len(), 1);
    assert_eq!(std::fs::read_dir(s.layout.locks_dir()).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(s.layout.claimed_dir()).unwrap().count(), 0);
}

#[test]
fn a_job_whose_lock_is_aside_is_judged_by_the_aside_not_the_manifest() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let owner = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    let job_id = owner.job_id().to_owned();
    // The producer wrote the manifest long ago; a first taker has the live lock aside.
    age_file(&s.layout.claimed_manifest(&job_id), 200);
    let aside = s.layout.locks_dir().join(format!("{job_id}.lock.taken-first"));
    std::fs::rename(s.layout.lock_file(&job_id), &aside).unwrap();
    let third = Queue::new(s.layout.clone());
    assert!(third.stale(LEASE).unwrap().is_empty(), "a fresh aside stands for a live lock");
    let judged_earlier = Stale { job_id: job_id.clone(), age: Duration::from_secs(200), has_lock: false };
    assert!(third.take_over(&judged_earlier, &host("c"), LEASE).unwrap().is_none());
    assert!(aside.exists(), "the first taker's aside is left alone");
    assert!(!s.layout.lock_file(&job_id).exists());
    // Once the aside is past the lease, its taker died: the job is taken from its record.
    age_file(&aside, 200);
    let stale = third.stale(LEASE).unwrap();
    assert_eq!(stale.len(), 1);
    let taken = third.take_over(&stale[0], &host("c"), LEASE).unwrap().expect("taken from the aside");
    assert_eq!(taken.record().generation, 2);
}

#[test]
fn a_lock_that_cannot_be_restored_stays_aside_alive() {
    let s = setup();
    let b = Queue::with_fs(s.layout.clone(), FaultyFs::with(Faults { link_eperm: usize::MAX, ..Faults::default() }));
    let (owner, stale) = stale_job(&s, &b);
    assert_eq!(owner.heartbeat().beat(), Beat::Alive);
    assert!(b.take_over(&stale, &host("b"), LEASE).unwrap().is_none());
    assert_eq!(asides(&s).len(), 1, "the owner's record is kept aside, not deleted");
    assert!(Queue::new(s.layout.clone()).stale(LEASE).unwrap().is_empty(), "and it still looks alive");
}

#[test]
fn an_error_after_moving_a_lock_aside_puts_it_back() {
    let s = setup();
    let fs = FaultyFs::with(Faults::default());
    let b = Queue::with_fs(s.layout.clone(), fs.clone());
    let (owner, stale) = stale_job(&s, &b);
    fs.faults.lock().unwrap().modified_eio = usize::MAX;
    assert!(b.take_over(&stale, &host("b"), LEASE).is_err());
    assert_eq!(lock_on_disk(&s, owner.job_id()), *owner.record(), "the lock is back");
    assert!(asides(&s).is_empty());
}

#[test]
fn transient_errors_mid_takeover_are_retried() {
    let s = setup();
    let fs = FaultyFs::with(Faults::default());
    let b = Queue::with_fs(s.layout.clone(), fs.clone());
    let (_, stale) = stale_job(&s, &b);
    {
        let mut faults = fs.faults.lock().unwrap();
        faults.server_now_eio = 1;
        faults.modified_eio = 2;
    }
    let taken = b.take_over(&stale, &host("b"), LEASE).unwrap().expect("takeover wins");
    assert_eq!(taken.record().generation, 2);
}

#[test]
fn a_stale_lock_that_cannot_be_read_is_restored_not_taken_at_generation_one() {
    let s = setup();
    let fs = FaultyFs::with(Faults::default());
    let b = Queue::with_fs(s.layout.clone(), fs.clone());
    let (owner, stale) = stale_job(&s, &b);
    fs.faults.lock().unwrap().read_eio = usize::MAX;
    assert!(b.take_over(&stale, &host("b"), LEASE).unwrap().is_none());
    assert_eq!(lock_on_disk(&s, owner.job_id()), *owner.record(), "the lock is back");
    assert!(asides(&s).is_empty());
    fs.faults.lock().unwrap().read_eio = 2;
    let taken = b.take_over(&stale, &host("b"), LEASE).unwrap().expect("a read that succeeds on retry");
    assert_eq!(taken.record().generation, 2);
}

#[test]
fn a_torn_stale_lock_is_taken_over_from_the_record_left_aside() {
    let s = setup();
    let b = Queue::new(s.layout.clone());
    let (owner, stale) = stale_job(&s, &b);
    let job_id = owner.job_id().to_owned();
    // A takeover to generation 3 died writing its lock, before removing generation 2's aside.
    let earlier = LockRecord { generation: 2, ..owner.record().clone() };
    let aside = s.layout.locks_dir().join(format!("{job_id}.lock.taken-earlier"));
    std::fs::write(&aside, serde_json::to_vec(&earlier).unwrap()).unwrap();
    std::fs::write(s.layout.lock_file(&job_id), b"{\"job_id\": \"").unwrap();
    age_lock(&s, &job_id, 200);
    let taken = b.take_over(&stale, &host("b"), LEASE).unwrap().expect("takeover wins");
    assert_eq!(taken.record().generation, 3);
}

/// Moves `job_id`'s lock aside now, and runs `then` on it from another thread after a moment.
fn taker_holding_the_lock(s: &Setup, job_id: &str, then: fn(&Path, &Path)) -> std::thread::JoinHandle<()> {
    let lock = s.layout.lock_file(job_id);
    let aside = s.layout.locks_dir().join(format!("{job_id}.lock.taken-taker"));
    std::fs::rename(&lock, &aside).unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        then(&aside, &lock);
    })
}

fn put_back(aside: &Path, lock: &Path) {
    std::fs::hard_link(aside, lock).unwrap();
    std::fs::remove_file(aside).unwrap();
}

#[test]
fn heartbeat_and_fence_wait_for_a_lock_a_taker_puts_back() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let claim = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    let taker = taker_holding_the_lock(&s, claim.job_id(), put_back);
    assert_eq!(claim.heartbeat().beat(), Beat::Alive);
    taker.join().unwrap();
    let taker = taker_holding_the_lock(&s, claim.job_id(), put_back);
    assert!(claim.still_owned());
    taker.join().unwrap();
}

#[test]
fn heartbeat_and_fence_see_a_takeover_that_completes_while_they_wait() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let claim = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    let take = |aside: &Path, lock: &Path| {
        let mut record: LockRecord = serde_json::from_slice(&std::fs::read(aside).unwrap()).unwrap();
        (record.owner, record.generation) = (host("b"), record.generation + 1);
        std::fs::write(lock, serde_json::to_vec(&record).unwrap()).unwrap();
        std::fs::remove_file(aside).unwrap();
    };
    let taker = taker_holding_the_lock(&s, claim.job_id(), take);
    assert!(!claim.still_owned());
    taker.join().unwrap();
    assert_eq!(claim.heartbeat().beat(), Beat::Lost);
    // Without any lock aside, a missing lock is lost at once.
    std::fs::remove_file(s.layout.lock_file(claim.job_id())).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(claim.heartbeat().beat(), Beat::Lost);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_lock_left_without_a_claim_is_swept_once_past_the_lease() {
    let s = setup();
    let q = Queue::new(s.layout.clone());
    // A claim that died between creating its lock and moving the manifest, and an old aside.
    let record = LockRecord {
        job_id: ORPHAN.into(),
        owner: host("a"),
        generation: 1,
        claimed_at: Utc::now(),
        manifest_name: "m.json".into(),
    };
    std::fs::write(s.layout.lock_file(ORPHAN), serde_json::to_vec(&record).unwrap()).unwrap();
    assert!(q.stale(LEASE).unwrap().is_empty());
    assert_eq!(q.locks().len(), 1, "a claim in progress is left alone");
    age_lock(&s, ORPHAN, 200);
    let aside = s.layout.locks_dir().join(format!("{GONE}.lock.taken-x"));
    std::fs::write(&aside, b"{}").unwrap();
    age_file(&aside, 200);
    // A live job's old lock is stale, not orphaned.
    let b = Queue::new(s.layout.clone());
    let (owner, _) = stale_job(&s, &b);
    assert!(q.stale(LEASE).unwrap().len() == 1);
    assert!(q.locks().iter().all(|(_, r)| r.job_id == owner.job_id()), "the orphaned lock is gone");
    assert!(s.layout.lock_file(owner.job_id()).exists());
    assert!(!aside.exists() && asides(&s).is_empty());
}

/// A claimed job whose lock holds a record planted by hand, `change`d from the owner's own,
/// past the lease; and `b`'s judgement of it.
fn planted_lock(s: &Setup, change: impl FnOnce(&mut serde_json::Value)) -> (String, Stale) {
    drop_manifest(s, "m.json");
    let owner = Queue::new(s.layout.clone()).claim(&judged(s, "m.json"), &host("a")).unwrap().unwrap();
    let job_id = owner.job_id().to_owned();
    let mut record = serde_json::to_value(owner.record()).unwrap();
    change(&mut record);
    std::fs::write(s.layout.lock_file(&job_id), record.to_string()).unwrap();
    age_lock(s, &job_id, 200);
    let stale = Queue::new(s.layout.clone()).stale(LEASE).unwrap();
    assert_eq!(stale.len(), 1, "the planted lock's job is judged stale");
    (job_id, stale.into_iter().next().unwrap())
}

/// Takes the job over and checks that everything it names is the job of the lock's file name,
/// inside the queue, under a fresh valid lock; the planted record is in quarantine.
fn take_over_planted(s: &Setup, job_id: &str, stale: &Stale) -> Claim {
    let b = Queue::new(s.layout.clone());
    let taken = b.take_over(stale, &host("b"), LEASE).unwrap().expect("the job is taken over");
    assert_eq!(taken.job_id(), job_id);
    assert_eq!(taken.manifest_path(), s.layout.claimed_manifest(job_id));
    assert_eq!(taken.event_log(), s.layout.event_log(job_id));
    assert!(taken.still_owned(), "the new lock is valid and ours");
    assert_eq!(lock_on_disk(s, job_id), *taken.record());
    assert!(b.stale(LEASE).unwrap().is_empty(), "the job is not taken again at the next lease");
    assert!(asides(s).is_empty());
    let quarantined = std::fs::read_dir(s.layout.quarantine_dir()).unwrap().count();
    assert_eq!(quarantined, 1, "the planted record is kept in quarantine");
    taken
}

#[test]
fn a_lock_whose_job_id_leads_outside_the_queue_is_quarantined() {
    let s = setup();
    let elsewhere = s.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("J.json"), b"{\"outside\":1}").unwrap();
    let (job_id, stale) = planted_lock(&s, |r| r["job_id"] = "../../elsewhere/J".into());
    let taken = take_over_planted(&s, &job_id, &stale);
    assert!(std::fs::read(taken.manifest_path()).unwrap().starts_with(b"{}"), "the claimed manifest is read");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 1, "nothing is written outside the queue");
}

#[test]
fn a_lock_whose_job_id_is_another_jobs_is_quarantined() {
    let s = setup();
    let other = "20260101T000000Z-00000000deadbeef";
    std::fs::write(s.layout.claimed_manifest(other), b"{\"other\":1}").unwrap();
    let (job_id, stale) = planted_lock(&s, |r| r["job_id"] = other.into());
    take_over_planted(&s, &job_id, &stale);
    assert!(!s.layout.lock_file(other).exists(), "the other job is not taken with it");
}

#[test]
fn a_lock_at_the_last_generation_is_quarantined_not_wrapped_to_zero() {
    let s = setup();
    let (job_id, stale) = planted_lock(&s, |r| r["generation"] = u64::MAX.into());
    let taken = take_over_planted(&s, &job_id, &stale);
    assert_eq!(taken.record().generation, 1, "taken over from the claimed manifest alone");
}

#[test]
fn a_lock_naming_an_absolute_manifest_is_not_adopted_and_a_release_stays_in_the_queue() {
    let s = setup();
    let outside = s.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let absolute = outside.join("evil.json").to_string_lossy().into_owned();
    let (job_id, stale) = planted_lock(&s, |r| r["manifest_name"] = absolute.clone().into());
    let q = Queue::new(s.layout.clone());
    assert!(q.locks().is_empty(), "restart recovery never sees the damaged record");
    let taken = take_over_planted(&s, &job_id, &stale);
    // A record with such a name, however it reached a claim, is given back under a base name.
    q.adopt(LockRecord { manifest_name: absolute, ..taken.record().clone() }).release().unwrap();
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing is linked outside WATCH_DIR");
    assert_eq!(requeued(&s), [format!("artifact-manifest.requeued-{job_id}.json")]);
}

#[test]
fn a_heartbeat_after_the_jobs_own_finish_is_not_a_lost_lock() {
    let s = setup();
    drop_manifest(&s, "m.json");
    let claim = Queue::new(s.layout.clone()).claim(&judged(&s, "m.json"), &host("a")).unwrap().unwrap();
    let heartbeat = claim.heartbeat();
    let record = JobRecord {
        job_id: claim.job_id().to_owned(),
        vm_name: "vm".into(),
        host: "a".into(),
        instance: None,
        generation: 1,
        state: records::JobState::Failed,
        started_at: Utc::now(),
        finished_at: Some(Utc::now()),
        manifest_name: "m.json".into(),
        stage: "source".into(),
        result_file: None,
        error: Some("failed".into()),
        causes: Vec::new(),
        source_bytes: Vec::new(),
    };
    claim.finish(&record).unwrap();
    assert_eq!(heartbeat.beat(), Beat::Ending, "the job's own finish removed the lock");
    // A release is the job's own end too, and so is its lock moved aside.
    drop_manifest(&s, "n.json");
    let claim = Queue::new(s.layout.clone()).claim(&judged(&s, "n.json"), &host("a")).unwrap().unwrap();
    let heartbeat = claim.heartbeat();
    claim.release().unwrap();
    assert_eq!(heartbeat.beat(), Beat::Ending);
}

#[test]
fn a_lock_that_is_a_symlink_or_a_fifo_is_damaged_and_never_followed() {
    let s = setup();
    let (job_id, _) = planted_lock(&s, |_| {});
    let lock = s.layout.lock_file(&job_id);
    let q = Queue::new(s.layout.clone());
    // A valid record elsewhere, reached through a symlink planted as the lock.
    let elsewhere = s.dir.path().join("record.json");
    std::fs::rename(&lock, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &lock).unwrap();
    let err = q.read_lock(&lock).unwrap_err();
    assert!(matches!(damage_of(&err), Some(LockRecordError::NotAFile)), "{err}");
    // A FIFO would block a plain read for ever.
    std::fs::remove_file(&lock).unwrap();
    nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let err = q.read_lock(&lock).unwrap_err();
    assert!(matches!(damage_of(&err), Some(LockRecordError::NotAFile)), "{err}");
    assert!(q.locks().is_empty());
}
