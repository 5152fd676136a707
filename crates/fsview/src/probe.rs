//! File-system identification by on-disk signature.

use crate::{Error, Result, le16, le32, read_opt};

/// What a byte range holds, by its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsKind {
    Ntfs,
    /// ext2, ext3 (has a journal) or ext4 (extents, 64bit or flex_bg).
    Ext {
        version: u8,
    },
    /// FAT12/16/32, by cluster count (the Microsoft rule).
    Fat {
        bits: u8,
    },
    ExFat,
    Xfs,
    Btrfs,
    Refs,
    BitLocker,
    LinuxSwap,
    Lvm2,
    Luks,
    Unknown,
}

impl FsKind {
    /// Short lower-case name ("ntfs", "ext4", "fat32", "swap"...).
    pub fn name(&self) -> &'static str {
        match self {
            FsKind::Ntfs => "ntfs",
            FsKind::Ext { version: 2 } => "ext2",
            FsKind::Ext { version: 3 } => "ext3",
            FsKind::Ext { .. } => "ext4",
            FsKind::Fat { bits: 12 } => "fat12",
            FsKind::Fat { bits: 16 } => "fat16",
            FsKind::Fat { .. } => "fat32",
            FsKind::ExFat => "exfat",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Refs => "refs",
            FsKind::BitLocker => "bitlocker",
            FsKind::LinuxSwap => "swap",
            FsKind::Lvm2 => "lvm2",
            FsKind::Luks => "luks",
            FsKind::Unknown => "unknown",
        }
    }

    /// Whether names are looked up without case ([`crate::find_name`]): NTFS, FAT and
    /// exFAT; ext2/3/4 (and the rest) match exactly.
    pub fn ignores_case(&self) -> bool {
        matches!(self, FsKind::Ntfs | FsKind::Fat { .. } | FsKind::ExFat)
    }

    /// [`FsKind::ignores_case`] of the file system [`FsKind::name`] calls `name`: for a
    /// listing received from the server, which names its file system.
    pub fn name_ignores_case(name: &str) -> bool {
        matches!(name, "ntfs" | "fat12" | "fat16" | "fat32" | "exfat")
    }

    /// Whether item-level recovery can (or will) browse it: NTFS, ext2/3/4, FAT and
    /// exFAT.
    pub fn supported(&self) -> bool {
        matches!(
            self,
            FsKind::Ntfs | FsKind::Ext { .. } | FsKind::Fat { .. } | FsKind::ExFat
        )
    }
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes probed: enough for the Btrfs superblock at 64 KiB.
const PROBE_LEN: u64 = 0x10000 + 0x1000;

/// Looks at the first bytes of `[offset, offset + length)` of `disk` and names the file
/// system by its signature. A range extending past the disk end is probed up to the
/// end; a range starting past it is [`Error::Corrupt`].
pub fn probe(disk: &dyn vdisk::VirtualDisk, offset: u64, length: u64) -> Result<FsKind> {
    let size = disk.virtual_size();
    if offset > size {
        return Err(Error::corrupt(
            "probed range",
            offset,
            format!("starts beyond the end of the disk ({size:#x} bytes)"),
        ));
    }
    let n = length.min(size - offset).min(PROBE_LEN) as usize;
    let buf = read_opt(disk, offset, n)?.unwrap_or_default();
    Ok(identify(&buf))
}

/// Names the file system whose first bytes are `b` (any length; short buffers simply
/// match fewer signatures).
pub fn identify(b: &[u8]) -> FsKind {
    let at = |off: usize, sig: &[u8]| b.get(off..off + sig.len()) == Some(sig);
    if at(0, b"LUKS\xba\xbe") {
        return FsKind::Luks;
    }
    if at(0, b"XFSB") {
        return FsKind::Xfs;
    }
    if at(3, b"-FVE-FS-") {
        return FsKind::BitLocker;
    }
    if at(3, b"NTFS    ") {
        return FsKind::Ntfs;
    }
    if at(3, b"EXFAT   ") {
        return FsKind::ExFat;
    }
    if at(3, b"ReFS\0\0\0\0") {
        return FsKind::Refs;
    }
    if at(4096 - 10, b"SWAPSPACE2") || at(4096 - 10, b"SWAP-SPACE") {
        return FsKind::LinuxSwap;
    }
    for s in 0..4 {
        if at(s * 512, b"LABELONE") && at(s * 512 + 24, b"LVM2 001") {
            return FsKind::Lvm2;
        }
    }
    if let Some(bits) = fat_bits(b) {
        return FsKind::Fat { bits };
    }
    if let Some(version) = ext_version(b) {
        return FsKind::Ext { version };
    }
    if at(0x10000 + 64, b"_BHRfS_M") {
        return FsKind::Btrfs;
    }
    FsKind::Unknown
}

