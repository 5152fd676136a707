//! Streaming VHD writer: fixed, dynamic and differencing.
//!
//! We are not Hyper-V, so the creator app is `hfst`. The geometry is the specification's
//! CHS for the size when it describes the size exactly; otherwise the maximum geometry,
//! which makes qemu (and our reader) take CurrentSize: either way every reader sees the
//! exact virtual size.

use super::{
    DYN_HEADER_SIZE, FOOTER_SIZE, MAX_BLOCK, MAX_SIZE, MIN_BLOCK, TYPE_DIFFERENCING, TYPE_DYNAMIC,
    TYPE_FIXED, UNALLOCATED, bitmap_size, checksum, choose_footer, size_rule,
};
use crate::backing::{FileBacking, le};
use crate::sink::{CreateOptions, OrderCheck, OutFile, Sink, create_file};
use crate::{Error, Format, Result, Subformat};
use std::path::{Component, Path, PathBuf};

/// Default block size of dynamic images.
const DEFAULT_BLOCK: u64 = 2 << 20;
/// Largest BAT we keep in memory (16 Mi blocks = 64 MiB).
const MAX_ENTRIES: u64 = 16 << 20;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC (the VHD epoch).
const VHD_EPOCH: u64 = 946_684_800;

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(at..at + v.len()) {
        d.copy_from_slice(v);
    }
}

/// The specification's CHS geometry for `size` bytes (cylinders, heads, sectors).
pub(crate) fn spec_chs(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(super::MAX_CHS_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    let cyl = cth / heads;
    (
        u16::try_from(cyl).unwrap_or(u16::MAX),
        u8::try_from(heads).unwrap_or(16),
        u8::try_from(spt).unwrap_or(255),
    )
}

/// The geometry we store: exact CHS when it exists, else the maximum (CurrentSize rule).
pub(crate) fn geometry_for(size: u64) -> (u16, u8, u8) {
    let (c, h, s) = spec_chs(size);
    if u64::from(c) * u64::from(h) * u64::from(s) * 512 == size {
        (c, h, s)
    } else {
        (65535, 16, 255)
    }
}

/// A fresh random-enough UniqueId (time, process, counter, mixed by splitmix64).
fn new_unique_id() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CTR: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut state = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ CTR
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut id = [0u8; 16];
    put(&mut id, 0, &next().to_be_bytes());
    put(&mut id, 8, &next().to_be_bytes());
    id[6] = (id[6] & 0x0F) | 0x40; // version 4
    id[8] = (id[8] & 0x3F) | 0x80; // RFC 4122 variant
    id
}

fn vhd_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// Builds a footer.
fn build_footer(disk_type: u32, data_offset: u64, size: u64, uid: &[u8; 16], ts: u32) -> [u8; 512] {
    let mut f = [0u8; 512];
    let (c, h, s) = geometry_for(size);
    put(&mut f, 0, b"conectix");
    put(&mut f, 8, &2u32.to_be_bytes());
    put(&mut f, 12, &0x0001_0000u32.to_be_bytes());
    put(&mut f, 16, &data_offset.to_be_bytes());
    put(&mut f, 24, &ts.to_be_bytes());
    put(&mut f, 28, b"hfst");
    put(&mut f, 32, &0x0000_0001u32.to_be_bytes());
    put(&mut f, 36, b"Wi2k");
    put(&mut f, 40, &size.to_be_bytes());
    put(&mut f, 48, &size.to_be_bytes());
    put(&mut f, 56, &c.to_be_bytes());
    put(&mut f, 58, &[h, s]);
    put(&mut f, 60, &disk_type.to_be_bytes());
    put(&mut f, 68, uid);
    let sum = checksum(&f, 64);
    put(&mut f, 64, &sum.to_be_bytes());
    f
}

/// `to` relative to the folder `from` (both absolute), Windows style (`.\x.vhd`).
fn relative_windows(from: &Path, to: &Path) -> Option<String> {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in b.get(common..)? {
        match c {
            Component::Normal(n) => parts.push(n.to_str()?.to_string()),
            _ => return None,
        }
    }
    if parts.first().is_none_or(|p| p != "..") {
        parts.insert(0, ".".into());
    }
    Some(parts.join("\\"))
}

