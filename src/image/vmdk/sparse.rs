//! A sparse extent (`KDMV`) read in place: plain grains (monolithicSparse, twoGbMaxExtentSparse,
//! delta disks) and zlib-compressed grains behind markers (streamOptimized, in qemu-img's and
//! VMware's shapes).
//!
//! The grain directory is read at open and kept (4 bytes per grain table). Every grain table
//! is checked at open too, a few MiB at a time, so that a damaged file is refused before a
//! conversion starts, but tables are not kept: reads load them on demand, checked again, into
//! the image's [`GtCache`], whose size is bounded whatever the disk size, and which every
//! reader thread shares. A read takes `&self` and keeps no cursor between calls. Compressed
//! grains that lie next to each other in the file (streamOptimized writes them in LBA order)
//! are fetched with one positioned read per chunk and inflated one by one into grain-sized
//! buffers.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use libdeflater::{DecompressionError, Decompressor};

use super::budget::Budget;
use super::errors::{header_error, past_end};
use super::gt_cache::{self, GtCache, Table};
use super::header::*;
use super::packed::{check_packed_size, packed_bound};
use super::regions::{push_region, Region};
use super::{stream, Limits};
use crate::image::{push_plain_run, ImageError, PlainRun, ReadAt};

/// Compressed grains further apart than one grain span plus this are read separately.
const GAP_SLACK: u64 = 64 << 10;
/// Largest single read of packed compressed grains.
const MAX_GROUP_BYTES: u64 = 32 << 20;
/// How far to look for the next grain to bound the last grain of a read.
const LOOKAHEAD_GRAINS: u64 = 512;
/// Grain tables read in one go at open.
const MAX_TABLE_READ: u64 = 4 << 20;
/// Grain tables read with one `pread` on a cache miss, when the directory's next entries
/// point at the tables that follow in the file (they usually do): 64 KiB, 1 GiB of disk with
/// 64 KiB grains.
const READAHEAD_TABLES: u64 = 32;

/// What one grain of an extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grain {
    /// Unallocated: the parent's data, or zeros.
    Hole,
    /// A zeroed grain (GT entry 1 with the zeroed-grain flag): zeros, not the parent.
    Zero,
    /// Stored at this byte offset of the file (for compressed extents, the marker's).
    At(u64),
}

/// A sparse extent, opened.
pub(crate) struct SparseExtent {
    source: Arc<dyn ReadAt>,
    /// For I/O errors.
    path: PathBuf,
    /// For messages: the file name.
    name: String,
    header: SparseHeader,
    grain_bytes: u64,
    /// Bytes the header's capacity covers.
    data_bytes: u64,
    gtes: u64,
    capacity_grains: u64,
    tables: Tables,
    deflate: bool,
    markers: bool,
    zeroed: bool,
    file_len: u64,
    /// Largest compressed grain accepted (structure and limit).
    max_packed: u64,
    /// `max_compressed_grain_bytes`, for messages.
    packed_limit: u64,
    /// Whether the grain map was rebuilt from markers because the footer was unusable.
    pub(crate) rebuilt_from_markers: bool,
}

impl std::fmt::Debug for SparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseExtent")
            .field("name", &self.name)
            .field("header", &self.header)
            .field("rebuilt_from_markers", &self.rebuilt_from_markers)
            .finish_non_exhaustive()
    }
}

/// Where an extent's grain tables (byte offsets are entry × 512) come from. Boxed: an
/// extent is a variant of `Extent` next to small ones.
enum Tables {
    Directory(Box<Directory>),
    /// Rebuilt from a stream's markers: held whole, as nothing in the file says it again.
    /// `None` when absent.
    Rebuilt(Box<[Option<Table>]>),
}

/// The grain directory (the sector of each table, 0 when absent); tables are read on demand
/// through the image's cache, in key space `owner`.
struct Directory {
    gd: Box<[u32]>,
    cache: Arc<GtCache>,
    owner: u32,
}

/// The grain table a walk over ascending grains is in: a walk costs one table lookup per
/// table it crosses (one per 32 MiB of disk), not one per grain.
struct Cursor {
    index: u64,
    /// `None`: absent or all zero.
    table: Option<Table>,
}

impl Cursor {
    fn new() -> Cursor {
        Cursor { index: u64::MAX, table: None }
    }
}

/// Maps a read error on the extent.
fn read_error(
    path: &std::path::Path,
    name: &str,
    what: &str,
    offset: u64,
    size: u64,
    len: u64,
    e: std::io::Error,
) -> ImageError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        past_end(what, name, offset, size, len)
    } else {
        ImageError::io(path, e)
    }
}

