//! Receiving a backup from a remote agent ("ask first, then send"): the agent runs the
//! backup pipeline against the server, asks which blocks are missing, and sends those
//! already compressed (and encrypted). The server trusts nothing it receives: every blob
//! is decoded and its id recomputed before it is stored, so an agent can never store
//! data under an id that does not match it (which would poison deduplication for every
//! other source), and a recovery point is only written once everything it references
//! is stored.

use crate::backend::{LockGuard, Staged};
use crate::backup::BlockParams;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::format::{self, BlobHeader, Kind, PackBuilder, PackEntry};
use crate::id::Id;
use crate::manifest::{
    Consistency, DiskRecord, MANIFEST_FORMAT, MANIFEST_VERSION, Manifest, Source, Stats,
};
use crate::store::{BlobIndex, Datastore, Loc};
use locks::lock;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Largest disk a remote agent may record.
pub const MAX_REMOTE_DISK: u64 = 64 << 40;

/// A remote backup being received: validates and stores blobs sent by an agent, then
/// writes the recovery point. Holds the datastore's shared lock from begin to
/// commit/abort (so gc waits). Dropping it aborts.
pub struct Ingest {
    store: Arc<Datastore>,
    source: Source,
    /// The datastore's blobs when the session began.
    index: BlobIndex,
    state: Mutex<State>,
    _lock: Mutex<Box<dyn LockGuard>>,
}

