//! The Artifact Manifest: `manifest::parse` and the helpers the queue runs on bytes that may
//! still be being written, then what a job derives from a valid manifest (result file names,
//! the domain UUID and the libvirt domain XML, which must stay well-formed XML whatever the
//! manifest's strings hold).

#![no_main]

use std::path::PathBuf;

use hyper2kvm::internals::libvirt::domain_xml::{self, Acceleration, DomainDisk, NetworkAttachment};
use hyper2kvm::internals::{manifest, names, output_layout};
use libfuzzer_sys::fuzz_target;
use quick_xml::events::Event;

fuzz_target!(|data: &[u8]| {
    let _ = manifest::is_complete_json(data);
    let _ = manifest::vm_name_hint(data, "fuzz.json");
    let Ok(spec) = manifest::parse(data, "fuzz.json") else { return };
    let _ = spec.boot_disk();
    if names::check_vm_name(&spec.vm_name).is_err() {
        return;
    }
    let _ = output_layout::boot_disk_file(&spec.vm_name);
    for disk in &spec.disks {
        let _ = output_layout::data_disk_file(&spec.vm_name, &disk.id);
    }
    let _ = names::domain_name(&spec.vm_name);
    let _ = domain_xml::domain_uuid(&spec);
    let disks: Vec<DomainDisk> = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, _)| DomainDisk {
            path: PathBuf::from(format!("/var/lib/libvirt/images/{i}.qcow2")),
            target_bus: domain_xml::disk_bus_for(&spec.hardware),
        })
        .collect();
    let attach = NetworkAttachment::Network("default".into());
    let xml = domain_xml::domain_xml_with(&spec, &disks, &attach, Acceleration::Kvm);
    check_well_formed(&xml);
});

/// Balanced elements, the one root `domain`, and text and attributes that unescape.
fn check_well_formed(xml: &str) {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut depth = 0usize;
    let mut roots = 0usize;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                if depth == 0 {
                    roots += 1;
                    assert_eq!(e.name().as_ref(), b"domain", "root element of:\n{xml}");
                }
                for a in e.attributes() {
                    let a = a.unwrap_or_else(|err| panic!("bad attribute ({err}) in:\n{xml}"));
                    a.unescape_value().unwrap_or_else(|err| panic!("bad attribute value ({err}) in:\n{xml}"));
                }
                depth += 1;
            }
            Ok(Event::Empty(e)) => {
                assert!(depth > 0, "element outside the root in:\n{xml}");
                for a in e.attributes() {
                    let a = a.unwrap_or_else(|err| panic!("bad attribute ({err}) in:\n{xml}"));
                    a.unescape_value().unwrap_or_else(|err| panic!("bad attribute value ({err}) in:\n{xml}"));
                }
            }
            Ok(Event::End(_)) => depth -= 1,
            Ok(Event::Text(t)) => {
                t.unescape().unwrap_or_else(|err| panic!("bad text ({err}) in:\n{xml}"));
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(err) => panic!("the domain XML is not well-formed ({err}):\n{xml}"),
        }
    }
    assert_eq!((depth, roots), (0, 1), "unbalanced domain XML:\n{xml}");
}
