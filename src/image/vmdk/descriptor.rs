//! VMDK text descriptors: `key=value` lines, extent lines and `ddb.*` keys.
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=fffffffe
//! parentCID=ffffffff
//! createType="twoGbMaxExtentSparse"
//! RW 4192256 SPARSE "disk-s001.vmdk"
//! RW 2048 FLAT "disk data.bin" 128
//! RW 2048 ZERO
//! ddb.adapterType = "lsilogic"
//! ```
//!
//! Lines end in `\n` or `\r\n`; a NUL ends the text (descriptors are padded with zeros).
//! Values may be quoted or not. File names may contain spaces.

use std::collections::BTreeMap;

use super::Limits;
use crate::image::ImageError;

/// Who may access an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `RW`: readable and writable.
    ReadWrite,
    /// `RDONLY`: readable only.
    ReadOnly,
    /// `NOACCESS`: not to be read; the extent's data is missing.
    NoAccess,
}

impl Access {
    /// The word as descriptors write it.
    pub fn name(self) -> &'static str {
        match self {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// The `TYPE` column of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// `FLAT`: raw sectors in a file, from its offset on.
    Flat,
    /// `SPARSE`: a hosted sparse extent with a `KDMV` header.
    Sparse,
    /// `ZERO`: no file; every sector reads as zero.
    Zero,
    /// `VMFS`: a preallocated raw file on a VMFS datastore, read like FLAT.
    Vmfs,
    /// `VMFSSPARSE`: an ESX snapshot delta (`COWD`).
    VmfsSparse,
    /// `SESPARSE`: an ESX space-efficient sparse extent (4 KiB grains).
    SeSparse,
    /// `VMFSRDM`: a raw device mapping, virtual compatibility mode.
    VmfsRdm,
    /// `VMFSRDMP` (or `VMFSPASSTHROUGHRAWDEVICEMAP`): a raw device mapping in pass-through mode.
    VmfsRdmp,
    /// `VMFSRAW`: a raw ESX device.
    VmfsRaw,
}

impl ExtentType {
    fn parse(word: &str) -> Option<ExtentType> {
        Some(match word.to_ascii_uppercase().as_str() {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRDMP" | "VMFSPASSTHROUGHRAWDEVICEMAP" => ExtentType::VmfsRdmp,
            "VMFSRAW" => ExtentType::VmfsRaw,
            _ => return None,
        })
    }

    /// Whether the extent line may carry an offset after the file name.
    pub(crate) fn takes_offset(self) -> bool {
        matches!(self, ExtentType::Flat | ExtentType::Vmfs)
    }

