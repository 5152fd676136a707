//! VHDX writer (MS-VHDX 1.0): fixed, dynamic and differencing (AVHDX) images, streamed
//! through a [`Sink`].
//!
//! File layout (the same as qemu-img's, so tools that assume it are happy):
//! header section (file identifier, two headers, two region tables) in the first MiB,
//! an empty 1 MiB log at 1 MiB, the metadata region at 2 MiB, the BAT at 3 MiB, then
//! data blocks (1 MiB aligned, since every block size is a multiple of 1 MiB).
//!
//! Data blocks are allocated at the end of the file on the first data written into
//! them; parts never written are file holes and read as zeros. The BAT lives in memory
//! (8 bytes per entry) and is written by `finish`, followed by the metadata and, last,
//! the headers, so a file cut short never looks like a valid image.
//!
//! The on-disk constants, GUIDs, CRC-32C, encoders and block geometry come from
//! [`super::layout`], shared with the reader.

use super::layout::{
    BITMAP_BLOCK_SIZE, CREATOR_OFFSET, FILE_FLAG_HAS_PARENT, FILE_FLAG_LEAVE_BLOCKS_ALLOCATED,
    FILE_IDENTIFIER_SIZE, FILE_SIGNATURE, Geometry, Guid, HEADER_OFFSETS, HEADER_SIZE, Header,
    MAX_METADATA_ENTRIES, MAX_REGION_ENTRIES, META_FILE_PARAMETERS, META_FLAG_REQUIRED,
    META_FLAG_VIRTUAL_DISK, META_LOGICAL_SECTOR, META_PAGE83, META_PARENT_LOCATOR,
    META_PHYSICAL_SECTOR, META_VIRTUAL_DISK_SIZE, METADATA_TABLE_SIZE, MIB, PARENT_LOCATOR_TYPE,
    PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_ZERO,
    REGION_BAT, REGION_METADATA, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, RegionEntry, SB_PRESENT,
    SECTORS_PER_BITMAP, bat_entry, bat_offset, bat_state, crc32c_zeroed, encode_region_table, put,
};
use crate::backing::{Backing, FileBacking, le};
use crate::sink::{CreateOptions, OrderCheck, OutFile, Placement, Sink, create_file};
use crate::{Error, Format, Result, Subformat};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;

/// Hyper-V's default block size.
pub(crate) const DEFAULT_BLOCK_SIZE: u64 = 32 * MIB;

/// A fresh random GUID. No `rand` crate: std's `RandomState` is seeded from the OS per
/// process; mixing in the time, the pid and a counter keeps successive GUIDs distinct.
fn new_guid() -> Guid {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = std::collections::hash_map::RandomState::new();
    let mut g = [0u8; 16];
    for (i, half) in g.chunks_exact_mut(8).enumerate() {
        let h = state.hash_one((nanos, std::process::id(), n, i));
        half.copy_from_slice(&h.to_le_bytes());
    }
    // Mark it as an RFC 4122 version-4 GUID (Data3 is stored little-endian).
    g[7] = (g[7] & 0x0F) | 0x40;
    g[8] = (g[8] & 0x3F) | 0x80;
    Guid(g)
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a).saturating_mul(a)
}

/// What a differencing child needs from its parent.
#[derive(Debug, Clone)]
struct ParentFacts {
    data_write_guid: Guid,
    virtual_size: u64,
    logical_sector: u64,
}

/// Reads the current header and the size metadata of the VHDX `parent`. A minimal
/// parser (header, region table, metadata table) kept here so the writer does not
/// depend on the reader.
fn read_parent(child: &Path, parent: &Path) -> Result<ParentFacts> {
    if !parent.exists() {
        return Err(Error::parent(
            child,
            format!("parent {} does not exist", parent.display()),
        ));
    }
    let file = FileBacking::open(parent)?;
    let format = crate::detect(file.as_ref())?;
    if format != Format::Vhdx {
        return Err(Error::parent(
            child,
            format!("parent {} is {format}, expected vhdx", parent.display()),
        ));
    }
    parse_parent(file.as_ref())
}

