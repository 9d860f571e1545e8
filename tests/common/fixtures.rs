//! Deterministic disk images made with the real `qemu-img` / `qemu-io`.
//!
//! Every image is built from a raw "disk" with data in a few places and holes in between, plus
//! some pseudo-random bytes so that compression has real work to do. Raw files are sparse, so
//! even the 4.5 GiB disk used for the twoGbMaxExtent* subformats costs a few MiB on disk.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1024 * 1024;

/// Runs a command and panics with its output unless it exits 0.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -f FMT -c CMD … FILE`.
pub fn qemu_io(format: &str, file: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg(format);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(file);
    let out = run(&mut cmd);
    // qemu-io reports per-command failures on stdout but still exits 0 in some versions.
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io on {} reported a failure: {out}",
        file.display()
    );
}

/// A sparse raw file of `size` bytes.
pub fn create_raw(path: &Path, size: u64) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// xorshift64* (Vigna): deterministic test data without a dependency; the generator of the
/// library's unit tests too (`src/test_support.rs`). The state must not be zero.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 pseudo-random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes `len` deterministic pseudo-random bytes (xorshift64*, seeded) at `offset`.
pub fn write_random(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let v = rng.next();
        // Half the bytes random, half a small alphabet: compressible, but not trivially.
        let bytes = v.to_le_bytes();
        for (i, b) in bytes.iter().enumerate() {
            buf.push(if i % 2 == 0 { *b } else { b'a' + (*b % 4) });
        }
    }
    buf.truncate(len);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&buf, offset).unwrap();
}

/// The main 64 MiB test disk: patterns at 0, 5M and the last MiB, random data at 10M and 40M,
/// holes everywhere else.
pub fn small_raw(path: &Path) -> PathBuf {
    create_raw(path, 64 * MIB);
    qemu_io("raw", path, &["write -P 0x11 0 1M", "write -P 0x22 5M 3M", "write -P 0x33 63M 1M"]);
    write_random(path, 10 * MIB, 512 * 1024, 1);
    write_random(path, 40 * MIB + 4096 + 17, 100_000, 2);
    path.to_path_buf()
}

/// A second, different 32 MiB disk (for the data disk of a two-disk VM).
pub fn data_raw(path: &Path) -> PathBuf {
    create_raw(path, 32 * MIB);
    qemu_io("raw", path, &["write -P 0x55 0 2M", "write -P 0x66 20M 1M", "write -P 0x77 31M 1M"]);
    write_random(path, 7 * MIB, 256 * 1024, 3);
    path.to_path_buf()
}

/// A 4.5 GiB sparse disk with data near 0, across the first 2 GiB extent boundary, near 2.1 GiB
/// and near 4.4 GiB, so that twoGbMaxExtent* images have several extents that all hold data.
pub fn big_raw(path: &Path) -> PathBuf {
    create_raw(path, 4608 * MIB);
    qemu_io(
        "raw",
        path,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 2047M 2M",
            "write -P 0x33 2150M 1M",
            "write -P 0x44 4505M 1M",
            "write -P 0x55 4607M 1M",
        ],
    );
    write_random(path, 3 * MIB, 256 * 1024, 4);
    write_random(path, 2200 * MIB, 256 * 1024, 5);
    write_random(path, 4400 * MIB, 256 * 1024, 6);
    path.to_path_buf()
}

/// `qemu-img convert -f raw -O vmdk -o subformat=SUBFORMAT RAW OUT`.
pub fn raw_to_vmdk(raw: &Path, out: &Path, subformat: &str) -> PathBuf {
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", "-o"])
        .arg(format!("subformat={subformat}"))
        .arg(raw)
        .arg(out));
    out.to_path_buf()
}

/// `qemu-img convert -f raw -O qcow2 RAW OUT`.
pub fn raw_to_qcow2(raw: &Path, out: &Path) -> PathBuf {
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(out));
    out.to_path_buf()
}

/// A delta chain in `dir`: `base.vmdk` (monolithicSparse of `raw`) and `child.vmdk` whose parent
/// is `base.vmdk` (relative hint, as VMware writes it) with 1 MiB of 0x44 written at 2M.
/// Returns (base, child); the conversion of `child` must equal `child` itself.
pub fn delta_chain(dir: &Path, raw: &Path) -> (PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap();
    let base = raw_to_vmdk(raw, &dir.join("base.vmdk"), "monolithicSparse");
    run(Command::new("qemu-img").current_dir(dir).args([
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        "child.vmdk",
    ]));
    let child = dir.join("child.vmdk");
    qemu_io("vmdk", &child, &["write -P 0x44 2M 1M"]);
    (base, child)
}

/// A child VMDK in `dir` whose parent is `parent` given by its absolute path.
pub fn child_of(dir: &Path, parent: &Path, name: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let child = dir.join(name);
    run(Command::new("qemu-img").args(["create", "-q", "-f", "vmdk", "-F", "vmdk", "-b"]).arg(parent).arg(&child));
    qemu_io("vmdk", &child, &["write -P 0x44 2M 1M"]);
    child
}

/// Files whose name starts with `stem` in `dir` (extents of a multi-file VMDK).
pub fn files_starting_with(dir: &Path, stem: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(stem))
        .collect();
    names.sort();
    names
}

/// Entries of `dir`, hidden ones included, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    files_starting_with(dir, "")
}

/// Writes `len` incompressible pseudo-random bytes (xorshift64*) at `offset` of the existing
/// file `path`.
pub fn write_noise(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        bytes.extend_from_slice(&rng.next().to_le_bytes());
    }
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&bytes[..len], offset).unwrap();
}

