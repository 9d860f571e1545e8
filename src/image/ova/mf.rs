//! The `.mf` manifest of an OVF package: lines `SHA256(file)= hex` (or `SHA1`, `SHA512`),
//! and the streaming check of each listed member against its digest.

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

use super::ovf::check_href;
use crate::image::{ImageError, ReadAt};
use crate::text::shorten;

/// A digest algorithm an `.mf` line may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DigestAlgorithm {
    /// `SHA1(file)= …` (OVF 1.x exports, ovftool `--shaAlgorithm=sha1`).
    Sha1,
    /// `SHA256(file)= …` (current vSphere and VirtualBox exports).
    Sha256,
    /// `SHA512(file)= …`.
    Sha512,
}

impl DigestAlgorithm {
    /// The name as `.mf` files spell it (`SHA256`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha1 => "SHA1",
            Self::Sha256 => "SHA256",
            Self::Sha512 => "SHA512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Self::Sha1 => 40,
            Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }
}

/// One line of the `.mf`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ManifestEntry {
    /// The file name as listed, normalised like an `href` (relative to the `.mf`).
    pub file: String,
    /// The digest algorithm of the line.
    pub algorithm: DigestAlgorithm,
    /// The expected digest, lower-case hex.
    pub expected: String,
    /// Whether the member's data was hashed and matched (set by `verify_manifest`).
    pub verified: bool,
}

/// The `.mf` of a package and the state of its check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ManifestCheck {
    /// The `.mf` member's name in the archive.
    pub mf_name: String,
    /// Its lines, in order.
    pub entries: Vec<ManifestEntry>,
    /// Disk files (hrefs) the `.mf` does not list: not an error, but not checked either.
    pub unlisted_disks: Vec<String>,
}

impl ManifestCheck {
    /// Whether every line was verified.
    pub fn all_verified(&self) -> bool {
        self.entries.iter().all(|e| e.verified)
    }
}

/// Parses `.mf` text. Blank lines are skipped; every other line must read
/// `ALGO(name)= hex` (spaces around `=` optional). More than `max_entries` lines is a
/// [`ImageError::Limit`], an algorithm other than SHA1/SHA256/SHA512 is
/// [`ImageError::Unsupported`], anything else malformed is [`ImageError::Corrupt`].
pub fn parse_mf(text: &[u8], mf_name: &str, max_entries: usize) -> Result<Vec<ManifestEntry>, ImageError> {
    let text = std::str::from_utf8(text)
        .map_err(|_| ImageError::Corrupt(format!("the package manifest {mf_name} is not UTF-8 text")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| {
            ImageError::Corrupt(format!(
                "line {} of the package manifest {mf_name} ({line:?}) {why}; it should read SHA256(file)= <hex>",
                n + 1,
                line = shorten(line)
            ))
        };
        if entries.len() >= max_entries {
            return Err(ImageError::Limit(format!(
                "the package manifest {mf_name} lists more than {max_entries} files; refused"
            )));
        }
        let open = line.find('(').ok_or_else(|| bad("has no '('"))?;
        let close = line.rfind(')').filter(|&c| c > open).ok_or_else(|| bad("has no ')'"))?;
        let algo = line[..open].trim();
        let digest =
            line[close + 1..].trim_start().strip_prefix('=').ok_or_else(|| bad("has no '=' after ')'"))?.trim();
        let algorithm =
            match algo.to_ascii_uppercase().replace('-', "").as_str() {
                "SHA1" => DigestAlgorithm::Sha1,
                "SHA256" => DigestAlgorithm::Sha256,
                "SHA512" => DigestAlgorithm::Sha512,
                _ => {
                    return Err(ImageError::Unsupported(format!(
                    "the package manifest {mf_name} uses the digest {algo:?} (line {}); hyper2kvm checks SHA1, SHA256 \
                     and SHA512: re-export with one of those, or remove the .mf",
                    n + 1, algo = shorten(algo))))
                }
            };
        if digest.len() != algorithm.hex_len() || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(&format!("does not end with {} hex digits", algorithm.hex_len())));
        }
        let file = check_href(&line[open + 1..close])?;
        entries.push(ManifestEntry { file, algorithm, expected: digest.to_ascii_lowercase(), verified: false });
    }
    Ok(entries)
}

/// One digest of an `.mf` line being computed.
pub(crate) enum Hasher {
    Sha1(Sha1),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub(crate) fn new(algorithm: DigestAlgorithm) -> Hasher {
        match algorithm {
            DigestAlgorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            DigestAlgorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            DigestAlgorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub(crate) fn hex(self) -> String {
        match self {
            Hasher::Sha1(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Size of the reads made while hashing a member.
const HASH_CHUNK: usize = 1 << 20;

/// Hashes `len` bytes of `src` from `offset` once with every algorithm of `algorithms`,
/// returning one lower-case hex digest per algorithm, in order.
pub fn digest_range<R: ReadAt + ?Sized>(
    src: &R,
    offset: u64,
    len: u64,
    algorithms: &[DigestAlgorithm],
) -> std::io::Result<Vec<String>> {
    let mut hashers: Vec<Hasher> = algorithms.iter().map(|&a| Hasher::new(a)).collect();
    let mut buf = vec![0u8; HASH_CHUNK.min(usize::try_from(len).unwrap_or(HASH_CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + done)?;
        for hasher in &mut hashers {
            hasher.update(&buf[..n]);
        }
        done += n as u64;
    }
    Ok(hashers.into_iter().map(Hasher::hex).collect())
}
