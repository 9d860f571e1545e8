//! The image errors that more than one extent reader raises: a header that does not parse, a
//! structure pointing past the end of its file. Owns the wording of those messages only.

use super::header::VmdkError;
use crate::image::ImageError;

/// Maps a header parse failure to an image error naming the file.
pub(crate) fn header_error(name: &str, what: &str, e: VmdkError) -> ImageError {
    match e {
        VmdkError::BadVersion(v) => ImageError::Unsupported(format!(
            "the {what} of {name} is sparse VMDK version {v}; versions 1 to 3 are supported"
        )),
        VmdkError::BadMagic => ImageError::Corrupt(format!("the {what} of {name} does not start with KDMV")),
        other => ImageError::Corrupt(format!("the {what} of {name} is invalid: {other}")),
    }
}

/// A structure of the file that lies past its end.
pub(crate) fn past_end(what: &str, name: &str, offset: u64, size: u64, len: u64) -> ImageError {
    ImageError::Corrupt(format!(
        "{what} of {name} points past the end of the file (offset {offset}, {size} bytes; the file is {len} bytes): the file is truncated or corrupt"
    ))
}
