//! An unpacked OVF export: `vm.ovf` with its disks (and optionally `vm.mf`) in its directory,
//! as `ovftool` writes an export to a folder and HyperSDK's ovf export method leaves it on the
//! share.
//!
//! The descriptor is parsed as inside an OVA ([`parse_ovf`]). Each `href` is checked
//! ([`check_href`]: relative, no `..`, no URL) and resolved against the `.ovf`'s directory.
//! Every file read besides the `.ovf` itself — the `.mf`, each disk, each file the `.mf`
//! lists — is first handed to the caller's [`Confine`] (SOURCE_ROOTS in the daemon), and only
//! the path it returns is opened: a symlink in the export that leads outside is refused before
//! a byte of its target is read.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::mf::{self, DigestAlgorithm, ManifestCheck, ManifestEntry};
use super::ovf::{check_href, parse_ovf, OvfDisk, OvfFile, OvfHardware};
use super::{absent_files_warning, percent_decode, prefix_error, BlankDisk, Limits};
use crate::image::sniff::{self, Kind};
use crate::image::{FileSource, ImageError, ReadAt};
use crate::manifest::SourceFormat;
use crate::text::shorten;

/// Admits a file the package references: returns the path to open (symlinks resolved), or
/// refuses it. The daemon confines to SOURCE_ROOTS; commands run by hand use [`unconfined`].
pub type Confine<'a> = &'a dyn Fn(&Path) -> Result<PathBuf, ImageError>;

/// For commands run by hand, which read what their user can: resolves symlinks and requires a
/// regular file (a FIFO or a device named by an `href` would block or never end).
pub fn unconfined(path: &Path) -> Result<PathBuf, ImageError> {
    let resolved = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::Corrupt(format!(
            "{} does not exist; the export is incomplete, copy every file of it",
            path.display()
        )),
        _ => ImageError::io(path, e),
    })?;
    let meta = std::fs::metadata(&resolved).map_err(|e| ImageError::io(path, e))?;
    if !meta.is_file() {
        return Err(ImageError::Corrupt(format!("{} is not a regular file", path.display())));
    }
    Ok(resolved)
}

/// An OVF descriptor and the files beside it.
#[derive(Debug, Clone)]
pub struct UnpackedOvf {
    /// The `.ovf` file.
    pub ovf_path: PathBuf,
    /// Its directory, which `href`s and `.mf` names are relative to.
    pub dir: PathBuf,
    /// Disks in boot order: the first is the boot disk.
    pub disks: Vec<UnpackedDisk>,
    /// Disks the OVF defines without a file (to be created empty); not converted.
    pub blank_disks: Vec<BlankDisk>,
    /// The VM's virtual hardware as the OVF describes it.
    pub hardware: OvfHardware,
    /// The `<ovf stem>.mf` beside the descriptor, when there is one; entries unverified until
    /// [`verify_manifest`].
    pub manifest: Option<ManifestCheck>,
    /// Oddities that did not stop the parse, phrased for a report.
    pub warnings: Vec<String>,
}

/// A disk of an unpacked OVF: a file of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackedDisk {
    /// The `ovf:diskId` made safe for file names, as for an OVA ([`super::OvaDisk::disk_id`]).
    pub disk_id: String,
    /// The `ovf:diskId` as written in the OVF.
    pub ovf_disk_id: String,
    /// The File's `ovf:href`.
    pub href: String,
    /// The disk file, as [`Confine`] admitted it.
    pub path: PathBuf,
    /// `ovf:capacity` × `ovf:capacityAllocationUnits`, in bytes.
    pub capacity_bytes: u64,
    /// The disk file's format, told by its first bytes: VMDK (what every exporter writes)
    /// unless they say qcow2, VHD, VHDX or VDI.
    pub source_format: SourceFormat,
}

/// Whether `path` is an OVF descriptor (XML naming an `Envelope`), not an OVA archive.
pub fn is_ovf_descriptor(path: &Path) -> bool {
    sniff::sniff_file(path).is_ok_and(|kind| kind == Kind::Ovf)
}

