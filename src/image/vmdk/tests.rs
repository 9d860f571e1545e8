use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn qemu_img(args: &[&str]) {
    let status = Command::new("qemu-img").args(args).status().expect("qemu-img runs (install qemu-utils)");
    assert!(status.success(), "qemu-img {args:?} failed");
}

/// A 16 MiB raw disk with data in three places, converted by qemu-img to `subformat`.
fn made_by_qemu(dir: &Path, subformat: &str) -> PathBuf {
    let raw = dir.join("disk.raw");
    let mut data = vec![0u8; 16 << 20];
    for (i, b) in data[..(1 << 20)].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    data[(8 << 20)..(9 << 20)].fill(0x5a);
    data[(16 << 20) - 4096..].fill(0xa5);
    std::fs::write(&raw, &data).unwrap();
    let out = dir.join(format!("{subformat}.vmdk"));
    let option = format!("subformat={subformat}");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", "-o", &option, raw.to_str().unwrap(), out.to_str().unwrap()]);
    out
}

#[test]
fn accepts_what_qemu_img_writes() {
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["monolithicSparse", "streamOptimized"] {
        let path = made_by_qemu(dir.path(), subformat);
        assert!(is_sparse_extent(&path));
        let summary = check_sparse_file(&path).unwrap_or_else(|e| panic!("{subformat}: {e}"));
        assert_eq!(summary.header.capacity, (16 << 20) / 512);
        // 1 MiB + 1 MiB + 4 KiB of data in 64 KiB grains.
        assert_eq!(summary.allocated_grains, 16 + 16 + 1, "{subformat}");
        assert_eq!(summary.header.compressed(), subformat == "streamOptimized");
    }
}

#[test]
fn a_truncated_extent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["monolithicSparse", "streamOptimized"] {
        let path = made_by_qemu(dir.path(), subformat);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
        let err = check_sparse_file(&path).unwrap_err();
        assert!(matches!(err, VmdkError::PastEnd { .. }), "{subformat}: {err}");
        assert!(err.to_string().contains("truncated or corrupt"));
    }
}

#[test]
fn a_grain_directory_pointing_away_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = made_by_qemu(dir.path(), "monolithicSparse");
    let mut bytes = std::fs::read(&path).unwrap();
    let header = SparseHeader::parse(bytes[..512].try_into().unwrap()).unwrap();
    let gd = (header.gd_offset * 512) as usize;
    bytes[gd..gd + 4].fill(0xff);
    let err = check_sparse(bytes.as_slice(), bytes.len() as u64).unwrap_err();
    assert!(matches!(&err, VmdkError::PastEnd { what, .. } if what == "grain table 0"), "{err}");
}

#[test]
fn bad_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = made_by_qemu(dir.path(), "monolithicSparse");
    let good = std::fs::read(&path).unwrap();
    let corrupt = |at: usize, value: &[u8]| {
        let mut b = good.clone();
        b[at..at + value.len()].copy_from_slice(value);
        check_sparse(b.as_slice(), b.len() as u64).unwrap_err()
    };
    assert_eq!(corrupt(0, b"XXXX"), VmdkError::BadMagic);
    assert_eq!(corrupt(4, &9u32.to_le_bytes()), VmdkError::BadVersion(9));
    assert!(matches!(corrupt(20, &100u64.to_le_bytes()), VmdkError::BadField { field: "grain size", .. }));
    assert!(matches!(corrupt(44, &0u32.to_le_bytes()), VmdkError::BadField { .. }));
    assert!(matches!(corrupt(12, &u64::MAX.to_le_bytes()), VmdkError::BadField { field: "capacity", .. }));
    assert_eq!(check_sparse(&good[..100], 100).unwrap_err(), VmdkError::TooShort { len: 100 });
}

/// A VMware-shaped stream: grain directory offset -1 in the header, the real one in a footer
/// at EOF-1024, one compressed grain.
fn vmware_stream() -> Vec<u8> {
    let mut header = [0u8; 512];
    header[0..4].copy_from_slice(b"KDMV");
    header[4..8].copy_from_slice(&3u32.to_le_bytes());
    header[8..12].copy_from_slice(&(FLAG_COMPRESSED | 1 << 17).to_le_bytes());
    header[12..20].copy_from_slice(&256u64.to_le_bytes()); // 128 KiB
    header[20..28].copy_from_slice(&128u64.to_le_bytes());
    header[44..48].copy_from_slice(&512u32.to_le_bytes());
    header[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut file = header.to_vec();
    // Sector 1: grain marker for LBA 0 with 20 bytes of "compressed" data.
    let mut grain = vec![0u8; 512];
    grain[8..12].copy_from_slice(&20u32.to_le_bytes());
    file.extend(&grain);
    // Sector 2: the grain table; sector 3: the grain directory.
    let mut gt = vec![0u8; 2048];
    gt[0..4].copy_from_slice(&1u32.to_le_bytes());
    file.extend(&gt);
    let mut gd = vec![0u8; 512];
    gd[0..4].copy_from_slice(&2u32.to_le_bytes());
    file.extend(&gd);
    let gd_sector = (file.len() as u64 / 512) - 1;
    let mut footer = header;
    footer[56..64].copy_from_slice(&gd_sector.to_le_bytes());
    file.extend([0u8; 512]); // footer marker
    file.extend(footer);
    file.extend([0u8; 512]); // end-of-stream marker
    file
}

#[test]
fn reads_the_grain_directory_from_the_footer() {
    let file = vmware_stream();
    let summary = check_sparse(file.as_slice(), file.len() as u64).unwrap();
    assert_eq!(summary.allocated_grains, 1);
    let mut cut = file.clone();
    cut.truncate(file.len() - 512);
    assert!(check_sparse(cut.as_slice(), cut.len() as u64).is_err(), "a stream without its footer is refused");
}

#[test]
fn an_oversized_grain_marker_is_refused() {
    let mut file = vmware_stream();
    file[512 + 8..512 + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(check_sparse(file.as_slice(), file.len() as u64), Err(VmdkError::BadGrainMarker { .. })));
}

/// Hostile input never panics: flip bytes in the metadata of a real extent many times.
#[test]
fn mutations_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = [std::fs::read(made_by_qemu(dir.path(), "streamOptimized")).unwrap(), vmware_stream()];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in &seeds {
        for _ in 0..3000 {
            let mut b = seed.clone();
            for _ in 0..(next() % 8 + 1) {
                // Mostly the header and tables (first 64 KiB), sometimes anywhere.
                let span = if next() % 4 == 0 { b.len() } else { b.len().min(65536) };
                let at = (next() % span as u64) as usize;
                b[at] = next() as u8;
            }
            if next() % 8 == 0 {
                b.truncate((next() % b.len() as u64) as usize);
            }
            let _ = check_sparse(b.as_slice(), b.len() as u64);
        }
    }
}
