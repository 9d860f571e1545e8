//! The storage pool named by LIBVIRT_POOL: where its directory is, and placing converted
//! disks there under their final names.
//!
//! Rules (docs/LIBVIRT.md): a pool whose directory is OUTPUT_DIR uses the published files; a
//! pool with another local directory gets the disks hard-linked (same filesystem) or copied
//! there; a pool with no directory on this host (LVM, iSCSI, a remote libvirt, the test
//! driver's made-up paths) leaves the disks in OUTPUT_DIR, with a warning in the report.
//!
//! A fresh libvirtd has no pool until virt-install or virt-manager makes one; LIBVIRT_POOL's
//! default names the one they would make, so a missing `default` pool is created the way
//! virt-install does ([`Pool::open`]). Any other missing name is the operator's to create.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quick_xml::events::Event;
use quick_xml::Reader;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::{Connection, LibvirtError};
use crate::publish;

/// Mode of every disk we publish or place: libvirt's qemu user must be able to read it (as
/// qemu-img's own output is), whatever the daemon's umask.
pub(crate) const DISK_MODE: u32 = 0o644;

/// The pool LIBVIRT_POOL names by default, and the only one hyper2kvm creates when missing.
pub(crate) const DEFAULT_POOL: &str = "default";

/// The directory virt-install gives the `default` pool of `qemu:///system`.
pub(crate) const DEFAULT_POOL_DIR: &str = "/var/lib/libvirt/images";

/// How a missing `default` pool is created (see [`Pool::open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DefaultPool {
    /// The pool's directory: [`DEFAULT_POOL_DIR`] outside tests.
    pub dir: PathBuf,
    /// How long a `default` pool found stopped is watched before the job gives up on it:
    /// another job or host may have defined it a moment ago and be starting it.
    pub grace: Duration,
}

impl DefaultPool {
    /// The pool virt-install creates: a directory pool at `/var/lib/libvirt/images`.
    pub(crate) fn virt_install() -> DefaultPool {
        // A pool's start scans its directory for volumes; seconds even for a full one.
        DefaultPool { dir: PathBuf::from(DEFAULT_POOL_DIR), grace: Duration::from_secs(10) }
    }

    /// The pool's definition, as virt-install writes it: no permissions, so that building an
    /// existing directory leaves its owner, mode and ACLs alone.
    fn xml(&self) -> String {
        let dir = self.dir.to_string_lossy();
        format!(
            "<pool type='dir'><name>{DEFAULT_POOL}</name><target><path>{}</path></target></pool>",
            quick_xml::escape::escape(dir.as_ref())
        )
    }
}

/// A pool found by [`Pool::open`].
pub(crate) struct Opened {
    /// The active pool.
    pub pool: Pool,
    /// This job defined it (the `default` pool was missing).
    pub created: bool,
    /// What went less well, for the report (autostart could not be set).
    pub warnings: Vec<String>,
}

/// An active storage pool.
pub(crate) struct Pool {
    pool: StoragePool,
    name: String,
    uri: String,
    target: Option<PathBuf>,
}

impl Pool {
    /// Looks the pool up by name; it must exist and be active.
    pub(crate) fn lookup(conn: &Connection, name: &str) -> Result<Pool, LibvirtError> {
        if name.contains('\0') {
            return Err(LibvirtError::BadSetting { key: "LIBVIRT_POOL" });
        }
        let uri = conn.uri().to_owned();
        let pool = StoragePool::lookup_by_name(conn.raw(), name).map_err(|source| match source.code() {
            ErrorNumber::NoStoragePool => LibvirtError::PoolMissing { pool: name.to_owned(), uri: uri.clone(), source },
            _ => conn.call_error(format!("looking up storage pool '{name}'"), source),
        })?;
        let call = |what: &str, source| conn.call_error(format!("{what} storage pool '{name}'"), source);
        if !pool.is_active().map_err(|e| call("checking", e))? {
            return Err(LibvirtError::PoolInactive { pool: name.to_owned(), uri });
        }
        let xml = pool.get_xml_desc(0).map_err(|e| call("reading", e))?;
        Ok(Pool { pool, name: name.to_owned(), uri, target: target_path(&xml) })
    }

