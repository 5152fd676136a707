//! `check` for qcow2, mirroring `qemu-img check`: every metadata structure and L2
//! entry is validated, references to host clusters are counted (memory: 5 bytes per
//! host cluster, bounded by the file length) and compared with the stored refcounts.

use super::{
    COMPRESSED, COPIED, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFFSET_MASK, ZERO, decode_u64s,
    open_backing_file, parse_header, read_l1, read_table,
};
use crate::backing::{Backing, be};
use crate::report::CheckReport;
use crate::{Error, OpenCtx};
use std::sync::Arc;

/// Largest number of host clusters the refcount walk tracks (160 MiB of arrays).
const MAX_TRACKED: u64 = 1 << 25;
/// Individual problems reported per category before only counting them.
const MAX_REPORTED: usize = 50;
/// QEMU's limits on the snapshot table and the bitmap directory.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_DIR_BYTES: u64 = 64 << 20;

/// Who uses a host cluster, for overlap reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Owner {
    None = 0,
    Header,
    L1,
    RefTable,
    RefBlock,
    L2,
    Data,
    Compressed,
    Snapshots,
    Bitmaps,
}

impl Owner {
    fn name(self) -> &'static str {
        match self {
            Owner::None => "nothing",
            Owner::Header => "the header",
            Owner::L1 => "an L1 table",
            Owner::RefTable => "the refcount table",
            Owner::RefBlock => "a refcount block",
            Owner::L2 => "an L2 table",
            Owner::Data => "a data cluster",
            Owner::Compressed => "compressed data",
            Owner::Snapshots => "the snapshot table",
            Owner::Bitmaps => "bitmap metadata",
        }
    }
    fn from_u8(v: u8) -> Owner {
        match v {
            1 => Owner::Header,
            2 => Owner::L1,
            3 => Owner::RefTable,
            4 => Owner::RefBlock,
            5 => Owner::L2,
            6 => Owner::Data,
            7 => Owner::Compressed,
            8 => Owner::Snapshots,
            9 => Owner::Bitmaps,
            _ => Owner::None,
        }
    }
}

struct Walk<'a> {
    file: &'a dyn Backing,
    h: &'a Header,
    cs: u64,
    file_len: u64,
    /// References counted per host cluster.
    refs: Vec<u16>,
    /// Refcounts stored in the image.
    stored: Vec<u16>,
    owner: Vec<u8>,
    report: &'a mut CheckReport,
    errors: usize,
    warnings: usize,
}

