//! ext2/3/4, read-only, by our own code: the file systems `ext4-view` 1.0 refuses for an
//! incompatible feature it does not know (`inline_data` above all; also `large_dir`,
//! `meta_bg`, `ea_inode`, `dirdata`, `mmp`, or no `filetype`). [`crate::ext::open`]
//! sends those here and everything else to ext4-view.
//!
//! What it reads: the superblock (block size, inode size, 32- or 64-byte group
//! descriptors, `meta_bg` descriptor placement), inodes, extent trees (any depth up to
//! 5) and classic block maps (direct, indirect, double, triple) for file data and
//! directory blocks, holes and uninitialized extents as zeros, directories linearly
//! (htree index blocks look like empty entries, so a linear read sees every name),
//! inline data (`EXT4_INLINE_DATA_FL`: the first 60 bytes in `i_block`, the rest in the
//! `system.data` extended attribute in the inode's in-inode attribute area; an inline
//! directory is the parent's inode number then entries, continued in the attribute),
//! fast symlinks (target in `i_block`), slow ones (target in a block) and inline ones.
//!
//! The journal is not replayed. A file system whose `needs_recovery` flag is set is
//! read only if its journal is empty (`s_start == 0` in the journal superblock, as after
//! a freeze or a clean unmount); otherwise it is [`Error::Unsupported`], because the
//! on-disk state could lack changes the journal holds (a crash-consistent image of a
//! running guest that was not frozen). ext4-view, used for every other ext volume,
//! replays the journal in memory.
//!
//! Not supported (named as such): encrypted files and folders, compression, files
//! whose inline data lives in an `ea_inode`. Path components are not followed through
//! symbolic links (a link in the middle of a path is not a directory here). Checksums
//! are not verified; every number read from the disk is checked before use instead:
//! block and inode numbers against the volume, extent depth at most 5, entry counts
//! against node sizes, extents in increasing order, and the blocks one file maps at most
//! the volume's block count (so a loop in the metadata ends as [`Error::Corrupt`]).

use crate::ext_common::{MAX_LINK, ROOT_INODE, ext_entry};
use crate::fs::{Entry, EntryKind, FileSystem, READ_CHUNK};
use crate::probe::FsKind;
use crate::volume::Volume;
use crate::{Error, Result, le16, le32};
use std::io::Write;
use std::sync::{Arc, Mutex};

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;

/// Incompatible features this reader understands (compression and a journal device
/// are not among them).
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

/// The features ext4-view 1.0 refuses (or, for `filetype`, requires) that this reader
/// handles: a file system with any of them is read here.
const INCOMPAT_OWN: u32 = INCOMPAT_INLINE_DATA
    | INCOMPAT_LARGEDIR
    | INCOMPAT_META_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_MMP;

const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;

const FL_ENCRYPT: u32 = 0x800;
const FL_HUGE_FILE: u32 = 0x40000;
const FL_EXTENTS: u32 = 0x80000;
const FL_INLINE_DATA: u32 = 0x1000_0000;

const S_IFMT: u16 = 0xF000;
const S_IFREG: u16 = 0x8000;
const S_IFDIR: u16 = 0x4000;
const S_IFLNK: u16 = 0xA000;

/// Bytes of `i_block` (inline data's first part, a fast symlink's target).
const I_BLOCK_LEN: usize = 60;
const EXTENT_MAGIC: u16 = 0xF30A;
const MAX_EXTENT_DEPTH: u16 = 5;
const XATTR_MAGIC: u32 = 0xEA02_0000;
/// `system.` attributes, where `system.data` holds inline data's continuation.
const XATTR_INDEX_SYSTEM: u8 = 7;
const JOURNAL_MAGIC: u32 = 0xC03B_3998;
/// Directories larger than this are refused (a list is held in memory).
const MAX_DIR_BYTES: u64 = 256 << 20;

/// Whether `ext::open` should use this reader for a file system with these
/// incompatible features.
pub(crate) fn wants(incompat: u32) -> bool {
    incompat & INCOMPAT_OWN != 0 || incompat & INCOMPAT_FILETYPE == 0
}

/// The superblock fields the reader uses, checked.
#[derive(Debug, Clone)]
struct Sb {
    bs: u64,
    blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    inodes_per_group: u64,
    inodes: u64,
    inode_size: u64,
    desc_size: u64,
    groups: u64,
    incompat: u32,
    ro_compat: u32,
    compat: u32,
    first_meta_bg: u64,
    journal_inum: u32,
}

const SB_AT: u64 = 1024;

fn bad_sb(detail: impl Into<String>) -> Error {
    Error::corrupt("ext superblock", SB_AT, detail)
}