fn parse_parent(file: &dyn Backing) -> Result<ParentFacts> {
    let path = file.path();
    let mut best: Option<(u64, Guid)> = None;
    for off in HEADER_OFFSETS {
        let mut h = vec![0u8; HEADER_SIZE];
        if file.read_exact_at(&mut h, off, "VHDX header").is_err() {
            continue;
        }
        if h.get(..4) != Some(b"head".as_slice()) || crc32c_zeroed(&h, 4) != le::u32(&h, 4) {
            continue;
        }
        let seq = le::u64(&h, 8);
        let g = Guid::read(&h, 32);
        if best.is_none_or(|(s, _)| seq > s) {
            best = Some((seq, g));
        }
    }
    let (_, data_write_guid) = best.ok_or_else(|| {
        Error::corrupt(
            path,
            "VHDX header",
            HEADER_OFFSETS[0],
            "neither header is valid",
        )
    })?;

    let mut region = None;
    for off in REGION_TABLE_OFFSETS {
        let mut r = vec![0u8; REGION_TABLE_SIZE];
        if file
            .read_exact_at(&mut r, off, "VHDX region table")
            .is_err()
        {
            continue;
        }
        if r.get(..4) == Some(b"regi".as_slice()) && crc32c_zeroed(&r, 4) == le::u32(&r, 4) {
            region = Some(r);
            break;
        }
    }
    let region = region.ok_or_else(|| {
        Error::corrupt(
            path,
            "VHDX region table",
            REGION_TABLE_OFFSETS[0],
            "neither region table is valid",
        )
    })?;
    let count = (le::u32(&region, 8) as usize).min(MAX_REGION_ENTRIES as usize);
    let mut meta = None;
    for e in region
        .get(16..)
        .unwrap_or_default()
        .chunks_exact(32)
        .take(count)
    {
        if Guid::read(e, 0) == REGION_METADATA {
            meta = Some((le::u64(e, 16), u64::from(le::u32(e, 24))));
        }
    }
    let (meta_off, meta_len) = meta.ok_or_else(|| {
        Error::corrupt(
            path,
            "VHDX region table",
            REGION_TABLE_OFFSETS[0],
            "no metadata region",
        )
    })?;
    let table = file.read_vec(meta_off, METADATA_TABLE_SIZE, "VHDX metadata table")?;
    if table.get(..8) != Some(b"metadata".as_slice()) {
        return Err(Error::corrupt(
            path,
            "VHDX metadata table",
            meta_off,
            "bad signature",
        ));
    }
    let count = usize::from(le::u16(&table, 10).min(MAX_METADATA_ENTRIES));
    let item = |id: &Guid, want: u32| -> Result<u64> {
        let e = table
            .get(32..)
            .unwrap_or_default()
            .chunks_exact(32)
            .take(count)
            .find(|e| Guid::read(e, 0) == *id)
            .ok_or_else(|| {
                Error::corrupt(
                    path,
                    "VHDX metadata table",
                    meta_off,
                    "a required item is missing",
                )
            })?;
        let (off, len) = (le::u32(e, 16), le::u32(e, 20));
        if len < want || u64::from(off).saturating_add(u64::from(want)) > meta_len {
            return Err(Error::corrupt(
                path,
                "VHDX metadata item",
                meta_off.saturating_add(u64::from(off)),
                format!("item of {len} bytes at {off:#x} does not fit the metadata region"),
            ));
        }
        let at = meta_off.saturating_add(u64::from(off));
        let v = file.read_vec(at, want as usize, "VHDX metadata item")?;
        Ok(if want == 8 {
            le::u64(&v, 0)
        } else {
            u64::from(le::u32(&v, 0))
        })
    };
    let virtual_size = item(&META_VIRTUAL_DISK_SIZE, 8)?;
    let logical_sector = item(&META_LOGICAL_SECTOR, 4)?;
    Ok(ParentFacts {
        data_write_guid,
        virtual_size,
        logical_sector,
    })
}

