//! The file operations the queue protocol is built from, behind a trait so that unit tests can
//! inject the faults NFS produces: renames that report failure after succeeding (and the
//! reverse), ESTALE and EIO on stat, and file servers whose clock differs from ours.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Operations on the shared queue directory.
pub trait QueueFs: Send + Sync + std::fmt::Debug {
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Creates `path` with `contents`, failing if anything (even a symlink) is there.
    fn create_exclusive(&self, path: &Path, contents: &[u8]) -> std::io::Result<()>;
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    fn remove_file(&self, path: &Path) -> std::io::Result<()>;
    /// Whether `path` exists: `Ok(false)` only for ENOENT; other errors (ESTALE …) propagate.
    fn exists(&self, path: &Path) -> std::io::Result<bool>;
    /// The file's mtime, as stamped by the file server.
    fn modified(&self, path: &Path) -> std::io::Result<SystemTime>;
    /// Sets the file's mtime to the file server's now (a heartbeat).
    fn touch(&self, path: &Path) -> std::io::Result<()>;
    /// The file server's now: the mtime of a file just created in `dir`. Staleness is always
    /// judged against this, never against the local clock, which may be skewed.
    fn server_now(&self, dir: &Path) -> std::io::Result<SystemTime>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl QueueFs for RealFs {
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn create_exclusive(&self, path: &Path, contents: &[u8]) -> std::io::Result<()> {
        let mut file =
            OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o644).open(path)?;
        file.write_all(contents)?;
        file.sync_all()
    }

    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }

    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn modified(&self, path: &Path) -> std::io::Result<SystemTime> {
        std::fs::symlink_metadata(path)?.modified()
    }

    fn touch(&self, path: &Path) -> std::io::Result<()> {
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        utimensat(None, path, &TimeSpec::UTIME_NOW, &TimeSpec::UTIME_NOW, UtimensatFlags::NoFollowSymlink)
            .map_err(std::io::Error::from)
    }

    fn server_now(&self, dir: &Path) -> std::io::Result<SystemTime> {
        let probe = dir.join(format!(".clock-{}", crate::host::random_hex()));
        let stamped = std::fs::File::create(&probe).and_then(|f| f.metadata()).and_then(|m| m.modified());
        let _ = std::fs::remove_file(&probe);
        stamped
    }
}

/// Errors that NFS produces transiently and that must be retried, not read as facts.
pub fn is_transient(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ESTALE) | Some(libc::EIO) | Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ETIMEDOUT)
    )
}

/// Runs `op`, retrying transient errors with backoff (50, 200, 800 ms) before giving up.
pub fn retry<T>(what: &str, mut op: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut delay = Duration::from_millis(50);
    for _ in 0..3 {
        match op() {
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "{what}: transient error, retrying in {delay:?}");
                std::thread::sleep(delay);
                delay *= 4;
            }
            other => return other,
        }
    }
    op()
}

/// Age of `then` judged by the server's `now`; a `then` in the future counts as age zero.
pub fn age(then: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or(Duration::ZERO)
}
