//! Conversion in one forward pass, for sources that cannot seek (a pipe, standard input).
//!
//! Only a stream-optimized VMDK can be read that way: its grains come compressed behind
//! markers, in increasing order, so
//! [`read_stream_sequential`](crate::image::vmdk::read_stream_sequential) inflates each as it
//! arrives and the grains are cut into (or gathered into) qcow2 clusters and written at once. The virtual
//! size, which the qcow2 writer needs first, is in the header at the very start. All-zero
//! clusters stay unallocated, as in the [`pipeline`](super::pipeline); compression, when
//! asked, is spread over the cores a batch of clusters at a time.

use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::atomic::Ordering;

use super::pipeline::{is_zero, PipelineOptions, CLUSTER_BITS};
use crate::convert::{Compression, ConvertError, JobControl};
use crate::image::qcow2::{compress, Qcow2Writer, WriteStats, WriterOptions};
use crate::image::vmdk::{self, SparseHeader, COWD_MAGIC, SPARSE_MAGIC};
use crate::image::ImageError;

const CLUSTER: u64 = 1 << CLUSTER_BITS;
const SECTOR: u64 = 512;
/// Clusters compressed together per worker: enough to amortise starting the threads.
const BATCH_PER_WORKER: usize = 16;
/// Most bytes read ahead of the scan to find the embedded descriptor.
const MAX_PREFIX: u64 = 1 << 20;

/// Why a stream starting with `first` cannot be converted in one pass, or its header.
///
/// The reason reads after "because": "it does not start with KDMV …".
pub fn stream_header(first: &[u8; 512]) -> Result<SparseHeader, String> {
    let magic = u32::from_le_bytes([first[0], first[1], first[2], first[3]]);
    if magic == COWD_MAGIC {
        return Err("it is an ESX COWD sparse disk, not a stream-optimized VMDK".into());
    }
    if magic != SPARSE_MAGIC {
        return Err("it does not start with KDMV, the magic of a sparse VMDK".into());
    }
    let header = SparseHeader::parse(first).map_err(|e| format!("its sparse VMDK header is unusable: {e}"))?;
    if !header.deflate() || !header.markers() {
        return Err(
            "it is a sparse VMDK without compressed grains behind markers (monolithicSparse, not streamOptimized)"
                .into(),
        );
    }
    Ok(header)
}

/// Converts the stream-optimized VMDK read from `reader`, front to back with no seeking, into
/// a new qcow2 at `destination`. Cancellation and the deadline of `control` are noticed grain
/// by grain; a reader that blocks should notice them too (the one-shot command's does).
pub fn convert_stream<R: Read>(
    mut reader: R,
    destination: &Path,
    options: PipelineOptions,
    control: &JobControl,
) -> Result<WriteStats, ConvertError> {
    control.check()?;
    let limits = vmdk::Limits::default();
    let (header, prefix) = read_prefix(&mut reader, &limits).map_err(|e| stopped_or(control, e))?;
    let size = header.capacity * SECTOR;
    let writer_options = WriterOptions { cluster_bits: CLUSTER_BITS, compression: options.compression.map(|c| c.kind) };
    let writer = Qcow2Writer::create(destination, size, writer_options)?;
    control.progress.total_bytes.store(size, Ordering::Relaxed);
    let mut clusters = Clusters::new(writer, size, options, control);
    let mut input = Cursor::new(prefix).chain(reader);
    vmdk::read_stream_sequential(&mut input, &limits, |at, grain| clusters.grain(at, grain))
        .map_err(|e| stopped_or(control, e))?;
    drain_trailer(&mut input);
    let writer = clusters.close().map_err(|e| stopped_or(control, e))?;
    control.check()?;
    let stats = writer.finish()?;
    control.progress.done_bytes.store(size, Ordering::Relaxed);
    Ok(stats)
}

/// Reads what follows the end-of-stream marker (VMware's footer, padding) to the end of the
/// input, so that the program writing into the pipe is not cut off with EPIPE and a pipeline
/// under `pipefail` does not fail after a good conversion. Bounded: a source that goes on is
/// left alone, and a read error there no longer matters.
fn drain_trailer(input: &mut impl Read) {
    const MAX_TRAILER: u64 = 16 << 20;
    let _ = std::io::copy(&mut input.take(MAX_TRAILER), &mut std::io::sink());
}

/// The reason to stop when there is one: a failure seen after a cancellation (a reader told
/// to give up, a grain refused) is only its echo.
fn stopped_or(control: &JobControl, e: ImageError) -> ConvertError {
    control.check().err().unwrap_or_else(|| e.into())
}

