//! `hyper2kvm events JOB_ID` as an operator on another host sharing the queue uses it: a daemon
//! job's progress events followed live from the queue's state directory until the job ends,
//! then read back from its archived log, filtered by phase; an unknown job is an error.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::fixtures::slow_disk;
use common::*;
use serde_json::Value;

fn events_command(env: &Env, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("--config-dir")
        .arg(&env.etc)
        .arg("events")
        .args(args)
        .arg("--watch-dir")
        .arg(&env.queue)
        .arg("--output-dir")
        .arg(&env.output)
        .stdin(Stdio::null());
    cmd
}

/// The id of the one job claimed now: its lock's name.
fn claimed_job(env: &Env) -> Option<String> {
    let entry = std::fs::read_dir(env.queue.join(".hyper2kvm/locks")).ok()?.flatten().next()?;
    entry.file_name().to_str()?.strip_suffix(".lock").map(str::to_owned)
}

#[test]
fn events_follow_a_daemon_job_while_it_runs_and_stop_at_its_end() {
    let env = Env::new();
    let source = slow_disk(&env.exports);
    let daemon = Daemon::start(&env, &[SLOW], &[]);
    hypersdk_submit(&daemon, &env, &manifest("followed-vm", vec![disk("disk-0", "raw", &source)]));
    let mut job_id = None;
    wait_for(&daemon, Duration::from_secs(60), "the job to be claimed", || {
        job_id = claimed_job(&env);
        job_id.is_some()
    });
    let job_id = job_id.unwrap();

    let mut follower = events_command(&env, &[&job_id, "--follow", "--json", "--poll", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Each event with whether the job's result existed when it arrived.
    let qcow2 = env.output.join("followed-vm.qcow2");
    let mut seen: Vec<(Value, bool)> = Vec::new();
    let began = Instant::now();
    loop {
        match received.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                seen.push((event, qcow2.exists()));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if began.elapsed() > RESULT_TIMEOUT {
            let _ = follower.kill();
            daemon.fail(&format!("events --follow did not end with the job: {seen:?}"));
        }
    }
    let status = follower.wait().unwrap();
    assert!(status.success(), "events --follow exited {status}");
    assert!(qcow2.exists(), "events --follow ended before the job: {seen:?}");

    let live: Vec<&Value> = seen.iter().filter(|(_, after)| !after).map(|(e, _)| e).collect();
    assert!(
        live.iter()
            .any(|e| e["phase"] == "convert" && e["progress_percent"].as_f64().is_some_and(|p| p > 0.0 && p < 100.0)),
        "no conversion progress was seen while the job ran: {seen:?}"
    );
    assert_eq!(seen.last().map(|(e, _)| e["phase"].clone()), Some("done".into()), "{seen:?}");
    assert!(seen.iter().all(|(e, _)| e["job_id"] == job_id.as_str()), "{seen:?}");

    // Afterwards, from the archived log beside the record in done/, one phase only.
    let out = events_command(&env, &[&job_id, "--json", "--phase", "convert"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let phases: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["phase"].clone())
        .collect();
    assert!(phases.len() >= 2, "{phases:?}");
    assert!(phases.iter().all(|p| p == "convert"), "{phases:?}");
    let human = events_command(&env, &[&job_id]).output().unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).lines().any(|l| l.contains("  done ")), "{human:?}");

    // A failed job ends with a `failed` event after its failing stage's.
    let missing = env.exports.join("missing.raw");
    convert_err(&daemon, &env, &manifest("failing-vm", vec![disk("disk-0", "raw", &missing)]), "failing-vm");
    let status = env.status();
    let failed = status["jobs"].as_array().unwrap().iter().find(|j| j["vm_name"] == "failing-vm").cloned();
    let failed_id = failed.as_ref().and_then(|j| j["job_id"].as_str()).unwrap_or_else(|| panic!("{status:#}"));
    let out = events_command(&env, &[failed_id, "--json"]).output().unwrap();
    let phases: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["phase"].clone())
        .collect();
    assert_eq!(
        phases.iter().rev().take(2).collect::<Vec<_>>(),
        [&Value::from("failed"), &Value::from("source")],
        "{phases:?}"
    );

    let unknown = events_command(&env, &["20260101T000000Z-0000000000000000"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("no job 20260101T000000Z-0000000000000000 was found"), "{stderr}");
}
