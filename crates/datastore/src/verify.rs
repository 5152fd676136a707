//! verify: re-reads every stored blob, checks it, and names the recovery points and
//! disks that depend on anything damaged or missing.

use crate::error::Result;
use crate::format;
use crate::id::Id;
use crate::manifest::Manifest;
use crate::store::{BadLoc, Datastore};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What verify found.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub packs: u64,
    pub blobs: u64,
    pub bytes: u64,
    pub points: u64,
    /// Damaged or missing blob copies and files, each with the reason.
    pub damaged_files: Vec<FileDamage>,
    /// Recovery points that cannot be restored exactly.
    pub damaged_points: Vec<PointDamage>,
    /// Damaged copies no recovery point needs (a good copy exists, or nothing refers
    /// to them): gc removes them.
    pub unreferenced_damage: u64,
}

#[derive(Debug, Serialize)]
pub struct FileDamage {
    pub key: String,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct PointDamage {
    pub id: String,
    pub source: Option<String>,
    /// The manifest itself is unreadable.
    pub error: Option<String>,
    pub disks: Vec<DiskDamage>,
}

#[derive(Debug, Serialize)]
pub struct DiskDamage {
    pub disk: u32,
    /// Blocks whose data is damaged or missing.
    pub bad_blocks: u64,
    /// Disk offset of the first of them.
    pub first_bad_offset: u64,
    /// Index pieces that are damaged (their blocks are unknown).
    pub bad_index_pieces: u64,
}

impl VerifyReport {
    /// True when every recovery point restores exactly and every file reads.
    pub fn is_clean(&self) -> bool {
        self.damaged_points.is_empty() && self.damaged_files.is_empty()
    }
}

/// The reason alone: the key and offset are reported beside it.
fn detail(e: crate::Error) -> String {
    match e {
        crate::Error::Corrupt { detail, .. } => detail,
        e => e.to_string(),
    }
}

impl Datastore {
    /// Reads and checks everything. Records damaged blob copies so that later backups
    /// store those blocks again (heal) and gc drops the damaged copies.
    pub fn verify(&self, progress: &mut (dyn FnMut(u64, u64) + Send)) -> Result<VerifyReport> {
        let _lock = self.backend.lock(false, true)?;
        let mut report = VerifyReport::default();
        let mut files = Vec::new();
        let mut damaged_files = Vec::new();
        let tables = self.pack_tables(&mut files, &mut damaged_files)?;
        for (key, error) in damaged_files {
            report.damaged_files.push(FileDamage { key, error });
        }
        // Packs that index files list but that are gone.
        for e in self.backend.list("index/")? {
            if let Ok(list) = self
                .backend
                .get(&e.key)
                .and_then(|b| format::decode_index(&e.key, &b))
            {
                for (pack, _) in list {
                    if !tables.iter().any(|(p, _)| *p == pack) {
                        report.damaged_files.push(FileDamage {
                            key: format::pack_key(&pack),
                            error: format!("missing (listed by {})", e.key),
                        });
                    }
                }
            }
        }
        let total: u64 = tables
            .iter()
            .map(|(_, e)| e.iter().map(|x| x.len as u64).sum::<u64>())
            .sum();
        let sizes = self.pack_sizes()?;
        let good: Mutex<HashSet<Id>> = Mutex::new(HashSet::new());
        let bad: Mutex<Vec<(BadLoc, Id, String)>> = Mutex::new(Vec::new());
        let bad_trailers: Mutex<Vec<(Id, String)>> = Mutex::new(Vec::new());
        let next = AtomicUsize::new(0);
        let done = Mutex::new((0u64, progress));
        std::thread::scope(|s| {
            for _ in 0..self.threads {
                s.spawn(|| {
                    let mut plain = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((pack, entries)) = tables.get(i) else {
                            return;
                        };
                        let key = format::pack_key(pack);
                        let mut ok_ids = Vec::with_capacity(entries.len());
                        let mut bad_here = Vec::new();
                        let mut bytes = 0u64;
                        for e in entries {
                            let r = self.read_entry(*pack, e, &mut plain);
                            match r {
                                Ok(_) => ok_ids.push(e.id),
                                Err(err) => bad_here.push(((*pack, e.offset), e.id, detail(err))),
                            }
                            bytes += e.len as u64;
                        }
                        // The trailer is what rebuilds the index if an index file is lost.
                        let trailer = match sizes.get(&key) {
                            Some(&size) => self.read_trailer(&key, size),
                            None => Err(crate::Error::Missing { key: key.clone() }),
                        };
                        let trailer_problem = match trailer {
                            Ok(t) if t == *entries => None,
                            Ok(_) => Some("pack trailer does not match the index file".to_string()),
                            Err(e) => Some(detail(e)),
                        };
                        if let Some(p) = trailer_problem {
                            locks::lock(&bad_trailers).push((*pack, p));
                        }
                        locks::lock(&good).extend(ok_ids);
                        locks::lock(&bad).extend(bad_here);
                        let mut d = locks::lock(&done);
                        d.0 += bytes;
                        let n = d.0;
                        (d.1)(n, total);
                    }
                });
            }
        });
        let good = locks::into_inner(good);
        let bad = locks::into_inner(bad);
        report.packs = tables.len() as u64;
        report.blobs = tables.iter().map(|(_, e)| e.len() as u64).sum();
        report.bytes = total;
        let bad_trailers = locks::into_inner(bad_trailers);
        // Record damaged locations before reading indexes, so pieces come from good copies.
        // A damaged trailer is recorded as offset u32::MAX: gc then rewrites the pack.
        let mut bad_locs: Vec<BadLoc> = bad.iter().map(|b| b.0).collect();
        for (pack, problem) in &bad_trailers {
            bad_locs.push((*pack, crate::store::TRAILER_DAMAGED));
            let key = format::pack_key(pack);
            if !report.damaged_files.iter().any(|f| f.key == key) {
                report.damaged_files.push(FileDamage {
                    key,
                    error: problem.clone(),
                });
            }
        }
        self.write_damaged(&bad_locs)?;
        let index = self.blob_index()?;
        let (points, unreadable) = self.points()?;
        report.points = (points.len() + unreadable.len()) as u64;
        for d in unreadable {
            report.damaged_points.push(PointDamage {
                id: d.key.trim_start_matches("points/").to_string(),
                source: None,
                error: Some(d.error.to_string()),
                disks: Vec::new(),
            });
        }
        let mut needed_bad: HashSet<Id> = HashSet::new();
        for m in &points {
            if let Some(d) = self.check_point(m, &index, &good, &mut needed_bad) {
                report.damaged_points.push(d);
            }
        }
        for (loc, id, error) in &bad {
            if needed_bad.contains(id) {
                report.damaged_files.push(FileDamage {
                    key: format!("{} offset {}", format::pack_key(&loc.0), loc.1),
                    error: error.clone(),
                });
            } else {
                report.unreferenced_damage += 1;
            }
        }
        Ok(report)
    }

