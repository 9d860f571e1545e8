//! VMDK read natively: descriptors, sparse extents (monolithicSparse, twoGbMaxExtentSparse,
//! delta disks), stream-optimized extents in qemu-img's and VMware's shapes, FLAT/VMFS and
//! ZERO extents, and delta chains — behind [`super::DiskSource`].
//!
//! - [`open`]: a VMDK by path (a descriptor file or a monolithic sparse/stream file), with its
//!   extents and parents.
//! - [`open_stream`]: a monolithic sparse/stream VMDK from any [`ReadAt`] (an OVA member read in
//!   place); no descriptor file, no parents.
//! - [`scan_stream_markers`] / [`read_stream_sequential`]: one forward pass over a stream's
//!   markers, for sources that cannot seek and streams whose footer is damaged.
//! - [`is_sparse_extent`] / [`check_sparse_file`]: the structural check the daemon runs before
//!   handing a disk to qemu-img.
//!
//! Every offset in a hostile file is checked before use, every allocation is bounded by
//! [`Limits`], and every problem is an [`ImageError`], never a panic. Layout facts:
//! shared/FORMATS.md.

mod budget;
mod chain;
mod check;
mod descriptor;
mod errors;
mod flat;
mod gt_cache;
mod header;
mod packed;
mod regions;
mod sparse;
mod stream;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use chain::{open, open_confined, open_tapped};
pub use check::{check_sparse, check_sparse_file, is_sparse_extent};
pub use descriptor::{Access, Descriptor, ExtentType};
pub use header::{SparseHeader, VmdkError, COWD_MAGIC, SPARSE_MAGIC};
pub use stream::{read_stream_sequential, scan_stream_markers};

#[cfg(test)]
use header::FLAG_COMPRESSED;

use super::{push_plain_run, DiskSource, ExtentInfo, ImageError, PlainRun, ReadAt, SourceInfo};
use budget::Budget;
use flat::FlatExtent;
use regions::{push_region, Region};
use sparse::SparseExtent;

/// Bounds every parser obeys; over one is [`ImageError::Limit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest descriptor, in bytes: a descriptor file, or one embedded in a sparse extent.
    /// Default 64 KiB (real ones are under 2 KiB; a twoGbMaxExtent descriptor of a 2 TiB disk
    /// is about 40 KiB).
    pub max_descriptor_bytes: u64,
    /// Most extent lines in one descriptor. Default 4096 (an 8 TiB twoGbMaxExtent disk, the
    /// largest VMware's hosted products make).
    pub max_extents: usize,
    /// Most distinct files one disk opens, its extents and every parent's together: each stays
    /// open while the disk is read. Default 2048 (4 TiB in 2 GB extents). A job reads one disk
    /// at a time, so MAX_CONCURRENT (at most 256) jobs hold at most 256 × 2048 = 524288
    /// descriptors for extents, systemd's default hard RLIMIT_NOFILE; a VMDK naming thousands of
    /// files cannot starve the other jobs of descriptors (EMFILE).
    pub max_extent_files: usize,
    /// Most disks in a delta chain, the top one included. Default 16.
    pub max_chain_depth: usize,
    /// Most grain directory entries of one sparse extent (4 bytes each, read at open).
    /// Default 2 Mi entries: 64 TiB with 64 KiB grains and 512-entry grain tables.
    pub max_grain_directory_entries: u64,
    /// Largest compressed grain, in bytes, also bounded by structure (2 × grain + 4 KiB).
    /// Default 4 MiB: any grain up to 2 MiB, however incompressible.
    pub max_compressed_grain_bytes: u64,
    /// Memory for grain tables, over the whole image (every extent and parent), whatever the
    /// disk size. Tables read from the file are checked at open, then loaded when a read needs
    /// them into a cache of this many bytes that every reader thread shares (2 KiB per table
    /// of 512 entries, one per 32 MiB of disk with 64 KiB grains, plus 64 bytes of
    /// bookkeeping). Default 64 MiB: the tables of about 1 TiB of disk stay cached; larger
    /// disks are read with one `pread` per 1 GiB of disk when the cache misses.
    pub max_grain_table_bytes: u64,
    /// Memory for the grain map of a stream rebuilt from its markers (a VMware stream whose
    /// footer or tables are damaged, or one read from a pipe), held whole because there are
    /// no tables to read again: 2 KiB per 32 MiB of allocated disk. Default 1 GiB, 16 TiB of
    /// allocated grains; the only reader memory that grows with the disk.
    pub max_stream_map_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_descriptor_bytes: 64 << 10,
            max_extents: 4096,
            max_extent_files: 2048,
            max_chain_depth: 16,
            max_grain_directory_entries: 2 << 20,
            max_compressed_grain_bytes: 4 << 20,
            max_grain_table_bytes: 64 << 20,
            max_stream_map_bytes: 1 << 30,
        }
    }
}

