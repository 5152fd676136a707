//! Writing images: every writer is a [`Sink`] fed in increasing offset order, so a
//! conversion streams from any [`VirtualDisk`](crate::VirtualDisk) without holding more
//! than one piece in memory, and ranges that hold nothing stay holes.

use crate::{Error, Format, Result, Subformat};
use std::path::{Path, PathBuf};

/// Destination of a streaming write.
///
/// Contract for callers (checked by the writers, which refuse violations with
/// [`Error::Invalid`]):
/// - calls come in strictly increasing, non-overlapping offset order;
/// - offsets and lengths are multiples of the logical sector size, except a final
///   piece that ends exactly at the virtual size;
/// - ranges never mentioned are unallocated: zeros, or the parent's data for a
///   differencing image;
/// - nothing is durable until [`Sink::finish`] returns; on error the caller deletes the
///   file.
pub trait Sink: Send {
    /// Stores `data` at virtual offset `offset`.
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Declares that `[offset, offset+len)` reads as zeros. Non-differencing writers may
    /// leave it unallocated; differencing writers must record it so the parent does not
    /// show through.
    fn write_zero(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Writes the remaining metadata (tables, footers) and fsyncs the file.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub format: Format,
    /// `Fixed` or `Dynamic`; `Differencing` requires [`CreateOptions::parent`].
    pub subformat: Subformat,
    pub virtual_size: u64,
    /// 512, or 4096 (VHDX only).
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// VHDX/VHD block size or qcow2 cluster size; `None` picks the format's default.
    pub block_size: Option<u64>,
    /// Parent image of a differencing image.
    pub parent: Option<PathBuf>,
}

impl CreateOptions {
    /// Options for a non-differencing image with default sectors and block size.
    pub fn new(format: Format, subformat: Subformat, virtual_size: u64) -> Self {
        CreateOptions {
            format,
            subformat,
            virtual_size,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            block_size: None,
            parent: None,
        }
    }
}

/// Creates a new image file at `path` (which must not exist) and returns its writer.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    if opts.subformat == Subformat::Differencing && opts.parent.is_none() {
        return Err(Error::Invalid(
            "a differencing image needs a parent".to_string(),
        ));
    }
    match opts.format {
        Format::Raw => crate::raw::create(path, opts),
        Format::Vhd => crate::vhd::create(path, opts),
        Format::Vhdx => crate::vhdx::create(path, opts),
        Format::Qcow2 => crate::qcow2::create(path, opts),
    }
}

/// Creates `path` exclusively for writing (never truncates an existing file).
pub(crate) fn create_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, "create", e))
}

/// Tracks the ordering contract of [`Sink`] for a writer and validates each call.
#[derive(Debug, Clone)]
pub struct OrderCheck {
    next: u64,
    size: u64,
    sector: u64,
}

impl OrderCheck {
    /// A checker for a disk of `size` bytes with `sector`-byte logical sectors.
    pub fn new(size: u64, sector: u32) -> Self {
        OrderCheck {
            next: 0,
            size,
            sector: u64::from(sector.max(1)),
        }
    }

    /// Validates a call covering `[offset, offset+len)` and advances.
    pub fn advance(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            })?;
        if offset < self.next {
            return Err(Error::Invalid(format!(
                "writer: offset {offset:#x} is before the end of the previous write {:#x}",
                self.next
            )));
        }
        if !offset.is_multiple_of(self.sector) || (!len.is_multiple_of(self.sector) && end != self.size) {
            return Err(Error::Invalid(format!(
                "writer: range {offset:#x}+{len:#x} is not aligned to {}-byte sectors",
                self.sector
            )));
        }
        self.next = end;
        Ok(())
    }
}
