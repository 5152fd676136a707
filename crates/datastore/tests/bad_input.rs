//! Bad input is refused with a clear message (and nothing half-written is left
//! visible); what is legitimately different (a resized disk without changed ranges)
//! works.
mod common;
use common::*;
use datastore::{BaseChoice, Datastore};
use std::path::Path;

fn err(r: datastore::Result<datastore::Manifest>) -> String {
    r.expect_err("backup should have failed").to_string()
}

fn with_ranges<'a>(path: &'a Path, r: Vec<(u64, u64)>) -> [In<'a>; 1] {
    [In {
        path,
        changed: Some(r),
    }]
}

fn point_count(ds: &Datastore) -> usize {
    ds.points().unwrap().0.len()
}

#[test]
fn changed_ranges_checks() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let size = (4 << 20) + 4096;
    let model = gen_raw(&img, size, 60);
    let ds = create_store(&d.path().join("ds"), false);
    // Changed ranges with no earlier recovery point.
    let e = err(try_backup(
        &ds,
        "vm",
        BaseChoice::Latest,
        &with_ranges(&img, vec![(0, 4096)]),
    ));
    assert!(e.contains("no earlier recovery point"), "{e}");
    assert_eq!(point_count(&ds), 0);
    let p0 = backup_full(&ds, "vm", &img);
    // Past the end, and overflowing.
    for r in [
        vec![(size - 512, 1024)],
        vec![(0, 512), (size, 512)],
        vec![(u64::MAX - 511, 512)],
    ] {
        let e = err(try_backup(
            &ds,
            "vm",
            BaseChoice::Latest,
            &with_ranges(&img, r.clone()),
        ));
        assert!(e.contains("past the disk's size"), "{r:?}: {e}");
    }
    // Ranges for a second disk the base does not have.
    let e = err(try_backup(
        &ds,
        "vm",
        BaseChoice::Latest,
        &[
            In {
                path: &img,
                changed: Some(vec![]),
            },
            In {
                path: &img,
                changed: Some(vec![(0, 512)]),
            },
        ],
    ));
    assert!(e.contains("has only 1 disk"), "{e}");
    // A base of another source.
    let e = err(try_backup(
        &ds,
        "other",
        BaseChoice::Point(p0.id.clone()),
        &with_ranges(&img, vec![(0, 512)]),
    ));
    assert!(e.contains("belongs to source"), "{e}");
    assert_eq!(
        point_count(&ds),
        1,
        "a refused backup left a recovery point"
    );
    // An empty list: nothing changed, nothing read.
    let m = backup(
        &ds,
        "vm",
        BaseChoice::Latest,
        &with_ranges(&img, Vec::new()),
    );
    assert_eq!(m.stats.bytes_read, 0);
    assert_same(&restore(&ds, &m, 0), &model, "empty ranges");
}

/// `DiskInput.changed` is documented as sorted and merged; input that is not (here:
/// reversed) must be refused or honored, never half applied.
#[test]
fn unsorted_changed_ranges_are_refused_or_honored() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let mut model = gen_raw(&img, (4 << 20) + 4096, 64);
    let ds = create_store(&d.path().join("ds"), false);
    let m = backup_full(&ds, "vm", &img);
    let ranges = mutate(&img, &mut model, &mut Rng::new(61), 8);
    assert!(ranges.len() > 2);
    let mut rev = ranges.clone();
    rev.reverse();
    let base = BaseChoice::Point(m.id.clone());
    match try_backup(&ds, "vm", base, &with_ranges(&img, rev)) {
        Err(_) => {}
        Ok(m) => assert_same(
            &restore(&ds, &m, 0),
            &model,
            "unsorted changed ranges were accepted but not all applied",
        ),
    }
}

#[test]
fn resized_disks() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let size = (4 << 20) + 4096;
    let mut model = gen_raw(&img, size, 62);
    let ds = create_store(&d.path().join("ds"), false);
    let mut m = backup_full(&ds, "vm", &img);
    for (new_size, what) in [(size + (1 << 20) + 512, "grown"), (size - 8192, "shrunk")] {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(new_size).unwrap();
        model.resize(new_size as usize, 0);
        // With changed ranges: refused, naming the resize.
        let e = err(try_backup(
            &ds,
            "vm",
            BaseChoice::Point(m.id.clone()),
            &with_ranges(&img, vec![(0, 4096)]),
        ));
        assert!(e.contains("resize"), "{what}: {e}");
        // Without: fine, and exact.
        let full = backup_full(&ds, "vm", &img);
        assert_eq!(full.disks[0].virtual_size, new_size);
        assert_same(&restore(&ds, &full, 0), &model, what);
        // And the next changed-range backup builds on the resized point.
        let ranges = mutate(&img, &mut model, &mut Rng::new(new_size), 5);
        // (An explicit base: "latest" is ambiguous within one second, see chain.rs.)
        let base = BaseChoice::Point(full.id.clone());
        m = backup(&ds, "vm", base, &with_ranges(&img, ranges));
        assert_same(
            &restore(&ds, &m, 0),
            &model,
            &format!("{what}, then changed"),
        );
    }
    assert_clean(&verify(&ds));
}

#[test]
fn newer_config_version_and_bad_disk_number() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    gen_raw(&img, 1 << 20, 63);
    let dir = d.path().join("ds");
    let ds = create_store(&dir, false);
    let m = backup_full(&ds, "vm", &img);
    // Disk 5 of a one-disk recovery point.
    let idx = std::sync::Arc::new(ds.blob_index().unwrap());
    let e = ds.open_disk(&m, 5, idx).unwrap_err().to_string();
    assert!(e.contains("no disk 5"), "{e}");
    // An unknown recovery point.
    let e = ds
        .point("20990101T000000Z-00000000")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no recovery point"), "{e}");
    assert!(ds.point("../config").is_err());
    drop(ds);
    // A configuration from a newer holdfast.
    let cfg = dir.join("holdfast-datastore.json");
    let body = std::fs::read_to_string(&cfg).unwrap();
    assert!(body.contains("\"version\": 1"));
    std::fs::write(&cfg, body.replace("\"version\": 1", "\"version\": 2")).unwrap();
    let e = Datastore::open(&dir, None).unwrap_err().to_string();
    assert!(e.contains("newer") && e.contains("upgrade"), "{e}");
    // Creating over an existing datastore.
    std::fs::write(&cfg, body).unwrap();
    let e = Datastore::create(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
}