/// `relative_path` of a parent locator: the way from the child's folder to the parent,
/// Windows style (`.\name`, `..\dir\name`), as Hyper-V writes it.
fn relative_win_path(child_dir: &Path, parent: &Path) -> Option<String> {
    let from: Vec<Component> = child_dir.components().collect();
    let to: Vec<Component> = parent.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    // Different roots (nothing in common) cannot be expressed relatively.
    if common == 0 {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    let ups = from.len().saturating_sub(common);
    if ups == 0 {
        parts.push(".".into());
    }
    parts.extend(std::iter::repeat_n("..".to_string(), ups));
    for c in to.get(common..)? {
        match c {
            Component::Normal(n) => parts.push(n.to_str()?.to_string()),
            _ => return None,
        }
    }
    Some(parts.join("\\"))
}

/// The Parent Locator metadata item (MS-VHDX 2.6.2.6).
fn parent_locator(pairs: &[(&str, String)]) -> Result<Vec<u8>> {
    let header = 20 + 12 * pairs.len();
    let mut out = vec![0u8; header];
    put(&mut out, 0, &PARENT_LOCATOR_TYPE.0);
    put(&mut out, 18, &(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let (k, v) = (le::utf16_bytes(k), le::utf16_bytes(v));
        let (kl, vl) = match (u16::try_from(k.len()), u16::try_from(v.len())) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(Error::Invalid("vhdx: parent path too long".into())),
        };
        let ko = out.len() as u32;
        out.extend_from_slice(&k);
        let vo = out.len() as u32;
        out.extend_from_slice(&v);
        let e = 20 + 12 * i;
        put(&mut out, e, &ko.to_le_bytes());
        put(&mut out, e + 4, &vo.to_le_bytes());
        put(&mut out, e + 8, &kl.to_le_bytes());
        put(&mut out, e + 10, &vl.to_le_bytes());
    }
    Ok(out)
}

/// Everything written by `finish` besides the BAT.
#[derive(Debug)]
struct Layout {
    file_write_guid: Guid,
    data_write_guid: Guid,
    page83: Guid,
    physical_sector: u32,
    file_flags: u32,
    /// Parent locator item, for differencing images.
    locator: Option<Vec<u8>>,
}

/// The sector bitmap of the chunk being written (differencing only).
#[derive(Debug)]
struct ChunkBitmap {
    chunk: u64,
    bits: Vec<u8>,
    /// Byte range of `bits` that holds set bits.
    dirty: Option<(usize, usize)>,
    /// Some block of this chunk is PARTIALLY_PRESENT, so the bitmap must be stored.
    needed: bool,
}

/// The block currently receiving writes (differencing only).
#[derive(Debug, Clone, Copy)]
struct CurrentBlock {
    block: u64,
    /// Bytes of the block mentioned by write_data or write_zero.
    covered: u64,
}

/// Streaming VHDX writer.
#[derive(Debug)]
struct VhdxWriter {
    file: Arc<OutFile>,
    path: PathBuf,
    order: OrderCheck,
    geo: Geometry,
    kind: Subformat,
    bat: Vec<u64>,
    /// End of the allocated part of the file (where the next block goes).
    next_free: u64,
    layout: Layout,
    cur: Option<CurrentBlock>,
    bitmap: Option<ChunkBitmap>,
}

/// Creates a VHDX image at `path` and returns its writer.
pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    let block_size = opts.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    let physical = opts.physical_sector_size;
    if physical != 512 && physical != 4096 {
        return Err(Error::Invalid(format!(
            "vhdx: physical sector size {physical} (expected 512 or 4096)"
        )));
    }
    let differencing = opts.subformat == Subformat::Differencing;
    let mut virtual_size = opts.virtual_size;
    let mut logical = u64::from(opts.logical_sector_size);
    let mut parent_facts = None;
    match (&opts.parent, differencing) {
        (Some(_), false) => {
            return Err(Error::Invalid(
                "vhdx: only a differencing image has a parent".into(),
            ));
        }
        (None, true) => {
            return Err(Error::Invalid(
                "vhdx: a differencing image needs a parent".into(),
            ));
        }
        (Some(parent), true) => {
            let facts = read_parent(path, parent)?;
            // The child's geometry comes from the parent; a caller that states a size
            // (0 = "take the parent's") must agree with it.
            if virtual_size != 0 && virtual_size != facts.virtual_size {
                return Err(Error::Invalid(format!(
                    "vhdx: differencing image of {virtual_size} bytes, but parent {} is {} bytes",
                    parent.display(),
                    facts.virtual_size
                )));
            }
            if logical != facts.logical_sector {
                return Err(Error::Invalid(format!(
                    "vhdx: logical sector size {logical}, but parent {} uses {}",
                    parent.display(),
                    facts.logical_sector
                )));
            }
            virtual_size = facts.virtual_size;
            logical = facts.logical_sector;
            parent_facts = Some(facts);
        }
        (None, false) => {}
    }
    let geo = Geometry::validated(virtual_size, block_size, logical, differencing)?;
    let bat_len = usize::try_from(geo.bat_entries)
        .map_err(|_| Error::Invalid("vhdx: BAT too large".into()))?;

    let locator = match (&opts.parent, &parent_facts) {
        (Some(parent), Some(facts)) => {
            let abs = std::path::absolute(parent).map_err(|e| Error::io(parent, "resolve", e))?;
            let abs_str = abs
                .to_str()
                .ok_or_else(|| Error::Invalid(format!("{}: not valid UTF-8", abs.display())))?
                .to_string();
            let child_dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let child_dir =
                std::fs::canonicalize(child_dir).map_err(|e| Error::io(child_dir, "resolve", e))?;
            let parent_canon =
                std::fs::canonicalize(parent).map_err(|e| Error::io(parent, "resolve", e))?;
            let mut pairs = vec![("parent_linkage", facts.data_write_guid.to_string())];
            if let Some(rel) = relative_win_path(&child_dir, &parent_canon) {
                pairs.push(("relative_path", rel));
            }
            pairs.push(("absolute_win32_path", abs_str));
            Some(parent_locator(&pairs)?)
        }
        _ => None,
    };

    let file = create_file(path, opts)?;
    let data_start = BAT_OFFSET + geo.bat_region_len();
    let mut bat = vec![PAYLOAD_NOT_PRESENT; bat_len];
    let mut next_free = data_start;
    if opts.subformat == Subformat::Fixed {
        // Every block is preallocated in order; the file is sized up front, so blocks
        // never written are holes that read as zeros.
        for b in 0..geo.payload_blocks {
            let off = data_start + b * geo.block_size;
            if let Some(e) = bat.get_mut(geo.payload_index(b) as usize) {
                *e = bat_entry(PAYLOAD_FULLY_PRESENT, off);
            }
        }
        next_free = data_start + geo.payload_blocks * geo.block_size;
        file.set_len(next_free)
            .map_err(|e| Error::io(path, "set length", e))?;
    }
    let file_flags = match opts.subformat {
        Subformat::Fixed => FILE_FLAG_LEAVE_BLOCKS_ALLOCATED,
        Subformat::Dynamic => 0,
        Subformat::Differencing => FILE_FLAG_HAS_PARENT,
    };
    Ok(Box::new(VhdxWriter {
        file: Arc::new(file),
        path: path.to_path_buf(),
        order: OrderCheck::new(virtual_size, logical as u32),
        geo,
        kind: opts.subformat,
        bat,
        next_free,
        layout: Layout {
            file_write_guid: new_guid(),
            data_write_guid: new_guid(),
            page83: new_guid(),
            physical_sector: physical,
            file_flags,
            locator,
        },
        cur: None,
        bitmap: None,
    }))
}

