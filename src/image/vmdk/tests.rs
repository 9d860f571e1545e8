//! Real files, qemu-img as the oracle: every subformat qemu-img writes, VMware-shaped streams
//! (VMDKstream's and a writer here), real files made by other tools, hand-written descriptors,
//! and the ways hostile files fail.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::*;
use crate::image::{DiskSource, FileSource, ImageError, Slice};
use crate::test_support::{qemu_img, Rng};

const MIB: usize = 1 << 20;
const GRAIN: usize = 64 << 10;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// 16 MiB with data of every kind: incompressible (compressed grains larger than the grain),
/// compressible, runs across grain boundaries, a lone byte, the last sectors.
fn pattern(size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for chunk in data[..512 << 10].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    for (i, b) in data[(512 << 10)..MIB].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    data[(3 * MIB) + 4096..(3 * MIB) + 200_000].fill(0x33);
    data[8 * MIB..9 * MIB].fill(0x5a);
    data[12 * MIB + 777] = 1;
    let n = data.len();
    data[n - 4096..].fill(0xa5);
    data
}

fn write_file(path: &Path, data: &[u8]) -> PathBuf {
    std::fs::write(path, data).unwrap();
    path.to_owned()
}

/// `qemu-img convert -f raw -O vmdk -o subformat=…[,extra]`.
fn convert(dir: &Path, raw: &Path, subformat: &str, extra: &str) -> PathBuf {
    let out = dir.join(format!("{subformat}{}.vmdk", if extra.is_empty() { "" } else { "-x" }));
    let mut options = format!("subformat={subformat}");
    if !extra.is_empty() {
        options = format!("{options},{extra}");
    }
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", "-o", &options, s(raw), s(&out)]);
    assert_qemu_made(&out, subformat, extra);
    out
}

/// What qemu-img reads from `vmdk`, as a raw file.
fn oracle(vmdk: &Path) -> PathBuf {
    let out = vmdk.with_extension("oracle.raw");
    qemu_img(&["convert", "-f", "vmdk", "-O", "raw", s(vmdk), s(&out)]);
    out
}

fn read_all(image: &dyn DiskSource, chunk: usize) -> Vec<u8> {
    let mut out = vec![0xeeu8; image.size() as usize];
    for (i, piece) in out.chunks_mut(chunk).enumerate() {
        image.read_at((i * chunk) as u64, piece).unwrap();
    }
    out
}

/// Chunks read by `threads` threads at once, interleaved.
fn read_parallel(image: &dyn DiskSource, chunk: usize, threads: usize) -> Vec<u8> {
    let mut out = vec![0xeeu8; image.size() as usize];
    let mut pieces: Vec<(usize, &mut [u8])> = out.chunks_mut(chunk).enumerate().collect();
    let mut lanes: Vec<Vec<(usize, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (n, piece) in pieces.drain(..).enumerate() {
        lanes[n % threads].push(piece);
    }
    std::thread::scope(|scope| {
        for lane in lanes {
            scope.spawn(move || {
                for (i, piece) in lane {
                    image.read_at((i * chunk) as u64, piece).unwrap();
                }
            });
        }
    });
    out
}

fn assert_same(ours: &[u8], expected: &[u8], what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}: length");
    if ours != expected {
        let at = ours.iter().zip(expected).position(|(a, b)| a != b).unwrap();
        panic!("{what}: first difference at byte {at}: {} instead of {}", ours[at], expected[at]);
    }
}

/// Checks `allocated()`: sorted, inside the range, consistent over sub-ranges, and the disk
/// rebuilt from the allocated parts alone equals `expected`. Returns the allocated bytes.
fn check_allocated(image: &dyn DiskSource, expected: &[u8], what: &str) -> u64 {
    let size = image.size();
    let all = image.allocated(0..size).unwrap();
    let mut at = 0;
    for r in &all {
        assert!(r.start >= at && r.start < r.end && r.end <= size, "{what}: bad ranges {all:?}");
        at = r.end;
    }
    let mut rebuilt = vec![0u8; size as usize];
    for r in &all {
        image.read_at(r.start, &mut rebuilt[r.start as usize..r.end as usize]).unwrap();
    }
    assert_same(&rebuilt, expected, &format!("{what}: allocated parts only"));
    let mut rng = Rng(size | 1);
    for _ in 0..50 {
        let a = rng.next() % size;
        let b = a + rng.next() % (size - a) + 1;
        let sub = image.allocated(a..b).unwrap();
        let want: Vec<_> =
            all.iter().filter(|r| r.end > a && r.start < b).map(|r| r.start.max(a)..r.end.min(b)).collect();
        assert_eq!(sub, want, "{what}: allocated({a}..{b})");
    }
    all.iter().map(|r| r.end - r.start).sum()
}

/// Checks `plain_runs()`: sorted, non-empty, inside what `allocated()` reports, the same over
/// sub-ranges, and each run's file holds `expected`'s bytes at the run's offset. Returns the
/// bytes in runs.
fn check_plain_runs(image: &dyn DiskSource, expected: &[u8], what: &str) -> u64 {
    let size = image.size();
    let allocated = image.allocated(0..size).unwrap();
    let runs = image.plain_runs(0..size).unwrap();
    let mut at = 0;
    for run in &runs {
        let r = &run.range;
        assert!(r.start >= at && r.start < r.end && r.end <= size, "{what}: bad runs {runs:?}");
        assert!(allocated.iter().any(|a| a.start <= r.start && r.end <= a.end), "{what}: run {r:?} not allocated");
        let mut bytes = vec![0u8; (r.end - r.start) as usize];
        run.file.read_exact_at(&mut bytes, run.file_offset).unwrap();
        assert_same(&bytes, &expected[r.start as usize..r.end as usize], &format!("{what}: run {r:?}"));
        at = r.end;
    }
    let mut rng = Rng(size | 3);
    for _ in 0..50 {
        let a = rng.next() % size;
        let b = a + rng.next() % (size - a) + 1;
        let sub: Vec<_> = image.plain_runs(a..b).unwrap().into_iter().map(|r| (r.range, r.file_offset)).collect();
        let want: Vec<_> = runs
            .iter()
            .filter(|r| r.range.end > a && r.range.start < b)
            .map(|r| {
                let start = r.range.start.max(a);
                (start..r.range.end.min(b), r.file_offset + (start - r.range.start))
            })
            .collect();
        assert_eq!(sub, want, "{what}: plain_runs({a}..{b})");
    }
    runs.iter().map(|r| r.range.end - r.range.start).sum()
}

/// Reads the whole disk in 1 MiB chunks, in unaligned chunks, from four threads, and from the
/// allocated parts only: each must equal `expected`. Checks the plain runs too.
fn verify(image: &dyn DiskSource, expected: &[u8], what: &str) -> u64 {
    assert_eq!(image.size(), expected.len() as u64, "{what}: size");
    assert_same(&read_all(image, MIB), expected, &format!("{what}: 1 MiB chunks"));
    assert_same(&read_all(image, 300_007), expected, &format!("{what}: unaligned chunks"));
    assert_same(&read_parallel(image, MIB, 4), expected, &format!("{what}: 4 threads"));
    check_plain_runs(image, expected, what);
    check_allocated(image, expected, what)
}

/// Grains of `data` with a non-zero byte, in bytes (what a sparse writer allocates).
fn nonzero_grain_bytes(data: &[u8]) -> u64 {
    nonzero_bytes_in(data, GRAIN)
}

/// Chunks of `chunk` bytes of `data` with a non-zero byte, in bytes.
fn nonzero_bytes_in(data: &[u8], chunk: usize) -> u64 {
    data.chunks(chunk).filter(|g| g.iter().any(|&b| b != 0)).map(|g| g.len() as u64).sum()
}

/// Chunks of `chunk` bytes of `data` with a non-zero byte.
fn nonzero_chunks(data: &[u8], chunk: usize) -> u64 {
    data.chunks(chunk).filter(|g| g.iter().any(|&b| b != 0)).count() as u64
}

fn seek(file: &File, from: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on an open descriptor; positioned reads do not use the file position.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    u64::try_from(at).ok()
}

/// For disks too large to hold: walks the disk in chunks, building each from its allocated
/// parts (what the engine does) and comparing with qemu's raw output, whose holes are checked
/// against zeros without reading them; every `full_every`th chunk is also read whole.
fn verify_large(image: &dyn DiskSource, oracle: &Path, full_every: u64, what: &str) -> u64 {
    let file = File::open(oracle).unwrap();
    let size = file.metadata().unwrap().len();
    assert_eq!(image.size(), size, "{what}: size");
    let chunk = 8 * MIB as u64;
    let zeros = vec![0u8; chunk as usize];
    let mut ours = vec![0u8; chunk as usize];
    let mut theirs = vec![0u8; chunk as usize];
    let mut allocated = 0;
    for (n, start) in (0..size).step_by(chunk as usize).enumerate() {
        let end = (start + chunk).min(size);
        let len = (end - start) as usize;
        let ranges = image.allocated(start..end).unwrap();
        ours[..len].fill(0);
        for r in &ranges {
            assert!(r.start >= start && r.end <= end && r.start < r.end, "{what}: {r:?}");
            allocated += r.end - r.start;
            image.read_at(r.start, &mut ours[(r.start - start) as usize..(r.end - start) as usize]).unwrap();
        }
        let oracle_has_data = seek(&file, start, libc::SEEK_DATA).is_some_and(|d| d < end);
        let expected: &[u8] = if oracle_has_data {
            file.read_exact_at(&mut theirs[..len], start).unwrap();
            &theirs[..len]
        } else {
            &zeros[..len]
        };
        assert_same(&ours[..len], expected, &format!("{what}: chunk at {start} from allocated parts"));
        if (n as u64).is_multiple_of(full_every) || !ranges.is_empty() {
            image.read_at(start, &mut ours[..len]).unwrap();
            assert_same(&ours[..len], expected, &format!("{what}: chunk at {start}"));
        }
    }
    allocated
}

fn err_text(e: &ImageError) -> String {
    e.to_string()
}

#[track_caller]
fn expect_corrupt(r: Result<impl std::fmt::Debug, ImageError>, words: &[&str]) -> String {
    match r {
        Err(ImageError::Corrupt(m)) => {
            for w in words {
                assert!(m.contains(w), "message lacks {w:?}: {m}");
            }
            m
        }
        other => panic!("expected Corrupt with {words:?}, got {other:?}"),
    }
}

#[track_caller]
fn expect_kind(r: Result<impl std::fmt::Debug, ImageError>, kind: &str, words: &[&str]) -> String {
    let e = r.expect_err("an error");
    let actual = match &e {
        ImageError::Corrupt(_) => "corrupt",
        ImageError::Unsupported(_) => "unsupported",
        ImageError::Limit(_) => "limit",
        ImageError::Io { .. } => "io",
        ImageError::Internal(_) => "internal",
        ImageError::Source(_) => "source",
    };
    let m = err_text(&e);
    assert_eq!(actual, kind, "{m}");
    for w in words {
        assert!(m.contains(w), "message lacks {w:?}: {m}");
    }
    m
}

