//! NTFS, read-only, on top of the `ntfs` crate (boot sector, MFT records, attributes,
//! directory B-trees, $UpCase) with our own data path: file contents are read from the
//! data runs directly (sparse runs as zeros, LZNT1-compressed units decompressed by
//! [`crate::lznt1`], which the crate lacks), so resident, sparse, compressed and
//! attribute-list (very fragmented) files all go through one bounded loop.
//!
//! Hardening around the crate:
//! * every call into it runs through [`Reader`], a [`Volume`] stream with a read budget
//!   per operation, so a damaged B-tree whose subnodes loop ends in an error, not a hang;
//! * the crate can panic on some damaged records (slicing a truncated header, an
//!   `unreachable!` on unexpected parse errors): public entry points run under
//!   `catch_unwind` and turn a panic into [`Error::Corrupt`];
//! * its errors become [`Error::Corrupt`] "ntfs ..." with the disk offset it names.
//!
//! Symbolic links: Windows reparse points (symlink 0xA000000C, junction 0xA0000003, WSL
//! 0xA000001D) and Interix links (a SYSTEM file holding `IntxLNK\x01` + UTF-16 target),
//! which is what ntfs-3g creates for `ln -s`.

use crate::fs::{Entry, EntryKind, FileSystem, components};
use crate::probe::FsKind;
use crate::volume::Volume;
use crate::{Error, Result, lznt1};
use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{
    NtfsAttributeList, NtfsFileAttributeFlags, NtfsFileName, NtfsFileNamespace,
};
use ntfs::{
    NtfsAttribute, NtfsAttributeFlags, NtfsAttributeType, NtfsError, NtfsFile, NtfsReadSeek,
};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Bytes the crate may read for one operation (one path lookup, one directory listing).
const READ_BUDGET: u64 = 1 << 30;
/// Output buffers, at most.
const BUF: usize = 1 << 20;
/// Records 0-15 are the metafiles ($MFT ... $Extend) and reserved ones.
const FIRST_USER_RECORD: u64 = 16;
/// Interix symlink magic (ntfs-3g's `ln -s`).
const INTERIX_LINK: &[u8; 8] = b"IntxLNK\x01";
const IO_REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
const IO_REPARSE_TAG_MOUNT_POINT: u32 = 0xA000_0003;
const IO_REPARSE_TAG_LX_SYMLINK: u32 = 0xA000_001D;
/// Reparse data (and link targets) we read, at most.
const MAX_REPARSE: u64 = 64 << 10;

pub fn open(volume: Volume) -> Result<Box<dyn FileSystem>> {
    let start = volume.start();
    guard(start, move || {
        let mut rd = Reader {
            vol: volume,
            budget: READ_BUDGET,
        };
        let mut ntfs = ntfs::Ntfs::new(&mut rd).map_err(|e| conv(start, "ntfs boot sector", e))?;
        ntfs.read_upcase_table(&mut rd)
            .map_err(|e| conv(start, "ntfs $UpCase", e))?;
        ntfs.root_directory(&mut rd)
            .map_err(|e| conv(start, "ntfs root directory", e))?;
        let label = match ntfs.volume_name(&mut rd) {
            None => None,
            Some(Ok(n)) => Some(n.name().to_string_lossy()).filter(|l| !l.is_empty()),
            Some(Err(e)) => return Err(conv(start, "ntfs $Volume", e)),
        };
        Ok(Box::new(NtfsFs { ntfs, rd, label }) as Box<dyn FileSystem>)
    })
}

struct NtfsFs {
    ntfs: ntfs::Ntfs,
    rd: Reader,
    label: Option<String>,
}

/// The volume as the stream the crate wants, with a read budget.
struct Reader {
    vol: Volume,
    budget: u64,
}

#[derive(Debug)]
struct BudgetExhausted;
impl std::fmt::Display for BudgetExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("read budget exhausted (a loop in damaged metadata?)")
    }
}
impl std::error::Error for BudgetExhausted {}

impl Reader {
    fn reset(&mut self) {
        self.budget = READ_BUDGET;
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len() as u64;
        if n > self.budget {
            return Err(io::Error::other(BudgetExhausted));
        }
        self.budget -= n;
        self.vol.read(buf)
    }
}

impl Seek for Reader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.vol.seek(to)
    }
}

/// Runs `f`, turning a panic inside the `ntfs` crate into [`Error::Corrupt`].
fn guard<T>(start: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            Err(Error::corrupt(
                "ntfs metadata",
                start,
                format!("the ntfs reader gave up on damaged data: {msg}"),
            ))
        }
    }
}