impl Sb {
    fn parse(b: &[u8], volume_len: u64) -> Result<Sb> {
        if le16(b, 0x38) != 0xEF53 {
            return Err(bad_sb("no ext magic"));
        }
        let log = le32(b, 0x18);
        if log > 6 {
            return Err(bad_sb(format!("block size exponent {log} out of range")));
        }
        let bs = 1024u64 << log;
        let incompat = le32(b, 0x60);
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let mut what = Vec::new();
            if unknown & INCOMPAT_COMPRESSION != 0 {
                what.push("compression".to_string());
            }
            if unknown & INCOMPAT_JOURNAL_DEV != 0 {
                what.push("external journal device".to_string());
            }
            let rest = unknown & !(INCOMPAT_COMPRESSION | INCOMPAT_JOURNAL_DEV);
            if rest != 0 {
                what.push(format!("incompatible features {rest:#x}"));
            }
            return Err(Error::Unsupported(format!("ext: {}", what.join(", "))));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut blocks = u64::from(le32(b, 0x04));
        if is64 {
            blocks |= u64::from(le32(b, 0x150)) << 32;
        }
        let first_data_block = u64::from(le32(b, 0x14));
        let blocks_per_group = u64::from(le32(b, 0x20));
        let inodes_per_group = u64::from(le32(b, 0x28));
        let inodes = u64::from(le32(b, 0x00));
        if blocks_per_group == 0 || blocks_per_group > 8 * bs {
            return Err(bad_sb(format!("{blocks_per_group} blocks per group")));
        }
        if inodes_per_group == 0 || inodes_per_group > 8 * bs {
            return Err(bad_sb(format!("{inodes_per_group} inodes per group")));
        }
        if blocks
            .checked_mul(bs)
            .is_none_or(|bytes| bytes > volume_len)
        {
            return Err(bad_sb(format!(
                "{blocks} blocks of {bs} bytes do not fit the volume ({volume_len} bytes)"
            )));
        }
        if first_data_block >= blocks {
            return Err(bad_sb(format!("first data block {first_data_block}")));
        }
        let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
        if groups
            .checked_mul(inodes_per_group)
            .is_none_or(|n| n < inodes)
        {
            return Err(bad_sb(format!(
                "{inodes} inodes do not fit {groups} groups of {inodes_per_group}"
            )));
        }
        let inode_size = if le32(b, 0x4C) == 0 {
            128
        } else {
            u64::from(le16(b, 0x58))
        };
        if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > bs {
            return Err(bad_sb(format!("inode size {inode_size}")));
        }
        let desc_size = if is64 { u64::from(le16(b, 0xFE)) } else { 32 };
        if desc_size < 32 || !desc_size.is_power_of_two() || desc_size > bs {
            return Err(bad_sb(format!("group descriptor size {desc_size}")));
        }
        Ok(Sb {
            bs,
            blocks,
            first_data_block,
            blocks_per_group,
            inodes_per_group,
            inodes,
            inode_size,
            desc_size,
            groups,
            incompat,
            ro_compat: le32(b, 0x64),
            compat: le32(b, 0x5C),
            first_meta_bg: u64::from(le32(b, 0x104)),
            journal_inum: le32(b, 0xE0),
        })
    }

    /// Whether group `g` starts with a superblock backup (sparse_super: 0, 1 and powers
    /// of 3, 5 and 7).
    fn has_super(&self, g: u64) -> bool {
        if g <= 1 || self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&base| {
            let mut p = base;
            while p < g {
                match p.checked_mul(base) {
                    Some(n) => p = n,
                    None => return false,
                }
            }
            p == g
        })
    }

    /// Volume offset of group `g`'s descriptor.
    fn desc_offset(&self, g: u64) -> Result<u64> {
        let per_block = self.bs / self.desc_size;
        let meta = g / per_block;
        let block = if self.incompat & INCOMPAT_META_BG != 0 && meta >= self.first_meta_bg {
            if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
                return Err(Error::Unsupported(
                    "ext: meta_bg together with sparse_super2".into(),
                ));
            }
            // The descriptors of a meta group lie in its first group, after the
            // superblock backup if that group has one.
            let first = meta * per_block;
            let start = first
                .checked_mul(self.blocks_per_group)
                .and_then(|b| b.checked_add(self.first_data_block));
            start.and_then(|s| s.checked_add(u64::from(self.has_super(first))))
        } else {
            (self.first_data_block + 1).checked_add(meta)
        };
        block
            .filter(|b| *b < self.blocks)
            .map(|b| b * self.bs + (g % per_block) * self.desc_size)
            .ok_or_else(|| {
                Error::corrupt(
                    "ext group descriptors",
                    SB_AT,
                    format!("group {g}'s descriptor lies past the volume"),
                )
            })
    }
}

/// An inode, read and partly decoded.
struct Inode {
    ino: u32,
    /// Volume offset (for messages).
    at: u64,
    raw: Vec<u8>,
    mode: u16,
    size: u64,
    flags: u32,
}

impl Inode {
    fn kind(&self) -> EntryKind {
        match self.mode & S_IFMT {
            S_IFREG => EntryKind::File,
            S_IFDIR => EntryKind::Dir,
            S_IFLNK => EntryKind::Symlink,
            _ => EntryKind::Other,
        }
    }

