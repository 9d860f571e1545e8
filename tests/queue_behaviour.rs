//! The queue protocol as a client sees it: stale results, `submit`, names that are never
//! taken, graceful stop, and `status --json`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const JUNK_QCOW2: &[u8] = b"JUNK: not a qcow2, left by an earlier job\n";
const JUNK_ERROR: &[u8] = b"Old failure from an earlier job.\njob: old\nstage: old\n";

/// Files under `dir` (any depth) whose content is exactly `content`.
fn find_content(dir: &Path, content: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| fs::metadata(p).map(|m| m.len() == content.len() as u64).unwrap_or(false))
        .filter(|p| fs::read(p).map(|c| c == content).unwrap_or(false))
        .collect()
}

fn assert_moved_aside(s: &Session, content: &[u8], what: &str) {
    let in_output = find_content(&s.env.output, content);
    if in_output.is_empty() {
        let elsewhere = find_content(&s.env.root, content);
        s.daemon.fail(&format!(
            "the stale {what} was not kept under OUTPUT_DIR (moved aside, never destroyed); found elsewhere: {elsewhere:?}\noutput tree: {:?}",
            list_tree(&s.env.output)
        ));
    }
    for p in &in_output {
        let rel = p.strip_prefix(&s.env.output).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        if !first.starts_with('.') {
            s.daemon.fail(&format!("the stale {what} was moved to {}, a visible name in OUTPUT_DIR", p.display()));
        }
    }
}

/// An earlier job's V.qcow2 and V.error are moved aside when a new job for V is claimed, so
/// they cannot answer the new job's poller, and are not destroyed.
#[test]
fn stale_results_are_moved_aside() {
    let env = Env::new();
    fs::create_dir_all(&env.output).unwrap();
    fs::write(env.output.join("stale-vm.qcow2"), JUNK_QCOW2).unwrap();
    fs::write(env.output.join("stale-vm.error"), JUNK_ERROR).unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    let m = s.good_manifest("stale-vm");
    hypersdk_submit(&s.daemon, &s.env, &m);
    wait_for(&s.daemon, RESULT_TIMEOUT, "the manifest to be claimed", || !s.env.queue.join(MANIFEST_NAME).exists());
    // From the claim on, the old files must go; wait for the real result.
    let qcow2 = s.env.output.join("stale-vm.qcow2");
    wait_for(&s.daemon, RESULT_TIMEOUT, "the new stale-vm.qcow2", || {
        fs::read(&qcow2).map(|c| c.starts_with(b"QFI\xfb")).unwrap_or(false)
    });
    let outcome = hypersdk_wait(&s.daemon, &s.env, "stale-vm", &[]);
    let (job, names) = verify_success(&s.daemon, &s.env, &m, &outcome);
    s.note_job(&job);
    s.expected.extend(names);
    s.assert_output();
    assert_moved_aside(&s, JUNK_QCOW2, "stale-vm.qcow2");
    assert_moved_aside(&s, JUNK_ERROR, "stale-vm.error");
    s.daemon.stop();
    s.assert_output();
}

/// The dangerous case: an old V.qcow2 is present and the new job for V fails. HyperSDK checks
/// V.qcow2 first, so the old one must be gone by the time V.error appears.
#[test]
fn stale_qcow2_cannot_answer_a_failing_job() {
    let env = Env::new();
    fs::create_dir_all(&env.output).unwrap();
    fs::write(env.output.join("doomed.qcow2"), JUNK_QCOW2).unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    let m = manifest("doomed", vec![disk("disk-0", "vmdk", &s.env.exports.join("missing.vmdk"))]);
    hypersdk_submit(&s.daemon, &s.env, &m);
    let error = s.env.output.join("doomed.error");
    wait_for(&s.daemon, RESULT_TIMEOUT, "doomed.error", || error.exists());
    if s.env.output.join("doomed.qcow2").exists() {
        s.daemon
            .fail("doomed.error appeared while the stale doomed.qcow2 is still there: HyperSDK would report success");
    }
    let text = fs::read_to_string(&error).unwrap();
    check_error_file(&s.daemon, "doomed", &text);
    assert!(text.lines().next().unwrap().contains("does not exist"), "{text}");
    assert_moved_aside(&s, JUNK_QCOW2, "doomed.qcow2");
    s.expected.push("doomed.error".into());
    s.finish();
}

