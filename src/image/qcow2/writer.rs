//! The one-pass qcow2 writer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::aligned::AlignedBuf;
use super::header::{
    Header, MAX_CLUSTER_BITS, MAX_HOST_OFFSET, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS, OFLAG_COMPRESSED,
    OFLAG_COPIED,
};
use super::refcount::Refcounts;
use super::{WriteStats, WriterOptions};
use crate::config::CompressionType;
use crate::image::ImageError;

/// Bytes gathered before they are written out.
const BUFFER_BYTES: usize = 8 << 20;
/// Largest single page-cache `pwrite`: see [`Qcow2Writer::write_buffer`].
const WRITE_CHUNK_BYTES: usize = 64 << 10;
/// Largest piece handed to one `copy_file_range` call or one read+write of the fallback.
const COPY_PIECE_BYTES: u64 = 256 << 20;

/// Writes a new qcow2 v3 image front to back; see the module documentation for the layout.
///
/// Nothing is valid until [`Qcow2Writer::finish`] returns: a writer dropped before (or after an
/// error) leaves a file whose first cluster is zeros, which no reader takes for a qcow2 image;
/// the caller deletes it. After an I/O error every further call fails.
#[derive(Debug)]
pub(crate) struct Qcow2Writer {
    file: File,
    path: PathBuf,
    cluster_bits: u32,
    cluster_size: u64,
    /// Virtual size as given.
    given_size: u64,
    /// Virtual size in the header: `given_size` rounded up to 512 bytes, as qemu-img does.
    header_size: u64,
    guest_clusters: u64,
    compression: Option<CompressionType>,
    /// Bytes not yet written, which belong at `buf_start`. Always whole clusters, so every
    /// flush is cluster-aligned in the file and in memory, as `O_DIRECT` needs.
    buf: AlignedBuf,
    buf_start: u64,
    /// The open compressed cluster: compressed clusters are packed at `pack_at` up to
    /// `pack_end` (the end of the host cluster `pack_at` is in); nothing is open when they are
    /// equal. An open cluster always lies in `buf` (zero-filled), so packing writes in place.
    pack_at: u64,
    pack_end: u64,
    pub(super) l1: Vec<u64>,
    /// The L2 table being filled, and its index in L1.
    l2: Vec<u64>,
    l2_table: Option<u64>,
    /// Smallest guest cluster still accepted.
    next_guest: u64,
    pub(super) refs: Refcounts,
    /// Refcount a host cluster may reach by packing compressed clusters (u16::MAX; lowered by tests).
    pub(super) max_refcount: u16,
    stats: WriteStats,
    /// Set by an I/O error: the file is unusable.
    failed: bool,
    /// How `copy_clusters_from` moves bytes; `Auto` becomes `ReadWrite` for good when
    /// `copy_file_range` turns out unsupported.
    pub(super) copy_mode: CopyMode,
    /// The output's filesystem type (`f_type`) when `copy_file_range` into it can be offloaded
    /// (see [`offloading_fs`]); taken once, at creation.
    offload_fs: Option<u32>,
    /// Largest single `pwrite` when the buffer is written out through the page cache.
    pub(super) write_chunk: usize,
    /// Whether the buffer is written with `O_DIRECT`; see [`Qcow2Writer::flush_buffer`].
    pub(super) direct: bool,
}

/// How [`Qcow2Writer::copy_clusters_from`] moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyMode {
    /// `copy_file_range` where the filesystem can share or offload the copy, else read+write.
    Auto,
    /// Always `copy_file_range` (falls back on an "unsupported" error). Chosen by tests, to
    /// exercise it on filesystems where `Auto` would not.
    #[cfg_attr(not(test), allow(dead_code))]
    CopyFileRange,
    /// Always read+write.
    ReadWrite,
}

/// Whether [`Qcow2Writer::copy_clusters_from`] hands copies from a given source file to
/// `copy_file_range` (a reflink or a server-side copy) or reads and writes them, as a value
/// other threads can ask while the writer is busy: the conversion pipeline's workers use it
/// to leave such copies to the writer instead of reading the bytes themselves. Taken from
/// [`Qcow2Writer::copy_offload`]; it does not see a later switch to read+write (after
/// `copy_file_range` turned out unsupported), which the writer's own answer does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyOffload {
    mode: CopyMode,
    output_fs: Option<u32>,
}

