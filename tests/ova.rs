//! A manifest disk with `source_format: "ova"` is the whole OVA, read in place: its first disk
//! becomes `V.qcow2`, the others `V-<ovf disk id>.qcow2`, the `.mf` is verified, and OVF
//! hardware fills what the manifest's `vm` block leaves out.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const SAMPLE: &str = "tests/data/ova/vsphere-ustar.ova";

/// What [`sample_with_hardware`] puts in the OVF: neither equals a built-in default (2 vCPUs,
/// 2048 MiB), so the domain XML shows whether the OVF was read.
const OVF_CPUS: u32 = 4;
const OVF_MEMORY_MIB: u32 = 3072;

/// The sample OVA with the OVF's CPU count and memory (2, 2048 MiB: the built-in defaults)
/// replaced by [`OVF_CPUS`] and [`OVF_MEMORY_MIB`], and its `.mf` digest updated to match.
/// The replacements keep every length, so the tar headers (sizes, checksums) stay valid; the
/// other tests and the unit tests use the sample as it is.
fn sample_with_hardware(out: &Path) -> PathBuf {
    let mut bytes = std::fs::read(SAMPLE).unwrap();
    let members: Value = serde_json::from_slice(&std::fs::read(format!("{SAMPLE}.members.json")).unwrap()).unwrap();
    let range = |name: &str| {
        let m = members.as_array().unwrap().iter().find(|m| m["name"] == name).expect("member listed");
        let start = m["offset_data"].as_u64().unwrap() as usize;
        start..start + m["size"].as_u64().unwrap() as usize
    };
    let (ovf_range, mf_range) = (range("ova-sample.ovf"), range("ova-sample.mf"));
    let old_ovf = String::from_utf8(bytes[ovf_range.clone()].to_vec()).unwrap();
    let mut new_ovf = old_ovf.clone();
    for (from, to) in [
        (
            "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>".to_owned(),
            format!("<rasd:VirtualQuantity>{OVF_CPUS}</rasd:VirtualQuantity>"),
        ),
        ("2 virtual CPU(s)".to_owned(), format!("{OVF_CPUS} virtual CPU(s)")),
        (
            "<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>".to_owned(),
            format!("<rasd:VirtualQuantity>{OVF_MEMORY_MIB}</rasd:VirtualQuantity>"),
        ),
        ("2048MB of memory".to_owned(), format!("{OVF_MEMORY_MIB}MB of memory")),
    ] {
        assert_eq!(new_ovf.matches(&from).count(), 1, "the sample's OVF has one {from:?}");
        assert_eq!(from.len(), to.len(), "the member's size must not change");
        new_ovf = new_ovf.replace(&from, &to);
    }
    let digest = |text: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()));
    let mf = String::from_utf8(bytes[mf_range.clone()].to_vec()).unwrap();
    assert_eq!(mf.matches(&digest(&old_ovf)).count(), 1, "the .mf lists the OVF's SHA-256:\n{mf}");
    let new_mf = mf.replace(&digest(&old_ovf), &digest(&new_ovf));
    bytes[ovf_range].copy_from_slice(new_ovf.as_bytes());
    bytes[mf_range].copy_from_slice(new_mf.as_bytes());
    std::fs::write(out, bytes).unwrap();
    out.to_owned()
}

fn ova_manifest(vm: &str, ova: &Path) -> Value {
    let mut m = manifest(vm, vec![disk("appliance", "ova", ova)]);
    // Let the OVF describe the hardware.
    m.as_object_mut().unwrap().remove("vm");
    m.as_object_mut().unwrap().remove("nics");
    m
}

#[test]
fn an_ova_is_converted_in_place_with_its_hardware() {
    let env = Env::new();
    let ova = sample_with_hardware(&env.exports.join("appliance.ova"));
    let members: Value = serde_json::from_slice(&std::fs::read(format!("{SAMPLE}.members.json")).unwrap()).unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    hypersdk_submit(&s.daemon, &s.env, &ova_manifest("ova-vm", &ova));
    let data_disk = "ova-vm-vmdisk2.qcow2".to_owned();
    match hypersdk_wait(&s.daemon, &s.env, "ova-vm", std::slice::from_ref(&data_disk)) {
        Outcome::Success { .. } => {}
        Outcome::Failed(text) => s.daemon.fail(&format!("the OVA job failed:\n{text}")),
    }
    let disk1 = common::fixtures::ova_member(&ova, &members, "ova-sample-disk1.vmdk", &s.env.root.join("disk1.vmdk"));
    let disk2 = common::fixtures::ova_member(&ova, &members, "disk2.vmdk", &s.env.root.join("disk2.vmdk"));
    assert_converted(&s.daemon, &s.env.output.join("ova-vm.qcow2"), &disk1, "vmdk");
    assert_converted(&s.daemon, &s.env.output.join(&data_disk), &disk2, "vmdk");
    let xml = std::fs::read_to_string(s.env.output.join("ova-vm.xml")).unwrap();
    assert!(xml.contains(&format!("<vcpu placement='static'>{OVF_CPUS}</vcpu>")), "CPUs from the OVF:\n{xml}");
    assert!(xml.contains(&format!("<memory unit='MiB'>{OVF_MEMORY_MIB}</memory>")), "memory from the OVF:\n{xml}");
    assert!(xml.contains("00:50:56:a1:00:01"), "the NIC's MAC from the OVF:\n{xml}");
    let report: Value = serde_json::from_slice(&std::fs::read(s.env.output.join("ova-vm.json")).unwrap()).unwrap();
    let ids: Vec<&str> = report["disks"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["vmdisk1", "vmdisk2"]);
    assert_eq!(std::fs::metadata(&ova).unwrap().len(), std::fs::metadata(SAMPLE).unwrap().len(), "read in place");
    s.expected.extend(["ova-vm.qcow2", "ova-vm.xml", "ova-vm.json", data_disk.as_str()].map(str::to_owned));
    assert_output_exactly(&s.daemon, &s.env, &s.expected);
}

