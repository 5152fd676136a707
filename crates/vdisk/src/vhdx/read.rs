//! The VHDX reader: BAT lookups (cached), block reads coalesced into large positioned
//! reads, sector bitmaps of differencing images, and the BAT part of `check`.

use super::Parsed;
use super::layout::*;
use crate::backing::Backing;
use crate::extent::{ExtentState, map_range_end, push_extent};
use crate::report::CheckReport;
use crate::{DiskInfo, Error, Extent, Format, Result, Subformat, VirtualDisk, check_range};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Key of the DataWriteGuid in `DiskInfo::details` (children verify their linkage
/// against it).
pub(crate) const DATA_WRITE_GUID_KEY: &str = "data write guid";

/// BATs up to this size are loaded whole at open; larger ones are paged.
const BAT_WHOLE_MAX: u64 = 32 << 20;
/// Entries per cached BAT page (512 KiB).
const BAT_PAGE: u64 = 1 << 16;
/// Pages kept before the cache is dropped.
const BAT_PAGES_CACHED: usize = 64;
/// Per-block sector bitmaps kept.
const BITMAPS_CACHED: usize = 256;

/// The block allocation table, loaded whole or paged in on demand.
#[derive(Debug)]
struct Bat {
    offset: u64,
    entries: u64,
    whole: Option<Vec<u64>>,
    pages: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

fn decode_entries(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

impl Bat {
    fn new(file: &dyn Backing, offset: u64, entries: u64) -> Result<Bat> {
        let bytes = entries.saturating_mul(8);
        let whole = if bytes <= BAT_WHOLE_MAX {
            Some(decode_entries(&file.read_vec(
                offset,
                bytes as usize,
                "VHDX BAT",
            )?))
        } else {
            None
        };
        Ok(Bat {
            offset,
            entries,
            whole,
            pages: Mutex::new(HashMap::new()),
        })
    }

    fn get(&self, file: &dyn Backing, i: u64) -> Result<u64> {
        if i >= self.entries {
            return Err(Error::corrupt(
                file.path(),
                "VHDX BAT",
                self.offset,
                format!("entry {i} beyond the {} entries", self.entries),
            ));
        }
        if let Some(w) = &self.whole {
            return Ok(w.get(i as usize).copied().unwrap_or(0));
        }
        let page = i / BAT_PAGE;
        let cached = self
            .pages
            .lock()
            .map_err(|_| Error::Invalid("vhdx: BAT cache poisoned".into()))?
            .get(&page)
            .cloned();
        let p = match cached {
            Some(p) => p,
            None => {
                let first = page * BAT_PAGE;
                let n = (self.entries - first).min(BAT_PAGE);
                let b = file.read_vec(self.offset + first * 8, (n * 8) as usize, "VHDX BAT")?;
                let p = Arc::new(decode_entries(&b));
                let mut m = self
                    .pages
                    .lock()
                    .map_err(|_| Error::Invalid("vhdx: BAT cache poisoned".into()))?;
                if m.len() >= BAT_PAGES_CACHED {
                    m.clear();
                }
                m.insert(page, p.clone());
                p
            }
        };
        Ok(p.get((i % BAT_PAGE) as usize).copied().unwrap_or(0))
    }
}

/// What one payload block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blk {
    /// Whole block stored at this file offset.
    Data(u64),
    Zero,
    /// Nothing here: zeros, or the parent's data.
    Absent,
    /// Differencing: per-sector, stored at this file offset or in the parent.
    Partial(u64),
}

/// A VHDX image open for reading.
#[derive(Debug)]
pub(crate) struct VhdxDisk {
    p: Parsed,
    path: PathBuf,
    bat: Bat,
    bitmaps: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    parent: Option<(Box<dyn VirtualDisk>, PathBuf)>,
}

impl VhdxDisk {
    pub(crate) fn new(
        p: Parsed,
        parent: Option<(Box<dyn VirtualDisk>, PathBuf)>,
    ) -> Result<VhdxDisk> {
        let bat = Bat::new(p.file.as_ref(), p.bat_region.file_offset, p.geo.bat_entries)?;
        Ok(VhdxDisk {
            path: p.file.path().to_path_buf(),
            p,
            bat,
            bitmaps: Mutex::new(HashMap::new()),
            parent,
        })
    }

    fn bs(&self) -> u64 {
        self.p.geo.block_size
    }

    /// Bytes of block `b` that lie within the virtual disk.
    fn block_len(&self, b: u64) -> u64 {
        let start = b.saturating_mul(self.bs());
        self.p.geo.virtual_size.saturating_sub(start).min(self.bs())
    }

    fn block(&self, b: u64) -> Result<Blk> {
        let idx = self.p.geo.payload_index(b);
        let e = self.bat.get(self.p.file.as_ref(), idx)?;
        let at = self.p.bat_region.file_offset + idx * 8;
        let bad = |d: String| Error::corrupt(&self.path, "VHDX BAT entry", at, d);
        let off = bat_offset(e);
        let in_file = |off: u64| -> Result<u64> {
            if off < HEADER_SECTION {
                return Err(bad(format!(
                    "block {b} has file offset {off:#x} inside the header section"
                )));
            }
            let end = off.saturating_add(self.block_len(b));
            if end > self.p.file.len() {
                return Err(bad(format!(
                    "block {b} at file offset {off:#x} extends beyond the end of the file ({:#x})",
                    self.p.file.len()
                )));
            }
            Ok(off)
        };
        match bat_state(e) {
            PAYLOAD_FULLY_PRESENT => Ok(Blk::Data(in_file(off)?)),
            PAYLOAD_ZERO => Ok(Blk::Zero),
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_V095 => {
                Ok(Blk::Absent)
            }
            PAYLOAD_PARTIALLY_PRESENT if self.p.meta.has_parent => Ok(Blk::Partial(in_file(off)?)),
            PAYLOAD_PARTIALLY_PRESENT => Err(bad(format!(
                "block {b} is PARTIALLY_PRESENT in an image without parent"
            ))),
            s => Err(bad(format!("block {b} has invalid state {s}"))),
        }
    }

    /// The sector bits (1 = in this file) of block `b`.
    fn bitmap(&self, b: u64) -> Result<Arc<Vec<u8>>> {
        let lock = || {
            self.bitmaps
                .lock()
                .map_err(|_| Error::Invalid("vhdx: bitmap cache poisoned".into()))
        };
        if let Some(v) = lock()?.get(&b) {
            return Ok(v.clone());
        }
        let g = &self.p.geo;
        let chunk = b / g.chunk_ratio;
        let idx = g.bitmap_index(chunk);
        let e = self.bat.get(self.p.file.as_ref(), idx)?;
        let at = self.p.bat_region.file_offset + idx * 8;
        if bat_state(e) != SB_PRESENT {
            return Err(Error::corrupt(
                &self.path,
                "VHDX BAT sector bitmap entry",
                at,
                format!(
                    "block {b} is PARTIALLY_PRESENT but the sector bitmap of chunk {chunk} is not present (state {})",
                    bat_state(e)
                ),
            ));
        }
        let spb = g.block_size / g.logical_sector;
        let byte = (b % g.chunk_ratio) * spb / 8;
        let off = bat_offset(e);
        if off < HEADER_SECTION || off.saturating_add(BITMAP_BLOCK_SIZE) > self.p.file.len() {
            return Err(Error::corrupt(
                &self.path,
                "VHDX BAT sector bitmap entry",
                at,
                format!("sector bitmap block at {off:#x} lies outside the file"),
            ));
        }
        let v = Arc::new(self.p.file.read_vec(
            off + byte,
            (spb / 8) as usize,
            "VHDX sector bitmap",
        )?);
        let mut m = lock()?;
        if m.len() >= BITMAPS_CACHED {
            m.clear();
        }
        m.insert(b, v.clone());
        Ok(v)
    }

    /// Runs of equal bits in `bits` within sectors `[s0, s1)`: calls `f(start, end, set)`.
    fn runs(
        bits: &[u8],
        s0: u64,
        s1: u64,
        f: &mut dyn FnMut(u64, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let bit = |s: u64| {
            bits.get((s / 8) as usize)
                .is_some_and(|x| x >> (s % 8) & 1 == 1)
        };
        let mut s = s0;
        while s < s1 {
            let v = bit(s);
            let mut e = s + 1;
            while e < s1 {
                // whole bytes of the same value at once
                if e.is_multiple_of(8) && e + 8 <= s1 {
                    let byte = bits.get((e / 8) as usize).copied().unwrap_or(0);
                    if byte == if v { 0xFF } else { 0 } {
                        e += 8;
                        continue;
                    }
                }
                if bit(e) != v {
                    break;
                }
                e += 1;
            }
            f(s, e, v)?;
            s = e;
        }
        Ok(())
    }

    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            Some((p, _)) => {
                let psize = p.virtual_size();
                let n = psize.saturating_sub(offset).min(buf.len() as u64) as usize;
                let (a, rest) = buf.split_at_mut(n);
                if !a.is_empty() {
                    p.read_at(a, offset)?;
                }
                rest.fill(0);
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn map_parent(&self, out: &mut Vec<Extent>, offset: u64, len: u64) -> Result<()> {
        let Some((p, _)) = &self.parent else {
            push_extent(out, offset, len, ExtentState::Unallocated);
            return Ok(());
        };
        let end = offset + len;
        let pend = p.virtual_size().clamp(offset, end);
        if pend > offset {
            for e in p.map(offset, pend - offset)? {
                push_extent(out, e.offset, e.length, e.state);
            }
        }
        push_extent(out, pend, end - pend, ExtentState::Unallocated);
        Ok(())
    }

    fn all_fully_present(&self) -> bool {
        (0..self.p.geo.payload_blocks).all(|b| {
            self.bat
                .get(self.p.file.as_ref(), self.p.geo.payload_index(b))
                .is_ok_and(|e| bat_state(e) == PAYLOAD_FULLY_PRESENT)
        })
    }
}

impl VirtualDisk for VhdxDisk {
    fn info(&self) -> DiskInfo {
        let m = &self.p.meta;
        let subformat = if m.has_parent {
            Subformat::Differencing
        } else if m.leave_allocated && self.all_fully_present() {
            Subformat::Fixed
        } else {
            Subformat::Dynamic
        };
        let h = &self.p.header;
        let mut details = vec![
            ("creator".to_string(), self.p.creator.clone()),
            (
                "disk id".to_string(),
                m.page83.map_or("(none)".to_string(), |g| g.to_string()),
            ),
            (
                DATA_WRITE_GUID_KEY.to_string(),
                h.data_write_guid.to_string(),
            ),
            ("file write guid".to_string(), h.file_write_guid.to_string()),
            ("header sequence".to_string(), h.sequence.to_string()),
            ("log".to_string(), self.p.log_state.clone()),
            (
                "chunk ratio".to_string(),
                self.p.geo.chunk_ratio.to_string(),
            ),
            (
                "leave blocks allocated".to_string(),
                m.leave_allocated.to_string(),
            ),
        ];
        if let Some((_, path)) = &self.parent {
            details.push(("parent path".to_string(), path.display().to_string()));
        }
        DiskInfo {
            path: self.path.clone(),
            format: Format::Vhdx,
            subformat,
            virtual_size: m.virtual_size,
            logical_sector_size: m.logical_sector,
            physical_sector_size: m.physical_sector,
            block_size: Some(self.bs()),
            file_size: self.p.file.len(),
            allocated_bytes: self.p.file.allocated_bytes(),
            details,
            parent: self.parent.as_ref().map(|(p, _)| Box::new(p.info())),
        }
    }

    fn virtual_size(&self) -> u64 {
        self.p.geo.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.virtual_size())?;
        let bs = self.bs();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let bstart = b * bs;
            let bend = (bstart + bs).min(end);
            let blk = self.block(b)?;
            // Extend the run over following blocks that continue it.
            let mut run_end = bend;
            while run_end < end {
                let nb = run_end / bs;
                let next = self.block(nb)?;
                let continues = match (blk, next) {
                    (Blk::Data(f0), Blk::Data(f)) => f == f0 + (nb - b) * bs,
                    (Blk::Zero, Blk::Zero) | (Blk::Absent, Blk::Absent) => true,
                    _ => false,
                };
                if !continues {
                    break;
                }
                run_end = (run_end + bs).min(end);
            }
            let dst = buf
                .get_mut((pos - offset) as usize..(run_end - offset) as usize)
                .ok_or_else(|| Error::Invalid("vhdx: read range".into()))?;
            match blk {
                Blk::Data(f) => {
                    self.p
                        .file
                        .read_exact_at(dst, f + (pos - bstart), "VHDX payload block")?
                }
                Blk::Zero => dst.fill(0),
                Blk::Absent => self.read_parent(dst, pos)?,
                Blk::Partial(f) => {
                    let ss = self.p.geo.logical_sector;
                    let bits = self.bitmap(b)?;
                    let s0 = (pos - bstart) / ss;
                    let s1 = (run_end - bstart).div_ceil(ss);
                    Self::runs(&bits, s0, s1, &mut |sa, sb, set| {
                        let a = (bstart + sa * ss).max(pos);
                        let z = (bstart + sb * ss).min(run_end);
                        let d = dst
                            .get_mut((a - pos) as usize..(z - pos) as usize)
                            .ok_or_else(|| Error::Invalid("vhdx: read range".into()))?;
                        if set {
                            self.p
                                .file
                                .read_exact_at(d, f + (a - bstart), "VHDX payload block")
                        } else {
                            self.read_parent(d, a)
                        }
                    })?;
                }
            }
            pos = run_end;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = map_range_end(offset, length, self.virtual_size())?;
        let bs = self.bs();
        let mut out = Vec::new();
        // Consecutive ranges that come from the parent are mapped in one call.
        let mut from_parent: Option<(u64, u64)> = None;
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let bstart = b * bs;
            let bend = (bstart + bs).min(end);
            let own = |out: &mut Vec<Extent>,
                       fp: &mut Option<(u64, u64)>,
                       a: u64,
                       z: u64,
                       st: Option<ExtentState>|
             -> Result<()> {
                match st {
                    None => match fp {
                        Some((_, pe)) if *pe == a => *pe = z,
                        _ => {
                            if let Some((ps, pe)) = fp.take() {
                                self.map_parent(out, ps, pe - ps)?;
                            }
                            *fp = Some((a, z));
                        }
                    },
                    Some(s) => {
                        if let Some((ps, pe)) = fp.take() {
                            self.map_parent(out, ps, pe - ps)?;
                        }
                        push_extent(out, a, z - a, s);
                    }
                }
                Ok(())
            };
            match self.block(b)? {
                Blk::Data(_) => own(
                    &mut out,
                    &mut from_parent,
                    pos,
                    bend,
                    Some(ExtentState::Data),
                )?,
                Blk::Zero => own(
                    &mut out,
                    &mut from_parent,
                    pos,
                    bend,
                    Some(ExtentState::Zero),
                )?,
                Blk::Absent if self.parent.is_some() => {
                    own(&mut out, &mut from_parent, pos, bend, None)?
                }
                Blk::Absent => own(
                    &mut out,
                    &mut from_parent,
                    pos,
                    bend,
                    Some(ExtentState::Unallocated),
                )?,
                Blk::Partial(_) => {
                    let ss = self.p.geo.logical_sector;
                    let bits = self.bitmap(b)?;
                    let s0 = (pos - bstart) / ss;
                    let s1 = (bend - bstart).div_ceil(ss);
                    Self::runs(&bits, s0, s1, &mut |sa, sb, set| {
                        let a = (bstart + sa * ss).max(pos);
                        let z = (bstart + sb * ss).min(bend);
                        own(
                            &mut out,
                            &mut from_parent,
                            a,
                            z,
                            set.then_some(ExtentState::Data),
                        )
                    })?;
                }
            }
            pos = bend;
        }
        if let Some((ps, pe)) = from_parent {
            self.map_parent(&mut out, ps, pe - ps)?;
        }
        Ok(out)
    }
}

/// Most allocated blocks compared for overlaps (24 bytes each).
const MAX_TRACKED: usize = 1 << 22;

/// Most problems of one kind listed individually.
const MAX_LISTED: usize = 50;

/// Checks every BAT entry: states, reserved bits, blocks inside the file and not
/// overlapping metadata structures or each other.
pub(crate) fn check_bat(p: &Parsed, report: &mut CheckReport) {
    let file = p.file.as_ref();
    let g = &p.geo;
    let file_len = file.len();
    let mut meta_areas: Vec<(&str, u64, u64)> = vec![
        ("header section", 0, HEADER_SECTION),
        (
            "BAT region",
            p.bat_region.file_offset,
            p.bat_region.file_offset + u64::from(p.bat_region.length),
        ),
        (
            "metadata region",
            p.meta_region.file_offset,
            p.meta_region.file_offset + u64::from(p.meta_region.length),
        ),
    ];
    if p.header.log_length > 0 {
        meta_areas.push((
            "log",
            p.header.log_offset,
            p.header
                .log_offset
                .saturating_add(u64::from(p.header.log_length)),
        ));
    }
    // Allocations to compare for overlaps; bounded by the number of MiB in the file.
    let max_alloc = (file_len / MIB) as usize + 1;
    let mut allocs: Vec<(u64, u64, u64)> = Vec::new();
    let mut untracked = 0u64;
    let mut listed = 0usize;
    let mut more = 0usize;
    let mut problem = |report: &mut CheckReport, at: u64, d: String| {
        if listed < MAX_LISTED {
            listed += 1;
            report.error("VHDX BAT entry", Some(at), d);
        } else {
            more += 1;
        }
    };
    let mut counts = [0u64; 8];
    let page_entries = BAT_PAGE;
    let mut first = 0u64;
    while first < g.bat_entries {
        let n = (g.bat_entries - first).min(page_entries);
        let base = p.bat_region.file_offset + first * 8;
        let b = match file.read_vec(base, (n * 8) as usize, "VHDX BAT") {
            Ok(b) => b,
            Err(e) => {
                report.from_error("VHDX BAT", &e);
                return;
            }
        };
        for (k, e) in decode_entries(&b).into_iter().enumerate() {
            let i = first + k as u64;
            let at = base + k as u64 * 8;
            let state = bat_state(e);
            let off = bat_offset(e);
            let is_bitmap = (i + 1).is_multiple_of(g.chunk_ratio + 1);
            if bat_reserved(e) != 0 {
                problem(
                    report,
                    at,
                    format!("entry {i}: reserved bits set ({e:#018x})"),
                );
            }
            let (len, needs_file) = if is_bitmap {
                match state {
                    SB_NOT_PRESENT => (0, false),
                    SB_PRESENT => {
                        if !p.meta.has_parent {
                            report.warning(
                                "VHDX BAT entry",
                                Some(at),
                                format!(
                                    "entry {i}: sector bitmap present in an image without parent"
                                ),
                            );
                        }
                        (BITMAP_BLOCK_SIZE, true)
                    }
                    s => {
                        problem(
                            report,
                            at,
                            format!("entry {i}: invalid sector bitmap state {s}"),
                        );
                        continue;
                    }
                }
            } else {
                let blk = i - i / (g.chunk_ratio + 1);
                let blen = g
                    .virtual_size
                    .saturating_sub(blk * g.block_size)
                    .min(g.block_size);
                if let Some(c) = counts.get_mut(state as usize) {
                    *c += 1;
                }
                match state {
                    PAYLOAD_FULLY_PRESENT => (blen, true),
                    PAYLOAD_PARTIALLY_PRESENT if p.meta.has_parent => (blen, true),
                    PAYLOAD_PARTIALLY_PRESENT => {
                        problem(
                            report,
                            at,
                            format!(
                                "entry {i} (block {blk}): PARTIALLY_PRESENT in an image without parent"
                            ),
                        );
                        continue;
                    }
                    PAYLOAD_NOT_PRESENT
                    | PAYLOAD_UNDEFINED
                    | PAYLOAD_ZERO
                    | PAYLOAD_UNMAPPED
                    | PAYLOAD_UNMAPPED_V095 => (if off != 0 { blen } else { 0 }, false),
                    s => {
                        problem(
                            report,
                            at,
                            format!("entry {i} (block {blk}): invalid payload state {s}"),
                        );
                        continue;
                    }
                }
            };
            if len == 0 {
                continue;
            }
            let end = off.saturating_add(len);
            if needs_file && end > file_len {
                problem(
                    report,
                    at,
                    format!(
                        "entry {i}: block at file offset {off:#x} extends beyond the end of the file ({file_len:#x})"
                    ),
                );
                continue;
            }
            if let Some(m) = meta_areas.iter().find(|m| off < m.2 && m.1 < end) {
                problem(
                    report,
                    at,
                    format!(
                        "entry {i}: block at file offset {off:#x} overlaps the {} {:#x}..{:#x}",
                        m.0, m.1, m.2
                    ),
                );
                continue;
            }
            if allocs.len() >= MAX_TRACKED {
                untracked += 1;
            } else if allocs.len() < max_alloc {
                allocs.push((off, end, i));
            } else {
                problem(
                    report,
                    at,
                    format!("entry {i}: more allocated blocks than the file can hold"),
                );
            }
        }
        first += n;
    }
    allocs.sort_unstable();
    let mut prev: Option<(u64, u64, u64)> = None;
    for a in allocs {
        if let Some(pv) = prev
            && a.0 < pv.1
        {
            let at = p.bat_region.file_offset + a.2 * 8;
            problem(
                report,
                at,
                format!(
                    "entry {}: block at {:#x} overlaps the block of entry {} at {:#x}",
                    a.2, a.0, pv.2, pv.0
                ),
            );
        }
        if prev.is_none_or(|pv| a.1 > pv.1) {
            prev = Some(a);
        }
    }
    if untracked > 0 {
        report.warning(
            "VHDX BAT",
            Some(p.bat_region.file_offset),
            format!(
                "{untracked} blocks beyond the first {MAX_TRACKED} were not checked for overlaps"
            ),
        );
    }
    if more > 0 {
        report.error(
            "VHDX BAT",
            Some(p.bat_region.file_offset),
            format!("{more} more BAT problems not listed"),
        );
    }
    report.checked(format!(
        "BAT: {} entries ({} payload blocks: {} fully present, {} partially present, {} zero, {} not present/unmapped)",
        g.bat_entries,
        g.payload_blocks,
        counts[6],
        counts[7],
        counts[2],
        counts[0] + counts[1] + counts[3] + counts[5]
    ));
}
