//! Taking a recovery point: read (only what changed, when told), hash, deduplicate,
//! compress, encrypt and pack blocks, then write the index pieces and the manifest.
//!
//! Pipeline (bounded: a fixed pool of segment buffers and at most two packs in memory):
//! one reader thread maps and reads 4 MiB segments → N worker threads hash, check the
//! blob index and compress/encrypt new blocks → this thread puts results back in disk
//! order, fills packs and index pieces → one uploader thread stores finished packs
//! (temporary name, fsync, rename, fsync of the folder).

use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, Kind, PackBuilder, PackEntry};
use crate::id::Id;
use crate::manifest::{
    Consistency, DiskRecord, MANIFEST_FORMAT, MANIFEST_VERSION, Manifest, Source, Stats,
};
use crate::ranges::RangeCursor;
use crate::store::{BlobIndex, Datastore};
use crate::throttle::Throttle;
use locks::lock;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::ScopedJoinHandle;
use vdisk::VirtualDisk;
use vdisk::aligned::AlignedBuf;

/// Which recovery point a backup builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseChoice {
    /// The latest recovery point of the same source, if any.
    Latest,
    /// A given recovery point (of the same source).
    Point(String),
    /// None: read and store everything (still deduplicated against the datastore).
    None,
}

/// One disk to back up.
#[derive(Debug)]
pub struct DiskInput<'a> {
    pub disk: &'a dyn VirtualDisk,
    /// File name of the image (recorded).
    pub name: String,
    /// Format of the image (recorded; restore writes it back in this format by default).
    pub format: String,
    /// Changed ranges since the base recovery point (sorted, merged, in range), from
    /// hypervisor change tracking; `None` = read everything and compare by checksum.
    pub changed: Option<Vec<(u64, u64)>>,
    /// Ranges not to back up (a page file, swap): stored as zeros and recorded in the
    /// recovery point. Sorted and disjoint, inside the disk; empty = none.
    pub excluded: Vec<(u64, u64)>,
}

/// A backup to take.
#[derive(Debug)]
pub struct BackupRequest<'a> {
    pub source: Source,
    pub consistency: Consistency,
    pub base: BaseChoice,
    pub disks: Vec<DiskInput<'a>>,
}

#[derive(Clone, Copy)]
enum Plan {
    Zero,
    Reuse(Id),
    Read,
}

enum Work {
    /// A whole index piece taken from the base unchanged.
    Piece { id: Id, blocks: u64 },
    Blocks {
        first: u64,
        plans: Vec<Plan>,
        buf: Vec<u8>,
        read: u64,
    },
}

enum Done {
    Zero,
    Reuse(Id),
    Known(Id),
    New {
        id: Id,
        plain: u32,
        start: usize,
        end: usize,
    },
}

enum Processed {
    Piece {
        id: Id,
        blocks: u64,
    },
    Blocks {
        done: Vec<Done>,
        framed: Vec<u8>,
        read: u64,
        /// The segment's buffer, returned to the reader's pool once written out.
        buf: Vec<u8>,
    },
}

/// Buffers a [`FreeList`] can hold.
trait Clearable {
    fn clear(&mut self);
}

impl Clearable for Vec<u8> {
    fn clear(&mut self) {
        Vec::clear(self)
    }
}

impl Clearable for AlignedBuf {
    fn clear(&mut self) {
        AlignedBuf::clear(self)
    }
}

/// Finished packs on their way to storage.
type PackMsg = (AlignedBuf, Vec<PackEntry>);

/// Buffers handed back for reuse: fewer page faults, and no heap growth from freeing
/// and re-allocating large blocks.
#[derive(Debug, Default)]
struct FreeList<T = Vec<u8>>(Mutex<Vec<T>>);

impl<T: Default + Clearable> FreeList<T> {
    fn take(&self) -> T {
        let mut v = locks::lock(&self.0).pop().unwrap_or_default();
        v.clear();
        v
    }

    fn give(&self, v: T, max: usize) {
        let mut l = locks::lock(&self.0);
        if l.len() < max {
            l.push(v);
        }
    }
}

/// Parameters a backup pipeline needs to build blobs exactly as the datastore would.
#[derive(Clone, Debug)]
pub struct BlockParams {
    pub block_size: u32,
    pub piece_blocks: u32,
    pub zstd_level: i32,
    pub keys: Keys,
}

impl BlockParams {
    /// The same bounds a datastore's configuration must meet: a remote agent gets these
    /// from the network, and the pipeline sizes buffers with them.
    pub fn check(&self) -> Result<()> {
        if !self.block_size.is_power_of_two()
            || !(4096..=1 << 20).contains(&self.block_size)
            || self.piece_blocks == 0
            || self.piece_blocks > 1 << 16
            || !(1..=22).contains(&self.zstd_level)
        {
            return Err(Error::Invalid(format!(
                "backup parameters out of range: block size {}, piece blocks {}, zstd level {}",
                self.block_size, self.piece_blocks, self.zstd_level
            )));
        }
        Ok(())
    }
}