/// The manifest's `vm` block is what HyperSDK read from vCenter: where it gives a value, that
/// value wins over the OVF's; what it leaves out comes from the OVF.
#[test]
fn the_manifests_vm_values_win_over_the_ovf_where_given() {
    let env = Env::new();
    let ova = sample_with_hardware(&env.exports.join("appliance.ova"));
    let mut m = ova_manifest("cpu6-vm", &ova);
    m["vm"] = serde_json::json!({ "cpu": 6 });
    let mut s = Session::start_in(env, &[], &[]);
    hypersdk_submit(&s.daemon, &s.env, &m);
    let data_disk = "cpu6-vm-vmdisk2.qcow2".to_owned();
    match hypersdk_wait(&s.daemon, &s.env, "cpu6-vm", std::slice::from_ref(&data_disk)) {
        Outcome::Success { .. } => {}
        Outcome::Failed(text) => s.daemon.fail(&format!("the OVA job failed:\n{text}")),
    }
    let xml = std::fs::read_to_string(s.env.output.join("cpu6-vm.xml")).unwrap();
    assert!(xml.contains("<vcpu placement='static'>6</vcpu>"), "CPUs from the manifest:\n{xml}");
    assert!(xml.contains(&format!("<memory unit='MiB'>{OVF_MEMORY_MIB}</memory>")), "memory from the OVF:\n{xml}");
    s.expected.extend(["cpu6-vm.qcow2", "cpu6-vm.xml", "cpu6-vm.json", data_disk.as_str()].map(str::to_owned));
    assert_output_exactly(&s.daemon, &s.env, &s.expected);
}

#[test]
fn an_ova_that_does_not_match_its_mf_is_refused() {
    let env = Env::new();
    let ova = env.exports.join("damaged.ova");
    let mut bytes = std::fs::read(SAMPLE).unwrap();
    let members: Value = serde_json::from_slice(&std::fs::read(format!("{SAMPLE}.members.json")).unwrap()).unwrap();
    let disk1 = members.as_array().unwrap().iter().find(|m| m["name"] == "ova-sample-disk1.vmdk").unwrap();
    // Flip one byte near the end of the first disk's data: the tar stays valid.
    let at = (disk1["offset_data"].as_u64().unwrap() + disk1["size"].as_u64().unwrap() - 700) as usize;
    bytes[at] ^= 0x55;
    std::fs::write(&ova, bytes).unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    let first = s.convert_err(&ova_manifest("damaged-vm", &ova), "damaged-vm");
    assert!(first.contains(".mf"), "first line names the manifest check: {first}");
    assert!(first.contains("export it again"), "{first}");
}

