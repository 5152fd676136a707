//! Copying recovery points between datastores (folder datastores here; object storage
//! in crates/holdfast/tests/copy.rs): identity kept, byte-identical restores from the
//! target, incremental copies that upload only changed blocks, plain into encrypted,
//! and a cancelled copy whose re-run sends nothing that already landed.
mod common;
use common::*;
use datastore::format::Kind;
use datastore::{BaseChoice, CopyOptions, Datastore, Manifest};
use std::sync::atomic::{AtomicBool, Ordering};

fn copy(dst: &Datastore, src: &Datastore, id: &str) -> datastore::CopyReport {
    dst.copy_point_from(src, id, &CopyOptions::default(), &mut |_, _| {})
        .unwrap()
}

fn data_blobs(ds: &Datastore) -> u64 {
    let idx = ds.blob_index().unwrap();
    idx.map.values().filter(|l| l.kind == Kind::Data).count() as u64
}

fn assert_same_identity(a: &Manifest, b: &Manifest) {
    assert_eq!(a.id, b.id);
    assert_eq!(a.created, b.created);
    assert_eq!(a.created_unix, b.created_unix);
    assert_eq!(a.source, b.source);
    assert_eq!(a.consistency, b.consistency);
    assert_eq!(a.disks.len(), b.disks.len());
    for (x, y) in a.disks.iter().zip(&b.disks) {
        assert_eq!(
            (&x.name, &x.format, x.virtual_size, &x.excluded),
            (&y.name, &y.format, y.virtual_size, &y.excluded)
        );
    }
}

#[test]
fn two_disks_copied_plain_into_encrypted_then_incrementally() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("system.raw");
    let b = d.path().join("data.raw");
    let mut ma = gen_raw(&a, (6 << 20) + 512, 80);
    let mb = gen_raw(&b, (9 << 20) + 3 * 4096, 81);
    let src = create_store(&d.path().join("src"), false);
    let dst = create_store(&d.path().join("dst"), true);
    let full = |p| In {
        path: p,
        changed: None,
    };
    let m1 = backup(&src, "h/vm", BaseChoice::Latest, &[full(&a), full(&b)]);
    let r1 = copy(&dst, &src, &m1.id);
    assert!(!r1.already_there && !r1.ranges_compared && r1.base.is_none());
    assert_eq!(r1.blobs_new, m1.stats.blocks_new);
    assert!(r1.bytes_uploaded >= m1.stats.bytes_stored / 2, "{r1:?}");
    let t1 = dst.point(&m1.id).unwrap();
    assert_same_identity(&m1, &t1);
    assert_same(&restore(&dst, &t1, 0), &ma, "disk 0 from the target");
    assert_same(&restore(&dst, &t1, 1), &mb, "disk 1 from the target");
    // The source was plain, the target is encrypted: no plaintext in the target.
    for f in files(&d.path().join("dst"), "packs") {
        let body = std::fs::read(&f).unwrap();
        assert!(!body.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()));
    }
    // Copied again: nothing to do.
    let again = copy(&dst, &src, &m1.id);
    assert!(again.already_there && again.bytes_uploaded == 0);

    // A later point: only the blocks that differ from m1 (both hold it) are read and sent.
    let ra = mutate(&a, &mut ma, &mut Rng::new(82), 6);
    let m2 = backup(
        &src,
        "h/vm",
        BaseChoice::Point(m1.id.clone()),
        &[
            In {
                path: &a,
                changed: Some(ra.clone()),
            },
            In {
                path: &b,
                changed: Some(Vec::new()),
            },
        ],
    );
    let r2 = copy(&dst, &src, &m2.id);
    assert!(r2.ranges_compared, "{r2:?}");
    assert_eq!(r2.base.as_deref(), Some(m1.id.as_str()));
    // The target held exactly m1's blobs, as the source did before m2.
    assert_eq!(r2.blobs_new, m2.stats.blocks_new, "{r2:?} {:?}", m2.stats);
    assert!(
        r2.bytes_read <= touched_blocks(&ra).len() as u64 * BS,
        "{r2:?}"
    );
    assert!(
        r2.bytes_uploaded < r1.bytes_uploaded / 4,
        "{r2:?} vs {r1:?}"
    );
    let t2 = dst.point(&m2.id).unwrap();
    assert_same_identity(&m2, &t2);
    assert_same(
        &restore(&dst, &t2, 0),
        &ma,
        "disk 0 of the incremental copy",
    );
    assert_same(
        &restore(&dst, &t2, 1),
        &mb,
        "disk 1 of the incremental copy",
    );
    assert_clean(&verify(&dst));
}