fn open_bytes(bytes: Vec<u8>, limits: &Limits) -> Result<VmdkImage, ImageError> {
    open_stream(Arc::new(bytes), "disk.vmdk", limits)
}

// ---------------------------------------------------------------- sparse extent writers

fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// The fields of a `KDMV` header that the writers here choose.
#[derive(Debug, Clone, Copy)]
struct Fields {
    version: u32,
    flags: u32,
    capacity: u64,
    /// Grain size in sectors.
    grain: u64,
    /// Embedded descriptor: (offset, size) in sectors.
    descriptor: (u64, u64),
    redundant_gd: u64,
    gd: u64,
    overhead: u64,
    compression: u16,
}

fn sparse_header(f: &Fields) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&f.version.to_le_bytes());
    h[8..12].copy_from_slice(&f.flags.to_le_bytes());
    h[12..20].copy_from_slice(&f.capacity.to_le_bytes());
    h[20..28].copy_from_slice(&f.grain.to_le_bytes());
    h[28..36].copy_from_slice(&f.descriptor.0.to_le_bytes());
    h[36..44].copy_from_slice(&f.descriptor.1.to_le_bytes());
    h[44..48].copy_from_slice(&512u32.to_le_bytes());
    h[48..56].copy_from_slice(&f.redundant_gd.to_le_bytes());
    h[56..64].copy_from_slice(&f.gd.to_le_bytes());
    h[64..72].copy_from_slice(&f.overhead.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    h[77..79].copy_from_slice(&f.compression.to_le_bytes());
    h
}

/// The header at the start of `bytes`, fields as written: no range checks, so that headers
/// made to be refused can be looked at too.
fn raw_header(bytes: &[u8]) -> SparseHeader {
    assert_eq!(&bytes[..4], b"KDMV");
    SparseHeader {
        version: header::u32_at(bytes, 4),
        flags: header::u32_at(bytes, 8),
        capacity: header::u64_at(bytes, 12),
        grain_size: header::u64_at(bytes, 20),
        descriptor_offset: header::u64_at(bytes, 28),
        descriptor_size: header::u64_at(bytes, 36),
        gtes_per_gt: header::u32_at(bytes, 44),
        redundant_gd_offset: header::u64_at(bytes, 48),
        gd_offset: header::u64_at(bytes, 56),
        overhead: header::u64_at(bytes, 64),
        compression: u16::from_le_bytes([bytes[77], bytes[78]]),
    }
}

/// Checks the version and flags a maker is known to write in the header at the start of
/// `bytes`, and whether it has a redundant grain directory (flag bit 1 and an offset). A maker
/// that changes its shape fails here rather than silently testing something else.
#[track_caller]
fn assert_header(bytes: &[u8], version: u32, flags: u32, redundant_gd: bool, what: &str) -> SparseHeader {
    let h = raw_header(bytes);
    assert_eq!((h.version, h.flags), (version, flags), "{what}: version and flags (flags {:#x})", h.flags);
    assert_eq!((h.flags & 2 != 0, h.redundant_gd_offset != 0), (redundant_gd, redundant_gd), "{what}: redundant GD");
    h
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(512), 0);
}

fn embedded_descriptor(create_type: &str, capacity: u64) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{create_type}\"\nRW {capacity} SPARSE \"x.vmdk\"\nddb.adapterType = \"lsilogic\"\n"
    )
}

/// Appends `chunk` as a compressed grain for sector `lba`: `u64 lba, u32 size`, the zlib
/// stream, padding to a sector.
fn push_compressed_grain(out: &mut Vec<u8>, lba: u64, chunk: &[u8], compressor: &mut libdeflater::Compressor) {
    let mut z = vec![0u8; compressor.zlib_compress_bound(chunk.len())];
    let n = compressor.zlib_compress(chunk, &mut z).unwrap();
    out.extend(lba.to_le_bytes());
    out.extend((n as u32).to_le_bytes());
    out.extend(&z[..n]);
    pad(out);
}

/// A sparse extent laid out as qemu-img lays out monolithicSparse (`compressed` false:
/// version 1, flags 0x3) and streamOptimized (version 3, flags 0x30003, deflate), with
/// `grain`-sector grains, which qemu-img itself cannot make: header, embedded descriptor,
/// redundant grain directory and its tables, grain directory and its tables, then from the
/// overhead on the grains with a non-zero byte, in LBA order. Plain grains are stored as far
/// as the capacity reaches (the last may be short); a stream ends with an end-of-stream
/// marker.
fn sparse_shape(data: &[u8], grain: u64, compressed: bool) -> Vec<u8> {
    let grain_bytes = grain as usize * 512;
    let capacity = data.len().div_ceil(512) as u64;
    let grains = data.len().div_ceil(grain_bytes);
    let tables = grains.div_ceil(512);
    let gd_sectors = (tables as u64 * 4).div_ceil(512);
    let table_sectors = tables as u64 * 4;
    let redundant_gd = 21;
    let gd = redundant_gd + gd_sectors + table_sectors;
    let overhead = (gd + gd_sectors + table_sectors).next_multiple_of(128);
    let (version, flags, create_type) =
        if compressed { (3, 0x30003, "streamOptimized") } else { (1, 0x3, "monolithicSparse") };
    let fields = Fields {
        version,
        flags,
        capacity,
        grain,
        descriptor: (1, 20),
        redundant_gd,
        gd,
        overhead,
        compression: u16::from(compressed),
    };
    let mut out = sparse_header(&fields).to_vec();
    out.extend(embedded_descriptor(create_type, capacity).as_bytes());
    out.resize(overhead as usize * 512, 0);
    let mut entries = vec![0u32; tables * 512];
    let mut compressor = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    for (g, chunk) in data.chunks(grain_bytes).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        entries[g] = (out.len() / 512) as u32;
        if compressed {
            push_compressed_grain(&mut out, g as u64 * grain, chunk, &mut compressor);
        } else {
            out.extend(chunk);
            pad(&mut out);
        }
    }
    if compressed {
        out.extend(marker(0, 0));
    }
    for directory in [redundant_gd, gd] {
        let first_table = directory + gd_sectors;
        for (t, table) in entries.chunks(512).enumerate() {
            let table_at = first_table + t as u64 * 4;
            let entry = directory as usize * 512 + t * 4;
            out[entry..entry + 4].copy_from_slice(&(table_at as u32).to_le_bytes());
            for (i, e) in table.iter().enumerate() {
                let at = table_at as usize * 512 + i * 4;
                out[at..at + 4].copy_from_slice(&e.to_le_bytes());
            }
        }
    }
    let what = format!("sparse_shape ({create_type}, {grain}-sector grains)");
    assert_eq!(assert_header(&out, version, flags, true, &what).grain_size, grain);
    out
}

/// A stream in VMware's shape, as VMDKstream writes it but with `grain`-sector grains:
/// grain directory offset -1 in the header, grains in LBA order (the last one short when the
/// data ends mid-grain), a GT marker and table after each table's grains, GD marker and GD,
/// footer marker, footer (with the real GD offset), end-of-stream marker.
fn vmware_shape(data: &[u8], grain: u64) -> Vec<u8> {
    let grain_bytes = grain as usize * 512;
    let capacity = data.len().div_ceil(512) as u64;
    let grains = data.len().div_ceil(grain_bytes);
    let tables = grains.div_ceil(512);
    let mut fields = Fields {
        version: 3,
        flags: 0x30001,
        capacity,
        grain,
        descriptor: (1, 1),
        redundant_gd: 0,
        gd: u64::MAX,
        overhead: 128,
        compression: 1,
    };
    let mut out = sparse_header(&fields).to_vec();
    out.extend(embedded_descriptor("streamOptimized", capacity).replace("RW", "RDONLY").as_bytes());
    out.resize(128 * 512, 0);
    let mut compressor = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    let mut gd = vec![0u32; tables];
    for (t, gd_entry) in gd.iter_mut().enumerate() {
        let mut gt = [0u32; 512];
        for (i, entry) in gt.iter_mut().enumerate() {
            let g = t * 512 + i;
            if g >= grains {
                break;
            }
            let chunk = &data[g * grain_bytes..((g + 1) * grain_bytes).min(data.len())];
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            *entry = (out.len() / 512) as u32;
            push_compressed_grain(&mut out, g as u64 * grain, chunk, &mut compressor);
        }
        if gt.iter().any(|&e| e != 0) {
            out.extend(marker(4, 1));
            *gd_entry = (out.len() / 512) as u32;
            for e in gt {
                out.extend(e.to_le_bytes());
            }
        }
    }
    out.extend(marker((tables * 4).div_ceil(512) as u64, 2));
    fields.gd = (out.len() / 512) as u64;
    for e in gd {
        out.extend(e.to_le_bytes());
    }
    pad(&mut out);
    out.extend(marker(1, 3));
    out.extend(sparse_header(&fields));
    out.extend(marker(0, 0));
    // VMDKstream's header, which this shape stands in for.
    let h = assert_header(&out, 3, 0x30001, false, "vmware_shape");
    assert_eq!((h.gd_offset, h.grain_size, h.compression), (u64::MAX, grain, 1));
    out
}

/// Offsets of the grain markers of a stream, in file order (walks the markers).
fn grain_markers(stream: &[u8]) -> Vec<usize> {
    let header = SparseHeader::parse(stream[..512].try_into().unwrap()).unwrap();
    let gt_bytes = header.gtes_per_gt as usize * 4;
    let gd_bytes = (header.capacity as usize).div_ceil(header.grain_size as usize * header.gtes_per_gt as usize) * 4;
    let mut at = header.overhead as usize * 512;
    let mut out = Vec::new();
    while at + 16 <= stream.len() {
        let size = u32::from_le_bytes(stream[at + 8..at + 12].try_into().unwrap()) as usize;
        if size == 0 {
            match u32::from_le_bytes(stream[at + 12..at + 16].try_into().unwrap()) {
                0 => break,
                1 => at += 512 + gt_bytes,
                2 => at += 512 + gd_bytes,
                _ => at += 1024,
            }
            at = at.next_multiple_of(512);
        } else {
            out.push(at);
            at = (at + 12 + size).next_multiple_of(512);
        }
    }
    out
}

/// Set to 1 to let a test skip the cases that need a tool this machine lacks (only
/// python3-vmdkstream so far) instead of failing.
const ALLOW_MISSING_TOOLS: &str = "HYPER2KVM_ALLOW_MISSING_TOOLS";

