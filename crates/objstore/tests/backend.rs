//! One conformance run of the datastore `Backend` contract against a folder, Azurite
//! (Azure Blob) and moto (S3), all real; then the lease against both object stores.

mod common;

use common::{azure_target, backup, keys, restore, s3_target, test_options};
use datastore::{Backend, Datastore, StoreOptions};
use objstore::{Options, Secret, Target};
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite, Moto, Rng};

/// The whole `Backend` contract and `probe` on `target`, then a datastore backup and
/// restore on `fresh` (an empty container, bucket or folder).
fn conformance(target: &Target, fresh: &Target, tmp: &Path) {
    let b = objstore::open_with(target, &test_options()).unwrap();
    let loc = b.location();
    assert!(
        !loc.contains("testing") && !loc.contains(&AZURITE_KEY[..10]),
        "{loc}"
    );

    // put / get / put_new twice
    b.put("points/a", b"one").unwrap();
    assert_eq!(b.get("points/a").unwrap(), b"one");
    b.put("points/a", b"uno").unwrap();
    assert_eq!(b.get("points/a").unwrap(), b"uno");
    assert!(b.put_new("points/b", b"two").unwrap());
    assert!(!b.put_new("points/b", b"deux").unwrap());
    assert_eq!(b.get("points/b").unwrap(), b"two");
    assert!(matches!(
        b.get("points/none"),
        Err(datastore::Error::Missing { .. })
    ));

    // get_range, and a short object named with its key and offset
    b.put("packs/00/p", b"0123456789").unwrap();
    let mut buf = [0u8; 4];
    b.get_range("packs/00/p", 3, &mut buf).unwrap();
    assert_eq!(&buf, b"3456");
    for off in [8, 10, 20] {
        let e = b
            .get_range("packs/00/p", off, &mut buf)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("packs/00/p") && e.contains(&format!("offset {off}")),
            "{e}"
        );
    }
    assert!(matches!(
        b.get_range("packs/00/none", 0, &mut buf),
        Err(datastore::Error::Missing { .. })
    ));

    // list: sorted, only under the prefix
    b.put("points/c", b"3").unwrap();
    b.put("pointsx/d", b"4").unwrap();
    assert_eq!(
        keys(b.as_ref(), "points/"),
        ["points/a", "points/b", "points/c"]
    );
    let sizes: Vec<_> = b
        .list("points/")
        .unwrap()
        .into_iter()
        .map(|e| e.size)
        .collect();
    assert_eq!(sizes, [3, 3, 1]);
    assert!(b.list("nothing/").unwrap().is_empty());

    // delete (missing is fine) and exists
    assert!(b.exists("points/c").unwrap());
    b.delete("points/c").unwrap();
    assert!(!b.exists("points/c").unwrap());
    b.delete("points/c").unwrap();
    b.delete("never/was").unwrap();
    assert!(b.get("../etc").is_err());
    assert_eq!(b.remove_leftovers().unwrap(), 0);

    // an 8 MiB object (a full pack)
    let big = Rng::new(8).bytes(8 << 20);
    b.put("packs/ff/big", &big).unwrap();
    assert_eq!(b.get("packs/ff/big").unwrap(), big);
    let mut tail = vec![0u8; 4096];
    b.get_range("packs/ff/big", (8 << 20) - 4096, &mut tail)
        .unwrap();
    assert_eq!(tail, big[(8 << 20) - 4096..]);

    // in-process locks behave like LocalBackend's
    {
        let s1 = b.lock(false, false).unwrap();
        let _s2 = b.lock(false, false).unwrap();
        assert!(b.lock(true, false).is_err());
        drop(s1);
    }
    {
        let _x = b.lock(true, false).unwrap();
        assert!(b.lock(false, false).is_err());
    }

    // probe
    let r = objstore::probe(b.as_ref(), 1 << 20).unwrap();
    assert_eq!(r.bytes, 1 << 20);
    assert!(r.put_ms > 0.0 && r.get_ms > 0.0 && r.list_ms > 0.0 && r.delete_ms > 0.0);
    assert!(
        r.write_bytes_per_sec > 0 && r.read_bytes_per_sec > 0,
        "{r:?}"
    );
    eprintln!("{loc}: {r:?}");
    assert!(b.list("probe/").unwrap().is_empty());

    // create_on refuses a target that holds anything
    let e = Datastore::create_on(b, &loc, &StoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");

    datastore_round_trip(fresh, tmp);
}