/// Converts an `ntfs` crate error. Its messages name "byte position 0x..." (relative to
/// the volume) when they have one: that becomes the disk offset of the error.
fn conv(start: u64, what: &str, e: NtfsError) -> Error {
    if let NtfsError::Io(io) = &e {
        return io_err(start, what, io);
    }
    let detail = e.to_string();
    let pos = detail
        .split_once("position 0x")
        .and_then(|(_, rest)| {
            let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            u64::from_str_radix(&hex, 16).ok()
        })
        .unwrap_or(0);
    Error::corrupt(what, start.saturating_add(pos), detail)
}

fn io_err(start: u64, what: &str, io: &io::Error) -> Error {
    let budget = io
        .get_ref()
        .is_some_and(|i| i.downcast_ref::<BudgetExhausted>().is_some());
    if budget || io.kind() == io::ErrorKind::UnexpectedEof {
        // Metadata pointing past the volume end, or looping.
        Error::corrupt(what, start, io.to_string())
    } else {
        Error::Io(io::Error::new(io.kind(), io.to_string()))
    }
}

fn nt_time(t: u64) -> (Option<i64>, u32) {
    const EPOCH_DIFF_SECS: i64 = 11_644_473_600;
    let secs = (t / 10_000_000) as i64; // < 2^61: fits
    let nanos = ((t % 10_000_000) * 100) as u32;
    (secs.checked_sub(EPOCH_DIFF_SECS), nanos)
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at.checked_add(2)?)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn utf16(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// One data run: `lcn` None = sparse.
#[derive(Debug, Clone, Copy)]
struct Run {
    lcn: Option<u64>,
    clusters: u64,
}

/// The unnamed $DATA of a file.
#[derive(Debug, Default)]
struct DataInfo {
    resident: Option<Vec<u8>>,
    size: u64,
    initialized: u64,
    compressed: bool,
    /// Compression unit, clusters = 2^exp.
    unit_exp: u8,
    runs: Vec<Run>,
}

/// What a path lookup found.
struct Found<'n> {
    file: NtfsFile<'n>,
    name: String,
}

impl NtfsFs {
    fn start(&self) -> u64 {
        self.rd.vol.start()
    }

    fn resolve<'n>(ntfs: &'n ntfs::Ntfs, rd: &mut Reader, path: &str) -> Result<Found<'n>> {
        let start = rd.vol.start();
        let comps = components(path)?;
        rd.reset();
        let mut file = ntfs
            .root_directory(rd)
            .map_err(|e| conv(start, "ntfs root directory", e))?;
        let mut name = String::new();
        for (i, c) in comps.iter().enumerate() {
            if !file.is_directory() {
                return Err(Error::WrongKind(format!(
                    "/{}: not a directory",
                    comps[..i].join("/")
                )));
            }
            let (next, key_name, ns) = {
                let index = file
                    .directory_index(rd)
                    .map_err(|e| conv(start, "ntfs directory index", e))?;
                let mut finder = index.finder();
                let entry = match NtfsFileNameIndex::find(&mut finder, ntfs, rd, c) {
                    None => {
                        return Err(Error::NotFound(format!("/{}", comps[..=i].join("/"))));
                    }
                    Some(r) => r.map_err(|e| conv(start, "ntfs directory index", e))?,
                };
                let (key_name, ns) = match entry.key() {
                    Some(Ok(k)) => (k.name().to_string_lossy(), k.namespace()),
                    Some(Err(e)) => return Err(conv(start, "ntfs index entry", e)),
                    None => (c.to_string(), NtfsFileNamespace::Posix),
                };
                let next = entry
                    .to_file(ntfs, rd)
                    .map_err(|e| conv(start, "ntfs file record", e))?;
                (next, key_name, ns)
            };
            // The B-tree compares without case ($UpCase). When it found another
            // spelling, an entry spelled exactly as asked wins (the common rule,
            // `find_name`): two names that differ only in case (POSIX names) are
            // each found as themselves.
            let (next, key_name, ns) = if key_name == *c {
                (next, key_name, ns)
            } else {
                match exact_entry(ntfs, rd, &file, c)? {
                    Some(rec) => {
                        let f = ntfs
                            .file(rd, rec)
                            .map_err(|e| conv(start, "ntfs file record", e))?;
                        (f, c.to_string(), NtfsFileNamespace::Posix)
                    }
                    None => (next, key_name, ns),
                }
            };
            let parent = file.file_record_number();
            file = next;
            name = key_name;
            if ns == NtfsFileNamespace::Dos {
                // Matched the 8.3 alias: report the long name.
                if let Some(long) = long_name(&file, rd, parent) {
                    name = long;
                }
            }
        }
        Ok(Found { file, name })
    }

    fn entry_of(
        ntfs: &ntfs::Ntfs,
        rd: &mut Reader,
        file: &NtfsFile,
        name: String,
    ) -> Result<Entry> {
        let start = rd.vol.start();
        let si = file
            .info()
            .map_err(|e| conv(start, "ntfs $STANDARD_INFORMATION", e))?;
        let (mtime, mtime_nanos) = nt_time(si.modification_time().nt_timestamp());
        let attrs = si.file_attributes();
        let id = file.file_record_number();
        let mut e = Entry {
            name,
            kind: EntryKind::File,
            size: 0,
            mtime,
            mtime_nanos,
            mode: None,
            id,
        };
        if let Some(link) = link_of(ntfs, rd, file, attrs)? {
            match link {
                Ok(target) => {
                    e.kind = EntryKind::Symlink;
                    e.size = target.len() as u64;
                }
                Err(()) => e.kind = EntryKind::Other,
            }
            return Ok(e);
        }
        if file.is_directory() {
            e.kind = EntryKind::Dir;
            return Ok(e);
        }
        if attrs.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
            // Other reparse points (dedup, WOF, cloud files): the data is elsewhere.
            e.kind = EntryKind::Other;
        }
        e.size = match data_info(ntfs, rd, file)? {
            Some(d) => d.size,
            None => 0,
        };
        Ok(e)
    }
}