/// Converts `raw` with Debian's python3-vmdkstream (`VMDKstream.convert_to_stream`, run by
/// `/usr/bin/python3`, where Debian installs it) and checks the header it writes. A missing
/// module fails the test — `scripts/install-deps.sh` installs it — unless
/// HYPER2KVM_ALLOW_MISSING_TOOLS=1, when this returns false and the caller skips the case.
fn vmdkstream(raw: &Path, out: &Path) -> bool {
    let module = Command::new("/usr/bin/python3").args(["-c", "import VMDKstream"]).output();
    if !module.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match &module {
            Ok(o) => String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").to_owned(),
            Err(e) => format!("/usr/bin/python3 does not run: {e}"),
        };
        if std::env::var(ALLOW_MISSING_TOOLS).as_deref() == Ok("1") {
            eprintln!("python3-vmdkstream is missing ({why}); {ALLOW_MISSING_TOOLS}=1: VMDKstream's output not tested");
            return false;
        }
        panic!(
            "python3-vmdkstream is missing ({why}): apt-get install python3-vmdkstream (make deps does), or set {ALLOW_MISSING_TOOLS}=1 to skip the cases that need it"
        );
    }
    run(
        "/usr/bin/python3",
        &["-c", "import VMDKstream, sys; VMDKstream.convert_to_stream(sys.argv[1], sys.argv[2])", s(raw), s(out)],
    );
    let bytes = std::fs::read(out).unwrap();
    let h = assert_header(&bytes, 3, 0x30001, false, "VMDKstream");
    assert_eq!((h.gd_offset, h.grain_size, h.compression), (u64::MAX, 128, 1), "VMDKstream: VMware's stream shape");
    true
}

/// The version and flags qemu-img writes in the sparse extents of `subformat` (created with
/// `-o extra`); its sparse extents always carry a redundant grain directory. `None` for flat
/// subformats.
fn qemu_header(subformat: &str, extra: &str) -> Option<(u32, u32)> {
    let zeroed = extra.contains("zeroed_grain=on");
    match subformat {
        "monolithicSparse" | "twoGbMaxExtentSparse" if zeroed => Some((2, 0x7)),
        "monolithicSparse" | "twoGbMaxExtentSparse" => Some((1, 0x3)),
        "streamOptimized" => Some((3, 0x30003)),
        _ => None,
    }
}

/// Checks what qemu-img made at `path` (`subformat`, `-o extra`): the header of each sparse
/// extent, or a descriptor for the flat subformats.
#[track_caller]
fn assert_qemu_made(path: &Path, subformat: &str, extra: &str) {
    let bytes = std::fs::read(path).unwrap();
    let what = format!("qemu-img {subformat} {extra}");
    match (subformat, qemu_header(subformat, extra)) {
        ("twoGbMaxExtentSparse", Some((version, flags))) => {
            assert!(bytes.starts_with(b"# Disk DescriptorFile"), "{what}: a descriptor");
            let first = path.with_file_name(format!("{}-s001.vmdk", path.file_stem().unwrap().to_str().unwrap()));
            assert_header(&std::fs::read(first).unwrap(), version, flags, true, &what);
        }
        (_, Some((version, flags))) => {
            let h = assert_header(&bytes, version, flags, true, &what);
            assert_eq!((h.grain_size, h.compression), (128, u16::from(subformat == "streamOptimized")), "{what}");
        }
        (_, None) => assert!(bytes.starts_with(b"# Disk DescriptorFile"), "{what}: a descriptor"),
    }
}

// ---------------------------------------------------------------- the structural checker

/// A 16 MiB raw disk with data in three places, converted by qemu-img to `subformat`.
fn made_by_qemu(dir: &Path, subformat: &str) -> PathBuf {
    let raw = dir.join("disk.raw");
    let mut data = vec![0u8; 16 << 20];
    for (i, b) in data[..(1 << 20)].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    data[(8 << 20)..(9 << 20)].fill(0x5a);
    data[(16 << 20) - 4096..].fill(0xa5);
    std::fs::write(&raw, &data).unwrap();
    let out = dir.join(format!("{subformat}.vmdk"));
    let option = format!("subformat={subformat}");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", "-o", &option, raw.to_str().unwrap(), out.to_str().unwrap()]);
    assert_qemu_made(&out, subformat, "");
    out
}

#[test]
fn accepts_what_qemu_img_writes() {
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["monolithicSparse", "streamOptimized"] {
        let path = made_by_qemu(dir.path(), subformat);
        assert!(is_sparse_extent(&path));
        let summary = check_sparse_file(&path).unwrap_or_else(|e| panic!("{subformat}: {e}"));
        assert_eq!(summary.header.capacity, (16 << 20) / 512);
        // 1 MiB + 1 MiB + 4 KiB of data in 64 KiB grains.
        assert_eq!(summary.allocated_grains, 16 + 16 + 1, "{subformat}");
        assert_eq!(summary.header.compressed(), subformat == "streamOptimized");
    }
}

#[test]
fn a_truncated_extent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["monolithicSparse", "streamOptimized"] {
        let path = made_by_qemu(dir.path(), subformat);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
        let err = check_sparse_file(&path).unwrap_err();
        assert!(matches!(err, VmdkError::PastEnd { .. }), "{subformat}: {err}");
        assert!(err.to_string().contains("truncated or corrupt"));
        // The native reader refuses it too, at open.
        let native = open(&path, &Limits::default()).unwrap_err();
        assert!(matches!(native, ImageError::Corrupt(_)), "{subformat}: {native}");
        assert!(native.to_string().contains("truncated or corrupt"), "{native}");
    }
}

#[test]
fn a_grain_directory_pointing_away_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = made_by_qemu(dir.path(), "monolithicSparse");
    let mut bytes = std::fs::read(&path).unwrap();
    let header = SparseHeader::parse(bytes[..512].try_into().unwrap()).unwrap();
    let gd = (header.gd_offset * 512) as usize;
    bytes[gd..gd + 4].fill(0xff);
    let err = check_sparse(bytes.as_slice(), bytes.len() as u64).unwrap_err();
    assert!(matches!(&err, VmdkError::PastEnd { what, .. } if what == "grain table 0"), "{err}");
}

#[test]
fn bad_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = made_by_qemu(dir.path(), "monolithicSparse");
    let good = std::fs::read(&path).unwrap();
    let corrupt = |at: usize, value: &[u8]| {
        let mut b = good.clone();
        b[at..at + value.len()].copy_from_slice(value);
        check_sparse(b.as_slice(), b.len() as u64).unwrap_err()
    };
    assert_eq!(corrupt(0, b"XXXX"), VmdkError::BadMagic);
    assert_eq!(corrupt(4, &9u32.to_le_bytes()), VmdkError::BadVersion(9));
    assert!(matches!(corrupt(20, &100u64.to_le_bytes()), VmdkError::BadField { field: "grain size", .. }));
    assert!(matches!(corrupt(44, &0u32.to_le_bytes()), VmdkError::BadField { .. }));
    assert!(matches!(corrupt(12, &u64::MAX.to_le_bytes()), VmdkError::BadField { field: "capacity", .. }));
    assert_eq!(check_sparse(&good[..100], 100).unwrap_err(), VmdkError::TooShort { len: 100 });
    // The native reader says the same in its own words.
    let mut b = good.clone();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    expect_kind(open_bytes(b, &Limits::default()), "unsupported", &["version 9"]);
    let mut b = good.clone();
    b[20..28].copy_from_slice(&100u64.to_le_bytes());
    expect_kind(open_bytes(b, &Limits::default()), "corrupt", &["grain size"]);
    expect_kind(open_bytes(good[..100].to_vec(), &Limits::default()), "corrupt", &["too short"]);
}

/// A VMware-shaped stream: grain directory offset -1 in the header, the real one in a footer
/// at EOF-1024, one compressed grain.
fn vmware_stream() -> Vec<u8> {
    let mut header = [0u8; 512];
    header[0..4].copy_from_slice(b"KDMV");
    header[4..8].copy_from_slice(&3u32.to_le_bytes());
    header[8..12].copy_from_slice(&(FLAG_COMPRESSED | 1 << 17).to_le_bytes());
    header[12..20].copy_from_slice(&256u64.to_le_bytes()); // 128 KiB
    header[20..28].copy_from_slice(&128u64.to_le_bytes());
    header[44..48].copy_from_slice(&512u32.to_le_bytes());
    header[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut file = header.to_vec();
    // Sector 1: grain marker for LBA 0 with 20 bytes of "compressed" data.
    let mut grain = vec![0u8; 512];
    grain[8..12].copy_from_slice(&20u32.to_le_bytes());
    file.extend(&grain);
    // Sector 2: the grain table; sector 3: the grain directory.
    let mut gt = vec![0u8; 2048];
    gt[0..4].copy_from_slice(&1u32.to_le_bytes());
    file.extend(&gt);
    let mut gd = vec![0u8; 512];
    gd[0..4].copy_from_slice(&2u32.to_le_bytes());
    file.extend(&gd);
    let gd_sector = (file.len() as u64 / 512) - 1;
    let mut footer = header;
    footer[56..64].copy_from_slice(&gd_sector.to_le_bytes());
    file.extend([0u8; 512]); // footer marker
    file.extend(footer);
    file.extend([0u8; 512]); // end-of-stream marker
    file
}

#[test]
fn reads_the_grain_directory_from_the_footer() {
    let file = vmware_stream();
    let summary = check_sparse(file.as_slice(), file.len() as u64).unwrap();
    assert_eq!(summary.allocated_grains, 1);
    let mut cut = file.clone();
    cut.truncate(file.len() - 512);
    assert!(check_sparse(cut.as_slice(), cut.len() as u64).is_err(), "a stream without its footer is refused");
}

#[test]
fn an_oversized_grain_marker_is_refused() {
    let mut file = vmware_stream();
    file[512 + 8..512 + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(check_sparse(file.as_slice(), file.len() as u64), Err(VmdkError::BadGrainMarker { .. })));
}

// ---------------------------------------------------------------- what qemu-img writes

#[test]
fn every_qemu_subformat_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(16 * MIB);
    let raw = write_file(&dir.path().join("disk.raw"), &data);
    for subformat in ["monolithicSparse", "monolithicFlat", "streamOptimized"] {
        let vmdk = convert(dir.path(), &raw, subformat, "");
        let expected = std::fs::read(oracle(&vmdk)).unwrap();
        assert_same(&expected, &data, &format!("{subformat}: qemu-img itself"));
        let image = open(&vmdk, &Limits::default()).unwrap_or_else(|e| panic!("{subformat}: {e}"));
        let allocated = verify(&image, &expected, subformat);
        // Flat data and plain grains are stored verbatim; compressed grains are not.
        let plain = check_plain_runs(&image, &expected, subformat);
        assert_eq!(plain, if subformat == "streamOptimized" { 0 } else { allocated }, "{subformat}: plain runs");
        let info = image.info();
        assert_eq!(info.format, "vmdk");
        assert_eq!(info.subformat.as_deref(), Some(subformat));
        assert_eq!(info.virtual_size, 16 * MIB as u64);
        assert_eq!(image.allocated_bytes(), Some(allocated));
        assert_eq!(info.ddb.get("ddb.adapterType").map(String::as_str), Some("ide"), "{subformat}");
        assert!(info.chain.is_empty());
        if subformat == "monolithicFlat" {
            assert_eq!(info.referenced_files, vec![dir.path().join("monolithicFlat-flat.vmdk")]);
            // Holes of the flat file are not allocated (the filesystem knows them).
            assert!(image.allocated(10 * MIB as u64..11 * MIB as u64).unwrap().is_empty());
        } else {
            assert!(info.referenced_files.is_empty(), "{:?}", info.referenced_files);
            // Exactly the grains with data: unallocated grains are not reported.
            assert_eq!(allocated, nonzero_grain_bytes(&data), "{subformat}");
        }
        // The same file through the stream opener (an OVA member), read in place.
        if subformat != "monolithicFlat" {
            let bytes = std::fs::read(&vmdk).unwrap();
            let mut container = vec![0x77u8; 1536];
            container.extend(&bytes);
            container.extend([0x77u8; 1000]);
            let container_path = write_file(&dir.path().join(format!("{subformat}.container")), &container);
            let slice = Slice::new(Arc::new(container), 1536, bytes.len() as u64).unwrap();
            let image = open_stream(Arc::new(slice), "member.vmdk", &Limits::default()).unwrap();
            assert_same(&read_all(&image, MIB), &expected, &format!("{subformat} via open_stream"));
            assert_eq!(image.info().subformat.as_deref(), Some(subformat));
            assert!(image.plain_runs(0..image.size()).unwrap().is_empty(), "bytes in memory are no file's");
            // A member of a file on disk: its plain grains are runs of the container file.
            let file = Arc::new(FileSource::open(&container_path).unwrap());
            let slice = Slice::new(file, 1536, bytes.len() as u64).unwrap();
            let image = open_stream(Arc::new(slice), "member.vmdk", &Limits::default()).unwrap();
            let plain = check_plain_runs(&image, &expected, &format!("{subformat} in a container file"));
            assert_eq!(plain, if subformat == "streamOptimized" { 0 } else { allocated }, "{subformat} member");
        }
    }
}

