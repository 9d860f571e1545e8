//! The structural check of a sparse extent used by the daemon before handing a disk to
//! qemu-img: header, grain directory, every grain table and every grain (for compressed
//! extents, every grain marker) must lie inside the file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::*;
use crate::image::ReadAt;

/// Bound on the grain directory held in memory (entries), i.e. 64 MiB.
const MAX_GD_ENTRIES: u64 = 16 << 20;

/// What a structurally sound extent holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseSummary {
    pub header: SparseHeader,
    pub allocated_grains: u64,
    pub zeroed_grains: u64,
}

/// Reads the first four bytes of `path`: is it a sparse extent?
pub fn is_sparse_extent(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path).and_then(|f| FileExt::read_exact_at(&f, &mut magic, 0)).is_ok()
        && u32::from_le_bytes(magic) == SPARSE_MAGIC
}

/// Checks a sparse extent file: header, grain directory, every grain table and every grain
/// (for compressed extents, every grain marker) must lie inside the file.
pub fn check_sparse_file(path: &Path) -> Result<SparseSummary, VmdkError> {
    let source = crate::image::FileSource::open(path).map_err(|e| VmdkError::Io(e.to_string()))?;
    check_sparse(&source, source.len())
}

/// [`check_sparse_file`] over any positioned reader of length `len`.
pub fn check_sparse<R: ReadAt + ?Sized>(r: &R, len: u64) -> Result<SparseSummary, VmdkError> {
    if len < SECTOR {
        return Err(VmdkError::TooShort { len });
    }
    let mut block = [0u8; 512];
    r.read_exact_at(&mut block, 0)?;
    let mut header = SparseHeader::parse(&block)?;
    if header.gd_offset == GD_AT_END {
        header = footer_header(r, len)?;
    }
    let within = |what: String, offset: u64, size: u64| -> Result<(), VmdkError> {
        match offset.checked_add(size) {
            Some(end) if end <= len => Ok(()),
            _ => Err(VmdkError::PastEnd { what, offset, size, len }),
        }
    };
    let entries = header.gd_entries();
    if entries > MAX_GD_ENTRIES {
        return Err(VmdkError::BadField {
            field: "grain directory size",
            value: entries,
            range: "at most 16M entries",
        });
    }
    let gd_offset = header.gd_offset.saturating_mul(SECTOR);
    within("grain directory".into(), gd_offset, entries * 4)?;
    let gd = read_u32s(r, gd_offset, entries as usize)?;
    let mut summary = SparseSummary { header, allocated_grains: 0, zeroed_grains: 0 };
    let gt_bytes = u64::from(header.gtes_per_gt) * 4;
    let capacity_grains = header.capacity.div_ceil(header.grain_size);
    for (gt_index, &gt_sector) in gd.iter().enumerate() {
        if gt_sector == 0 {
            continue;
        }
        let gt_offset = u64::from(gt_sector) * SECTOR;
        within(format!("grain table {gt_index}"), gt_offset, gt_bytes)?;
        let gt = read_u32s(r, gt_offset, header.gtes_per_gt as usize)?;
        let first_grain = gt_index as u64 * u64::from(header.gtes_per_gt);
        // The last grain table can reach past the capacity: only grains inside it count.
        let grains = gt.iter().enumerate().take(capacity_grains.saturating_sub(first_grain) as usize);
        for (i, &grain_sector) in grains {
            check_grain(r, &header, &mut summary, first_grain + i as u64, grain_sector, &within)?;
        }
    }
    Ok(summary)
}

fn check_grain<R: ReadAt + ?Sized>(
    r: &R,
    header: &SparseHeader,
    summary: &mut SparseSummary,
    grain: u64,
    grain_sector: u32,
    within: &impl Fn(String, u64, u64) -> Result<(), VmdkError>,
) -> Result<(), VmdkError> {
    let zeroed_allowed = header.version >= 2 && header.flags & FLAG_ZEROED_GRAINS != 0;
    match grain_sector {
        0 => return Ok(()),
        1 if zeroed_allowed => {
            summary.zeroed_grains += 1;
            return Ok(());
        }
        _ => {}
    }
    summary.allocated_grains += 1;
    let offset = u64::from(grain_sector) * SECTOR;
    if !header.compressed() {
        // The disk's last grain may be partial.
        let remaining = (header.capacity - grain * header.grain_size).min(header.grain_size) * SECTOR;
        return within(format!("grain {grain}"), offset, remaining);
    }
    within(format!("marker of grain {grain}"), offset, GRAIN_MARKER_HEADER)?;
    let mut marker = [0u8; 12];
    r.read_exact_at(&mut marker, offset)?;
    let size = u64::from(u32::from_le_bytes([marker[8], marker[9], marker[10], marker[11]]));
    // Compressed data can exceed the grain (incompressible input), but not by much.
    if size == 0 || size > header.grain_bytes() * 2 + 4096 {
        return Err(VmdkError::BadGrainMarker { grain, size });
    }
    within(format!("compressed grain {grain}"), offset + GRAIN_MARKER_HEADER, size)
}

/// The header copy in the footer at EOF-1024, which holds the real grain directory offset.
fn footer_header<R: ReadAt + ?Sized>(r: &R, len: u64) -> Result<SparseHeader, VmdkError> {
    if len < 3 * SECTOR {
        return Err(VmdkError::PastEnd { what: "footer".into(), offset: 0, size: 3 * SECTOR, len });
    }
    let mut block = [0u8; 512];
    r.read_exact_at(&mut block, len - 2 * SECTOR)?;
    let footer = SparseHeader::parse(&block)?;
    if footer.gd_offset == GD_AT_END {
        return Err(VmdkError::BadField {
            field: "footer grain directory offset",
            value: GD_AT_END,
            range: "a real offset",
        });
    }
    Ok(footer)
}

fn read_u32s<R: ReadAt + ?Sized>(r: &R, offset: u64, count: usize) -> Result<Vec<u32>, VmdkError> {
    let mut bytes = vec![0u8; count * 4];
    r.read_exact_at(&mut bytes, offset)?;
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}
