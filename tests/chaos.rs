//! Exactly once across hosts, under faults. Several daemons, each in its own UTS and PID
//! namespace (its own host name, as on separate hosts), share one queue and one output
//! directory with inotify off (what NFS looks like to them) and a short lease. Producers submit
//! the way HyperSDK does. One daemon is killed with SIGKILL mid-job and restarted; another is
//! frozen with SIGSTOP past its lease mid-job, then thawed. Every manifest must succeed exactly
//! once, every qcow2 must pass `qemu-img check` the moment it appears, and the frozen daemon
//! must publish nothing for the job taken from it.
//!
//! `chaos_small` runs in `make test`; `soak` (ignored; `make soak`) runs the same over many
//! more jobs and prints the figures for docs/RELIABILITY.md.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::fixtures::{create_raw, write_random};
use common::*;
use serde_json::Value;

/// Jobs each daemon may run at once; the watcher checks no daemon ever holds more locks.
const MAX_CONCURRENT: usize = 2;
const LEASE_SECONDS: u64 = 4;

/// One daemon in its own UTS+PID namespace.
struct NsDaemon {
    host: String,
    unshare: Child,
    log: PathBuf,
}

impl NsDaemon {
    fn start(env: &Env, host: &str, generation: usize) -> NsDaemon {
        let log = env.root.join(format!("{host}-{generation}.log"));
        let out = File::create(&log).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--uts",
            "--pid",
            "--fork",
            "--kill-child",
            "--",
            "sh",
            "-c",
            "hostname \"$0\" && exec \"$@\"",
            host,
        ]);
        cmd.arg(bin()).args(["--log-format", "json", "--config-dir"]).arg(&env.etc);
        cmd.args(["daemon", "--instance", "chaos", "--watch-dir"]).arg(&env.queue).arg("--output-dir").arg(&env.output);
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in base_env(env) {
            cmd.env(k, v);
        }
        cmd.env("LOG_LEVEL", "info")
            .env("MAX_CONCURRENT", MAX_CONCURRENT.to_string())
            .env("POLL_INTERVAL", "0.3")
            .env("LEASE_SECONDS", LEASE_SECONDS.to_string())
            .env("QEMU_CONVERT_OPTIONS", "-O qcow2 -c")
            .env("DRAIN_SECONDS", "20")
            // A loaded machine can stall a producer between its two half-writes for seconds;
            // the short grace the other tests use would fail such a manifest as invalid JSON.
            .env("INVALID_MANIFEST_GRACE", "30");
        cmd.stdin(Stdio::null()).stdout(Stdio::from(out.try_clone().unwrap())).stderr(Stdio::from(out));
        NsDaemon { host: host.to_owned(), unshare: cmd.spawn().expect("unshare (util-linux) runs as root"), log }
    }

    /// The daemon's pid as seen from here (unshare's child; PID 1 in its namespace).
    fn pid(&self) -> Option<i32> {
        let id = self.unshare.id();
        let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// The daemon and everything it started (qemu-img children).
    fn tree(&self) -> Vec<i32> {
        let mut all = Vec::new();
        let mut todo: Vec<i32> = self.pid().into_iter().collect();
        while let Some(pid) = todo.pop() {
            all.push(pid);
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for task in tasks.flatten() {
                    let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                    todo.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
                }
            }
        }
        all
    }

    fn signal_tree(&self, signal: i32) {
        for pid in self.tree() {
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// SIGKILL: the namespace's PID 1 dies, and the kernel kills the rest of it.
    fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = self.unshare.wait();
    }

    /// SIGTERM, then the exit status (waiting up to `limit`).
    fn stop(&mut self, limit: Duration) -> Option<i32> {
        if let Some(pid) = self.pid() {
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.unshare.try_wait().unwrap() {
                return status.code();
            }
            sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        if self.unshare.try_wait().ok().flatten().is_none() {
            self.signal_tree(libc::SIGCONT);
            self.kill();
        }
    }
}

/// Watches OUTPUT_DIR: checks every qcow2 the moment it appears and notices a name published
/// twice (a new inode under a final name).
struct Watcher {
    stop: Arc<AtomicBool>,
    findings: Arc<Mutex<Findings>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default, Debug)]
struct Findings {
    seen: BTreeMap<String, u64>,
    check_failures: Vec<String>,
    republished: Vec<String>,
    /// The most locks one daemon (host, boot id, pid) held at one look.
    most_locks_held: usize,
}