/// Where a backup's blocks go: the local datastore, or a server over the network.
pub trait BlockTarget: Sync {
    fn params(&self) -> &BlockParams;
    /// For each id, whether the target lacks it. Called with batches (one segment's
    /// blocks per call, from worker threads concurrently), so a remote target makes one
    /// round trip per batch.
    fn missing(&self, ids: &[Id]) -> Result<Vec<bool>>;
    /// An index piece's block ids (for change-tracked backups reusing a base).
    fn read_piece(&self, id: Id) -> Result<Vec<Id>>;
    /// Stores framed blobs (each exactly as [`format::encode_blob`] made it, concatenated
    /// in `framed`), in disk order, from the single consumer thread. A remote target may
    /// batch and send in the background; an error may then surface on a later call or
    /// on `finish`.
    fn put(&self, framed: &[u8]) -> Result<()>;
    /// Everything put is stored (local: packs durable, index file written); returns the
    /// framed bytes stored.
    fn finish(&self) -> Result<u64>;
}

/// Runs the backup pipeline of `disks` against `target`: returns the disk records (with
/// their index pieces) and the totals, `bytes_stored` being what `finish` reported. Does
/// not write a manifest (the caller does: locally [`Datastore::backup`], remotely the
/// server on commit). `base` is the recovery point changed ranges apply to.
/// `progress(done, total)` counts virtual bytes.
pub fn backup_disks(
    target: &dyn BlockTarget,
    base: Option<&Manifest>,
    disks: &[DiskInput<'_>],
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Vec<DiskRecord>, Stats)> {
    let p = target.params();
    p.check()?;
    let bs = p.block_size as u64;
    for (i, d) in disks.iter().enumerate() {
        let size = d.disk.virtual_size();
        if let Some(ch) = &d.changed {
            let b = base.ok_or_else(|| {
                Error::Invalid(format!(
                    "changed ranges were given for disk {i}, but the source has no earlier recovery point to apply them to; the first backup reads everything"
                ))
            })?;
            let bd = b.disks.get(i).ok_or_else(|| {
                Error::Invalid(format!(
                    "changed ranges were given for disk {i}, but recovery point {} has only {} disk(s)",
                    b.id,
                    b.disks.len()
                ))
            })?;
            if bd.virtual_size != size {
                return Err(Error::Invalid(format!(
                    "disk {i} ({}) is {size} bytes but was {} bytes in recovery point {}: change tracking does not cover a resize; back up without --changed-ranges",
                    d.name, bd.virtual_size, b.id
                )));
            }
            if bd.block_size as u64 != bs
                || bd.piece_blocks != p.piece_blocks
                || bd.pieces.len() as u64 != bd.blocks().div_ceil(bd.piece_blocks as u64)
            {
                return Err(Error::Invalid(format!(
                    "recovery point {} disk {i} has an index layout this datastore does not use; back up without --changed-ranges",
                    b.id
                )));
            }
            check_ranges(i, "changed", ch, size)?;
        }
        check_ranges(i, "excluded", &d.excluded, size)?;
    }
    let total: u64 = disks.iter().map(|d| d.disk.virtual_size()).sum();
    let pipe = Pipe {
        target,
        p,
        threads: threads.max(1),
    };
    let mut w = Writer {
        target,
        session: HashSet::new(),
        zstd: zstd::bulk::Compressor::new(p.zstd_level)
            .map_err(|e| Error::Invalid(format!("zstd: {e}")))?,
        framed: Vec::new(),
    };
    let mut stats = Stats::default();
    let mut records = Vec::new();
    let mut done_before = 0u64;
    for (i, d) in disks.iter().enumerate() {
        let base_disk = base.and_then(|b| b.disks.get(i));
        let rec = pipe.backup_disk(i as u32, d, base_disk, &mut w, &mut |n| {
            progress(done_before + n, total)
        })?;
        done_before += d.disk.virtual_size();
        stats.add(&rec.stats);
        records.push(rec);
    }
    stats.bytes_stored = target.finish()?;
    Ok((records, stats))
}

impl Datastore {
    /// Takes a recovery point of `req.disks`; returns its manifest once it is durable
    /// and visible. `progress(done, total)` counts virtual bytes.
    pub fn backup(
        &self,
        req: BackupRequest<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest> {
        self.backup_with(req, None, Pace::default(), progress)
    }

    /// [`Datastore::backup`], keeping a given id and creation time (a copy from another
    /// datastore) when `identity` is set, its pack uploads paced and cancellable by `pace`.
    pub(crate) fn backup_with(
        &self,
        req: BackupRequest<'_>,
        identity: Option<&Identity>,
        pace: Pace<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest> {
        let _lock = self.backend.lock(false, true)?;
        let (started, micros) = utc::now_micros();
        let index = self.blob_index()?;
        let base = self.resolve_base(&req)?;
        let (id, created, created_unix) = match identity {
            Some(i) => (i.id.clone(), i.created.clone(), i.created_unix),
            None => (
                format!(
                    "{}-{}",
                    utc::id_stamp(started, micros),
                    crate::crypto::random_hex(4)?
                ),
                utc::rfc3339(started),
                started,
            ),
        };
        let spare_packs = FreeList::<AlignedBuf>::default();
        let spare = &spare_packs;
        let (records, stats) = std::thread::scope(|scope| {
            let (up_tx, up_rx) = sync_channel::<PackMsg>(0);
            let uploader = scope.spawn(move || self.upload_packs(up_rx, spare, pace));
            let target = LocalTarget {
                store: self,
                index: &index,
                params: self.block_params(),
                name: id.clone(),
                session: Mutex::new(HashSet::new()),
                out: Mutex::new(LocalOut {
                    pack: PackBuilder::new(self.config.pack_size as usize),
                    up: Some(up_tx),
                    spare,
                }),
                uploader: Mutex::new(Some(uploader)),
            };
            match backup_disks(&target, base.as_ref(), &req.disks, self.threads, progress) {
                Ok(r) => Ok(r),
                // The uploader's error (disk full...) is the cause of any send failure.
                Err(e) => Err(target.abandon().err().unwrap_or(e)),
            }
        })?;
        if pace.cancelled() {
            return Err(cancelled());
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            id,
            source: req.source,
            created,
            created_unix,
            base: base.map(|b| b.id),
            consistency: req.consistency,
            disks: records,
            stats,
        };
        self.write_manifest(&manifest)?;
        Ok(manifest)
    }

    /// What a backup pipeline needs to build this datastore's blobs.
    pub fn block_params(&self) -> BlockParams {
        BlockParams {
            block_size: self.config.block_size,
            piece_blocks: self.config.piece_blocks,
            zstd_level: self.config.zstd_level,
            keys: self.keys.clone(),
        }
    }

    fn resolve_base(&self, req: &BackupRequest<'_>) -> Result<Option<Manifest>> {
        match &req.base {
            BaseChoice::None => Ok(None),
            BaseChoice::Point(id) => self.find_point(&req.source.name, Some(id)).map(Some),
            BaseChoice::Latest => self.latest_point(&req.source.name),
        }
    }

    /// The latest recovery point of `source`, if any.
    pub(crate) fn latest_point(&self, source: &str) -> Result<Option<Manifest>> {
        match self.find_point(source, None) {
            Ok(m) => Ok(Some(m)),
            Err(Error::Invalid(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes packs as they come, then makes them all durable and visible.
    /// A cancelled backup stops taking packs but still makes those it stored durable:
    /// their blobs are found (by the packs' trailers) by the next run, not sent again.
    fn upload_packs(
        &self,
        rx: Receiver<PackMsg>,
        spare: &FreeList<AlignedBuf>,
        pace: Pace<'_>,
    ) -> Result<Vec<(Id, Vec<PackEntry>)>> {
        let mut out = Vec::new();
        let mut staged = Vec::new();
        for (bytes, entries) in rx.iter() {
            if pace.cancelled() {
                break;
            }
            if let Some(t) = pace.throttle {
                let never = AtomicBool::new(false);
                t.take(bytes.len() as u64, pace.cancel.unwrap_or(&never));
            }
            let id = format::pack_id(&bytes);
            staged.push(self.backend.stage(&format::pack_key(&id), &bytes)?);
            spare.give(bytes, 1);
            out.push((id, entries));
        }
        for s in staged {
            s.commit()?;
        }
        if pace.cancelled() {
            return Err(cancelled());
        }
        Ok(out)
    }
}

/// The id and creation time a copied recovery point keeps.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub id: String,
    pub created: String,
    pub created_unix: i64,
}

/// What paces a backup's pack uploads, and what stops it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pace<'a> {
    pub throttle: Option<&'a Throttle>,
    pub cancel: Option<&'a AtomicBool>,
}

impl Pace<'_> {
    pub fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

pub(crate) fn cancelled() -> Error {
    Error::Invalid("cancelled: no recovery point was written".into())
}

type Packs = Vec<(Id, Vec<PackEntry>)>;

/// The local datastore as a [`BlockTarget`]: `missing` answers from the in-memory blob
/// index (and what this backup stored), `put` fills packs for the uploader thread.
struct LocalTarget<'a, 'scope> {
    store: &'a Datastore,
    index: &'a BlobIndex,
    params: BlockParams,
    /// Name of the index file to write (the recovery point's id).
    name: String,
    /// Blobs this backup stored (a block repeated later in the disk is not compressed
    /// twice).
    session: Mutex<HashSet<Id>>,
    out: Mutex<LocalOut<'a>>,
    uploader: Mutex<Option<ScopedJoinHandle<'scope, Result<Packs>>>>,
}

struct LocalOut<'a> {
    pack: PackBuilder,
    up: Option<SyncSender<PackMsg>>,
    /// Pack buffers the uploader is done with.
    spare: &'a FreeList<AlignedBuf>,
}

impl LocalOut<'_> {
    fn flush_pack(&mut self, pack_size: usize) -> Result<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let fresh = match self.spare.take() {
            b if b.capacity() > 0 => PackBuilder::with_buffer(b),
            _ => PackBuilder::new(pack_size),
        };
        let pack = std::mem::replace(&mut self.pack, fresh);
        let msg = pack.finish();
        let up = self
            .up
            .as_ref()
            .ok_or_else(|| Error::Invalid("internal: pack writer closed".into()))?;
        // A send fails only when the uploader stopped on an error; the caller joins it
        // and reports that error.
        up.send(msg)
            .map_err(|_| Error::Invalid("storing a pack failed".into()))
    }
}

impl LocalTarget<'_, '_> {
    /// Closes the pack queue (flushing the last pack first when `flush`) and waits for
    /// the uploader; returns the packs it stored, or its error.
    fn close(&self, flush: bool) -> Result<Packs> {
        let r = {
            let mut out = lock(&self.out);
            let r = if flush {
                out.flush_pack(self.store.config.pack_size as usize)
            } else {
                Ok(())
            };
            out.up = None;
            r
        };
        let Some(h) = lock(&self.uploader).take() else {
            return Err(Error::Invalid(
                "internal: pack uploader already joined".into(),
            ));
        };
        let packs = h
            .join()
            .map_err(|_| Error::Invalid("pack uploader thread panicked".into()))??;
        r?;
        Ok(packs)
    }

    /// After a failed backup: stops the uploader; its error, if it failed.
    fn abandon(&self) -> Result<()> {
        lock(&self.out).up = None;
        match lock(&self.uploader).take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::Invalid("pack uploader thread panicked".into()))?
                .map(|_| ()),
            None => Ok(()),
        }
    }
}

