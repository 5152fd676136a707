//! Excluded ranges (a page file, swap): stored as zeros whatever the disk or the base
//! held there, recorded in the recovery point, the rest of the disk exact.
mod common;
use common::*;
use datastore::{BackupRequest, BaseChoice, Consistency, Datastore, DiskInput, Manifest};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn backup_excl(
    ds: &Datastore,
    path: &Path,
    base: BaseChoice,
    changed: Option<Vec<(u64, u64)>>,
    excluded: &[(u64, u64)],
) -> datastore::Result<Manifest> {
    let disk = vdisk::open(path).unwrap();
    ds.backup(
        BackupRequest {
            source: source("vm"),
            consistency: Consistency::CrashConsistent,
            base,
            disks: vec![DiskInput {
                disk: disk.as_ref(),
                name: "disk.raw".into(),
                format: "raw".into(),
                changed,
                excluded: excluded.to_vec(),
            }],
        },
        &mut |_, _| {},
    )
}

fn zeroed(model: &[u8], ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut want = model.to_vec();
    for &(o, l) in ranges {
        want[o as usize..(o + l) as usize].fill(0);
    }
    want
}

#[test]
fn excluded_ranges_restore_as_zeros_and_are_recorded() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let model = gen_raw(&img, 8 << 20, 90);
    let ds = create_store(&d.path().join("ds"), false);
    // Whole blocks; a few bytes inside one block; a range across a block boundary;
    // two adjacent ranges that together cover a block.
    let excl = [
        (1 << 20, 2 << 20),
        ((5 << 20) + 1000, 3000),
        ((6 << 20) - 5000, 10_000),
        (7 << 20, 32 << 10),
        ((7 << 20) + (32 << 10), 32 << 10),
    ];
    let m = backup_excl(&ds, &img, BaseChoice::None, None, &excl).unwrap();
    assert_eq!(m.disks[0].excluded, excl.to_vec());
    assert_same(&restore(&ds, &m, 0), &zeroed(&model, &excl), "full backup");
    // The excluded whole blocks were not read.
    assert!(m.stats.bytes_read <= (8 << 20) - (2 << 20) - (64 << 10));
    // The record survives the manifest's round trip through the datastore.
    let again = ds.point(&m.id).unwrap();
    assert_eq!(again.disks[0].excluded, excl.to_vec());
}

#[test]
fn a_new_exclusion_zeroes_base_data_in_an_untouched_piece() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    // 600 MiB, sparse: data in index piece 0 (first 256 MiB) and piece 1.
    let size: u64 = 600 << 20;
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(91);
    for off in [3u64 << 20, 300 << 20, 590 << 20] {
        let r = off as usize..(off + (1 << 20)) as usize;
        rng.fill(&mut model[r.clone()]);
        f.write_all_at(&model[r], off).unwrap();
    }
    let ds = create_store(&d.path().join("ds"), false);
    let m0 = backup_excl(&ds, &img, BaseChoice::None, None, &[]).unwrap();
    assert_same(&restore(&ds, &m0, 0), &model, "base");
    // Change 64 KiB in piece 0 only; exclude 128 KiB of piece 1's data.
    let ch = (3 << 20, 64 << 10);
    let r = ch.0 as usize..(ch.0 + ch.1) as usize;
    rng.fill(&mut model[r.clone()]);
    f.write_all_at(&model[r], ch.0).unwrap();
    let excl = [((300 << 20) + (64 << 10), 128 << 10)];
    let m1 = backup_excl(
        &ds,
        &img,
        BaseChoice::Point(m0.id.clone()),
        Some(vec![ch]),
        &excl,
    )
    .unwrap();
    assert_eq!(m1.disks[0].excluded, excl.to_vec());
    assert_same(&restore(&ds, &m1, 0), &zeroed(&model, &excl), "incremental");
    // Only the changed block was read: the rest came from the base.
    assert_eq!(m1.stats.bytes_read, 64 << 10);
}

#[test]
fn bad_exclusions_are_refused_by_disk_and_range() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    gen_raw(&img, 1 << 20, 92);
    let ds = create_store(&d.path().join("ds"), false);
    for (excl, what) in [
        (vec![(0, 0)], "empty"),
        (vec![(4096, 4096), (0, 512)], "out of order"),
        (vec![(1 << 20, 512)], "past the disk"),
    ] {
        let e = backup_excl(&ds, &img, BaseChoice::None, None, &excl)
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk 0: excluded range"), "{what}: {e}");
    }
}
