//! Publishing results into OUTPUT_DIR: staged under TEMP_DIR (same filesystem), fsynced, then
//! renamed into place, so a partial file never carries a final name.
//!
//! Each job stages in a directory of its own, created fresh (so no symlink can have been
//! planted in it), and every file we create there is opened with `O_CREAT|O_EXCL|O_NOFOLLOW`.
//!
//! It decides neither what a job publishes nor whether the job still owns its claim (the job
//! fences before each step); result names are [`crate::output_layout`]'s.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::output_layout::OutputLayout;

/// A job's private staging directory in TEMP_DIR.
#[derive(Debug)]
pub(crate) struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// Creates `temp_root/<job_id>`, which must not exist yet. `temp_root` (TEMP_DIR) is a
    /// directory of the daemon's own: a symlink planted in its place is replaced
    /// ([`own_dir`]), never followed.
    pub(crate) fn create(temp_root: &Path, job_id: &str) -> std::io::Result<Staging> {
        own_dir(temp_root)?;
        Staging::create_in(temp_root, job_id)
    }

    /// Creates `parent/<name>`, which must not exist yet, in a directory the caller trusts
    /// as it is (OUTPUT_DIR itself, which may be a symlink the administrator made).
    pub(crate) fn create_in(parent: &Path, name: &str) -> std::io::Result<Staging> {
        let dir = parent.join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Staging { dir })
    }

    /// The staged path of `name`.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a new staged file with `contents`, fsynced.
    pub(crate) fn write_new(&self, name: &str, contents: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.path(name);
        let mut file = open_new(&path)?;
        file.write_all(contents)?;
        file.sync_all()?;
        Ok(path)
    }

    /// Moves a staged file to its final name in `output_dir`. The rename replaces a symlink
    /// at the destination rather than following it.
    pub(crate) fn publish(&self, name: &str, output_dir: &Path, final_name: &str) -> std::io::Result<PathBuf> {
        let target = output_dir.join(final_name);
        std::fs::rename(self.path(name), &target)?;
        Ok(target)
    }

    /// Removes everything staged so far, keeping the directory: a failed job clears its
    /// partial outputs before it publishes its `.error`, so that a poller which sees the
    /// `.error` never finds the job's temporary files still there.
    pub(crate) fn clear(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// Removes the staging directory and whatever is left in it.
    pub(crate) fn remove(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the staging directory");
            }
        }
    }
}

/// Opens a new file for writing without following symlinks or reusing an existing file.
pub(crate) fn open_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o644).open(path)
}

/// Flushes a file written by another process (qemu-img) to stable storage.
pub(crate) fn fsync_file(path: &Path) -> std::io::Result<()> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?.sync_all()
}

/// Flushes a directory, making renames into it durable.
pub(crate) fn fsync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// Reads a published result of at most 4 MiB (a report) without following a symlink.
pub(crate) fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mut contents = Vec::new();
    file.take(4 << 20).read_to_end(&mut contents)?;
    Ok(contents)
}

