//! Reading a recovery point's disk as a virtual disk: random access straight from the
//! datastore (restore, and later item-level recovery and NBD exports).

use crate::error::{Error, Result};
use crate::id::Id;
use crate::manifest::{DiskRecord, Manifest};
use crate::store::{BlobIndex, Datastore};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use vdisk::{DiskInfo, Extent, ExtentState, Format, Subformat, VirtualDisk};

/// Index pieces kept in memory (64 MiB of disk each at the default sizes).
const PIECE_CACHE: usize = 64;

/// The datastore a [`PointDisk`] reads from: borrowed, or shared so the disk can be
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

/// One disk of a recovery point, readable through [`VirtualDisk`].
#[derive(Debug)]
pub struct PointDisk<'a> {
    store: StoreRef<'a>,
    index: Arc<BlobIndex>,
    point: String,
    rec: DiskRecord,
    pieces: Vec<Id>,
    cache: Mutex<HashMap<usize, Arc<Vec<Id>>>>,
}

impl Datastore {
    /// Opens disk `disk` of recovery point `m` for reading.
    pub fn open_disk<'a>(
        &'a self,
        m: &Manifest,
        disk: usize,
        index: Arc<BlobIndex>,
    ) -> Result<PointDisk<'a>> {
        open_point_disk(StoreRef::Borrowed(self), m, disk, index)
    }

    /// [`Datastore::open_disk`] holding a share of the datastore: the disk lives as long
    /// as needed.
    pub fn open_disk_shared(
        self: &Arc<Self>,
        m: &Manifest,
        disk: usize,
        index: Arc<BlobIndex>,
    ) -> Result<PointDisk<'static>> {
        open_point_disk(StoreRef::Shared(self.clone()), m, disk, index)
    }
}

fn open_point_disk<'a>(
    store: StoreRef<'a>,
    m: &Manifest,
    disk: usize,
    index: Arc<BlobIndex>,
) -> Result<PointDisk<'a>> {
    let rec = m.disks.get(disk).cloned().ok_or_else(|| {
        Error::Invalid(format!(
            "recovery point {} has {} disk(s); there is no disk {disk} (disks are numbered from 0)",
            m.id,
            m.disks.len()
        ))
    })?;
    let key = format!("points/{}", m.id);
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
        store,
        index,
        point: m.id.clone(),
        rec,
        pieces,
        cache: Mutex::new(HashMap::new()),
    })
}

impl PointDisk<'_> {
    pub fn record(&self) -> &DiskRecord {
        &self.rec
    }

    fn piece(&self, p: usize) -> Result<Arc<Vec<Id>>> {
        if let Some(ids) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&p) {
            return Ok(ids.clone());
        }
        let ids = self.store.read_piece(&self.index, self.pieces[p])?;
        let pb = self.rec.piece_blocks as u64;
        let want = (self.rec.blocks() - p as u64 * pb).min(pb);
        if ids.len() as u64 != want {
            return Err(Error::corrupt(
                format!("index piece {}", self.pieces[p]),
                format!("holds {} entries, expected {want}", ids.len()),
            ));
        }
        let ids = Arc::new(ids);
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= PIECE_CACHE {
            c.clear();
        }
        c.insert(p, ids.clone());
        Ok(ids)
    }

    fn block_id(&self, b: u64) -> Result<Id> {
        let pb = self.rec.piece_blocks as u64;
        let ids = self.piece((b / pb) as usize)?;
        Ok(ids[(b % pb) as usize])
    }

    fn check_range(&self, offset: u64, len: u64) -> vdisk::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.rec.virtual_size => Ok(()),
            _ => Err(vdisk::Error::OutOfRange {
                offset,
                len,
                size: self.rec.virtual_size,
            }),
        }
    }
}

fn to_vdisk(e: Error) -> vdisk::Error {
    match e {
        Error::Disk(d) => d,
        other => vdisk::Error::Invalid(other.to_string()),
    }
}

impl VirtualDisk for PointDisk<'_> {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            path: format!(
                "{}#{}/disk{}",
                self.store.backend.location(),
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
        self.check_range(offset, buf.len() as u64)?;
        let bs = self.rec.block_size as u64;
        let mut plain = Vec::with_capacity(bs as usize);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / bs;
            let within = (pos % bs) as usize;
            let n = (bs as usize - within).min(buf.len() - done);
            let id = self.block_id(b).map_err(to_vdisk)?;
            let out = &mut buf[done..done + n];
            let block_len = (self.rec.virtual_size - b * bs).min(bs) as usize;
            let at = |what: String| {
                vdisk::Error::Invalid(format!(
                    "recovery point {} disk {} offset {}: {what}",
                    self.point,
                    self.rec.index,
                    b * bs
                ))
            };
            if id.is_zero() {
                out.fill(0);
            } else if within == 0 && n == block_len {
                // A whole block: decode straight into the caller's buffer.
                self.store
                    .read_blob_into(&self.index, id, out)
                    .map_err(|e| at(e.to_string()))?;
            } else {
                self.store
                    .read_blob(&self.index, id, &mut plain)
                    .map_err(|e| at(e.to_string()))?;
                let src = plain
                    .get(within..within + n)
                    .ok_or_else(|| at(format!("block is {} bytes, too short", plain.len())))?;
                out.copy_from_slice(src);
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> vdisk::Result<Vec<Extent>> {
        self.check_range(offset, length)?;
        block_extents(offset, length, self.rec.block_size, |b| {
            self.block_id(b).map(|id| id.is_zero()).map_err(to_vdisk)
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