impl SparseExtent {
    /// Opens a sparse extent. Returns it and its embedded descriptor bytes, if any.
    pub(crate) fn open(
        source: Arc<dyn ReadAt>,
        path: PathBuf,
        name: &str,
        limits: &Limits,
        budget: &mut Budget,
    ) -> Result<(SparseExtent, Option<Vec<u8>>), ImageError> {
        let len = source.len();
        if len < SECTOR {
            return Err(ImageError::Corrupt(format!(
                "{name} is {len} bytes, too short for a sparse VMDK header: the file is truncated or corrupt"
            )));
        }
        let mut block = [0u8; 512];
        source.read_exact_at(&mut block, 0).map_err(|e| ImageError::io(&path, e))?;
        let first = SparseHeader::parse(&block).map_err(|e| header_error(name, "header", e))?;
        if first.compression > 1 {
            return Err(ImageError::Unsupported(format!(
                "{name} uses compression algorithm {}; only deflate (1) is supported",
                first.compression
            )));
        }
        let descriptor = read_embedded_descriptor(&*source, &path, name, &first, limits)?;
        let mut header = first;
        let mut rebuilt = None;
        if first.gd_offset == GD_AT_END {
            match read_footer(&*source, &path, name, len) {
                Ok(footer) => header = footer,
                Err(why) if first.deflate() && first.markers() => {
                    let map = stream::scan_at(&*source, name, limits, budget).map_err(|e| {
                        prefix(e, &format!("the footer of {name} is unusable ({why}), and rebuilding its grain map from the grain markers failed: "))
                    })?;
                    rebuilt = Some(map);
                }
                Err(why) => return Err(ImageError::Corrupt(why)),
            }
        }
        if header.compression > 1 {
            return Err(ImageError::Unsupported(format!(
                "{name} uses compression algorithm {}; only deflate (1) is supported",
                header.compression
            )));
        }
        let grain_bytes = header.grain_bytes();
        let max_packed = packed_bound(grain_bytes, limits);
        let mut extent = SparseExtent {
            source,
            path,
            name: name.to_owned(),
            header,
            grain_bytes,
            data_bytes: header.capacity * SECTOR,
            gtes: u64::from(header.gtes_per_gt),
            capacity_grains: header.capacity_grains(),
            tables: Tables::Rebuilt(Box::default()),
            deflate: header.deflate(),
            markers: header.markers(),
            zeroed: header.zeroed_grains(),
            file_len: len,
            max_packed,
            packed_limit: limits.max_compressed_grain_bytes,
            rebuilt_from_markers: rebuilt.is_some(),
        };
        match rebuilt {
            Some(map) => extent.tables = rebuilt_tables(map),
            None => {
                let remaining = budget.remaining;
                if let Err(e) = extent.load_tables(limits, budget) {
                    // A VMware stream whose footer parses but leads to damaged tables: the
                    // markers still say where every grain is.
                    let scannable = first.gd_offset == GD_AT_END && first.deflate() && first.markers();
                    // The scan sizes its tables by the first header; a footer with another
                    // geometry would index them out of bounds (found by fuzzing). Such a file
                    // says two things about itself: refuse it.
                    let same_geometry = header.capacity == first.capacity
                        && header.grain_size == first.grain_size
                        && header.gtes_per_gt == first.gtes_per_gt;
                    if !scannable || !same_geometry || !matches!(e, ImageError::Corrupt(_)) {
                        return Err(e);
                    }
                    budget.remaining = remaining;
                    let map = stream::scan_at(&*extent.source, name, limits, budget).map_err(|_| e)?;
                    extent.tables = rebuilt_tables(map);
                    extent.rebuilt_from_markers = true;
                }
            }
        }
        Ok((extent, descriptor))
    }

    pub(crate) fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// Reads the grain directory, and checks every grain table it points at: each lies inside
    /// the file, and every grain it maps starts (plain: lies) inside the file. The directory
    /// is kept; tables only as far as the image's cache has room for them.
    fn load_tables(&mut self, limits: &Limits, budget: &mut Budget) -> Result<(), ImageError> {
        let h = self.header;
        let name = self.name.clone();
        let len = self.file_len;
        let entries = h.gd_entries();
        if entries > limits.max_grain_directory_entries {
            return Err(ImageError::Limit(format!(
                "the grain directory of {name} has {entries} entries, over the limit of {} (max_grain_directory_entries)",
                limits.max_grain_directory_entries
            )));
        }
        let gd_offset = h.gd_offset.saturating_mul(SECTOR);
        let gd_size = entries * 4;
        if gd_offset.checked_add(gd_size).is_none_or(|end| end > len) {
            return Err(past_end("the grain directory", &name, gd_offset, gd_size, len));
        }
        let gd = read_u32s(&*self.source, gd_offset, entries as usize)
            .map_err(|e| read_error(&self.path, &name, "the grain directory", gd_offset, gd_size, len, e))?;
        let gt_bytes = h.gt_bytes();
        // Distinct tables, in directory order with the first entry naming each (a table shared
        // by several entries, which only a hostile file has, is read and checked once), each
        // checked to lie inside the file.
        let mut order: Vec<(u32, u64)> = Vec::new();
        let mut seen = HashSet::new();
        for (index, &sector) in gd.iter().enumerate() {
            if sector == 0 || !seen.insert(sector) {
                continue;
            }
            let offset = u64::from(sector) * SECTOR;
            if offset + gt_bytes > len {
                return Err(past_end(
                    &format!("grain directory entry {index} (grain table {index})"),
                    &name,
                    offset,
                    gt_bytes,
                    len,
                ));
            }
            order.push((sector, index as u64));
        }
        drop(seen);
        let cache = budget.cache.clone();
        // Tables checked here are kept while the cache has room (all of them for disks up to
        // about 1 TiB by default): the reads that follow then find them there.
        let mut room = cache.room();
        let mut warm: Vec<(u64, Table)> = Vec::new();
        let mut bytes = Vec::new();
        let mut at = 0;
        while at < order.len() {
            // A run of tables back to back in the file is read at once.
            let start = u64::from(order[at].0) * SECTOR;
            let mut end = at + 1;
            while end < order.len()
                && u64::from(order[end].0) * SECTOR == start + (end - at) as u64 * gt_bytes
                && (end - at + 1) as u64 * gt_bytes <= MAX_TABLE_READ
            {
                end += 1;
            }
            let run = (end - at) as u64 * gt_bytes;
            bytes.resize(run as usize, 0);
            self.source
                .read_exact_at(&mut bytes, start)
                .map_err(|e| read_error(&self.path, &name, "a grain table", start, run, len, e))?;
            for (i, chunk) in bytes.chunks_exact(gt_bytes as usize).enumerate() {
                let index = order[at + i].1;
                let table = self.check_table(index, chunk)?;
                let cost = gt_cache::cost(&table);
                if !table.is_empty() && cost > cache.capacity() {
                    return Err(ImageError::Limit(format!(
                        "a grain table of {name} takes {cost} bytes of memory, more than the {} bytes allowed for the grain tables of the whole disk (max_grain_table_bytes)",
                        cache.capacity()
                    )));
                }
                if cost <= room {
                    room -= cost;
                    warm.push((index, table));
                }
            }
            at = end;
        }
        let owner = cache.register();
        // Only now: a stream whose tables turn out damaged is read from its markers instead,
        // and must leave nothing behind in the cache.
        for (index, table) in warm {
            cache.insert_if_room(owner, index, table);
        }
        self.tables = Tables::Directory(Box::new(Directory { gd: gd.into_boxed_slice(), cache, owner }));
        Ok(())
    }

