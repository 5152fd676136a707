//! Chains of recovery points of one disk, mutated between backups, alternating backups
//! with exact changed ranges and without (full read, compare by hash): every recovery
//! point restores exactly, in any order, before and after forgetting some and gc; the
//! statistics of incrementals add up.
mod common;
use common::*;
use datastore::{BaseChoice, Manifest, Retention};

fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|r| r.1).sum()
}

/// Checks the statistics of a backup of a disk of `size` bytes after writes to
/// `ranges`, taken with or without those ranges.
fn check_stats(m: &Manifest, size: u64, ranges: &[(u64, u64)], with_ranges: bool) {
    let st = m.stats;
    let nblocks = size.div_ceil(BS);
    let touched = touched_blocks(ranges).len() as u64;
    let what = format!("{} ({} changed ranges, {st:?})", m.id, ranges.len());
    assert_eq!(
        st.blocks_new + st.blocks_dedup + st.blocks_zero + st.blocks_reused,
        nblocks,
        "{what}: every block is accounted for once"
    );
    // Only blocks touched by the writes can hold new data.
    assert!(st.blocks_new <= touched, "{what}");
    if with_ranges {
        assert_eq!(st.changed_bytes, Some(total(ranges)), "{what}");
        // Reads only the changed blocks (ranges rounded out to blocks), at most.
        assert!(st.bytes_read <= touched * BS, "{what}");
        assert!(st.bytes_read > 0, "{what}");
        // Everything else is taken from the base without reading.
        assert_eq!(st.blocks_reused, nblocks - touched, "{what}");
        assert_eq!(st.blocks_new + st.blocks_dedup + st.blocks_zero, touched);
        // Stores the changed blocks (framed, maybe compressed) and the changed index
        // pieces (32 bytes per block), not much more.
        let pieces = nblocks.div_ceil(1024);
        let bound = touched * (BS + 128) + pieces * (1024 * 32 + 128);
        assert!(st.bytes_stored <= bound, "{what}: stored > {bound}");
        assert!(st.bytes_stored <= 32 * total(ranges) + bound - touched * (BS + 128));
    } else {
        assert_eq!(st.changed_bytes, None, "{what}");
        assert_eq!(st.blocks_reused, 0, "{what}");
        assert!(st.bytes_read <= size, "{what}");
        // Read everything, but deduplicated: stored about as much as with ranges.
        assert!(
            st.bytes_stored <= touched * (BS + 128) + 32 * 1024 + 128,
            "{what}"
        );
    }
}