impl Watcher {
    fn start(output: PathBuf, locks: PathBuf) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let findings = Arc::new(Mutex::new(Findings::default()));
        let (s, f) = (stop.clone(), findings.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                watch_once(&output, &f);
                count_locks(&locks, &f);
                sleep(Duration::from_millis(30));
            }
            watch_once(&output, &f);
        });
        Watcher { stop, findings, thread: Some(thread) }
    }

    fn finish(mut self) -> Findings {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.findings.lock().unwrap())
    }
}

fn watch_once(output: &Path, findings: &Mutex<Findings>) {
    let Ok(entries) = std::fs::read_dir(output) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".qcow2") || name.starts_with('.') {
            continue;
        }
        let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
        let known = findings.lock().unwrap().seen.get(&name).copied();
        match known {
            Some(inode) if inode == meta.ino() => {}
            Some(_) => findings.lock().unwrap().republished.push(name),
            None => {
                let check = Command::new("qemu-img").args(["check", "-q"]).arg(entry.path()).output().unwrap();
                let mut f = findings.lock().unwrap();
                if !check.status.success() {
                    f.check_failures.push(format!("{name}: {}", String::from_utf8_lossy(&check.stderr)));
                }
                f.seen.insert(name, meta.ino());
            }
        }
    }
}

/// Counts the locks each daemon holds, from the owner records in the lock files.
fn count_locks(locks: &Path, findings: &Mutex<Findings>) {
    let Ok(entries) = std::fs::read_dir(locks) else { return };
    let mut held: BTreeMap<(String, String, u64), usize> = BTreeMap::new();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().ends_with(".lock") {
            continue;
        }
        let Ok(record) = std::fs::read(entry.path()).map(|b| serde_json::from_slice::<Value>(&b)) else { continue };
        let Ok(record) = record else { continue };
        let owner = (
            record["host"].as_str().unwrap_or_default().to_owned(),
            record["boot_id"].as_str().unwrap_or_default().to_owned(),
            record["pid"].as_u64().unwrap_or_default(),
        );
        *held.entry(owner).or_default() += 1;
    }
    let most = held.values().copied().max().unwrap_or(0);
    let mut f = findings.lock().unwrap();
    f.most_locks_held = f.most_locks_held.max(most);
}

/// A producer: HyperSDK's behaviour with its own fixed file name.
fn produce(env: &Env, file_name: &str, manifests: Vec<Value>, stop: &AtomicBool) {
    let path = env.queue.join(file_name);
    // HyperSDK refuses to submit until the daemon has created the directory.
    while !env.queue.is_dir() && !stop.load(Ordering::SeqCst) {
        sleep(Duration::from_millis(50));
    }
    for manifest in manifests {
        let deadline = Instant::now() + Duration::from_secs(300);
        while path.exists() && Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
            sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        write_like_hypersdk(&path, &serde_json::to_vec_pretty(&manifest).unwrap());
    }
}

fn claims_of(env: &Env, host: &str) -> Vec<(String, String)> {
    let status = env.status();
    status["claims"]
        .as_array()
        .map(|claims| {
            claims
                .iter()
                .filter(|c| c["host"] == host)
                .map(|c| {
                    (c["job_id"].as_str().unwrap_or("").to_owned(), c["vm_name"].as_str().unwrap_or("").to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until one of `daemons` (other than `skip`) holds a claim on a slow job; returns the
/// daemon's index and the job id. Any daemon will do: which one wins a job is up to the race.
fn wait_for_slow_claim(
    env: &Env,
    daemons: &[NsDaemon],
    skip: Option<usize>,
    limit: Duration,
) -> Option<(usize, String)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        for (i, daemon) in daemons.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
            if let Some((job, _)) = claims_of(env, &daemon.host).into_iter().find(|(_, vm)| vm.contains("slow")) {
                return Some((i, job));
            }
        }
        sleep(Duration::from_millis(100));
    }
    None
}

/// Whether `job` is still claimed by `host` and unpublished (the daemon is stopped, so this
/// cannot change until it is thawed).
fn still_mid_job(env: &Env, host: &str, job: &str) -> bool {
    let claim = env.status()["claims"].as_array().and_then(|claims| {
        claims
            .iter()
            .find(|c| c["host"] == host && c["job_id"] == job)
            .and_then(|c| c["vm_name"].as_str().map(str::to_owned))
    });
    claim.is_some_and(|vm| !env.output.join(format!("{vm}.qcow2")).exists())
}

/// Waits until every thread of every process in `pids` is in the stopped state: kill(2)
/// returns before SIGSTOP has taken effect.
fn wait_stopped(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let stopped = |pid: &i32| {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return true };
        tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            stat.rsplit(')')
                .next()
                .is_none_or(|rest| matches!(rest.trim_start().chars().next(), Some('T' | 't') | None))
        })
    };
    while Instant::now() < deadline && !pids.iter().all(stopped) {
        sleep(Duration::from_millis(10));
    }
}

