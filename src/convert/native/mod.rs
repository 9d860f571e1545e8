//! The native conversion engine: VMware disks (VMDK of every flavour, OVA members) and raw
//! images read in Rust, qcow2 written in one forward pass, with decompression and compression
//! spread over every core by a bounded [`pipeline`], or in one front-to-back pass by
//! [`sequential`] for a stream that cannot be read twice.
//!
//! It does not choose between itself and `qemu-img`: [`super::auto::Auto`] does.

pub mod pipeline;
pub mod sequential;
pub mod share;

use std::path::Path;
use std::sync::Arc;

use crate::convert::{ConversionRequest, ConvertError, Converter, JobControl};
use crate::image::raw::RawImage;
use crate::image::tap::Tap;
use crate::image::{ova, vmdk, DiskSource, FileSource, ImageError, ReadAt, Slice, SourceInfo};
use crate::manifest::SourceFormat;
use crate::source::SourceRoots;

pub use pipeline::PipelineOptions;

/// Opens a source disk natively. `Unsupported` for formats only qemu-img reads. Any file may
/// be named: for the commands run by hand; the daemon uses [`open_confined`].
pub fn open(path: &Path, format: SourceFormat) -> Result<(Box<dyn DiskSource>, SourceInfo), ImageError> {
    open_confined(path, format, &SourceRoots::anywhere())
}

/// [`open`], opening the disk and every file it names only through `roots`' confinement.
pub fn open_confined(
    path: &Path,
    format: SourceFormat,
    roots: &SourceRoots,
) -> Result<(Box<dyn DiskSource>, SourceInfo), ImageError> {
    match format {
        SourceFormat::Raw => {
            let confined = roots.open(path)?;
            let raw = RawImage::from_file(FileSource::from_file(confined.file, path)?)?;
            let info = raw.info();
            Ok((Box::new(raw), info))
        }
        SourceFormat::Vmdk => {
            let image = vmdk::open_confined(path, &vmdk::Limits::default(), roots)?;
            let info = image.info();
            Ok((Box::new(image), info))
        }
        SourceFormat::Ova => open_ova_disk(path, 0),
        other => Err(ImageError::Unsupported(format!("{} is not read natively", other.as_str()))),
    }
}

/// [`open_confined`], reading `path` itself through `tap` (which opened it, confined), so that
/// its digest is taken in the conversion's pass; the files it names are read as usual.
pub fn open_tapped(
    path: &Path,
    format: SourceFormat,
    roots: &SourceRoots,
    tap: Arc<Tap>,
) -> Result<(Box<dyn DiskSource>, SourceInfo), ImageError> {
    match format {
        SourceFormat::Raw => {
            let raw = RawImage::tapped(tap)?;
            let info = raw.info();
            Ok((Box::new(raw), info))
        }
        SourceFormat::Vmdk => {
            let image = vmdk::open_tapped(path, &vmdk::Limits::default(), roots, tap)?;
            let info = image.info();
            Ok((Box::new(image), info))
        }
        SourceFormat::Ova => open_ova_disk_tapped(path, 0, tap),
        other => Err(ImageError::Unsupported(format!("{} is not read natively", other.as_str()))),
    }
}

/// [`open_ova_disk`] of an OVA archive whose disk member is read through `tap` (over the
/// whole OVA file). The index, OVF and `.mf` are read apart: small, and read again by the
/// tap when its frontier passes them.
pub fn open_ova_disk_tapped(
    path: &Path,
    index: usize,
    tap: Arc<Tap>,
) -> Result<(Box<dyn DiskSource>, SourceInfo), ImageError> {
    let package = ova::open(path, &ova::Limits::default())?;
    let disk = package.disks.get(index).ok_or_else(|| {
        ImageError::Corrupt(format!("the OVA has {} disk(s); disk {} was asked for", package.disks.len(), index + 1))
    })?;
    if tap.len() != package.file_len {
        return Err(ImageError::Corrupt(format!(
            "{} changed while being read (it was {} bytes, it is now {}); submit it again once it is complete",
            path.display(),
            tap.len(),
            package.file_len
        )));
    }
    let whole: Arc<dyn ReadAt> = tap;
    let member = Slice::new(whole, disk.member.start, disk.member.end - disk.member.start)?;
    let image = vmdk::open_stream(Arc::new(member), &disk.member_name, &vmdk::Limits::default())?;
    let mut info = image.info();
    info.format = "ova".into();
    Ok((Box::new(image), info))
}

