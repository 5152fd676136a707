//! VHD (Virtual PC / Hyper-V legacy format): fixed, dynamic and differencing images.
//!
//! Layout (all integers big-endian):
//! - fixed: the disk's bytes, then a 512-byte footer;
//! - dynamic / differencing: a copy of the footer at 0, a 1024-byte dynamic header
//!   (`cxsparse`), the block allocation table (u32 sector numbers), blocks (a sector
//!   bitmap then the data) and the footer at the end.
//!
//! The virtual size follows qemu's vpc driver (see [`size_rule`]) so that both read the
//! same number of bytes from the same file.

mod check;
mod writer;

pub(crate) use check::check;
pub(crate) use writer::create;

use crate::backing::{Backing, FileBacking, be, le};
use crate::extent::{ExtentState, data_region_extents, map_range_end, push_extent};
use crate::{
    DiskInfo, Error, Extent, Format, OpenCtx, Result, Subformat, VirtualDisk, check_range,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Size of the footer (and of its copy at offset 0).
pub const FOOTER_SIZE: u64 = 512;
/// Size of the dynamic header.
pub const DYN_HEADER_SIZE: u64 = 1024;
/// BAT value of a block that is not allocated.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Largest virtual size (2040 GiB), as in the specification and qemu.
pub const MAX_SIZE: u64 = 0xFF00_0000 * 512;
/// The largest CHS geometry (65535/16/255) in sectors: readers take CurrentSize then.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Smallest and largest block sizes accepted.
pub const MIN_BLOCK: u64 = 4096;
/// See [`MIN_BLOCK`].
pub const MAX_BLOCK: u64 = 256 << 20;
/// Disk types.
pub const TYPE_FIXED: u32 = 2;
/// See [`TYPE_FIXED`].
pub const TYPE_DYNAMIC: u32 = 3;
/// See [`TYPE_FIXED`].
pub const TYPE_DIFFERENCING: u32 = 4;
/// Longest parent locator we read (a path of 32 Ki UTF-16 units).
const MAX_LOCATOR: u32 = 64 * 1024;
/// Bitmaps kept per differencing image (each at most 64 KiB).
const BITMAP_CACHE: usize = 16;

/// The 512-byte footer, decoded.
#[derive(Debug, Clone)]
pub(crate) struct Footer {
    pub raw: [u8; 512],
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub disk_type: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at.saturating_add(N)) {
        out.copy_from_slice(s);
    }
    out
}

/// One's complement of the byte sum of `b`, with the 4 bytes at `skip` taken as zero.
pub(crate) fn checksum(b: &[u8], skip: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
    !sum
}

impl Footer {
    /// Decodes a footer, or says why it is not a valid one (cookie, checksum).
    pub fn parse(raw: [u8; 512]) -> std::result::Result<Footer, String> {
        if raw.get(..8) != Some(b"conectix".as_slice()) {
            return Err("no `conectix` cookie".into());
        }
        let stored = be::u32(&raw, 64);
        let computed = checksum(&raw, 64);
        if stored != computed {
            return Err(format!(
                "checksum {stored:#010x} does not match the computed {computed:#010x}"
            ));
        }
        Ok(Footer {
            features: be::u32(&raw, 8),
            version: be::u32(&raw, 12),
            data_offset: be::u64(&raw, 16),
            timestamp: be::u32(&raw, 24),
            creator_app: arr(&raw, 28),
            creator_version: be::u32(&raw, 32),
            creator_os: arr(&raw, 36),
            original_size: be::u64(&raw, 40),
            current_size: be::u64(&raw, 48),
            cylinders: be::u16(&raw, 56),
            heads: raw.get(58).copied().unwrap_or(0),
            sectors: raw.get(59).copied().unwrap_or(0),
            disk_type: be::u32(&raw, 60),
            unique_id: arr(&raw, 68),
            saved_state: raw.get(84).copied().unwrap_or(0),
            raw,
        })
    }

    /// Sectors described by the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }
}