/// Result names of two VMs can coincide: VM `web`'s data disk `disk-1` and VM `web-disk-1`'s
/// boot disk are both `web-disk-1.qcow2`. A name another VM's report lists is never reused:
/// the job is refused, the other VM's result left where it is — except where the name is the
/// refused job's own `V.qcow2`, which HyperSDK would take for its success: that one is moved
/// aside (kept), and the `.error` says where it went.
#[test]
fn a_result_name_of_another_vm_is_never_reused() {
    let mut s = Session::start(&[], &[]);
    let dir = s.env.exports.join("names");
    fs::create_dir_all(&dir).unwrap();
    let boot = fixtures::small_raw(&dir.join("boot.raw"));
    let data = fixtures::data_raw(&dir.join("data.raw"));

    s.convert_ok(&manifest("web-disk-1", vec![disk("disk-0", "raw", &boot)]));
    let published = fs::read(s.env.output.join("web-disk-1.qcow2")).unwrap();
    let web = manifest("web", vec![disk("disk-0", "raw", &boot), data_disk("disk-1", "raw", &data, 1)]);
    let first = s.convert_err(&web, "web");
    assert_eq!(
        first,
        "Result file web-disk-1.qcow2 of VM web is a result of VM web-disk-1 (web-disk-1.json lists it); rename one of the two VMs, or the disk, so that their result files differ, and submit the manifest again."
    );
    assert_eq!(fs::read(s.env.output.join("web-disk-1.qcow2")).unwrap(), published, "web-disk-1's result is untouched");

    s.convert_ok(&manifest("db", vec![disk("disk-0", "raw", &boot), data_disk("disk-1", "raw", &data, 1)]));
    let db_data = fs::read(s.env.output.join("db-disk-1.qcow2")).unwrap();
    hypersdk_submit(&s.daemon, &s.env, &manifest("db-disk-1", vec![disk("disk-0", "raw", &boot)]));
    let error = s.env.output.join("db-disk-1.error");
    wait_for(&s.daemon, RESULT_TIMEOUT, "db-disk-1.error", || error.exists());
    if s.env.output.join("db-disk-1.qcow2").exists() {
        s.daemon.fail("db-disk-1.error appeared beside db's data disk db-disk-1.qcow2: HyperSDK would report success");
    }
    let text = fs::read_to_string(&error).unwrap();
    check_error_file(&s.daemon, "db-disk-1", &text);
    assert!(
        text.starts_with("Result file db-disk-1.qcow2 of VM db-disk-1 is a result of VM db (db.json lists it);"),
        "{text}"
    );
    let kept = files_under(&s.env.output.join(".hyper2kvm-superseded"));
    let moved: Vec<_> = kept.iter().filter(|p| p.ends_with("db-disk-1.qcow2")).collect();
    assert_eq!(moved.len(), 1, "{kept:?}");
    assert_eq!(fs::read(moved[0]).unwrap(), db_data, "db's data disk is kept aside");
    assert!(text.contains(&moved[0].display().to_string()), "the .error says where it went:\n{text}");
    s.expected.retain(|n| n != "db-disk-1.qcow2");
    s.expected.push("db-disk-1.error".into());
    s.finish();
}

