//! Opening a VMDK by path: a descriptor file with its extent files, or a monolithic sparse file
//! with an embedded descriptor; then, for a delta disk, its parents, recursively.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::budget::Budget;
use super::descriptor::{self, Access, Descriptor, ExtentType};
use super::flat::FlatExtent;
use super::header::{SparseHeader, COWD_MAGIC, SECTOR, SPARSE_MAGIC};
use super::sparse::SparseExtent;
use super::{whole_file_extent, Extent, Limits, Placed, VmdkImage, MAX_VIRTUAL_BYTES};
use crate::image::tap::Tap;
use crate::image::{ExtentInfo, FileSource, ImageError, ReadAt};
use crate::source::{SourceError, SourceRoots};

/// Opens the VMDK at `path` — a descriptor file (`# Disk DescriptorFile`) or a monolithic
/// sparse/stream file — with its extents (resolved next to the descriptor) and, for a delta
/// disk, its parents (`parentFileNameHint`, next to the child), checking each parent's CID.
/// Any file may be named: for the commands run by hand. The daemon uses [`open_confined`].
pub fn open(path: &Path, limits: &Limits) -> Result<VmdkImage, ImageError> {
    open_confined(path, limits, &SourceRoots::anywhere())
}

/// [`open`], with every file — the disk, its extents, its parents — confined to `roots`
/// before it is opened and checked again through its descriptor ([`SourceRoots::open`]): a
/// name outside them is refused unread, so none of its bytes or its size can reach a message.
pub fn open_confined(path: &Path, limits: &Limits, roots: &SourceRoots) -> Result<VmdkImage, ImageError> {
    open_with(path, limits, roots, None)
}

/// [`open_confined`], reading the top file (`path`: a descriptor, or a sparse or stream
/// file) through `tap`, which opened the same file: its digest is taken as it is converted.
/// Extents and parents are read as usual.
pub fn open_tapped(path: &Path, limits: &Limits, roots: &SourceRoots, tap: Arc<Tap>) -> Result<VmdkImage, ImageError> {
    open_with(path, limits, roots, Some(tap))
}

fn open_with(
    path: &Path,
    limits: &Limits,
    roots: &SourceRoots,
    tap: Option<Arc<Tap>>,
) -> Result<VmdkImage, ImageError> {
    let mut ctx = Ctx { limits, roots, budget: Budget::new(limits), chain: Vec::new(), files: HashMap::new(), tap };
    open_layer(path, &mut ctx)
}

struct Ctx<'a> {
    limits: &'a Limits,
    /// The only way a file is opened here.
    roots: &'a SourceRoots,
    budget: Budget,
    /// Disks of the chain opened so far, child first: (canonical path, path as opened).
    chain: Vec<(PathBuf, PathBuf)>,
    /// Files opened, shared by extents that name the same file.
    files: HashMap<PathBuf, (Arc<FileSource>, PathBuf)>,
    /// Reads the top file instead of its [`FileSource`], taken by the first layer opened.
    tap: Option<Arc<Tap>>,
}

