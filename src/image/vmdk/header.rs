//! The 512-byte sparse extent header (`KDMV`) and the markers of stream-optimized extents.

use thiserror::Error;

/// `KDMV`, little-endian.
pub const SPARSE_MAGIC: u32 = 0x564d_444b;
/// `COWD`, little-endian: the ESX 2/3 sparse format (VMFSSPARSE), not read here.
pub const COWD_MAGIC: u32 = 0x4457_4f43;
pub(crate) const SECTOR: u64 = 512;
/// The grain directory is at the footer's offset (streamOptimized as VMware writes it).
pub(crate) const GD_AT_END: u64 = u64::MAX;
pub(crate) const FLAG_ZEROED_GRAINS: u32 = 1 << 2;
pub(crate) const FLAG_COMPRESSED: u32 = 1 << 16;
pub(crate) const FLAG_MARKERS: u32 = 1 << 17;
/// Largest virtual size accepted for one extent: 64 TiB.
pub(crate) const MAX_CAPACITY_SECTORS: u64 = 1 << 37;
/// Smallest grain: 16 sectors. The specification wants a power of two greater than 8; a
/// smaller grain is a damaged header (seSparse's 4 KiB grains are another format, with
/// another header).
pub(crate) const MIN_GRAIN_SECTORS: u64 = 16;
/// Largest grain: 32 MiB.
pub(crate) const MAX_GRAIN_SECTORS: u64 = 1 << 16;
/// qemu's limit on grain table entries.
pub(crate) const MAX_GTES_PER_GT: u32 = 512;
/// Size of a compressed grain's marker header: `u64 lba, u32 size`.
pub(crate) const GRAIN_MARKER_HEADER: u64 = 12;
/// Metadata marker types (`u32` at byte 12 of a marker sector whose size field is 0).
pub(crate) const MARKER_EOS: u32 = 0;
pub(crate) const MARKER_GT: u32 = 1;
pub(crate) const MARKER_GD: u32 = 2;
pub(crate) const MARKER_FOOTER: u32 = 3;

/// Why an extent is not a usable sparse VMDK (the structural checker's error).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VmdkError {
    /// The file ends before the 512-byte header does.
    #[error("the file is {len} bytes, too short for a sparse VMDK header")]
    TooShort {
        /// The file's length in bytes.
        len: u64,
    },
    /// The first four bytes are not `KDMV`: not a sparse extent (perhaps flat or `COWD`).
    #[error("the header magic is not KDMV")]
    BadMagic,
    /// The header's `version` is not 1, 2 or 3.
    #[error("sparse extent version {0} is not supported (1 to 3 are)")]
    BadVersion(u32),
    /// A header field is out of the range this reader (and qemu) accepts.
    #[error("the header's {field} is {value}, outside {range}")]
    BadField {
        /// The field, in words (`grain size`, `capacity`, …).
        field: &'static str,
        /// The value the header holds.
        value: u64,
        /// What would have been accepted, in words.
        range: &'static str,
    },
    /// A structure the header or a table points at does not fit in the file.
    #[error("the {what} at byte {offset} (+{size}) lies past the end of the {len}-byte file: the file is truncated or corrupt")]
    PastEnd {
        /// The structure, in words (`grain table 0`, `footer`, …).
        what: String,
        /// Its byte offset in the file.
        offset: u64,
        /// Its length in bytes.
        size: u64,
        /// The file's length in bytes.
        len: u64,
    },
    /// A compressed grain's marker gives a size of 0, or far more than a grain.
    #[error("compressed grain {grain} has an impossible size {size}")]
    BadGrainMarker {
        /// The grain's index in the virtual disk.
        grain: u64,
        /// The marker's `size` field: compressed bytes that follow.
        size: u64,
    },
    /// Reading the extent failed (the I/O error's text).
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
    /// `version` (byte 4): the sparse format version, 1 to 3.
    pub version: u32,
    /// `flags` (byte 8): bit 2 zeroed grains, bit 16 compressed grains, bit 17 markers.
    pub flags: u32,
    /// Virtual size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    /// `descriptorOffset` (byte 28): sector of the embedded text descriptor; 0 when there is none.
    pub descriptor_offset: u64,
    /// `descriptorSize` (byte 36): length of the embedded descriptor, in sectors.
    pub descriptor_size: u64,
    /// `numGTEsPerGT` (byte 44): entries per grain table, normally 512.
    pub gtes_per_gt: u32,
    /// `rgdOffset` (byte 48): sector of the redundant grain directory; 0 when there is none.
    pub redundant_gd_offset: u64,
    /// `gdOffset` (byte 56): sector of the grain directory; [`GD_AT_END`] means the footer's.
    pub gd_offset: u64,
    /// `overHead` (byte 64): sectors of metadata before the first grain.
    pub overhead: u64,
    /// `compressAlgorithm` (byte 77): 0 none, 1 deflate.
    pub compression: u16,
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
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
        if !self.grain_size.is_power_of_two() || !(MIN_GRAIN_SECTORS..=MAX_GRAIN_SECTORS).contains(&self.grain_size) {
            return bad(
                "grain size",
                self.grain_size,
                "a power of two from 16 to 65536 sectors (the VMDK specification requires more than 8)",
            );
        }
        if self.gtes_per_gt == 0 || self.gtes_per_gt > MAX_GTES_PER_GT {
            return bad("grain table entry count", u64::from(self.gtes_per_gt), "1 to 512");
        }
        if self.capacity > MAX_CAPACITY_SECTORS {
            return bad("capacity", self.capacity, "at most 64 TiB");
        }
        Ok(())
    }

    /// Whether grains are deflate-compressed behind markers (streamOptimized), as the
    /// structural checker judges it (flag bit 16).
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// Whether grains are zlib-compressed, as qemu judges it: the compression field says
    /// deflate (1). Flag bit 16 alone does not make a compressed extent.
    pub(crate) fn deflate(&self) -> bool {
        self.compression == 1
    }

    /// Whether compressed grains start with a `u64 lba, u32 size` marker (flag bit 17).
    pub(crate) fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// Whether a grain table entry of 1 means "zeroed grain".
    pub(crate) fn zeroed_grains(&self) -> bool {
        self.version >= 2 && self.flags & FLAG_ZEROED_GRAINS != 0
    }

    pub(crate) fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }

    /// Grains covering the capacity (the last may be partial).
    pub(crate) fn capacity_grains(&self) -> u64 {
        self.capacity.div_ceil(self.grain_size)
    }

    /// Grain directory entries needed for the capacity.
    pub(crate) fn gd_entries(&self) -> u64 {
        let sectors_per_gt = self.grain_size * u64::from(self.gtes_per_gt);
        self.capacity.div_ceil(sectors_per_gt)
    }

    /// Bytes of one grain table.
    pub(crate) fn gt_bytes(&self) -> u64 {
        u64::from(self.gtes_per_gt) * 4
    }
}
