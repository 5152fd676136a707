//! End to end: real `holdfast server` and `holdfast agent` processes over loopback
//! mutual TLS. Enrollment, protection groups, scheduled synchronizations, restores,
//! authorization, bad input and faults (vanished and resized disks, a server killed in
//! the middle of a backup).

mod common;

use client::{Auth, Client};
use common::cluster::*;
use common::*;
use protocol::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A VM folder `root/name` with one disk in `fmt`, made from a sparse raw disk with
/// random runs; returns the disk's path.
fn make_vm(root: &Path, name: &str, fmt: &str, size: u64, random: u64, seed: u64) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let raw = root.join(format!(".{name}.raw"));
    make_disk(&raw, size, random, seed);
    let disk = dir.join(format!("{name}-disk0.{fmt}"));
    ok(&["image", "convert", s(&raw), s(&disk), "-f", fmt]);
    std::fs::remove_file(&raw).unwrap();
    disk
}

/// Rewrites a few 64 KiB runs of an image's contents (through a raw round trip).
fn change_disk(disk: &Path, fmt: &str, seed: u64) {
    let raw = disk.with_extension("tmp-raw");
    ok(&["image", "convert", s(disk), s(&raw), "-f", "raw"]);
    mutate(&raw, &mut Rng::new(seed), 8);
    let new = disk.with_extension("tmp-new");
    ok(&["image", "convert", s(&raw), s(&new), "-f", fmt]);
    std::fs::rename(&new, disk).unwrap();
    std::fs::remove_file(&raw).unwrap();
}

/// Whether the latest recovery point of `source` restores to `disk`'s contents.
fn restores_identical(ds: &Path, source: &str, disk: &Path, work: &Path) -> bool {
    std::fs::create_dir_all(work).unwrap();
    let want = work.join("want.raw");
    let got = work.join("got.raw");
    ok(&["image", "convert", s(disk), s(&want), "-f", "raw"]);
    restore_raw(ds, source, "latest", &got);
    let same = hash_file(&want) == hash_file(&got);
    std::fs::remove_file(&want).unwrap();
    std::fs::remove_file(&got).unwrap();
    same
}

/// An agent whose backups read at most 32 MiB/s: a 160 MiB disk takes 5 s, so a test
/// can interrupt it mid-way however fast the machine is.
fn slow_agent(c: &mut Cluster, vms: &Path) {
    c.agent_with(
        "hv01",
        &["--files-root", s(vms), "--read-limit-kbps", "32768"],
    );
}

/// Starts a backup of hv01/big and returns once it has sent data (and is not done).
fn start_big_backup(c: &Cluster) -> JobInfo {
    let j: JobInfo = c
        .admin()
        .post(
            "/datasources/hv01/big/backup",
            &BackupNowRequest {
                express_full: false,
                ..Default::default()
            },
        )
        .unwrap();
    wait_until("the backup to send data", Duration::from_secs(60), || {
        let j = c.job(j.id);
        assert!(
            !j.state.finished(),
            "the backup ended before the test could interrupt it: {j:?}"
        );
        j.bytes_sent > 0
    });
    j
}

fn pg_create(c: &Cluster, name: &str, members: &[&str], freq: &str) {
    let mut args = vec!["pg", "create", name];
    for m in members {
        args.push("--member");
        args.push(m);
    }
    args.extend_from_slice(&[
        "--retention-days",
        "7",
        "--sync-frequency",
        freq,
        "--recovery-point-times",
        "20:00",
    ]);
    c.cli_ok(&args);
}

