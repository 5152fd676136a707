//! MBR (with extended/logical partitions) and GPT partition tables.

use crate::probe::{FsKind, identify};
use crate::{Error, Result, le16, le32, le64, read_opt};
use std::collections::HashSet;

/// Largest GPT partition-entries array we read (entry count × entry size).
pub const MAX_GPT_ENTRIES_BYTES: u64 = 1 << 20;
/// Most logical partitions followed along an MBR extended-partition chain.
pub const MAX_LOGICALS: u32 = 128;

/// Which partitioning scheme the disk uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableKind {
    Mbr,
    Gpt,
    /// No partition table: a whole-disk file system, or nothing recognised.
    None,
}

/// What the partition table says a partition is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PartKind {
    /// MBR partition type byte (0x07 NTFS/exFAT, 0x83 Linux, 0x05/0x0f/0x85 extended...).
    Mbr(u8),
    Gpt {
        /// Canonical lower-case 8-4-4-4-12 form.
        type_guid: String,
        /// Human name of the type ("Microsoft basic data", "Linux filesystem"...) or
        /// "unknown".
        description: &'static str,
    },
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Partition {
    /// 1-based as in /dev/sda1: MBR primaries 1-4 by slot, logicals from 5 in chain
    /// order; GPT entry index + 1.
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes (clipped to the disk end, see [`PartitionTable::notes`]).
    pub length: u64,
    pub kind: PartKind,
    /// GPT partition name; `None` for MBR.
    pub name: Option<String>,
    /// MBR active flag; GPT legacy-BIOS-bootable attribute (bit 2).
    pub bootable: bool,
}

/// The partitions of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    pub kind: TableKind,
    /// GPT disk GUID (canonical lower-case form); `None` for MBR and no table.
    pub disk_guid: Option<String>,
    /// In table order: MBR primaries by slot then logicals; GPT by entry index.
    pub partitions: Vec<Partition>,
    /// Remarks: backup GPT header used, partitions clipped at the disk end...
    pub notes: Vec<String>,
}

/// Reads the partition table of `disk`: GPT (behind a protective MBR), MBR, or
/// [`TableKind::None`] with no partitions when sector 0 holds no table (no 0x55AA, a
/// whole-disk FAT/NTFS boot sector, or invalid MBR entries).
pub fn read_partitions(disk: &dyn vdisk::VirtualDisk) -> Result<PartitionTable> {
    let mut table = PartitionTable {
        kind: TableKind::None,
        disk_guid: None,
        partitions: Vec::new(),
        notes: Vec::new(),
    };
    let Some(mbr) = read_opt(disk, 0, 512)? else {
        table
            .notes
            .push("disk smaller than one sector: no partition table".into());
        return Ok(table);
    };
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(table);
    }
    let entries: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::parse(&mbr, i)).collect();
    if entries.iter().any(|e| e.ptype == 0xEE) {
        return read_gpt(disk, table);
    }
    // A boot sector with 0x55AA may be a whole-disk file system rather than an MBR.
    let fs = identify(&mbr);
    if matches!(
        fs,
        FsKind::Ntfs | FsKind::Fat { .. } | FsKind::ExFat | FsKind::Refs | FsKind::BitLocker
    ) {
        table.notes.push(format!(
            "sector 0 is a {} boot sector, not an MBR",
            fs.name()
        ));
        return Ok(table);
    }
    if entries.iter().any(|e| e.status & 0x7F != 0) {
        table
            .notes
            .push("sector 0 has 0x55AA but invalid MBR entries: treated as no table".into());
        return Ok(table);
    }
    table.kind = TableKind::Mbr;
    read_mbr(disk, &entries, &mut table)?;
    Ok(table)
}

#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    status: u8,
    ptype: u8,
    lba: u32,
    count: u32,
}

impl MbrEntry {
    fn parse(sector: &[u8], i: usize) -> Self {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry {
            status: e[0],
            ptype: e[4],
            lba: le32(e, 8),
            count: le32(e, 12),
        }
    }

    fn is_extended(&self) -> bool {
        matches!(self.ptype, 0x05 | 0x0F | 0x85)
    }
}

const MBR_SECTOR: u64 = 512;

/// Checks a partition against the disk size: clipped (with a note) when it runs past
/// the end, corrupt when it starts at or beyond it.
fn place(
    what: &str,
    entry_offset: u64,
    start: u64,
    length: u64,
    size: u64,
    notes: &mut Vec<String>,
) -> Result<u64> {
    if start >= size {
        return Err(Error::corrupt(
            what,
            entry_offset,
            format!("partition starts at byte {start:#x}, at or beyond the disk end ({size:#x})"),
        ));
    }
    match start.checked_add(length) {
        Some(end) if end <= size => Ok(length),
        _ => {
            notes.push(format!(
                "{what}: {length:#x} bytes from {start:#x} run past the disk end ({size:#x}); clipped"
            ));
            Ok(size - start)
        }
    }
}

