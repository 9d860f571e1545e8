//! Every contract error, through the real daemon: the `.error` file's first line says what is
//! wrong in words a person can act on, its later lines name the job and the stage, nothing is
//! published for the failed VM, and the SAME daemon then still converts a good manifest.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use common::fixtures::*;
use common::*;
use serde_json::{json, Value};

/// Submits `bad`, expects `<error_name>.error` whose first line satisfies `check`, then a good
/// manifest on the same daemon, then a clean stop.
fn bad_then_good(mut s: Session, bad: &Value, error_name: &str, what: &str, check: impl Fn(&str) -> bool) {
    let first = s.convert_err(bad, error_name);
    if !check(&first) {
        s.daemon.fail(&format!("{error_name}.error first line should {what}; it is:\n{first}"));
    }
    good_after(s);
}

/// The daemon still serves: a valid manifest converts. Then a clean stop.
fn good_after(mut s: Session) {
    let good = s.good_manifest("good-vm");
    s.convert_ok(&good);
    s.finish();
}

/// A valid monolithicSparse VMDK under `dir`.
fn valid_vmdk(dir: &Path) -> std::path::PathBuf {
    let raw = small_raw(&dir.join("disk.raw"));
    raw_to_vmdk(&raw, &dir.join("disk-0.vmdk"), "monolithicSparse")
}

#[test]
fn partial_json_left_behind_is_failed_after_the_grace() {
    let mut s = Session::start(&[], &[]);
    let vmdk = valid_vmdk(&s.env.exports.join("p"));
    let m = manifest("half-vm", vec![disk("disk-0", "vmdk", &vmdk)]);
    let bytes = serde_json::to_vec_pretty(&m).unwrap();
    wait_for(&s.daemon, Duration::from_secs(30), "the watch directory", || {
        s.env.queue.is_dir() && s.env.output.is_dir()
    });
    // HyperSDK died half-way through its write.
    fs::write(s.env.queue.join(MANIFEST_NAME), &bytes[..bytes.len() / 2]).unwrap();
    let first = s.expect_err("artifact-manifest");
    assert!(first.starts_with("The manifest is not valid JSON"), "artifact-manifest.error first line: {first}");
    assert!(!s.env.output.join("half-vm.error").exists());
    assert!(!s.env.output.join("half-vm.qcow2").exists());
    good_after(s);
}

#[test]
fn wrong_manifest_version() {
    let s = Session::start(&[], &[]);
    let vmdk = valid_vmdk(&s.env.exports.join("v"));
    let mut m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &vmdk)]);
    m["manifest_version"] = json!("2.0");
    bad_then_good(s, &m, "bad-vm", "mention manifest_version", |l| l.contains("manifest_version"));
}

#[test]
fn no_disks() {
    let s = Session::start(&[], &[]);
    let m = manifest("bad-vm", vec![]);
    bad_then_good(s, &m, "bad-vm", "say there are no disks", |l| l.contains("no disks"));
}

#[test]
fn bad_disk_id() {
    let s = Session::start(&[], &[]);
    let vmdk = valid_vmdk(&s.env.exports.join("i"));
    let m = manifest("bad-vm", vec![disk("../x", "vmdk", &vmdk)]);
    bad_then_good(s, &m, "bad-vm", "start with \"Disk id\"", |l| l.starts_with("Disk id"));
}

#[test]
fn path_outside_source_roots() {
    let mut s = Session::start(&[], &[]);
    // A perfectly good disk, but outside SOURCE_ROOTS.
    let outside = valid_vmdk(&s.env.elsewhere);
    let m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &outside)]);
    let first = s.convert_err(&m, "bad-vm");
    assert!(first.contains("outside SOURCE_ROOTS"), "bad-vm.error first line: {first}");
    // A system file.
    let sys = ["/etc/hostname", "/etc/passwd"].into_iter().find(|p| Path::new(p).is_file()).unwrap();
    let m = manifest("bad-vm2", vec![disk("disk-0", "raw", Path::new(sys))]);
    let first = s.convert_err(&m, "bad-vm2");
    assert!(first.contains("outside SOURCE_ROOTS"), "bad-vm2.error first line: {first}");
    good_after(s);
}

