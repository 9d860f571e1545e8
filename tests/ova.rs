//! A manifest disk with `source_format: "ova"` is the whole OVA, read in place: its first disk
//! becomes `V.qcow2`, the others `V-<ovf disk id>.qcow2`, the `.mf` is verified, and OVF
//! hardware fills what the manifest's `vm` block leaves out.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const SAMPLE: &str = "tests/data/ova/vsphere-ustar.ova";

/// The OVA's members cut out by the byte ranges Python's tarfile recorded.
fn extract_member(ova: &Path, members: &Value, name_suffix: &str, out: &Path) -> PathBuf {
    let member = members
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str().unwrap().ends_with(name_suffix))
        .expect("member listed");
    let bytes = std::fs::read(ova).unwrap();
    let start = member["offset_data"].as_u64().unwrap() as usize;
    let end = start + member["size"].as_u64().unwrap() as usize;
    std::fs::write(out, &bytes[start..end]).unwrap();
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
    let ova = env.exports.join("appliance.ova");
    std::fs::copy(SAMPLE, &ova).unwrap();
    let members: Value = serde_json::from_slice(&std::fs::read(format!("{SAMPLE}.members.json")).unwrap()).unwrap();
    let mut s = Session::start_in(env, &[], &[]);
    hypersdk_submit(&s.daemon, &s.env, &ova_manifest("ova-vm", &ova));
    let data_disk = "ova-vm-vmdisk2.qcow2".to_owned();
    match hypersdk_wait(&s.daemon, &s.env, "ova-vm", std::slice::from_ref(&data_disk)) {
        Outcome::Success { .. } => {}
        Outcome::Failed(text) => s.daemon.fail(&format!("the OVA job failed:\n{text}")),
    }
    let disk1 = extract_member(&ova, &members, "ova-sample-disk1.vmdk", &s.env.root.join("disk1.vmdk"));
    let disk2 = extract_member(&ova, &members, "disk2.vmdk", &s.env.root.join("disk2.vmdk"));
    assert_converted(&s.daemon, &s.env.output.join("ova-vm.qcow2"), &disk1, "vmdk");
    assert_converted(&s.daemon, &s.env.output.join(&data_disk), &disk2, "vmdk");
    let xml = std::fs::read_to_string(s.env.output.join("ova-vm.xml")).unwrap();
    assert!(xml.contains("<vcpu placement='static'>2</vcpu>"), "CPUs from the OVF:\n{xml}");
    assert!(xml.contains("<memory unit='MiB'>2048</memory>"), "memory from the OVF:\n{xml}");
    assert!(xml.contains("00:50:56:a1:00:01"), "the NIC's MAC from the OVF:\n{xml}");
    let report: Value = serde_json::from_slice(&std::fs::read(s.env.output.join("ova-vm.json")).unwrap()).unwrap();
    let ids: Vec<&str> = report["disks"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["vmdisk1", "vmdisk2"]);
    assert_eq!(std::fs::metadata(&ova).unwrap().len(), std::fs::metadata(SAMPLE).unwrap().len(), "read in place");
    s.expected.extend(["ova-vm.qcow2", "ova-vm.xml", "ova-vm.json", data_disk.as_str()].map(str::to_owned));
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
