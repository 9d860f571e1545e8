//! The `Type=notify` protocol as systemd sees it: a datagram socket named by NOTIFY_SOCKET
//! receives READY=1 once the first scan is done, STATUS= lines that follow the jobs,
//! WATCHDOG=1 while WATCHDOG_USEC asks for it, and STOPPING=1 with EXTEND_TIMEOUT_USEC= on
//! SIGTERM so that a draining conversion is not killed at TimeoutStopSec.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use common::fixtures::{slow_disk, small_raw};
use common::*;

/// What the units' WatchdogSec= would put there, shortened so pings come often.
const WATCHDOG_USEC: u64 = 2_000_000;

/// systemd only honours WATCHDOG_USEC when WATCHDOG_PID is the service's main pid, and so does
/// sd_watchdog_enabled() (and the sd-notify crate): the pid is not known before the spawn, so
/// the daemon is started by a shell that exports its own pid and execs the binary in place.
/// A WATCHDOG_PID given by the test is kept. Once, before any daemon starts: the environment
/// is read by every spawn.
fn daemon_knows_its_watchdog_pid() {
    static WRAP: Once = Once::new();
    WRAP.call_once(|| {
        let real = bin();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let wrapper = dir.join("hyper2kvm-with-watchdog-pid");
        let partial = dir.join(format!("hyper2kvm-with-watchdog-pid.{}", std::process::id()));
        let script = format!(
            "#!/bin/sh\n: \"${{WATCHDOG_PID:=$$}}\"\nexport WATCHDOG_PID\nexec '{}' \"$@\"\n",
            real.display().to_string().replace('\'', r"'\''")
        );
        std::fs::write(&partial, script).unwrap();
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&partial, &wrapper).unwrap();
        std::env::set_var("HYPER2KVM_TEST_BIN", &wrapper);
    });
}

/// One datagram as received.
#[derive(Debug, Clone)]
struct Datagram {
    at: Instant,
    lines: Vec<String>,
    /// Whether the queue's state directory and OUTPUT_DIR existed when it arrived.
    dirs_existed: bool,
}

impl Datagram {
    fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The fake service manager's end of NOTIFY_SOCKET, read on a thread of its own.
struct Manager {
    socket: PathBuf,
    received: Arc<Mutex<Vec<Datagram>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Manager {
    fn listen(env: &Env) -> Manager {
        let socket = env.root.join("notify.sock");
        let sock = UnixDatagram::bind(&socket).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (state_dir, output) = (env.queue.join(".hyper2kvm"), env.output.clone());
        let reader = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                // Drains what is queued even after stop is set: the last datagrams of a daemon
                // that just exited are still in the socket.
                loop {
                    match sock.recv(&mut buf) {
                        Ok(n) => {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let datagram = Datagram {
                                at: Instant::now(),
                                lines: text.lines().map(str::to_owned).collect(),
                                dirs_existed: state_dir.is_dir() && output.is_dir(),
                            };
                            received.lock().unwrap().push(datagram);
                        }
                        Err(_) if stop.load(Ordering::SeqCst) => return,
                        Err(_) => {}
                    }
                }
            })
        };
        Manager { socket, received, stop, reader: Some(reader) }
    }

    fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut vars = vec![("NOTIFY_SOCKET", self.socket.to_str().unwrap())];
        vars.extend_from_slice(extra);
        vars
    }

    fn received(&self) -> Vec<Datagram> {
        self.received.lock().unwrap().clone()
    }

    /// Waits for a datagram matching `pred`, returning it, or fails with everything received.
    #[track_caller]
    fn wait_for(&self, daemon: &Daemon, limit: Duration, what: &str, pred: impl Fn(&Datagram) -> bool) -> Datagram {
        let start = Instant::now();
        loop {
            if let Some(d) = self.received().into_iter().find(|d| pred(d)) {
                return d;
            }
            if start.elapsed() > limit {
                daemon.fail(&format!("no {what} within {limit:?}; received: {:#?}", self.received()));
            }
            daemon.assert_running();
            sleep(Duration::from_millis(50));
        }
    }

    /// Everything received, once the reader has read the last of it.
    fn finish(mut self) -> Vec<Datagram> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.received()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn lines(received: &[Datagram]) -> Vec<&str> {
    received.iter().flat_map(|d| d.lines.iter().map(String::as_str)).collect()
}