/// Largest virtual disk accepted: 64 PiB (sums of hostile extent sizes stay far from overflow).
const MAX_VIRTUAL_BYTES: u64 = 1 << 56;

/// What one extent of the virtual disk is.
#[derive(Debug)]
enum Extent {
    Zero,
    Flat(FlatExtent),
    Sparse(SparseExtent),
}

/// An extent placed in the virtual disk.
#[derive(Debug)]
struct Placed {
    start: u64,
    len: u64,
    extent: Extent,
}

/// A VMDK opened for reading: its extents, laid end to end, and its parent when it is a delta.
#[derive(Debug)]
pub struct VmdkImage {
    size: u64,
    extents: Vec<Placed>,
    parent: Option<Box<VmdkImage>>,
    /// The file opened (or the stream's name).
    path: PathBuf,
    create_type: Option<String>,
    ddb: BTreeMap<String, String>,
    /// Extent files of this disk other than `path`.
    extent_files: Vec<PathBuf>,
    /// This disk's extents as its descriptor lists them, for `inspect`.
    extent_info: Vec<ExtentInfo>,
    /// The descriptor's content id, which a child's parentCID must match.
    cid: Option<u32>,
}

impl VmdkImage {
    /// What `inspect` shows: format `vmdk`, subformat = createType, sizes, every file read
    /// besides the top one, the chain (child first), the extents of every disk of the chain
    /// and the top descriptor's `ddb.*` keys.
    pub fn info(&self) -> SourceInfo {
        let mut referenced = Vec::new();
        let mut chain = Vec::new();
        let mut extents = Vec::new();
        let mut layer = Some(self);
        while let Some(image) = layer {
            if !std::ptr::eq(image, self) {
                referenced.push(image.path.clone());
            }
            referenced.extend(image.extent_files.iter().cloned());
            chain.push(image.path.clone());
            extents.extend(image.extent_info.iter().cloned());
            layer = image.parent.as_deref();
        }
        let mut seen = std::collections::HashSet::new();
        referenced.retain(|p| *p != self.path && seen.insert(p.clone()));
        if chain.len() == 1 {
            chain.clear();
        }
        SourceInfo {
            format: "vmdk".into(),
            subformat: self.create_type.clone(),
            virtual_size: self.size,
            referenced_files: referenced,
            chain,
            ddb: self.ddb.clone(),
            extents,
            // An inspection adds it (DiskSource::allocated_bytes): a walk of every table.
            allocated_bytes: None,
        }
    }

    /// The parent of a delta disk.
    pub fn parent(&self) -> Option<&VmdkImage> {
        self.parent.as_deref()
    }

    /// Whether any stream extent had its grain map rebuilt from markers (damaged footer).
    pub fn rebuilt_from_markers(&self) -> bool {
        self.extents.iter().any(|p| matches!(&p.extent, Extent::Sparse(s) if s.rebuilt_from_markers))
            || self.parent.as_ref().is_some_and(|p| p.rebuilt_from_markers())
    }

    /// Index of the first extent ending after `offset`.
    fn first_extent(&self, offset: u64) -> usize {
        self.extents.partition_point(|p| p.start + p.len <= offset)
    }

