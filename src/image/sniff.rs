//! What a file is, told by its first bytes: the disk image formats hyper2kvm reads, and the
//! files that are obviously not a disk (an OVF descriptor, a tar or compressed archive, JSON
//! or other text, an empty file).
//!
//! Used to pick a format for commands run by hand ([`crate::convert::oneshot::guess_format`]),
//! to tell an OVF descriptor from an OVA archive, and to refuse a non-disk file given as a
//! raw disk ([`crate::image::raw::RawImage::open`]) rather than "convert" its bytes. Only
//! signatures no raw disk starts with are trusted: a raw disk's first sector is boot code,
//! a partition table (MBR or GPT's protective MBR), a filesystem's superblock or zeros, none
//! of which is text without a NUL byte or begins with the magic numbers below. Plain text is
//! reported but not held against a raw disk (see [`Kind::may_be_raw_disk`]).

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::ImageError;
use crate::manifest::SourceFormat;

/// Bytes read to tell a file's kind: the tar magic lies at 257, the VDI signature at 64,
/// and an OVF's `Envelope` may follow a licence comment of a few KiB.
pub const HEAD_BYTES: usize = 8192;

/// Bytes that must all be text for a file to count as text: a disk's first sector never is.
const TEXT_PROBE: usize = 512;

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No bytes at all.
    Empty,
    /// `QFI\xfb`.
    Qcow2,
    /// `KDMV` (a sparse or streamOptimized extent) or `COWD` (an ESX sparse extent).
    VmdkSparse,
    /// A VMDK text descriptor (`# Disk DescriptorFile`, `createType=`).
    VmdkDescriptor,
    /// `vhdxfile`.
    Vhdx,
    /// `conectix` at the start (a dynamic VHD's copy of its footer).
    Vhd,
    /// The VDI signature `0xbeda107f` at byte 64.
    Vdi,
    /// An OVF descriptor: XML whose first bytes name an `Envelope`.
    Ovf,
    /// Other XML.
    Xml,
    /// JSON text (`{` or `[` first).
    Json,
    /// Other text: no NUL byte, all printable UTF-8 in the first sector.
    Text,
    /// `ustar` at byte 257: a POSIX or GNU tar archive (an OVA is one).
    Tar,
    /// gzip, bzip2, xz, zstd or zip.
    Compressed(&'static str),
    /// None of the above: possibly a raw disk.
    Unknown,
}

impl Kind {
    /// The disk image format this kind is, if it is one hyper2kvm converts. An OVF descriptor
    /// and a tar archive are [`SourceFormat::Ova`]: an OVF package, unpacked or packed.
    pub fn source_format(self) -> Option<SourceFormat> {
        Some(match self {
            Kind::Qcow2 => SourceFormat::Qcow2,
            Kind::VmdkSparse | Kind::VmdkDescriptor => SourceFormat::Vmdk,
            Kind::Vhdx => SourceFormat::Vhdx,
            Kind::Vhd => SourceFormat::Vhd,
            Kind::Vdi => SourceFormat::Vdi,
            Kind::Ovf | Kind::Tar => SourceFormat::Ova,
            _ => return None,
        })
    }

    /// What the file is, as a phrase for a message: "an OVF descriptor (XML text)".
    pub fn describe(self) -> String {
        match self {
            Kind::Empty => "an empty file".into(),
            Kind::Qcow2 => "a qcow2 image".into(),
            Kind::VmdkSparse => "a VMDK sparse extent".into(),
            Kind::VmdkDescriptor => "a VMDK descriptor".into(),
            Kind::Vhdx => "a VHDX image".into(),
            Kind::Vhd => "a VHD image".into(),
            Kind::Vdi => "a VDI image".into(),
            Kind::Ovf => "an OVF descriptor (XML text)".into(),
            Kind::Xml => "XML text".into(),
            Kind::Json => "JSON text".into(),
            Kind::Text => "a text file".into(),
            Kind::Tar => "a tar archive".into(),
            Kind::Compressed(what) => format!("a {what}-compressed file"),
            Kind::Unknown => "unknown data".into(),
        }
    }

    /// Whether a file of this kind can be a raw disk: [`Kind::Unknown`], and plain
    /// [`Kind::Text`] — a disk whose first sectors hold text cannot be told from a text file,
    /// so only text with a structure (XML, JSON, a VMDK descriptor) counts as no disk.
    pub fn may_be_raw_disk(self) -> bool {
        matches!(self, Kind::Unknown | Kind::Text)
    }

