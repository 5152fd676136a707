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

    /// Sets the length; new bytes are zero, existing ones are kept.
    pub fn resize(&mut self, len: usize) {
        let pages = len.div_ceil(ALIGN);
        if pages > self.pages.len() {
            self.pages.resize(pages, Page([0; ALIGN]));
        }
        self.len = len;
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
        assert_eq!(b[4999], 7);
        b.resize(3 * ALIGN + 1);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 3 * ALIGN + 1);
    }
}