impl VhdxWriter {
    /// Allocates (and, in a differencing image, records) the blocks for
    /// `[offset, offset+len)` and returns where each part goes in the file.
    fn place(&mut self, offset: u64, len: u64) -> Result<Vec<(usize, u64, usize)>> {
        self.order.advance(offset, len)?;
        let bs = self.geo.block_size;
        let end = offset + len;
        let mut pos = offset;
        let mut out: Vec<(usize, u64, usize)> = Vec::new();
        while pos < end {
            let block = pos / bs;
            let within = pos % bs;
            let n = (bs - within).min(end - pos);
            if self.kind == Subformat::Differencing {
                self.touch(pos, n)?;
            }
            let at = self.block_offset(block)? + within;
            let rel = (pos - offset) as usize;
            // Consecutive blocks are usually adjacent in the file: one write for both.
            match out.last_mut() {
                Some(last) if last.1 + last.2 as u64 == at => last.2 += n as usize,
                _ => out.push((rel, at, n as usize)),
            }
            pos += n;
        }
        Ok(out)
    }

    fn entry_mut(&mut self, index: u64) -> Result<&mut u64> {
        let path = &self.path;
        self.bat.get_mut(index as usize).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: BAT index {index} out of range",
                path.display()
            ))
        })
    }

    /// File offset of payload block `block`, allocating it at the end of the file if it
    /// has none yet (new blocks start PARTIALLY_PRESENT in a differencing image until
    /// `finish_block` knows better, FULLY_PRESENT otherwise).
    fn block_offset(&mut self, block: u64) -> Result<u64> {
        let idx = self.geo.payload_index(block);
        let state = if self.kind == Subformat::Differencing {
            PAYLOAD_PARTIALLY_PRESENT
        } else {
            PAYLOAD_FULLY_PRESENT
        };
        let next = self.next_free;
        let bs = self.geo.block_size;
        let e = self.entry_mut(idx)?;
        let s = bat_state(*e);
        if s == PAYLOAD_FULLY_PRESENT || s == PAYLOAD_PARTIALLY_PRESENT {
            return Ok(bat_offset(*e));
        }
        *e = bat_entry(state, next);
        self.next_free = next + bs;
        Ok(next)
    }

    /// Differencing: records that `[offset, offset+len)`, inside one block, now
    /// belongs to this file (data or zeros), closing the previous block if needed.
    fn touch(&mut self, offset: u64, len: u64) -> Result<()> {
        let block = offset / self.geo.block_size;
        match self.cur {
            Some(c) if c.block == block => {}
            Some(c) => {
                self.finish_block(c)?;
                self.cur = Some(CurrentBlock { block, covered: 0 });
            }
            None => self.cur = Some(CurrentBlock { block, covered: 0 }),
        }
        if let Some(c) = self.cur.as_mut() {
            c.covered += len;
        }
        let chunk = block / self.geo.chunk_ratio;
        if self.bitmap.as_ref().is_some_and(|b| b.chunk != chunk) {
            self.flush_bitmap()?;
        }
        let bm = self.bitmap.get_or_insert_with(|| ChunkBitmap {
            chunk,
            bits: vec![0u8; BITMAP_BLOCK_SIZE as usize],
            dirty: None,
            needed: false,
        });
        bm.chunk = chunk;
        let chunk_start = chunk * self.geo.chunk_ratio * self.geo.block_size;
        let first = (offset - chunk_start) / self.geo.logical_sector;
        let count = len.div_ceil(self.geo.logical_sector);
        set_bits(bm, first, count);
        Ok(())
    }

    /// Differencing: decides the final state of a block once nothing more can arrive
    /// for it.
    fn finish_block(&mut self, c: CurrentBlock) -> Result<()> {
        let idx = self.geo.payload_index(c.block);
        let allocated = self
            .bat
            .get(idx as usize)
            .is_some_and(|e| bat_state(*e) == PAYLOAD_PARTIALLY_PRESENT);
        if c.covered >= self.geo.block_len(c.block) {
            let e = self.entry_mut(idx)?;
            *e = if allocated {
                bat_entry(PAYLOAD_FULLY_PRESENT, bat_offset(*e))
            } else {
                // Only zeros: hide the parent without storing anything.
                PAYLOAD_ZERO
            };
        } else {
            // Partly written (maybe only with zeros, which stay holes in the block).
            self.block_offset(c.block)?;
            if let Some(bm) = self.bitmap.as_mut() {
                bm.needed = true;
            }
        }
        Ok(())
    }

    /// Differencing: stores the current chunk's sector bitmap if a block needs it.
    fn flush_bitmap(&mut self) -> Result<()> {
        let Some(bm) = self.bitmap.as_mut() else {
            return Ok(());
        };
        let (chunk, needed, dirty) = (bm.chunk, bm.needed, bm.dirty);
        if needed {
            let off = self.next_free;
            self.next_free += BITMAP_BLOCK_SIZE;
            if let Some((lo, hi)) = dirty
                && let Some(b) = self.bitmap.as_ref().and_then(|b| b.bits.get(lo..hi))
            {
                // Untouched parts of the bitmap block stay holes (zeros).
                self.file.write_at(b, off + lo as u64)?;
            }
            let idx = self.geo.bitmap_index(chunk);
            *self.entry_mut(idx)? = bat_entry(SB_PRESENT, off);
        }
        if let Some(bm) = self.bitmap.as_mut() {
            if let Some((lo, hi)) = bm.dirty.take()
                && let Some(b) = bm.bits.get_mut(lo..hi)
            {
                b.fill(0);
            }
            bm.needed = false;
        }
        Ok(())
    }

    fn write_headers_and_metadata(&self) -> Result<()> {
        let l = &self.layout;
        // File identifier.
        let mut id = vec![0u8; FILE_IDENTIFIER_SIZE];
        put(&mut id, 0, FILE_SIGNATURE);
        put(&mut id, CREATOR_OFFSET, &le::utf16_bytes("holdfast"));
        self.file.write_at(&id, 0)?;

        // Region tables (identical copies), both regions required as Hyper-V writes them.
        let region = |guid, file_offset, length: u64| RegionEntry {
            guid,
            file_offset,
            length: length as u32,
            required: true,
        };
        let rt = encode_region_table(&[
            region(REGION_BAT, BAT_OFFSET, self.geo.bat_region_len()),
            region(REGION_METADATA, METADATA_OFFSET, METADATA_LENGTH),
        ]);
        for off in REGION_TABLE_OFFSETS {
            self.file.write_at(&rt, off)?;
        }

        // Metadata region: table, then the items.
        let mut fp = [0u8; 8];
        put(&mut fp, 0, &(self.geo.block_size as u32).to_le_bytes());
        put(&mut fp, 4, &l.file_flags.to_le_bytes());
        let vs = self.geo.virtual_size.to_le_bytes();
        let ls = (self.geo.logical_sector as u32).to_le_bytes();
        let ps = l.physical_sector.to_le_bytes();
        let disk_required = META_FLAG_VIRTUAL_DISK | META_FLAG_REQUIRED;
        let mut items: Vec<(Guid, &[u8], u32)> = vec![
            (META_FILE_PARAMETERS, &fp, META_FLAG_REQUIRED),
            (META_VIRTUAL_DISK_SIZE, &vs, disk_required),
            (META_PAGE83, &l.page83.0, disk_required),
            (META_LOGICAL_SECTOR, &ls, disk_required),
            (META_PHYSICAL_SECTOR, &ps, disk_required),
        ];
        if let Some(loc) = &l.locator {
            items.push((META_PARENT_LOCATOR, loc, META_FLAG_REQUIRED));
        }
        let mut meta = vec![0u8; METADATA_TABLE_SIZE];
        put(&mut meta, 0, b"metadata");
        put(&mut meta, 10, &(items.len() as u16).to_le_bytes());
        for (i, (g, data, flags)) in items.iter().enumerate() {
            let item_off = meta.len();
            meta.extend_from_slice(data);
            // Keep items 8-byte aligned.
            meta.resize(align_up(meta.len() as u64, 8) as usize, 0);
            let e = 32 + 32 * i;
            put(&mut meta, e, &g.0);
            put(&mut meta, e + 16, &(item_off as u32).to_le_bytes());
            put(&mut meta, e + 20, &(data.len() as u32).to_le_bytes());
            put(&mut meta, e + 24, &flags.to_le_bytes());
        }
        if meta.len() as u64 > METADATA_LENGTH {
            return Err(Error::Invalid(
                "vhdx: metadata does not fit its region".into(),
            ));
        }
        self.file.write_at(&meta, METADATA_OFFSET)?;

        // Headers last, so the image only becomes valid once everything else is there.
        // The log is empty: LogGuid stays zero.
        for (sequence, off) in (0u64..).zip(HEADER_OFFSETS) {
            let h = Header {
                sequence,
                file_write_guid: l.file_write_guid,
                data_write_guid: l.data_write_guid,
                log_guid: Guid::default(),
                log_version: 0,
                version: 1,
                log_length: LOG_LENGTH as u32,
                log_offset: LOG_OFFSET,
            };
            self.file.write_at(&h.encode(), off)?;
        }
        Ok(())
    }

    fn write_bat(&self) -> Result<()> {
        // Serialised a MiB at a time to keep memory bounded.
        let mut buf = Vec::with_capacity(MIB as usize);
        let mut off = BAT_OFFSET;
        for chunk in self.bat.chunks((MIB / 8) as usize) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|e| e.to_le_bytes()));
            self.file.write_at(&buf, off)?;
            off += buf.len() as u64;
        }
        Ok(())
    }
}

