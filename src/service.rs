//! Talking to systemd (`Type=notify`): READY, STATUS, WATCHDOG, STOPPING and
//! EXTEND_TIMEOUT_USEC. Every call is a no-op when NOTIFY_SOCKET is not set.

use std::time::Duration;

use sd_notify::NotifyState;

/// Startup is complete: the directories are checked and the first scan is done.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line summary for `systemctl status`.
pub(crate) fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// The main loop is alive.
pub(crate) fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to send WATCHDOG=1 when systemd asked for it (WatchdogSec=), if it did: a third
/// of the period, so that pings stay within WatchdogSec/2 of each other even when a slow scan
/// delays one.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 3).max(Duration::from_millis(1)))
}

/// Stopping, and asking for `extra` more time so a draining conversion is not killed.
pub(crate) fn stopping(extra: Duration, status: &str) {
    let usec = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::Stopping, NotifyState::ExtendTimeoutUsec(usec), NotifyState::Status(status)]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "could not notify systemd");
    }
}
