//! Confinement of source disks to SOURCE_ROOTS.
//!
//! Manifests come from a shared directory and are untrusted: a `local_path`, and every file a
//! disk image references (VMDK extents, parents, backing files), must resolve — after symlinks
//! — inside one of SOURCE_ROOTS. Otherwise a manifest could turn any file the daemon can read
//! into a published qcow2.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a source path is refused.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} resolves to {resolved}, which is outside SOURCE_ROOTS ({roots})")]
    Outside { path: PathBuf, resolved: PathBuf, roots: String },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} cannot be read: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
}

/// The resolved SOURCE_ROOTS. Roots that do not exist are kept lexically, so that a path
/// under them is still judged correctly once they appear.
#[derive(Debug, Clone)]
pub struct SourceRoots {
    roots: Vec<PathBuf>,
}

impl SourceRoots {
    /// Resolves the configured roots.
    pub fn new(roots: &[PathBuf]) -> SourceRoots {
        SourceRoots { roots: roots.iter().map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone())).collect() }
    }

    /// The roots as the `.error` message names them: colon-separated.
    pub fn describe(&self) -> String {
        self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(":")
    }

    /// Resolves `path` (following every symlink) and checks that it is a regular file inside a
    /// root. Returns the resolved path, which is what must be opened from then on.
    pub fn confine(&self, path: &Path) -> Result<PathBuf, SourceError> {
        let resolved = match std::fs::canonicalize(path) {
            Ok(resolved) => resolved,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.missing_or_outside(path));
            }
            Err(source) => return Err(SourceError::Unreadable { path: path.to_owned(), source }),
        };
        if !self.contains(&resolved) {
            return Err(SourceError::Outside { path: path.to_owned(), resolved, roots: self.describe() });
        }
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_file() => Ok(resolved),
            Ok(_) => Err(SourceError::NotAFile { path: path.to_owned() }),
            Err(source) => Err(SourceError::Unreadable { path: path.to_owned(), source }),
        }
    }

    /// A missing file is reported as missing only when it would have been inside a root;
    /// otherwise the manifest is pointing somewhere it must not, whether or not it exists.
    fn missing_or_outside(&self, path: &Path) -> SourceError {
        let resolved_parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
        let lexical = resolved_parent.map(|p| p.join(path.file_name().unwrap_or_default())).unwrap_or(path.to_owned());
        if self.contains(&lexical) {
            SourceError::Missing { path: path.to_owned() }
        } else {
            SourceError::Outside { path: path.to_owned(), resolved: lexical, roots: self.describe() }
        }
    }

    fn contains(&self, resolved: &Path) -> bool {
        self.roots.iter().any(|root| resolved.starts_with(root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, SourceRoots) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("exports/vm")).unwrap();
        std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
        std::fs::write(dir.path().join("exports/vm/disk.vmdk"), b"x").unwrap();
        std::fs::write(dir.path().join("elsewhere/secret"), b"x").unwrap();
        let roots = SourceRoots::new(&[dir.path().join("exports")]);
        (dir, roots)
    }

    #[test]
    fn accepts_a_file_inside_a_root() {
        let (dir, roots) = setup();
        let resolved = roots.confine(&dir.path().join("exports/vm/disk.vmdk")).unwrap();
        assert!(resolved.ends_with("exports/vm/disk.vmdk"));
    }

    #[test]
    fn refuses_dot_dot_and_symlinks_leading_out() {
        let (dir, roots) = setup();
        let dotdot = dir.path().join("exports/../elsewhere/secret");
        assert!(matches!(roots.confine(&dotdot), Err(SourceError::Outside { .. })));
        let link = dir.path().join("exports/vm/link.vmdk");
        std::os::unix::fs::symlink(dir.path().join("elsewhere/secret"), &link).unwrap();
        assert!(matches!(roots.confine(&link), Err(SourceError::Outside { .. })));
    }

    #[test]
    fn tells_missing_inside_from_missing_outside() {
        let (dir, roots) = setup();
        assert!(matches!(roots.confine(&dir.path().join("exports/vm/nope.vmdk")), Err(SourceError::Missing { .. })));
        assert!(matches!(roots.confine(&dir.path().join("elsewhere/nope")), Err(SourceError::Outside { .. })));
    }

    #[test]
    fn refuses_directories() {
        let (dir, roots) = setup();
        assert!(matches!(roots.confine(&dir.path().join("exports/vm")), Err(SourceError::NotAFile { .. })));
    }

    #[test]
    fn a_root_is_not_a_prefix_match() {
        let (dir, roots) = setup();
        std::fs::create_dir_all(dir.path().join("exports-evil")).unwrap();
        std::fs::write(dir.path().join("exports-evil/x"), b"x").unwrap();
        assert!(matches!(roots.confine(&dir.path().join("exports-evil/x")), Err(SourceError::Outside { .. })));
    }
}
