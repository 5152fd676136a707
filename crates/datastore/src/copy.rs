//! Copying a recovery point from one datastore into another (a second copy in object
//! storage): the point is read from the source like a restore and backed up into the
//! target by the normal pipeline, so blobs are re-encoded with the target's keys and
//! deduplicated against the target's own blob index. Only the blocks that differ from a
//! point both datastores hold are read, found by comparing the source's index pieces.

use crate::backup::{BackupRequest, BaseChoice, DiskInput, Identity, Pace};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::manifest::{DiskRecord, Manifest};
use crate::store::{BlobIndex, Datastore};
use crate::throttle::Throttle;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vdisk::{DiskInfo, Extent, VirtualDisk};

/// One disk's changed ranges, `None` = read it whole.
type Changed = Option<Vec<(u64, u64)>>;

/// How a copy runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyOptions<'a> {
    /// Paces the target's pack uploads (bytes put).
    pub throttle: Option<&'a Throttle>,
    /// Set to stop the copy: checked between segments and packs; no manifest is written.
    pub cancel: Option<&'a AtomicBool>,
}

/// What a copy did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// The point id (same in both datastores).
    pub point: String,
    /// Source name (HOST/VM).
    pub source: String,
    /// The target had it: nothing done.
    pub already_there: bool,
    /// The target's point it was built on.
    pub base: Option<String>,
    /// Changed ranges came from comparing the source's index pieces.
    pub ranges_compared: bool,
    /// Virtual bytes read from the source datastore.
    pub bytes_read: u64,
    /// Data blobs the target lacked and that were uploaded (index pieces not counted).
    pub blobs_new: u64,
    /// Framed bytes written to the target: blobs in packs (data and index pieces), the
    /// index file and the manifest (pack trailers, 48 bytes a blob, not counted).
    pub bytes_uploaded: u64,
    pub seconds: f64,
}

