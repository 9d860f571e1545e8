//! The bounded conversion pipeline.
//!
//! Workers (one per core, as many working at once as this conversion's share of the cores
//! among those running in the process: [`super::share`]) take chunks of the virtual disk in order, read their allocated
//! parts (decompressing grains as they go), drop all-zero clusters, and compress clusters when
//! asked. The calling thread writes finished chunks to the qcow2 in guest order. At most
//! `in_flight` chunks exist at once, which bounds memory whatever the disk size, and gives
//! back-pressure: workers wait while the writer is behind.
//!
//! **Offload mode.** Without compression, when the output's filesystem can share blocks or
//! copy server-side (XFS, btrfs, NFS 4.2 …: [`CopyOffload`]), the parts of a chunk that the
//! source stores verbatim in a file on that same filesystem ([`DiskSource::plain_runs`]: raw
//! images, flat extents, plain sparse grains) are not read: the worker hands them on as
//! copies, and the writing thread, reaching them in guest order, copies them file to file with
//! [`Qcow2Writer::copy_clusters_from`] (`copy_file_range`: a reflink, or a copy the server
//! makes). Holes stay holes — only allocated data is ever a run — but zero-filled blocks inside
//! allocated data are copied as they are: finding them would mean reading every byte, which
//! is the cost the copy avoids, and shared blocks take no extra space anyway. Only whole
//! clusters at a file offset the filesystem can share are copied; the edges of a run, and
//! everything else, go through the read path above. On other filesystems (ext4, tmpfs) the
//! read path is all there is: the kernel's fallback copy measured slower than reading.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::share::{thread_cpu_time, Ticket};
use crate::convert::{Compression, ConvertError, JobControl};
use crate::image::qcow2::{compress, CopyOffload, Qcow2Writer, WriteStats, WriterOptions};
use crate::image::{DiskSource, ImageError};

/// How often a worker held back by its share (share.rs) looks whether the share grew.
const SHARE_RECHECK: Duration = Duration::from_millis(20);

/// Output cluster size: qcow2's default and VMware's usual grain, 64 KiB.
pub const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;

/// How the pipeline runs.
#[derive(Debug, Clone, Copy)]
pub struct PipelineOptions {
    /// Codec and level of compressed clusters; `None` writes clusters uncompressed (and lets
    /// plain source data be copied file to file where the filesystem offloads copies).
    pub compression: Option<Compression>,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Bytes of virtual disk per unit of work (a multiple of the cluster size).
    pub chunk_bytes: u64,
    /// Chunks allowed in memory at once, per worker.
    pub in_flight_per_worker: usize,
}

impl PipelineOptions {
    /// The worker threads to start: `threads`, or one per core.
    pub fn workers(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions { compression: None, threads: 0, chunk_bytes: 4 << 20, in_flight_per_worker: 3 }
    }
}

/// What to write for a run of guest clusters of a finished chunk.
enum Payload<'a> {
    /// One cluster, uncompressed: this range of the chunk's buffer.
    Raw(Range<usize>),
    /// One cluster, compressed: this range of the chunk's `packed` bytes.
    Compressed(Range<usize>),
    /// `count` clusters not read, stored verbatim in `file` from `file_offset`: for the
    /// writing thread to copy (offload mode only).
    Copy { count: u64, file: &'a File, file_offset: u64 },
}

/// A processed chunk, ready to write.
struct ChunkOut<'a> {
    first_cluster: u64,
    buffers: Buffers,
    /// Payloads by first guest cluster, in increasing order.
    clusters: Vec<(u64, Payload<'a>)>,
}

/// A chunk's memory, recycled from chunk to chunk so that the hot path allocates nothing:
/// the chunk's bytes, and its compressed clusters back to back.
#[derive(Default)]
struct Buffers {
    data: Vec<u8>,
    packed: Vec<u8>,
}

/// A chunk as a worker finished it.
enum Done<'a> {
    Chunk(Result<ChunkOut<'a>, ImageError>),
    /// This chunk and the ones up to (not including) the given index hold no data: skipped in
    /// one step, so that a disk's cost follows its extents and data, not its virtual size.
    Skip(u64),
}

