//! `hyper2kvm submit`: an atomic drop into WATCH_DIR for producers and tests. The manifest is
//! written under a hidden temporary name, fsynced, and linked to its final name, which fails
//! rather than overwrite a manifest still waiting there.
//!
//! It only drops the file: it never claims (the daemon does) and never replaces a manifest.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::Config;
use crate::host;
use crate::manifest::{self, ManifestError};
use crate::publish;
use crate::queue::layout::is_manifest_name;

/// Why a manifest was not submitted.
#[derive(Debug, Error)]
pub enum SubmitError {
    /// The manifest file could not be opened or read, or is over the size limit.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The manifest path as given on the command line.
        path: PathBuf,
        /// Why reading failed.
        source: manifest::ReadError,
    },
    /// The manifest does not validate, and `--force` was not given.
    #[error("{path} is not a valid manifest: {source} (use --force to submit it anyway)")]
    Invalid {
        /// The manifest path as given on the command line.
        path: PathBuf,
        /// What validation found wrong.
        source: ManifestError,
    },
    /// The configured WATCH_DIR is missing (or not a directory).
    #[error("WATCH_DIR {0} does not exist; start the daemon once (it creates it) or create it")]
    NoWatchDir(PathBuf),
    /// The target name (`--name`, else the file's own name) is one the daemon would ignore.
    #[error("{0:?} cannot be a manifest name: it must end in .json and must not start with '.'")]
    BadName(String),
    /// A manifest of the same name is still waiting in WATCH_DIR; it was not replaced.
    #[error("a manifest named {name} is already waiting in {dir}; wait until the daemon takes it, or pass --name")]
    Busy {
        /// The target file name.
        name: String,
        /// The WATCH_DIR it is waiting in.
        dir: PathBuf,
    },
    /// Creating, writing, syncing or linking the file in WATCH_DIR failed.
    #[error("cannot write into {dir}: {source}")]
    Write {
        /// The WATCH_DIR written into.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// `hyper2kvm submit`: [`submit`] into the configured WATCH_DIR, then the submitted path.
pub fn command(manifest_path: &Path, config: &Config, name: Option<&str>, force: bool) -> Result<(), SubmitError> {
    let target = submit(manifest_path, &config.watch_dir, name, force)?;
    println!("{}", target.display());
    Ok(())
}

/// Drops `manifest` into `watch_dir` as `name` (default: the manifest's own file name).
/// Unless `force`, the manifest must validate first.
pub fn submit(manifest_path: &Path, watch_dir: &Path, name: Option<&str>, force: bool) -> Result<PathBuf, SubmitError> {
    let read_error = |source| SubmitError::Read { path: manifest_path.to_owned(), source };
    // Resolved first: the operator may name the manifest through a symlink, which the bounded
    // reader of manifests does not follow.
    let resolved =
        std::fs::canonicalize(manifest_path).map_err(|e| read_error(manifest::ReadError::Unreadable(e.to_string())))?;
    let bytes = manifest::read_file(&resolved).map_err(read_error)?;
    let default_name = manifest_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = name.map(str::to_owned).unwrap_or(default_name);
    if !is_manifest_name(&name) || name.contains('/') {
        return Err(SubmitError::BadName(name));
    }
    if !force {
        manifest::parse(&bytes, &name)
            .map_err(|source| SubmitError::Invalid { path: manifest_path.to_owned(), source })?;
    }
    if !watch_dir.is_dir() {
        return Err(SubmitError::NoWatchDir(watch_dir.to_owned()));
    }
    let write_error = |source| SubmitError::Write { dir: watch_dir.to_owned(), source };
    let temp = watch_dir.join(format!(".{name}.{}.tmp", host::random_hex()));
    let mut file = publish::open_new(&temp).map_err(write_error)?;
    let written = file.write_all(&bytes).and_then(|()| file.sync_all());
    let target = watch_dir.join(&name);
    let linked = written.and_then(|()| std::fs::hard_link(&temp, &target));
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(target),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(SubmitError::Busy { name, dir: watch_dir.to_owned() }),
        Err(e) => Err(write_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        r#"{"manifest_version":"1.0","disks":[{"id":"d0","source_format":"raw","local_path":"/x/d0.img"}]}"#;

    #[test]
    fn drops_atomically_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("vm.json");
        std::fs::write(&manifest, GOOD).unwrap();
        let queue = dir.path().join("queue");
        std::fs::create_dir(&queue).unwrap();
        let target = submit(&manifest, &queue, Some("artifact-manifest.json"), false).unwrap();
        assert_eq!(std::fs::read_to_string(target).unwrap(), GOOD);
        assert!(matches!(
            submit(&manifest, &queue, Some("artifact-manifest.json"), false),
            Err(SubmitError::Busy { .. })
        ));
        assert_eq!(std::fs::read_dir(&queue).unwrap().count(), 1, "no temp file is left behind");
    }

    #[test]
    fn refuses_invalid_manifests_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("bad.json");
        std::fs::write(&manifest, r#"{"manifest_version":"2.0"}"#).unwrap();
        assert!(matches!(submit(&manifest, dir.path(), Some("q.json"), false), Err(SubmitError::Invalid { .. })));
        assert!(submit(&manifest, dir.path(), Some("q.json"), true).is_ok());
    }

    #[test]
    fn reads_through_a_symlink_but_never_more_than_the_manifest_limit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm.json"), GOOD).unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(dir.path().join("vm.json"), &link).unwrap();
        let queue = dir.path().join("queue");
        std::fs::create_dir(&queue).unwrap();
        assert!(submit(&link, &queue, Some("a.json"), false).is_ok());

        let big = dir.path().join("big.json");
        std::fs::File::create(&big).unwrap().set_len(4 << 30).unwrap();
        let err = submit(&big, &queue, Some("b.json"), true).unwrap_err();
        assert!(
            matches!(err, SubmitError::Read { source: manifest::ReadError::TooLarge(n), .. } if n == 4 << 30),
            "{err}"
        );
        assert!(err.to_string().contains("over the limit of 1048576"), "{err}");
    }

    #[test]
    fn refuses_names_the_daemon_would_ignore() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("vm.json");
        std::fs::write(&manifest, GOOD).unwrap();
        assert!(matches!(submit(&manifest, dir.path(), Some(".hidden.json"), false), Err(SubmitError::BadName(_))));
        assert!(matches!(submit(&manifest, dir.path(), Some("x.tmp"), false), Err(SubmitError::BadName(_))));
    }
}