impl CopyOffload {
    /// Whether any copy into the output can be offloaded: false on ext4, tmpfs and other
    /// filesystems that can neither share blocks nor copy server-side, where no source file
    /// needs to be asked about.
    pub(crate) fn possible(&self) -> bool {
        match self.mode {
            CopyMode::Auto => self.output_fs.is_some(),
            CopyMode::CopyFileRange => true,
            CopyMode::ReadWrite => false,
        }
    }

    /// `None` when copies from `src` are read and written; otherwise the source filesystem's
    /// block size (`f_bsize`, at least 512), a multiple of which a source offset must be for a
    /// reflinking filesystem to share the blocks — from elsewhere the kernel copies them
    /// instead, correctly but with none of the gain.
    pub(crate) fn source_alignment(&self, src: &File) -> Option<u64> {
        let fs = nix::sys::statfs::fstatfs(src).ok();
        let block = fs.as_ref().and_then(|fs| u64::try_from(fs.block_size()).ok()).unwrap_or(4096).max(512);
        match self.mode {
            CopyMode::Auto => {
                let src_fs = fs.map(|fs| fs.filesystem_type().0 as u32);
                (self.output_fs.is_some() && src_fs == self.output_fs).then_some(block)
            }
            CopyMode::CopyFileRange => Some(block),
            CopyMode::ReadWrite => None,
        }
    }
}

impl Qcow2Writer {
    /// Creates a new file (create_new + O_NOFOLLOW: never follow a symlink or reuse a file).
    ///
    /// `virtual_size` is rounded up to a multiple of 512 bytes in the header, as `qemu-img
    /// create` does (qemu counts disks in sectors); the padding reads as zeros.
    pub(crate) fn create(path: &Path, virtual_size: u64, options: WriterOptions) -> Result<Self, ImageError> {
        let cluster_bits = options.cluster_bits;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(ImageError::Unsupported(format!(
                "qcow2 cluster_bits {cluster_bits}: qemu accepts {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS} (512 bytes to 2 MiB)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let too_large = || {
            ImageError::Limit(format!(
                "a virtual size of {virtual_size} bytes is too large for qcow2 with {cluster_size}-byte clusters"
            ))
        };
        let header_size = virtual_size.checked_next_multiple_of(512).ok_or_else(too_large)?;
        let guest_clusters = header_size.div_ceil(cluster_size);
        let l2_entries = cluster_size / 8;
        let l1_entries = guest_clusters.div_ceil(l2_entries);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(too_large());
        }

        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| ImageError::io(path, e))?;
        // Filesystems without O_DIRECT (tmpfs before Linux 6.6, some FUSE) refuse the flag.
        let direct = set_direct(&file, true).is_ok();
        let offload_fs = nix::sys::statfs::fstatfs(&file)
            .ok()
            .map(|fs| fs.filesystem_type().0 as u32)
            .filter(|&fs_type| offloading_fs(fs_type));

        let mut writer = Qcow2Writer {
            file,
            path: path.to_owned(),
            cluster_bits,
            cluster_size,
            given_size: virtual_size,
            header_size,
            guest_clusters,
            compression: options.compression,
            buf: AlignedBuf::with_capacity(BUFFER_BYTES + 2 * cluster_size as usize),
            buf_start: 0,
            pack_at: 0,
            pack_end: 0,
            l1: vec![0; l1_entries as usize],
            l2: vec![0; l2_entries as usize],
            l2_table: None,
            next_guest: 0,
            refs: Refcounts::new(cluster_bits),
            max_refcount: u16::MAX,
            stats: WriteStats::default(),
            failed: false,
            copy_mode: CopyMode::Auto,
            offload_fs,
            write_chunk: WRITE_CHUNK_BYTES,
            direct,
        };
        // Cluster 0: the header, written by `finish`; zeros until then.
        let header = writer.alloc_clusters(1)?;
        debug_assert_eq!(header, 0);
        writer.append_zeros(cluster_size as usize)?;
        Ok(writer)
    }

    /// Bytes per cluster.
    #[cfg(test)]
    pub(crate) fn cluster_size(&self) -> usize {
        self.cluster_size as usize
    }

