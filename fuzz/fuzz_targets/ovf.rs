//! An OVF descriptor on its own (`ova::parse_ovf`, as for a standalone `.ovf`), then what a job
//! derives from it: manifest hardware, NICs, the File of each disk and its checked `href`. The
//! bytes are also sniffed (`image::sniff`, which tells an unpacked export's `.ovf` from an OVA
//! and refuses non-disks given as raw), and the advice for each kind is built.

#![no_main]

use hyper2kvm::internals::image::ova;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let kind = hyper2kvm::internals::image::sniff::sniff(data);
    let _ = (kind.describe(), kind.advice_as_raw(), kind.source_format());
    let Ok(ovf) = ova::parse_ovf(data, &ova::Limits::default()) else { return };
    let _ = ovf.hardware.to_manifest_hardware();
    let _ = ovf.hardware.to_nics();
    for disk in &ovf.disks {
        if let Some(file) = ovf.file_of(disk) {
            let _ = ova::check_href(&file.href);
        }
    }
});