impl Walk<'_> {
    fn error(&mut self, structure: &str, offset: Option<u64>, detail: String) {
        self.errors += 1;
        if self.errors <= MAX_REPORTED {
            self.report.error(structure, offset, detail);
        }
    }

    fn warn(&mut self, structure: &str, offset: Option<u64>, detail: String) {
        self.warnings += 1;
        if self.warnings <= MAX_REPORTED {
            self.report.warning(structure, offset, detail);
        }
    }

    /// Counts a reference to the host range `[off, off+len)`. `owner` is `Some` for
    /// structures of the active image, which must not share clusters.
    fn mark(&mut self, off: u64, len: u64, owner: Option<Owner>) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = (off.saturating_add(len - 1) / self.cs).min(self.refs.len() as u64);
        let mut overlap: Option<(u64, Owner)> = None;
        for c in first..=last {
            let i = c as usize;
            let Some(r) = self.refs.get_mut(i) else { break };
            *r = r.saturating_add(1);
            if let (Some(o), Some(prev)) = (owner, self.owner.get_mut(i)) {
                let p = Owner::from_u8(*prev);
                if p != Owner::None && !(p == Owner::Compressed && o == Owner::Compressed) {
                    overlap.get_or_insert((c, p));
                }
                *prev = o as u8;
            }
        }
        if let (Some((c, p)), Some(o)) = (overlap, owner) {
            self.error(
                o.name(),
                Some(off),
                format!(
                    "overlaps {} in host cluster at {:#x}",
                    p.name(),
                    c * self.cs
                ),
            );
        }
    }

    /// Validates a cluster-sized structure's offset; true when it can be read.
    fn table_ok(&mut self, structure: &str, off: u64, len: u64, at: u64) -> bool {
        if !off.is_multiple_of(self.cs) {
            self.error(
                structure,
                Some(at),
                format!("offset {off:#x} not cluster-aligned"),
            );
            return false;
        }
        if off.checked_add(len).is_none_or(|e| e > self.file_len) {
            self.error(
                structure,
                Some(at),
                format!(
                    "at {off:#x} (+{len:#x}) beyond the end of the file ({:#x})",
                    self.file_len
                ),
            );
            return false;
        }
        true
    }

    /// Stored refcount of the cluster holding `off`, when known.
    fn stored_of(&self, off: u64) -> Option<u16> {
        self.stored.get((off / self.cs) as usize).copied()
    }

    fn check_copied(&mut self, structure: &str, at: u64, entry: u64, target: u64) {
        if self.stored.is_empty() {
            return;
        }
        let Some(rc) = self.stored_of(target) else {
            return;
        };
        let copied = entry & COPIED != 0;
        if copied != (rc == 1) {
            self.error(
                structure,
                Some(at),
                format!(
                    "COPIED flag is {} but the refcount of {target:#x} is {rc}",
                    copied as u8
                ),
            );
        }
    }

    /// Loads the stored refcounts (refcount table and blocks).
    fn load_refcounts(&mut self) {
        let h = self.h;
        let rt_off = h.refcount_table_offset;
        let rt_len = u64::from(h.refcount_table_clusters) * self.cs;
        self.mark(rt_off, rt_len, Some(Owner::RefTable));
        if !self.table_ok("refcount table", rt_off, rt_len, 48) || rt_len / 8 > u64::from(u32::MAX)
        {
            return;
        }
        let table = match read_table(self.file, rt_off, (rt_len / 8) as u32, "refcount table") {
            Ok(t) => t,
            Err(e) => {
                self.error("refcount table", Some(rt_off), e.to_string());
                return;
            }
        };
        let bits = 1u64 << h.refcount_order;
        let per_block = self.cs * 8 / bits;
        let mut blocks = 0;
        for (i, &e) in table.iter().enumerate() {
            let at = rt_off + i as u64 * 8;
            let off = e & !0x1ff;
            if e & 0x1ff != 0 {
                self.error(
                    "refcount table entry",
                    Some(at),
                    format!("reserved bits set in {e:#x}"),
                );
            }
            if off == 0 {
                continue;
            }
            self.mark(off, self.cs, Some(Owner::RefBlock));
            if !self.table_ok("refcount block", off, self.cs, at) {
                continue;
            }
            let first = i as u64 * per_block;
            if first >= self.stored.len() as u64 {
                continue;
            }
            let raw = match self.file.read_vec(off, self.cs as usize, "refcount block") {
                Ok(r) => r,
                Err(e) => {
                    self.error("refcount block", Some(off), e.to_string());
                    continue;
                }
            };
            blocks += 1;
            for j in 0..per_block {
                let Some(slot) = self.stored.get_mut((first + j) as usize) else {
                    break;
                };
                let v = refcount_at(&raw, j, h.refcount_order);
                *slot = u16::try_from(v).unwrap_or(u16::MAX);
            }
        }
        self.report.checked(format!(
            "refcount table at {rt_off:#x}: {} entries, {blocks} refcount blocks of {bits}-bit refcounts",
            table.len()
        ));
    }

    /// Walks an L1 table and its L2 tables. `active` marks overlap-tracked structures
    /// (snapshots share clusters with the active image legitimately).
    fn walk_l1(&mut self, l1: &[u64], l1_off: u64, active: bool) -> [u64; 4] {
        let (mut tables, mut data, mut compressed, mut zero) = (0u64, 0u64, 0u64, 0u64);
        let h = self.h;
        let l2_own = active.then_some(Owner::L2);
        for (i, &e) in l1.iter().enumerate() {
            let at = l1_off + i as u64 * 8;
            if e & !(OFFSET_MASK | COPIED) != 0 {
                self.error("L1 entry", Some(at), format!("reserved bits set in {e:#x}"));
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            self.mark(off, self.cs, l2_own);
            if active {
                self.check_copied("L1 entry", at, e, off);
            }
            if !self.table_ok("L2 table", off, self.cs, at) {
                continue;
            }
            let raw = match self.file.read_vec(off, self.cs as usize, "L2 table") {
                Ok(r) => r,
                Err(err) => {
                    self.error("L2 table", Some(off), err.to_string());
                    continue;
                }
            };
            tables += 1;
            let entries = decode_u64s(&raw);
            let step = if h.extended_l2 { 2 } else { 1 };
            for (j, pair) in entries.chunks(step).enumerate() {
                let ent = pair.first().copied().unwrap_or(0);
                let bitmap = pair.get(1).copied().unwrap_or(0);
                let eat = off + (j * step * 8) as u64;
                if ent & COMPRESSED != 0 {
                    compressed += 1;
                    let (coff, clen) = h.compressed_range(ent);
                    if h.extended_l2 && bitmap != 0 {
                        self.error(
                            "L2 entry",
                            Some(eat),
                            "compressed cluster with a subcluster bitmap".into(),
                        );
                    }
                    if coff.saturating_add(clen).saturating_sub(self.file_len) >= self.cs
                        || coff >= self.file_len
                    {
                        self.error(
                            "compressed cluster",
                            Some(eat),
                            format!(
                                "data at {coff:#x} (+{clen}) beyond the end of the file ({:#x})",
                                self.file_len
                            ),
                        );
                        continue;
                    }
                    self.mark(coff, clen, active.then_some(Owner::Compressed));
                    continue;
                }
                let host = ent & OFFSET_MASK;
                let reserved = ent & !(OFFSET_MASK | COPIED | ZERO);
                if reserved != 0 {
                    self.error(
                        "L2 entry",
                        Some(eat),
                        format!("reserved bits set in {ent:#x}"),
                    );
                }
                if h.extended_l2 {
                    if ent & ZERO != 0 {
                        self.error(
                            "L2 entry",
                            Some(eat),
                            "zero flag set with extended L2 entries".into(),
                        );
                    }
                    let both = (bitmap & 0xffff_ffff) & (bitmap >> 32);
                    if both != 0 {
                        self.error(
                            "L2 subcluster bitmap",
                            Some(eat + 8),
                            format!("subclusters both allocated and zero: {both:#x}"),
                        );
                    }
                    if host == 0 && bitmap & 0xffff_ffff != 0 {
                        self.error(
                            "L2 subcluster bitmap",
                            Some(eat + 8),
                            "allocated subclusters in an unallocated cluster".into(),
                        );
                    }
                    if bitmap >> 32 != 0 {
                        zero += 1;
                    }
                } else if ent & ZERO != 0 {
                    if h.version < 3 {
                        self.error(
                            "L2 entry",
                            Some(eat),
                            "zero cluster flag in a version 2 image".into(),
                        );
                    }
                    zero += 1;
                }
                if host == 0 {
                    continue;
                }
                data += 1;
                if !host.is_multiple_of(self.cs) {
                    self.error(
                        "L2 entry",
                        Some(eat),
                        format!("data cluster offset {host:#x} not cluster-aligned"),
                    );
                    continue;
                }
                if host >= self.file_len {
                    self.error(
                        "L2 entry",
                        Some(eat),
                        format!(
                            "data cluster at {host:#x} beyond the end of the file ({:#x})",
                            self.file_len
                        ),
                    );
                    continue;
                }
                self.mark(host, self.cs, active.then_some(Owner::Data));
                if active {
                    self.check_copied("L2 entry", eat, ent, host);
                }
            }
        }
        [tables, data, compressed, zero]
    }

    /// Counts references from internal snapshots (table, their L1 and L2 tables, data).
    fn walk_snapshots(&mut self) {
        let h = self.h;
        if h.nb_snapshots == 0 {
            return;
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            self.error(
                "snapshot table",
                Some(60),
                format!("{} snapshots (more than {MAX_SNAPSHOTS})", h.nb_snapshots),
            );
            return;
        }
        let mut pos = h.snapshots_offset;
        if !pos.is_multiple_of(self.cs) {
            self.error(
                "snapshot table",
                Some(64),
                format!("offset {pos:#x} not cluster-aligned"),
            );
            return;
        }
        let mut l1s = Vec::new();
        for n in 0..h.nb_snapshots {
            let mut e = [0u8; 40];
            if let Err(err) = self.file.read_exact_at(&mut e, pos, "snapshot table entry") {
                self.error("snapshot table", Some(pos), err.to_string());
                return;
            }
            let (l1_off, l1_size) = (be::u64(&e, 0), be::u32(&e, 8));
            let (id, name, extra) = (be::u16(&e, 12), be::u16(&e, 14), be::u32(&e, 36));
            l1s.push((n, l1_off, l1_size));
            let len = 40 + u64::from(extra) + u64::from(id) + u64::from(name);
            pos = pos.saturating_add(len.next_multiple_of(8));
            if pos - h.snapshots_offset > MAX_DIR_BYTES {
                self.error(
                    "snapshot table",
                    Some(h.snapshots_offset),
                    "larger than 64 MiB".into(),
                );
                return;
            }
        }
        self.mark(
            h.snapshots_offset,
            pos - h.snapshots_offset,
            Some(Owner::Snapshots),
        );
        for (n, l1_off, l1_size) in l1s {
            self.mark(l1_off, u64::from(l1_size) * 8, Some(Owner::L1));
            match read_table(self.file, l1_off, l1_size, "snapshot L1 table") {
                Ok(l1) => {
                    self.walk_l1(&l1, l1_off, false);
                }
                Err(e) => self.error(
                    "snapshot L1 table",
                    Some(l1_off),
                    format!("snapshot {n}: {e}"),
                ),
            }
        }
        self.report.checked(format!(
            "{} internal snapshots: tables walked",
            h.nb_snapshots
        ));
    }

    /// Counts references from persistent bitmaps (directory, bitmap tables, data).
    fn walk_bitmaps(&mut self) {
        let Some(b) = self.h.bitmaps else { return };
        if b.dir_size > MAX_DIR_BYTES {
            self.error(
                "bitmap directory",
                Some(b.dir_offset),
                format!("size {} above 64 MiB", b.dir_size),
            );
            return;
        }
        if !self.table_ok("bitmap directory", b.dir_offset, b.dir_size, b.dir_offset) {
            return;
        }
        self.mark(b.dir_offset, b.dir_size, Some(Owner::Bitmaps));
        let dir = match self
            .file
            .read_vec(b.dir_offset, b.dir_size as usize, "bitmap directory")
        {
            Ok(d) => d,
            Err(e) => {
                self.error("bitmap directory", Some(b.dir_offset), e.to_string());
                return;
            }
        };
        let mut pos = 0usize;
        for _ in 0..b.nb_bitmaps {
            if pos + 24 > dir.len() {
                self.error(
                    "bitmap directory",
                    Some(b.dir_offset),
                    "fewer entries than announced".into(),
                );
                return;
            }
            let (t_off, t_size) = (be::u64(&dir, pos), be::u32(&dir, pos + 8));
            let (name, extra) = (be::u16(&dir, pos + 18), be::u32(&dir, pos + 20));
            pos += (24 + extra as usize + name as usize).next_multiple_of(8);
            self.mark(t_off, u64::from(t_size) * 8, Some(Owner::Bitmaps));
            let table = match read_table(self.file, t_off, t_size, "bitmap table") {
                Ok(t) => t,
                Err(e) => {
                    self.error("bitmap table", Some(t_off), e.to_string());
                    continue;
                }
            };
            for (i, &e) in table.iter().enumerate() {
                let off = e & OFFSET_MASK;
                if off != 0 && self.table_ok("bitmap data", off, self.cs, t_off + i as u64 * 8) {
                    self.mark(off, self.cs, Some(Owner::Bitmaps));
                }
            }
        }
        self.report.checked(format!(
            "{} persistent bitmaps: tables walked",
            b.nb_bitmaps
        ));
    }
}