impl BlockTarget for LocalTarget<'_, '_> {
    fn params(&self) -> &BlockParams {
        &self.params
    }

    fn missing(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let mut out: Vec<bool> = ids.iter().map(|id| !self.index.contains(id)).collect();
        if out.iter().any(|&m| m) {
            let session = lock(&self.session);
            for (m, id) in out.iter_mut().zip(ids) {
                *m = *m && !session.contains(id);
            }
        }
        Ok(out)
    }

    fn read_piece(&self, id: Id) -> Result<Vec<Id>> {
        self.store.read_piece(self.index, id)
    }

    fn put(&self, framed: &[u8]) -> Result<()> {
        let pack_size = self.store.config.pack_size as usize;
        let mut ids = Vec::new();
        let mut out = lock(&self.out);
        for blob in format::split_blobs("backup", framed) {
            let (_, h, bytes) = blob?;
            out.pack.add(h.kind, h.id, h.plain_len, bytes)?;
            ids.push(h.id);
            if out.pack.len() >= pack_size {
                out.flush_pack(pack_size)?;
            }
        }
        drop(out);
        lock(&self.session).extend(ids);
        Ok(())
    }

    fn finish(&self) -> Result<u64> {
        let packs = self.close(true)?;
        self.store.write_index(&self.name, &packs)?;
        Ok(packs
            .iter()
            .map(|(_, e)| e.iter().map(|x| x.len as u64).sum::<u64>())
            .sum())
    }
}

