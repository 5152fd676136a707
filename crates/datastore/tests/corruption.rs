//! Damage to each kind of datastore file, found by verify, which must name exactly the
//! recovery points and disks that depend on it (checked against an oracle built from
//! the undamaged datastore); and healing: a later backup stores a damaged block again,
//! which repairs every recovery point that references it, and gc drops the bad copy.
mod common;
use common::*;
use datastore::format::{BLOB_HEADER, Kind, PackEntry};
use datastore::{BaseChoice, Datastore, Id, Manifest};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vdisk::VirtualDisk;

/// A datastore with three recovery points:
/// p0 = source "a" (one disk), p1 = source "b" (two disks), p2 = "a" again after
/// scattered writes, taken with changed ranges on top of p0.
struct Fix {
    _d: tempfile::TempDir,
    dir: PathBuf,
    encrypted: bool,
    points: Vec<Manifest>,
    /// Expected bytes of each (point id, disk).
    want: HashMap<(String, u32), Vec<u8>>,
    refs: Refs,
    /// Every pack and its entries.
    packs: Vec<(PathBuf, Vec<PackEntry>)>,
}

impl Fix {
    fn new(encrypted: bool) -> Fix {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ds");
        let ds = create_store(&dir, encrypted);
        let a = d.path().join("a.raw");
        let b0 = d.path().join("b0.raw");
        let b1 = d.path().join("b1.raw");
        let mut ma = gen_raw(&a, (6 << 20) + 512, 40);
        let mb0 = gen_raw(&b0, 4 << 20, 41);
        let mb1 = gen_raw(&b1, (3 << 20) + 4096, 42);
        let p0 = backup_full(&ds, "a", &a);
        let none = |path| In {
            path,
            changed: None,
        };
        let p1 = backup(&ds, "b", BaseChoice::Latest, &[none(&b0), none(&b1)]);
        let ma0 = ma.clone();
        let ranges = mutate(&a, &mut ma, &mut Rng::new(43), 6);
        let p2 = backup(
            &ds,
            "a",
            BaseChoice::Point(p0.id.clone()),
            &[In {
                path: &a,
                changed: Some(ranges),
            }],
        );
        let mut want = HashMap::new();
        want.insert((p0.id.clone(), 0), ma0);
        want.insert((p1.id.clone(), 0), mb0);
        want.insert((p1.id.clone(), 1), mb1);
        want.insert((p2.id.clone(), 0), ma);
        let refs = refs(&ds);
        let packs = files(&dir, "packs")
            .into_iter()
            .map(|p| {
                let e = pack_entries(&p);
                (p, e)
            })
            .collect();
        let fix = Fix {
            _d: d,
            dir,
            encrypted,
            points: vec![p0, p1, p2],
            want,
            refs,
            packs,
        };
        fix.check_restores(&BTreeSet::new());
        assert_clean(&verify(&fix.open()));
        fix
    }

    fn open(&self) -> Datastore {
        Datastore::open(&self.dir, None).unwrap()
    }

    fn id(&self, i: usize) -> String {
        self.points[i].id.clone()
    }

    /// A blob of `kind` needed by exactly the (point, disk) pairs `who`: its pack and entry.
    fn blob_needed_by(&self, kind: Kind, who: &[(usize, u32)]) -> (PathBuf, PackEntry) {
        let who: BTreeSet<(String, u32)> = who.iter().map(|&(p, d)| (self.id(p), d)).collect();
        for (pack, entries) in &self.packs {
            for e in entries {
                if e.kind == kind && needing(&self.refs, &HashSet::from([e.id])) == who {
                    return (pack.clone(), *e);
                }
            }
        }
        panic!("no {kind:?} blob is needed by exactly {who:?}");
    }

    /// The pack holding blobs of point `i` only (the pack its backup wrote).
    fn pack_of(&self, i: usize) -> (PathBuf, Vec<PackEntry>) {
        let id = self.id(i);
        self.packs
            .iter()
            .find(|(_, entries)| {
                entries.iter().any(|e| {
                    let n = needing(&self.refs, &HashSet::from([e.id]));
                    !n.is_empty() && n.iter().all(|(p, _)| *p == id)
                })
            })
            .cloned()
            .unwrap()
    }