#[test]
fn stream_grains_are_checked_and_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(16 * MIB);
    let raw = write_file(&dir.path().join("disk.raw"), &data);
    let vmdk = convert(dir.path(), &raw, "streamOptimized", "");
    let bytes = std::fs::read(&vmdk).unwrap();
    // qemu-img's shape has no metadata markers but zero padding, which reads as end of stream.
    let map = scan_stream_markers(bytes.as_slice(), &Limits::default()).unwrap();
    assert_eq!(map.grains * GRAIN as u64, nonzero_grain_bytes(&data));
    assert!(map.descriptor.as_deref().unwrap().contains("streamOptimized"));
    let markers = grain_markers(&bytes);
    let offsets: Vec<u64> = map.grain_offsets().map(|(_, at)| at).collect();
    assert_eq!(offsets, markers.iter().map(|&m| m as u64).collect::<Vec<_>>());
    // A sequential conversion from the stream gives the disk.
    let mut rebuilt = vec![0u8; data.len()];
    read_stream_sequential(bytes.as_slice(), &Limits::default(), |at, grain| {
        rebuilt[at as usize..at as usize + grain.len()].copy_from_slice(grain);
        Ok(())
    })
    .unwrap();
    assert_same(&rebuilt, &data, "read_stream_sequential");
    // Random grains compress to more than a grain.
    let first = markers[0];
    let size = u32::from_le_bytes(bytes[first + 8..first + 12].try_into().unwrap());
    assert!(size as usize > GRAIN, "incompressible grain stored in {size} bytes");
}

/// A source that counts its reads.
struct Counting {
    inner: Vec<u8>,
    reads: std::sync::atomic::AtomicUsize,
}

impl crate::image::ReadAt for Counting {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_exact_at(buf, offset)
    }

    fn len(&self) -> u64 {
        self.inner.len() as u64
    }
}

#[test]
fn a_chunk_of_adjacent_grains_is_one_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(16 * MIB);
    let raw = write_file(&dir.path().join("disk.raw"), &data);
    let shapes = [
        ("qemu stream", std::fs::read(convert(dir.path(), &raw, "streamOptimized", "")).unwrap()),
        ("VMware stream", vmware_shape(&data, 128)),
        ("monolithicSparse", std::fs::read(convert(dir.path(), &raw, "monolithicSparse", "")).unwrap()),
    ];
    for (what, bytes) in shapes {
        let source = Arc::new(Counting { inner: bytes, reads: Default::default() });
        let image = open_stream(source.clone(), what, &Limits::default()).unwrap();
        let reads = || source.reads.load(std::sync::atomic::Ordering::Relaxed);
        // 1 MiB of data grains (16), 4 MiB with 1 MiB of data, the 0x5a MiB unaligned.
        for (at, len) in [(0, MIB), (6 * MIB, 4 * MIB), (8 * MIB + 1000, MIB - 2000)] {
            let before = reads();
            let mut buf = vec![0u8; len];
            image.read_at(at as u64, &mut buf).unwrap();
            assert_same(&buf, &data[at..at + len], what);
            assert_eq!(reads() - before, 1, "{what}: one read for the grains of {len} bytes at {at}");
        }
        // Nothing allocated: no read at all.
        let before = reads();
        image.read_at(10 * MIB as u64, &mut vec![0u8; MIB]).unwrap();
        assert_eq!(reads(), before, "{what}");
    }
}

#[test]
fn two_gb_extents_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // 4 GiB + 1 MiB, sparse: three extents; data across the 2 GiB extent boundary.
    let raw = dir.path().join("big.raw");
    let file = File::create(&raw).unwrap();
    file.set_len((4u64 << 30) + MIB as u64).unwrap();
    let data = pattern(16 * MIB);
    file.write_all_at(&data[..MIB], 0).unwrap();
    file.write_all_at(&data[8 * MIB..9 * MIB], (2u64 << 30) - 300_000).unwrap();
    file.write_all_at(&data[..MIB], 4u64 << 30).unwrap();
    drop(file);
    for subformat in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let vmdk = convert(dir.path(), &raw, subformat, "");
        let image = open(&vmdk, &Limits::default()).unwrap_or_else(|e| panic!("{subformat}: {e}"));
        let info = image.info();
        assert_eq!(info.subformat.as_deref(), Some(subformat));
        assert_eq!(info.referenced_files.len(), 3, "{:?}", info.referenced_files);
        let allocated = verify_large(&image, &oracle(&vmdk), 97, subformat);
        if subformat == "twoGbMaxExtentSparse" {
            assert_eq!(allocated, 3 * MIB as u64 + GRAIN as u64, "{subformat}: grains with data only");
        }
        // A read across the extent boundary.
        let mut buf = vec![0u8; 600_000];
        image.read_at((2u64 << 30) - 300_000, &mut buf).unwrap();
        assert_same(
            &buf,
            &data[8 * MIB..8 * MIB + 600_000]
                .iter()
                .enumerate()
                .map(|(i, &b)| if i < MIB { b } else { 0 })
                .collect::<Vec<_>>(),
            "boundary",
        );
    }
}

/// A zeroed-grain disk made by qemu-img, a delta of it and a delta of the delta.
struct ZeroedChain {
    /// `pattern(16 MiB)` with 256 KiB of zeroed grains (GT entry 1) at 8 MiB.
    base: PathBuf,
    /// What `base` reads as.
    base_bytes: Vec<u8>,
    /// New data at 2 MiB, and a zeroed grain at 0 hiding the base's data.
    child: PathBuf,
    /// New data at 5 MiB and 2500 KiB.
    grandchild: PathBuf,
}

fn zeroed_chain(d: &Path) -> ZeroedChain {
    let data = pattern(16 * MIB);
    let raw = write_file(&d.join("disk.raw"), &data);
    let base = convert(d, &raw, "monolithicSparse", "zeroed_grain=on");
    run("qemu-io", &["-f", "vmdk", "-c", "write -z 8M 256k", s(&base)]);
    let mut base_bytes = data;
    base_bytes[8 * MIB..8 * MIB + (256 << 10)].fill(0);
    let child = d.join("child.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", s(&base), "-F", "vmdk", s(&child)]);
    run("qemu-io", &["-f", "vmdk", "-c", "write -P 0x44 2M 1M", "-c", "write -z 0 64k", s(&child)]);
    let grandchild = d.join("grandchild.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", "-b", "child.vmdk", "-F", "vmdk", s(&grandchild)]);
    run("qemu-io", &["-f", "vmdk", "-c", "write -P 0x55 5M 64k", "-c", "write -P 0x66 2500k 4k", s(&grandchild)]);
    // Zeroed grains need version 2 and flag bit 2: qemu-img sets both only when asked.
    assert_qemu_made(&base, "monolithicSparse", "zeroed_grain=on");
    assert_qemu_made(&child, "monolithicSparse", "zeroed_grain=on");
    assert_qemu_made(&grandchild, "monolithicSparse", "");
    ZeroedChain { base, base_bytes, child, grandchild }
}

#[test]
fn zeroed_grains_and_delta_chains_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ZeroedChain { base, base_bytes: expected, child, grandchild } = zeroed_chain(d);
    let image = open(&base, &Limits::default()).unwrap();
    assert_same(&std::fs::read(oracle(&base)).unwrap(), &expected, "qemu on zeroed grains");
    let allocated = verify(&image, &expected, "zeroed grains");
    assert_eq!(allocated, nonzero_grain_bytes(&expected), "zeroed grains are not allocated");

    for (top, layers) in [(&child, 2), (&grandchild, 3)] {
        let expected = std::fs::read(oracle(top)).unwrap();
        let image = open(top, &Limits::default()).unwrap();
        let allocated = verify(&image, &expected, s(top));
        assert_eq!(
            allocated,
            nonzero_grain_bytes(&expected),
            "{}: parent data counts, zeroed child grains do not",
            s(top)
        );
        assert!(image.allocated(0..GRAIN as u64).unwrap().is_empty(), "a zeroed grain hides the parent");
        let info = image.info();
        assert_eq!(info.chain.len(), layers);
        assert_eq!(info.chain[0], *top);
        assert_eq!(*info.chain.last().unwrap(), base);
        assert_eq!(info.referenced_files.len(), layers - 1, "{:?}", info.referenced_files);
        assert!(image.parent().is_some());
    }
    assert_eq!(read_all(&open(&grandchild, &Limits::default()).unwrap(), MIB)[2500 << 10], 0x66);
    // A delta cannot be read alone.
    let bytes = std::fs::read(&child).unwrap();
    expect_kind(open_bytes(bytes, &Limits::default()), "unsupported", &["delta disk", "parent"]);
    // The parent changed after the delta was taken: refused, naming both files.
    let mut parent = std::fs::read(&base).unwrap();
    // qemu writes the CID with %x: it may have fewer than 8 digits.
    let at = parent.windows(5).position(|w| w == b"\nCID=").unwrap() + 5;
    let digits = parent[at..].iter().position(|&b| b == b'\n').unwrap();
    let other = "0badc0de"[8 - digits..].to_owned();
    parent[at..at + digits].copy_from_slice(other.as_bytes());
    std::fs::write(&base, &parent).unwrap();
    let shown = format!("{:08x}", u32::from_str_radix(&other, 16).unwrap());
    expect_corrupt(open(&child, &Limits::default()), &["child.vmdk", "parentCID", &shown, s(&base)]);
    // A missing parent.
    std::fs::remove_file(&base).unwrap();
    expect_kind(open(&child, &Limits::default()), "io", &["monolithicSparse-x.vmdk", "missing"]);
}

