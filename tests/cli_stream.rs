//! `hyper2kvm convert` from a source that cannot seek — `-` (standard input) or a FIFO — on
//! stream-optimized VMDKs made by the real `qemu-img` and by python3-vmdkstream: read in one
//! pass, holes kept, `--compress` honoured; every other format, a truncated stream and an
//! interruption leave nothing behind.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::*;
use common::*;
use serde_json::Value;

const CLUSTER: usize = 64 << 10;
const NOT_STREAMABLE: &str =
    "cannot seek; only streamOptimized VMDK can be converted from a pipe — save it to a file first";

/// Starts `hyper2kvm convert ARGS…` with stdin piped and stdout and stderr captured.
fn spawn_convert<S: AsRef<OsStr>>(args: &[S]) -> Child {
    Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["--config-dir", "/nonexistent", "convert"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hyper2kvm")
}

/// `hyper2kvm convert - -o DST EXTRA…` with `input` written to its stdin through a pipe.
fn convert_stdin(input: Vec<u8>, dst: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec![OsStr::new("-"), OsStr::new("-o"), dst.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let mut child = spawn_convert(&args);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // A refused stream is not read to its end: the write then fails, which is expected.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for hyper2kvm");
    writer.join().expect("the writer thread ends");
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A test directory with the 64 MiB disk (data and holes) as raw and as `subformat` VMDK.
fn setup(subformat: &str) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let raw = small_raw(&dir.path().join("in/disk.raw"));
    let vmdk = raw_to_vmdk(&raw, &dir.path().join("in/disk.vmdk"), subformat);
    let bytes = std::fs::read(vmdk).unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    (dir, raw, bytes)
}

fn check_json(qcow2: &Path) -> Value {
    let text = run(Command::new("qemu-img").args(["check", "--output=json", "-f", "qcow2"]).arg(qcow2));
    serde_json::from_str(&text).unwrap()
}

/// 64 KiB clusters of `raw` that hold a non-zero byte: those a conversion allocates.
fn nonzero_clusters(raw: &Path) -> u64 {
    let data = std::fs::read(raw).unwrap();
    data.chunks(CLUSTER).filter(|c| c.iter().any(|&b| b != 0)).count() as u64
}

/// A successful, silent conversion into `out/disk.qcow2` that equals `raw`, holes unallocated;
/// returns `qemu-img check`'s report.
#[track_caller]
fn assert_converted(out: &Output, dst: &Path, raw: &Path) -> Value {
    assert!(out.status.success(), "convert failed: {}", stderr(out));
    assert_eq!(stderr(out), "", "nothing said when stderr is not a terminal");
    assert_eq!(entries(dst.parent().unwrap()), ["disk.qcow2"], "DST, and no temporary file");
    let check = check_json(dst);
    assert_eq!(check["check-errors"], 0, "{check}");
    assert_eq!(check["allocated-clusters"], nonzero_clusters(raw), "only clusters with data: {check}");
    assert_same_contents(dst, "qcow2", raw, "raw");
    check
}

#[test]
fn a_stream_optimized_vmdk_converts_from_stdin() {
    let (dir, raw, bytes) = setup("streamOptimized");
    let dst = dir.path().join("out/disk.qcow2");
    // No --format: `-` has no name to guess from; the first bytes tell.
    let out = convert_stdin(bytes, &dst, &[]);
    let check = assert_converted(&out, &dst, &raw);
    assert_eq!(check.get("compressed-clusters"), None, "qemu-img only counts them when there are some: {check}");
}

#[test]
fn a_stream_optimized_vmdk_converts_from_a_fifo() {
    let (dir, raw, bytes) = setup("streamOptimized");
    for (n, extra) in [[].as_slice(), ["--format", "vmdk"].as_slice()].into_iter().enumerate() {
        let fifo = dir.path().join(format!("in/pipe{n}"));
        run(Command::new("mkfifo").arg(&fifo));
        let dst = dir.path().join("out/disk.qcow2");
        let writer = {
            let (fifo, bytes) = (fifo.clone(), bytes.clone());
            // Opening blocks until hyper2kvm opens the other end.
            std::thread::spawn(move || std::fs::OpenOptions::new().write(true).open(fifo)?.write_all(&bytes))
        };
        let mut args: Vec<&OsStr> = vec![fifo.as_os_str(), OsStr::new("-o"), dst.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        let out = spawn_convert(&args).wait_with_output().unwrap();
        assert_converted(&out, &dst, &raw);
        writer.join().unwrap().expect("the whole stream was read");
        std::fs::remove_file(&dst).unwrap();
    }
}

/// qemu-img keeps its tables ahead of the grains and may end the file with the last grain,
/// with no end-of-stream marker: complete all the same, and one sector less is truncated. An
/// empty disk is its tables alone.
#[test]
fn a_qemu_stream_without_an_end_marker_converts_and_its_truncation_fails() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    create_raw(&raw, 8 << 20);
    // Incompressible: qemu-img then ends the file right after the last grain.
    write_noise(&raw, 0, 1 << 20, 11);
    write_noise(&raw, 7 << 20, 1 << 20, 12);
    let bytes = std::fs::read(raw_to_vmdk(&raw, &dir.path().join("disk.vmdk"), "streamOptimized")).unwrap();
    assert!(bytes[bytes.len() - 512..].iter().any(|&b| b != 0), "the file ends with a grain, not a marker");
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let dst = dir.path().join("out/disk.qcow2");
    assert_converted(&convert_stdin(bytes.clone(), &dst, &[]), &dst, &raw);
    std::fs::remove_file(&dst).unwrap();

    let out = convert_stdin(bytes[..bytes.len() - 512].to_vec(), &dst, &[]);
    assert!(!out.status.success() && stderr(&out).contains("truncated"), "{}", stderr(&out));
    assert_eq!(entries(&dir.path().join("out")), Vec::<String>::new(), "nothing written");

    let empty = dir.path().join("empty.raw");
    create_raw(&empty, 8 << 20);
    let bytes = std::fs::read(raw_to_vmdk(&empty, &dir.path().join("empty.vmdk"), "streamOptimized")).unwrap();
    let out = convert_stdin(bytes, &dst, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let check = check_json(&dst);
    assert_eq!(check["allocated-clusters"].as_u64().unwrap_or(0), 0, "qemu-img omits a zero count: {check}");
    assert_same_contents(&dst, "qcow2", &empty, "raw");
}

/// Set to 1 to skip the case that needs python3-vmdkstream when it is missing.
const ALLOW_MISSING_TOOLS: &str = "HYPER2KVM_ALLOW_MISSING_TOOLS";

/// VMware's shape (grain tables after their grains, the grain directory at the footer), as
/// Debian's python3-vmdkstream writes it.
#[test]
fn a_vmware_shaped_stream_converts_from_stdin() {
    let module = Command::new("/usr/bin/python3").args(["-c", "import VMDKstream"]).output();
    if !module.as_ref().is_ok_and(|o| o.status.success()) {
        if std::env::var(ALLOW_MISSING_TOOLS).as_deref() == Ok("1") {
            eprintln!("python3-vmdkstream is missing; {ALLOW_MISSING_TOOLS}=1: skipped");
            return;
        }
        panic!("python3-vmdkstream is missing: apt-get install python3-vmdkstream, or set {ALLOW_MISSING_TOOLS}=1");
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = data_raw(&dir.path().join("disk.raw"));
    let vmdk = dir.path().join("disk.vmdk");
    run(Command::new("/usr/bin/python3")
        .args(["-c", "import VMDKstream, sys; VMDKstream.convert_to_stream(sys.argv[1], sys.argv[2])"])
        .arg(&raw)
        .arg(&vmdk));
    let bytes = std::fs::read(&vmdk).unwrap();
    assert_eq!(&bytes[56..64], &[0xff; 8], "the grain directory is at the footer");
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let dst = dir.path().join("out/disk.qcow2");
    assert_converted(&convert_stdin(bytes, &dst, &[]), &dst, &raw);
}

#[test]
fn other_formats_from_a_pipe_are_refused_before_anything_is_written() {
    let (dir, raw, sparse) = setup("monolithicSparse");
    let dst = dir.path().join("out/disk.qcow2");
    let raw_bytes = std::fs::read(&raw).unwrap();
    let cases: [(&str, Vec<u8>, &[&str], &str); 3] = [
        ("monolithicSparse", sparse.clone(), &[], "monolithicSparse, not streamOptimized"),
        ("monolithicSparse as vmdk", sparse, &["--format", "vmdk"], "monolithicSparse, not streamOptimized"),
        ("raw", raw_bytes, &["--format", "raw"], "--format raw was given"),
    ];
    for (what, input, extra, why) in cases {
        let out = convert_stdin(input, &dst, extra);
        assert!(!out.status.success(), "{what}: refused");
        let err = stderr(&out);
        assert!(err.contains(&format!("standard input {NOT_STREAMABLE}")) && err.contains(why), "{what}: {err}");
        assert_eq!(entries(&dir.path().join("out")), Vec::<String>::new(), "{what}: nothing written");
    }
}

#[test]
fn a_truncated_stream_fails_and_leaves_nothing() {
    let (dir, _raw, bytes) = setup("streamOptimized");
    let dst = dir.path().join("out/disk.qcow2");
    // qemu-img pads the stream with zeros after its end-of-stream marker, so the cuts are
    // before: inside a grain, inside the first grain's marker, inside the header.
    let first_grain = u64::from_le_bytes(bytes[64..72].try_into().unwrap()) as usize * 512;
    for (len, says) in [(bytes.len() / 2, "truncated"), (first_grain + 6, "truncated"), (100, "not a VMDK")] {
        let out = convert_stdin(bytes[..len].to_vec(), &dst, &[]);
        assert!(!out.status.success(), "{len} bytes: fails: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{len} bytes: {}", stderr(&out));
        assert_eq!(entries(&dir.path().join("out")), Vec::<String>::new(), "{len} bytes: no DST, no temporary file");
    }
}

#[test]
fn compress_works_on_the_sequential_path() {
    let (dir, raw, bytes) = setup("streamOptimized");
    let dst = dir.path().join("out/disk.qcow2");
    let out = convert_stdin(bytes, &dst, &["--compress"]);
    let check = assert_converted(&out, &dst, &raw);
    let compressed = check["compressed-clusters"].as_u64().unwrap();
    assert!(compressed > 0, "compressed clusters are written: {check}");
}

/// A writer that stalls mid-stream must not keep SIGINT from ending the conversion and
/// removing its temporary file.
#[test]
fn an_interrupted_stream_ends_by_the_signal_and_leaves_nothing() {
    let (dir, _raw, bytes) = setup("streamOptimized");
    let out_dir = dir.path().join("out");
    let mut child = spawn_convert(&[OsStr::new("-"), OsStr::new("-o"), out_dir.join("disk.qcow2").as_os_str()]);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(&bytes[..bytes.len() / 2]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while entries(&out_dir).is_empty() {
        assert!(Instant::now() < deadline, "the temporary file never appeared");
        assert!(child.try_wait().unwrap().is_none(), "the conversion ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    // stdin stays open: the conversion waits for bytes that never come.
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.signal(), Some(libc::SIGINT), "ends as SIGINT would: {}", stderr(&out));
    assert!(stderr(&out).contains("interrupted by SIGINT"), "{}", stderr(&out));
    assert_eq!(entries(&out_dir), Vec::<String>::new(), "no DST, no temporary file");
}
