//! OVA archives read in place: the tar index, the `.mf` checksums and the OVF descriptor.
//!
//! [`open`] reads only the tar headers (seeking over member data), the `.ovf` and the `.mf`,
//! and maps every disk of the OVF to the byte range of its member inside the OVA, so a disk
//! is converted straight out of the archive ([`OvaPackage::open_disk`]) without extracting
//! it or using extra disk space. [`verify_manifest`] streams the members the `.mf` lists and
//! checks their digests. [`parse_ovf`] reads a descriptor on its own; [`unpacked`] reads an
//! unpacked export (`vm.ovf` with its disks and `.mf` beside it in a directory).
//!
//! Everything in an OVA is untrusted: sizes and offsets are checked against the file, every
//! read is bounded by [`Limits`], `href`s may not leave the package ([`check_href`]), and
//! problems are [`ImageError`]s naming the member at fault, never panics.

pub mod mf;
pub mod ovf;
pub mod tar;
pub mod unpacked;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use mf::{DigestAlgorithm, ManifestCheck, ManifestEntry};
pub use ovf::{check_href, parse_ovf, sanitize_disk_id, OvfFile, OvfHardware};
use tar::{Member, MemberKind};

use super::{FileSource, ImageError, ReadAt, Slice};
use crate::text::{capped_list, shorten, MAX_LISTED};

/// Bounds on what an OVA may make the parser read or allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `.ovf` descriptor read, in bytes (default 4 MiB; real ones are a few KiB).
    pub max_ovf_bytes: u64,
    /// Most tar headers read (long-name and pax headers count) and most `References/File`
    /// and `.mf` lines accepted (default 10 000).
    pub max_members: usize,
    /// Most disks an OVF may define (default 64).
    pub max_disks: usize,
    /// Largest `.mf` manifest read, in bytes (default 1 MiB).
    pub max_mf_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_ovf_bytes: 4 << 20, max_members: 10_000, max_disks: 64, max_mf_bytes: 1 << 20 }
    }
}

/// An OVA, indexed: which member holds what, and what the OVF says about the VM.
#[derive(Debug, Clone)]
pub struct OvaPackage {
    /// The OVA file.
    pub path: PathBuf,
    /// Length of the OVA file when it was indexed; [`OvaPackage::open_disk`] and
    /// [`verify_manifest`] refuse a file whose length changed since.
    pub file_len: u64,
    /// The `.ovf` member's name in the archive.
    pub ovf_name: String,
    /// Disks in boot order: the first is the boot disk.
    pub disks: Vec<OvaDisk>,
    /// Disks the OVF defines without a file (`Disk` with no `ovf:fileRef`): the OVF asks for
    /// them to be created empty. Not in `disks`; the caller decides whether to create them.
    pub blank_disks: Vec<BlankDisk>,
    /// The VM's virtual hardware as the OVF describes it.
    pub hardware: OvfHardware,
    /// Members listed in the .mf and whether each digest matched (after verify_manifest).
    /// [`open`] fills it with every entry unverified; assign the result of
    /// [`verify_manifest`] to record the check. `None` when the OVA has no `.mf`.
    pub manifest: Option<ManifestCheck>,
    /// Oddities that did not stop the parse (a referenced non-disk file missing, a disk no
    /// hardware item attaches …), phrased for a report.
    pub warnings: Vec<String>,
    /// Every regular-file member by normalised name: its data range.
    members: HashMap<String, Range<u64>>,
    /// The `.mf` as parsed when the package was opened (never changed by the caller).
    mf_entries: Vec<ManifestEntry>,
    /// Directory of the `.ovf` inside the archive (`""` at the top), which `href`s and `.mf`
    /// names are relative to.
    base_dir: String,
}

