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