struct State {
    /// Blobs this session stored.
    session: HashSet<Id>,
    pack: PackBuilder,
    /// Written but not yet visible: committed on commit, removed on abort.
    staged: Vec<Box<dyn Staged>>,
    packs: Vec<(Id, Vec<PackEntry>)>,
    bytes: u64,
    /// Why the session can no longer commit (a rejected batch, a failed write).
    failed: Option<String>,
    /// Pack buffers already written out, for reuse (no page faults on fresh memory).
    spare: Vec<vdisk::aligned::AlignedBuf>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn rejected(what: impl Into<String>) -> Error {
    Error::Rejected(what.into())
}

impl Datastore {
    /// Starts receiving a remote backup of `source`.
    pub fn begin_ingest(self: &Arc<Datastore>, source: Source) -> Result<Ingest> {
        let guard = self.backend.lock(false, true)?;
        let index = self.blob_index()?;
        Ok(Ingest {
            store: self.clone(),
            source,
            index,
            state: Mutex::new(State {
                session: HashSet::new(),
                pack: PackBuilder::new(self.config.pack_size as usize),
                spare: Vec::new(),
                staged: Vec::new(),
                packs: Vec::new(),
                bytes: 0,
                failed: None,
            }),
            _lock: Mutex::new(guard),
        })
    }
}

impl Ingest {
    pub fn params(&self) -> BlockParams {
        self.store.block_params()
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The latest recovery point of the source, if any (the base for change-tracked
    /// backups).
    pub fn latest(&self) -> Result<Option<Manifest>> {
        self.store.latest_point(&self.source.name)
    }

    /// For each id: true when neither the datastore nor this session has it.
    pub fn missing(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let st = lock(&self.state);
        Ok(ids
            .iter()
            .map(|id| !self.index.contains(id) && !st.session.contains(id))
            .collect())
    }

    /// A stored index piece, framed exactly as in its pack (the agent decodes it with
    /// [`decode_framed_piece`]). Only index pieces are served.
    pub fn framed_blob(&self, id: Id) -> Result<Vec<u8>> {
        let loc = self
            .index
            .map
            .get(&id)
            .filter(|l| l.kind == Kind::Index)
            .ok_or_else(|| Error::Missing {
                key: format!("index piece {id}"),
            })?;
        let pack = self.index.packs[loc.pack as usize];
        let mut buf = vec![0u8; loc.len as usize];
        self.store
            .backend
            .get_range(&format::pack_key(&pack), loc.offset as u64, &mut buf)?;
        Ok(buf)
    }

    fn check_usable(&self) -> Result<()> {
        match &lock(&self.state).failed {
            Some(why) => Err(rejected(format!("session failed earlier: {why}"))),
            None => Ok(()),
        }
    }

    fn fail(&self, e: Error) -> Error {
        let mut st = lock(&self.state);
        if st.failed.is_none() {
            st.failed = Some(e.to_string());
        }
        e
    }

    /// Parses concatenated framed blobs, verifies each (header checksum, sizes, GCM tag,
    /// decompression, and id == keys.id(plaintext)), and adds the new ones to packs;
    /// duplicates (in the datastore or this session) are skipped. Returns (blobs
    /// stored, bytes stored). A malformed batch is refused whole, with its offset, and
    /// fails the session (nothing of it is kept; an honest agent never sends one).
    pub fn put(&self, batch: &[u8]) -> Result<(u64, u64)> {
        self.check_usable()?;
        let blobs = self.verify_batch(batch).map_err(|e| self.fail(e))?;
        let pack_size = self.store.config.pack_size as usize;
        let mut full = Vec::new();
        let (mut n, mut bytes) = (0u64, 0u64);
        {
            let mut st = lock(&self.state);
            for (_, h, b) in &blobs {
                if self.index.contains(&h.id) || !st.session.insert(h.id) {
                    continue;
                }
                st.pack.add(h.kind, h.id, h.plain_len, b)?;
                n += 1;
                bytes += b.len() as u64;
                if st.pack.len() >= pack_size {
                    let fresh = match st.spare.pop() {
                        Some(b) => PackBuilder::with_buffer(b),
                        None => PackBuilder::new(pack_size),
                    };
                    full.push(std::mem::replace(&mut st.pack, fresh).finish());
                }
            }
            st.bytes += bytes;
        }
        // Written outside the lock, so other requests keep going meanwhile.
        for (buf, entries) in full {
            self.stage(&buf, entries).map_err(|e| self.fail(e))?;
            let mut st = lock(&self.state);
            if st.spare.len() < 2 {
                st.spare.push(buf);
            }
        }
        Ok((n, bytes))
    }

    fn stage(&self, buf: &[u8], entries: Vec<PackEntry>) -> Result<()> {
        let id = format::pack_id(buf);
        let s = self.store.backend.stage(&format::pack_key(&id), buf)?;
        let mut st = lock(&self.state);
        st.staged.push(s);
        st.packs.push((id, entries));
        Ok(())
    }

    /// Checks every blob of `batch`, decoding in parallel (the CPU work of ingest).
    fn verify_batch<'b>(&self, batch: &'b [u8]) -> Result<Vec<(usize, BlobHeader, &'b [u8])>> {
        let bad = |off: usize, e: Error| {
            let detail = match e {
                Error::Corrupt { detail, .. } => detail,
                e => e.to_string(),
            };
            // The walk's messages already name the offset.
            if detail.contains(&format!("offset {off}")) {
                rejected(format!("batch: {detail}"))
            } else {
                rejected(format!("batch: blob at offset {off}: {detail}"))
            }
        };
        let mut blobs = Vec::new();
        for b in format::split_blobs("batch", batch) {
            match b {
                Ok(x) => blobs.push(x),
                Err(e) => {
                    let off = blobs
                        .last()
                        .map_or(0, |(o, _, b): &(usize, _, &[u8])| o + b.len());
                    return Err(bad(off, e));
                }
            }
        }
        let bs = self.store.config.block_size;
        let pb = self.store.config.piece_blocks;
        for (off, h, _) in &blobs {
            let ok = match h.kind {
                Kind::Data => h.plain_len > 0 && h.plain_len <= bs,
                Kind::Index => h.plain_len > 0 && h.plain_len % 32 == 0 && h.plain_len / 32 <= pb,
            };
            if !ok {
                return Err(bad(
                    *off,
                    rejected(format!(
                        "{:?} blob of {} bytes does not fit this datastore",
                        h.kind, h.plain_len
                    )),
                ));
            }
        }
        let keys = &self.store.keys;
        let threads = self.store.threads.clamp(1, blobs.len().max(1));
        let per = blobs.len().div_ceil(threads).max(1);
        let first_bad = std::thread::scope(|scope| {
            let handles: Vec<_> = blobs
                .chunks(per)
                .map(|chunk| scope.spawn(move || check_blobs(keys, chunk)))
                .collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(r) => r,
                    Err(_) => Some((0, rejected("a verifying thread panicked"))),
                })
                .min_by_key(|(off, _)| *off)
        });
        match first_bad {
            Some((off, e)) => Err(bad(off, e)),
            None => Ok(blobs),
        }
    }

