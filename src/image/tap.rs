//! Digests of a source file taken from the reads a conversion makes anyway, so that a job
//! reads its source once (issue 13; the design and its numbers: docs/DECISIONS.md, "One pass
//! over the source").
//!
//! A [`Tap`] is a [`ReadAt`] over one file. Every byte read through it reaches the digests in
//! file order: bytes at the *frontier* (the first byte not yet hashed) are hashed at once;
//! bytes read ahead of it (another worker's chunk, a footer, a grain table) are kept until the
//! frontier reaches them; bytes behind it were hashed already. When more than `window` bytes
//! wait, the tap reads the gap before them itself — bytes the conversion did not want (holes,
//! tables, grains of nothing) — and goes on. [`Tap::finish`] reads whatever the conversion
//! left unread up to the end of the file, and refuses a file whose size, mtime or ctime
//! changed meanwhile: the bytes hashed must be the bytes converted.
//!
//! Besides the SHA-256 of the whole file, a tap computes the `.mf` digests of byte ranges
//! (OVA members) named before the reads begin ([`Tap::watch`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::ova::mf::{DigestAlgorithm, Hasher};
use super::{FileSource, ImageError, ReadAt};

/// Largest read the tap makes itself, to fill a gap or the tail.
const GAP_READ_BYTES: u64 = 1 << 20;

/// A gap this small (a stream's marker sector, a redundant grain table) is filled as soon as
/// an eighth of the window waits behind it, rather than when all of it does: such gaps recur
/// through a file, and each would otherwise hold a whole window in memory. At worst it is a
/// part of a chunk a slow worker has yet to read, read twice.
const SMALL_GAP_BYTES: u64 = 64 << 10;

/// A source file read through its digests; see the module documentation.
pub struct Tap {
    file: FileSource,
    window: u64,
    stamp: Stamp,
    state: Mutex<State>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("path", &self.file.path()).field("window", &self.window).finish()
    }
}

/// What changes when a file is written to: compared at open and at [`Tap::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(file: &File) -> std::io::Result<Stamp> {
        let m = file.metadata()?;
        Ok(Stamp { size: m.len(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) })
    }
}

struct Watch {
    range: Range<u64>,
    algorithms: Vec<DigestAlgorithm>,
    hashers: Vec<Hasher>,
}

struct State {
    frontier: u64,
    /// Bytes read ahead of the frontier, by offset; never overlapping, all past the frontier.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: u64,
    sha256: Sha256,
    watches: Vec<Watch>,
    /// Bytes the tap read itself (gaps and tail).
    own_reads: u64,
    /// Most bytes kept at once.
    peak_pending: u64,
}

/// What [`Tap::finish`] found.
#[derive(Debug)]
pub struct TapDigests {
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// Per [`Tap::watch`]ed range, in the order watched: (range, algorithms, lower-case hex
    /// digests in the same order).
    pub ranges: Vec<(Range<u64>, Vec<DigestAlgorithm>, Vec<String>)>,
    /// Bytes of the file the tap read itself, besides what the conversion read.
    pub own_reads: u64,
    /// Most bytes read ahead of the frontier that were held at once (memory).
    pub peak_pending: u64,
}

impl TapDigests {
    /// The digests of a watched `range` with `algorithms`, if it was watched.
    pub fn of_range(&self, range: &Range<u64>, algorithms: &[DigestAlgorithm]) -> Option<&[String]> {
        self.ranges.iter().find(|(r, a, _)| r == range && a == algorithms).map(|(_, _, d)| d.as_slice())
    }
}

