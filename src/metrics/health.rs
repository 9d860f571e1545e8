//! The daemon's health: what `/healthz` answers (ready, starting, stopping, stalled, paused
//! because OUTPUT_DIR cannot take a result).
//!
//! This module owns that state and the one-line reason given when it is not healthy. The
//! daemon's loop sets it; the HTTP server only reads it through [`Health::check`]. It must not
//! wait on the daemon's loop (the server's threads call it while that loop may be stuck: state
//! in atomics, a mutex held only to swap the pause reason) nor know about HTTP or the metrics.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPING: u8 = 2;

/// What `/healthz` answers: 200 while the daemon's main loop goes round, 503 before its first
/// scan, while it stops, when the loop has not gone round for too long (stuck, e.g. on a
/// hung NFS server), and while it claims nothing because OUTPUT_DIR cannot take a result.
#[derive(Debug)]
pub(crate) struct Health {
    state: AtomicU8,
    epoch: Instant,
    /// Milliseconds after `epoch` when the loop last went round.
    last_alive_ms: AtomicU64,
    stall_after: Duration,
    /// Why the daemon claims nothing for now (OUTPUT_DIR cannot take a result), if it does not.
    paused: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// A daemon starting; it counts as stalled when its loop has not gone round for
    /// `stall_after`.
    pub(crate) fn new(stall_after: Duration) -> Health {
        Health {
            state: AtomicU8::new(STARTING),
            epoch: Instant::now(),
            last_alive_ms: AtomicU64::new(0),
            stall_after,
            paused: std::sync::Mutex::new(None),
        }
    }

    /// The daemon stopped claiming because of `why`, or (`None`) claims again.
    pub(crate) fn paused(&self, why: Option<String>) {
        if let Ok(mut paused) = self.paused.lock() {
            *paused = why;
        }
    }

    /// The main loop went round (after a scan). Does not undo [`Health::stopping`].
    pub(crate) fn alive(&self) {
        self.last_alive_ms.store(self.millis(), Ordering::SeqCst);
        let _ = self.state.compare_exchange(STARTING, RUNNING, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The daemon stops claiming and drains.
    pub(crate) fn stopping(&self) {
        self.state.store(STOPPING, Ordering::SeqCst);
    }

    /// `Ok` when healthy, otherwise why not (one line, for the 503's body).
    pub(crate) fn check(&self) -> Result<(), String> {
        match self.state.load(Ordering::SeqCst) {
            STARTING => Err("starting".into()),
            STOPPING => Err("stopping".into()),
            _ => {
                let idle =
                    Duration::from_millis(self.millis().saturating_sub(self.last_alive_ms.load(Ordering::SeqCst)));
                if idle > self.stall_after {
                    return Err(format!("stalled: the main loop last went round {} s ago", idle.as_secs()));
                }
                match self.paused.lock().ok().and_then(|paused| paused.clone()) {
                    Some(why) => Err(format!("paused: {why}")),
                    None => Ok(()),
                }
            }
        }
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_reported_until_lifted_and_stopping_outranks_it() {
        let health = Health::new(Duration::from_secs(60));
        health.alive();
        health.paused(Some("OUTPUT_DIR has 1 GiB free, 2 GiB needed".into()));
        assert_eq!(health.check(), Err("paused: OUTPUT_DIR has 1 GiB free, 2 GiB needed".into()));
        health.paused(None);
        assert_eq!(health.check(), Ok(()));
        health.paused(Some("full".into()));
        health.stopping();
        assert_eq!(health.check(), Err("stopping".into()));
    }
}