/// How an edited monolithicFlat descriptor names its extent.
#[derive(Clone, Copy, Debug)]
pub enum ExtentRef {
    /// The extent's absolute path.
    Absolute,
    /// A relative path climbing out of the descriptor's directory.
    Relative,
}

/// A monolithicFlat image whose flat extent lives in `elsewhere`, with the descriptor copied to
/// `exports_dir/x.vmdk` and edited to point at that extent (absolutely or with `../..`).
/// `exports_dir` must be two levels below the common parent of exports and elsewhere
/// (e.g. `<tmp>/exports/vm`, `<tmp>/elsewhere`). qemu-img itself reads the result fine.
pub fn flat_descriptor_pointing_outside(raw: &Path, elsewhere: &Path, exports_dir: &Path, how: ExtentRef) -> PathBuf {
    fs::create_dir_all(elsewhere).unwrap();
    fs::create_dir_all(exports_dir).unwrap();
    let original = raw_to_vmdk(raw, &elsewhere.join("x.vmdk"), "monolithicFlat");
    let text = fs::read_to_string(&original).unwrap();
    let extent = elsewhere.join("x-flat.vmdk");
    assert!(extent.exists(), "qemu-img did not make {}", extent.display());
    let target = match how {
        ExtentRef::Absolute => extent.to_string_lossy().into_owned(),
        ExtentRef::Relative => {
            let name = elsewhere.file_name().unwrap().to_string_lossy();
            format!("../../{name}/x-flat.vmdk")
        }
    };
    let edited = text.replace("\"x-flat.vmdk\"", &format!("\"{target}\""));
    assert_ne!(edited, text, "descriptor has no \"x-flat.vmdk\" extent line:\n{text}");
    let desc = exports_dir.join("x.vmdk");
    fs::write(&desc, edited).unwrap();
    desc
}

/// Truncates a file to half its size.
pub fn truncate_half(path: &Path) {
    let len = fs::metadata(path).unwrap().len();
    OpenOptions::new().write(true).open(path).unwrap().set_len(len / 2).unwrap();
}

/// Overwrites the sparse VMDK header magic ("KDMV") and the bytes after it with garbage.
pub fn corrupt_magic(path: &Path) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(b"GARBAGE!GARBAGE!", 0).unwrap();
}

/// Overwrites the grain directory of a sparse VMDK (monolithicSparse) with 0xFF bytes, so every
/// grain table pointer is far past the end of the file. The header stays valid.
pub fn corrupt_grain_directory(path: &Path) {
    let mut f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut header = [0u8; 80];
    f.read_exact(&mut header).unwrap();
    assert_eq!(&header[0..4], b"KDMV", "not a sparse VMDK");
    let gd_sector = u64::from_le_bytes(header[56..64].try_into().unwrap());
    let rgd_sector = u64::from_le_bytes(header[48..56].try_into().unwrap());
    assert!(gd_sector > 0, "no grain directory offset in {}", path.display());
    for sector in [gd_sector, rgd_sector] {
        if sector > 0 {
            f.seek(SeekFrom::Start(sector * 512)).unwrap();
            f.write_all(&[0xFF; 512]).unwrap();
        }
    }
    f.sync_all().unwrap();
}

/// `qemu-img compare -f FA -F FB A B` exit code (0 = same contents).
pub fn compare_status(a: &Path, fa: &str, b: &Path, fb: &str) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img compare");
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// Asserts `qemu-img compare` says A and B have the same contents.
pub fn assert_same_contents(a: &Path, fa: &str, b: &Path, fb: &str) {
    let (code, text) = compare_status(a, fa, b, fb);
    assert_eq!(code, 0, "qemu-img compare {} {} exited {code}: {text}", a.display(), b.display());
}

/// `qemu-img info --output=json` of a file.
pub fn qemu_img_info(path: &Path, format: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    if let Some(f) = format {
        cmd.arg("-f").arg(f);
    }
    cmd.arg(path);
    serde_json::from_str(&run(&mut cmd)).expect("qemu-img info JSON")
}

/// A 512 MiB raw disk of random (incompressible) data under `exports`: compressing it keeps a
/// job busy for seconds, long enough to interrupt on purpose. /dev/urandom is much faster than
/// generating it in a debug-built test.
pub fn slow_disk(exports: &Path) -> PathBuf {
    let path = exports.join("slow/disk-0.raw");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut random = File::open("/dev/urandom").unwrap().take(512 * MIB);
    std::io::copy(&mut random, &mut File::create(&path).unwrap()).unwrap();
    path
}

/// An OVA member cut out by the byte range Python's tarfile recorded in `members`
/// (`<ova>.members.json`).
pub fn ova_member(ova: &Path, members: &serde_json::Value, name_suffix: &str, out: &Path) -> PathBuf {
    let member = members
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str().unwrap().ends_with(name_suffix))
        .expect("member listed");
    let bytes = fs::read(ova).unwrap();
    let start = member["offset_data"].as_u64().unwrap() as usize;
    let end = start + member["size"].as_u64().unwrap() as usize;
    fs::write(out, &bytes[start..end]).unwrap();
    out.to_owned()
}

/// The sample OVA unpacked by `tar` into `dir`, as `ovftool` writes an export to a folder:
/// `ova-sample.ovf` (a vSphere-style descriptor), `ova-sample.mf` (SHA256), two
/// streamOptimized VMDKs made by `qemu-img` (the second in `disks/`) and an NVRAM file.
/// Returns the `.ovf`.
pub fn unpacked_ovf(ova: &Path, dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    run(Command::new("tar").arg("-xf").arg(ova).arg("-C").arg(dir));
    dir.join("ova-sample.ovf")
}
