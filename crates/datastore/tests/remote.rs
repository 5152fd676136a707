//! Remote backups: the pipeline runs against a `BlockTarget` that stands in for the
//! network by calling an `Ingest` session directly ("ask first, then send"). Checks the
//! round trip (full, incremental, change-tracked), that only missing blocks travel, that
//! the server refuses poisoned or malformed batches and records referencing what is not
//! stored, and that sessions run concurrently.
mod common;
use common::*;
use datastore::format::{self, Kind};
use datastore::{
    BlockParams, BlockTarget, Consistency, Datastore, DiskInput, Error, Id, Ingest, Manifest,
    backup_disks, decode_framed_piece,
};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vdisk::VirtualDisk;

/// An agent's view of the server, without the network.
struct Loopback<'a> {
    ing: &'a Ingest,
    params: BlockParams,
    sent: AtomicU64,
    puts: AtomicU64,
    /// Questions asked (round trips, over a network).
    asks: AtomicU64,
}

impl BlockTarget for Loopback<'_> {
    fn params(&self) -> &BlockParams {
        &self.params
    }
    fn missing(&self, ids: &[Id]) -> datastore::Result<Vec<bool>> {
        self.asks.fetch_add(1, Ordering::Relaxed);
        self.ing.missing(ids)
    }
    fn read_piece(&self, id: Id) -> datastore::Result<Vec<Id>> {
        let mut f = self.ing.framed_blob(id)?;
        decode_framed_piece(&self.params.keys, &mut f, id)
    }
    fn put(&self, framed: &[u8]) -> datastore::Result<()> {
        self.sent.fetch_add(framed.len() as u64, Ordering::Relaxed);
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.ing.put(framed).map(|_| ())
    }
    fn finish(&self) -> datastore::Result<u64> {
        Ok(self.sent.load(Ordering::Relaxed))
    }
}

