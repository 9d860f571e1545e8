//! One sequential pass over a stream-optimized extent's markers.
//!
//! Every compressed grain starts with `u64 lba, u32 size`; metadata (grain tables, the grain
//! directory, the footer) sits behind one-sector markers `u64 val, u32 0, u32 type`, and an
//! all-zero sector ends the stream. Walking them rebuilds the grain map without the footer:
//! for sources that cannot seek (a tar stream) and for files whose footer is damaged. The
//! sizes of the metadata blocks come from the header, never from the marker's `val`; a grain
//! marker's LBA must be grain-aligned, inside the capacity and larger than the previous one.

use std::io::Read;

use libdeflater::Decompressor;

use super::budget::Budget;
use super::errors::header_error;
use super::header::*;
use super::packed::check_packed_size;
use super::Limits;
use crate::image::{ImageError, ReadAt};

/// What one pass over a stream's markers found.
#[derive(Debug, Clone)]
pub struct StreamMap {
    /// The header at the start of the stream (its grain directory offset may be -1).
    pub header: SparseHeader,
    /// The header copy of the footer, when one was found and parses.
    pub footer: Option<SparseHeader>,
    /// The embedded descriptor, as text (lossy UTF-8), when the header names one.
    pub descriptor: Option<String>,
    /// Compressed grains found.
    pub grains: u64,
    /// Bytes of the stream consumed, up to and including the end-of-stream marker.
    pub stream_bytes: u64,
    /// Per grain table (grain directory index): the marker sector of each grain, 0 when absent.
    pub(crate) tables: Vec<Option<Box<[u32]>>>,
}

impl StreamMap {
    /// Every grain found, in LBA order: (grain index, byte offset of its marker).
    pub fn grain_offsets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let gtes = u64::from(self.header.gtes_per_gt);
        self.tables.iter().enumerate().flat_map(move |(t, table)| {
            table.iter().flat_map(move |entries| {
                entries
                    .iter()
                    .enumerate()
                    .filter(|(_, &s)| s != 0)
                    .map(move |(i, &s)| (t as u64 * gtes + i as u64, u64::from(s) * SECTOR))
            })
        })
    }
}

/// Rebuilds a stream's grain map in one pass over `reader` (which need not seek), without
/// inflating anything. Fails on a stream that ends before its end-of-stream marker.
pub fn scan_stream_markers<R: Read>(reader: R, limits: &Limits) -> Result<StreamMap, ImageError> {
    let mut input = ReadInput { reader, pos: 0, skip_buf: Vec::new() };
    scan(&mut input, "the stream", limits, &mut Budget::new(limits), None)
}

/// Like [`scan_stream_markers`], and hands every grain to `sink` as it goes, inflated:
/// `sink(virtual byte offset, data)` with `data` one grain long (the disk's last grain may be
/// shorter). Grains come in increasing offset order; ranges never handed over read as zeros.
/// A sequential conversion straight from a tar stream.
pub fn read_stream_sequential<R: Read>(
    reader: R,
    limits: &Limits,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), ImageError>,
) -> Result<StreamMap, ImageError> {
    let mut input = ReadInput { reader, pos: 0, skip_buf: Vec::new() };
    scan(&mut input, "the stream", limits, &mut Budget::new(limits), Some(&mut sink))
}

/// The scan over a positioned source: skipping grain data costs nothing.
pub(crate) fn scan_at(
    source: &dyn ReadAt,
    name: &str,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<StreamMap, ImageError> {
    let mut input = AtInput { source, pos: 0 };
    scan(&mut input, name, limits, budget, None)
}

/// A forward-only byte source.
trait Input {
    /// Fills as much of `buf` as the source has; returns the count (short only at the end).
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Skips `n` bytes; returns how many there were.
    fn skip(&mut self, n: u64) -> std::io::Result<u64>;
    fn pos(&self) -> u64;
}

struct ReadInput<R> {
    reader: R,
    pos: u64,
    skip_buf: Vec<u8>,
}

impl<R: Read> Input for ReadInput<R> {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.reader.read(&mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pos += done as u64;
        Ok(done)
    }

    fn skip(&mut self, n: u64) -> std::io::Result<u64> {
        if self.skip_buf.is_empty() {
            self.skip_buf = vec![0u8; 256 << 10];
        }
        let mut left = n;
        let mut buf = std::mem::take(&mut self.skip_buf);
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let got = self.fill(&mut buf[..want])?;
            left -= got as u64;
            if got < want {
                break;
            }
        }
        self.skip_buf = buf;
        Ok(n - left)
    }

    fn pos(&self) -> u64 {
        self.pos
    }
}

struct AtInput<'a> {
    source: &'a dyn ReadAt,
    pos: u64,
}

impl Input for AtInput<'_> {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.source.len().saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.source.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn skip(&mut self, n: u64) -> std::io::Result<u64> {
        let n = n.min(self.source.len().saturating_sub(self.pos));
        self.pos += n;
        Ok(n)
    }

    fn pos(&self) -> u64 {
        self.pos
    }
}

