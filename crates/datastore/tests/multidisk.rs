//! Several disks in one recovery point: different sizes, changed ranges for each
//! (including an empty list for an unchanged disk), every disk restored exactly.
mod common;
use common::*;
use datastore::{BaseChoice, Manifest};

#[test]
fn two_disks_with_changed_ranges() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("system.raw");
    let b = d.path().join("data.raw");
    let mut ma = gen_raw(&a, (6 << 20) + 512, 70);
    let mut mb = gen_raw(&b, (9 << 20) + 3 * 4096, 71);
    let ds = create_store(&d.path().join("ds"), true);
    let full = |p| In {
        path: p,
        changed: None,
    };
    let mut points: Vec<(Manifest, Vec<u8>, Vec<u8>)> = Vec::new();
    let m = backup(&ds, "vm", BaseChoice::Latest, &[full(&a), full(&b)]);
    points.push((m, ma.clone(), mb.clone()));
    let mut rng = Rng::new(72);
    for round in 0..3 {
        let prev = points.last().unwrap().0.id.clone();
        let ra = mutate(&a, &mut ma, &mut rng, 6);
        // In the last round disk 1 is unchanged: an empty list.
        let rb = if round == 2 {
            Vec::new()
        } else {
            mutate(&b, &mut mb, &mut rng, 9)
        };
        let m = backup(
            &ds,
            "vm",
            BaseChoice::Point(prev),
            &[
                In {
                    path: &a,
                    changed: Some(ra.clone()),
                },
                In {
                    path: &b,
                    changed: Some(rb.clone()),
                },
            ],
        );
        let nblocks = |size: u64| size.div_ceil(BS);
        for (rec, ranges, len) in [(&m.disks[0], &ra, ma.len()), (&m.disks[1], &rb, mb.len())] {
            let touched = touched_blocks(ranges).len() as u64;
            assert_eq!(rec.stats.blocks_reused, nblocks(len as u64) - touched);
            assert!(rec.stats.bytes_read <= touched * BS, "{:?}", rec.stats);
        }
        assert_eq!(
            m.stats.changed_bytes,
            Some(ra.iter().chain(&rb).map(|r| r.1).sum())
        );
        points.push((m, ma.clone(), mb.clone()));
    }
    for (i, (m, wa, wb)) in points.iter().enumerate() {
        assert_eq!(m.disks.len(), 2);
        assert_eq!((m.disks[0].index, m.disks[1].index), (0, 1));
        assert_eq!(m.disks[0].name, "system.raw");
        assert_eq!(m.disks[1].virtual_size, wb.len() as u64);
        assert_same(&restore(&ds, m, 0), wa, &format!("point {i} disk 0"));
        assert_same(&restore(&ds, m, 1), wb, &format!("point {i} disk 1"));
    }
    let (m, _, wb) = points.last().unwrap();
    assert_same(
        &restore_to_raw(&ds, m, 1, &d.path().join("out.raw")),
        wb,
        "write_image of disk 1",
    );
    assert_clean(&verify(&ds));
}