/// Reads the header and, when it names one, the embedded descriptor: a delta disk is refused
/// before anything is written. Returns the header and every byte read, to be read again.
fn read_prefix(reader: &mut impl Read, limits: &vmdk::Limits) -> Result<(SparseHeader, Vec<u8>), ImageError> {
    let mut first = [0u8; 512];
    let got = read_full(reader, &mut first)?;
    if got < first.len() {
        return Err(ImageError::Corrupt(format!(
            "the stream ended after {got} bytes, before the end of its 512-byte VMDK header"
        )));
    }
    let header = stream_header(&first).map_err(|why| ImageError::Unsupported(format!("the stream {why}")))?;
    let mut prefix = first.to_vec();
    let desc_at = header.descriptor_offset.saturating_mul(SECTOR);
    let desc_size = header.descriptor_size.saturating_mul(SECTOR);
    // Out of the scan's bounds it ignores the descriptor, and so does this check; past the
    // first MiB (never seen: writers put it right after the header) it is left to the scan.
    let readable = desc_at >= SECTOR && desc_size > 0 && desc_size <= limits.max_descriptor_bytes;
    if !readable || desc_at.saturating_add(desc_size) > MAX_PREFIX {
        return Ok((header, prefix));
    }
    prefix.resize((desc_at + desc_size) as usize, 0);
    let got = read_full(reader, &mut prefix[512..])?;
    prefix.truncate(512 + got);
    if let Some(text) = prefix.get(desc_at as usize..) {
        refuse_delta(text)?;
    }
    Ok((header, prefix))
}

/// Fills as much of `buf` as the reader has.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, ImageError> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::Corrupt(format!("reading the stream failed: {e}"))),
        }
    }
    Ok(done)
}

/// A delta disk only holds changes: without its parent, which a stream cannot name a file
/// for, converting it would silently lose the rest of the disk.
fn refuse_delta(descriptor: &[u8]) -> Result<(), ImageError> {
    let text = String::from_utf8_lossy(descriptor.split(|&b| b == 0).next().unwrap_or_default());
    let parent = text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        key.trim().eq_ignore_ascii_case("parentCID").then(|| value.trim().trim_matches('"').to_owned())
    });
    match parent {
        Some(cid) if !cid.eq_ignore_ascii_case("ffffffff") => Err(ImageError::Unsupported(format!(
            "the stream is a delta disk (parentCID {cid}): it only holds changes and needs its parent disk, which a stream cannot provide"
        ))),
        _ => Ok(()),
    }
}

/// Turns grains, in increasing order, into qcow2 clusters: a grain larger than a cluster is
/// cut, smaller ones are gathered into the cluster they share.
struct Clusters<'a> {
    writer: Qcow2Writer,
    size: u64,
    control: &'a JobControl,
    compression: Option<Compression>,
    workers: usize,
    /// The cluster being gathered, and its bytes: zeros where no grain covered it.
    open: Option<u64>,
    buf: Vec<u8>,
    /// With compression: non-zero clusters waiting to be compressed together, back to back
    /// (the disk's short last cluster padded with zeros).
    batch: Vec<u8>,
    batch_clusters: Vec<u64>,
}

impl<'a> Clusters<'a> {
    fn new(writer: Qcow2Writer, size: u64, options: PipelineOptions, control: &'a JobControl) -> Self {
        let workers = options.workers();
        Clusters {
            writer,
            size,
            control,
            compression: options.compression,
            workers,
            open: None,
            buf: vec![0; CLUSTER as usize],
            batch: Vec::new(),
            batch_clusters: Vec::new(),
        }
    }

    /// Takes the grain at virtual offset `at`.
    fn grain(&mut self, at: u64, data: &[u8]) -> Result<(), ImageError> {
        if self.control.check().is_err() {
            // `convert_stream` reports the control's reason instead.
            return Err(ImageError::Internal("the conversion was stopped".into()));
        }
        let mut pos = at;
        let mut rest = data;
        while !rest.is_empty() {
            let cluster = pos / CLUSTER;
            let within = (pos % CLUSTER) as usize;
            let n = rest.len().min(CLUSTER as usize - within);
            if self.open != Some(cluster) {
                self.close_open()?;
                self.open = Some(cluster);
                self.buf.fill(0);
            }
            self.buf[within..within + n].copy_from_slice(&rest[..n]);
            pos += n as u64;
            rest = &rest[n..];
        }
        // No later grain can add to a cluster filled to its end: write it now.
        if pos.is_multiple_of(CLUSTER) || pos >= self.size {
            self.close_open()?;
        }
        self.control.progress.done_bytes.store(pos.min(self.size), Ordering::Relaxed);
        Ok(())
    }