fn truncated(name: &str, at: u64, what: &str) -> ImageError {
    ImageError::Corrupt(format!(
        "{name} ends at byte {at}, inside {what}, before its end-of-stream marker: the file is truncated"
    ))
}

fn io_error(name: &str, e: std::io::Error) -> ImageError {
    ImageError::Corrupt(format!("reading {name} failed: {e}"))
}

fn fill_exact(input: &mut dyn Input, buf: &mut [u8], name: &str, what: &str) -> Result<(), ImageError> {
    let got = input.fill(buf).map_err(|e| io_error(name, e))?;
    if got < buf.len() {
        return Err(truncated(name, input.pos(), what));
    }
    Ok(())
}

fn skip_exact(input: &mut dyn Input, n: u64, name: &str, what: &str) -> Result<(), ImageError> {
    let got = input.skip(n).map_err(|e| io_error(name, e))?;
    if got < n {
        return Err(truncated(name, input.pos(), what));
    }
    Ok(())
}

/// Skips forward to byte `target` (nothing when already past it).
fn skip_to(input: &mut dyn Input, target: u64, name: &str, what: &str) -> Result<(), ImageError> {
    let n = target.saturating_sub(input.pos());
    skip_exact(input, n, name, what)
}

/// qemu-img writes a stream's grain directory and tables ahead of the grains, and may end the
/// file with the last grain, without the end-of-stream marker VMware always writes. Reading
/// those tables as they pass gives the byte offset of the last grain's marker (0: no grain), so
/// that such an end can be told from a truncation. `None` for any other shape, where only the
/// marker ends a stream.
fn qemu_last_marker(input: &mut dyn Input, header: &SparseHeader, name: &str) -> Result<Option<u64>, ImageError> {
    let gd_at = header.gd_offset.saturating_mul(SECTOR);
    let gd_bytes = header.gd_entries() * 4;
    let grains_at = header.overhead.saturating_mul(SECTOR);
    if header.gd_offset == GD_AT_END || gd_at < input.pos() || gd_at.saturating_add(gd_bytes) > grains_at {
        return Ok(None);
    }
    skip_to(input, gd_at, name, "the grain directory")?;
    let mut gd = vec![0u8; gd_bytes as usize];
    fill_exact(input, &mut gd, name, "the grain directory")?;
    let mut tables: Vec<u64> =
        (0..gd.len() / 4).map(|i| u64::from(u32_at(&gd, i * 4)) * SECTOR).filter(|&t| t != 0).collect();
    tables.sort_unstable();
    tables.dedup();
    let mut gt = vec![0u8; header.gt_bytes() as usize];
    let mut last = 0;
    for table in tables {
        if table < input.pos() || table.saturating_add(gt.len() as u64) > grains_at {
            return Ok(None);
        }
        skip_to(input, table, name, "a grain table")?;
        fill_exact(input, &mut gt, name, "a grain table")?;
        let most = (0..gt.len() / 4).map(|i| u32_at(&gt, i * 4)).max().unwrap_or(0);
        last = last.max(u64::from(most) * SECTOR);
    }
    Ok((last == 0 || last >= grains_at).then_some(last))
}

type Sink<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<(), ImageError>;

