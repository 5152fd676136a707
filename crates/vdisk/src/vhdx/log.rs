//! The VHDX metadata log (MS-VHDX 2.3): finding the active sequence, replaying it in
//! memory behind an overlay [`Backing`] for read-only opens, or into the file.

use super::layout::{Guid, Header, MIB, crc32c_zeroed, put, set_crc};
use crate::backing::{Backing, FileBacking, le};
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Log sector size.
pub(crate) const LOG_SECTOR: usize = 4096;
/// Largest dirty log we replay: the whole log is read into memory (Hyper-V and qemu
/// use 1 MiB logs).
pub(crate) const MAX_LOG_LENGTH: u64 = 256 << 20;
/// Sanity bound for file offsets named by log entries (64 TiB of payload plus
/// metadata fits well below it).
const MAX_LOG_FILE_OFFSET: u64 = 1 << 47;

/// One write recorded in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogOp {
    /// A 4 KiB sector at a 4 KiB-aligned file offset.
    Data { offset: u64, sector: Vec<u8> },
    /// Zeros over `[offset, offset+len)` (4 KiB multiples).
    Zero { offset: u64, len: u64 },
}

/// The active sequence of a dirty log, ready to apply.
#[derive(Debug, Clone, Default)]
pub(crate) struct Active {
    pub(crate) ops: Vec<LogOp>,
    pub(crate) entries: usize,
    pub(crate) head_sequence: u64,
    pub(crate) flushed_file_offset: u64,
    pub(crate) last_file_offset: u64,
}

struct EntryInfo {
    sequence: u64,
    length: usize,
    tail: usize,
    flushed: u64,
    last: u64,
}

/// Bytes of the circular log from `pos`, `len` long, wrapping at the end.
fn circular(log: &[u8], pos: usize, len: usize) -> Option<Cow<'_, [u8]>> {
    if len > log.len() {
        return None;
    }
    let end = pos.checked_add(len)?;
    if end <= log.len() {
        return log.get(pos..end).map(Cow::Borrowed);
    }
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(log.get(pos..)?);
    v.extend_from_slice(log.get(..end - log.len())?);
    Some(Cow::Owned(v))
}

/// Validates the entry at `pos`; with `ops`, also collects its writes.
fn parse_entry(
    log: &[u8],
    pos: usize,
    guid: &Guid,
    file_len: u64,
    mut ops: Option<&mut Vec<LogOp>>,
) -> Option<EntryInfo> {
    let hdr = log.get(pos..pos.checked_add(64)?)?;
    if hdr.get(..4) != Some(b"loge".as_slice()) || Guid::read(hdr, 32) != *guid {
        return None;
    }
    let length = le::u32(hdr, 8) as usize;
    let tail = le::u32(hdr, 12) as usize;
    let sequence = le::u64(hdr, 16);
    let count = le::u32(hdr, 24) as usize;
    let flushed = le::u64(hdr, 48);
    let last = le::u64(hdr, 56);
    if length < LOG_SECTOR
        || !length.is_multiple_of(LOG_SECTOR)
        || length > log.len()
        || !tail.is_multiple_of(LOG_SECTOR)
        || tail >= log.len()
        || sequence == 0
        || flushed > MAX_LOG_FILE_OFFSET
        || last > MAX_LOG_FILE_OFFSET
    {
        return None;
    }
    let desc_sectors = count.checked_mul(32)?.checked_add(64)?.div_ceil(LOG_SECTOR);
    if desc_sectors.checked_mul(LOG_SECTOR)? > length {
        return None;
    }
    let entry = circular(log, pos, length)?;
    if le::u32(&entry, 4) != crc32c_zeroed(&entry, 4) {
        return None;
    }
    let limit = file_len.max(last);
    let mut data_sector = desc_sectors;
    for i in 0..count {
        let d = entry.get(64 + i * 32..96 + i * 32)?;
        if le::u64(d, 24) != sequence {
            return None;
        }
        let offset = le::u64(d, 16);
        if !offset.is_multiple_of(LOG_SECTOR as u64) {
            return None;
        }
        match d.get(..4)? {
            b"zero" => {
                let len = le::u64(d, 8);
                if !len.is_multiple_of(LOG_SECTOR as u64) || offset.checked_add(len)? > limit {
                    return None;
                }
                if let Some(ops) = ops.as_deref_mut() {
                    ops.push(LogOp::Zero { offset, len });
                }
            }
            b"desc" => {
                if offset.checked_add(LOG_SECTOR as u64)? > limit {
                    return None;
                }
                let at = data_sector.checked_mul(LOG_SECTOR)?;
                let s = entry.get(at..at.checked_add(LOG_SECTOR)?)?;
                if s.get(..4) != Some(b"data".as_slice())
                    || le::u32(s, 4) != (sequence >> 32) as u32
                    || le::u32(s, LOG_SECTOR - 4) != sequence as u32
                {
                    return None;
                }
                data_sector += 1;
                if let Some(ops) = ops.as_deref_mut() {
                    let mut sector = s.to_vec();
                    // The sector's first 8 and last 4 bytes live in the descriptor.
                    put(&mut sector, 0, d.get(8..16)?);
                    put(&mut sector, LOG_SECTOR - 4, d.get(4..8)?);
                    ops.push(LogOp::Data { offset, sector });
                }
            }
            _ => return None,
        }
    }
    if data_sector.checked_mul(LOG_SECTOR)? > length {
        return None;
    }
    Some(EntryInfo {
        sequence,
        length,
        tail,
        flushed,
        last,
    })
}