/// The same collision between two jobs running at once, before either has published its
/// report: the younger job (by job id) is refused, the older one converts.
#[test]
fn a_result_name_of_a_vm_being_converted_is_not_taken_either() {
    let env = Env::new();
    let slow = fixtures::slow_disk(&env.exports);
    let small = fixtures::small_raw(&env.exports.join("live/boot.raw"));
    let mut s = Session::start_in(env, &[SLOW], &[]);
    let older = manifest("live-disk-1", vec![disk("disk-0", "raw", &slow)]);
    hypersdk_submit(&s.daemon, &s.env, &older);
    wait_for(&s.daemon, RESULT_TIMEOUT, "live-disk-1 to be claimed", || lock_count(&s.env) == 1);
    // Job ids start with the claim's second: the next job's id is then surely the younger.
    sleep(Duration::from_millis(1100));
    let younger = manifest("live", vec![disk("disk-0", "raw", &small), data_disk("disk-1", "raw", &small, 1)]);
    let first = s.convert_err(&younger, "live");
    assert_eq!(
        first,
        "Result file live-disk-1.qcow2 of VM live will be a result of VM live-disk-1, which another job is converting now; rename one of the two VMs, or the disk, so that their result files differ, and submit the manifest again."
    );
    let outcome = hypersdk_wait(&s.daemon, &s.env, "live-disk-1", &[]);
    let (job, names) = verify_success(&s.daemon, &s.env, &older, &outcome);
    s.note_job(&job);
    s.expected.extend(names);
    s.finish();
}

/// `hyper2kvm submit MANIFEST --watch-dir=DIR` drops a manifest atomically; the daemon takes it.
#[test]
fn submit_command_drops_a_manifest() {
    let mut s = Session::start(&[], &[]);
    let m = s.good_manifest("submitted-vm");
    let path = s.env.root.join("submitted.json");
    fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    wait_for(&s.daemon, Duration::from_secs(30), "the watch directory", || s.env.queue.is_dir());
    let out = s.env.cli(&["submit", path.to_str().unwrap(), &format!("--watch-dir={}", s.env.queue.display())]);
    if !out.status.success() {
        s.daemon.fail(&format!(
            "submit exited {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let outcome = hypersdk_wait(&s.daemon, &s.env, "submitted-vm", &[]);
    let (job, names) = verify_success(&s.daemon, &s.env, &m, &outcome);
    s.note_job(&job);
    s.expected.extend(names);
    // The submitted manifest was claimed: nothing visible left in the queue.
    let left = visible_entries(&s.env.queue);
    if !left.is_empty() {
        s.daemon.fail(&format!("the watch dir still holds {left:?} after the job"));
    }
    assert!(path.exists(), "submit must not consume the caller's file");
    s.finish();
}

/// `.x.json`, `x.tmp`, `x.part`, `x.lock` are never taken, even when they hold valid manifests.
#[test]
fn ignored_names_are_never_taken() {
    let mut s = Session::start(&[], &[]);
    wait_for(&s.daemon, Duration::from_secs(30), "the watch directory", || s.env.queue.is_dir());
    let names = [".x.json", "x.tmp", "x.part", "x.lock"];
    let mut contents = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let m = s.good_manifest(&format!("ignored-{i}"));
        let bytes = serde_json::to_vec_pretty(&m).unwrap();
        fs::write(s.env.queue.join(name), &bytes).unwrap();
        contents.push(bytes);
    }
    // Many poll intervals, past settle time and the invalid-manifest grace.
    sleep(Duration::from_secs(3));
    // And a real job afterwards: the daemon has certainly scanned the directory.
    let good = s.good_manifest("good-vm");
    s.convert_ok(&good);
    for (name, bytes) in names.iter().zip(&contents) {
        match fs::read(s.env.queue.join(name)) {
            Ok(c) if &c == bytes => {}
            Ok(_) => s.daemon.fail(&format!("{name} in the watch dir was modified")),
            Err(e) => s.daemon.fail(&format!("{name} was taken from the watch dir ({e})")),
        }
    }
    let stray: Vec<String> = list_tree(&s.env.output).into_iter().filter(|p| p.contains("ignored-")).collect();
    if !stray.is_empty() {
        s.daemon.fail(&format!("results for ignored manifests: {stray:?}"));
    }
    s.finish();
}

/// SIGTERM while idle: exit status 0, promptly.
#[test]
fn sigterm_while_idle_exits_zero_quickly() {
    let env = Env::new();
    let mut d = Daemon::start(&env, &[], &[]);
    wait_for(&d, Duration::from_secs(30), "the daemon to create its directories", || {
        env.queue.is_dir() && env.output.is_dir()
    });
    sleep(Duration::from_millis(800));
    d.assert_running();
    let (status, took, killed) = d.terminate(Duration::from_secs(10));
    if killed {
        d.fail("no exit within 10 s of SIGTERM");
    }
    if status.code() != Some(0) {
        d.fail(&format!("exit status {status} after SIGTERM while idle; expected 0"));
    }
    if took > Duration::from_secs(3) {
        d.fail(&format!("idle daemon took {took:?} to exit after SIGTERM"));
    }
}

fn job_by_name<'a>(status: &'a Value, vm: &str) -> Option<&'a Value> {
    status["jobs"].as_array()?.iter().find(|j| j["vm_name"] == vm)
}

