//! A VMDK text descriptor, two ways:
//!
//! - as a descriptor file (strict parsing), opened with `vmdk::open` in a scratch directory that
//!   also holds extents and a parent a descriptor can name: `flat.bin` (128 KiB of data),
//!   `sparse.vmdk` (a 1 MiB monolithicSparse extent, a seed of vmdk_sparse) and `parent.vmdk`
//!   (a descriptor with CID=12345678 over a ZERO and a FLAT extent); then the disk is walked;
//! - embedded in a sparse extent (lenient parsing), opened with `vmdk::open_stream`.
//!
//! Inputs naming `/proc`, `/sys` or `/dev` are skipped: an extent line may name any host file
//! (`RW 8 FLAT "/proc/kcore"`, `"../../../proc/kcore"`), which the daemon confines with
//! SOURCE_ROOTS, not the reader. (Other paths out of the scratch directory stay allowed: devices,
//! FIFOs and the like are refused by the reader without being opened.)

#![no_main]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hyper2kvm::internals::image::vmdk::{self, Limits};
use hyper2kvm::internals::image::ReadAt;
use libfuzzer_sys::fuzz_target;

const SPARSE_EXTENT: &[u8] = include_bytes!("../seeds/vmdk_sparse/compact-monolithicSparse-1M.vmdk");
const PARENT: &str = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                      createType=\"monolithicFlat\"\nRW 2048 ZERO\nRW 256 FLAT \"flat.bin\" 0\n";

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = common::scratch_dir();
        let flat: Vec<u8> = (0..128u32 << 10).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join("flat.bin"), flat).unwrap();
        std::fs::write(dir.join("sparse.vmdk"), SPARSE_EXTENT).unwrap();
        std::fs::write(dir.join("parent.vmdk"), PARENT).unwrap();
        dir
    })
}

/// A 1 MiB stream-less sparse extent with no grain tables whose header points at `text` as
/// its embedded descriptor.
fn embed(text: &[u8]) -> Vec<u8> {
    let sectors = (text.len() as u64).div_ceil(512).max(1);
    let mut out = vec![0u8; 512];
    out[0..4].copy_from_slice(b"KDMV");
    out[4..8].copy_from_slice(&1u32.to_le_bytes());
    out[8..12].copy_from_slice(&3u32.to_le_bytes());
    out[12..20].copy_from_slice(&2048u64.to_le_bytes()); // capacity: 1 MiB
    out[20..28].copy_from_slice(&128u64.to_le_bytes()); // grain: 64 KiB
    out[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptor at sector 1
    out[36..44].copy_from_slice(&sectors.to_le_bytes());
    out[44..48].copy_from_slice(&512u32.to_le_bytes());
    let gd = 1 + sectors;
    out[48..56].copy_from_slice(&gd.to_le_bytes()); // redundant grain directory
    out[56..64].copy_from_slice(&gd.to_le_bytes());
    out[64..72].copy_from_slice(&(gd + 1).to_le_bytes()); // overhead
    out[73..77].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
    out.extend_from_slice(text);
    out.resize(((gd + 1) * 512) as usize, 0); // one grain directory entry: no table
    out
}

fn names_host_files(data: &[u8]) -> bool {
    [&b"/proc"[..], b"/sys", b"/dev"].iter().any(|w| data.windows(w.len()).any(|x| x == *w))
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let source: Arc<dyn ReadAt> = Arc::new(embed(data));
    if let Ok(image) = vmdk::open_stream(source, "embedded.vmdk", &limits) {
        let _ = image.info();
    }
    if names_host_files(data) {
        return;
    }
    let path = dir().join("disk.vmdk");
    std::fs::write(&path, data).unwrap();
    let Ok(image) = vmdk::open(&path, &limits) else { return };
    let _ = image.info();
    let _ = image.parent().map(|p| p.info());
    common::walk(&image, common::DEFAULT_CAPS);
});