    /// Looks LIBVIRT_POOL up as [`Pool::lookup`] does, except for the `default` pool: when it
    /// is missing it is created as virt-install does (a directory pool at `default.dir`,
    /// built, started, autostarted), and when it is stopped it is given `default.grace` to
    /// start, since another job or host may be creating it at this moment.
    pub(crate) fn open(conn: &Connection, name: &str, default: &DefaultPool) -> Result<Opened, LibvirtError> {
        let found = Pool::lookup(conn, name);
        if name != DEFAULT_POOL {
            return found.map(|pool| Opened { pool, created: false, warnings: Vec::new() });
        }
        let found = match found {
            Err(LibvirtError::PoolInactive { .. }) => wait_active(conn, default.grace),
            found => found,
        };
        match found {
            // Also when a creator that failed undefined it while this job waited.
            Err(LibvirtError::PoolMissing { .. }) => {
                let (created, warnings) = create_default(conn, default)?;
                Ok(Opened { pool: Pool::lookup(conn, name)?, created, warnings })
            }
            found => found.map(|pool| Opened { pool, created: false, warnings: Vec::new() }),
        }
    }

    /// The pool's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The pool's `<target><path>`, as libvirt reports it.
    pub(crate) fn target(&self) -> Option<&Path> {
        self.target.as_deref()
    }

    /// Asks libvirt to rescan the pool, so that `virsh vol-list` shows new files.
    pub(crate) fn refresh(&self) -> Result<(), LibvirtError> {
        self.pool.refresh(0).map(|_| ()).map_err(|source| LibvirtError::Call {
            uri: self.uri.clone(),
            action: format!("refreshing storage pool '{}'", self.name),
            source,
        })
    }

    /// The names among `files` that the pool does not list as volumes.
    pub(crate) fn unlisted<'a>(&self, files: &'a [String]) -> Vec<&'a str> {
        files.iter().filter(|f| StorageVol::lookup_by_name(&self.pool, f).is_err()).map(String::as_str).collect()
    }

    /// Refreshes the pool and says, as a report warning, what went wrong or is still not
    /// listed. Nothing to say is `None`.
    pub(crate) fn refresh_and_check(&self, files: &[String]) -> Option<String> {
        if let Err(e) = self.refresh() {
            return Some(format!("{e}: {}", e.causes().join(": ")));
        }
        let unlisted = self.unlisted(files);
        (!unlisted.is_empty()).then(|| {
            format!(
                "libvirt storage pool '{}' does not list {} after a refresh (the test driver never does)",
                self.name,
                unlisted.join(", ")
            )
        })
    }
}

/// Defines, builds, starts and autostarts the `default` pool. Returns whether this call
/// defined it, and warnings.
///
/// Other jobs of this daemon and other hosts may be doing the same at this moment, so none of
/// their steps is an error here: a define refused because the pool now exists is followed by
/// a lookup of theirs, and a build or start that fails is fine once the pool is active.
pub(super) fn create_default(conn: &Connection, default: &DefaultPool) -> Result<(bool, Vec<String>), LibvirtError> {
    let failed = |source| LibvirtError::PoolCreate { uri: conn.uri().to_owned(), dir: default.dir.clone(), source };
    let (pool, defined) = match StoragePool::define_xml(conn.raw(), &default.xml(), 0) {
        Ok(pool) => (pool, true),
        Err(source) => match StoragePool::lookup_by_name(conn.raw(), DEFAULT_POOL) {
            Ok(pool) => {
                tracing::info!(
                    pool = DEFAULT_POOL,
                    uri = conn.uri(),
                    "libvirt storage pool 'default' was defined by another job or host meanwhile; using it"
                );
                (pool, false)
            }
            Err(_) => return Err(failed(source)),
        },
    };
    if let Err(source) = build_and_start(&pool) {
        if defined {
            // Left defined but stopped, it would make every later job wait and then fail
            // with "not active" instead of trying again and naming this cause.
            let _ = pool.undefine();
        }
        return Err(failed(source));
    }
    let mut warnings = Vec::new();
    if defined {
        tracing::info!(
            pool = DEFAULT_POOL,
            dir = %default.dir.display(),
            uri = conn.uri(),
            "created libvirt storage pool 'default' (it did not exist), as virt-install does"
        );
        if let Err(e) = pool.set_autostart(true) {
            warnings.push(format!(
                "created libvirt storage pool 'default' but could not mark it to start with the host: {}",
                e.message()
            ));
        }
    }
    Ok((defined, warnings))
}