// ---------------------------------------------------------------- VMware's stream shape

#[test]
fn vmware_shaped_streams_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(16 * MIB);
    let raw = write_file(&dir.path().join("disk.raw"), &data);
    let mut streams = vec![("writer here", write_file(&dir.path().join("shape.vmdk"), &vmware_shape(&data, 128)))];
    let made = dir.path().join("vmdkstream.vmdk");
    if vmdkstream(&raw, &made) {
        streams.push(("VMDKstream", made));
    }
    for (who, path) in streams {
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[56..64], &[0xff; 8], "{who}: GD offset -1 in the header");
        let expected = std::fs::read(oracle(&path)).unwrap();
        assert_same(&expected, &data, &format!("{who}: qemu-img itself"));
        let image = open(&path, &Limits::default()).unwrap();
        assert!(!image.rebuilt_from_markers());
        let allocated = verify(&image, &expected, who);
        assert_eq!(allocated, nonzero_grain_bytes(&data), "{who}");
        assert_eq!(image.info().subformat.as_deref(), Some("streamOptimized"));
        // One pass over the markers finds the grains the footer's tables point at.
        let map = scan_stream_markers(File::open(&path).unwrap(), &Limits::default()).unwrap();
        assert_eq!(map.stream_bytes, bytes.len() as u64, "{who}: up to the end-of-stream marker");
        assert!(map.footer.is_some_and(|f| f.gd_offset != u64::MAX));
        let offsets: Vec<u64> = map.grain_offsets().map(|(_, at)| at).collect();
        assert_eq!(offsets, grain_markers(&bytes).iter().map(|&m| m as u64).collect::<Vec<_>>(), "{who}");

        // A damaged footer: the grain map is rebuilt from the markers.
        let mut damaged = bytes.clone();
        let footer = damaged.len() - 1024;
        damaged[footer..footer + 4].copy_from_slice(b"XXXX");
        let image = open_bytes(damaged.clone(), &Limits::default()).unwrap();
        assert!(image.rebuilt_from_markers(), "{who}");
        assert_same(&read_all(&image, MIB), &data, &format!("{who}: footer rebuilt from markers"));
        assert_eq!(check_allocated(&image, &data, who), nonzero_grain_bytes(&data));

        // A footer that parses but points at a grain directory of garbage: rebuilt too.
        let mut damaged = bytes.clone();
        let gd = u64::from_le_bytes(damaged[footer + 56..footer + 64].try_into().unwrap()) as usize * 512;
        damaged[gd..gd + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let image = open_bytes(damaged, &Limits::default()).unwrap();
        assert!(image.rebuilt_from_markers(), "{who}");
        assert_same(&read_all(&image, MIB), &data, &format!("{who}: damaged grain directory"));

        // Truncated: no footer, and the markers end before the end-of-stream marker.
        let cut = bytes[..bytes.len() * 2 / 3].to_vec();
        expect_corrupt(open_bytes(cut.clone(), &Limits::default()), &["truncated", "footer"]);
        expect_corrupt(scan_stream_markers(cut.as_slice(), &Limits::default()), &["truncated"]);
    }
}

#[test]
fn a_short_last_grain_reads_as_written() {
    // VMDKstream compresses the last, partial grain as it is: qemu refuses to read it (it
    // wants whole grains); the rest of the grain reads as zeros here.
    let dir = tempfile::tempdir().unwrap();
    let mut data = pattern(16 * MIB);
    data.truncate(3 * MIB + 1000);
    data[3 * MIB..].fill(0x42);
    let mut expected = data.clone();
    expected.resize(data.len().next_multiple_of(512), 0);
    let raw = write_file(&dir.path().join("odd.raw"), &data);
    let mut streams = vec![("writer here", vmware_shape(&data, 128))];
    let made = dir.path().join("odd.vmdk");
    if vmdkstream(&raw, &made) {
        streams.push(("VMDKstream", std::fs::read(&made).unwrap()));
    }
    for (who, bytes) in streams {
        let image = open_bytes(bytes.clone(), &Limits::default()).unwrap();
        assert_eq!(image.size(), expected.len() as u64);
        assert_same(&read_all(&image, 100_000), &expected, who);
        let mut rebuilt = vec![0u8; expected.len()];
        read_stream_sequential(bytes.as_slice(), &Limits::default(), |at, grain| {
            rebuilt[at as usize..at as usize + grain.len()].copy_from_slice(grain);
            Ok(())
        })
        .unwrap();
        assert_same(&rebuilt, &expected, who);
    }
}

#[test]
fn real_vmware_files_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vmware");
    for (file, size) in [("blank.vmdk", 512u64 << 20), ("input.vmdk", 1 << 30), ("ubuntu.2.0-disk1.vmdk", 8 << 30)] {
        let path = data.join(file);
        let image = open(&path, &Limits::default()).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(image.size(), size, "{file}");
        let info = image.info();
        assert_eq!(info.subformat.as_deref(), Some("streamOptimized"));
        assert_eq!(image.allocated_bytes(), Some(0), "{file}: no grain holds data");
        assert_eq!(
            info.ddb.get("ddb.adapterType").map(String::as_str),
            if file.starts_with("ubuntu") { Some("ide") } else { Some("lsilogic") }
        );
        let copy = dir.path().join(file);
        std::fs::copy(&path, &copy).unwrap();
        assert_eq!(verify_large(&image, &oracle(&copy), 16, file), 0);
        let map = scan_stream_markers(File::open(&path).unwrap(), &Limits::default()).unwrap();
        assert_eq!((map.grains, map.stream_bytes), (0, std::fs::metadata(&path).unwrap().len()), "{file}");
        let member = open_stream(Arc::new(FileSource::open(&path).unwrap()), file, &Limits::default()).unwrap();
        assert_eq!(member.size(), size);
    }
}

// ---------------------------------------------------------------- hand-written descriptors

#[test]
fn a_zero_extent_in_the_middle_shifts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = pattern(16 * MIB);
    // A flat file read from an offset, a ZERO extent, a flat file whose name has spaces
    // (unquoted), a sparse extent made by qemu-img, a VMFS extent.
    write_file(&d.join("a.bin"), &data[..3 * MIB]);
    write_file(&d.join("my disk part.bin"), &data[8 * MIB..10 * MIB]);
    let small = write_file(&d.join("small.raw"), &data[..2 * MIB]);
    let sparse = convert(d, &small, "monolithicSparse", "");
    write_file(&d.join("tail.bin"), &data[15 * MIB..]);
    let descriptor = format!(
        "# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType=\"custom\"\r\n\r\n# Extent description\r\nRW 4096 FLAT \"a.bin\" 2048\r\nRW 2048 ZERO\r\nRDONLY 4096 FLAT my disk part.bin 0\r\nRW 4096 SPARSE \"{}\"\r\nRW 2048 VMFS \"tail.bin\"\r\n\r\nddb.adapterType = lsilogic\r\nddb.uuid = \"60 00 C2 9a\"\r\n",
        sparse.file_name().unwrap().to_str().unwrap()
    );
    let path = write_file(&d.join("disk.vmdk"), descriptor.as_bytes());
    let mut expected = Vec::new();
    expected.extend(&data[MIB..3 * MIB]);
    expected.extend(vec![0u8; MIB]);
    expected.extend(&data[8 * MIB..10 * MIB]);
    expected.extend(&data[..2 * MIB]);
    expected.extend(&data[15 * MIB..]);
    let image = open(&path, &Limits::default()).unwrap();
    verify(&image, &expected, "hand-written descriptor");
    assert!(image.allocated(2 * MIB as u64..3 * MIB as u64).unwrap().is_empty(), "the ZERO extent is not allocated");
    let info = image.info();
    assert_eq!(info.subformat.as_deref(), Some("custom"));
    assert_eq!(info.ddb.get("ddb.uuid").map(String::as_str), Some("60 00 C2 9a"));
    assert_eq!(info.ddb.get("ddb.adapterType").map(String::as_str), Some("lsilogic"));
    assert_eq!(
        info.referenced_files,
        ["a.bin", "my disk part.bin", sparse.file_name().unwrap().to_str().unwrap(), "tail.bin"]
            .map(|f| d.join(f))
            .to_vec()
    );
}

/// A descriptor as ESXi writes one for a thin disk — `createType` as given, one VMFS extent,
/// `ddb.thinProvisioned = "1"` — over `{name}-flat.vmdk`, which is sparse as a thin disk's
/// flat file is on VMFS: only the 64 KiB pieces of `pattern(16 MiB)` holding data are
/// written. Returns the descriptor and the disk's bytes.
fn vmfs_disk(d: &Path, name: &str, create_type: &str) -> (PathBuf, Vec<u8>) {
    let data = pattern(16 * MIB);
    let file = File::create(d.join(format!("{name}-flat.vmdk"))).unwrap();
    file.set_len(data.len() as u64).unwrap();
    for (i, piece) in data.chunks(GRAIN).enumerate() {
        if piece.iter().any(|&b| b != 0) {
            file.write_all_at(piece, (i * GRAIN) as u64).unwrap();
        }
    }
    let sectors = data.len() / 512;
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=4f2c1d3e\nparentCID=ffffffff\nisNativeSnapshot=\"no\"\ncreateType=\"{create_type}\"\n\n# Extent description\nRW {sectors} VMFS \"{name}-flat.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.geometry.cylinders = \"2\"\nddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\nddb.longContentID = \"8a8b1b5e0c5e0e0d4f2c1d3efffffffe\"\nddb.thinProvisioned = \"1\"\nddb.uuid = \"60 00 C2 9f 3a 51 7b 0e-8d 2c 44 19 a0 6b 5e 12\"\nddb.virtualHWVersion = \"13\"\n"
    );
    (write_file(&d.join(format!("{name}.vmdk")), text.as_bytes()), data)
}

