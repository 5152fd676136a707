//! Reading a recovery point's disk as a virtual disk: [`PointDisk`], random access to
//! one disk of a recovery point, generic over where its blobs come from
//! ([`BlobSource`]): the datastore itself ([`LocalBlobs`]: restore, item-level
//! recovery, NBD exports and the server's block API) or the server, for an agent's
//! recovery (the agent's fetcher). One piece cache, one block lookup and one range
//! check serve them all.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::manifest::{DiskRecord, Manifest};
use crate::store::{BlobIndex, Datastore};
use locks::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use vdisk::{DiskInfo, Extent, ExtentState, Format, Subformat, VirtualDisk};

/// Index pieces kept in memory (64 MiB of disk each at the default sizes).
const PIECE_CACHE: usize = 64;

/// Where a [`PointDisk`] gets its blobs: index pieces and data blocks by id, each
/// checked against its id by the source (it holds the keys, or asks who does).
pub trait BlobSource: Send + Sync + std::fmt::Debug {
    /// Where the blobs come from, for [`DiskInfo::path`] (`LOCATION#POINT/diskN`).
    fn location(&self) -> String;

    /// The block ids index piece `id` holds.
    fn piece(&self, id: Id) -> vdisk::Result<Vec<Id>>;

    /// Fills every read's `out` with bytes `within..within + out.len()` of its block.
    fn read_blocks(&self, disk: DiskRef<'_>, reads: &mut [BlockRead<'_>]) -> vdisk::Result<()>;
}

/// The disk a [`BlobSource`] reads for (messages name it).
#[derive(Debug, Clone, Copy)]
pub struct DiskRef<'a> {
    /// The recovery point's id.
    pub point: &'a str,
    pub rec: &'a DiskRecord,
}

/// One data block a read needs (never the zero block: holes are filled by the disk).
#[derive(Debug)]
pub struct BlockRead<'b> {
    /// Block number within the disk.
    pub block: u64,
    pub id: Id,
    /// Bytes the block holds (the last block of a disk may be short).
    pub block_len: usize,
    /// Where `out` starts within the block.
    pub within: usize,
    pub out: &'b mut [u8],
}

impl<S: BlobSource + ?Sized> BlobSource for &S {
    fn location(&self) -> String {
        (**self).location()
    }
    fn piece(&self, id: Id) -> vdisk::Result<Vec<Id>> {
        (**self).piece(id)
    }
    fn read_blocks(&self, disk: DiskRef<'_>, reads: &mut [BlockRead<'_>]) -> vdisk::Result<()> {
        (**self).read_blocks(disk, reads)
    }
}

/// The datastore a [`LocalBlobs`] reads from: borrowed, or shared so the disk can be
/// `'static` (file-system readers and NBD exports keep it on other threads).
#[derive(Debug)]
enum StoreRef<'a> {
    Borrowed(&'a Datastore),
    Shared(Arc<Datastore>),
}

impl std::ops::Deref for StoreRef<'_> {
    type Target = Datastore;
    fn deref(&self) -> &Datastore {
        match self {
            StoreRef::Borrowed(d) => d,
            StoreRef::Shared(d) => d,
        }
    }
}

/// Blobs read straight from a datastore (decoded and checked by it).
#[derive(Debug)]
pub struct LocalBlobs<'a> {
    store: StoreRef<'a>,
    index: Arc<BlobIndex>,
}

/// A recovery point's disk read from the datastore.
pub type LocalPointDisk<'a> = PointDisk<LocalBlobs<'a>>;

fn to_vdisk(e: Error) -> vdisk::Error {
    match e {
        Error::Disk(d) => d,
        other => vdisk::Error::other("", other),
    }
}

