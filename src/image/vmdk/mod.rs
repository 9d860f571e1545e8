//! VMDK sparse extents (`KDMV`): header parsing and a structural check of the grain directory
//! and grain tables against the file's real length.
//!
//! Every offset in a hostile file is checked before use, every allocation is bounded, and
//! every problem is an error, never a panic. Layout facts: ../shared/FORMATS.md.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use thiserror::Error;

use super::ReadAt;

/// `KDMV`, little-endian.
pub const SPARSE_MAGIC: u32 = 0x564d_444b;
const SECTOR: u64 = 512;
/// The grain directory is at the footer's offset (streamOptimized as VMware writes it).
const GD_AT_END: u64 = u64::MAX;
const FLAG_ZEROED_GRAINS: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
/// Largest virtual size accepted for one extent: 64 TiB.
const MAX_CAPACITY_SECTORS: u64 = 1 << 37;
/// Largest grain: 32 MiB.
const MAX_GRAIN_SECTORS: u64 = 1 << 16;
/// qemu's limit on grain table entries.
const MAX_GTES_PER_GT: u32 = 512;
/// Bound on the grain directory held in memory (entries), i.e. 64 MiB.
const MAX_GD_ENTRIES: u64 = 16 << 20;
/// Size of a compressed grain's marker header: `u64 lba, u32 size`.
const GRAIN_MARKER_HEADER: u64 = 12;

/// Why an extent is not a usable sparse VMDK.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VmdkError {
    #[error("the file is {len} bytes, too short for a sparse VMDK header")]
    TooShort { len: u64 },
    #[error("the header magic is not KDMV")]
    BadMagic,
    #[error("sparse extent version {0} is not supported (1 to 3 are)")]
    BadVersion(u32),
    #[error("the header's {field} is {value}, outside {range}")]
    BadField { field: &'static str, value: u64, range: &'static str },
    #[error("the {what} at byte {offset} (+{size}) lies past the end of the {len}-byte file: the file is truncated or corrupt")]
    PastEnd { what: String, offset: u64, size: u64, len: u64 },
    #[error("compressed grain {grain} has an impossible size {size}")]
    BadGrainMarker { grain: u64, size: u64 },
    #[error("read error: {0}")]
    Io(String),
}

impl From<std::io::Error> for VmdkError {
    fn from(e: std::io::Error) -> Self {
        VmdkError::Io(e.to_string())
    }
}

/// The 512-byte sparse extent header, fields in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Virtual size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub gtes_per_gt: u32,
    pub redundant_gd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub compression: u16,
}

fn u32_at(b: &[u8; 512], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; 512], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl SparseHeader {
    /// Parses and range-checks a header.
    pub fn parse(b: &[u8; 512]) -> Result<SparseHeader, VmdkError> {
        if u32_at(b, 0) != SPARSE_MAGIC {
            return Err(VmdkError::BadMagic);
        }
        let header = SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_size: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_size: u64_at(b, 36),
            gtes_per_gt: u32_at(b, 44),
            redundant_gd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            compression: u16::from_le_bytes([b[77], b[78]]),
        };
        header.check_ranges()?;
        Ok(header)
    }

    fn check_ranges(&self) -> Result<(), VmdkError> {
        if !(1..=3).contains(&self.version) {
            return Err(VmdkError::BadVersion(self.version));
        }
        let bad = |field, value, range| Err(VmdkError::BadField { field, value, range });
        if !self.grain_size.is_power_of_two() || self.grain_size > MAX_GRAIN_SECTORS {
            return bad("grain size", self.grain_size, "a power of two up to 65536 sectors");
        }
        if self.gtes_per_gt == 0 || self.gtes_per_gt > MAX_GTES_PER_GT {
            return bad("grain table entry count", u64::from(self.gtes_per_gt), "1 to 512");
        }
        if self.capacity > MAX_CAPACITY_SECTORS {
            return bad("capacity", self.capacity, "at most 64 TiB");
        }
        Ok(())
    }

    /// Whether grains are deflate-compressed behind markers (streamOptimized).
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }

    fn gd_entries(&self) -> u64 {
        let sectors_per_gt = self.grain_size * u64::from(self.gtes_per_gt);
        self.capacity.div_ceil(sectors_per_gt)
    }
}

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
    let source = super::FileSource::open(path).map_err(|e| VmdkError::Io(e.to_string()))?;
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

#[cfg(test)]
mod tests;