/// Refcount number `i` of a refcount block with 2^order-bit entries.
fn refcount_at(block: &[u8], i: u64, order: u32) -> u64 {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let byte = block.get(bit / 8).copied().unwrap_or(0);
            u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block.get(i).copied().unwrap_or(0)),
        4 => u64::from(be::u16(block, i * 2)),
        5 => u64::from(be::u32(block, i * 4)),
        _ => be::u64(block, i * 8),
    }
}

/// Checks a qcow2 image (see the module documentation).
pub(crate) fn check(file: Arc<dyn Backing>, ctx: &OpenCtx, report: &mut CheckReport) {
    let h = match parse_header(file.as_ref()) {
        Ok(h) => h,
        Err(e @ Error::Unsupported { .. }) => {
            report.warning("qcow2 header", None, format!("cannot check: {e}"));
            return;
        }
        Err(e) => {
            report.from_error("qcow2 header", &e);
            return;
        }
    };
    let cs = h.cluster_size();
    report.checked(format!(
        "header: qcow2 v{}, {} KiB clusters, virtual size {}, L1 of {} entries at {:#x}",
        h.version,
        cs >> 10,
        h.size,
        h.l1_size,
        h.l1_offset
    ));
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        report.warning(
            "qcow2 header",
            Some(72),
            "the image is marked corrupt by QEMU",
        );
    }
    if h.incompatible & INCOMPAT_DIRTY != 0 {
        report.warning(
            "qcow2 header",
            Some(72),
            "dirty flag set: refcounts may be stale (leaks expected)",
        );
    }
    let l1 = match read_l1(file.as_ref(), &h) {
        Ok(l) => l,
        Err(e) => {
            report.from_error("L1 table", &e);
            return;
        }
    };
    let file_len = file.len();
    let clusters = file_len.div_ceil(cs);
    let track = clusters <= MAX_TRACKED;
    let n = if track { clusters as usize } else { 0 };
    let mut w = Walk {
        file: file.as_ref(),
        h: &h,
        cs,
        file_len,
        refs: vec![0; n],
        stored: vec![0; n],
        owner: vec![0; n],
        report,
        errors: 0,
        warnings: 0,
    };
    if !track {
        w.warn(
            "refcounts",
            None,
            format!("{clusters} host clusters: too many for the refcount walk; skipped"),
        );
    }
    w.mark(0, cs, Some(Owner::Header));
    w.mark(h.l1_offset, u64::from(h.l1_size) * 8, Some(Owner::L1));
    w.load_refcounts();
    let [tables, data, compressed, zero] = w.walk_l1(&l1, h.l1_offset, true);
    w.report.checked(format!(
        "L1/L2: {tables} L2 tables, {data} data clusters, {compressed} compressed, {zero} zero"
    ));
    w.walk_snapshots();
    w.walk_bitmaps();

    if track {
        let (mut leaks, mut first_leak) = (0u64, None);
        for i in 0..w.refs.len() {
            let c = w.refs.get(i).copied().unwrap_or(0);
            let s = w.stored.get(i).copied().unwrap_or(0);
            let off = i as u64 * cs;
            if s < c {
                w.error(
                    "refcount",
                    Some(off),
                    format!("cluster refcount {s} is lower than its {c} references"),
                );
            } else if s > c {
                leaks += 1;
                first_leak.get_or_insert(off);
            }
        }
        if leaks > 0 {
            w.warn(
                "refcount",
                first_leak,
                format!("{leaks} leaked clusters (refcount above the references; space wasted, data intact)"),
            );
        }
        w.report.checked(format!(
            "refcounts of {clusters} host clusters compared with the references"
        ));
    }
    let (errors, warnings) = (w.errors, w.warnings);
    if errors > MAX_REPORTED {
        report.error(
            "qcow2",
            None,
            format!("{} more errors not listed", errors - MAX_REPORTED),
        );
    }
    if warnings > MAX_REPORTED {
        report.warning(
            "qcow2",
            None,
            format!("{} more warnings not listed", warnings - MAX_REPORTED),
        );
    }

    if let Some(name) = &h.backing_name {
        match open_backing_file(file.path(), name, h.backing_format.as_deref(), ctx) {
            Ok(p) => report.checked(format!(
                "backing file {name:?} opens ({}, {} bytes)",
                p.info().format,
                p.virtual_size()
            )),
            Err(e) => report.error("backing file", None, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths() {
        let b = [0b1001_0110u8, 0x12, 0x34, 0x56, 0x78, 0, 0, 0];
        assert_eq!(refcount_at(&b, 0, 0), 0);
        assert_eq!(refcount_at(&b, 1, 0), 1);
        assert_eq!(refcount_at(&b, 0, 1), 0b10);
        assert_eq!(refcount_at(&b, 3, 1), 0b10);
        assert_eq!(refcount_at(&b, 1, 2), 0b1001);
        assert_eq!(refcount_at(&b, 1, 3), 0x12);
        assert_eq!(refcount_at(&b, 1, 4), 0x3456);
        assert_eq!(refcount_at(&b, 0, 5), 0x9612_3456);
        assert_eq!(refcount_at(&b, 0, 6), 0x9612_3456_7800_0000);
        assert_eq!(refcount_at(&b, 100, 6), 0);
    }
}