fn read_mbr(
    disk: &dyn vdisk::VirtualDisk,
    entries: &[MbrEntry],
    table: &mut PartitionTable,
) -> Result<()> {
    let size = disk.virtual_size();
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        if e.ptype == 0 {
            continue;
        }
        let number = i as u32 + 1;
        let what = format!("MBR entry {number}");
        let start = u64::from(e.lba) * MBR_SECTOR;
        let length = u64::from(e.count) * MBR_SECTOR;
        if e.count == 0 {
            table.notes.push(format!(
                "{what}: type {:#04x} with zero length; ignored",
                e.ptype
            ));
            continue;
        }
        let length = place(
            &what,
            446 + 16 * i as u64,
            start,
            length,
            size,
            &mut table.notes,
        )?;
        if e.is_extended() {
            if extended.is_some() {
                table.notes.push(format!(
                    "{what}: second extended partition; its logical partitions are not followed"
                ));
            } else {
                extended = Some((e.lba, start, length));
            }
        }
        table.partitions.push(Partition {
            number,
            start,
            length,
            kind: PartKind::Mbr(e.ptype),
            name: None,
            bootable: e.status == 0x80,
        });
    }
    if let Some((ext_lba, ext_start, ext_len)) = extended {
        read_logicals(disk, ext_lba, ext_start, ext_len, table)?;
    }
    Ok(())
}

/// Follows the EBR chain of the extended partition at `ext_lba`.
fn read_logicals(
    disk: &dyn vdisk::VirtualDisk,
    ext_lba: u32,
    ext_start: u64,
    ext_len: u64,
    table: &mut PartitionTable,
) -> Result<()> {
    let size = disk.virtual_size();
    let ext_end = ext_start + ext_len;
    let mut seen = HashSet::new();
    let mut ebr_lba = u64::from(ext_lba);
    let mut number = 5u32;
    let mut hops = 0u32;
    loop {
        let offset = ebr_lba * MBR_SECTOR;
        if !seen.insert(ebr_lba) {
            return Err(Error::corrupt(
                "EBR chain",
                offset,
                "loop: the chain of extended boot records comes back to this EBR",
            ));
        }
        hops += 1;
        if hops > MAX_LOGICALS {
            return Err(Error::corrupt(
                "EBR chain",
                offset,
                format!("more than {MAX_LOGICALS} extended boot records"),
            ));
        }
        let Some(ebr) = read_opt(disk, offset, 512)? else {
            return Err(Error::corrupt(
                "EBR",
                offset,
                format!("beyond the disk end ({size:#x})"),
            ));
        };
        if ebr[510..512] != [0x55, 0xAA] {
            return Err(Error::corrupt("EBR", offset, "missing 0x55AA signature"));
        }
        let logical = MbrEntry::parse(&ebr, 0);
        let next = MbrEntry::parse(&ebr, 1);
        if logical.ptype != 0 && logical.count != 0 {
            let what = format!("logical partition {number} (EBR at {offset:#x})");
            let start = offset + u64::from(logical.lba) * MBR_SECTOR;
            let length = u64::from(logical.count) * MBR_SECTOR;
            if start < ext_start || start >= ext_end {
                return Err(Error::corrupt(
                    what,
                    offset + 446,
                    format!(
                        "starts at {start:#x}, outside the extended partition [{ext_start:#x}, {ext_end:#x})"
                    ),
                ));
            }
            let length = place(&what, offset + 446, start, length, size, &mut table.notes)?;
            table.partitions.push(Partition {
                number,
                start,
                length,
                kind: PartKind::Mbr(logical.ptype),
                name: None,
                bootable: logical.status == 0x80,
            });
            number += 1;
        }
        if next.ptype == 0 || next.count == 0 {
            return Ok(());
        }
        if !next.is_extended() {
            table.notes.push(format!(
                "EBR at {offset:#x}: link entry has type {:#04x}, not extended; chain ends here",
                next.ptype
            ));
            return Ok(());
        }
        ebr_lba = u64::from(ext_lba) + u64::from(next.lba);
        if ebr_lba * MBR_SECTOR >= ext_end {
            return Err(Error::corrupt(
                "EBR chain",
                offset + 462,
                format!(
                    "next EBR at sector {ebr_lba} is outside the extended partition [{ext_start:#x}, {ext_end:#x})"
                ),
            ));
        }
    }
}

/// A validated GPT header.
struct GptHeader {
    disk_guid: [u8; 16],
    entries_lba: u64,
    count: u32,
    entry_size: u32,
    entries_crc: u32,
    first_usable: u64,
    last_usable: u64,
}

