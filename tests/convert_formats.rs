//! End-to-end conversions: the real daemon, driven exactly as HyperSDK drives it, over real
//! images made by qemu-img. Every output is checked with `qemu-img check` and
//! `qemu-img compare` against its source.

mod common;

use common::fixtures::{self, *};
use common::*;
use serde_json::json;

/// The three single-file VMDK subformats, one daemon serving them one after another (it must
/// keep serving, and the fixed manifest name must become free each time).
#[test]
fn vmdk_single_file_subformats() {
    let mut s = Session::start(&[], &[]);
    let dir = s.env.exports.join("single");
    let raw = small_raw(&dir.join("disk.raw"));
    for (i, sub) in ["monolithicSparse", "monolithicFlat", "streamOptimized"].iter().enumerate() {
        let vmdk = raw_to_vmdk(&raw, &dir.join(format!("{sub}.vmdk")), sub);
        // Checksums on the single-file sparse formats (the whole image is local_path).
        let d = if *sub == "monolithicFlat" {
            disk("disk-0", "vmdk", &vmdk)
        } else {
            disk_with_checksum("disk-0", "vmdk", &vmdk)
        };
        let m = manifest(&format!("vm-{i}-{sub}"), vec![d]);
        s.convert_ok(&m);
    }
    s.finish();
}

/// twoGbMaxExtentSparse and twoGbMaxExtentFlat over a 4.5 GiB disk: three extents each, data
/// in every extent and across the first extent boundary.
#[test]
fn vmdk_two_gb_extent_subformats() {
    let mut s = Session::start(&[], &[]);
    let dir = s.env.exports.join("big");
    let raw = big_raw(&dir.join("big.raw"));
    let sparse = raw_to_vmdk(&raw, &dir.join("bigs.vmdk"), "twoGbMaxExtentSparse");
    let flat = raw_to_vmdk(&raw, &dir.join("bigf.vmdk"), "twoGbMaxExtentFlat");
    assert_eq!(files_starting_with(&dir, "bigs-s").len(), 3);
    assert_eq!(files_starting_with(&dir, "bigf-f").len(), 3);
    s.convert_ok(&manifest("big-sparse", vec![disk("disk-0", "vmdk", &sparse)]));
    s.convert_ok(&manifest("big-flat", vec![disk("disk-0", "vmdk", &flat)]));
    s.finish();
}

