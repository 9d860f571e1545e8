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

#[test]
fn a_manifest_whose_name_is_not_utf8_is_reported_not_ignored() {
    use std::os::unix::ffi::OsStrExt;
    let s = Session::start(&[], &[]);
    wait_for(&s.daemon, Duration::from_secs(30), "the watch directory", || s.env.queue.is_dir());
    let good = s.good_manifest("latin1-vm");
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.json");
    fs::write(s.env.queue.join(name), serde_json::to_vec(&good).unwrap()).unwrap();

    wait_for(&s.daemon, Duration::from_secs(30), "the daemon to warn about the name", || {
        s.daemon.log().contains("not UTF-8")
    });
    assert!(s.daemon.log().contains(r#"caf\xE9.json"#), "the warning names the file:\n{}", s.daemon.log());
    let status = s.env.status();
    let queue = status["queue"].as_array().unwrap();
    assert_eq!(queue.len(), 1, "status lists the manifest as waiting: {status:#}");
    assert_eq!(queue[0]["name"], r#""caf\xE9.json""#, "{status:#}");
    assert_eq!(queue[0]["not_utf8"], true, "{status:#}");
    s.finish();
}

/// The first file under `dir` (recursively) whose name ends with `suffix`.
fn find_file(dir: &std::path::Path, suffix: &str) -> Option<std::path::PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, suffix) {
                return Some(found);
            }
        } else if path.to_string_lossy().ends_with(suffix) {
            return Some(path);
        }
    }
    None
}

#[test]
fn the_archived_manifest_is_the_one_converted_even_when_the_file_is_swapped() {
    let s = Session::start(&[SLOW], &[]);
    let raw = s.env.exports.join("swap/disk-0.raw");
    common::fixtures::create_raw(&raw, 96 << 20);
    common::fixtures::write_random(&raw, 0, 96 << 20, 7);
    let submitted = manifest("swap-vm", vec![disk("disk-0", "raw", &raw)]);
    hypersdk_submit(&s.daemon, &s.env, &submitted);

    let state = s.env.queue.join(".hyper2kvm");
    wait_for(&s.daemon, RESULT_TIMEOUT, "the job to start converting", || {
        find_file(&state.join("logs"), ".log")
            .and_then(|log| fs::read_to_string(log).ok())
            .is_some_and(|l| l.contains("converting"))
    });
    let claimed = find_file(&state.join("claimed"), ".json").expect("the claimed manifest");
    // In place, as a producer or an intruder would: the job must neither notice nor archive it.
    let mut file = fs::OpenOptions::new().write(true).truncate(true).open(&claimed).expect("the job is still running");
    std::io::Write::write_all(&mut file, br#"{"swapped": true}"#).unwrap();
    drop(file);

    match hypersdk_wait(&s.daemon, &s.env, "swap-vm", &[]) {
        Outcome::Success { .. } => {}
        Outcome::Failed(text) => s.daemon.fail(&format!("the job failed:\n{text}")),
    }
    let job = claimed.file_stem().unwrap().to_string_lossy().into_owned();
    // V.qcow2 is published before the job is recorded: wait for the record, do not race it.
    let archived_name = format!("{job}.manifest.json");
    wait_for(&s.daemon, RESULT_TIMEOUT, "the job's record", || {
        find_file(&state.join("done"), &archived_name).is_some()
    });
    let archived = find_file(&state.join("done"), &archived_name).expect("the archived manifest");
    let archived: serde_json::Value = serde_json::from_slice(&fs::read(&archived).unwrap()).unwrap();
    assert_eq!(archived, submitted, "the archive holds the manifest the job converted");
    assert!(s.daemon.log().contains("changed while the job ran"), "the swap is logged:\n{}", s.daemon.log());
}

#[test]
fn unknown_manifest_keys_are_warned_about_in_the_report_and_the_log() {
    let mut s = Session::start(&[], &[]);
    let mut m = s.good_manifest("extra-keys-vm");
    m["vm"]["mem_GB"] = serde_json::json!(64);
    m["disks"][0]["controller"] = serde_json::json!("scsi");
    s.convert_ok(&m);
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(s.env.output.join("extra-keys-vm.json")).unwrap()).unwrap();
    let warnings: Vec<&str> = report["warnings"].as_array().unwrap().iter().filter_map(|w| w.as_str()).collect();
    for key in ["vm.mem_GB", "disks[0].controller"] {
        let line = format!("manifest key {key} is not in the Artifact Manifest v1.0 schema; it was ignored");
        assert!(warnings.contains(&line.as_str()), "V.json warnings {warnings:?} lack {line:?}");
        assert!(s.daemon.log().contains(&line), "the job's log lacks {line:?}");
    }
    s.finish();
}