    fn i_block(&self) -> &[u8] {
        &self.raw[0x28..0x28 + I_BLOCK_LEN]
    }

    fn inline(&self) -> bool {
        self.flags & FL_INLINE_DATA != 0
    }

    /// Bytes after the 128-byte base inode that are in use (`i_extra_isize`), checked.
    fn extra_end(&self) -> Result<usize> {
        if self.raw.len() <= 128 {
            return Ok(128);
        }
        let extra = usize::from(le16(&self.raw, 0x80));
        let end = 128 + extra;
        if end > self.raw.len() || extra % 4 != 0 {
            return Err(Error::corrupt(
                "ext inode",
                self.at,
                format!("inode {}: i_extra_isize {extra}", self.ino),
            ));
        }
        Ok(end)
    }

    /// Modification time (seconds, nanoseconds), with the extra field when present.
    fn mtime(&self) -> Result<(i64, u32)> {
        let mut secs = i64::from(i32::from_le_bytes([
            self.raw[0x10],
            self.raw[0x11],
            self.raw[0x12],
            self.raw[0x13],
        ]));
        let mut nanos = 0;
        if self.extra_end()? >= 0x88 + 4 {
            let extra = le32(&self.raw, 0x88);
            secs += i64::from(extra & 3) << 32;
            nanos = (extra >> 2).min(999_999_999);
        }
        Ok((secs, nanos))
    }

    /// The value of the in-inode `system.data` attribute (inline data past 60 bytes), as
    /// a range of `raw`; `None` when the inode has no such attribute.
    fn system_data(&self) -> Result<Option<std::ops::Range<usize>>> {
        let end = self.raw.len();
        let start = self.extra_end()?;
        if start + 4 > end || le32(&self.raw, start) != XATTR_MAGIC {
            return Ok(None);
        }
        let bad = |detail: String| {
            Error::corrupt(
                "ext in-inode extended attributes",
                self.at + start as u64,
                format!("inode {}: {detail}", self.ino),
            )
        };
        let first = start + 4;
        let mut off = first;
        // Each entry is at least 16 bytes: the loop ends within the inode.
        loop {
            if off + 4 > end {
                return Err(bad("no end marker".into()));
            }
            if le32(&self.raw, off) == 0 {
                return Ok(None);
            }
            if off + 16 > end {
                return Err(bad(format!("entry at {off} passes the inode end")));
            }
            let name_len = usize::from(self.raw[off]);
            let index = self.raw[off + 1];
            let value_offs = usize::from(le16(&self.raw, off + 2));
            let value_inum = le32(&self.raw, off + 4);
            let value_size = le32(&self.raw, off + 8) as usize;
            let entry_len = (16 + name_len + 3) & !3;
            if off + 16 + name_len > end {
                return Err(bad(format!("entry name at {off} passes the inode end")));
            }
            if index == XATTR_INDEX_SYSTEM && &self.raw[off + 16..off + 16 + name_len] == b"data" {
                if value_inum != 0 {
                    return Err(Error::Unsupported(format!(
                        "ext inode {}: inline data in an extended-attribute inode",
                        self.ino
                    )));
                }
                let v = first + value_offs;
                return match v.checked_add(value_size) {
                    Some(ve) if ve <= end => Ok(Some(v..ve)),
                    _ => Err(bad(format!(
                        "system.data value ({value_size} bytes at {value_offs}) passes the inode end"
                    ))),
                };
            }
            off += entry_len;
        }
    }

    /// An inline file's (or link's) content: `i_block`, then the `system.data` value.
    fn inline_data(&self) -> Result<Vec<u8>> {
        let size = self.size;
        let head = self.i_block();
        if size <= I_BLOCK_LEN as u64 {
            return Ok(head[..size as usize].to_vec());
        }
        let rest = self.system_data()?.unwrap_or(0..0);
        let want = size - I_BLOCK_LEN as u64;
        if want > rest.len() as u64 {
            return Err(Error::corrupt(
                "ext inline data",
                self.at,
                format!(
                    "inode {}: {size} bytes, but only {} inline",
                    self.ino,
                    I_BLOCK_LEN + rest.len()
                ),
            ));
        }
        let mut out = head.to_vec();
        out.extend_from_slice(&self.raw[rest.start..rest.start + want as usize]);
        Ok(out)
    }
}

/// A run of a file's blocks: `count` logical blocks from `logical`, stored from volume
/// block `physical`; `uninit` (unwritten extent) reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    logical: u64,
    physical: u64,
    count: u64,
    uninit: bool,
}

/// Bounds one walk over a file's block mapping.
struct Walk<'a> {
    /// Logical blocks that matter (the file size in blocks).
    limit: u64,
    /// Next logical block an extent may start at (extents are sorted).
    next: u64,
    /// Blocks mapped and mapping blocks read so far: at most the volume's blocks.
    seen: u64,
    pending: Option<Run>,
    f: &'a mut dyn FnMut(Run) -> Result<()>,
}

/// Directories listed lately, kept: extracting a folder looks up each of its files,
/// which would otherwise parse the folder once per file.
const DIR_CACHE: usize = 8;

