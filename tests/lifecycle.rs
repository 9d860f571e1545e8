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
