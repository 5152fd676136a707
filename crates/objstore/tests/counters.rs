//! Request counters: every datastore call against Azurite and moto is counted by kind,
//! with the object bytes moved; a folder target's counters stay zero.
mod common;
use common::*;
use objstore::{Options, Target, open_counted};
use testkit::{Azurite, Moto};

/// One of each call, then the counts they must have left.
fn exercise(target: &Target) {
    let (b, c) = open_counted(target, &Options::default()).unwrap();
    assert_eq!(c.snapshot(), objstore::RequestCounts::default());
    b.put("packs/aa/one", &[7u8; 1000]).unwrap();
    assert!(b.put_new("points/p", b"manifest").unwrap());
    assert_eq!(b.get("packs/aa/one").unwrap().len(), 1000);
    let mut buf = [0u8; 10];
    b.get_range("packs/aa/one", 990, &mut buf).unwrap();
    assert_eq!(b.list("packs/").unwrap().len(), 1);
    assert!(b.exists("points/p").unwrap());
    b.delete("points/p").unwrap();
    let s = c.snapshot();
    assert_eq!(
        (s.put, s.get, s.list, s.head, s.delete, s.total),
        (2, 2, 1, 1, 1, 7),
        "{s:?}"
    );
    assert_eq!((s.bytes_up, s.bytes_down), (1008, 1010), "{s:?}");
    let json = serde_json::to_value(&*c).unwrap();
    assert_eq!(json["total"], 7);
}

#[test]
fn azure_requests_are_counted() {
    let az = Azurite::start();
    exercise(&azure_target(&az, "counted"));
}

#[test]
fn s3_requests_are_counted() {
    let moto = Moto::start();
    exercise(&s3_target(&moto, "counted"));
}

#[test]
fn folder_counters_stay_zero() {
    let d = tempfile::tempdir().unwrap();
    let t = Target::Folder {
        path: d.path().to_path_buf(),
    };
    let (b, c) = open_counted(&t, &Options::default()).unwrap();
    b.put("packs/aa/one", b"x").unwrap();
    b.get("packs/aa/one").unwrap();
    assert_eq!(c.snapshot(), objstore::RequestCounts::default());
}