    /// Bytes of memory the writer holds (write buffer, L1, the current L2 table, refcounts):
    /// about 8 MiB plus the L1 table (8 bytes per L2 table, 32 KiB for 2 TiB at 64 KiB
    /// clusters) whatever the disk size.
    #[cfg(test)]
    pub(crate) fn memory_bytes(&self) -> usize {
        self.buf.capacity() + self.l1.capacity() * 8 + self.l2.capacity() * 8 + self.refs.memory_bytes()
    }

    /// Writes one uncompressed guest cluster.
    ///
    /// Guest clusters are given in strictly increasing order; any not given read as zeros
    /// (L2 entry 0). `data.len()` == cluster size, except the disk's last cluster, which may be
    /// shorter: exactly the bytes left in the disk. Either way the rest of the last cluster is
    /// stored as zeros.
    pub(crate) fn write_cluster(&mut self, guest_cluster: u64, data: &[u8]) -> Result<(), ImageError> {
        self.usable()?;
        self.check_guest(guest_cluster, 1)?;
        let tail = self.bytes_in_cluster(guest_cluster);
        if data.len() as u64 != self.cluster_size && data.len() as u64 != tail {
            return Err(self.misuse(format!(
                "guest cluster {guest_cluster} given {} bytes: a cluster holds {} (this one {tail} inside the disk)",
                data.len(),
                self.cluster_size
            )));
        }
        self.ensure_l2(guest_cluster)?;
        let offset = self.alloc_clusters(1)?;
        // Bytes past the disk's end (a whole last cluster given) are stored as zeros.
        let data = &data[..data.len().min(tail as usize)];
        self.append(data)?;
        self.append_zeros(self.cluster_size as usize - data.len())?;
        self.set_l2(guest_cluster, offset | OFLAG_COPIED);
        self.next_guest = guest_cluster + 1;
        self.stats.data_clusters += 1;
        self.settle_refcounts()
    }

    /// Writes one guest cluster compressed by [`super::compress::compress_cluster`] with this
    /// writer's codec. `compressed` must be shorter than a cluster; the ordering rules of
    /// [`Qcow2Writer::write_cluster`] apply.
    ///
    /// It should hold a whole cluster's worth of data; for the disk's last cluster, when that
    /// is short, the data compressed alone is accepted too: the writer checks it and compresses
    /// it again padded with zeros (level 6), which qemu needs to read it back.
    ///
    /// The bytes are packed right after the previous compressed cluster, as qemu packs them,
    /// spanning into the next host cluster when that one is free to take. Uncompressed clusters
    /// written in between go after the open compressed cluster without closing it, so mixing
    /// the two wastes no space; an open cluster is closed (its tail left as zeros) only when the
    /// write buffer or a refcount block is written out past it, or its refcount is full.
    pub(crate) fn write_compressed(&mut self, guest_cluster: u64, compressed: &[u8]) -> Result<(), ImageError> {
        self.usable()?;
        self.check_guest(guest_cluster, 1)?;
        if self.compression.is_none() {
            return Err(self.misuse("a compressed cluster given to a qcow2 writer created without a codec".into()));
        }
        if compressed.is_empty() || compressed.len() as u64 >= self.cluster_size {
            return Err(self.misuse(format!(
                "a compressed cluster of {} bytes: it must be 1 to {} bytes (else write it uncompressed)",
                compressed.len(),
                self.cluster_size - 1
            )));
        }
        let tail = self.bytes_in_cluster(guest_cluster);
        if let (Some(codec), true) = (self.compression, tail < self.cluster_size) {
            // The disk's short last cluster. qemu decompresses exactly one cluster, so a stream
            // of the tail alone would not read back: check (once per disk), and if need be
            // compress again padded with zeros, or store it uncompressed.
            let cs = self.cluster_size as usize;
            let Some(mut plain) = super::compress::decompress(codec, compressed, cs) else {
                return Err(self.misuse(format!("guest cluster {guest_cluster}: not a valid {codec:?} stream")));
            };
            if plain.len() > cs {
                return Err(self.misuse(format!("guest cluster {guest_cluster}: decompresses to more than a cluster")));
            }
            if plain.len() < cs {
                plain.resize(cs, 0);
                plain[tail as usize..].fill(0);
                let mut padded = Vec::new();
                if super::compress::compress_cluster(codec, 6, &plain, &mut padded) {
                    return self.pack_compressed(guest_cluster, &padded);
                }
                return self.write_cluster(guest_cluster, &plain[..tail as usize]);
            }
        }
        self.pack_compressed(guest_cluster, compressed)
    }