impl Datastore {
    /// Copies recovery point `id` of `src` into `self` (the target), keeping its id,
    /// created time, source, consistency and disk records' names/formats/excluded ranges;
    /// only blobs the target lacks are uploaded (target-side dedup by its own blob index);
    /// the manifest is written last, so a killed copy leaves no point, and a re-run
    /// re-sends only what did not land (packs already uploaded are found by their trailers).
    pub fn copy_point_from(
        &self,
        src: &Datastore,
        id: &str,
        opts: &CopyOptions<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CopyReport> {
        let t0 = Instant::now();
        // Shared: a gc of the source must not remove what is being read.
        let _src_lock = src.backend.lock(false, true)?;
        let m = src.point(id)?;
        let mut report = CopyReport {
            point: m.id.clone(),
            source: m.source.name.clone(),
            already_there: false,
            base: None,
            ranges_compared: false,
            bytes_read: 0,
            blobs_new: 0,
            bytes_uploaded: 0,
            seconds: 0.0,
        };
        if self.has_point(id)? {
            report.already_there = true;
            report.seconds = t0.elapsed().as_secs_f64();
            return Ok(report);
        }
        let src_index = Arc::new(src.blob_index()?);
        let (base, changed) = self.copy_base(src, &src_index, &m)?;
        let cancel = opts.cancel;
        let opened = (0..m.disks.len())
            .map(|i| src.open_disk(&m, i, src_index.clone()))
            .collect::<Result<Vec<_>>>()?;
        let wrapped: Vec<Cancellable<'_>> = opened
            .iter()
            .map(|d| Cancellable {
                disk: d as &dyn VirtualDisk,
                cancel,
            })
            .collect();
        report.ranges_compared = changed.iter().any(Option::is_some);
        let disks = m
            .disks
            .iter()
            .zip(&wrapped)
            .zip(changed)
            .map(|((rec, disk), changed)| DiskInput {
                disk,
                name: rec.name.clone(),
                format: rec.format.clone(),
                changed,
                excluded: rec.excluded.clone(),
            })
            .collect();
        let req = BackupRequest {
            source: m.source.clone(),
            consistency: m.consistency,
            base,
            disks,
        };
        let identity = Identity {
            id: m.id.clone(),
            created: m.created.clone(),
            created_unix: m.created_unix,
        };
        let pace = Pace {
            throttle: opts.throttle,
            cancel,
        };
        let done = self
            .backup_with(req, Some(&identity), pace, progress)
            .map_err(|e| match cancel {
                Some(c) if c.load(Ordering::Relaxed) => crate::backup::cancelled(),
                _ => e,
            })?;
        report.base = done.base.clone();
        report.bytes_read = done.stats.bytes_read;
        report.blobs_new = done.stats.blocks_new;
        report.bytes_uploaded = done.stats.bytes_stored
            + self.stored_size(&format!("index/{}", done.id))
            + self.stored_size(&Self::point_key(&done.id));
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Whether this datastore holds recovery point `id` (readable or not: a damaged
    /// manifest is an error, not a reason to write another).
    fn has_point(&self, id: &str) -> Result<bool> {
        self.backend.exists(&Self::point_key(id))
    }

    /// The size of a stored object, 0 when it is absent or unreadable (a figure only).
    fn stored_size(&self, key: &str) -> u64 {
        self.backend.get(key).map(|b| b.len() as u64).unwrap_or(0)
    }

    /// The base of a copy of `m` and, per disk, the changed ranges to read (`None` =
    /// read the whole disk): the newest point of the same source both datastores hold,
    /// compared in the source; else the target's newest point of the source, read whole.
    fn copy_base(
        &self,
        src: &Datastore,
        src_index: &BlobIndex,
        m: &Manifest,
    ) -> Result<(BaseChoice, Vec<Changed>)> {
        let whole = vec![None; m.disks.len()];
        let (target_points, _) = self.points()?;
        let mine: Vec<&Manifest> = target_points
            .iter()
            .filter(|t| t.source.name == m.source.name && t.id != m.id)
            .collect();
        let Some(newest) = mine.last() else {
            return Ok((BaseChoice::None, whole));
        };
        let (src_points, _) = src.points()?;
        let in_src: HashSet<&str> = src_points.iter().map(|p| p.id.as_str()).collect();
        let Some(shared) = mine.iter().rev().find(|t| in_src.contains(t.id.as_str())) else {
            return Ok((BaseChoice::Point(newest.id.clone()), whole));
        };
        let Some(src_base) = src_points.iter().find(|p| p.id == shared.id) else {
            return Ok((BaseChoice::Point(newest.id.clone()), whole));
        };
        let mut changed = Vec::with_capacity(m.disks.len());
        for (i, rec) in m.disks.iter().enumerate() {
            let comparable = match (src_base.disks.get(i), shared.disks.get(i)) {
                (Some(sb), Some(tb)) => {
                    same_layout(rec, sb) && same_layout(rec, tb) && self.fits(rec)
                }
                _ => false,
            };
            changed.push(if comparable {
                Some(differing_ranges(src, src_index, src_base, i, rec)?)
            } else {
                None
            });
        }
        Ok((BaseChoice::Point(shared.id.clone()), changed))
    }

    /// Whether this datastore indexes disks as `rec` is indexed.
    fn fits(&self, rec: &DiskRecord) -> bool {
        rec.block_size == self.config.block_size && rec.piece_blocks == self.config.piece_blocks
    }
}

fn same_layout(a: &DiskRecord, b: &DiskRecord) -> bool {
    a.virtual_size == b.virtual_size
        && a.block_size == b.block_size
        && a.piece_blocks == b.piece_blocks
        && a.pieces.len() == b.pieces.len()
        && a.pieces.len() as u64 == a.blocks().div_ceil(u64::from(a.piece_blocks.max(1)))
}

/// The byte ranges of disk `disk` whose blocks differ between `base` and `rec` (same
/// layout), sorted and merged: equal index pieces are skipped unread.
fn differing_ranges(
    src: &Datastore,
    idx: &BlobIndex,
    base: &Manifest,
    disk: usize,
    rec: &DiskRecord,
) -> Result<Vec<(u64, u64)>> {
    let old = base
        .disks
        .get(disk)
        .ok_or_else(|| Error::Invalid(format!("point {} has no disk {disk}", base.id)))?;
    let bs = u64::from(rec.block_size);
    let pb = u64::from(rec.piece_blocks);
    let size = rec.virtual_size;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |block: u64| {
        let start = block * bs;
        let len = (size - start).min(bs);
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len)),
        }
    };
    for (p, (a, b)) in old.pieces.iter().zip(&rec.pieces).enumerate() {
        if a == b {
            continue;
        }
        let parse = |h: &str| {
            Id::from_hex(h).ok_or_else(|| {
                Error::Invalid(format!(
                    "recovery point {} or the one copied, disk {disk}: bad index piece id {h:?}",
                    base.id
                ))
            })
        };
        let ids_a = src.read_piece(idx, parse(a)?)?;
        let ids_b = src.read_piece(idx, parse(b)?)?;
        let first = p as u64 * pb;
        let want = (rec.blocks() - first).min(pb) as usize;
        if ids_a.len() != want || ids_b.len() != want {
            return Err(Error::corrupt(
                format!("index piece {b}"),
                format!("holds {} entries, expected {want}", ids_b.len()),
            ));
        }
        for (i, (x, y)) in ids_a.iter().zip(&ids_b).enumerate() {
            if x != y {
                push(first + i as u64);
            }
        }
    }
    Ok(out)
}

/// A source disk whose reads fail once the copy is cancelled: the backup pipeline
/// stops at its next segment.
#[derive(Debug)]
struct Cancellable<'a> {
    disk: &'a dyn VirtualDisk,
    cancel: Option<&'a AtomicBool>,
}

impl Cancellable<'_> {
    fn check(&self) -> vdisk::Result<()> {
        match self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => {
                Err(vdisk::Error::Invalid("the copy was cancelled".into()))
            }
            _ => Ok(()),
        }
    }
}

impl VirtualDisk for Cancellable<'_> {
    fn info(&self) -> DiskInfo {
        self.disk.info()
    }
    fn virtual_size(&self) -> u64 {
        self.disk.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        self.check()?;
        self.disk.read_at(buf, offset)
    }
    fn map(&self, offset: u64, length: u64) -> vdisk::Result<Vec<Extent>> {
        self.check()?;
        self.disk.map(offset, length)
    }
}
