//! The memory budget of one open image for grain tables: shared by every extent and parent of
//! a chain. Owns the accounting only, not the tables.

use std::sync::Arc;

use super::gt_cache::GtCache;
use super::Limits;
use crate::image::ImageError;

/// Memory for grain tables across a whole open (every extent and parent): the cache that
/// tables read from the file share, and the budget of maps rebuilt from stream markers, which
/// are held whole.
#[derive(Debug)]
pub(crate) struct Budget {
    pub(crate) remaining: u64,
    pub(crate) limit: u64,
    pub(crate) cache: Arc<GtCache>,
}

impl Budget {
    pub(crate) fn new(limits: &Limits) -> Budget {
        Budget {
            remaining: limits.max_stream_map_bytes,
            limit: limits.max_stream_map_bytes,
            cache: Arc::new(GtCache::new(limits.max_grain_table_bytes)),
        }
    }

    pub(crate) fn take(&mut self, bytes: u64, name: &str) -> Result<(), ImageError> {
        if bytes > self.remaining {
            return Err(ImageError::Limit(format!(
                "the grain map of {name} rebuilt from its markers (with the rest of the disk) needs more than {} bytes of memory, over the limit (max_stream_map_bytes)",
                self.limit
            )));
        }
        self.remaining -= bytes;
        Ok(())
    }
}