impl BlobSource for LocalBlobs<'_> {
    fn location(&self) -> String {
        self.store.backend.location()
    }

    fn piece(&self, id: Id) -> vdisk::Result<Vec<Id>> {
        self.store.read_piece(&self.index, id).map_err(to_vdisk)
    }

    fn read_blocks(&self, disk: DiskRef<'_>, reads: &mut [BlockRead<'_>]) -> vdisk::Result<()> {
        let bs = disk.rec.block_size as u64;
        let at = |block: u64, what: String| {
            vdisk::Error::Invalid(format!(
                "recovery point {} disk {} offset {}: {what}",
                disk.point,
                disk.rec.index,
                block.saturating_mul(bs)
            ))
        };
        let mut locs = Vec::with_capacity(reads.len());
        for r in reads.iter() {
            let loc = self
                .index
                .map
                .get(&r.id)
                .ok_or_else(|| at(r.block, format!("blob {} is missing", r.id)))?;
            locs.push(*loc);
        }
        let mut plain = Vec::with_capacity(bs as usize);
        let mut run = Vec::new();
        let mut i = 0;
        while i < reads.len() {
            let j = run_end(&locs, i);
            let first = locs[i];
            let start = u64::from(first.offset);
            let last = locs[j - 1];
            let end = u64::from(last.offset) + u64::from(last.len);
            let key = crate::format::pack_key(&self.index.packs[first.pack as usize]);
            run.resize((end - start) as usize, 0);
            self.store
                .backend
                .get_range(&key, start, &mut run)
                .map_err(|e| at(reads[i].block, e.to_string()))?;
            let keys = self.store.keys();
            for (r, loc) in reads[i..j].iter_mut().zip(&locs[i..j]) {
                let off = u64::from(loc.offset);
                let from = (off - start) as usize;
                let framed = &mut run[from..from + loc.len as usize];
                if r.within == 0 && r.out.len() == r.block_len {
                    // A whole block: decode straight into the caller's buffer.
                    crate::format::decode_blob_into(keys, &key, off, r.id, framed, r.out)
                        .map_err(|e| at(r.block, e.to_string()))?;
                } else {
                    crate::format::decode_blob(keys, &key, off, r.id, framed, &mut plain)
                        .map_err(|e| at(r.block, e.to_string()))?;
                    let src = plain.get(r.within..r.within + r.out.len()).ok_or_else(|| {
                        at(
                            r.block,
                            format!("block is {} bytes, too short", plain.len()),
                        )
                    })?;
                    r.out.copy_from_slice(src);
                }
            }
            i = j;
        }
        Ok(())
    }
}

/// The most one ranged read of adjacent blobs fetches (a pack is 8 MiB).
const MAX_RUN: u64 = 8 << 20;

/// The end (exclusive) of the run of reads from `i` whose blobs lie one after another
/// in one pack: they are fetched with one ranged read (on object storage one request
/// instead of one a block).
fn run_end(locs: &[crate::store::Loc], i: usize) -> usize {
    let first = locs[i];
    let start = u64::from(first.offset);
    let mut end = start + u64::from(first.len);
    let mut j = i + 1;
    while let Some(l) = locs.get(j) {
        if l.pack != first.pack
            || u64::from(l.offset) != end
            || end - start + u64::from(l.len) > MAX_RUN
        {
            break;
        }
        end += u64::from(l.len);
        j += 1;
    }
    j
}

impl Datastore {
    /// Opens disk `disk` of recovery point `m` for reading.
    pub fn open_disk<'a>(
        &'a self,
        m: &Manifest,
        disk: usize,
        index: Arc<BlobIndex>,
    ) -> Result<LocalPointDisk<'a>> {
        let blobs = LocalBlobs {
            store: StoreRef::Borrowed(self),
            index,
        };
        PointDisk::open(blobs, m, disk)
    }

    /// [`Datastore::open_disk`] holding a share of the datastore: the disk lives as long
    /// as needed.
    pub fn open_disk_shared(
        self: &Arc<Self>,
        m: &Manifest,
        disk: usize,
        index: Arc<BlobIndex>,
    ) -> Result<LocalPointDisk<'static>> {
        let blobs = LocalBlobs {
            store: StoreRef::Shared(self.clone()),
            index,
        };
        PointDisk::open(blobs, m, disk)
    }
}

/// One disk of a recovery point, readable through [`VirtualDisk`], its blobs read from
/// `S`.
#[derive(Debug)]
pub struct PointDisk<S> {
    source: S,
    point: String,
    rec: DiskRecord,
    pieces: Vec<Id>,
    cache: Mutex<HashMap<usize, Arc<Vec<Id>>>>,
}

impl<S: BlobSource> PointDisk<S> {
    /// Disk `disk` of recovery point `m`, its blobs read from `source`.
    pub fn open(source: S, m: &Manifest, disk: usize) -> Result<PointDisk<S>> {
        let rec = m.disks.get(disk).ok_or_else(|| {
            Error::Invalid(format!(
                "recovery point {} has {} disk(s); there is no disk {disk} (disks are numbered from 0)",
                m.id,
                m.disks.len()
            ))
        })?;
        PointDisk::with_record(source, &m.id, disk, rec)
    }

