//! SHA-256 of a source in a read of its own: the manifest's `checksum` of a disk qemu-img
//! converts (it reads the file itself). Natively read sources are hashed in the conversion's
//! own pass instead ([`crate::image::tap`]); outputs are not hashed at all (docs/DECISIONS.md,
//! "One pass over the source").

use std::fs::File;
use std::io::Read;

use sha2::{Digest, Sha256};

use crate::convert::{ConvertError, JobControl};

/// Read size: large enough for sequential throughput, small enough to cancel promptly.
const CHUNK: usize = 1 << 20;

/// Hashes a file already open (a source opened through its confinement), checking `control`
/// between chunks so a timeout or stop interrupts it.
pub fn sha256_of(mut file: File, control: &JobControl) -> Result<[u8; 32], ConvertError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        control.check()?;
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().into())
}

/// `sha256:<hex>`, the manifest's spelling of a digest.
pub(crate) fn format_sha256(digest: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(digest))
}