#[test]
fn cancelled_copy_rerun_sends_only_what_did_not_land() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("big.raw");
    let size = 64 << 20;
    let want = gen_raw(&a, size, 90);
    let src = create_store(&d.path().join("src"), false);
    let m = backup_full(&src, "h/vm", &a);
    // The reference: a full copy into an empty target.
    let full = copy(&create_store(&d.path().join("full"), true), &src, &m.id);
    let dst = create_store(&d.path().join("dst"), true);
    let cancel = AtomicBool::new(false);
    let opts = CopyOptions {
        throttle: None,
        cancel: Some(&cancel),
    };
    let err = dst
        .copy_point_from(&src, &m.id, &opts, &mut |done, _| {
            if done >= size * 3 / 4 {
                cancel.store(true, Ordering::Relaxed);
            }
        })
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert!(
        dst.point(&m.id).is_err(),
        "a cancelled copy wrote a manifest"
    );
    let landed = data_blobs(&dst);
    assert!(landed > 0, "no pack landed before the cancel");
    let rerun = copy(&dst, &src, &m.id);
    assert!(!rerun.already_there);
    assert_eq!(
        rerun.blobs_new + landed,
        full.blobs_new,
        "{rerun:?} {full:?}"
    );
    assert!(rerun.blobs_new < full.blobs_new);
    let t = dst.point(&m.id).unwrap();
    assert_same(&restore(&dst, &t, 0), &want, "the re-run copy");
}

#[test]
fn throttled_copy_is_paced() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("disk.raw");
    let f = std::fs::File::create(&a).unwrap();
    let mut data = vec![0u8; 3 << 20];
    Rng::new(5).fill(&mut data);
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).unwrap();
    let src = create_store(&d.path().join("src"), false);
    let m = backup_full(&src, "h/vm", &a);
    let dst = create_store(&d.path().join("dst"), false);
    // 2 MiB/s with a quarter-second burst: 3 MiB of packs take over a second.
    let t = datastore::Throttle::new(2048).unwrap();
    let opts = CopyOptions {
        throttle: Some(&t),
        cancel: None,
    };
    let r = dst
        .copy_point_from(&src, &m.id, &opts, &mut |_, _| {})
        .unwrap();
    assert!(r.seconds >= 1.0, "{r:?}");
    assert_same(
        &restore(&dst, &dst.point(&m.id).unwrap(), 0),
        &data,
        "paced copy",
    );
}

#[test]
fn without_a_shared_point_the_copy_reads_whole_disks_and_dedups() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("disk.raw");
    let mut ma = gen_raw(&a, 8 << 20, 40);
    let src = create_store(&d.path().join("src"), false);
    let dst = create_store(&d.path().join("dst"), true);
    let m1 = backup_full(&src, "h/vm", &a);
    copy(&dst, &src, &m1.id);
    mutate(&a, &mut ma, &mut Rng::new(41), 5);
    let m2 = backup_full(&src, "h/vm", &a);
    // The source no longer holds the point the target has: nothing to compare with.
    src.forget(&m1.id).unwrap();
    let r = copy(&dst, &src, &m2.id);
    assert!(!r.ranges_compared, "{r:?}");
    assert_eq!(r.base.as_deref(), Some(m1.id.as_str()));
    // Every data block read (the source's zero blocks are holes, never read).
    assert!(
        r.bytes_read > 6 << 20 && r.bytes_read <= m2.stats.bytes_read,
        "{r:?}"
    );
    // Dedup against the target's own blobs still sends only what is new.
    assert_eq!(r.blobs_new, m2.stats.blocks_new, "{r:?} {:?}", m2.stats);
    let t2 = dst.point(&m2.id).unwrap();
    assert_same(&restore(&dst, &t2, 0), &ma, "copy without a shared point");
}
