//! Hostile manifests through the real daemon (docs/RELIABILITY.md, "Hostile input"): a file
//! of any size costs the daemon at most the manifest limit in memory, and each refusal's
//! `.error` names what is wrong.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

/// The daemon's peak resident memory (`VmHWM`), in KiB.
fn peak_rss_kib(daemon: &Daemon) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/PID/status:\n{status}"))
}

#[test]
fn a_multi_gigabyte_manifest_is_refused_without_reading_it() {
    let mut s = Session::start(&[], &[]);
    wait_for(&s.daemon, Duration::from_secs(30), "the watch directory", || s.env.queue.is_dir());
    let before = peak_rss_kib(&s.daemon);
    // Sparse: 3 GiB that costs no disk, but would cost 3 GiB of memory to read whole.
    let size: u64 = 3 << 30;
    let file = fs::File::create(s.env.queue.join(MANIFEST_NAME)).unwrap();
    file.set_len(size).unwrap();
    drop(file);

    let first = s.expect_err("artifact-manifest");
    let peak = peak_rss_kib(&s.daemon);
    eprintln!("peak RSS {before} KiB before, {peak} KiB after");
    assert!(
        peak < before + 128 * 1024,
        "the daemon's peak memory went from {before} KiB to {peak} KiB for a {size}-byte manifest"
    );
    assert!(
        first.contains(&size.to_string()) && first.contains("1 MiB") && first.contains("1048576"),
        "the first line should give the size and the limit: {first}"
    );
    s.finish();
}
