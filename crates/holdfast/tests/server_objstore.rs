//! `holdfast server --datastore-url`: the server's datastore on object storage (Azurite,
//! moto), proven safe. A server holds the datastore's lease for its whole life: a
//! second server on the same URL is refused naming the first; a server killed in the
//! middle of a backup leaves only packs no manifest references, which the next
//! server's gc removes once it has taken the expired lease over; a server that finds
//! its lease taken over (it was stalled past the expiry) stops with an alert; and one
//! stopped with SIGTERM releases the lease at once.

mod common;

use common::cluster::*;
use common::*;
use protocol::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite, Moto};

/// The lease length the servers run with: short, so a takeover comes within seconds,
/// and long enough for an 8 MiB PUT and a renewal on a loaded machine.
const LEASE_SECONDS: u64 = 6;

/// A datastore URL on a storage server, and how to reach it.
struct Place {
    url: String,
    /// HOLDFAST_STORAGE_KEY_FILE and HOLDFAST_STORAGE_ENDPOINT.
    env: Vec<(String, String)>,
    target: objstore::Target,
}

fn azure_place(az: &Azurite, dir: &Path) -> Place {
    az.create_container("primary");
    let key = dir.join("azure.key");
    std::fs::write(&key, format!("{AZURITE_KEY}\n")).unwrap();
    Place {
        url: format!("az://{AZURITE_ACCOUNT}/primary"),
        env: vec![
            ("HOLDFAST_STORAGE_KEY_FILE".into(), s(&key).into()),
            ("HOLDFAST_STORAGE_ENDPOINT".into(), az.endpoint()),
        ],
        target: objstore::Target::Azure {
            account: AZURITE_ACCOUNT.into(),
            container: "primary".into(),
            endpoint: Some(az.endpoint()),
            access_key: objstore::Secret::new(AZURITE_KEY),
        },
    }
}

fn s3_place(moto: &Moto, dir: &Path) -> Place {
    moto.create_bucket("primary");
    let key = dir.join("s3.key");
    std::fs::write(&key, "testing\ntesting\n").unwrap();
    Place {
        url: "s3://primary".into(),
        env: vec![
            ("HOLDFAST_STORAGE_KEY_FILE".into(), s(&key).into()),
            ("HOLDFAST_STORAGE_ENDPOINT".into(), moto.endpoint()),
        ],
        target: objstore::Target::S3 {
            bucket: "primary".into(),
            endpoint: Some(moto.endpoint()),
            region: "us-east-1".into(),
            access_key_id: "testing".into(),
            secret_access_key: objstore::Secret::new("testing"),
        },
    }
}