/// How many bytes a [`Tap`] over a source converted by the default pipeline may hold ahead
/// of its frontier: twice what the pipeline's workers may have in flight (their reads come
/// back out of order by at most that much), at least 32 MiB and at most 256 MiB.
pub fn tap_window() -> u64 {
    let options = PipelineOptions::default();
    let in_flight = options.workers() as u64 * options.in_flight_per_worker as u64 * options.chunk_bytes;
    (2 * in_flight).clamp(32 << 20, 256 << 20)
}

/// Opens disk `index` (boot order) of an OVA, read in place: no extraction, no extra space.
/// `path` may also be the descriptor of an unpacked OVF export: the disk is then its own file,
/// opened unconfined (commands run by hand; the daemon expands such a package into its disk
/// files first, each confined to SOURCE_ROOTS), and listed first in `referenced_files`.
pub fn open_ova_disk(path: &Path, index: usize) -> Result<(Box<dyn DiskSource>, SourceInfo), ImageError> {
    if ova::unpacked::is_ovf_descriptor(path) {
        return open_unpacked_disk(path, index);
    }
    let package = ova::open(path, &ova::Limits::default())?;
    let disk = package.disks.get(index).ok_or_else(|| {
        ImageError::Corrupt(format!("the OVA has {} disk(s); disk {} was asked for", package.disks.len(), index + 1))
    })?;
    let member = Arc::new(package.open_disk(disk)?);
    let image = vmdk::open_stream(member, &disk.member_name, &vmdk::Limits::default())?;
    let mut info = image.info();
    info.format = "ova".into();
    Ok((Box::new(image), info))
}

fn open_unpacked_disk(path: &Path, index: usize) -> Result<(Box<dyn DiskSource>, SourceInfo), ImageError> {
    let package = ova::unpacked::open(path, &ova::Limits::default(), &ova::unpacked::unconfined)?;
    let disk = package.disks.get(index).ok_or_else(|| {
        ImageError::Corrupt(format!("the OVF has {} disk(s); disk {} was asked for", package.disks.len(), index + 1))
    })?;
    let (source, mut info) = open(&disk.path, disk.source_format)?;
    info.referenced_files.insert(0, disk.path.clone());
    info.format = "ovf".into();
    Ok((source, info))
}

/// [`open`], and the allocated bytes too: what `inspect` and a job's inspection show.
pub fn inspect(path: &Path, format: SourceFormat) -> Result<SourceInfo, ImageError> {
    with_allocated(open(path, format)?)
}

/// [`open_confined`], and the allocated bytes too: what a job's inspection shows.
pub fn inspect_confined(path: &Path, format: SourceFormat, roots: &SourceRoots) -> Result<SourceInfo, ImageError> {
    with_allocated(open_confined(path, format, roots)?)
}

/// [`open_ova_disk`], and the allocated bytes too.
pub fn inspect_ova_disk(path: &Path, index: usize) -> Result<SourceInfo, ImageError> {
    with_allocated(open_ova_disk(path, index)?)
}

fn with_allocated((source, mut info): (Box<dyn DiskSource>, SourceInfo)) -> Result<SourceInfo, ImageError> {
    info.allocated_bytes = source.allocated_bytes();
    Ok(info)
}

/// Whether [`open`] reads `format`.
pub fn reads_natively(format: SourceFormat) -> bool {
    matches!(format, SourceFormat::Raw | SourceFormat::Vmdk | SourceFormat::Ova)
}

/// The native converter.
#[derive(Debug, Default, Clone)]
pub struct Native {
    /// Compression, threads and chunking of the conversion pipeline.
    pub options: PipelineOptions,
}