    /// Flushes packs, checks the disk records against what is stored, then writes the
    /// index file and the manifest (id and time by this clock). Index pieces stored
    /// before this session are trusted (their blocks were checked when they were
    /// stored, and gc keeps a referenced piece's blocks); pieces this session stored are
    /// read back and every block id in them must be stored (or zero).
    pub fn commit(
        self,
        consistency: Consistency,
        base: Option<String>,
        disks: Vec<DiskRecord>,
        stats: Stats,
    ) -> Result<Manifest> {
        let now = utc::now_micros();
        self.commit_dated(consistency, base, disks, stats, now)
    }

    /// [`Ingest::commit`], the recovery point dated `at` (Unix seconds, microseconds)
    /// instead of now: an offline seed is dated by when its view was taken.
    pub fn commit_dated(
        self,
        consistency: Consistency,
        base: Option<String>,
        disks: Vec<DiskRecord>,
        stats: Stats,
        at: (i64, u32),
    ) -> Result<Manifest> {
        self.check_usable()?;
        let (started, micros) = at;
        let cfg = &self.store.config;
        for (i, d) in disks.iter().enumerate() {
            let want = d.blocks().div_ceil(cfg.piece_blocks as u64);
            if d.index as usize != i
                || d.block_size != cfg.block_size
                || d.piece_blocks != cfg.piece_blocks
                || d.virtual_size > MAX_REMOTE_DISK
                || d.pieces.len() as u64 != want
            {
                return Err(rejected(format!(
                    "disk record {i}: position {}, {} bytes, block size {}, {} blocks per piece and {} pieces do not match this datastore ({} bytes per block, {} per piece, {want} pieces expected, at most {MAX_REMOTE_DISK} bytes)",
                    d.index,
                    d.virtual_size,
                    d.block_size,
                    d.piece_blocks,
                    d.pieces.len(),
                    cfg.block_size,
                    cfg.piece_blocks
                )));
            }
        }
        if let Some(b) = &base {
            // An actual recovery point of this source (not "latest": the manifest
            // records the id).
            let m = self.store.point(b)?;
            if m.source.name != self.source.name {
                return Err(rejected(format!(
                    "base {b} belongs to source {:?}, not {:?}",
                    m.source.name, self.source.name
                )));
            }
        }
        let mut st = locks::into_inner(self.state);
        if !st.pack.is_empty() {
            let (buf, entries) = std::mem::replace(&mut st.pack, PackBuilder::new(0)).finish();
            let id = format::pack_id(&buf);
            st.staged
                .push(self.store.backend.stage(&format::pack_key(&id), &buf)?);
            st.packs.push((id, entries));
        }
        // The packs become visible now; if a check below fails, they are unreferenced
        // and the next gc removes them.
        for s in st.staged.drain(..) {
            s.commit()?;
        }
        let mut index = self.index;
        for (pack, entries) in &st.packs {
            index.packs.push(*pack);
            let no = (index.packs.len() - 1) as u32;
            for e in entries {
                index.map.entry(e.id).or_insert(Loc {
                    pack: no,
                    offset: e.offset,
                    len: e.len,
                    kind: e.kind,
                });
            }
        }
        let mut checked = HashSet::new();
        for d in &disks {
            let pb = d.piece_blocks as u64;
            let blocks = d.blocks();
            for (p, hex) in d.pieces.iter().enumerate() {
                let pid = Id::from_hex(hex).ok_or_else(|| {
                    rejected(format!("disk {} piece {p}: {hex:?} is not an id", d.index))
                })?;
                if index.map.get(&pid).map(|l| l.kind) != Some(Kind::Index) {
                    return Err(rejected(format!(
                        "disk {} piece {p}: index piece {pid} is not stored",
                        d.index
                    )));
                }
                if !st.session.contains(&pid) || !checked.insert(pid) {
                    continue;
                }
                let ids = self.store.read_piece(&index, pid)?;
                let want = (blocks - p as u64 * pb).min(pb);
                if ids.len() as u64 != want {
                    return Err(rejected(format!(
                        "disk {} piece {p}: index piece {pid} lists {} blocks, {want} expected",
                        d.index,
                        ids.len()
                    )));
                }
                if let Some(b) = ids.iter().find(|b| !b.is_zero() && !index.contains(b)) {
                    return Err(rejected(format!(
                        "disk {} piece {p}: index piece {pid} references block {b}, which is not stored",
                        d.index
                    )));
                }
            }
        }
        let id = format!(
            "{}-{}",
            utc::id_stamp(started, micros),
            crate::crypto::random_hex(4)?
        );
        self.store.write_index(&id, &st.packs)?;
        let mut stats = stats;
        stats.bytes_stored = st.bytes;
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            id,
            source: self.source,
            created: utc::rfc3339(started),
            created_unix: started,
            base,
            consistency,
            disks,
            stats,
        };
        self.store.write_manifest(&manifest)?;
        Ok(manifest)
    }

    /// Drops staged packs: nothing becomes visible (anything already written is removed
    /// or left for gc).
    pub fn abort(self) {}
}

