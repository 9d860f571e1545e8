//! A daemon's life around its jobs: SIGTERM while converting (drain, or release when the drain
//! limit passes), kill -9 and restart, and CONVERSION_TIMEOUT.

mod common;

use std::time::Duration;

use common::fixtures::{slow_disk, small_raw};
use common::*;

fn wait_until_converting(daemon: &Daemon, env: &Env) {
    wait_for(daemon, Duration::from_secs(60), "the job to be claimed", || lock_count(env) == 1);
    // Give qemu-img a moment to start writing.
    std::thread::sleep(Duration::from_millis(700));
}

fn assert_no_partial_results(daemon: &Daemon, env: &Env, vm: &str) {
    let visible = visible_entries(&env.output);
    if visible.iter().any(|n| n.starts_with(vm)) {
        daemon.fail(&format!("results appeared for an unfinished job: {visible:?}"));
    }
    assert_no_temp_files(daemon, env);
}

#[test]
fn sigterm_past_the_drain_limit_releases_the_job_to_the_queue() {
    let env = Env::new();
    let source = slow_disk(&env.exports);
    let mut daemon = Daemon::start(&env, &[SLOW, ("DRAIN_SECONDS", "0.5")], &[]);
    hypersdk_submit(&daemon, &env, &manifest("slow-vm", vec![disk("disk-0", "raw", &source)]));
    wait_until_converting(&daemon, &env);
    let (status, took, killed) = daemon.terminate(Duration::from_secs(15));
    assert!(!killed && status.success(), "the daemon must stop cleanly ({status}, {took:?})\n{}", daemon.log());
    assert!(took < Duration::from_secs(10), "release took {took:?}");
    let requeued: Vec<String> =
        visible_entries(&env.queue).into_iter().filter(|n| n.starts_with("artifact-manifest.requeued-")).collect();
    assert_eq!(requeued.len(), 1, "the released manifest is back in the queue under a requeued name");
    assert!(!env.queue.join(MANIFEST_NAME).exists(), "the producer's fixed name is left free");
    assert_eq!(lock_count(&env), 0, "no lock is left behind");
    assert_no_partial_results(&daemon, &env, "slow-vm");

    // Another daemon (fast: no compression) takes the released job at once.
    let second = Daemon::start_named(&env, "second", &[], &[]);
    match hypersdk_wait(&second, &env, "slow-vm", &[]) {
        Outcome::Success { .. } => assert_converted(&second, &env.output.join("slow-vm.qcow2"), &source, "raw"),
        Outcome::Failed(text) => second.fail(&format!("the released job failed:\n{text}")),
    }
}

#[test]
fn sigterm_waits_for_a_running_job_within_the_drain_limit() {
    let env = Env::new();
    let source = slow_disk(&env.exports);
    let mut daemon = Daemon::start(&env, &[SLOW], &[]);
    hypersdk_submit(&daemon, &env, &manifest("drained-vm", vec![disk("disk-0", "raw", &source)]));
    wait_until_converting(&daemon, &env);
    let status = env.status();
    let running = status["jobs"].as_array().unwrap().iter().find(|j| j["state"] == "running");
    assert_eq!(running.map(|j| j["vm_name"].clone()), Some("drained-vm".into()), "{status:#}");
    let claim = &status["claims"][0];
    assert_eq!(claim["generation"], 1, "{status:#}");
    assert_eq!(claim["manifest_name"], MANIFEST_NAME, "{status:#}");
    assert!(claim["heartbeat_age_seconds"].as_f64().is_some_and(|age| age < 60.0), "{status:#}");
    let (status, took, killed) = daemon.terminate(Duration::from_secs(90));
    assert!(!killed && status.success(), "the daemon must drain and exit 0 ({status}, {took:?})\n{}", daemon.log());
    let qcow2 = env.output.join("drained-vm.qcow2");
    assert!(qcow2.exists(), "the running job was finished before exit\n{}", daemon.log());
    assert_converted(&daemon, &qcow2, &source, "raw");
    assert!(!env.queue.join(MANIFEST_NAME).exists());
}