/// Finds and decodes the active sequence of the log named by `h` (MS-VHDX 2.3.3):
/// the longest run of valid entries with consecutive sequence numbers whose head's
/// tail points into the run, with the highest head sequence number. `entries == 0`
/// when no valid entry exists (nothing was ever committed: nothing to replay).
pub(crate) fn find_active(file: &dyn Backing, h: &Header) -> Result<Active> {
    let path = file.path();
    let log_len = u64::from(h.log_length);
    if log_len == 0 {
        return Err(Error::corrupt(
            path,
            "VHDX header",
            h.log_offset,
            "the log GUID is set but the log length is zero",
        ));
    }
    if log_len > MAX_LOG_LENGTH {
        return Err(Error::unsupported(
            path,
            format!(
                "dirty log of {log_len} bytes: longer than the {MAX_LOG_LENGTH}-byte limit for replay"
            ),
        ));
    }
    let log = file.read_vec(h.log_offset, log_len as usize, "VHDX log")?;
    let file_len = file.len();
    let n = log.len() / LOG_SECTOR;
    let mut covered = vec![false; n];
    let mut best: Option<Vec<usize>> = None;
    let mut best_seq = 0u64;
    let mut best_ends = (0u64, 0u64);
    for start in 0..n {
        if covered.get(start).copied().unwrap_or(true) {
            continue;
        }
        let mut run: Vec<(usize, EntryInfo)> = Vec::new();
        let mut pos = start * LOG_SECTOR;
        let mut total = 0usize;
        while let Some(e) = parse_entry(&log, pos, &h.log_guid, file_len, None) {
            if run
                .last()
                .is_some_and(|(_, l)| l.sequence.checked_add(1) != Some(e.sequence))
            {
                break;
            }
            total = total.saturating_add(e.length);
            if total > log.len() {
                break;
            }
            if let Some(c) = covered.get_mut(pos / LOG_SECTOR) {
                *c = true;
            }
            let here = pos;
            pos = (pos + e.length) % log.len();
            run.push((here, e));
        }
        let Some((_, head)) = run.last() else {
            continue;
        };
        let Some(k) = run.iter().position(|(p, _)| *p == head.tail) else {
            continue;
        };
        if best.is_none() || head.sequence > best_seq {
            best_seq = head.sequence;
            best_ends = (head.flushed, head.last);
            best = Some(run.iter().skip(k).map(|(p, _)| *p).collect());
        }
    }
    let mut active = Active::default();
    let Some(positions) = best else {
        return Ok(active);
    };
    for p in &positions {
        if parse_entry(&log, *p, &h.log_guid, file_len, Some(&mut active.ops)).is_none() {
            return Err(Error::corrupt(
                path,
                "VHDX log entry",
                h.log_offset + *p as u64,
                "entry changed while reading",
            ));
        }
    }
    active.entries = positions.len();
    active.head_sequence = best_seq;
    active.flushed_file_offset = best_ends.0;
    active.last_file_offset = best_ends.1;
    if file_len < active.flushed_file_offset {
        return Err(Error::corrupt(
            path,
            "VHDX log entry",
            h.log_offset,
            format!(
                "the file ({file_len:#x} bytes) is shorter than the log's FlushedFileOffset {:#x}: truncated",
                active.flushed_file_offset
            ),
        ));
    }
    Ok(active)
}

