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
    let mut c = BatCheck::new(p);
    let mut first = 0u64;
    while first < g.bat_entries {
        let n = (g.bat_entries - first).min(BAT_PAGE);
        let base = p.bat_region.file_offset + first * 8;
        let b = match file.read_vec(base, (n * 8) as usize, "VHDX BAT") {
            Ok(b) => b,
            Err(e) => {
                report.from_error("VHDX BAT", &e);
                return;
            }
        };
        for (k, e) in decode_entries(&b).into_iter().enumerate() {
            c.entry(report, first + k as u64, base + k as u64 * 8, e);
        }
        first += n;
    }
    c.overlaps(report);
    c.summary(report);
}

/// The state of [`check_bat`] while it walks the entries.
struct BatCheck<'a> {
    p: &'a Parsed,
    file_len: u64,
    /// Metadata structures no block may overlap: (name, start, end).
    meta_areas: Vec<(&'static str, u64, u64)>,
    /// Allocations to compare for overlaps; bounded by the number of MiB in the file.
    max_alloc: usize,
    /// (start, end, entry index) of the allocated blocks.
    allocs: Vec<(u64, u64, u64)>,
    untracked: u64,
    listed: usize,
    more: usize,
    /// Payload entries by state.
    counts: [u64; 8],
}

impl<'a> BatCheck<'a> {
    fn new(p: &'a Parsed) -> Self {
        let file_len = p.file.len();
        let mut meta_areas: Vec<(&'static str, u64, u64)> = vec![
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
        BatCheck {
            p,
            file_len,
            meta_areas,
            max_alloc: (file_len / MIB) as usize + 1,
            allocs: Vec::new(),
            untracked: 0,
            listed: 0,
            more: 0,
            counts: [0; 8],
        }
    }

    /// Records a damaged entry; past [`MAX_LISTED`] only counts it.
    fn problem(&mut self, report: &mut CheckReport, at: u64, d: String) {
        if self.listed < MAX_LISTED {
            self.listed += 1;
            report.error("VHDX BAT entry", Some(at), d);
        } else {
            self.more += 1;
        }
    }

    /// Checks entry `i` (at file offset `at`) and tracks its block for the overlap check.
    fn entry(&mut self, report: &mut CheckReport, i: u64, at: u64, e: u64) {
        let off = bat_offset(e);
        if bat_reserved(e) != 0 {
            self.problem(
                report,
                at,
                format!("entry {i}: reserved bits set ({e:#018x})"),
            );
        }
        let Some((len, needs_file)) = self.block_of(report, i, at, e) else {
            return;
        };
        if len == 0 {
            return;
        }
        let file_len = self.file_len;
        let end = off.saturating_add(len);
        if needs_file && end > file_len {
            self.problem(
                report,
                at,
                format!(
                    "entry {i}: block at file offset {off:#x} extends beyond the end of the file ({file_len:#x})"
                ),
            );
            return;
        }
        if let Some(&m) = self.meta_areas.iter().find(|m| off < m.2 && m.1 < end) {
            self.problem(
                report,
                at,
                format!(
                    "entry {i}: block at file offset {off:#x} overlaps the {} {:#x}..{:#x}",
                    m.0, m.1, m.2
                ),
            );
            return;
        }
        if self.allocs.len() >= MAX_TRACKED {
            self.untracked += 1;
        } else if self.allocs.len() < self.max_alloc {
            self.allocs.push((off, end, i));
        } else {
            self.problem(
                report,
                at,
                format!("entry {i}: more allocated blocks than the file can hold"),
            );
        }
    }

    /// The length of the block entry `i` points at and whether it must lie in the
    /// file; `None` when the state is invalid (reported).
    fn block_of(
        &mut self,
        report: &mut CheckReport,
        i: u64,
        at: u64,
        e: u64,
    ) -> Option<(u64, bool)> {
        let p = self.p;
        let g = &p.geo;
        let state = bat_state(e);
        let off = bat_offset(e);
        let is_bitmap = (i + 1).is_multiple_of(g.chunk_ratio + 1);
        if is_bitmap {
            return match state {
                SB_NOT_PRESENT => Some((0, false)),
                SB_PRESENT => {
                    if !p.meta.has_parent {
                        report.warning(
                            "VHDX BAT entry",
                            Some(at),
                            format!("entry {i}: sector bitmap present in an image without parent"),
                        );
                    }
                    Some((BITMAP_BLOCK_SIZE, true))
                }
                s => {
                    self.problem(
                        report,
                        at,
                        format!("entry {i}: invalid sector bitmap state {s}"),
                    );
                    None
                }
            };
        }
        let blk = i - i / (g.chunk_ratio + 1);
        let blen = g
            .virtual_size
            .saturating_sub(blk * g.block_size)
            .min(g.block_size);
        if let Some(c) = self.counts.get_mut(state as usize) {
            *c += 1;
        }
        match state {
            PAYLOAD_FULLY_PRESENT => Some((blen, true)),
            PAYLOAD_PARTIALLY_PRESENT if p.meta.has_parent => Some((blen, true)),
            PAYLOAD_PARTIALLY_PRESENT => {
                self.problem(
                    report,
                    at,
                    format!(
                        "entry {i} (block {blk}): PARTIALLY_PRESENT in an image without parent"
                    ),
                );
                None
            }
            PAYLOAD_NOT_PRESENT
            | PAYLOAD_UNDEFINED
            | PAYLOAD_ZERO
            | PAYLOAD_UNMAPPED
            | PAYLOAD_UNMAPPED_V095 => Some((if off != 0 { blen } else { 0 }, false)),
            s => {
                self.problem(
                    report,
                    at,
                    format!("entry {i} (block {blk}): invalid payload state {s}"),
                );
                None
            }
        }
    }

    /// Reports blocks that overlap each other.
    fn overlaps(&mut self, report: &mut CheckReport) {
        let mut allocs = std::mem::take(&mut self.allocs);
        allocs.sort_unstable();
        let mut prev: Option<(u64, u64, u64)> = None;
        for a in allocs {
            if let Some(pv) = prev
                && a.0 < pv.1
            {
                let at = self.p.bat_region.file_offset + a.2 * 8;
                self.problem(
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
    }

    /// What was left unchecked or unlisted, and what was checked.
    fn summary(&self, report: &mut CheckReport) {
        let (p, g, counts) = (self.p, &self.p.geo, &self.counts);
        if self.untracked > 0 {
            report.warning(
                "VHDX BAT",
                Some(p.bat_region.file_offset),
                format!(
                    "{} blocks beyond the first {MAX_TRACKED} were not checked for overlaps",
                    self.untracked
                ),
            );
        }
        if self.more > 0 {
            report.error(
                "VHDX BAT",
                Some(p.bat_region.file_offset),
                format!("{} more BAT problems not listed", self.more),
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
}
