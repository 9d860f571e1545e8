//! Publishing results into OUTPUT_DIR: staged under TEMP_DIR (same filesystem), fsynced, then
//! renamed into place, so a partial file never carries a final name.
//!
//! Each job stages in a directory of its own, created fresh (so no symlink can have been
//! planted in it), and every file we create there is opened with `O_CREAT|O_EXCL|O_NOFOLLOW`.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Directory under OUTPUT_DIR where results replaced by a newer job are kept.
pub const SUPERSEDED_DIR: &str = ".hyper2kvm-superseded";

/// Directory under OUTPUT_DIR where the converted disks of a job whose libvirt registration
/// failed are kept (`<dir>/<job>/V.qcow2` …), out of the poller's sight.
pub const UNREGISTERED_DIR: &str = ".hyper2kvm-unregistered";

/// A job's private staging directory in TEMP_DIR.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// Creates `temp_root/<job_id>`, which must not exist yet.
    pub fn create(temp_root: &Path, job_id: &str) -> std::io::Result<Staging> {
        std::fs::create_dir_all(temp_root)?;
        let dir = temp_root.join(job_id);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Staging { dir })
    }

    /// The staged path of `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a new staged file with `contents`, fsynced.
    pub fn write_new(&self, name: &str, contents: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.path(name);
        let mut file = open_new(&path)?;
        file.write_all(contents)?;
        file.sync_all()?;
        Ok(path)
    }

    /// Moves a staged file to its final name in `output_dir`. The rename replaces a symlink
    /// at the destination rather than following it.
    pub fn publish(&self, name: &str, output_dir: &Path, final_name: &str) -> std::io::Result<PathBuf> {
        let target = output_dir.join(final_name);
        std::fs::rename(self.path(name), &target)?;
        Ok(target)
    }

    /// Removes everything staged so far, keeping the directory: a failed job clears its
    /// partial outputs before it publishes its `.error`, so that a poller which sees the
    /// `.error` never finds the job's temporary files still there.
    pub fn clear(&self) -> std::io::Result<()> {
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
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the staging directory");
            }
        }
    }
}

/// Opens a new file for writing without following symlinks or reusing an existing file.
pub fn open_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o644).open(path)
}

/// Flushes a file written by another process (qemu-img) to stable storage.
pub fn fsync_file(path: &Path) -> std::io::Result<()> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?.sync_all()
}

/// Flushes a directory, making renames into it durable.
pub fn fsync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// Reads a published result of at most 4 MiB (a report) without following a symlink.
pub fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mut contents = Vec::new();
    file.take(4 << 20).read_to_end(&mut contents)?;
    Ok(contents)
}

/// Moves the earlier result `name` out of `output_dir` into
/// `output_dir/.hyper2kvm-superseded/<job_id>/`, so it cannot answer a new job's poller. It is
/// kept, never destroyed. Returns where it went; `None` when there was no such file.
pub fn move_aside(output_dir: &Path, name: &str, job_id: &str) -> std::io::Result<Option<PathBuf>> {
    let aside_dir = output_dir.join(SUPERSEDED_DIR).join(job_id);
    std::fs::create_dir_all(&aside_dir)?;
    let target = aside_dir.join(name);
    match std::fs::rename(output_dir.join(name), &target) {
        Ok(()) => Ok(Some(target)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Moves each `(file, name)` into `dir` (created if missing) as `dir/name`. TEMP_DIR is on
/// the output filesystem, so these are renames.
pub fn keep<'a>(dir: &Path, files: impl IntoIterator<Item = (&'a Path, &'a str)>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (file, name) in files {
        std::fs::rename(file, dir.join(name))?;
    }
    fsync_dir(dir)
}

/// Checks that TEMP_DIR and OUTPUT_DIR are on one filesystem, so publishing is a rename.
pub fn check_same_filesystem(temp_dir: &Path, output_dir: &Path) -> std::io::Result<bool> {
    Ok(std::fs::metadata(temp_dir)?.dev() == std::fs::metadata(output_dir)?.dev())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn move_aside_keeps_old_results() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm.qcow2"), b"old").unwrap();
        std::fs::write(dir.path().join("vm.error"), b"old error").unwrap();
        let moved: Vec<PathBuf> = ["vm.qcow2", "vm.error", "vm.json"]
            .iter()
            .filter_map(|n| move_aside(dir.path(), n, "j1").unwrap())
            .collect();
        assert_eq!(moved.len(), 2);
        assert!(!dir.path().join("vm.qcow2").exists());
        assert_eq!(std::fs::read(dir.path().join(SUPERSEDED_DIR).join("j1/vm.qcow2")).unwrap(), b"old");
    }
}