#[test]
fn symlink_inside_exports_pointing_outside() {
    let mut s = Session::start(&[], &[]);
    let outside = valid_vmdk(&s.env.elsewhere);
    let link = s.env.exports.join("link.vmdk");
    symlink(&outside, &link).unwrap();
    let m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &link)]);
    let first = s.convert_err(&m, "bad-vm");
    assert!(first.contains("outside SOURCE_ROOTS"), "bad-vm.error first line: {first}");
    // A symlinked directory.
    symlink(&s.env.elsewhere, s.env.exports.join("linkdir")).unwrap();
    let via_dir = s.env.exports.join("linkdir").join(outside.file_name().unwrap());
    assert!(via_dir.is_file());
    let m = manifest("bad-vm2", vec![disk("disk-0", "vmdk", &via_dir)]);
    let first = s.convert_err(&m, "bad-vm2");
    assert!(first.contains("outside SOURCE_ROOTS"), "bad-vm2.error first line: {first}");
    good_after(s);
}

#[test]
fn vmdk_extent_outside_source_roots() {
    let mut s = Session::start(&[], &[]);
    let raw = small_raw(&s.env.exports.join("r/disk.raw"));
    // Descriptor inside, extent given by absolute path outside.
    let abs = flat_descriptor_pointing_outside(
        &raw,
        &s.env.elsewhere.join("a"),
        &s.env.exports.join("abs"),
        ExtentRef::Absolute,
    );
    let m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &abs)]);
    let first = s.convert_err(&m, "bad-vm");
    assert!(first.contains("outside SOURCE_ROOTS"), "bad-vm.error (absolute extent) first line: {first}");
    // Descriptor inside, extent "../../elsewhere/x-flat.vmdk".
    let rel = flat_descriptor_pointing_outside(&raw, &s.env.elsewhere, &s.env.exports.join("rel"), ExtentRef::Relative);
    assert!(fs::read_to_string(&rel).unwrap().contains("\"../../elsewhere/x-flat.vmdk\""));
    let m = manifest("bad-vm2", vec![disk("disk-0", "vmdk", &rel)]);
    let first = s.convert_err(&m, "bad-vm2");
    assert!(first.contains("outside SOURCE_ROOTS"), "bad-vm2.error (relative extent) first line: {first}");
    good_after(s);
}

/// Not in the brief's list, same rule: a delta VMDK inside whose parent is outside.
#[test]
fn vmdk_parent_outside_source_roots() {
    let s = Session::start(&[], &[]);
    let raw = small_raw(&s.env.elsewhere.join("disk.raw"));
    let base = raw_to_vmdk(&raw, &s.env.elsewhere.join("base.vmdk"), "monolithicSparse");
    let child = child_of(&s.env.exports.join("c"), &base, "child.vmdk");
    let m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &child)]);
    bad_then_good(s, &m, "bad-vm", "name SOURCE_ROOTS", |l| l.contains("outside SOURCE_ROOTS"));
}

#[test]
fn missing_file() {
    let s = Session::start(&[], &[]);
    let m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &s.env.exports.join("nope/disk-0.vmdk"))]);
    bad_then_good(s, &m, "bad-vm", "say the file does not exist", |l| l.contains("does not exist"));
}

#[test]
fn checksum_mismatch() {
    let s = Session::start(&[], &[]);
    let dir = s.env.exports.join("c");
    let vmdk = valid_vmdk(&dir);
    let mut d = disk("disk-0", "vmdk", &vmdk);
    // A real SHA-256, of the wrong file.
    d["checksum"] = json!(format!("sha256:{}", sha256_file(&dir.join("disk.raw"))));
    let m = manifest("bad-vm", vec![d]);
    bad_then_good(s, &m, "bad-vm", "mention the checksum", |l| l.contains("checksum"));
}

fn unreadable_vmdk(corrupt: fn(&Path)) {
    let mut s = Session::start(&[], &[]);
    let dir = s.env.exports.join("b");
    let vmdk = valid_vmdk(&dir);
    corrupt(&vmdk);
    let m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &vmdk)]);
    hypersdk_submit(&s.daemon, &s.env, &m);
    match hypersdk_wait(&s.daemon, &s.env, "bad-vm", &[]) {
        Outcome::Failed(_) => {}
        Outcome::Success { .. } => {
            // Say how bad it is: does the published image hold the disk's data?
            let out = s.env.output.join("bad-vm.qcow2");
            let (code, text) = compare_status(&out, "qcow2", &dir.join("disk.raw"), "raw");
            s.daemon.fail(&format!(
                "expected bad-vm.error for a broken VMDK, but bad-vm.qcow2 was published; \
                 qemu-img compare against the original disk exits {code} ({}): {}",
                if code == 0 { "same data" } else { "DATA DIFFERS: silent corruption" },
                text.trim()
            ));
        }
    }
    let first = s.expect_err("bad-vm");
    if !(first.starts_with("Disk disk-0") && first.contains("not a readable")) {
        s.daemon.fail(&format!(
            "bad-vm.error first line should start with \"Disk disk-0\" and say it is not a readable image; it is:\n{first}"
        ));
    }
    good_after(s);
}