fn scan(
    input: &mut dyn Input,
    name: &str,
    limits: &Limits,
    budget: &mut Budget,
    mut sink: Option<Sink>,
) -> Result<StreamMap, ImageError> {
    let mut block = [0u8; 512];
    fill_exact(input, &mut block, name, "the header")?;
    let header = SparseHeader::parse(&block).map_err(|e| header_error(name, "header", e))?;
    if !header.deflate() || !header.markers() {
        return Err(ImageError::Unsupported(format!(
            "{name} is not a stream-optimized extent (no compressed grains behind markers), so it cannot be read in one pass"
        )));
    }
    let gd_entries = header.gd_entries();
    if gd_entries > limits.max_grain_directory_entries {
        return Err(ImageError::Limit(format!(
            "the grain directory of {name} has {gd_entries} entries, over the limit of {} (max_grain_directory_entries)",
            limits.max_grain_directory_entries
        )));
    }
    let mut map = StreamMap {
        header,
        footer: None,
        descriptor: None,
        grains: 0,
        stream_bytes: 0,
        tables: vec![None; gd_entries as usize],
    };
    // The embedded descriptor, then on to the first grain.
    let desc_at = header.descriptor_offset.saturating_mul(SECTOR);
    let desc_size = header.descriptor_size.saturating_mul(SECTOR);
    if header.descriptor_offset > 0 && desc_size > 0 && desc_size <= limits.max_descriptor_bytes && desc_at >= SECTOR {
        skip_to(input, desc_at, name, "the embedded descriptor")?;
        let mut text = vec![0u8; desc_size as usize];
        fill_exact(input, &mut text, name, "the embedded descriptor")?;
        if let Some(nul) = text.iter().position(|&b| b == 0) {
            text.truncate(nul);
        }
        map.descriptor = Some(String::from_utf8_lossy(&text).into_owned());
    }
    let overhead = header.overhead.saturating_mul(SECTOR);
    let last_marker = qemu_last_marker(input, &header, name)?;
    skip_to(input, overhead, name, "the space before the first grain")?;
    let aligned = input.pos().next_multiple_of(SECTOR);
    skip_to(input, aligned, name, "padding")?;

    let grain_bytes = header.grain_bytes();
    let gtes = u64::from(header.gtes_per_gt);
    let gt_size = header.gt_bytes().next_multiple_of(SECTOR);
    let gd_size = (gd_entries * 4).next_multiple_of(SECTOR);
    let capacity_bytes = header.capacity * SECTOR;
    let mut previous: Option<u64> = None;
    let mut packed = Vec::new();
    let mut grain_buf = Vec::new();
    let mut inflater = sink.as_ref().map(|_| Decompressor::new());
    let mut last_grain_at = None;
    loop {
        let at = input.pos();
        let mut head = [0u8; 12];
        let got = input.fill(&mut head).map_err(|e| io_error(name, e))?;
        let after_last_grain = match last_marker {
            Some(0) => map.grains == 0,
            Some(marker) => last_grain_at == Some(marker),
            None => false,
        };
        if got == 0 && after_last_grain {
            map.stream_bytes = at;
            return Ok(map);
        }
        if got < 12 {
            return Err(truncated(name, input.pos(), "a marker"));
        }
        let lba = u64_at(&head, 0);
        let size = u64::from(u32_at(&head, 8));
        if size == 0 {
            let mut rest = [0u8; 500];
            fill_exact(input, &mut rest, name, "a metadata marker")?;
            let kind = u32_at(&rest, 0);
            match kind {
                MARKER_EOS => {
                    map.stream_bytes = input.pos();
                    return Ok(map);
                }
                MARKER_GT => skip_exact(input, gt_size, name, "a grain table")?,
                MARKER_GD => skip_exact(input, gd_size, name, "the grain directory")?,
                MARKER_FOOTER => {
                    let mut footer = [0u8; 512];
                    fill_exact(input, &mut footer, name, "the footer")?;
                    map.footer = SparseHeader::parse(&footer).ok();
                }
                other => {
                    return Err(ImageError::Corrupt(format!(
                        "{name} has a marker of unknown type {other} at byte {at}: the stream is corrupt"
                    )))
                }
            }
            continue;
        }
        // A compressed grain.
        if !lba.is_multiple_of(header.grain_size) || lba >= header.capacity {
            return Err(ImageError::Corrupt(format!(
                "the grain marker at byte {at} of {name} is for sector {lba}, which is not the start of a grain inside the {}-sector disk: the stream is corrupt",
                header.capacity
            )));
        }
        let grain = lba / header.grain_size;
        if previous.is_some_and(|p| grain <= p) {
            return Err(ImageError::Corrupt(format!(
                "the grain marker at byte {at} of {name} is for sector {lba}, not after the previous grain's: the stream is out of order or corrupt"
            )));
        }
        previous = Some(grain);
        last_grain_at = Some(at);
        check_packed_size(size, name, grain, grain_bytes, limits.max_compressed_grain_bytes)?;
        let sector = u32::try_from(at / SECTOR).map_err(|_| {
            ImageError::Unsupported(format!(
                "{name} holds a grain past 2 TiB (byte {at}), beyond what a sparse extent can address"
            ))
        })?;
        let table = &mut map.tables[(grain / gtes) as usize];
        if table.is_none() {
            budget.take(gtes * 4, name)?;
            *table = Some(vec![0u32; gtes as usize].into_boxed_slice());
        }
        if let Some(t) = table {
            t[(grain % gtes) as usize] = sector;
        }
        map.grains += 1;
        match (&mut sink, &mut inflater) {
            (Some(sink), Some(inflater)) => {
                packed.resize(size as usize, 0);
                fill_exact(input, &mut packed, name, "a compressed grain")?;
                grain_buf.resize(grain_bytes as usize, 0);
                let n = inflater.zlib_decompress(&packed, &mut grain_buf).map_err(|_| {
                    ImageError::Corrupt(format!(
                        "compressed grain {grain} of {name} (byte {at}) does not inflate to at most one grain: the stream is corrupt"
                    ))
                })?;
                let valid = (capacity_bytes - lba * SECTOR).min(grain_bytes) as usize;
                if valid == grain_bytes as usize && n != valid {
                    return Err(ImageError::Corrupt(format!(
                        "compressed grain {grain} of {name} (byte {at}) inflates to {n} bytes instead of {grain_bytes}: the stream is corrupt"
                    )));
                }
                grain_buf[n..].fill(0);
                sink(lba * SECTOR, &grain_buf[..valid])?;
            }
            _ => skip_exact(input, size, name, "a compressed grain")?,
        }
        let pad = (GRAIN_MARKER_HEADER + size).next_multiple_of(SECTOR) - (GRAIN_MARKER_HEADER + size);
        skip_exact(input, pad, name, "a grain's padding")?;
    }
}
