//! Issue 13: a source whose checksum is checked is read once, by the conversion itself. The
//! bytes this process reads (`rchar` of `/proc/self/io`, which counts every `read`/`pread` of
//! every thread) are compared with the source's size around an in-process conversion through
//! a tap, and around the separate hash pass + conversion the job made before. A count, not a
//! timing: this file holds this one test so that no other test's reads are counted.

mod common;

use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::fixtures::{self, raw_to_vmdk};
use hyper2kvm::convert::native::{tap_window, Native};
use hyper2kvm::convert::{ConversionRequest, Converter, JobControl};
use hyper2kvm::internals::checksum;
use hyper2kvm::internals::image::tap::Tap;
use hyper2kvm::internals::manifest::SourceFormat;
use hyper2kvm::internals::source::SourceRoots;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn rchar() -> u64 {
    let io = fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    let line = io.lines().find_map(|l| l.strip_prefix("rchar:")).expect("an rchar line");
    line.trim().parse().expect("a number")
}

/// Bytes read by `work`, less the read of `/proc/self/io` itself.
fn bytes_read(work: impl FnOnce()) -> u64 {
    let probe = {
        let (a, b) = (rchar(), rchar());
        b - a
    };
    let before = rchar();
    work();
    rchar() - before - probe
}

fn convert(source: &Path, format: SourceFormat, ova_disk: Option<usize>, out: &Path, tap: Option<Arc<Tap>>) {
    let roots = SourceRoots::anywhere();
    let request = ConversionRequest {
        source,
        format,
        destination: out,
        compression: None,
        ova_disk,
        inspected_files: None,
        roots: &roots,
        tap,
    };
    Native::default().convert(&request, &JobControl::new(Duration::from_secs(600))).expect("converts");
    fs::remove_file(out).unwrap();
}

#[test]
fn a_checksummed_source_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    fixtures::create_raw(&raw, 192 * MIB);
    // Incompressible data with holes between: every shape stores most of it.
    for (i, at) in [0u64, 40, 90, 150].into_iter().enumerate() {
        fixtures::write_random(&raw, at * MIB, (30 * MIB) as usize, 10 + i as u64);
    }
    let ova = dir.path().join("appliance.ova");
    fs::copy("tests/data/ova/vsphere-ustar.ova", &ova).unwrap();
    let cases = [
        ("raw", raw.clone(), SourceFormat::Raw, None),
        ("stream", raw_to_vmdk(&raw, &dir.path().join("stream.vmdk"), "streamOptimized"), SourceFormat::Vmdk, None),
        ("sparse", raw_to_vmdk(&raw, &dir.path().join("sparse.vmdk"), "monolithicSparse"), SourceFormat::Vmdk, None),
        ("ova", ova, SourceFormat::Ova, Some(0)),
    ];
    let out = dir.path().join("out.qcow2");
    let mut table = String::new();
    for (name, path, format, ova_disk) in cases {
        let size = fs::metadata(&path).unwrap().len();
        let want: [u8; 32] = Sha256::digest(fs::read(&path).unwrap()).into();

        let before = bytes_read(|| {
            let control = JobControl::new(Duration::from_secs(600));
            let digest = checksum::sha256_of(File::open(&path).unwrap(), &control).unwrap();
            assert_eq!(digest, want);
            convert(&path, format, ova_disk, &out, None);
        });
        let (mut found, mut peak) = (None, 0);
        let after = bytes_read(|| {
            let tap = Arc::new(Tap::new(File::open(&path).unwrap(), &path, tap_window()).unwrap());
            convert(&path, format, ova_disk, &out, Some(tap.clone()));
            let done = tap.finish().unwrap();
            peak = done.peak_pending;
            found = Some(done.sha256);
        });
        assert_eq!(found, Some(want), "{name}: the digest taken in the pass is the file's");
        let ratio = |n: u64| n as f64 / size as f64;
        table.push_str(&format!(
            "{name}: {size} bytes; hash pass + convert read {before} ({:.3}x); one pass read {after} ({:.3}x), at most {:.1} MiB held ahead\n",
            ratio(before),
            ratio(after),
            peak as f64 / MIB as f64
        ));
        // Headers and grain tables are read again by the reader after the tap hashed them:
        // a few KiB, plus an OVA's index, OVF and .mf read apart from the tap.
        assert!(after as f64 <= 1.05 * size as f64 + (256 << 10) as f64, "{name}: read too much:\n{table}");
        // The old way read the whole file, then what the conversion wanted (not the holes).
        assert!(before as f64 > 1.3 * after as f64, "{name}: the old way read more:\n{table}");
    }
    println!("{table}");
}