/// The virtual size and the rule used, as qemu's vpc driver computes it: CurrentSize
/// for creators known to use it (Hyper-V `win `, qemu `qem2`, Disk2vhd `d2v `, XenServer
/// `tap\0`, XenConverter `CTXS`) and for the maximum CHS geometry, else the CHS size.
pub(crate) fn size_rule(f: &Footer) -> (u64, &'static str) {
    let by_current = matches!(
        &f.creator_app,
        b"win " | b"qem2" | b"d2v " | b"tap\0" | b"CTXS"
    ) || f.chs_sectors() == MAX_CHS_SECTORS;
    if by_current {
        (f.current_size / 512 * 512, "current size")
    } else {
        (f.chs_sectors() * 512, "CHS geometry")
    }
}

/// Printable form of a 4-byte tag (creator app/OS, locator code).
pub(crate) fn tag(t: &[u8; 4]) -> String {
    t.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                char::from(c).to_string()
            } else {
                format!("\\x{c:02x}")
            }
        })
        .collect()
}

/// A UUID in its usual text form.
pub(crate) fn uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h.get(0..8).unwrap_or(""),
        h.get(8..12).unwrap_or(""),
        h.get(12..16).unwrap_or(""),
        h.get(16..20).unwrap_or(""),
        h.get(20..32).unwrap_or("")
    )
}

/// Reads the 512 bytes at `offset` and validates them as a footer. The outer error is
/// an I/O failure; the inner one says why the bytes are not a footer.
pub(crate) fn read_footer(
    file: &dyn Backing,
    offset: u64,
) -> Result<std::result::Result<Footer, String>> {
    let mut raw = [0u8; 512];
    file.read_exact_at(&mut raw, offset, "VHD footer")?;
    Ok(Footer::parse(raw))
}

/// Chooses the footer to trust: the one at the end, else (dynamic and differencing
/// images) the copy at offset 0.
pub(crate) fn choose_footer(file: &dyn Backing) -> Result<Footer> {
    let len = file.len();
    if len < FOOTER_SIZE {
        return Err(Error::corrupt(
            file.path(),
            "VHD footer",
            0,
            format!("file of {len} bytes is shorter than a VHD footer"),
        ));
    }
    let end_off = len - FOOTER_SIZE;
    let e = match read_footer(file, end_off)? {
        Ok(f) => return Ok(f),
        Err(e) => e,
    };
    match read_footer(file, 0)? {
        Ok(h) if h.disk_type != TYPE_FIXED => Ok(h),
        Ok(_) => Err(Error::corrupt(
            file.path(),
            "VHD footer",
            end_off,
            format!("{e}; the copy at offset 0 says fixed, which has no copy"),
        )),
        Err(h) => Err(Error::corrupt(
            file.path(),
            "VHD footer",
            end_off,
            format!("{e}; the copy at offset 0 is damaged too: {h}"),
        )),
    }
}

/// True when `file` is a VHD without the footer copy at offset 0: the last 512 bytes are
/// a valid footer of a fixed disk, or of a dynamic/differencing disk whose dynamic
/// header is found where the footer says (its copy at offset 0 being damaged).
pub(crate) fn has_fixed_footer(file: &dyn Backing) -> Result<bool> {
    let len = file.len();
    if len < FOOTER_SIZE {
        return Ok(false);
    }
    let Ok(f) = read_footer(file, len - FOOTER_SIZE)? else {
        return Ok(false);
    };
    match f.disk_type {
        TYPE_FIXED => Ok(true),
        TYPE_DYNAMIC | TYPE_DIFFERENCING => {
            let mut cookie = [0u8; 8];
            Ok(f.data_offset.checked_add(8).is_some_and(|e| e <= len)
                && file
                    .read_exact_at(&mut cookie, f.data_offset, "VHD dynamic header")
                    .is_ok()
                && &cookie == b"cxsparse")
        }
        _ => Ok(false),
    }
}

/// One parent locator entry of the dynamic header.
#[derive(Debug, Clone)]
pub(crate) struct Locator {
    pub code: [u8; 4],
    pub space: u32,
    pub length: u32,
    pub offset: u64,
}

/// The dynamic header, decoded.
#[derive(Debug, Clone)]
pub(crate) struct DynHeader {
    pub offset: u64,
    pub data_offset: u64,
    pub table_offset: u64,
    pub version: u32,
    pub max_entries: u32,
    pub block_size: u32,
    pub parent_uid: [u8; 16],
    pub parent_timestamp: u32,
    pub parent_name: String,
    pub locators: Vec<Locator>,
}

