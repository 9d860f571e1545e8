//! `qemu-img info --output=json` of one image, as the daemon reads it
//! (`convert::qemu_img::parse_layer`), then the confinement of every name it yields.
//!
//! Checked: a layer accepted has a format qemu-img may read for us, and its backing and data
//! file names are absolute, plain paths (no protocol); each is refused by a SOURCE_ROOTS that
//! does not exist, whatever `..`, symlinks or odd bytes it holds.

#![no_main]

use std::path::{Path, PathBuf};

use hyper2kvm::convert::qemu_img::parse_layer;
use hyper2kvm::internals::source::SourceRoots;
use libfuzzer_sys::fuzz_target;

const FORMATS: [&str; 5] = ["qcow2", "raw", "vpc", "vhdx", "vdi"];

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(layer) = parse_layer(&json, Path::new("/exports/vm/top.qcow2")) else { return };
    assert!(FORMATS.contains(&layer.format.as_str()), "format {:?} accepted", layer.format);
    let roots = SourceRoots::new(&[PathBuf::from("/nonexistent-hyper2kvm-fuzz-root")]).excluding(&[]);
    let names = layer.backing.iter().map(|b| &b.path).chain(layer.data_file.iter());
    for name in names {
        assert!(name.is_absolute(), "{name:?} is relative");
        let text = name.to_string_lossy();
        let protocol = text.split_once(':').is_some_and(|(scheme, _)| !scheme.is_empty() && !scheme.contains('/'));
        assert!(!protocol, "{name:?} looks like a protocol");
        assert!(roots.confine(name).is_err(), "{name:?} confined under a root that does not exist");
    }
});