/// A disk of an OVA, located inside the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvaDisk {
    /// The `ovf:diskId` made safe for file names (`V-<id>.qcow2`) and manifest disk ids: every
    /// character outside `[A-Za-z0-9_-]` becomes `_`, cut to 64 characters, `disk<N>` when
    /// empty, and `_2`, `_3` … appended when two ids would collide (see [`sanitize_disk_id`]).
    pub disk_id: String,
    /// The `ovf:diskId` as written in the OVF.
    pub ovf_disk_id: String,
    /// The File's ovf:href.
    pub href: String,
    /// The archive member holding the disk (the `href` resolved against the `.ovf`'s folder).
    pub member_name: String,
    /// `ovf:capacity` × `ovf:capacityAllocationUnits`, in bytes.
    pub capacity_bytes: u64,
    /// Byte range of the member's data inside the OVA file.
    pub member: Range<u64>,
    /// `ovf:format` URL (`…/vmdk.html#streamOptimized`), when given.
    pub format: Option<String>,
}

/// A disk the OVF defines with no file: to be created empty if wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlankDisk {
    /// Sanitised like [`OvaDisk::disk_id`].
    pub disk_id: String,
    /// The `ovf:diskId` as written in the OVF.
    pub ovf_disk_id: String,
    /// `ovf:capacity` × `ovf:capacityAllocationUnits`, in bytes.
    pub capacity_bytes: u64,
}

impl OvaPackage {
    /// The byte range of a member by its name as the OVF or `.mf` gives it (relative to the
    /// `.ovf`'s folder), if the archive holds it as a regular file.
    pub fn member_range(&self, href: &str) -> Option<Range<u64>> {
        let name = check_href(href).ok()?;
        find_member(&self.members, &self.base_dir, &name).map(|(_, r)| r.clone())
    }

    /// A disk's bytes, read in place from the OVA: opens the OVA (refusing it if its length
    /// changed since [`open`]) and returns the member's slice.
    pub fn open_disk(&self, disk: &OvaDisk) -> Result<Slice<FileSource>, ImageError> {
        let source = self.reopen()?;
        Slice::new(source, disk.member.start, disk.member.end - disk.member.start)
    }

    fn reopen(&self) -> Result<Arc<FileSource>, ImageError> {
        let source = FileSource::open(&self.path)?;
        if source.len() != self.file_len {
            return Err(ImageError::Corrupt(format!(
                "{} changed while being read (it was {} bytes, it is now {}); submit it again once it is complete",
                self.path.display(),
                self.file_len,
                source.len()
            )));
        }
        Ok(Arc::new(source))
    }
}

/// Looks `name` (already checked and normalised) up relative to `base_dir`, then at the top
/// of the archive, then percent-decoded (an `href` is a URI reference). Returns the member's
/// name and range.
fn find_member<'a>(
    members: &'a HashMap<String, Range<u64>>,
    base_dir: &str,
    name: &str,
) -> Option<(&'a String, &'a Range<u64>)> {
    let lookup = |n: &str| {
        let joined = if base_dir.is_empty() { n.to_owned() } else { format!("{base_dir}/{n}") };
        members.get_key_value(&joined).or_else(|| members.get_key_value(n))
    };
    lookup(name).or_else(|| {
        let decoded = percent_decode(name)?;
        let decoded = check_href(&decoded).ok()?;
        lookup(&decoded)
    })
}

/// `%XX` decoding; `None` when there is nothing to decode or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn read_member(src: &FileSource, path: &Path, range: &Range<u64>) -> Result<Vec<u8>, ImageError> {
    let mut data = vec![0u8; (range.end - range.start) as usize];
    src.read_exact_at(&mut data, range.start).map_err(|e| ImageError::io(path, e))?;
    Ok(data)
}

fn has_extension(name: &str, ext: &str) -> bool {
    // Bytes, not str slicing: a hostile name may end inside a multi-byte character.
    name.len() > ext.len() && name.as_bytes()[name.len() - ext.len()..].eq_ignore_ascii_case(ext.as_bytes())
}

