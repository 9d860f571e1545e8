//! A bounded index of a tar archive: headers are read one 512-byte block at a time and member
//! data is skipped by arithmetic, never read.
//!
//! Understood: POSIX ustar (with the `prefix` field), old GNU (`ustar  \0`), v7; octal and GNU
//! base-256 numbers (first byte `0x80`); GNU long names (`././@LongLink`, type `L`); pax
//! extended headers (type `x`: `path` and `size` records; type `g` is read and ignored).
//! Every size and offset is checked against the file length, every header against its
//! checksum, and the number of headers against a limit.

use std::ops::Range;
use std::path::Path;

use crate::image::{ImageError, ReadAt};

/// Size of a tar block (header or data padding unit).
pub const BLOCK: u64 = 512;

/// Longest member name accepted from a GNU long-name record or a pax `path` record, in bytes.
pub const MAX_NAME_BYTES: u64 = 4096;

/// Largest pax extended header (type `x` or `g`) read, in bytes.
pub const MAX_PAX_BYTES: u64 = 64 * 1024;

/// What a tar member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    /// A regular file (types `0`, NUL and `7`): the only kind whose data is read.
    File,
    /// A directory (type `5`).
    Directory,
    /// A GNU sparse file (type `S`, or pax `GNU.sparse.*` records): its stored data is not the
    /// file's contents, so it is never used as an OVF, manifest or disk.
    Sparse,
    /// Anything else (links, devices, FIFOs, unknown types), with its type byte.
    Other(u8),
}

/// One member of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The name with `.` components, empty components and leading `/` removed (`./a//b` →
    /// `a/b`), so that it can be compared with an OVF `href` resolved the same way.
    pub name: String,
    /// What the header says the member is.
    pub kind: MemberKind,
    /// Where the member's header block starts in the archive.
    pub header_offset: u64,
    /// Where the member's data lies in the archive (checked to be inside the file).
    pub data: Range<u64>,
}

impl Member {
    /// Size of the member's data in bytes.
    pub fn size(&self) -> u64 {
        self.data.end - self.data.start
    }
}

/// Normalises a member name or a relative path: splits on `/`, drops empty and `.`
/// components, joins with `/`. `..` components are kept (a resolved `href` never has any).
pub fn normalize(name: &str) -> String {
    name.split('/').filter(|c| !c.is_empty() && *c != ".").collect::<Vec<_>>().join("/")
}

/// Overrides carried by GNU long-name and pax headers for the next real header.
#[derive(Default)]
struct Pending {
    long_name: Option<String>,
    pax_path: Option<String>,
    pax_size: Option<u64>,
    pax_sparse: bool,
}

/// Reads the headers of the tar archive in `src` (whose path is `path`, for messages) and
/// returns its members in archive order. Stops at the first all-zero block or at the end of
/// the file. More than `max_headers` headers (long-name and pax headers count) is a
/// [`ImageError::Limit`]; a header or member that runs past the end of the file is a
/// [`ImageError::Corrupt`] that says the file is truncated.
pub fn index<R: ReadAt + ?Sized>(src: &R, path: &Path, max_headers: usize) -> Result<Vec<Member>, ImageError> {
    let len = src.len();
    let mut members = Vec::new();
    let mut pos = 0u64;
    let mut headers = 0usize;
    let mut pending = Pending::default();
    let mut block = [0u8; BLOCK as usize];
    loop {
        if pos >= len {
            // No end-of-archive blocks: accepted, as long as every member so far was whole.
            break;
        }
        if pos + BLOCK > len {
            return Err(truncated(path, len, &format!("inside a tar header at byte {pos}")));
        }
        src.read_exact_at(&mut block, pos).map_err(|e| ImageError::io(path, e))?;
        if block.iter().all(|&b| b == 0) {
            break;
        }
        headers += 1;
        if headers > max_headers {
            return Err(ImageError::Limit(format!(
                "{} has more than {max_headers} tar headers; an OVA holds a handful of files, so this \
                 archive is refused",
                path.display()
            )));
        }
        check_checksum(&block, pos, path)?;
        let typeflag = block[156];
        let header_size = parse_number(&block[124..136])
            .ok_or_else(|| corrupt_header(path, pos, "its size field is not a number"))?;
        let is_meta = matches!(typeflag, b'L' | b'K' | b'x' | b'X' | b'g');
        let size = match pending.pax_size {
            Some(size) if !is_meta && is_data_type(typeflag) => size,
            _ => header_size,
        };
        let data_start = pos + BLOCK;
        // Links, devices and directories carry no data whatever their size field says.
        let size = if is_data_type(typeflag) { size } else { 0 };
        let data_end = data_start.checked_add(size).filter(|&end| end <= len).ok_or_else(|| {
            truncated(
                path,
                len,
                &format!(
                    "inside the member whose header is at byte {pos} (it claims {size} bytes from byte {data_start})"
                ),
            )
        })?;
        match typeflag {
            b'L' => {
                pending.long_name = Some(read_name_record(src, path, data_start, size)?);
            }
            b'x' | b'X' => {
                let data = read_bounded(src, path, data_start, size, MAX_PAX_BYTES, "pax extended header")?;
                apply_pax(&data, &mut pending, path, pos)?;
            }
            b'g' => {
                // Global pax records: validated for shape, otherwise ignored (no OVA needs them).
                let data = read_bounded(src, path, data_start, size, MAX_PAX_BYTES, "pax global header")?;
                apply_pax(&data, &mut Pending::default(), path, pos)?;
            }
            b'K' => {}
            _ => {
                let name = match (pending.pax_path.take(), pending.long_name.take()) {
                    (Some(p), _) => p,
                    (None, Some(l)) => l,
                    (None, None) => header_name(&block),
                };
                let kind = match typeflag {
                    b'0' | 0 | b'7' if pending.pax_sparse => MemberKind::Sparse,
                    // v7 archives mark directories only by a trailing slash.
                    0 if name.ends_with('/') => MemberKind::Directory,
                    b'0' | 0 | b'7' => MemberKind::File,
                    b'5' => MemberKind::Directory,
                    b'S' => MemberKind::Sparse,
                    other => MemberKind::Other(other),
                };
                members.push(Member { name: normalize(&name), kind, header_offset: pos, data: data_start..data_end });
                pending = Pending::default();
            }
        }
        let advance = size.div_ceil(BLOCK) * BLOCK;
        match data_start.checked_add(advance) {
            Some(next) => pos = next,
            None => break,
        }
    }
    Ok(members)
}