/// The file name of `path`, for messages.
fn short(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

pub(crate) fn cowd_unsupported(name: &str) -> ImageError {
    ImageError::Unsupported(format!(
        "{name} is a COWD sparse extent (an ESX 2/3 or VMFS snapshot delta), which is not read natively; consolidate the snapshots or export the disk again"
    ))
}

pub(crate) fn show_magic(bytes: &[u8]) -> String {
    if !bytes.is_empty() && bytes.iter().all(|b| b.is_ascii_graphic()) {
        format!("\"{}\"", String::from_utf8_lossy(bytes))
    } else {
        format!("0x{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

pub(crate) fn inferred_type(h: &SparseHeader) -> &'static str {
    if h.deflate() {
        "streamOptimized"
    } else {
        "monolithicSparse"
    }
}

/// Opens a regular file once, through the confinement of `ctx.roots`; devices and other
/// special files are refused without being opened (a FIFO would block). Returns the file and
/// its path after symlinks.
fn open_file(path: &Path, ctx: &mut Ctx) -> Result<(Arc<FileSource>, PathBuf), ImageError> {
    if let Some(f) = ctx.files.get(path) {
        return Ok(f.clone());
    }
    if ctx.files.len() >= ctx.limits.max_extent_files {
        return Err(ImageError::Limit(format!(
            "{} needs more than {} files (its own, its extents' and its parent disks'; max_extent_files), each of which would stay open while it is read; convert it to a single-file VMDK (monolithicSparse or streamOptimized) first",
            short(ctx.chain.first().map_or(path, |(_, p)| p.as_path())),
            ctx.limits.max_extent_files
        )));
    }
    let confined = match ctx.roots.open(path) {
        Ok(confined) => confined,
        // Only a name already judged inside the roots gets here: its type may be told.
        Err(SourceError::NotAFile { .. }) => return Err(not_a_file(path)),
        Err(SourceError::Missing { .. }) => {
            return Err(ImageError::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)))
        }
        Err(e) => return Err(e.into()),
    };
    let file = Arc::new(FileSource::from_file(confined.file, path)?);
    ctx.files.insert(path.to_owned(), (file.clone(), confined.resolved.clone()));
    Ok((file, confined.resolved))
}

fn not_a_file(path: &Path) -> ImageError {
    let device =
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device() || m.file_type().is_char_device());
    if device {
        ImageError::Unsupported(format!(
            "{} is a device: a device-backed extent cannot be converted from files; export the disk as a file",
            path.display()
        ))
    } else {
        ImageError::Unsupported(format!("{} is not a regular file", path.display()))
    }
}

fn open_layer(path: &Path, ctx: &mut Ctx) -> Result<VmdkImage, ImageError> {
    let name = short(path);
    let (file, canonical) = open_file(path, ctx)?;
    ctx.chain.push((canonical, path.to_owned()));
    let file: Arc<dyn ReadAt> = match ctx.tap.take() {
        Some(tap) => tap,
        None => file,
    };
    let mut probe = vec![0u8; file.len().min(1024) as usize];
    file.read_exact_at(&mut probe, 0).map_err(|e| ImageError::io(path, e))?;
    let magic = probe.get(..4).map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
    let (layout, descriptor) = if magic == Some(SPARSE_MAGIC) {
        let (extent, embedded) = SparseExtent::open(file, path.to_owned(), &name, ctx.limits, &mut ctx.budget)?;
        let descriptor = match embedded {
            Some(bytes) => descriptor::parse(&bytes, &name, ctx.limits, false)?,
            None => Descriptor::default(),
        };
        let mut descriptor = descriptor;
        if descriptor.create_type.is_none() {
            descriptor.create_type = Some(inferred_type(extent.header()).into());
        }
        let size = extent.header().capacity * SECTOR;
        let layout = Layout {
            placed: vec![Placed { start: 0, len: size, extent: Extent::Sparse(extent) }],
            files: Vec::new(),
            info: vec![whole_file_extent(path, size)],
            size,
        };
        (layout, descriptor)
    } else if magic == Some(COWD_MAGIC) {
        return Err(cowd_unsupported(&name));
    } else if descriptor::looks_like_descriptor(&probe) {
        if file.len() > ctx.limits.max_descriptor_bytes {
            return Err(ImageError::Limit(format!(
                "the descriptor {name} is {} bytes, over the limit of {} bytes (max_descriptor_bytes): it is not a real descriptor",
                file.len(),
                ctx.limits.max_descriptor_bytes
            )));
        }
        let mut text = vec![0u8; file.len() as usize];
        file.read_exact_at(&mut text, 0).map_err(|e| ImageError::io(path, e))?;
        let descriptor = descriptor::parse(&text, &name, ctx.limits, true)?;
        (open_extents(path, &name, &descriptor, ctx)?, descriptor)
    } else {
        return Err(ImageError::Corrupt(format!(
            "{name} is neither a VMDK descriptor nor a sparse VMDK extent (it starts with {})",
            show_magic(&probe[..probe.len().min(4)])
        )));
    };
    let cid = descriptor.cid.as_deref().and_then(descriptor::parse_cid);
    let parent_cid = descriptor.parent_cid_value().map_err(|e| ImageError::Corrupt(format!("{name}: {e}")))?;
    let parent = match parent_cid {
        None => None,
        Some(parent_cid) => Some(Box::new(open_parent(path, &name, parent_cid, &descriptor, ctx)?)),
    };
    Ok(VmdkImage {
        size: layout.size,
        extents: layout.placed,
        parent,
        path: path.to_owned(),
        create_type: descriptor.create_type,
        ddb: descriptor.ddb,
        extent_files: layout.files,
        extent_info: layout.info,
        cid,
    })
}

