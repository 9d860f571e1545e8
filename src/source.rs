//! Confinement of source disks to SOURCE_ROOTS.
//!
//! Manifests come from a shared directory and are untrusted: a `local_path`, and every file a
//! disk image references (VMDK extents, parents, backing files, qcow2 data files), must
//! resolve — after symlinks — inside one of SOURCE_ROOTS, and outside every place the daemon
//! writes its own results. Otherwise a manifest could turn any file the daemon can read into a
//! published qcow2.
//!
//! A name is judged before anything opens it, and the file is opened only through
//! [`SourceRoots::open`], which judges it again through the descriptor it got: a symlink or
//! directory swapped between the check and the open is caught too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Hidden directories the daemon keeps its queue state and results in, wherever they are: a
/// source under one of them is another job's input or output, never an export.
pub(crate) const RESULT_DIR_NAMES: [&str; 4] = [
    ".hyper2kvm",
    crate::output_layout::DEFAULT_TEMP_DIR,
    crate::output_layout::SUPERSEDED_DIR,
    crate::output_layout::UNREGISTERED_DIR,
];

/// Where the packages put every instance's state: `/var/lib/hyper2kvm/output` and
/// `/var/lib/hyper2kvm/INSTANCE/output` hold published results.
const PACKAGED_STATE_DIR: &str = "/var/lib/hyper2kvm";

/// Why a source path is refused.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} resolves to {resolved}, which is outside SOURCE_ROOTS ({roots})")]
    Outside { path: PathBuf, resolved: PathBuf, roots: String },
    #[error("{path} resolves to {resolved}, which is inside {area}, where hyper2kvm keeps its own results and state")]
    Results { path: PathBuf, resolved: PathBuf, area: String },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} cannot be read: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
}

impl SourceError {
    /// The path as it was given.
    pub fn path(&self) -> &Path {
        match self {
            SourceError::Missing { path }
            | SourceError::Outside { path, .. }
            | SourceError::Results { path, .. }
            | SourceError::NotAFile { path }
            | SourceError::Unreadable { path, .. } => path,
        }
    }
}

/// A confined file, opened: the descriptor and the path it resolved to.
#[derive(Debug)]
pub struct Confined {
    pub file: File,
    /// The path after symlinks, checked inside SOURCE_ROOTS through the descriptor.
    pub resolved: PathBuf,
}

/// The resolved SOURCE_ROOTS, and the result directories no source may come from. Roots that
/// do not exist are kept lexically, so that a path under them is still judged correctly once
/// they appear.
#[derive(Debug, Clone)]
pub struct SourceRoots {
    roots: Vec<PathBuf>,
    /// (directory, the name messages give it): OUTPUT_DIR, TEMP_DIR, the queue's state.
    excluded: Vec<(PathBuf, String)>,
    /// Whether the daemon's result areas are refused wherever they are (hidden result
    /// directories, the packaged layout's `output` directories).
    refuse_result_areas: bool,
}

impl SourceRoots {
    /// Resolves the configured roots.
    pub fn new(roots: &[PathBuf]) -> SourceRoots {
        SourceRoots {
            roots: roots.iter().map(|r| resolve_dir(r)).collect(),
            excluded: Vec::new(),
            refuse_result_areas: false,
        }
    }

    /// No confinement, for the commands run by hand (`convert`, `inspect`): the person typing
    /// the command names the file. Files are still opened as [`SourceRoots::open`] does (no
    /// devices, no FIFOs).
    pub fn anywhere() -> SourceRoots {
        SourceRoots::new(&[PathBuf::from("/")])
    }

    /// Refuses sources under the daemon's own directories — `(directory, name)` pairs such as
    /// `(OUTPUT_DIR, "OUTPUT_DIR")` — and under any hyper2kvm result area: the hidden
    /// directories of [`RESULT_DIR_NAMES`] anywhere, and `output` directories of the packaged
    /// layout (`/var/lib/hyper2kvm/output`, `/var/lib/hyper2kvm/INSTANCE/output`), which are
    /// other instances' OUTPUT_DIR.
    pub fn excluding(mut self, dirs: &[(PathBuf, &str)]) -> SourceRoots {
        self.excluded.extend(dirs.iter().map(|(dir, name)| (resolve_dir(dir), (*name).to_owned())));
        self.refuse_result_areas = true;
        self
    }

    /// The daemon's SOURCE_ROOTS, refusing its own OUTPUT_DIR, TEMP_DIR and queue state
    /// (`WATCH_DIR/.hyper2kvm`) and every hyper2kvm result area ([`SourceRoots::excluding`]).
    pub fn for_daemon(config: &crate::config::Config) -> SourceRoots {
        SourceRoots::new(&config.source_roots).excluding(&[
            (config.output_dir.clone(), "OUTPUT_DIR"),
            (config.temp_dir.clone(), "TEMP_DIR"),
            (config.watch_dir.join(".hyper2kvm"), "the queue's state directory (WATCH_DIR/.hyper2kvm)"),
        ])
    }

    /// The roots as the `.error` message names them: colon-separated.
    pub fn describe(&self) -> String {
        self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(":")
    }

