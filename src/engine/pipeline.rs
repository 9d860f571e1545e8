//! The bounded conversion pipeline.
//!
//! Workers (one per core) take chunks of the virtual disk in order, read their allocated
//! parts (decompressing grains as they go), drop all-zero clusters, and compress clusters when
//! asked. The calling thread writes finished chunks to the qcow2 in guest order. At most
//! `in_flight` chunks exist at once, which bounds memory whatever the disk size, and gives
//! back-pressure: workers wait while the writer is behind.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};

use crate::convert::{Compression, ConvertError, JobControl};
use crate::image::qcow2::{compress, Qcow2Writer, WriteStats, WriterOptions};
use crate::image::{DiskSource, ImageError};

/// Output cluster size: qcow2's default and VMware's usual grain, 64 KiB.
pub const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;

/// How the pipeline runs.
#[derive(Debug, Clone, Copy)]
pub struct PipelineOptions {
    pub compression: Option<Compression>,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Bytes of virtual disk per unit of work (a multiple of the cluster size).
    pub chunk_bytes: u64,
    /// Chunks allowed in memory at once, per worker.
    pub in_flight_per_worker: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions { compression: None, threads: 0, chunk_bytes: 4 << 20, in_flight_per_worker: 3 }
    }
}

/// One cluster of a finished chunk.
enum Payload {
    /// Uncompressed: this range of the chunk's buffer.
    Raw(Range<usize>),
    /// Compressed: this range of the chunk's `packed` bytes.
    Compressed(Range<usize>),
}

/// A processed chunk, ready to write.
struct ChunkOut {
    first_cluster: u64,
    buffers: Buffers,
    clusters: Vec<(u64, Payload)>,
}

/// A chunk's memory, recycled from chunk to chunk so that the hot path allocates nothing:
/// the chunk's bytes, and its compressed clusters back to back.
#[derive(Default)]
struct Buffers {
    data: Vec<u8>,
    packed: Vec<u8>,
}

/// State shared by workers and the writer.
struct Shared {
    next_to_take: u64,
    next_to_write: u64,
    done: BTreeMap<u64, Result<ChunkOut, ImageError>>,
    /// Spare chunk buffers, so large allocations are not repeated per chunk.
    spare: Vec<Buffers>,
    stop: bool,
}

/// Converts `source` into a new qcow2 at `destination`.
pub fn run(
    source: &dyn DiskSource,
    destination: &Path,
    options: PipelineOptions,
    control: &JobControl,
) -> Result<WriteStats, ConvertError> {
    let size = source.size();
    let chunk_bytes = options.chunk_bytes.max(CLUSTER) / CLUSTER * CLUSTER;
    let chunks = size.div_ceil(chunk_bytes);
    let workers = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let in_flight = (workers * options.in_flight_per_worker).max(2) as u64;
    let writer_options = WriterOptions { cluster_bits: CLUSTER_BITS, compression: options.compression.map(|c| c.kind) };
    let mut writer = Qcow2Writer::create(destination, size, writer_options).map_err(image_error)?;
    control.progress.total_bytes.store(size, Ordering::Relaxed);

    let shared =
        Mutex::new(Shared { next_to_take: 0, next_to_write: 0, done: BTreeMap::new(), spare: Vec::new(), stop: false });
    let ready = Condvar::new();
    let work = Work {
        source,
        size,
        chunk_bytes,
        chunks,
        in_flight,
        compression: options.compression,
        shared: &shared,
        ready: &ready,
    };
    let result = std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| work.worker());
        }
        let written = work.write_in_order(&mut writer, control);
        work.stop();
        written
    });
    result?;
    writer.finish().map_err(image_error)
}

/// What every thread of one conversion shares.
struct Work<'a> {
    source: &'a dyn DiskSource,
    size: u64,
    chunk_bytes: u64,
    chunks: u64,
    in_flight: u64,
    compression: Option<Compression>,
    shared: &'a Mutex<Shared>,
    ready: &'a Condvar,
}