#[test]
fn a_vmfs_thin_descriptor_reads_its_flat_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (thin, expected) = vmfs_disk(d, "thin", "vmfsThin");
    let image = open(&thin, &Limits::default()).unwrap();
    let allocated = verify(&image, &expected, "vmfsThin");
    assert_eq!(allocated, nonzero_grain_bytes(&expected), "the holes of the flat file are not allocated");
    assert_eq!(check_plain_runs(&image, &expected, "vmfsThin"), allocated, "flat data is stored verbatim");
    let info = image.info();
    assert_eq!(info.subformat.as_deref(), Some("vmfsThin"));
    assert_eq!(info.virtual_size, expected.len() as u64);
    assert_eq!(info.ddb.get("ddb.thinProvisioned").map(String::as_str), Some("1"));
    assert_eq!(info.ddb.get("ddb.adapterType").map(String::as_str), Some("lsilogic"));
    assert_eq!(info.referenced_files, vec![d.join("thin-flat.vmdk")]);
    assert!(info.chain.is_empty());
    // qemu-img refuses createType vmfsThin ("Unsupported image type"); it reads the same
    // descriptor as createType vmfs, which shows the fixture means what `expected` says.
    let text = std::fs::read_to_string(&thin).unwrap();
    let twin = write_file(&d.join("twin.vmdk"), text.replace("\"vmfsThin\"", "\"vmfs\"").as_bytes());
    assert_same(&std::fs::read(oracle(&twin)).unwrap(), &expected, "qemu-img on the vmfs twin");
}

/// A delta descriptor over a ZERO extent.
fn delta_descriptor(cid: u32, parent: Option<(&str, u32)>) -> String {
    let (parent_cid, hint) = match parent {
        Some((name, cid)) => (format!("{cid:08x}"), format!("parentFileNameHint=\"{name}\"\n")),
        None => ("ffffffff".into(), String::new()),
    };
    format!("# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID={parent_cid}\ncreateType=\"monolithicFlat\"\n{hint}RW 2048 ZERO\n")
}

#[test]
fn chain_loops_and_deep_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // d0 → d1 → … → d5 (d5 has no parent).
    for i in 0..6u32 {
        let parent = (i < 5).then(|| format!("d{}.vmdk", i + 1));
        write_file(
            &d.join(format!("d{i}.vmdk")),
            delta_descriptor(i + 1, parent.as_deref().map(|p| (p, i + 2))).as_bytes(),
        );
    }
    let image = open(&d.join("d0.vmdk"), &Limits::default()).unwrap();
    assert_eq!(image.info().chain.len(), 6);
    expect_kind(
        open(&d.join("d0.vmdk"), &Limits { max_chain_depth: 4, ..Limits::default() }),
        "limit",
        &["deeper than 4", "d0.vmdk → d1.vmdk"],
    );
    // A loop: a → b → a.
    write_file(&d.join("a.vmdk"), delta_descriptor(1, Some(("b.vmdk", 2))).as_bytes());
    write_file(&d.join("b.vmdk"), delta_descriptor(2, Some(("./a.vmdk", 1))).as_bytes());
    expect_corrupt(open(&d.join("a.vmdk"), &Limits::default()), &["loops", "a.vmdk → b.vmdk → a.vmdk"]);
    // A disk that is its own parent.
    write_file(&d.join("self.vmdk"), delta_descriptor(1, Some(("self.vmdk", 1))).as_bytes());
    expect_corrupt(open(&d.join("self.vmdk"), &Limits::default()), &["loops"]);
    // An absolute hint from another machine: the file next to the child is used.
    write_file(&d.join("c.vmdk"), delta_descriptor(7, Some(("/vmfs/volumes/ds1/vm/d5.vmdk", 6))).as_bytes());
    assert_eq!(open(&d.join("c.vmdk"), &Limits::default()).unwrap().info().chain[1], d.join("d5.vmdk"));
    // parentCID without a hint.
    write_file(
        &d.join("orphan.vmdk"),
        delta_descriptor(1, None).replace("parentCID=ffffffff", "parentCID=00000002").as_bytes(),
    );
    expect_corrupt(open(&d.join("orphan.vmdk"), &Limits::default()), &["no parentFileNameHint"]);
}

#[test]
fn bad_descriptors_are_refused_each_in_its_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_file(&d.join("f.bin"), &[1u8; 4096]);
    let with = |name: &str, extent: &str| {
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"vmfs\"\n{extent}\n"
        );
        write_file(&d.join(name), text.as_bytes())
    };
    let limits = Limits::default();
    expect_kind(
        open(&with("rdm.vmdk", "RW 8 VMFSRDM \"f.bin\""), &limits),
        "unsupported",
        &["device-backed", "export the disk as a file"],
    );
    expect_kind(open(&with("raw.vmdk", "RW 8 VMFSRAW \"f.bin\""), &limits), "unsupported", &["device-backed"]);
    expect_kind(open(&with("dev.vmdk", "RW 8 FLAT \"/dev/null\""), &limits), "unsupported", &["device"]);
    expect_kind(open(&with("cowd.vmdk", "RW 8 VMFSSPARSE \"f.bin\""), &limits), "unsupported", &["VMFSSPARSE"]);
    expect_kind(open(&with("se.vmdk", "RW 8 SESPARSE \"f.bin\""), &limits), "unsupported", &["SESPARSE"]);
    expect_kind(open(&with("noaccess.vmdk", "NOACCESS 8 FLAT \"f.bin\""), &limits), "unsupported", &["NOACCESS"]);
    expect_corrupt(
        open(&with("count.vmdk", "RW lots FLAT \"f.bin\""), &limits),
        &["line 6", "not a valid extent line", "`lots`"],
    );
    expect_corrupt(open(&with("type.vmdk", "RW 8 WEIRD \"f.bin\""), &limits), &["unknown extent type `WEIRD`"]);
    expect_corrupt(open(&with("quote.vmdk", "RW 8 FLAT \"f.bin"), &limits), &["no closing quote"]);
    expect_corrupt(open(&with("short.vmdk", "RW 16 FLAT \"f.bin\""), &limits), &["f.bin", "4096 bytes", "truncated"]);
    expect_corrupt(open(&with("none.vmdk", ""), &limits), &["lists no extents"]);
    expect_corrupt(open(&with("notsparse.vmdk", "RW 8 SPARSE \"f.bin\""), &limits), &["not a sparse extent"]);
    expect_kind(open(&with("missing.vmdk", "RW 8 FLAT \"nope.bin\""), &limits), "io", &["nope.bin"]);
    // Too large a descriptor.
    let huge =
        format!("# Disk DescriptorFile\ncreateType=\"vmfs\"\n{}RW 8 FLAT \"f.bin\"\n", "# padding\n".repeat(7000));
    expect_kind(open(&write_file(&d.join("huge.vmdk"), huge.as_bytes()), &limits), "limit", &["max_descriptor_bytes"]);
    // Too many extents.
    let many = format!("# Disk DescriptorFile\ncreateType=\"vmfs\"\n{}", "RW 1 FLAT \"f.bin\"\n".repeat(20));
    expect_kind(
        open(&write_file(&d.join("many.vmdk"), many.as_bytes()), &Limits { max_extents: 10, ..Limits::default() }),
        "limit",
        &["more than 10 extents"],
    );
    // Neither a descriptor nor an extent.
    expect_corrupt(open(&d.join("f.bin"), &limits), &["neither a VMDK descriptor nor a sparse VMDK extent"]);
    // A descriptor given to the stream opener.
    let text = std::fs::read(d.join("rdm.vmdk")).unwrap();
    expect_kind(open_bytes(text, &limits), "unsupported", &["descriptor"]);
}

// ---------------------------------------------------------------- grains other than 64 KiB

/// Grains of 16, 256 and 2048 sectors (qemu-img writes only 128), in each layout: plain
/// grains, qemu-img's stream shape and VMware's. Each reads as qemu-img reads it, with every
/// grain accounted for, and converts to a clean qcow2 equal to the source.
#[test]
fn other_grain_sizes_read_and_convert_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = pattern(16 * MIB);
    // For plain grains, a capacity ending inside the last grain of every size tested, which
    // sparse_shape stores only as far as the capacity reaches.
    let mut odd = data.clone();
    odd.extend([0x77u8; 2560]);
    for grain in [16u64, 256, 2048] {
        let grain_bytes = grain as usize * 512;
        let shapes = [
            ("sparse", &odd, sparse_shape(&odd, grain, false)),
            ("qemu-stream", &data, sparse_shape(&data, grain, true)),
            ("vmware-stream", &data, vmware_shape(&data, grain)),
        ];
        for (shape, data, bytes) in shapes {
            let what = format!("{shape}-{grain}");
            let grains = nonzero_chunks(data, grain_bytes);
            let summary = check_sparse(bytes.as_slice(), bytes.len() as u64).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(summary.allocated_grains, grains, "{what}: the checker's count");
            let path = write_file(&d.join(format!("{what}.vmdk")), &bytes);
            assert_same(&std::fs::read(oracle(&path)).unwrap(), data, &format!("{what}: qemu-img itself"));
            let image = open(&path, &Limits::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let allocated = verify(&image, data, &what);
            assert_eq!(allocated, nonzero_bytes_in(data, grain_bytes), "{what}: exactly the grains with data");
            let plain = check_plain_runs(&image, data, &what);
            assert_eq!(plain, if shape == "sparse" { allocated } else { 0 }, "{what}: plain runs");
            if shape != "sparse" {
                let map = scan_stream_markers(bytes.as_slice(), &Limits::default()).unwrap();
                assert_eq!(map.grains, grains, "{what}: grains scanned");
                let offsets: Vec<u64> = map.grain_offsets().map(|(_, at)| at).collect();
                assert_eq!(offsets, grain_markers(&bytes).iter().map(|&m| m as u64).collect::<Vec<_>>(), "{what}");
                let mut rebuilt = vec![0u8; data.len()];
                read_stream_sequential(bytes.as_slice(), &Limits::default(), |at, piece| {
                    assert_eq!(piece.len(), grain_bytes, "{what}: one grain at a time");
                    rebuilt[at as usize..at as usize + piece.len()].copy_from_slice(piece);
                    Ok(())
                })
                .unwrap();
                assert_same(&rebuilt, data, &format!("{what}: read_stream_sequential"));
            }
            convert_to_qcow2(&image, d, &what, &path, "vmdk", nonzero_chunks(data, GRAIN));
        }
    }
}

/// The specification wants grains of more than 8 sectors. qemu-img reads smaller ones, but
/// no tool writes them: such a header is damaged, and the checker, the reader and the
/// one-pass scan all refuse it, saying why.
#[test]
fn grains_of_8_sectors_or_fewer_are_refused() {
    let mut data = pattern(16 * MIB);
    data.truncate(MIB);
    for grain in [8u64, 4, 2, 1] {
        let shapes = [
            ("sparse", sparse_shape(&data, grain, false)),
            ("qemu-stream", sparse_shape(&data, grain, true)),
            ("vmware-stream", vmware_shape(&data, grain)),
        ];
        for (shape, bytes) in shapes {
            let what = format!("{shape}-{grain}");
            let err = check_sparse(bytes.as_slice(), bytes.len() as u64).unwrap_err();
            assert!(
                matches!(err, VmdkError::BadField { field: "grain size", value, .. } if value == grain),
                "{what}: {err}"
            );
            assert!(err.to_string().contains("more than 8"), "{what}: {err}");
            let size = format!("grain size is {grain},");
            expect_corrupt(open_bytes(bytes.clone(), &Limits::default()), &["disk.vmdk", &size, "more than 8"]);
            if shape != "sparse" {
                expect_corrupt(scan_stream_markers(bytes.as_slice(), &Limits::default()), &[&size]);
            }
        }
    }
    // The smallest grain allowed.
    let image = open_bytes(sparse_shape(&data, 16, false), &Limits::default()).unwrap();
    assert_same(&read_all(&image, 100_000), &data, "16-sector grains");
}