#[test]
fn truncated_vmdk() {
    unreadable_vmdk(truncate_half);
}

#[test]
fn corrupt_vmdk_header_magic() {
    unreadable_vmdk(corrupt_magic);
}

#[test]
fn corrupt_vmdk_grain_directory() {
    unreadable_vmdk(corrupt_grain_directory);
}

/// Names that are not a safe single path component: no `.error` in OUTPUT_DIR (nor next to
/// it); the failure is recorded under `.hyper2kvm/failed/` and shown by `status --json`.
#[test]
fn unsafe_vm_names_get_no_error_file() {
    let s = Session::start(&[], &[]);
    let vmdk = valid_vmdk(&s.env.exports.join("u"));
    for (n, name) in ["../evil", ".hidden"].iter().enumerate() {
        let m = manifest(name, vec![disk("disk-0", "vmdk", &vmdk)]);
        hypersdk_submit(&s.daemon, &s.env, &m);
        wait_for(&s.daemon, RESULT_TIMEOUT, "the unsafe manifest to be taken", || {
            !s.env.queue.join(MANIFEST_NAME).exists()
        });
        let failed = |st: &Value| {
            st["jobs"].as_array().map(|j| j.iter().filter(|j| j["state"] == "failed").count()).unwrap_or(0)
        };
        let start = std::time::Instant::now();
        loop {
            let st = s.env.status();
            if failed(&st) > n {
                let job = st["jobs"].as_array().unwrap().iter().find(|j| j["vm_name"] == *name).cloned();
                let error = job.as_ref().and_then(|j| j["error"].as_str()).unwrap_or_default().to_owned();
                let why = if name.contains('/') { "it contains '/'" } else { "it starts with '.'" };
                assert!(
                    error.starts_with(&format!("source.vm_name {name:?} cannot name the result files because {why}")),
                    "the recorded error names the field and the reason: {job:#?}"
                );
                break;
            }
            s.daemon.assert_running();
            if start.elapsed() > RESULT_TIMEOUT {
                s.daemon.fail(&format!("status --json never showed the failed job for {name:?}:\n{st:#}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Nothing named like them in OUTPUT_DIR (any depth) or its parent.
    let mut bad: Vec<String> =
        list_tree(&s.env.output).into_iter().filter(|p| p.contains("evil") || p.contains("hidden")).collect();
    bad.extend(
        fs::read_dir(&s.env.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("evil") || n.contains("hidden")),
    );
    if !bad.is_empty() {
        s.daemon.fail(&format!("unsafe vm_name results were written: {bad:?}"));
    }
    // Recorded under the hidden state dir.
    let failed_dir = s.env.queue.join(".hyper2kvm").join("failed");
    if files_under(&failed_dir).is_empty() {
        s.daemon.fail(&format!(
            "nothing recorded under {}; state tree: {:?}",
            failed_dir.display(),
            list_tree(&s.env.queue.join(".hyper2kvm"))
        ));
    }
    s.assert_output();
    good_after(s);
}

#[test]
fn output_format_not_qcow2() {
    let s = Session::start(&[], &[]);
    let vmdk = valid_vmdk(&s.env.exports.join("o"));
    let mut m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &vmdk)]);
    m["output"]["format"] = json!("vmdk");
    bad_then_good(s, &m, "bad-vm", "mention qcow2", |l| l.contains("qcow2"));
}

#[test]
fn conversion_disabled() {
    let s = Session::start(&[], &[]);
    let vmdk = valid_vmdk(&s.env.exports.join("d"));
    let mut m = manifest("bad-vm", vec![disk("disk-0", "vmdk", &vmdk)]);
    m["pipeline"]["convert"]["enabled"] = json!(false);
    bad_then_good(s, &m, "bad-vm", "mention pipeline.convert.enabled", |l| l.contains("pipeline.convert.enabled"));
}

/// TEMP_DIR became unusable after start-up (here: a file where the directory was): the daemon
/// claims nothing while it is so (a job could not even stage its `.error`), and converts the
/// waiting manifest once TEMP_DIR is back. (A TEMP_DIR that breaks between that check and a
/// claim still gets the job an `.error`, staged in OUTPUT_DIR itself.)
#[test]
fn a_job_that_cannot_stage_waits_for_temp_dir() {
    let mut s = Session::start(&[], &[]);
    let vmdk = valid_vmdk(&s.env.exports.join("t"));
    let temp = s.env.output.join(".hyper2kvm-tmp");
    wait_for(&s.daemon, Duration::from_secs(30), "TEMP_DIR", || temp.is_dir());
    fs::remove_dir_all(&temp).unwrap();
    fs::write(&temp, b"not a directory").unwrap();
    let restore = {
        let temp = temp.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            fs::remove_file(&temp).unwrap();
        })
    };
    s.convert_ok(&manifest("stageless-vm", vec![disk("disk-0", "vmdk", &vmdk)]));
    restore.join().unwrap();
    assert!(
        s.daemon.log().contains("not claiming new jobs: TEMP_DIR"),
        "the daemon must have waited for TEMP_DIR:\n{}",
        s.daemon.log()
    );
    let hidden: Vec<String> = list_tree(&s.env.output).into_iter().filter(|p| p.contains("hyper2kvm-error")).collect();
    assert!(hidden.is_empty(), "no fallback staging directory is left: {hidden:?}");
    good_after(s);
}