/// Sets `count` bits from bit `first` (bit 0 of byte 0 is the first sector).
fn set_bits(bm: &mut ChunkBitmap, first: u64, count: u64) {
    if count == 0 {
        return;
    }
    let end = (first + count).min(SECTORS_PER_BITMAP);
    let (lo_byte, hi_byte) = ((first / 8) as usize, end.div_ceil(8) as usize);
    let mut bit = first;
    // Leading partial byte, whole bytes in bulk, trailing partial byte.
    while bit < end && !bit.is_multiple_of(8) {
        if let Some(b) = bm.bits.get_mut((bit / 8) as usize) {
            *b |= 1 << (bit % 8);
        }
        bit += 1;
    }
    let whole_end = end - end % 8;
    if bit < whole_end
        && let Some(s) = bm
            .bits
            .get_mut((bit / 8) as usize..(whole_end / 8) as usize)
    {
        s.fill(0xFF);
        bit = whole_end;
    }
    while bit < end {
        if let Some(b) = bm.bits.get_mut((bit / 8) as usize) {
            *b |= 1 << (bit % 8);
        }
        bit += 1;
    }
    bm.dirty = Some(match bm.dirty {
        Some((lo, hi)) => (lo.min(lo_byte), hi.max(hi_byte)),
        None => (lo_byte, hi_byte),
    });
}

