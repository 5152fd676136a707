//! qcow2 (QEMU copy-on-write v2 and v3): reader, structural check and streaming writer.
//!
//! The reader walks L1 → L2 tables (cached, bounded), supports standard, zero,
//! compressed (zlib and zstd) clusters, extended L2 entries (subclusters) and backing
//! file chains. Refcounts are not needed to read; [`check`] rebuilds them.

mod check;
mod writer;

pub(crate) use check::check;
pub(crate) use writer::create;

use crate::backing::{Backing, FileBacking, be};
use crate::extent::{ExtentState, map_range_end, push_extent};
use crate::{
    DiskInfo, Error, Extent, Format, OpenCtx, Result, Subformat, VirtualDisk, check_range,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The qcow2 signature `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Offset bits of L1 entries, standard L2 entries and refcount table entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one" flag of L1/L2 entries.
const COPIED: u64 = 1 << 63;
/// Compressed-cluster flag of L2 entries.
const COMPRESSED: u64 = 1 << 62;
/// Zero flag of standard L2 entries (v3).
const ZERO: u64 = 1;
/// QEMU's QCOW_MAX_L1_SIZE: 32 MiB of L1 entries.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Longest backing file name QEMU accepts.
const MAX_BACKING_NAME: u32 = 1023;
/// Bytes of L2 tables kept in the reader's cache.
const L2_CACHE_BYTES: usize = 16 << 20;

/// Header extension types.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_FEATURE_NAMES: u32 = 0x6803_F857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    Zlib,
    Zstd,
}

/// The bitmaps header extension (persistent dirty bitmaps).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub dir_size: u64,
    pub dir_offset: u64,
}

/// A validated qcow2 header with its extensions.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub refcount_order: u32,
    pub compression: Compression,
    pub extended_l2: bool,
    pub backing_name: Option<String>,
    pub backing_format: Option<String>,
    pub bitmaps: Option<BitmapsExt>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    /// log2 of the number of entries per L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }
    /// log2 of the allocation unit: the cluster, or the subcluster with extended L2.
    pub fn unit_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 5 } else { 0 }
    }
    /// Shift of the sector count in a compressed cluster descriptor.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    /// Host offset and length of the compressed data described by `entry`.
    pub fn compressed_range(&self, entry: u64) -> (u64, u64) {
        let shift = self.csize_shift();
        let off = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (off, sectors * 512 - (off & 511))
    }
    /// Number of L1 entries needed to cover the virtual size.
    fn l1_needed(&self) -> u64 {
        self.size
            .div_ceil(1u64 << (self.cluster_bits + self.l2_bits()))
    }
}

/// Reads and validates the header of `file`.
pub(crate) fn parse_header(file: &dyn Backing) -> Result<Header> {
    let path = file.path();
    let mut h = [0u8; 104];
    file.read_exact_at(&mut h[..72], 0, "qcow2 header")?;
    if h[..4] != MAGIC {
        return Err(Error::corrupt(path, "qcow2 header", 0, "bad magic"));
    }
    let version = be::u32(&h, 4);
    if version != 2 && version != 3 {
        return Err(Error::unsupported(path, format!("qcow2 version {version}")));
    }
    let backing_file_offset = be::u64(&h, 8);
    let backing_file_size = be::u32(&h, 16);
    let cluster_bits = be::u32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(Error::corrupt(
            path,
            "qcow2 header",
            20,
            format!("cluster_bits {cluster_bits} out of range 9..=21"),
        ));
    }
    let cs = 1u64 << cluster_bits;
    let crypt = be::u32(&h, 32);
    let v3 = if version == 3 {
        parse_v3_fields(file, &mut h, cs)?
    } else {
        V3Fields {
            incompatible: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
        }
    };
    if crypt != 0 {
        return Err(Error::unsupported(
            path,
            format!("encrypted qcow2 (crypt_method {crypt})"),
        ));
    }
    if v3.incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(Error::unsupported(path, "qcow2 with an external data file"));
    }

    // Header extensions live in the first cluster, before the backing file name.
    let ext_end = if backing_file_offset != 0 {
        backing_file_offset.min(cs)
    } else {
        cs
    }
    .min(file.len());
    let exts = parse_extensions(file, v3.header_length, ext_end)?;
    let extended_l2 = check_features(path, v3.incompatible, &exts.feature_names, cluster_bits)?;
    let backing_name = read_backing_name(file, backing_file_offset, backing_file_size, cs)?;

    let hdr = Header {
        version,
        cluster_bits,
        size: be::u64(&h, 24),
        l1_size: be::u32(&h, 36),
        l1_offset: be::u64(&h, 40),
        refcount_table_offset: be::u64(&h, 48),
        refcount_table_clusters: be::u32(&h, 56),
        nb_snapshots: be::u32(&h, 60),
        snapshots_offset: be::u64(&h, 64),
        incompatible: v3.incompatible,
        refcount_order: v3.refcount_order,
        compression: v3.compression,
        extended_l2,
        backing_name,
        backing_format: exts.backing_format,
        bitmaps: exts.bitmaps,
    };
    check_tables(path, &hdr)?;
    Ok(hdr)
}

/// The fields a version 3 header adds (version 2 has their defaults).
struct V3Fields {
    incompatible: u64,
    refcount_order: u32,
    header_length: u32,
    compression: Compression,
}

/// Reads bytes 72..104 of a version 3 header into `h` and validates what they hold,
/// with the compression type that may follow them.
fn parse_v3_fields(file: &dyn Backing, h: &mut [u8; 104], cs: u64) -> Result<V3Fields> {
    let path = file.path();
    file.read_exact_at(&mut h[72..104], 72, "qcow2 v3 header")?;
    let incompatible = be::u64(h, 72);
    let refcount_order = be::u32(h, 96);
    let header_length = be::u32(h, 100);
    if header_length < 104 || u64::from(header_length) > cs {
        return Err(Error::corrupt(
            path,
            "qcow2 header",
            100,
            format!("header_length {header_length} out of range 104..={cs}"),
        ));
    }
    if refcount_order > 6 {
        return Err(Error::corrupt(
            path,
            "qcow2 header",
            96,
            format!("refcount_order {refcount_order} above 6"),
        ));
    }
    let mut ct = [0u8; 1];
    if header_length > 104 {
        file.read_exact_at(&mut ct, 104, "qcow2 compression type")?;
    }
    let compression = match (incompatible & INCOMPAT_COMPRESSION != 0, ct[0]) {
        (_, 0) => Compression::Zlib,
        (true, 1) => Compression::Zstd,
        (true, t) => {
            return Err(Error::unsupported(
                path,
                format!("qcow2 compression type {t}"),
            ));
        }
        (false, t) => {
            return Err(Error::corrupt(
                path,
                "qcow2 header",
                104,
                format!("compression type {t} without the compression type feature bit"),
            ));
        }
    };
    Ok(V3Fields {
        incompatible,
        refcount_order,
        header_length,
        compression,
    })
}

/// What the header extensions say.
struct Extensions {
    backing_format: Option<String>,
    bitmaps: Option<BitmapsExt>,
    /// Feature name table entries: (type, bit, name).
    feature_names: Vec<(u8, u8, String)>,
}

/// Walks the header extensions from the end of the header to `ext_end`.
fn parse_extensions(file: &dyn Backing, header_length: u32, ext_end: u64) -> Result<Extensions> {
    let path = file.path();
    let head = file.read_vec(0, ext_end as usize, "qcow2 header extensions")?;
    let mut exts = Extensions {
        backing_format: None,
        bitmaps: None,
        feature_names: Vec::new(),
    };
    let mut pos = u64::from(header_length).next_multiple_of(8);
    while pos.saturating_add(8) <= ext_end {
        let p = pos as usize;
        let typ = be::u32(&head, p);
        let len = u64::from(be::u32(&head, p + 4));
        let data_start = pos + 8;
        let data_end = data_start.saturating_add(len);
        if typ == 0 {
            break;
        }
        let Some(data) = head.get(data_start as usize..data_end as usize) else {
            return Err(Error::corrupt(
                path,
                "qcow2 header extension",
                pos,
                format!("extension {typ:#x} of {len} bytes runs past the first cluster"),
            ));
        };
        match typ {
            EXT_BACKING_FORMAT => {
                exts.backing_format = Some(
                    String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_string(),
                );
            }
            EXT_FEATURE_NAMES => {
                for e in data.chunks_exact(48) {
                    let name = e.get(2..).unwrap_or_default();
                    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                    let (t, b) = (
                        e.first().copied().unwrap_or(0),
                        e.get(1).copied().unwrap_or(0),
                    );
                    exts.feature_names.push((
                        t,
                        b,
                        String::from_utf8_lossy(name.get(..end).unwrap_or_default()).into(),
                    ));
                }
            }
            EXT_BITMAPS => {
                if len < 24 {
                    return Err(Error::corrupt(
                        path,
                        "qcow2 bitmaps extension",
                        pos,
                        "shorter than 24 bytes",
                    ));
                }
                exts.bitmaps = Some(BitmapsExt {
                    nb_bitmaps: be::u32(data, 0),
                    dir_size: be::u64(data, 8),
                    dir_offset: be::u64(data, 16),
                });
            }
            EXT_DATA_FILE => {
                return Err(Error::unsupported(path, "qcow2 with an external data file"));
            }
            _ => {} // unknown extensions are optional by the specification
        }
        pos = data_start.saturating_add(len.next_multiple_of(8));
    }
    Ok(exts)
}

/// Refuses incompatible features we do not know (named from the feature name table
/// when it has them); returns whether L2 entries are extended.
fn check_features(
    path: &Path,
    incompatible: u64,
    feature_names: &[(u8, u8, String)],
    cluster_bits: u32,
) -> Result<bool> {
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let bit = unknown.trailing_zeros();
        let name = feature_names
            .iter()
            .find(|(t, b, _)| *t == 0 && u32::from(*b) == bit)
            .map(|(_, _, n)| format!(" ({n})"))
            .unwrap_or_default();
        return Err(Error::unsupported(
            path,
            format!("qcow2 incompatible feature bit {bit}{name}"),
        ));
    }
    let extended_l2 = incompatible & INCOMPAT_EXTL2 != 0;
    if extended_l2 && cluster_bits < 14 {
        return Err(Error::corrupt(
            path,
            "qcow2 header",
            20,
            "extended L2 entries need clusters of at least 16 KiB",
        ));
    }
    Ok(extended_l2)
}

/// Reads the backing file name, which must lie within the first cluster.
fn read_backing_name(
    file: &dyn Backing,
    offset: u64,
    size: u32,
    cs: u64,
) -> Result<Option<String>> {
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > MAX_BACKING_NAME || offset.saturating_add(u64::from(size)) > cs {
        return Err(Error::corrupt(
            file.path(),
            "qcow2 backing file name",
            offset,
            format!("name of {size} bytes is too long or leaves the first cluster"),
        ));
    }
    let name = file.read_vec(offset, size as usize, "qcow2 backing file name")?;
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

/// Bounds the virtual size and the L1 table, and checks the tables are cluster-aligned.
fn check_tables(path: &Path, hdr: &Header) -> Result<()> {
    let Header {
        size,
        l1_size,
        l1_offset,
        refcount_table_offset,
        ..
    } = *hdr;
    let cs = hdr.cluster_size();
    if size > i64::MAX as u64 {
        return Err(Error::corrupt(
            path,
            "qcow2 header",
            24,
            format!("virtual size {size} too large"),
        ));
    }
    if u64::from(l1_size) * 8 > MAX_L1_BYTES {
        return Err(Error::corrupt(
            path,
            "qcow2 header",
            36,
            format!("L1 table of {l1_size} entries exceeds 32 MiB"),
        ));
    }
    if u64::from(l1_size) < hdr.l1_needed() {
        return Err(Error::corrupt(
            path,
            "qcow2 header",
            36,
            format!(
                "L1 table of {l1_size} entries is too small for virtual size {size} (needs {})",
                hdr.l1_needed()
            ),
        ));
    }
    if !l1_offset.is_multiple_of(cs) {
        return Err(Error::corrupt(
            path,
            "L1 table",
            l1_offset,
            "offset not cluster-aligned",
        ));
    }
    if !refcount_table_offset.is_multiple_of(cs) {
        return Err(Error::corrupt(
            path,
            "refcount table",
            refcount_table_offset,
            "offset not cluster-aligned",
        ));
    }
    Ok(())
}

/// Reads the active L1 table (bounded by the header checks and the file length).
pub(crate) fn read_l1(file: &dyn Backing, h: &Header) -> Result<Vec<u64>> {
    read_table(file, h.l1_offset, h.l1_size, "L1 table")
}

/// Reads `entries` big-endian u64 at `offset`, refusing tables beyond the file end
/// before allocating.
fn read_table(
    file: &dyn Backing,
    offset: u64,
    entries: u32,
    structure: &'static str,
) -> Result<Vec<u64>> {
    let len = u64::from(entries) * 8;
    if len > MAX_L1_BYTES {
        return Err(Error::corrupt(
            file.path(),
            structure,
            offset,
            "table larger than 32 MiB",
        ));
    }
    if offset.checked_add(len).is_none_or(|e| e > file.len()) {
        return Err(Error::corrupt(
            file.path(),
            structure,
            offset,
            format!(
                "table of {entries} entries extends beyond the end of the file ({:#x})",
                file.len()
            ),
        ));
    }
    let raw = file.read_vec(offset, len as usize, structure)?;
    Ok(decode_u64s(&raw))
}

/// Decodes a buffer of big-endian u64 values.
pub(crate) fn decode_u64s(raw: &[u8]) -> Vec<u64> {
    raw.as_chunks::<8>()
        .0
        .iter()
        .map(|c| u64::from_be_bytes(*c))
        .collect()
}

/// What one allocation unit (cluster, or subcluster with extended L2) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Stored at this host offset (of the first byte of the range).
    Data(u64),
    /// A compressed cluster: the L2 entry.
    Compressed(u64),
    Zero,
    Unallocated,
}

/// Decodes an L2 entry for subcluster `sub` (ignored without extended L2).
fn decode_entry(
    path: &Path,
    h: &Header,
    entry: u64,
    bitmap: u64,
    sub: u32,
    at: u64,
) -> Result<Unit> {
    if entry & COMPRESSED != 0 {
        return Ok(Unit::Compressed(entry));
    }
    let host = entry & OFFSET_MASK;
    let cs = h.cluster_size();
    let aligned = |host: u64| -> Result<u64> {
        if !host.is_multiple_of(cs) {
            return Err(Error::corrupt(
                path,
                "L2 entry",
                at,
                format!("data cluster offset {host:#x} not cluster-aligned"),
            ));
        }
        Ok(host)
    };
    if !h.extended_l2 {
        if entry & ZERO != 0 {
            if h.version < 3 {
                return Err(Error::corrupt(
                    path,
                    "L2 entry",
                    at,
                    "zero cluster flag in a version 2 image",
                ));
            }
            return Ok(Unit::Zero);
        }
        if host == 0 {
            return Ok(Unit::Unallocated);
        }
        return Ok(Unit::Data(aligned(host)?));
    }
    let alloc = (bitmap >> sub) & 1 != 0;
    let zero = (bitmap >> (32 + sub)) & 1 != 0;
    match (alloc, zero) {
        (true, true) => Err(Error::corrupt(
            path,
            "L2 subcluster bitmap",
            at + 8,
            format!("subcluster {sub} both allocated and zero"),
        )),
        (false, true) => Ok(Unit::Zero),
        (false, false) => Ok(Unit::Unallocated),
        (true, false) => {
            if host == 0 {
                return Err(Error::corrupt(
                    path,
                    "L2 subcluster bitmap",
                    at + 8,
                    format!("subcluster {sub} allocated in an unallocated cluster"),
                ));
            }
            Ok(Unit::Data(
                aligned(host)? + (u64::from(sub) << h.unit_bits()),
            ))
        }
    }
}

/// Bounded cache of decoded L2 tables, keyed by host offset.
#[derive(Debug, Default)]
struct L2Cache {
    tables: HashMap<u64, (u64, Arc<Vec<u64>>)>,
    tick: u64,
}

/// A qcow2 image open for reading.
#[derive(Debug)]
pub struct Qcow2Disk {
    file: Arc<dyn Backing>,
    h: Header,
    l1: Vec<u64>,
    cache: Mutex<L2Cache>,
    cache_cap: usize,
    parent: Option<Box<dyn VirtualDisk>>,
}

/// Opens `file` as qcow2, with its backing chain.
pub(crate) fn open(file: Arc<dyn Backing>, ctx: &OpenCtx) -> Result<Box<dyn VirtualDisk>> {
    let h = parse_header(file.as_ref())?;
    let l1 = read_l1(file.as_ref(), &h)?;
    let parent = match &h.backing_name {
        Some(name) => Some(open_backing_file(
            file.path(),
            name,
            h.backing_format.as_deref(),
            ctx,
        )?),
        None => None,
    };
    let cache_cap = (L2_CACHE_BYTES / h.cluster_size() as usize).max(2);
    Ok(Box::new(Qcow2Disk {
        file,
        h,
        l1,
        cache: Mutex::new(L2Cache::default()),
        cache_cap,
        parent,
    }))
}

/// Resolves a backing file name (relative to the image's folder) to a path.
pub(crate) fn backing_path(child: &Path, name: &str) -> Result<PathBuf> {
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::unsupported(
            child,
            format!("backing file {name:?} is not a local file"),
        ));
    }
    let p = Path::new(name);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        child.parent().unwrap_or(Path::new("")).join(p)
    })
}

/// Opens a backing file: with the declared format when there is one (as QEMU does;
/// a declared raw backing is read as raw even if it looks like another format),
/// else by content.
pub(crate) fn open_backing_file(
    child: &Path,
    name: &str,
    format: Option<&str>,
    ctx: &OpenCtx,
) -> Result<Box<dyn VirtualDisk>> {
    let parent = backing_path(child, name)?;
    let expected = match format {
        None | Some("") => None,
        Some(f) => Some(
            f.parse::<Format>()
                .map_err(|_| Error::unsupported(child, format!("backing file format {f:?}")))?,
        ),
    };
    if expected == Some(Format::Raw) {
        if !parent.exists() {
            return Err(Error::parent(
                child,
                format!("parent {} does not exist", parent.display()),
            ));
        }
        // Still registered in the chain for the depth limit.
        ctx.enter(&parent)?;
        return crate::raw::open(FileBacking::open(&parent)?);
    }
    ctx.open_parent(child, &parent, expected)
}

impl Qcow2Disk {
    fn path(&self) -> &Path {
        self.file.path()
    }

    /// The L2 table of L1 entry `idx`, or `None` when it is unallocated.
    fn l2(&self, idx: u64) -> Result<Option<Arc<Vec<u64>>>> {
        let Some(&entry) = usize::try_from(idx).ok().and_then(|i| self.l1.get(i)) else {
            return Ok(None);
        };
        let off = entry & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let cs = self.h.cluster_size();
        let at = self.h.l1_offset.saturating_add(idx.saturating_mul(8));
        if !off.is_multiple_of(cs) {
            return Err(Error::corrupt(
                self.path(),
                "L1 entry",
                at,
                format!("L2 offset {off:#x} not cluster-aligned"),
            ));
        }
        if let Ok(mut c) = self.cache.lock() {
            c.tick += 1;
            let t = c.tick;
            if let Some(e) = c.tables.get_mut(&off) {
                e.0 = t;
                return Ok(Some(e.1.clone()));
            }
        }
        if off.checked_add(cs).is_none_or(|e| e > self.file.len()) {
            return Err(Error::corrupt(
                self.path(),
                "L1 entry",
                at,
                format!("L2 table at {off:#x} beyond the end of the file"),
            ));
        }
        let raw = self.file.read_vec(off, cs as usize, "L2 table")?;
        let table = Arc::new(decode_u64s(&raw));
        if let Ok(mut c) = self.cache.lock() {
            if c.tables.len() >= self.cache_cap
                && let Some(old) = c.tables.iter().min_by_key(|e| e.1.0).map(|e| *e.0)
            {
                c.tables.remove(&old);
            }
            let t = c.tick;
            c.tables.insert(off, (t, table.clone()));
        }
        Ok(Some(table))
    }

    /// Walks `[offset, end)` as runs of one kind: contiguous host data is merged
    /// (so it can be read at once), compressed clusters come one by one.
    fn runs(
        &self,
        offset: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, Unit) -> Result<()>,
    ) -> Result<()> {
        let cb = self.h.cluster_bits;
        let ub = self.h.unit_bits();
        let table_bits = cb + self.h.l2_bits();
        let l2_mask = (1u64 << self.h.l2_bits()) - 1;
        let mut pos = offset;
        while pos < end {
            let l1i = pos >> table_bits;
            let table_end = (l1i + 1).saturating_mul(1u64 << table_bits).min(end);
            let Some(l2) = self.l2(l1i)? else {
                f(pos, table_end - pos, Unit::Unallocated)?;
                pos = table_end;
                continue;
            };
            let l2_off = self.l1.get(l1i as usize).map_or(0, |e| e & OFFSET_MASK);
            let mut cur: Option<(u64, u64, Unit)> = None;
            while pos < table_end {
                let uend = ((pos >> ub) + 1).saturating_mul(1u64 << ub).min(table_end);
                let idx = ((pos >> cb) & l2_mask) as usize;
                let (entry, bitmap, at) = if self.h.extended_l2 {
                    let e = l2.get(idx * 2).copied().unwrap_or(0);
                    (
                        e,
                        l2.get(idx * 2 + 1).copied().unwrap_or(0),
                        l2_off + idx as u64 * 16,
                    )
                } else {
                    (
                        l2.get(idx).copied().unwrap_or(0),
                        0,
                        l2_off + idx as u64 * 8,
                    )
                };
                let sub = ((pos >> ub) & 31) as u32;
                let unit = match decode_entry(self.path(), &self.h, entry, bitmap, sub, at)? {
                    Unit::Data(h) => Unit::Data(h + (pos & ((1u64 << ub) - 1))),
                    u => u,
                };
                let len = uend - pos;
                cur = match cur {
                    Some((s, l, u)) if continues(u, l, unit) => Some((s, l + len, u)),
                    Some((s, l, u)) => {
                        f(s, l, u)?;
                        Some((pos, len, unit))
                    }
                    None => Some((pos, len, unit)),
                };
                pos = uend;
            }
            if let Some((s, l, u)) = cur {
                f(s, l, u)?;
            }
        }
        Ok(())
    }

    /// Reads host data, zero-filling what lies past the end of the file (as QEMU's
    /// file driver does for a partially written last cluster).
    fn read_host(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let flen = self.file.len();
        if host >= flen {
            return Err(Error::corrupt(
                self.path(),
                "data cluster",
                host,
                format!("beyond the end of the file ({flen:#x})"),
            ));
        }
        let n = (flen - host).min(buf.len() as u64) as usize;
        let (a, b) = buf.split_at_mut(n);
        self.file.read_exact_at(a, host, "data cluster")?;
        b.fill(0);
        Ok(())
    }

    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(p) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        let psize = p.virtual_size();
        let n = psize.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (a, b) = buf.split_at_mut(n);
        if !a.is_empty() {
            p.read_at(a, offset)?;
        }
        b.fill(0);
        Ok(())
    }

    /// Decompresses the cluster described by `entry` into `out` (one cluster).
    fn decompress(&self, entry: u64, out: &mut [u8]) -> Result<()> {
        let (off, len) = self.h.compressed_range(entry);
        let flen = self.file.len();
        if off >= flen {
            return Err(Error::corrupt(
                self.path(),
                "compressed cluster",
                off,
                "beyond the end of the file",
            ));
        }
        // The sector-rounded length may run past the end of the file.
        let len = len.min(flen - off);
        let input = self
            .file
            .read_vec(off, len as usize, "compressed cluster")?;
        let fail = |d: String| Error::corrupt(self.path(), "compressed cluster", off, d);
        match self.h.compression {
            Compression::Zlib => {
                let mut d = flate2::Decompress::new(false);
                match d.decompress(&input, out, flate2::FlushDecompress::Finish) {
                    Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                    Ok(_) => Err(fail(format!(
                        "deflate data ends after {} of {} bytes",
                        d.total_out(),
                        out.len()
                    ))),
                    Err(e) => Err(fail(format!("deflate: {e}"))),
                }
            }
            Compression::Zstd => zstd_cluster(&input, out).map_err(fail),
        }
    }
}

/// Decompresses one zstd-compressed cluster as QEMU does: the output must be filled
/// exactly, trailing input (sector padding) is ignored.
fn zstd_cluster(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use zstd::stream::raw::{DParameter, Decoder, Operation};
    let mut dec = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    // A cluster is at most 2 MiB: refuse frames asking for a larger window.
    dec.set_parameter(DParameter::WindowLogMax(22))
        .map_err(|e| format!("zstd: {e}"))?;
    let (mut ip, mut op, mut hint) = (0usize, 0usize, 0usize);
    while op < out.len() {
        let (Some(i), Some(o)) = (input.get(ip..), out.get_mut(op..)) else {
            break;
        };
        let st = dec.run_on_buffers(i, o).map_err(|e| format!("zstd: {e}"))?;
        if st.bytes_read == 0 && st.bytes_written == 0 {
            return Err(format!("zstd data ends after {op} of {} bytes", out.len()));
        }
        ip += st.bytes_read;
        op += st.bytes_written;
        hint = st.remaining;
    }
    if hint > 0 {
        return Err("zstd frame larger than one cluster".into());
    }
    Ok(())
}

/// True when `next` continues a run of `cur` that is `len` bytes long.
fn continues(cur: Unit, len: u64, next: Unit) -> bool {
    match (cur, next) {
        (Unit::Data(a), Unit::Data(b)) => a.checked_add(len) == Some(b),
        (Unit::Zero, Unit::Zero) | (Unit::Unallocated, Unit::Unallocated) => true,
        _ => false,
    }
}

impl VirtualDisk for Qcow2Disk {
    fn info(&self) -> DiskInfo {
        let h = &self.h;
        let mut details = vec![
            ("version".to_string(), h.version.to_string()),
            (
                "compat".to_string(),
                if h.version == 2 { "0.10" } else { "1.1" }.to_string(),
            ),
            (
                "compression type".to_string(),
                match h.compression {
                    Compression::Zlib => "zlib",
                    Compression::Zstd => "zstd",
                }
                .to_string(),
            ),
            (
                "refcount bits".to_string(),
                (1u32 << h.refcount_order).to_string(),
            ),
            (
                "dirty".to_string(),
                (h.incompatible & INCOMPAT_DIRTY != 0).to_string(),
            ),
            (
                "corrupt".to_string(),
                (h.incompatible & INCOMPAT_CORRUPT != 0).to_string(),
            ),
            ("extended l2".to_string(), h.extended_l2.to_string()),
            ("snapshots".to_string(), h.nb_snapshots.to_string()),
        ];
        if let Some(b) = &h.bitmaps {
            details.push(("bitmaps".to_string(), b.nb_bitmaps.to_string()));
        }
        if let Some(n) = &h.backing_name {
            details.push(("backing file".to_string(), n.clone()));
        }
        if let Some(f) = &h.backing_format {
            details.push(("backing format".to_string(), f.clone()));
        }
        DiskInfo {
            path: self.path().to_path_buf(),
            format: Format::Qcow2,
            subformat: if self.parent.is_some() {
                Subformat::Differencing
            } else {
                Subformat::Dynamic
            },
            virtual_size: h.size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            block_size: Some(h.cluster_size()),
            file_size: self.file.len(),
            allocated_bytes: self.file.allocated_bytes(),
            details,
            parent: self.parent.as_ref().map(|p| Box::new(p.info())),
        }
    }

    fn virtual_size(&self) -> u64 {
        self.h.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.h.size)?;
        let end = offset + buf.len() as u64;
        let cs = self.h.cluster_size();
        let mut scratch: Vec<u8> = Vec::new();
        self.runs(offset, end, &mut |o, l, u| {
            let s = (o - offset) as usize;
            let Some(b) = buf.get_mut(s..s + l as usize) else {
                return Err(Error::Invalid("qcow2: run outside the buffer".into()));
            };
            match u {
                Unit::Data(host) => self.read_host(b, host),
                Unit::Zero => {
                    b.fill(0);
                    Ok(())
                }
                Unit::Unallocated => self.read_parent(b, o),
                Unit::Compressed(entry) => {
                    let within = (o % cs) as usize;
                    if within == 0 && b.len() as u64 == cs {
                        return self.decompress(entry, b);
                    }
                    scratch.resize(cs as usize, 0);
                    self.decompress(entry, &mut scratch)?;
                    match scratch.get(within..within + b.len()) {
                        Some(src) => {
                            b.copy_from_slice(src);
                            Ok(())
                        }
                        None => Err(Error::Invalid(
                            "qcow2: compressed run outside the cluster".into(),
                        )),
                    }
                }
            }
        })
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = map_range_end(offset, length, self.h.size)?;
        let mut out = Vec::new();
        self.runs(offset, end, &mut |o, l, u| {
            match u {
                Unit::Data(_) | Unit::Compressed(_) => {
                    push_extent(&mut out, o, l, ExtentState::Data)
                }
                Unit::Zero => push_extent(&mut out, o, l, ExtentState::Zero),
                Unit::Unallocated => match &self.parent {
                    None => push_extent(&mut out, o, l, ExtentState::Unallocated),
                    Some(p) => {
                        let n = p.virtual_size().saturating_sub(o).min(l);
                        if n > 0 {
                            for e in p.map(o, n)? {
                                push_extent(&mut out, e.offset, e.length, e.state);
                            }
                        }
                        push_extent(&mut out, o + n, l - n, ExtentState::Unallocated);
                    }
                },
            }
            Ok(())
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_layout() {
        let h = Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 20,
            l1_size: 1,
            l1_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            refcount_order: 4,
            compression: Compression::Zlib,
            extended_l2: false,
            backing_name: None,
            backing_format: None,
            bitmaps: None,
        };
        // 64 KiB clusters: 8 bits of sector count at bit 54.
        let e = COMPRESSED | (3u64 << 54) | 0x1_0200;
        assert_eq!(h.compressed_range(e), (0x1_0200, 4 * 512));
        let e = COMPRESSED | 0x1_0010;
        assert_eq!(h.compressed_range(e), (0x1_0010, 512 - 16));
    }

    #[test]
    fn runs_merge_contiguous_data() {
        assert!(continues(Unit::Data(0x10000), 0x10000, Unit::Data(0x20000)));
        assert!(!continues(
            Unit::Data(0x10000),
            0x10000,
            Unit::Data(0x30000)
        ));
        assert!(!continues(Unit::Compressed(1), 1, Unit::Compressed(1)));
    }
}
