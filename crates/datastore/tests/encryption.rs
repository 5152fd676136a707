//! Encrypted datastores: the key is checked before anything is read, nothing stored
//! shows the plaintext, and blob ids are keyed (not the public BLAKE3 of the data).
mod common;
use common::*;
use datastore::format::Kind;
use datastore::{Datastore, Id, StoreOptions};
use std::collections::HashSet;
use std::path::Path;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// BLAKE3 of every non-zero block of `data`.
fn plain_block_ids(data: &[u8]) -> HashSet<Id> {
    data.chunks(BS as usize)
        .filter(|b| !vdisk::copy::is_zero(b))
        .map(|b| Id(*blake3::hash(b).as_bytes()))
        .collect()
}

fn data_ids(dir: &Path) -> HashSet<Id> {
    files(dir, "packs")
        .iter()
        .flat_map(|p| pack_entries(p))
        .filter(|e| e.kind == Kind::Data)
        .map(|e| e.id)
        .collect()
}

#[test]
fn nothing_stored_shows_the_plaintext_and_ids_are_keyed() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let want = gen_raw(&img, ODD_SIZE, 50);
    assert!(
        count(&want, MARKER.as_bytes()) > 1000,
        "fixture lacks the marker"
    );
    let secret_name = "secret-vm-name-42";

    // Control: a plain datastore's data blob ids are the BLAKE3 of the blocks.
    let plain_dir = d.path().join("plain");
    let plain = create_store(&plain_dir, false);
    backup_full(&plain, secret_name, &img);
    let block_ids = plain_block_ids(&want);
    let plain_ids = data_ids(&plain_dir);
    assert!(!plain_ids.is_empty() && plain_ids.is_subset(&block_ids));

    let dir = d.path().join("enc");
    let ds = create_store(&dir, true);
    let m = backup_full(&ds, secret_name, &img);
    assert_same(&restore(&ds, &m, 0), &want, "encrypted restore");
    let enc_ids = data_ids(&dir);
    assert_eq!(enc_ids.len(), plain_ids.len());
    assert!(
        enc_ids.is_disjoint(&block_ids),
        "encrypted blob ids are plain BLAKE3 of the data"
    );
    // Pack names are not block hashes either.
    for p in files(&dir, "packs") {
        let name = Id::from_hex(&p.file_name().unwrap().to_string_lossy()).unwrap();
        assert!(!block_ids.contains(&name));
    }
    // No stored file shows the marker or the source's name.
    let all = files(&dir, "");
    assert!(all.iter().any(|p| key_of(&dir, p).starts_with("packs/")));
    assert!(all.iter().any(|p| key_of(&dir, p).starts_with("points/")));
    for p in &all {
        let b = std::fs::read(p).unwrap();
        assert!(
            !contains(&b, MARKER.as_bytes()),
            "{} holds plaintext",
            p.display()
        );
        assert!(
            !contains(&b, secret_name.as_bytes()),
            "{} holds the source name",
            p.display()
        );
    }
    // The key file is not inside the datastore.
    assert!(datastore::default_key_path(&dir).exists());
    assert!(
        !all.iter()
            .any(|p| p.extension().is_some_and(|e| e == "key"))
    );
    assert_clean(&verify(&ds));
}

#[test]
fn wrong_missing_and_explicit_keys() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    let want = gen_raw(&img, (3 << 20) + 512, 51);
    let dir = d.path().join("ds");
    let key = d.path().join("elsewhere.key");
    let ds = Datastore::create(
        &dir,
        &StoreOptions {
            key_file: Some(key.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let m = backup_full(&ds, "vm", &img);
    drop(ds);
    // Another datastore's key.
    let other = d.path().join("other");
    create_store(&other, true);
    let e = Datastore::open(&dir, Some(&datastore::default_key_path(&other)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("wrong key"), "{e}");
    // No key at the default place, nor at a given one.
    let e = Datastore::open(&dir, None).unwrap_err().to_string();
    assert!(e.contains("key file not found"), "{e}");
    let e = Datastore::open(&dir, Some(&d.path().join("nope.key")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("key file not found"), "{e}");
    // Not a key file.
    let junk = d.path().join("junk.key");
    std::fs::write(&junk, "{}").unwrap();
    let e = Datastore::open(&dir, Some(&junk)).unwrap_err().to_string();
    assert!(e.contains("not a holdfast key file"), "{e}");
    // The right key, given explicitly.
    let ds = Datastore::open(&dir, Some(&key)).unwrap();
    assert_same(
        &restore(&ds, &ds.point(&m.id).unwrap(), 0),
        &want,
        "right key",
    );
    // A plain datastore refuses a key file (whoever gives one believes the data is
    // encrypted, or has the wrong datastore), naming both.
    let plain = d.path().join("plain");
    create_store(&plain, false);
    let e = Datastore::open(&plain, Some(&key)).unwrap_err().to_string();
    assert!(e.contains("not encrypted"), "{e}");
    assert!(e.contains(&key.display().to_string()), "{e}");
    assert!(!Datastore::open(&plain, None).unwrap().keys().encrypted());
}
