//! libvirt: the domain XML of a converted VM, and registering it (LIBVIRT_INTEGRATION).
//!
//! Registration goes through the `virt` crate (libvirt's C library). Every call blocks, so it
//! runs on the job's blocking thread, with one connection per job. Rules and messages:
//! docs/LIBVIRT.md.
//!
//! It publishes nothing into OUTPUT_DIR's result names and decides no job's outcome: its
//! failures are typed errors ([`error`]) that the job words and acts on.
pub(crate) mod connection;
pub(crate) mod devices;
pub mod domain_xml;
pub(crate) mod error;
pub mod host_caps;
pub(crate) mod pool;
pub(crate) mod register;

#[cfg(test)]
mod tests;

pub(crate) use connection::{probe, Connection};
pub(crate) use error::LibvirtError;