    /// What to do with a file of this kind that was given as a raw disk: the format to name
    /// instead, or why it is no disk at all.
    pub fn advice_as_raw(self) -> String {
        match self {
            Kind::Ovf | Kind::Tar => {
                "an OVF package (an unpacked export's .ovf, or an OVA) is read as source_format \"ova\" \
                 (--format ova by hand), which converts its disks"
                    .into()
            }
            Kind::Compressed(_) => "decompress it first and give the disk image inside".into(),
            Kind::Empty => "the export or copy did not finish: export it again".into(),
            Kind::Xml | Kind::Json | Kind::Text | Kind::Unknown => {
                "it is not a disk: point the source at the disk image file of the export".into()
            }
            disk => match disk.source_format() {
                Some(format) => format!(
                    "give its format: source_format \"{0}\" in the manifest, --format {0} by hand",
                    format.as_str()
                ),
                None => "it is not a disk: point the source at the disk image file of the export".into(),
            },
        }
    }
}

/// Tells the kind of a file from its first bytes (`head`: up to [`HEAD_BYTES`] of them, fewer
/// only when the file is shorter).
pub fn sniff(head: &[u8]) -> Kind {
    if head.is_empty() {
        return Kind::Empty;
    }
    let magic: &[(&[u8], Kind)] = &[
        (b"QFI\xfb", Kind::Qcow2),
        (b"KDMV", Kind::VmdkSparse),
        (b"COWD", Kind::VmdkSparse),
        (b"vhdxfile", Kind::Vhdx),
        (b"conectix", Kind::Vhd),
        // gzip: the magic and method 8 (deflate, the only one defined).
        (b"\x1f\x8b\x08", Kind::Compressed("gzip")),
        (b"\xfd7zXZ\x00", Kind::Compressed("xz")),
        (b"\x28\xb5\x2f\xfd", Kind::Compressed("zstd")),
        (b"PK\x03\x04", Kind::Compressed("zip")),
    ];
    if let Some((_, kind)) = magic.iter().find(|(m, _)| head.starts_with(m)) {
        return *kind;
    }
    if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
        return Kind::Compressed("bzip2");
    }
    if head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        return Kind::Vdi;
    }
    if head.get(257..262) == Some(b"ustar") {
        return Kind::Tar;
    }
    match text_of(head) {
        Some(text) => classify_text(text),
        None => Kind::Unknown,
    }
}

/// Reads the first [`HEAD_BYTES`] of `path` and tells its kind. A FIFO or a socket is not
/// opened (that could wait for a writer for ever): it is [`Kind::Unknown`].
pub fn sniff_file(path: &Path) -> Result<Kind, ImageError> {
    let meta = std::fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
    if meta.file_type().is_fifo() || meta.file_type().is_socket() {
        return Ok(Kind::Unknown);
    }
    let file = std::fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    file.take(HEAD_BYTES as u64).read_to_end(&mut head).map_err(|e| ImageError::io(path, e))?;
    Ok(sniff(&head))
}