    /// Packs a valid compressed cluster (see [`Qcow2Writer::write_compressed`]).
    fn pack_compressed(&mut self, guest_cluster: u64, compressed: &[u8]) -> Result<(), ImageError> {
        self.ensure_l2(guest_cluster)?;
        let len = compressed.len() as u64;
        let open_cluster = self.pack_at >> self.cluster_bits;
        let open = self.pack_at < self.pack_end && self.refs.get(open_cluster) < self.max_refcount;
        let offset = if open && self.pack_at + len <= self.pack_end {
            // Fits in the open cluster.
            self.refs.add(open_cluster, 1).map_err(|e| self.internal(e))?;
            self.pack_at
        } else if open && self.pack_end == self.cursor() {
            // Spans from the open cluster, the last in the file, into new ones.
            let more = (self.pack_at + len - self.pack_end).div_ceil(self.cluster_size);
            self.refs.add(open_cluster, 1).map_err(|e| self.internal(e))?;
            self.alloc_clusters(more)?;
            self.append_zeros((more << self.cluster_bits) as usize)?;
            self.pack_end += more << self.cluster_bits;
            self.pack_at
        } else {
            // A new open cluster at the end.
            let clusters = len.div_ceil(self.cluster_size);
            let offset = self.alloc_clusters(clusters)?;
            self.append_zeros((clusters << self.cluster_bits) as usize)?;
            self.pack_end = offset + (clusters << self.cluster_bits);
            offset
        };
        // The descriptor's offset field is 70 - cluster_bits bits wide (alloc_clusters keeps
        // offsets below 2^56, which is narrower for every cluster size but 2 MiB).
        if (offset >> (70 - self.cluster_bits)) != 0 {
            self.failed = true;
            return Err(ImageError::Limit(format!(
                "{}: the qcow2 file would grow past 2^{} bytes",
                self.path.display(),
                70 - self.cluster_bits
            )));
        }
        let at = (offset - self.buf_start) as usize;
        self.buf[at..at + compressed.len()].copy_from_slice(compressed);
        self.pack_at = offset + len;
        let extra_sectors = ((offset + len - 1) >> 9) - (offset >> 9);
        let entry = OFLAG_COMPRESSED | (extra_sectors << (62 - (self.cluster_bits - 8))) | offset;
        self.set_l2(guest_cluster, entry);
        self.next_guest = guest_cluster + 1;
        self.stats.compressed_clusters += 1;
        self.settle_refcounts()
    }

    /// Writes `count` consecutive full guest clusters whose bytes sit verbatim in `src` at
    /// `src_offset`: copied with copy_file_range(2) where both files are on one filesystem that
    /// can reflink or copy server-side (btrfs, XFS, NFS, SMB, Ceph …), else with read+write
    /// through the write buffer (faster than the kernel's splice fallback on ext4 or tmpfs), and
    /// read+write too if `copy_file_range` turns out unsupported. The ordering rules of
    /// [`Qcow2Writer::write_cluster`] apply; if the range ends with the disk's short last
    /// cluster, only the bytes inside the disk are read from `src`.
    ///
    /// The clusters land contiguously in the output, except where an L2 table or a refcount
    /// block is due (every `cluster_size / 8` guest clusters, every `cluster_size / 2` host
    /// clusters) — so a reflinking filesystem shares long extents.
    pub(crate) fn copy_clusters_from(
        &mut self,
        first_guest_cluster: u64,
        count: u64,
        src: &File,
        src_offset: u64,
    ) -> Result<(), ImageError> {
        self.usable()?;
        if count == 0 {
            return Ok(());
        }
        self.check_guest(first_guest_cluster, count)?;
        if src_offset.checked_add(count << self.cluster_bits).is_none() {
            return Err(self.misuse(format!("source offset {src_offset} + {count} clusters overflows")));
        }
        let l2_bits = self.cluster_bits - 3;
        let max_piece = (COPY_PIECE_BYTES >> self.cluster_bits).clamp(1, self.refs.per_block());
        let offload = self.copy_offloads_from(src);
        let end = first_guest_cluster + count;
        let mut guest = first_guest_cluster;
        let mut src_at = src_offset;
        while guest < end {
            self.ensure_l2(guest)?;
            let table_end = ((guest >> l2_bits) + 1) << l2_bits;
            let piece = (end - guest).min(table_end - guest).min(max_piece);
            let offset = self.alloc_clusters(piece)?;
            for i in 0..piece {
                self.set_l2(guest + i, (offset + (i << self.cluster_bits)) | OFLAG_COPIED);
            }
            let last = guest + piece - 1;
            let bytes = ((piece - 1) << self.cluster_bits) + self.bytes_in_cluster(last);
            self.flush_buffer(false)?;
            self.copy_range(src, src_at, offset, bytes, offload)?;
            self.append_zeros(((piece << self.cluster_bits) - bytes) as usize)?;
            src_at += bytes;
            guest += piece;
            self.next_guest = guest;
            self.stats.data_clusters += piece;
            self.stats.copied_clusters += piece;
            self.settle_refcounts()?;
        }
        Ok(())
    }

