//! VHDX on-disk layout (MS-VHDX 1.0): constants, GUIDs, CRC-32C and parsers of the
//! fixed structures. Shared by the reader, the checker, log replay and the writer.

use crate::backing::le;
use crate::{Error, Result};
use std::path::Path;

/// One MiB: the unit of region, log and block placement.
pub(crate) const MIB: u64 = 1 << 20;
/// File type identifier signature at offset 0.
pub(crate) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Offset and length of the UTF-16LE creator string in the file identifier.
pub(crate) const CREATOR_OFFSET: usize = 8;
pub(crate) const CREATOR_LEN: usize = 512;
/// Size of the file identifier (the first 64 KiB of the file).
pub(crate) const FILE_IDENTIFIER_SIZE: usize = 64 << 10;
/// Offsets of the two headers; each is 4 KiB (the rest of its 64 KiB is reserved).
pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
pub(crate) const HEADER_SIZE: usize = 4096;
/// Offsets of the two region tables, 64 KiB each.
pub(crate) const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
pub(crate) const REGION_TABLE_SIZE: usize = 64 << 10;
pub(crate) const MAX_REGION_ENTRIES: u32 = 2047;
/// The header section: everything before it belongs to headers and region tables.
pub(crate) const HEADER_SECTION: u64 = MIB;
/// Size of the metadata table at the start of the metadata region.
pub(crate) const METADATA_TABLE_SIZE: usize = 64 << 10;
pub(crate) const MAX_METADATA_ENTRIES: u16 = 2047;
/// Largest virtual disk the format allows.
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
pub(crate) const MIN_BLOCK_SIZE: u32 = 1 << 20;
pub(crate) const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Sectors covered by one sector-bitmap block (1 MiB of bits).
pub(crate) const SECTORS_PER_BITMAP: u64 = 1 << 23;
/// Size of a sector-bitmap block.
pub(crate) const BITMAP_BLOCK_SIZE: u64 = MIB;

/// BAT entry states (bits 0-2).
pub(crate) const PAYLOAD_NOT_PRESENT: u64 = 0;
pub(crate) const PAYLOAD_UNDEFINED: u64 = 1;
pub(crate) const PAYLOAD_ZERO: u64 = 2;
pub(crate) const PAYLOAD_UNMAPPED: u64 = 3;
/// UNMAPPED as numbered in the 0.95 draft, still found in old files.
pub(crate) const PAYLOAD_UNMAPPED_V095: u64 = 5;
pub(crate) const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub(crate) const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
pub(crate) const SB_NOT_PRESENT: u64 = 0;
pub(crate) const SB_PRESENT: u64 = 6;

/// File parameters flag: a fixed disk, every block allocated.
pub(crate) const FILE_FLAG_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters flag: a differencing disk, with a parent locator.
pub(crate) const FILE_FLAG_HAS_PARENT: u32 = 2;

/// State bits of a BAT entry.
pub(crate) fn bat_state(entry: u64) -> u64 {
    entry & 7
}

/// File offset (bytes) of a BAT entry: bits 20-63 count MiB.
pub(crate) fn bat_offset(entry: u64) -> u64 {
    entry & !(MIB - 1)
}

/// Reserved bits 3-19 of a BAT entry (must be zero).
pub(crate) fn bat_reserved(entry: u64) -> u64 {
    entry & (MIB - 1) & !7
}

/// Builds a BAT entry.
pub(crate) fn bat_entry(state: u64, file_offset: u64) -> u64 {
    (file_offset & !(MIB - 1)) | (state & 7)
}

/// A GUID in its on-disk byte order (the first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Guid(pub(crate) [u8; 16]);

impl Guid {
    /// Builds a GUID from its textual fields (`d1-d2-d3-d4`).
    pub(crate) const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// Reads a GUID at `at` in `b` (zero when out of range).
    pub(crate) fn read(b: &[u8], at: usize) -> Guid {
        let mut g = [0u8; 16];
        if let Some(s) = at.checked_add(16).and_then(|e| b.get(at..e)) {
            g.copy_from_slice(s);
        }
        Guid(g)
    }

