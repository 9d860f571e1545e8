//! Finding manifests that are ready to take.
//!
//! HyperSDK writes `artifact-manifest.json` in place (`os.WriteFile`), so a scan can see a
//! half-written file. A manifest is ready only when it parses as complete JSON and its size
//! and mtime have not changed for the settle period. A file that stays unparseable and
//! unchanged for the invalid-manifest grace period is handed over to be failed, so that the
//! producer gets an `.error` instead of waiting forever.
//!
//! A manifest the daemon saw *renamed* into WATCH_DIR (inotify, [`Scanner::arrived_by_rename`])
//! was whole when it appeared, so it skips the settle period while it still looks as it did
//! then. Nothing else does: polling, other NFS clients' writes (invisible to inotify) and
//! files written in place keep the settle period.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::fs::Fingerprint;
use super::layout::is_manifest_name;
use crate::manifest::{self, ReadError};

/// A manifest file to claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// File name in WATCH_DIR.
    pub name: String,
    /// Whether it parsed as complete JSON when last read.
    pub complete: bool,
    /// What the file looked like when judged ready; the claim checks it took this file.
    pub fingerprint: Fingerprint,
}

/// The result of one scan.
#[derive(Debug, Default)]
pub(crate) struct ScanResult {
    /// Ready to claim, oldest observation first.
    pub ready: Vec<Candidate>,
    /// When the next file still settling could become ready; the caller rescans then.
    pub next_check: Option<Duration>,
    /// Manifest files present, ready or not (with those in `not_utf8`).
    pub waiting: usize,
    /// Manifest files whose name is not UTF-8, as `{:?}` spells them (`"caf\xE9.json"`): never
    /// taken (results and records are named by the file name), but counted and reported so that
    /// they are not waiting unseen for ever.
    pub not_utf8: Vec<String>,
}

/// At most this many renamed-in manifests are remembered between scans; beyond it a rename
/// is not noted and the file waits for the settle period like any other. Each entry is a
/// manifest file that existed when noted, and a scan drops those gone, so this only bounds a
/// burst between two scans.
const MAX_RENAMED: usize = 4096;

#[derive(Debug)]
struct Observation {
    fingerprint: Fingerprint,
    unchanged_since: Instant,
}

/// Remembers what each file looked like at previous scans.
#[derive(Debug)]
pub(crate) struct Scanner {
    watch_dir: PathBuf,
    settle: Duration,
    invalid_grace: Duration,
    seen: HashMap<String, Observation>,
    /// Manifests seen arriving by a rename, with what they looked like then.
    renamed: HashMap<String, Fingerprint>,
    /// Names not UTF-8 already warned about, so that the journal says it once per file.
    warned: HashSet<OsString>,
}