/// Opens and indexes an OVA: reads the tar headers only (seeking over data), parses the OVF,
/// maps disks to members.
///
/// Refused: a file that is not a tar archive or is truncated, no `.ovf` or more than one, two
/// members with the same name, an `.ovf`/`.mf` over its limit, a disk whose `href` is unsafe
/// or names no member (or a member that is not a regular file, or whose size differs from
/// the OVF's `ovf:size`), a compressed or chunked disk, and everything [`parse_ovf`] refuses.
/// A missing non-disk file (an ISO, an NVRAM) is only a warning.
pub fn open(path: &Path, limits: &Limits) -> Result<OvaPackage, ImageError> {
    let src = FileSource::open(path)?;
    let index = tar::index(&src, path, limits.max_members)?;
    let shown = path.display();

    let mut members: HashMap<String, Range<u64>> = HashMap::new();
    let mut unusable: HashMap<String, MemberKind> = HashMap::new();
    for Member { name, kind, data, .. } in &index {
        match kind {
            MemberKind::File => {
                if members.insert(name.clone(), data.clone()).is_some() {
                    return Err(ImageError::Corrupt(format!(
                        "{shown} holds two members named {:?}; it is ambiguous which one is meant, so it is refused",
                        shorten(name)
                    )));
                }
            }
            MemberKind::Directory => {}
            other => {
                unusable.insert(name.clone(), *other);
            }
        }
    }

    // The descriptor.
    let mut ovfs: Vec<&String> = members.keys().filter(|n| has_extension(n, ".ovf")).collect();
    ovfs.sort();
    let ovf_name = match ovfs.as_slice() {
        [] => {
            return Err(ImageError::Corrupt(format!(
                "{shown} holds no .ovf descriptor, so it is not an OVA (members: {}); export the VM as OVF/OVA again",
                list_names(&index)
            )))
        }
        [one] => (*one).clone(),
        many => {
            return Err(ImageError::Corrupt(format!(
                "{shown} holds {} .ovf descriptors ({}); an OVA holds exactly one: export each VM on its own",
                many.len(),
                capped_list(many.iter(), MAX_LISTED)
            )))
        }
    };
    let ovf_range = members[&ovf_name].clone();
    if ovf_range.end - ovf_range.start > limits.max_ovf_bytes {
        return Err(ImageError::Limit(format!(
            "{shown}: the descriptor {ovf_name} is {} bytes, over the {}-byte limit; real descriptors are a few KiB",
            ovf_range.end - ovf_range.start,
            limits.max_ovf_bytes
        )));
    }
    let ovf = parse_ovf(&read_member(&src, path, &ovf_range)?, limits)
        .map_err(|e| prefix_error(e, &format!("{shown}: {ovf_name}")))?;
    let base_dir = match ovf_name.rfind('/') {
        Some(slash) => ovf_name[..slash].to_owned(),
        None => String::new(),
    };
    let mut warnings = ovf.warnings.clone();

    // The manifest: the one .mf, or the one named like the .ovf.
    let mut mfs: Vec<&String> = members.keys().filter(|n| has_extension(n, ".mf")).collect();
    mfs.sort();
    let ovf_stem = &ovf_name[..ovf_name.len() - 4];
    let mf_name = match mfs.as_slice() {
        [] => None,
        [one] => Some((*one).clone()),
        many => match many.iter().find(|m| m[..m.len() - 3] == *ovf_stem) {
            Some(m) => Some((*m).clone()),
            None => {
                return Err(ImageError::Corrupt(format!(
                    "{shown} holds {} .mf manifests and none is named after {ovf_name}; it is ambiguous which applies",
                    many.len()
                )))
            }
        },
    };
    let mf_entries = match &mf_name {
        None => Vec::new(),
        Some(name) => {
            let range = &members[name];
            if range.end - range.start > limits.max_mf_bytes {
                return Err(ImageError::Limit(format!(
                    "{shown}: the manifest {name} is {} bytes, over the {}-byte limit",
                    range.end - range.start,
                    limits.max_mf_bytes
                )));
            }
            mf::parse_mf(&read_member(&src, path, range)?, name, limits.max_members)
                .map_err(|e| prefix_error(e, &shown.to_string()))?
        }
    };

    // Disks.
    let mut disks = Vec::new();
    let mut blank_disks = Vec::new();
    for disk in &ovf.disks {
        let Some(file) = ovf.file_of(disk) else {
            blank_disks.push(BlankDisk {
                disk_id: disk.disk_id.clone(),
                ovf_disk_id: disk.ovf_disk_id.clone(),
                capacity_bytes: disk.capacity_bytes,
            });
            continue;
        };
        let href = check_href(&file.href)?;
        let Some((member_name, range)) = find_member(&members, &base_dir, &href) else {
            let why = match unusable.get(&join(&base_dir, &href)).or_else(|| unusable.get(&href)) {
                Some(kind) => format!("its member is not a regular file but {}", describe(*kind)),
                None => "the archive has no member of that name".to_owned(),
            };
            return Err(ImageError::Corrupt(format!(
                "{shown}: the OVF says disk {:?} is in file {:?}, but {why}; the OVA is incomplete or damaged, export \
                 it again",
                shorten(&disk.ovf_disk_id),
                shorten(&file.href)
            )));
        };
        let size = range.end - range.start;
        if let Some(declared) = file.size {
            if declared != size {
                return Err(ImageError::Corrupt(format!(
                    "{shown}: the OVF says file {:?} is {declared} bytes, but its member is {size} bytes; the OVA is \
                     damaged, export it again",
                    shorten(&file.href)
                )));
            }
        }
        disks.push(OvaDisk {
            disk_id: disk.disk_id.clone(),
            ovf_disk_id: disk.ovf_disk_id.clone(),
            href: file.href.clone(),
            member_name: member_name.clone(),
            capacity_bytes: disk.capacity_bytes,
            member: range.clone(),
            format: disk.format.clone(),
        });
    }
    let absent = ovf.references.iter().filter(|file| {
        let used = ovf.disks.iter().any(|d| d.file_ref.as_deref() == Some(file.id.as_str()));
        !used && check_href(&file.href).is_ok_and(|h| find_member(&members, &base_dir, &h).is_none())
    });
    warnings.extend(absent_files_warning(absent, "the OVA does not hold"));

    let manifest = mf_name.map(|name| ManifestCheck {
        mf_name: name,
        entries: mf_entries.clone(),
        unlisted_disks: unlisted_disks(&disks, &mf_entries, &base_dir),
    });
    Ok(OvaPackage {
        path: path.to_owned(),
        file_len: src.len(),
        ovf_name,
        disks,
        blank_disks,
        hardware: ovf.hardware,
        manifest,
        warnings,
        members,
        mf_entries,
        base_dir,
    })
}