impl DynHeader {
    /// Reads and validates (cookie, checksum) the dynamic header at `offset`.
    pub fn read(file: &dyn Backing, offset: u64) -> Result<DynHeader> {
        let path = file.path();
        if !offset.is_multiple_of(512) {
            return Err(Error::corrupt(
                path,
                "VHD dynamic header",
                offset,
                "offset (footer DataOffset) is not a multiple of 512",
            ));
        }
        let mut raw = [0u8; DYN_HEADER_SIZE as usize];
        file.read_exact_at(&mut raw, offset, "VHD dynamic header")?;
        if raw.get(..8) != Some(b"cxsparse".as_slice()) {
            return Err(Error::corrupt(
                path,
                "VHD dynamic header",
                offset,
                "no `cxsparse` cookie",
            ));
        }
        let stored = be::u32(&raw, 36);
        let computed = checksum(&raw, 36);
        if stored != computed {
            return Err(Error::corrupt(
                path,
                "VHD dynamic header",
                offset,
                format!("checksum {stored:#010x} does not match the computed {computed:#010x}"),
            ));
        }
        let name: Vec<u16> = raw
            .get(64..576)
            .unwrap_or(&[])
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let locators = (0..8)
            .map(|i| {
                let at = 576 + 24 * i;
                Locator {
                    code: arr(&raw, at),
                    space: be::u32(&raw, at + 4),
                    length: be::u32(&raw, at + 8),
                    offset: be::u64(&raw, at + 16),
                }
            })
            .collect();
        Ok(DynHeader {
            offset,
            data_offset: be::u64(&raw, 8),
            table_offset: be::u64(&raw, 16),
            version: be::u32(&raw, 24),
            max_entries: be::u32(&raw, 28),
            block_size: be::u32(&raw, 32),
            parent_uid: arr(&raw, 40),
            parent_timestamp: be::u32(&raw, 56),
            parent_name: String::from_utf16_lossy(&name),
            locators,
        })
    }
}

/// Sizes of a dynamic image's blocks and table, validated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub block_size: u64,
    pub bitmap_size: u64,
    /// BAT entries that cover the virtual size.
    pub entries: u64,
}

/// Bytes of the sector bitmap in front of each block: one bit per sector, rounded up
/// to whole sectors.
pub(crate) fn bitmap_size(block_size: u64) -> u64 {
    (block_size / 512).div_ceil(8).div_ceil(512) * 512
}

/// Validates block size and table size against the virtual size and the file.
pub(crate) fn geometry(file: &dyn Backing, h: &DynHeader, size: u64) -> Result<Geometry> {
    let path = file.path();
    let bs = u64::from(h.block_size);
    if !bs.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&bs) {
        return Err(Error::corrupt(
            path,
            "VHD dynamic header",
            h.offset + 32,
            format!("block size {bs} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"),
        ));
    }
    let entries = size.div_ceil(bs);
    if u64::from(h.max_entries) < entries {
        return Err(Error::corrupt(
            path,
            "VHD dynamic header",
            h.offset + 28,
            format!(
                "MaxTableEntries {} cannot cover the virtual size {size} with {bs}-byte blocks ({entries} needed)",
                h.max_entries
            ),
        ));
    }
    if !h.table_offset.is_multiple_of(512) {
        return Err(Error::corrupt(
            path,
            "BAT",
            h.table_offset,
            "table offset is not a multiple of 512",
        ));
    }
    // Bounds the table allocation by the file length.
    let table_end = h.table_offset.checked_add(entries * 4);
    if table_end.is_none_or(|e| e > file.len()) {
        return Err(Error::corrupt(
            path,
            "BAT",
            h.table_offset,
            format!(
                "{entries} entries extend beyond the end of the file ({} bytes)",
                file.len()
            ),
        ));
    }
    Ok(Geometry {
        block_size: bs,
        bitmap_size: bitmap_size(bs),
        entries,
    })
}