    /// Writes the gathered cluster unless it is all zeros.
    fn close_open(&mut self) -> Result<(), ImageError> {
        let Some(cluster) = self.open.take() else { return Ok(()) };
        if is_zero(&self.buf) {
            return Ok(());
        }
        if self.compression.is_none() {
            let len = (self.size - cluster * CLUSTER).min(CLUSTER) as usize;
            return self.writer.write_cluster(cluster, &self.buf[..len]);
        }
        self.batch.extend_from_slice(&self.buf);
        self.batch_clusters.push(cluster);
        if self.batch_clusters.len() >= self.workers * BATCH_PER_WORKER {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Compresses the batch on every core, then writes it in order; a cluster that does not
    /// shrink is stored as it is.
    fn flush_batch(&mut self) -> Result<(), ImageError> {
        let Some(c) = self.compression else { return Ok(()) };
        let per_worker = self.batch_clusters.len().div_ceil(self.workers).max(1) * CLUSTER as usize;
        let packed: Vec<Option<Vec<u8>>> = std::thread::scope(|scope| {
            let parts: Vec<_> =
                self.batch.chunks(per_worker).map(|part| scope.spawn(move || compress_part(c, part))).collect();
            parts.into_iter().flat_map(|p| p.join().unwrap_or_default()).collect()
        });
        if packed.len() != self.batch_clusters.len() {
            return Err(ImageError::Internal("a compression thread panicked".into()));
        }
        for ((&cluster, data), packed) in
            self.batch_clusters.iter().zip(self.batch.chunks(CLUSTER as usize)).zip(&packed)
        {
            match packed {
                Some(bytes) => self.writer.write_compressed(cluster, bytes)?,
                None => {
                    let len = (self.size - cluster * CLUSTER).min(CLUSTER) as usize;
                    self.writer.write_cluster(cluster, &data[..len])?
                }
            }
        }
        self.batch.clear();
        self.batch_clusters.clear();
        Ok(())
    }

    /// Writes what is left and hands the writer back, to be finished.
    fn close(mut self) -> Result<Qcow2Writer, ImageError> {
        self.close_open()?;
        self.flush_batch()?;
        Ok(self.writer)
    }
}

/// Each cluster of `part` compressed, or `None` where compressing does not pay.
fn compress_part(c: Compression, part: &[u8]) -> Vec<Option<Vec<u8>>> {
    part.chunks(CLUSTER as usize)
        .map(|data| {
            let mut out = Vec::new();
            compress::compress_padded(c.kind, c.level, data, CLUSTER as usize, &mut out).then_some(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CompressionType;
    use std::io::Write;

    const KIB: usize = 1024;

    /// A stream-optimized VMDK of `data` with `grain_sectors`-sector grains, as VMware writes
    /// one minus the tables the scan does not need: header, compressed grains behind markers
    /// (every grain, the all-zero ones too, so they must be dropped here), end-of-stream.
    fn stream(data: &[u8], grain_sectors: u64) -> Vec<u8> {
        let mut out = vec![0u8; 512];
        out[..4].copy_from_slice(&SPARSE_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&3u32.to_le_bytes());
        out[8..12].copy_from_slice(&0x30001u32.to_le_bytes());
        out[12..20].copy_from_slice(&(data.len() as u64 / 512).to_le_bytes());
        out[20..28].copy_from_slice(&grain_sectors.to_le_bytes());
        out[44..48].copy_from_slice(&512u32.to_le_bytes());
        out[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        out[64..72].copy_from_slice(&1u64.to_le_bytes());
        out[77] = 1;
        for (i, grain) in data.chunks(grain_sectors as usize * 512).enumerate() {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(grain).unwrap();
            let packed = z.finish().unwrap();
            out.extend_from_slice(&(i as u64 * grain_sectors).to_le_bytes());
            out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
            out.extend_from_slice(&packed);
            out.resize(out.len().next_multiple_of(512), 0);
        }
        out.resize(out.len() + 512, 0);
        out
    }

    /// 1 MiB + 2.5 KiB: data in odd places, zeros between, a short last cluster.
    fn disk() -> Vec<u8> {
        let mut data = vec![0u8; 1024 * KIB + 5 * 512];
        let mut rng = Rng(7);
        let mut fill = |range: std::ops::Range<usize>, data: &mut Vec<u8>| {
            for b in &mut data[range] {
                *b = (rng.next() % 7) as u8;
            }
        };
        fill(0..3 * KIB, &mut data);
        fill(200 * KIB..330 * KIB, &mut data);
        fill(600 * KIB + 17..600 * KIB + 18, &mut data);
        fill(1024 * KIB..1024 * KIB + 5 * 512, &mut data);
        data
    }

    fn nonzero_clusters(data: &[u8]) -> u64 {
        data.chunks(CLUSTER as usize).filter(|c| !is_zero(c)).count() as u64
    }

    use crate::test_support::{qemu_img, Rng};

    /// Grains smaller than a cluster are gathered, larger ones cut; zero clusters are dropped
    /// whatever grain they came in; compressed or not, qemu reads back the same disk.
    #[test]
    fn grains_of_every_size_become_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let data = disk();
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, &data).unwrap();
        let zlib = Some(Compression { kind: CompressionType::Zlib, level: 6 });
        for grain_sectors in [16u64, 128, 512] {
            for compression in [None, zlib] {
                let out = dir.path().join(format!("{grain_sectors}-{}.qcow2", compression.is_some()));
                let control = JobControl::new(std::time::Duration::from_secs(60));
                let options = PipelineOptions { compression, threads: 2, ..PipelineOptions::default() };
                let stats = convert_stream(stream(&data, grain_sectors).as_slice(), &out, options, &control)
                    .unwrap_or_else(|e| panic!("{grain_sectors}-sector grains: {e}"));
                let written = stats.data_clusters + stats.compressed_clusters;
                assert_eq!(written, nonzero_clusters(&data), "{grain_sectors}: {stats:?}");
                assert_eq!(stats.compressed_clusters > 0, compression.is_some(), "{stats:?}");
                assert_eq!(control.progress.done_bytes.load(Ordering::Relaxed), data.len() as u64);
                let (out, raw) = (out.to_str().unwrap(), raw.to_str().unwrap());
                qemu_img(&["check", "-q", "-f", "qcow2", out]);
                qemu_img(&["compare", "-q", "-f", "raw", "-F", "qcow2", raw, out]);
            }
        }
    }

    #[test]
    fn a_cancelled_or_short_stream_fails() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = stream(&disk(), 16);
        let control = JobControl::new(std::time::Duration::from_secs(60));
        control.cancel();
        let result =
            convert_stream(bytes.as_slice(), &dir.path().join("a.qcow2"), PipelineOptions::default(), &control);
        assert!(matches!(result, Err(ConvertError::Cancelled)), "{result:?}");

        let control = JobControl::new(std::time::Duration::from_secs(60));
        let short = &bytes[..bytes.len() / 2];
        let result = convert_stream(short, &dir.path().join("b.qcow2"), PipelineOptions::default(), &control);
        assert!(matches!(&result, Err(ConvertError::Corrupt(m)) if m.contains("truncated")), "{result:?}");
        let result = convert_stream(&bytes[..100], &dir.path().join("c.qcow2"), PipelineOptions::default(), &control);
        assert!(matches!(&result, Err(ConvertError::Corrupt(m)) if m.contains("after 100 bytes")), "{result:?}");
    }

    #[test]
    fn refuses_delta_descriptors_only() {
        let base = b"# Disk DescriptorFile\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\0\0";
        assert!(refuse_delta(base).is_ok());
        assert!(refuse_delta(b"version=1\n").is_ok());
        let delta = b"CID=12345678\nparentCID = 0badcafe\nparentFileNameHint=\"base.vmdk\"\n";
        let err = refuse_delta(delta).unwrap_err().to_string();
        assert!(err.contains("delta disk (parentCID 0badcafe)"), "{err}");
    }

    #[test]
    fn only_stream_optimized_headers_stream() {
        let mut first = [0u8; 512];
        assert!(stream_header(&first).unwrap_err().contains("KDMV"));
        first[..4].copy_from_slice(&SPARSE_MAGIC.to_le_bytes());
        first[4..8].copy_from_slice(&1u32.to_le_bytes());
        first[8..12].copy_from_slice(&3u32.to_le_bytes());
        first[12..20].copy_from_slice(&2048u64.to_le_bytes());
        first[20..28].copy_from_slice(&128u64.to_le_bytes());
        first[44..48].copy_from_slice(&512u32.to_le_bytes());
        assert!(stream_header(&first).unwrap_err().contains("monolithicSparse"));
        first[8..12].copy_from_slice(&0x30003u32.to_le_bytes());
        first[77] = 1;
        assert_eq!(stream_header(&first).map(|h| h.capacity), Ok(2048));
    }
}
