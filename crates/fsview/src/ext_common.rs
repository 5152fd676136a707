//! What both ext readers share (ext4-view's in [`crate::ext`], our own in
//! [`crate::ext_own`]): format constants, the size check and how an entry is made. Its
//! own module so neither reader imports the other's internals.

use crate::fs::{Entry, EntryKind};
use crate::volume::Volume;
use crate::{Error, Result};

/// Longest symlink target read (the format keeps one in a block, at most 64 KiB).
pub(crate) const MAX_LINK: u64 = 64 << 10;

/// Root directory inode (fixed by the format).
pub(crate) const ROOT_INODE: u64 = 2;

/// Refuses a file system larger than its volume (a truncated image or a partition
/// clipped at the disk end): ext4-view would only fail later, on the first read past
/// the end, after listing whatever happened to lie before it.
pub(crate) fn check_size(volume: &Volume) -> Result<()> {
    let mut sb = [0u8; 1024];
    volume.read_at(&mut sb, 1024)?;
    let log = crate::le32(&sb, 0x18);
    let incompat = crate::le32(&sb, 0x60);
    let mut blocks = u64::from(crate::le32(&sb, 0x04));
    // 64bit feature: the high half of the block count.
    if incompat & 0x80 != 0 {
        blocks |= u64::from(crate::le32(&sb, 0x150)) << 32;
    }
    let bytes = 1024u64
        .checked_shl(log)
        .filter(|_| log <= 6)
        .and_then(|bs| bs.checked_mul(blocks));
    match bytes {
        Some(b) if b <= volume.len() => Ok(()),
        Some(b) => Err(Error::corrupt(
            "ext superblock",
            1024,
            format!(
                "the file system is {b} bytes but its volume only {} (truncated image?)",
                volume.len()
            ),
        )),
        None => Err(Error::corrupt(
            "ext superblock",
            1024,
            format!("block size exponent {log} or block count {blocks} out of range"),
        )),
    }
}

/// An ext entry: `name` decoded lossily (U+FFFD for what is not UTF-8), the permission
/// bits of `mode`, the size only for files and links.
pub(crate) fn ext_entry(
    name: &[u8],
    kind: EntryKind,
    len: u64,
    secs: i64,
    nanos: u32,
    mode: u32,
    id: u64,
) -> Entry {
    Entry {
        name: String::from_utf8_lossy(name).into_owned(),
        kind,
        // The trait's size is content (files) or target length (links); a directory's
        // block count means nothing to a caller.
        size: match kind {
            EntryKind::File | EntryKind::Symlink => len,
            EntryKind::Dir | EntryKind::Other => 0,
        },
        mtime: Some(secs),
        mtime_nanos: nanos,
        mode: Some(mode & 0o7777),
        id,
    }
}