    /// Parses grain table `index` from its bytes and checks that every grain it maps (inside
    /// the capacity) starts (plain: lies) inside the file. An all-zero table comes back empty.
    fn check_table(&self, index: u64, bytes: &[u8]) -> Result<Table, ImageError> {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(Arc::from([]));
        }
        let table: Table = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let first = index * self.gtes;
        let reach = self.capacity_grains.saturating_sub(first).min(self.gtes) as usize;
        for (i, &entry) in table.iter().take(reach).enumerate() {
            let grain = first + i as u64;
            let Grain::At(offset) = self.classify(entry) else { continue };
            let need = if !self.deflate {
                self.grain_len(grain)
            } else if self.markers {
                GRAIN_MARKER_HEADER
            } else {
                1
            };
            if offset.checked_add(need).is_none_or(|end| end > self.file_len) {
                return Err(past_end(
                    &format!("grain table {index} (grain {grain})"),
                    &self.name,
                    offset,
                    need,
                    self.file_len,
                ));
            }
        }
        Ok(table)
    }

    /// Grain table `index`, from the cache or the file; `None` when absent or all zero.
    fn table(&self, index: u64) -> Result<Option<Table>, ImageError> {
        let table = match &self.tables {
            Tables::Rebuilt(tables) => return Ok(tables.get(index as usize).cloned().flatten()),
            Tables::Directory(d) => {
                if d.gd.get(index as usize).is_none_or(|&sector| sector == 0) {
                    return Ok(None);
                }
                match d.cache.get(d.owner, index) {
                    Some(table) => table,
                    None => self.load(&d.gd, &d.cache, d.owner, index)?,
                }
            }
        };
        Ok(if table.is_empty() { None } else { Some(table) })
    }

    /// Reads grain table `index` (present in `gd`) into the cache, with the tables that follow
    /// it in both the directory and the file, and returns it.
    fn load(&self, gd: &[u32], cache: &GtCache, owner: u32, index: u64) -> Result<Table, ImageError> {
        let gt_bytes = self.header.gt_bytes();
        let start = u64::from(gd[index as usize]) * SECTOR;
        // Never more than a quarter of the cache, so that reading ahead cannot evict what the
        // other readers are using.
        let ahead = (cache.capacity() / 4 / (gt_bytes + gt_cache::ENTRY_OVERHEAD)).clamp(1, READAHEAD_TABLES);
        let mut count = 1;
        while count < ahead
            && gd.get((index + count) as usize).is_some_and(|&s| u64::from(s) * SECTOR == start + count * gt_bytes)
        {
            count += 1;
        }
        let size = count * gt_bytes;
        let mut bytes = vec![0u8; size as usize];
        self.source
            .read_exact_at(&mut bytes, start)
            .map_err(|e| read_error(&self.path, &self.name, "a grain table", start, size, self.file_len, e))?;
        let wanted = self.check_table(index, &bytes[..gt_bytes as usize])?;
        cache.insert(owner, index, wanted.clone());
        for (k, chunk) in bytes.chunks_exact(gt_bytes as usize).enumerate().skip(1) {
            // A damaged table read ahead is left for the read that wants it to report.
            let Ok(table) = self.check_table(index + k as u64, chunk) else { break };
            cache.insert(owner, index + k as u64, table);
        }
        Ok(wanted)
    }

    fn classify(&self, entry: u32) -> Grain {
        match entry {
            0 => Grain::Hole,
            1 if self.zeroed => Grain::Zero,
            sector => Grain::At(u64::from(sector) * SECTOR),
        }
    }

    /// What grain `grain` is, with `cursor` on its table. Grains past the capacity are holes.
    fn grain(&self, cursor: &mut Cursor, grain: u64) -> Result<Grain, ImageError> {
        if grain >= self.capacity_grains {
            return Ok(Grain::Hole);
        }
        self.seek(cursor, grain / self.gtes)?;
        Ok(match &cursor.table {
            Some(t) => self.classify(t[(grain % self.gtes) as usize]),
            None => Grain::Hole,
        })
    }

    /// Puts `cursor` on table `index`.
    fn seek(&self, cursor: &mut Cursor, index: u64) -> Result<(), ImageError> {
        if cursor.index != index {
            // Invalidated first: a failed load must not leave the previous table under the
            // new index.
            cursor.index = u64::MAX;
            cursor.table = self.table(index)?;
            cursor.index = index;
        }
        Ok(())
    }

    /// Bytes of grain `grain` inside the capacity (the last one may be short).
    fn grain_len(&self, grain: u64) -> u64 {
        self.data_bytes.saturating_sub(grain * self.grain_bytes).min(self.grain_bytes)
    }

    /// How `range` (extent-relative) reads, grain by grain, merged into runs.
    pub(crate) fn map(
        &self,
        range: Range<u64>,
        base: u64,
        out: &mut Vec<(Range<u64>, Region)>,
    ) -> Result<(), ImageError> {
        let mut cursor = Cursor::new();
        let mut pos = range.start;
        while pos < range.end {
            if pos >= self.data_bytes {
                push_region(out, base + pos..base + range.end, Region::Hole);
                return Ok(());
            }
            let grain = pos / self.grain_bytes;
            let table = grain / self.gtes;
            self.seek(&mut cursor, table)?;
            if cursor.table.is_none() {
                // No table: the whole span it would map is a hole.
                let span_end = (table + 1).saturating_mul(self.gtes).saturating_mul(self.grain_bytes);
                let end = span_end.min(self.data_bytes).min(range.end);
                push_region(out, base + pos..base + end, Region::Hole);
                pos = end;
                continue;
            }
            let end = ((grain + 1) * self.grain_bytes).min(self.data_bytes).min(range.end);
            let region = match self.grain(&mut cursor, grain)? {
                Grain::Hole => Region::Hole,
                Grain::Zero => Region::Zero,
                Grain::At(_) => Region::Data,
            };
            push_region(out, base + pos..base + end, region);
            pos = end;
        }
        Ok(())
    }

    /// The plain (uncompressed) grains of `range` (extent-relative) as runs of the extent's
    /// file, placed at virtual offsets from `base`; grains back to back in the file make one
    /// run. The unallocated parts (`Region::Hole`: the parent's data, or zeros) go to `holes`,
    /// for the caller to ask the parent about. Compressed grains, zeroed grains, and grains of
    /// a source that is not a file are in neither: they are read as usual.
    pub(crate) fn plain_runs<'a>(
        &'a self,
        range: Range<u64>,
        base: u64,
        runs: &mut Vec<PlainRun<'a>>,
        holes: &mut Vec<Range<u64>>,
    ) -> Result<(), ImageError> {
        let mut regions = Vec::new();
        self.map(range, base, &mut regions)?;
        let file = self.source.as_file().filter(|_| !self.deflate);
        let mut cursor = Cursor::new();
        for (r, region) in regions {
            match region {
                Region::Hole => holes.push(r),
                Region::Zero => {}
                Region::Data => {
                    let Some((file, file_base)) = file else { continue };
                    // Grain by grain: consecutive grains need not be consecutive in the file.
                    let mut pos = r.start - base;
                    let end = r.end - base;
                    while pos < end {
                        let grain = pos / self.grain_bytes;
                        let grain_start = grain * self.grain_bytes;
                        let stop = (grain_start + self.grain_bytes).min(end);
                        if let Grain::At(at) = self.grain(&mut cursor, grain)? {
                            let file_offset = file_base + at + (pos - grain_start);
                            push_plain_run(runs, PlainRun { range: base + pos..base + stop, file, file_offset });
                        }
                        pos = stop;
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at extent offset `offset`. Holes (unallocated grains, and
    /// anything past the header's capacity) are left untouched and listed in `holes` as
    /// ranges of `buf`, for the caller to fill from a parent or with zeros.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8], holes: &mut Vec<Range<usize>>) -> Result<(), ImageError> {
        let end = offset + buf.len() as u64;
        let mut packed: Vec<Packed> = Vec::new();
        // A run of plain grains back to back in the file: (file offset, range of buf).
        let mut run: Option<(u64, Range<usize>)> = None;
        let mut cursor = Cursor::new();
        let mut pos = offset;
        while pos < end {
            let dst_start = (pos - offset) as usize;
            if pos >= self.data_bytes {
                push_hole(holes, dst_start..buf.len());
                break;
            }
            let grain = pos / self.grain_bytes;
            let grain_start = grain * self.grain_bytes;
            let stop = (grain_start + self.grain_bytes).min(self.data_bytes).min(end);
            let dst = dst_start..(stop - offset) as usize;
            match self.grain(&mut cursor, grain)? {
                Grain::Hole => push_hole(holes, dst),
                Grain::Zero => buf[dst].fill(0),
                Grain::At(at) if self.deflate => {
                    packed.push(Packed { grain, dst, at, within: (pos - grain_start) as usize })
                }
                Grain::At(at) => {
                    let file_at = at + (pos - grain_start);
                    match &mut run {
                        Some((run_at, run_dst))
                            if *run_at + run_dst.len() as u64 == file_at && run_dst.end == dst.start =>
                        {
                            run_dst.end = dst.end;
                        }
                        _ => {
                            if let Some((run_at, run_dst)) = run.take() {
                                self.read_plain(run_at, &mut buf[run_dst])?;
                            }
                            run = Some((file_at, dst));
                        }
                    }
                }
            }
            pos = stop;
        }
        if let Some((run_at, run_dst)) = run {
            self.read_plain(run_at, &mut buf[run_dst])?;
        }
        if !packed.is_empty() {
            with_scratch(|scratch| self.read_packed(&packed, buf, scratch, &mut cursor))?;
        }
        Ok(())
    }

    fn read_plain(&self, at: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.source.read_exact_at(buf, at).map_err(|e| {
            let grain = "a grain".to_string();
            read_error(&self.path, &self.name, &grain, at, buf.len() as u64, self.file_len, e)
        })
    }

    /// Bytes one compressed grain can take in the file, marker and padding included.
    fn packed_span(&self) -> u64 {
        (GRAIN_MARKER_HEADER + self.max_packed).next_multiple_of(SECTOR)
    }

    /// Where the packed grain `grain` at byte `at` ends at the latest: the next grain in the
    /// file when it follows closely, else one maximal span.
    fn packed_end_hint(&self, grain: u64, at: u64, cursor: &mut Cursor) -> Result<u64, ImageError> {
        let span = self.packed_span();
        let limit = (grain + 1 + LOOKAHEAD_GRAINS).min(self.capacity_grains);
        let mut bound = at.saturating_add(span);
        for next in grain + 1..limit {
            if let Grain::At(next_at) = self.grain(cursor, next)? {
                if next_at > at {
                    bound = bound.min(next_at);
                }
                break;
            }
        }
        Ok(bound.min(self.file_len))
    }

    /// Inflates the compressed grains `packed` (grain, range of `buf`, file offset), reading
    /// grains that lie close together in the file with one read.
    fn read_packed(
        &self,
        packed: &[Packed],
        buf: &mut [u8],
        scratch: &mut Scratch,
        cursor: &mut Cursor,
    ) -> Result<(), ImageError> {
        let span = self.packed_span();
        let mut first = 0;
        while first < packed.len() {
            let start = packed[first].at;
            let mut last = first;
            while last + 1 < packed.len() {
                let (prev, next) = (packed[last].at, packed[last + 1].at);
                if next <= prev || next - prev > span + GAP_SLACK || next - start > MAX_GROUP_BYTES {
                    break;
                }
                last += 1;
            }
            let end = self.packed_end_hint(packed[last].grain, packed[last].at, cursor)?.max(start);
            let size = (end - start) as usize;
            scratch.packed.clear();
            scratch.packed.resize(size, 0);
            self.source.read_exact_at(&mut scratch.packed, start).map_err(|e| {
                read_error(&self.path, &self.name, "a compressed grain", start, size as u64, self.file_len, e)
            })?;
            for p in &packed[first..=last] {
                self.inflate_grain(p, (p.at - start) as usize, &mut buf[p.dst.clone()], scratch)?;
            }
            first = last + 1;
        }
        Ok(())
    }

    /// Inflates grain `p.grain` (whose marker or data is at file byte `p.at`, i.e. `rel` in
    /// `scratch.packed`) and copies the part `dst` wants.
    fn inflate_grain(&self, p: &Packed, rel: usize, dst: &mut [u8], scratch: &mut Scratch) -> Result<(), ImageError> {
        let (grain, at) = (p.grain, p.at);
        let Scratch { packed, grain: grain_buf, inflater, spill } = scratch;
        let name = &self.name;
        let (data_at, data_len) = if self.markers {
            let mut marker = [0u8; 12];
            match packed.get(rel..rel + 12) {
                Some(m) => marker.copy_from_slice(m),
                None => self.source.read_exact_at(&mut marker, at).map_err(|e| {
                    read_error(&self.path, name, &format!("the marker of grain {grain}"), at, 12, self.file_len, e)
                })?,
            }
            let lba = u64_at(&marker, 0);
            let size = u64::from(u32_at(&marker, 8));
            let expected = grain * self.header.grain_size;
            if size == 0 {
                return Err(ImageError::Corrupt(format!(
                    "grain {grain} of {name} points at a metadata marker (byte {at}), not a compressed grain: the grain table is corrupt"
                )));
            }
            if lba != expected {
                return Err(ImageError::Corrupt(format!(
                    "the marker of grain {grain} of {name} (byte {at}) is for sector {lba}, not sector {expected}: the grain table and the grains disagree; the file is corrupt"
                )));
            }
            check_packed_size(size, name, grain, self.grain_bytes, self.packed_limit)?;
            (rel + 12, size as usize)
        } else {
            // No marker: the zlib stream starts at the grain and ends where it says.
            (rel, packed.len().saturating_sub(rel).min(self.max_packed as usize))
        };
        let data: &[u8] = match packed.get(data_at..data_at + data_len) {
            Some(d) => d,
            None => {
                // Longer than the read guessed: fetch it alone.
                let file_at = at + (data_at - rel) as u64;
                spill.clear();
                spill.resize(data_len, 0);
                self.source.read_exact_at(spill, file_at).map_err(|e| {
                    read_error(
                        &self.path,
                        name,
                        &format!("compressed grain {grain}"),
                        file_at,
                        data_len as u64,
                        self.file_len,
                        e,
                    )
                })?;
                spill
            }
        };
        let inflater = inflater.get_or_insert_with(Decompressor::new);
        let full = self.grain_len(grain);
        let inflate_error = |e: DecompressionError| {
            match e {
            DecompressionError::BadData => ImageError::Corrupt(format!(
                "compressed grain {grain} of {name} (byte {at}) is not a valid zlib stream: the file is corrupt"
            )),
            DecompressionError::InsufficientSpace => ImageError::Corrupt(format!(
                "compressed grain {grain} of {name} (byte {at}) inflates to more than one grain ({} bytes): the file is corrupt",
                self.grain_bytes
            )),
        }
        };
        let short = |n: usize| {
            ImageError::Corrupt(format!(
                "compressed grain {grain} of {name} (byte {at}) inflates to {n} bytes instead of {}: the file is corrupt",
                self.grain_bytes
            ))
        };
        if dst.len() as u64 == self.grain_bytes {
            // A whole grain wanted: inflate straight into the caller's buffer.
            let n = inflater.zlib_decompress(data, dst).map_err(inflate_error)?;
            if n as u64 != self.grain_bytes {
                return Err(short(n));
            }
            return Ok(());
        }
        grain_buf.resize(self.grain_bytes as usize, 0);
        let n = inflater.zlib_decompress(data, grain_buf).map_err(inflate_error)?;
        if full == self.grain_bytes && n as u64 != self.grain_bytes {
            return Err(short(n));
        }
        // The disk's last grain may be shorter than a grain: the rest reads as zeros.
        grain_buf[n..].fill(0);
        dst.copy_from_slice(&grain_buf[p.within..p.within + dst.len()]);
        Ok(())
    }
}

/// The tables of a map rebuilt from markers, shared as the cache's are.
fn rebuilt_tables(map: stream::StreamMap) -> Tables {
    Tables::Rebuilt(map.tables.into_iter().map(|t| t.map(Arc::from)).collect())
}

/// A compressed grain a read needs.
struct Packed {
    grain: u64,
    /// The part of the caller's buffer it fills.
    dst: Range<usize>,
    /// File offset of its marker (or data, without markers).
    at: u64,
    /// Offset inside the grain of the first byte `dst` wants.
    within: usize,
}

fn push_hole(holes: &mut Vec<Range<usize>>, r: Range<usize>) {
    if r.is_empty() {
        return;
    }
    if let Some(last) = holes.last_mut() {
        if last.end == r.start {
            last.end = r.end;
            return;
        }
    }
    holes.push(r);
}

/// Per-thread buffers and inflater, reused across reads.
#[derive(Default)]
pub(crate) struct Scratch {
    packed: Vec<u8>,
    grain: Vec<u8>,
    spill: Vec<u8>,
    inflater: Option<Decompressor>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            let out = f(&mut scratch);
            // Do not keep a huge buffer from an unusually large read.
            if scratch.packed.capacity() > 2 * MAX_GROUP_BYTES as usize {
                scratch.packed = Vec::new();
            }
            out
        }
        Err(_) => f(&mut Scratch::default()),
    })
}

fn read_u32s(r: &dyn ReadAt, offset: u64, count: usize) -> std::io::Result<Vec<u32>> {
    let mut bytes = vec![0u8; count * 4];
    r.read_exact_at(&mut bytes, offset)?;
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The embedded descriptor of a monolithic extent, if the header names one.
fn read_embedded_descriptor(
    r: &dyn ReadAt,
    path: &std::path::Path,
    name: &str,
    h: &SparseHeader,
    limits: &Limits,
) -> Result<Option<Vec<u8>>, ImageError> {
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        return Ok(None);
    }
    let size = h.descriptor_size.saturating_mul(SECTOR);
    if size > limits.max_descriptor_bytes {
        return Err(ImageError::Limit(format!(
            "the embedded descriptor of {name} is {size} bytes, over the limit of {} bytes (max_descriptor_bytes)",
            limits.max_descriptor_bytes
        )));
    }
    let offset = h.descriptor_offset.saturating_mul(SECTOR);
    if offset.checked_add(size).is_none_or(|end| end > r.len()) {
        return Err(past_end("the embedded descriptor", name, offset, size, r.len()));
    }
    let mut bytes = vec![0u8; size as usize];
    r.read_exact_at(&mut bytes, offset).map_err(|e| ImageError::io(path, e))?;
    if let Some(nul) = bytes.iter().position(|&b| b == 0) {
        bytes.truncate(nul);
    }
    Ok(Some(bytes))
}

/// The footer of a VMware stream: a header copy at EOF-1024 holding the real grain directory
/// offset. `Err` says what is wrong with it.
fn read_footer(r: &dyn ReadAt, path: &std::path::Path, name: &str, len: u64) -> Result<SparseHeader, String> {
    if len < 4 * SECTOR {
        return Err(format!("{name} is {len} bytes, too short to hold the footer its header announces"));
    }
    let mut block = [0u8; 512];
    r.read_exact_at(&mut block, len - 2 * SECTOR).map_err(|e| format!("{}: {e}", path.display()))?;
    let footer = SparseHeader::parse(&block)
        .map_err(|e| format!("the footer of {name} (at byte {}) is not a valid header copy: {e}", len - 2 * SECTOR))?;
    if footer.gd_offset == GD_AT_END {
        return Err(format!("the footer of {name} does not say where the grain directory is"));
    }
    Ok(footer)
}

/// Adds `what` in front of an error's message.
pub(crate) fn prefix(e: ImageError, what: &str) -> ImageError {
    match e {
        ImageError::Corrupt(m) => ImageError::Corrupt(format!("{what}{m}")),
        ImageError::Unsupported(m) => ImageError::Unsupported(format!("{what}{m}")),
        ImageError::Limit(m) => ImageError::Limit(format!("{what}{m}")),
        io => io,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use super::super::{open_stream, Extent, VmdkImage};
    use super::*;
    use crate::image::DiskSource;

    const GRAIN: u64 = 64 << 10;
    const GTES: u64 = 512;
    /// Disk bytes one grain table maps.
    const SPAN: u64 = GRAIN * GTES;
    /// Distinct grain tables and grains in the file.
    const TABLES: u64 = 4;
    const GRAINS: u64 = 4;

    /// Bytes that can change after open, counting the reads that touch the grain tables.
    struct Bytes {
        bytes: Mutex<Vec<u8>>,
        tables: Range<u64>,
        table_reads: AtomicU64,
    }

    impl ReadAt for Bytes {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            if offset < self.tables.end && offset + buf.len() as u64 > self.tables.start {
                self.table_reads.fetch_add(1, Ordering::Relaxed);
            }
            self.bytes.lock().unwrap().read_exact_at(buf, offset)
        }

        fn len(&self) -> u64 {
            self.bytes.lock().unwrap().len() as u64
        }
    }

    /// A monolithicSparse file of about 2 MiB whose header claims `capacity` bytes, every
    /// grain of them allocated: each grain directory entry points at one of `TABLES` tables,
    /// each entry of those at one of `GRAINS` grains. With `distinct`, the directory points
    /// at `entries` tables back to back instead (each the copy of one of the `TABLES`).
    fn huge_disk(capacity: u64, distinct: bool) -> (Vec<u8>, Range<u64>) {
        let entries = capacity / SPAN;
        let gd_sectors = (entries * 4).div_ceil(SECTOR);
        let table_sectors = GTES * 4 / SECTOR;
        let tables_at = 1 + gd_sectors;
        let stored = if distinct { entries } else { TABLES };
        let grains_at = tables_at + stored * table_sectors;
        let mut f = vec![0u8; ((grains_at + GRAINS * GRAIN / SECTOR) * SECTOR) as usize];
        f[0..4].copy_from_slice(b"KDMV");
        f[4..8].copy_from_slice(&1u32.to_le_bytes());
        f[12..20].copy_from_slice(&(capacity / SECTOR).to_le_bytes());
        f[20..28].copy_from_slice(&(GRAIN / SECTOR).to_le_bytes());
        f[44..48].copy_from_slice(&(GTES as u32).to_le_bytes());
        f[56..64].copy_from_slice(&1u64.to_le_bytes());
        f[64..72].copy_from_slice(&grains_at.to_le_bytes());
        f[73..77].copy_from_slice(b"\n \r\n");
        for t in 0..entries {
            let stored_at = if distinct { t } else { t % TABLES };
            let sector = (tables_at + stored_at * table_sectors) as u32;
            let at = (SECTOR + t * 4) as usize;
            f[at..at + 4].copy_from_slice(&sector.to_le_bytes());
        }
        for s in 0..stored {
            for e in 0..GTES {
                let grain = (s % TABLES + e) % GRAINS;
                let sector = (grains_at + grain * GRAIN / SECTOR) as u32;
                let at = ((tables_at + s * table_sectors) * SECTOR + e * 4) as usize;
                f[at..at + 4].copy_from_slice(&sector.to_le_bytes());
            }
        }
        for g in 0..GRAINS {
            let at = ((grains_at + g * GRAIN / SECTOR) * SECTOR) as usize;
            for (i, b) in f[at..at + GRAIN as usize].iter_mut().enumerate() {
                *b = (g as usize * 97 + i / 7) as u8;
            }
        }
        let tables = tables_at * SECTOR..grains_at * SECTOR;
        (f, tables)
    }

    /// What byte `offset` of `huge_disk` reads as.
    fn expected(offset: u64) -> u8 {
        let grain = offset / GRAIN;
        let data = ((grain / GTES) % TABLES + grain % GTES) % GRAINS;
        (data as usize * 97 + (offset % GRAIN) as usize / 7) as u8
    }

    fn open(bytes: Vec<u8>, tables: Range<u64>, cache_bytes: u64) -> (VmdkImage, Arc<Bytes>) {
        let source = Arc::new(Bytes { bytes: Mutex::new(bytes), tables, table_reads: AtomicU64::new(0) });
        let limits = Limits { max_grain_table_bytes: cache_bytes, ..Limits::default() };
        let image = open_stream(source.clone(), "huge.vmdk", &limits).unwrap();
        (image, source)
    }

    fn cache_of(image: &VmdkImage) -> &GtCache {
        match &image.extents[0].extent {
            Extent::Sparse(SparseExtent { tables: Tables::Directory(d), .. }) => &d.cache,
            other => panic!("not a sparse extent read through its directory: {other:?}"),
        }
    }

    fn check_read(image: &VmdkImage, offset: u64, len: usize) {
        let mut buf = vec![0u8; len];
        image.read_at(offset, &mut buf).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            assert_eq!(b, expected(offset + i as u64), "byte {} of the disk", offset + i as u64);
        }
    }

    /// 16 TiB claimed, all of it allocated, in a 2 MiB file: 512 Ki directory entries whose
    /// tables would take 1 GiB if all were held. Reads all over the disk, from two threads,
    /// keep the tables held within the cache's capacity.
    #[test]
    fn table_memory_stays_within_the_cache_whatever_the_disk_size() {
        let capacity = 16u64 << 40;
        let (bytes, tables) = huge_disk(capacity, false);
        let tables_held = 16;
        let limit = tables_held * (GTES * 4 + gt_cache::ENTRY_OVERHEAD);
        let (image, _) = open(bytes, tables, limit);
        assert_eq!(image.size(), capacity);
        let cache = cache_of(&image);
        assert_eq!(cache.capacity(), limit);
        assert!(cache.bytes() <= limit);
        std::thread::scope(|scope| {
            for lane in 0..2u64 {
                let image = &image;
                scope.spawn(move || {
                    for k in 0..150u64 {
                        // Spread over the whole disk, with reads across grain and table
                        // boundaries, going forward as the pipeline does, then back.
                        let table = (k * 7919 + lane * 104_729) % (capacity / SPAN);
                        let offset = table * SPAN + if k % 3 == 0 { SPAN - 3 * GRAIN - 5 } else { k * GRAIN + 11 };
                        let offset = offset.min(capacity - 300_000);
                        check_read(image, offset, 300_000);
                        assert!(cache_of(image).bytes() <= limit, "{} > {limit}", cache_of(image).bytes());
                    }
                });
            }
        });
        // The last bytes of the disk, and what the engine asks before it reads.
        check_read(&image, capacity - 100, 100);
        let chunk = capacity - SPAN - (4 << 20)..capacity - SPAN + (4 << 20);
        assert_eq!(image.allocated(chunk.clone()).unwrap(), vec![chunk.clone()]);
        assert!(cache.bytes() <= limit);
        assert!(cache.len() as u64 <= tables_held);
    }

    /// Tables the directory lists back to back are read ahead with one `pread`, and every
    /// table is checked again when it is read on demand.
    #[test]
    fn tables_are_read_ahead_and_checked_when_loaded() {
        let capacity = 64 * SPAN;
        let (bytes, tables) = huge_disk(capacity, true);
        let table_bytes = GTES * 4 + gt_cache::ENTRY_OVERHEAD;
        // Room for nothing at open beyond 8 tables; reads ahead 8 / 4 = 2 at a time.
        let (image, source) = open(bytes, tables.clone(), 8 * table_bytes);
        let at_open = source.table_reads.load(Ordering::Relaxed);
        assert_eq!(at_open, 1, "the 64 tables, back to back, are checked with one read");
        assert_eq!(cache_of(&image).len(), 8, "the first tables are kept as far as the cache has room");
        for table in 0..64 {
            check_read(&image, table * SPAN + GRAIN - 10, 20);
        }
        let reads = source.table_reads.load(Ordering::Relaxed) - at_open;
        assert_eq!(reads, (64 - 8) / 2, "two tables per read once past the warm ones");
        assert!(cache_of(&image).bytes() <= 8 * table_bytes);

        // A table damaged after open (the file changed under us) is refused when loaded.
        let (bytes, _) = huge_disk(capacity, true);
        let (image, source) = open(bytes, tables.clone(), 8 * table_bytes);
        let last = tables.start + 63 * GTES * 4;
        let len = source.len();
        source.bytes.lock().unwrap()[last as usize + 8..last as usize + 12]
            .copy_from_slice(&((len / SECTOR) as u32).to_le_bytes());
        let mut buf = vec![0u8; GRAIN as usize * 4];
        match image.read_at(63 * SPAN, &mut buf) {
            Err(ImageError::Corrupt(m)) => {
                assert!(m.contains("grain table 63 (grain 32258)") && m.contains("points past the end"), "{m}")
            }
            other => panic!("expected a corrupt table, got {other:?}"),
        }
        assert!(image.allocated(63 * SPAN..64 * SPAN).is_err());
        // The tables before it still read.
        check_read(&image, 62 * SPAN, 1000);
    }

    /// The cache's floor: not even one table fits.
    #[test]
    fn a_cache_smaller_than_a_table_is_refused() {
        let (bytes, _) = huge_disk(4 * SPAN, false);
        let limits = Limits { max_grain_table_bytes: GTES * 4, ..Limits::default() };
        match open_stream(Arc::new(bytes), "small.vmdk", &limits) {
            Err(ImageError::Limit(m)) => assert!(m.contains("max_grain_table_bytes"), "{m}"),
            other => panic!("expected a limit, got {other:?}"),
        }
    }
}