#[test]
fn a_daemon_killed_outright_does_not_strand_its_job() {
    let env = Env::new();
    let source = slow_disk(&env.exports);
    let mut first = Daemon::start(&env, &[SLOW], &[]);
    hypersdk_submit(&first, &env, &manifest("killed-vm", vec![disk("disk-0", "raw", &source)]));
    wait_until_converting(&first, &env);
    unsafe {
        libc::kill(first.pid(), libc::SIGKILL);
    }
    let _ = first.terminate(Duration::from_secs(5));
    assert_eq!(lock_count(&env), 1, "the dead daemon's lock is still there");

    // The restarted daemon (same host, new pid) releases and retakes the job without waiting
    // for a lease.
    let second = Daemon::start_named(&env, "restarted", &[], &[]);
    match hypersdk_wait(&second, &env, "killed-vm", &[]) {
        Outcome::Success { .. } => assert_converted(&second, &env.output.join("killed-vm.qcow2"), &source, "raw"),
        Outcome::Failed(text) => second.fail(&format!("the retaken job failed:\n{text}")),
    }
    wait_for(&second, Duration::from_secs(10), "the lock to be removed", || lock_count(&env) == 0);
    // Recovered at start-up, not taken over once the 90 s lease ran out.
    assert!(
        second.log().contains("releasing a claim left by an earlier run of this daemon"),
        "the restarted daemon did not recover the claim itself:\n{}",
        second.log()
    );
    let status = env.status();
    let done: Vec<_> = status["jobs"].as_array().unwrap().iter().filter(|j| j["state"] == "done").collect();
    assert_eq!(done.len(), 1, "exactly one job completed: {status:#}");
}

#[test]
fn conversion_timeout_fails_the_job_with_a_clear_error_and_the_daemon_goes_on() {
    let env = Env::new();
    let source = slow_disk(&env.exports);
    // 0.03 minutes = 1.8 s: enough for the small job, not for the slow one.
    let mut s = Session::start_in(env, &[SLOW, ("CONVERSION_TIMEOUT", "0.03")], &[]);
    let first = s.convert_err(&manifest("timeout-vm", vec![disk("disk-0", "raw", &source)]), "timeout-vm");
    assert!(first.contains("CONVERSION_TIMEOUT"), "first line: {first}");
    assert_no_temp_files(&s.daemon, &s.env);
    let small = small_raw(&s.env.exports.join("small/disk-0.raw"));
    s.convert_ok(&manifest("after-timeout", vec![disk("disk-0", "raw", &small)]));
}

/// The state a daemon leaves when it dies after publishing every result of a job but before
/// recording it: the claim and its lock, `V.json` naming the job, and `V.qcow2`. The source
/// disk is gone, so a second conversion would fail and move the published results aside.
fn published_but_unrecorded(env: &Env, vm: &str, job_id: &str, lock_host: &str) {
    let state = env.queue.join(".hyper2kvm");
    std::fs::create_dir_all(state.join("claimed")).unwrap();
    std::fs::create_dir_all(state.join("locks")).unwrap();
    std::fs::create_dir_all(&env.output).unwrap();
    let gone = env.exports.join("gone/disk-0.raw");
    let m = manifest(vm, vec![disk("disk-0", "raw", &gone)]);
    std::fs::write(state.join(format!("claimed/{job_id}.json")), m.to_string()).unwrap();
    let lock = serde_json::json!({
        "job_id": job_id, "host": lock_host, "boot_id": "an-earlier-boot", "pid": 1, "instance": null,
        "generation": 1, "claimed_at": "2026-01-01T00:00:00Z", "manifest_name": MANIFEST_NAME,
    });
    let lock_path = state.join(format!("locks/{job_id}.lock"));
    std::fs::write(&lock_path, lock.to_string()).unwrap();
    // Stale by any clock, for the takeover case.
    let old = std::fs::File::options().write(true).open(&lock_path).unwrap();
    old.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)).unwrap();
    std::fs::write(env.output.join(format!("{vm}.json")), serde_json::json!({ "job_id": job_id }).to_string()).unwrap();
    std::fs::write(env.output.join(format!("{vm}.qcow2")), b"published by the earlier owner").unwrap();
}