#[test]
fn two_vms_protected_on_schedule_restore_exactly() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    let web = make_vm(&vms, "web01", "vhdx", 48 << 20, 12 << 20, 1);
    let db = make_vm(&vms, "db01", "qcow2", 40 << 20, 10 << 20, 2);
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(2);
    let list: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["datasources", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let agents: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["agents", "list", "--json"])).unwrap();
    assert_eq!(agents[0]["host"], "hv01");

    // Initial replicas start by themselves (replica creation "now").
    pg_create(&c, "pg1", &["hv01/web01", "hv01/db01"], "15");
    let show: GroupInfo =
        serde_json::from_str(&c.cli_ok(&["pg", "show", "pg1", "--json"])).unwrap();
    assert_eq!(show.members.len(), 2);
    assert_eq!(show.allocation.data_size, 88 << 20);
    wait_until("two initial replicas", Duration::from_secs(120), || {
        c.jobs()
            .iter()
            .filter(|j| j.kind == JobKind::InitialReplica && j.state == JobState::Succeeded)
            .count()
            == 2
    });
    let work = t.path().join("work");
    assert!(restores_identical(
        &c.datastore(),
        "hv01/web01",
        &web,
        &work
    ));
    assert!(restores_identical(&c.datastore(), "hv01/db01", &db, &work));

    // Change both disks; the 15-minute synchronization (3 s here) picks it up.
    change_disk(&web, "vhdx", 10);
    change_disk(&db, "qcow2", 11);
    // Only synchronizations that started after both changes (a whole second later).
    let started = utc::now();
    let mut syncs = Vec::new();
    wait_until(
        "scheduled synchronizations of both VMs",
        Duration::from_secs(120),
        || {
            syncs = c
                .jobs()
                .into_iter()
                .filter(|j| {
                    j.kind == JobKind::Sync
                        && j.trigger == "synchronization schedule"
                        && j.state == JobState::Succeeded
                        && j.started
                            .as_deref()
                            .and_then(utc::parse)
                            .is_some_and(|s| s > started)
                })
                .collect();
            ["hv01/web01", "hv01/db01"]
                .iter()
                .all(|vm| syncs.iter().any(|j| j.vm.as_deref() == Some(vm)))
        },
    );
    assert!(restores_identical(
        &c.datastore(),
        "hv01/web01",
        &web,
        &work
    ));
    assert!(restores_identical(&c.datastore(), "hv01/db01", &db, &work));

    // backup-now --wait: exit 0 and the recovery point exists in the catalog.
    let out = c.cli_ok(&["backup-now", "hv01/web01", "--wait", "--json"]);
    let j: JobInfo = serde_json::from_str(&out).unwrap();
    let rp = j.recovery_point.expect("a recovery point");
    let rps: Vec<RecoveryPointInfo> = serde_json::from_str(&c.cli_ok(&[
        "recovery-points",
        "list",
        "--vm",
        "hv01/web01",
        "--json",
    ]))
    .unwrap();
    assert!(rps.iter().any(|r| r.id == rp));
    // An unchanged disk: everything read, nothing new stored but the index.
    let last = rps.iter().find(|r| r.id == rp).unwrap();
    assert_eq!(last.stats.blocks_new, 0, "{:?}", last.stats);
    // The datastore agrees with the catalog, and local tools read it.
    let local = point_ids(&c.datastore());
    let all: Vec<RecoveryPointInfo> =
        serde_json::from_str(&c.cli_ok(&["recovery-points", "list", "--json"])).unwrap();
    assert_eq!(local.len(), all.len());
    assert_verify_clean(&c.datastore());
    // Rebuilding the catalog from the datastore gives the same recovery points.
    c.kill_server();
    let o = holdfast(&[
        "server",
        "--data-dir",
        s(&c.server_dir()),
        "--rebuild-catalog",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("{} recovery points", all.len())));
    c.start_server();
    let again: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points").unwrap();
    let mut a: Vec<_> = all.iter().map(|r| r.id.clone()).collect();
    let mut b: Vec<_> = again.iter().map(|r| r.id.clone()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert!(c.alerts().is_empty(), "{:?}", c.alerts());
}

