//! gc: removes what no recovery point references, and compacts packs that are mostly
//! dead. Runs under the exclusive lock, so no backup is writing meanwhile (backups wait
//! for gc, and gc waits for running backups).
//!
//! Crash safety: new packs and the new consolidated index file are durable before any
//! old index file is removed, and old index files are removed before old packs. A
//! crash at any point leaves duplicates or orphans (removed by the next gc), never a
//! reference to something missing.

use crate::error::{Error, Result};
use crate::format::{self, PackBuilder, PackEntry};
use crate::id::Id;
use crate::manifest::Manifest;
use crate::store::{BlobIndex, Datastore};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// Packs whose live bytes are below this fraction are rewritten.
const REPACK_BELOW: f64 = 0.5;

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub points: u64,
    pub live_blobs: u64,
    pub packs_before: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_written: u64,
    /// Bytes the datastore shrank by (packs, index files, leftovers).
    pub bytes_freed: i64,
    /// Temporary files of interrupted writes removed.
    pub leftover_bytes: u64,
    /// Referenced blobs whose only copies are damaged (kept; the next backup that reads
    /// their blocks heals them).
    pub unhealed_blobs: u64,
    /// Referenced blobs with no copy at all (a pack was lost): run verify.
    pub missing_blobs: u64,
}

/// Packs with their tables (blob entries).
type Tables = Vec<(Id, Vec<PackEntry>)>;

/// What the sweep decided for each pack.
struct Sweep {
    packs_before: u64,
    /// Packs kept as they are, with their tables.
    keep: Tables,
    /// Packs to delete (dead, or repacked).
    drop: Vec<Id>,
    /// Live blobs to copy out of repacked packs.
    moves: Vec<(Id, PackEntry)>,
    repacked: u64,
    unhealed: u64,
    missing: u64,
    /// Size of each pack file, by key.
    sizes: HashMap<String, u64>,
}

impl Datastore {
    /// Reclaims unreferenced data. `progress` receives messages (waiting for backups...).
    pub fn gc(&self, notice: &mut dyn FnMut(&str)) -> Result<GcReport> {
        let _lock = match self.backend.lock(true, false) {
            Ok(l) => l,
            Err(_) => {
                notice("waiting for running backups, verify or prune to finish");
                self.backend.lock(true, true)?
            }
        };
        let mut report = GcReport::default();
        let (points, unreadable) = self.points()?;
        if let Some(d) = unreadable.first() {
            return Err(Error::Invalid(format!(
                "{}: cannot read this recovery point ({}); gc would not know what it references. Restore the file, or remove the recovery point with `holdfast forget`, then run gc again",
                d.key, d.error
            )));
        }
        report.points = points.len() as u64;
        let index = self.blob_index()?;
        let live = self.mark(&points, &index)?;
        report.live_blobs = live.len() as u64;
        let mut sweep = self.sweep(&index, &live)?;
        report.packs_before = sweep.packs_before;
        report.packs_repacked = sweep.repacked;
        report.unhealed_blobs = sweep.unhealed;
        report.missing_blobs = sweep.missing;
        let (new_tables, mut written) = self.compact(std::mem::take(&mut sweep.moves))?;
        report.packs_written = new_tables.len() as u64;
        let mut all = std::mem::take(&mut sweep.keep);
        all.extend(new_tables);
        let (index_bytes, mut freed) = self.replace_index(&all)?;
        written += index_bytes;
        // A rewritten pack whose blobs and order did not change (a damaged trailer) has
        // its old name: it was just replaced by the good copy, so it must stay.
        let rewritten: HashSet<Id> = all.iter().map(|(p, _)| *p).collect();
        // Damaged copies in the packs replaced (deleted or rewritten) are gone.
        let dropped: HashSet<Id> = sweep.drop.iter().copied().collect();
        sweep.drop.retain(|p| !rewritten.contains(p));
        for pack in &sweep.drop {
            let key = format::pack_key(pack);
            self.backend.delete(&key)?;
            freed += sweep.sizes.get(&key).copied().unwrap_or(0) as i64;
        }
        report.packs_deleted = sweep.drop.len() as u64;
        // Damaged copies that are gone no longer need recording.
        let damaged: Vec<_> = self
            .damaged()?
            .into_iter()
            .filter(|(p, _)| !dropped.contains(p))
            .collect();
        self.write_damaged(&damaged)?;
        report.leftover_bytes = self.backend.remove_leftovers()?;
        report.bytes_freed = freed + report.leftover_bytes as i64 - written;
        Ok(report)
    }

    /// Mark: every index piece and block some recovery point references.
    fn mark(&self, points: &[Manifest], index: &BlobIndex) -> Result<HashSet<Id>> {
        let mut live: HashSet<Id> = HashSet::new();
        for m in points {
            for d in &m.disks {
                for h in &d.pieces {
                    let pid = Id::from_hex(h).ok_or_else(|| {
                        Error::corrupt(format!("points/{}", m.id), format!("bad piece id {h:?}"))
                    })?;
                    if !live.insert(pid) {
                        continue;
                    }
                    let ids = self.read_piece(index, pid).map_err(|e| {
                        Error::Invalid(format!(
                            "recovery point {} disk {}: {e}; gc stops rather than guess what it references (run verify)",
                            m.id, d.index
                        ))
                    })?;
                    live.extend(ids.into_iter().filter(|id| !id.is_zero()));
                }
            }
        }
        Ok(live)
    }