    pub(crate) fn is_zero(&self) -> bool {
        self.0 == [0u8; 16]
    }

    /// Parses `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}` (braces optional, any case).
    pub(crate) fn parse(s: &str) -> Option<Guid> {
        let s = s.trim();
        let s = s
            .strip_prefix('{')
            .and_then(|x| x.strip_suffix('}'))
            .unwrap_or(s);
        let parts: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
            return None;
        }
        let hex = |p: &str| -> Option<Vec<u8>> {
            (0..p.len())
                .step_by(2)
                .map(|i| p.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect()
        };
        let d1 = u32::from_str_radix(parts.first()?, 16).ok()?;
        let d2 = u16::from_str_radix(parts.get(1)?, 16).ok()?;
        let d3 = u16::from_str_radix(parts.get(2)?, 16).ok()?;
        let mut d4 = hex(parts.get(3)?)?;
        d4.extend(hex(parts.get(4)?)?);
        let d4: [u8; 8] = d4.try_into().ok()?;
        Some(Guid::from_fields(d1, d2, d3, d4))
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{{{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}}}",
            le::u32(g, 0),
            le::u16(g, 4),
            le::u16(g, 6),
            g[8],
            g[9],
            g[10],
            g[11],
            g[12],
            g[13],
            g[14],
            g[15]
        )
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub(crate) const REGION_BAT: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub(crate) const REGION_METADATA: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
pub(crate) const META_FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub(crate) const META_VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub(crate) const META_PAGE83: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub(crate) const META_LOGICAL_SECTOR: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
pub(crate) const META_PHYSICAL_SECTOR: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
pub(crate) const META_PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// LocatorType of the VHDX parent locator.
pub(crate) const PARENT_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero.
pub(crate) fn crc32c_zeroed(buf: &[u8], at: usize) -> u32 {
    let head = buf.get(..at).unwrap_or(buf);
    let tail = at.checked_add(4).and_then(|e| buf.get(e..)).unwrap_or(&[]);
    let c = crc32c::crc32c(head);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, tail)
}

/// Stores the CRC-32C of `buf` (field at `at` zeroed first) into that field.
pub(crate) fn set_crc(buf: &mut [u8], at: usize) {
    let crc = crc32c_zeroed(buf, at);
    if let Some(s) = at.checked_add(4).and_then(|e| buf.get_mut(at..e)) {
        s.copy_from_slice(&crc.to_le_bytes());
    }
}

/// Writes `v` little-endian at `at` (ignored when out of range; callers size buffers).
pub(crate) fn put(buf: &mut [u8], at: usize, v: &[u8]) {
    if let Some(s) = at.checked_add(v.len()).and_then(|e| buf.get_mut(at..e)) {
        s.copy_from_slice(v);
    }
}

/// A VHDX header (one of the two copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) sequence: u64,
    pub(crate) file_write_guid: Guid,
    pub(crate) data_write_guid: Guid,
    pub(crate) log_guid: Guid,
    pub(crate) log_version: u16,
    pub(crate) version: u16,
    pub(crate) log_length: u32,
    pub(crate) log_offset: u64,
}

