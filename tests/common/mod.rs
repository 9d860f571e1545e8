//! Shared harness for the integration tests: temp directories, the real daemon binary run as a
//! child process, a client that behaves exactly like HyperSDK, and checks of the results with
//! the real `qemu-img`.
#![allow(dead_code)]

pub mod fixtures;
pub mod guest;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The binary under test (`HYPER2KVM_TEST_BIN` overrides it, e.g. to test an installed build).
pub fn bin() -> PathBuf {
    std::env::var_os("HYPER2KVM_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hyper2kvm")))
}

/// How long the client waits for a result. Generous: the suite runs tests in parallel on
/// small machines.
pub const RESULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The file name HyperSDK always writes.
pub const MANIFEST_NAME: &str = "artifact-manifest.json";

/// One test's private directory tree.
///
/// ```text
/// <tmp>/etc        config dir (empty)
/// <tmp>/queue      WATCH_DIR   (created by the daemon)
/// <tmp>/output     OUTPUT_DIR  (created by the daemon)
/// <tmp>/exports    SOURCE_ROOTS
/// <tmp>/elsewhere  outside SOURCE_ROOTS
/// ```
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub etc: PathBuf,
    pub queue: PathBuf,
    pub output: PathBuf,
    pub exports: PathBuf,
    pub elsewhere: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new().prefix("h2k-it-").tempdir().expect("temp dir");
        // Canonical, so paths compare equal to what the daemon resolves.
        let root = tmp.path().canonicalize().unwrap();
        let env = Env {
            etc: root.join("etc"),
            queue: root.join("queue"),
            output: root.join("output"),
            exports: root.join("exports"),
            elsewhere: root.join("elsewhere"),
            root,
            tmp,
        };
        fs::create_dir_all(&env.etc).unwrap();
        fs::create_dir_all(&env.exports).unwrap();
        fs::create_dir_all(&env.elsewhere).unwrap();
        env
    }

    /// Runs `hyper2kvm --config-dir <etc> ARGS…` to completion (for `submit` and `status`).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SOURCE_ROOTS", &self.exports)
            .arg("--config-dir")
            .arg(&self.etc)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hyper2kvm")
    }

    /// `hyper2kvm status --json --watch-dir W --output-dir O`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli(&[
            "status",
            "--json",
            "--watch-dir",
            self.queue.to_str().unwrap(),
            "--output-dir",
            self.output.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "status --json failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("status --json printed no JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
        })
    }
}

/// The daemon as a child process. Dropping it always stops it (SIGTERM, then SIGKILL after
/// 10 s) and, when the test is failing, prints the daemon's log.
pub struct Daemon {
    child: RefCell<Option<Child>>,
    pub log_path: PathBuf,
    exit: Cell<Option<ExitStatus>>,
}

/// Compressing 512 MiB of random data ([`fixtures::slow_disk`]) takes the native engine several
/// seconds on two cores (zlib cannot shrink it, and tries at every cluster): long enough to
/// interrupt on purpose.
pub const SLOW: (&str, &str) = ("QEMU_CONVERT_OPTIONS", "-O qcow2 -c");

/// Lock files in the queue: the jobs claimed and not finished.
pub fn lock_count(env: &Env) -> usize {
    fs::read_dir(env.queue.join(".hyper2kvm/locks")).map(|d| d.count()).unwrap_or(0)
}

/// The environment every test daemon gets; `extra_env` entries override these.
pub fn base_env(env: &Env) -> Vec<(String, String)> {
    vec![
        ("POLL_INTERVAL".into(), "0.2".into()),
        ("SETTLE_SECONDS".into(), "0.3".into()),
        ("INVALID_MANIFEST_GRACE".into(), "3".into()),
        ("SOURCE_ROOTS".into(), env.exports.to_string_lossy().into_owned()),
        ("LOG_LEVEL".into(), "debug".into()),
        ("MAX_CONCURRENT".into(), "2".into()),
        ("USE_INOTIFY".into(), "false".into()),
    ]
}

impl Daemon {
    /// Starts `hyper2kvm --config-dir <etc> daemon --watch-dir <queue> --output-dir <output>`.
    pub fn start(env: &Env, extra_env: &[(&str, &str)], extra_args: &[&str]) -> Daemon {
        Self::start_named(env, "daemon", extra_env, extra_args)
    }