    fn check_point(
        &self,
        m: &Manifest,
        index: &crate::store::BlobIndex,
        good: &HashSet<Id>,
        needed_bad: &mut HashSet<Id>,
    ) -> Option<PointDamage> {
        let mut disks = Vec::new();
        for d in &m.disks {
            let mut dd = DiskDamage {
                disk: d.index,
                bad_blocks: 0,
                first_bad_offset: u64::MAX,
                bad_index_pieces: 0,
            };
            let pb = d.piece_blocks as u64;
            let bs = d.block_size as u64;
            let want_pieces = d.blocks().div_ceil(pb.max(1));
            if d.pieces.len() as u64 != want_pieces {
                dd.bad_index_pieces += want_pieces.abs_diff(d.pieces.len() as u64);
            }
            for (p, h) in d.pieces.iter().enumerate() {
                let first = p as u64 * pb;
                let ids = Id::from_hex(h)
                    .filter(|pid| {
                        let ok = good.contains(pid);
                        if !ok {
                            needed_bad.insert(*pid);
                        }
                        ok
                    })
                    .and_then(|pid| self.read_piece(index, pid).ok());
                let Some(ids) = ids else {
                    dd.bad_index_pieces += 1;
                    dd.first_bad_offset = dd.first_bad_offset.min(first * bs);
                    continue;
                };
                for (i, id) in ids.iter().enumerate() {
                    if !id.is_zero() && !good.contains(id) {
                        needed_bad.insert(*id);
                        dd.bad_blocks += 1;
                        dd.first_bad_offset = dd.first_bad_offset.min((first + i as u64) * bs);
                    }
                }
            }
            if dd.bad_blocks > 0 || dd.bad_index_pieces > 0 {
                disks.push(dd);
            }
        }
        (!disks.is_empty()).then(|| PointDamage {
            id: m.id.clone(),
            source: Some(m.source.name.clone()),
            error: None,
            disks,
        })
    }
}