#[test]
fn authorization_and_bad_requests() {
    let t = tempfile::tempdir().unwrap();
    let vms1 = t.path().join("vms1");
    let vms2 = t.path().join("vms2");
    make_vm(&vms1, "a", "qcow2", 8 << 20, 1 << 20, 3);
    make_vm(&vms2, "b", "qcow2", 8 << 20, 1 << 20, 4);
    // A sparse 4 TiB disk: far more than any test machine's free space.
    std::fs::create_dir_all(vms2.join("huge")).unwrap();
    std::fs::File::create(vms2.join("huge/disk.raw"))
        .unwrap()
        .set_len(4 << 40)
        .unwrap();
    let mut c = Cluster::start(t.path(), FAST);
    let a1 = c.agent("hv01", &vms1);
    let a2 = c.agent("hv02", &vms2);
    c.wait_datasources(3);
    let out = c.cli_ok(&["backup-now", "hv01/a", "--wait", "--json"]);
    let job: JobInfo = serde_json::from_str(&out).unwrap();

    let ca = std::fs::read_to_string(c.server_dir().join("ca.pem")).unwrap();
    let as_agent = |dir: &Path| {
        let id = pki::AgentIdentity::load(dir).unwrap();
        Client::new(&c.url, id.client_config().unwrap(), Auth::ClientCert).unwrap()
    };
    let status = |r: Result<serde_json::Value, client::Error>| r.err().and_then(|e| e.status());
    let hv2 = as_agent(&a2);
    // An agent administers nothing and never sees another host's data.
    assert_eq!(status(hv2.get("/recovery-points")), Some(403));
    assert_eq!(status(hv2.get("/datasources")), Some(403));
    assert_eq!(status(hv2.delete("/protection-groups/x")), Some(403));
    assert_eq!(
        status(hv2.post(
            &format!("/agent/jobs/{}/start", job.id),
            &serde_json::json!({})
        )),
        Some(403)
    );
    assert_eq!(
        hv2.get_bytes(&format!("/agent/jobs/{}/blob/{}", job.id, "00".repeat(32)))
            .unwrap_err()
            .status(),
        Some(403)
    );
    // No token, a wrong token.
    let anon = c.anonymous();
    assert_eq!(status(anon.get("/jobs")), Some(401));
    let wrong = c.client(Auth::Token("nope".into()));
    assert_eq!(status(wrong.get("/jobs")), Some(401));
    // A used token, a token pinning another CA.
    let tok = c.token("hv03");
    let key = pki::AgentIdentity::prepare(&t.path().join("k3")).unwrap();
    let enroll = |token: &str| {
        anon.post::<_, serde_json::Value>(
            "/enroll",
            &EnrollRequest {
                token: token.into(),
                public_key_pem: key.clone(),
                version: "test".into(),
            },
        )
    };
    assert!(enroll(&tok).is_ok());
    assert_eq!(status(enroll(&tok)), Some(403));
    let (_, secret) = pki::parse_token(&c.token("hv04")).unwrap();
    assert_eq!(
        status(enroll(&format!("hf1.{}.{secret}", "ab".repeat(32)))),
        Some(403)
    );
    // A certificate from another CA is refused at the handshake.
    let other = pki::ServerPki::load_or_create(&t.path().join("other-ca"), &[]).unwrap();
    let edir = t.path().join("evil");
    let epub = pki::AgentIdentity::prepare(&edir).unwrap();
    let ecert = other.issue_client_cert("hv01", &epub).unwrap();
    pki::AgentIdentity::store(&edir, &ecert, &ca).unwrap();
    let evil = as_agent(&edir);
    let e = evil
        .post::<_, PollResponse>("/agent/poll", &serde_json::json!({}))
        .unwrap_err();
    assert!(
        e.status().is_none(),
        "expected a refused handshake, got {e}"
    );
    // Bad requests: malformed and oversized bodies, unknown ids and routes.
    let admin = c.admin();
    let e = admin
        .post_bytes("/protection-groups", b"{not json".to_vec())
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(2 << 20));
    assert_eq!(
        admin
            .post_bytes("/protection-groups", big.into_bytes())
            .unwrap_err()
            .status(),
        Some(413)
    );
    assert_eq!(status(admin.get("/jobs/999999")), Some(404));
    assert_eq!(status(admin.get("/protection-groups/none")), Some(404));
    assert_eq!(status(admin.get("/no/such/route")), Some(404));
    let o = c.cli(&[
        "pg",
        "create",
        "g",
        "--member",
        "hv09/zz",
        "--retention-days",
        "3",
        "--sync-frequency",
        "15",
        "--recovery-point-times",
        "20:00",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = c.cli(&[
        "pg",
        "create",
        "g",
        "--member",
        "hv01/a",
        "--retention-days",
        "500",
        "--sync-frequency",
        "15",
        "--recovery-point-times",
        "20:00",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("retention_days"));
    let o = c.cli(&[
        "pg",
        "create",
        "g",
        "--member",
        "hv01/a",
        "--retention-days",
        "3",
        "--sync-frequency",
        "45",
        "--recovery-point-times",
        "20:00",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("sync_frequency"));
    pg_create(&c, "g1", &["hv01/a"], "1440");
    let o = c.cli(&[
        "pg",
        "create",
        "g2",
        "--member",
        "hv01/a",
        "--retention-days",
        "3",
        "--sync-frequency",
        "60",
        "--recovery-point-times",
        "20:00",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("409") && err.contains("g1"), "{err}");
    // A group too large for the datastore is refused by the allocation review (422),
    // naming the numbers; nothing is created.
    let o = c.cli(&[
        "pg",
        "create",
        "g3",
        "--member",
        "hv02/huge",
        "--retention-days",
        "7",
        "--sync-frequency",
        "60",
        "--recovery-point-times",
        "20:00",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("422") && err.contains("disk allocation review"),
        "{err}"
    );
    assert_eq!(status(admin.get("/protection-groups/g3")), Some(404));
    // Revoked: refused from then on.
    let hv1 = as_agent(&a1);
    assert!(
        hv1.post::<_, PollResponse>("/agent/poll", &serde_json::json!({}))
            .is_ok()
    );
    c.cli_ok(&["agents", "revoke", "hv01"]);
    let e = hv1
        .post::<_, PollResponse>("/agent/poll", &serde_json::json!({}))
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let listed: Vec<AgentInfo> = admin.get("/agents").unwrap();
    assert!(listed.iter().any(|a| a.host == "hv01" && a.revoked));
}

#[test]
fn vanished_and_resized_disks_fail_clearly_then_heal() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    let disk = make_vm(&vms, "app", "qcow2", 16 << 20, 4 << 20, 5);
    std::fs::write(vms.join("app/vm.toml"), "disks = [\"app-disk0.qcow2\"]\n").unwrap();
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("pg", &["hv01/app"]);

    // The disk vanishes: the job fails naming it, with an alert; it comes back: healed.
    let away = t.path().join("away.qcow2");
    std::fs::rename(&disk, &away).unwrap();
    let o = c.cli(&["backup-now", "hv01/app", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("failed") && out.contains("app-disk0.qcow2"),
        "{out}"
    );
    let alerts = c.alerts();
    assert!(
        alerts
            .iter()
            .any(|a| a.subject == "hv01/app" && a.kind == "disk-missing"),
        "{alerts:?}"
    );
    std::fs::rename(&away, &disk).unwrap();
    // The failed job's rerun (or this one) succeeds and resolves the alert.
    wait_until("a successful rerun", Duration::from_secs(60), || {
        let _ = c.cli(&["backup-now", "hv01/app", "--wait"]);
        c.alerts().is_empty()
    });

    // The disk grows: the sync fails (change tracking does not cover a resize), the
    // replica becomes inconsistent, a consistency check runs and repairs it.
    qemu_img(&["resize", s(&disk), "24M"]);
    let o = c.cli(&["backup-now", "hv01/app", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("changed size"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    wait_until(
        "an automatic consistency check",
        Duration::from_secs(60),
        || {
            c.jobs()
                .iter()
                .any(|j| j.kind == JobKind::ConsistencyCheck && j.state == JobState::Succeeded)
        },
    );
    wait_until("the alert to resolve", Duration::from_secs(30), || {
        c.alerts().is_empty()
    });
    let ds = c.datasources();
    assert_eq!(ds[0].replica_state, protocol::ReplicaState::Ok);
    let work = t.path().join("work");
    assert!(restores_identical(&c.datastore(), "hv01/app", &disk, &work));
}

#[test]
fn server_killed_mid_backup_leaves_no_partial_point_and_reruns() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    // Random data: long enough to kill the server in the middle.
    let disk = make_vm(&vms, "big", "raw", 160 << 20, 150 << 20, 6);
    let mut c = Cluster::start(t.path(), FAST);
    slow_agent(&mut c, &vms);
    c.wait_datasources(1);
    let j = start_big_backup(&c);
    c.kill_server();
    assert!(
        point_ids(&c.datastore()).is_empty(),
        "a recovery point appeared from a killed backup"
    );
    c.start_server();
    let first = c.job(j.id);
    assert_eq!(first.state, JobState::Failed);
    assert_eq!(first.recovery_point, None);
    let rerun = c
        .jobs()
        .into_iter()
        .find(|r| r.trigger.starts_with(&format!("rerun of {}", j.id)))
        .expect("a rerun");
    let done = c.wait_job(rerun.id);
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(point_ids(&c.datastore()).len(), 1);
    assert_verify_clean(&c.datastore());
    let work = t.path().join("work");
    assert!(restores_identical(&c.datastore(), "hv01/big", &disk, &work));
    // The interruption was alerted, and the rerun's success resolved it.
    let all: Vec<AlertInfo> = c.admin().get("/alerts?all=true").unwrap();
    assert!(
        all.iter()
            .any(|a| a.kind == "interrupted" && a.resolved.is_some()),
        "{all:?}"
    );
}

/// A TCP relay between the agent and the server whose connections can be cut, as a
/// network drop would.
struct Relay {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    fn start(to: std::net::SocketAddr) -> Relay {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicU64::new(0));
        let epoch = cut.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(a) = c else { continue };
                let Ok(b) = TcpStream::connect(to) else {
                    continue;
                };
                let born = epoch.load(Ordering::SeqCst);
                for (mut from, mut into) in [
                    (a.try_clone().unwrap(), b.try_clone().unwrap()),
                    (b.try_clone().unwrap(), a.try_clone().unwrap()),
                ] {
                    let epoch = epoch.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            if epoch.load(Ordering::SeqCst) != born {
                                break;
                            }
                            from.set_read_timeout(Some(Duration::from_millis(100)))
                                .unwrap();
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if into.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = into.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Relay { addr, cut }
    }

    /// Drops every connection open now (new ones go through).
    fn cut(&self) {
        self.cut.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn network_drop_mid_transfer_resumes_without_resending_much() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    let disk = make_vm(&vms, "big", "raw", 160 << 20, 150 << 20, 8);
    let mut c = Cluster::start(t.path(), FAST);
    let server_addr: std::net::SocketAddr = c.url.trim_start_matches("https://").parse().unwrap();
    let relay = Relay::start(server_addr);
    // The agent reaches the server only through the relay.
    let real = std::mem::replace(&mut c.url, format!("https://{}", relay.addr));
    slow_agent(&mut c, &vms);
    c.url = real;
    c.wait_datasources(1);
    let j = start_big_backup(&c);
    relay.cut();
    std::thread::sleep(Duration::from_millis(300));
    relay.cut();
    let done = c.wait_job(j.id);
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(
        done.attempt, 1,
        "the same job finished, no rerun was needed"
    );
    let rp: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points").unwrap();
    assert_eq!(rp.len(), 1);
    // What was re-sent after the drop is at most the batches in flight (3 x 4 MiB
    // plus a partial one), not the backup again.
    assert!(
        done.bytes_sent <= rp[0].stats.bytes_stored + (20 << 20),
        "sent {} for {} stored",
        done.bytes_sent,
        rp[0].stats.bytes_stored
    );
    let work = t.path().join("work");
    assert!(restores_identical(&c.datastore(), "hv01/big", &disk, &work));
}

#[test]
fn manual_replica_export_and_import_seed_the_first_recovery_point() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    let disk = make_vm(&vms, "big", "vhdx", 32 << 20, 12 << 20, 9);
    let mut c = Cluster::start(t.path(), FAST);
    let adir = c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.create_group(
        "seeded",
        &["hv01/big"],
        &["--recovery-point-times", "20:00", "--replica", "manual"],
    );
    // Manual replica creation: nothing runs by itself.
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.jobs().is_empty(), "{:?}", c.jobs());

    // On the host: export to "removable media".
    let media = t.path().join("media/big");
    let out = c.cli_ok(&[
        "replica",
        "export",
        "--data-dir",
        s(&adir),
        "--files-root",
        s(&vms),
        "--vm",
        "big",
        "--to",
        s(&media),
    ]);
    assert!(out.contains("exported"), "{out}");
    assert!(media.join("seed.json").exists());

    // A damaged seed is refused whole, and nothing appears.
    let damaged = t.path().join("media/damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    for e in std::fs::read_dir(&media).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), damaged.join(e.file_name())).unwrap();
    }
    let f = damaged.join("blobs-000001.bin");
    let mut b = std::fs::read(&f).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0xff;
    std::fs::write(&f, b).unwrap();
    let o = holdfast(&[
        "replica",
        "import",
        "--data-dir",
        s(&c.server_dir()),
        s(&damaged),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("rejected"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(point_ids(&c.datastore()).is_empty());

    // On the server (running): import; the recovery point is the VM's first.
    let out = String::from_utf8(
        holdfast(&[
            "replica",
            "import",
            "--data-dir",
            s(&c.server_dir()),
            s(&media),
        ])
        .stdout,
    )
    .unwrap();
    assert!(out.contains("imported hv01/big"), "{out}");
    let rps: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points").unwrap();
    assert_eq!(rps.len(), 1);
    let work = t.path().join("work");
    assert!(restores_identical(&c.datastore(), "hv01/big", &disk, &work));
    // Protection goes on from the seed: the next backup stores no data blocks again.
    let j: JobInfo =
        serde_json::from_str(&c.cli_ok(&["backup-now", "hv01/big", "--wait", "--json"])).unwrap();
    assert_eq!(j.kind, JobKind::Sync);
    let rps: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points").unwrap();
    let last = rps
        .iter()
        .find(|r| Some(&r.id) == j.recovery_point.as_ref())
        .unwrap();
    assert_eq!(last.stats.blocks_new, 0, "{:?}", last.stats);
    assert_verify_clean(&c.datastore());
}

/// Regression (issue 14, item 9): a seed's recovery point is dated by the seed's view of
/// the VM, a seed older than the VM's newest point never becomes its latest (only an
/// older point, when asked), and the same seed is never imported twice.
#[test]
fn replica_import_dates_points_by_their_view_and_never_rolls_the_vm_back() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    let disk = make_vm(&vms, "big", "raw", 16 << 20, 4 << 20, 21);
    let mut c = Cluster::start(t.path(), FAST);
    let adir = c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.create_group(
        "seeded",
        &["hv01/big"],
        &["--recovery-point-times", "20:00", "--replica", "manual"],
    );
    let export = |to: &Path| {
        c.cli_ok(&[
            "replica",
            "export",
            "--data-dir",
            s(&adir),
            "--files-root",
            s(&vms),
            "--vm",
            "big",
            "--to",
            s(to),
        ])
    };
    let server_dir = c.server_dir();
    let import = |from: &Path, more: &[&str]| {
        let mut a = vec!["replica", "import", "--data-dir", s(&server_dir)];
        a.extend_from_slice(more);
        a.push(s(from));
        let o = holdfast(&a);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (o.status.success(), out, err)
    };
    let seed_json = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("seed.json")).unwrap()).unwrap()
    };
    let viewed = |dir: &Path| seed_json(dir)["viewed"].as_str().unwrap_or("").to_string();
    let points = || -> Vec<RecoveryPointInfo> { c.admin().get("/recovery-points").unwrap() };

    // Two seeds of different contents: s1, then (the disk changed) s2.
    let s1 = t.path().join("media/s1");
    let s2 = t.path().join("media/s2");
    export(&s1);
    change_disk(&disk, "raw", 1);
    export(&s2);
    let (v1, v2) = (viewed(&s1), viewed(&s2));
    assert!(
        !v1.is_empty() && !v2.is_empty(),
        "no view time in the seeds"
    );

    // s1 is the VM's first point, dated by its view, not by the import.
    let (ok1, out, err) = import(&s1, &[]);
    assert!(ok1, "{out}{err}");
    assert!(out.contains("its latest"), "{out}");
    let rps = points();
    assert_eq!(rps.len(), 1, "{rps:?}");
    assert_eq!(rps[0].created, v1);
    let first = rps[0].id.clone();

    // The same seed again: nothing imported, and it says so.
    let (again, out, err) = import(&s1, &[]);
    assert!(again, "{out}{err}");
    assert!(
        out.contains("nothing imported") && out.contains(&first),
        "{out}"
    );
    assert_eq!(points().len(), 1, "{:?}", points());

    // A backup newer than s2's view (in a later second than it).
    let v2_unix = utc::parse(&v2).unwrap();
    wait_until("a second after s2's view", Duration::from_secs(5), || {
        utc::now() > v2_unix
    });
    change_disk(&disk, "raw", 2);
    let j: JobInfo =
        serde_json::from_str(&c.cli_ok(&["backup-now", "hv01/big", "--wait", "--json"])).unwrap();
    let newest = j.recovery_point.clone().unwrap();
    let newest_time = points()
        .into_iter()
        .find(|p| p.id == newest)
        .unwrap()
        .created;

    // s2 is older than that backup: refused, naming both times, and nothing appears.
    let (stale, out, err) = import(&s2, &[]);
    assert!(!stale, "a stale seed was imported: {out}");
    assert!(
        err.contains(&v2) && err.contains(&newest) && err.contains(&newest_time),
        "{err}"
    );
    assert!(err.contains("--as-older-point"), "{err}");
    assert_eq!(points().len(), 2, "{:?}", points());

    // Asked for: an older point, dated by its view; the backup stays the latest.
    let (older, out, err) = import(&s2, &["--as-older-point"]);
    assert!(older, "{out}{err}");
    assert!(out.contains("an older point"), "{out}");
    let rps = points();
    assert_eq!(rps.len(), 3, "{rps:?}");
    let latest = rps
        .iter()
        .max_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)))
        .unwrap();
    assert_eq!(latest.id, newest, "{rps:?}");
    assert!(rps.iter().any(|p| p.created == v2 && p.id != first));
    // ... so it is what a restore of "latest" gives, and what the next sync builds on.
    let work = t.path().join("work");
    assert!(restores_identical(&c.datastore(), "hv01/big", &disk, &work));
    let next: JobInfo =
        serde_json::from_str(&c.cli_ok(&["backup-now", "hv01/big", "--wait", "--json"])).unwrap();
    assert_eq!(next.state, JobState::Succeeded, "{next:?}");
    let log = c.job(next.id).log;
    assert!(
        log.iter().any(|l| l
            .message
            .contains(&format!("based on recovery point {newest}"))),
        "{log:?}"
    );

    // A version 1 seed (no view time) cannot be placed among existing points; a seed
    // from the future is refused too. Neither leaves anything.
    let copy = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let to = t.path().join("media").join(name);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&s2).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        let mut v = seed_json(&to);
        edit(&mut v);
        std::fs::write(to.join("seed.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        to
    };
    let v1_seed = copy("v1", &|v| {
        v["version"] = 1.into();
        v["created"] = "2001-01-01T00:00:00Z".into();
        v.as_object_mut().unwrap().remove("viewed");
    });
    let (ok_v1, _, err) = import(&v1_seed, &["--as-older-point"]);
    assert!(!ok_v1 && err.contains("version 1"), "{err}");
    let future = copy("future", &|v| v["viewed"] = "2099-01-01T00:00:00Z".into());
    let (ok_future, _, err) = import(&future, &[]);
    assert!(!ok_future && err.contains("2099-01-01T00:00:00Z"), "{err}");
    assert_eq!(points().len(), 4, "{:?}", points());
    assert_verify_clean(&c.datastore());
}

#[test]
fn a_running_backup_can_be_cancelled_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    make_vm(&vms, "big", "raw", 160 << 20, 150 << 20, 12);
    let mut c = Cluster::start(t.path(), FAST);
    slow_agent(&mut c, &vms);
    c.wait_datasources(1);
    let j = start_big_backup(&c);
    let out = c.cli_ok(&["jobs", "cancel", &j.id.to_string()]);
    assert!(out.contains("cancel requested"), "{out}");
    let done = c.wait_job(j.id);
    assert_eq!(done.state, JobState::Cancelled, "{done:?}");
    assert!(point_ids(&c.datastore()).is_empty());
    // Cancelled by an administrator: no alert, no rerun.
    assert!(c.alerts().is_empty(), "{:?}", c.alerts());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.jobs().len(), 1, "{:?}", c.jobs());
    // A queued job (its agent is gone) is cancelled at once and never runs.
    for a in &mut c.agents {
        a.kill().unwrap();
        a.wait().unwrap();
    }
    let q: JobInfo =
        serde_json::from_str(&c.cli_ok(&["backup-now", "hv01/big", "--json"])).unwrap();
    assert_eq!(q.state, JobState::Queued);
    c.cli_ok(&["jobs", "cancel", &q.id.to_string()]);
    assert_eq!(c.job(q.id).state, JobState::Cancelled);
    // And a finished job cannot be cancelled.
    let o = c.cli(&["jobs", "cancel", &q.id.to_string()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("409"));
}

/// The README's tour ends with `holdfast demo`: it must keep working.
#[test]
fn demo_protects_two_vms_and_restores_them_exactly() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("demo");
    let mut cmd = Command::new(BIN);
    cmd.args(["demo", "--dir", s(&dir), "--disk-mib", "24"]);
    let o = run_bounded(cmd, "holdfast demo", Duration::from_secs(300));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("2 VMs protected, 4 recovery points"), "{out}");
    assert!(out.contains("restores: byte-identical"), "{out}");
    assert_eq!(
        out.matches("identical to the source disk").count(),
        2,
        "{out}"
    );
}