/// What a differencing writer records about its parent.
struct ParentLink {
    uid: [u8; 16],
    timestamp: u32,
    name: String,
    relative: Option<String>,
    absolute: String,
}

fn parent_link(child: &Path, parent: &Path, size: u64) -> Result<ParentLink> {
    let pb = FileBacking::open(parent)?;
    let fmt = crate::detect(pb.as_ref())?;
    if fmt != Format::Vhd {
        return Err(Error::Invalid(format!(
            "{}: the parent of a VHD must be a VHD, not {fmt}",
            parent.display()
        )));
    }
    let f = choose_footer(pb.as_ref())?;
    let (psize, _) = size_rule(&f);
    if psize != size {
        return Err(Error::Invalid(format!(
            "{}: parent has {psize} bytes, the differencing image would have {size}",
            parent.display()
        )));
    }
    let abs = std::fs::canonicalize(parent).map_err(|e| Error::io(parent, "resolve", e))?;
    let child_dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let child_dir =
        std::fs::canonicalize(&child_dir).map_err(|e| Error::io(&child_dir, "resolve", e))?;
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(ParentLink {
        uid: f.unique_id,
        timestamp: f.timestamp,
        name,
        relative: relative_windows(&child_dir, &abs),
        absolute: abs.to_string_lossy().into_owned(),
    })
}

/// Block table state of a dynamic or differencing writer.
struct SparseState {
    block_size: u64,
    bitmap_size: u64,
    table_offset: u64,
    bat: Vec<u32>,
    /// Next free byte of the file (blocks are appended here).
    next_free: u64,
    /// Differencing: the sector bitmap of the block being written (index, bits).
    diff_bitmap: Option<Option<(u64, Vec<u8>)>>,
    /// Dynamic: all ones, written in front of each new block.
    ones: Vec<u8>,
    header: [u8; DYN_HEADER_SIZE as usize],
    /// Parent locator data to write at finish: (file offset, bytes).
    locators: Vec<(u64, Vec<u8>)>,
}

/// Writer of VHD images.
pub struct VhdWriter {
    file: OutFile,
    path: PathBuf,
    order: OrderCheck,
    size: u64,
    footer: [u8; 512],
    sparse: Option<SparseState>,
}

