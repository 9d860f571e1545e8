//! No job lost to an OUTPUT_DIR that cannot take a result (issue 10): while it is full,
//! read-only or gone, the daemon claims nothing and `/healthz` says why; a job whose `.error`
//! cannot be published goes back to the queue instead of being recorded failed with no
//! answer; when the condition clears the daemon resumes by itself.
//!
//! The full and read-only cases use a real small filesystem: a tmpfs mounted on OUTPUT_DIR in
//! a private mount namespace of the daemon's own (`unshare --mount`, run as root here and in
//! CI), seen from the test through `/proc/<pid>/root`. A setup that fails fails the test.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::fixtures::{create_raw, write_random};
use common::*;

/// Size of the tmpfs given to OUTPUT_DIR: room for three small results.
const TMPFS_SIZE: &str = "16m";

fn free_local_address() -> String {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind a probe on loopback");
    probe.local_addr().unwrap().to_string()
}

/// `GET /healthz`: (status, body), or None when nothing answers.
fn healthz(addr: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    Some((head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?, body.to_owned()))
}

#[track_caller]
fn wait_for_health(daemon: &Daemon, addr: &str, what: &str, cond: impl Fn(u16, &str) -> bool) {
    let mut last = None;
    wait_for(daemon, Duration::from_secs(30), what, || {
        last = healthz(addr);
        last.as_ref().is_some_and(|(status, body)| cond(*status, body))
    });
}

/// A small disk (4 MiB, 256 KiB of data): its result takes a few hundred KiB.
fn tiny_disk(env: &Env, name: &str) -> PathBuf {
    let path = env.exports.join(format!("{name}.raw"));
    create_raw(&path, 4 << 20);
    write_random(&path, 0, 256 * 1024, 7);
    path
}

/// Drops a manifest for `vm` into the queue atomically (written aside, then renamed).
fn drop_manifest(env: &Env, vm: &str, disks: Vec<serde_json::Value>) {
    let bytes = serde_json::to_vec_pretty(&manifest(vm, disks)).unwrap();
    let aside = env.queue.join(format!(".{vm}.tmp"));
    fs::write(&aside, bytes).unwrap();
    fs::rename(&aside, env.queue.join(format!("{vm}.json"))).unwrap();
}

/// Job records under `failed/` (not the manifests and logs kept beside them).
fn failed_records(env: &Env) -> Vec<PathBuf> {
    let records = files_under(&env.queue.join(".hyper2kvm/failed"));
    records
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| !p.to_string_lossy().ends_with(".manifest.json"))
        .collect()
}

/// A daemon whose OUTPUT_DIR is a tmpfs of [`TMPFS_SIZE`] in a mount namespace of its own,
/// with MIN_FREE_SPACE_MB=1 and METRICS_ADDR=`addr`. Returns it and OUTPUT_DIR as the test
/// sees it (through the daemon's root).
fn daemon_on_tmpfs(env: &Env, addr: &str, extra_env: &[(&str, &str)]) -> (Daemon, PathBuf) {
    fs::create_dir_all(&env.output).unwrap();
    let script =
        format!("mount -t tmpfs -o size={TMPFS_SIZE} h2k-test-output '{}' && exec \"$@\"", env.output.display());
    let wrapper = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", &script, "sh"];
    let mut vars = vec![("METRICS_ADDR", addr), ("MIN_FREE_SPACE_MB", "1")];
    vars.extend_from_slice(extra_env);
    let daemon = Daemon::start_wrapped(env, "daemon", &wrapper, &vars, &[]);
    wait_for_health(&daemon, addr, "the daemon on its tmpfs to be up", |status, _| status == 200);
    let mounts = fs::read_to_string(format!("/proc/{}/mountinfo", daemon.pid())).unwrap_or_default();
    let mounted = mounts.lines().any(|l| l.contains(&format!(" {} ", env.output.display())) && l.contains(" - tmpfs "));
    if !mounted {
        daemon.fail(&format!("setup: no tmpfs on {} in the daemon's namespace:\n{mounts}", env.output.display()));
    }
    let seen = PathBuf::from(format!("/proc/{}/root{}", daemon.pid(), env.output.display()));
    (daemon, seen)
}

