//! Fault tests of the object-storage backend against real Azurite and moto, with the
//! test's own proxy (`testkit::FaultProxy`) in between: a 503 storm shorter and one
//! longer than the retry budget, slowed requests, and Azurite killed in the middle of
//! a backup and restarted. Each operation completes or fails cleanly within a bound,
//! and a backend that failed works again once the fault ends.

mod common;

use common::{azure_target_via, backup, backup_with_progress, keys, restore, s3_target_via};
use datastore::{Backend, Datastore, StoreOptions};
use objstore::{Options, Target};
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::{Azurite, FaultProxy, Moto, Rng};

/// Retries: 5, backoff from 100 ms doubling (about 3 s in all), none started later
/// than 5 s after the first attempt. A lease long enough that a slowed renewal keeps it.
fn fault_options() -> Options {
    Options {
        lease: Duration::from_secs(3),
        lock_wait: Duration::from_secs(15),
        request_timeout: Duration::from_secs(10),
        retry_timeout: Duration::from_secs(5),
        max_retries: 5,
        ..Options::default()
    }
}

/// One backend call, for a table of them.
type Op<'a> = Box<dyn Fn() -> datastore::Result<()> + 'a>;

/// The most one failing operation may take with [`fault_options`].
const FAIL_BOUND: Duration = Duration::from_secs(60);