/// A delta (child) VMDK whose parent is named relatively: the output is the flattened child.
#[test]
fn vmdk_delta_chain_is_flattened() {
    let mut s = Session::start(&[], &[]);
    let raw = small_raw(&s.env.exports.join("disk.raw"));
    let (base, child) = delta_chain(&s.env.exports.join("chain"), &raw);
    // compare(out, child) is done by verify_success since local_path is the child.
    s.convert_ok(&manifest("chain-vm", vec![disk("disk-0", "vmdk", &child)]));
    // The output is standalone: no backing file.
    let info = qemu_img_info(&s.env.output.join("chain-vm.qcow2"), Some("qcow2"));
    assert!(info.get("backing-filename").is_none(), "output still has a backing file: {info}");
    // The report keeps what the source said about itself: its chain and VMware's ddb keys.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.env.output.join("chain-vm.json")).unwrap()).unwrap();
    let disk = &report["disks"][0];
    let chain: Vec<&str> = disk["chain"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(chain.contains(&base.to_str().unwrap()), "the chain names the base disk: {disk:#}");
    assert!(disk["ddb"].as_object().unwrap().keys().any(|k| k.contains("adapterType")), "{disk:#}");
    assert!(disk["allocated_bytes"].as_u64().unwrap() > 0, "{disk:#}");
    s.finish();
}

/// source_format raw (with checksum) and qcow2.
#[test]
fn raw_and_qcow2_inputs() {
    let mut s = Session::start(&[], &[]);
    let dir = s.env.exports.join("rawvm");
    let raw = small_raw(&dir.join("disk-0.img"));
    s.convert_ok(&manifest("raw-vm", vec![disk_with_checksum("disk-0", "raw", &raw)]));
    let q = raw_to_qcow2(&raw, &dir.join("disk-0.qcow2"));
    s.convert_ok(&manifest("qcow2-vm", vec![disk("disk-0", "qcow2", &q)]));
    s.finish();
}

/// A boot disk plus a data disk, as HyperSDK writes them (boot disk without boot_order_hint):
/// `V-disk-1.qcow2` is published before `V.qcow2`. Then a VM with no disk_type at all where
/// the boot disk is chosen by hint (missing hint counts as 0) although it is listed second.
/// This daemon also uses inotify.
#[test]
fn two_disk_vm_publishes_boot_disk_last() {
    let mut s = Session::start(&[("USE_INOTIFY", "true")], &[]);
    let dir = s.env.exports.join("two");
    let boot_raw = small_raw(&dir.join("boot.raw"));
    let data_raw = fixtures::data_raw(&dir.join("data.raw"));
    let boot = raw_to_vmdk(&boot_raw, &dir.join("disk-0.vmdk"), "monolithicSparse");
    let data = raw_to_vmdk(&data_raw, &dir.join("disk-1.vmdk"), "streamOptimized");

    let m =
        manifest("two-disk", vec![disk_with_checksum("disk-0", "vmdk", &boot), data_disk("disk-1", "vmdk", &data, 1)]);
    let outcome = convert_ok(&s.daemon, &s.env, &m);
    match &outcome {
        Outcome::Success { qcow2_seen, others_seen } => {
            assert_eq!(others_seen.len(), 1, "{others_seen:?}");
            assert_eq!(others_seen[0].0, "two-disk-disk-1.qcow2");
            assert!(others_seen[0].1 <= *qcow2_seen, "data disk appeared after the boot disk");
        }
        Outcome::Failed(t) => s.daemon.fail(t),
    }
    let (job, names) = verify_success(&s.daemon, &s.env, &m, &outcome);
    assert!(!job.is_empty());
    // Boot disk content is the boot source, data disk the data source (not swapped).
    assert_converted(&s.daemon, &s.env.output.join("two-disk.qcow2"), &boot_raw, "raw");
    assert_converted(&s.daemon, &s.env.output.join("two-disk-disk-1.qcow2"), &data_raw, "raw");
    s.expected.extend(names);
    s.note_job(&job);
    s.assert_output();

    // Boot disk by hint: listed second, no hint and no disk_type → it is the boot disk.
    let mut d_a = disk("disk-a", "vmdk", &data);
    d_a["disk_type"] = json!("unknown");
    d_a["boot_order_hint"] = json!(1);
    let mut d_b = disk("disk-b", "vmdk", &boot);
    d_b.as_object_mut().unwrap().remove("disk_type");
    let m2 = manifest("by-hint", vec![d_a, d_b]);
    assert_eq!(boot_index(&m2), 1);
    s.convert_ok(&m2);
    assert_converted(&s.daemon, &s.env.output.join("by-hint.qcow2"), &boot_raw, "raw");
    assert_converted(&s.daemon, &s.env.output.join("by-hint-disk-a.qcow2"), &data_raw, "raw");
    s.finish();
}

fn compressed_clusters(s: &Session, path: &std::path::Path) -> u64 {
    let check = qemu_img_check(&s.daemon, path);
    check["compressed-clusters"].as_u64().unwrap_or(0)
}

/// QEMU_CONVERT_OPTIONS="-O qcow2 -c": compressed (zlib) clusters, still a faithful copy.
#[test]
fn compressed_output_zlib() {
    let mut s = Session::start(&[("QEMU_CONVERT_OPTIONS", "-O qcow2 -c")], &[]);
    let raw = small_raw(&s.env.exports.join("z/disk.raw"));
    let vmdk = raw_to_vmdk(&raw, &s.env.exports.join("z/disk.vmdk"), "monolithicSparse");
    s.convert_ok(&manifest("zlib-vm", vec![disk("disk-0", "vmdk", &vmdk)]));
    let out = s.env.output.join("zlib-vm.qcow2");
    let n = compressed_clusters(&s, &out);
    assert!(n > 0, "no compressed clusters in {} with -c", out.display());
    let info = qemu_img_info(&out, Some("qcow2"));
    let ctype = info["format-specific"]["data"]["compression-type"].as_str().unwrap_or("zlib").to_owned();
    assert_eq!(ctype, "zlib", "{info}");
    s.finish();
}

/// QEMU_CONVERT_OPTIONS="-c -o compression_type=zstd".
#[test]
fn compressed_output_zstd() {
    let mut s = Session::start(&[("QEMU_CONVERT_OPTIONS", "-c -o compression_type=zstd")], &[]);
    let raw = small_raw(&s.env.exports.join("z/disk.raw"));
    let vmdk = raw_to_vmdk(&raw, &s.env.exports.join("z/disk.vmdk"), "streamOptimized");
    s.convert_ok(&manifest("zstd-vm", vec![disk("disk-0", "vmdk", &vmdk)]));
    let out = s.env.output.join("zstd-vm.qcow2");
    let n = compressed_clusters(&s, &out);
    assert!(n > 0, "no compressed clusters in {} with -c", out.display());
    let info = qemu_img_info(&out, Some("qcow2"));
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd", "{info}");
    s.finish();
}

/// vm_name is used verbatim, spaces included: "Ubuntu Server 22.qcow2".
#[test]
fn vm_name_with_spaces_is_used_verbatim() {
    let mut s = Session::start(&[], &[]);
    let raw = small_raw(&s.env.exports.join("ubuntu/disk.raw"));
    let vmdk = raw_to_vmdk(&raw, &s.env.exports.join("ubuntu/disk-0.vmdk"), "monolithicSparse");
    s.convert_ok(&manifest("Ubuntu Server 22", vec![disk_with_checksum("disk-0", "vmdk", &vmdk)]));
    assert!(s.env.output.join("Ubuntu Server 22.qcow2").is_file());
    assert!(s.env.output.join("Ubuntu Server 22.xml").is_file());
    assert!(s.env.output.join("Ubuntu Server 22.json").is_file());
    s.finish();
}

/// COMPRESS_LEVEL reaches the native engine (level 9 packs tighter than level 1), and the
/// report warns that a disk converted by qemu-img (qcow2 input) could not honour it.
#[test]
fn the_daemon_compresses_at_compress_level_and_says_where_it_cannot() {
    let mut sizes = Vec::new();
    for level in ["1", "9"] {
        let mut s = Session::start(&[("QEMU_CONVERT_OPTIONS", "-c"), ("COMPRESS_LEVEL", level)], &[]);
        let raw = s.env.exports.join("lvl/text.raw");
        text_disk(&raw);
        let data = raw_to_qcow2(&small_raw(&s.env.exports.join("lvl/data.raw")), &s.env.exports.join("lvl/data.qcow2"));
        let vm = format!("level-{level}");
        s.convert_ok(&manifest(&vm, vec![disk("disk-0", "raw", &raw), data_disk("disk-1", "qcow2", &data, 1)]));
        let out = s.env.output.join(format!("{vm}.qcow2"));
        assert!(compressed_clusters(&s, &out) > 0, "level {level}: no compressed clusters");
        sizes.push(std::fs::metadata(&out).unwrap().len());
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.env.output.join(format!("{vm}.json"))).unwrap()).unwrap();
        let warnings = report["warnings"].to_string();
        assert!(
            warnings.contains(&format!("compress level {level} is not honoured for disk-1 (converted by qemu-img")),
            "level {level}: {warnings}"
        );
        assert!(!warnings.contains("disk-0"), "the native disk honours the level: {warnings}");
        s.finish();
    }
    assert!(sizes[1] < sizes[0], "COMPRESS_LEVEL=9 ({}) packs tighter than 1 ({})", sizes[1], sizes[0]);
}

