//! SHA-256 of files: verifying the manifest's `checksum` and reporting outputs' digests.
//!
//! It only hashes (under the job's control, so a long read can be stopped); what a mismatch
//! means, and its sentence, are the job's.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::convert::{ConvertError, JobControl};

/// Read size: large enough for sequential throughput, small enough to cancel promptly.
const CHUNK: usize = 1 << 20;

/// Hashes a file, checking `control` between chunks so a timeout or stop interrupts it.
pub fn sha256_file(path: &Path, control: &JobControl) -> Result<[u8; 32], ConvertError> {
    sha256_of(File::open(path)?, control)
}

/// [`sha256_file`] of a file already open (a source opened through its confinement).
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
pub fn format_sha256(digest: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(digest))
}