/// A disk of `mib` MiB written to `dir/name`: random data, then text, then zeros.
fn make_disk(dir: &Path, name: &str, mib: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; mib << 20];
    let random = (mib << 20) * 5 / 8;
    Rng::new(seed).fill(&mut data[..random]);
    let text_end = (mib << 20) * 7 / 8;
    for (i, b) in data[random..text_end].iter_mut().enumerate() {
        *b = b"holdfast fault tests "[i % 21];
    }
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Backs the disk up, restores it byte-identical and verifies the datastore.
fn backup_restore_verify(ds: &Datastore, disk: &Path, data: &[u8], tmp: &Path) {
    let m = backup(ds, disk).unwrap();
    let out = tmp.join(format!("restored-{}.raw", m.id));
    assert!(restore(ds, &m, &out) == data, "restored disk differs");
    let report = ds.verify(&mut |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

fn create_datastore(target: &Target) -> Datastore {
    create_datastore_with(target, &fault_options())
}

fn create_datastore_with(target: &Target, opts: &Options) -> Datastore {
    let b = objstore::open_with(target, opts).unwrap();
    let loc = b.location();
    Datastore::create_on(b, &loc, &StoreOptions::default()).unwrap()
}

/// 3 refused requests before each operation: put, put_new, get, list, exists and a
/// datastore backup all complete, and the proxy refused exactly 3 each time.
fn storm_shorter_than_retries(store: Target, datastore: Target, proxy: &FaultProxy) {
    let tmp = tempfile::tempdir().unwrap();
    let b = objstore::open_with(&store, &fault_options()).unwrap();
    let data = Rng::new(7).bytes(1 << 20);
    let storm = |what: &str, op: &mut dyn FnMut()| {
        let before = proxy.counts();
        proxy.refuse_next(3);
        let t = Instant::now();
        op();
        let after = proxy.counts();
        assert_eq!(after.refused - before.refused, 3, "{what}: {after:?}");
        assert!(after.forwarded > before.forwarded, "{what}: {after:?}");
        eprintln!("{what} through 3 refusals in {:?}", t.elapsed());
    };
    storm("put", &mut || b.put("points/a", &data).unwrap());
    storm("put_new", &mut || {
        assert!(b.put_new("points/b", b"two").unwrap())
    });
    storm("get", &mut || assert!(b.get("points/a").unwrap() == data));
    storm("list", &mut || {
        assert_eq!(keys(b.as_ref(), "points/"), ["points/a", "points/b"]);
    });
    storm("exists", &mut || assert!(b.exists("points/b").unwrap()));
    storm("delete", &mut || b.delete("points/b").unwrap());
    assert!(!b.exists("points/b").unwrap());

    let (disk, data) = make_disk(tmp.path(), "disk.raw", 4, 1);
    proxy.refuse_next(3);
    let ds = create_datastore(&datastore);
    backup_restore_verify(&ds, &disk, &data, tmp.path());
    // The storm was spent (on whichever requests came first) and everything completed.
    assert_eq!(proxy.counts().refused, 6 * 3 + 3, "{:?}", proxy.counts());
}

/// Every request refused: each operation fails within the bound, naming the target
/// and the key; so does a read whose connections are dropped; once the faults end the
/// same backend and datastore work again.
fn storm_longer_than_retries(store: Target, datastore: Target, proxy: &FaultProxy) {
    let tmp = tempfile::tempdir().unwrap();
    let b = objstore::open_with(&store, &fault_options()).unwrap();
    let loc = b.location();
    b.put("points/a", b"one").unwrap();
    let (disk, data) = make_disk(tmp.path(), "disk.raw", 4, 2);
    let ds = create_datastore(&datastore);
    let ds_loc = datastore.location();

    proxy.refuse_all();
    let ops: Vec<(&str, &str, Op)> = vec![
        ("put", "points/a", Box::new(|| b.put("points/a", b"uno"))),
        (
            "put_new",
            "points/c",
            Box::new(|| b.put_new("points/c", b"c").map(drop)),
        ),
        ("get", "points/a", Box::new(|| b.get("points/a").map(drop))),
        ("list", "points/", Box::new(|| b.list("points/").map(drop))),
        (
            "exists",
            "points/a",
            Box::new(|| b.exists("points/a").map(drop)),
        ),
        ("delete", "points/a", Box::new(|| b.delete("points/a"))),
    ];
    for (what, key, op) in &ops {
        let before = proxy.counts().refused;
        let t = Instant::now();
        let e = op().unwrap_err().to_string();
        let took = t.elapsed();
        assert!(took < FAIL_BOUND, "{what} took {took:?}");
        assert!(e.contains(&format!("{loc}/{key}")), "{what}: {e}");
        assert!(e.contains("503"), "{what}: {e}");
        // Retried: the first attempt and at least one retry were refused.
        let refused = proxy.counts().refused - before;
        assert!(refused >= 2, "{what}: {refused} refused");
        eprintln!("{what} failed after {took:?} and {refused} refusals: {e}");
    }
    let t = Instant::now();
    let e = backup(&ds, &disk).unwrap_err().to_string();
    let took = t.elapsed();
    assert!(took < FAIL_BOUND, "backup took {took:?}");
    assert!(e.contains(&ds_loc), "backup: {e}");
    eprintln!("backup failed after {took:?}: {e}");

    // Connections dropped without an answer: the same, named and in time.
    proxy.pass();
    proxy.reset(true);
    let t = Instant::now();
    let e = b.get("points/a").unwrap_err().to_string();
    assert!(t.elapsed() < FAIL_BOUND, "took {:?}", t.elapsed());
    assert!(e.contains(&format!("{loc}/points/a")), "{e}");
    assert!(proxy.counts().dropped >= 2, "{:?}", proxy.counts());
    eprintln!(
        "get failed after {:?} of dropped connections: {e}",
        t.elapsed()
    );

    // The faults end: the same backend and the same datastore work again.
    proxy.pass();
    b.put("points/a", b"uno").unwrap();
    assert_eq!(b.get("points/a").unwrap(), b"uno");
    assert!(b.put_new("points/c", b"c").unwrap());
    assert_eq!(b.list("points/").unwrap().len(), 2);
    backup_restore_verify(&ds, &disk, &data, tmp.path());
}

/// Each request slowed by [`SLOW_MS`], with a [`SLOW_LEASE`] lease.
const SLOW_MS: u64 = 1100;
const SLOW_LEASE: Duration = Duration::from_secs(12);

/// Every request delayed [`SLOW_MS`]: a backup completes and restores byte-identical.
/// The delay sits between lease/12 and lease/6: renewals timed from their answers
/// (the bug this caught) let the lease age to lease/3 + 2 delays = 6.2 s > lease/2
/// and stop writes; timed from their sending it ages to lease/3 + 1 delay = 5.1 s,
/// leaving 0.9 s of slack for a loaded machine.
fn slowed(datastore: Target, proxy: &FaultProxy) {
    let tmp = tempfile::tempdir().unwrap();
    let (disk, data) = make_disk(tmp.path(), "disk.raw", 4, 3);
    let ds = create_datastore_with(
        &datastore,
        &Options {
            lease: SLOW_LEASE,
            ..fault_options()
        },
    );
    proxy.delay_ms(SLOW_MS);
    let before = proxy.counts();
    let t = Instant::now();
    let m = backup(&ds, &disk).unwrap();
    let took = t.elapsed();
    let n = proxy.counts().seen - before.seen;
    assert!(
        took >= Duration::from_millis(SLOW_MS) * n as u32 / 2,
        "{took:?}"
    );
    eprintln!("backup with {n} requests delayed {SLOW_MS} ms each: {took:?}");
    // Restored and verified at full speed (the restore reads block by block).
    proxy.pass();
    let out = tmp.path().join("restored.raw");
    assert!(restore(&ds, &m, &out) == data, "restored disk differs");
    let report = ds.verify(&mut |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn storm_shorter_than_retries_azurite() {
    let az = Azurite::start();
    let proxy = FaultProxy::start(az.port());
    storm_shorter_than_retries(
        azure_target_via(&az, "store", proxy.port()),
        azure_target_via(&az, "datastore", proxy.port()),
        &proxy,
    );
}

#[test]
fn storm_shorter_than_retries_moto() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port());
    storm_shorter_than_retries(
        s3_target_via(&moto, "store", proxy.port()),
        s3_target_via(&moto, "datastore", proxy.port()),
        &proxy,
    );
}

#[test]
fn storm_longer_than_retries_azurite() {
    let az = Azurite::start();
    let proxy = FaultProxy::start(az.port());
    storm_longer_than_retries(
        azure_target_via(&az, "store", proxy.port()),
        azure_target_via(&az, "datastore", proxy.port()),
        &proxy,
    );
}

#[test]
fn storm_longer_than_retries_moto() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port());
    storm_longer_than_retries(
        s3_target_via(&moto, "store", proxy.port()),
        s3_target_via(&moto, "datastore", proxy.port()),
        &proxy,
    );
}