/// Fills the filesystem of `dir` up to ENOSPC with `dir/filler`; fails the test if it does not
/// fill within 64 MiB (not the small tmpfs).
fn fill(daemon: &Daemon, dir: &Path) {
    let mut file = fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    for _ in 0..1024 {
        match file.write_all(&chunk).and_then(|()| file.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => daemon.fail(&format!("setup: filling {}: {e}", dir.display())),
        }
    }
    daemon.fail(&format!("setup: {} took 64 MiB without filling up", dir.display()));
}

/// Runs `nsenter --mount` into the daemon's namespace.
fn in_daemon_namespace(daemon: &Daemon, args: &[&str]) {
    let out = Command::new("nsenter")
        .arg("-t")
        .arg(daemon.pid().to_string())
        .arg("--mount")
        .args(args)
        .output()
        .expect("nsenter (util-linux)");
    if !out.status.success() {
        daemon.fail(&format!("setup: nsenter {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
}

/// Asserts that nothing was claimed: the manifests wait under their names, no lock, no
/// failed record, no answer.
#[track_caller]
fn assert_all_waiting(daemon: &Daemon, env: &Env, output: &Path, vms: &[&str]) {
    for vm in vms {
        if !env.queue.join(format!("{vm}.json")).exists() {
            daemon.fail(&format!("{vm}.json was claimed although OUTPUT_DIR could not take its answer"));
        }
        if output.join(format!("{vm}.error")).exists() {
            daemon.fail(&format!("{vm}.error was published"));
        }
    }
    assert_eq!(lock_count(env), 0, "no claim while OUTPUT_DIR cannot take a result");
    assert!(failed_records(env).is_empty(), "no job may be recorded failed: {:?}", failed_records(env));
}

/// Waits for every VM's boot disk in `output`, and checks that no job was recorded failed.
#[track_caller]
fn assert_all_published(daemon: &Daemon, env: &Env, output: &Path, vms: &[&str]) {
    wait_for(daemon, Duration::from_secs(90), "every job to publish its result", || {
        vms.iter().all(|vm| output.join(format!("{vm}.qcow2")).exists())
    });
    for vm in vms {
        assert!(!output.join(format!("{vm}.error")).exists(), "{vm}.error next to its result");
    }
    assert!(failed_records(env).is_empty(), "no job may be recorded failed: {:?}", failed_records(env));
}

#[test]
fn a_full_output_dir_leaves_jobs_queued_until_space_returns() {
    let env = Env::new();
    let addr = free_local_address();
    let (daemon, output) = daemon_on_tmpfs(&env, &addr, &[]);
    fill(&daemon, &output);
    let vms = ["full-a", "full-b", "full-c"];
    for vm in vms {
        drop_manifest(&env, vm, vec![disk("disk-0", "raw", &tiny_disk(&env, vm))]);
    }
    // Several polls past the settle time: a daemon that claims would have done so by now.
    std::thread::sleep(Duration::from_secs(3));
    assert_all_waiting(&daemon, &env, &output, &vms);
    wait_for_health(&daemon, &addr, "/healthz to say why nothing is claimed", |status, body| {
        status == 503 && body.starts_with("paused: ") && body.contains("OUTPUT_DIR")
    });

    fs::remove_file(output.join("filler")).unwrap();
    assert_all_published(&daemon, &env, &output, &vms);
    wait_for_health(&daemon, &addr, "/healthz to be 200 again", |status, _| status == 200);
}

#[test]
fn a_read_only_output_dir_leaves_jobs_queued_until_it_is_writable() {
    let env = Env::new();
    let addr = free_local_address();
    let (daemon, output) = daemon_on_tmpfs(&env, &addr, &[]);
    let target = env.output.to_str().unwrap();
    in_daemon_namespace(&daemon, &["mount", "-o", "remount,ro", target]);
    drop_manifest(&env, "ro-vm", vec![disk("disk-0", "raw", &tiny_disk(&env, "ro-vm"))]);
    wait_for_health(&daemon, &addr, "/healthz to say OUTPUT_DIR is read-only", |status, body| {
        status == 503 && body.contains("read-only")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_all_waiting(&daemon, &env, &output, &["ro-vm"]);

    in_daemon_namespace(&daemon, &["mount", "-o", "remount,rw", target]);
    assert_all_published(&daemon, &env, &output, &["ro-vm"]);
}

#[test]
fn a_vanished_output_dir_leaves_jobs_queued_until_it_is_back() {
    let env = Env::new();
    let addr = free_local_address();
    let daemon = Daemon::start(&env, &[("METRICS_ADDR", &addr)], &[]);
    wait_for_health(&daemon, &addr, "the daemon to be up", |status, _| status == 200);
    fs::remove_dir_all(&env.output).unwrap();
    drop_manifest(&env, "gone-vm", vec![disk("disk-0", "raw", &tiny_disk(&env, "gone-vm"))]);
    wait_for_health(&daemon, &addr, "/healthz to say OUTPUT_DIR is missing", |status, body| {
        status == 503 && body.contains("does not exist")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_all_waiting(&daemon, &env, &env.output, &["gone-vm"]);

    // Back (a share mounted again): TEMP_DIR inside it is recreated by the daemon.
    fs::create_dir(&env.output).unwrap();
    assert_all_published(&daemon, &env, &env.output, &["gone-vm"]);
}

/// A job claimed while there was room, whose `.error` then cannot be published because
/// OUTPUT_DIR filled up meanwhile, goes back to the queue; it is answered once space returns.
#[test]
fn an_error_that_cannot_be_published_sends_the_job_back_to_the_queue() {
    let env = Env::new();
    let addr = free_local_address();
    let slow = common::fixtures::slow_disk(&env.exports);
    let source = common::fixtures::raw_to_qcow2(&slow, &env.exports.join("slow/disk-0.qcow2"));
    fs::remove_file(&slow).unwrap();
    let (daemon, output) = daemon_on_tmpfs(&env, &addr, &[]);
    // A wrong checksum of a disk qemu-img converts: the job hashes all 512 MiB in a pass of its
    // own before converting anything (a disk read natively is hashed in the conversion's pass,
    // which the full OUTPUT_DIR would stop first), then fails at stage checksum.
    let mut bad = disk("disk-0", "qcow2", &source);
    bad["checksum"] = format!("sha256:{}", "0".repeat(64)).into();
    drop_manifest(&env, "late-full", vec![bad]);
    wait_for(&daemon, Duration::from_secs(30), "the job to be claimed", || lock_count(&env) == 1);
    fill(&daemon, &output);
    wait_for(&daemon, Duration::from_secs(90), "the job to go back to the queue", || {
        daemon.log().contains("could not publish the .error file; the job goes back to the queue")
            || output.join("late-full.error").exists()
    });
    if output.join("late-full.error").exists() {
        daemon.fail("setup: the job failed before OUTPUT_DIR was full (the checksum was too quick)");
    }
    wait_for(&daemon, Duration::from_secs(10), "the claim to be released", || lock_count(&env) == 0);
    let requeued: Vec<String> =
        visible_entries(&env.queue).into_iter().filter(|n| n.starts_with("late-full.requeued-")).collect();
    assert_eq!(requeued.len(), 1, "the manifest is back in the queue under a requeued name");
    assert!(failed_records(&env).is_empty(), "not recorded failed without an answer: {:?}", failed_records(&env));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lock_count(&env), 0, "not claimed again while OUTPUT_DIR is full");

    fs::remove_file(output.join("filler")).unwrap();
    wait_for(&daemon, Duration::from_secs(120), "the job's .error once space returned", || {
        output.join("late-full.error").exists()
    });
    let text = fs::read_to_string(output.join("late-full.error")).unwrap();
    assert!(text.contains("stage: checksum"), "{text}");
    wait_for(&daemon, Duration::from_secs(10), "its record", || failed_records(&env).len() == 1);
}