/// A remote backup of `disks` as source `src`, on the latest point when `incremental`;
/// returns the manifest and the framed bytes sent.
fn remote_backup(
    ds: &Arc<Datastore>,
    src: &str,
    disks: &[In<'_>],
    incremental: bool,
) -> datastore::Result<(Manifest, u64)> {
    let ing = ds.begin_ingest(source(src))?;
    let base = if incremental { ing.latest()? } else { None };
    let opened: Vec<Box<dyn VirtualDisk>> =
        disks.iter().map(|d| vdisk::open(d.path).unwrap()).collect();
    let inputs: Vec<DiskInput<'_>> = disks
        .iter()
        .zip(&opened)
        .map(|(d, o)| DiskInput {
            disk: o.as_ref(),
            name: d.path.file_name().unwrap().to_string_lossy().into_owned(),
            format: "raw".into(),
            changed: d.changed.clone(),
            excluded: Vec::new(),
        })
        .collect();
    let target = Loopback {
        ing: &ing,
        params: ing.params(),
        sent: AtomicU64::new(0),
        puts: AtomicU64::new(0),
        asks: AtomicU64::new(0),
    };
    let (records, stats) = backup_disks(&target, base.as_ref(), &inputs, 2, &mut |_, _| {})?;
    let sent = target.sent.load(Ordering::Relaxed);
    assert_eq!(stats.bytes_stored, sent);
    // Batched: at most one question per 4 MiB segment, plus one per index piece (and
    // one per base piece looked into, and one for the base's pieces).
    let size: u64 = inputs.iter().map(|d| d.disk.virtual_size()).sum();
    let pieces: usize = records.iter().map(|r| r.pieces.len()).sum();
    let asks = target.asks.load(Ordering::Relaxed);
    assert!(
        asks <= size.div_ceil(4 << 20) + 2 * pieces as u64 + disks.len() as u64,
        "{asks} questions for {size} bytes"
    );
    let m = ing.commit(
        Consistency::CrashConsistent,
        base.map(|b| b.id),
        records,
        stats,
    )?;
    Ok((m, sent))
}

/// Bytes a backup that stores `blocks` new blocks and `pieces` index pieces can send
/// at most (random data does not compress; headers and tags on top).
fn bound(blocks: usize, pieces: usize) -> u64 {
    (blocks as u64) * (BS + 128) + pieces as u64 * (32 * 1024 + 128)
}

fn round_trip(encrypted: bool) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ds");
    let ds = Arc::new(create_store(&dir, encrypted));
    let img = d.path().join("vm.raw");
    let mut model = gen_raw(&img, ODD_SIZE, 7);
    let disk = |changed| {
        [In {
            path: &img,
            changed,
        }]
    };

    let (m1, sent1) = remote_backup(&ds, "vm", &disk(None), false).unwrap();
    assert!(m1.base.is_none());
    assert!(sent1 > 0 && m1.stats.blocks_new > 0);
    assert_eq!(m1.stats.bytes_stored, sent1);
    let fresh = Datastore::open(&dir, None).unwrap();
    assert_same(&restore(&fresh, &m1, 0), &model, "full");

    // Incremental reading everything: only blocks that changed travel.
    let ranges = mutate(&img, &mut model, &mut Rng::new(8), 12);
    let touched = touched_blocks(&ranges).len();
    let (m2, sent2) = remote_backup(&ds, "vm", &disk(None), true).unwrap();
    assert_eq!(m2.base.as_deref(), Some(m1.id.as_str()));
    assert!(sent2 > 0, "something changed");
    assert!(
        sent2 <= bound(touched, m2.disks[0].pieces.len()),
        "sent {sent2} bytes for {touched} changed blocks"
    );
    assert!(m2.stats.blocks_new as usize <= touched);
    assert_same(
        &restore(&Datastore::open(&dir, None).unwrap(), &m2, 0),
        &model,
        "incremental",
    );

    // Change-tracked: unchanged pieces are not even read.
    let ranges = mutate(&img, &mut model, &mut Rng::new(9), 6);
    let touched = touched_blocks(&ranges).len();
    let (m3, sent3) = remote_backup(&ds, "vm", &disk(Some(ranges.clone())), true).unwrap();
    assert_eq!(m3.base.as_deref(), Some(m2.id.as_str()));
    assert!(m3.stats.blocks_reused > 0);
    assert!(m3.stats.bytes_read <= touched as u64 * BS);
    assert!(
        sent3 <= bound(touched, touched),
        "sent {sent3} bytes for {touched} changed blocks"
    );
    let fresh = Datastore::open(&dir, None).unwrap();
    assert_same(&restore(&fresh, &m3, 0), &model, "change-tracked");
    assert_eq!(fresh.points().unwrap().0.len(), 3);
    assert_clean(&verify(&fresh));

    // Nothing changed: only what is needed for the record (at most the pieces) travels.
    let (m4, sent4) = remote_backup(&ds, "vm", &disk(None), true).unwrap();
    assert_eq!(sent4, 0);
    assert_eq!(m4.stats.blocks_new, 0);
    assert_same(&restore(&fresh, &m4, 0), &model, "unchanged");
    if encrypted {
        // The agent encrypted before sending: no plaintext reached the packs.
        for f in files(&dir, "packs") {
            let b = std::fs::read(&f).unwrap();
            assert!(
                !b.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
                "{} holds plaintext",
                f.display()
            );
        }
    }
}

#[test]
fn remote_round_trip_plain() {
    round_trip(false);
}

#[test]
fn remote_round_trip_encrypted() {
    round_trip(true);
}

/// One framed data blob holding `plain`, as an agent would build it.
fn framed(p: &BlockParams, plain: &[u8]) -> Vec<u8> {
    let mut z = zstd::bulk::Compressor::new(p.zstd_level).unwrap();
    let mut out = Vec::new();
    format::encode_blob(
        &p.keys,
        &mut z,
        Kind::Data,
        p.keys.id(plain),
        plain,
        &mut out,
    )
    .unwrap();
    out
}

fn rejected(r: datastore::Result<(u64, u64)>, what: &str, offset: usize) -> String {
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Rejected(_)), "{what}: {msg}");
    assert!(
        msg.contains(&format!("offset {offset}")),
        "{what}: offset {offset} not named: {msg}"
    );
    msg
}

fn assert_nothing_visible(dir: &Path) {
    let ds = Datastore::open(dir, None).unwrap();
    assert!(ds.points().unwrap().0.is_empty());
    assert!(
        ds.blob_index().unwrap().map.is_empty(),
        "blobs became visible"
    );
    assert_clean(&verify(&ds));
}

