//! The qcow2 v3 header and its constants (docs/interop/qcow2.txt in qemu; all big-endian).

use crate::config::CompressionType;

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// 104 bytes of v3 fields, the compression_type byte at 104, padding to a multiple of 8.
pub(crate) const HEADER_LENGTH: u32 = 112;
/// 16-bit refcounts.
pub(crate) const REFCOUNT_ORDER: u32 = 4;
/// L1/L2 entry: the cluster's refcount is exactly 1 (required then, never on compressed entries).
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster descriptor.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Incompatible feature bit 3: the compression_type field is not zlib.
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Host offsets live in bits 9–55 of L1/L2 entries.
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;
/// qemu refuses an L1 table larger than this (QCOW_MAX_L1_SIZE).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu refuses a refcount table larger than this (QCOW_MAX_REFTABLE_SIZE).
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Smallest and largest cluster_bits qemu accepts.
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;

/// Header extension: feature name table.
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// The names qemu writes in its feature name table: (type, bit, name); type 0 incompatible,
/// 1 compatible, 2 autoclear. They only make error messages of older readers readable.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The fields a finished image needs; everything else is zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub cluster_bits: u32,
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u32,
    pub compression: CompressionType,
}

impl Header {
    /// The header, the feature name table and the end-of-extensions marker: 512 bytes, so they
    /// fit in the first cluster of any cluster size.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        let (incompatible, compression_type) = match self.compression {
            CompressionType::Zlib => (0u64, 0u8),
            CompressionType::Zstd => (INCOMPAT_COMPRESSION, 1u8),
        };
        out.extend_from_slice(&MAGIC.to_be_bytes()); // 0
        out.extend_from_slice(&3u32.to_be_bytes()); // 4 version
        out.extend_from_slice(&0u64.to_be_bytes()); // 8 backing_file_offset
        out.extend_from_slice(&0u32.to_be_bytes()); // 16 backing_file_size
        out.extend_from_slice(&self.cluster_bits.to_be_bytes()); // 20
        out.extend_from_slice(&self.size.to_be_bytes()); // 24
        out.extend_from_slice(&0u32.to_be_bytes()); // 32 crypt_method
        out.extend_from_slice(&self.l1_size.to_be_bytes()); // 36
        out.extend_from_slice(&self.l1_offset.to_be_bytes()); // 40
        out.extend_from_slice(&self.reftable_offset.to_be_bytes()); // 48
        out.extend_from_slice(&self.reftable_clusters.to_be_bytes()); // 56
        out.extend_from_slice(&0u32.to_be_bytes()); // 60 nb_snapshots
        out.extend_from_slice(&0u64.to_be_bytes()); // 64 snapshots_offset
        out.extend_from_slice(&incompatible.to_be_bytes()); // 72
        out.extend_from_slice(&0u64.to_be_bytes()); // 80 compatible_features
        out.extend_from_slice(&0u64.to_be_bytes()); // 88 autoclear_features
        out.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes()); // 96
        out.extend_from_slice(&HEADER_LENGTH.to_be_bytes()); // 100
        out.push(compression_type); // 104
        out.resize(HEADER_LENGTH as usize, 0); // 105..112 padding
        debug_assert_eq!(out.len(), 112);

        out.extend_from_slice(&EXT_FEATURE_NAMES.to_be_bytes());
        out.extend_from_slice(&((FEATURE_NAMES.len() * 48) as u32).to_be_bytes());
        for (kind, bit, name) in FEATURE_NAMES {
            let start = out.len();
            out.push(kind);
            out.push(bit);
            out.extend_from_slice(name.as_bytes());
            out.resize(start + 48, 0);
        }
        // End of the header extensions: type 0, length 0.
        out.extend_from_slice(&[0; 8]);
        debug_assert_eq!(out.len(), 512);
        out
    }
}