struct Report {
    jobs: usize,
    daemons: usize,
    faults: usize,
    takeover_delays: Vec<f64>,
    wall: Duration,
}

fn run_chaos(jobs_per_producer: usize, rounds: usize) -> Report {
    let started = Instant::now();
    let env = Env::new();
    // Sources: small half-compressible disks, and slow ones (random data, compressed output).
    let fast: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = env.exports.join(format!("fast-{i}.raw"));
            create_raw(&p, 24 << 20);
            write_random(&p, 0, 8 << 20, i as u64 + 1);
            p
        })
        .collect();
    let slow = env.exports.join("slow.raw");
    let mut random = File::open("/dev/urandom").unwrap().take(256 << 20);
    std::io::copy(&mut random, &mut File::create(&slow).unwrap()).unwrap();

    let producers = ["artifact-manifest.json", "artifact-manifest-p2.json", "artifact-manifest-p3.json"];
    let mut all_vms = BTreeSet::new();
    let plans: Vec<Vec<Value>> = (0..producers.len())
        .map(|p| {
            (0..jobs_per_producer)
                .map(|i| {
                    let is_slow = i % 4 == 1;
                    let vm = format!("vm-p{p}-{i:03}{}", if is_slow { "-slow" } else { "" });
                    all_vms.insert(vm.clone());
                    let source = if is_slow { &slow } else { &fast[i % fast.len()] };
                    manifest(&vm, vec![disk("disk-0", "raw", source)])
                })
                .collect()
        })
        .collect();

    let mut daemons: Vec<NsDaemon> = (1..=4).map(|n| NsDaemon::start(&env, &format!("chaos-d{n}"), 0)).collect();
    let watcher = Watcher::start(env.output.clone(), env.queue.join(".hyper2kvm/locks"));
    let stop = AtomicBool::new(false);
    let mut faults = 0;
    let mut frozen_jobs = Vec::new();
    std::thread::scope(|scope| {
        for (name, plan) in producers.iter().zip(plans) {
            let (env, stop) = (&env, &stop);
            scope.spawn(move || produce(env, name, plan, stop));
        }
        for round in 0..rounds {
            // Kill a daemon in the middle of a slow job, then restart it under the same host name.
            let mut killed = None;
            if let Some((i, _)) = wait_for_slow_claim(&env, &daemons, None, Duration::from_secs(60)) {
                let host = daemons[i].host.clone();
                daemons[i].kill();
                faults += 1;
                sleep(Duration::from_millis(500));
                daemons[i] = NsDaemon::start(&env, &host, round + 1);
                killed = Some(i);
            }
            // Freeze another daemon in the middle of a slow job for three leases, then thaw it.
            // Not the one just killed: the claims its last incarnation left still carry its host
            // name. A job that finishes before the freeze lands does not count: try the next one.
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline {
                let Some((i, job)) = wait_for_slow_claim(&env, &daemons, killed, Duration::from_secs(30)) else {
                    continue;
                };
                let tree = daemons[i].tree();
                daemons[i].signal_tree(libc::SIGSTOP);
                wait_stopped(&tree);
                let landed = still_mid_job(&env, &daemons[i].host, &job);
                if landed {
                    faults += 1;
                    sleep(Duration::from_secs(3 * LEASE_SECONDS));
                }
                daemons[i].signal_tree(libc::SIGCONT);
                if landed {
                    frozen_jobs.push((daemons[i].host.clone(), daemons[i].log.clone(), job));
                    break;
                }
            }
        }
        // Wait for every result.
        let deadline = Instant::now() + Duration::from_secs(240);
        while Instant::now() < deadline {
            let done = all_vms.iter().filter(|vm| env.output.join(format!("{vm}.qcow2")).exists()).count();
            if done == all_vms.len() {
                break;
            }
            sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::SeqCst);
    });
    // Give a thawed daemon time to reach its (fenced) publish step before looking.
    sleep(Duration::from_secs(2));
    let logs: Vec<String> = daemons.iter().map(NsDaemon::log_text).collect();
    let mut every_log: Vec<PathBuf> = std::fs::read_dir(&env.root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    every_log.sort();
    for d in daemons.iter_mut() {
        let code = d.stop(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{} must stop cleanly:\n{}", d.host, d.log_text());
    }
    let findings = watcher.finish();
    let dump = || {
        let mut text = String::new();
        for path in &every_log {
            text.push_str(&format!("---- {}\n{}\n", path.display(), std::fs::read_to_string(path).unwrap_or_default()));
        }
        text.push_str(&format!("---- queue: {:?}\n---- output: {:?}\n", list_tree(&env.queue), list_tree(&env.output)));
        text
    };

    let errors: Vec<String> = visible_entries(&env.output).into_iter().filter(|n| n.ends_with(".error")).collect();
    assert!(errors.is_empty(), "failed jobs: {errors:?}\n{}", dump());
    let missing: Vec<&String> = all_vms.iter().filter(|vm| !env.output.join(format!("{vm}.qcow2")).exists()).collect();
    assert!(missing.is_empty(), "lost jobs (no .qcow2): {missing:?}\n{}", dump());
    assert!(
        findings.check_failures.is_empty(),
        "qcow2 that failed qemu-img check on arrival: {:?}",
        findings.check_failures
    );
    assert!(findings.republished.is_empty(), "results published twice: {:?}", findings.republished);
    assert!(
        (1..=MAX_CONCURRENT).contains(&findings.most_locks_held),
        "a daemon held {} locks at once; MAX_CONCURRENT is {MAX_CONCURRENT}",
        findings.most_locks_held
    );

    let status = env.status();
    let jobs = status["jobs"].as_array().unwrap();
    let mut done_per_vm: BTreeMap<&str, usize> = BTreeMap::new();
    for job in jobs {
        assert_eq!(job["state"], "done", "no job may end failed or stay running: {job:#}");
        *done_per_vm.entry(job["vm_name"].as_str().unwrap()).or_default() += 1;
    }
    let duplicates: Vec<_> = done_per_vm.iter().filter(|(_, n)| **n != 1).collect();
    assert!(duplicates.is_empty(), "manifests done more than once: {duplicates:?}");
    assert_eq!(done_per_vm.len(), all_vms.len(), "every manifest has a record");
    assert!(status["claims"].as_array().unwrap().is_empty() && status["queue"].as_array().unwrap().is_empty());
    // Every VM name is used once, so anything superseded was a result replaced by a second run.
    let superseded = files_under(&env.output.join(".hyper2kvm-superseded"));
    assert!(superseded.is_empty(), "results moved aside by a second run: {superseded:?}\n{}", dump());
    for job in jobs {
        let vm = job["vm_name"].as_str().unwrap();
        let report: Value =
            serde_json::from_slice(&std::fs::read(env.output.join(format!("{vm}.json"))).unwrap()).unwrap();
        assert_eq!(report["job_id"], job["job_id"], "{vm}.json comes from the recorded job\n{}", dump());
    }

    // The jobs taken from the frozen daemon were finished by others, and it published nothing.
    for (host, log, job_id) in &frozen_jobs {
        let record = jobs.iter().find(|j| j["job_id"] == job_id.as_str()).expect("a record for the frozen job");
        assert_ne!(record["host"], host.as_str(), "the frozen daemon's job was taken over: {record:#}\n{}", dump());
        assert!(record["generation"].as_u64().unwrap() >= 2, "{record:#}\n{}", dump());
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let abandoned = log.lines().any(|l| l.contains(job_id.as_str()) && l.contains("abandon"));
        assert!(abandoned, "the thawed daemon ({host}) abandoned {job_id}:\n{log}");
    }
    assert_eq!(faults, 2 * rounds, "every round injected its two faults");

    let takeover_delays: Vec<f64> = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains("took over a stale job"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["age_seconds"].as_f64().or_else(|| v["fields"]["age_seconds"].as_f64()))
        .collect();
    assert!(!takeover_delays.is_empty(), "at least one stale job was taken over\n{}", dump());
    Report { jobs: all_vms.len(), daemons: 4, faults, takeover_delays, wall: started.elapsed() }
}

fn print(report: &Report) {
    let mut delays = report.takeover_delays.clone();
    delays.sort_by(f64::total_cmp);
    let median = delays[delays.len() / 2];
    let worst = delays[delays.len() - 1];
    println!(
        "chaos: {} jobs, {} daemons, {} faults, 0 duplicates, 0 lost, {} takeovers, heartbeat age at takeover median {median:.1} s, worst {worst:.1} s (lease {LEASE_SECONDS} s), {:.0} s wall",
        report.jobs,
        report.daemons,
        report.faults,
        delays.len(),
        report.wall.as_secs_f64()
    );
}

#[test]
fn chaos_small() {
    let report = run_chaos(8, 1);
    print(&report);
}

/// `make soak`: SOAK_JOBS_PER_PRODUCER (default 60) and SOAK_ROUNDS (default 4).
#[test]
#[ignore]
fn soak() {
    let per = std::env::var("SOAK_JOBS_PER_PRODUCER").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let rounds = std::env::var("SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let report = run_chaos(per, rounds);
    print(&report);
}