fn write_manifest_before_start(env: &Env, manifest: &serde_json::Value) {
    std::fs::create_dir_all(&env.queue).unwrap();
    std::fs::write(env.queue.join(MANIFEST_NAME), serde_json::to_vec_pretty(manifest).unwrap()).unwrap();
}

#[test]
fn ready_status_and_watchdog_reach_the_notify_socket() {
    daemon_knows_its_watchdog_pid();
    let env = Env::new();
    let source = small_raw(&env.exports.join("notify/disk-0.raw"));
    // Waiting before the start: the first scan sees it (still settling), so the STATUS sent with
    // READY=1 counts it only if READY came after that scan.
    write_manifest_before_start(&env, &manifest("notify-vm", vec![disk("disk-0", "raw", &source)]));
    let manager = Manager::listen(&env);
    let usec = WATCHDOG_USEC.to_string();
    let mut daemon = Daemon::start(&env, &manager.env(&[("WATCHDOG_USEC", &usec)]), &[]);

    let ready = manager.wait_for(&daemon, Duration::from_secs(30), "READY=1", |d| d.has("READY=1"));
    assert!(ready.dirs_existed, "READY=1 came before the queue and output directories existed: {ready:?}");
    let status =
        ready.value("STATUS").unwrap_or_else(|| daemon.fail(&format!("READY=1 came without STATUS=: {ready:?}")));
    assert!(status.contains("1 queued"), "READY=1 came before the first scan saw the waiting manifest: {status:?}");

    match hypersdk_wait(&daemon, &env, "notify-vm", &[]) {
        Outcome::Success { .. } => {}
        Outcome::Failed(text) => daemon.fail(&format!("the job failed:\n{text}")),
    }
    let done = manager.wait_for(&daemon, Duration::from_secs(10), "a STATUS= with the finished job", |d| {
        d.value("STATUS").is_some_and(|s| s.contains("1 done"))
    });
    let status = done.value("STATUS").unwrap();
    assert!(status.starts_with("0 running, 0 queued, 1 done, 0 failed"), "{status:?}");
    assert!(status.ends_with("last: notify-vm ok"), "{status:?}");

    // A third of WATCHDOG_USEC apart; three pings within 2.5 periods leave plenty of slack.
    let pings_after_ready = || manager.received().iter().filter(|d| d.at >= ready.at && d.has("WATCHDOG=1")).count();
    let start = Instant::now();
    while pings_after_ready() < 3 && start.elapsed() < Duration::from_micros(WATCHDOG_USEC * 5 / 2) {
        sleep(Duration::from_millis(50));
    }
    let pings = pings_after_ready();
    assert!(pings >= 3, "{pings} WATCHDOG=1 within {:?} of READY=1 (WATCHDOG_USEC={WATCHDOG_USEC})", start.elapsed());

    daemon.stop();
    let received = manager.finish();
    let stopping = received
        .iter()
        .find(|d| d.has("STOPPING=1"))
        .unwrap_or_else(|| daemon.fail(&format!("no STOPPING=1 after SIGTERM: {received:#?}")));
    assert!(
        stopping.value("EXTEND_TIMEOUT_USEC").and_then(|v| v.parse::<u64>().ok()).is_some_and(|v| v > 0),
        "{stopping:?}"
    );
    assert_eq!(stopping.value("STATUS"), Some("stopping"), "an idle daemon has nothing to drain: {stopping:?}");
    assert_eq!(lines(&received).iter().filter(|l| **l == "READY=1").count(), 1, "READY=1 is sent once");
    // The loop goes round every POLL_INTERVAL; STATUS= is sent only when it changes.
    let statuses: Vec<&str> = received.iter().filter_map(|d| d.value("STATUS")).collect();
    let repeated = statuses.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(repeated, 0, "the same STATUS= sent twice in a row: {statuses:#?}");
}