/// Issue 10: an unpacked OVF export (`vm.ovf`, its VMDKs and `.mf` in a folder, as ovftool and
/// HyperSDK's ovf method write it) named as the disk with `source_format: "ova"` is converted
/// like the OVA it would pack into: every disk, the `.mf` verified, the OVF's hardware used.
#[test]
fn an_unpacked_ovf_export_is_converted_with_its_hardware() {
    let env = Env::new();
    let ovf = common::fixtures::unpacked_ovf(Path::new(SAMPLE), &env.exports.join("appliance"));
    let disk2 = std::fs::read_dir(env.exports.join("appliance/disks")).unwrap().next().unwrap().unwrap().path();
    // CPUs and memory other than the defaults, and the .mf's digest of the .ovf to match.
    let old_ovf = std::fs::read_to_string(&ovf).unwrap();
    let new_ovf = old_ovf
        .replace(
            "<rasd:VirtualQuantity>2</rasd:VirtualQuantity>",
            &format!("<rasd:VirtualQuantity>{OVF_CPUS}</rasd:VirtualQuantity>"),
        )
        .replace(
            "<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>",
            &format!("<rasd:VirtualQuantity>{OVF_MEMORY_MIB}</rasd:VirtualQuantity>"),
        );
    let digest = |text: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()));
    let mf = ovf.with_extension("mf");
    let new_mf = std::fs::read_to_string(&mf).unwrap().replace(&digest(&old_ovf), &digest(&new_ovf));
    assert_ne!(new_mf, std::fs::read_to_string(&mf).unwrap(), "the .mf lists the .ovf's SHA-256");
    std::fs::write(&ovf, new_ovf).unwrap();
    std::fs::write(&mf, new_mf).unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    hypersdk_submit(&s.daemon, &s.env, &ova_manifest("ovf-vm", &ovf));
    let data_disk = "ovf-vm-vmdisk2.qcow2".to_owned();
    match hypersdk_wait(&s.daemon, &s.env, "ovf-vm", std::slice::from_ref(&data_disk)) {
        Outcome::Success { .. } => {}
        Outcome::Failed(text) => s.daemon.fail(&format!("the OVF job failed:\n{text}")),
    }
    let disk1 = s.env.exports.join("appliance/ova-sample-disk1.vmdk");
    assert_converted(&s.daemon, &s.env.output.join("ovf-vm.qcow2"), &disk1, "vmdk");
    assert_converted(&s.daemon, &s.env.output.join(&data_disk), &disk2, "vmdk");
    let xml = std::fs::read_to_string(s.env.output.join("ovf-vm.xml")).unwrap();
    assert!(xml.contains(&format!("<vcpu placement='static'>{OVF_CPUS}</vcpu>")), "CPUs from the OVF:\n{xml}");
    assert!(xml.contains(&format!("<memory unit='MiB'>{OVF_MEMORY_MIB}</memory>")), "memory from the OVF:\n{xml}");
    assert!(xml.contains("00:50:56:a1:00:01"), "the NIC's MAC from the OVF:\n{xml}");
    assert!(xml.contains("secure='yes'"), "UEFI with secure boot from the OVF:\n{xml}");
    s.expected.extend(["ovf-vm.qcow2", "ovf-vm.xml", "ovf-vm.json", data_disk.as_str()].map(str::to_owned));
    assert_output_exactly(&s.daemon, &s.env, &s.expected);
}

/// A disk of an unpacked export is confined like an extent: a symlink to a file outside
/// SOURCE_ROOTS fails the job on SOURCE_ROOTS, and nothing of the file is read.
#[test]
fn an_unpacked_ovf_export_whose_disk_leads_outside_source_roots_is_refused() {
    let env = Env::new();
    let ovf = common::fixtures::unpacked_ovf(Path::new(SAMPLE), &env.exports.join("appliance"));
    let disk1 = env.exports.join("appliance/ova-sample-disk1.vmdk");
    std::fs::create_dir_all(&env.elsewhere).unwrap();
    let secret = env.elsewhere.join("secret.vmdk");
    std::fs::rename(&disk1, &secret).unwrap();
    std::os::unix::fs::symlink(&secret, &disk1).unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    // `ovf` is accepted as a source_format, the same as `ova`.
    let mut m = ova_manifest("escape-vm", &ovf);
    m["disks"][0]["source_format"] = "ovf".into();
    let first = s.convert_err(&m, "escape-vm");
    assert!(first.contains("SOURCE_ROOTS") && first.contains("ova-sample-disk1.vmdk"), "{first}");
}

/// Issue 10: the `.ovf` of an export named as a `raw` disk used to be "converted" into a disk
/// holding the XML. Its `.error` now says what the file is and which source_format reads it.
#[test]
fn an_ovf_given_as_a_raw_disk_is_refused_with_what_to_do() {
    let env = Env::new();
    let ovf = common::fixtures::unpacked_ovf(Path::new(SAMPLE), &env.exports.join("appliance"));
    let mut s = Session::start_in(env, &[], &[]);
    let first = s.convert_err(&manifest("raw-ovf-vm", vec![disk("disk-1", "raw", &ovf)]), "raw-ovf-vm");
    assert!(first.contains("an OVF descriptor (XML text), not a raw disk image"), "{first}");
    assert!(first.contains("source_format \"ova\""), "{first}");
}

#[test]
fn an_unpacked_ovf_export_that_does_not_match_its_mf_is_refused() {
    let env = Env::new();
    let ovf = common::fixtures::unpacked_ovf(Path::new(SAMPLE), &env.exports.join("appliance"));
    let disk1 = env.exports.join("appliance/ova-sample-disk1.vmdk");
    let mut bytes = std::fs::read(&disk1).unwrap();
    let at = bytes.len() - 700;
    bytes[at] ^= 0x55;
    std::fs::write(&disk1, bytes).unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    let first = s.convert_err(&ova_manifest("damaged-ovf-vm", &ovf), "damaged-ovf-vm");
    assert!(first.starts_with("The OVF export") && first.contains("does not match its .mf manifest"), "{first}");
    assert!(first.contains("ova-sample-disk1.vmdk") && first.contains("export it again"), "{first}");
}