/// The start of `head` as text, if its first sector is text: valid UTF-8 (a character cut
/// by the probe's end aside), no NUL, no control character but tab, CR, LF and form feed.
fn text_of(head: &[u8]) -> Option<&str> {
    let probe = &head[..head.len().min(TEXT_PROBE)];
    let text = match std::str::from_utf8(probe) {
        Ok(text) => text,
        // A multi-byte character cut by the probe's end is fine.
        Err(e) if e.error_len().is_none() && e.valid_up_to() + 4 > probe.len() => {
            std::str::from_utf8(&probe[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    let printable = |c: char| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\x0c');
    (!text.is_empty() && text.chars().all(printable)).then(|| {
        // The rest of the head, as far as it is UTF-8, for what follows the first sector.
        match std::str::from_utf8(head) {
            Ok(all) => all,
            Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or(text),
        }
    })
}

/// `# Disk DescriptorFile` first (spaces aside), or a `createType=` line: what the VMDK
/// reader itself takes for a descriptor.
fn is_vmdk_descriptor(start: &str) -> bool {
    let squashed: String = start.chars().take(40).filter(|c| !c.is_whitespace()).collect();
    squashed.to_ascii_lowercase().starts_with("#diskdescriptorfile")
        || start.lines().any(|l| {
            let l = l.trim_start().to_ascii_lowercase();
            l.starts_with("createtype") && l.contains('=')
        })
}

fn classify_text(text: &str) -> Kind {
    let start = text.trim_start_matches('\u{feff}').trim_start();
    if start.starts_with('<') {
        // The root element of an OVF descriptor is `Envelope` (`ovf:Envelope` …); whatever
        // precedes it (the XML declaration, comments) is short.
        let is_ovf = start.match_indices("Envelope").any(|(at, _)| {
            let before = &start[..at];
            let unprefixed = match before.strip_suffix(':') {
                Some(prefix) => prefix.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                None => before,
            };
            unprefixed.ends_with('<')
        });
        return if is_ovf { Kind::Ovf } else { Kind::Xml };
    }
    if is_vmdk_descriptor(start) {
        return Kind::VmdkDescriptor;
    }
    if start.starts_with('{') || start.starts_with('[') {
        return Kind::Json;
    }
    Kind::Text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_images_are_told_by_their_magic() {
        assert_eq!(sniff(b"QFI\xfb\0\0\0\x03"), Kind::Qcow2);
        assert_eq!(sniff(b"KDMV\x01\0\0\0"), Kind::VmdkSparse);
        assert_eq!(sniff(b"vhdxfile\0\0"), Kind::Vhdx);
        assert_eq!(sniff(b"conectix\0\0"), Kind::Vhd);
        let mut vdi = vec![0u8; 512];
        vdi[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        vdi[64..68].copy_from_slice(&0xbeda107fu32.to_le_bytes());
        assert_eq!(sniff(&vdi), Kind::Vdi);
        assert_eq!(sniff(b"# Disk DescriptorFile\nversion=1\n"), Kind::VmdkDescriptor);
    }

    #[test]
    fn non_disk_files_are_told_apart() {
        assert_eq!(sniff(b""), Kind::Empty);
        let ovf = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!--Generated by VMware ovftool-->\n\
                   <Envelope vmw:buildId=\"x\" xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\">";
        assert_eq!(sniff(ovf.as_bytes()), Kind::Ovf);
        assert_eq!(sniff(b"\xef\xbb\xbf<ovf:Envelope xmlns:ovf=\"x\"/>"), Kind::Ovf);
        assert_eq!(sniff(b"<?xml version=\"1.0\"?><domain/>"), Kind::Xml);
        assert_eq!(sniff(b"<NotAnEnvelope/>"), Kind::Xml);
        assert_eq!(sniff(b"  {\"manifest_version\": \"1.0\"}"), Kind::Json);
        assert_eq!(sniff("héllo\n".as_bytes()), Kind::Text);
        assert_eq!(sniff(b"\x1f\x8b\x08\0"), Kind::Compressed("gzip"));
        assert_eq!(sniff(b"BZh91AY"), Kind::Compressed("bzip2"));
        assert_eq!(sniff(b"\xfd7zXZ\0\0"), Kind::Compressed("xz"));
        let mut tar = vec![0u8; 1024];
        tar[..7].copy_from_slice(b"vm.ovf\0");
        tar[257..263].copy_from_slice(b"ustar\0");
        assert_eq!(sniff(&tar), Kind::Tar);
    }

    #[test]
    fn a_fifo_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.ovf");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(sniff_file(&fifo).unwrap(), Kind::Unknown, "returned at once, without a writer");
    }

    #[test]
    fn raw_disks_are_not_mistaken_for_anything() {
        assert_eq!(sniff(&[0u8; 4096]), Kind::Unknown, "all zeros");
        // An MBR: boot code, a partition entry, the 0x55AA signature.
        let mut mbr = vec![0u8; 512];
        mbr[..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        mbr[446..462].copy_from_slice(&[0x80, 0x20, 0x21, 0, 0x83, 0xfe, 0xff, 0xff, 0, 8, 0, 0, 0, 0, 0x20, 0]);
        mbr[510..].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(sniff(&mbr), Kind::Unknown);
        // GPT: a protective MBR, then "EFI PART" in sector 1.
        let mut gpt = vec![0u8; 1024];
        gpt[450] = 0xee;
        gpt[510..512].copy_from_slice(&[0x55, 0xaa]);
        gpt[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(sniff(&gpt), Kind::Unknown);
        // Text in the first sector stops being text once a NUL appears in it.
        let mut half = b"{\"looks\": \"like json\"}".to_vec();
        half.resize(512, 0);
        assert_eq!(sniff(&half), Kind::Unknown);
        // Bytes that are not UTF-8 are not text.
        assert_eq!(sniff(&[0xff; 512]), Kind::Unknown);
    }
}