/// WATCHDOG_USEC is meant for the process WATCHDOG_PID names (systemd's main pid); a daemon
/// started by a wrapper that inherited them must not ping for it.
#[test]
fn no_watchdog_pings_when_watchdog_pid_names_another_process() {
    daemon_knows_its_watchdog_pid();
    let env = Env::new();
    let manager = Manager::listen(&env);
    let usec = WATCHDOG_USEC.to_string();
    let mut daemon = Daemon::start(&env, &manager.env(&[("WATCHDOG_USEC", &usec), ("WATCHDOG_PID", "1")]), &[]);
    let ready = manager.wait_for(&daemon, Duration::from_secs(30), "READY=1", |d| d.has("READY=1"));
    sleep(Duration::from_micros(WATCHDOG_USEC));
    daemon.stop();
    let received = manager.finish();
    assert!(ready.has("READY=1"));
    let pings = received.iter().filter(|d| d.has("WATCHDOG=1")).count();
    // Within WATCHDOG_USEC a real watchdog pings three times.
    assert_eq!(pings, 0, "WATCHDOG=1 for another process's watchdog: {received:#?}");
}

#[test]
fn sigterm_during_a_job_sends_stopping_and_asks_for_time_to_drain() {
    daemon_knows_its_watchdog_pid();
    let env = Env::new();
    let source = slow_disk(&env.exports);
    let manager = Manager::listen(&env);
    let usec = WATCHDOG_USEC.to_string();
    // A short drain limit: the job is released rather than finished, which keeps the test short.
    let vars = manager.env(&[SLOW, ("WATCHDOG_USEC", &usec), ("DRAIN_SECONDS", "1")]);
    let mut daemon = Daemon::start(&env, &vars, &[]);
    manager.wait_for(&daemon, Duration::from_secs(30), "READY=1", |d| d.has("READY=1"));
    hypersdk_submit(&daemon, &env, &manifest("slow-vm", vec![disk("disk-0", "raw", &source)]));
    wait_for(&daemon, Duration::from_secs(60), "the job to be claimed", || lock_count(&env) == 1);
    manager.wait_for(&daemon, Duration::from_secs(10), "a STATUS= with the running job", |d| {
        d.value("STATUS").is_some_and(|s| s.starts_with("1 running"))
    });

    let signalled = Instant::now();
    let (status, took, killed) = daemon.terminate(Duration::from_secs(20));
    assert!(!killed && status.success(), "the daemon must stop cleanly ({status}, {took:?})\n{}", daemon.log());
    if visible_entries(&env.output).iter().any(|n| n.starts_with("slow-vm")) {
        daemon.fail("the job finished before SIGTERM: nothing was left to drain");
    }
    let received = manager.finish();
    let after: Vec<&Datagram> = received.iter().filter(|d| d.at >= signalled).collect();
    let after_lines: Vec<&str> = after.iter().flat_map(|d| d.lines.iter().map(String::as_str)).collect();
    let stopping = after_lines
        .iter()
        .position(|l| *l == "STOPPING=1")
        .unwrap_or_else(|| daemon.fail(&format!("no STOPPING=1 after SIGTERM: {after:#?}")));
    let extend = after_lines[stopping..]
        .iter()
        .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .unwrap_or_else(|| daemon.fail(&format!("no EXTEND_TIMEOUT_USEC= after STOPPING=1: {after:#?}")));
    let extend: u64 = extend.parse().unwrap_or_else(|e| daemon.fail(&format!("EXTEND_TIMEOUT_USEC={extend}: {e}")));
    // The daemon asks again every 5 s while it drains: a shorter extension would lapse in between.
    assert!(extend >= 5_000_000, "EXTEND_TIMEOUT_USEC={extend}");
    let draining = after.iter().find_map(|d| d.value("STATUS").filter(|s| s.starts_with("draining: ")));
    assert!(
        draining.is_some_and(|s| s.contains("1 running")),
        "no STATUS=draining: … naming the running job: {after:#?}"
    );
    assert!(!after_lines.contains(&"READY=1"), "READY=1 after SIGTERM: {after:#?}");
}
