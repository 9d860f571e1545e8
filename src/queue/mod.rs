//! The on-disk queue: finding manifests, claiming them exactly once, and recording outcomes.
//!
//! See [`layout`] for the directory layout and docs/ARCHITECTURE.md for the protocol.
//!
//! Only [`claim`] decides who owns a job; nothing here converts, publishes or words an `.error`.

pub mod claim;
pub mod fs;
pub mod layout;
pub mod lock;
pub mod records;
pub mod scan;

pub use claim::{Beat, Claim, Queue};
pub use layout::{Layout, Outcome};
pub use lock::LockRecord;
pub use records::{EventLog, JobRecord, JobState};
pub use scan::Scanner;