#[test]
fn chain_with_and_without_changed_ranges_then_forget_and_gc() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let mut model = gen_raw(&img, ODD_SIZE, 20);
    let dir = d.path().join("ds");
    let ds = create_store(&dir, false);
    let mut rng = Rng::new(21);
    let mut points: Vec<(Manifest, Vec<u8>)> = vec![(backup_full(&ds, "vm", &img), model.clone())];
    for i in 1..8 {
        let ranges = mutate(&img, &mut model, &mut rng, 10 + i);
        let with_ranges = i % 2 == 1;
        let prev = points.last().unwrap().0.id.clone();
        let m = backup(
            &ds,
            "vm",
            BaseChoice::Point(prev.clone()),
            &[In {
                path: &img,
                changed: with_ranges.then(|| ranges.clone()),
            }],
        );
        assert_eq!(m.base.as_deref(), Some(prev.as_str()));
        check_stats(&m, ODD_SIZE, &ranges, with_ranges);
        points.push((m, model.clone()));
    }
    let restore_all = |points: &[(Manifest, Vec<u8>)], rng: &mut Rng, when: &str| {
        let mut order: Vec<usize> = (0..points.len()).collect();
        rng.shuffle(&mut order);
        for i in order {
            let (m, want) = &points[i];
            let got = restore(&ds, &ds.point(&m.id).unwrap(), 0);
            assert_same(&got, want, &format!("{when}: point {i} ({})", m.id));
        }
    };
    restore_all(&points, &mut rng, "before gc");
    // One through write_image too.
    let (m3, want3) = &points[3];
    assert_same(
        &restore_to_raw(&ds, m3, 0, &d.path().join("out.raw")),
        want3,
        "write_image of point 3",
    );
    assert_clean(&verify(&ds));

    // Forget some, including the base of others: every point is a full image by
    // reference, so the rest still restore.
    for i in [1, 3, 4, 6] {
        ds.forget(&points[i].0.id).unwrap();
    }
    let remaining: Vec<(Manifest, Vec<u8>)> = points
        .iter()
        .enumerate()
        .filter(|(i, _)| ![1, 3, 4, 6].contains(i))
        .map(|(_, p)| p.clone())
        .collect();
    let (listed, bad) = ds.points().unwrap();
    assert!(bad.is_empty());
    let mut ids: Vec<_> = listed.iter().map(|m| m.id.clone()).collect();
    let mut want_ids: Vec<_> = remaining.iter().map(|p| p.0.id.clone()).collect();
    ids.sort();
    want_ids.sort();
    assert_eq!(ids, want_ids);
    let before = dir_size(&dir);
    let g = ds.gc(&mut |_| {}).unwrap();
    assert_eq!(g.points, remaining.len() as u64);
    assert!(dir_size(&dir) <= before, "gc grew the datastore: {g:?}");
    assert!(ds.point(&points[1].0.id).is_err());
    restore_all(&remaining, &mut rng, "after gc");
    assert_clean(&verify(&ds));

    // The chain goes on from the newest remaining point, with changed ranges.
    let ranges = mutate(&img, &mut model, &mut rng, 9);
    let last = remaining.last().unwrap().0.id.clone();
    let m = backup(
        &ds,
        "vm",
        BaseChoice::Point(last),
        &[In {
            path: &img,
            changed: Some(ranges.clone()),
        }],
    );
    check_stats(&m, ODD_SIZE, &ranges, true);
    assert_same(&restore(&ds, &m, 0), &model, "after gc, new point");
    // A second gc with nothing to collect changes nothing readable.
    ds.gc(&mut |_| {}).unwrap();
    restore_all(&remaining, &mut rng, "after second gc");
    assert_clean(&verify(&ds));
}

/// "Latest" must be the backup taken last, even when several are taken within one
/// second: a changed-range backup applies its ranges to that base, so picking an older
/// point silently yields a wrong recovery point; and prune's "last N" must keep the N
/// taken last.
#[test]
fn latest_is_the_last_taken_even_within_one_second() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let size = (2 << 20) + 4096;
    let mut model = gen_raw(&img, size, 30);
    let ds = create_store(&d.path().join("ds"), false);
    let mut rng = Rng::new(31);
    let mut taken = vec![backup_full(&ds, "vm", &img).id];
    let mut wrong = Vec::new();
    for i in 0..10 {
        let ranges = mutate(&img, &mut model, &mut rng, 4);
        let m = backup(
            &ds,
            "vm",
            BaseChoice::Latest,
            &[In {
                path: &img,
                changed: Some(ranges),
            }],
        );
        if m.base.as_deref() != taken.last().map(|s| s.as_str()) {
            wrong.push(format!(
                "backup {i} ({}) used base {:?}, not the previous backup {:?}",
                m.id,
                m.base,
                taken.last()
            ));
        }
        let got = restore(&ds, &m, 0);
        if got != model {
            wrong.push(format!("backup {i} ({}) does not restore exactly", m.id));
        }
        taken.push(m.id);
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let kept: Vec<String> = ds
        .prune(
            &Retention {
                last: Some(3),
                ..Default::default()
            },
            &[],
            false,
        )
        .unwrap()
        .into_iter()
        .filter(|d| d.keep)
        .map(|d| d.id)
        .collect();
    let mut kept = kept;
    kept.sort();
    let mut want = taken[taken.len() - 3..].to_vec();
    want.sort();
    assert_eq!(kept, want, "prune --keep-last 3 kept other points");
}

fn dir_size(dir: &std::path::Path) -> u64 {
    files(dir, "")
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}