/// A file seen through its replayed log: logged sectors and zeroed ranges replace the
/// file's bytes, and the file reads as extended to the log's LastFileOffset.
#[derive(Debug)]
pub(crate) struct Overlay {
    inner: Arc<dyn Backing>,
    len: u64,
    sectors: BTreeMap<u64, Vec<u8>>,
    /// Non-overlapping zeroed ranges, start -> end.
    zeros: BTreeMap<u64, u64>,
}

impl Overlay {
    /// Builds the overlay of `active` over `inner`.
    pub(crate) fn new(inner: Arc<dyn Backing>, active: Active) -> Overlay {
        let mut o = Overlay {
            len: inner.len().max(active.last_file_offset),
            inner,
            sectors: BTreeMap::new(),
            zeros: BTreeMap::new(),
        };
        for op in active.ops {
            match op {
                LogOp::Data { offset, sector } => {
                    o.unzero(offset, offset + LOG_SECTOR as u64);
                    o.len = o.len.max(offset + LOG_SECTOR as u64);
                    o.sectors.insert(offset, sector);
                }
                LogOp::Zero { offset, len } => {
                    let end = offset.saturating_add(len);
                    let keys: Vec<u64> = o.sectors.range(offset..end).map(|(k, _)| *k).collect();
                    for k in keys {
                        o.sectors.remove(&k);
                    }
                    o.unzero(offset, end);
                    o.zeros.insert(offset, end);
                    o.len = o.len.max(end);
                }
            }
        }
        o
    }

    /// Removes `[a, b)` from the zeroed ranges.
    fn unzero(&mut self, a: u64, b: u64) {
        let hit: Vec<(u64, u64)> = self
            .zeros
            .range(..b)
            .rev()
            .take_while(|(_, e)| **e > a)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in hit {
            self.zeros.remove(&s);
            if s < a {
                self.zeros.insert(s, a);
            }
            if e > b {
                self.zeros.insert(b, e);
            }
        }
    }
}

impl Backing for Overlay {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn allocated_bytes(&self) -> u64 {
        self.inner.allocated_bytes()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64, structure: &'static str) -> Result<()> {
        let end = match offset.checked_add(buf.len() as u64) {
            Some(e) if e <= self.len => e,
            _ => {
                return Err(Error::Truncated {
                    path: self.path().to_path_buf(),
                    structure,
                    offset,
                    len: buf.len() as u64,
                    file_len: self.len,
                });
            }
        };
        let in_file = self.inner.len().clamp(offset, end) - offset;
        let (head, rest) = buf.split_at_mut(in_file as usize);
        if !head.is_empty() {
            self.inner.read_exact_at(head, offset, structure)?;
        }
        rest.fill(0);
        for (&s, &e) in self
            .zeros
            .range(..end)
            .rev()
            .take_while(|(_, e)| **e > offset)
        {
            let a = (s.max(offset) - offset) as usize;
            let b = (e.min(end) - offset) as usize;
            if let Some(d) = buf.get_mut(a..b) {
                d.fill(0);
            }
        }
        let first = offset - offset % LOG_SECTOR as u64;
        for (&s, sector) in self.sectors.range(first..end) {
            let a = s.max(offset);
            let b = (s + LOG_SECTOR as u64).min(end);
            if let (Some(d), Some(src)) = (
                buf.get_mut((a - offset) as usize..(b - offset) as usize),
                sector.get((a - s) as usize..(b - s) as usize),
            ) {
                d.copy_from_slice(src);
            }
        }
        Ok(())
    }
    fn data_regions(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(if len == 0 {
            vec![]
        } else {
            vec![(offset, len)]
        })
    }
}