/// Moves the earlier result `name` out of OUTPUT_DIR into
/// `OUTPUT_DIR/.hyper2kvm-superseded/<job_id>/`, so it cannot answer a new job's poller. It is
/// kept, never destroyed. Returns where it went; `None` when there was no such file.
pub(crate) fn move_aside(output: &OutputLayout, name: &str, job_id: &str) -> std::io::Result<Option<PathBuf>> {
    let aside_dir = output.superseded(job_id);
    own_dir(&output.superseded_root())?;
    own_dir(&aside_dir)?;
    let target = aside_dir.join(name);
    match std::fs::rename(output.result(name), &target) {
        Ok(()) => Ok(Some(target)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Moves each `(file, name)` into `dir` (created if missing) as `dir/name`. TEMP_DIR is on
/// the output filesystem, so these are renames. `dir` and its parent are the daemon's own
/// (`OUTPUT_DIR/.hyper2kvm-unregistered/<job>`): symlinks there are replaced, not followed.
pub(crate) fn keep<'a>(dir: &Path, files: impl IntoIterator<Item = (&'a Path, &'a str)>) -> std::io::Result<()> {
    if let Some(parent) = dir.parent() {
        own_dir(parent)?;
    }
    own_dir(dir)?;
    for (file, name) in files {
        std::fs::rename(file, dir.join(name))?;
    }
    fsync_dir(dir)
}

/// Checks that TEMP_DIR and OUTPUT_DIR are on one filesystem, so publishing is a rename.
pub(crate) fn check_same_filesystem(temp_dir: &Path, output_dir: &Path) -> std::io::Result<bool> {
    Ok(std::fs::metadata(temp_dir)?.dev() == std::fs::metadata(output_dir)?.dev())
}

/// Makes `path`, a directory of the daemon's own (TEMP_DIR, `.hyper2kvm-superseded`,
/// `.hyper2kvm-unregistered` and the per-job directories in them), a real directory.
///
/// Anyone who can write OUTPUT_DIR can put a symlink there, and everything staged or moved
/// aside would then land wherever it points. A symlink is removed (unlink does not follow it)
/// and the directory created afresh; anything else that is not a directory is refused. The
/// parent must exist: a vanished OUTPUT_DIR (an unmounted share) is not recreated underneath.
pub(crate) fn own_dir(path: &Path) -> std::io::Result<()> {
    // A few rounds: someone may be swapping the name while we look.
    for _ in 0..3 {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_dir() => return Ok(()),
            Ok(meta) if meta.file_type().is_symlink() => {
                tracing::warn!(
                    path = %path.display(),
                    "a symbolic link stands where hyper2kvm keeps a directory of its own; replacing it with a directory"
                );
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} is not a directory; remove it so that hyper2kvm can create it", path.display()),
                ))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match std::fs::DirBuilder::new().mode(0o755).create(path) {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            created => return created,
        }
    }
    Err(std::io::Error::other(format!("{} keeps being replaced while hyper2kvm creates it", path.display())))
}