/// Parses and checks the GPT header at `lba`.
fn gpt_header(
    disk: &dyn vdisk::VirtualDisk,
    lba: u64,
    ss: u64,
) -> std::result::Result<GptHeader, String> {
    let offset = lba.checked_mul(ss).ok_or("header LBA overflows")?;
    let h = match read_opt(disk, offset, ss as usize) {
        Ok(Some(h)) => h,
        Ok(None) => return Err(format!("header at {offset:#x} is beyond the disk end")),
        Err(e) => return Err(e.to_string()),
    };
    if &h[..8] != b"EFI PART" {
        return Err(format!("no \"EFI PART\" signature at {offset:#x}"));
    }
    let hsize = le32(&h, 12) as usize;
    if !(92..=h.len()).contains(&hsize) {
        return Err(format!("header size {hsize} out of range"));
    }
    let stored = le32(&h, 16);
    let mut copy = h[..hsize].to_vec();
    copy[16..20].fill(0);
    let computed = crc32fast::hash(&copy);
    if stored != computed {
        return Err(format!(
            "header CRC32 {stored:#010x} does not match the computed {computed:#010x}"
        ));
    }
    let my_lba = le64(&h, 24);
    if my_lba != lba {
        return Err(format!(
            "header says it is at LBA {my_lba}, found at LBA {lba}"
        ));
    }
    let count = le32(&h, 80);
    let entry_size = le32(&h, 84);
    if entry_size < 128 || !entry_size.is_multiple_of(8) {
        return Err(format!("entry size {entry_size} invalid"));
    }
    let total = u64::from(count) * u64::from(entry_size);
    if total > MAX_GPT_ENTRIES_BYTES {
        return Err(format!(
            "entries array of {count} × {entry_size} bytes exceeds the {MAX_GPT_ENTRIES_BYTES}-byte limit"
        ));
    }
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&h[56..72]);
    Ok(GptHeader {
        disk_guid,
        entries_lba: le64(&h, 72),
        count,
        entry_size,
        entries_crc: le32(&h, 88),
        first_usable: le64(&h, 40),
        last_usable: le64(&h, 48),
    })
}

