//! Self-test of the test fixtures: every image the other tests feed the daemon is exactly what
//! it claims to be, as judged by qemu-img itself. Does not run the daemon.

mod common;

use std::fs;

use common::fixtures::*;

#[test]
fn every_fixture_matches_its_raw_source() {
    let env = common::Env::new();
    let dir = env.exports.join("fx");
    let raw = small_raw(&dir.join("disk.raw"));

    for sub in ["monolithicSparse", "monolithicFlat", "streamOptimized", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let vmdk = raw_to_vmdk(&raw, &dir.join(format!("{sub}.vmdk")), sub);
        assert_same_contents(&vmdk, "vmdk", &raw, "raw");
        let info = qemu_img_info(&vmdk, Some("vmdk"));
        let got = info["format-specific"]["data"]["create-type"].as_str().unwrap_or_default().to_owned();
        assert_eq!(got, sub, "{} create-type", vmdk.display());
    }

    // The big disk gives several 2 GiB extents, each with data.
    let big = big_raw(&dir.join("big.raw"));
    assert!(fs::metadata(&big).unwrap().len() > 4 << 30);
    let sparse = raw_to_vmdk(&big, &dir.join("bigs.vmdk"), "twoGbMaxExtentSparse");
    let flat = raw_to_vmdk(&big, &dir.join("bigf.vmdk"), "twoGbMaxExtentFlat");
    let s_ext = files_starting_with(&dir, "bigs-s");
    let f_ext = files_starting_with(&dir, "bigf-f");
    assert_eq!(s_ext.len(), 3, "extents of twoGbMaxExtentSparse: {s_ext:?}");
    assert_eq!(f_ext.len(), 3, "extents of twoGbMaxExtentFlat: {f_ext:?}");
    assert_same_contents(&sparse, "vmdk", &big, "raw");
    assert_same_contents(&flat, "vmdk", &big, "raw");
    // Still cheap on disk.
    let used: u64 = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(dir.join(&f_ext[1])).unwrap()) * 512;
    assert!(used < 64 << 20, "flat extent is not sparse: {used} bytes used");

    // Delta chain: child differs from base exactly where written.
    let (base, child) = delta_chain(&dir.join("chain"), &raw);
    assert_same_contents(&base, "vmdk", &raw, "raw");
    let (code, _) = compare_status(&child, "vmdk", &raw, "raw");
    assert_eq!(code, 1, "child must differ from the base");
    let info = qemu_img_info(&child, Some("vmdk"));
    assert!(info["backing-filename"].as_str().unwrap_or_default().ends_with("base.vmdk"), "{info}");

    // Two-disk VM's data disk, and qcow2 input.
    let data = data_raw(&dir.join("data.raw"));
    let data_vmdk = raw_to_vmdk(&data, &dir.join("data.vmdk"), "monolithicSparse");
    assert_same_contents(&data_vmdk, "vmdk", &data, "raw");
    let (code, _) = compare_status(&data, "raw", &raw, "raw");
    assert_eq!(code, 1, "boot and data disks must differ");
    let q = raw_to_qcow2(&raw, &dir.join("disk.qcow2"));
    assert_same_contents(&q, "qcow2", &raw, "raw");

    // Descriptors whose extent is outside: qemu-img itself reads them, so only a SOURCE_ROOTS
    // check can refuse them.
    for (i, how) in [ExtentRef::Absolute, ExtentRef::Relative].into_iter().enumerate() {
        let desc = flat_descriptor_pointing_outside(&raw, &env.elsewhere, &env.exports.join(format!("vm{i}")), how);
        assert_same_contents(&desc, "vmdk", &raw, "raw");
        let text = fs::read_to_string(&desc).unwrap();
        assert!(text.contains("elsewhere/x-flat.vmdk"), "{text}");
    }

    // Parent outside SOURCE_ROOTS.
    let outside_base = raw_to_vmdk(&raw, &env.elsewhere.join("pbase.vmdk"), "monolithicSparse");
    let child_out = child_of(&env.exports.join("pc"), &outside_base, "child.vmdk");
    let (code, _) = compare_status(&child_out, "vmdk", &child, "vmdk");
    assert_eq!(code, 0, "the child of an outside base reads like the in-tree child");

    // Broken images: qemu-img may or may not notice, but they are broken.
    let trunc = raw_to_vmdk(&raw, &dir.join("trunc.vmdk"), "monolithicSparse");
    let full = fs::metadata(&trunc).unwrap().len();
    truncate_half(&trunc);
    assert_eq!(fs::metadata(&trunc).unwrap().len(), full / 2);
    let (code, _) = compare_status(&trunc, "vmdk", &raw, "raw");
    assert_ne!(code, 0, "a half VMDK cannot read like the whole disk");

    let magic = raw_to_vmdk(&raw, &dir.join("magic.vmdk"), "monolithicSparse");
    corrupt_magic(&magic);
    let gd = raw_to_vmdk(&raw, &dir.join("gd.vmdk"), "monolithicSparse");
    corrupt_grain_directory(&gd);
    let (code, _) = compare_status(&gd, "vmdk", &raw, "raw");
    assert_ne!(code, 0, "a VMDK with a garbage grain directory cannot read like the disk");
}