/// Reads the BAT entries that cover the disk (the caller has bounded them by the file).
pub(crate) fn read_bat(file: &dyn Backing, h: &DynHeader, g: &Geometry) -> Result<Vec<u32>> {
    let n = usize::try_from(g.entries)
        .map_err(|_| Error::corrupt(file.path(), "BAT", h.table_offset, "too many entries"))?;
    let raw = file.read_vec(h.table_offset, n.saturating_mul(4), "BAT")?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Bytes of block `idx` that the file must hold: the bitmap and the part of the block
/// inside the virtual size.
pub(crate) fn block_span(g: &Geometry, idx: u64, size: u64) -> u64 {
    let start = idx.saturating_mul(g.block_size);
    g.bitmap_size + size.saturating_sub(start).min(g.block_size)
}

/// Reads a locator's path, or says why it cannot be read.
pub(crate) fn read_locator(file: &dyn Backing, l: &Locator) -> std::result::Result<String, String> {
    if l.length == 0 || l.length > MAX_LOCATOR {
        return Err(format!(
            "data length {} is not between 1 and {MAX_LOCATOR}",
            l.length
        ));
    }
    match file.read_vec(l.offset, l.length as usize, "VHD parent locator") {
        Ok(b) => Ok(le::utf16(&b)),
        Err(e) => Err(e.to_string()),
    }
}

/// Turns a path stored in the image (Windows or POSIX) into local candidates.
fn local_candidates(dir: &Path, stored: &str, out: &mut Vec<PathBuf>) {
    let s = stored.trim_end_matches('\0').trim();
    if s.is_empty() {
        return;
    }
    let unix = s.replace('\\', "/");
    let bytes = unix.as_bytes();
    let has_drive = bytes.len() >= 2
        && bytes.first().is_some_and(u8::is_ascii_alphabetic)
        && bytes.get(1) == Some(&b':');
    if !has_drive {
        if unix.starts_with('/') {
            out.push(PathBuf::from(&unix));
        } else {
            out.push(dir.join(unix.trim_start_matches("./")));
        }
    }
}

/// The paths where the parent may be, in order: `W2ru` locators, `W2ku` locators,
/// the parent name in the child's folder, then the file name of each in the folder.
pub(crate) fn parent_candidates(file: &dyn Backing, h: &DynHeader) -> Vec<PathBuf> {
    let dir = match file.path().parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut stored = Vec::new();
    for code in [b"W2ru", b"W2ku"] {
        for l in h.locators.iter().filter(|l| &l.code == code) {
            if let Ok(p) = read_locator(file, l) {
                stored.push(p);
            }
        }
    }
    stored.push(h.parent_name.clone());
    let mut out = Vec::new();
    for s in &stored {
        local_candidates(&dir, s, &mut out);
    }
    for s in &stored {
        let unix = s.replace('\\', "/");
        if let Some(name) = unix
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        {
            out.push(dir.join(name));
        }
    }
    let mut seen = Vec::new();
    out.retain(|p| {
        if seen.contains(p) {
            false
        } else {
            seen.push(p.clone());
            true
        }
    });
    out
}

/// Finds and opens the parent of a differencing image, checking its UniqueId.
pub(crate) fn open_parent(
    file: &dyn Backing,
    h: &DynHeader,
    ctx: &OpenCtx,
) -> Result<(Box<dyn VirtualDisk>, PathBuf)> {
    let child = file.path();
    let mut notes = Vec::new();
    for cand in parent_candidates(file, h) {
        if !cand.is_file() {
            notes.push(format!("{} (not found)", cand.display()));
            continue;
        }
        let uid = FileBacking::open(&cand).and_then(|b| choose_footer(b.as_ref()));
        match uid {
            Ok(f) if f.unique_id == h.parent_uid => {
                let disk = ctx.open_parent(child, &cand, Some(Format::Vhd))?;
                return Ok((disk, cand));
            }
            Ok(f) => notes.push(format!(
                "{} (UniqueId {} but the child expects {})",
                cand.display(),
                uuid(&f.unique_id),
                uuid(&h.parent_uid)
            )),
            Err(e) => notes.push(format!("{} ({e})", cand.display())),
        }
    }
    Err(Error::parent(
        child,
        format!(
            "parent {:?} (UniqueId {}) not found; tried: {}",
            h.parent_name,
            uuid(&h.parent_uid),
            if notes.is_empty() {
                "nothing (no locator)".to_string()
            } else {
                notes.join(", ")
            }
        ),
    ))
}

/// Blocks of a dynamic or differencing image.
#[derive(Debug)]
struct Sparse {
    header: DynHeader,
    geo: Geometry,
    bat: Vec<u32>,
    parent: Option<(Box<dyn VirtualDisk>, PathBuf)>,
    /// Recently used sector bitmaps (differencing only), by block index.
    bitmaps: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

#[derive(Debug)]
enum Layout {
    Fixed,
    Sparse(Box<Sparse>),
}

/// A VHD open for reading.
#[derive(Debug)]
pub struct VhdDisk {
    file: Arc<dyn Backing>,
    footer: Footer,
    size: u64,
    size_rule: &'static str,
    layout: Layout,
}

/// Opens a VHD (and its parent chain).
pub(crate) fn open(file: Arc<dyn Backing>, ctx: &OpenCtx) -> Result<Box<dyn VirtualDisk>> {
    Ok(Box::new(VhdDisk::open(file, ctx)?))
}

impl VhdDisk {
    fn open(file: Arc<dyn Backing>, ctx: &OpenCtx) -> Result<VhdDisk> {
        let path = file.path().to_path_buf();
        let footer = choose_footer(file.as_ref())?;
        let foot_off = file.len().saturating_sub(FOOTER_SIZE);
        let (size, size_rule) = size_rule(&footer);
        if size > MAX_SIZE {
            return Err(Error::corrupt(
                &path,
                "VHD footer",
                foot_off,
                format!("virtual size {size} ({size_rule}) exceeds the VHD maximum of 2040 GiB"),
            ));
        }
        let layout = match footer.disk_type {
            TYPE_FIXED => {
                if size > foot_off {
                    return Err(Error::corrupt(
                        &path,
                        "VHD footer",
                        foot_off,
                        format!(
                            "fixed disk of {size} bytes but only {foot_off} bytes of data precede the footer"
                        ),
                    ));
                }
                Layout::Fixed
            }
            TYPE_DYNAMIC | TYPE_DIFFERENCING => {
                let header = DynHeader::read(file.as_ref(), footer.data_offset)?;
                let geo = geometry(file.as_ref(), &header, size)?;
                let bat = read_bat(file.as_ref(), &header, &geo)?;
                for (i, &e) in bat.iter().enumerate() {
                    if e == UNALLOCATED {
                        continue;
                    }
                    let start = u64::from(e) * 512;
                    let end = start.checked_add(block_span(&geo, i as u64, size));
                    if end.is_none_or(|end| end > file.len()) {
                        return Err(Error::corrupt(
                            &path,
                            "BAT",
                            header.table_offset + 4 * i as u64,
                            format!(
                                "entry {i}: block at {start:#x} extends beyond the end of the file ({:#x})",
                                file.len()
                            ),
                        ));
                    }
                }
                let parent = if footer.disk_type == TYPE_DIFFERENCING {
                    let (p, pp) = open_parent(file.as_ref(), &header, ctx)?;
                    if p.virtual_size() != size {
                        return Err(Error::parent(
                            &path,
                            format!(
                                "parent {} has {} bytes but this image has {size}",
                                pp.display(),
                                p.virtual_size()
                            ),
                        ));
                    }
                    Some((p, pp))
                } else {
                    None
                };
                Layout::Sparse(Box::new(Sparse {
                    header,
                    geo,
                    bat,
                    parent,
                    bitmaps: Mutex::new(Vec::new()),
                }))
            }
            t => {
                return Err(Error::corrupt(
                    &path,
                    "VHD footer",
                    foot_off + 60,
                    format!(
                        "unknown disk type {t} (expected 2 fixed, 3 dynamic or 4 differencing)"
                    ),
                ));
            }
        };
        Ok(VhdDisk {
            file,
            footer,
            size,
            size_rule,
            layout,
        })
    }

    fn subformat(&self) -> Subformat {
        match &self.layout {
            Layout::Fixed => Subformat::Fixed,
            Layout::Sparse(s) if s.parent.is_some() => Subformat::Differencing,
            Layout::Sparse(_) => Subformat::Dynamic,
        }
    }
}

impl Sparse {
    /// File offset of block `idx`'s bitmap, if allocated.
    fn block(&self, idx: u64) -> Option<u64> {
        let e = *self.bat.get(usize::try_from(idx).ok()?)?;
        (e != UNALLOCATED).then(|| u64::from(e) * 512)
    }

    fn bitmap(&self, file: &dyn Backing, idx: u64, at: u64) -> Result<Arc<Vec<u8>>> {
        if let Ok(cache) = self.bitmaps.lock()
            && let Some((_, b)) = cache.iter().find(|(i, _)| *i == idx)
        {
            return Ok(b.clone());
        }
        // bitmap_size <= 64 KiB (block size is bounded).
        let b = Arc::new(file.read_vec(at, self.geo.bitmap_size as usize, "VHD sector bitmap")?);
        if let Ok(mut cache) = self.bitmaps.lock() {
            if cache.len() >= BITMAP_CACHE {
                cache.remove(0);
            }
            cache.push((idx, b.clone()));
        }
        Ok(b)
    }

    /// Splits `[in_blk, in_blk + n)` of a differencing block into runs of sectors
    /// present here (`true`) or in the parent (`false`), as (relative start, len, here).
    fn runs(bm: &[u8], in_blk: u64, n: u64) -> Vec<(u64, u64, bool)> {
        let bit = |sector: u64| {
            let byte = usize::try_from(sector / 8)
                .ok()
                .and_then(|i| bm.get(i))
                .copied()
                .unwrap_or(0);
            byte & (0x80 >> (sector % 8)) != 0
        };
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let end = in_blk + n;
        let mut pos = in_blk;
        while pos < end {
            let sector = pos / 512;
            let here = bit(sector);
            // Skip whole bytes of equal bits quickly.
            let mut next = (sector + 1) * 512;
            while next < end {
                let s = next / 512;
                if s.is_multiple_of(8) {
                    let byte = usize::try_from(s / 8)
                        .ok()
                        .and_then(|i| bm.get(i))
                        .copied()
                        .unwrap_or(0);
                    if (here && byte == 0xFF) || (!here && byte == 0) {
                        next += 8 * 512;
                        continue;
                    }
                }
                if bit(s) != here {
                    break;
                }
                next += 512;
            }
            let next = next.min(end);
            match out.last_mut() {
                Some(l) if l.2 == here => l.1 += next - pos,
                _ => out.push((pos - in_blk, next - pos, here)),
            }
            pos = next;
        }
        out
    }
}

fn sub(buf: &mut [u8], start: u64, len: u64) -> Result<&mut [u8]> {
    let s = usize::try_from(start).map_err(|_| Error::Invalid("read too large".into()))?;
    let e = usize::try_from(start + len).map_err(|_| Error::Invalid("read too large".into()))?;
    buf.get_mut(s..e)
        .ok_or_else(|| Error::Invalid("internal: read range outside the buffer".into()))
}

impl VirtualDisk for VhdDisk {
    fn info(&self) -> DiskInfo {
        let f = &self.footer;
        let mut details = vec![
            ("creator app".to_string(), tag(&f.creator_app)),
            (
                "creator version".to_string(),
                format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xFFFF),
            ),
            ("creator OS".to_string(), tag(&f.creator_os)),
            ("disk id".to_string(), uuid(&f.unique_id)),
            ("size rule".to_string(), self.size_rule.to_string()),
            ("current size".to_string(), f.current_size.to_string()),
            ("original size".to_string(), f.original_size.to_string()),
            (
                "geometry".to_string(),
                format!("{}/{}/{}", f.cylinders, f.heads, f.sectors),
            ),
        ];
        if f.saved_state != 0 {
            details.push(("saved state".to_string(), "yes".to_string()));
        }
        let mut block_size = None;
        let mut parent = None;
        if let Layout::Sparse(s) = &self.layout {
            block_size = Some(s.geo.block_size);
            let used = s.bat.iter().filter(|&&e| e != UNALLOCATED).count();
            details.push(("allocated blocks".to_string(), used.to_string()));
            if let Some((p, pp)) = &s.parent {
                details.push(("parent uid".to_string(), uuid(&s.header.parent_uid)));
                details.push(("parent name".to_string(), s.header.parent_name.clone()));
                details.push((
                    "parent timestamp".to_string(),
                    s.header.parent_timestamp.to_string(),
                ));
                details.push(("parent path".to_string(), pp.display().to_string()));
                parent = Some(Box::new(p.info()));
            }
        }
        DiskInfo {
            path: self.file.path().to_path_buf(),
            format: Format::Vhd,
            subformat: self.subformat(),
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            block_size,
            file_size: self.file.len(),
            allocated_bytes: self.file.allocated_bytes(),
            details,
            parent,
        }
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        let s = match &self.layout {
            Layout::Fixed => return self.file.read_exact_at(buf, offset, "VHD data"),
            Layout::Sparse(s) => s,
        };
        let total = buf.len() as u64;
        let mut done = 0u64;
        while done < total {
            let pos = offset + done;
            let idx = pos / s.geo.block_size;
            let in_blk = pos % s.geo.block_size;
            let n = (total - done).min(s.geo.block_size - in_blk);
            let chunk = sub(buf, done, n)?;
            match (s.block(idx), &s.parent) {
                (None, None) => chunk.fill(0),
                (None, Some((p, _))) => p.read_at(chunk, pos)?,
                (Some(at), None) => self.file.read_exact_at(
                    chunk,
                    at + s.geo.bitmap_size + in_blk,
                    "VHD data block",
                )?,
                (Some(at), Some((p, _))) => {
                    let bm = s.bitmap(self.file.as_ref(), idx, at)?;
                    for (rel, len, here) in Sparse::runs(&bm, in_blk, n) {
                        let part = sub(chunk, rel, len)?;
                        if here {
                            let data = at + s.geo.bitmap_size + in_blk + rel;
                            self.file.read_exact_at(part, data, "VHD data block")?;
                        } else {
                            p.read_at(part, pos + rel)?;
                        }
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = map_range_end(offset, length, self.size)?;
        let mut out = Vec::new();
        let s = match &self.layout {
            Layout::Fixed => return data_region_extents(self.file.as_ref(), offset, end),
            Layout::Sparse(s) => s,
        };
        let push_parent =
            |out: &mut Vec<Extent>, p: &dyn VirtualDisk, o: u64, l: u64| -> Result<()> {
                for e in p.map(o, l)? {
                    push_extent(out, e.offset, e.length, e.state);
                }
                Ok(())
            };
        let mut pos = offset;
        while pos < end {
            let idx = pos / s.geo.block_size;
            let in_blk = pos % s.geo.block_size;
            let n = (end - pos).min(s.geo.block_size - in_blk);
            match (s.block(idx), &s.parent) {
                (None, None) => push_extent(&mut out, pos, n, ExtentState::Unallocated),
                (None, Some((p, _))) => push_parent(&mut out, p.as_ref(), pos, n)?,
                (Some(_), None) => push_extent(&mut out, pos, n, ExtentState::Data),
                (Some(at), Some((p, _))) => {
                    let bm = s.bitmap(self.file.as_ref(), idx, at)?;
                    for (rel, len, here) in Sparse::runs(&bm, in_blk, n) {
                        if here {
                            push_extent(&mut out, pos + rel, len, ExtentState::Data);
                        } else {
                            push_parent(&mut out, p.as_ref(), pos + rel, len)?;
                        }
                    }
                }
            }
            pos += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_follow_msb_first_bits() {
        let mut bm = vec![0u8; 512];
        bm[0] = 0b1000_0001; // sectors 0 and 7
        bm[2] = 0xFF; // sectors 16..24
        let r = Sparse::runs(&bm, 0, 32 * 512);
        assert_eq!(
            r,
            vec![
                (0, 512, true),
                (512, 6 * 512, false),
                (7 * 512, 512, true),
                (8 * 512, 8 * 512, false),
                (16 * 512, 8 * 512, true),
                (24 * 512, 8 * 512, false)
            ]
        );
        // unaligned start inside sector 7
        let r = Sparse::runs(&bm, 7 * 512 + 100, 500);
        assert_eq!(r, vec![(0, 412, true), (412, 88, false)]);
    }

    #[test]
    fn checksum_skips_field() {
        let mut b = [1u8; 16];
        b[4..8].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(checksum(&b, 4), !12u32);
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(256 << 20), 65536);
        assert_eq!(bitmap_size(4096), 512);
    }

    #[test]
    fn windows_paths_become_local_candidates() {
        let mut v = Vec::new();
        local_candidates(Path::new("/d"), ".\\p.vhd", &mut v);
        local_candidates(Path::new("/d"), "..\\x\\p.vhd", &mut v);
        local_candidates(Path::new("/d"), "C:\\vm\\p.vhd", &mut v);
        local_candidates(Path::new("/d"), "/abs/p.vhd", &mut v);
        assert_eq!(
            v,
            vec![
                PathBuf::from("/d/p.vhd"),
                PathBuf::from("/d/../x/p.vhd"),
                PathBuf::from("/abs/p.vhd")
            ]
        );
    }
}
