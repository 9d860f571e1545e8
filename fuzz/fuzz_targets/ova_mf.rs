//! An OVA's `.mf` manifest on its own (`ova::mf::parse_mf`).

#![no_main]

use hyper2kvm::internals::image::ova;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = ova::mf::parse_mf(data, "fuzz.mf", ova::Limits::default().max_members) else { return };
    for entry in &entries {
        let _ = ova::check_href(&entry.file);
    }
});