#[test]
fn slowed_requests_azurite() {
    let az = Azurite::start();
    let proxy = FaultProxy::start(az.port());
    slowed(azure_target_via(&az, "slow", proxy.port()), &proxy);
}

#[test]
fn slowed_requests_moto() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port());
    slowed(s3_target_via(&moto, "slow", proxy.port()), &proxy);
}

/// Azurite killed (SIGKILL) while a 32 MiB backup uploads its packs: the backup fails
/// cleanly within the bound; Azurite restarted on the same port and folder; the same
/// datastore then backs the disk up again, re-sending only what had not landed, and
/// restores it byte-identical.
#[test]
fn storage_killed_mid_upload_azurite() {
    let mut az = Azurite::start();
    let proxy = FaultProxy::start(az.port());
    let target = azure_target_via(&az, "killed", proxy.port());
    let loc = target.location();
    let tmp = tempfile::tempdir().unwrap();
    // 20 MiB random (incompressible: about 3 packs of 8 MiB), then text and zeros.
    let (disk, data) = make_disk(tmp.path(), "disk.raw", 32, 4);
    let ds = create_datastore(&target);
    // Watches the container directly, not through the proxy.
    let direct = Target::Azure {
        account: testkit::AZURITE_ACCOUNT.into(),
        container: "killed".into(),
        endpoint: Some(az.endpoint()),
        access_key: objstore::Secret::new(testkit::AZURITE_KEY),
    };
    let watcher = objstore::open_with(&direct, &fault_options()).unwrap();
    let packs = |w: &dyn Backend| -> (usize, u64) {
        let l = w.list("packs/").unwrap();
        (l.len(), l.iter().map(|e| e.size).sum())
    };

    let mut killed: Option<Instant> = None;
    let mut landed = (0, 0);
    let first = backup_with_progress(&ds, &disk, &mut |done, total| {
        if killed.is_some() || done < total / 2 {
            return;
        }
        // Once a pack is in the container and in Azurite's metadata on disk (LokiJS
        // saves it every 5 s; real Azure is durable once it answers): the listing has
        // not changed for 6 s. Then Azurite is killed, as in a crash.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = packs(watcher.as_ref());
        loop {
            assert!(Instant::now() < deadline, "packs did not settle: {seen:?}");
            if seen.0 == 0 {
                std::thread::sleep(Duration::from_millis(50));
                seen = packs(watcher.as_ref());
                continue;
            }
            std::thread::sleep(Duration::from_secs(6));
            let again = packs(watcher.as_ref());
            if again == seen {
                break;
            }
            seen = again;
        }
        landed = seen;
        az.kill();
        killed = Some(Instant::now());
    });
    let killed = killed.expect("the backup ended before the kill");
    let e = first.unwrap_err().to_string();
    let took = killed.elapsed();
    eprintln!(
        "backup failed {took:?} after the kill, {} pack(s) ({} bytes) had landed: {e}",
        landed.0, landed.1
    );
    assert!(took < FAIL_BOUND, "failed only after {took:?}");
    assert!(e.contains(&loc), "{e}");
    assert!(landed.0 >= 1);

    az.restart();
    // No recovery point, and what had landed is still there.
    assert!(ds.points().unwrap().0.is_empty());
    let after_restart = packs(watcher.as_ref());
    assert_eq!(after_restart, landed, "what landed survived the restart");
    let before = proxy.counts();
    let m = backup(&ds, &disk).unwrap();
    let sent = proxy.counts().bytes_up - before.bytes_up;
    let stored_after = packs(watcher.as_ref()).1;
    eprintln!(
        "second backup: {} bytes stored by it, {sent} bytes sent, {} blocks new, {} dedup; \
         packs hold {} bytes before, {stored_after} after; the disk holds {} bytes of data",
        m.stats.bytes_stored,
        m.stats.blocks_new,
        m.stats.blocks_dedup,
        landed.1,
        (32usize << 20) * 7 / 8,
    );
    // What landed is not re-sent: the second backup stores only the rest.
    assert!(m.stats.blocks_dedup > 0, "{:?}", m.stats);
    assert!(
        m.stats.bytes_stored + landed.1 / 2 < stored_after,
        "{:?}",
        m.stats
    );
    assert!(sent < stored_after - landed.1 / 2, "sent {sent}");
    let out = tmp.path().join("restored.raw");
    assert!(restore(&ds, &m, &out) == data, "restored disk differs");
    let report = ds.verify(&mut |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// A lease whose release never reached the store (the connection dropped) is taken
/// back at once by the same backend, not after its expiry; another backend still waits.
#[test]
fn an_unreleased_lease_of_our_own_is_taken_back_at_once() {
    let az = Azurite::start();
    let proxy = FaultProxy::start(az.port());
    let target = azure_target_via(&az, "lease", proxy.port());
    let opts = Options {
        lease: Duration::from_secs(60),
        lock_wait: Duration::from_secs(1),
        retry_timeout: Duration::from_secs(2),
        max_retries: 1,
        ..Options::default()
    };
    let b = objstore::open_with(&target, &opts).unwrap();
    let guard = b.lock(true, false).unwrap();
    proxy.reset(true);
    drop(guard);
    proxy.reset(false);
    assert_eq!(
        keys(b.as_ref(), "locks/"),
        vec!["locks/lease.json"],
        "left behind"
    );
    let other = objstore::open_with(&target, &opts).unwrap();
    let e = other.lock(true, true).unwrap_err().to_string();
    assert!(e.contains("in use by another server"), "{e}");
    let t = Instant::now();
    let again = b.lock(true, false).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(again);
    assert!(keys(b.as_ref(), "locks/").is_empty());
}