impl Scanner {
    /// A scanner of `watch_dir`.
    pub(crate) fn new(watch_dir: &Path, settle: Duration, invalid_grace: Duration) -> Scanner {
        Scanner {
            watch_dir: watch_dir.to_owned(),
            settle,
            invalid_grace,
            seen: HashMap::new(),
            renamed: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// Notes that `name` (a file name in WATCH_DIR) was just renamed into it: a producer that
    /// writes `name.tmp` and renames it has finished writing, so the file may be taken without
    /// the settle period as long as its fingerprint stays the one it has now.
    ///
    /// Ignored for names that are not manifests, files that are gone or not regular, and the
    /// daemon's own releases (`<stem>.requeued-<job>.json`): a release may return a manifest
    /// that was replaced between scan and claim, whose producer may still be writing it.
    pub(crate) fn arrived_by_rename(&mut self, name: &str) {
        let plain = Path::new(name).file_name().is_some_and(|n| n == name);
        if !plain || !is_manifest_name(name) || name.contains(".requeued-") {
            return;
        }
        if self.renamed.len() >= MAX_RENAMED && !self.renamed.contains_key(name) {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(self.watch_dir.join(name)) else { return };
        if meta.file_type().is_file() {
            self.renamed.insert(name.to_owned(), Fingerprint::of(&meta));
        }
    }

    /// Lists the directory and returns the manifests that are ready.
    pub(crate) fn scan(&mut self) -> std::io::Result<ScanResult> {
        let now = Instant::now();
        let mut present = Vec::new();
        let mut not_utf8 = Vec::new();
        let mut result = ScanResult::default();
        for entry in std::fs::read_dir(&self.watch_dir)? {
            let entry = entry?;
            let file_name = entry.file_name();
            if !is_manifest_name(&file_name.to_string_lossy()) {
                continue;
            }
            // A symlink could make the daemon read any file as a "manifest": only regular
            // files are considered, judged without following links.
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
            if !meta.file_type().is_file() {
                continue;
            }
            let Some(name) = file_name.to_str().map(str::to_owned) else {
                not_utf8.push(file_name);
                continue;
            };
            present.push(name.clone());
            let fingerprint = Fingerprint::of(&meta);
            let age = self.observe(&name, fingerprint, now);
            if age < self.settle && !self.arrived_whole(&name, fingerprint) {
                result.next_check = min_some(result.next_check, self.settle - age);
                continue;
            }
            let complete = self.reads_as_complete_json(&name);
            if complete || age >= self.invalid_grace {
                result.ready.push(Candidate { name, complete, fingerprint });
            } else {
                result.next_check = min_some(result.next_check, self.invalid_grace - age);
            }
        }
        self.seen.retain(|name, _| present.contains(name));
        self.renamed.retain(|name, _| present.contains(name));
        self.report_not_utf8(&not_utf8);
        result.waiting = present.len() + not_utf8.len();
        result.not_utf8 = not_utf8.iter().map(|n| format!("{n:?}")).collect();
        result.ready.sort_by_key(|c| self.seen.get(&c.name).map(|o| o.unchanged_since));
        Ok(result)
    }

    /// Forgets a file, after it was claimed or lost to another daemon.
    pub(crate) fn forget(&mut self, name: &str) {
        self.seen.remove(name);
        self.renamed.remove(name);
    }

    /// Whether `name` was renamed in and has not changed since: once it has, it is an ordinary
    /// file written in place and waits for the settle period.
    fn arrived_whole(&mut self, name: &str, fingerprint: Fingerprint) -> bool {
        match self.renamed.get(name) {
            Some(noted) if *noted == fingerprint => true,
            Some(_) => {
                self.renamed.remove(name);
                false
            }
            None => false,
        }
    }

    /// Warns once per file about manifests whose name is not UTF-8, and forgets those gone.
    fn report_not_utf8(&mut self, names: &[OsString]) {
        self.warned.retain(|name| names.contains(name));
        for name in names {
            if self.warned.insert(name.clone()) {
                tracing::warn!(
                    manifest = ?name,
                    "a manifest whose file name is not UTF-8 is never taken (results and records are named by it); rename it"
                );
            }
        }
    }

    /// Records the file's fingerprint and returns how long it has been unchanged.
    fn observe(&mut self, name: &str, fingerprint: Fingerprint, now: Instant) -> Duration {
        let observation = self.seen.entry(name.to_owned()).or_insert(Observation { fingerprint, unchanged_since: now });
        if observation.fingerprint != fingerprint {
            *observation = Observation { fingerprint, unchanged_since: now };
        }
        now.duration_since(observation.unchanged_since)
    }

    fn reads_as_complete_json(&self, name: &str) -> bool {
        match manifest::read_file(&self.watch_dir.join(name)) {
            Ok(bytes) => manifest::is_complete_json(&bytes),
            // Oversized files are "complete" so that they are taken and failed with a clear error.
            Err(ReadError::TooLarge(_)) => true,
            Err(_) => false,
        }
    }
}

fn min_some(current: Option<Duration>, candidate: Duration) -> Option<Duration> {
    Some(current.map_or(candidate, |c| c.min(candidate)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanner(dir: &Path, settle_ms: u64, grace_ms: u64) -> Scanner {
        Scanner::new(dir, Duration::from_millis(settle_ms), Duration::from_millis(grace_ms))
    }

    fn fingerprint_of(path: &Path) -> Fingerprint {
        Fingerprint::of(&std::fs::symlink_metadata(path).unwrap())
    }

    #[test]
    fn waits_for_the_settle_period_then_takes_complete_json() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.json"), b"{\"a\":1}").unwrap();
        let mut s = scanner(dir.path(), 150, 10_000);
        let first = s.scan().unwrap();
        assert!(first.ready.is_empty());
        assert!(first.next_check.is_some());
        std::thread::sleep(Duration::from_millis(200));
        let second = s.scan().unwrap();
        let fingerprint = fingerprint_of(&dir.path().join("m.json"));
        assert_eq!(second.ready, vec![Candidate { name: "m.json".into(), complete: true, fingerprint }]);
    }

    #[test]
    fn a_change_restarts_the_settle_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, b"{\"a\":").unwrap();
        let mut s = scanner(dir.path(), 150, 10_000);
        s.scan().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        std::fs::write(&path, b"{\"a\":12345}").unwrap();
        assert!(s.scan().unwrap().ready.is_empty(), "a file that just changed is not ready");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(s.scan().unwrap().ready.len(), 1);
    }

    #[test]
    fn partial_json_is_held_until_the_grace_period_then_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.json"), b"{\"a\":").unwrap();
        let mut s = scanner(dir.path(), 50, 300);
        s.scan().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(s.scan().unwrap().ready.is_empty(), "partial JSON is not ready within the grace period");
        std::thread::sleep(Duration::from_millis(300));
        let fingerprint = fingerprint_of(&dir.path().join("m.json"));
        assert_eq!(s.scan().unwrap().ready, vec![Candidate { name: "m.json".into(), complete: false, fingerprint }]);
    }

    #[test]
    fn a_manifest_named_in_another_encoding_is_counted_and_reported_not_ignored() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9.json")), b"{}").unwrap();
        std::fs::write(dir.path().join(std::ffi::OsStr::from_bytes(b"notes-\xe9.txt")), b"{}").unwrap();
        let mut s = scanner(dir.path(), 0, 0);
        let scan = s.scan().unwrap();
        assert!(scan.ready.is_empty());
        assert_eq!((scan.waiting, scan.not_utf8), (1, vec![r#""caf\xE9.json""#.to_owned()]));
        assert_eq!(s.warned.len(), 1);
        std::fs::remove_file(dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9.json"))).unwrap();
        let scan = s.scan().unwrap();
        assert_eq!((scan.waiting, scan.not_utf8.len(), s.warned.len()), (0, 0, 0));
    }

    /// Writes `<name>.tmp` and renames it to `name`, as the contract recommends to producers.
    fn rename_in(dir: &Path, name: &str, bytes: &[u8]) {
        let temp = dir.join(format!("{name}.tmp"));
        std::fs::write(&temp, bytes).unwrap();
        std::fs::rename(&temp, dir.join(name)).unwrap();
    }

    #[test]
    fn a_manifest_renamed_in_is_ready_at_once() {
        let dir = tempfile::tempdir().unwrap();
        rename_in(dir.path(), "m.json", b"{\"a\":1}");
        let mut s = scanner(dir.path(), 60_000, 120_000);
        s.arrived_by_rename("m.json");
        let fingerprint = fingerprint_of(&dir.path().join("m.json"));
        assert_eq!(s.scan().unwrap().ready, vec![Candidate { name: "m.json".into(), complete: true, fingerprint }]);
    }

    #[test]
    fn a_renamed_in_manifest_still_needs_complete_json() {
        let dir = tempfile::tempdir().unwrap();
        rename_in(dir.path(), "m.json", b"{\"a\":");
        let mut s = scanner(dir.path(), 60_000, 120_000);
        s.arrived_by_rename("m.json");
        let scan = s.scan().unwrap();
        assert!(scan.ready.is_empty(), "partial JSON is held for the grace period even when renamed in");
        assert!(scan.next_check.is_some());
    }

    #[test]
    fn a_renamed_in_manifest_changed_afterwards_waits_for_the_settle_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        rename_in(dir.path(), "m.json", b"{\"a\":1}");
        let mut s = scanner(dir.path(), 150, 10_000);
        s.arrived_by_rename("m.json");
        std::fs::write(&path, b"{\"a\":12345}").unwrap();
        assert!(s.scan().unwrap().ready.is_empty(), "written in place after the rename: it settles again");
        std::fs::write(&path, b"{\"a\":1}").unwrap();
        assert!(s.scan().unwrap().ready.is_empty(), "trust once lost is not regained by looking alike");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(s.scan().unwrap().ready.len(), 1, "and is taken once settled");
    }

    #[test]
    fn a_manifest_written_in_place_still_waits_beside_a_renamed_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in-place.json"), b"{\"a\":1}").unwrap();
        rename_in(dir.path(), "renamed.json", b"{\"a\":1}");
        let mut s = scanner(dir.path(), 60_000, 120_000);
        s.arrived_by_rename("renamed.json");
        let scan = s.scan().unwrap();
        let ready: Vec<&str> = scan.ready.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(ready, ["renamed.json"]);
        assert_eq!(scan.waiting, 2);
        assert!(scan.next_check.is_some(), "the one written in place is still settling");
    }

    #[test]
    fn renames_of_other_names_and_of_our_own_releases_are_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["m.json.tmp", ".m.json", "notes.txt", "m.requeued-J1.json"] {
            std::fs::write(dir.path().join(name), b"{}").unwrap();
        }
        std::fs::create_dir(dir.path().join("d.json")).unwrap();
        let mut s = scanner(dir.path(), 60_000, 120_000);
        for name in ["m.json.tmp", ".m.json", "notes.txt", "m.requeued-J1.json", "d.json", "gone.json", "../x.json"] {
            s.arrived_by_rename(name);
        }
        assert!(s.renamed.is_empty(), "{:?}", s.renamed);
        assert!(s.scan().unwrap().ready.is_empty(), "a released manifest settles like any other");
    }

    #[test]
    fn a_renamed_in_manifest_is_forgotten_when_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        rename_in(dir.path(), "m.json", b"{}");
        let mut s = scanner(dir.path(), 60_000, 120_000);
        s.arrived_by_rename("m.json");
        assert_eq!(s.renamed.len(), 1);
        std::fs::remove_file(dir.path().join("m.json")).unwrap();
        s.scan().unwrap();
        assert!(s.renamed.is_empty());
        rename_in(dir.path(), "n.json", b"{}");
        s.arrived_by_rename("n.json");
        s.forget("n.json");
        assert!(s.renamed.is_empty());
    }

    #[test]
    fn at_most_max_renamed_manifests_are_remembered_between_scans() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = scanner(dir.path(), 60_000, 120_000);
        for i in 0..=MAX_RENAMED {
            let name = format!("m{i}.json");
            std::fs::write(dir.path().join(&name), b"{}").unwrap();
            s.arrived_by_rename(&name);
        }
        assert_eq!(s.renamed.len(), MAX_RENAMED);
        let scan = s.scan().unwrap();
        assert_eq!((scan.ready.len(), scan.waiting), (MAX_RENAMED, MAX_RENAMED + 1), "the one beyond settles");
    }

    #[test]
    fn ignores_hidden_temp_lock_files_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".m.json", "m.json.tmp", "m.part", "m.lock", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"{}").unwrap();
        }
        std::fs::write(dir.path().join("target"), b"{}").unwrap();
        std::os::unix::fs::symlink(dir.path().join("target"), dir.path().join("link.json")).unwrap();
        let mut s = scanner(dir.path(), 0, 0);
        assert!(s.scan().unwrap().ready.is_empty());
    }
}