    /// Every (point, disk) restores exactly, except those in `bad`, which fail to read.
    fn check_restores(&self, bad: &BTreeSet<(String, u32)>) {
        let ds = self.open();
        let idx = Arc::new(ds.blob_index().unwrap());
        for m in &self.points {
            let Ok(m) = ds.point(&m.id) else { continue };
            for d in &m.disks {
                let key = (m.id.clone(), d.index);
                let pd = ds.open_disk(&m, d.index as usize, idx.clone()).unwrap();
                if bad.contains(&key) {
                    let mut buf = vec![0u8; 1 << 20];
                    let size = d.virtual_size;
                    let failed = (0..size.div_ceil(1 << 20)).any(|i| {
                        let n = (size - i * (1 << 20)).min(1 << 20) as usize;
                        pd.read_at(&mut buf[..n], i << 20).is_err()
                    });
                    assert!(failed, "{key:?} is damaged but reads without error");
                } else {
                    assert_same(&read_disk(&pd), &self.want[&key], &format!("{key:?}"));
                }
            }
        }
    }

    /// Verify names exactly the (point, disk) pairs that need any of `ids`, and
    /// `expect_nonempty` guards against a vacuous test.
    fn verify_names(&self, ids: &HashSet<Id>) -> datastore::VerifyReport {
        let r = verify(&self.open());
        let want = needing(&self.refs, ids);
        assert!(!want.is_empty());
        assert_eq!(damaged_disks(&r), want, "{r:#?}");
        assert!(r.damaged_points.iter().all(|p| p.error.is_none()));
        assert!(!r.damaged_files.is_empty(), "{r:#?}");
        assert_eq!(r.points, 3);
        r
    }
}

fn key(dir: &Path, p: &Path) -> String {
    key_of(dir, p)
}

#[test]
fn blob_payload() {
    for encrypted in [false, true] {
        let f = Fix::new(encrypted);
        let (pack, e) = f.blob_needed_by(Kind::Data, &[(1, 1)]);
        flip(
            &pack,
            e.offset as u64 + (BLOB_HEADER as u64 + e.len as u64) / 2,
        );
        let r = f.verify_names(&HashSet::from([e.id]));
        assert_eq!(r.damaged_points.len(), 1, "encrypted={}", f.encrypted);
        assert_eq!(r.damaged_points[0].id, f.id(1));
        let dd = &r.damaged_points[0].disks[0];
        assert_eq!(dd.bad_blocks, 1);
        assert_eq!(dd.bad_index_pieces, 0);
        let k = format!("{} offset {}", key(&f.dir, &pack), e.offset);
        assert_eq!(
            r.damaged_files.iter().map(|x| &x.key).collect::<Vec<_>>(),
            [&k],
            "{r:#?}"
        );
        assert_eq!(r.unreferenced_damage, 0);
        f.check_restores(&BTreeSet::from([(f.id(1), 1)]));
    }
}

#[test]
fn blob_header() {
    let f = Fix::new(false);
    // A block p0 and p2 share (unchanged by the writes between them).
    let (pack, e) = f.blob_needed_by(Kind::Data, &[(0, 0), (2, 0)]);
    flip(&pack, e.offset as u64 + 20);
    let r = f.verify_names(&HashSet::from([e.id]));
    assert!(
        r.damaged_files[0].error.contains("header checksum"),
        "{r:#?}"
    );
    f.check_restores(&BTreeSet::from([(f.id(0), 0), (f.id(2), 0)]));
}

#[test]
fn index_piece_blob() {
    let f = Fix::new(false);
    let (pack, e) = f.blob_needed_by(Kind::Index, &[(1, 0)]);
    flip(&pack, e.offset as u64 + BLOB_HEADER as u64 + 100);
    let r = f.verify_names(&HashSet::from([e.id]));
    assert_eq!(r.damaged_points.len(), 1);
    assert_eq!(r.damaged_points[0].disks[0].bad_index_pieces, 1);
    f.check_restores(&BTreeSet::from([(f.id(1), 0)]));
}

/// A pack's trailer is what rebuilds its index when the index file is lost: verify must
/// report a damaged one, though every blob in the pack still reads.
#[test]
fn pack_trailer() {
    let f = Fix::new(false);
    let (pack, _) = f.pack_of(1);
    let len = std::fs::metadata(&pack).unwrap().len();
    flip(&pack, len - 16 - 20); // inside the last entry of the table
    let r = verify(&f.open());
    assert!(r.damaged_points.is_empty(), "{r:#?}");
    let k = key(&f.dir, &pack);
    assert!(
        r.damaged_files.iter().any(|x| x.key.starts_with(&k)),
        "verify does not report the damaged trailer of {k}: {r:#?}"
    );
    f.check_restores(&BTreeSet::new());
}