/// The record of the entry of folder `dir` named exactly `c` (8.3 aliases aside).
fn exact_entry(ntfs: &ntfs::Ntfs, rd: &mut Reader, dir: &NtfsFile, c: &str) -> Result<Option<u64>> {
    let start = rd.vol.start();
    let index = dir
        .directory_index(rd)
        .map_err(|e| conv(start, "ntfs directory index", e))?;
    let mut names: Vec<(String, u64)> = Vec::new();
    let max_entries = (rd.vol.len() / 0x50).max(1024);
    let mut it = index.entries();
    while let Some(entry) = it.next(rd) {
        let entry = entry.map_err(|e| conv(start, "ntfs directory index", e))?;
        let Some(key) = entry.key() else { continue };
        let key: NtfsFileName = key.map_err(|e| conv(start, "ntfs index entry", e))?;
        if key.namespace() != NtfsFileNamespace::Dos {
            let rec = entry.file_reference().file_record_number();
            names.push((key.name().to_string_lossy(), rec));
        }
        if names.len() as u64 > max_entries {
            return Err(Error::corrupt(
                "ntfs directory index",
                start,
                format!("more than {max_entries} entries"),
            ));
        }
    }
    let _ = ntfs;
    Ok(crate::find_name(&names, c, false, |(n, _)| n.as_str().into()).map(|(_, r)| *r))
}

/// The first non-DOS name of `file` in directory `parent`.
fn long_name(file: &NtfsFile, rd: &mut Reader, parent: u64) -> Option<String> {
    for ns in [
        NtfsFileNamespace::Win32,
        NtfsFileNamespace::Posix,
        NtfsFileNamespace::Win32AndDos,
    ] {
        if let Some(Ok(n)) = file.name(rd, Some(ns), Some(parent)) {
            return Some(n.name().to_string_lossy());
        }
    }
    None
}

/// The link target when `file` is a symbolic link: `None` = not a link, `Some(Err)` =
/// a link-like reparse point whose target cannot be read.
#[allow(clippy::type_complexity)]
fn link_of(
    ntfs: &ntfs::Ntfs,
    rd: &mut Reader,
    file: &NtfsFile,
    attrs: NtfsFileAttributeFlags,
) -> Result<Option<std::result::Result<String, ()>>> {
    let start = rd.vol.start();
    if attrs.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
        let data = {
            let mut it = file.attributes();
            let mut found = None;
            while let Some(item) = it.next(rd) {
                let item = item.map_err(|e| conv(start, "ntfs attribute", e))?;
                let attr = item
                    .to_attribute()
                    .map_err(|e| conv(start, "ntfs attribute", e))?;
                if attr.ty().ok() == Some(NtfsAttributeType::ReparsePoint) {
                    found = Some(attr_bytes(rd, &attr, MAX_REPARSE)?);
                    break;
                }
            }
            found
        };
        let Some(data) = data else {
            return Ok(None);
        };
        return Ok(parse_reparse(&data));
    }
    if attrs.contains(NtfsFileAttributeFlags::SYSTEM) && !file.is_directory() {
        let Some(d) = data_info(ntfs, rd, file)? else {
            return Ok(None);
        };
        if d.size < 10 || d.size > 8 + 2 * 4096 || d.compressed {
            return Ok(None);
        }
        let mut buf = Vec::new();
        write_data(&rd.vol, ntfs.cluster_size() as u64, &d, &mut buf)?;
        if buf.starts_with(INTERIX_LINK) {
            return Ok(Some(Ok(utf16(&buf[8..]))));
        }
    }
    Ok(None)
}

