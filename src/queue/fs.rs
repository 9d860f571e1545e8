//! The file operations the queue protocol is built from, behind a trait so that unit tests can
//! inject the faults NFS produces: renames that report failure after succeeding (and the
//! reverse), ESTALE and EIO on stat, and file servers whose clock differs from ours.
//!
//! It knows nothing of the protocol: operations, retries of transient errors and the server's
//! clock only; every decision is `claim.rs`'s.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// What a file looked like when judged. Any difference means another file under the same name,
/// or new contents: HyperSDK rewrites one fixed name, so a name alone identifies nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
}

impl Fingerprint {
    /// The fingerprint of `meta` (from `symlink_metadata`, so a symlink is never followed).
    pub(crate) fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            inode: meta.ino(),
        }
    }
}

/// Operations on the shared queue directory.
pub(crate) trait QueueFs: Send + Sync + std::fmt::Debug {
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Creates `path` with `contents`, failing if anything (even a symlink) is there.
    fn create_exclusive(&self, path: &Path, contents: &[u8]) -> std::io::Result<()>;
    /// Reads at most `limit + 1` bytes of a regular file, never following a symlink or
    /// blocking on a FIFO: what is read is another daemon's record, or something planted.
    fn read(&self, path: &Path, limit: u64) -> std::io::Result<Vec<u8>>;
    fn remove_file(&self, path: &Path) -> std::io::Result<()>;
    /// Whether `path` exists: `Ok(false)` only for ENOENT; other errors (ESTALE …) propagate.
    fn exists(&self, path: &Path) -> std::io::Result<bool>;
    /// The file's identity and contents' stamp, without following a symlink.
    fn fingerprint(&self, path: &Path) -> std::io::Result<Fingerprint>;
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
pub(crate) struct RealFs;

impl QueueFs for RealFs {
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn create_exclusive(&self, path: &Path, contents: &[u8]) -> std::io::Result<()> {
        match OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o644).open(path) {
            Ok(mut file) => {
                file.write_all(contents)?;
                file.sync_all()
            }
            // Where exclusive create is not supported, fall back to the link method.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::ENOSYS)) => {
                create_by_link(path, contents)
            }
            Err(e) => Err(e),
        }
    }

    fn read(&self, path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::new(ErrorKind::InvalidData, "not a regular file"));
        }
        let mut contents = Vec::new();
        file.take(limit.saturating_add(1)).read_to_end(&mut contents)?;
        Ok(contents)
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

    fn fingerprint(&self, path: &Path) -> std::io::Result<Fingerprint> {
        Ok(Fingerprint::of(&std::fs::symlink_metadata(path)?))
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

/// Creates `path` without overwriting where `O_EXCL` is not trusted: write a uniquely named
/// file beside it, `link(2)` it to `path`, and judge by the unique file's link count (2 means
/// the link exists, whatever link's reply said — replies to retransmitted requests can lie).
pub(crate) fn create_by_link(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = path.with_file_name(format!(".{name}.{}.link", crate::host::random_hex()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&unique)?;
        file.write_all(contents)?;
        file.sync_all()?;
        let linked = std::fs::hard_link(&unique, path);
        if std::fs::symlink_metadata(&unique)?.nlink() == 2 {
            return Ok(());
        }
        match linked {
            Ok(()) => Err(std::io::Error::other("link reported success but the link count did not change")),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&unique);
    result
}

/// Errors that NFS produces transiently and that must be retried, not read as facts.
pub(crate) fn is_transient(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ESTALE) | Some(libc::EIO) | Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ETIMEDOUT)
    )
}

/// Runs `op`, retrying transient errors with backoff (50, 200, 800 ms) before giving up.
pub(crate) fn retry<T>(what: &str, mut op: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
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
pub(crate) fn age(then: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_method_creates_once_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("job.lock");
        create_by_link(&lock, b"first").unwrap();
        let second = create_by_link(&lock, b"second").unwrap_err();
        assert_eq!(second.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&lock).unwrap(), b"first");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the unique file is removed");
    }

    #[test]
    fn retry_gives_transient_errors_three_more_chances_only() {
        let mut calls = 0;
        let result: std::io::Result<()> = retry("test", || {
            calls += 1;
            Err(std::io::Error::from_raw_os_error(libc::ESTALE))
        });
        assert!(result.is_err());
        assert_eq!(calls, 4);
        let mut calls = 0;
        let _ = retry("test", || {
            calls += 1;
            Err::<(), _>(std::io::Error::from_raw_os_error(libc::EACCES))
        });
        assert_eq!(calls, 1, "permanent errors are not retried");
    }
}