/// One warning for every file (not a disk) the OVF references that the package lacks, with
/// the names capped: a descriptor may reference thousands.
fn absent_files_warning<'a>(absent: impl Iterator<Item = &'a OvfFile>, lacks: &str) -> Option<String> {
    let names: Vec<String> = absent.map(|f| format!("{:?}", shorten(&f.href))).collect();
    match names.len() {
        0 => None,
        1 => Some(format!("the OVF references file {}, which {lacks} (not a disk)", names[0])),
        n => Some(format!("the OVF references {n} files {lacks} (not disks): {}", capped_list(&names, MAX_LISTED))),
    }
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}/{name}")
    }
}

fn unlisted_disks(disks: &[OvaDisk], entries: &[ManifestEntry], base_dir: &str) -> Vec<String> {
    disks
        .iter()
        .filter(|d| !entries.iter().any(|e| e.file == d.member_name || join(base_dir, &e.file) == d.member_name))
        .map(|d| d.href.clone())
        .collect()
}

fn describe(kind: MemberKind) -> &'static str {
    match kind {
        MemberKind::File => "a regular file",
        MemberKind::Directory => "a directory",
        MemberKind::Sparse => "a GNU sparse file",
        MemberKind::Other(b'1') => "a hard link",
        MemberKind::Other(b'2') => "a symbolic link",
        MemberKind::Other(_) => "a special file",
    }
}

fn list_names(index: &[Member]) -> String {
    capped_list(index.iter().map(|m| m.name.as_str()), MAX_LISTED)
}

fn prefix_error(e: ImageError, prefix: &str) -> ImageError {
    match e {
        ImageError::Corrupt(m) => ImageError::Corrupt(format!("{prefix}: {m}")),
        ImageError::Unsupported(m) => ImageError::Unsupported(format!("{prefix}: {m}")),
        ImageError::Limit(m) => ImageError::Limit(format!("{prefix}: {m}")),
        io => io,
    }
}

