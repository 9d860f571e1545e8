//! `hyper2kvm run JOB.json` (Worker Job Protocol v1, docs/WORKER.md) as a Kubernetes Job runs
//! it: each operation, an invalid spec, the unsupported `offline_fix`, a time limit, retries,
//! SIGTERM; the state file, the result file, the events and the exit status of each.
//! And `hyper2kvm capabilities` as a readiness probe: its exit status.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{assert_same_contents, slow_disk, small_raw};
use common::*;
use serde_json::{json, Value};

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).args(args).stdin(Stdio::null());
    cmd
}

/// Writes `spec` to `<root>/job.json` and runs `hyper2kvm run` on it to its end.
fn run(env: &Env, spec: &Value) -> Output {
    let path = write_spec(env, spec);
    command(&["run", path.to_str().unwrap()]).output().expect("run hyper2kvm run")
}

fn write_spec(env: &Env, spec: &Value) -> PathBuf {
    let path = env.root.join("job.json");
    fs::write(&path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    path
}

fn spawn(env: &Env, spec: &Value) -> Child {
    let path = write_spec(env, spec);
    command(&["run", path.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn spec(job_id: &str, operation: &str, image: &Path, out: &Path) -> Value {
    json!({
        "version": "1",
        "job_id": job_id,
        "operation": operation,
        "image": {"path": image, "format": "raw"},
        "artifacts": {"output_path": out}
    })
}

fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn states(out: &Path, job_id: &str) -> Vec<String> {
    let state = read_json(&out.join(format!("{job_id}.state.json")));
    state["history"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap().to_owned()).collect()
}

fn events(out: &Path, job_id: &str) -> Vec<Value> {
    let text = fs::read_to_string(out.join(format!("{job_id}.events.jsonl"))).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(output.status.code(), Some(code), "stdout: {}\nstderr: {}", text(&output.stdout), text(&output.stderr));
}

#[test]
fn run_inspect_records_the_inspection_and_every_state() {
    let env = Env::new();
    let raw = small_raw(&env.exports.join("disk.raw"));
    let out = env.root.join("out/inspect");
    let output = run(&env, &spec("inspect-1", "inspect", &raw, &out));
    assert_exit(&output, 0);
    let result = read_json(&out.join("inspect-1.result.json"));
    assert_eq!(result["state"], "completed");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["inspection"]["format"], "raw", "{result}");
    assert_eq!(result["inspection"]["virtual_size"], 64 << 20, "{result}");
    // stdout is the result, one line.
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["job_id"], "inspect-1");
    assert_eq!(states(&out, "inspect-1"), ["created", "validated", "running", "completed"]);
    let events = events(&out, "inspect-1");
    let phases: Vec<&str> = events.iter().map(|e| e["phase"].as_str().unwrap()).collect();
    assert_eq!(phases.first(), Some(&"validate"), "{phases:?}");
    assert_eq!(phases.last(), Some(&"completed"), "{phases:?}");
    for event in &events {
        for key in ["job_id", "timestamp", "phase", "progress_percent", "message"] {
            assert!(event.get(key).is_some(), "{key} in {event}");
        }
        assert_eq!(event["job_id"], "inspect-1");
    }
}

#[test]
fn run_convert_writes_the_qcow2_and_a_second_run_does_nothing() {
    let env = Env::new();
    let raw = small_raw(&env.exports.join("web01.raw"));
    let out = env.root.join("out");
    let mut job = spec("convert-1", "convert", &raw, &out);
    job["parameters"] = json!({"output_format": "qcow2", "compress": true, "compress_level": 1});
    job["execution_policy"] = json!({"timeout_seconds": 600, "retries": 1});
    job["priority"] = json!(5);
    let output = run(&env, &job);
    assert_exit(&output, 0);
    assert!(text(&output.stderr).contains("unknown key priority is ignored"), "{}", text(&output.stderr));
    let qcow2 = out.join("web01.qcow2");
    assert_same_contents(&qcow2, "qcow2", &raw, "raw");
    let result = read_json(&out.join("convert-1.result.json"));
    assert_eq!(result["outputs"][0]["path"], qcow2.to_str().unwrap(), "{result}");
    assert_eq!(result["attempts"], 1);
    assert_eq!(result["warnings"][0], "unknown key priority is ignored");
    assert_eq!(states(&out, "convert-1"), ["created", "validated", "running", "completed"]);
    let phases: Vec<String> =
        events(&out, "convert-1").iter().map(|e| e["phase"].as_str().unwrap().to_owned()).collect();
    assert!(phases.contains(&"convert".to_owned()), "{phases:?}");
    assert!(!visible_entries(&out).iter().any(|n| n.ends_with(".tmp")), "{:?}", list_tree(&out));

    // The same spec again (a pod restarted after completing): nothing is redone.
    let before = fs::metadata(&qcow2).unwrap().modified().unwrap();
    let again = run(&env, &job);
    assert_exit(&again, 0);
    assert_eq!(fs::metadata(&qcow2).unwrap().modified().unwrap(), before);
    assert_eq!(states(&out, "convert-1").len(), 4, "the history is unchanged");
}

#[test]
fn an_invalid_spec_exits_2_naming_each_problem() {
    let env = Env::new();
    let out = env.root.join("out");
    let mut job = spec("bad-1", "convert", Path::new("relative.vmdk"), &out);
    job["version"] = json!("2");
    let output = run(&env, &job);
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("version \"2\" is not supported"), "{stderr}");
    assert!(stderr.contains("image.path \"relative.vmdk\" must be an absolute path"), "{stderr}");
    // Its job id and output path were readable: the failure is recorded there too.
    assert_eq!(states(&out, "bad-1"), ["created", "failed"]);
    assert_eq!(read_json(&out.join("bad-1.result.json"))["exit_code"], 2);

    fs::write(env.root.join("job.json"), b"{ not json").unwrap();
    let output = command(&["run", env.root.join("job.json").to_str().unwrap()]).output().unwrap();
    assert_exit(&output, 2);
    assert!(text(&output.stderr).contains("it is not JSON"), "{}", text(&output.stderr));

    let output = command(&["run", env.root.join("missing.json").to_str().unwrap()]).output().unwrap();
    assert_exit(&output, 2);
    assert!(text(&output.stderr).contains("cannot read the job spec"), "{}", text(&output.stderr));
}

#[test]
fn offline_fix_is_refused_with_its_own_exit_status() {
    let env = Env::new();
    let raw = small_raw(&env.exports.join("disk.raw"));
    let out = env.root.join("out");
    let output = run(&env, &spec("fix-1", "offline_fix", &raw, &out));
    assert_exit(&output, 3);
    assert!(text(&output.stderr).contains("offline_fix operation is not supported"), "{}", text(&output.stderr));
    assert_eq!(states(&out, "fix-1"), ["created", "failed"]);
}

#[test]
fn an_attempt_past_the_time_limit_exits_124_and_leaves_nothing() {
    let env = Env::new();
    let source = slow_disk(&env.exports);
    let out = env.root.join("out");
    let mut job = spec("slow-1", "convert", &source, &out);
    job["parameters"] = json!({"compress": true});
    job["execution_policy"] = json!({"timeout_seconds": 0.5});
    let began = Instant::now();
    let output = run(&env, &job);
    assert_exit(&output, 124);
    assert!(began.elapsed() < Duration::from_secs(60), "{:?}", began.elapsed());
    assert!(text(&output.stderr).contains("ran past execution_policy.timeout_seconds"), "{}", text(&output.stderr));
    assert_eq!(states(&out, "slow-1"), ["created", "validated", "running", "failed"]);
    let names = visible_entries(&out);
    assert!(!out.join("disk-0.qcow2").exists(), "{names:?}");
    assert!(fs::read_dir(&out).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")));
}

#[test]
fn a_failed_attempt_is_retried_after_its_backoff() {
    let env = Env::new();
    let out = env.root.join("out");
    let image = env.exports.join("late.raw");
    let mut job = spec("retry-1", "convert", &image, &out);
    job["execution_policy"] = json!({"retries": 2, "retry_backoff_seconds": 3});
    let mut child = spawn(&env, &job);
    // The image appears only once the first attempt failed for want of it.
    let began = Instant::now();
    while !events(&out, "retry-1").iter().any(|e| e["phase"] == "retry") {
        assert!(began.elapsed() < Duration::from_secs(30), "no retry event: {:?}", events(&out, "retry-1"));
        assert!(child.try_wait().unwrap().is_none(), "run ended before retrying");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A follower of the run job, from its output path, until its state is terminal.
    let follower = command(&["events", "retry-1", "--follow", "--json", "--poll", "0.1", "--output-dir"])
        .arg(&out)
        .arg("--watch-dir")
        .arg(env.root.join("no-queue"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Written aside and renamed: the next attempt must not read a half-written image.
    let staged = small_raw(&env.root.join("staged.raw"));
    fs::rename(&staged, &image).unwrap();
    let status = child.wait().unwrap();
    let followed = follower.wait_with_output().unwrap();
    assert!(followed.status.success(), "{followed:?}");
    let phases: Vec<String> = text(&followed.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["phase"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(phases.iter().filter(|p| *p == "retry").count(), 1, "{phases:?}");
    assert_eq!(phases.last().map(String::as_str), Some("completed"), "{phases:?}");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_same_contents(&out.join("late.qcow2"), "qcow2", &image, "raw");
    assert_eq!(states(&out, "retry-1"), ["created", "validated", "running", "running", "completed"]);
    assert_eq!(read_json(&out.join("retry-1.result.json"))["attempts"], 2);

    // With every attempt failing, the job fails after them all.
    let mut job = spec("retry-2", "inspect", &env.exports.join("never.raw"), &out);
    job["execution_policy"] = json!({"retries": 1, "retry_backoff_seconds": 0});
    let output = run(&env, &job);
    assert_exit(&output, 1);
    assert!(text(&output.stderr).contains("(after 2 attempts)"), "{}", text(&output.stderr));
    assert_eq!(states(&out, "retry-2"), ["created", "validated", "running", "running", "failed"]);
}

#[test]
fn sigterm_cancels_the_job_and_removes_its_partial_output() {
    let env = Env::new();
    let source = slow_disk(&env.exports);
    let out = env.root.join("out");
    let mut job = spec("term-1", "convert", &source, &out);
    job["parameters"] = json!({"compress": true});
    let mut child = spawn(&env, &job);
    let began = Instant::now();
    while !events(&out, "term-1").iter().any(|e| e["phase"] == "convert") {
        assert!(began.elapsed() < Duration::from_secs(30), "the conversion did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert_eq!(states(&out, "term-1"), ["created", "validated", "running", "cancelled"]);
    let result = read_json(&out.join("term-1.result.json"));
    assert_eq!(result["state"], "cancelled");
    assert!(result["error"].as_str().unwrap().contains("SIGTERM"), "{result}");
    assert!(!out.join("disk-0.qcow2").exists());
    assert!(fs::read_dir(&out).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")));
}

/// `hyper2kvm capabilities --json-output` with these directories; (exit code, JSON, stderr).
fn capabilities(env: &Env, watch: &Path, output: &Path, extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec!["capabilities", "--json-output", "--watch-dir", watch.to_str().unwrap()];
    args.extend(["--output-dir", output.to_str().unwrap()]);
    args.extend(extra);
    let out = env.cli(&args);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}{}", text(&out.stdout), text(&out.stderr)));
    (out.status.code().unwrap_or(-1), json, text(&out.stderr))
}

#[test]
fn capabilities_fail_the_readiness_probe_without_a_writable_queue_or_space() {
    let env = Env::new();
    let (queue, output) = (env.root.join("queue"), env.root.join("output"));
    fs::create_dir_all(&queue).unwrap();
    fs::create_dir_all(&output).unwrap();

    let (code, json, stderr) = capabilities(&env, &queue, &output, &["--min-free-mib", "1"]);
    assert_eq!(code, 0, "{json}\n{stderr}");
    assert_eq!(json["ready"], true);
    assert!(["host", "container", "privileged_container"].contains(&json["execution_mode"].as_str().unwrap()));
    for key in ["kvm", "nbd", "loop_devices", "mount", "memory", "directories", "qemu_img"] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert!(json["directories"][2]["free_bytes"].as_u64().unwrap() > 0, "{json}");
    // Nothing is left behind by the write probes.
    assert!(fs::read_dir(&queue).unwrap().next().is_none());

    let missing = env.root.join("no-queue");
    let (code, json, stderr) = capabilities(&env, &missing, &output, &["--min-free-mib", "1"]);
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["ready"], false);
    assert!(
        stderr.contains(&format!("this worker is not ready: WATCH_DIR {} does not exist", missing.display())),
        "{stderr}"
    );

    // A directory nobody can create files in, root included.
    let (code, _, stderr) = capabilities(&env, Path::new("/proc"), &output, &["--min-free-mib", "1"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("WATCH_DIR /proc is not writable"), "{stderr}");

    let (code, json, stderr) = capabilities(&env, &queue, &output, &["--min-free-mib", "1000000000"]);
    assert_eq!(code, 1, "{json}");
    assert!(stderr.contains(&format!("OUTPUT_DIR {} has ", output.display())), "{stderr}");
    assert!(stderr.contains("MiB this worker needs"), "{stderr}");
}

#[test]
fn a_signal_during_the_backoff_cancels_the_job_at_once() {
    let env = Env::new();
    let out = env.root.join("out");
    let mut job = spec("wait-1", "inspect", &env.exports.join("never.raw"), &out);
    job["execution_policy"] = json!({"retries": 3, "retry_backoff_seconds": 300});
    let mut child = spawn(&env, &job);
    let began = Instant::now();
    while !events(&out, "wait-1").iter().any(|e| e["phase"] == "retry") {
        assert!(began.elapsed() < Duration::from_secs(30), "no retry event");
        std::thread::sleep(Duration::from_millis(20));
    }
    let signalled = Instant::now();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(signalled.elapsed() < Duration::from_secs(5), "{:?}", signalled.elapsed());
    assert_eq!(states(&out, "wait-1"), ["created", "validated", "running", "cancelled"]);
    assert_eq!(read_json(&out.join("wait-1.result.json"))["attempts"], 1);
}