/// The writer's side of one disk: the blocks listed so far and the index piece being
/// filled, from segments taken in disk order.
struct Assembly {
    disk_no: u32,
    pb: u64,
    nblocks: u64,
    block: u64,
    piece: Vec<u8>,
}

impl Assembly {
    /// Lists a segment's blocks; stores its new blobs (contiguous in `framed`: put in
    /// runs) and each full index piece after the blocks it lists.
    fn blocks(
        &mut self,
        rec: &mut DiskRecord,
        w: &mut Writer<'_>,
        done: Vec<Done>,
        framed: &[u8],
    ) -> Result<()> {
        // New blobs are contiguous in `framed`: put them in runs.
        let mut run = 0..0;
        for d in done {
            let id = match d {
                Done::Zero => {
                    rec.stats.blocks_zero += 1;
                    Id::ZERO
                }
                Done::Reuse(id) => {
                    rec.stats.blocks_reused += 1;
                    id
                }
                Done::Known(id) => {
                    rec.stats.blocks_dedup += 1;
                    id
                }
                Done::New {
                    id,
                    plain,
                    start,
                    end,
                } => {
                    // Two workers may both have found a
                    // repeated block missing: store it once.
                    if w.session.insert(id) {
                        if run.end != start {
                            w.put(&framed[run])?;
                            run = start..start;
                        }
                        run.end = end;
                        rec.stats.blocks_new += 1;
                        rec.stats.bytes_new += plain as u64;
                        rec.stats.bytes_stored += (end - start) as u64;
                    } else {
                        rec.stats.blocks_dedup += 1;
                    }
                    id
                }
            };
            self.piece.extend_from_slice(&id.0);
            self.block += 1;
            if self.block.is_multiple_of(self.pb) || self.block == self.nblocks {
                // Blocks before the piece that lists them.
                w.put(&framed[run.clone()])?;
                run = run.end..run.end;
                let pid = w.add_piece(&self.piece)?;
                rec.pieces.push(pid.to_hex());
                self.piece.clear();
            }
        }
        w.put(&framed[run])?;
        Ok(())
    }

    /// Every block listed, every piece stored.
    fn finish(&self) -> Result<()> {
        if self.block != self.nblocks || !self.piece.is_empty() {
            return Err(Error::Invalid(format!(
                "internal: disk {} ended at block {} of {}",
                self.disk_no, self.block, self.nblocks
            )));
        }
        Ok(())
    }
}

/// The pipeline's shared parts: where blocks go and how they are built.
struct Pipe<'a> {
    target: &'a dyn BlockTarget,
    p: &'a BlockParams,
    threads: usize,
}

