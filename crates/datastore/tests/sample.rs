//! Sampled verify: every manifest and index piece is read, only a share of the packs in
//! full; the report says how many packs of how many were read, and 100 % is the full
//! verify, finding damage anywhere.
mod common;
use common::*;

#[test]
fn sampled_verify_reads_a_share_of_the_packs_and_full_finds_damage() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("disk.raw");
    gen_raw(&a, 64 << 20, 33);
    let dir = d.path().join("ds");
    let ds = create_store(&dir, true);
    backup_full(&ds, "h/vm", &a);
    let full = ds.verify_sample(100, &mut |_, _| {}).unwrap();
    assert_clean(&full);
    assert!(full.packs >= 3, "{full:?}");
    assert_eq!((full.packs_read, full.sample_percent), (full.packs, 100));
    let quarter = ds.verify_sample(25, &mut |_, _| {}).unwrap();
    assert_clean(&quarter);
    assert_eq!(quarter.packs, full.packs);
    assert_eq!(quarter.packs_read, (full.packs * 25).div_ceil(100));
    assert!(quarter.bytes < full.bytes, "{quarter:?} {full:?}");
    assert_eq!(quarter.points, 1);
    // 0 %: no pack in full, but the index pieces are still read.
    let none = ds.verify_sample(0, &mut |_, _| {}).unwrap();
    assert_eq!(none.packs_read, 0);
    assert!(none.bytes > 0 && none.bytes < quarter.bytes, "{none:?}");

    // Damage inside the largest pack's data: the full verify finds it.
    let pack = files(&dir, "packs")
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    flip(&pack, std::fs::metadata(&pack).unwrap().len() / 2);
    let found = ds.verify_sample(100, &mut |_, _| {}).unwrap();
    assert!(!found.is_clean(), "{found:?}");
    assert_eq!(found.damaged_points.len(), 1);
    assert!(
        found
            .damaged_files
            .iter()
            .any(|f| f.key.contains(&key_of(&dir, &pack))),
        "{found:?}"
    );
    // A sampled verify that does not read that pack keeps what the full one recorded:
    // the point is still reported damaged.
    let later = ds.verify_sample(0, &mut |_, _| {}).unwrap();
    assert_eq!(later.damaged_points.len(), 1, "{later:?}");
}