/// Restart recovery (same host) and takeover (another host's stale lock) both find such a
/// job and record it as done, once, without converting it again or touching its results.
#[test]
fn a_job_published_before_its_owner_died_is_recorded_not_redone() {
    let this_host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();
    for (vm, lock_host) in [("recovered-vm", this_host.as_str()), ("taken-over-vm", "another-host")] {
        let env = Env::new();
        let job_id = "20260101T000000Z-00000000deadbeef";
        published_but_unrecorded(&env, vm, job_id, lock_host);
        let daemon = Daemon::start(&env, &[("LEASE_SECONDS", "3")], &[]);
        let job = wait_status_job(&daemon, &env, "the job's record", |j| {
            j["job_id"] == job_id && !j["finished_at"].is_null()
        });
        assert_eq!(job["state"], "done", "{vm}: {job:#}");
        let qcow2 = std::fs::read(env.output.join(format!("{vm}.qcow2"))).unwrap();
        assert_eq!(qcow2, b"published by the earlier owner", "{vm}: the result was replaced");
        let visible = visible_entries(&env.output);
        assert!(!visible.iter().any(|n| n.ends_with(".error")), "{vm}: {visible:?}");
        assert!(!env.output.join(".hyper2kvm-superseded").exists(), "{vm}: results were moved aside");
        assert_eq!(env.status()["jobs"].as_array().map(Vec::len), Some(1), "{vm}: one job, recorded once");
        assert!(visible_entries(&env.queue).is_empty(), "{vm}: the manifest was requeued");
    }
}