/// Reads and checks the entries array of `h`.
fn gpt_entries(
    disk: &dyn vdisk::VirtualDisk,
    h: &GptHeader,
    ss: u64,
) -> std::result::Result<Vec<u8>, String> {
    let offset = h
        .entries_lba
        .checked_mul(ss)
        .ok_or("entries LBA overflows")?;
    let len = h.count as usize * h.entry_size as usize; // bounded by MAX_GPT_ENTRIES_BYTES
    let buf = match read_opt(disk, offset, len) {
        Ok(Some(b)) => b,
        Ok(None) => {
            return Err(format!(
                "entries array at {offset:#x} runs past the disk end"
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    let computed = crc32fast::hash(&buf);
    if computed != h.entries_crc {
        return Err(format!(
            "entries-array CRC32 {:#010x} does not match the computed {computed:#010x}",
            h.entries_crc
        ));
    }
    Ok(buf)
}

/// Primary then backup GPT, with the sector size reported by the disk first and the
/// other common one (512/4096) second.
fn read_gpt(disk: &dyn vdisk::VirtualDisk, mut table: PartitionTable) -> Result<PartitionTable> {
    let size = disk.virtual_size();
    let reported = u64::from(disk.info().logical_sector_size);
    let mut sizes = vec![if reported == 4096 { 4096 } else { 512 }];
    sizes.push(if sizes[0] == 4096 { 512 } else { 4096 });
    let mut problems = Vec::new();
    for &ss in &sizes {
        // Primary.
        let primary = gpt_header(disk, 1, ss).and_then(|h| {
            let e = gpt_entries(disk, &h, ss)?;
            Ok((h, e))
        });
        let (h, entries) = match primary {
            Ok(ok) => ok,
            Err(p) => {
                let last = (size / ss).checked_sub(1);
                let backup = match last {
                    Some(last) if last > 1 => gpt_header(disk, last, ss).and_then(|h| {
                        let e = gpt_entries(disk, &h, ss)?;
                        Ok((h, e, last))
                    }),
                    _ => Err("disk too small for a backup header".to_string()),
                };
                match backup {
                    Ok((h, e, last)) => {
                        // A missing primary at a sector size other than the reported one
                        // is just a wrong guess, not worth a remark.
                        table.notes.push(format!(
                            "primary GPT header is unusable ({p}); using the backup header at LBA {last} ({ss}-byte sectors)"
                        ));
                        (h, e)
                    }
                    Err(b) => {
                        problems.push(format!("{ss}-byte sectors: primary: {p}; backup: {b}"));
                        continue;
                    }
                }
            }
        };
        if ss != 512 {
            table.notes.push(format!("GPT uses {ss}-byte sectors"));
        }
        table.kind = TableKind::Gpt;
        table.disk_guid = Some(guid(&h.disk_guid));
        gpt_partitions(&h, &entries, ss, size, &mut table)?;
        return Ok(table);
    }
    Err(Error::corrupt(
        "GPT",
        sizes[0],
        format!(
            "protective MBR but no valid GPT header: {}",
            problems.join("; ")
        ),
    ))
}

fn gpt_partitions(
    h: &GptHeader,
    entries: &[u8],
    ss: u64,
    size: u64,
    table: &mut PartitionTable,
) -> Result<()> {
    let esize = h.entry_size as usize;
    let array_offset = h.entries_lba.saturating_mul(ss);
    for (i, e) in entries.chunks_exact(esize).enumerate() {
        let tguid: [u8; 16] = e[..16].try_into().expect("16 bytes");
        if tguid == [0; 16] {
            continue;
        }
        let number = i as u32 + 1;
        let what = format!("GPT entry {number}");
        let entry_offset = array_offset.saturating_add((i * esize) as u64);
        let first = le64(e, 32);
        let last = le64(e, 40);
        if last < first {
            return Err(Error::corrupt(
                what,
                entry_offset,
                format!("last LBA {last} is before first LBA {first}"),
            ));
        }
        if first < h.first_usable || last > h.last_usable {
            table.notes.push(format!(
                "{what}: LBAs {first}-{last} outside the usable range {}-{}",
                h.first_usable, h.last_usable
            ));
        }
        let (Some(start), Some(length)) = (
            first.checked_mul(ss),
            (last - first)
                .checked_add(1)
                .and_then(|n| n.checked_mul(ss)),
        ) else {
            return Err(Error::corrupt(
                what,
                entry_offset,
                format!("LBAs {first}-{last} overflow a byte offset"),
            ));
        };
        let length = place(&what, entry_offset, start, length, size, &mut table.notes)?;
        let attrs = le64(e, 48);
        let name_units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let type_guid = guid(&tguid);
        let description = gpt_type_description(&type_guid);
        table.partitions.push(Partition {
            number,
            start,
            length,
            kind: PartKind::Gpt {
                type_guid,
                description,
            },
            name: Some(String::from_utf16_lossy(&name_units)),
            bootable: attrs & 0x4 != 0,
        });
    }
    Ok(())
}

/// Canonical lower-case text of an on-disk (mixed-endian) GUID.
fn guid(b: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Human name of a GPT partition type GUID (canonical lower-case form), or "unknown".
pub fn gpt_type_description(type_guid: &str) -> &'static str {
    match type_guid {
        "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7" => "Microsoft basic data",
        "e3c9e316-0b5c-4db8-817d-f92df00215ae" => "Microsoft reserved",
        "de94bba4-06d1-4d40-a16a-bfd50179d6ac" => "Windows recovery",
        "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3" => "LDM metadata (dynamic disk)",
        "af9b60a0-1431-4f62-bc68-3311714a69ad" => "LDM data (dynamic disk)",
        "e75caf8f-f680-4cee-afa3-b001e56efc2d" => "Storage Spaces",
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => "EFI system",
        "024dee41-33e7-11d3-9d69-0008c781f39f" => "MBR partition scheme",
        "21686148-6449-6e6f-744e-656564454649" => "BIOS boot",
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => "Linux filesystem",
        "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => "Linux swap",
        "e6d6d379-f507-44c2-a23c-238f2a3df928" => "Linux LVM",
        "a19d880f-05fc-4d3b-a006-743f0f84911e" => "Linux RAID",
        "933ac7e1-2eb4-4f13-b844-0e14e2aef915" => "Linux home",
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => "Linux root (x86-64)",
        "44479540-f297-41b2-9af7-d131d5f0458a" => "Linux root (x86)",
        "b921b045-1df0-41c3-af44-4c6f280d3fae" => "Linux root (ARM64)",
        "bc13c2ff-59e6-4262-a352-b275fd6f7172" => "Linux extended boot",
        "ca7d7ccb-63ed-4c53-861c-1742536059cc" => "Linux LUKS",
        "48465300-0000-11aa-aa11-00306543ecac" => "Apple HFS+",
        "516e7cb4-6ecf-11d6-8ff8-00022d09712b" => "FreeBSD data",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_is_mixed_endian() {
        // Microsoft basic data as stored on disk.
        let b = [
            0xa2, 0xa0, 0xd0, 0xeb, 0xe5, 0xb9, 0x33, 0x44, 0x87, 0xc0, 0x68, 0xb6, 0xb7, 0x26,
            0x99, 0xc7,
        ];
        let g = guid(&b);
        assert_eq!(g, "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7");
        assert_eq!(gpt_type_description(&g), "Microsoft basic data");
    }
}