/// Reads the descriptor at `ovf_path` (already admitted by the caller) and the `.mf` beside
/// it, and resolves every disk to its file through `confine`.
///
/// Refused, besides what [`parse_ovf`] and [`mf::parse_mf`] refuse: a descriptor or `.mf`
/// over its limit, a disk whose `href` is unsafe, missing or refused by `confine`, whose size
/// differs from `ovf:size`, or whose first bytes are not a disk image. A missing non-disk file
/// (an ISO, an NVRAM) is only a warning.
pub fn open(ovf_path: &Path, limits: &Limits, confine: Confine<'_>) -> Result<UnpackedOvf, ImageError> {
    let shown = ovf_path.display().to_string();
    let dir = match ovf_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let xml = read_bounded(ovf_path, limits.max_ovf_bytes, "descriptor")?;
    let ovf = parse_ovf(&xml, limits).map_err(|e| prefix_error(e, &shown))?;
    let mut warnings = ovf.warnings.clone();

    let manifest = read_mf(ovf_path, &dir, limits, confine)?;
    let mut disks = Vec::new();
    let mut blank_disks = Vec::new();
    for disk in &ovf.disks {
        match ovf.file_of(disk) {
            Some(file) => disks.push(locate_disk(&shown, &dir, disk, file, confine)?),
            None => blank_disks.push(BlankDisk {
                disk_id: disk.disk_id.clone(),
                ovf_disk_id: disk.ovf_disk_id.clone(),
                capacity_bytes: disk.capacity_bytes,
            }),
        }
    }
    let absent = ovf.references.iter().filter(|file| {
        let used = ovf.disks.iter().any(|d| d.file_ref.as_deref() == Some(file.id.as_str()));
        !used && resolve(&dir, &file.href).is_ok_and(|p| std::fs::symlink_metadata(p).is_err())
    });
    warnings.extend(absent_files_warning(absent, "is not in the export's directory"));
    let manifest = manifest.map(|m| ManifestCheck { unlisted_disks: unlisted(&disks, &m.entries), ..m });
    Ok(UnpackedOvf {
        ovf_path: ovf_path.to_owned(),
        dir,
        disks,
        blank_disks,
        hardware: ovf.hardware,
        manifest,
        warnings,
    })
}

/// The `<ovf stem>.mf` beside the descriptor, if there is one, admitted by `confine` and parsed.
fn read_mf(
    ovf_path: &Path,
    dir: &Path,
    limits: &Limits,
    confine: Confine<'_>,
) -> Result<Option<ManifestCheck>, ImageError> {
    let name = format!("{}.mf", ovf_path.file_stem().unwrap_or_default().to_string_lossy());
    let path = dir.join(&name);
    if std::fs::symlink_metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Ok(None);
    }
    let text = read_bounded(&confine(&path)?, limits.max_mf_bytes, "manifest")?;
    let entries =
        mf::parse_mf(&text, &name, limits.max_members).map_err(|e| prefix_error(e, &dir.display().to_string()))?;
    Ok(Some(ManifestCheck { mf_name: name, entries, unlisted_disks: Vec::new() }))
}

/// The file of `disk`, admitted by `confine`, of the size the OVF gives and with the first
/// bytes of a disk image.
fn locate_disk(
    shown: &str,
    dir: &Path,
    disk: &OvfDisk,
    file: &OvfFile,
    confine: Confine<'_>,
) -> Result<UnpackedDisk, ImageError> {
    let what = format!("{shown}: disk {:?} (file {:?})", shorten(&disk.ovf_disk_id), shorten(&file.href));
    let path = confine(&resolve(dir, &file.href)?).map_err(|e| prefix_error(e, &what))?;
    let size = std::fs::metadata(&path).map_err(|e| ImageError::io(&path, e))?.len();
    if let Some(declared) = file.size.filter(|&d| d != size) {
        return Err(ImageError::Corrupt(format!(
            "{what}: the OVF says the file is {declared} bytes, but it is {size} bytes; the export is incomplete \
             or damaged, copy or export it again"
        )));
    }
    Ok(UnpackedDisk {
        disk_id: disk.disk_id.clone(),
        ovf_disk_id: disk.ovf_disk_id.clone(),
        href: file.href.clone(),
        source_format: disk_format(&path, &what)?,
        path,
        capacity_bytes: disk.capacity_bytes,
    })
}