/// State shared by workers and the writer.
struct Shared<'a> {
    next_to_take: u64,
    next_to_write: u64,
    done: BTreeMap<u64, Done<'a>>,
    /// Spare chunk buffers, so large allocations are not repeated per chunk.
    spare: Vec<Buffers>,
    /// Workers working on a chunk now: at most the pipeline's [`Ticket::allowed`].
    active: usize,
    stop: bool,
}

/// Converts `source` into a new qcow2 at `destination`.
pub fn run(
    source: &dyn DiskSource,
    destination: &Path,
    options: PipelineOptions,
    control: &JobControl,
) -> Result<WriteStats, ConvertError> {
    run_with(source, destination, options, control, |_| {})
}

/// [`run`], with `prepare` applied to the new writer before anything is written (tests use it
/// to choose how the writer copies).
fn run_with(
    source: &dyn DiskSource,
    destination: &Path,
    options: PipelineOptions,
    control: &JobControl,
    prepare: impl FnOnce(&mut Qcow2Writer),
) -> Result<WriteStats, ConvertError> {
    let size = source.size();
    let chunk_bytes = options.chunk_bytes.max(CLUSTER) / CLUSTER * CLUSTER;
    let chunks = size.div_ceil(chunk_bytes);
    let workers = options.workers();
    let in_flight = (workers * options.in_flight_per_worker).max(2) as u64;
    let writer_options = WriterOptions { cluster_bits: CLUSTER_BITS, compression: options.compression.map(|c| c.kind) };
    let mut writer = Qcow2Writer::create(destination, size, writer_options)?;
    prepare(&mut writer);
    control.progress.total_bytes.store(size, Ordering::Relaxed);
    // Compressed clusters must be read to be compressed; and where no copy can be offloaded,
    // the read path is faster (see the module documentation).
    let offload = Some(writer.copy_offload()).filter(|o| options.compression.is_none() && o.possible());

    let shared = Mutex::new(Shared {
        next_to_take: 0,
        next_to_write: 0,
        done: BTreeMap::new(),
        spare: Vec::new(),
        active: 0,
        stop: false,
    });

    let ready = Condvar::new();
    let work = Work {
        source,
        size,
        chunk_bytes,
        chunks,
        in_flight,
        compression: options.compression,
        offload,
        offload_stopped: AtomicBool::new(false),
        shared: &shared,
        ready: &ready,
        // Up to `workers` threads start; how many work at once is this pipeline's share of
        // the cores among the conversions running in this process (share.rs).
        ticket: Ticket::register(workers),
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
    Ok(writer.finish()?)
}

/// What every thread of one conversion shares.
struct Work<'a> {
    source: &'a dyn DiskSource,
    size: u64,
    chunk_bytes: u64,
    chunks: u64,
    in_flight: u64,
    compression: Option<Compression>,
    /// Offload mode: how copies into the output are made, for workers to decide which runs
    /// to leave to the writer. `None`: every chunk takes the read path.
    offload: Option<CopyOffload>,
    /// Set by the writing thread when the writer stopped offloading (`copy_file_range` turned
    /// out unsupported between these files): workers read everything from then on.
    offload_stopped: AtomicBool,
    shared: &'a Mutex<Shared<'a>>,
    ready: &'a Condvar,
    /// This conversion's place in the split of the cores.
    ticket: Ticket,
}

