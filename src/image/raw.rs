//! Raw disk images: the file is the disk. Holes (found with `SEEK_DATA`/`SEEK_HOLE`) are
//! reported as unallocated so the engine skips them without reading.
//!
//! Any bytes make a raw disk, so a wrong file would be "converted" without a word: an OVF
//! descriptor, an archive, another disk format. [`RawImage::open`] refuses what is plainly no
//! raw disk (see [`crate::image::sniff`]).

use std::ops::Range;
use std::os::fd::AsRawFd;
#[cfg(test)]
use std::path::Path;
use std::sync::Arc;

use super::tap::Tap;
use super::{sniff, DiskSource, FileSource, ImageError, PlainRun, ReadAt, SourceInfo};

/// A raw image file.
#[derive(Debug)]
pub(crate) struct RawImage {
    file: FileSource,
    /// When the file's digest is taken while it is converted: every read goes through it,
    /// and no run is copied file to file unread.
    tap: Option<Arc<Tap>>,
}

impl RawImage {
    /// Opens a raw image; [`ImageError::Unsupported`] for a file that is plainly not a raw
    /// disk, saying what it looks like and what to do.
    #[cfg(test)]
    pub(crate) fn open(path: &Path) -> Result<RawImage, ImageError> {
        RawImage::from_file(FileSource::open(path)?)
    }

    /// A raw image of a file the caller opened (and confined), refused as [`RawImage::open`]
    /// refuses one.
    pub(crate) fn from_file(file: FileSource) -> Result<RawImage, ImageError> {
        check_is_raw_disk(&file)?;
        Ok(RawImage { file, tap: None })
    }

    /// A raw image read through `tap` (which opened and confined the file).
    pub(crate) fn tapped(tap: Arc<Tap>) -> Result<RawImage, ImageError> {
        let path = tap.path().to_owned();
        let file = tap.file().try_clone().map_err(|e| ImageError::io(&path, e))?;
        let image = RawImage::from_file(FileSource::from_file(file, &path)?)?;
        Ok(RawImage { tap: Some(tap), ..image })
    }

    /// What `inspect` shows, but the allocated bytes ([`DiskSource::allocated_bytes`]: the
    /// data ranges `SEEK_DATA`/`SEEK_HOLE` find, the whole file where the filesystem cannot tell).
    pub(crate) fn info(&self) -> SourceInfo {
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

/// Refuses a file whose first bytes say it is something else (see [`sniff::Kind`]). A size
/// that is not whole 512-byte sectors is accepted, as qemu-img accepts it (the last sector is
/// read as padded with zeros): it does not tell a cut copy from a whole one reliably, and a
/// manifest's checksum does.
fn check_is_raw_disk(file: &FileSource) -> Result<(), ImageError> {
    let mut head = vec![0u8; file.len().min(sniff::HEAD_BYTES as u64) as usize];
    file.read_exact_at(&mut head, 0).map_err(|e| ImageError::io(file.path(), e))?;
    let kind = sniff::sniff(&head);
    if !kind.may_be_raw_disk() {
        return Err(ImageError::Unsupported(format!(
            "the file is {}, not a raw disk image; {}",
            kind.describe(),
            kind.advice_as_raw()
        )));
    }
    Ok(())
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
        let read = match &self.tap {
            Some(tap) => tap.read_exact_at(buf, offset),
            None => self.file.read_exact_at(buf, offset),
        };
        read.map_err(|e| ImageError::io(self.file.path(), e))
    }

    /// The file is the disk: every data range of the file is a run, at its own offset (none
    /// when the file is tapped: its bytes must be read to be hashed).
    fn plain_runs(&self, range: Range<u64>) -> Result<Vec<PlainRun<'_>>, ImageError> {
        if self.tap.is_some() {
            return Ok(Vec::new());
        }
        let file = self.file.file();
        Ok(self.allocated(range)?.into_iter().map(|r| PlainRun { file_offset: r.start, range: r, file }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn refusal(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, bytes).unwrap();
        match RawImage::open(&path) {
            Err(ImageError::Unsupported(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn padded(head: &[u8], len: usize) -> Vec<u8> {
        let mut bytes = head.to_vec();
        bytes.resize(len, b' ');
        bytes
    }

    /// Issue 10: a raw source that is plainly not a disk used to be "converted" as one.
    #[test]
    fn files_that_are_plainly_not_raw_disks_are_refused_with_advice() {
        let ovf = padded(b"<?xml version=\"1.0\"?>\n<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\">", 4096);
        let m = refusal(&ovf);
        assert!(m.starts_with("the file is an OVF descriptor (XML text), not a raw disk image;"), "{m}");
        assert!(m.contains("source_format \"ova\""), "{m}");
        assert!(refusal(&padded(b"{\"manifest_version\": \"1.0\"}", 1024)).contains("JSON text"));
        assert!(refusal(&padded(b"<domain type='kvm'>", 512)).contains("XML text"));
        let m = refusal(&padded(b"\x1f\x8b\x08\x00", 1024));
        assert!(m.contains("gzip-compressed") && m.contains("decompress"), "{m}");
        let mut tar = vec![0u8; 2048];
        tar[257..263].copy_from_slice(b"ustar\0");
        assert!(refusal(&tar).contains("a tar archive"));
        let m = refusal(&padded(b"QFI\xfb\0\0\0\x03", 65536));
        assert!(m.contains("a qcow2 image") && m.contains("source_format \"qcow2\""), "{m}");
        let m = refusal(b"");
        assert!(m.contains("an empty file") && m.contains("did not finish"), "{m}");
    }

    #[test]
    fn raw_disks_of_any_content_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut mbr = vec![0u8; 1 << 20];
        mbr[..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
        // A size that is not whole sectors too: qemu-img reads it padded with zeros.
        for bytes in [vec![0u8; 1 << 20], mbr, padded(b"plain text at the start of a disk\n", 4096), vec![0u8; 1000]] {
            std::fs::write(&path, &bytes).unwrap();
            assert!(RawImage::open(&path).is_ok());
        }
    }

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
