//! How byte ranges of an extent read (data, zeros, or the parent's), as the extent readers
//! report them; runs that touch and read alike are merged. Owns no I/O.

use std::ops::Range;

/// How a byte range of an extent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Region {
    Data,
    Zero,
    Hole,
}

/// Pushes `range` with `region`, merging with the previous run when they touch.
pub(crate) fn push_region(out: &mut Vec<(Range<u64>, Region)>, range: Range<u64>, region: Region) {
    if range.is_empty() {
        return;
    }
    if let Some((last, r)) = out.last_mut() {
        if *r == region && last.end == range.start {
            last.end = range.end;
            return;
        }
    }
    out.push((range, region));
}