/// `status --json` lists finished jobs with job id, vm name, host, instance, state and times,
/// while the daemon runs and after it stopped (it reads from disk).
#[test]
fn status_lists_done_and_failed_jobs() {
    let mut s = Session::start(&[], &["--instance=t1"]);
    let good = s.good_manifest("good-vm");
    let good_job = s.convert_ok(&good);
    let bad = manifest("bad-vm", vec![disk("disk-0", "vmdk", &s.env.exports.join("missing.vmdk"))]);
    s.convert_err(&bad, "bad-vm");
    let text = fs::read_to_string(s.env.output.join("bad-vm.error")).unwrap();
    let bad_job = text.lines().find_map(|l| l.trim_start().strip_prefix("job:")).map(|j| j.trim().to_owned()).unwrap();
    let host = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();

    let check = |s: &Session, status: &Value, when: &str| {
        for key in ["jobs", "queue", "claims"] {
            if !status[key].is_array() {
                s.daemon.fail(&format!("status --json ({when}) has no {key:?} array:\n{status:#}"));
            }
        }
        for (vm, job_id, state) in [("good-vm", &good_job, "done"), ("bad-vm", &bad_job, "failed")] {
            let Some(job) = job_by_name(status, vm) else {
                s.daemon.fail(&format!("status --json ({when}) does not list {vm}:\n{status:#}"));
            };
            let problems: Vec<String> = [
                (job["job_id"] == job_id.as_str(), format!("job_id should be {job_id}")),
                (job["state"] == state, format!("state should be {state}")),
                (job["instance"] == "t1", "instance should be \"t1\"".to_string()),
                (job["host"] == host.as_str(), format!("host should be {host:?}")),
                (job["started_at"].as_str().is_some_and(|t| !t.is_empty()), "started_at missing".to_string()),
                (job["finished_at"].as_str().is_some_and(|t| !t.is_empty()), "finished_at missing".to_string()),
            ]
            .into_iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, p)| p)
            .collect();
            if !problems.is_empty() {
                s.daemon.fail(&format!("status --json ({when}) entry for {vm}: {problems:?}\n{job:#}"));
            }
        }
        let claims = status["claims"].as_array().map(|c| c.len()).unwrap_or(0);
        let queue = status["queue"].as_array().map(|c| c.len()).unwrap_or(0);
        if claims != 0 || queue != 0 {
            s.daemon.fail(&format!("status --json ({when}): queue/claims should be empty when idle:\n{status:#}"));
        }
    };

    // The done record may be written just after V.qcow2 is published.
    let start = Instant::now();
    let status = loop {
        let st = s.env.status();
        let done = job_by_name(&st, "good-vm").is_some_and(|j| j["state"] == "done");
        if done || start.elapsed() > Duration::from_secs(10) {
            break st;
        }
        sleep(Duration::from_millis(200));
    };
    check(&s, &status, "daemon running");
    s.daemon.stop();
    let status = s.env.status();
    check(&s, &status, "daemon stopped");
    s.assert_output();
}

/// With inotify on, a manifest is taken long before the next poll: here polling is once an
/// hour, so only the wake-up (and the settle re-check it schedules) can bring the job in.
#[test]
fn inotify_wakes_the_daemon_between_polls() {
    let mut s = Session::start(&[("USE_INOTIFY", "true"), ("POLL_INTERVAL", "3600")], &[]);
    for vm in ["woken-1", "woken-2"] {
        let m = s.good_manifest(vm);
        s.convert_ok(&m);
    }
    s.finish();
}