impl Work<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A poisoned lock means a worker panicked; the state itself is still consistent.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.ready.notify_all();
    }

    fn worker(&self) {
        loop {
            let (index, buffers) = {
                let mut state = self.lock();
                loop {
                    if state.stop || state.next_to_take >= self.chunks {
                        return;
                    }
                    if state.next_to_take < state.next_to_write + self.in_flight {
                        break;
                    }
                    state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                let index = state.next_to_take;
                state.next_to_take += 1;
                (index, state.spare.pop().unwrap_or_default())
            };
            // A panic here would leave the writer waiting for this chunk until the timeout.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.process(index, buffers)))
                .unwrap_or_else(|panic| Err(ImageError::Internal(panic_message(panic.as_ref()))));
            self.lock().done.insert(index, out);
            self.ready.notify_all();
        }
    }

    /// Reads one chunk's allocated clusters and prepares their payloads.
    fn process(&self, index: u64, mut buffers: Buffers) -> Result<ChunkOut, ImageError> {
        let start = index * self.chunk_bytes;
        let end = (start + self.chunk_bytes).min(self.size);
        let first_cluster = start / CLUSTER;
        let mut clusters = Vec::new();
        let spans = cluster_spans(&self.source.allocated(start..end)?, start, end);
        if spans.is_empty() {
            return Ok(ChunkOut { first_cluster, buffers, clusters });
        }
        let Buffers { data: buffer, packed } = &mut buffers;
        buffer.resize((end - start) as usize, 0);
        packed.clear();
        let mut scratch = Vec::new();
        for span in spans {
            let local = (span.start - start) as usize..(span.end - start) as usize;
            self.source.read_at(span.start, &mut buffer[local.clone()])?;
            for at in local.step_by(CLUSTER as usize) {
                let range = at..(at + CLUSTER as usize).min(buffer.len());
                let data = &buffer[range.clone()];
                if is_zero(data) {
                    continue;
                }
                let cluster = (start + at as u64) / CLUSTER;
                clusters.push((cluster, self.payload(data, range, packed, &mut scratch)));
            }
        }
        Ok(ChunkOut { first_cluster, buffers, clusters })
    }

    fn payload(&self, data: &[u8], range: Range<usize>, packed: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Payload {
        if let Some(c) = self.compression {
            // qemu inflates exactly one cluster, so the disk's short last cluster is padded.
            if compress::compress_padded(c.kind, c.level, data, CLUSTER as usize, scratch) {
                packed.extend_from_slice(scratch);
                return Payload::Compressed(packed.len() - scratch.len()..packed.len());
            }
        }
        Payload::Raw(range)
    }

    /// Writes chunks in guest order as workers finish them.
    fn write_in_order(&self, writer: &mut Qcow2Writer, control: &JobControl) -> Result<(), ConvertError> {
        for index in 0..self.chunks {
            let chunk = self.wait_for(index, control)?.map_err(image_error)?;
            for (cluster, payload) in &chunk.clusters {
                match payload {
                    Payload::Raw(range) => writer.write_cluster(*cluster, &chunk.buffers.data[range.clone()]),
                    Payload::Compressed(range) => {
                        writer.write_compressed(*cluster, &chunk.buffers.packed[range.clone()])
                    }
                }
                .map_err(image_error)?;
            }
            debug_assert!(chunk.clusters.iter().all(|(c, _)| *c >= chunk.first_cluster));
            let done = ((index + 1) * self.chunk_bytes).min(self.size);
            control.progress.done_bytes.store(done, Ordering::Relaxed);
            let mut state = self.lock();
            state.next_to_write = index + 1;
            state.spare.push(chunk.buffers);
            drop(state);
            self.ready.notify_all();
        }
        Ok(())
    }

    fn wait_for(&self, index: u64, control: &JobControl) -> Result<Result<ChunkOut, ImageError>, ConvertError> {
        let mut state = self.lock();
        loop {
            if let Some(out) = state.done.remove(&index) {
                return Ok(out);
            }
            control.check()?;
            // Wake now and then to notice a timeout or cancellation.
            let (next, _) = self
                .ready
                .wait_timeout(state, std::time::Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner());
            state = next;
        }
    }
}

/// The allocated ranges of a chunk widened to whole clusters and merged.
fn cluster_spans(allocated: &[Range<u64>], start: u64, end: u64) -> Vec<Range<u64>> {
    let mut spans: Vec<Range<u64>> = Vec::new();
    for r in allocated {
        let s = (r.start.max(start) / CLUSTER * CLUSTER).max(start);
        let e = r.end.min(end).div_ceil(CLUSTER).saturating_mul(CLUSTER).min(end);
        if s >= e {
            continue;
        }
        match spans.last_mut() {
            Some(last) if last.end >= s => last.end = last.end.max(e),
            _ => spans.push(s..e),
        }
    }
    spans
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_owned(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

/// Whether a buffer is all zeros, a word at a time.
pub fn is_zero(data: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128; align_to only splits off unaligned ends.
    let (head, words, tail) = unsafe { data.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Maps an image error to the conversion error a job reports.
pub fn image_error(e: ImageError) -> ConvertError {
    match e {
        ImageError::Corrupt(m) | ImageError::Limit(m) => ConvertError::Corrupt(m),
        ImageError::Unsupported(m) => ConvertError::Unsupported(m),
        e @ ImageError::Internal(_) => ConvertError::Failed(e.to_string()),
        ImageError::Io { path, source } if source.raw_os_error() == Some(libc::ENOSPC) => {
            ConvertError::NoSpace(format!("{}: {source}", path.display()))
        }
        ImageError::Io { path, source } => ConvertError::Failed(format!("{}: {source}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn spans_cover_whole_clusters_and_merge() {
        let c = CLUSTER;
        assert_eq!(cluster_spans(&[10..20, 30..40], 0, 4 * c), vec![0..c]);
        assert_eq!(cluster_spans(&[c + 1..c + 2, 3 * c..3 * c + 1], 0, 4 * c), vec![c..2 * c, 3 * c..4 * c]);
        let whole = vec![0..10 * c];
        assert_eq!(cluster_spans(&whole, 2 * c, 3 * c), vec![(2 * c)..(3 * c)]);
        // A disk whose size is not a multiple of the cluster.
        let short = vec![0..100];
        assert_eq!(cluster_spans(&short, 0, 100), short);
    }

    /// A disk whose reader panics in its third chunk, as a library bug would.
    struct PanickingSource;

    impl DiskSource for PanickingSource {
        fn size(&self) -> u64 {
            16 << 20
        }

        fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, ImageError> {
            Ok(vec![range])
        }

        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
            assert!(offset < 8 << 20, "a bug in a reader");
            buf.fill(1);
            Ok(())
        }
    }

    #[test]
    fn a_panicking_reader_fails_the_conversion_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // Were the panic lost, the writer would wait for the chunk until this deadline.
        let control = JobControl::new(std::time::Duration::from_secs(30));
        let options = PipelineOptions { chunk_bytes: 4 << 20, threads: 2, ..PipelineOptions::default() };
        let result = run(&PanickingSource, &dir.path().join("out.qcow2"), options, &control);
        match result {
            Err(ConvertError::Failed(m)) => {
                assert!(m.contains("a bug in a reader") && m.contains("please report it"), "{m}")
            }
            other => panic!("expected a failed conversion naming the bug, got {other:?}"),
        }
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 65536 + 3];
        assert!(is_zero(&v[1..]));
        v[65537] = 1;
        assert!(!is_zero(&v[1..]));
    }
}
