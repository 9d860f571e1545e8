//! Bounds on a compressed grain's stored size, shared by the in-place sparse reader and the
//! stream scanner so that both refuse the same files with the same message.

use super::Limits;
use crate::image::ImageError;

/// Largest compressed grain for `grain_bytes`: structurally (zlib never grows data by half)
/// and by the limit.
pub(crate) fn packed_bound(grain_bytes: u64, limits: &Limits) -> u64 {
    (grain_bytes * 2 + 4096).min(limits.max_compressed_grain_bytes)
}

/// Checks a compressed grain's size from its marker against the structure and the limit
/// (`max_compressed_grain_bytes`).
pub(crate) fn check_packed_size(
    size: u64,
    name: &str,
    grain: u64,
    grain_bytes: u64,
    limit: u64,
) -> Result<(), ImageError> {
    let structural = grain_bytes * 2 + 4096;
    let max = structural.min(limit);
    if size == 0 || size > structural {
        return Err(ImageError::Corrupt(format!(
            "compressed grain {grain} of {name} claims {size} bytes, impossible for a {grain_bytes}-byte grain: the file is corrupt"
        )));
    }
    if size > max {
        return Err(ImageError::Limit(format!(
            "compressed grain {grain} of {name} is {size} bytes, over the limit of {max} bytes (max_compressed_grain_bytes)"
        )));
    }
    Ok(())
}