    /// The word as descriptors write it (`FLAT`, `SPARSE`, …).
    pub fn name(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRdmp => "VMFSRDMP",
            ExtentType::VmfsRaw => "VMFSRAW",
        }
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// 1-based line number, for messages.
    pub line: usize,
    pub access: Access,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    pub kind: ExtentType,
    /// File name as written (relative to the descriptor's directory unless absolute).
    pub file: Option<String>,
    /// Offset into the file, in sectors (FLAT and VMFS only).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `CID`: this disk's content id (hex), as written.
    pub cid: Option<String>,
    /// `parentCID`: the parent's content id; `ffffffff` or `None` means no parent.
    pub parent_cid: Option<String>,
    /// `createType`: the subformat (`monolithicSparse`, `twoGbMaxExtentFlat`, …), as written.
    pub create_type: Option<String>,
    /// `parentFileNameHint`: the parent descriptor's path, for a snapshot delta.
    pub parent_hint: Option<String>,
    /// The extent lines, in order: together they make the virtual disk.
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` keys, values unquoted.
    pub ddb: BTreeMap<String, String>,
}

/// `ffffffff` (any case), or absent: no parent.
pub(crate) const NO_PARENT: u32 = 0xffff_ffff;

/// Parses a CID (8 hex digits, sometimes fewer).
pub(crate) fn parse_cid(value: &str) -> Option<u32> {
    let v = value.trim();
    if v.is_empty() || v.len() > 8 {
        return None;
    }
    u32::from_str_radix(v, 16).ok()
}

impl Descriptor {
    /// The parent CID, `None` when the disk has no parent.
    pub fn parent_cid_value(&self) -> Result<Option<u32>, String> {
        match &self.parent_cid {
            None => Ok(None),
            Some(raw) => match parse_cid(raw) {
                Some(NO_PARENT) => Ok(None),
                Some(cid) => Ok(Some(cid)),
                None => Err(format!("parentCID `{raw}` is not a hexadecimal content id")),
            },
        }
    }
}

/// Whether `bytes` (the start of a file) look like a text descriptor.
pub(super) fn looks_like_descriptor(bytes: &[u8]) -> bool {
    let text = match bytes.iter().position(|&b| b == 0) {
        Some(nul) => &bytes[..nul],
        None => bytes,
    };
    let Ok(text) = std::str::from_utf8(text) else {
        // A multi-byte character cut by the probe's end is fine.
        return match std::str::from_utf8(&text[..text.len().saturating_sub(3)]) {
            Ok(t) => looks_like_descriptor_text(t),
            Err(_) => false,
        };
    };
    looks_like_descriptor_text(text)
}

fn looks_like_descriptor_text(text: &str) -> bool {
    let squashed: String =
        text.trim_start_matches('\u{feff}').trim_start().chars().take(40).filter(|c| !c.is_whitespace()).collect();
    if squashed.to_ascii_lowercase().starts_with("#diskdescriptorfile") {
        return true;
    }
    text.lines().any(|l| {
        let l = l.trim_start().to_ascii_lowercase();
        l.starts_with("createtype") && l.contains('=')
    })
}

/// Parses descriptor text. `name` names the file in messages. `strict` (a descriptor file)
/// refuses bad extent lines and text that is not UTF-8; an embedded descriptor, whose extent
/// lines are not used, is read leniently.
pub(super) fn parse(bytes: &[u8], name: &str, limits: &Limits, strict: bool) -> Result<Descriptor, ImageError> {
    if bytes.len() as u64 > limits.max_descriptor_bytes {
        return Err(ImageError::Limit(format!(
            "the descriptor of {name} is {} bytes, over the limit of {} bytes",
            bytes.len(),
            limits.max_descriptor_bytes
        )));
    }
    let bytes = match bytes.iter().position(|&b| b == 0) {
        Some(nul) => &bytes[..nul],
        None => bytes,
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) if !strict => String::from_utf8_lossy(bytes),
        Err(e) => {
            return Err(ImageError::Unsupported(format!(
                "the descriptor of {name} is not UTF-8 text (invalid byte at {}); only UTF-8 descriptors are read",
                e.valid_up_to()
            )))
        }
    };
    let mut d = Descriptor::default();
    for (index, raw) in text.split('\n').enumerate() {
        let line_no = index + 1;
        let line = raw.trim_end_matches('\r').trim().trim_start_matches('\u{feff}');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        let access = match first.to_ascii_uppercase().as_str() {
            "RW" => Some(Access::ReadWrite),
            "RDONLY" => Some(Access::ReadOnly),
            "NOACCESS" => Some(Access::NoAccess),
            _ => None,
        };
        if let Some(access) = access {
            if d.extents.len() >= limits.max_extents {
                return Err(ImageError::Limit(format!(
                    "{name} lists more than {} extents, over the limit (max_extents: an 8 TiB disk in 2 GB extents)",
                    limits.max_extents
                )));
            }
            let rest = line[first.len()..].trim_start();
            match parse_extent(access, rest, line_no, line, name) {
                Ok(extent) => d.extents.push(extent),
                Err(e) if strict => return Err(e),
                Err(_) => {}
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            // Unknown free text: ignored, as VMware and qemu do.
            continue;
        };
        let key = key.trim();
        let value = unquote(value.trim());
        match key.to_ascii_lowercase().as_str() {
            "cid" => d.cid = Some(value.to_owned()),
            "parentcid" => d.parent_cid = Some(value.to_owned()),
            "createtype" => d.create_type = Some(value.to_owned()),
            "parentfilenamehint" => d.parent_hint = Some(value.to_owned()),
            k if k.starts_with("ddb.") => {
                d.ddb.insert(key.to_owned(), value.to_owned());
            }
            _ => {}
        }
    }
    Ok(d)
}

fn unquote(value: &str) -> &str {
    if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
        &value[1..value.len() - 1]
    } else {
        value
    }
}

/// `SECTORS TYPE ["file" [offset]]` after the access word.
fn parse_extent(access: Access, rest: &str, line_no: usize, line: &str, name: &str) -> Result<ExtentLine, ImageError> {
    let bad = |why: String| {
        ImageError::Corrupt(format!("line {line_no} of {name} is not a valid extent line ({why}): `{}`", clip(line)))
    };
    let (sectors_word, rest) = split_word(rest);
    let sectors: u64 =
        sectors_word.parse().map_err(|_| bad(format!("the sector count `{}` is not a number", clip(sectors_word))))?;
    let (type_word, rest) = split_word(rest);
    if type_word.is_empty() {
        return Err(bad("no extent type".into()));
    }
    let kind = ExtentType::parse(type_word).ok_or_else(|| {
        bad(format!(
            "unknown extent type `{}`; known are FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, SESPARSE, VMFSRDM, VMFSRAW",
            clip(type_word)
        ))
    })?;
    let rest = rest.trim();
    let mut extent = ExtentLine { line: line_no, access, sectors, kind, file: None, offset: 0 };
    if kind == ExtentType::Zero {
        return Ok(extent);
    }
    if rest.is_empty() {
        return Err(bad(format!("a {} extent needs a file name", kind.name())));
    }
    let (file, tail) = if let Some(quoted) = rest.strip_prefix('"') {
        let close = quoted.find('"').ok_or_else(|| bad("the file name has no closing quote".into()))?;
        (&quoted[..close], quoted[close + 1..].trim())
    } else if kind.takes_offset() {
        // Unquoted: a trailing number is the offset, the rest (spaces included) the name.
        match rest.rsplit_once(char::is_whitespace) {
            Some((file, last)) if last.bytes().all(|b| b.is_ascii_digit()) => (file.trim_end(), last),
            _ => (rest, ""),
        }
    } else {
        (rest, "")
    };
    if file.is_empty() {
        return Err(bad("the file name is empty".into()));
    }
    if !tail.is_empty() {
        if !kind.takes_offset() {
            return Err(bad(format!("unexpected `{}` after the file name", clip(tail))));
        }
        extent.offset = tail.parse().map_err(|_| bad(format!("the offset `{}` is not a number", clip(tail))))?;
    }
    extent.file = Some(file.to_owned());
    Ok(extent)
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(at) => (&s[..at], &s[at..]),
        None => (s, ""),
    }
}

/// At most 120 characters of hostile text in a message.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(120).filter(|c| !c.is_control()).collect();
    if s.chars().count() > 120 {
        out.push('…');
    }
    out
}