/// Why a tap could not give the digests of the file.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The file was written to while it was read.
    #[error(
        "{path} changed while it was read (size, modification or change time differ from when the conversion began)"
    )]
    Changed {
        /// The source file that changed.
        path: PathBuf,
    },
    /// Reading the file failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl Tap {
    /// A tap over `file` (opened and confined by the caller; `path` names it in messages),
    /// holding at most about `window` bytes read ahead of the frontier.
    pub fn new(file: File, path: &Path, window: u64) -> Result<Tap, ImageError> {
        let stamp = Stamp::of(&file).map_err(|e| ImageError::io(path, e))?;
        let file = FileSource::from_file(file, path)?;
        let state = State {
            frontier: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            sha256: Sha256::new(),
            watches: Vec::new(),
            own_reads: 0,
            peak_pending: 0,
        };
        Ok(Tap { file, window: window.max(GAP_READ_BYTES), stamp, state: Mutex::new(state) })
    }

    /// The file, for what is not a read (`SEEK_DATA`, its length).
    pub fn file(&self) -> &File {
        self.file.file()
    }

    /// The file's name, as given.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Also computes the `algorithms` digests of `range`. Refused once the frontier has passed
    /// the range's start (those bytes are gone).
    pub fn watch(&self, range: Range<u64>, algorithms: &[DigestAlgorithm]) -> Result<(), ImageError> {
        let mut state = self.lock();
        if range.start < state.frontier || range.end > self.file.len() {
            return Err(ImageError::Internal(format!(
                "a digest of bytes {range:?} of {} was asked for after they were read",
                self.file.path().display()
            )));
        }
        let hashers = algorithms.iter().map(|&a| Hasher::new(a)).collect();
        state.watches.push(Watch { range, algorithms: algorithms.to_vec(), hashers });
        Ok(())
    }

    /// Reads what was not read up to the end of the file, and returns the digests, unless the
    /// file changed since the tap was made.
    pub fn finish(&self) -> Result<TapDigests, TapError> {
        let mut state = self.lock();
        while state.frontier < self.file.len() {
            let next = state.pending.keys().next().copied().unwrap_or(self.file.len());
            self.read_gap(&mut state, next)?;
        }
        let now = Stamp::of(self.file.file()).map_err(|e| ImageError::io(self.file.path(), e))?;
        if now != self.stamp {
            return Err(TapError::Changed { path: self.file.path().to_owned() });
        }
        let state = &mut *state;
        let sha256 = std::mem::take(&mut state.sha256).finalize().into();
        let ranges = std::mem::take(&mut state.watches)
            .into_iter()
            .map(|w| (w.range, w.algorithms, w.hashers.into_iter().map(Hasher::hex).collect()))
            .collect();
        Ok(TapDigests { sha256, ranges, own_reads: state.own_reads, peak_pending: state.peak_pending })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A worker that panicked while hashing leaves the state as it was between two bytes
        // runs; the job fails anyway (the panic is caught and reported), so go on.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the bytes just read at `offset` into the digests.
    fn observe(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut state = self.lock();
        let end = offset + data.len() as u64;
        if end <= state.frontier || data.is_empty() {
            return Ok(());
        }
        if offset <= state.frontier {
            let skip = (state.frontier - offset) as usize;
            state.consume(&data[skip..]);
            state.drain();
            return Ok(());
        }
        state.keep(offset, data);
        state.peak_pending = state.peak_pending.max(state.pending_bytes);
        while state.pending_bytes > self.window / 8 {
            let Some(next) = state.pending.keys().next().copied() else { break };
            if next - state.frontier > SMALL_GAP_BYTES && !self.is_hole(state.frontier, next) {
                break;
            }
            self.read_gap(&mut state, next).map_err(std::io::Error::other)?;
        }
        if state.pending_bytes > self.window {
            // Nothing before the first kept bytes was read within a whole window: what lies
            // there is not wanted by the conversion (or will be read again, at worst).
            while state.pending_bytes > self.window / 2 {
                let Some(next) = state.pending.keys().next().copied() else { break };
                self.read_gap(&mut state, next).map_err(std::io::Error::other)?;
            }
        }
        Ok(())
    }

    /// Reads and hashes the bytes from the frontier to `to` (the next kept bytes or the end).
    /// A hole (`SEEK_DATA`) is hashed as the zeros it reads as, unread: a raw disk's holes, which
    /// the conversion skips, cost neither reads nor a window of memory.
    fn read_gap(&self, state: &mut State, to: u64) -> Result<(), ImageError> {
        let mut buf = vec![0u8; GAP_READ_BYTES.min(to.saturating_sub(state.frontier)) as usize];
        while state.frontier < to {
            let n = (to - state.frontier).min(GAP_READ_BYTES) as usize;
            if self.is_hole(state.frontier, state.frontier + n as u64) {
                buf[..n].fill(0);
            } else {
                let at = state.frontier;
                self.file.read_exact_at(&mut buf[..n], at).map_err(|e| ImageError::io(self.file.path(), e))?;
                state.own_reads += n as u64;
            }
            state.consume(&buf[..n]);
        }
        state.drain();
        Ok(())
    }

    /// Whether `from..to` is a hole of the file: no data at or after `from` before `to`. False
    /// where the filesystem cannot tell (then it is read). A write into it meanwhile is caught
    /// by [`Tap::finish`]'s check of the file's times.
    fn is_hole(&self, from: u64, to: u64) -> bool {
        use std::os::fd::AsRawFd;
        let Ok(at) = libc::off_t::try_from(from) else { return false };
        // SAFETY: lseek on a descriptor we own; only the file position moves, which no reader
        // of this file uses (every read is positioned).
        let data = unsafe { libc::lseek(self.file.file().as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `from` at all.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        u64::try_from(data).is_ok_and(|d| d >= to)
    }
}

impl State {
    /// Hashes `bytes`, which lie at the frontier, and moves it past them.
    fn consume(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        let (start, end) = (self.frontier, self.frontier + bytes.len() as u64);
        for watch in &mut self.watches {
            let (from, to) = (watch.range.start.max(start), watch.range.end.min(end));
            if from < to {
                let part = &bytes[(from - start) as usize..(to - start) as usize];
                watch.hashers.iter_mut().for_each(|h| h.update(part));
            }
        }
        self.frontier = end;
    }

    /// Hashes the kept bytes the frontier has reached.
    fn drain(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > self.frontier {
                break;
            }
            let (start, bytes) = entry.remove_entry();
            self.pending_bytes -= bytes.len() as u64;
            let end = start + bytes.len() as u64;
            if end > self.frontier {
                let skip = (self.frontier - start) as usize;
                self.consume(&bytes[skip..]);
            }
        }
    }

    /// Keeps the parts of `data` (read at `offset`, past the frontier) not kept already.
    fn keep(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        // Kept ranges never overlap, so those overlapping `offset..end` are the last ones
        // starting before `end`, back to the first that ends after `offset`.
        let overlapping: Vec<Range<u64>> = self
            .pending
            .range(..end)
            .rev()
            .map(|(&s, v)| s..s + v.len() as u64)
            .take_while(|r| r.end > offset)
            .collect();
        let mut at = offset;
        for taken in overlapping.into_iter().rev().chain(std::iter::once(end..end)) {
            if taken.start > at {
                let part = data[(at - offset) as usize..(taken.start - offset) as usize].to_vec();
                self.pending_bytes += part.len() as u64;
                self.pending.insert(at, part);
            }
            at = at.max(taken.end);
        }
    }
}

impl ReadAt for Tap {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        self.observe(offset, buf)
    }

    fn len(&self) -> u64 {
        self.file.len()
    }

    // `as_file` stays `None`: bytes copied file to file would never reach the digests.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Rng;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        (dir, path)
    }

    fn tap(path: &Path, window: u64) -> Tap {
        Tap::new(File::open(path).unwrap(), path, window).unwrap()
    }

    fn read(tap: &Tap, range: Range<u64>) {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        tap.read_exact_at(&mut buf, range.start).unwrap();
    }

    /// Reads in any order, overlapping, repeated or leaving gaps: the digest is the file's,
    /// and the tap itself reads only what nobody read.
    #[test]
    fn any_read_order_gives_the_files_digest_reading_only_the_gaps() {
        let mut rng = Rng(7);
        let mut bytes = vec![0u8; (5 << 20) + 123];
        rng.fill(&mut bytes);
        let (_dir, path) = file_of(&bytes);
        let want: [u8; 32] = Sha256::digest(&bytes).into();
        let len = bytes.len() as u64;
        let orders: Vec<Vec<Range<u64>>> = vec![
            vec![],
            vec![0..len],
            vec![len - 1024..len, 0..512, 100..4096, 4096..(1 << 20), (3 << 20)..(4 << 20)],
            (0..40)
                .map(|_| {
                    let start = rng.next() % len;
                    start..(start + rng.next() % 300_000).min(len)
                })
                .collect(),
        ];
        for (i, reads) in orders.into_iter().enumerate() {
            for window in [GAP_READ_BYTES, 64 << 20] {
                let tap = tap(&path, window);
                reads.iter().for_each(|r| read(&tap, r.clone()));
                let done = tap.finish().unwrap();
                assert_eq!(done.sha256, want, "order {i}, window {window}");
                let mut unread: Vec<bool> = vec![true; bytes.len()];
                reads.iter().for_each(|r| unread[r.start as usize..r.end as usize].fill(false));
                let gaps = unread.iter().filter(|&&u| u).count() as u64;
                if window > len {
                    assert_eq!(done.own_reads, gaps, "order {i}: the tap reads exactly the gaps");
                } else {
                    assert!(done.own_reads >= gaps, "order {i}");
                }
            }
        }
    }

    /// A raw disk's holes, which the conversion skips, are hashed as zeros without a read and
    /// without holding the data behind them.
    #[test]
    fn holes_are_hashed_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 1 << 20], 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[9u8; 8 << 20], 40 << 20).unwrap();
        drop(file);
        let want: [u8; 32] = Sha256::digest(std::fs::read(&path).unwrap()).into();
        let tap = tap(&path, 64 << 20);
        read(&tap, 0..1 << 20);
        read(&tap, (40 << 20)..(48 << 20));
        let done = tap.finish().unwrap();
        assert_eq!(done.sha256, want);
        // Where the filesystem tells holes (ext4, xfs, tmpfs): nothing read, nothing held.
        if tap.is_hole(2 << 20, 3 << 20) {
            assert_eq!(done.own_reads, 0, "only holes were left unread");
            assert!(done.peak_pending <= (8 << 20), "held {}", done.peak_pending);
        }
    }

    #[test]
    fn watched_ranges_get_their_digests() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let (_dir, path) = file_of(&bytes);
        let tap = tap(&path, 1 << 20);
        tap.watch(1000..50_000, &[DigestAlgorithm::Sha1, DigestAlgorithm::Sha256]).unwrap();
        read(&tap, 40_000..60_000);
        read(&tap, 0..10_000);
        let done = tap.finish().unwrap();
        let part = &bytes[1000..50_000];
        let want = [hex::encode(sha1::Sha1::digest(part)), hex::encode(Sha256::digest(part))];
        let algorithms = [DigestAlgorithm::Sha1, DigestAlgorithm::Sha256];
        assert_eq!(done.of_range(&(1000..50_000), &algorithms).unwrap(), want);
    }

    #[test]
    fn a_file_written_to_during_the_reads_is_refused() {
        let (_dir, path) = file_of(&[1u8; 8192]);
        let tap = tap(&path, 1 << 20);
        read(&tap, 0..4096);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&writer, &[2u8; 16], 6000).unwrap();
        assert!(matches!(tap.finish(), Err(TapError::Changed { .. })));
    }
}