    /// Resolves `path` (following every symlink) and checks that it is a regular file inside a
    /// root and outside the result areas. Returns the resolved path. Nothing is opened: to
    /// read the file, use [`SourceRoots::open`].
    pub fn confine(&self, path: &Path) -> Result<PathBuf, SourceError> {
        let resolved = match std::fs::canonicalize(path) {
            Ok(resolved) => resolved,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.missing_or_outside(path));
            }
            // Unreadable is said only of a name that would be inside: whether a file outside
            // can be reached is none of the manifest's business.
            Err(source) => {
                return Err(match self.missing_or_outside(path) {
                    SourceError::Missing { .. } => SourceError::Unreadable { path: path.to_owned(), source },
                    refused => refused,
                })
            }
        };
        self.judge(path, &resolved)?;
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_file() => Ok(resolved),
            Ok(_) => Err(SourceError::NotAFile { path: path.to_owned() }),
            Err(source) => Err(SourceError::Unreadable { path: path.to_owned(), source }),
        }
    }

    /// Confines `path`, opens the resolved file read-only without following a final symlink
    /// and without blocking (a FIFO swapped in would otherwise wait for a writer for ever),
    /// then judges what was really opened: a regular file, at a path (as the kernel names the
    /// descriptor) inside the roots. A symlink swapped under the name, or a directory swapped
    /// above it, between the check and the open is refused.
    pub fn open(&self, path: &Path) -> Result<Confined, SourceError> {
        let resolved = self.confine(path)?;
        self.open_resolved(path, resolved)
    }

    /// The open half of [`SourceRoots::open`], of a path `confine` resolved (maybe a while ago).
    fn open_resolved(&self, path: &Path, resolved: PathBuf) -> Result<Confined, SourceError> {
        let unreadable = |source| SourceError::Unreadable { path: path.to_owned(), source };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&resolved)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    self.outside(path, &resolved)
                } else {
                    unreadable(e)
                }
            })?;
        let meta = file.metadata().map_err(unreadable)?;
        if !meta.is_file() {
            return Err(SourceError::NotAFile { path: path.to_owned() });
        }
        match std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            Ok(opened) => self.judge(path, &opened)?,
            // Without /proc, the file at the resolved name must still be the one opened.
            Err(_) => {
                use std::os::unix::fs::MetadataExt;
                let now = std::fs::metadata(&resolved).map_err(unreadable)?;
                if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
                    return Err(self.outside(path, &resolved));
                }
            }
        }
        Ok(Confined { file, resolved })
    }

    /// Refuses a resolved path outside the roots or inside a result area.
    fn judge(&self, path: &Path, resolved: &Path) -> Result<(), SourceError> {
        if !self.contains(resolved) {
            return Err(self.outside(path, resolved));
        }
        match self.result_area(resolved) {
            Some(area) => Err(SourceError::Results { path: path.to_owned(), resolved: resolved.to_owned(), area }),
            None => Ok(()),
        }
    }

    fn outside(&self, path: &Path, resolved: &Path) -> SourceError {
        SourceError::Outside { path: path.to_owned(), resolved: resolved.to_owned(), roots: self.describe() }
    }

    /// The result area `resolved` is in, named for a message.
    fn result_area(&self, resolved: &Path) -> Option<String> {
        if let Some((_, name)) = self.excluded.iter().find(|(dir, _)| resolved.starts_with(dir)) {
            return Some(name.clone());
        }
        if !self.refuse_result_areas {
            return None;
        }
        let hidden = resolved.components().find_map(|c| match c {
            Component::Normal(n) => RESULT_DIR_NAMES.iter().find(|r| n == **r),
            _ => None,
        });
        if let Some(name) = hidden {
            return Some(format!("a {name} directory"));
        }
        let below = resolved.strip_prefix(PACKAGED_STATE_DIR).ok()?;
        let mut parts = below.components().map(|c| c.as_os_str());
        let packaged_output = match (parts.next(), parts.next()) {
            (Some(first), _) if first == "output" => true,
            (Some(_), Some(second)) => second == "output",
            _ => false,
        };
        packaged_output
            .then(|| format!("an OUTPUT_DIR of the packaged layout ({PACKAGED_STATE_DIR}/[INSTANCE/]output)"))
    }

    /// A missing file is reported as missing only when it would have been inside a root;
    /// otherwise the manifest is pointing somewhere it must not, whether or not it exists.
    fn missing_or_outside(&self, path: &Path) -> SourceError {
        let resolved_parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
        let lexical = resolved_parent.map(|p| p.join(path.file_name().unwrap_or_default())).unwrap_or(path.to_owned());
        match self.judge(path, &lexical) {
            Ok(()) => SourceError::Missing { path: path.to_owned() },
            Err(refused) => refused,
        }
    }

    fn contains(&self, resolved: &Path) -> bool {
        self.roots.iter().any(|root| resolved.starts_with(root))
    }
}