    /// Sweep: the chosen location of each live blob; anything else is dead. Each pack
    /// is kept, dropped, or repacked (mostly dead, or holding a damaged copy).
    fn sweep(&self, index: &BlobIndex, live: &HashSet<Id>) -> Result<Sweep> {
        let mut files = Vec::new();
        let mut damaged_files = Vec::new();
        let tables = self.pack_tables(&mut files, &mut damaged_files)?;
        let mut damaged_packs: HashSet<String> =
            damaged_files.iter().map(|(k, _)| k.clone()).collect();
        // Packs holding a copy verify found damaged are rewritten without it.
        damaged_packs.extend(self.damaged()?.iter().map(|(p, _)| format::pack_key(p)));
        let mut sweep = Sweep {
            packs_before: tables.len() as u64,
            keep: Vec::new(),
            drop: Vec::new(),
            moves: Vec::new(),
            repacked: 0,
            unhealed: 0,
            missing: 0,
            sizes: self.pack_sizes()?,
        };
        let mut taken: HashSet<Id> = HashSet::new();
        let pack_no: HashMap<Id, usize> = index
            .packs
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, i))
            .collect();
        // Live blobs whose only copies are damaged: their packs are kept untouched (a
        // damaged copy cannot be moved), and they are reported; a backup heals them.
        let unhealed: HashSet<Id> = live
            .iter()
            .filter(|id| !index.map.contains_key(id))
            .copied()
            .collect();
        for (pack, entries) in &tables {
            let no = pack_no.get(pack).copied();
            let is_live = |e: &PackEntry| {
                live.contains(&e.id)
                    && index
                        .map
                        .get(&e.id)
                        .is_some_and(|l| Some(l.pack as usize) == no && l.offset == e.offset)
            };
            let total: u64 = entries.iter().map(|e| e.len as u64).sum();
            let live_entries: Vec<&PackEntry> = entries.iter().filter(|e| is_live(e)).collect();
            let live_bytes: u64 = live_entries.iter().map(|e| e.len as u64).sum();
            let holds_unhealed = entries.iter().any(|e| unhealed.contains(&e.id));
            if holds_unhealed {
                for e in entries.iter().filter(|e| live.contains(&e.id)) {
                    taken.insert(e.id);
                }
                sweep.keep.push((*pack, entries.clone()));
            } else if live_entries.is_empty() {
                sweep.drop.push(*pack);
            } else if (live_bytes as f64) < REPACK_BELOW * total as f64
                || damaged_packs.contains(&format::pack_key(pack))
            {
                sweep.drop.push(*pack);
                for e in live_entries {
                    taken.insert(e.id);
                    sweep.moves.push((*pack, *e));
                }
                sweep.repacked += 1;
            } else {
                for e in &live_entries {
                    taken.insert(e.id);
                }
                sweep.keep.push((*pack, entries.clone()));
            }
        }
        sweep.unhealed = unhealed.len() as u64;
        sweep.missing = live.iter().filter(|id| !taken.contains(id)).count() as u64;
        Ok(sweep)
    }

    /// Compact: copies the live blobs (checked) of repacked packs into new packs;
    /// returns their tables and the bytes written.
    fn compact(&self, moves: Vec<(Id, PackEntry)>) -> Result<(Tables, i64)> {
        let mut new_tables = Vec::new();
        let mut pb = PackBuilder::new(self.config.pack_size as usize);
        let mut plain = Vec::new();
        let mut written: i64 = 0;
        for (pack, e) in moves {
            let framed = self.read_entry(pack, &e, &mut plain)?;
            pb.add(e.kind, e.id, e.plain_len, &framed)?;
            if pb.len() >= self.config.pack_size as usize {
                let full =
                    std::mem::replace(&mut pb, PackBuilder::new(self.config.pack_size as usize));
                written += self.store_pack(full, &mut new_tables)? as i64;
            }
        }
        if !pb.is_empty() {
            written += self.store_pack(pb, &mut new_tables)? as i64;
        }
        Ok((new_tables, written))
    }

    /// Writes the new consolidated index of `all`, then removes the old index files;
    /// returns the bytes written and freed.
    fn replace_index(&self, all: &[(Id, Vec<PackEntry>)]) -> Result<(i64, i64)> {
        let name = format!(
            "gc-{}-{}",
            utc::compact(utc::now()),
            crate::crypto::random_hex(4)?
        );
        let new_index = format::encode_index(all);
        let old_index: Vec<(String, u64)> = self
            .backend
            .list("index/")?
            .into_iter()
            .map(|e| (e.key, e.size))
            .collect();
        self.backend.put(&format!("index/{name}"), &new_index)?;
        let mut freed: i64 = 0;
        for (key, size) in old_index {
            self.backend.delete(&key)?;
            freed += size as i64;
        }
        Ok((new_index.len() as i64, freed))
    }

    fn store_pack(&self, pb: PackBuilder, tables: &mut Vec<(Id, Vec<PackEntry>)>) -> Result<u64> {
        let (bytes, entries) = pb.finish();
        let id = format::pack_id(&bytes);
        self.backend.put(&format::pack_key(&id), &bytes)?;
        tables.push((id, entries));
        Ok(bytes.len() as u64)
    }
}