/// Builds (creates the directory if missing) and starts a stopped pool.
fn build_and_start(pool: &StoragePool) -> Result<(), virt::error::Error> {
    if pool.is_active()? {
        return Ok(());
    }
    unless_active(pool, pool.build(0).and_then(|_| pool.create(0)).map(|_| ()))
}

/// A step's error is no error when the pool is active after all: another job or host started
/// it meanwhile ("storage pool 'default' is active").
pub(super) fn unless_active(
    pool: &StoragePool,
    step: Result<(), virt::error::Error>,
) -> Result<(), virt::error::Error> {
    match step {
        Ok(()) => Ok(()),
        Err(_) if pool.is_active()? => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits up to `grace` for the stopped `default` pool to become active.
fn wait_active(conn: &Connection, grace: Duration) -> Result<Pool, LibvirtError> {
    let deadline = Instant::now() + grace;
    loop {
        match Pool::lookup(conn, DEFAULT_POOL) {
            Err(LibvirtError::PoolInactive { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            found => return found,
        }
    }
}

/// Where a job's disks go, given the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Placement {
    /// The pool's directory is OUTPUT_DIR: the domain uses the published files.
    OutputDir,
    /// The disks are linked or copied into this directory, the pool's.
    Directory(PathBuf),
    /// The pool has no directory on this host; the domain uses the files in OUTPUT_DIR. The
    /// reason, phrased to follow the pool's name.
    Elsewhere(String),
}

/// Decides where the disks go: see the module's rules.
pub(crate) fn placement(target: Option<&Path>, output_dir: &Path, remote: bool) -> Placement {
    if remote {
        return Placement::Elsewhere("belongs to a libvirt on another host".to_owned());
    }
    let Some(target) = target else {
        return Placement::Elsewhere("has no target directory".to_owned());
    };
    let local_dir = target.is_absolute() && target.is_dir();
    let canonical = if local_dir { target.canonicalize().ok() } else { None };
    let Some(canonical) = canonical else {
        return Placement::Elsewhere(format!("has no directory on this host (its target is {})", target.display()));
    };
    match output_dir.canonicalize() {
        Ok(output) if output == canonical => Placement::OutputDir,
        _ => Placement::Directory(canonical),
    }
}

/// A converted disk: its staged file and its final name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiskFile {
    /// The qcow2 in the job's staging directory.
    pub staged: PathBuf,
    /// `V.qcow2` or `V-<id>.qcow2`.
    pub name: String,
}

/// Files this job placed in a pool's directory.
#[derive(Debug, Default)]
pub(crate) struct Placed {
    paths: Vec<PathBuf>,
}

impl Placed {
    /// The placed files, in the order of the disks.
    pub(crate) fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Removes the placed files again (the registration failed; the staged disks are kept
    /// elsewhere).
    pub(crate) fn remove(self) {
        for path in self.paths {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a disk placed in the pool");
            }
        }
    }
}

/// Places `disks` into the pool directory `dir` under their final names.
///
/// A file already there under a final name is replaced only when it is in `replaceable` (a
/// disk of this VM's own domain, from an earlier import); anything else is refused before a
/// single file is touched. `tag` makes the temporary names unique to this job.
pub(crate) fn place_disks(
    pool: &str,
    dir: &Path,
    disks: &[DiskFile],
    replaceable: &[PathBuf],
    domain: &str,
    tag: &str,
) -> Result<Placed, LibvirtError> {
    for disk in disks {
        let path = dir.join(&disk.name);
        if std::fs::symlink_metadata(&path).is_ok() && !replaceable.contains(&path) {
            return Err(LibvirtError::PoolFileTaken { pool: pool.to_owned(), path, name: domain.to_owned() });
        }
    }
    let mut placed = Placed::default();
    for disk in disks {
        match place_one(&disk.staged, dir, &disk.name, tag) {
            Ok(path) => placed.paths.push(path),
            Err(source) => {
                placed.remove();
                return Err(placement_error(pool, dir, source));
            }
        }
    }
    publish::fsync_dir(dir).map_err(|source| placement_error(pool, dir, source))?;
    Ok(placed)
}

fn placement_error(pool: &str, dir: &Path, source: std::io::Error) -> LibvirtError {
    let (pool, dir) = (pool.to_owned(), dir.to_owned());
    match source.kind() {
        ErrorKind::PermissionDenied => LibvirtError::PoolNotWritable { pool, dir, source },
        ErrorKind::ReadOnlyFilesystem => LibvirtError::PoolReadOnly { pool, dir, source },
        _ => LibvirtError::Placement { pool, dir, source },
    }
}

/// Links (or copies) one disk under a temporary name, then renames it into place, so that a
/// half-copied disk never carries its final name.
fn place_one(staged: &Path, dir: &Path, name: &str, tag: &str) -> std::io::Result<PathBuf> {
    let temp = dir.join(format!(".{name}.{tag}.part"));
    // A hard link costs nothing; it fails across filesystems (EXDEV) and on filesystems
    // without links, and then the disk is copied.
    if std::fs::hard_link(staged, &temp).is_err() {
        copy_new(staged, &temp)?;
    }
    let target = dir.join(name);
    if let Err(e) = std::fs::rename(&temp, &target) {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    Ok(target)
}

/// Copies `from` into the new file `to` (never following or reusing an existing one),
/// readable by libvirt, fsynced. A failed copy leaves nothing behind.
fn copy_new(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut source = File::open(from)?;
    let mut target = publish::open_new(to)?;
    let filled = fill(&mut source, &mut target);
    if filled.is_err() {
        let _ = std::fs::remove_file(to);
    }
    filled
}

fn fill(source: &mut File, target: &mut File) -> std::io::Result<()> {
    // std::io::copy uses copy_file_range(2) between files where the kernel can.
    std::io::copy(source, target)?;
    target.set_permissions(std::fs::Permissions::from_mode(DISK_MODE))?;
    target.sync_all()
}

/// The `<target><path>` of a storage pool's XML.
pub(crate) fn target_path(xml: &str) -> Option<PathBuf> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Vec<u8>> = Vec::new();
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) => stack.push(e.local_name().as_ref().to_vec()),
            Event::End(_) => {
                stack.pop();
            }
            Event::Text(t) if stack == [b"pool".as_slice(), b"target", b"path"] => {
                let text = t.unescape().ok()?;
                let text = text.trim();
                return (!text.is_empty()).then(|| PathBuf::from(text));
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn target_path_is_read_from_the_pool_xml() {
        let xml = "<pool type='dir'><name>default</name><source><dir path='/x'/></source>\
                   <target>\n  <path>/var/lib/libvirt/images &amp; more</path>\n</target></pool>";
        assert_eq!(target_path(xml), Some(PathBuf::from("/var/lib/libvirt/images & more")));
        assert_eq!(target_path("<pool type='logical'><name>vg</name></pool>"), None);
        assert_eq!(target_path("<pool><target><path>"), None);
        assert_eq!(target_path("not xml <<<"), None);
    }

    #[test]
    fn placement_follows_the_pool_directory() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out");
        let pool = dir.path().join("pool");
        std::fs::create_dir_all(&output).unwrap();
        std::fs::create_dir_all(&pool).unwrap();
        let pool = pool.canonicalize().unwrap();
        assert_eq!(placement(Some(&pool), &output, false), Placement::Directory(pool.clone()));
        assert_eq!(placement(Some(&output.join("../out")), &output, false), Placement::OutputDir);
        assert!(matches!(placement(Some(&pool), &output, true), Placement::Elsewhere(_)));
        assert!(matches!(placement(None, &output, false), Placement::Elsewhere(_)));
        let missing = placement(Some(Path::new("/default-pool")), &output, false);
        assert_eq!(missing, Placement::Elsewhere("has no directory on this host (its target is /default-pool)".into()));
        assert!(matches!(placement(Some(Path::new("relative")), &output, false), Placement::Elsewhere(_)));
    }

    fn staged(dir: &Path, name: &str, contents: &[u8]) -> DiskFile {
        let staged = dir.join(format!("staged-{name}"));
        std::fs::write(&staged, contents).unwrap();
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(DISK_MODE)).unwrap();
        DiskFile { staged, name: name.to_owned() }
    }

    #[test]
    fn disks_are_linked_under_their_final_names() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let disks = [staged(dir.path(), "vm.qcow2", b"boot"), staged(dir.path(), "vm-data.qcow2", b"data")];
        let placed = place_disks("p", &pool, &disks, &[], "vm", "job1").unwrap();
        assert_eq!(placed.paths(), [pool.join("vm.qcow2"), pool.join("vm-data.qcow2")]);
        let meta = std::fs::metadata(pool.join("vm.qcow2")).unwrap();
        assert_eq!(meta.ino(), std::fs::metadata(&disks[0].staged).unwrap().ino(), "a hard link, not a copy");
        assert_eq!(meta.mode() & 0o777, DISK_MODE);
        let names: Vec<_> = std::fs::read_dir(&pool).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
        placed.remove();
        assert_eq!(std::fs::read_dir(&pool).unwrap().count(), 0);
    }

    #[test]
    fn copies_are_complete_readable_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let disk = staged(dir.path(), "vm.qcow2", &[7u8; 300_000]);
        let copy = dir.path().join("copy");
        copy_new(&disk.staged, &copy).unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), vec![7u8; 300_000]);
        assert_eq!(std::fs::metadata(&copy).unwrap().mode() & 0o777, DISK_MODE);
        // Never over an existing file, and the existing file is left alone.
        assert!(copy_new(&disk.staged, &copy).is_err());
        assert_eq!(std::fs::read(&copy).unwrap().len(), 300_000);
        assert!(copy_new(&dir.path().join("missing"), &dir.path().join("copy2")).is_err());
        assert!(!dir.path().join("copy2").exists());
    }

    #[test]
    fn disks_are_copied_to_a_pool_on_another_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        // /dev/shm is a tmpfs on Linux; skip where it is the same filesystem as the temp dir.
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else { return };
        if std::fs::metadata(other.path()).unwrap().dev() == std::fs::metadata(dir.path()).unwrap().dev() {
            return;
        }
        let disks = [staged(dir.path(), "vm.qcow2", &[3u8; 100_000])];
        let placed = place_disks("p", other.path(), &disks, &[], "vm", "job1").unwrap();
        let meta = std::fs::metadata(&placed.paths()[0]).unwrap();
        assert_ne!(meta.ino(), std::fs::metadata(&disks[0].staged).unwrap().ino());
        assert_eq!(meta.mode() & 0o777, DISK_MODE);
        assert_eq!(std::fs::read(&placed.paths()[0]).unwrap(), vec![3u8; 100_000]);
        assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 1, "no temporary file is left");
    }

    #[test]
    fn an_unwritable_pool_directory_says_what_to_do() {
        let denied = std::io::Error::from(ErrorKind::PermissionDenied);
        let err = placement_error("default", Path::new("/var/lib/libvirt/images"), denied);
        assert!(matches!(err, LibvirtError::PoolNotWritable { .. }), "{err}");
        assert!(err.to_string().contains("make OUTPUT_DIR the pool's directory"), "{err}");
        // The sandbox, not the permissions: the directory is outside ReadWritePaths=.
        let err =
            placement_error("default", Path::new("/var/lib/libvirt/images"), ErrorKind::ReadOnlyFilesystem.into());
        assert!(matches!(err, LibvirtError::PoolReadOnly { .. }), "{err}");
        assert!(err.to_string().contains("list it in ReadWritePaths= of the unit"), "{err}");
        let err = placement_error("default", Path::new("/x"), ErrorKind::StorageFull.into());
        assert!(err.to_string().contains("writable and has space"), "{err}");
    }

    #[test]
    fn a_foreign_file_in_the_pool_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        std::fs::write(pool.join("vm-data.qcow2"), b"someone else's").unwrap();
        let disks = [staged(dir.path(), "vm.qcow2", b"boot"), staged(dir.path(), "vm-data.qcow2", b"data")];
        let err = place_disks("p", &pool, &disks, &[], "vm", "job1").unwrap_err();
        assert!(matches!(err, LibvirtError::PoolFileTaken { .. }), "{err}");
        assert!(err.to_string().contains("is not a disk of domain vm"), "{err}");
        assert!(!pool.join("vm.qcow2").exists(), "nothing is placed when one name is taken");
        assert_eq!(std::fs::read(pool.join("vm-data.qcow2")).unwrap(), b"someone else's");

        // The same file, known to be this VM's own disk from an earlier import, is replaced.
        let placed = place_disks("p", &pool, &disks, &[pool.join("vm-data.qcow2")], "vm", "job2").unwrap();
        assert_eq!(std::fs::read(&placed.paths()[1]).unwrap(), b"data");
    }
}