impl Header {
    /// Parses and validates a 4 KiB header read at `offset` of `path`.
    pub(crate) fn parse(b: &[u8], path: &Path, offset: u64) -> Result<Header> {
        let bad = |d: String| Error::corrupt(path, "VHDX header", offset, d);
        if b.get(..4) != Some(b"head".as_slice()) {
            return Err(bad("signature is not \"head\"".into()));
        }
        let stored = le::u32(b, 4);
        let crc = crc32c_zeroed(b.get(..HEADER_SIZE).unwrap_or(b), 4);
        if stored != crc {
            return Err(bad(format!(
                "CRC-32C mismatch: stored {stored:#010x}, computed {crc:#010x}"
            )));
        }
        let h = Header {
            sequence: le::u64(b, 8),
            file_write_guid: Guid::read(b, 16),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_version: le::u16(b, 64),
            version: le::u16(b, 66),
            log_length: le::u32(b, 68),
            log_offset: le::u64(b, 72),
        };
        if h.version != 1 {
            return Err(bad(format!("version {} (expected 1)", h.version)));
        }
        if h.log_version != 0 {
            return Err(bad(format!("log version {} (expected 0)", h.log_version)));
        }
        if u64::from(h.log_length) % MIB != 0 || !h.log_offset.is_multiple_of(MIB) {
            return Err(bad(format!(
                "log offset {:#x} / length {:#x} not multiples of 1 MiB",
                h.log_offset, h.log_length
            )));
        }
        if h.log_length > 0 && h.log_offset < HEADER_SECTION {
            return Err(bad(format!(
                "log offset {:#x} lies inside the header section",
                h.log_offset
            )));
        }
        Ok(h)
    }

    /// Encodes the header into a 4 KiB block with its CRC.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        put(&mut b, 0, b"head");
        put(&mut b, 8, &self.sequence.to_le_bytes());
        put(&mut b, 16, &self.file_write_guid.0);
        put(&mut b, 32, &self.data_write_guid.0);
        put(&mut b, 48, &self.log_guid.0);
        put(&mut b, 64, &self.log_version.to_le_bytes());
        put(&mut b, 66, &self.version.to_le_bytes());
        put(&mut b, 68, &self.log_length.to_le_bytes());
        put(&mut b, 72, &self.log_offset.to_le_bytes());
        set_crc(&mut b, 4);
        b
    }
}

/// One region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegionEntry {
    pub(crate) guid: Guid,
    pub(crate) file_offset: u64,
    pub(crate) length: u32,
    pub(crate) required: bool,
}

/// Parses and validates a 64 KiB region table read at `offset`.
pub(crate) fn parse_region_table(b: &[u8], path: &Path, offset: u64) -> Result<Vec<RegionEntry>> {
    let bad = |d: String| Error::corrupt(path, "VHDX region table", offset, d);
    if b.get(..4) != Some(b"regi".as_slice()) {
        return Err(bad("signature is not \"regi\"".into()));
    }
    let stored = le::u32(b, 4);
    let crc = crc32c_zeroed(b.get(..REGION_TABLE_SIZE).unwrap_or(b), 4);
    if stored != crc {
        return Err(bad(format!(
            "CRC-32C mismatch: stored {stored:#010x}, computed {crc:#010x}"
        )));
    }
    let count = le::u32(b, 8);
    if count > MAX_REGION_ENTRIES {
        return Err(bad(format!(
            "entry count {count} exceeds {MAX_REGION_ENTRIES}"
        )));
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = 16 + i * 32;
        let e = RegionEntry {
            guid: Guid::read(b, at),
            file_offset: le::u64(b, at + 16),
            length: le::u32(b, at + 24),
            required: le::u32(b, at + 28) & 1 != 0,
        };
        if !e.file_offset.is_multiple_of(MIB) || u64::from(e.length) % MIB != 0 {
            return Err(bad(format!(
                "region {} at {:#x} length {:#x}: not aligned to 1 MiB",
                e.guid, e.file_offset, e.length
            )));
        }
        if e.file_offset < HEADER_SECTION {
            return Err(bad(format!(
                "region {} at {:#x} overlaps the header section",
                e.guid, e.file_offset
            )));
        }
        if out.iter().any(|o: &RegionEntry| o.guid == e.guid) {
            return Err(bad(format!("region {} listed twice", e.guid)));
        }
        out.push(e);
    }
    Ok(out)
}