/// A damaged trailer that verify recorded makes gc rewrite the pack. The rewrite holds
/// the same blobs in the same order, so the new pack has the old pack's name: gc must
/// not then delete it as the old one (it did, and every point in it was lost).
#[test]
fn gc_after_a_damaged_trailer_keeps_the_rewritten_pack() {
    let f = Fix::new(false);
    let (pack, _) = f.pack_of(1);
    let len = std::fs::metadata(&pack).unwrap().len();
    flip(&pack, len - 16 - 20);
    let r = verify(&f.open());
    assert!(!r.damaged_files.is_empty(), "{r:#?}");
    let ds = f.open();
    let g = ds.gc(&mut |_| {}).unwrap();
    assert_eq!(g.packs_repacked, 1, "{g:#?}");
    assert_eq!(g.missing_blobs, 0, "{g:#?}");
    assert_clean(&verify(&ds));
    f.check_restores(&BTreeSet::new());
}

#[test]
fn truncated_pack() {
    let f = Fix::new(false);
    let (pack, entries) = f.pack_of(1);
    let len = std::fs::metadata(&pack).unwrap().len();
    let cut = len / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let lost: HashSet<Id> = entries
        .iter()
        .filter(|e| e.offset as u64 + e.len as u64 > cut)
        .map(|e| e.id)
        .collect();
    let r = f.verify_names(&lost);
    assert!(damaged_disks(&r).iter().all(|(p, _)| *p == f.id(1)));
    let k = key(&f.dir, &pack);
    assert!(r.damaged_files.iter().all(|x| x.key.starts_with(&k)));
    f.check_restores(&needing(&f.refs, &lost));
}

#[test]
fn deleted_pack() {
    let f = Fix::new(false);
    let (pack, entries) = f.pack_of(1);
    std::fs::remove_file(&pack).unwrap();
    let lost: HashSet<Id> = entries.iter().map(|e| e.id).collect();
    let r = f.verify_names(&lost);
    assert_eq!(
        damaged_disks(&r),
        BTreeSet::from([(f.id(1), 0), (f.id(1), 1)])
    );
    let k = key(&f.dir, &pack);
    assert!(
        r.damaged_files
            .iter()
            .any(|x| x.key == k && x.error.contains("missing")),
        "{r:#?}"
    );
    f.check_restores(&needing(&f.refs, &lost));
}

#[test]
fn index_file() {
    let f = Fix::new(false);
    let idx = f.dir.join("index").join(f.id(1));
    assert!(idx.exists(), "{:?}", files(&f.dir, "index"));
    flip(&idx, std::fs::metadata(&idx).unwrap().len() / 2);
    let r = verify(&f.open());
    assert!(r.damaged_points.is_empty(), "{r:#?}");
    let keys: Vec<&str> = r.damaged_files.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(keys, [format!("index/{}", f.id(1))], "{r:#?}");
    // Pack trailers stand in for the damaged index file.
    f.check_restores(&BTreeSet::new());
    // A lost index file is no damage at all.
    std::fs::remove_file(&idx).unwrap();
    assert_clean(&verify(&f.open()));
    f.check_restores(&BTreeSet::new());
}

#[test]
fn manifest() {
    let f = Fix::new(true);
    let m = f.dir.join("points").join(f.id(1));
    flip(&m, std::fs::metadata(&m).unwrap().len() / 2);
    let r = verify(&f.open());
    assert_eq!(r.damaged_points.len(), 1, "{r:#?}");
    let p = &r.damaged_points[0];
    assert_eq!(p.id, f.id(1));
    assert!(p.error.is_some() && p.disks.is_empty(), "{r:#?}");
    assert_eq!(r.points, 3);
    let e = f.open().point(&f.id(1)).unwrap_err().to_string();
    assert!(e.contains(&format!("points/{}", f.id(1))), "{e}");
    // The other points restore (check_restores skips the unreadable one).
    f.check_restores(&BTreeSet::new());
}