impl Sink for VhdxWriter {
    fn place_data(&mut self, offset: u64, len: u64) -> Result<Option<Placement>> {
        Ok(Some(Placement {
            file: self.file.clone(),
            pieces: self.place(offset, len)?,
        }))
    }

    fn write_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.order.advance(offset, len)?;
        if self.kind != Subformat::Differencing {
            // Unallocated blocks and holes inside allocated ones already read as zeros.
            return Ok(());
        }
        let bs = self.geo.block_size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (bs - pos % bs).min(end - pos);
            self.touch(pos, n)?;
            pos += n;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some(c) = self.cur.take() {
            self.finish_block(c)?;
        }
        self.flush_bitmap()?;
        // The last block must lie wholly inside the file even if its tail was never
        // written (qemu-img check and Hyper-V both insist).
        self.file
            .set_len(self.next_free)
            .map_err(|e| Error::io(&self.path, "set length", e))?;
        self.write_bat()?;
        self.write_headers_and_metadata()?;
        self.file.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_guids_differ() {
        let (a, b) = (new_guid(), new_guid());
        assert_ne!(a, b);
        assert_eq!(a.0[7] & 0xF0, 0x40, "version 4");
    }

    #[test]
    fn relative_paths_windows_style() {
        let r = |a: &str, b: &str| relative_win_path(Path::new(a), Path::new(b));
        assert_eq!(r("/d/x", "/d/x/p.vhdx").as_deref(), Some(".\\p.vhdx"));
        assert_eq!(r("/d/x", "/d/y/p.vhdx").as_deref(), Some("..\\y\\p.vhdx"));
        assert_eq!(r("/d/x/z", "/d/p.vhdx").as_deref(), Some("..\\..\\p.vhdx"));
    }