/// Opens the parent of the delta disk `child` and checks that it is the disk the delta was
/// taken from.
fn open_parent(
    child: &Path,
    name: &str,
    parent_cid: u32,
    d: &Descriptor,
    ctx: &mut Ctx,
) -> Result<VmdkImage, ImageError> {
    let hint = d.parent_hint.as_deref().filter(|h| !h.is_empty()).ok_or_else(|| {
        ImageError::Corrupt(format!(
            "{name} is a delta disk (parentCID {parent_cid:08x}) but has no parentFileNameHint naming its parent"
        ))
    })?;
    let (parent_path, canonical) = resolve_parent(child, hint, ctx.roots)?;
    let chain_text = |ctx: &Ctx, last: &Path| {
        ctx.chain.iter().map(|(_, p)| short(p)).chain(std::iter::once(short(last))).collect::<Vec<_>>().join(" → ")
    };
    if ctx.chain.iter().any(|(c, _)| *c == canonical) {
        return Err(ImageError::Corrupt(format!(
            "the delta chain of {} loops back on itself ({}): the parentFileNameHint entries are corrupt",
            short(&ctx.chain[0].1),
            chain_text(ctx, &parent_path)
        )));
    }
    if ctx.chain.len() >= ctx.limits.max_chain_depth {
        return Err(ImageError::Limit(format!(
            "the delta chain of {} is deeper than {} disks (max_chain_depth): {} → …; consolidate the snapshots first",
            short(&ctx.chain[0].1),
            ctx.limits.max_chain_depth,
            chain_text(ctx, &parent_path)
        )));
    }
    let parent = open_layer(&parent_path, ctx)?;
    match parent.cid {
        Some(cid) if cid == parent_cid => Ok(parent),
        Some(cid) => Err(ImageError::Corrupt(format!(
            "{name} does not belong to its parent {}: its parentCID is {parent_cid:08x} but the parent's CID is {cid:08x} (the parent was changed after the delta was taken, or it is another disk); refusing to combine them",
            parent_path.display()
        ))),
        None => Err(ImageError::Corrupt(format!(
            "the parent {} of {name} has no CID in its descriptor, so it cannot be checked against the delta's parentCID {parent_cid:08x}",
            parent_path.display()
        ))),
    }
}

/// The parent named by `hint`, as given and after symlinks: relative to the child's
/// directory, or absolute; VMware often records an absolute datastore (or Windows) path, so
/// the hint's file name next to the child is tried as well. Only names inside `roots` are
/// looked at, so the answer does not tell whether a file outside them exists.
fn resolve_parent(child: &Path, hint: &str, roots: &SourceRoots) -> Result<(PathBuf, PathBuf), ImageError> {
    let dir = child.parent().unwrap_or(Path::new(""));
    let direct = dir.join(hint);
    let refused = match roots.confine(&direct) {
        Ok(resolved) => return Ok((direct, resolved)),
        Err(e) => e,
    };
    if let Some(base) = hint.rsplit(['/', '\\']).next().filter(|b| !b.is_empty() && *b != hint) {
        let beside = dir.join(base);
        if let Ok(resolved) = roots.confine(&beside) {
            return Ok((beside, resolved));
        }
    }
    Err(match refused {
        SourceError::Missing { .. } => ImageError::io(
            &direct,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the parent disk \"{hint}\" named by {} (parentFileNameHint) is missing", short(child)),
            ),
        ),
        other => other.into(),
    })
}

/// The extents of one disk, laid end to end.
struct Layout {
    placed: Vec<Placed>,
    /// Extent files other than the disk's own.
    files: Vec<PathBuf>,
    /// Every extent line, for `inspect`.
    info: Vec<ExtentInfo>,
    size: u64,
}