/// Hashes every file the `.mf` lists (each admitted by `confine` first) and checks it against
/// its digests; a mismatch or a listed file that is missing is an error naming the file.
/// Returns the [`ManifestCheck`] with every entry `verified`. A package without a `.mf`
/// gives [`ImageError::Unsupported`], so that a caller that wants a check knows none was made.
pub fn verify_manifest(package: &UnpackedOvf, confine: Confine<'_>) -> Result<ManifestCheck, ImageError> {
    let Some(listed) = &package.manifest else {
        return Err(ImageError::Unsupported(format!(
            "{} has no .mf manifest beside it, so there are no digests to check",
            package.ovf_path.display()
        )));
    };
    let mut entries = listed.entries.clone();
    let mut done = vec![false; entries.len()];
    for first in 0..entries.len() {
        if done[first] {
            continue;
        }
        let file = entries[first].file.clone();
        let what = format!("{}: the manifest {} lists {:?}", package.dir.display(), listed.mf_name, shorten(&file));
        let path = confine(&resolve(&package.dir, &file)?).map_err(|e| prefix_error(e, &what))?;
        let source = FileSource::open(&path)?;
        let same: Vec<usize> = (first..entries.len()).filter(|&i| entries[i].file == file).collect();
        let algorithms: Vec<DigestAlgorithm> = same.iter().map(|&i| entries[i].algorithm).collect();
        let actual = mf::digest_range(&source, 0, source.len(), &algorithms).map_err(|e| ImageError::io(&path, e))?;
        for (&i, actual) in same.iter().zip(actual) {
            let entry = &mut entries[i];
            if actual != entry.expected {
                return Err(ImageError::Corrupt(format!(
                    "{}: {} of {:?} is {actual}, but the manifest {} says {}; the export is damaged or was modified, \
                     copy or export it again",
                    package.dir.display(),
                    entry.algorithm.as_str(),
                    shorten(&file),
                    listed.mf_name,
                    entry.expected
                )));
            }
            entry.verified = true;
            done[i] = true;
        }
    }
    Ok(ManifestCheck { entries, ..listed.clone() })
}

/// `dir/href` for a checked `href`; its percent-decoded form when only that exists (an `href`
/// is a URI reference).
fn resolve(dir: &Path, href: &str) -> Result<PathBuf, ImageError> {
    let name = check_href(href)?;
    let plain = dir.join(&name);
    if std::fs::symlink_metadata(&plain).is_err() {
        if let Some(decoded) = percent_decode(&name).and_then(|d| check_href(&d).ok()) {
            let decoded = dir.join(decoded);
            if std::fs::symlink_metadata(&decoded).is_ok() {
                return Ok(decoded);
            }
        }
    }
    Ok(plain)
}

/// Reads a whole file of at most `max` bytes.
fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let file = std::fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut data = Vec::new();
    file.take(max + 1).read_to_end(&mut data).map_err(|e| ImageError::io(path, e))?;
    if data.len() as u64 > max {
        return Err(ImageError::Limit(format!(
            "{}: the {what} is over the {max}-byte limit; real ones are a few KiB",
            path.display()
        )));
    }
    Ok(data)
}

/// The format of a disk file by its first bytes; a file that is plainly no disk is refused.
fn disk_format(path: &Path, what: &str) -> Result<SourceFormat, ImageError> {
    let kind = sniff::sniff_file(path)?;
    match kind.source_format() {
        Some(SourceFormat::Ova) => {}
        Some(format) => return Ok(format),
        None if kind == Kind::Unknown => return Ok(SourceFormat::Vmdk),
        None => {}
    }
    Err(ImageError::Corrupt(format!(
        "{what} is {}, not a disk image; the export is damaged, export it again",
        kind.describe()
    )))
}

/// Disk files the `.mf` does not list.
fn unlisted(disks: &[UnpackedDisk], entries: &[ManifestEntry]) -> Vec<String> {
    disks
        .iter()
        .filter(|d| !entries.iter().any(|e| check_href(&d.href).is_ok_and(|h| h == e.file)))
        .map(|d| d.href.clone())
        .collect()
}
