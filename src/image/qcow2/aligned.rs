//! The writer's buffer, aligned so that it can be handed to an `O_DIRECT` write.

use std::ops::{Deref, DerefMut};

/// Alignment of the buffer's start: a page, which satisfies the logical block size of every
/// device `O_DIRECT` may meet (512 or 4096 bytes).
pub(super) const ALIGN: usize = 4096;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Block([u8; ALIGN]);

/// A growable byte buffer like `Vec<u8>`, whose first byte is always `ALIGN`-aligned.
pub(super) struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl AlignedBuf {
    /// An empty buffer with room for at least `bytes` bytes (zeroed once, here).
    pub(super) fn with_capacity(bytes: usize) -> AlignedBuf {
        AlignedBuf { blocks: vec![Block([0; ALIGN]); bytes.div_ceil(ALIGN)], len: 0 }
    }

    /// Bytes the buffer holds without growing.
    pub(super) fn capacity(&self) -> usize {
        self.blocks.len() * ALIGN
    }

    pub(super) fn clear(&mut self) {
        self.len = 0;
    }

    pub(super) fn extend_from_slice(&mut self, data: &[u8]) {
        let at = self.len;
        self.set_len_uninit(at + data.len());
        self[at..].copy_from_slice(data);
    }

    /// Grows with zeros, or shrinks, to `len` bytes.
    pub(super) fn resize_zeroed(&mut self, len: usize) {
        let old = self.len;
        self.set_len_uninit(len);
        if len > old {
            self[old..].fill(0);
        }
    }

    /// Removes the first `n` bytes, moving the rest to the (aligned) start.
    pub(super) fn drain_front(&mut self, n: usize) {
        let len = self.len;
        self.all_mut().copy_within(n..len, 0);
        self.len = len - n;
    }

    /// Sets the length, growing the allocation if needed; new bytes hold stale data.
    fn set_len_uninit(&mut self, len: usize) {
        if len > self.capacity() {
            self.blocks.resize(len.div_ceil(ALIGN), Block([0; ALIGN]));
        }
        self.len = len;
    }

    fn all(&self) -> &[u8] {
        // SAFETY: `Block` is `repr(C)` around a byte array, so the vector's storage is
        // `blocks.len() * ALIGN` initialised bytes with no padding, valid as `u8`.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.capacity()) }
    }

    fn all_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `all`; the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), self.capacity()) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.all()[..self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.all_mut()[..len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("capacity", &self.capacity()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_vec_and_stays_aligned() {
        let mut buf = AlignedBuf::with_capacity(10);
        assert_eq!(buf.capacity(), ALIGN);
        buf.extend_from_slice(b"hello");
        buf.resize_zeroed(ALIGN + 3);
        assert_eq!(&buf[..6], b"hello\0");
        assert!(buf[5..].iter().all(|&b| b == 0));
        assert_eq!(buf.capacity(), 2 * ALIGN);
        buf.extend_from_slice(b"xyz");
        buf.drain_front(ALIGN);
        assert_eq!(&buf[..], b"\0\0\0xyz");
        assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
        // Stale bytes past the length never leak back in as data.
        buf.resize_zeroed(1);
        buf.resize_zeroed(6);
        assert_eq!(&buf[..], b"\0\0\0\0\0\0");
        buf.clear();
        assert!(buf.is_empty());
    }
}