/// Decodes and checks `blobs`; the first failure, with its offset.
fn check_blobs(keys: &Keys, blobs: &[(usize, BlobHeader, &[u8])]) -> Option<(usize, Error)> {
    let mut scratch = Vec::new();
    // One output buffer, sized once: decoding into a slice of it zero-fills nothing.
    let max = blobs.iter().map(|(_, h, _)| h.plain_len).max().unwrap_or(0);
    let mut plain = vec![0u8; max as usize];
    for (off, h, b) in blobs {
        let Some(out) = plain.get_mut(..h.plain_len as usize) else {
            return Some((
                *off,
                rejected("blob larger than any blob may be".to_string()),
            ));
        };
        if let Err(e) = format::check_blob(keys, "batch", *off as u64, h.id, b, &mut scratch, out) {
            return Some((*off, e));
        }
    }
    None
}

/// Opens an index piece obtained framed (from [`Ingest::framed_blob`]): checks it holds
/// `id` and returns its block ids.
pub fn decode_framed_piece(keys: &Keys, framed: &mut [u8], id: Id) -> Result<Vec<Id>> {
    let key = format!("index piece {id}");
    let mut raw = Vec::new();
    let h = format::decode_blob(keys, &key, 0, id, framed, &mut raw)?;
    if h.kind != Kind::Index || raw.len() % 32 != 0 {
        return Err(Error::corrupt(key, "not an index piece"));
    }
    Ok(raw.chunks_exact(32).filter_map(Id::from_slice).collect())
}

/// Decodes and checks one framed data blob (as [`Datastore::framed_blob`] gives it)
/// against its id: a block of disk data.
pub fn decode_framed_block(keys: &Keys, framed: &mut [u8], id: Id) -> Result<Vec<u8>> {
    let key = format!("blob {id}");
    let mut raw = Vec::new();
    let h = format::decode_blob(keys, &key, 0, id, framed, &mut raw)?;
    if h.kind != Kind::Data {
        return Err(Error::corrupt(key, "not a data blob"));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Ingest>();
    }
}