/// 4 MiB of text that compresses differently at each level, then a random cluster and one
/// that once made zlib-rs panic after a cluster that did not fit.
fn text_disk(raw: &std::path::Path) {
    let words = ["qcow2 ", "grain ", "cluster ", "vmdk ", "the ", "table ", "disk\n", "of "];
    let mut state = fixtures::Rng(99);
    let mut disk = Vec::with_capacity(6 << 20);
    while disk.len() < 4 << 20 {
        disk.extend_from_slice(words[(state.next() % 8) as usize].as_bytes());
    }
    disk.truncate(4 << 20);
    disk.extend((0..65536).map(|_| state.next() as u8));
    let mut trigger = fixtures::Rng(22);
    disk.extend((0..39 * 1024 / 8).flat_map(|_| trigger.next().to_le_bytes()));
    disk.extend((39 * 1024..65536).map(|_| (trigger.next() % 16) as u8));
    std::fs::create_dir_all(raw.parent().unwrap()).unwrap();
    std::fs::write(raw, &disk).unwrap();
}

/// `hyper2kvm convert --compress=zlib --level N`: the level reaches the compressor (level 9
/// packs text tighter than level 1), every output is a faithful qcow2, and level 1 gets past
/// the two clusters that made zlib-rs 0.6.8 panic (an incompressible one, then random bytes
/// followed by 4-bit values; see the qcow2 test zlib_survives_the_cluster_after_one_that_did_not_fit).
#[test]
fn the_convert_command_compresses_at_the_level_asked() {
    let env = Env::new();
    let raw = env.exports.join("text.raw");
    text_disk(&raw);

    let mut sizes = Vec::new();
    for level in ["1", "9"] {
        let out = env.exports.join(format!("level-{level}.qcow2"));
        let run = std::process::Command::new(bin())
            .args(["--config-dir", "/nonexistent", "convert", "--compress=zlib", "--level", level])
            .arg(&raw)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(run.status.success(), "convert --level {level}: {}", String::from_utf8_lossy(&run.stderr));
        let check =
            std::process::Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&out).status().unwrap();
        assert!(check.success(), "qemu-img check of the level {level} output");
        assert_same_contents(&raw, "raw", &out, "qcow2");
        sizes.push(std::fs::metadata(&out).unwrap().len());
    }
    assert!(sizes[1] < sizes[0], "level 9 ({}) packs tighter than level 1 ({})", sizes[1], sizes[0]);

    let refused = std::process::Command::new(bin())
        .args(["--config-dir", "/nonexistent", "convert", "--level", "3"])
        .arg(&raw)
        .arg("-o")
        .arg(env.exports.join("no.qcow2"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "--level without --compress is a usage error");
}