/// Encodes a region table (64 KiB with CRC).
pub(crate) fn encode_region_table(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    put(&mut b, 0, b"regi");
    put(&mut b, 8, &(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = 16 + i * 32;
        put(&mut b, at, &e.guid.0);
        put(&mut b, at + 16, &e.file_offset.to_le_bytes());
        put(&mut b, at + 24, &e.length.to_le_bytes());
        put(&mut b, at + 28, &u32::from(e.required).to_le_bytes());
    }
    set_crc(&mut b, 4);
    b
}

/// One metadata table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetadataEntry {
    pub(crate) item_id: Guid,
    /// Offset from the start of the metadata region.
    pub(crate) offset: u32,
    pub(crate) length: u32,
    pub(crate) is_user: bool,
    pub(crate) is_virtual_disk: bool,
    pub(crate) is_required: bool,
}

/// Metadata entry flag bits.
pub(crate) const META_FLAG_USER: u32 = 1;
pub(crate) const META_FLAG_VIRTUAL_DISK: u32 = 2;
pub(crate) const META_FLAG_REQUIRED: u32 = 4;

/// Parses the 64 KiB metadata table at the start of a metadata region of
/// `region_len` bytes at file offset `offset`.
pub(crate) fn parse_metadata_table(
    b: &[u8],
    path: &Path,
    offset: u64,
    region_len: u64,
) -> Result<Vec<MetadataEntry>> {
    let bad = |d: String| Error::corrupt(path, "VHDX metadata table", offset, d);
    if b.get(..8) != Some(b"metadata".as_slice()) {
        return Err(bad("signature is not \"metadata\"".into()));
    }
    let count = le::u16(b, 10);
    if count > MAX_METADATA_ENTRIES {
        return Err(bad(format!(
            "entry count {count} exceeds {MAX_METADATA_ENTRIES}"
        )));
    }
    let mut out: Vec<MetadataEntry> = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let at = 32 + i * 32;
        let flags = le::u32(b, at + 24);
        let e = MetadataEntry {
            item_id: Guid::read(b, at),
            offset: le::u32(b, at + 16),
            length: le::u32(b, at + 20),
            is_user: flags & META_FLAG_USER != 0,
            is_virtual_disk: flags & META_FLAG_VIRTUAL_DISK != 0,
            is_required: flags & META_FLAG_REQUIRED != 0,
        };
        let end = u64::from(e.offset) + u64::from(e.length);
        if e.length > 0 && (u64::from(e.offset) < METADATA_TABLE_SIZE as u64 || end > region_len) {
            return Err(bad(format!(
                "item {} at region offset {:#x} length {:#x} lies outside the metadata region (length {region_len:#x}) or inside its table",
                e.item_id, e.offset, e.length
            )));
        }
        if out
            .iter()
            .any(|o| o.item_id == e.item_id && o.is_user == e.is_user)
        {
            return Err(bad(format!("item {} listed twice", e.item_id)));
        }
        out.push(e);
    }
    Ok(out)
}

/// Reads and checks the file identifier; returns the creator string.
pub(crate) fn parse_file_identifier(b: &[u8], path: &Path) -> Result<String> {
    if b.get(..8) != Some(FILE_SIGNATURE.as_slice()) {
        return Err(Error::corrupt(
            path,
            "VHDX file identifier",
            0,
            "signature is not \"vhdxfile\"",
        ));
    }
    Ok(le::utf16(
        b.get(CREATOR_OFFSET..CREATOR_OFFSET + CREATOR_LEN)
            .unwrap_or(&[]),
    ))
}

/// Sizes derived from the virtual size, block size and sector size (MS-VHDX 2.5),
/// shared by the reader and the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Payload block size in bytes.
    pub(crate) block_size: u64,
    /// Logical sector size in bytes (512 or 4096).
    pub(crate) logical_sector: u64,
    /// Bytes of the virtual disk.
    pub(crate) virtual_size: u64,
    /// Payload blocks per sector bitmap block.
    pub(crate) chunk_ratio: u64,
    /// Payload blocks covering the virtual disk.
    pub(crate) payload_blocks: u64,
    /// BAT entries, payload and sector bitmap entries interleaved.
    pub(crate) bat_entries: u64,
}