    /// The extents that `range` (clamped to the disk) touches, each with the part of it
    /// concerned, relative to the extent's start.
    fn extents_in(&self, range: Range<u64>) -> impl Iterator<Item = (&Placed, Range<u64>)> {
        let range = range.start.min(self.size)..range.end.min(self.size);
        self.extents[self.first_extent(range.start)..].iter().take_while(move |p| p.start < range.end).map(move |p| {
            let local = range.start.max(p.start) - p.start..range.end.min(p.start + p.len) - p.start;
            (p, local)
        })
    }

    /// Fills `buf` (virtual offset `at`) from the parent, or with zeros.
    fn read_below(&self, at: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        match &self.parent {
            Some(parent) if at < parent.size => {
                let n = (parent.size - at).min(buf.len() as u64) as usize;
                parent.read_at(at, &mut buf[..n])?;
                buf[n..].fill(0);
            }
            _ => buf.fill(0),
        }
        Ok(())
    }
}

impl DiskSource for VmdkImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, ImageError> {
        let mut regions = Vec::new();
        for (p, local) in self.extents_in(range) {
            match &p.extent {
                Extent::Zero => push_region(&mut regions, p.start + local.start..p.start + local.end, Region::Zero),
                Extent::Flat(f) => f.map(local, p.start, &mut regions),
                Extent::Sparse(s) => s.map(local, p.start, &mut regions)?,
            }
        }
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut push = |r: Range<u64>| {
            if r.is_empty() {
                return;
            }
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        };
        for (r, region) in regions {
            match region {
                Region::Data => push(r),
                Region::Zero => {}
                Region::Hole => {
                    if let Some(parent) = &self.parent {
                        let below = r.start.min(parent.size)..r.end.min(parent.size);
                        if !below.is_empty() {
                            for sub in parent.allocated(below)? {
                                push(sub);
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Past ZERO extents (zeros whatever a parent holds), in O(extents).
    fn next_data(&self, from: u64) -> Result<u64, ImageError> {
        let mut at = from.min(self.size);
        for p in &self.extents[self.first_extent(at)..] {
            if !matches!(p.extent, Extent::Zero) {
                break;
            }
            at = p.start + p.len;
        }
        Ok(at)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.size).ok_or_else(|| {
            ImageError::Corrupt(format!(
                "a read of {} bytes at {offset} goes past the end of the {}-byte disk {}",
                buf.len(),
                self.size,
                self.path.display()
            ))
        })?;
        let mut index = self.first_extent(offset);
        let mut holes = Vec::new();
        let mut pos = offset;
        while pos < end {
            let Some(p) = self.extents.get(index) else {
                // Extents cover the whole size; defensive.
                buf[(pos - offset) as usize..].fill(0);
                break;
            };
            let stop = end.min(p.start + p.len);
            let sub = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            let local = pos - p.start;
            match &p.extent {
                Extent::Zero => sub.fill(0),
                Extent::Flat(f) => f.read(local, sub)?,
                Extent::Sparse(s) => {
                    holes.clear();
                    s.read(local, sub, &mut holes)?;
                    for h in &holes {
                        self.read_below(pos + h.start as u64, &mut sub[h.clone()])?;
                    }
                }
            }
            pos = stop;
            index += 1;
        }
        Ok(())
    }

    /// FLAT/VMFS extents where their file has data, plain grains of sparse extents (runs of
    /// grains back to back in the file), and for the unallocated grains of a delta, the
    /// parent's runs. Zero extents, zeroed and compressed grains are never runs.
    fn plain_runs(&self, range: Range<u64>) -> Result<Vec<PlainRun<'_>>, ImageError> {
        let mut runs = Vec::new();
        let mut holes = Vec::new();
        for (p, local) in self.extents_in(range) {
            match &p.extent {
                Extent::Zero => {}
                Extent::Flat(f) => f.plain_runs(local, p.start, &mut runs),
                Extent::Sparse(s) => s.plain_runs(local, p.start, &mut runs, &mut holes)?,
            }
        }
        if let Some(parent) = &self.parent {
            let mut below = Vec::new();
            for hole in holes {
                let hole = hole.start.min(parent.size)..hole.end.min(parent.size);
                if !hole.is_empty() {
                    below.extend(parent.plain_runs(hole)?);
                }
            }
            if !below.is_empty() {
                // The parent's runs fall in the child's holes: put them in order, then merge.
                runs.extend(below);
                runs.sort_unstable_by_key(|r| r.range.start);
                let mut merged = Vec::with_capacity(runs.len());
                for run in runs {
                    push_plain_run(&mut merged, run);
                }
                runs = merged;
            }
        }
        Ok(runs)
    }
}

/// Opens a monolithic sparse or stream-optimized VMDK from any byte source — an OVA member
/// read in place through [`Slice`](super::Slice). `name` names it in messages. There is no
/// descriptor file and no parent: a delta disk is refused.
pub fn open_stream(source: Arc<dyn ReadAt>, name: &str, limits: &Limits) -> Result<VmdkImage, ImageError> {
    let len = source.len();
    let mut magic = [0u8; 4];
    if len >= 4 {
        source.read_exact_at(&mut magic, 0).map_err(|e| ImageError::io(name.as_ref(), e))?;
    }
    match u32::from_le_bytes(magic) {
        SPARSE_MAGIC => {}
        COWD_MAGIC => return Err(chain::cowd_unsupported(name)),
        _ => {
            let mut probe = vec![0u8; len.min(1024) as usize];
            source.read_exact_at(&mut probe, 0).map_err(|e| ImageError::io(name.as_ref(), e))?;
            if descriptor::looks_like_descriptor(&probe) {
                return Err(ImageError::Unsupported(format!(
                    "{name} is a VMDK descriptor, whose extents live in other files; only a monolithic sparse or stream-optimized VMDK can be read on its own"
                )));
            }
            return Err(ImageError::Corrupt(format!(
                "{name} is not a sparse VMDK: it does not start with KDMV (it starts with {})",
                chain::show_magic(&magic[..len.min(4) as usize])
            )));
        }
    }
    let mut budget = Budget::new(limits);
    let (extent, embedded) = SparseExtent::open(source, PathBuf::from(name), name, limits, &mut budget)?;
    let descriptor = match embedded {
        Some(bytes) => descriptor::parse(&bytes, name, limits, false)?,
        None => Descriptor::default(),
    };
    if let Some(parent_cid) = descriptor.parent_cid_value().map_err(|e| ImageError::Corrupt(format!("{name}: {e}")))? {
        return Err(ImageError::Unsupported(format!(
            "{name} is a delta disk (parentCID {parent_cid:08x}, parent {}): it only holds changes and needs its parent disk, which a single stream cannot provide",
            descriptor.parent_hint.as_deref().unwrap_or("not named")
        )));
    }
    let size = extent.header().capacity * header::SECTOR;
    let create_type = descriptor.create_type.clone().or_else(|| Some(chain::inferred_type(extent.header()).into()));
    Ok(VmdkImage {
        size,
        extents: vec![Placed { start: 0, len: size, extent: Extent::Sparse(extent) }],
        parent: None,
        path: PathBuf::from(name),
        create_type,
        cid: descriptor.cid.as_deref().and_then(descriptor::parse_cid),
        ddb: descriptor.ddb,
        extent_files: Vec::new(),
        extent_info: vec![whole_file_extent(Path::new(name), size)],
    })
}

/// A monolithic sparse or stream file as the one extent it is (its embedded descriptor's
/// extent line names the file as it was first created, which may no longer be its name).
fn whole_file_extent(path: &Path, size: u64) -> ExtentInfo {
    ExtentInfo {
        disk: path.to_owned(),
        kind: ExtentType::Sparse.name().into(),
        access: Access::ReadWrite.name().into(),
        file: Some(path.to_owned()),
        sectors: size / header::SECTOR,
        bytes: size,
        virtual_offset: 0,
        file_offset: 0,
    }
}

#[cfg(test)]
mod tests;