/// Creates a VHD image at `path`.
pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    let size = opts.virtual_size;
    if !size.is_multiple_of(512) || size > MAX_SIZE {
        return Err(Error::Invalid(format!(
            "VHD virtual size {size} must be a multiple of 512 and at most 2040 GiB"
        )));
    }
    if opts.logical_sector_size != 512 {
        return Err(Error::Invalid(format!(
            "VHD has 512-byte sectors, not {}",
            opts.logical_sector_size
        )));
    }
    let diff = opts.subformat == Subformat::Differencing;
    if opts.parent.is_some() && !diff {
        return Err(Error::Invalid(
            "only a differencing VHD has a parent".into(),
        ));
    }
    let uid = new_unique_id();
    let ts = vhd_timestamp();
    if opts.subformat == Subformat::Fixed {
        let file = create_file(path, opts)?;
        file.set_len(size + FOOTER_SIZE)
            .map_err(|e| Error::io(path, "set length", e))?;
        return Ok(Box::new(VhdWriter {
            file,
            path: path.to_path_buf(),
            order: OrderCheck::new(size, 512),
            size,
            footer: build_footer(TYPE_FIXED, u64::MAX, size, &uid, ts),
            sparse: None,
        }));
    }
    let block_size = opts.block_size.unwrap_or(DEFAULT_BLOCK);
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(Error::Invalid(format!(
            "VHD block size {block_size} must be a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
        )));
    }
    let entries = size.div_ceil(block_size);
    if entries > MAX_ENTRIES {
        return Err(Error::Invalid(format!(
            "{entries} blocks of {block_size} bytes: choose a larger block size"
        )));
    }
    let link = match (&opts.parent, diff) {
        (Some(p), true) => Some(parent_link(path, p, size)?),
        (None, true) => return Err(Error::Invalid("a differencing image needs a parent".into())),
        _ => None,
    };
    let table_offset = FOOTER_SIZE + DYN_HEADER_SIZE;
    let mut next_free = table_offset + (entries * 4).div_ceil(512) * 512;

    let mut h = [0u8; DYN_HEADER_SIZE as usize];
    put(&mut h, 0, b"cxsparse");
    put(&mut h, 8, &u64::MAX.to_be_bytes());
    put(&mut h, 16, &table_offset.to_be_bytes());
    put(&mut h, 24, &0x0001_0000u32.to_be_bytes());
    put(&mut h, 28, &(entries as u32).to_be_bytes());
    put(&mut h, 32, &(block_size as u32).to_be_bytes());
    let mut locators = Vec::new();
    if let Some(l) = &link {
        put(&mut h, 40, &l.uid);
        put(&mut h, 56, &l.timestamp.to_be_bytes());
        let name: Vec<u8> = l
            .name
            .encode_utf16()
            .take(256)
            .flat_map(u16::to_be_bytes)
            .collect();
        put(&mut h, 64, &name);
        let mut entries = Vec::new();
        if let Some(rel) = &l.relative {
            entries.push((*b"W2ru", le::utf16_bytes(rel)));
        }
        entries.push((*b"W2ku", le::utf16_bytes(&l.absolute)));
        for (i, (code, data)) in entries.into_iter().enumerate() {
            let at = 576 + 24 * i;
            let space = (data.len() as u64).div_ceil(512) * 512;
            put(&mut h, at, &code);
            // DataSpace in bytes, as Windows writes it.
            put(&mut h, at + 4, &(space as u32).to_be_bytes());
            put(&mut h, at + 8, &(data.len() as u32).to_be_bytes());
            put(&mut h, at + 16, &next_free.to_be_bytes());
            locators.push((next_free, data));
            next_free += space;
        }
    }
    let sum = checksum(&h, 36);
    put(&mut h, 36, &sum.to_be_bytes());

    let file = create_file(path, opts)?;
    let bmsz = bitmap_size(block_size);
    let disk_type = if diff {
        TYPE_DIFFERENCING
    } else {
        TYPE_DYNAMIC
    };
    Ok(Box::new(VhdWriter {
        file,
        path: path.to_path_buf(),
        order: OrderCheck::new(size, 512),
        size,
        footer: build_footer(disk_type, FOOTER_SIZE, size, &uid, ts),
        sparse: Some(SparseState {
            block_size,
            bitmap_size: bmsz,
            table_offset,
            bat: vec![UNALLOCATED; entries as usize],
            next_free,
            diff_bitmap: diff.then_some(None),
            ones: if diff {
                Vec::new()
            } else {
                vec![0xFF; bmsz as usize]
            },
            header: h,
            locators,
        }),
    }))
}

impl VhdWriter {
    fn write(&self, data: &[u8], at: u64) -> Result<()> {
        self.file.write_at(data, at)
    }

    /// Writes out the bitmap of the differencing block being filled.
    fn flush_bitmap(&mut self) -> Result<()> {
        let Some(s) = &mut self.sparse else {
            return Ok(());
        };
        let Some(slot) = &mut s.diff_bitmap else {
            return Ok(());
        };
        if let Some((idx, bits)) = slot.take() {
            let at = s.bat.get(idx as usize).map_or(0, |&e| u64::from(e) * 512);
            self.file.write_at(&bits, at)?;
        }
        Ok(())
    }

