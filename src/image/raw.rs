//! Raw disk images: the file is the disk. Holes (found with `SEEK_DATA`/`SEEK_HOLE`) are
//! reported as unallocated so the engine skips them without reading.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{DiskSource, FileSource, ImageError, PlainRun, ReadAt, SourceInfo};

/// A raw image file.
#[derive(Debug)]
pub struct RawImage {
    file: FileSource,
}

impl RawImage {
    /// Opens a raw image.
    pub fn open(path: &Path) -> Result<RawImage, ImageError> {
        Ok(RawImage { file: FileSource::open(path)? })
    }

    /// A raw image of a file the caller opened (and confined).
    pub fn from_file(file: FileSource) -> RawImage {
        RawImage { file }
    }

    /// What `inspect` shows, but the allocated bytes ([`DiskSource::allocated_bytes`]: the
    /// data ranges `SEEK_DATA`/`SEEK_HOLE` find, the whole file where the filesystem cannot tell).
    pub fn info(&self) -> SourceInfo {
        SourceInfo { format: "raw".into(), virtual_size: self.file.len(), ..SourceInfo::default() }
    }

    /// `lseek(fd, from, whence)`; `None` past the end of the data (ENXIO) or where the
    /// filesystem cannot tell (then everything counts as data).
    fn seek(&self, from: u64, whence: libc::c_int) -> Option<u64> {
        let from = libc::off_t::try_from(from).ok()?;
        // SAFETY: lseek on a descriptor we own; it only moves the file position, which the
        // positioned reads used everywhere else never depend on.
        let at = unsafe { libc::lseek(self.file.file().as_raw_fd(), from, whence) };
        u64::try_from(at).ok()
    }
}

impl DiskSource for RawImage {
    fn size(&self) -> u64 {
        self.file.len()
    }

    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, ImageError> {
        let mut out = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let Some(data) = self.seek(at, libc::SEEK_DATA) else {
                // ENXIO: only a hole remains. Any other failure: assume data, to be safe.
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    out.push(at..range.end);
                }
                break;
            };
            if data >= range.end {
                break;
            }
            let hole = self.seek(data, libc::SEEK_HOLE).unwrap_or(range.end).min(range.end);
            out.push(data..hole);
            at = hole;
        }
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.file.read_exact_at(buf, offset).map_err(|e| ImageError::io(self.file.path(), e))
    }

    /// The file is the disk: every data range of the file is a run, at its own offset.
    fn plain_runs(&self, range: Range<u64>) -> Result<Vec<PlainRun<'_>>, ImageError> {
        let file = self.file.file();
        Ok(self.allocated(range)?.into_iter().map(|r| PlainRun { file_offset: r.start, range: r, file }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_are_not_allocated_and_data_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 8 << 20).unwrap();
        file.write_all_at(&[9u8; 4096], 40 << 20).unwrap();
        drop(file);
        let raw = RawImage::open(&path).unwrap();
        assert_eq!(raw.size(), 64 << 20);
        let allocated = raw.allocated(0..64 << 20).unwrap();
        let total: u64 = allocated.iter().map(|r| r.end - r.start).sum();
        assert!(total < 8 << 20, "holes are skipped: {allocated:?}");
        assert!(allocated.iter().any(|r| r.contains(&(8 << 20))));
        assert!(allocated.iter().any(|r| r.contains(&(40 << 20))));
        assert!(raw.allocated(16 << 20..32 << 20).unwrap().is_empty());
        let mut buf = [0u8; 8];
        raw.read_at(40 << 20, &mut buf).unwrap();
        assert_eq!(buf, [9u8; 8]);
        // The data ranges are plain runs of the file itself, at their own offsets.
        let runs = raw.plain_runs(0..64 << 20).unwrap();
        let ranges: Vec<_> = runs.iter().map(|r| r.range.clone()).collect();
        assert_eq!(ranges, allocated);
        assert!(runs.iter().all(|r| r.file_offset == r.range.start));
        assert!(raw.plain_runs(16 << 20..32 << 20).unwrap().is_empty(), "holes are never runs");
        assert_eq!(raw.allocated_bytes(), Some(total), "inspect counts the data ranges");
    }
}