/// SIGHUP stops the daemon the way SIGTERM does (docs/OPERATIONS.md): it does not die with
/// the signal's default action (status 129) leaving its claim and staging behind; past
/// DRAIN_SECONDS the running job goes back to the queue.
#[test]
fn sighup_drains_like_sigterm_instead_of_killing() {
    let env = Env::new();
    let source = slow_disk(&env.exports);
    let daemon = Daemon::start(&env, &[SLOW, ("DRAIN_SECONDS", "0.5")], &[]);
    hypersdk_submit(&daemon, &env, &manifest("hup-vm", vec![disk("disk-0", "raw", &source)]));
    wait_until_converting(&daemon, &env);
    unsafe {
        libc::kill(daemon.pid(), libc::SIGHUP);
    }
    let began = std::time::Instant::now();
    let status = loop {
        match daemon.exited() {
            Some(status) => break status,
            None if began.elapsed() > Duration::from_secs(15) => daemon.fail("the daemon did not exit after SIGHUP"),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if status.code() != Some(0) {
        daemon.fail(&format!("SIGHUP must drain and exit 0, not {status}"));
    }
    assert_eq!(lock_count(&env), 0, "no claim is left behind");
    let requeued: Vec<String> =
        visible_entries(&env.queue).into_iter().filter(|n| n.starts_with("artifact-manifest.requeued-")).collect();
    assert_eq!(requeued.len(), 1, "the released manifest is back in the queue");
    let staging: Vec<String> = std::fs::read_dir(env.output.join(".hyper2kvm-tmp"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "no staging directory is left: {staging:?}");
    assert_no_partial_results(&daemon, &env, "hup-vm");
}

/// The soft limit of open files (often 1024) is raised to the hard one at start: a job holds a
/// descriptor per VMDK extent, and one with a thousand made a concurrent job fail with EMFILE.
#[test]
fn the_open_files_soft_limit_is_raised_to_the_hard_limit() {
    let env = Env::new();
    let wrapper = ["sh", "-c", "ulimit -Sn 256 && exec \"$@\"", "sh"];
    let daemon = Daemon::start_wrapped(&env, "daemon", &wrapper, &[], &[]);
    let limits = || {
        let text = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap_or_default();
        let line = text.lines().find(|l| l.starts_with("Max open files")).map(str::to_owned).unwrap_or_default();
        let mut values = line.split_whitespace().skip(3).map(|v| v.parse::<u64>().ok());
        (values.next().flatten(), values.next().flatten())
    };
    let (_, hard) = limits();
    match hard {
        Some(hard) if hard > 256 => {}
        other => daemon.fail(&format!("setup: the hard limit of open files must be above 256 here, it is {other:?}")),
    }
    wait_for(&daemon, Duration::from_secs(10), "the soft limit to equal the hard one, logged", || {
        let (soft, hard) = limits();
        soft.is_some() && soft == hard && daemon.log().contains("raised the open files limit to the hard limit")
    });
}

/// Runs the daemon as an unprivileged user when the test runs as root (CI does): root lists
/// a directory whatever its mode, so only then can WATCH_DIR be made unreadable. Returns the
/// wrapper for [`Daemon::start_wrapped`], after giving the test's tree to that user.
fn unprivileged(env: &Env) -> Vec<&'static str> {
    if unsafe { libc::geteuid() } != 0 {
        return Vec::new();
    }
    let chown = std::process::Command::new("chown").args(["-R", "65534:65534"]).arg(&env.root).status();
    assert!(chown.as_ref().is_ok_and(|s| s.success()), "setup: chown of the test tree to nobody failed: {chown:?}");
    vec!["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
}

/// A scan error the loop cannot go on from (WATCH_DIR made unreadable: EACCES is not a
/// transient NFS error) stops the daemon through the same path as SIGTERM: the cause is
/// logged first, the running job is cancelled and its claim released back to the queue, and
/// the daemon exits within a bound. Before, the loop returned at once: the job ran on to the
/// end with its heartbeat gone, and the cause was printed only after it had finished.
#[test]
fn a_fatal_scan_error_logs_its_cause_first_and_releases_running_jobs() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let wrapper = unprivileged(&env);
    let source = slow_disk(&env.exports);
    let daemon = Daemon::start_wrapped(&env, "daemon", &wrapper, &[SLOW], &[]);
    hypersdk_submit(&daemon, &env, &manifest("fatal-vm", vec![disk("disk-0", "raw", &source)]));
    wait_until_converting(&daemon, &env);
    // Writable and searchable still (a release links the manifest back), but not listable.
    std::fs::set_permissions(&env.queue, std::fs::Permissions::from_mode(0o300)).unwrap();
    let began = std::time::Instant::now();
    let status = loop {
        match daemon.exited() {
            Some(status) => break status,
            None if began.elapsed() > Duration::from_secs(30) => {
                daemon.fail("the daemon did not stop after a fatal scan error")
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let took = began.elapsed();
    std::fs::set_permissions(&env.queue, std::fs::Permissions::from_mode(0o755)).unwrap();
    if status.success() {
        daemon.fail("a fatal scan error must end the daemon with a failure status");
    }
    assert!(took < Duration::from_secs(15), "stopping took {took:?}\n{}", daemon.log());
    let log = daemon.log();
    let position =
        |needle: &str| log.rfind(needle).unwrap_or_else(|| daemon.fail(&format!("the log has no {needle:?}")));
    let cause = log.find("cannot scan WATCH_DIR").unwrap_or_else(|| daemon.fail("the cause is not logged"));
    assert!(cause < position("the job goes back to the queue"), "the cause comes first:\n{log}");
    assert!(cause < position("stopped"), "the cause comes first:\n{log}");
    let requeued: Vec<String> =
        visible_entries(&env.queue).into_iter().filter(|n| n.starts_with("artifact-manifest.requeued-")).collect();
    assert_eq!(requeued.len(), 1, "the running job's manifest is back in the queue");
    assert_eq!(lock_count(&env), 0, "no claim is left behind");
    assert_no_partial_results(&daemon, &env, "fatal-vm");
}

/// A job that ignores cancellation (a read stuck in the kernel on a hung NFS server) does not
/// hold the stop past DRAIN_SECONDS and the bounds after it: the daemon releases its claim
/// itself and returns. Driven in-process, with the job replaced by one that blocks until the
/// test ends. Before, the drain waited for it for ever.
#[test]
fn a_job_that_ignores_cancellation_does_not_hold_the_drain() {
    use hyper2kvm::config::{Config, Overrides};
    use hyper2kvm::convert::JobControl;
    use hyper2kvm::daemon;
    use hyper2kvm::internals::job::{JobContext, JobEnd};
    use hyper2kvm::internals::manifest::ManifestFile;
    use hyper2kvm::internals::queue::Claim;
    use std::sync::{mpsc, Arc, Mutex};

    let env = Env::new();
    let mut vars: std::collections::BTreeMap<String, String> = base_env(&env).into_iter().collect();
    vars.insert("DRAIN_SECONDS".into(), "0.5".into());
    let flags = vec![
        ("WATCH_DIR".to_owned(), env.queue.to_string_lossy().into_owned()),
        ("OUTPUT_DIR".to_owned(), env.output.to_string_lossy().into_owned()),
    ];
    let config = Config::load(&Overrides { config_dir: Some(env.etc.clone()), flags }, &vars).unwrap();
    let (started_tx, started_rx) = mpsc::channel::<bool>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (started_tx, release_rx) = (Mutex::new(started_tx), Arc::new(Mutex::new(release_rx)));
    let work: daemon::JobWork = Arc::new(move |_: &JobContext, _: Claim, _: &ManifestFile, control: &JobControl| {
        let _ = started_tx.lock().unwrap().send(true);
        // Blocks whatever the control says, until the test is over.
        let _ = release_rx.lock().unwrap().recv();
        let _ = started_tx.lock().unwrap().send(control.check().is_err());
        JobEnd::Abandoned
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let served = runtime.block_on(daemon::run_with(config, async { drop(stop_rx.await) }, work));
        runtime.shutdown_timeout(daemon::RUNTIME_GRACE);
        served.map_err(|e| e.to_string())
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !env.queue.is_dir() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    write_like_hypersdk(&env.queue.join(MANIFEST_NAME), manifest("stuck-vm", vec![]).to_string().as_bytes());
    assert_eq!(started_rx.recv_timeout(Duration::from_secs(30)), Ok(true), "setup: the job was not started");
    assert_eq!(lock_count(&env), 1, "setup: the job is claimed");

    stop_tx.send(()).unwrap();
    let began = std::time::Instant::now();
    let bound = Duration::from_millis(500) + daemon::CANCEL_GRACE + daemon::RELEASE_LIMIT + daemon::RUNTIME_GRACE;
    while !running.is_finished() && began.elapsed() < bound + Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = began.elapsed();
    let finished = running.is_finished();
    release_tx.send(()).unwrap();
    assert!(finished, "the daemon was still stopping {took:?} after it was asked to (bound {bound:?})");
    assert_eq!(running.join().unwrap(), Ok(()));
    assert!(took < bound, "stopping took {took:?}, beyond {bound:?}");
    let requeued: Vec<String> =
        visible_entries(&env.queue).into_iter().filter(|n| n.starts_with("artifact-manifest.requeued-")).collect();
    assert_eq!(requeued.len(), 1, "the stuck job's claim is released: {:?}", visible_entries(&env.queue));
    assert_eq!(lock_count(&env), 0, "no lock is left behind");
    assert_eq!(started_rx.recv_timeout(Duration::from_secs(5)), Ok(true), "the stuck job had been cancelled");
}
