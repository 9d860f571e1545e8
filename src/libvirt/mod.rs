//! libvirt: the domain XML of a converted VM, and registering it (LIBVIRT_INTEGRATION).
//!
//! Registration goes through the `virt` crate (libvirt's C library). Every call blocks, so it
//! runs on the job's blocking thread, with one connection per job. Rules and messages:
//! docs/LIBVIRT.md.
//!
//! It publishes nothing into OUTPUT_DIR's result names and decides no job's outcome: its
//! failures are typed errors ([`error`]) that the job words and acts on.
pub mod connection;
pub mod devices;
pub mod domain_xml;
pub mod error;
pub mod host_caps;
pub mod pool;
pub mod register;

#[cfg(test)]
mod tests;

pub use connection::{probe, Connection};
pub use error::LibvirtError;