/// A datastore on the target (in a fresh container/bucket/folder): a raw disk backed
/// up with the datastore's own pipeline, restored byte-identical, verify clean.
fn datastore_round_trip(target: &Target, tmp: &Path) {
    let b = objstore::open_with(target, &test_options()).unwrap();
    let loc = b.location();
    let key = tmp.join("ds.key");
    let ds = Datastore::create_on(
        b,
        &loc,
        &StoreOptions {
            key_file: Some(key.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    drop(ds);
    // Opened again, as a server would: the configuration is read from the store.
    let b = objstore::open_with(target, &test_options()).unwrap();
    let e = Datastore::open_on(b, &loc, None).unwrap_err().to_string();
    assert!(e.contains("key file"), "{e}");
    let b = objstore::open_with(target, &test_options()).unwrap();
    let ds = Datastore::open_on(b, &loc, Some(&key)).unwrap();
    let b = objstore::open_with(target, &test_options()).unwrap();
    let e = Datastore::create_on(b, &loc, &StoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");

    // 6 MiB + 4 KiB: random data, text, zeros and a hole.
    let disk = tmp.join("disk.raw");
    let mut data = vec![0u8; (6 << 20) + 4096];
    let mut rng = Rng::new(42);
    rng.fill(&mut data[..2 << 20]);
    for (i, b) in data[(3 << 20)..(4 << 20)].iter_mut().enumerate() {
        *b = b"holdfast object storage "[i % 24];
    }
    rng.fill(&mut data[(6 << 20) - 4096..]);
    std::fs::write(&disk, &data).unwrap();

    let m = backup(&ds, &disk).unwrap();
    assert_eq!(ds.points().unwrap().0.len(), 1);
    assert!(
        restore(&ds, &m, &tmp.join("restored.raw")) == data,
        "restored disk differs"
    );

    let report = ds.verify(&mut |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn conformance_folder() {
    let d = tempfile::tempdir().unwrap();
    let t = Target::Folder {
        path: d.path().join("store"),
    };
    let fresh = Target::Folder {
        path: d.path().join("datastore"),
    };
    conformance(&t, &fresh, d.path());
}

#[test]
fn conformance_azurite() {
    let az = Azurite::start();
    let d = tempfile::tempdir().unwrap();
    conformance(
        &azure_target(&az, "conformance"),
        &azure_target(&az, "datastore"),
        d.path(),
    );
}

#[test]
fn conformance_moto() {
    let moto = Moto::start();
    let d = tempfile::tempdir().unwrap();
    conformance(
        &s3_target(&moto, "conformance"),
        &s3_target(&moto, "datastore"),
        d.path(),
    );
}

/// Two backends (two servers) on one target: exclusion, crash takeover, fencing.
fn lease(target: &Target) {
    let opts = test_options();
    let a = objstore::ObjectBackend::new(target, &opts).unwrap();
    let b = objstore::ObjectBackend::new(target, &opts).unwrap();

    // Four servers race for a free lease: exactly one wins.
    let racers: Vec<_> = (0..4)
        .map(|_| objstore::ObjectBackend::new(target, &opts).unwrap())
        .collect();
    let start = std::sync::Barrier::new(racers.len());
    let won = std::thread::scope(|s| {
        let handles: Vec<_> = racers
            .iter()
            .map(|r| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    r.lock(true, false).ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(won.iter().filter(|g| g.is_some()).count(), 1);
    drop(won);
    assert!(!a.exists("locks/lease.json").unwrap());
    drop(racers);

    let ga = a.lock(false, false).unwrap();
    let body = String::from_utf8(a.get("locks/lease.json").unwrap()).unwrap();
    assert!(body.contains(a.owner_id()), "{body}");
    // Still held after several renewals.
    std::thread::sleep(Duration::from_secs(3));
    a.put("points/x", b"written under the lease").unwrap();

    let e = b.lock(false, false).unwrap_err().to_string();
    assert!(
        e.contains("in use by another server")
            && e.contains(a.owner_id())
            && e.contains(&format!("pid {}", std::process::id()))
            && e.contains("until"),
        "{e}"
    );
    // Waiting does not help while the holder renews.
    let t = Instant::now();
    let wait_opts = Options {
        lock_wait: Duration::from_secs(3),
        ..opts.clone()
    };
    let c = objstore::ObjectBackend::new(target, &wait_opts).unwrap();
    assert!(c.lock(false, true).is_err());
    assert!(t.elapsed() >= Duration::from_secs(3));
    drop(c);

    // A released lease is deleted and free at once.
    drop(ga);
    assert!(!a.exists("locks/lease.json").unwrap());
    let gb = b.lock(true, false).unwrap();
    drop(gb);

    // The holder stops renewing (hangs, loses its network): its writes stop at lease/2,
    // the other takes over after expiry, and the first then refuses every write.
    let ga = a.lock(false, false).unwrap();
    a.stop_renewing();
    std::thread::sleep(Duration::from_millis(1050));
    let e = a.put("points/y", b"late").unwrap_err().to_string();
    assert!(e.contains("last renewed"), "{e}");
    assert!(b.lock(false, false).is_err(), "taken over before expiry");
    let t = Instant::now();
    let gb = b.lock(false, true).unwrap();
    eprintln!("took over after {:?}", t.elapsed());
    b.put("points/z", b"new owner").unwrap();
    for r in [
        a.put("points/y", b"late"),
        a.put_new("points/y", b"late").map(|_| ()),
        a.delete("points/x"),
    ] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("lease lost: another server holds"), "{e}");
        assert!(e.contains(&b.owner_id().to_string()), "{e}");
    }
    assert!(
        a.lock(false, false)
            .unwrap_err()
            .to_string()
            .contains("lease lost")
    );
    // The lost holder's guard must not delete the new owner's lease.
    drop(ga);
    let body = String::from_utf8(b.get("locks/lease.json").unwrap()).unwrap();
    assert!(body.contains(b.owner_id()), "{body}");
    assert!(b.exists("points/x").unwrap());
    drop(gb);
}

#[test]
fn lease_azurite() {
    let az = Azurite::start();
    lease(&azure_target(&az, "lease"));
}

#[test]
fn lease_moto() {
    let moto = Moto::start();
    lease(&s3_target(&moto, "lease"));
}

/// The sync calls work from inside a tokio runtime (the server calls the datastore
/// from `spawn_blocking`, and from async code by mistake must not panic either).
#[test]
fn works_inside_a_runtime() {
    let moto = Moto::start();
    let t = s3_target(&moto, "runtime");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let b = objstore::open_with(&t, &test_options()).unwrap();
        let b = tokio::task::spawn_blocking(move || {
            b.put("points/a", b"1").unwrap();
            assert_eq!(b.get("points/a").unwrap(), b"1");
            let g = b.lock(true, false).unwrap();
            drop(g);
            b
        })
        .await
        .unwrap();
        // Straight on a runtime thread, and dropped there.
        assert!(b.exists("points/a").unwrap());
        drop(b);
    });
}

/// A dead endpoint fails within the deadline, naming the target and the key.
#[test]
fn dead_endpoint_fails_in_time() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Target::S3 {
        bucket: "gone".into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: "us-east-1".into(),
        access_key_id: "testing".into(),
        secret_access_key: Secret::new("testing"),
    };
    let b = objstore::open(&t).unwrap();
    let start = Instant::now();
    let e = b.get("points/a").unwrap_err().to_string();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(e.contains("s3://gone/points/a"), "{e}");
    assert!(!e.contains("testing"), "{e}");
    eprintln!("dead endpoint after {took:?}: {e}");
}

/// An endpoint that accepts connections and never answers fails within the request
/// timeout and the retry budget, naming the target and the key.
#[test]
fn silent_endpoint_fails_in_time() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and holds connections (bounded: the test ends long before 64).
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().take(64) {
            match c {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
    });
    let t = Target::Azure {
        account: AZURITE_ACCOUNT.into(),
        container: "silent".into(),
        endpoint: Some(format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}")),
        access_key: Secret::new(AZURITE_KEY),
    };
    let opts = Options {
        request_timeout: Duration::from_secs(2),
        retry_timeout: Duration::from_secs(3),
        ..Options::default()
    };
    let b = objstore::open_with(&t, &opts).unwrap();
    let start = Instant::now();
    let e = b.put("packs/00/p", b"data").unwrap_err().to_string();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(12), "took {took:?}");
    assert!(e.contains("az://devstoreaccount1/silent/packs/00/p"), "{e}");
    assert!(!e.contains(&AZURITE_KEY[..12]), "{e}");
    eprintln!("silent endpoint after {took:?}: {e}");
    drop(b);
    drop(holder); // detached: it ends with the test process
}
