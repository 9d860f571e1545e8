//! Cluster compressors producing what qemu reads back.
//!
//! - zlib: raw deflate (no zlib header, no checksum) with a 4 KiB window — windowBits -12, as
//!   qemu's `qcow2_zlib_compress` writes it. qemu inflates with the same window, so a stream
//!   using longer distances would not decode: the window must be 4 KiB, which the zlib-rs
//!   backend of flate2 honours (miniz_oxide and libdeflate cannot).
//! - zstd: one zstd frame, as `qcow2_zstd_compress` writes it.
//!
//! qemu decompresses exactly one cluster and stops, so the input must be a whole cluster: pad the
//! disk's last cluster with zeros first ([`compress_padded`] does), or write it uncompressed.
//!
//! Compressor state is cached per thread and per level, so compressing clusters one by one from
//! worker threads allocates nothing after the first cluster.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::config::CompressionType;

/// zstd levels for COMPRESS_LEVEL 0–9. zstd has no "store" level: 0 and 1 map to its fastest
/// standard level, 1; the default COMPRESS_LEVEL 6 maps to 3, zstd's own default and what qemu
/// writes; 9 maps to 15, where zstd is about as slow per byte as deflate at 9.
pub(crate) const ZSTD_LEVELS: [i32; 10] = [1, 1, 2, 2, 3, 3, 3, 6, 9, 15];

/// Window of the raw deflate streams qemu reads: 2^12 bytes.
const DEFLATE_WINDOW_BITS: u8 = 12;

thread_local! {
    static DEFLATE: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Compresses one cluster as qemu would store it: zlib → raw deflate with a 4 KiB window
/// (windowBits -12) at `level` (0–9; 0 stores, so it never wins); zstd → a zstd frame at the
/// level [`ZSTD_LEVELS`] maps `level` to (levels above 9 count as 9). Returns false (and leaves
/// `out` unspecified) when the result is not smaller than the cluster — then the caller writes
/// the cluster uncompressed, as qemu does.
///
/// `data` must be a whole cluster (see the module documentation for the disk's last cluster).
pub(crate) fn compress_cluster(codec: CompressionType, level: u32, data: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    if data.is_empty() {
        return false;
    }
    let level = level.min(9);
    let done = match codec {
        CompressionType::Zlib => deflate(level, data, out),
        CompressionType::Zstd => zstd(ZSTD_LEVELS[level as usize], data, out),
    };
    done && out.len() < data.len()
}

/// [`compress_cluster`] for data that may be shorter than `cluster_size` (the disk's last
/// cluster): compresses it padded with zeros to `cluster_size`, which qemu needs to decompress it.
pub(crate) fn compress_padded(
    codec: CompressionType,
    level: u32,
    data: &[u8],
    cluster_size: usize,
    out: &mut Vec<u8>,
) -> bool {
    if data.len() >= cluster_size {
        return compress_cluster(codec, level, data, out);
    }
    let mut padded = Vec::with_capacity(cluster_size);
    padded.extend_from_slice(data);
    padded.resize(cluster_size, 0);
    compress_cluster(codec, level, &padded, out)
}

fn deflate(level: u32, data: &[u8], out: &mut Vec<u8>) -> bool {
    DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let entry = match slot.take() {
            Some((cached, mut compress)) if cached == level => {
                compress.reset();
                (cached, compress)
            }
            _ => (level, Compress::new_with_window_bits(Compression::new(level), false, DEFLATE_WINDOW_BITS)),
        };
        let (_, compress) = slot.insert(entry);
        // Room for one byte less than the input: a stream that does not fit does not finish.
        out.reserve_exact(data.len() - 1);
        let finished = matches!(compress.compress_vec(data, out, FlushCompress::Finish), Ok(Status::StreamEnd));
        if !finished {
            // zlib-rs 0.6.8 at level 1 can panic on the stream after a reset that followed an
            // unfinished one (see the test zlib_survives_the_cluster_after_one_that_did_not_fit):
            // start the next cluster with a new compressor.
            *slot = None;
        }
        finished
    })
}

fn zstd(level: i32, data: &[u8], out: &mut Vec<u8>) -> bool {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let cached = match slot.take() {
            Some((cached, compressor)) if cached == level => Some((cached, compressor)),
            _ => zstd::bulk::Compressor::new(level).ok().map(|c| (level, c)),
        };
        let Some((_, compressor)) = cached.map(|entry| slot.insert(entry)) else {
            return false;
        };
        out.reserve_exact(data.len() - 1);
        // Writes into the vector's capacity; fails when the frame does not fit.
        compressor.compress_to_buffer(data, out).is_ok()
    })
}

/// Decompresses one stored cluster the way qemu reads it back, producing at most `limit + 1`
/// bytes (so that "more than a cluster" shows). `None` if `data` is not a valid stream.
pub(super) fn decompress(codec: CompressionType, data: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(limit + 1);
    match codec {
        CompressionType::Zlib => {
            let mut inflate = Decompress::new_with_window_bits(false, DEFLATE_WINDOW_BITS);
            match inflate.decompress_vec(data, &mut out, FlushDecompress::Finish) {
                Ok(Status::StreamEnd) => Some(out),
                Ok(_) if out.len() > limit => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            use std::io::Read;
            let mut decoder = zstd::stream::read::Decoder::with_buffer(data).ok()?;
            (&mut decoder).take(limit as u64 + 1).read_to_end(&mut out).ok()?;
            Some(out)
        }
    }
}