#[test]
fn group_lifecycle_modify_and_delete_with_or_without_data() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    make_vm(&vms, "a", "qcow2", 8 << 20, 2 << 20, 21);
    make_vm(&vms, "b", "qcow2", 8 << 20, 2 << 20, 22);
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(2);
    pg_create(&c, "both", &["hv01/a", "hv01/b"], "1440");
    wait_until("two initial replicas", Duration::from_secs(60), || {
        c.jobs()
            .iter()
            .filter(|j| j.kind == JobKind::InitialReplica && j.state == JobState::Succeeded)
            .count()
            == 2
    });
    // Modify: drop b, change the policy; the listing follows.
    let g: GroupInfo = serde_json::from_str(&c.cli_ok(&[
        "pg",
        "modify",
        "both",
        "--remove-member",
        "hv01/b",
        "--retention-days",
        "30",
        "--express-full-times",
        "21:00",
        "--json",
    ]))
    .unwrap();
    assert_eq!(g.members, vec!["hv01/a".to_string()]);
    assert_eq!(g.policy.retention_days, 30);
    assert_eq!(g.policy.express_full_times, vec!["21:00".to_string()]);
    let ds = c.datasources();
    let b = ds.iter().find(|d| d.name == "hv01/b").unwrap();
    assert_eq!(b.protection_group, None);
    // b can now join another group, which is deleted with its data.
    pg_create(&c, "solo", &["hv01/b"], "60");
    let r: DeleteGroupResponse = c
        .admin()
        .delete("/protection-groups/solo?delete_data=true")
        .unwrap();
    assert_eq!(r.recovery_points_deleted, 1);
    let rps: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points").unwrap();
    assert_eq!(rps.len(), 1);
    assert_eq!(rps[0].vm, "hv01/a");
    assert_eq!(
        point_ids(&c.datastore()).len(),
        1,
        "the datastore follows the catalog"
    );
    // Deleting "both" keeps a's data; prune keeps what retention keeps; gc is clean.
    let out = c.cli_ok(&["pg", "delete", "both"]);
    assert!(
        out.contains("stay until their retention range ends"),
        "{out}"
    );
    assert!(
        c.cli_ok(&["jobs", "run", "prune", "--wait"])
            .contains("succeeded")
    );
    assert!(
        c.cli_ok(&["jobs", "run", "gc", "--wait"])
            .contains("succeeded")
    );
    let rps: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points").unwrap();
    assert_eq!(rps.len(), 1);
    assert_verify_clean(&c.datastore());
    let groups: Vec<GroupInfo> = c.admin().get("/protection-groups").unwrap();
    assert!(groups.is_empty());
}