// ---------------------------------------------------------------- converted to qcow2

/// Converts `image` to qcow2 in `dir` as the engine does, twice: plain data read, and plain
/// data copied file to file (the offload path, forced). The pipeline tests' helper has
/// qemu-img check each result and compare it with `original` read as `format`: the source
/// itself where qemu-img reads it, else a raw file of what it holds. The read path stores
/// exactly `data_clusters`, the 64 KiB clusters with a non-zero byte.
fn convert_to_qcow2(image: &dyn DiskSource, dir: &Path, name: &str, original: &Path, format: &str, data_clusters: u64) {
    use crate::convert::native::pipeline::tests::convert as pipeline_convert;
    use crate::image::qcow2::CopyMode;
    let out = dir.join(format!("{name}.qcow2"));
    let read = pipeline_convert(image, &out, CopyMode::ReadWrite, original, format);
    assert_eq!((read.data_clusters, read.copied_clusters), (data_clusters, 0), "{name}: {read:?}");
    let out = dir.join(format!("{name}.copied.qcow2"));
    let copied = pipeline_convert(image, &out, CopyMode::CopyFileRange, original, format);
    assert!(copied.data_clusters >= data_clusters, "{name}: {copied:?}");
    // A megabyte of data stored verbatim holds whole clusters to copy: the copy path ran.
    let plain: u64 = image.plain_runs(0..image.size()).unwrap().iter().map(|r| r.range.end - r.range.start).sum();
    assert_eq!(copied.copied_clusters > 0, plain >= MIB as u64, "{name}: {plain} bytes in plain runs, {copied:?}");
}

/// The shapes the reader tests above compare as raw, each converted to qcow2 and checked by
/// qemu-img.
#[test]
fn every_input_shape_converts_to_a_clean_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let limits = Limits::default();
    let data = pattern(16 * MIB);
    let raw = write_file(&d.join("disk.raw"), &data);
    let clusters = nonzero_chunks(&data, GRAIN);

    let shape = write_file(&d.join("shape.vmdk"), &vmware_shape(&data, 128));
    convert_to_qcow2(&open(&shape, &limits).unwrap(), d, "vmware-shape", &shape, "vmdk", clusters);
    let made = d.join("vmdkstream.vmdk");
    if vmdkstream(&raw, &made) {
        convert_to_qcow2(&open(&made, &limits).unwrap(), d, "vmdkstream", &made, "vmdk", clusters);
    }

    // Zeroed grains, and chains of two and three disks with zeroed grains over data.
    let chain_dir = d.join("chain");
    std::fs::create_dir(&chain_dir).unwrap();
    let chain = zeroed_chain(&chain_dir);
    for (name, top, layers) in
        [("zeroed", &chain.base, 0), ("child", &chain.child, 2), ("grandchild", &chain.grandchild, 3)]
    {
        let image = open(top, &limits).unwrap();
        assert_eq!(image.info().chain.len(), layers, "{name}: disks in the chain (none listed for one)");
        let expected = std::fs::read(oracle(top)).unwrap();
        convert_to_qcow2(&image, d, name, top, "vmdk", nonzero_chunks(&expected, GRAIN));
    }

    // VMFS descriptors: qemu-img reads createType vmfs, and refuses vmfsThin, whose result is
    // compared with the bytes the disk holds.
    let (vmfs, expected) = vmfs_disk(d, "vmfs", "vmfs");
    convert_to_qcow2(&open(&vmfs, &limits).unwrap(), d, "vmfs", &vmfs, "vmdk", nonzero_chunks(&expected, GRAIN));
    let (thin, expected) = vmfs_disk(d, "thin", "vmfsThin");
    let reference = write_file(&d.join("thin.raw"), &expected);
    let clusters = nonzero_chunks(&expected, GRAIN);
    convert_to_qcow2(&open(&thin, &limits).unwrap(), d, "vmfs-thin", &reference, "raw", clusters);

    // Real files made by other tools (tests/data/vmware/README.md); the one in the cot test
    // data is the VirtualBox export's own copy. None holds a data grain.
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for (name, file) in [
        ("blank", "vmware/blank.vmdk"),
        ("input", "vmware/input.vmdk"),
        ("ubuntu", "vmware/ubuntu.2.0-disk1.vmdk"),
        ("cot-ubuntu", "ova/cot/ubuntu.2.0-disk1.vmdk"),
    ] {
        let path = data_dir.join(file);
        let image = open(&path, &limits).unwrap_or_else(|e| panic!("{file}: {e}"));
        convert_to_qcow2(&image, d, name, &path, "vmdk", 0);
    }
}

// ---------------------------------------------------------------- hostile sparse files

/// A small qemu-img stream and the byte offsets of its grain markers.
fn small_qemu_stream(dir: &Path) -> (Vec<u8>, Vec<usize>, Vec<u8>) {
    let mut data = pattern(16 * MIB);
    data.truncate(2 * MIB);
    let raw = write_file(&dir.join("small.raw"), &data);
    let vmdk = convert(dir, &raw, "streamOptimized", "");
    let bytes = std::fs::read(vmdk).unwrap();
    let markers = grain_markers(&bytes);
    (bytes, markers, data)
}

fn read_whole(image: &VmdkImage) -> Result<Vec<u8>, ImageError> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(0, &mut buf)?;
    Ok(buf)
}

#[test]
fn hostile_grains_are_refused_each_in_its_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::default();
    let (good, markers, data) = small_qemu_stream(dir.path());
    assert_same(&read_whole(&open_bytes(good.clone(), &limits).unwrap()).unwrap(), &data, "small stream");
    let m = markers[3];
    // The marker says another sector.
    let mut b = good.clone();
    b[m..m + 8].copy_from_slice(&(999u64 * 128).to_le_bytes());
    expect_corrupt(
        read_whole(&open_bytes(b, &limits).unwrap()),
        &["marker of grain 3", "sector 127872, not sector 384"],
    );
    // An impossible compressed size.
    let mut b = good.clone();
    b[m + 8..m + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_corrupt(read_whole(&open_bytes(b, &limits).unwrap()), &["grain 3", "impossible"]);
    // Over the configured limit (the first grains are incompressible: > 64 KiB).
    let small = Limits { max_compressed_grain_bytes: 32 << 10, ..Limits::default() };
    expect_kind(read_whole(&open_bytes(good.clone(), &small).unwrap()), "limit", &["max_compressed_grain_bytes"]);
    // Not zlib.
    let mut b = good.clone();
    b[m + 12..m + 14].copy_from_slice(b"XX");
    expect_corrupt(read_whole(&open_bytes(b, &limits).unwrap()), &["grain 3", "not a valid zlib stream"]);
    // A zlib bomb: a small grain that inflates to 1 MiB.
    let mut b = good.clone();
    let mut compressor = libdeflater::Compressor::new(libdeflater::CompressionLvl::best());
    let mut bomb = vec![0u8; 8192];
    let n = compressor.zlib_compress(&vec![0u8; MIB], &mut bomb).unwrap();
    let old = u32::from_le_bytes(b[m + 8..m + 12].try_into().unwrap()) as usize;
    assert!(n <= old, "bomb fits");
    b[m + 8..m + 12].copy_from_slice(&(n as u32).to_le_bytes());
    b[m + 12..m + 12 + n].copy_from_slice(&bomb[..n]);
    expect_corrupt(read_whole(&open_bytes(b, &limits).unwrap()), &["grain 3", "more than one grain"]);
    // A grain that inflates to less than a grain.
    let mut b = good.clone();
    let n = compressor.zlib_compress(&[7u8; 1000], &mut bomb).unwrap();
    b[m + 8..m + 12].copy_from_slice(&(n as u32).to_le_bytes());
    b[m + 12..m + 12 + n].copy_from_slice(&bomb[..n]);
    expect_corrupt(read_whole(&open_bytes(b, &limits).unwrap()), &["inflates to 1000 bytes instead of 65536"]);
    // The grain table points at a metadata marker / past the end.
    let header = SparseHeader::parse(good[..512].try_into().unwrap()).unwrap();
    let gd = (header.gd_offset * 512) as usize;
    let gt = u32::from_le_bytes(good[gd..gd + 4].try_into().unwrap()) as usize * 512;
    let mut b = good.clone();
    b[gt + 12..gt + 16].copy_from_slice(&(good.len() as u32 / 512 - 1).to_le_bytes());
    expect_corrupt(read_whole(&open_bytes(b, &limits).unwrap()), &["grain 3", "metadata marker"]);
    let mut b = good.clone();
    b[gt + 12..gt + 16].copy_from_slice(&(good.len() as u32).to_le_bytes());
    expect_corrupt(
        open_bytes(b, &limits),
        &["grain table 0 (grain 3) of disk.vmdk points past the end of the file", "truncated or corrupt"],
    );
    let mut b = good.clone();
    b[gd..gd + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    expect_corrupt(open_bytes(b, &limits), &["grain table 0", "points past the end"]);
    // Truncated in the middle of grains (the tables are at the front, so this is found at open).
    expect_corrupt(open_bytes(good[..good.len() / 2].to_vec(), &limits), &["points past the end", "truncated"]);
    // Too large a grain directory.
    expect_kind(
        open_bytes(good.clone(), &Limits { max_grain_directory_entries: 0, ..Limits::default() }),
        "limit",
        &["max_grain_directory_entries"],
    );
    expect_kind(
        open_bytes(good.clone(), &Limits { max_grain_table_bytes: 100, ..Limits::default() }),
        "limit",
        &["max_grain_table_bytes"],
    );
    // An embedded descriptor over the limit.
    expect_kind(
        open_bytes(good.clone(), &Limits { max_descriptor_bytes: 1024, ..Limits::default() }),
        "limit",
        &["embedded descriptor"],
    );

    // Uncompressed: a grain past the end of the file.
    let raw = write_file(&dir.path().join("s.raw"), &data);
    let sparse = std::fs::read(convert(dir.path(), &raw, "monolithicSparse", "")).unwrap();
    let header = SparseHeader::parse(sparse[..512].try_into().unwrap()).unwrap();
    let gt = u32::from_le_bytes(sparse[(header.gd_offset * 512) as usize..][..4].try_into().unwrap()) as usize * 512;
    let mut b = sparse.clone();
    b[gt + 8..gt + 12].copy_from_slice(&(sparse.len() as u32 / 512 - 1).to_le_bytes());
    expect_corrupt(open_bytes(b, &limits), &["grain table 0 (grain 2)", "points past the end", "65536 bytes"]);
}

/// Hostile input never panics, hangs or allocates without bound: flip bytes in the metadata
/// of real extents thousands of times, then open, inspect and read what opens.
#[test]
fn mutations_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut small = pattern(16 * MIB);
    small.truncate(MIB);
    small[..768 << 10].fill(0);
    let raw = write_file(&dir.path().join("m.raw"), &small);
    let seeds = [
        std::fs::read(made_by_qemu(dir.path(), "streamOptimized")).unwrap(),
        vmware_stream(),
        std::fs::read(convert(dir.path(), &raw, "streamOptimized", "")).unwrap(),
        std::fs::read(convert(dir.path(), &raw, "monolithicSparse", "zeroed_grain=on")).unwrap(),
        vmware_shape(&small, 128),
    ];
    let limits = Limits::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next();
    let mut opened = 0;
    for (n, seed) in seeds.iter().enumerate() {
        let rounds = if n == 0 { 1000 } else { 2000 };
        for _ in 0..rounds {
            let mut b = seed.clone();
            for _ in 0..(next() % 8 + 1) {
                // Mostly the header and tables (first 64 KiB), sometimes the end, sometimes anywhere.
                let at = match next() % 5 {
                    0 => next() % b.len() as u64,
                    1 => b.len() as u64 - 1 - next() % (b.len() as u64).min(2048),
                    _ => next() % (b.len() as u64).min(65536),
                } as usize;
                b[at] = next() as u8;
            }
            if next() % 8 == 0 {
                b.truncate((next() % b.len() as u64) as usize);
            }
            let _ = check_sparse(b.as_slice(), b.len() as u64);
            let _ = scan_stream_markers(b.as_slice(), &limits);
            let Ok(image) = open_bytes(b, &limits) else { continue };
            opened += 1;
            let _ = image.info();
            let size = image.size();
            let mut buf = vec![0u8; MIB];
            let _ = image.read_at(0, &mut buf[..size.min(256 << 10) as usize]);
            // The allocated parts (at most 1 MiB of them: the whole of the small seeds).
            let mut budget = MIB as u64;
            if let Ok(ranges) = image.allocated(0..size) {
                for r in ranges {
                    let mut at = r.start;
                    while at < r.end && budget > 0 {
                        let len = (r.end - at).min(MIB as u64);
                        let _ = image.read_at(at, &mut buf[..len as usize]);
                        budget = budget.saturating_sub(len);
                        at += len;
                    }
                }
            }
        }
    }
    assert!(opened > 1000, "mutations mostly leave a readable image ({opened} opened)");
}

