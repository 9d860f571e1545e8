//! Disk image formats read and written natively: plain readers and writers behind small traits.
//!
//! - [`ReadAt`]: positioned reads from a file, a slice of a file (an OVA member) or memory.
//! - [`DiskSource`]: a virtual disk to convert — its size, where it holds data, and its bytes.
//! - Readers: `raw`, `vmdk` (descriptors, sparse and stream extents, flat and zero extents,
//!   delta chains), `ova` (an OVA read in place). Writer: `qcow2`.
//!
//! Parsers treat every byte as hostile: offsets are checked before use, allocations are
//! bounded by explicit limits, and problems are [`ImageError`]s, never panics.
//!
//! Readers never write a source, and open a file a disk references only through the caller's
//! confinement (the `*_confined` openers and [`crate::source::SourceRoots`]).

pub mod ova;
pub(crate) mod qcow2;
pub(crate) mod raw;
pub mod sniff;
pub mod tap;
pub mod vmdk;

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

/// Why an image cannot be read (or written).
#[derive(Debug, Error)]
pub enum ImageError {
    /// The bytes do not make a valid image (truncated, lying header, bad table, bomb …).
    #[error("{0}")]
    Corrupt(String),
    /// Valid, but a variant we do not convert (device-backed extent, unknown compression …).
    #[error("{0}")]
    Unsupported(String),
    /// Over one of the parser's explicit limits (descriptor size, extent count, chain depth …).
    #[error("{0}")]
    Limit(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file the image names is refused by SOURCE_ROOTS confinement; it was not opened.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// A bug: code reading the image panicked (ours or a library's). The job fails instead of
    /// the daemon, and the message asks for a report.
    #[error("internal error while reading the image ({0}); this is a bug in hyper2kvm: please report it with the output of `hyper2kvm inspect` on the source")]
    Internal(String),
}

impl ImageError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> ImageError {
        ImageError::Io { path: path.to_owned(), source }
    }
}

/// Positioned, shareable reads of a byte source of known length.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; a read past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file these bytes are, and where byte 0 of this source lies in it, when they are a
    /// file's bytes read as they are; `None` (the default) for anything else (memory).
    /// [`DiskSource::plain_runs`] builds on it, so that a converter can copy such bytes from
    /// file to file without reading them.
    fn as_file(&self) -> Option<(&File, u64)> {
        None
    }
}

/// A whole file, with its length taken when opened.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
    path: PathBuf,
}

impl FileSource {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<FileSource, ImageError> {
        let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
        let len = file.metadata().map_err(|e| ImageError::io(path, e))?.len();
        Ok(FileSource { file, len, path: path.to_owned() })
    }

    /// Wraps a file already opened (and confined) by the caller; `path` names it in messages.
    pub fn from_file(file: File, path: &Path) -> Result<FileSource, ImageError> {
        let len = file.metadata().map_err(|e| ImageError::io(path, e))?.len();
        Ok(FileSource { file, len, path: path.to_owned() })
    }

    /// The path the file was opened by, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file itself.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl ReadAt for FileSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn as_file(&self) -> Option<(&File, u64)> {
        Some((&self.file, 0))
    }
}

/// A byte range of another source: an OVA member read in place.
#[derive(Debug, Clone)]
pub struct Slice<R: ?Sized> {
    inner: Arc<R>,
    base: u64,
    len: u64,
}

impl<R: ReadAt + ?Sized> Slice<R> {
    /// `len` bytes of `inner` from `base`; refused if the range is not inside `inner`.
    pub fn new(inner: Arc<R>, base: u64, len: u64) -> Result<Slice<R>, ImageError> {
        if base.checked_add(len).is_none_or(|end| end > inner.len()) {
            return Err(ImageError::Corrupt(format!(
                "a member at byte {base} (+{len}) lies past the end of its {}-byte container",
                inner.len()
            )));
        }
        Ok(Slice { inner, base, len })
    }
}

impl<R: ReadAt + ?Sized> ReadAt for Slice<R> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.inner.read_exact_at(buf, self.base + offset)
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn as_file(&self) -> Option<(&File, u64)> {
        self.inner.as_file().map(|(file, at)| (file, at + self.base))
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        let src = self.get(start..end).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }

    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
}