impl Converter for Native {
    fn name(&self) -> &'static str {
        "native"
    }

    fn reads_natively(&self, format: SourceFormat) -> bool {
        reads_natively(format)
    }

    fn inspect(
        &self,
        source: &Path,
        format: SourceFormat,
        roots: &SourceRoots,
        control: &JobControl,
    ) -> Result<SourceInfo, ConvertError> {
        control.check()?;
        Ok(inspect_confined(source, format, roots)?)
    }

    fn convert(&self, request: &ConversionRequest<'_>, control: &JobControl) -> Result<(), ConvertError> {
        let opened = match (request.format, request.ova_disk, request.tap.clone()) {
            (SourceFormat::Ova, index, Some(tap)) => open_ova_disk_tapped(request.source, index.unwrap_or(0), tap),
            (SourceFormat::Ova, Some(index), None) => open_ova_disk(request.source, index),
            (format, _, Some(tap)) => open_tapped(request.source, format, request.roots, tap),
            (format, _, None) => open_confined(request.source, format, request.roots),
        };
        let (source, info) = opened?;
        request.check_unchanged(&info.referenced_files)?;
        let options = PipelineOptions { compression: request.compression, ..self.options };
        pipeline::run(source.as_ref(), request.destination, options, control)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A monolithicFlat descriptor rewritten between the job's inspection and the conversion
    /// to name another extent: the converter refuses it rather than read a file nobody
    /// confined to SOURCE_ROOTS.
    #[test]
    fn a_source_rewritten_after_inspection_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vmdk = dir.path().join("d.vmdk");
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat"])
            .arg(&vmdk)
            .arg("1M")
            .status()
            .unwrap();
        assert!(made.success());
        let native = Native::default();
        let control = JobControl::new(std::time::Duration::from_secs(60));
        let roots = SourceRoots::new(&[dir.path().to_owned()]);
        let inspected = native.inspect(&vmdk, SourceFormat::Vmdk, &roots, &control).unwrap().referenced_files;
        assert_eq!(inspected, [dir.path().join("d-flat.vmdk")]);
        let request = |destination| ConversionRequest {
            source: &vmdk,
            format: SourceFormat::Vmdk,
            destination,
            compression: None,
            ova_disk: None,
            inspected_files: Some(&inspected),
            roots: &roots,
            tap: None,
        };
        let same = dir.path().join("same.qcow2");
        native.convert(&request(&same), &control).expect("an unchanged source converts");

        std::fs::copy(dir.path().join("d-flat.vmdk"), dir.path().join("elsewhere-flat.vmdk")).unwrap();
        let text = std::fs::read_to_string(&vmdk).unwrap().replace("d-flat.vmdk", "elsewhere-flat.vmdk");
        std::fs::write(&vmdk, text).unwrap();
        let changed = dir.path().join("changed.qcow2");
        match native.convert(&request(&changed), &control) {
            Err(ConvertError::Unsupported(detail)) => {
                assert!(detail.contains("elsewhere-flat.vmdk") && detail.contains("export changed"), "{detail}")
            }
            other => panic!("a rewritten source must be refused, got {other:?}"),
        }
    }

    /// Issue 10: cost follows extents, not virtual size. Three 64 TiB ZERO extents (a
    /// 300-byte descriptor) took 33 s per 64 TiB when every 4 MiB chunk was visited.
    #[test]
    fn huge_zero_extents_are_skipped_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.bin"), vec![0x5a; 1 << 20]).unwrap();
        let vmdk = dir.path().join("zero.vmdk");
        let zero = "RW 137438953472 ZERO\n".repeat(3);
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"vmfs\"\n{zero}RW 2048 FLAT \"d.bin\" 0\n"
        );
        std::fs::write(&vmdk, text).unwrap();
        let roots = SourceRoots::new(&[dir.path().to_owned()]);
        let control = JobControl::new(std::time::Duration::from_secs(600));
        let started = std::time::Instant::now();
        let info = Native::default().inspect(&vmdk, SourceFormat::Vmdk, &roots, &control).unwrap();
        assert_eq!(info.allocated_bytes, Some(1 << 20));
        let out = dir.path().join("out.qcow2");
        let request = ConversionRequest {
            source: &vmdk,
            format: SourceFormat::Vmdk,
            destination: &out,
            compression: None,
            ova_disk: None,
            inspected_files: None,
            roots: &roots,
            tap: None,
        };
        Native::default().convert(&request, &control).unwrap();
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(5), "192 TiB of ZERO extents took {took:?}");
        let at = format!("read -P 0x5a {} 1M", 3 * (64u64 << 40));
        let read = Command::new("qemu-io").args(["-f", "qcow2", "-r", "-c", &at]).arg(&out).output().unwrap();
        let said = String::from_utf8_lossy(&read.stdout);
        assert!(read.status.success() && !said.contains("Pattern verification failed"), "{said}");
        let before =
            Command::new("qemu-io").args(["-f", "qcow2", "-r", "-c", "read -P 0 0 1M"]).arg(&out).output().unwrap();
        assert!(!String::from_utf8_lossy(&before.stdout).contains("Pattern verification failed"));
    }
}
