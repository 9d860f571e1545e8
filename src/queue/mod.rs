//! The on-disk queue: finding manifests, claiming them exactly once, and recording outcomes.
//!
//! See [`layout`] for the directory layout and docs/ARCHITECTURE.md for the protocol.
//!
//! Only [`claim`] decides who owns a job; nothing here converts, publishes or words an `.error`.

pub(crate) mod claim;
pub(crate) mod fs;
pub(crate) mod layout;
pub mod lock;
pub(crate) mod records;
pub(crate) mod scan;

pub use claim::Claim;
pub(crate) use claim::{Beat, Queue};
pub(crate) use layout::{Layout, Outcome};
pub(crate) use lock::LockRecord;
pub(crate) use records::{EventLog, JobRecord, JobState};
pub(crate) use scan::Scanner;