/// A directory's entries: raw name and inode number, in on-disk order.
type DirEntries = Arc<Vec<(Vec<u8>, u32)>>;

struct OwnExt {
    vol: Volume,
    sb: Sb,
    kind: FsKind,
    label: Option<String>,
    /// (directory inode, entries), most recently used last.
    dirs: Mutex<Vec<(u32, DirEntries)>>,
}

pub(crate) fn open(volume: Volume, kind: FsKind) -> Result<Box<dyn FileSystem>> {
    let mut b = vec![0u8; 1024];
    volume.read_at(&mut b, SB_AT)?;
    let sb = Sb::parse(&b, volume.len())?;
    let name = &b[0x78..0x88];
    let name = &name[..name.iter().position(|c| *c == 0).unwrap_or(name.len())];
    let label = String::from_utf8_lossy(name).trim().to_string();
    let fs = OwnExt {
        vol: volume,
        sb,
        kind,
        label: (!label.is_empty()).then_some(label),
        dirs: Mutex::default(),
    };
    fs.check_journal()?;
    let root = fs.inode(ROOT_INODE as u32)?;
    if root.kind() != EntryKind::Dir {
        return Err(Error::corrupt("ext root inode", root.at, "not a directory"));
    }
    Ok(Box::new(fs))
}

impl OwnExt {
    fn read(&self, buf: &mut [u8], at: u64) -> Result<()> {
        Ok(self.vol.read_at(buf, at)?)
    }

    /// Refuses a journal holding transactions (this reader does not replay it).
    fn check_journal(&self) -> Result<()> {
        if self.sb.incompat & INCOMPAT_RECOVER == 0 {
            return Ok(());
        }
        let refuse = |why: &str| {
            Error::Unsupported(format!(
                "ext: the journal needs recovery ({why}) and this reader (used for \
                 inline_data and other features ext4-view lacks) does not replay it; \
                 back up with the guest frozen, or run e2fsck on a restored copy"
            ))
        };
        if self.sb.journal_inum == 0 {
            return Err(refuse("external journal"));
        }
        let j = self.inode(self.sb.journal_inum)?;
        let mut first = None;
        self.walk(&j, &mut |r| {
            if r.logical == 0 && first.is_none() && !r.uninit {
                first = Some(r.physical);
            }
            Ok(())
        })?;
        let Some(p) = first else {
            return Err(Error::corrupt(
                "ext journal",
                j.at,
                "the journal inode maps no first block",
            ));
        };
        let mut jsb = [0u8; 32];
        self.read(&mut jsb, p * self.sb.bs)?;
        let be = |o: usize| u32::from_be_bytes([jsb[o], jsb[o + 1], jsb[o + 2], jsb[o + 3]]);
        if be(0) != JOURNAL_MAGIC {
            return Err(Error::corrupt(
                "ext journal superblock",
                p * self.sb.bs,
                "bad magic",
            ));
        }
        if be(0x1C) != 0 {
            return Err(refuse("it holds transactions"));
        }
        Ok(())
    }

    fn inode(&self, ino: u32) -> Result<Inode> {
        let sb = &self.sb;
        let n = u64::from(ino);
        if n == 0 || n > sb.inodes {
            return Err(Error::corrupt(
                "ext directory entry",
                0,
                format!("inode number {ino} out of range (1..={})", sb.inodes),
            ));
        }
        let group = (n - 1) / sb.inodes_per_group;
        let index = (n - 1) % sb.inodes_per_group;
        if group >= sb.groups {
            return Err(bad_sb(format!(
                "inode {ino} lies in group {group} of {}",
                sb.groups
            )));
        }
        let d_at = sb.desc_offset(group)?;
        let mut d = vec![0u8; sb.desc_size as usize];
        self.read(&mut d, d_at)?;
        let mut table = u64::from(le32(&d, 0x08));
        if sb.desc_size >= 64 {
            table |= u64::from(le32(&d, 0x28)) << 32;
        }
        let table_blocks = (sb.inodes_per_group * sb.inode_size).div_ceil(sb.bs);
        if table == 0
            || table
                .checked_add(table_blocks)
                .is_none_or(|e| e > sb.blocks)
        {
            return Err(Error::corrupt(
                "ext group descriptor",
                d_at,
                format!("group {group}: inode table at block {table} outside the volume"),
            ));
        }
        let at = table * sb.bs + index * sb.inode_size;
        let mut raw = vec![0u8; sb.inode_size as usize];
        self.read(&mut raw, at)?;
        let mode = le16(&raw, 0x00);
        let size = u64::from(le32(&raw, 0x04)) | u64::from(le32(&raw, 0x6C)) << 32;
        let flags = le32(&raw, 0x20);
        if mode == 0 {
            return Err(Error::corrupt(
                "ext inode",
                at,
                format!("inode {ino} is in use but has no mode (a free inode?)"),
            ));
        }
        Ok(Inode {
            ino,
            at,
            raw,
            mode,
            size,
            flags,
        })
    }

