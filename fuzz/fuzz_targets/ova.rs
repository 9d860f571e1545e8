//! An OVA from bytes, the way a job reads one: the tar index on its own, then `ova::open`
//! (tar + OVF + .mf) on a file in a scratch directory, `verify_manifest`, and every disk
//! (up to four) opened in place with `vmdk::open_stream` and walked with small bounds.

#![no_main]

mod common;

use std::path::Path;
use std::sync::Arc;

use hyper2kvm::internals::image::{ova, vmdk};
use libfuzzer_sys::fuzz_target;

const CAPS: common::Caps = common::Caps { walk_bytes: 16 << 20, read_bytes: 4 << 20, full_chunks: 1 };

fuzz_target!(|data: &[u8]| {
    let limits = ova::Limits::default();
    let _ = ova::tar::index(data, Path::new("fuzz.ova"), limits.max_members);
    let path = common::scratch_dir().join("fuzz.ova");
    std::fs::write(&path, data).unwrap();
    let Ok(package) = ova::open(&path, &limits) else { return };
    let _ = package.hardware.to_manifest_hardware();
    let _ = package.hardware.to_nics();
    if let Ok(check) = ova::verify_manifest(&package) {
        let _ = check.all_verified();
    }
    for disk in package.disks.iter().take(4) {
        assert_eq!(package.member_range(&disk.href), Some(disk.member.clone()), "{disk:?}");
        let Ok(member) = package.open_disk(disk) else { continue };
        let Ok(image) = vmdk::open_stream(Arc::new(member), &disk.member_name, &vmdk::Limits::default()) else {
            continue;
        };
        let _ = image.info();
        common::walk(&image, CAPS);
    }
});