impl<'a> Work<'a> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared<'a>> {
        // A poisoned lock means a worker panicked; the state itself is still consistent.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.ready.notify_all();
    }

    fn worker(&self) {
        loop {
            // This worker's demand: CPU time over the wall time from here to the end of its
            // chunk, less the time it was held back by the share (waits for the writer count:
            // a job limited by its output needs no more cores).
            let (started, cpu_before) = (Instant::now(), thread_cpu_time());
            let mut held_back = Duration::ZERO;
            let (index, buffers) = {
                let mut state = self.lock();
                loop {
                    if state.stop || state.next_to_take >= self.chunks {
                        return;
                    }
                    if state.next_to_take >= state.next_to_write + self.in_flight {
                        state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    if state.active >= self.ticket.allowed() {
                        // Other jobs' demand changes without a notification here: look again.
                        let parked = Instant::now();
                        state = self.ready.wait_timeout(state, SHARE_RECHECK).unwrap_or_else(|p| p.into_inner()).0;
                        held_back += parked.elapsed();
                        continue;
                    }
                    break;
                }
                let index = state.next_to_take;
                let skip_to = self.first_chunk_with_data(index);
                if skip_to > index {
                    state.next_to_take = skip_to;
                    state.done.insert(index, Done::Skip(skip_to));
                    drop(state);
                    self.ready.notify_all();
                    continue;
                }
                state.next_to_take += 1;
                state.active += 1;
                (index, state.spare.pop().unwrap_or_default())
            };
            // A panic here would leave the writer waiting for this chunk until the timeout.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.process(index, buffers)))
                .unwrap_or_else(|panic| Err(ImageError::Internal(panic_message(panic.as_ref()))));
            self.ticket
                .record(thread_cpu_time().saturating_sub(cpu_before), started.elapsed().saturating_sub(held_back));
            let mut state = self.lock();
            state.active -= 1;
            state.done.insert(index, Done::Chunk(out));
            drop(state);
            self.ready.notify_all();
        }
    }

    /// The first chunk from `index` on that may hold data ([`DiskSource::next_data`]); a
    /// source that cannot tell has every chunk read.
    fn first_chunk_with_data(&self, index: u64) -> u64 {
        match self.source.next_data(index * self.chunk_bytes) {
            Ok(at) => (at / self.chunk_bytes).clamp(index, self.chunks),
            Err(_) => index,
        }
    }

    /// Reads one chunk's allocated clusters and prepares their payloads; in offload mode,
    /// the clusters the writer can copy file to file are handed on unread.
    fn process(&self, index: u64, mut buffers: Buffers) -> Result<ChunkOut<'a>, ImageError> {
        let start = index * self.chunk_bytes;
        let end = (start + self.chunk_bytes).min(self.size);
        let first_cluster = start / CLUSTER;
        let mut clusters = Vec::new();
        let spans = cluster_spans(&self.source.allocated(start..end)?, start, end);
        if spans.is_empty() {
            return Ok(ChunkOut { first_cluster, buffers, clusters });
        }
        let copies = self.copies(start, end)?;
        let Buffers { data: buffer, packed } = &mut buffers;
        buffer.resize((end - start) as usize, 0);
        packed.clear();
        let mut scratch = Vec::new();
        for span in without(&spans, copies.iter().map(|(range, _)| range)) {
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
        if !copies.is_empty() {
            clusters.extend(copies.into_iter().map(|(range, copy)| (range.start / CLUSTER, copy)));
            clusters.sort_unstable_by_key(|(cluster, _)| *cluster);
        }
        Ok(ChunkOut { first_cluster, buffers, clusters })
    }

    /// In offload mode, the whole clusters of `start..end` (one chunk) that the writer can
    /// copy file to file, in order: each with its byte range and its `Payload::Copy`.
    ///
    /// A cluster qualifies when it lies entirely inside one plain run (the disk's short last
    /// cluster: up to the end of the disk), the run's file is on the output's offloading
    /// filesystem, and the cluster's file offset is a multiple of that filesystem's block size
    /// (at most a cluster), so the blocks can be shared rather than copied by the kernel. The
    /// ragged edges of runs are left to the read path.
    fn copies(&self, start: u64, end: u64) -> Result<Vec<(Range<u64>, Payload<'a>)>, ImageError> {
        let Some(offload) = self.offload else { return Ok(Vec::new()) };
        if self.offload_stopped.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let source: &'a dyn DiskSource = self.source;
        let mut out = Vec::new();
        // One fstatfs per distinct file, not per run.
        let mut alignments: Vec<(&File, Option<u64>)> = Vec::new();
        for run in source.plain_runs(start..end)? {
            // Defensive: a run outside the chunk would hand the writer clusters twice.
            let range = run.range.start.max(start)..run.range.end.min(end);
            if range.is_empty() {
                continue;
            }
            let file_offset = run.file_offset + (range.start - run.range.start);
            let alignment = match alignments.iter().find(|(f, _)| std::ptr::eq(*f, run.file)) {
                Some((_, a)) => *a,
                None => {
                    let a = offload.source_alignment(run.file);
                    alignments.push((run.file, a));
                    a
                }
            };
            let Some(alignment) = alignment else { continue };
            let first = range.start.div_ceil(CLUSTER);
            let last = if range.end >= self.size { self.size.div_ceil(CLUSTER) } else { range.end / CLUSTER };
            if first >= last {
                continue;
            }
            let copy_start = first * CLUSTER;
            let file_offset = file_offset + (copy_start - range.start);
            if !file_offset.is_multiple_of(alignment.min(CLUSTER)) {
                continue;
            }
            let range = copy_start..(last * CLUSTER).min(self.size);
            out.push((range, Payload::Copy { count: last - first, file: run.file, file_offset }));
        }
        Ok(out)
    }

    fn payload(&self, data: &[u8], range: Range<usize>, packed: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Payload<'a> {
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
        // Clusters the writer had to read itself (see `write_copy`).
        let mut fallback = Vec::new();
        let mut index = 0;
        while index < self.chunks {
            // In offload mode the writer, not the workers, does the work: workers hand chunks
            // over at once and `wait_for` might never wait, so cancellation and the deadline
            // are checked here too.
            control.check()?;
            let chunk = match self.wait_for(index, control)? {
                Done::Chunk(chunk) => chunk?,
                Done::Skip(next) => {
                    control.progress.done_bytes.store((next * self.chunk_bytes).min(self.size), Ordering::Relaxed);
                    self.lock().next_to_write = next;
                    self.ready.notify_all();
                    index = next;
                    continue;
                }
            };
            for (cluster, payload) in &chunk.clusters {
                match payload {
                    Payload::Raw(range) => writer.write_cluster(*cluster, &chunk.buffers.data[range.clone()]),
                    Payload::Compressed(range) => {
                        writer.write_compressed(*cluster, &chunk.buffers.packed[range.clone()])
                    }
                    Payload::Copy { count, file, file_offset } => {
                        self.write_copy(writer, *cluster, *count, file, *file_offset, &mut fallback)
                    }
                }?;
            }
            debug_assert!(chunk.clusters.iter().all(|(c, _)| *c >= chunk.first_cluster));
            let done = ((index + 1) * self.chunk_bytes).min(self.size);
            control.progress.done_bytes.store(done, Ordering::Relaxed);
            let mut state = self.lock();
            state.next_to_write = index + 1;
            state.spare.push(chunk.buffers);
            drop(state);
            self.ready.notify_all();
            index += 1;
        }
        Ok(())
    }

    /// Writes `count` clusters from `first` that a worker left unread as a copy: copied file
    /// to file while the writer offloads copies from `file`. Once it stops (`copy_file_range`
    /// turned out unsupported between these files, and the writer fell back to reading and
    /// writing for good), workers are told to read everything again, and the copies already
    /// handed on are read here, all-zero clusters dropped, as a worker would have.
    fn write_copy(
        &self,
        writer: &mut Qcow2Writer,
        first: u64,
        count: u64,
        file: &File,
        file_offset: u64,
        buffer: &mut Vec<u8>,
    ) -> Result<(), ImageError> {
        // The worker found `file` on a filesystem the output can copy from; only the writer's
        // mode can have changed since (to read-and-write, after copy_file_range failed), and
        // asking it costs no fstatfs.
        if writer.copy_offload().possible() {
            writer.copy_clusters_from(first, count, file, file_offset)?;
            if !writer.copy_offload().possible() {
                self.offload_stopped.store(true, Ordering::Relaxed);
            }
            return Ok(());
        }
        self.offload_stopped.store(true, Ordering::Relaxed);
        let start = first * CLUSTER;
        let end = ((first + count) * CLUSTER).min(self.size);
        buffer.resize((end - start) as usize, 0);
        self.source.read_at(start, buffer)?;
        for (i, data) in buffer.chunks(CLUSTER as usize).enumerate() {
            if !is_zero(data) {
                writer.write_cluster(first + i as u64, data)?;
            }
        }
        Ok(())
    }

    fn wait_for(&self, index: u64, control: &JobControl) -> Result<Done<'a>, ConvertError> {
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

/// `spans` (sorted, non-overlapping) with the sorted, non-overlapping `cuts` taken out.
fn without<'r>(spans: &[Range<u64>], cuts: impl IntoIterator<Item = &'r Range<u64>>) -> Vec<Range<u64>> {
    let mut cuts = cuts.into_iter().peekable();
    let mut out = Vec::new();
    for span in spans {
        let mut at = span.start;
        while at < span.end {
            // Cuts that end before `at` are behind us.
            while cuts.next_if(|c| c.end <= at).is_some() {}
            match cuts.peek() {
                Some(c) if c.start < span.end => {
                    if c.start > at {
                        out.push(at..c.start);
                    }
                    at = c.end.min(span.end).max(at);
                    if c.end <= span.end {
                        cuts.next();
                    }
                }
                _ => {
                    out.push(at..span.end);
                    at = span.end;
                }
            }
        }
    }
    out
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

/// The text a panic was raised with, for an error message.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
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

#[cfg(test)]
pub(crate) mod tests {
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

    /// A disk whose reads take a while, counting how many run at once.
    #[derive(Default)]
    struct CountingSource {
        now: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl DiskSource for CountingSource {
        fn size(&self) -> u64 {
            32 << 20
        }

        fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, ImageError> {
            Ok(vec![range])
        }

        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
            buf.fill(7);
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Issue 13: with three other CPU-bound conversions running in the process, a pipeline of
    /// 4 workers on (at most) 4 cores works on one chunk at a time, not four.
    #[test]
    fn concurrent_conversions_split_the_workers() {
        let others: Vec<Ticket> = (0..3).map(|_| Ticket::register(4)).collect();
        let dir = tempfile::tempdir().unwrap();
        let control = JobControl::new(std::time::Duration::from_secs(60));
        let source = CountingSource::default();
        let options = PipelineOptions { threads: 4, ..PipelineOptions::default() };
        run(&source, &dir.path().join("out.qcow2"), options, &control).unwrap();
        assert_eq!(source.most.load(Ordering::SeqCst), 1, "reads at once beside 3 other conversions");
        drop(others);
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
    #[allow(clippy::single_range_in_vec_init)]
    fn spans_without_copies() {
        let spans = [0..10, 20..30, 40..50];
        assert_eq!(without(&spans, &[]), spans.to_vec());
        assert_eq!(without(&spans, &[0..10]), vec![20..30, 40..50]);
        assert_eq!(without(&spans, &[2..4, 6..8]), vec![0..2, 4..6, 8..10, 20..30, 40..50]);
        // A cut across two spans takes from both.
        assert_eq!(without(&spans, &[5..25, 45..50]), vec![0..5, 25..30, 40..45]);
        assert_eq!(without(&spans, &[0..100]), Vec::<Range<u64>>::new());
        assert_eq!(without(&spans, &[12..14]), spans.to_vec());
    }

    // ---- offload mode: copies file to file ------------------------------------------------

    use crate::image::qcow2::CopyMode;
    use crate::image::raw::RawImage;
    use crate::image::vmdk;
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    use crate::test_support::{qemu_img, Rng};

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    fn random(len: u64, seed: u64) -> Vec<u8> {
        let mut out = vec![0; len as usize];
        Rng(seed | 1).fill(&mut out);
        out
    }

    /// A raw disk of 10 MiB + 1000 bytes (a short last cluster): random data, a hole, a
    /// zero-filled data block (written, so allocated), data starting mid-cluster, another hole,
    /// and data up to the end. Returns how many clusters hold non-zero bytes.
    fn mixed_raw(path: &Path) -> u64 {
        let size = 10 * MIB + 1000;
        let file = File::create(path).unwrap();
        file.set_len(size).unwrap();
        file.write_all_at(&random(MIB, 1), 0).unwrap();
        // 1..2 MiB: a hole.
        file.write_all_at(&vec![0u8; MIB as usize], 2 * MIB).unwrap();
        file.write_all_at(&random(2 * MIB - 512, 2), 3 * MIB + 512).unwrap();
        // 5..8 MiB: a hole.
        file.write_all_at(&random(size - 8 * MIB, 3), 8 * MIB).unwrap();
        file.sync_all().unwrap();
        // Non-zero clusters: 16 + 32 + 33 (the last one short).
        16 + 32 + (size - 8 * MIB).div_ceil(CLUSTER)
    }

    /// Converts `source` with the writer copying the way `mode` says; checks the result with
    /// `qemu-img check` and `qemu-img compare` against `original` (read as `format`), and that
    /// progress reached the end. The VMDK reader's tests convert their fixtures with it.
    pub(crate) fn convert(
        source: &dyn DiskSource,
        out: &Path,
        mode: CopyMode,
        original: &Path,
        format: &str,
    ) -> WriteStats {
        let control = JobControl::new(std::time::Duration::from_secs(60));
        let options = PipelineOptions { threads: 2, ..PipelineOptions::default() };
        let stats = run_with(source, out, options, &control, |w| w.set_copy_mode(mode))
            .unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        qemu_img(&["check", "-f", "qcow2", s(out)]);
        qemu_img(&["compare", "-f", format, "-F", "qcow2", s(original), s(out)]);
        assert_eq!(control.progress.done_bytes.load(Ordering::Relaxed), source.size(), "progress reaches the end");
        stats
    }

    /// Whether a conversion into `dir` offloads copies without being told to (XFS, btrfs …).
    fn offloads_in(dir: &Path) -> bool {
        let probe = Qcow2Writer::create(&dir.join("probe.qcow2"), 1 << 20, WriterOptions::default()).unwrap();
        probe.copy_offload().possible()
    }

    #[test]
    fn offload_mode_copies_plain_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let raw_path = d.join("disk.raw");
        let nonzero = mixed_raw(&raw_path);
        let raw = RawImage::open(&raw_path).unwrap();

        // The read path: zero clusters dropped, nothing copied.
        let read = convert(&raw, &d.join("read.qcow2"), CopyMode::ReadWrite, &raw_path, "raw");
        assert_eq!((read.data_clusters, read.copied_clusters), (nonzero, 0), "{read:?}");

        // Copies forced as on a reflinking filesystem: every allocated cluster is copied,
        // the zero-filled block too (16 clusters); the holes stay unallocated.
        let copied = convert(&raw, &d.join("copied.qcow2"), CopyMode::CopyFileRange, &raw_path, "raw");
        assert_eq!(copied.copied_clusters, copied.data_clusters, "{copied:?}");
        assert_eq!(copied.data_clusters, nonzero + 16, "{copied:?}");
        assert_eq!(copied.zero_clusters_skipped, (10 * MIB).div_ceil(CLUSTER) + 1 - nonzero - 16);

        // As configured here: on ext4 or tmpfs the read path, exactly as before.
        let auto = convert(&raw, &d.join("auto.qcow2"), CopyMode::Auto, &raw_path, "raw");
        if offloads_in(d) {
            assert_eq!(auto.copied_clusters, auto.data_clusters, "{auto:?}");
        } else {
            assert_eq!(auto, WriteStats { file_bytes: auto.file_bytes, ..read }, "the read path, unchanged");
        }

        // Compression always reads.
        let control = JobControl::new(std::time::Duration::from_secs(60));
        let compression = Some(Compression { kind: crate::config::CompressionType::Zstd, level: 6 });
        let options = PipelineOptions { threads: 2, compression, ..PipelineOptions::default() };
        let out = d.join("compressed.qcow2");
        let stats = run_with(&raw, &out, options, &control, |w| w.set_copy_mode(CopyMode::CopyFileRange)).unwrap();
        assert_eq!(stats.copied_clusters, 0, "{stats:?}");
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw_path), s(&out)]);
    }

    #[test]
    fn offload_mode_copies_vmdk_extents_and_grains() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let raw_path = d.join("disk.raw");
        let nonzero = mixed_raw(&raw_path);
        for subformat in ["monolithicFlat", "monolithicSparse", "streamOptimized"] {
            let vmdk_path = d.join(format!("{subformat}.vmdk"));
            let options = format!("subformat={subformat}");
            qemu_img(&["convert", "-f", "raw", "-O", "vmdk", "-o", &options, s(&raw_path), s(&vmdk_path)]);
            let image = vmdk::open(&vmdk_path, &vmdk::Limits::default()).unwrap();
            let out = d.join(format!("{subformat}.qcow2"));
            let stats = convert(&image, &out, CopyMode::CopyFileRange, &vmdk_path, "vmdk");
            match subformat {
                // qemu-img writes the flat file sparse (zeros become holes) and allocates only
                // the grains with data: all of it is copied.
                "monolithicFlat" | "monolithicSparse" => {
                    assert_eq!((stats.data_clusters, stats.copied_clusters), (nonzero, nonzero), "{subformat}")
                }
                // Compressed grains are read.
                _ => assert_eq!((stats.data_clusters, stats.copied_clusters), (nonzero, 0), "{subformat}"),
            }
        }

        // A delta over the sparse disk: the child's grains and the parent's, both copied.
        let child = d.join("child.vmdk");
        qemu_img(&["create", "-q", "-f", "vmdk", "-b", "monolithicSparse.vmdk", "-F", "vmdk", s(&child)]);
        let out = Command::new("qemu-io").args(["-f", "vmdk", "-c", "write -P 0x44 6M 1M", s(&child)]).output();
        assert!(out.is_ok_and(|o| o.status.success()), "qemu-io writes the delta");
        let image = vmdk::open(&child, &vmdk::Limits::default()).unwrap();
        let stats = convert(&image, &d.join("child.qcow2"), CopyMode::CopyFileRange, &child, "vmdk");
        assert_eq!(stats.copied_clusters, stats.data_clusters, "{stats:?}");
        assert_eq!(stats.data_clusters, nonzero + 16, "the parent's clusters and the child's 1 MiB");
    }

    /// Hand-written descriptors whose flat data is not where whole clusters can be shared:
    /// the ragged parts are read, the rest copied, and the guest sees the same bytes.
    #[test]
    fn offload_mode_reads_the_ragged_edges_of_runs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let data = random(4 * MIB, 9);
        std::fs::write(d.join("data.bin"), [vec![0x11u8; 512], data.clone()].concat()).unwrap();
        let descriptor = |name: &str, extents: &str| {
            let path = d.join(name);
            let text = format!(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n{extents}\n"
            );
            std::fs::write(&path, text).unwrap();
            path
        };
        let sectors = 4 * MIB / 512;
        // The data 512 bytes into its file: no cluster's file offset is block-aligned.
        let unaligned = descriptor("unaligned.vmdk", &format!("RW {sectors} FLAT \"data.bin\" 1"));
        let expected = d.join("unaligned.raw");
        std::fs::write(&expected, &data).unwrap();
        let image = vmdk::open(&unaligned, &vmdk::Limits::default()).unwrap();
        let stats = convert(&image, &d.join("unaligned.qcow2"), CopyMode::CopyFileRange, &expected, "raw");
        assert_eq!((stats.data_clusters, stats.copied_clusters), (64, 0), "{stats:?}");

        // 4 KiB of zero extent first, then the data from its file's ninth sector (a block
        // boundary), to 1536 bytes short of 4 MiB: guest clusters are 4 KiB off the run's
        // start, yet their file offsets are block-aligned. The first cluster straddles both
        // extents and is read; the others are copied, the disk's short last one included.
        let flat_sectors = sectors - 8 - 3;
        let shifted = descriptor("shifted.vmdk", &format!("RW 8 ZERO\nRW {flat_sectors} FLAT \"data.bin\" 8"));
        let expected = d.join("shifted.raw");
        let mut bytes = vec![0u8; 4096];
        bytes.extend(&data[4096 - 512..4096 - 512 + (flat_sectors * 512) as usize]);
        std::fs::write(&expected, &bytes).unwrap();
        let image = vmdk::open(&shifted, &vmdk::Limits::default()).unwrap();
        assert_eq!(image.size(), bytes.len() as u64);
        let stats = convert(&image, &d.join("shifted.qcow2"), CopyMode::CopyFileRange, &expected, "raw");
        assert_eq!((stats.data_clusters, stats.copied_clusters), (64, 63), "all but the first cluster: {stats:?}");
    }

    fn new_shared<'a>() -> Mutex<Shared<'a>> {
        Mutex::new(Shared {
            next_to_take: 0,
            next_to_write: 0,
            done: BTreeMap::new(),
            spare: Vec::new(),
            active: 0,
            stop: false,
        })
    }

    /// The state of a conversion of `source` in 4 MiB chunks, for tests that play the
    /// workers' part themselves.
    fn work_over<'a>(
        source: &'a dyn DiskSource,
        offload: CopyOffload,
        shared: &'a Mutex<Shared<'a>>,
        ready: &'a Condvar,
    ) -> Work<'a> {
        let chunks = source.size().div_ceil(4 * MIB);
        Work {
            source,
            size: source.size(),
            chunk_bytes: 4 * MIB,
            chunks,
            in_flight: chunks,
            compression: None,
            offload: Some(offload),
            offload_stopped: AtomicBool::new(false),
            shared,
            ready,
            ticket: Ticket::register(1),
        }
    }

    /// Every chunk processed, as workers running ahead of the writer leave them.
    fn process_all(work: &Work<'_>) {
        for index in 0..work.chunks {
            let chunk = work.process(index, Buffers::default()).unwrap();
            work.lock().done.insert(index, Done::Chunk(Ok(chunk)));
        }
    }

    /// In offload mode the writer does the work and the workers hand chunks over at once, so
    /// the writer may never wait for one: cancellation must stop it all the same. Here every
    /// chunk is ready before the writer starts, as when workers run ahead.
    #[test]
    fn offload_mode_notices_cancellation() {
        let dir = tempfile::tempdir().unwrap();
        let raw_path = dir.path().join("disk.raw");
        std::fs::write(&raw_path, random(16 * MIB, 5)).unwrap();
        let source = RawImage::open(&raw_path).unwrap();
        let mut writer =
            Qcow2Writer::create(&dir.path().join("out.qcow2"), source.size(), WriterOptions::default()).unwrap();
        writer.set_copy_mode(CopyMode::CopyFileRange);
        let (shared, ready) = (new_shared(), Condvar::new());
        let work = work_over(&source, writer.copy_offload(), &shared, &ready);
        process_all(&work);
        for chunk in work.lock().done.values() {
            let Done::Chunk(Ok(chunk)) = chunk else { panic!("every chunk holds data") };
            let clusters = &chunk.clusters;
            assert!(matches!(clusters[..], [(_, Payload::Copy { count: 64, .. })]), "one copy per chunk");
        }
        let control = JobControl::new(std::time::Duration::from_secs(60));
        control.cancel();
        let result = work.write_in_order(&mut writer, &control);
        assert!(matches!(result, Err(ConvertError::Cancelled)), "{result:?}");
        assert_eq!(control.progress.done_bytes.load(Ordering::Relaxed), 0);
    }

    /// Copies handed on before the writer stopped offloading (`copy_file_range` unsupported
    /// between the files) are read by the writer, all-zero clusters dropped; workers are told
    /// to read everything from then on.
    #[test]
    fn copies_left_when_offloading_stops_are_read_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let raw_path = dir.path().join("disk.raw");
        let nonzero = mixed_raw(&raw_path);
        let source = RawImage::open(&raw_path).unwrap();
        let out = dir.path().join("out.qcow2");
        let mut writer = Qcow2Writer::create(&out, source.size(), WriterOptions::default()).unwrap();
        writer.set_copy_mode(CopyMode::CopyFileRange);
        let (shared, ready) = (new_shared(), Condvar::new());
        let work = work_over(&source, writer.copy_offload(), &shared, &ready);
        process_all(&work);
        // As `copy_clusters_from` does when `copy_file_range` says EXDEV or EOPNOTSUPP.
        writer.set_copy_mode(CopyMode::ReadWrite);
        let control = JobControl::new(std::time::Duration::from_secs(60));
        work.write_in_order(&mut writer, &control).unwrap();
        assert!(work.offload_stopped.load(Ordering::Relaxed), "workers are told");
        assert!(work.copies(0, 4 * MIB).unwrap().is_empty(), "and hand on no more copies");
        let stats = writer.finish().unwrap();
        assert_eq!((stats.data_clusters, stats.copied_clusters), (nonzero, 0), "{stats:?}");
        qemu_img(&["check", "-f", "qcow2", s(&out)]);
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw_path), s(&out)]);
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 65536 + 3];
        assert!(is_zero(&v[1..]));
        v[65537] = 1;
        assert!(!is_zero(&v[1..]));
    }
}
