//! Refcounts of a file written front to back, kept in a sliding window.
//!
//! Host clusters are allocated in increasing order and a cluster's refcount is final once the
//! output has moved past it (only the cluster at the write cursor can still gain references,
//! from compressed clusters packed into it). So only the refcount block the cursor is in needs
//! to be in memory, plus the start of the next one: when the cursor leaves a block's range, the
//! writer appends that block to the file (its own cluster is counted in a later block, which is
//! still in memory) and remembers its offset for the refcount table. Memory: at most about two
//! blocks of `cluster_size / 2` 16-bit counts, plus 8 bytes per block written (2 GiB of output
//! per block at 64 KiB clusters) — a few hundred KiB for a multi-TiB image.

/// Counts of the host clusters from `window_start` on; blocks before it are on disk.
#[derive(Debug)]
pub(crate) struct Refcounts {
    /// Refcounts per block: cluster_size / 2.
    per_block: u64,
    /// First host cluster still in memory (a multiple of `per_block`).
    window_start: u64,
    /// Counts of host clusters `window_start ..`.
    counts: Vec<u16>,
    /// Host offsets of the blocks already written, in order: the refcount table so far.
    table: Vec<u64>,
}

impl Refcounts {
    pub(super) fn new(cluster_bits: u32) -> Refcounts {
        let per_block = 1u64 << (cluster_bits - 1);
        Refcounts { per_block, window_start: 0, counts: Vec::new(), table: Vec::new() }
    }

    /// Host clusters one refcount block covers.
    pub(super) fn per_block(&self) -> u64 {
        self.per_block
    }

    /// First host cluster past the oldest block still in memory.
    pub(super) fn window_end(&self) -> u64 {
        self.window_start + self.per_block
    }

    /// Refcount blocks already written.
    pub(super) fn blocks_written(&self) -> u64 {
        self.table.len() as u64
    }

    /// The refcount of a host cluster still in memory (0 if never referenced).
    pub(super) fn get(&self, cluster: u64) -> u16 {
        cluster
            .checked_sub(self.window_start)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.counts.get(i).copied())
            .unwrap_or(0)
    }

    /// One more reference to each of the `n` host clusters from `first`. Fails (a bug of the
    /// caller, never expected) for a cluster whose block is already written or a count that
    /// would overflow.
    pub(super) fn add(&mut self, first: u64, n: u64) -> Result<(), String> {
        let start = first.checked_sub(self.window_start).ok_or_else(|| {
            format!("internal error: host cluster {first} counted after its refcount block was written")
        })?;
        let start = usize::try_from(start).map_err(|_| "internal error: refcount window too large".to_string())?;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| start.checked_add(n))
            .ok_or_else(|| "internal error: refcount window too large".to_string())?;
        if self.counts.len() < end {
            self.counts.resize(end, 0);
        }
        for count in &mut self.counts[start..end] {
            *count = count.checked_add(1).ok_or_else(|| "internal error: refcount overflow".to_string())?;
        }
        Ok(())
    }

    /// The `index`-th block of the window as on disk (big-endian, zero-padded): `cluster_size` bytes.
    pub(super) fn block_bytes(&self, index: u64) -> Vec<u8> {
        let per_block = self.per_block as usize;
        let start = (index as usize).saturating_mul(per_block).min(self.counts.len());
        let end = start.saturating_add(per_block).min(self.counts.len());
        let mut out = Vec::with_capacity(per_block * 2);
        for count in &self.counts[start..end] {
            out.extend_from_slice(&count.to_be_bytes());
        }
        out.resize(per_block * 2, 0);
        out
    }

    /// The oldest block in memory was written at `offset`: drop it from the window.
    pub(super) fn retire_first_block(&mut self, offset: u64) {
        let n = (self.per_block as usize).min(self.counts.len());
        self.counts.drain(..n);
        self.window_start += self.per_block;
        self.table.push(offset);
    }

    /// Records a block written at `offset` by the final pass (which writes all the blocks of the
    /// window at once and does not slide it).
    pub(super) fn push_table_entry(&mut self, offset: u64) {
        self.table.push(offset);
    }

    /// The refcount table: offsets of every block written.
    pub(super) fn table(&self) -> &[u64] {
        &self.table
    }

    /// Bytes of memory held.
    #[cfg(test)]
    pub(super) fn memory_bytes(&self) -> usize {
        self.counts.capacity() * 2 + self.table.capacity() * 8
    }
}