#[test]
fn config() {
    let f = Fix::new(false);
    let cfg = f.dir.join("holdfast-datastore.json");
    let good = std::fs::read_to_string(&cfg).unwrap();
    assert!(good.contains("\"zstd_level\": 1"), "{good}");
    std::fs::write(&cfg, good.replace("\"zstd_level\": 1", "\"zstd_level\": 3")).unwrap();
    let e = Datastore::open(&f.dir, None).unwrap_err().to_string();
    assert!(
        e.contains("holdfast-datastore.json") && e.contains("checksum mismatch"),
        "{e}"
    );
    std::fs::write(&cfg, &good[..good.len() / 2]).unwrap();
    let e = Datastore::open(&f.dir, None).unwrap_err().to_string();
    assert!(
        e.contains("holdfast-datastore.json") && e.contains("not JSON"),
        "{e}"
    );
    std::fs::remove_file(&cfg).unwrap();
    let e = Datastore::open(&f.dir, None).unwrap_err().to_string();
    assert!(e.contains("not a holdfast datastore"), "{e}");
    std::fs::write(&cfg, good).unwrap();
    f.check_restores(&BTreeSet::new());
}

/// After verify finds a damaged data blob, a backup of the (unchanged) source without
/// changed ranges stores that block again; since ids are content addresses this
/// repairs every recovery point that references it, and gc drops the damaged copy.
#[test]
fn healing() {
    for encrypted in [false, true] {
        let f = Fix::new(encrypted);
        let (pack, e) = f.blob_needed_by(Kind::Data, &[(0, 0), (2, 0)]);
        flip(&pack, e.offset as u64 + BLOB_HEADER as u64 + 10);
        f.verify_names(&HashSet::from([e.id]));
        assert!(f.dir.join("damaged").exists());
        let ds = f.open();
        let a = f._d.path().join("a.raw");
        let p3 = backup_full(&ds, "a", &a);
        assert!(p3.stats.blocks_new >= 1, "{:?}", p3.stats);
        let want_a = &f.want[&(f.id(2), 0)];
        assert_same(&restore(&ds, &p3, 0), want_a, "healing point");
        let r = verify(&ds);
        assert!(r.is_clean(), "encrypted={encrypted}: {r:#?}");
        assert_eq!(r.unreferenced_damage, 1, "{r:#?}");
        f.check_restores(&BTreeSet::new());
        ds.gc(&mut |_| {}).unwrap();
        let r = verify(&ds);
        assert_clean(&r);
        assert!(!f.dir.join("damaged").exists());
        f.check_restores(&BTreeSet::new());
        assert_same(&restore(&ds, &p3, 0), want_a, "healing point after gc");
    }
}

/// gc on a datastore whose damage is not healed yet: it runs, keeps the damaged copy
/// where it is, reports it, and leaves every undamaged recovery point restorable.
#[test]
fn gc_with_unhealed_damage() {
    let f = Fix::new(false);
    let (pack, e) = f.blob_needed_by(Kind::Data, &[(0, 0), (2, 0)]);
    flip(&pack, e.offset as u64 + BLOB_HEADER as u64 + 10);
    let before = f.verify_names(&HashSet::from([e.id]));
    let ds = f.open();
    let r = ds.gc(&mut |_| {}).unwrap();
    assert_eq!(r.unhealed_blobs, 1, "{r:#?}");
    assert_eq!(r.missing_blobs, 0, "{r:#?}");
    assert!(
        pack.exists(),
        "the pack holding the damaged copy was removed"
    );
    let after = verify(&ds);
    assert_eq!(damaged_disks(&after), damaged_disks(&before), "{after:#?}");
    f.check_restores(&damaged_disks(&before));
}

/// A damaged `damaged` list stops backups (without it a backup could reuse a bad copy)
/// with a message that says how to rebuild it; verify rebuilds it and backups go on.
#[test]
fn an_unreadable_damaged_list_says_how_to_rebuild_it() {
    let f = Fix::new(false);
    let (pack, e) = f.blob_needed_by(Kind::Data, &[(0, 0), (2, 0)]);
    flip(&pack, e.offset as u64 + BLOB_HEADER as u64 + 10);
    f.verify_names(&HashSet::from([e.id]));
    let list = f.dir.join("damaged");
    flip(&list, 10);
    let ds = f.open();
    let err = ds
        .blob_index()
        .map(|_| ())
        .expect_err("blob_index over a damaged list")
        .to_string();
    assert!(
        err.contains("damaged") && err.contains("run `holdfast verify`"),
        "{err}"
    );
    f.verify_names(&HashSet::from([e.id]));
    let ds = f.open();
    let p = backup_full(&ds, "a", &f._d.path().join("a.raw"));
    assert!(p.stats.blocks_new >= 1, "{:?}", p.stats);
}
