//! hyper2kvm: moves virtual machines exported from VMware and the clouds onto KVM.
//!
//! A daemon watches a queue directory (often on NFS) for Artifact Manifests, claims each one
//! exactly once, converts its disks to qcow2, writes a libvirt domain, and publishes
//! `<vm>.qcow2` (last, atomically) or `<vm>.error`. See docs/ARCHITECTURE.md for the life of a
//! job and the on-disk layout.
//!
//! Each module's header says what it owns and what it must not do; docs/ARCHITECTURE.md maps
//! them and who calls whom.

pub mod capabilities;
pub mod checksum;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod events;
pub mod guest;
pub mod host;
pub mod image;
pub mod job;
pub mod libvirt;
pub mod logging;
pub mod mac;
pub mod manifest;
pub mod metrics;
pub mod names;
pub mod output_layout;
pub mod publish;
pub mod queue;
pub mod report;
pub mod service;
pub mod source;
pub mod status;
pub mod submit;
pub mod systemd_units;
#[cfg(test)]
pub(crate) mod test_support;
pub mod text;
pub mod worker;