impl Geometry {
    /// Computes the geometry from metadata values the reader has validated (zero
    /// sizes are taken as one, so nothing divides by zero).
    pub(crate) fn new(
        block_size: u32,
        logical_sector: u32,
        virtual_size: u64,
        has_parent: bool,
    ) -> Geometry {
        Geometry::compute(
            u64::from(block_size.max(1)),
            u64::from(logical_sector.max(1)),
            virtual_size,
            has_parent,
        )
    }

    /// Validates writer parameters (sector 512 or 4096, block size a power of two
    /// from 1 MiB to 256 MiB, size at most 64 TiB and a multiple of the sector) and
    /// computes the geometry.
    pub(crate) fn validated(
        virtual_size: u64,
        block_size: u64,
        logical_sector: u64,
        differencing: bool,
    ) -> Result<Geometry> {
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(Error::Invalid(format!(
                "vhdx: logical sector size {logical_sector} (expected 512 or 4096)"
            )));
        }
        if !block_size.is_power_of_two()
            || !(u64::from(MIN_BLOCK_SIZE)..=u64::from(MAX_BLOCK_SIZE)).contains(&block_size)
        {
            return Err(Error::Invalid(format!(
                "vhdx: block size {block_size} must be a power of two from 1 MiB to 256 MiB"
            )));
        }
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::Invalid(format!(
                "vhdx: virtual size {virtual_size} exceeds the 64 TiB maximum"
            )));
        }
        if !virtual_size.is_multiple_of(logical_sector) {
            return Err(Error::Invalid(format!(
                "vhdx: virtual size {virtual_size} is not a multiple of the {logical_sector}-byte logical sector"
            )));
        }
        Ok(Geometry::compute(
            block_size,
            logical_sector,
            virtual_size,
            differencing,
        ))
    }

    /// The formulas; `block_size` and `logical_sector` must be non-zero.
    fn compute(
        block_size: u64,
        logical_sector: u64,
        virtual_size: u64,
        has_parent: bool,
    ) -> Geometry {
        let chunk_ratio = (SECTORS_PER_BITMAP * logical_sector / block_size).max(1);
        let payload_blocks = virtual_size.div_ceil(block_size);
        let bat_entries = if has_parent {
            payload_blocks
                .div_ceil(chunk_ratio)
                .saturating_mul(chunk_ratio + 1)
        } else {
            payload_blocks + payload_blocks.saturating_sub(1) / chunk_ratio
        };
        Geometry {
            block_size,
            logical_sector,
            virtual_size,
            chunk_ratio,
            payload_blocks,
            bat_entries,
        }
    }

    /// BAT index of payload block `block`.
    pub(crate) fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector-bitmap entry of chunk `chunk`.
    pub(crate) fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Bytes of a BAT region holding every entry (a whole number of MiB, at least one).
    pub(crate) fn bat_region_len(&self) -> u64 {
        self.bat_entries
            .saturating_mul(8)
            .div_ceil(MIB)
            .saturating_mul(MIB)
            .max(MIB)
    }

    /// Bytes of the virtual disk inside block `block` (the last may be short).
    pub(crate) fn block_len(&self, block: u64) -> u64 {
        let start = block.saturating_mul(self.block_size);
        self.virtual_size.saturating_sub(start).min(self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_round_trip_and_ms_byte_order() {
        assert_eq!(
            REGION_BAT.0[..4],
            [0x66, 0x77, 0xC2, 0x2D],
            "first field is little-endian on disk"
        );
        let s = REGION_BAT.to_string();
        assert_eq!(s, "{2DC27766-F623-4200-9D64-115E9BFD4A08}");
        assert_eq!(Guid::parse(&s.to_lowercase()), Some(REGION_BAT));
        assert_eq!(
            Guid::parse("2DC27766-F623-4200-9D64-115E9BFD4A08"),
            Some(REGION_BAT)
        );
        assert_eq!(Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A0}"), None);
        assert_eq!(Guid::parse("{zzC27766-F623-4200-9D64-115E9BFD4A08}"), None);
    }

    #[test]
    fn header_round_trip_and_crc() {
        let h = Header {
            sequence: 7,
            file_write_guid: REGION_BAT,
            data_write_guid: REGION_METADATA,
            log_guid: Guid::default(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.encode();
        assert_eq!(Header::parse(&b, Path::new("x"), 0).unwrap(), h);
        b[100] ^= 1;
        let e = Header::parse(&b, Path::new("x"), 0x10000).unwrap_err();
        assert!(e.to_string().contains("CRC"), "{e}");
    }

    #[test]
    fn geometry_matches_the_spec() {
        let g = Geometry::new(32 << 20, 512, 100 << 30, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.payload_blocks, 3200);
        assert_eq!(g.bat_entries, 3200 + 3199 / 128);
        let d = Geometry::new(32 << 20, 512, 100 << 30, true);
        assert_eq!(d.bat_entries, 25 * 129);
        assert_eq!(Geometry::new(1 << 20, 512, 0, false).bat_entries, 0);
    }

    #[test]
    fn validated_geometry_matches_spec_formulas() {
        // (size, block, sector, differencing) -> (chunk ratio, payload blocks, entries)
        let cases = [
            // 512-byte sectors, 32 MiB blocks: chunk ratio 2^23*512/2^25 = 128.
            (
                10 * (1u64 << 30),
                32 * MIB,
                512,
                false,
                128,
                320,
                320 + 319 / 128,
            ),
            (10 * (1u64 << 30), 32 * MIB, 512, true, 128, 320, 3 * 129),
            // 4096-byte sectors, 1 MiB blocks: 2^23*4096/2^20 = 32768.
            (100 * MIB + 4096, MIB, 4096, false, 32768, 101, 101),
            (100 * MIB + 4096, MIB, 4096, true, 32768, 101, 32769),
            // 256 MiB blocks, 512 sectors: 16.
            (
                64 << 40,
                256 * MIB,
                512,
                false,
                16,
                262_144,
                262_144 + 262_143 / 16,
            ),
            // exactly one chunk: no interleaved bitmap entry needed.
            (128 * 32 * MIB, 32 * MIB, 512, false, 128, 128, 128),
            (128 * 32 * MIB + 512, 32 * MIB, 512, false, 128, 129, 130),
            (0, 32 * MIB, 512, false, 128, 0, 0),
        ];
        for (size, bs, ss, diff, cr, pb, entries) in cases {
            let g = Geometry::validated(size, bs, ss, diff).unwrap();
            assert_eq!(
                (g.chunk_ratio, g.payload_blocks, g.bat_entries),
                (cr, pb, entries),
                "{size} {bs} {ss} {diff}"
            );
        }
        let g = Geometry::validated(1 << 30, 32 * MIB, 512, true).unwrap();
        assert_eq!(g.payload_index(127), 127);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(0), 128);
        assert_eq!(g.bitmap_index(1), 257);
        assert!(Geometry::validated(1000, MIB, 512, false).is_err());
        assert!(Geometry::validated(4096, 3 * MIB, 512, false).is_err());
        assert!(Geometry::validated(4096, 512 * MIB, 512, false).is_err());
        assert!(Geometry::validated(4096, MIB, 1024, false).is_err());
        assert!(Geometry::validated((64 << 40) + 512, MIB, 512, false).is_err());
        assert!(Geometry::validated(512, MIB, 4096, false).is_err());
    }
}