    pub fn start_named(env: &Env, name: &str, extra_env: &[(&str, &str)], extra_args: &[&str]) -> Daemon {
        Self::start_wrapped(env, name, &[], extra_env, extra_args)
    }

    /// Like [`Daemon::start_named`], run through `wrapper` (a command that ends by exec'ing
    /// its arguments, such as `unshare --mount -- sh -c '…; exec "$@"' sh`): the daemon keeps
    /// the child's pid.
    pub fn start_wrapped(
        env: &Env,
        name: &str,
        wrapper: &[&str],
        extra_env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Daemon {
        let log_path = env.root.join(format!("{name}.log"));
        let log = File::create(&log_path).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin());
                cmd
            }
            None => Command::new(bin()),
        };
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("RUST_BACKTRACE", "1");
        if let Some(home) = std::env::var_os("HOME") {
            cmd.env("HOME", home);
        }
        for (k, v) in base_env(env) {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.arg("--config-dir")
            .arg(&env.etc)
            .arg("daemon")
            .arg("--watch-dir")
            .arg(&env.queue)
            .arg("--output-dir")
            .arg(&env.output)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        let child = cmd.spawn().expect("spawn hyper2kvm daemon");
        Daemon { child: RefCell::new(Some(child)), log_path, exit: Cell::new(None) }
    }

    pub fn pid(&self) -> i32 {
        self.child.borrow().as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Panics with `msg`; the daemon's log is printed when the Daemon is dropped.
    #[track_caller]
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg}")
    }

    /// The exit status if the daemon has exited (reaping it).
    pub fn exited(&self) -> Option<ExitStatus> {
        if let Some(status) = self.exit.get() {
            return Some(status);
        }
        let mut slot = self.child.borrow_mut();
        let status = slot.as_mut()?.try_wait().unwrap()?;
        *slot = None;
        self.exit.set(Some(status));
        Some(status)
    }

    /// Asserts the daemon is still running.
    #[track_caller]
    pub fn assert_running(&self) {
        if let Some(status) = self.exited() {
            self.fail(&format!("the daemon exited unexpectedly: {status}"));
        }
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; SIGKILLs after that. Returns the exit
    /// status, how long the exit took, and whether it had to be killed.
    pub fn terminate(&mut self, limit: Duration) -> (ExitStatus, Duration, bool) {
        let start = Instant::now();
        if let Some(status) = self.exited() {
            return (status, Duration::ZERO, false);
        }
        let mut child = self.child.borrow_mut().take().expect("daemon child");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        while start.elapsed() < limit {
            if let Some(status) = child.try_wait().unwrap() {
                self.exit.set(Some(status));
                return (status, start.elapsed(), false);
            }
            sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        self.exit.set(Some(status));
        (status, start.elapsed(), true)
    }

    /// Stops the daemon with SIGTERM and asserts it exits 0 within 10 s.
    #[track_caller]
    pub fn stop(&mut self) {
        let was_running = self.exited().is_none();
        let (status, took, killed) = self.terminate(Duration::from_secs(10));
        if !was_running {
            self.fail(&format!("the daemon had already exited ({status}) before it was asked to stop"));
        }
        if killed {
            self.fail(&format!("the daemon did not exit within 10 s of SIGTERM ({took:?}); killed"));
        }
        if status.code() != Some(0) {
            self.fail(&format!(
                "the daemon exited with {status} (signal {:?}) after SIGTERM; expected status 0",
                status.signal()
            ));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.terminate(Duration::from_secs(10));
        }
        if std::thread::panicking() {
            eprintln!(
                "----- daemon log ({}) -----\n{}\n----- end of daemon log -----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Manifests
// ------------------------------------------------------------------------------------------

/// `sha256:<hex>` of a file.
pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// One disk entry as HyperSDK writes it (no `boot_order_hint`: Go omits the zero value).
pub fn disk(id: &str, format: &str, path: &Path) -> Value {
    json!({
        "id": id,
        "source_format": format,
        "local_path": path.to_string_lossy(),
        "label": id,
        "disk_type": "boot",
    })
}

/// A disk entry with `checksum` = the SHA-256 of the file at `path`, and `bytes` its size.
pub fn disk_with_checksum(id: &str, format: &str, path: &Path) -> Value {
    let mut d = disk(id, format, path);
    d["checksum"] = json!(format!("sha256:{}", sha256_file(path)));
    d["bytes"] = json!(fs::metadata(path).unwrap().len());
    d
}

/// A data disk entry (disk_type data, boot_order_hint given).
pub fn data_disk(id: &str, format: &str, path: &Path, hint: i64) -> Value {
    let mut d = disk(id, format, path);
    d["disk_type"] = json!("data");
    d["boot_order_hint"] = json!(hint);
    d
}

/// An Artifact Manifest v1.0 like the one HyperSDK writes.
pub fn manifest(vm_name: &str, disks: Vec<Value>) -> Value {
    json!({
        "manifest_version": "1.0",
        "source": {
            "provider": "vsphere",
            "vm_id": "vm-1234",
            "vm_name": vm_name,
            "datacenter": "https://vcenter.example.com/sdk",
            "export_timestamp": "2026-01-24T10:15:02.123456789+05:30",
            "export_method": "hypersdk-govc"
        },
        "vm": { "cpu": 2, "mem_gb": 4, "firmware": "efi", "os_hint": "linux", "os_version": "ubuntu64Guest" },
        "disks": disks,
        "nics": [ { "id": "nic-0", "mac": "00:50:56:aa:bb:cc", "network": "VM Network" } ],
        "notes": ["Exported from vSphere by hypersdk v0.1.0"],
        "metadata": { "hypersdk_version": "0.1.0", "job_id": "vm-1234", "created_at": "2026-01-24T10:15:02.12345+05:30" },
        // HyperSDK asks for inspect and fix too; these tests convert disks that hold no guest,
        // so the guest steps are off (tests/guest_daemon.rs turns them on).
        "pipeline": {
            "inspect": { "enabled": false },
            "fix": { "enabled": false },
            "convert": { "enabled": true },
            "validate": { "enabled": true }
        },
        "output": { "directory": "/exports/x", "format": "qcow2" }
    })
}

/// Index of the boot disk by the contract's rule: `disk_type == "boot"`, else the lowest
/// `boot_order_hint` with a missing hint counting as 0, ties by array order.
pub fn boot_index(manifest: &Value) -> usize {
    let disks = manifest["disks"].as_array().unwrap();
    if let Some(i) = disks.iter().position(|d| d["disk_type"] == "boot") {
        return i;
    }
    let key = |d: &Value| d["boot_order_hint"].as_i64().unwrap_or(0);
    (0..disks.len()).min_by_key(|&i| (key(&disks[i]), i)).unwrap()
}

/// The outputs a successful job must produce, boot disk first:
/// (disk id, output file name, source path, source format).
pub fn expected_outputs(manifest: &Value) -> Vec<(String, String, PathBuf, String)> {
    let vm = manifest["source"]["vm_name"].as_str().unwrap();
    let disks = manifest["disks"].as_array().unwrap();
    let boot = boot_index(manifest);
    let mut order = vec![boot];
    order.extend((0..disks.len()).filter(|&i| i != boot));
    order
        .into_iter()
        .map(|i| {
            let d = &disks[i];
            let id = d["id"].as_str().unwrap().to_owned();
            let name = if i == boot { format!("{vm}.qcow2") } else { format!("{vm}-{id}.qcow2") };
            (
                id,
                name,
                PathBuf::from(d["local_path"].as_str().unwrap()),
                d["source_format"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// The HyperSDK client
// ------------------------------------------------------------------------------------------

/// Waits until `cond` holds, polling every 100 ms, or panics (with the daemon log) after `limit`.
#[track_caller]
pub fn wait_for(daemon: &Daemon, limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        daemon.assert_running();
        if start.elapsed() > limit {
            daemon.fail(&format!("timed out after {limit:?} waiting for {what}"));
        }
        sleep(Duration::from_millis(100));
    }
}

/// Writes bytes the way Go's `os.WriteFile` does on a slow NFS: create/truncate (mode 0644),
/// write the first half, flush, pause 400 ms, write the rest. The daemon sees a half-written
/// manifest in between.
pub fn write_like_hypersdk(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let half = bytes.len() / 2;
    f.write_all(&bytes[..half]).unwrap();
    f.flush().unwrap();
    f.sync_data().unwrap();
    sleep(Duration::from_millis(400));
    f.write_all(&bytes[half..]).unwrap();
    f.flush().unwrap();
}

/// HyperSDK's submit: waits for the watch and output directories to exist (it refuses to
/// submit otherwise) and for `artifact-manifest.json` to be free (the daemon moves a claimed
/// manifest away), then writes the manifest non-atomically under that fixed name.
#[track_caller]
pub fn hypersdk_submit(daemon: &Daemon, env: &Env, manifest: &Value) {
    wait_for(daemon, Duration::from_secs(30), "the daemon to create the watch and output directories", || {
        env.queue.is_dir() && env.output.is_dir()
    });
    let path = env.queue.join(MANIFEST_NAME);
    wait_for(daemon, RESULT_TIMEOUT, "artifact-manifest.json to be taken (free for the next export)", || {
        !path.exists()
    });
    let bytes = serde_json::to_vec_pretty(manifest).unwrap();
    write_like_hypersdk(&path, &bytes);
}

/// What the client saw.
#[derive(Debug)]
pub enum Outcome {
    /// `V.qcow2` appeared; the times at which the other watched files were first seen, and the
    /// time V.qcow2 was first seen.
    Success { qcow2_seen: Instant, others_seen: Vec<(String, Instant)> },
    /// `V.error` appeared with this content.
    Failed(String),
}

/// HyperSDK's poll: `V.qcow2` first, then `V.error`, by existence only, every 100 ms.
/// `others` are extra result names whose first appearance is recorded (e.g. data disks); when
/// V.qcow2 is seen, every one of them must already exist.
#[track_caller]
pub fn hypersdk_wait(daemon: &Daemon, env: &Env, vm: &str, others: &[String]) -> Outcome {
    let start = Instant::now();
    let qcow2 = env.output.join(format!("{vm}.qcow2"));
    let error = env.output.join(format!("{vm}.error"));
    let mut seen: Vec<(String, Option<Instant>)> = others.iter().map(|n| (n.clone(), None)).collect();
    loop {
        let now = Instant::now();
        for (name, t) in seen.iter_mut() {
            if t.is_none() && env.output.join(&*name).exists() {
                *t = Some(now);
            }
        }
        if qcow2.exists() {
            let mut others_seen = Vec::new();
            for (name, t) in &seen {
                match t {
                    Some(t) => others_seen.push((name.clone(), *t)),
                    None if env.output.join(name).exists() => {
                        // Present now, so published no later than V.qcow2 (seen this round).
                        others_seen.push((name.clone(), now));
                    }
                    None => daemon.fail(&format!(
                        "{vm}.qcow2 appeared but {name} does not exist: the boot disk must be published last"
                    )),
                }
            }
            return Outcome::Success { qcow2_seen: now, others_seen };
        }
        if error.exists() {
            // Existence is the signal; read what HyperSDK would show.
            let text = fs::read_to_string(&error).unwrap_or_default();
            return Outcome::Failed(text);
        }
        daemon.assert_running();
        if start.elapsed() > RESULT_TIMEOUT {
            daemon.fail(&format!(
                "timed out after {RESULT_TIMEOUT:?} waiting for {vm}.qcow2 or {vm}.error in {}\noutput dir: {:?}\nwatch dir: {:?}",
                env.output.display(),
                list_tree(&env.output),
                list_tree(&env.queue)
            ));
        }
        sleep(Duration::from_millis(100));
    }
}

/// Submits and waits for success; panics with the daemon log on `.error`.
#[track_caller]
pub fn convert_ok(daemon: &Daemon, env: &Env, manifest: &Value) -> Outcome {
    let vm = manifest["source"]["vm_name"].as_str().unwrap().to_owned();
    let others: Vec<String> = expected_outputs(manifest).into_iter().skip(1).map(|(_, name, _, _)| name).collect();
    hypersdk_submit(daemon, env, manifest);
    match hypersdk_wait(daemon, env, &vm, &others) {
        Outcome::Failed(text) => daemon.fail(&format!("expected {vm}.qcow2 but got {vm}.error:\n{text}")),
        ok => ok,
    }
}

/// Submits and waits for `.error` (named `error_name`); returns its content.
#[track_caller]
pub fn convert_err(daemon: &Daemon, env: &Env, manifest: &Value, error_name: &str) -> String {
    hypersdk_submit(daemon, env, manifest);
    match hypersdk_wait(daemon, env, error_name, &[]) {
        Outcome::Failed(text) => text,
        Outcome::Success { .. } => daemon.fail(&format!("expected {error_name}.error but {error_name}.qcow2 appeared")),
    }
}

// ------------------------------------------------------------------------------------------
// Checks of results
// ------------------------------------------------------------------------------------------

/// `qemu-img check -f qcow2 --output=json`: asserts exit 0; returns the JSON.
#[track_caller]
pub fn qemu_img_check(daemon: &Daemon, path: &Path) -> Value {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2", "--output=json"]).arg(path).output().unwrap();
    if out.status.code() != Some(0) {
        daemon.fail(&format!(
            "qemu-img check {} exited {:?}:\n{}{}",
            path.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Asserts `out` is a clean qcow2 with the same contents (and virtual size) as `src`.
#[track_caller]
pub fn assert_converted(daemon: &Daemon, out: &Path, src: &Path, src_format: &str) {
    if !out.is_file() {
        daemon.fail(&format!("{} is missing", out.display()));
    }
    let info = fixtures::qemu_img_info(out, None);
    if info["format"] != "qcow2" {
        daemon.fail(&format!("{} is not qcow2: {info}", out.display()));
    }
    qemu_img_check(daemon, out);
    let (code, text) = fixtures::compare_status(out, "qcow2", src, src_format);
    if code != 0 {
        daemon.fail(&format!("qemu-img compare {} {} exited {code}: {text}", out.display(), src.display()));
    }
    let src_info = fixtures::qemu_img_info(src, Some(src_format));
    if info["virtual-size"] != src_info["virtual-size"] {
        daemon.fail(&format!(
            "{} has virtual size {} but the source has {}",
            out.display(),
            info["virtual-size"],
            src_info["virtual-size"]
        ));
    }
}

/// Checks `V.json` (job report) and `V.xml` (domain XML). `disks` = (disk id, output file
/// name). Returns the job id.
#[track_caller]
pub fn assert_report(daemon: &Daemon, env: &Env, vm: &str, disks: &[(&str, String)]) -> String {
    let report_path = env.output.join(format!("{vm}.json"));
    let text = fs::read_to_string(&report_path)
        .unwrap_or_else(|e| daemon.fail(&format!("cannot read {}: {e}", report_path.display())));
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| daemon.fail(&format!("{} is not JSON ({e}):\n{text}", report_path.display())));
    let job_id = report["job_id"].as_str().unwrap_or_default().to_owned();
    if job_id.is_empty() {
        daemon.fail(&format!("{} has no job_id:\n{text}", report_path.display()));
    }
    if report["vm_name"] != vm {
        daemon.fail(&format!("{} has vm_name {} (expected {vm:?})", report_path.display(), report["vm_name"]));
    }
    let rdisks = report["disks"]
        .as_array()
        .unwrap_or_else(|| daemon.fail(&format!("{} has no disks array:\n{text}", report_path.display())));
    if rdisks.len() != disks.len() {
        daemon.fail(&format!(
            "{} lists {} disks, expected {}:\n{text}",
            report_path.display(),
            rdisks.len(),
            disks.len()
        ));
    }
    for (id, output) in disks {
        let d = rdisks
            .iter()
            .find(|d| d["id"] == *id)
            .unwrap_or_else(|| daemon.fail(&format!("{} has no disk {id}:\n{text}", report_path.display())));
        if d["output"] != output.as_str() {
            daemon.fail(&format!(
                "{}: disk {id} output is {} (expected {output:?})",
                report_path.display(),
                d["output"]
            ));
        }
        // No digest of the output: it would cost a second read of the whole qcow2 (issue 13).
        let size = fs::metadata(env.output.join(output)).map(|m| m.len()).unwrap_or(0);
        if d.get("sha256").is_some() || d["output_bytes"] != size {
            daemon.fail(&format!(
                "{}: disk {id} has a sha256 {:?} or output_bytes {} while {output} has {size} bytes",
                report_path.display(),
                d.get("sha256"),
                d["output_bytes"]
            ));
        }
    }
    let xml_path = env.output.join(format!("{vm}.xml"));
    let xml = fs::read_to_string(&xml_path)
        .unwrap_or_else(|e| daemon.fail(&format!("cannot read {}: {e}", xml_path.display())));
    if !xml.contains("<domain") {
        daemon.fail(&format!("{} has no <domain element:\n{xml}", xml_path.display()));
    }
    job_id
}

/// Asserts the manifest file name is free again (the daemon moved the manifest away).
#[track_caller]
pub fn assert_manifest_taken(daemon: &Daemon, env: &Env) {
    let path = env.queue.join(MANIFEST_NAME);
    if path.exists() {
        daemon.fail(&format!("{} still exists after the job finished", path.display()));
    }
}

/// Non-hidden entries of a directory.
pub fn visible_entries(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect()
        })
        .unwrap_or_default()
}

/// Every path under `dir`, for diagnostics.
pub fn list_tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap_or(&p).to_string_lossy().into_owned());
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(base, &p, out);
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Regular files (recursively) under `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
    }
    walk(dir, &mut out);
    out
}

/// Asserts OUTPUT_DIR holds exactly `expected` (besides hidden entries), i.e. no temp files or
/// partial images under visible names.
#[track_caller]
pub fn assert_output_exactly(daemon: &Daemon, env: &Env, expected: &[String]) {
    let want: BTreeSet<String> = expected.iter().cloned().collect();
    let got = visible_entries(&env.output);
    if got != want {
        daemon.fail(&format!(
            "OUTPUT_DIR holds {got:?}, expected exactly {want:?} (plus hidden entries)\nfull tree: {:?}",
            list_tree(&env.output)
        ));
    }
}

/// Asserts no temp files are left in the default TEMP_DIR (OUTPUT_DIR/.hyper2kvm-tmp). Call
/// after the daemon has stopped (or is idle).
#[track_caller]
pub fn assert_no_temp_files(daemon: &Daemon, env: &Env) {
    let tmp = env.output.join(".hyper2kvm-tmp");
    let left = files_under(&tmp);
    if !left.is_empty() {
        daemon.fail(&format!("temp files left in {}: {left:?}", tmp.display()));
    }
}

/// Asserts the lines after the first of an `.error` name the job and the stage; returns the
/// first line.
#[track_caller]
pub fn check_error_file(daemon: &Daemon, vm: &str, text: &str) -> String {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default().to_owned();
    if first.trim().is_empty() {
        daemon.fail(&format!("{vm}.error has an empty first line:\n{text}"));
    }
    let rest: Vec<&str> = lines.collect();
    if !rest.iter().any(|l| l.trim_start().starts_with("job:")) {
        daemon.fail(&format!("{vm}.error has no 'job: <id>' line after the first:\n{text}"));
    }
    if !rest.iter().any(|l| l.trim_start().starts_with("stage:")) {
        daemon.fail(&format!("{vm}.error has no 'stage: <stage>' line after the first:\n{text}"));
    }
    first
}

/// Polls `status --json` until a job matching `pred` appears.
#[track_caller]
pub fn wait_status_job(daemon: &Daemon, env: &Env, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let status = env.status();
        if let Some(job) = status["jobs"].as_array().and_then(|jobs| jobs.iter().find(|j| pred(j))) {
            return job.clone();
        }
        daemon.assert_running();
        if start.elapsed() > RESULT_TIMEOUT {
            daemon.fail(&format!("timed out waiting for {what} in status --json; last status:\n{status:#}"));
        }
        sleep(Duration::from_millis(200));
    }
}

/// Full check of a successful job: every output is a clean qcow2 equal to its source, the
/// report and domain XML are right, the manifest was taken, and the boot disk appeared last.
/// Returns (job id, result file names).
#[track_caller]
pub fn verify_success(daemon: &Daemon, env: &Env, manifest: &Value, outcome: &Outcome) -> (String, Vec<String>) {
    let vm = manifest["source"]["vm_name"].as_str().unwrap();
    let outputs = expected_outputs(manifest);
    if let Outcome::Success { qcow2_seen, others_seen } = outcome {
        for (name, t) in others_seen {
            if t > qcow2_seen {
                daemon.fail(&format!("{name} appeared after {vm}.qcow2; the boot disk must be published last"));
            }
        }
    } else {
        daemon.fail(&format!("{vm} did not succeed: {outcome:?}"));
    }
    for (_, name, src, fmt) in &outputs {
        assert_converted(daemon, &env.output.join(name), src, fmt);
    }
    let disks: Vec<(&str, String)> = outputs.iter().map(|(id, name, _, _)| (id.as_str(), name.clone())).collect();
    let job = assert_report(daemon, env, vm, &disks);
    assert_manifest_taken(daemon, env);
    if env.output.join(format!("{vm}.error")).exists() {
        daemon.fail(&format!("{vm}.error exists next to a successful {vm}.qcow2"));
    }
    let mut names: Vec<String> = outputs.into_iter().map(|(_, n, _, _)| n).collect();
    names.push(format!("{vm}.json"));
    names.push(format!("{vm}.xml"));
    (job, names)
}

/// One daemon on one Env, with the bookkeeping every test needs: the result files that may be
/// in OUTPUT_DIR, and the job ids seen so far (each must be new).
pub struct Session {
    pub daemon: Daemon,
    pub expected: Vec<String>,
    pub jobs: Vec<String>,
    // Declared last: dropped after the daemon has been stopped.
    pub env: Env,
}

impl Session {
    pub fn start(extra_env: &[(&str, &str)], extra_args: &[&str]) -> Session {
        let env = Env::new();
        Self::start_in(env, extra_env, extra_args)
    }

    pub fn start_in(env: Env, extra_env: &[(&str, &str)], extra_args: &[&str]) -> Session {
        let daemon = Daemon::start(&env, extra_env, extra_args);
        Session { daemon, expected: Vec::new(), jobs: Vec::new(), env }
    }

    /// Submits like HyperSDK, waits for success, verifies everything; returns the job id.
    #[track_caller]
    pub fn convert_ok(&mut self, manifest: &Value) -> String {
        let outcome = convert_ok(&self.daemon, &self.env, manifest);
        let (job, names) = verify_success(&self.daemon, &self.env, manifest, &outcome);
        self.note_job(&job);
        self.expected.extend(names);
        assert_output_exactly(&self.daemon, &self.env, &self.expected);
        job
    }

    /// Submits like HyperSDK and waits for `<error_name>.error`; checks its later lines and
    /// that no qcow2 for `error_name` exists. Returns the first line.
    #[track_caller]
    pub fn convert_err(&mut self, manifest: &Value, error_name: &str) -> String {
        hypersdk_submit(&self.daemon, &self.env, manifest);
        self.expect_err(error_name)
    }

    /// Waits like HyperSDK for `<error_name>.error` (after a manifest was dropped some other
    /// way); the same checks as [`Session::convert_err`].
    #[track_caller]
    pub fn expect_err(&mut self, error_name: &str) -> String {
        let text = match hypersdk_wait(&self.daemon, &self.env, error_name, &[]) {
            Outcome::Failed(text) => text,
            Outcome::Success { .. } => {
                self.daemon.fail(&format!("expected {error_name}.error but {error_name}.qcow2 appeared"))
            }
        };
        let first = check_error_file(&self.daemon, error_name, &text);
        if let Some(job) = text.lines().find_map(|l| l.trim_start().strip_prefix("job:")) {
            self.note_job(job.trim());
        }
        assert_manifest_taken(&self.daemon, &self.env);
        let qcow2s: Vec<String> = visible_entries(&self.env.output)
            .into_iter()
            .filter(|n| n.starts_with(error_name) && n.ends_with(".qcow2"))
            .filter(|n| !self.expected.contains(n))
            .collect();
        if !qcow2s.is_empty() {
            self.daemon.fail(&format!("the failed job {error_name} left {qcow2s:?} in OUTPUT_DIR"));
        }
        self.expected.push(format!("{error_name}.error"));
        first
    }

    pub fn note_job(&mut self, job: &str) {
        if self.jobs.iter().any(|j| j == job) {
            self.daemon.fail(&format!("job id {job} was used twice"));
        }
        self.jobs.push(job.to_owned());
    }

    /// Checks OUTPUT_DIR holds exactly the expected results.
    #[track_caller]
    pub fn assert_output(&self) {
        assert_output_exactly(&self.daemon, &self.env, &self.expected);
    }

    /// SIGTERM → exit 0; then no stray or temp files remain.
    #[track_caller]
    pub fn finish(mut self) {
        self.daemon.stop();
        assert_output_exactly(&self.daemon, &self.env, &self.expected);
        assert_no_temp_files(&self.daemon, &self.env);
    }

    /// A small good VM (monolithicSparse disk with checksum) under exports/<vm>/.
    pub fn good_manifest(&self, vm: &str) -> Value {
        let dir = self.env.exports.join(format!("good-{}", vm.replace(['/', ' '], "_")));
        fs::create_dir_all(&dir).unwrap();
        let raw = fixtures::small_raw(&dir.join("disk.raw"));
        let vmdk = fixtures::raw_to_vmdk(&raw, &dir.join("disk-0.vmdk"), "monolithicSparse");
        manifest(vm, vec![disk_with_checksum("disk-0", "vmdk", &vmdk)])
    }
}