/// Opens the extents of a descriptor file and lays them end to end.
fn open_extents(path: &Path, name: &str, d: &Descriptor, ctx: &mut Ctx) -> Result<Layout, ImageError> {
    if d.extents.is_empty() {
        return Err(ImageError::Corrupt(format!("the descriptor {name} lists no extents")));
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut placed = Vec::new();
    let mut files = Vec::new();
    let mut info = Vec::new();
    let mut start = 0u64;
    for line in &d.extents {
        let at = format!("the {} extent on line {} of {name}", line.kind.name(), line.line);
        if line.access == Access::NoAccess {
            return Err(ImageError::Unsupported(format!(
                "{at} is NOACCESS: VMware marks its data as unreadable, so the disk cannot be converted"
            )));
        }
        let len = line
            .sectors
            .checked_mul(SECTOR)
            .filter(|len| start.checked_add(*len).is_some_and(|end| end <= MAX_VIRTUAL_BYTES))
            .ok_or_else(|| {
                ImageError::Corrupt(format!("{at} makes the disk larger than 64 PiB: the descriptor is corrupt"))
            })?;
        let extent = match line.kind {
            ExtentType::Zero => Extent::Zero,
            ExtentType::VmfsRdm | ExtentType::VmfsRdmp | ExtentType::VmfsRaw => {
                return Err(ImageError::Unsupported(format!(
                    "{at} is a device-backed extent (a raw device mapping or raw disk): it cannot be converted from files; export the disk as a file"
                )))
            }
            ExtentType::VmfsSparse => {
                return Err(ImageError::Unsupported(format!(
                    "{at} is a VMFSSPARSE (COWD) snapshot delta, which is not read natively; consolidate the snapshots or export the disk again"
                )))
            }
            ExtentType::SeSparse => {
                return Err(ImageError::Unsupported(format!(
                    "{at} is a SESPARSE snapshot delta, which is not read natively; consolidate the snapshots or export the disk again"
                )))
            }
            ExtentType::Flat | ExtentType::Vmfs | ExtentType::Sparse => {
                let file_name = line.file.as_deref().unwrap_or_default();
                let file_path = dir.join(file_name);
                let (file, _) = open_file(&file_path, ctx)?;
                files.push(file_path.clone());
                if line.kind == ExtentType::Sparse {
                    open_sparse_extent(&file_path, file, &at, ctx)?
                } else {
                    let offset = line.offset.saturating_mul(SECTOR);
                    if offset.checked_add(len).is_none_or(|end| end > file.len()) {
                        return Err(ImageError::Corrupt(format!(
                            "{at} needs {len} bytes from byte {offset} of {}, but the file is {} bytes: it is truncated or the descriptor is wrong",
                            short(&file_path),
                            file.len()
                        )));
                    }
                    Extent::Flat(FlatExtent { file, offset })
                }
            }
        };
        info.push(ExtentInfo {
            disk: path.to_owned(),
            kind: line.kind.name().into(),
            access: line.access.name().into(),
            file: line.file.as_deref().map(|f| dir.join(f)),
            sectors: line.sectors,
            bytes: len,
            virtual_offset: start,
            file_offset: if line.kind.takes_offset() { line.offset.saturating_mul(SECTOR) } else { 0 },
        });
        if len > 0 {
            placed.push(Placed { start, len, extent });
        }
        start += len;
    }
    Ok(Layout { placed, files, info, size: start })
}

fn open_sparse_extent(path: &Path, file: Arc<FileSource>, at: &str, ctx: &mut Ctx) -> Result<Extent, ImageError> {
    let name = short(path);
    let mut magic = [0u8; 4];
    if file.len() >= 4 {
        file.read_exact_at(&mut magic, 0).map_err(|e| ImageError::io(path, e))?;
    }
    match u32::from_le_bytes(magic) {
        SPARSE_MAGIC => {}
        COWD_MAGIC => return Err(cowd_unsupported(&name)),
        _ => {
            return Err(ImageError::Corrupt(format!(
                "{at} names {name}, which is not a sparse extent (it starts with {}, not KDMV)",
                show_magic(&magic[..file.len().min(4) as usize])
            )))
        }
    }
    let source: Arc<dyn ReadAt> = file;
    let (extent, _) = SparseExtent::open(source, path.to_owned(), &name, ctx.limits, &mut ctx.budget)?;
    Ok(Extent::Sparse(extent))
}