/// ext2/3/4 from the superblock at 1024: magic 0xEF53 at +56, a sane block size, then
/// the version from the feature flags.
fn ext_version(b: &[u8]) -> Option<u8> {
    let sb = b.get(1024..1024 + 1024)?;
    if le16(sb, 56) != 0xEF53 || le32(sb, 24) > 6 {
        return None;
    }
    let compat = le32(sb, 0x5C);
    let incompat = le32(sb, 0x60);
    const HAS_JOURNAL: u32 = 0x4;
    // extents, 64bit, flex_bg, large_dir, inline_data: features ext3 lacks.
    const EXT4_INCOMPAT: u32 = 0x40 | 0x80 | 0x200 | 0x4000 | 0x8000;
    Some(if incompat & EXT4_INCOMPAT != 0 {
        4
    } else if compat & HAS_JOURNAL != 0 {
        3
    } else {
        2
    })
}

/// FAT12/16/32 from a sane BIOS parameter block, by cluster count.
fn fat_bits(b: &[u8]) -> Option<u8> {
    let bs = b.get(..512)?;
    if bs[510..512] != [0x55, 0xAA] || !matches!(bs[0], 0xEB | 0xE9) {
        return None;
    }
    let bps = u64::from(le16(bs, 11));
    let spc = u64::from(bs[13]);
    let reserved = u64::from(le16(bs, 14));
    let fats = u64::from(bs[16]);
    let root_entries = u64::from(le16(bs, 17));
    let total16 = u64::from(le16(bs, 19));
    let media = bs[21];
    let fat16 = u64::from(le16(bs, 22));
    let total32 = u64::from(le32(bs, 32));
    let fat32 = u64::from(le32(bs, 36));
    if !matches!(bps, 512 | 1024 | 2048 | 4096)
        || spc == 0
        || !spc.is_power_of_two()
        || reserved == 0
        || !(1..=4).contains(&fats)
        || !(media == 0xF0 || media >= 0xF8)
    {
        return None;
    }
    let fat_size = if fat16 != 0 { fat16 } else { fat32 };
    let total = if total16 != 0 { total16 } else { total32 };
    if fat_size == 0 || total == 0 {
        return None;
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let meta = reserved + fats * fat_size + root_sectors;
    let clusters = total.checked_sub(meta)? / spc;
    if clusters == 0 {
        return None;
    }
    Some(if clusters < 4085 {
        12
    } else if clusters < 65525 {
        16
    } else {
        32
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_empty_buffers_are_unknown() {
        assert_eq!(identify(&[]), FsKind::Unknown);
        assert_eq!(identify(&[0; 700]), FsKind::Unknown);
    }

    #[test]
    fn signatures() {
        let mut b = vec![0u8; 0x11000];
        b[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        assert_eq!(identify(&b), FsKind::Btrfs);
        b[512..520].copy_from_slice(b"LABELONE");
        b[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(identify(&b), FsKind::Lvm2);
        b[3..11].copy_from_slice(b"ReFS\0\0\0\0");
        assert_eq!(identify(&b), FsKind::Refs);
        b[3..11].copy_from_slice(b"-FVE-FS-");
        assert_eq!(identify(&b), FsKind::BitLocker);
        b[3..11].copy_from_slice(b"EXFAT   ");
        assert_eq!(identify(&b), FsKind::ExFat);
        b[0..4].copy_from_slice(b"XFSB");
        assert_eq!(identify(&b), FsKind::Xfs);
        b[0..6].copy_from_slice(b"LUKS\xba\xbe");
        assert_eq!(identify(&b), FsKind::Luks);
        assert!(FsKind::ExFat.supported());
        assert!(!FsKind::Xfs.supported());
        assert!(FsKind::Fat { bits: 12 }.supported());
        assert_eq!(FsKind::Ext { version: 3 }.name(), "ext3");
    }
}