fn poisoning(encrypted: bool) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ds");
    let ds = Arc::new(create_store(&dir, encrypted));
    let p = ds.block_params();
    let a = text(BS as usize, 1);
    let b = text(BS as usize, 2);
    let good = framed(&p, &a);
    let cases: Vec<(&str, Vec<u8>, usize)> = {
        let mut v = Vec::new();
        // Header claims id(a) but the payload is b's: re-framed with a valid CRC.
        let mut poison = framed(&p, &b);
        // (Encrypted, the header is the AEAD's associated data: the tag breaks too.)
        poison[16..48].copy_from_slice(&p.keys.id(&a).0);
        let crc = crc32c::crc32c(&poison[..60]);
        poison[60..64].copy_from_slice(&crc.to_le_bytes());
        let mut batch = good.clone();
        batch.extend_from_slice(&poison);
        v.push(("poisoned id", batch, good.len()));
        let mut batch = good.clone();
        batch.extend_from_slice(&good[..good.len() - 10]);
        v.push(("truncated", batch, good.len()));
        let mut bad_crc = good.clone();
        bad_crc[8] ^= 1;
        let mut batch = good.clone();
        batch.extend_from_slice(&bad_crc);
        v.push(("bad header crc", batch, good.len()));
        let mut batch = good.clone();
        batch.extend_from_slice(
            b"garbage garbage garbage garbage garbage garbage garbage garbage garbage",
        );
        v.push(("garbage", batch, good.len()));
        v.push(("garbage first", b"not a blob".to_vec(), 0));
        let mut batch = good.clone();
        let n = batch.len();
        batch[n - 1] ^= 0x40; // payload (or tag) damaged
        v.push(("damaged payload", batch, 0));
        v
    };
    for (what, batch, offset) in cases {
        let ing = ds.begin_ingest(source("evil")).unwrap();
        let msg = rejected(ing.put(&batch), what, offset);
        if what == "poisoned id" && !encrypted {
            assert!(msg.contains("does not match its id"), "{msg}");
        }
        // Nothing of the batch was kept, and the session is over.
        assert_eq!(ing.missing(&[p.keys.id(&a)]).unwrap(), vec![true], "{what}");
        assert!(ing.put(&good).is_err(), "{what}: session still usable");
        let e = ing
            .commit(
                Consistency::CrashConsistent,
                None,
                Vec::new(),
                Default::default(),
            )
            .unwrap_err();
        assert!(matches!(e, Error::Rejected(_)), "{e}");
        assert_nothing_visible(&dir);
    }
    // A good batch, then abort: nothing visible either.
    let ing = ds.begin_ingest(source("vm")).unwrap();
    assert_eq!(ing.put(&good).unwrap(), (1, good.len() as u64));
    assert_eq!(ing.put(&good).unwrap(), (0, 0), "duplicate stored twice");
    assert_eq!(ing.missing(&[p.keys.id(&a)]).unwrap(), vec![false]);
    ing.abort();
    assert_nothing_visible(&dir);
}

#[test]
fn poisoned_and_malformed_batches_are_refused() {
    poisoning(false);
}

#[test]
fn poisoned_and_malformed_batches_are_refused_encrypted() {
    poisoning(true);
}

#[test]
fn commit_refuses_what_is_not_stored() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ds");
    let ds = Arc::new(create_store(&dir, false));
    let img = d.path().join("vm.raw");
    let model = gen_raw(&img, 8 << 20, 3);
    let (good, _) = remote_backup(
        &ds,
        "vm",
        &[In {
            path: &img,
            changed: None,
        }],
        false,
    )
    .unwrap();
    let p = ds.block_params();
    let commit = |disks: Vec<datastore::DiskRecord>, extra: &[u8]| {
        let ing = ds.begin_ingest(source("vm")).unwrap();
        if !extra.is_empty() {
            ing.put(extra).unwrap();
        }
        ing.commit(
            Consistency::CrashConsistent,
            None,
            disks,
            Default::default(),
        )
    };
    // A piece nobody stored.
    let mut disks = good.disks.clone();
    disks[0].pieces[0] = Id([7; 32]).to_hex();
    let e = commit(disks, &[]).unwrap_err().to_string();
    assert!(e.contains("not stored"), "{e}");
    // A piece (sent in this session) listing a block the datastore lacks.
    let pb = p.block_size as u64;
    let nblocks = (8u64 << 20).div_ceil(pb) as usize;
    let mut ids = vec![Id::ZERO; nblocks];
    ids[3] = p.keys.id(b"never stored");
    let raw: Vec<u8> = ids.iter().flat_map(|i| i.0).collect();
    let pid = p.keys.id(&raw);
    let mut piece = Vec::new();
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    format::encode_blob(&p.keys, &mut z, Kind::Index, pid, &raw, &mut piece).unwrap();
    let mut disks = good.disks.clone();
    disks[0].pieces = vec![pid.to_hex()];
    let e = commit(disks, &piece).unwrap_err().to_string();
    assert!(
        e.contains("not stored") && e.contains("references block"),
        "{e}"
    );
    // Records that do not fit the datastore.
    let mut disks = good.disks.clone();
    disks[0].block_size = 4096;
    assert!(commit(disks, &[]).is_err());
    let mut disks = good.disks.clone();
    let first = disks[0].pieces[0].clone();
    disks[0].pieces.push(first);
    assert!(commit(disks, &[]).is_err());
    let mut disks = good.disks.clone();
    disks[0].virtual_size = 1 << 50;
    assert!(commit(disks, &[]).is_err());
    // A base that is not a recovery point of this source.
    let ing = ds.begin_ingest(source("other")).unwrap();
    let e = ing
        .commit(
            Consistency::CrashConsistent,
            Some(good.id.clone()),
            good.disks.clone(),
            Default::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to source"), "{e}");
    // None of that made a recovery point; the good one still restores.
    let fresh = Datastore::open(&dir, None).unwrap();
    assert_eq!(fresh.points().unwrap().0.len(), 1);
    assert_same(&restore(&fresh, &good, 0), &model, "good");
    // The same records again are fine.
    let m = commit(good.disks.clone(), &[]).unwrap();
    assert_same(&restore(&fresh, &m, 0), &model, "recommitted");
}

