#![warn(missing_docs, unreachable_pub)]
//! hyper2kvm: moves virtual machines exported from VMware and the clouds onto KVM.
//!
//! A daemon watches a queue directory (often on NFS) for Artifact Manifests, claims each one
//! exactly once, converts its disks to qcow2, writes a libvirt domain, and publishes
//! `<vm>.qcow2` (last, atomically) or `<vm>.error`. See docs/ARCHITECTURE.md for the life of a
//! job and the on-disk layout.
//!
//! Each module's header says what it owns and what it must not do; docs/ARCHITECTURE.md maps
//! them and who calls whom.

// The binary's surface: one module per command, and what the command line is made of.
pub mod capabilities;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod events;
pub mod guest;
pub mod logging;
pub mod status;
pub mod submit;
pub mod worker;

pub use manifest::SourceFormat;

// Everything else is the crate's own; the compiler then finds what nothing uses.
pub(crate) mod checksum;
pub(crate) mod host;
pub(crate) mod image;
pub(crate) mod job;
pub(crate) mod libvirt;
pub(crate) mod mac;
pub(crate) mod manifest;
pub(crate) mod metrics;
pub(crate) mod names;
pub(crate) mod output_layout;
pub(crate) mod publish;
pub(crate) mod queue;
pub(crate) mod report;
pub(crate) mod service;
pub(crate) mod source;
pub(crate) mod systemd_units;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod text;

/// What the fuzz targets (fuzz/) and the integration tests (tests/) reach inside the crate,
/// under the modules' own names: the parsers they feed hostile bytes and the pieces they
/// assemble a daemon's job from. Not an API: it changes with the code.
#[doc(hidden)]
pub mod internals {
    /// Disk formats: the parsers the fuzz targets feed.
    pub mod image {
        pub use crate::image::{ova, sniff, tap, vmdk, DiskSource, FileSource, ReadAt};
    }
    /// The domain XML and the host's capabilities XML.
    pub mod libvirt {
        pub use crate::libvirt::{domain_xml, host_caps};
    }
    /// A claimed job, run in-process by the lifecycle tests.
    pub mod job {
        pub use crate::job::{JobContext, JobEnd};
    }
    /// The manifest's parser and what it produces.
    pub mod manifest {
        pub use crate::manifest::{
            is_complete_json, parse, vm_name_hint, DiskSpec, DiskType, Hardware, JobSpec, ManifestFile, NicSpec,
            SourceFormat,
        };
    }
    /// Claims and their lock records.
    pub mod queue {
        pub use crate::queue::{lock, Claim};
    }
    /// Source confinement.
    pub mod source {
        pub use crate::source::SourceRoots;
    }
    /// SHA-256 of a file in a read of its own.
    pub mod checksum {
        pub use crate::checksum::sha256_of;
    }
    /// VM and domain names.
    pub mod names {
        pub use crate::names::{check_vm_name, domain_name};
    }
    /// Result file names in OUTPUT_DIR.
    pub mod output_layout {
        pub use crate::output_layout::{boot_disk_file, data_disk_file};
    }
}
