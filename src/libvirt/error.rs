//! Why a VM could not be registered with libvirt.

use std::path::PathBuf;

use thiserror::Error;

/// A registration failure. The Display is one sentence an operator can act on (it becomes the
/// first line of `V.error`); libvirt's own message, when there is one, is the [`source`].
///
/// [`source`]: std::error::Error::source
#[derive(Debug, Error)]
pub(crate) enum LibvirtError {
    /// No connection: no daemon, no socket, no route.
    #[error("libvirt at {uri} is not reachable: is libvirtd running?")]
    Unreachable {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    /// A daemon answered but would not let this user manage it.
    #[error(
        "libvirt at {uri} refused the connection: run hyper2kvm as root or as a member of the libvirt group, \
         or set LIBVIRT_URI"
    )]
    Denied {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    /// A setting libvirt's C API cannot take (it holds a NUL byte).
    #[error("{key} contains a NUL byte, which libvirt cannot take: fix the configuration")]
    BadSetting { key: &'static str },
    /// LIBVIRT_POOL names no pool.
    #[error("libvirt storage pool '{pool}' does not exist at {uri}: create it or set LIBVIRT_POOL")]
    PoolMissing {
        pool: String,
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    /// The `default` pool was missing and libvirt would not create it.
    #[error(
        "libvirt storage pool 'default' does not exist at {uri} and could not be created in {}: create it \
         (virsh pool-define-as default dir --target {}, then pool-build, pool-start and pool-autostart default) \
         or set LIBVIRT_POOL",
        dir.display(),
        dir.display()
    )]
    PoolCreate {
        uri: String,
        dir: PathBuf,
        #[source]
        source: virt::error::Error,
    },
    /// The pool exists but is stopped, so it cannot be refreshed.
    #[error(
        "libvirt storage pool '{pool}' at {uri} is not active: start it (virsh pool-start {pool}) or set LIBVIRT_POOL"
    )]
    PoolInactive { pool: String, uri: String },
    /// Another VM's domain has the name this VM's domain must have.
    #[error("a libvirt domain named {name} already exists for another VM (uuid {uuid}): undefine or rename it")]
    NameTaken { name: String, uuid: String },
    /// This VM's domain exists under another name (renamed by hand).
    #[error(
        "the libvirt domain {other} at {uri} already has this VM's uuid {uuid}: rename it back to {name} or undefine it"
    )]
    UuidTaken { name: String, other: String, uuid: String, uri: String },
    /// Re-importing would replace the disks of a running guest.
    #[error("domain {name} is running at {uri}; shut it down before importing it again")]
    Running { name: String, uri: String },
    /// A file with a disk's final name is in the pool, and it is not this VM's.
    #[error(
        "{} already exists in libvirt storage pool '{pool}' and is not a disk of domain {name}: move it away or set LIBVIRT_POOL",
        path.display()
    )]
    PoolFileTaken { pool: String, path: PathBuf, name: String },
    /// The daemon's user may not write into the pool's directory (the packaged daemon runs
    /// unprivileged, and libvirt's own pools belong to root).
    #[error(
        "hyper2kvm may not write into libvirt storage pool '{pool}' ({}): make OUTPUT_DIR the pool's directory \
         (docs/LIBVIRT.md), or give the daemon's user write access",
        dir.display()
    )]
    PoolNotWritable {
        pool: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pool's directory is read-only in the daemon's sandbox: outside the unit's
    /// `ReadWritePaths=`, or created after the daemon started.
    #[error(
        "libvirt storage pool '{pool}' ({}) is read-only for hyper2kvm: list it in ReadWritePaths= of the unit \
         (it must exist when the daemon starts; docs/OPERATIONS.md), or make OUTPUT_DIR the pool's directory",
        dir.display()
    )]
    PoolReadOnly {
        pool: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Linking or copying the disks into the pool's directory failed.
    #[error(
        "could not place the disks in libvirt storage pool '{pool}' ({}): check that the directory is writable and has space",
        dir.display()
    )]
    Placement {
        pool: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// libvirt refused the domain XML.
    #[error("libvirt at {uri} refused to define domain {name}: {message}")]
    DefineRefused {
        name: String,
        uri: String,
        message: String,
        #[source]
        source: virt::error::Error,
    },
    /// Any other libvirt call that failed (a lookup, reading a definition).
    #[error("libvirt at {uri} failed while {action}")]
    Call {
        uri: String,
        action: String,
        #[source]
        source: virt::error::Error,
    },
}

impl LibvirtError {
    /// The error with libvirt's own message, if any, in parentheses: one line for a person.
    pub(crate) fn with_libvirt_message(&self) -> String {
        match self.libvirt_error() {
            Some(e) => format!("{self} ({})", e.message()),
            None => self.to_string(),
        }
    }

    fn libvirt_error(&self) -> Option<&virt::error::Error> {
        match self {
            LibvirtError::Unreachable { source, .. }
            | LibvirtError::Denied { source, .. }
            | LibvirtError::PoolMissing { source, .. }
            | LibvirtError::PoolCreate { source, .. }
            | LibvirtError::DefineRefused { source, .. }
            | LibvirtError::Call { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The error's causes, outermost first, for the `cause:` lines of `V.error`.
    pub(crate) fn causes(&self) -> Vec<String> {
        let mut causes = Vec::new();
        let mut next = std::error::Error::source(self);
        while let Some(cause) = next {
            causes.push(cause.to_string());
            next = cause.source();
        }
        causes
    }
}
