//! A monolithic sparse or stream-optimized VMDK from bytes, as an OVA member is read: the
//! structural check, the one-pass marker scan (and the sequential reader that inflates), then
//! `vmdk::open_stream` and a walk of the virtual disk like the engine's (see common.rs for the
//! bounds), from memory and from a file (plain runs checked). Mirrors `mutations_never_panic`
//! in src/image/vmdk/tests.rs.

#![no_main]

mod common;

use std::sync::Arc;

use hyper2kvm::internals::image::vmdk::{self, Limits};
use hyper2kvm::internals::image::{DiskSource, FileSource, ReadAt};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let _ = vmdk::check_sparse(data, data.len() as u64);
    let _ = vmdk::scan_stream_markers(data, &limits);
    let mut inflated = 0u64;
    let _ = vmdk::read_stream_sequential(data, &limits, |_, grain| {
        inflated += grain.len() as u64;
        Ok(())
    });
    let source: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    let Ok(image) = vmdk::open_stream(source, "fuzz.vmdk", &limits) else { return };
    let info = image.info();
    assert_eq!(info.virtual_size, image.size());
    let _ = image.rebuilt_from_markers();
    common::walk(&image, common::DEFAULT_CAPS);
    // From a file too: then uncompressed grains are plain runs the engine may copy unread,
    // and the walk checks them against the bytes it reads.
    let path = common::scratch_dir().join("input.vmdk");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(file) = FileSource::open(&path) else { return };
    let source: Arc<dyn ReadAt> = Arc::new(file);
    if let Ok(image) = vmdk::open_stream(source, "fuzz.vmdk", &limits) {
        common::walk(&image, common::DEFAULT_CAPS);
    }
});
