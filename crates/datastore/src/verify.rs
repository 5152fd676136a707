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
    /// Packs whose every blob was read and checked (all of them, unless sampled).
    pub packs_read: u64,
    /// The share of packs read in full, in percent (100: a full verify).
    pub sample_percent: u8,
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

/// What reading one pack found: good blob ids, damaged copies, a trailer problem, and
/// the bytes read.
type PackCheck = (Vec<Id>, Vec<(BadLoc, Id, String)>, Option<String>, u64);

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
        self.verify_sample(100, progress)
    }

    /// [`Datastore::verify`] reading only `percent` % of the packs in full (chosen at
    /// random, rounded up; every blob in them checked), which
    /// on object storage costs that share of the download. Every manifest and every
    /// index piece is still read and checked (the index pieces of the other packs too),
    /// so damage there is always found; damage in the data blobs of packs not read is
    /// not. 100 (or more) is the full verify. Damage found in earlier runs in packs not
    /// read this time stays recorded.
    pub fn verify_sample(
        &self,
        percent: u8,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<VerifyReport> {
        let _lock = self.backend.lock(false, true)?;
        let percent = percent.min(100);
        let mut report = VerifyReport {
            sample_percent: percent,
            ..VerifyReport::default()
        };
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
        let full = sample(tables.len(), percent)?;
        // Copies earlier verifies found damaged stay so in packs not read now.
        let known_bad: HashSet<BadLoc> = if percent < 100 {
            self.damaged()?.into_iter().collect()
        } else {
            HashSet::new()
        };
        // What is read: every blob of a sampled pack, the index pieces of the others.
        let reads = |i: usize, e: &format::PackEntry| full[i] || e.kind == format::Kind::Index;
        let total: u64 = tables
            .iter()
            .enumerate()
            .map(|(i, (_, e))| {
                e.iter()
                    .filter(|x| reads(i, x))
                    .map(|x| x.len as u64)
                    .sum::<u64>()
            })
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
                        let (ok_ids, bad_here, trailer_problem, bytes) = self.check_pack(
                            *pack,
                            entries,
                            (full[i], &known_bad),
                            &sizes,
                            &mut plain,
                        );
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
        report.packs_read = full.iter().filter(|&&f| f).count() as u64;
        report.blobs = tables.iter().map(|(_, e)| e.len() as u64).sum();
        report.bytes = total;
        let bad_trailers = locks::into_inner(bad_trailers);
        // Record damaged locations before reading indexes, so pieces come from good copies.
        // A damaged trailer is recorded as offset u32::MAX: gc then rewrites the pack.
        let mut bad_locs: Vec<BadLoc> = bad.iter().map(|b| b.0).collect();
        if percent < 100 {
            // Keep what earlier verifies found in packs not read in full this time.
            let read: HashSet<Id> = tables
                .iter()
                .zip(&full)
                .filter(|(_, f)| **f)
                .map(|((p, _), _)| *p)
                .collect();
            bad_locs.extend(known_bad.iter().filter(|(p, _)| !read.contains(p)));
        }
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

    /// Reads one pack's blobs (all of them when `full`, else its index pieces; the
    /// other blobs then count as good, unread) and, when `full`, its trailer.
    fn check_pack(
        &self,
        pack: Id,
        entries: &[format::PackEntry],
        (full, known_bad): (bool, &HashSet<BadLoc>),
        sizes: &std::collections::HashMap<String, u64>,
        plain: &mut Vec<u8>,
    ) -> PackCheck {
        let key = format::pack_key(&pack);
        let mut ok_ids = Vec::with_capacity(entries.len());
        let mut bad_here = Vec::new();
        let mut bytes = 0u64;
        for e in entries {
            if !full && e.kind != format::Kind::Index {
                if !known_bad.contains(&(pack, e.offset)) {
                    ok_ids.push(e.id);
                }
                continue;
            }
            match self.read_entry(pack, e, plain) {
                Ok(_) => ok_ids.push(e.id),
                Err(err) => bad_here.push(((pack, e.offset), e.id, detail(err))),
            }
            bytes += e.len as u64;
        }
        // The trailer is what rebuilds the index if an index file is lost.
        let trailer = match sizes.get(&key) {
            Some(_) if !full => Ok(entries.to_vec()),
            Some(&size) => self.read_trailer(&key, size),
            None => Err(crate::Error::Missing { key: key.clone() }),
        };
        let trailer_problem = match trailer {
            Ok(t) if t == entries => None,
            Ok(_) => Some("pack trailer does not match the index file".to_string()),
            Err(e) => Some(detail(e)),
        };
        (ok_ids, bad_here, trailer_problem, bytes)
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

/// Which of `n` packs to read in full: `percent` % of them (rounded up) chosen at
/// random, all of them at 100.
fn sample(n: usize, percent: u8) -> Result<Vec<bool>> {
    if percent >= 100 {
        return Ok(vec![true; n]);
    }
    let want = (n * usize::from(percent)).div_ceil(100);
    let mut order: Vec<usize> = (0..n).collect();
    // A Fisher-Yates shuffle's first `want` places, from the system's random source.
    let mut r = [0u8; 8];
    for i in 0..want.min(n) {
        crate::crypto::random(&mut r)?;
        let span = (n - i) as u64;
        let j = i + (u64::from_le_bytes(r) % span) as usize;
        order.swap(i, j);
    }
    let mut full = vec![false; n];
    for &i in order.iter().take(want) {
        full[i] = true;
    }
    Ok(full)
}
