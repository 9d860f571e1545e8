//! Shared by the disk targets: walk an opened disk the way the conversion engine does, within
//! bounds that keep one execution short whatever the (hostile) header claims.

#![allow(dead_code)]

use std::ops::Range;
use std::path::{Path, PathBuf};

use hyper2kvm::internals::image::DiskSource;

/// Chunk of the walk (the engine uses 4 MiB; smaller keeps a hostile 32 MiB grain cheaper).
pub const CHUNK: u64 = 1 << 20;

/// Bounds of one walk.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Virtual bytes walked chunk by chunk from the start; past this only the last chunk and a
    /// read in the middle are tried. A lying header can claim 64 PiB: walking it all would take
    /// hours, which is not what this target looks for.
    pub walk_bytes: u64,
    /// Allocated bytes read over the whole walk.
    pub read_bytes: u64,
    /// Chunks (from the start) also read whole, holes included, and compared with what the
    /// allocated parts alone give.
    pub full_chunks: u64,
}

pub const DEFAULT_CAPS: Caps = Caps { walk_bytes: 64 << 20, read_bytes: 8 << 20, full_chunks: 2 };

/// Checks what `DiskSource::allocated` promises: sorted, non-overlapping, non-empty ranges
/// inside the range asked.
fn check_ranges(ranges: &[Range<u64>], asked: &Range<u64>) {
    let mut at = asked.start;
    for r in ranges {
        assert!(
            r.start >= at && r.start < r.end && r.end <= asked.end,
            "allocated({asked:?}) returned bad ranges: {ranges:?}"
        );
        at = r.end;
    }
}

/// Walks `image` like the engine: per chunk, `allocated()` then reads of the allocated parts;
/// errors are fine (hostile input), panics, hangs and unbounded memory are not.
pub fn walk(image: &dyn DiskSource, caps: Caps) {
    thread_local! {
        // Reused: allocating and zeroing 2 MiB per execution costs more than most inputs.
        static BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
            std::cell::RefCell::new((vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]));
    }
    BUFFERS.with(|b| {
        let (buf, full) = &mut *b.borrow_mut();
        walk_with(image, caps, buf, full)
    })
}

fn walk_with(image: &dyn DiskSource, caps: Caps, buf: &mut [u8], full: &mut [u8]) {
    let size = image.size();
    let mut budget = caps.read_bytes;
    let walked = size.min(caps.walk_bytes);
    let mut chunk = 0u64;
    while chunk * CHUNK < walked {
        let start = chunk * CHUNK;
        let end = (start + CHUNK).min(size);
        let Ok(ranges) = image.allocated(start..end) else { return };
        check_ranges(&ranges, &(start..end));
        let len = (end - start) as usize;
        buf[..len].fill(0);
        let mut from_allocated_ok = true;
        for r in &ranges {
            let n = r.end - r.start;
            if n > budget {
                return;
            }
            budget -= n;
            let local = (r.start - start) as usize..(r.end - start) as usize;
            if image.read_at(r.start, &mut buf[local]).is_err() {
                from_allocated_ok = false;
            }
        }
        if from_allocated_ok {
            check_plain_runs(image, start..end, &ranges, &buf[..len]);
        }
        if chunk < caps.full_chunks && budget >= len as u64 {
            budget -= len as u64;
            // Holes read as zeros: the whole chunk must equal its allocated parts alone.
            // Slice equality first (memcmp): a byte loop is a million instrumented compares.
            if image.read_at(start, &mut full[..len]).is_ok() && from_allocated_ok && full[..len] != buf[..len] {
                if let Some(at) = full[..len].iter().zip(&buf[..len]).position(|(a, b)| a != b) {
                    panic!(
                        "byte {} reads {} whole but {} from the allocated parts {ranges:?}",
                        start + at as u64,
                        full[at],
                        buf[at]
                    );
                }
            }
        }
        chunk += 1;
    }
    if size > walked {
        // The last chunk, and an unaligned read across grains in the middle.
        let start = (size - 1) / CHUNK * CHUNK;
        if let Ok(ranges) = image.allocated(start..size) {
            check_ranges(&ranges, &(start..size));
        }
        let len = (size - start).min(budget) as usize;
        let _ = image.read_at(start, &mut buf[..len]);
        let mid = size / 2 - 100;
        let len = (size - mid).min(300_007).min(CHUNK).min(budget) as usize;
        let _ = image.read_at(mid, &mut buf[..len]);
    }
    // Past the end: an error, not a panic.
    let _ = image.read_at(size, &mut buf[..1]);
}

/// Checks what `DiskSource::plain_runs` promises for `chunk`, whose bytes are `disk`: sorted
/// runs inside the allocated `ranges`, and where the file can be read there, the file's bytes
/// are the disk's (the engine copies them file to file without looking).
fn check_plain_runs(image: &dyn DiskSource, chunk: Range<u64>, ranges: &[Range<u64>], disk: &[u8]) {
    use std::os::unix::fs::FileExt;
    let Ok(runs) = image.plain_runs(chunk.clone()) else { return };
    let mut at = chunk.start;
    let mut file_bytes = Vec::new();
    for run in &runs {
        let r = &run.range;
        assert!(r.start >= at && r.start < r.end && r.end <= chunk.end, "plain_runs({chunk:?}) out of order: {runs:?}");
        assert!(
            ranges.iter().any(|a| a.start <= r.start && r.end <= a.end),
            "plain run {r:?} outside the allocated ranges {ranges:?}"
        );
        at = r.end;
        file_bytes.resize((r.end - r.start) as usize, 0);
        if run.file.read_exact_at(&mut file_bytes, run.file_offset).is_ok() {
            let local = (r.start - chunk.start) as usize..(r.end - chunk.start) as usize;
            assert!(file_bytes == disk[local], "plain run {r:?} at file byte {} differs from the disk", run.file_offset);
        }
    }
}

/// A private directory for targets whose API takes paths: tmpfs when there is one, so that
/// writing each input costs little. `<tmp>/hyper2kvm-fuzz-<pid>`; libFuzzer leaves with
/// `exit()`, so directories of processes that are gone are removed when the next one starts.
pub fn scratch_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        if let Ok(entries) = std::fs::read_dir(&base) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("hyper2kvm-fuzz-")) else { continue };
                if pid.bytes().all(|b| b.is_ascii_digit()) && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = base.join(format!("hyper2kvm-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("a scratch directory for the fuzz target");
        dir
    })
    .clone()
}