    /// Calls `f` with the runs of `inode`'s blocks in logical order (coalesced; holes are
    /// the gaps), up to its size. Extent trees and block maps; not for inline inodes.
    fn walk(&self, inode: &Inode, f: &mut dyn FnMut(Run) -> Result<()>) -> Result<()> {
        let mut w = Walk {
            limit: inode.size.div_ceil(self.sb.bs),
            next: 0,
            seen: 0,
            pending: None,
            f,
        };
        if inode.flags & FL_EXTENTS != 0 {
            self.extent_node(inode, inode.i_block(), inode.at + 0x28, None, &mut w)?;
        } else {
            self.block_map(inode, &mut w)?;
        }
        if let Some(r) = w.pending.take() {
            (w.f)(r)?;
        }
        Ok(())
    }

    /// Counts `n` more blocks against the walk's budget (the volume's block count).
    fn spend(&self, w: &mut Walk, n: u64, inode: &Inode) -> Result<()> {
        w.seen = w.seen.saturating_add(n);
        if w.seen > self.sb.blocks {
            return Err(Error::corrupt(
                "ext block mapping",
                inode.at,
                format!(
                    "inode {}: maps more blocks than the volume has (a loop?)",
                    inode.ino
                ),
            ));
        }
        Ok(())
    }

    fn extent_node(
        &self,
        inode: &Inode,
        node: &[u8],
        at: u64,
        depth_wanted: Option<u16>,
        w: &mut Walk,
    ) -> Result<()> {
        let bad = |detail: String| {
            Error::corrupt(
                "ext extent tree",
                at,
                format!("inode {}: {detail}", inode.ino),
            )
        };
        if le16(node, 0) != EXTENT_MAGIC {
            return Err(bad("bad extent header magic".into()));
        }
        let entries = usize::from(le16(node, 2));
        let max = usize::from(le16(node, 4));
        let depth = le16(node, 6);
        if entries > max || max > (node.len() - 12) / 12 {
            return Err(bad(format!(
                "{entries} entries of at most {max} in {} bytes",
                node.len()
            )));
        }
        if depth > MAX_EXTENT_DEPTH || depth_wanted.is_some_and(|d| d != depth) {
            return Err(bad(format!("depth {depth} (expected {depth_wanted:?})")));
        }
        for i in 0..entries {
            let e = &node[12 + 12 * i..24 + 12 * i];
            let logical = u64::from(le32(e, 0));
            if depth == 0 {
                let raw_len = le16(e, 4);
                let (uninit, count) = if raw_len > 32768 {
                    (true, u64::from(raw_len - 32768))
                } else {
                    (false, u64::from(raw_len))
                };
                let physical = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
                if count == 0 || logical < w.next {
                    return Err(bad(format!(
                        "extent at logical block {logical} ({count} blocks) out of order"
                    )));
                }
                if physical
                    .checked_add(count)
                    .is_none_or(|end| end > self.sb.blocks)
                {
                    return Err(bad(format!(
                        "extent of {count} blocks at block {physical} passes the volume end"
                    )));
                }
                w.next = logical + count;
                if logical >= w.limit {
                    continue;
                }
                self.spend(w, count, inode)?;
                let count = count.min(w.limit - logical);
                push(
                    w,
                    Run {
                        logical,
                        physical,
                        count,
                        uninit,
                    },
                )?;
            } else {
                let child = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
                if logical >= w.limit && i > 0 {
                    continue;
                }
                if child == 0 || child >= self.sb.blocks {
                    return Err(bad(format!("index to block {child} outside the volume")));
                }
                self.spend(w, 1, inode)?;
                let mut buf = vec![0u8; self.sb.bs as usize];
                self.read(&mut buf, child * self.sb.bs)?;
                self.extent_node(inode, &buf, child * self.sb.bs, Some(depth - 1), w)?;
            }
        }
        Ok(())
    }

    fn block_map(&self, inode: &Inode, w: &mut Walk) -> Result<()> {
        let ib = inode.i_block();
        let per = self.sb.bs / 4;
        for i in 0..12u64 {
            if i >= w.limit {
                return Ok(());
            }
            let p = u64::from(le32(ib, i as usize * 4));
            self.map_block(inode, w, i, p)?;
        }
        let mut base = 12u64;
        let mut span = per;
        for level in 1..=3u32 {
            if base >= w.limit {
                return Ok(());
            }
            let p = u64::from(le32(ib, (11 + level as usize) * 4));
            if p != 0 {
                self.indirect(inode, w, p, level, base)?;
            }
            base = base.saturating_add(span);
            span = span.saturating_mul(per);
        }
        Ok(())
    }

    /// One block of a block map: logical `l` at volume block `p` (0: a hole).
    fn map_block(&self, inode: &Inode, w: &mut Walk, l: u64, p: u64) -> Result<()> {
        if p == 0 {
            return Ok(());
        }
        if p >= self.sb.blocks {
            return Err(Error::corrupt(
                "ext block map",
                inode.at,
                format!("inode {}: block {l} at {p}, outside the volume", inode.ino),
            ));
        }
        self.spend(w, 1, inode)?;
        push(
            w,
            Run {
                logical: l,
                physical: p,
                count: 1,
                uninit: false,
            },
        )
    }