/// Replays the dirty log of the VHDX at `path` into the file, then writes a header
/// without log GUID (sequence + 1, into the non-current slot).
pub(crate) fn replay_in_place(path: &Path) -> Result<Option<String>> {
    let backing = FileBacking::open(path)?;
    let sel = super::select_header(backing.as_ref())?;
    let h = sel.header;
    if h.log_guid.is_zero() {
        return Ok(None);
    }
    let active = find_active(backing.as_ref(), &h)?;
    drop(backing);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open for log replay", e))?;
    let io = |op: &'static str| move |e| Error::io(PathBuf::from(path), op, e);
    let mut len = file.metadata().map_err(io("stat"))?.len();
    let zeros = vec![0u8; MIB as usize];
    for op in &active.ops {
        match op {
            LogOp::Data { offset, sector } => {
                file.write_all_at(sector, *offset)
                    .map_err(io("write log sector"))?;
                len = len.max(offset + sector.len() as u64);
            }
            LogOp::Zero { offset, len: zl } => {
                // Beyond the end of the file, the extension reads as zeros anyway.
                let end = offset.saturating_add(*zl).min(len);
                let mut p = *offset;
                while p < end {
                    let n = (end - p).min(MIB) as usize;
                    file.write_all_at(zeros.get(..n).unwrap_or(&zeros), p)
                        .map_err(io("write log zeros"))?;
                    p += n as u64;
                }
            }
        }
    }
    if len < active.last_file_offset {
        file.set_len(active.last_file_offset)
            .map_err(io("extend"))?;
    }
    file.sync_all().map_err(io("fsync"))?;
    let new = Header {
        sequence: h.sequence.wrapping_add(1),
        log_guid: Guid::default(),
        ..h
    };
    let slot = 1 - sel.slot.min(1);
    file.write_all_at(&new.encode(), super::layout::HEADER_OFFSETS[slot])
        .map_err(io("write header"))?;
    file.sync_all().map_err(io("fsync"))?;
    Ok(Some(format!(
        "replayed {} log entries (head sequence {})",
        active.entries, active.head_sequence
    )))
}

#[allow(dead_code)] // used by unit tests and the writer
/// One descriptor for [`encode_entry`]: a 4 KiB data sector, or a zeroed range.
#[derive(Debug, Clone)]
pub(crate) enum EncodeOp<'a> {
    Data { offset: u64, sector: &'a [u8] },
    Zero { offset: u64, len: u64 },
}

