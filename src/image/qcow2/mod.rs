//! qcow2 (v3) written in one forward pass.
//!
//! [`Qcow2Writer`] takes guest clusters in increasing order and appends them to a new file:
//!
//! ```text
//! | header (cluster 0, written last) | data … L2 … data … refblock … data … | L2 | L1 | refblocks | reftable |
//! ```
//!
//! - Uncompressed clusters land at cluster-aligned offsets, their L2 entries with COPIED (bit 63).
//! - Compressed clusters (from [`compress::compress_cluster`]) are packed byte-wise like qemu
//!   packs them; their L2 entries carry bit 62, the byte offset and the count of extra 512-byte
//!   sectors, never COPIED; each host cluster they touch gets one reference per cluster. The
//!   host cluster being packed stays open while uncompressed clusters are appended after it
//!   (it is filled in place in the write buffer), so mixing the two wastes no space.
//! - An L2 table is written as soon as the guest order leaves its range, and a refcount block
//!   as soon as the output leaves the host clusters it covers, so memory stays bounded whatever
//!   the disk size: L1, one L2 table, one or two refcount blocks, the refcount table (8 bytes
//!   per refcount block), and the 8 MiB write buffer — no per-cluster syscall. See
//!   [`Qcow2Writer::memory_bytes`].
//! - The buffer is page-aligned and flushed in whole clusters with `O_DIRECT` where the
//!   filesystem takes it (the page-cache copy was the writer's largest cost), through the page
//!   cache otherwise; see docs/DECISIONS.md.
//! - [`Qcow2Writer::finish`] writes what is left, sizes the final refcount blocks and table so
//!   that they count themselves, writes the header last and fsyncs: until then offset 0 holds
//!   zeros, so an interrupted write never looks like a valid image.

mod aligned;
pub(crate) mod compress;
mod header;
mod refcount;
mod writer;

#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) use writer::CopyMode;
pub(crate) use writer::{CopyOffload, Qcow2Writer};

use crate::config::CompressionType;

/// How a new qcow2 image is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriterOptions {
    /// log2 of the cluster size: 16 (64 KiB) by default; 9 (512 bytes) to 21 (2 MiB) accepted.
    pub cluster_bits: u32,
    /// Codec of the compressed clusters, if any are written. `Zstd` sets the header's
    /// compression_type and incompatible feature bit 3 (qemu ≥ 5.1 reads such images);
    /// `Zlib` is the classic codec every qemu reads. `None`: no compressed clusters.
    pub compression: Option<CompressionType>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions { cluster_bits: 16, compression: None }
    }
}

/// What [`Qcow2Writer::finish`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Length of the finished file.
    pub file_bytes: u64,
    /// Guest clusters stored uncompressed (including those copied with `copy_clusters_from`).
    pub data_clusters: u64,
    /// Of those, the clusters copied from a file with `copy_clusters_from`.
    pub copied_clusters: u64,
    /// Guest clusters stored compressed.
    pub compressed_clusters: u64,
    /// Guest clusters never written: they read as zeros and take no space.
    pub zero_clusters_skipped: u64,
}