/// Link target from reparse data; `None` when the tag is not a link.
fn parse_reparse(d: &[u8]) -> Option<std::result::Result<String, ()>> {
    let tag = le32(d, 0)?;
    let names = |buf_at: usize| -> std::result::Result<String, ()> {
        let sub_off = le16(d, 8).ok_or(())? as usize;
        let sub_len = le16(d, 10).ok_or(())? as usize;
        let pr_off = le16(d, 12).ok_or(())? as usize;
        let pr_len = le16(d, 14).ok_or(())? as usize;
        let get = |off: usize, len: usize| d.get(buf_at + off..buf_at + off + len).map(utf16);
        let print = get(pr_off, pr_len).filter(|s| !s.is_empty());
        match print {
            Some(p) => Ok(p),
            None => {
                let s = get(sub_off, sub_len).ok_or(())?;
                Ok(s.strip_prefix(r"\??\").map(str::to_string).unwrap_or(s))
            }
        }
    };
    Some(match tag {
        IO_REPARSE_TAG_SYMLINK => {
            let relative = le32(d, 16).is_some_and(|f| f & 1 != 0);
            names(20).map(|t| if relative { t.replace('\\', "/") } else { t })
        }
        IO_REPARSE_TAG_MOUNT_POINT => names(16),
        IO_REPARSE_TAG_LX_SYMLINK => d
            .get(12..)
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .ok_or(()),
        _ => return None,
    })
}

/// The value of a (small) attribute, at most `max` bytes.
fn attr_bytes(rd: &mut Reader, attr: &NtfsAttribute, max: u64) -> Result<Vec<u8>> {
    let start = rd.vol.start();
    let mut v = attr
        .value(rd)
        .map_err(|e| conv(start, "ntfs attribute value", e))?;
    let len = v.len().min(max) as usize;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = v
            .read(rd, &mut buf[done..])
            .map_err(|e| conv(start, "ntfs attribute value", e))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

/// Reads the non-resident header of the attribute at volume offset `attr_pos` inside the
/// file record at `rec_pos` (update-sequence fixups applied): the fields the crate does
/// not expose (compression unit, initialized size).
fn raw_header(ntfs: &ntfs::Ntfs, vol: &Volume, rec_pos: u64, attr_pos: u64) -> Result<[u8; 0x40]> {
    let rs = ntfs.file_record_size() as usize;
    let bad =
        |d: String| Error::corrupt("ntfs file record", vol.start().saturating_add(rec_pos), d);
    let mut rec = vec![0u8; rs];
    vol.read_at(&mut rec, rec_pos)
        .map_err(|e| io_err(vol.start(), "ntfs file record", &e))?;
    if !rec.starts_with(b"FILE") {
        return Err(bad("no FILE signature".into()));
    }
    let usa_off = le16(&rec, 4).unwrap_or(0) as usize;
    let usa_count = le16(&rec, 6).unwrap_or(0) as usize;
    if usa_count == 0 || usa_off + 2 * usa_count > rs || (usa_count - 1) * 512 > rs {
        return Err(bad("bad update sequence array".into()));
    }
    let usn = [rec[usa_off], rec[usa_off + 1]];
    for k in 1..usa_count {
        let end = k * 512;
        if rec[end - 2..end] != usn {
            return Err(bad(format!("update sequence mismatch in sector {k}")));
        }
        let fix = [rec[usa_off + 2 * k], rec[usa_off + 2 * k + 1]];
        rec[end - 2..end].copy_from_slice(&fix);
    }
    let off = attr_pos
        .checked_sub(rec_pos)
        .map(|o| o as usize)
        .filter(|o| o.checked_add(0x40).is_some_and(|e| e <= rs))
        .ok_or_else(|| bad("attribute outside its record".into()))?;
    let mut h = [0u8; 0x40];
    h.copy_from_slice(&rec[off..off + 0x40]);
    Ok(h)
}

/// Appends the data runs of a non-resident attribute (one segment) to `info`.
fn add_segment(
    ntfs: &ntfs::Ntfs,
    rd: &mut Reader,
    rec_pos: u64,
    attr: &NtfsAttribute,
    info: &mut DataInfo,
    first: bool,
) -> Result<()> {
    let start = rd.vol.start();
    let vol_clusters = rd.vol.len() / ntfs.cluster_size() as u64;
    let attr_pos = attr.position().value().map(|p| p.get()).unwrap_or(0);
    let h = raw_header(ntfs, &rd.vol, rec_pos, attr_pos)?;
    let lowest_vcn = u64::from_le_bytes(h[0x10..0x18].try_into().unwrap_or([0; 8]));
    let have: u64 = info
        .runs
        .iter()
        .try_fold(0u64, |a, r| a.checked_add(r.clusters))
        .unwrap_or(u64::MAX);
    if lowest_vcn != have {
        return Err(Error::corrupt(
            "ntfs $DATA",
            start.saturating_add(attr_pos),
            format!("segment starts at VCN {lowest_vcn}, previous ones end at {have}"),
        ));
    }
    if first {
        info.compressed = attr.flags().contains(NtfsAttributeFlags::COMPRESSED);
        info.unit_exp = h[0x22];
        info.size = u64::from_le_bytes(h[0x30..0x38].try_into().unwrap_or([0; 8]));
        info.initialized = u64::from_le_bytes(h[0x38..0x40].try_into().unwrap_or([0; 8]));
    }
    let value = attr.value(rd).map_err(|e| conv(start, "ntfs $DATA", e))?;
    let ntfs::attribute_value::NtfsAttributeValue::NonResident(v) = value else {
        return Err(Error::corrupt(
            "ntfs $DATA",
            start.saturating_add(attr_pos),
            "expected a non-resident segment",
        ));
    };
    let cs = ntfs.cluster_size() as u64;
    let mut total = have;
    for r in v.data_runs() {
        let r = r.map_err(|e| conv(start, "ntfs data run", e))?;
        let clusters = r.allocated_size() / cs;
        let lcn = r.data_position().value().map(|p| p.get() / cs);
        if let Some(l) = lcn
            && l.checked_add(clusters).is_none_or(|e| e > vol_clusters)
        {
            return Err(Error::corrupt(
                "ntfs data run",
                start.saturating_add(attr_pos),
                format!("clusters {l}+{clusters} pass the volume end ({vol_clusters} clusters)"),
            ));
        }
        total = total.checked_add(clusters).ok_or_else(|| {
            Error::corrupt(
                "ntfs data run",
                start.saturating_add(attr_pos),
                "VCN overflow",
            )
        })?;
        // Merge with the previous run when contiguous (keeps the list short).
        match (info.runs.last_mut(), lcn) {
            (Some(p), None) if p.lcn.is_none() => p.clusters += clusters,
            (Some(p), Some(l)) if p.lcn.and_then(|pl| pl.checked_add(p.clusters)) == Some(l) => {
                p.clusters += clusters
            }
            _ => info.runs.push(Run { lcn, clusters }),
        }
    }
    Ok(())
}

/// The unnamed $DATA attribute of `file` (None: it has none), with all its data runs,
/// following an $ATTRIBUTE_LIST when the file has one.
fn data_info(ntfs: &ntfs::Ntfs, rd: &mut Reader, file: &NtfsFile) -> Result<Option<DataInfo>> {
    let start = rd.vol.start();
    let rec_pos = file.position().value().map(|p| p.get()).unwrap_or(0);
    let mut list = None;
    let mut direct = None;
    for (i, attr) in file.attributes_raw().enumerate() {
        if i > 4096 {
            break;
        }
        let attr = attr.map_err(|e| conv(start, "ntfs attribute", e))?;
        match attr.ty() {
            Ok(NtfsAttributeType::AttributeList) => {
                list = Some(attr);
                break;
            }
            Ok(NtfsAttributeType::Data)
                if direct.is_none() && attr.name().is_ok_and(|n| n.is_empty()) =>
            {
                direct = Some(attr)
            }
            _ => {}
        }
    }
    let mut info = DataInfo::default();
    if let Some(list_attr) = list {
        let list: NtfsAttributeList = list_attr
            .structured_value(rd)
            .map_err(|e| conv(start, "ntfs $ATTRIBUTE_LIST", e))?;
        let mut entries = list.entries();
        let mut segs = Vec::new();
        while let Some(e) = entries.next(rd) {
            let e = e.map_err(|e| conv(start, "ntfs $ATTRIBUTE_LIST", e))?;
            if e.ty().ok() == Some(NtfsAttributeType::Data) && e.name_length() == 0 {
                segs.push(e);
            }
            if segs.len() > 1 << 16 {
                return Err(Error::corrupt(
                    "ntfs $ATTRIBUTE_LIST",
                    start.saturating_add(rec_pos),
                    "too many $DATA segments",
                ));
            }
        }
        if segs.is_empty() {
            return Ok(None);
        }
        for (i, seg) in segs.iter().enumerate() {
            let rec = seg.base_file_reference().file_record_number();
            let other;
            let f = if rec == file.file_record_number() {
                file
            } else {
                other = ntfs
                    .file(rd, rec)
                    .map_err(|e| conv(start, "ntfs file record", e))?;
                &other
            };
            let attr = seg
                .to_attribute(f)
                .map_err(|e| conv(start, "ntfs attribute", e))?;
            if attr.is_resident() {
                if segs.len() != 1 {
                    return Err(Error::corrupt(
                        "ntfs $DATA",
                        start.saturating_add(rec_pos),
                        "resident segment in a list",
                    ));
                }
                return resident(rd, &attr);
            }
            let f_pos = f.position().value().map(|p| p.get()).unwrap_or(0);
            add_segment(ntfs, rd, f_pos, &attr, &mut info, i == 0)?;
        }
    } else if let Some(attr) = direct {
        if attr.is_resident() {
            return resident(rd, &attr);
        }
        add_segment(ntfs, rd, rec_pos, &attr, &mut info, true)?;
    } else {
        return Ok(None);
    }
    info.initialized = info.initialized.min(info.size);
    // The runs must cover the data (sparse runs included): this also bounds the
    // output of a damaged size field by what the run list describes.
    let cs = ntfs.cluster_size() as u64;
    let covered = info
        .runs
        .iter()
        .try_fold(0u64, |a, r| a.checked_add(r.clusters.checked_mul(cs)?));
    if covered.is_none_or(|c| c < info.size) {
        return Err(Error::corrupt(
            "ntfs $DATA",
            start.saturating_add(rec_pos),
            format!(
                "data runs cover {} bytes of a {}-byte stream",
                covered.map_or("too many".into(), |c| c.to_string()),
                info.size
            ),
        ));
    }
    Ok(Some(info))
}

fn resident(rd: &mut Reader, attr: &NtfsAttribute) -> Result<Option<DataInfo>> {
    let data = attr_bytes(rd, attr, 1 << 20)?;
    Ok(Some(DataInfo {
        size: data.len() as u64,
        initialized: data.len() as u64,
        resident: Some(data),
        ..DataInfo::default()
    }))
}

/// Writes to `out`, turning bytes past the initialized size into zeros.
struct Sink<'a> {
    out: &'a mut dyn Write,
    pos: u64,
    initialized: u64,
}

impl Sink<'_> {
    fn put(&mut self, data: &[u8]) -> Result<()> {
        let init_left = self.initialized.saturating_sub(self.pos);
        if (data.len() as u64) <= init_left {
            self.out.write_all(data)?;
        } else {
            let n = init_left as usize;
            self.out.write_all(&data[..n])?;
            self.pos += n as u64;
            self.zeros((data.len() - n) as u64)?;
            return Ok(());
        }
        self.pos += data.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, mut n: u64) -> Result<()> {
        static Z: [u8; 64 << 10] = [0; 64 << 10];
        self.pos += n;
        while n > 0 {
            let k = n.min(Z.len() as u64) as usize;
            self.out.write_all(&Z[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
}

fn vol_read(vol: &Volume, buf: &mut [u8], off: u64) -> Result<()> {
    vol.read_at(buf, off)
        .map_err(|e| io_err(vol.start(), "ntfs data run", &e))
}

/// Streams the data described by `d` into `out`; returns the bytes written.
fn write_data(vol: &Volume, cs: u64, d: &DataInfo, out: &mut dyn Write) -> Result<u64> {
    let mut sink = Sink {
        out,
        pos: 0,
        initialized: d.initialized,
    };
    if let Some(r) = &d.resident {
        sink.put(r)?;
        return Ok(r.len() as u64);
    }
    let bad = |detail: String| Error::corrupt("ntfs $DATA", vol.start(), detail);
    if d.compressed {
        write_compressed(vol, cs, d, &mut sink)?;
    } else {
        let mut at = 0u64; // byte offset in the stream
        for r in &d.runs {
            if at >= d.size {
                break;
            }
            let bytes = r
                .clusters
                .checked_mul(cs)
                .ok_or_else(|| bad("run too long".into()))?;
            let take = bytes.min(d.size - at);
            match r.lcn {
                None => sink.zeros(take)?,
                Some(lcn) => {
                    let mut off = lcn
                        .checked_mul(cs)
                        .ok_or_else(|| bad("LCN overflow".into()))?;
                    let mut left = take;
                    let mut buf = vec![0u8; left.min(BUF as u64) as usize];
                    while left > 0 {
                        // Past the initialized size: zeros, no need to read.
                        if sink.pos >= d.initialized {
                            sink.zeros(left)?;
                            break;
                        }
                        let k = left.min(BUF as u64) as usize;
                        vol_read(vol, &mut buf[..k], off)?;
                        sink.put(&buf[..k])?;
                        off += k as u64;
                        left -= k as u64;
                    }
                }
            }
            at += take;
        }
        if at < d.size {
            return Err(bad(format!(
                "data runs cover {at} bytes of a {}-byte file",
                d.size
            )));
        }
    }
    Ok(d.size)
}

fn write_compressed(vol: &Volume, cs: u64, d: &DataInfo, sink: &mut Sink) -> Result<()> {
    let bad = |detail: String| Error::corrupt("ntfs compressed $DATA", vol.start(), detail);
    if d.unit_exp == 0 || d.unit_exp > 8 {
        return Err(bad(format!(
            "compression unit of 2^{} clusters",
            d.unit_exp
        )));
    }
    let unit_clusters = 1u64 << d.unit_exp;
    let unit_bytes = unit_clusters * cs;
    if unit_bytes > 4 << 20 {
        return Err(Error::Unsupported(format!(
            "ntfs compression unit of {unit_bytes} bytes"
        )));
    }
    let mut runs = d.runs.iter().copied();
    let mut cur: Option<Run> = None;
    let mut done = 0u64;
    let mut raw = Vec::with_capacity(unit_bytes as usize);
    let mut plain = Vec::with_capacity(unit_bytes as usize);
    while done < d.size {
        // Whole sparse units at once (a huge sparse file is not one loop per unit).
        if cur.is_none() {
            cur = runs.next();
        }
        if let Some(r) = cur
            && r.lcn.is_none()
            && r.clusters >= unit_clusters
        {
            let units = r.clusters / unit_clusters;
            let bytes = units.saturating_mul(unit_bytes).min(d.size - done);
            sink.zeros(bytes)?;
            done += bytes;
            let left = r.clusters - units * unit_clusters;
            cur = (left > 0).then_some(Run {
                lcn: None,
                clusters: left,
            });
            continue;
        }
        // The clusters of this unit, as (lcn or sparse, count).
        let mut segs: Vec<(Option<u64>, u64)> = Vec::new();
        let mut need = unit_clusters;
        while need > 0 {
            let r = match cur.take() {
                Some(r) => r,
                None => match runs.next() {
                    Some(r) => r,
                    None => break, // past the runs: sparse
                },
            };
            let k = r.clusters.min(need);
            segs.push((r.lcn, k));
            need -= k;
            if r.clusters > k {
                cur = Some(Run {
                    lcn: r.lcn.map(|l| l + k),
                    clusters: r.clusters - k,
                });
            }
        }
        let real: u64 = segs.iter().filter(|s| s.0.is_some()).map(|s| s.1).sum();
        let want = unit_bytes.min(d.size - done);
        if real == 0 {
            sink.zeros(want)?;
        } else {
            raw.clear();
            for (lcn, k) in &segs {
                if let Some(l) = lcn {
                    let n = (k * cs) as usize;
                    let at = raw.len();
                    raw.resize(at + n, 0);
                    vol_read(vol, &mut raw[at..], l * cs)?;
                }
            }
            if real == unit_clusters {
                // Stored uncompressed.
                sink.put(&raw[..want as usize])?;
            } else {
                plain.clear();
                lznt1::decompress(&raw, unit_bytes as usize, &mut plain).map_err(|e| {
                    bad(format!("compression unit at byte {done} of the file: {e}"))
                })?;
                plain.resize(unit_bytes as usize, 0);
                sink.put(&plain[..want as usize])?;
            }
        }
        done += want;
    }
    Ok(())
}

impl FileSystem for NtfsFs {
    fn kind(&self) -> FsKind {
        FsKind::Ntfs
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        let start = self.start();
        let NtfsFs { ntfs, rd, .. } = self;
        guard(start, || {
            let found = Self::resolve(ntfs, rd, path)?;
            if !found.file.is_directory() {
                return Err(Error::WrongKind(format!("{path}: not a directory")));
            }
            let is_root = found.file.file_record_number() == 5;
            // Cap: an index entry takes at least 0x52 bytes on disk.
            let max_entries = (rd.vol.len() / 0x50).max(1024);
            let mut names: Vec<(Entry, u64)> = Vec::new();
            {
                let index = found
                    .file
                    .directory_index(rd)
                    .map_err(|e| conv(start, "ntfs directory index", e))?;
                let mut it = index.entries();
                while let Some(entry) = it.next(rd) {
                    let entry = entry.map_err(|e| conv(start, "ntfs directory index", e))?;
                    let Some(key) = entry.key() else { continue };
                    let key: NtfsFileName = key.map_err(|e| conv(start, "ntfs index entry", e))?;
                    if key.namespace() == NtfsFileNamespace::Dos {
                        continue; // the 8.3 alias of a long name listed as well
                    }
                    let name = key.name().to_string_lossy();
                    let rec = entry.file_reference().file_record_number();
                    if name == "." {
                        continue;
                    }
                    // The metafiles ($MFT, $Bitmap, $Extend...) are left out of the
                    // root; "$Recycle.Bin" and other user files named "$..." stay.
                    if is_root && rec < FIRST_USER_RECORD && name.starts_with('$') {
                        continue;
                    }
                    // What the index says, used when the file's own record is damaged.
                    let (mtime, mtime_nanos) = nt_time(key.modification_time().nt_timestamp());
                    let fallback = Entry {
                        name,
                        kind: if key.is_directory() {
                            EntryKind::Dir
                        } else {
                            EntryKind::Other
                        },
                        size: 0,
                        mtime,
                        mtime_nanos,
                        mode: None,
                        id: rec,
                    };
                    names.push((fallback, rec));
                    if names.len() as u64 > max_entries {
                        return Err(Error::corrupt(
                            "ntfs directory index",
                            start,
                            format!("{path}: more than {max_entries} entries"),
                        ));
                    }
                }
            }
            let mut out = Vec::with_capacity(names.len());
            for (fallback, rec) in names {
                rd.reset();
                let e = ntfs
                    .file(rd, rec)
                    .map_err(|e| conv(start, "ntfs file record", e))
                    .and_then(|f| Self::entry_of(ntfs, rd, &f, fallback.name.clone()));
                match e {
                    Ok(e) => out.push(e),
                    // One damaged file does not hide its directory: it is listed from
                    // its index entry, as "other" (reading it reports the damage).
                    Err(Error::Corrupt { .. }) => out.push(fallback),
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
    }

    fn stat(&mut self, path: &str) -> Result<Entry> {
        let start = self.start();
        let NtfsFs { ntfs, rd, .. } = self;
        guard(start, || {
            let found = Self::resolve(ntfs, rd, path)?;
            Self::entry_of(ntfs, rd, &found.file, found.name)
        })
    }

    fn read_link(&mut self, path: &str) -> Result<String> {
        let start = self.start();
        let NtfsFs { ntfs, rd, .. } = self;
        guard(start, || {
            let found = Self::resolve(ntfs, rd, path)?;
            let attrs = found
                .file
                .info()
                .map_err(|e| conv(start, "ntfs $STANDARD_INFORMATION", e))?
                .file_attributes();
            match link_of(ntfs, rd, &found.file, attrs)? {
                Some(Ok(t)) => Ok(t),
                Some(Err(())) => Err(Error::corrupt(
                    "ntfs reparse point",
                    start,
                    format!("{path}: unreadable link target"),
                )),
                None => Err(Error::WrongKind(format!("{path}: not a symbolic link"))),
            }
        })
    }

    fn read_file(&mut self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let start = self.start();
        let NtfsFs { ntfs, rd, .. } = self;
        guard(start, || {
            let found = Self::resolve(ntfs, rd, path)?;
            if found.file.is_directory() {
                return Err(Error::WrongKind(format!("{path}: is a directory")));
            }
            match data_info(ntfs, rd, &found.file)? {
                None => Ok(0),
                Some(d) => write_data(&rd.vol, ntfs.cluster_size() as u64, &d, out),
            }
        })
    }

    fn data_ranges(&mut self, path: &str) -> Result<Option<Vec<(u64, u64)>>> {
        let start = self.start();
        let NtfsFs { ntfs, rd, .. } = self;
        guard(start, || {
            let found = Self::resolve(ntfs, rd, path)?;
            if found.file.is_directory() {
                return Err(Error::WrongKind(format!("{path}: is a directory")));
            }
            let Some(d) = data_info(ntfs, rd, &found.file)? else {
                return Ok(None);
            };
            if d.resident.is_some() || d.compressed {
                return Ok(None);
            }
            let cs = ntfs.cluster_size() as u64;
            let mut ranges = Vec::new();
            let mut at = 0u64;
            for r in &d.runs {
                if at >= d.size {
                    break;
                }
                let bytes = r.clusters.saturating_mul(cs);
                let take = bytes.min(d.size - at);
                if let Some(l) = r.lcn {
                    // add_segment checked lcn + clusters against the volume.
                    ranges.push((l * cs, take));
                }
                at = at.saturating_add(bytes);
            }
            Ok(Some(ranges))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_time_converts() {
        // 2001-09-09T01:46:40Z = 1_000_000_000 unix, plus 0.5 s.
        let t = (1_000_000_000u64 + 11_644_473_600) * 10_000_000 + 5_000_000;
        assert_eq!(nt_time(t), (Some(1_000_000_000), 500_000_000));
        assert_eq!(nt_time(0), (Some(-11_644_473_600), 0));
        assert_eq!(nt_time(u64::MAX).0.map(|s| s > 0), Some(true));
    }

    #[test]
    fn reparse_targets() {
        let name = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
        let sub = name(r"\??\C:\Target");
        let pr = name(r"C:\Target");
        let mut d = IO_REPARSE_TAG_SYMLINK.to_le_bytes().to_vec();
        d.extend_from_slice(&0u32.to_le_bytes()); // length + reserved (unchecked)
        d.extend_from_slice(&0u16.to_le_bytes());
        d.extend_from_slice(&(sub.len() as u16).to_le_bytes());
        d.extend_from_slice(&(sub.len() as u16).to_le_bytes());
        d.extend_from_slice(&(pr.len() as u16).to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes()); // absolute
        d.extend_from_slice(&sub);
        d.extend_from_slice(&pr);
        assert_eq!(parse_reparse(&d), Some(Ok(r"C:\Target".to_string())));
        // Truncated: a link whose target cannot be read.
        assert_eq!(parse_reparse(&d[..18]), Some(Err(())));
        // Not a link tag.
        let mut other = d.clone();
        other[..4].copy_from_slice(&0x8000_0017u32.to_le_bytes());
        assert_eq!(parse_reparse(&other), None);
        assert_eq!(parse_reparse(&[1, 2]), None);
    }
}