    /// File offset of block `idx`'s bitmap, allocating the block at the end if new.
    fn block(&mut self, idx: u64) -> Result<u64> {
        let current = self
            .sparse
            .as_ref()
            .and_then(|s| s.bat.get(idx as usize).copied())
            .ok_or_else(|| Error::Invalid("internal: block outside the table".into()))?;
        if current != UNALLOCATED {
            return Ok(u64::from(current) * 512);
        }
        // A new block: the previous differencing bitmap is complete.
        self.flush_bitmap()?;
        let Some(s) = &mut self.sparse else {
            return Err(Error::Invalid("internal: not a sparse image".into()));
        };
        let at = s.next_free;
        let sector = u32::try_from(at / 512)
            .ok()
            .filter(|&x| x != UNALLOCATED)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: VHD file would exceed 2 TiB",
                    self.path.display()
                ))
            })?;
        if let Some(e) = s.bat.get_mut(idx as usize) {
            *e = sector;
        }
        s.next_free = at + s.bitmap_size + s.block_size;
        match &mut s.diff_bitmap {
            Some(slot) => *slot = Some((idx, vec![0u8; s.bitmap_size as usize])),
            None => {
                self.file.write_at(&s.ones, at)?;
            }
        }
        Ok(at)
    }

    /// Differencing: marks the sectors of `[in_blk, in_blk+len)` of block `idx` present.
    fn mark(&mut self, idx: u64, in_blk: u64, len: u64) {
        let Some(Some(Some((cur, bits)))) = self.sparse.as_mut().map(|s| s.diff_bitmap.as_mut())
        else {
            return;
        };
        if *cur != idx {
            return;
        }
        let first = in_blk / 512;
        let last = (in_blk + len).div_ceil(512);
        for sector in first..last {
            if let Some(b) = bits.get_mut((sector / 8) as usize) {
                *b |= 0x80 >> (sector % 8);
            }
        }
    }

    /// Splits `[offset, offset+len)` at block boundaries.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let bs = self.sparse.as_ref().map_or(u64::MAX, |s| s.block_size);
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_blk = pos % bs;
            let n = (end - pos).min(bs - in_blk);
            out.push((pos / bs, in_blk, n));
            pos += n;
        }
        out
    }
}

impl Sink for VhdWriter {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.order.advance(offset, data.len() as u64)?;
        let Some(s) = &self.sparse else {
            return self.write(data, offset);
        };
        let bmsz = s.bitmap_size;
        let mut done = 0usize;
        for (idx, in_blk, n) in self.pieces(offset, data.len() as u64) {
            let at = self.block(idx)?;
            let part = data
                .get(done..done + n as usize)
                .ok_or_else(|| Error::Invalid("internal: piece outside the buffer".into()))?;
            self.write(part, at + bmsz + in_blk)?;
            self.mark(idx, in_blk, n);
            done += n as usize;
        }
        Ok(())
    }

    fn write_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.order.advance(offset, len)?;
        // Only a differencing image must record zeros (to hide the parent); the new
        // block's data is a file hole, which reads as zeros.
        if self
            .sparse
            .as_ref()
            .is_some_and(|s| s.diff_bitmap.is_some())
        {
            for (idx, in_blk, n) in self.pieces(offset, len) {
                self.block(idx)?;
                self.mark(idx, in_blk, n);
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush_bitmap()?;
        let end = match self.sparse.take() {
            None => self.size,
            Some(s) => {
                // BAT in pieces of 1 MiB, so no second copy of the whole table.
                let mut at = s.table_offset;
                for chunk in s.bat.chunks(256 * 1024) {
                    let bytes: Vec<u8> = chunk.iter().flat_map(|e| e.to_be_bytes()).collect();
                    self.write(&bytes, at)?;
                    at += bytes.len() as u64;
                }
                // Pad the last BAT sector with unallocated entries.
                let pad = (512 - (at % 512)) % 512;
                if pad > 0 {
                    self.write(&vec![0xFF; pad as usize], at)?;
                }
                for (off, data) in &s.locators {
                    self.write(data, *off)?;
                }
                self.write(&s.header, FOOTER_SIZE)?;
                self.write(&self.footer, 0)?;
                s.next_free
            }
        };
        self.write(&self.footer, end)?;
        self.file.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_spec_examples() {
        // qemu's 10 MiB image: 302/4/17 (10514432 bytes)
        assert_eq!(spec_chs(10 << 20), (301, 4, 17));
        assert_eq!(geometry_for(10514432), (302, 4, 17));
        assert_eq!(geometry_for(10 << 20), (65535, 16, 255));
        assert_eq!(spec_chs(3 << 40), (65535, 16, 255));
    }

    #[test]
    fn relative_paths_are_windows_style() {
        assert_eq!(
            relative_windows(Path::new("/a/b"), Path::new("/a/b/p.vhd")).as_deref(),
            Some(".\\p.vhd")
        );
        assert_eq!(
            relative_windows(Path::new("/a/b"), Path::new("/a/c/p.vhd")).as_deref(),
            Some("..\\c\\p.vhd")
        );
    }
}