    /// How copies into this file are made, for other threads to ask; see [`CopyOffload`].
    pub(crate) fn copy_offload(&self) -> CopyOffload {
        CopyOffload { mode: self.copy_mode, output_fs: self.offload_fs }
    }

    /// Whether [`Qcow2Writer::copy_clusters_from`] would copy from `src` with
    /// `copy_file_range` now: both files on one filesystem that shares blocks or copies
    /// server-side (or a test forcing it), and `copy_file_range` not yet found unsupported.
    pub(crate) fn copy_offloads_from(&self, src: &File) -> bool {
        self.copy_offload().source_alignment(src).is_some()
    }

    /// Chooses how `copy_clusters_from` moves bytes, for tests that exercise one way on any
    /// filesystem.
    #[cfg(test)]
    pub(crate) fn set_copy_mode(&mut self, mode: CopyMode) {
        self.copy_mode = mode;
    }

    /// Writes L2 tables still pending, L1, the last refcount blocks and the refcount table, then
    /// the header LAST; fsyncs (once before the header, once after). Returns stats.
    pub(crate) fn finish(mut self) -> Result<WriteStats, ImageError> {
        self.usable()?;
        if let Some(table) = self.l2_table.take() {
            self.write_l2(table)?;
            self.settle_refcounts()?;
        }

        let l1_offset = if self.l1.is_empty() {
            0
        } else {
            let bytes = self.l1.len() as u64 * 8;
            let clusters = bytes.div_ceil(self.cluster_size);
            let offset = self.alloc_clusters(clusters)?;
            let mut table = Vec::with_capacity((clusters * self.cluster_size) as usize);
            for entry in &self.l1 {
                table.extend_from_slice(&entry.to_be_bytes());
            }
            table.resize((clusters * self.cluster_size) as usize, 0);
            self.append(&table)?;
            self.settle_refcounts()?;
            offset
        };

        // The last refcount blocks and the table must count themselves: grow both until the
        // blocks cover every cluster up to the end of the table.
        let end = self.cursor() >> self.cluster_bits;
        let done = self.refs.blocks_written();
        let per_block = self.refs.per_block();
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = end + blocks + table_clusters;
            let need_blocks = total.div_ceil(per_block) - done;
            let need_table = ((done + need_blocks) * 8).div_ceil(self.cluster_size);
            if (need_blocks, need_table) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (need_blocks, need_table);
        }
        if table_clusters * self.cluster_size > MAX_REFTABLE_BYTES {
            return Err(ImageError::Limit(format!(
                "{}: the refcount table would exceed qemu's limit of {MAX_REFTABLE_BYTES} bytes",
                self.path.display()
            )));
        }
        let blocks_offset = self.alloc_clusters(blocks + table_clusters)?;
        let table_offset = blocks_offset + (blocks << self.cluster_bits);
        for i in 0..blocks {
            let bytes = self.refs.block_bytes(i);
            self.append(&bytes)?;
            self.refs.push_table_entry(blocks_offset + (i << self.cluster_bits));
        }
        let mut table = Vec::with_capacity((table_clusters * self.cluster_size) as usize);
        for entry in self.refs.table() {
            table.extend_from_slice(&entry.to_be_bytes());
        }
        table.resize((table_clusters * self.cluster_size) as usize, 0);
        self.append(&table)?;
        self.flush_buffer(false)?;
        let file_bytes = self.cursor();
        debug_assert_eq!(file_bytes, (end + blocks + table_clusters) << self.cluster_bits);