/// Why OUTPUT_DIR or TEMP_DIR cannot take a result now. While one of these holds the daemon
/// claims nothing: a job it claimed could not even publish its `.error`.
#[derive(Debug, Error)]
pub(crate) enum Unavailable {
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: String },
    #[error("{what} {path} is read-only")]
    ReadOnly { what: &'static str, path: String },
    #[error("OUTPUT_DIR {path} has {free_mib} MiB free, less than MIN_FREE_SPACE_MB ({min_mib})")]
    LowSpace { path: String, free_mib: u64, min_mib: u64 },
    #[error("TEMP_DIR {temp} is not on the filesystem of OUTPUT_DIR {output}")]
    OtherFilesystem { temp: String, output: String },
    #[error("{what} {path} cannot take a new file: {source}")]
    Unwritable { what: &'static str, path: String, source: std::io::Error },
}

impl Unavailable {
    fn from_io(what: &'static str, path: &Path, source: std::io::Error) -> Unavailable {
        let path = path.display().to_string();
        match source.raw_os_error() {
            Some(libc::ENOENT) => Unavailable::Missing { what, path },
            Some(libc::EROFS) => Unavailable::ReadOnly { what, path },
            _ => Unavailable::Unwritable { what, path, source },
        }
    }
}

/// Whether a result could be published now: OUTPUT_DIR is there, writable, has at least
/// `min_free` bytes free, and TEMP_DIR (recreated if it vanished, with OUTPUT_DIR back) is on
/// its filesystem; a small file written and fsynced in TEMP_DIR is renamed into OUTPUT_DIR and
/// removed, exactly the steps of a publication. `tag` keeps daemons sharing OUTPUT_DIR apart.
pub(crate) fn check_room(output_dir: &Path, temp_dir: &Path, min_free: u64, tag: &str) -> Result<(), Unavailable> {
    let output = |e| Unavailable::from_io("OUTPUT_DIR", output_dir, e);
    let meta = std::fs::metadata(output_dir).map_err(output)?;
    if !meta.is_dir() {
        return Err(output(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    let stat = nix::sys::statvfs::statvfs(output_dir).map_err(|e| output(e.into()))?;
    if stat.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Err(output(std::io::Error::from_raw_os_error(libc::EROFS)));
    }
    // fsblkcnt_t and c_ulong are narrower than u64 on some targets.
    #[allow(clippy::useless_conversion)]
    let free = u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size()));
    if free < min_free {
        let path = output_dir.display().to_string();
        return Err(Unavailable::LowSpace { path, free_mib: free >> 20, min_mib: min_free >> 20 });
    }
    own_dir(temp_dir).map_err(|e| Unavailable::from_io("TEMP_DIR", temp_dir, e))?;
    if !check_same_filesystem(temp_dir, output_dir).unwrap_or(false) {
        let (temp, output) = (temp_dir.display().to_string(), output_dir.display().to_string());
        return Err(Unavailable::OtherFilesystem { temp, output });
    }
    let name = format!(".hyper2kvm-probe-{tag}");
    let (staged, published) = (temp_dir.join(&name), output_dir.join(&name));
    let _ = std::fs::remove_file(&staged);
    let written = open_new(&staged).and_then(|mut file| {
        file.write_all(&[0u8; 4096])?;
        file.sync_all()
    });
    let result = written
        .map_err(|e| Unavailable::from_io("TEMP_DIR", temp_dir, e))
        .and_then(|()| std::fs::rename(&staged, &published).map_err(output));
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_file(&published);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output_layout::{SUPERSEDED_DIR, UNREGISTERED_DIR};

    fn layout(out: &Path) -> OutputLayout {
        OutputLayout::new(out, &out.join(".hyper2kvm-tmp"))
    }

    #[test]
    fn clearing_the_staging_directory_keeps_it_and_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::create(dir.path(), "job").unwrap();
        staging.write_new("disk-0.qcow2", b"partial").unwrap();
        std::fs::create_dir(staging.path("sub")).unwrap();
        std::fs::write(staging.path("sub/x"), b"x").unwrap();
        staging.clear().unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("job")).unwrap().count(), 0);
        staging.write_new("error", b"failed").unwrap();
        assert!(staging.path("error").exists());
    }

    #[test]
    fn staging_refuses_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Staging::create(dir.path(), "job").unwrap();
        assert!(Staging::create(dir.path(), "job").is_err());
    }

    #[test]
    fn write_new_refuses_planted_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::create(&dir.path().join("tmp"), "job").unwrap();
        std::os::unix::fs::symlink(dir.path().join("victim"), staging.path("x")).unwrap();
        assert!(staging.write_new("x", b"data").is_err());
        assert!(!dir.path().join("victim").exists());
    }

    #[test]
    fn publish_replaces_a_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(dir.path().join("victim"), b"keep").unwrap();
        std::os::unix::fs::symlink(dir.path().join("victim"), out.join("vm.qcow2")).unwrap();
        let staging = Staging::create(&out.join(".tmp"), "job").unwrap();
        staging.write_new("disk", b"image").unwrap();
        staging.publish("disk", &out, "vm.qcow2").unwrap();
        assert_eq!(std::fs::read(dir.path().join("victim")).unwrap(), b"keep");
        assert_eq!(std::fs::read(out.join("vm.qcow2")).unwrap(), b"image");
    }

    /// An OUTPUT_DIR whose own directory `name` is a symlink to `outside` (which exists).
    fn planted(name: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (out, outside) = (dir.path().join("out"), dir.path().join("outside"));
        std::fs::create_dir(&out).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, out.join(name)).unwrap();
        (dir, out, outside)
    }

    fn assert_replaced(out: &Path, name: &str, outside: &Path) {
        assert_eq!(std::fs::read_dir(outside).unwrap().count(), 0, "nothing may be written through the symlink");
        assert!(std::fs::symlink_metadata(out.join(name)).unwrap().is_dir(), "{name} is a real directory again");
    }

    #[test]
    fn a_symlinked_temp_dir_is_replaced_not_followed() {
        let (_dir, out, outside) = planted(".hyper2kvm-tmp");
        let staging = Staging::create(&out.join(".hyper2kvm-tmp"), "job.g1").unwrap();
        staging.write_new("disk-0.qcow2", b"image").unwrap();
        assert_replaced(&out, ".hyper2kvm-tmp", &outside);
    }

    #[test]
    fn a_symlinked_superseded_dir_is_replaced_not_followed() {
        let (_dir, out, outside) = planted(SUPERSEDED_DIR);
        std::fs::write(out.join("vm.qcow2"), b"old").unwrap();
        assert!(move_aside(&layout(&out), "vm.qcow2", "j1").unwrap().is_some());
        assert_replaced(&out, SUPERSEDED_DIR, &outside);
        assert_eq!(std::fs::read(out.join(SUPERSEDED_DIR).join("j1/vm.qcow2")).unwrap(), b"old");
    }

    #[test]
    fn a_symlinked_job_dir_under_superseded_is_replaced_not_followed() {
        let (_dir, out, outside) = planted(SUPERSEDED_DIR);
        std::fs::remove_file(out.join(SUPERSEDED_DIR)).unwrap();
        std::fs::create_dir(out.join(SUPERSEDED_DIR)).unwrap();
        std::os::unix::fs::symlink(&outside, out.join(SUPERSEDED_DIR).join("j1")).unwrap();
        std::fs::write(out.join("vm.error"), b"old").unwrap();
        move_aside(&layout(&out), "vm.error", "j1").unwrap();
        assert_replaced(&out.join(SUPERSEDED_DIR), "j1", &outside);
    }

    #[test]
    fn a_symlinked_unregistered_dir_is_replaced_not_followed() {
        let (_dir, out, outside) = planted(UNREGISTERED_DIR);
        let staging = Staging::create(&out.join(".hyper2kvm-tmp"), "job.g1").unwrap();
        let disk = staging.write_new("disk-0.qcow2", b"image").unwrap();
        keep(&out.join(UNREGISTERED_DIR).join("job"), [(disk.as_path(), "vm.qcow2")]).unwrap();
        assert_replaced(&out, UNREGISTERED_DIR, &outside);
        assert_eq!(std::fs::read(out.join(UNREGISTERED_DIR).join("job/vm.qcow2")).unwrap(), b"image");
    }

    #[test]
    fn an_own_dir_that_is_a_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SUPERSEDED_DIR), b"").unwrap();
        let error = own_dir(&dir.path().join(SUPERSEDED_DIR)).unwrap_err();
        assert!(error.to_string().contains("is not a directory"), "{error}");
    }

    #[test]
    fn room_is_refused_below_the_free_space_floor_and_when_output_dir_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (out, temp) = (dir.path().join("out"), dir.path().join("out/.hyper2kvm-tmp"));
        std::fs::create_dir(&out).unwrap();
        check_room(&out, &temp, 0, "t").unwrap();
        assert!(temp.is_dir(), "TEMP_DIR is created with OUTPUT_DIR there");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1, "the test file is removed");
        let low = check_room(&out, &temp, u64::MAX, "t").unwrap_err();
        assert!(matches!(low, Unavailable::LowSpace { .. }), "{low}");
        assert!(low.to_string().contains("MIN_FREE_SPACE_MB"), "{low}");
        std::fs::remove_dir_all(&out).unwrap();
        let gone = check_room(&out, &temp, 0, "t").unwrap_err();
        assert_eq!(gone.to_string(), format!("OUTPUT_DIR {} does not exist", out.display()));
        assert!(!out.exists(), "a vanished OUTPUT_DIR is not recreated");
    }

    #[test]
    fn move_aside_keeps_old_results() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm.qcow2"), b"old").unwrap();
        std::fs::write(dir.path().join("vm.error"), b"old error").unwrap();
        let moved: Vec<PathBuf> = ["vm.qcow2", "vm.error", "vm.json"]
            .iter()
            .filter_map(|n| move_aside(&layout(dir.path()), n, "j1").unwrap())
            .collect();
        assert_eq!(moved.len(), 2);
        assert!(!dir.path().join("vm.qcow2").exists());
        assert_eq!(std::fs::read(dir.path().join(SUPERSEDED_DIR).join("j1/vm.qcow2")).unwrap(), b"old");
    }
}
