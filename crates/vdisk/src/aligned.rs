//! Page-aligned byte buffers: what direct I/O (`O_DIRECT`) needs, so a restore or a
//! conversion can write its output without going through the page cache.

use std::ops::{Deref, DerefMut};

/// Alignment of every [`AlignedBuf`], and the unit direct writes are made of.
pub const ALIGN: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// A growable byte buffer whose start is [`ALIGN`]-aligned in memory.
#[derive(Default)]
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty buffer with room for `bytes` without reallocating.
    pub fn with_capacity(bytes: usize) -> Self {
        AlignedBuf {
            pages: Vec::with_capacity(bytes.div_ceil(ALIGN)),
            len: 0,
        }
    }

    /// Bytes the buffer holds without growing.
    pub fn capacity(&self) -> usize {
        self.pages.capacity() * ALIGN
    }

    /// Empties the buffer, keeping its memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `data`.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let start = self.len;
        let end = start + data.len();
        let pages = end.div_ceil(ALIGN);
        if pages > self.pages.len() {
            self.pages.resize(pages, Page([0; ALIGN]));
        }
        self.len = end;
        self[start..].copy_from_slice(data);
    }

    /// Sets the length; new bytes are zero, existing ones are kept.
    pub fn resize(&mut self, len: usize) {
        let pages = len.div_ceil(ALIGN);
        if pages > self.pages.len() {
            self.pages.resize(pages, Page([0; ALIGN]));
        }
        // Bytes between the old and new length may hold earlier content: zero them, as
        // `Vec::resize` would.
        if len > self.len {
            let old = self.len;
            self.len = len;
            self[old..].fill(0);
        } else {
            self.len = len;
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `pages` holds at least `len` initialised bytes (`resize` keeps
        // `pages.len() * ALIGN >= len`), and `Page` is plain bytes with no padding.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_keeps_content() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        b.resize(5000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        b[4999] = 7;
        b.resize(3);
        b.resize(5000);
        assert_eq!(b[4999], 0, "regrown bytes read as zero");
        b.resize(3 * ALIGN + 1);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 3 * ALIGN + 1);
        b.clear();
        b.extend_from_slice(b"abc");
        b.extend_from_slice(b"de");
        assert_eq!(&b[..], b"abcde");
    }
}