/// Types whose header size counts data blocks that follow (as GNU tar and Python's tarfile
/// treat them): regular files and anything unknown; not links, devices, FIFOs or directories.
fn is_data_type(typeflag: u8) -> bool {
    !matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
}

fn truncated(path: &Path, len: u64, where_: &str) -> ImageError {
    ImageError::Corrupt(format!(
        "{} is truncated: its {len} bytes end {where_}; copy or download the OVA again",
        path.display()
    ))
}

fn corrupt_header(path: &Path, pos: u64, what: &str) -> ImageError {
    if pos == 0 {
        ImageError::Corrupt(format!("{} is not a tar archive (an OVA is one): {what}", path.display()))
    } else {
        ImageError::Corrupt(format!("{}: the tar header at byte {pos} is damaged: {what}", path.display()))
    }
}

/// The header checksum: the sum of the header bytes with the checksum field read as spaces;
/// some old writers summed signed bytes, which is accepted as well.
fn check_checksum(block: &[u8; BLOCK as usize], pos: u64, path: &Path) -> Result<(), ImageError> {
    let stored = parse_octal(&block[148..156]).ok_or_else(|| corrupt_header(path, pos, "no valid header checksum"))?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed) {
        Ok(())
    } else {
        Err(corrupt_header(path, pos, "its checksum does not match"))
    }
}

/// A numeric header field: octal text (NUL/space padded), or GNU base-256 when the first byte
/// has its high bit set. Negative base-256 values and values over `u64` are refused (`None`).
pub fn parse_number(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(&first) if first & 0x80 != 0 => {
            if first & 0x40 != 0 {
                return None; // negative
            }
            let mut value = u64::from(first & 0x3f);
            for &b in &field[1..] {
                value = value.checked_mul(256)?.checked_add(u64::from(b))?;
            }
            Some(value)
        }
        _ => parse_octal(field),
    }
}

/// Octal digits after optional leading spaces, ended by NUL, space or the end of the field.
/// An empty field is 0.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let start = field.iter().position(|&b| b != b' ').unwrap_or(field.len());
    let mut value = 0u64;
    for &b in &field[start..] {
        match b {
            b'0'..=b'7' => value = value.checked_mul(8)?.checked_add(u64::from(b - b'0'))?,
            0 | b' ' => break,
            _ => return None,
        }
    }
    Some(value)
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The name in the header itself: `prefix/name` for POSIX ustar, `name` otherwise (the old
/// GNU format keeps other fields where ustar has `prefix`).
fn header_name(block: &[u8; BLOCK as usize]) -> String {
    let name = cstr(&block[0..100]);
    if &block[257..263] == b"ustar\0" {
        let prefix = cstr(&block[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

fn read_bounded<R: ReadAt + ?Sized>(
    src: &R,
    path: &Path,
    offset: u64,
    size: u64,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, ImageError> {
    if size > max {
        return Err(ImageError::Limit(format!(
            "{}: a {what} of {size} bytes at byte {offset} is over the {max}-byte limit",
            path.display()
        )));
    }
    let mut data = vec![0u8; size as usize];
    src.read_exact_at(&mut data, offset).map_err(|e| ImageError::io(path, e))?;
    Ok(data)
}

fn read_name_record<R: ReadAt + ?Sized>(src: &R, path: &Path, offset: u64, size: u64) -> Result<String, ImageError> {
    let data = read_bounded(src, path, offset, size, MAX_NAME_BYTES, "GNU long name")?;
    Ok(cstr(&data))
}

/// Parses pax records (`"<len> <key>=<value>\n"`), keeping `path`, `size` and the GNU sparse
/// markers.
fn apply_pax(data: &[u8], pending: &mut Pending, path: &Path, pos: u64) -> Result<(), ImageError> {
    let bad = |why: &str| corrupt_header(path, pos, &format!("its pax extended header is malformed ({why})"));
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break; // padding some writers leave
        }
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(|| bad("a record has no length"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("a record length is not a number"))?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("a record length is wrong"));
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(|| bad("a record has no '='"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => {
                if value.len() as u64 > MAX_NAME_BYTES {
                    return Err(ImageError::Limit(format!(
                        "{}: a pax path of {} bytes at byte {pos} is over the {MAX_NAME_BYTES}-byte limit",
                        path.display(),
                        value.len()
                    )));
                }
                pending.pax_path = Some(String::from_utf8_lossy(value).into_owned());
            }
            b"size" => {
                let size = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| bad("its size is not a number"))?;
                pending.pax_size = Some(size);
            }
            k if k.starts_with(b"GNU.sparse.") => pending.pax_sparse = true,
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(())
}
