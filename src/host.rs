//! Who this daemon is: host name, boot id and pid, recorded in lock files and job records so
//! that a claim can be traced to one process on one boot of one host.
//!
//! It only says who this process is; what an identity from another boot or pid means for a
//! claim is [`crate::queue`]'s.

use serde::{Deserialize, Serialize};

/// The identity of this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id`: tells a restarted host from a live one.
    pub boot_id: String,
    pub pid: u32,
    pub instance: Option<String>,
}

impl Identity {
    /// Reads the identity of the current process.
    pub fn current(instance: Option<String>) -> Identity {
        Identity { host: host_name(), boot_id: boot_id(), pid: std::process::id(), instance }
    }
}

/// The host name (UTS namespace aware), or `unknown-host` when it cannot be read.
pub(crate) fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// The kernel's boot id, or an empty string where there is none.
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// 64 random bits as hex, for job ids that are unique across hosts without coordination.
pub(crate) fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // Without the kernel's randomness, fall back to time and pid: still unique per host.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = (nanos ^ ((std::process::id() as u64) << 32)).to_le_bytes();
    }
    hex::encode(bytes)
}
