//! Two backups of different sources at the same time, each through its own `Datastore`
//! opened on the same folder: both succeed and both restore exactly.
mod common;
use common::*;
use datastore::{BaseChoice, Datastore, Manifest};
use std::path::PathBuf;
use std::sync::Barrier;

#[test]
fn two_backups_at_once() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ds");
    create_store(&dir, false);
    let imgs: Vec<PathBuf> = (0..2)
        .map(|i| d.path().join(format!("vm{i}.raw")))
        .collect();
    let mut models: Vec<Vec<u8>> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| gen_raw(p, (12 << 20) + 4096 * (i as u64 + 1), 80 + i as u64))
        .collect();
    // Round 0: full backups; rounds 1 and 2: changed ranges on each own base.
    let mut all: Vec<(Manifest, Vec<u8>)> = Vec::new();
    let mut last: Vec<Option<String>> = vec![None, None];
    for round in 0..3u64 {
        let ranges: Vec<Option<Vec<(u64, u64)>>> = (0..2)
            .map(|i| {
                (round > 0).then(|| {
                    mutate(
                        &imgs[i],
                        &mut models[i],
                        &mut Rng::new(90 + round * 2 + i as u64),
                        8,
                    )
                })
            })
            .collect();
        let barrier = Barrier::new(2);
        let made: Vec<Manifest> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|i| {
                    let (dir, img, barrier) = (&dir, &imgs[i], &barrier);
                    let changed = ranges[i].clone();
                    let base = last[i].clone().map_or(BaseChoice::None, BaseChoice::Point);
                    s.spawn(move || {
                        let ds = Datastore::open(dir, None).unwrap();
                        barrier.wait();
                        try_backup(&ds, &format!("vm{i}"), base, &[In { path: img, changed }])
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        for (i, m) in made.into_iter().enumerate() {
            assert_eq!(m.source.name, format!("vm{i}"));
            last[i] = Some(m.id.clone());
            all.push((m, models[i].clone()));
        }
    }
    let ds = Datastore::open(&dir, None).unwrap();
    assert_eq!(ds.points().unwrap().0.len(), 6);
    for (m, want) in &all {
        assert_same(&restore(&ds, m, 0), want, &m.id);
    }
    assert_clean(&verify(&ds));
    ds.gc(&mut |_| {}).unwrap();
    for (m, want) in &all {
        assert_same(&restore(&ds, m, 0), want, &format!("{} after gc", m.id));
    }
}