/// Encodes one log entry (used by tests and writers).
#[allow(dead_code)]
pub(crate) fn encode_entry(
    sequence: u64,
    tail: u32,
    log_guid: Guid,
    flushed: u64,
    last: u64,
    ops: &[EncodeOp<'_>],
) -> Vec<u8> {
    let desc_sectors = (64 + 32 * ops.len()).div_ceil(LOG_SECTOR);
    let data_count = ops
        .iter()
        .filter(|o| matches!(o, EncodeOp::Data { .. }))
        .count();
    let length = (desc_sectors + data_count) * LOG_SECTOR;
    let mut b = vec![0u8; length];
    put(&mut b, 0, b"loge");
    put(&mut b, 8, &(length as u32).to_le_bytes());
    put(&mut b, 12, &tail.to_le_bytes());
    put(&mut b, 16, &sequence.to_le_bytes());
    put(&mut b, 24, &(ops.len() as u32).to_le_bytes());
    put(&mut b, 32, &log_guid.0);
    put(&mut b, 48, &flushed.to_le_bytes());
    put(&mut b, 56, &last.to_le_bytes());
    let mut ds = desc_sectors;
    for (i, op) in ops.iter().enumerate() {
        let at = 64 + 32 * i;
        match op {
            EncodeOp::Zero { offset, len } => {
                put(&mut b, at, b"zero");
                put(&mut b, at + 8, &len.to_le_bytes());
                put(&mut b, at + 16, &offset.to_le_bytes());
            }
            EncodeOp::Data { offset, sector } => {
                put(&mut b, at, b"desc");
                put(
                    &mut b,
                    at + 4,
                    sector.get(LOG_SECTOR - 4..LOG_SECTOR).unwrap_or(&[0; 4]),
                );
                put(&mut b, at + 8, sector.get(..8).unwrap_or(&[0; 8]));
                put(&mut b, at + 16, &offset.to_le_bytes());
                let s = ds * LOG_SECTOR;
                put(&mut b, s, b"data");
                put(&mut b, s + 4, &((sequence >> 32) as u32).to_le_bytes());
                put(&mut b, s + 8, sector.get(8..LOG_SECTOR - 4).unwrap_or(&[]));
                put(&mut b, s + LOG_SECTOR - 4, &(sequence as u32).to_le_bytes());
                ds += 1;
            }
        }
        put(&mut b, at + 24, &sequence.to_le_bytes());
    }
    set_crc(&mut b, 4);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBacking;

    const G: Guid = super::super::layout::REGION_BAT;

    fn header(log_len: u32) -> Header {
        Header {
            sequence: 1,
            file_write_guid: Guid::default(),
            data_write_guid: Guid::default(),
            log_guid: G,
            log_version: 0,
            version: 1,
            log_length: log_len,
            log_offset: MIB,
        }
    }

    #[test]
    fn finds_the_newest_sequence_and_replays_it() {
        let mut file = vec![0u8; 3 << 20];
        let sec_a = vec![0xAAu8; 4096];
        let sec_b = vec![0xBBu8; 4096];
        let e1 = encode_entry(
            5,
            0,
            G,
            3 << 20,
            3 << 20,
            &[EncodeOp::Data {
                offset: 2 << 20,
                sector: &sec_a,
            }],
        );
        let e2 = encode_entry(
            6,
            0,
            G,
            3 << 20,
            4 << 20,
            &[
                EncodeOp::Data {
                    offset: (2 << 20) + 4096,
                    sector: &sec_b,
                },
                EncodeOp::Zero {
                    offset: (2 << 20) + 8192,
                    len: 8192,
                },
            ],
        );
        let l1 = e1.len();
        file[MIB as usize..MIB as usize + l1].copy_from_slice(&e1);
        file[MIB as usize + l1..MIB as usize + l1 + e2.len()].copy_from_slice(&e2);
        file[(2 << 20) + 8192..(2 << 20) + 16384].fill(7);
        // a stale entry from an older run with a lower sequence number
        let old = encode_entry(2, 0, G, 0, 0, &[]);
        let at = MIB as usize + (512 << 10);
        file[at..at + old.len()].copy_from_slice(&old);
        let b = MemBacking::new(file, "log.vhdx");
        let active = find_active(b.as_ref(), &header(MIB as u32)).unwrap();
        assert_eq!(active.entries, 2);
        assert_eq!(active.head_sequence, 6);
        let o = Overlay::new(b, active);
        assert_eq!(o.len(), 4 << 20);
        let mut buf = vec![0u8; 16384];
        o.read_exact_at(&mut buf, 2 << 20, "x").unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0xAA));
        assert!(buf[4096..8192].iter().all(|&x| x == 0xBB));
        assert!(buf[8192..].iter().all(|&x| x == 0));
        let mut tail = [1u8; 10];
        o.read_exact_at(&mut tail, (4 << 20) - 10, "x").unwrap();
        assert_eq!(tail, [0u8; 10]);
    }

    #[test]
    fn a_tail_outside_the_run_is_not_active() {
        let mut file = vec![0u8; 2 << 20];
        let e = encode_entry(9, 8192, G, 0, 0, &[]);
        file[MIB as usize..MIB as usize + e.len()].copy_from_slice(&e);
        let b = MemBacking::new(file, "log.vhdx");
        assert_eq!(
            find_active(b.as_ref(), &header(MIB as u32))
                .unwrap()
                .entries,
            0
        );
    }

    #[test]
    fn corrupt_entries_are_ignored() {
        let mut file = vec![0u8; 2 << 20];
        let mut e = encode_entry(9, 0, G, 0, 0, &[]);
        e[100] ^= 1;
        file[MIB as usize..MIB as usize + e.len()].copy_from_slice(&e);
        let b = MemBacking::new(file, "log.vhdx");
        assert_eq!(
            find_active(b.as_ref(), &header(MIB as u32))
                .unwrap()
                .entries,
            0
        );
    }
}
