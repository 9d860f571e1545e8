//! libvirt capabilities XML (`HostCapabilities::parse`): never fails, must never panic.

#![no_main]

use hyper2kvm::internals::libvirt::host_caps::HostCapabilities;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else { return };
    let caps = HostCapabilities::parse(xml);
    let _ = caps.has_kvm();
    let _ = caps.acceleration();
});