    /// An indirect block at `p` of `level` (1: pointers to data), mapping from `base`.
    fn indirect(&self, inode: &Inode, w: &mut Walk, p: u64, level: u32, base: u64) -> Result<()> {
        if p >= self.sb.blocks {
            return Err(Error::corrupt(
                "ext block map",
                inode.at,
                format!("inode {}: indirect block {p} outside the volume", inode.ino),
            ));
        }
        self.spend(w, 1, inode)?;
        let per = self.sb.bs / 4;
        let span = per.saturating_pow(level - 1);
        let mut buf = vec![0u8; self.sb.bs as usize];
        self.read(&mut buf, p * self.sb.bs)?;
        for i in 0..per {
            let l = base.saturating_add(i.saturating_mul(span));
            if l >= w.limit {
                break;
            }
            let q = u64::from(le32(&buf, i as usize * 4));
            if level == 1 {
                self.map_block(inode, w, l, q)?;
            } else if q != 0 {
                self.indirect(inode, w, q, level - 1, l)?;
            }
        }
        Ok(())
    }

    /// Writes `inode`'s content (a regular file's, or a slow link's) to `out`, in
    /// bounded chunks; holes and unwritten extents as zeros.
    fn stream(&self, inode: &Inode, out: &mut dyn Write) -> Result<u64> {
        if inode.inline() {
            let data = inode.inline_data()?;
            out.write_all(&data)?;
            return Ok(data.len() as u64);
        }
        let size = inode.size;
        let bs = self.sb.bs;
        let mut pos = 0u64;
        let mut buf = Vec::new();
        self.walk(inode, &mut |r| {
            // Runs come in order within the size (walk checked and clipped them).
            let start = r.logical * bs;
            let len = (r.count * bs).min(size - start);
            let gap = start.checked_sub(pos).ok_or_else(|| {
                Error::corrupt(
                    "ext block mapping",
                    inode.at,
                    format!("inode {}: runs overlap at block {}", inode.ino, r.logical),
                )
            })?;
            zeros(out, gap)?;
            if r.uninit {
                zeros(out, len)?;
            } else {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(READ_CHUNK as u64) as usize;
                    buf.resize(n, 0);
                    self.read(&mut buf, r.physical * bs + done)?;
                    out.write_all(&buf)?;
                    done += n as u64;
                }
            }
            pos = start + len;
            Ok(())
        })?;
        zeros(out, size - pos)?;
        Ok(size)
    }

    /// The entries (raw name, inode number) of directory `dir`, in on-disk order,
    /// without `.` and `..` (from the cache when listed lately).
    fn dir_entries(&self, dir: &Inode, path: &str) -> Result<DirEntries> {
        if dir.kind() != EntryKind::Dir {
            return Err(Error::WrongKind(format!("{path}: not a directory")));
        }
        if dir.flags & FL_ENCRYPT != 0 {
            return Err(Error::Unsupported(format!("{path}: ext4 encrypted folder")));
        }
        let mut cache = locks::lock(&self.dirs);
        if let Some(i) = cache.iter().position(|(ino, _)| *ino == dir.ino) {
            let hit = cache.remove(i);
            let entries = hit.1.clone();
            cache.push(hit);
            return Ok(entries);
        }
        drop(cache);
        let entries = Arc::new(self.read_dir(dir, path)?);
        let mut cache = locks::lock(&self.dirs);
        if cache.len() >= DIR_CACHE {
            cache.remove(0);
        }
        cache.push((dir.ino, entries.clone()));
        Ok(entries)
    }

    /// [`Self::dir_entries`], read from the disk.
    fn read_dir(&self, dir: &Inode, path: &str) -> Result<Vec<(Vec<u8>, u32)>> {
        let mut out = Vec::new();
        if dir.inline() {
            // The parent's inode number, then entries; continued in system.data.
            let ib = dir.i_block();
            parse_dirents(&ib[4..], dir.at + 0x2C, &mut out)?;
            if let Some(r) = dir.system_data()? {
                parse_dirents(&dir.raw[r.clone()], dir.at + r.start as u64, &mut out)?;
            }
            return Ok(out);
        }
        if dir.size > MAX_DIR_BYTES {
            return Err(Error::Unsupported(format!(
                "{path}: a directory of {} bytes (at most {MAX_DIR_BYTES})",
                dir.size
            )));
        }
        let bs = self.sb.bs;
        let mut buf = vec![0u8; bs as usize];
        self.walk(dir, &mut |r| {
            if r.uninit {
                return Ok(());
            }
            for b in r.physical..r.physical + r.count {
                self.read(&mut buf, b * bs)?;
                parse_dirents(&buf, b * bs, &mut out)?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The inode `path` names, and its raw name ("" for the root).
    fn lookup(&self, path: &str) -> Result<(Inode, Vec<u8>)> {
        let mut cur = self.inode(ROOT_INODE as u32)?;
        let mut name = Vec::new();
        for c in crate::components(path)? {
            let entries = self.dir_entries(&cur, path)?;
            // ext matches names exactly (the common rule without case folding).
            let found =
                crate::find_name(&entries, c, false, |(raw, _)| String::from_utf8_lossy(raw));
            let Some((raw, ino)) = found else {
                return Err(Error::NotFound(path.to_string()));
            };
            cur = self.inode(*ino)?;
            name = raw.clone();
        }
        Ok((cur, name))
    }

    fn entry(&self, name: &[u8], inode: &Inode) -> Result<Entry> {
        let (secs, nanos) = inode.mtime()?;
        Ok(ext_entry(
            name,
            inode.kind(),
            inode.size,
            secs,
            nanos,
            u32::from(inode.mode),
            u64::from(inode.ino),
        ))
    }

    fn is_fast_symlink(&self, inode: &Inode) -> bool {
        // As the kernel decides: no blocks besides an extended-attribute block.
        let blocks = u64::from(le32(&inode.raw, 0x1C)) | u64::from(le16(&inode.raw, 0x74)) << 32;
        let acl = u64::from(le32(&inode.raw, 0x68)) | u64::from(le16(&inode.raw, 0x76)) << 32;
        let ea_blocks = match (acl, inode.flags & FL_HUGE_FILE != 0) {
            (0, _) => 0,
            (_, true) => 1,
            (_, false) => self.sb.bs / 512,
        };
        blocks == ea_blocks
    }
}

/// Adds one run to the walk, merging it into the pending one when contiguous.
fn push(w: &mut Walk, r: Run) -> Result<()> {
    if let Some(p) = &mut w.pending
        && p.uninit == r.uninit
        && p.logical + p.count == r.logical
        && p.physical + p.count == r.physical
    {
        p.count += r.count;
        return Ok(());
    }
    if let Some(p) = w.pending.replace(r) {
        (w.f)(p)?;
    }
    Ok(())
}

fn zeros(out: &mut dyn Write, mut n: u64) -> Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Linear directory entries of one block (or inline area) at volume offset `at`.
/// htree index blocks hold a single empty entry spanning the block, and the checksum
/// tail is an empty entry too: both are skipped as entries with inode 0.
fn parse_dirents(b: &[u8], at: u64, out: &mut Vec<(Vec<u8>, u32)>) -> Result<()> {
    let mut off = 0usize;
    while off < b.len() {
        let bad = |detail: String| Error::corrupt("ext directory entry", at + off as u64, detail);
        if off + 8 > b.len() {
            return Err(bad(format!("{} stray bytes at the end", b.len() - off)));
        }
        let ino = le32(b, off);
        let raw = usize::from(le16(b, off + 4));
        let rec = if raw == 0 || raw == 65535 {
            // 64 KiB blocks: the whole block.
            if b.len() >= 65536 { b.len() - off } else { 0 }
        } else {
            (raw & 65532) | ((raw & 3) << 16)
        };
        let name_len = usize::from(b[off + 6]);
        if rec < 8 || rec % 4 != 0 || off + rec > b.len() || 8 + name_len > rec {
            return Err(bad(format!(
                "record length {raw} (name {name_len} bytes) in {} bytes",
                b.len() - off
            )));
        }
        let name = &b[off + 8..off + 8 + name_len];
        if ino != 0 && !name.is_empty() && name != b"." && name != b".." {
            out.push((name.to_vec(), ino));
        }
        off += rec;
    }
    Ok(())
}

impl FileSystem for OwnExt {
    fn kind(&self) -> FsKind {
        self.kind
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        let (dir, _) = self.lookup(path)?;
        let mut out = Vec::new();
        for (name, ino) in self.dir_entries(&dir, path)?.iter() {
            let inode = self.inode(*ino)?;
            out.push(self.entry(name, &inode)?);
        }
        Ok(out)
    }

    fn stat(&mut self, path: &str) -> Result<Entry> {
        let (inode, name) = self.lookup(path)?;
        self.entry(&name, &inode)
    }

    fn read_link(&mut self, path: &str) -> Result<String> {
        let (inode, _) = self.lookup(path)?;
        if inode.kind() != EntryKind::Symlink {
            return Err(Error::WrongKind(format!("{path}: not a symbolic link")));
        }
        if inode.flags & FL_ENCRYPT != 0 {
            return Err(Error::Unsupported(format!("{path}: ext4 encrypted link")));
        }
        let target = if inode.inline() {
            inode.inline_data()?
        } else if self.is_fast_symlink(&inode) {
            if inode.size > I_BLOCK_LEN as u64 {
                return Err(Error::corrupt(
                    "ext inode",
                    inode.at,
                    format!("fast symlink of {} bytes", inode.size),
                ));
            }
            inode.i_block()[..inode.size as usize].to_vec()
        } else {
            if inode.size > self.sb.bs.min(MAX_LINK) {
                return Err(Error::corrupt(
                    "ext inode",
                    inode.at,
                    format!("symlink target of {} bytes", inode.size),
                ));
            }
            let mut v = Vec::new();
            self.stream(&inode, &mut v)?;
            v
        };
        Ok(String::from_utf8_lossy(&target).into_owned())
    }

    fn read_file(&mut self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let (inode, _) = self.lookup(path)?;
        match inode.kind() {
            EntryKind::File => {}
            EntryKind::Dir => return Err(Error::WrongKind(format!("{path}: is a directory"))),
            EntryKind::Symlink => {
                return Err(Error::WrongKind(format!("{path}: is a symbolic link")));
            }
            EntryKind::Other => {
                return Err(Error::WrongKind(format!("{path}: not a regular file")));
            }
        }
        if inode.flags & FL_ENCRYPT != 0 {
            return Err(Error::Unsupported(format!("{path}: ext4 encrypted file")));
        }
        self.stream(&inode, out)
    }

    /// The volume ranges of a regular file's written blocks (holes and unwritten
    /// extents left out); `None` for inline files, whose data is inside the inode.
    fn data_ranges(&mut self, path: &str) -> Result<Option<Vec<(u64, u64)>>> {
        let (inode, _) = self.lookup(path)?;
        if inode.kind() != EntryKind::File {
            return Err(Error::WrongKind(format!("{path}: not a regular file")));
        }
        if inode.inline() {
            return Ok(None);
        }
        let bs = self.sb.bs;
        let size = inode.size;
        let mut ranges = Vec::new();
        self.walk(&inode, &mut |r| {
            if !r.uninit {
                let start = r.logical * bs;
                ranges.push((r.physical * bs, (r.count * bs).min(size - start)));
            }
            Ok(())
        })?;
        Ok(Some(ranges))
    }
}

/// Opens any ext volume with this reader (tests compare it with ext4-view).
#[doc(hidden)]
pub fn open_own(volume: Volume) -> Result<Box<dyn FileSystem>> {
    let kind = crate::probe::probe(volume.disk().as_ref(), volume.start(), volume.len())?;
    match kind {
        FsKind::Ext { .. } => {
            crate::ext_common::check_size(&volume)?;
            open(volume, kind)
        }
        _ => Err(Error::Unsupported("not an ext file system".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirent(ino: u32, rec: u16, name: &[u8]) -> Vec<u8> {
        let mut v = ino.to_le_bytes().to_vec();
        v.extend_from_slice(&rec.to_le_bytes());
        v.push(name.len() as u8);
        v.push(1);
        v.extend_from_slice(name);
        v.resize(usize::from(rec), 0);
        v
    }

    #[test]
    fn dirents_parse_and_skip_empty_ones() {
        let mut b = dirent(2, 12, b".");
        b.extend(dirent(0, 12, b""));
        b.extend(dirent(12, 16, b"abcdefg"));
        b.extend(dirent(13, 24, b"x"));
        let mut out = Vec::new();
        parse_dirents(&b, 0, &mut out).unwrap();
        assert_eq!(out, vec![(b"abcdefg".to_vec(), 12), (b"x".to_vec(), 13)]);
    }

    #[test]
    fn damaged_dirents_are_corrupt() {
        for b in [
            dirent(12, 4, b""),
            dirent(12, 12, b"toolongname"),
            {
                let mut b = dirent(12, 12, b"a");
                b.truncate(10);
                b
            },
            {
                let mut b = dirent(12, 12, b"a");
                b[4] = 14; // not a multiple of 4 and past the end
                b
            },
        ] {
            let mut out = Vec::new();
            assert!(
                matches!(parse_dirents(&b, 0, &mut out), Err(Error::Corrupt { .. })),
                "{b:?}"
            );
        }
    }

    #[test]
    fn sparse_super_groups() {
        let mut b = vec![0u8; 1024];
        b[0x38..0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&8192u32.to_le_bytes());
        b[0x20..0x24].copy_from_slice(&8192u32.to_le_bytes());
        b[0x28..0x2C].copy_from_slice(&16u32.to_le_bytes());
        b[0x00..0x04].copy_from_slice(&16u32.to_le_bytes());
        b[0x18] = 2;
        b[0x64] = 1;
        let sb = Sb::parse(&b, 32 << 20).unwrap();
        let with: Vec<u64> = (0..50).filter(|g| sb.has_super(*g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49]);
        // Too big for the volume, and a bad inode size.
        assert!(Sb::parse(&b, 1 << 20).is_err());
        b[0x4C] = 1;
        b[0x58] = 100;
        assert!(matches!(
            Sb::parse(&b, 32 << 20),
            Err(Error::Corrupt { .. })
        ));
        b[0x58] = 0;
        b[0x59] = 1;
        b[0x60] = 1; // compression
        assert!(matches!(
            Sb::parse(&b, 32 << 20),
            Err(Error::Unsupported(_))
        ));
    }
}
