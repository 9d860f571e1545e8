//! FLAT and VMFS extents: a raw file (or a range of one) holds the extent's bytes as they are.
//! Holes of the file (`SEEK_DATA`/`SEEK_HOLE`) are reported as zeros so the engine skips them.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::regions::{push_region, Region};
use crate::image::{push_plain_run, FileSource, ImageError, PlainRun, ReadAt};

#[derive(Debug)]
pub(crate) struct FlatExtent {
    pub(crate) file: Arc<FileSource>,
    /// Byte offset of the extent in the file.
    pub(crate) offset: u64,
}

impl FlatExtent {
    pub(crate) fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.file.read_exact_at(buf, self.offset + at).map_err(|e| ImageError::io(self.file.path(), e))
    }

    /// `lseek(fd, from, whence)`; `None` past the end of the data (ENXIO) or where the
    /// filesystem cannot tell.
    fn seek(&self, from: u64, whence: libc::c_int) -> Result<u64, i32> {
        let from = libc::off_t::try_from(from).map_err(|_| libc::EINVAL)?;
        // SAFETY: lseek on a descriptor we own; it only moves the file position, which the
        // positioned reads used everywhere never depend on.
        let at = unsafe { libc::lseek(self.file.file().as_raw_fd(), from, whence) };
        u64::try_from(at).map_err(|_| std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL))
    }

    /// How `range` (extent-relative) reads: data where the file has data, zeros in its holes.
    pub(crate) fn map(&self, range: Range<u64>, base: u64, out: &mut Vec<(Range<u64>, Region)>) {
        let (start, end) = (self.offset + range.start, self.offset + range.end);
        let to_virtual = |at: u64| base + at - self.offset;
        let mut at = start;
        while at < end {
            let data = match self.seek(at, libc::SEEK_DATA) {
                Ok(data) => data.min(end),
                Err(libc::ENXIO) => end,
                Err(_) => {
                    // The filesystem cannot tell: everything may be data.
                    push_region(out, to_virtual(at)..to_virtual(end), Region::Data);
                    return;
                }
            };
            push_region(out, to_virtual(at)..to_virtual(data), Region::Zero);
            if data >= end {
                return;
            }
            let hole = self.seek(data, libc::SEEK_HOLE).unwrap_or(end).clamp(data, end);
            let hole = if hole == data { end } else { hole };
            push_region(out, to_virtual(data)..to_virtual(hole), Region::Data);
            at = hole;
        }
    }

    /// The data of `range` (extent-relative) as plain runs of the file: what
    /// [`FlatExtent::map`] reports as data, placed at virtual offsets from `base`.
    pub(crate) fn plain_runs<'a>(&'a self, range: Range<u64>, base: u64, out: &mut Vec<PlainRun<'a>>) {
        let mut regions = Vec::new();
        self.map(range, base, &mut regions);
        for (r, region) in regions {
            if region == Region::Data {
                let file_offset = self.offset + (r.start - base);
                push_plain_run(out, PlainRun { range: r, file: self.file.file(), file_offset });
            }
        }
    }
}
