//! Views inside virtual disks, for item-level recovery.
//!
//! It finds the partitions of a [`vdisk::VirtualDisk`] ([`read_partitions`]: MBR with
//! extended/logical partitions, GPT with fallback to the backup header), names the file
//! system at a byte range by its signature ([`probe`]), and opens NTFS, ext2/3/4, FAT
//! and exFAT read-only ([`open`], the [`FileSystem`] trait) on a [`Volume`]: a byte range of
//! the disk read through a chunk cache, so browsing a recovery point never restores it.
//!
//! Every number read from the disk is untrusted: arithmetic is checked, reads are
//! bounded (at most [`MAX_GPT_ENTRIES_BYTES`] for a GPT entries array, at most
//! [`MAX_LOGICALS`] logical partitions), and damage becomes [`Error::Corrupt`] naming
//! the structure and its offset, never a panic or a hang.
//!
//! Partitions that extend past the end of the disk (a truncated image) are *clipped* to
//! the disk end, with a remark in [`PartitionTable::notes`]; a partition that starts at
//! or beyond the end of the disk is [`Error::Corrupt`], naming the entry.

mod exfat;
mod ext;
mod ext_common;
mod ext_own;
mod extract;
mod fat;
mod fs;
mod lznt1;
mod ntfs;
mod probe;
mod select;
mod special;
mod table;
mod volume;

#[doc(hidden)]
pub use ext_own::open_own as open_ext_own;
pub use extract::{MAX_DEPTH, Renamed, Report, extract, extract_all, safe_name, shown};
pub use fs::{Entry, EntryKind, FileSystem, components, find_name};
pub use probe::{FsKind, identify, probe};
pub use select::{VolumeInfo, open_volume, volumes};
pub use special::{MAX_RANGES, PAGE_FILES, SWAP_HEADER_KEPT, Special, page_and_swap, scoped};
pub use table::{
    MAX_GPT_ENTRIES_BYTES, MAX_LOGICALS, PartKind, Partition, PartitionTable, TableKind,
    gpt_type_description, read_partitions,
};
pub use volume::Volume;

/// What can go wrong while reading partition tables or probing file systems.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// Reading the virtual disk failed.
    #[error(transparent)]
    Disk(#[from] vdisk::Error),
    /// A structure on the disk is present but invalid.
    #[error("corrupt {what} at offset {offset:#x}: {detail}")]
    Corrupt {
        what: String,
        offset: u64,
        detail: String,
    },
    /// Valid, but something this crate does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// No such file or directory inside the file system.
    #[error("not found: {0}")]
    NotFound(String),
    /// The path names a file where a directory is needed, or the reverse.
    #[error("{0}")]
    WrongKind(String),
    /// A path that is not acceptable (`..`, empty component where one is needed).
    #[error("bad path: {0}")]
    BadPath(String),
    /// Reading the volume or writing the output failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn corrupt(what: impl Into<String>, offset: u64, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            offset,
            detail: detail.into(),
        }
    }
}

/// Opens the file system found on `volume` (by its signature). A file system that item-
/// level recovery cannot read (BitLocker, LVM, XFS...) is [`Error::Unsupported`] naming
/// it; an unrecognised one is [`Error::Unsupported`] with "no file system recognised".
/// Here, above [`fs`] and the readers, so the readers use `fs`'s types without `fs`
/// importing every reader.
pub fn open(volume: Volume) -> Result<Box<dyn FileSystem>> {
    let kind = probe(volume.disk().as_ref(), volume.start(), volume.len())?;
    match kind {
        FsKind::Ntfs => crate::ntfs::open(volume),
        FsKind::Ext { .. } => crate::ext::open(volume, kind),
        FsKind::Fat { .. } => crate::fat::open(volume, kind),
        FsKind::ExFat => crate::exfat::open(volume),
        FsKind::Unknown => Err(Error::Unsupported(
            "no file system recognised (unformatted, or a file system this version does not know)"
                .into(),
        )),
        other => Err(Error::Unsupported(format!(
            "{}: item-level recovery cannot read this kind of volume",
            other.name()
        ))),
    }
}

/// Reads `len` bytes at `offset`, or `None` when the range is not entirely inside the
/// disk (the caller decides whether that is corruption or absence).
pub(crate) fn read_opt(
    disk: &dyn vdisk::VirtualDisk,
    offset: u64,
    len: usize,
) -> Result<Option<Vec<u8>>> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= disk.virtual_size() => {
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, offset)?;
            Ok(Some(buf))
        }
        _ => Ok(None),
    }
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