    #[test]
    fn bitmap_bits() {
        let mut bm = ChunkBitmap {
            chunk: 0,
            bits: vec![0u8; 8],
            dirty: None,
            needed: false,
        };
        set_bits(&mut bm, 3, 14);
        assert_eq!(&bm.bits[..3], &[0xF8, 0xFF, 0x01]);
        assert_eq!(bm.dirty, Some((0, 3)));
        set_bits(&mut bm, 40, 8);
        assert_eq!(bm.bits[5], 0xFF);
        assert_eq!(bm.dirty, Some((0, 6)));
    }

    fn read_u64(b: &[u8], at: u64) -> u64 {
        le::u64(b, at as usize)
    }

    #[test]
    fn differencing_block_states_and_bitmap() {
        let d = tempfile::tempdir().unwrap();
        let parent = d.path().join("p.vhdx");
        let mut o = CreateOptions::new(Format::Vhdx, Subformat::Dynamic, 8 * MIB);
        o.block_size = Some(MIB);
        let mut s = create(&parent, &o).unwrap();
        s.write_data(0, &[1u8; 8192]).unwrap();
        s.finish().unwrap();

        let child = d.path().join("c.avhdx");
        let mut o = CreateOptions::new(Format::Vhdx, Subformat::Differencing, 0);
        o.block_size = Some(MIB);
        o.parent = Some(parent.clone());
        let mut s = create(&child, &o).unwrap();
        s.write_data(0, &[7u8; 4096]).unwrap(); // block 0: partial
        s.write_zero(MIB, MIB).unwrap(); // block 1: zero
        s.write_data(2 * MIB, &vec![9u8; MIB as usize]).unwrap(); // block 2: full
        s.write_data(3 * MIB + 512, &[3u8; 512]).unwrap(); // block 3: partial
        s.write_zero(3 * MIB + 1024, 1024).unwrap();
        s.write_zero(4 * MIB, 512 * 1024).unwrap(); // block 4: partial, zeros only
        s.write_data(4 * MIB + 512 * 1024, &[5u8; 512 * 1024])
            .unwrap(); // ... then full
        s.finish().unwrap();

        let b = std::fs::read(&child).unwrap();
        let parent_facts = parse_parent(FileBacking::open(&child).unwrap().as_ref()).unwrap();
        assert_eq!(parent_facts.virtual_size, 8 * MIB);
        let g = Geometry::validated(8 * MIB, MIB, 512, true).unwrap();
        assert_eq!((g.chunk_ratio, g.bat_entries), (4096, 4097));
        let bat: Vec<u64> = (0..g.bat_entries)
            .map(|i| read_u64(&b, BAT_OFFSET + 8 * i))
            .collect();
        let st: Vec<u64> = bat.iter().take(8).map(|&e| bat_state(e)).collect();
        assert_eq!(st, [7, 2, 6, 7, 6, 0, 0, 0]);
        assert_eq!(bat[1], PAYLOAD_ZERO, "ZERO entries carry no offset");
        let sb = bat[4096];
        assert_eq!(bat_state(sb), SB_PRESENT);
        let off = |e: u64| (e & !(MIB - 1)) as usize;
        assert_eq!(b[off(bat[0])..off(bat[0]) + 4096], [7u8; 4096]);
        assert_eq!(b[off(bat[0]) + 4096], 0);
        assert_eq!(b[off(bat[2]) + 1000], 9);
        assert_eq!(b[off(bat[3]) + 512], 3);
        assert_eq!(b[off(bat[4]) + 600 * 1024], 5);
        let bm = &b[off(sb)..off(sb) + MIB as usize];
        // block 0: sectors 0..8; block 3: sectors 6145..6147; blocks 1, 2 and 4 whole.
        assert_eq!(bm[0], 0xFF);
        assert_eq!(bm[1], 0);
        assert!(
            bm[256..512].iter().all(|&x| x == 0xFF),
            "block 1 zeros are present"
        );
        assert_eq!(bm[768], 0b0000_1110);
        assert_eq!(bm[769], 0);
        assert!(bm[1280..].iter().all(|&x| x == 0));
        // the locator names the parent by its DataWriteGuid
        let pf = parse_parent(FileBacking::open(&parent).unwrap().as_ref()).unwrap();
        let text = String::from_utf16_lossy(
            &b[METADATA_OFFSET as usize + METADATA_TABLE_SIZE
                ..METADATA_OFFSET as usize + 2 * METADATA_TABLE_SIZE]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
        );
        assert!(text.contains(&pf.data_write_guid.to_string()));
        assert!(text.contains(".\\p.vhdx"));
        // the file ends right after the bitmap block
        assert_eq!(b.len(), off(sb) + MIB as usize);
    }
}
