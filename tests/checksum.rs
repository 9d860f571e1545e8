//! Issue 13: the manifest's `checksum` is taken in the conversion's own pass over the source,
//! and still enforced for every input shape the native engine reads: a right one is verified
//! (`source_checksum_verified` in `V.json`), a wrong one — found at the end of the pass — ends
//! at the same `.error` as before and nothing else is published. A source written to during
//! the pass fails the job.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fixtures::{self, assert_same_contents, raw_to_vmdk, small_raw};
use common::*;
use serde_json::{json, Value};

const SAMPLE_OVA: &str = "tests/data/ova/vsphere-ustar.ova";

/// Every shape: (name, source_format, the file the manifest names). The checksum covers that
/// file: the descriptor of a flat or split VMDK, the child of a delta chain, the whole OVA.
fn shapes(exports: &Path) -> Vec<(&'static str, &'static str, PathBuf)> {
    let raw = small_raw(&exports.join("src/disk.raw"));
    let vmdk = |sub: &str, dir: &str| raw_to_vmdk(&raw, &exports.join(dir).join("disk.vmdk"), sub);
    let (_, child) = fixtures::delta_chain(&exports.join("chain"), &raw);
    let ova = exports.join("ova/appliance.ova");
    fs::create_dir_all(ova.parent().unwrap()).unwrap();
    fs::copy(SAMPLE_OVA, &ova).unwrap();
    vec![
        ("raw", "raw", raw.clone()),
        ("stream", "vmdk", vmdk("streamOptimized", "stream")),
        ("sparse", "vmdk", vmdk("monolithicSparse", "sparse")),
        ("flat", "vmdk", vmdk("monolithicFlat", "flat")),
        ("split", "vmdk", vmdk("twoGbMaxExtentSparse", "split")),
        ("chain", "vmdk", child),
        ("ova", "ova", ova),
    ]
}

/// The data disk of the sample OVA, named by the OVF.
fn extra_outputs(shape: &str, vm: &str) -> Vec<String> {
    if shape == "ova" {
        vec![format!("{vm}-vmdisk2.qcow2")]
    } else {
        Vec::new()
    }
}

#[test]
fn a_wrong_checksum_publishes_only_the_error_for_every_shape() {
    let env = Env::new();
    let shapes = shapes(&env.exports);
    let other = env.exports.join("other.bin");
    fs::write(&other, b"not the disk").unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    for (shape, format, path) in &shapes {
        let vm = format!("bad-{shape}");
        let mut d = disk("disk-0", format, path);
        // A real SHA-256, of another file.
        d["checksum"] = json!(format!("sha256:{}", sha256_file(&other)));
        let first = s.convert_err(&manifest(&vm, vec![d]), &vm);
        assert!(
            first.starts_with("Disk disk-0 does not match its checksum (expected sha256:"),
            "{shape}: the .error's first line is the checksum's: {first}"
        );
        assert!(first.contains(&sha256_file(path)), "{shape}: it names the digest found: {first}");
        for name in [format!("{vm}.json"), format!("{vm}.xml")].into_iter().chain(extra_outputs(shape, &vm)) {
            assert!(!s.env.output.join(&name).exists(), "{shape}: {name} was published beside the .error");
        }
    }
    s.assert_output();
    s.finish();
}

#[test]
fn a_right_checksum_is_verified_in_the_pass_for_every_shape() {
    let env = Env::new();
    let shapes = shapes(&env.exports);
    let mut s = Session::start_in(env, &[], &[]);
    for (shape, format, path) in &shapes {
        let vm = format!("good-{shape}");
        let m = manifest(&vm, vec![disk_with_checksum("disk-0", format, path)]);
        let extra = extra_outputs(shape, &vm);
        hypersdk_submit(&s.daemon, &s.env, &m);
        match hypersdk_wait(&s.daemon, &s.env, &vm, &extra) {
            Outcome::Success { .. } => {}
            Outcome::Failed(text) => s.daemon.fail(&format!("{shape}: a right checksum failed the job:\n{text}")),
        }
        let report: Value =
            serde_json::from_slice(&fs::read(s.env.output.join(format!("{vm}.json"))).unwrap()).unwrap();
        let boot = &report["disks"][0];
        // An OVA's disks are its members: the checksum is the archive's, not theirs.
        assert_eq!(boot["source_checksum_verified"], *format != "ova", "{shape}: {boot}");
        assert!(boot.get("sha256").is_none(), "{shape}: no digest of the output, which needs a read-back");
        assert_eq!(boot["output_check"], "qemu-img check: no errors", "{shape}: {boot}");
        if *format != "ova" {
            let raw = s.env.exports.join("src/disk.raw");
            let want = if *shape == "chain" { None } else { Some(raw) };
            if let Some(raw) = want {
                assert_same_contents(&s.env.output.join(format!("{vm}.qcow2")), "qcow2", &raw, "raw");
            }
        }
        s.expected.extend([format!("{vm}.qcow2"), format!("{vm}.json"), format!("{vm}.xml")]);
        s.expected.extend(extra);
    }
    s.finish();
}

/// A source written to while the job converts it: the job fails with an `.error` that says
/// so, and nothing is published — whatever the bytes, the digest and the conversion may no
/// longer be of the same data.
#[test]
fn a_source_written_to_during_the_pass_fails_the_job() {
    let env = Env::new();
    let slow = fixtures::slow_disk(&env.exports);
    let mut m = manifest("moving", vec![disk_with_checksum("disk-0", "raw", &slow)]);
    // Compressing 512 MiB of random data keeps the pass busy for seconds.
    m["pipeline"]["convert"]["compress"] = json!(true);
    let mut s = Session::start_in(env, &[], &[]);
    hypersdk_submit(&s.daemon, &s.env, &m);
    let staging = s.env.output.join(".hyper2kvm-tmp");
    wait_for(&s.daemon, Duration::from_secs(120), "the conversion to start", || {
        files_under(&staging).iter().any(|f| f.extension().is_some_and(|e| e == "qcow2"))
    });
    let file = fs::OpenOptions::new().write(true).open(&slow).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"a late write", 300 << 20).unwrap();
    drop(file);
    let first = s.expect_err("moving");
    assert!(
        first.starts_with("Disk disk-0 source file") && first.contains("changed while it was being converted"),
        "the .error says the source changed: {first}"
    );
    for name in ["moving.json", "moving.xml"] {
        assert!(!s.env.output.join(name).exists(), "{name} was published beside the .error");
    }
    s.finish();
}