/// A virtual disk to convert.
///
/// The engine walks the disk in chunks: it asks [`DiskSource::allocated`] which parts of a
/// chunk may hold data, skips the rest without reading (it reads as zeros), and reads the
/// allocated parts with [`DiskSource::read_at`] — from several threads at once, so
/// implementations must be cheap to share and must not keep a cursor.
pub trait DiskSource: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// The parts of `range` (inside `0..size()`) that may hold non-zero data: sorted,
    /// non-overlapping, inside `range`. Anything outside them reads as zeros.
    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, ImageError>;

    /// Reads `buf.len()` bytes of the virtual disk at `offset`. The caller never reads past
    /// `size()`. Unallocated parts read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;

    /// The parts of `range` whose bytes are stored verbatim (uncompressed, untransformed) in a
    /// file: raw images, FLAT/VMFS extents, runs of plain grains of sparse extents that lie
    /// back to back in their file. A converter may copy them file to file — `copy_file_range`,
    /// which a reflinking or network filesystem turns into shared blocks or a server-side copy
    /// — instead of reading them.
    ///
    /// The runs are sorted, non-overlapping, non-empty, and lie inside what
    /// [`DiskSource::allocated`] reports for `range`: holes are never part of a run. Parts of
    /// `range` in no run are read with [`DiskSource::read_at`] as usual, so the answer may be
    /// partial, and the default — no runs at all — is always correct.
    fn plain_runs(&self, range: Range<u64>) -> Result<Vec<PlainRun<'_>>, ImageError> {
        let _ = range;
        Ok(Vec::new())
    }

    /// The first offset at or after `from` where data may be (`size()` when there is none
    /// after it), found without walking what lies between: a converter skips to it in one
    /// step, so a disk of huge unallocated extents costs what its extents cost, not what its
    /// virtual size would. The default, `from`, is always correct.
    fn next_data(&self, from: u64) -> Result<u64, ImageError> {
        Ok(from)
    }

    /// Bytes of the whole disk that may hold data. A walk of every grain table or data range
    /// of the disk: for inspection, not on the way to a conversion, which walks it anyway.
    fn allocated_bytes(&self) -> Option<u64> {
        self.allocated(0..self.size()).ok().map(|ranges| ranges.iter().map(|r| r.end - r.start).sum())
    }
}

/// A part of a virtual disk stored verbatim in a file; see [`DiskSource::plain_runs`].
#[derive(Debug, Clone)]
pub struct PlainRun<'a> {
    /// The bytes of the virtual disk concerned.
    pub range: Range<u64>,
    /// The file that holds them.
    pub file: &'a File,
    /// Where `range.start` lies in `file`; the run goes on for `range`'s length from there.
    pub file_offset: u64,
}

/// Appends `run` to `runs`, merging it with the last one when it continues it both in the
/// virtual disk and in the same file.
pub(crate) fn push_plain_run<'a>(runs: &mut Vec<PlainRun<'a>>, run: PlainRun<'a>) {
    if run.range.is_empty() {
        return;
    }
    if let Some(last) = runs.last_mut() {
        if last.range.end == run.range.start
            && std::ptr::eq(last.file, run.file)
            && last.file_offset + (last.range.end - last.range.start) == run.file_offset
        {
            last.range.end = run.range.end;
            return;
        }
    }
    runs.push(run);
}

/// What `inspect` tells about a source, and what a job reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceInfo {
    /// `vmdk`, `raw`, `ova` …
    pub format: String,
    /// VMDK `createType` (`monolithicSparse`, `streamOptimized` …) when known.
    pub subformat: Option<String>,
    pub virtual_size: u64,
    /// Bytes of the virtual disk that are allocated; filled in by inspection
    /// ([`DiskSource::allocated_bytes`]), not by opening.
    pub allocated_bytes: Option<u64>,
    /// Every file read besides the one named (extents, parents), for SOURCE_ROOTS confinement.
    pub referenced_files: Vec<PathBuf>,
    /// Delta chain, child first, when there is one.
    pub chain: Vec<PathBuf>,
    /// `ddb.*` keys of a VMDK descriptor, kept for the report.
    pub ddb: std::collections::BTreeMap<String, String>,
    /// The extents the descriptors list, of every disk of the chain (child first); empty for
    /// formats without extents (raw).
    pub extents: Vec<ExtentInfo>,
}

/// One extent of a VMDK, as its descriptor lists it (a monolithic sparse or stream file is
/// one SPARSE extent: itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExtentInfo {
    /// The disk whose descriptor lists the extent: the top disk or a parent of its chain.
    pub disk: PathBuf,
    /// The descriptor's TYPE column: `SPARSE`, `FLAT`, `ZERO`, `VMFS` …
    #[serde(rename = "type")]
    pub kind: String,
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// The file holding the extent's data; `None` for ZERO.
    pub file: Option<PathBuf>,
    /// Size in 512-byte sectors, as listed.
    pub sectors: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Where the extent begins in the virtual disk of `disk`, in bytes.
    pub virtual_offset: u64,
    /// Where its data begins in `file`, in bytes: the descriptor's offset column (FLAT and
    /// VMFS), 0 otherwise.
    pub file_offset: u64,
}