    /// The disk `rec` describes (disk `disk` of recovery point `point`).
    pub fn with_record(
        source: S,
        point: &str,
        disk: usize,
        rec: &DiskRecord,
    ) -> Result<PointDisk<S>> {
        let key = format!("points/{point}");
        let pieces = rec
            .pieces
            .iter()
            .map(|h| {
                Id::from_hex(h)
                    .ok_or_else(|| Error::corrupt(&key, format!("disk {disk}: bad piece id {h:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        if rec.block_size == 0
            || rec.piece_blocks == 0
            || pieces.len() as u64 != rec.blocks().div_ceil(rec.piece_blocks as u64)
        {
            return Err(Error::corrupt(
                &key,
                format!("disk {disk}: index does not cover the disk"),
            ));
        }
        Ok(PointDisk {
            source,
            point: point.to_string(),
            rec: rec.clone(),
            pieces,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn record(&self) -> &DiskRecord {
        &self.rec
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    fn piece(&self, p: usize) -> vdisk::Result<Arc<Vec<Id>>> {
        if let Some(ids) = lock(&self.cache).get(&p) {
            return Ok(ids.clone());
        }
        let pid = *self.pieces.get(p).ok_or_else(|| {
            vdisk::Error::Invalid(format!("index piece {p} is past the disk's end"))
        })?;
        let ids = self.source.piece(pid)?;
        let pb = self.rec.piece_blocks as u64;
        let want = (self.rec.blocks() - p as u64 * pb).min(pb);
        if ids.len() as u64 != want {
            return Err(to_vdisk(Error::corrupt(
                format!("index piece {pid}"),
                format!("holds {} entries, expected {want}", ids.len()),
            )));
        }
        let ids = Arc::new(ids);
        let mut c = lock(&self.cache);
        if c.len() >= PIECE_CACHE {
            c.clear();
        }
        c.insert(p, ids.clone());
        Ok(ids)
    }

    fn block_id(&self, b: u64) -> vdisk::Result<Id> {
        let pb = self.rec.piece_blocks as u64;
        let ids = self.piece((b / pb) as usize)?;
        ids.get((b % pb) as usize)
            .copied()
            .ok_or_else(|| vdisk::Error::Invalid(format!("block {b} is not in its index piece")))
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes: the one
/// range check of every recovery-point reader.
pub fn check_range(offset: u64, len: u64, size: u64) -> vdisk::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(vdisk::Error::OutOfRange { offset, len, size }),
    }
}

impl<S: BlobSource> VirtualDisk for PointDisk<S> {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            path: format!(
                "{}#{}/disk{}",
                self.source.location(),
                self.point,
                self.rec.index
            )
            .into(),
            format: Format::Raw,
            subformat: Subformat::Fixed,
            virtual_size: self.rec.virtual_size,
            logical_sector_size: self.rec.logical_sector_size,
            physical_sector_size: self.rec.physical_sector_size,
            block_size: Some(self.rec.block_size as u64),
            file_size: 0,
            allocated_bytes: 0,
            details: vec![
                ("recovery point".into(), self.point.clone()),
                ("source format".into(), self.rec.format.clone()),
            ],
            parent: None,
        }
    }

    fn virtual_size(&self) -> u64 {
        self.rec.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        check_range(offset, buf.len() as u64, self.rec.virtual_size)?;
        let bs = self.rec.block_size as u64;
        // Split the buffer by block: holes are filled here, data blocks go to the
        // source all at once (a remote source fetches them in parallel batches).
        let mut reads = Vec::new();
        let mut rest: &mut [u8] = buf;
        let mut pos = offset;
        while !rest.is_empty() {
            let b = pos / bs;
            let within = (pos % bs) as usize;
            let n = (bs as usize - within).min(rest.len());
            let (out, tail) = rest.split_at_mut(n);
            rest = tail;
            let id = self.block_id(b)?;
            if id.is_zero() {
                out.fill(0);
            } else {
                reads.push(BlockRead {
                    block: b,
                    id,
                    block_len: (self.rec.virtual_size - b * bs).min(bs) as usize,
                    within,
                    out,
                });
            }
            pos += n as u64;
        }
        if reads.is_empty() {
            return Ok(());
        }
        let disk = DiskRef {
            point: &self.point,
            rec: &self.rec,
        };
        self.source.read_blocks(disk, &mut reads)
    }

    fn map(&self, offset: u64, length: u64) -> vdisk::Result<Vec<Extent>> {
        check_range(offset, length, self.rec.virtual_size)?;
        block_extents(offset, length, self.rec.block_size, |b| {
            self.block_id(b).map(|id| id.is_zero())
        })
    }
}

/// The extents of `[offset, offset + length)` of a disk indexed in blocks of
/// `block_size` bytes, `zero(b)` telling whether block `b` is the zero block (a hole).
/// The range must already be checked against the disk's size.
pub fn block_extents(
    offset: u64,
    length: u64,
    block_size: u32,
    mut zero: impl FnMut(u64) -> vdisk::Result<bool>,
) -> vdisk::Result<Vec<Extent>> {
    let bs = u64::from(block_size.max(1));
    let end = offset.saturating_add(length);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let b = pos / bs;
        let next = ((b + 1) * bs).min(end);
        let state = if zero(b)? {
            ExtentState::Zero
        } else {
            ExtentState::Data
        };
        vdisk::extent::push_extent(&mut out, pos, next - pos, state);
        pos = next;
    }
    Ok(out)
}