        self.file.sync_data().map_err(|e| self.io_error(e))?;
        // The header is shorter than a block: it goes through the page cache.
        self.use_page_cache();
        let header = Header {
            cluster_bits: self.cluster_bits,
            size: self.header_size,
            l1_size: self.l1.len() as u32,
            l1_offset,
            reftable_offset: table_offset,
            reftable_clusters: table_clusters as u32,
            compression: self.compression.unwrap_or(CompressionType::Zlib),
        };
        self.file.write_all_at(&header.encode(), 0).map_err(|e| self.io_error(e))?;
        self.file.sync_all().map_err(|e| self.io_error(e))?;

        let mut stats = self.stats;
        stats.file_bytes = file_bytes;
        stats.zero_clusters_skipped = self.guest_clusters - stats.data_clusters - stats.compressed_clusters;
        Ok(stats)
    }

    // ---- guest side -------------------------------------------------------------------

    /// Bytes of `guest_cluster` inside the disk as given (less than a cluster only for the last).
    fn bytes_in_cluster(&self, guest_cluster: u64) -> u64 {
        (self.given_size - (guest_cluster << self.cluster_bits)).min(self.cluster_size)
    }

    /// `count` clusters from `first` may be written next.
    fn check_guest(&self, first: u64, count: u64) -> Result<(), ImageError> {
        if first < self.next_guest {
            return Err(self.misuse(format!(
                "guest cluster {first} given after cluster {}: clusters must come in increasing order",
                self.next_guest - 1
            )));
        }
        if first.checked_add(count).is_none_or(|end| end > self.guest_clusters)
            || (first << self.cluster_bits) >= self.given_size
        {
            return Err(self.misuse(format!(
                "guest clusters {first} (+{count}) lie past the end of a {}-byte disk ({} clusters)",
                self.given_size, self.guest_clusters
            )));
        }
        Ok(())
    }

    /// Makes the L2 table of `guest_cluster` the current one, writing the previous one out.
    fn ensure_l2(&mut self, guest_cluster: u64) -> Result<(), ImageError> {
        let table = guest_cluster >> (self.cluster_bits - 3);
        if self.l2_table == Some(table) {
            return Ok(());
        }
        if let Some(previous) = self.l2_table.take() {
            self.write_l2(previous)?;
            self.settle_refcounts()?;
        }
        self.l2.fill(0);
        self.l2_table = Some(table);
        Ok(())
    }

    fn set_l2(&mut self, guest_cluster: u64, entry: u64) {
        let index = (guest_cluster & ((1 << (self.cluster_bits - 3)) - 1)) as usize;
        self.l2[index] = entry;
    }

    /// Appends the current L2 table and points L1 at it.
    fn write_l2(&mut self, table: u64) -> Result<(), ImageError> {
        let offset = self.alloc_clusters(1)?;
        let mut bytes = Vec::with_capacity(self.cluster_size as usize);
        for entry in &self.l2 {
            bytes.extend_from_slice(&entry.to_be_bytes());
        }
        self.append(&bytes)?;
        self.l1[table as usize] = offset | OFLAG_COPIED;
        Ok(())
    }

    // ---- host side --------------------------------------------------------------------

    /// Offset of the next byte appended.
    fn cursor(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    /// Reserves `n` whole clusters at the cursor (always cluster-aligned) with refcount 1 each;
    /// the caller then appends exactly `n` clusters of bytes.
    fn alloc_clusters(&mut self, n: u64) -> Result<u64, ImageError> {
        let offset = self.cursor();
        debug_assert_eq!(offset & (self.cluster_size - 1), 0);
        if offset + (n << self.cluster_bits) > MAX_HOST_OFFSET {
            return Err(ImageError::Limit(format!(
                "{}: the qcow2 file would grow past 2^56 bytes",
                self.path.display()
            )));
        }
        self.refs.add(offset >> self.cluster_bits, n).map_err(|e| self.internal(e))?;
        Ok(offset)
    }

    /// Writes out every refcount block whose clusters are all behind the cursor.
    fn settle_refcounts(&mut self) -> Result<(), ImageError> {
        while self.cursor() >> self.cluster_bits >= self.refs.window_end() {
            // The open compressed cluster may not gain references once its block is written.
            if self.pack_at >> self.cluster_bits < self.refs.window_end() {
                self.pack_end = self.pack_at;
            }
            // The block's own cluster is at or past the window's end: counted in a later block.
            let offset = self.alloc_clusters(1)?;
            let bytes = self.refs.block_bytes(0);
            self.append(&bytes)?;
            self.refs.retire_first_block(offset);
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        if self.buf.len() + bytes.len() > BUFFER_BYTES {
            self.flush_buffer(true)?;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn append_zeros(&mut self, n: usize) -> Result<(), ImageError> {
        if self.buf.len() + n > BUFFER_BYTES {
            self.flush_buffer(true)?;
        }
        self.buf.resize_zeroed(self.buf.len() + n);
        Ok(())
    }

    /// Writes the buffer out. With `keep_open`, an open compressed cluster that is the last in
    /// the buffer stays there to take more; any other open cluster is closed, since packing
    /// writes in the buffer only.
    fn flush_buffer(&mut self, keep_open: bool) -> Result<(), ImageError> {
        let open = self.pack_at < self.pack_end;
        let keep_from = if keep_open && open && self.pack_end == self.cursor() {
            self.pack_at & !(self.cluster_size - 1)
        } else {
            self.pack_end = self.pack_at;
            self.cursor()
        };
        let n = (keep_from - self.buf_start) as usize;
        if n == 0 {
            return Ok(());
        }
        self.write_buffer(n, self.buf_start)?;
        self.buf.drain_front(n);
        self.buf_start = keep_from;
        Ok(())
    }

    /// Writes the first `n` bytes of the buffer at `offset`.
    ///
    /// With `O_DIRECT` in one write: on the CI-like VM (ext4 on virtio) 8 MiB direct writes
    /// ran at 1.6 GB/s where page-cache writes plus the fsync that publishing needs ran at
    /// 0.3 GB/s, and copying into the page cache was the writer thread's largest cost. Where
    /// the file refuses a direct write (EINVAL: an alignment the device does not take), the
    /// writer falls back to the page cache for good, in 64 KiB `pwrite`s: on ext4 (Linux 6.18)
    /// those took less kernel time than 8 MiB ones (median 1079 vs 771 MiB per CPU second over
    /// 5 runs each; a tie on tmpfs) — large folios, presumably.
    fn write_buffer(&mut self, n: usize, offset: u64) -> Result<(), ImageError> {
        if self.direct {
            match self.file.write_all_at(&self.buf[..n], offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.use_page_cache(),
                Err(e) => return Err(self.io_error(e)),
            }
        }
        write_chunked(&self.file, &self.buf[..n], offset, self.write_chunk).map_err(|e| self.io_error(e))
    }

    /// Writes `bytes` at `offset` the way a buffer flush does, for tests of the fallback.
    #[cfg(test)]
    pub(super) fn write_buffer_for_test(&mut self, bytes: &[u8], offset: u64) -> Result<(), ImageError> {
        let mut buf = AlignedBuf::with_capacity(bytes.len());
        buf.extend_from_slice(bytes);
        let kept = std::mem::replace(&mut self.buf, buf);
        let result = self.write_buffer(bytes.len(), offset);
        self.buf = kept;
        result
    }

    /// Writes through the page cache from now on.
    pub(super) fn use_page_cache(&mut self) {
        if self.direct {
            // Failing to clear the flag would only make the next write fail again, loudly.
            let _ = set_direct(&self.file, false);
            self.direct = false;
        }
    }

    /// Copies `len` bytes of `src` at `src_at` to the output at `dst_at` (the cursor, with an
    /// empty buffer), with `copy_file_range` if `offload`; the cursor moves past them.
    fn copy_range(
        &mut self,
        src: &File,
        mut src_at: u64,
        dst_at: u64,
        len: u64,
        mut offload: bool,
    ) -> Result<(), ImageError> {
        debug_assert!(self.buf.is_empty() && self.buf_start == dst_at);
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(COPY_PIECE_BYTES);
            if offload {
                match copy_file_range(src, src_at, &self.file, dst_at + done, want) {
                    Ok(0) => return Err(self.io_error(source_too_short(src_at))),
                    Ok(n) => {
                        done += n;
                        src_at += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if copy_file_range_unsupported(&e) => {
                        offload = false;
                        self.copy_mode = CopyMode::ReadWrite;
                    }
                    Err(e) => return Err(self.io_error(e)),
                }
            }
            // Fallback: read into the (empty) write buffer, write it out.
            let n = want.min(BUFFER_BYTES as u64) as usize;
            self.buf.resize_zeroed(n);
            let read = match src.read_exact_at(&mut self.buf, src_at) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(source_too_short(src_at)),
                Err(e) => Err(io::Error::new(e.kind(), format!("reading the source to copy at byte {src_at}: {e}"))),
            };
            let result = match read {
                Ok(()) => self.write_buffer(n, dst_at + done),
                Err(e) => Err(self.io_error(e)),
            };
            self.buf.clear();
            result?;
            done += n as u64;
            src_at += n as u64;
        }
        self.buf_start = dst_at + len;
        Ok(())
    }

    // ---- errors -----------------------------------------------------------------------

    fn usable(&self) -> Result<(), ImageError> {
        if self.failed {
            return Err(ImageError::io(
                &self.path,
                io::Error::other("the qcow2 writer stopped at an earlier error; the file is incomplete"),
            ));
        }
        Ok(())
    }

    fn io_error(&mut self, e: io::Error) -> ImageError {
        self.failed = true;
        ImageError::io(&self.path, e)
    }

    fn internal(&mut self, message: String) -> ImageError {
        self.failed = true;
        ImageError::io(&self.path, io::Error::other(message))
    }

    /// A call the writer cannot honour; the writer is unchanged and still usable.
    fn misuse(&self, message: String) -> ImageError {
        ImageError::io(&self.path, io::Error::new(io::ErrorKind::InvalidInput, message))
    }
}

/// `pwrite`s of at most `chunk` bytes.
fn write_chunked(file: &File, bytes: &[u8], offset: u64, chunk: usize) -> io::Result<()> {
    for (i, piece) in bytes.chunks(chunk).enumerate() {
        file.write_all_at(piece, offset + (i * chunk) as u64)?;
    }
    Ok(())
}

/// Turns `O_DIRECT` on or off for `file`.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor we own read and set its status flags only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn source_too_short(at: u64) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("the source to copy ends before byte {at}"))
}

/// copy_file_range(2) with explicit offsets (neither file position moves).
fn copy_file_range(src: &File, src_at: u64, dst: &File, dst_at: u64, len: u64) -> io::Result<u64> {
    let mut src_off = libc::loff_t::try_from(src_at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut dst_off = libc::loff_t::try_from(dst_at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both descriptors are open for the duration of the call; the offset pointers
    // point to live locals; the kernel reads and writes nothing else of ours.
    let n =
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut src_off, dst.as_raw_fd(), &mut dst_off, len as usize, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as u64)
    }
}

/// Whether `copy_file_range` between two files of a filesystem of type `fs_type` can skip
/// moving the bytes through this host: a reflink (btrfs, XFS, bcachefs, OCFS2) or a server-side
/// copy (NFS 4.2, SMB, Ceph), or an overlay that may pass either down. Elsewhere (ext4, tmpfs …)
/// the kernel falls back to an in-kernel splice that measured slower than our read+write
/// through the 8 MiB buffer: 1 GiB from the page cache, 4 runs each, read+write won every run on
/// ext4 (median ~790 vs ~650 MiB per CPU second) and on tmpfs (~1790 vs ~1190). Source and
/// output must both be of that type (see [`CopyOffload::source_alignment`]).
fn offloading_fs(fs_type: u32) -> bool {
    const OFFLOADING: [u32; 10] = [
        0x9123_683e, // btrfs
        0x5846_5342, // XFS
        0xca45_1a4e, // bcachefs
        0x7461_636f, // OCFS2
        0x0000_6969, // NFS
        0xfe53_4d42, // SMB2
        0xff53_4d42, // CIFS
        0x0000_517b, // SMB
        0x00c3_6400, // Ceph
        0x794c_7630, // overlayfs
    ];
    OFFLOADING.contains(&fs_type)
}

/// Errors that mean "not between these two files": fall back to read+write.
fn copy_file_range_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::EBADF | libc::ETXTBSY | libc::EPERM)
    )
}