#[test]
fn default_limits_are_documented_values() {
    let l = Limits::default();
    assert_eq!(l.max_descriptor_bytes, 64 << 10);
    assert_eq!(l.max_extents, 4096);
    assert_eq!(l.max_extent_files, 2048);
    assert_eq!(l.max_chain_depth, 16);
    assert_eq!(l.max_grain_directory_entries, 2 << 20);
    assert_eq!(l.max_compressed_grain_bytes, 4 << 20);
    assert_eq!(l.max_grain_table_bytes, 64 << 20);
    assert_eq!(l.max_stream_map_bytes, 1 << 30);
}

/// Read throughput of a real disk, as the engine reads it (4 MiB chunks, allocated parts only):
/// `VMDK_BENCH=disk.vmdk [VMDK_BENCH_ORACLE=disk.raw] cargo test --release --lib
/// vmdk::tests::bench_read -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_read() {
    let Some(path) = std::env::var_os("VMDK_BENCH") else {
        eprintln!("set VMDK_BENCH to a VMDK");
        return;
    };
    let image = open(Path::new(&path), &Limits::default()).unwrap();
    let size = image.size();
    let chunk = 4 * MIB as u64;
    let oracle = std::env::var_os("VMDK_BENCH_ORACLE").map(|p| File::open(p).unwrap());
    let counts: Vec<u64> = match std::env::var("VMDK_BENCH_THREADS") {
        Ok(t) => vec![t.parse().unwrap()],
        Err(_) => vec![1, 2],
    };
    for threads in counts {
        let start = std::time::Instant::now();
        let bytes: u64 = std::thread::scope(|scope| {
            let lanes: Vec<_> = (0..threads)
                .map(|lane| {
                    let (image, oracle) = (&image, oracle.as_ref());
                    scope.spawn(move || {
                        let mut buf = vec![0u8; chunk as usize];
                        let mut theirs = vec![0u8; chunk as usize];
                        let mut bytes = 0;
                        for (n, at) in (0..size).step_by(chunk as usize).enumerate() {
                            if n as u64 % threads != lane {
                                continue;
                            }
                            let end = (at + chunk).min(size);
                            buf.fill(0);
                            for r in image.allocated(at..end).unwrap() {
                                image
                                    .read_at(r.start, &mut buf[(r.start - at) as usize..(r.end - at) as usize])
                                    .unwrap();
                                bytes += r.end - r.start;
                            }
                            if let Some(oracle) = oracle {
                                let len = (end - at) as usize;
                                oracle.read_exact_at(&mut theirs[..len], at).unwrap();
                                assert!(buf[..len] == theirs[..len], "chunk at {at} differs");
                            }
                        }
                        bytes
                    })
                })
                .collect();
            lanes.into_iter().map(|l| l.join().unwrap()).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{threads} thread(s): {} MiB of allocated data in {secs:.2} s = {:.0} MiB/s{}",
            bytes >> 20,
            (bytes as f64 / (1 << 20) as f64) / secs,
            if oracle.is_some() { " (checked against the oracle)" } else { "" }
        );
    }
}

/// Found by the vmdk_sparse fuzz target: a stream whose footer's geometry differs from its
/// header's, with a grain directory past the end. It must be refused, not rebuilt from the
/// markers with the footer's geometry (which indexed out of bounds and panicked).
#[test]
fn a_footer_that_contradicts_the_header_is_refused() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/fuzz/keep-footer-geometry-mismatch.vmdk"))
            .unwrap();
    let opened = open_stream(Arc::new(bytes), "fuzzed.vmdk", &Limits::default()).map(|image| drop(image.info()));
    assert!(matches!(opened, Err(ImageError::Corrupt(_))), "{opened:?}");
}

/// Issue 10: extents and parents outside SOURCE_ROOTS are refused by name, before they are
/// opened, so nothing of them (first bytes, size) reaches a message; a symlink under a name
/// inside the roots is judged by what it leads to.
#[test]
fn references_outside_the_roots_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&exports).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    // 1234 bytes that start like /etc/shadow.
    let secret = write_file(&elsewhere.join("shadow"), format!("rootSECRET{}", "x".repeat(1224)).as_bytes());
    let roots = crate::source::SourceRoots::new(std::slice::from_ref(&exports));
    let descriptor = |name: &str, body: &str| {
        let text = format!("# Disk DescriptorFile\nversion=1\nCID=00000001\n{body}\ncreateType=\"vmfs\"\n");
        write_file(&exports.join(name), text.as_bytes())
    };
    let secret_name = s(&secret);
    let cases = [
        descriptor("sparse.vmdk", &format!("parentCID=ffffffff\nRW 2048 SPARSE \"{secret_name}\"")),
        descriptor("flat.vmdk", &format!("parentCID=ffffffff\nRW 4 FLAT \"{secret_name}\" 0")),
        descriptor("relative.vmdk", "parentCID=ffffffff\nRW 4 FLAT \"../elsewhere/shadow\" 0"),
        descriptor("delta.vmdk", &format!("parentCID=12345678\nparentFileNameHint=\"{secret_name}\"\nRW 2048 ZERO")),
    ];
    std::os::unix::fs::symlink(&secret, exports.join("link-flat.bin")).unwrap();
    let linked = descriptor("linked.vmdk", "parentCID=ffffffff\nRW 4 FLAT \"link-flat.bin\" 0");
    for vmdk in cases.iter().chain([&linked]) {
        let e = open_confined(vmdk, &Limits::default(), &roots).expect_err("a reference outside must be refused");
        let text = err_text(&e);
        assert!(matches!(e, ImageError::Source(crate::source::SourceError::Outside { .. })), "{vmdk:?}: {text}");
        assert!(text.contains("outside SOURCE_ROOTS"), "{text}");
        assert!(!text.contains("root\"") && !text.contains("SECRET") && !text.contains("1234"), "leaks: {text}");
    }
    // Unconfined (commands run by hand), the same files are read: the refusal above is the
    // confinement's doing, not the parser's.
    let e = open(&cases[1], &Limits::default()).expect_err("a short flat extent");
    assert!(err_text(&e).contains("1234"), "{}", err_text(&e));
}

/// A parent named by an absolute datastore path outside the roots is still found beside the
/// child, as VMware's exports need, without looking at the outside name.
#[test]
fn a_parent_outside_the_roots_is_found_beside_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    std::fs::create_dir_all(&exports).unwrap();
    let raw = exports.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let base = exports.join("base.vmdk");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "vmdk", s(&raw), s(&base)]);
    let child = exports.join("child.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", "-F", "vmdk", "-b", "base.vmdk", s(&child)]);
    let mut bytes = std::fs::read(&child).unwrap();
    let from = b"parentFileNameHint=\"base.vmdk\"";
    let to = b"parentFileNameHint=\"/vmfs/volumes/ds1/vm/base.vmdk\"";
    let at = bytes.windows(from.len()).position(|w| w == from).expect("the hint");
    bytes.splice(at..at + from.len(), to.iter().copied());
    std::fs::write(&child, &bytes).unwrap();
    let roots = crate::source::SourceRoots::new(std::slice::from_ref(&exports));
    let image = open_confined(&child, &Limits::default(), &roots).expect("the parent beside the child");
    assert_eq!(image.info().chain, [child.clone(), exports.join("base.vmdk")]);
}

/// Issue 10: a disk naming more files than `max_extent_files` is refused before it holds them
/// all open; the same file named again costs nothing.
#[test]
fn extent_files_are_capped_per_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut lines = String::new();
    for i in 0..5 {
        write_file(&d.join(format!("e{i}.bin")), &[0u8; 512]);
        lines.push_str(&format!("RW 1 FLAT \"e{i}.bin\" 0\n"));
    }
    let header = "# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"vmfs\"\n";
    let five = write_file(&d.join("five.vmdk"), format!("{header}{lines}").as_bytes());
    // The descriptor and its five extents: six files.
    let limits = Limits { max_extent_files: 5, ..Limits::default() };
    expect_kind(open(&five, &limits), "limit", &["more than 5 files", "max_extent_files", "five.vmdk"]);
    let same = write_file(&d.join("same.vmdk"), format!("{header}{}", "RW 1 FLAT \"e0.bin\" 0\n".repeat(5)).as_bytes());
    open(&same, &limits).expect("one file named five times is one descriptor");
    open(&five, &Limits { max_extent_files: 6, ..Limits::default() }).expect("six files within a limit of six");
}