/// `qemu-img create -f qcow2 -o data_file=x.raw,data_file_raw=on` in `dir`, then, given
/// `amend_to`, the data file pointed there with `qemu-img amend`.
fn qcow2_with_data_file(dir: &Path, amend_to: Option<&Path>) -> std::path::PathBuf {
    fs::create_dir_all(dir).unwrap();
    let image = dir.join("x.qcow2");
    let made = std::process::Command::new("qemu-img")
        .current_dir(dir)
        .args(["create", "-q", "-f", "qcow2", "-o", "data_file=x.raw,data_file_raw=on", "x.qcow2", "1M"])
        .status()
        .unwrap();
    assert!(made.success());
    if let Some(data_file) = amend_to {
        // qemu-img resolves the current data file against its working directory.
        let amended = std::process::Command::new("qemu-img")
            .current_dir(dir)
            .args(["amend", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", data_file.display()))
            .arg(&image)
            .status()
            .unwrap();
        assert!(amended.success());
    }
    image
}

/// A qcow2 whose backing file is `backing` (not checked: `-u`).
fn qcow2_backed_by(path: &Path, backing: &str) -> std::path::PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", backing])
        .arg(path)
        .arg("1M")
        .status()
        .unwrap();
    assert!(made.success(), "qemu-img create -b {backing}");
    path.to_owned()
}

/// Issue 10: VMDK extents and parents outside SOURCE_ROOTS are refused by name before they are
/// opened; no byte or size of the outside file reaches the `.error`.
#[test]
fn vmdk_references_outside_are_refused_before_being_read() {
    let mut s = Session::start(&[], &[]);
    // 1234 bytes that start like /etc/shadow.
    let secret = s.env.elsewhere.join("shadow");
    fs::write(&secret, format!("rootSECRET{}", "x".repeat(1224))).unwrap();
    let dir = s.env.exports.join("hostile");
    fs::create_dir_all(&dir).unwrap();
    let descriptor = |name: &str, body: &str| {
        let path = dir.join(name);
        let text = format!("# Disk DescriptorFile\nversion=1\nCID=00000001\n{body}\ncreateType=\"vmfs\"\n");
        fs::write(&path, text).unwrap();
        path
    };
    let cases = [
        ("sparse-vm", format!("parentCID=ffffffff\nRW 2048 SPARSE \"{}\"", secret.display())),
        ("flat-vm", format!("parentCID=ffffffff\nRW 4 FLAT \"{}\" 0", secret.display())),
        ("parent-vm", format!("parentCID=12345678\nparentFileNameHint=\"{}\"\nRW 2048 ZERO", secret.display())),
    ];
    for (vm, body) in &cases {
        let vmdk = descriptor(&format!("{vm}.vmdk"), body);
        let first = s.convert_err(&manifest(vm, vec![disk("disk-0", "vmdk", &vmdk)]), vm);
        assert!(first.contains("outside SOURCE_ROOTS"), "{vm}.error first line: {first}");
        let whole = fs::read_to_string(s.env.output.join(format!("{vm}.error"))).unwrap();
        for leak in ["\"root\"", "SECRET", "1234"] {
            assert!(!whole.contains(leak), "{vm}.error shows {leak} of the outside file:\n{whole}");
        }
    }
    good_after(s);
}

/// Issue 10: a qcow2 external data file outside SOURCE_ROOTS is refused; its bytes are never
/// converted. One inside the roots, next to the image, converts.
#[test]
fn qcow2_data_file_outside_source_roots() {
    let mut s = Session::start(&[], &[]);
    let secret = s.env.elsewhere.join("secret.raw");
    fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    let image = qcow2_with_data_file(&s.env.exports.join("d"), Some(&secret));
    let first = s.convert_err(&manifest("data-vm", vec![disk("disk-0", "qcow2", &image)]), "data-vm");
    assert!(first.contains("outside SOURCE_ROOTS"), "data-vm.error first line: {first}");
    // The same shape with the data file inside the roots converts it (the usual checks compare
    // the result with the source through qemu-img).
    let ok = s.env.exports.join("ok");
    let image = qcow2_with_data_file(&ok, Some(&ok.join("x.raw")));
    fs::write(ok.join("x.raw"), vec![0x3c; 1 << 20]).unwrap();
    s.convert_ok(&manifest("data-ok", vec![disk("disk-0", "qcow2", &image)]));
    s.finish();
}

/// Issue 10: backing files are judged before anything opens them: an `nbd://` or `json:`
/// backing makes no connection, a FIFO backing does not hang the job.
#[test]
fn qcow2_backing_files_are_not_opened_before_confinement() {
    let mut s = Session::start(&[], &[]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = s.env.exports.join("b");
    let nbd = qcow2_backed_by(&dir.join("nbd.qcow2"), &format!("nbd://127.0.0.1:{port}/x"));
    let json = qcow2_backed_by(
        &dir.join("json.qcow2"),
        &format!("json:{{\"driver\":\"nbd\",\"server\":{{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"{port}\"}},\"export\":\"x\"}}"),
    );
    nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fifo = qcow2_backed_by(&dir.join("fifo.qcow2"), "fifo");
    for (vm, image, says) in [
        ("nbd-vm", &nbd, "not a plain file"),
        ("json-vm", &json, "not a plain file"),
        ("fifo-vm", &fifo, "regular file"),
    ] {
        let started = std::time::Instant::now();
        let first = s.convert_err(&manifest(vm, vec![disk("disk-0", "qcow2", image)]), vm);
        assert!(first.contains(says), "{vm}.error first line: {first}");
        assert!(started.elapsed() < Duration::from_secs(30), "{vm} took {:?}", started.elapsed());
    }
    assert!(listener.accept().is_err(), "qemu-img connected to the nbd backing before it was refused");
    good_after(s);
}

/// Issue 10: with SOURCE_ROOTS covering OUTPUT_DIR (as the default, WATCH_DIR's parent, does
/// when they are siblings), another VM's published qcow2 is not a source: not copied, and not
/// deleted by CLEANUP_SOURCE.
#[test]
fn a_published_result_is_not_a_source() {
    let env = Env::new();
    let root = env.root.to_string_lossy().into_owned();
    let mut s = Session::start_in(env, &[("SOURCE_ROOTS", &root), ("CLEANUP_SOURCE", "true")], &[]);
    // Converted without the usual checks, which compare with a source CLEANUP_SOURCE removed.
    let good = s.good_manifest("web");
    hypersdk_submit(&s.daemon, &s.env, &good);
    assert!(matches!(hypersdk_wait(&s.daemon, &s.env, "web", &[]), Outcome::Success { .. }));
    let published = s.env.output.join("web.qcow2");
    let m = manifest("thief", vec![disk("disk-0", "qcow2", &published)]);
    hypersdk_submit(&s.daemon, &s.env, &m);
    let Outcome::Failed(text) = hypersdk_wait(&s.daemon, &s.env, "thief", &[]) else {
        s.daemon.fail("another VM's published qcow2 was converted")
    };
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains("inside OUTPUT_DIR"), "thief.error first line: {first}");
    assert!(published.is_file(), "CLEANUP_SOURCE removed another VM's result");
    s.daemon.stop();
}