impl Pipe<'_> {
    /// Which base pieces the target still has: one question for the whole disk.
    fn base_present(&self, base: Option<&DiskRecord>) -> Result<Vec<bool>> {
        let Some(bd) = base else {
            return Ok(Vec::new());
        };
        let ids = bd
            .pieces
            .iter()
            .enumerate()
            .map(|(p, h)| {
                Id::from_hex(h)
                    .ok_or_else(|| Error::Invalid(format!("base index piece {p} is malformed")))
            })
            .collect::<Result<Vec<Id>>>()?;
        let miss = self.missing(&ids)?;
        Ok(miss.into_iter().map(|m| !m).collect())
    }

    /// The target's answer for `ids`, one flag per id: a remote target's short or long
    /// answer would misalign blocks and flags.
    fn missing(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let miss = self.target.missing(ids)?;
        if miss.len() != ids.len() {
            return Err(Error::Invalid(format!(
                "target answered {} of {} ids",
                miss.len(),
                ids.len()
            )));
        }
        Ok(miss)
    }

    fn backup_disk(
        &self,
        disk_no: u32,
        input: &DiskInput<'_>,
        base: Option<&DiskRecord>,
        w: &mut Writer<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<DiskRecord> {
        let disk = input.disk;
        let info = disk.info();
        let size = disk.virtual_size();
        let bs = self.p.block_size as u64;
        let pb = self.p.piece_blocks as u64;
        let nblocks = size.div_ceil(bs);
        let seg_blocks = gcd(pb, (4u64 << 20) / bs).max(1);
        let changed = input.changed.as_deref();
        // A base is only consulted block by block when change tracking says what changed.
        let base = base.filter(|_| changed.is_some());
        // Which base pieces the target still has: one question for the whole disk.
        let base_present = self.base_present(base)?;
        let base_present = &base_present;
        let threads = self.threads;
        let (job_tx, job_rx) = sync_channel::<Result<(u64, Work)>>(threads);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (out_tx, out_rx) = sync_channel::<Result<(u64, Processed)>>(threads);
        let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(threads + 2);
        let framed_pool = FreeList::default();
        let framed_pool = &framed_pool;
        for _ in 0..threads + 2 {
            let _ = pool_tx.try_send(Vec::new());
        }
        let mut rec = DiskRecord {
            index: disk_no,
            name: input.name.clone(),
            format: input.format.clone(),
            virtual_size: size,
            logical_sector_size: info.logical_sector_size,
            physical_sector_size: info.physical_sector_size,
            block_size: bs as u32,
            piece_blocks: pb as u32,
            pieces: Vec::new(),
            stats: Stats {
                changed_bytes: changed.map(|c| c.iter().map(|r| r.1).sum()),
                ..Stats::default()
            },
            excluded: input.excluded.clone(),
        };
        let excluded = merge_adjacent(&input.excluded);
        let excluded = &excluded;
        std::thread::scope(|scope| -> Result<()> {
            // Reader.
            let reader = scope.spawn(move || {
                let mut seq = 0u64;
                let r = self.read_segments(
                    disk,
                    size,
                    nblocks,
                    seg_blocks,
                    base,
                    base_present,
                    changed,
                    excluded,
                    &pool_rx,
                    &mut |w| {
                        let ok = job_tx.send(Ok((seq, w))).is_ok();
                        seq += 1;
                        ok
                    },
                );
                if let Err(e) = r {
                    let _ = job_tx.send(Err(e));
                }
                seq
            });
            // Workers.
            for _ in 0..threads {
                let job_rx = job_rx.clone();
                let out_tx = out_tx.clone();
                scope.spawn(move || self.work(bs, size, &job_rx, &out_tx, framed_pool));
            }
            drop(out_tx);
            // Only the workers hold the job queue: if they all stop (the writer failed),
            // the queue closes and the reader, perhaps blocked on it, stops too.
            drop(job_rx);
            // Segment buffers go back to the reader only once written out, which bounds
            // the segments in flight (and the re-ordering) by the pool's size.
            // Writer, in disk order.
            let mut consume = |out_rx: Receiver<Result<(u64, Processed)>>,
                               pool_tx: SyncSender<Vec<u8>>|
             -> Result<u64> {
                let mut pending = BTreeMap::new();
                let mut next = 0u64;
                let mut asm = Assembly {
                    disk_no,
                    pb,
                    nblocks,
                    block: 0,
                    piece: Vec::with_capacity(pb as usize * 32),
                };
                for msg in out_rx {
                    let (seq, p) = msg?;
                    pending.insert(seq, p);
                    while let Some(p) = pending.remove(&next) {
                        next += 1;
                        match p {
                            Processed::Piece { id, blocks } => {
                                rec.pieces.push(id.to_hex());
                                rec.stats.blocks_reused += blocks;
                                asm.block += blocks;
                            }
                            Processed::Blocks {
                                done,
                                framed,
                                read,
                                buf,
                            } => {
                                rec.stats.bytes_read += read;
                                asm.blocks(&mut rec, w, done, &framed)?;
                                framed_pool.give(framed, threads + 2);
                                if buf.capacity() > 0 {
                                    let _ = pool_tx.try_send(buf);
                                }
                            }
                        }
                        progress((asm.block * bs).min(size));
                    }
                }
                asm.finish()?;
                Ok(next)
            };
            // The consumer owns the last sender of the pool: when it stops, the reader's
            // wait for a buffer ends.
            let consumed = consume(out_rx, pool_tx);
            let produced = reader
                .join()
                .map_err(|_| Error::Invalid("reader thread panicked".into()))?;
            let consumed = consumed?;
            if consumed != produced {
                return Err(Error::Invalid(format!(
                    "internal: {produced} segments read but {consumed} written"
                )));
            }
            Ok(())
        })?;
        Ok(rec)
    }

    /// The reader: decides per block (zero / reuse / read), reads what must be read.
    /// `send` returns false when the pipeline has stopped.
    #[allow(clippy::too_many_arguments)]
    fn read_segments(
        &self,
        disk: &dyn VirtualDisk,
        size: u64,
        nblocks: u64,
        seg_blocks: u64,
        base: Option<&DiskRecord>,
        base_present: &[bool],
        changed: Option<&[(u64, u64)]>,
        excluded: &[(u64, u64)],
        pool: &Receiver<Vec<u8>>,
        send: &mut dyn FnMut(Work) -> bool,
    ) -> Result<()> {
        let bs = self.p.block_size as u64;
        let pb = self.p.piece_blocks as u64;
        let npieces = nblocks.div_ceil(pb);
        let span = |p: u64| {
            let first = p * pb;
            let end = (first + pb).min(nblocks);
            (first, end, first * bs, (end * bs).min(size))
        };
        // Base pieces whose blocks are looked at one by one (touched by a change or an
        // exclusion, and present): their ids and which blocks can be reused are fetched
        // ahead, a few at once, since each costs round trips on a remote target.
        let mut wanted: Vec<u64> = Vec::new();
        if let (Some(_), Some(ch)) = (base, changed) {
            let mut cur = RangeCursor::new(ch);
            for p in 0..npieces {
                let (_, _, a, z) = span(p);
                let touched = cur.intersects(a, z) || overlaps(excluded, a, z);
                if touched && base_present.get(p as usize).copied().unwrap_or(false) {
                    wanted.push(p);
                }
            }
        }
        // (ids, usable): usable = the block is zero or the target has its blob. `None`
        // = a damaged or missing base piece: its blocks are read instead (heals).
        let fetch = |bd: &DiskRecord, p: u64| -> Fetched {
            let (first, end, _, _) = span(p);
            let Some(ids) = self
                .target
                .read_piece(piece_id(bd, p)?)
                .ok()
                .filter(|ids| ids.len() as u64 == end - first)
            else {
                return Ok(None);
            };
            // One question per piece for the blocks to reuse.
            let miss = self.target.missing(&ids)?;
            let usable = ids
                .iter()
                .zip(miss.iter().chain(std::iter::repeat(&true)))
                .map(|(id, &m)| id.is_zero() || !m)
                .collect();
            Ok(Some((ids, usable)))
        };
        const FETCHERS: usize = 4;
        std::thread::scope(|scope| -> Result<()> {
            // Fetcher w handles wanted[w], wanted[w + FETCHERS], ... in order, one
            // result ahead; the loop below takes them round-robin, so they arrive in
            // order and at most 2 x FETCHERS pieces are held. When the loop ends
            // early its receivers drop and the fetchers stop.
            let mut results = Vec::new();
            if let Some(bd) = base {
                for w in 0..FETCHERS.min(wanted.len()) {
                    let (tx, rx) = sync_channel::<(u64, Fetched)>(1);
                    results.push(rx);
                    let mine: Vec<u64> = wanted.iter().copied().skip(w).step_by(FETCHERS).collect();
                    let fetch = &fetch;
                    scope.spawn(move || {
                        for p in mine {
                            if tx.send((p, fetch(bd, p))).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
            let mut next = 0usize;
            self.read_pieces(
                disk,
                size,
                nblocks,
                seg_blocks,
                npieces,
                &span,
                base,
                base_present,
                changed,
                excluded,
                &mut || {
                    let rx = results
                        .get(next % FETCHERS)
                        .ok_or_else(|| Error::Invalid("base piece fetch out of step".into()))?;
                    next += 1;
                    rx.recv()
                        .map_err(|_| Error::Invalid("base piece fetcher stopped".into()))
                },
                pool,
                send,
            )
        })
    }

    /// The reader's walk over the pieces of one disk (see [`Pipe::read_segments`]).
    #[allow(clippy::too_many_arguments)]
    fn read_pieces(
        &self,
        disk: &dyn VirtualDisk,
        size: u64,
        nblocks: u64,
        seg_blocks: u64,
        npieces: u64,
        span: &dyn Fn(u64) -> (u64, u64, u64, u64),
        base: Option<&DiskRecord>,
        base_present: &[bool],
        changed: Option<&[(u64, u64)]>,
        excluded: &[(u64, u64)],
        next_fetched: &mut dyn FnMut() -> Result<(u64, Fetched)>,
        pool: &Receiver<Vec<u8>>,
        send: &mut dyn FnMut(Work) -> bool,
    ) -> Result<()> {
        let bs = self.p.block_size as u64;
        let mut cursor = changed.map(RangeCursor::new);
        for p in 0..npieces {
            let (first, end, a, z) = span(p);
            let mut base_ids: Option<Vec<Id>> = None;
            // Per base block: whether it can be reused (zero, or the target has it).
            let mut usable: Vec<bool> = Vec::new();
            if let (Some(bd), Some(cur)) = (base, cursor.as_mut()) {
                let pid = piece_id(bd, p)?;
                let present = base_present.get(p as usize).copied().unwrap_or(false);
                // A piece with excluded bytes is rebuilt block by block: its excluded
                // blocks become zeros even where the base held data.
                let touched = cur.intersects(a, z) || overlaps(excluded, a, z);
                if !touched && present {
                    if !send(Work::Piece {
                        id: pid,
                        blocks: end - first,
                    }) {
                        return Ok(());
                    }
                    continue;
                }
                if present {
                    let (got, fetched) = next_fetched()?;
                    if got != p {
                        return Err(Error::Invalid(format!(
                            "base piece {got} fetched where {p} was expected"
                        )));
                    }
                    if let Some((ids, u)) = fetched? {
                        base_ids = Some(ids);
                        usable = u;
                    }
                }
            }
            let mut s = first;
            while s < end {
                let e = (s + seg_blocks).min(end);
                let n = (e - s) as usize;
                let mut plans = vec![Plan::Read; n];
                if let (Some(ids), Some(cur)) = (&base_ids, cursor.as_mut()) {
                    for (i, plan) in plans.iter_mut().enumerate() {
                        let b = s + i as u64;
                        let k = (b - first) as usize;
                        let changed = cur.intersects(b * bs, ((b + 1) * bs).min(size));
                        // Reuse unless changed, or the block's blob is known damaged.
                        if !changed && usable[k] {
                            *plan = Plan::Reuse(ids[k]);
                        }
                    }
                }
                let off = s * bs;
                let len = (e * bs).min(size) - off;
                if !excluded.is_empty() {
                    // Excluded blocks are zeros whatever the base held.
                    for (i, plan) in plans.iter_mut().enumerate() {
                        let b = s + i as u64;
                        if covered(excluded, b * bs, ((b + 1) * bs).min(size)) {
                            *plan = Plan::Zero;
                        }
                    }
                }
                let mut buf = Vec::new();
                let mut read = 0u64;
                if plans.iter().any(|p| matches!(p, Plan::Read)) {
                    // With changed ranges only the few changed blocks are read: asking
                    // for their allocation would cost a round trip per segment on a
                    // remote disk (NBD) for little gain; zeros are still found by
                    // content.
                    let extents = if changed.is_some() {
                        Vec::new()
                    } else {
                        disk.map(off, len)?
                    };
                    for ext in extents {
                        if !ext.state.reads_as_zero() {
                            continue;
                        }
                        // Blocks wholly inside a zero/unallocated extent are not read.
                        let b0 = ext.offset.div_ceil(bs).max(s);
                        let b1 = (if ext.end() >= size {
                            nblocks
                        } else {
                            ext.end() / bs
                        })
                        .min(e);
                        for b in b0..b1 {
                            let pl = &mut plans[(b - s) as usize];
                            if matches!(pl, Plan::Read) {
                                *pl = Plan::Zero;
                            }
                        }
                    }
                    buf = match pool.recv() {
                        Ok(b) => b,
                        Err(_) => return Ok(()),
                    };
                    buf.resize(len as usize, 0);
                    let mut i = 0;
                    while i < n {
                        if !matches!(plans[i], Plan::Read) {
                            i += 1;
                            continue;
                        }
                        let mut j = i;
                        while j < n && matches!(plans[j], Plan::Read) {
                            j += 1;
                        }
                        let a = i as u64 * bs;
                        let z = (j as u64 * bs).min(len);
                        disk.read_at(&mut buf[a as usize..z as usize], off + a)?;
                        read += z - a;
                        i = j;
                    }
                    // Blocks partly excluded keep their other bytes.
                    zero_ranges(excluded, &mut buf, off);
                }
                if !send(Work::Blocks {
                    first: s,
                    plans,
                    buf,
                    read,
                }) {
                    return Ok(());
                }
                s = e;
            }
        }
        Ok(())
    }

    /// A worker: hashes read blocks, asks the target which it lacks (one question per
    /// segment), and compresses/encrypts those.
    fn work(
        &self,
        bs: u64,
        size: u64,
        jobs: &Mutex<Receiver<Result<(u64, Work)>>>,
        out: &SyncSender<Result<(u64, Processed)>>,
        framed_pool: &FreeList,
    ) {
        let mut zstd = match zstd::bulk::Compressor::new(self.p.zstd_level) {
            Ok(z) => z,
            Err(e) => {
                let _ = out.send(Err(Error::Invalid(format!("zstd: {e}"))));
                return;
            }
        };
        let keys = &self.p.keys;
        let mut ids = Vec::new();
        let mut at = Vec::new();
        loop {
            let job = match lock(jobs).recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            let res = job.and_then(|(seq, w)| match w {
                Work::Piece { id, blocks } => Ok((seq, Processed::Piece { id, blocks })),
                Work::Blocks {
                    first,
                    plans,
                    buf,
                    read,
                } => {
                    let block = |i: usize| {
                        let a = i * bs as usize;
                        let z = (a + bs as usize).min((size - first * bs) as usize);
                        &buf[a..z]
                    };
                    let mut done = Vec::with_capacity(plans.len());
                    ids.clear();
                    at.clear();
                    for (i, plan) in plans.iter().enumerate() {
                        done.push(match *plan {
                            Plan::Zero => Done::Zero,
                            Plan::Reuse(id) => Done::Reuse(id),
                            Plan::Read => {
                                let data = block(i);
                                if vdisk::copy::is_zero(data) {
                                    Done::Zero
                                } else {
                                    let id = keys.id(data);
                                    ids.push(id);
                                    at.push(i);
                                    Done::Known(id)
                                }
                            }
                        });
                    }
                    let mut framed = framed_pool.take();
                    if !ids.is_empty() {
                        let miss = self.missing(&ids)?;
                        // In disk order, so new blobs lie in `framed` in disk order.
                        for ((&i, &id), m) in at.iter().zip(&ids).zip(miss) {
                            if !m {
                                continue;
                            }
                            let data = block(i);
                            let start = framed.len();
                            format::encode_blob(
                                keys,
                                &mut zstd,
                                Kind::Data,
                                id,
                                data,
                                &mut framed,
                            )?;
                            done[i] = Done::New {
                                id,
                                plain: data.len() as u32,
                                start,
                                end: framed.len(),
                            };
                        }
                    }
                    Ok((
                        seq,
                        Processed::Blocks {
                            done,
                            framed,
                            read,
                            buf,
                        },
                    ))
                }
            });
            if out.send(res).is_err() {
                return;
            }
        }
    }
}

/// The consumer's side of the target: stores new blobs once each, and index pieces.
struct Writer<'a> {
    target: &'a dyn BlockTarget,
    /// Blobs already given to the target by this backup.
    session: HashSet<Id>,
    zstd: zstd::bulk::Compressor<'static>,
    framed: Vec<u8>,
}

impl Writer<'_> {
    fn put(&mut self, framed: &[u8]) -> Result<()> {
        if framed.is_empty() {
            return Ok(());
        }
        self.target.put(framed)
    }

    /// Stores an index piece (deduplicated like data); returns its id.
    fn add_piece(&mut self, ids: &[u8]) -> Result<Id> {
        let keys = &self.target.params().keys;
        let id = keys.id(ids);
        if !self.session.contains(&id) && self.target.missing(&[id])?.first() != Some(&false) {
            let mut framed = std::mem::take(&mut self.framed);
            framed.clear();
            format::encode_blob(keys, &mut self.zstd, Kind::Index, id, ids, &mut framed)?;
            self.session.insert(id);
            let r = self.put(&framed);
            self.framed = framed;
            r?;
        }
        Ok(id)
    }
}

/// Changed ranges must be sorted, non-empty, not overlapping and inside the disk (the
/// reader walks them with a forward-only cursor).
fn check_ranges(disk: usize, what: &str, ranges: &[(u64, u64)], size: u64) -> Result<()> {
    let mut prev_end = 0u64;
    for &(o, l) in ranges {
        let end = o.checked_add(l).filter(|&e| e <= size).ok_or_else(|| {
            Error::Invalid(format!(
                "disk {disk}: {what} range {o}+{l} ends past the disk's size {size}"
            ))
        })?;
        if l == 0 || o < prev_end {
            return Err(Error::Invalid(format!(
                "disk {disk}: {what} range {o}+{l} is empty, out of order or overlaps the previous one (ranges must be sorted and disjoint)"
            )));
        }
        prev_end = end;
    }
    Ok(())
}

/// A base index piece as fetched ahead of the reader: its block ids and which of its
/// blocks can be reused (zero, or the target has the blob); `None` when the piece is
/// damaged or missing (its blocks are read instead, which heals).
type Fetched = Result<Option<(Vec<Id>, Vec<bool>)>>;

/// The id of base index piece `p`.
fn piece_id(bd: &DiskRecord, p: u64) -> Result<Id> {
    bd.pieces
        .get(p as usize)
        .and_then(|h| Id::from_hex(h))
        .ok_or_else(|| Error::Invalid(format!("base index piece {p} is malformed")))
}

/// `ranges` (sorted, disjoint) with adjacent ones joined, so that "inside one range"
/// answers "inside the union".
fn merge_adjacent(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(o, l) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l)),
        }
    }
    out
}

/// Whether `[start, end)` lies wholly inside one of `ranges` (sorted, disjoint, merged).
fn covered(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|&(o, _)| o <= start);
    i > 0 && ranges[i - 1].0 + ranges[i - 1].1 >= end
}

/// Whether `[start, end)` meets any of `ranges` (sorted, disjoint).
fn overlaps(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|&(o, l)| o + l <= start);
    ranges.get(i).is_some_and(|&(o, _)| o < end)
}

/// Zeroes the parts of `buf` (holding the disk at `off`) that fall in `ranges`.
fn zero_ranges(ranges: &[(u64, u64)], buf: &mut [u8], off: u64) {
    let end = off + buf.len() as u64;
    let first = ranges.partition_point(|&(o, l)| o + l <= off);
    for &(o, l) in &ranges[first..] {
        if o >= end {
            break;
        }
        let a = (o.max(off) - off) as usize;
        let z = ((o + l).min(end) - off) as usize;
        buf[a..z].fill(0);
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}