/// A configured directory after symlinks, or as written when it does not exist (yet).
fn resolve_dir(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned())
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

    /// A name outside that cannot even be resolved (ENOTDIR here) is outside, not
    /// "unreadable": the answer must not tell what exists outside the roots.
    #[test]
    fn an_unresolvable_name_outside_is_outside() {
        let (dir, roots) = setup();
        let odd = dir.path().join("elsewhere/secret/below");
        assert!(matches!(roots.confine(&odd), Err(SourceError::Outside { .. })), "{:?}", roots.confine(&odd));
        let inside = dir.path().join("exports/vm/disk.vmdk/below");
        assert!(matches!(roots.confine(&inside), Err(SourceError::Unreadable { .. } | SourceError::Missing { .. })));
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
    #[test]
    fn opens_a_confined_file() {
        let (dir, roots) = setup();
        let opened = roots.open(&dir.path().join("exports/vm/disk.vmdk")).unwrap();
        assert!(opened.resolved.ends_with("exports/vm/disk.vmdk"));
        assert_eq!(opened.file.metadata().unwrap().len(), 1);
    }

    /// A directory of the confined path swapped for a symlink leading out between the check
    /// and the open: what was opened is judged, not the name.
    #[test]
    fn a_directory_swapped_after_the_check_is_caught_through_the_descriptor() {
        let (dir, roots) = setup();
        std::fs::write(dir.path().join("elsewhere/disk.vmdk"), b"secret").unwrap();
        let name = dir.path().join("exports/vm/disk.vmdk");
        let resolved = roots.confine(&name).unwrap();
        std::fs::rename(dir.path().join("exports/vm"), dir.path().join("exports/vm.old")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("exports/vm")).unwrap();
        assert!(matches!(roots.open_resolved(&name, resolved), Err(SourceError::Outside { .. })));
    }

    /// The file itself swapped for a symlink after the check: O_NOFOLLOW refuses it.
    #[test]
    fn a_file_swapped_for_a_symlink_after_the_check_is_refused() {
        let (dir, roots) = setup();
        let name = dir.path().join("exports/vm/disk.vmdk");
        let resolved = roots.confine(&name).unwrap();
        std::fs::remove_file(&name).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere/secret"), &name).unwrap();
        assert!(matches!(roots.open_resolved(&name, resolved), Err(SourceError::Outside { .. })));
    }

    /// A FIFO is refused at once, never opened for a writer that does not come.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let (dir, roots) = setup();
        let fifo = dir.path().join("exports/vm/fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(roots.open(&fifo), Err(SourceError::NotAFile { .. })));
        // Swapped in after the check, it is still not waited on.
        let name = dir.path().join("exports/vm/disk.vmdk");
        let resolved = roots.confine(&name).unwrap();
        std::fs::remove_file(&name).unwrap();
        nix::unistd::mkfifo(&name, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(roots.open_resolved(&name, resolved), Err(SourceError::NotAFile { .. })));
    }

    #[test]
    fn refuses_the_daemons_own_directories_inside_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("output");
        std::fs::create_dir_all(&output).unwrap();
        std::fs::create_dir_all(dir.path().join("exports/.hyper2kvm-superseded/j")).unwrap();
        std::fs::write(output.join("web.qcow2"), b"x").unwrap();
        std::fs::write(dir.path().join("exports/.hyper2kvm-superseded/j/web.qcow2"), b"x").unwrap();
        std::fs::write(dir.path().join("exports/disk.raw"), b"x").unwrap();
        let roots = SourceRoots::new(&[dir.path().to_owned()]).excluding(&[(output.clone(), "OUTPUT_DIR")]);
        match roots.confine(&output.join("web.qcow2")) {
            Err(SourceError::Results { area, .. }) => assert_eq!(area, "OUTPUT_DIR"),
            other => panic!("a published result must be refused, got {other:?}"),
        }
        match roots.open(&dir.path().join("exports/.hyper2kvm-superseded/j/web.qcow2")) {
            Err(SourceError::Results { area, .. }) => assert!(area.contains(".hyper2kvm-superseded"), "{area}"),
            other => panic!("a superseded result must be refused, got {other:?}"),
        }
        // Missing under OUTPUT_DIR is refused the same way, not reported missing.
        assert!(matches!(roots.confine(&output.join("nope.qcow2")), Err(SourceError::Results { .. })));
        roots.confine(&dir.path().join("exports/disk.raw")).expect("an export is still accepted");
        // Without `excluding` (commands run by hand), a result may be named.
        SourceRoots::new(&[dir.path().to_owned()]).confine(&output.join("web.qcow2")).unwrap();
    }

    #[test]
    fn refuses_the_packaged_output_directories_of_every_instance() {
        let roots = SourceRoots::new(&[PathBuf::from("/var/lib/hyper2kvm")]).excluding(&[]);
        for refused in ["/var/lib/hyper2kvm/output/web.qcow2", "/var/lib/hyper2kvm/other/output/web.qcow2"] {
            assert!(roots.result_area(Path::new(refused)).is_some(), "{refused}");
        }
        for accepted in ["/var/lib/hyper2kvm/exports/web.vmdk", "/var/lib/hyper2kvm/queue/web/disk.vmdk"] {
            assert_eq!(roots.result_area(Path::new(accepted)), None, "{accepted}");
        }
    }
}