impl Place {
    /// `holdfast server` on `data_dir` with this datastore URL, not started.
    fn server_command(&self, data_dir: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(["server", "--data-dir", s(data_dir), "--datastore-url"])
            .arg(&self.url)
            .args(["--lease-seconds", &LEASE_SECONDS.to_string()])
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// holdfast with the storage environment, run to completion.
    fn holdfast(&self, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(BIN);
        c.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        run_bounded(c, &format!("holdfast {args:?}"), HANG)
    }

    fn backend(&self) -> Box<dyn datastore::Backend> {
        objstore::open(&self.target).unwrap()
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.backend()
            .list(prefix)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect()
    }

    /// The lease object's fields, when there is one.
    fn lease(&self) -> Option<serde_json::Value> {
        match self.backend().get("locks/lease.json") {
            Ok(b) => Some(serde_json::from_slice(&b).unwrap()),
            Err(datastore::Error::Missing { .. }) => None,
            Err(e) => panic!("reading the lease: {e}"),
        }
    }
}

/// A server started on `place` in `root/server` (stderr kept in `root/server.err`),
/// as a [`Cluster`] for the admin CLI and agents; returns once it answers.
fn start_server(place: &Place, root: &Path) -> Cluster {
    start_server_with(place, root, FAST)
}

/// [`start_server`] with this configuration.
fn start_server_with(place: &Place, root: &Path, toml: &str) -> Cluster {
    let sdir = root.join("server");
    std::fs::create_dir_all(&sdir).unwrap();
    std::fs::write(sdir.join("holdfast.toml"), toml).unwrap();
    let err = std::fs::File::create(root.join("server.err")).unwrap();
    let mut child = place
        .server_command(&sdir, &["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let url = first
        .trim()
        .strip_prefix("holdfast server listening on ")
        .unwrap_or_else(|| {
            panic!(
                "the server did not start: {first:?}; stderr: {}",
                std::fs::read_to_string(root.join("server.err")).unwrap_or_default()
            )
        })
        .to_string();
    let c = Cluster {
        dir: root.to_path_buf(),
        server: Some(child),
        agents: Vec::new(),
        url,
        agent_env: Vec::new(),
    };
    wait_until("the server answers", Duration::from_secs(30), || {
        c.admin().get::<ServerStatus>("/status").is_ok()
    });
    c
}

/// Waits for `child` to exit (at most `limit`); its exit code.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(
            start.elapsed() < limit,
            "the server did not exit in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sleeps until the lease object's expiry has passed on this machine's clock.
fn until_expired(place: &Place) {
    let Some(l) = place.lease() else { return };
    let expires = l["expires_unix"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let left = expires as f64 - now + 0.5;
    assert!(
        left < 2.0 * LEASE_SECONDS as f64,
        "lease expiry {left} s away"
    );
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
}

/// A raw disk in the files provider's layout, `vms/NAME/NAME-disk0.raw`.
fn vm(vms: &Path, name: &str, size: u64, random: u64, seed: u64) -> PathBuf {
    let dir = vms.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join(format!("{name}-disk0.raw"));
    make_disk(&disk, size, random, seed);
    disk
}

fn sigkill(c: &mut Cluster) {
    for a in &mut c.agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    c.agents.clear();
    c.kill_server();
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// The whole story on one target.
fn lease_protects_the_datastore(place: &Place, t: &Path) {
    let vms = t.join("vms");
    let small = vm(&vms, "small", 16 << 20, 8 << 20, 1);
    // Random data read at 32 MiB/s: about 5 s of backup to interrupt.
    vm(&vms, "big", 160 << 20, 150 << 20, 2);

    // Server A creates the datastore on the URL and backs up through it.
    let mut a = start_server(place, &t.join("a"));
    let a_pid = a.server.as_ref().unwrap().id();
    assert!(
        place
            .keys("")
            .iter()
            .any(|k| k == "holdfast-datastore.json"),
        "A did not create the datastore"
    );
    a.agent_with(
        "hv01",
        &["--files-root", s(&vms), "--read-limit-kbps", "32768"],
    );
    a.wait_datasources(2);
    let j: JobInfo =
        serde_json::from_str(&a.cli_ok(&["backup-now", "hv01/small", "--wait", "--json"])).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let point = j.recovery_point.clone().expect("a recovery point");
    let packs_kept = place.keys("packs/").len();
    assert!(packs_kept > 0);
    assert_eq!(place.keys("points/").len(), 1);
    let lease = place.lease().expect("A holds the lease");
    assert_eq!(lease["pid"].as_u64(), Some(u64::from(a_pid)), "{lease}");

    // Server B on the same URL: refused at once, naming A.
    let b_dir = t.join("b").join("server");
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::write(b_dir.join("holdfast.toml"), FAST).unwrap();
    let started = Instant::now();
    let o = run_bounded(
        place.server_command(&b_dir, &["--listen", "127.0.0.1:0"]),
        "server B",
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("in use by another server") && err.contains(&format!("pid {a_pid}")),
        "{err}"
    );
    assert!(err.contains("holds the lease until"), "{err}");
    let refused = started.elapsed();
    assert!(refused < Duration::from_secs(10), "B waited");
    assert!(o.stdout.is_empty(), "B started: {:?}", o.stdout);

    // A is killed (SIGKILL) in the middle of a backup of `big`.
    let big: JobInfo = a
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
        let j = a.job(big.id);
        assert!(!j.state.finished(), "ended before the kill: {j:?}");
        j.bytes_sent > 48 << 20
    });
    sigkill(&mut a);
    let killed = Instant::now();
    let packs_left = place.keys("packs/").len();
    assert!(
        packs_left > packs_kept,
        "the killed backup stored no pack ({packs_left})"
    );
    assert_eq!(
        place.keys("points/").len(),
        1,
        "a manifest of the killed backup exists"
    );
    assert!(
        place.lease().is_some(),
        "a killed server cannot delete its lease"
    );

    // After the lease's expiry B takes over: its catalog rebuilt from the URL, gc
    // removes exactly the killed backup's packs, and A's point restores.
    until_expired(place);
    let o = place.holdfast(&[
        "server",
        "--data-dir",
        s(&b_dir),
        "--datastore-url",
        &place.url,
        "--rebuild-catalog",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("1 recovery points"), "{out}");
    let mut b = start_server(place, &t.join("b"));
    let b_pid = b.server.as_ref().unwrap().id();
    let takeover = killed.elapsed();
    assert_eq!(
        place.lease().unwrap()["pid"].as_u64(),
        Some(u64::from(b_pid))
    );
    let gc: JobInfo =
        serde_json::from_str(&b.cli_ok(&["jobs", "run", "gc", "--wait", "--json"])).unwrap();
    assert_eq!(gc.state, JobState::Succeeded, "{gc:?}");
    assert_eq!(
        place.keys("packs/").len(),
        packs_kept,
        "gc left packs of the killed backup (there were {packs_left})"
    );
    eprintln!(
        "figures: {} packs after the first backup, {packs_left} after the kill, {} after B's gc; B refused in {:.2} s; B serving {:.1} s after the kill (lease {LEASE_SECONDS} s)",
        packs_kept,
        place.keys("packs/").len(),
        refused.as_secs_f64(),
        takeover.as_secs_f64()
    );
    let points: Vec<RecoveryPointInfo> = b.admin().get("/recovery-points").unwrap();
    assert_eq!(points.iter().map(|p| &p.id).collect::<Vec<_>>(), [&point]);
    let got = t.join("restored.raw");
    let o = place.holdfast(&[
        "restore",
        "-d",
        &place.url,
        "--source",
        "hv01/small",
        "--point",
        &point,
        "-o",
        s(&got),
        "--format",
        "raw",
        "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(hash_file(&got), hash_file(&small), "the restore differs");
    // Verify (shared) runs under B's lifetime hold as gc (exclusive) did.
    let v: JobInfo =
        serde_json::from_str(&b.cli_ok(&["jobs", "run", "verify", "--wait", "--json"])).unwrap();
    assert_eq!(v.state, JobState::Succeeded, "{v:?}");

    // B stalled (SIGSTOP) past its lease: C takes over, and B, woken, stops with
    // "lease lost" (exit 3) rather than write beside C.
    let b_child = b.server.as_ref().unwrap();
    signal(b_child, "-STOP");
    until_expired(place);
    let mut c = start_server(place, &t.join("c"));
    signal(b.server.as_ref().unwrap(), "-CONT");
    let code = wait_exit(b.server.as_mut().unwrap(), Duration::from_secs(20));
    assert_eq!(code, Some(3));
    let err = std::fs::read_to_string(t.join("b").join("server.err")).unwrap();
    assert!(err.contains("lease lost"), "{err}");
    let c_pid = c.server.as_ref().unwrap().id();
    assert_eq!(
        place.lease().unwrap()["pid"].as_u64(),
        Some(u64::from(c_pid))
    );

    // C stopped with SIGTERM deletes its lease, so B starts again at once, and finds
    // the alert it raised when it lost the lease.
    signal(c.server.as_ref().unwrap(), "-TERM");
    assert_eq!(
        wait_exit(c.server.as_mut().unwrap(), Duration::from_secs(20)),
        Some(0)
    );
    assert!(place.lease().is_none(), "C left its lease behind");
    let b = start_server(place, &t.join("b"));
    let alerts: Vec<AlertInfo> = b.admin().get("/alerts").unwrap();
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "lease-lost" && a.message.contains("lease lost")),
        "{alerts:?}"
    );
}

#[test]
fn server_on_azurite_holds_its_lease_and_recovers_from_a_crash() {
    let t = tempfile::tempdir().unwrap();
    let az = Azurite::start();
    let place = azure_place(&az, t.path());
    lease_protects_the_datastore(&place, t.path());
}

#[test]
fn server_on_moto_holds_its_lease_and_recovers_from_a_crash() {
    let t = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    let place = s3_place(&moto, t.path());
    lease_protects_the_datastore(&place, t.path());
}

/// `encrypt_datastore` on object storage: the server creates the datastore encrypted
/// with its key in the data dir (there is no folder to put it beside), backs up through
/// it, and the point restores with that key and not without it.
#[test]
fn encrypted_datastore_on_azurite_keeps_its_key_in_the_data_dir() {
    let t = tempfile::tempdir().unwrap();
    let az = Azurite::start();
    let place = azure_place(&az, t.path());
    let vms = t.path().join("vms");
    let disk = vm(&vms, "small", 16 << 20, 8 << 20, 3);
    let mut c = start_server_with(
        &place,
        &t.path().join("a"),
        &format!("encrypt_datastore = true\n{FAST}"),
    );
    let key = c.server_dir().join("datastore.key");
    assert!(key.exists(), "no key file in the data dir");
    let config =
        String::from_utf8(place.backend().get("holdfast-datastore.json").unwrap()).unwrap();
    assert!(config.contains("aes-256-gcm"), "{config}");
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    let j: JobInfo =
        serde_json::from_str(&c.cli_ok(&["backup-now", "hv01/small", "--wait", "--json"])).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let got = t.path().join("restored.raw");
    let restore = |key: Option<&Path>| {
        let mut args = vec![
            "restore",
            "-d",
            &place.url,
            "--source",
            "hv01/small",
            "--point",
            "latest",
            "-o",
            s(&got),
            "--format",
            "raw",
            "--overwrite",
            "-q",
        ];
        if let Some(k) = key {
            args.extend_from_slice(&["--key-file", s(k)]);
        }
        place.holdfast(&args)
    };
    let o = restore(None);
    assert!(!o.status.success(), "restored without the key");
    let o = restore(Some(&key));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(hash_file(&got), hash_file(&disk));

    // A data dir whose catalog belongs to a folder datastore is not paired with the
    // URL's datastore by a start with --datastore-url.
    let other = t.path().join("folder-server");
    let o = place.holdfast(&["datastore", "create", s(&other.join("datastore"))]);
    assert!(o.status.success());
    let o = place.holdfast(&[
        "server",
        "--data-dir",
        s(&other),
        "--datastore-url",
        &place.url,
        "--listen",
        "127.0.0.1:0",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("datastore is the folder"), "{err}");
}