#[test]
fn concurrent_sessions_for_two_sources() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ds");
    let ds = Arc::new(create_store(&dir, true));
    let imgs: Vec<_> = (0..2)
        .map(|i| d.path().join(format!("vm{i}.raw")))
        .collect();
    let models: Vec<Vec<u8>> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| gen_raw(p, (10 << 20) + 4096 * i as u64, 40 + i as u64))
        .collect();
    let barrier = std::sync::Barrier::new(2);
    let made: Vec<Manifest> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|i| {
                let (ds, img, barrier) = (&ds, &imgs[i], &barrier);
                s.spawn(move || {
                    barrier.wait();
                    remote_backup(
                        ds,
                        &format!("vm{i}"),
                        &[In {
                            path: img,
                            changed: None,
                        }],
                        true,
                    )
                    .unwrap()
                    .0
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let fresh = Datastore::open(&dir, None).unwrap();
    for (i, m) in made.iter().enumerate() {
        assert_eq!(m.source.name, format!("vm{i}"));
        assert_same(&restore(&fresh, m, 0), &models[i], "concurrent");
    }
    assert_clean(&verify(&fresh));
}

/// Ingest of typical compressible data (half text, half random: about 2:1), plain and
/// encrypted: every block of the batches is stored once, counted in the figures `put`
/// returns, and no longer missing; the same batch again stores nothing. (Throughput is
/// measured by bench/datastore.sh, not here.)
#[test]
fn ingest_counts_and_dedups() {
    const BATCHES: usize = 4;
    const PER_BATCH: usize = 64;
    for encrypted in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ds");
        let ds = Arc::new(create_store(&dir, encrypted));
        let p = ds.block_params();
        let mut rng = Rng::new(5);
        let mut batches = Vec::new();
        let mut ids = Vec::new();
        let mut plain = 0usize;
        for b in 0..BATCHES {
            let mut batch = Vec::new();
            for k in 0..PER_BATCH {
                let mut block = text(BS as usize, (b * PER_BATCH + k) as u64);
                rng.fill(&mut block[..BS as usize / 2]);
                let mut z = zstd::bulk::Compressor::new(p.zstd_level).unwrap();
                let id = p.keys.id(&block);
                format::encode_blob(&p.keys, &mut z, Kind::Data, id, &block, &mut batch).unwrap();
                ids.push(id);
                plain += block.len();
            }
            batches.push(batch);
        }
        let ing = ds.begin_ingest(source("bench")).unwrap();
        assert!(ing.missing(&ids).unwrap().iter().all(|&m| m));
        let (mut blobs, mut bytes, mut framed_total) = (0u64, 0u64, 0usize);
        for b in &batches {
            framed_total += b.len();
            let (n, stored) = ing.put(b).unwrap();
            blobs += n;
            bytes += stored;
        }
        assert_eq!(
            blobs,
            (BATCHES * PER_BATCH) as u64,
            "encrypted: {encrypted}"
        );
        assert_eq!(bytes, framed_total as u64, "encrypted: {encrypted}");
        assert!(
            framed_total < plain * 3 / 4,
            "{framed_total} framed bytes for {plain} plaintext bytes: not compressed"
        );
        assert!(ing.missing(&ids).unwrap().iter().all(|&m| !m));
        // Deduplicated: the same blobs again store nothing.
        assert_eq!(ing.put(&batches[0]).unwrap(), (0, 0));
        ing.abort();
    }
}
