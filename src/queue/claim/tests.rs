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
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        self.estale()?;
        RealFs.read(path)
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
        Ok(self.skew(RealFs.modified(path)?))
    }
    fn touch(&self, path: &Path) -> std::io::Result<()> {
        if self.take(|f| &mut f.touch_eio) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        RealFs.touch(path)
    }
    fn server_now(&self, dir: &Path) -> std::io::Result<SystemTime> {
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

const LEASE: Duration = Duration::from_secs(90);

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