/// Streams every member listed in the .mf once and checks SHA1/SHA256 digests; a mismatch or
/// a listed-but-missing member is an error naming the member.
///
/// Returns the [`ManifestCheck`] with every entry `verified` (assign it to
/// [`OvaPackage::manifest`]); an OVA without a `.mf` gives an error
/// ([`ImageError::Unsupported`]) so that a caller that wants a check knows none was made.
/// SHA512 lines are checked as well. Uses the `.mf` as parsed by [`open`], not the public
/// `manifest` field.
pub fn verify_manifest(pkg: &OvaPackage) -> Result<ManifestCheck, ImageError> {
    let src = pkg.reopen()?;
    verify_manifest_by(pkg, &mut |range, algorithms| {
        mf::digest_range(&*src, range.start, range.end - range.start, algorithms)
            .map_err(|e| ImageError::io(&pkg.path, e))
    })
}

/// A byte range of the OVA and the `.mf` algorithms its digests are checked with.
pub type DigestedRange = (Range<u64>, Vec<DigestAlgorithm>);

/// Gives the lower-case hex digests of a byte range of the OVA, one per algorithm, in order.
pub type RangeDigests<'a> = dyn FnMut(&Range<u64>, &[DigestAlgorithm]) -> Result<Vec<String>, ImageError> + 'a;

/// The byte ranges [`verify_manifest`] hashes, each with the algorithms it checks: for a
/// caller that takes the digests in a pass of its own ([`crate::image::tap::Tap::watch`]).
/// Refused as [`verify_manifest`] refuses it: no `.mf`, or a listed member the OVA lacks.
pub fn manifest_ranges(pkg: &OvaPackage) -> Result<Vec<DigestedRange>, ImageError> {
    let mut ranges = Vec::new();
    verify_manifest_by(pkg, &mut |range, algorithms| {
        ranges.push((range.clone(), algorithms.to_vec()));
        Ok(Vec::new())
    })?;
    Ok(ranges)
}

/// [`verify_manifest`] with the digests of each member's range given by `digest` (one
/// lower-case hex digest per algorithm, in order) instead of read here.
pub fn verify_manifest_by(pkg: &OvaPackage, digest: &mut RangeDigests<'_>) -> Result<ManifestCheck, ImageError> {
    let Some(listed) = &pkg.manifest else {
        return Err(ImageError::Unsupported(format!(
            "{} has no .mf manifest, so there are no digests to check",
            pkg.path.display()
        )));
    };
    let shown = pkg.path.display();
    let mut entries = pkg.mf_entries.clone();
    // Each member once, in the order the .mf first lists it, with all the digests it is listed with.
    let mut done = vec![false; entries.len()];
    for first in 0..entries.len() {
        if done[first] {
            continue;
        }
        let file = entries[first].file.clone();
        let Some((_, range)) = find_member(&pkg.members, &pkg.base_dir, &file) else {
            return Err(ImageError::Corrupt(format!(
                "{shown}: the manifest {} lists {:?}, but the OVA has no such member; the OVA is incomplete, \
                 export it again",
                listed.mf_name,
                shorten(&file)
            )));
        };
        let same: Vec<usize> = (first..entries.len()).filter(|&i| entries[i].file == file).collect();
        let algorithms: Vec<DigestAlgorithm> = same.iter().map(|&i| entries[i].algorithm).collect();
        let actual = digest(range, &algorithms)?;
        if actual.len() != algorithms.len() {
            // Only `manifest_ranges` gives none: it lists the ranges, it checks nothing.
            for &i in &same {
                done[i] = true;
            }
            continue;
        }
        for (&i, actual) in same.iter().zip(actual) {
            let entry = &mut entries[i];
            if actual != entry.expected {
                return Err(ImageError::Corrupt(format!(
                    "{shown}: {} of {:?} is {actual}, but the manifest {} says {}; the OVA is damaged or was \
                     modified, copy or export it again",
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
    Ok(ManifestCheck {
        mf_name: listed.mf_name.clone(),
        entries,
        unlisted_disks: unlisted_disks(&pkg.disks, &pkg.mf_entries, &pkg.base_dir),
    })
}
