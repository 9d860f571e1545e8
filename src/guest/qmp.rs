//! qemu's `GUEST_PANICKED` event, read from its QMP socket: the boot check's panic signal for
//! guests without a serial console. The machine gets a `pvpanic` device (ISA port 0x505, ACPI
//! `QEMU0001`), which Linux (its `pvpanic` driver, once udev loaded it) and Windows write to
//! when they panic or crash; qemu then reports the event and, with `-action panic=pause`,
//! stops the guest.
//!
//! The socket lives in a short private directory (a Unix socket path has at most 107 bytes,
//! and the console log's directory may be deeper), removed when the watch is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long qemu has to open its QMP socket.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);
/// A QMP message longer than this is not read further (events are a few hundred bytes).
const MAX_LINE_BYTES: u64 = 64 * 1024;

/// A QMP socket for one qemu, and whether the guest panicked.
pub(crate) struct PanicWatch {
    dir: PathBuf,
    panicked: Arc<AtomicBool>,
}

impl PanicWatch {
    /// A new private directory for the socket; `None` when the temporary directory has no
    /// room for one (the check then runs without the panic signal).
    pub(crate) fn new() -> Option<PanicWatch> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hyper2kvm-qmp-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).ok()?;
        Some(PanicWatch { dir, panicked: Arc::new(AtomicBool::new(false)) })
    }

    /// The socket qemu is to listen on (`-qmp unix:PATH,server=on,wait=off`).
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Connects once qemu listens and reads its events on a thread of its own, which ends
    /// when qemu closes the socket.
    pub(crate) fn start(&self) {
        let (socket, panicked) = (self.socket(), Arc::clone(&self.panicked));
        std::thread::spawn(move || {
            if let Some(stream) = connect(&socket) {
                read_events(stream, &panicked);
            }
        });
    }

    /// Whether qemu reported `GUEST_PANICKED`.
    pub(crate) fn panicked(&self) -> bool {
        self.panicked.load(Ordering::Relaxed)
    }
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn connect(socket: &Path) -> Option<UnixStream> {
    let deadline = Instant::now() + CONNECT_WITHIN;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Some(stream),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => return None,
        }
    }
}

/// Leaves QMP's capabilities negotiation (events come only after it) and watches every line.
fn read_events(mut stream: UnixStream, panicked: &AtomicBool) {
    if stream.write_all(b"{\"execute\": \"qmp_capabilities\"}\n").is_err() {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE_BYTES).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if is_panic_event(&line) => panicked.store(true, Ordering::Relaxed),
            Ok(_) => {}
        }
    }
}

/// `{"timestamp": …, "event": "GUEST_PANICKED", "data": …}`.
fn is_panic_event(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(line).is_ok_and(|v| v["event"] == "GUEST_PANICKED")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_panic_event_is_recognised_and_nothing_else() {
        let event = br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "GUEST_PANICKED", "data": {"action": "pause"}}"#;
        assert!(is_panic_event(event));
        assert!(!is_panic_event(br#"{"return": {}}"#));
        assert!(!is_panic_event(br#"{"event": "STOP"}"#));
        assert!(!is_panic_event(b"GUEST_PANICKED"));
    }

    #[test]
    fn a_qemu_reporting_a_panic_sets_the_flag() {
        let watch = PanicWatch::new().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(watch.socket()).unwrap();
        watch.start();
        let (mut qemu, _) = listener.accept().unwrap();
        qemu.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").unwrap();
        let mut asked = [0u8; 31];
        qemu.read_exact(&mut asked).unwrap();
        assert_eq!(&asked, b"{\"execute\": \"qmp_capabilities\"}");
        qemu.write_all(b"{\"return\": {}}\n{\"event\": \"GUEST_PANICKED\"}\n").unwrap();
        drop(qemu);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !watch.panicked() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(watch.panicked());
        let dir = watch.dir.clone();
        drop(watch);
        assert!(!dir.exists(), "the socket's directory is removed");
    }
}
