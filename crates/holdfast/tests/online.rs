//! Online protection end to end, through a real server and agent: a protection group
//! copies its members' recovery points to a storage target (Azurite for Azure Blob, a
//! folder), the copies are listed with their locations, read back with
//! `--from online:NAME` (item-level recovery and whole-VM recovery), pruned by the
//! online retention, verified, and attached by a new server after the first is lost.

mod common;

use common::cluster::*;
use common::*;
use protocol::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// VM `web` under `root`: one raw disk holding an ext4 file system (no partition
/// table) with `notes.txt` and a 1 MiB random `big.bin`; returns the disk's path.
fn make_vm(root: &Path, work: &Path) -> PathBuf {
    let dir = root.join("web");
    std::fs::create_dir_all(&dir).unwrap();
    let files = work.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("notes.txt"), b"online copies restore exactly\n").unwrap();
    std::fs::write(files.join("big.bin"), Rng::new(5).bytes(1 << 20)).unwrap();
    let disk = dir.join("web.raw");
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d", s(&files), s(&disk), "24M"])
        .output()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        dir.join("vm.toml"),
        "name = \"web\"\ndisks = [\"web.raw\"]\n",
    )
    .unwrap();
    disk
}

fn points(c: &Cluster, vm: &str) -> Vec<RecoveryPointInfo> {
    serde_json::from_str(&c.cli_ok(&["recovery-points", "list", "--vm", vm, "--json"])).unwrap()
}

/// The bytes an online copy job uploaded, from its summary in the log.
fn uploaded(c: &Cluster, job: i64) -> u64 {
    let j: JobInfo = c.job(job);
    let line = j
        .log
        .iter()
        .find(|l| l.message.contains("bytes uploaded"))
        .unwrap_or_else(|| panic!("job {job} has no summary: {:?}", j.log));
    let before = line.message.split(" bytes uploaded").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `pg online-copy GROUP --wait --json`: the jobs, all succeeded.
fn copy_now(c: &Cluster, group: &str) -> Vec<i64> {
    let q: OnlineCopyQueued =
        serde_json::from_str(&c.cli_ok(&["pg", "online-copy", group, "--json"])).unwrap();
    for &id in &q.jobs {
        let j = c.wait_job(id);
        assert_eq!(j.state, JobState::Succeeded, "{:?} {:?}", j.error, j.log);
        assert_eq!(j.kind, JobKind::OnlineCopy);
    }
    q.jobs
}

/// `storage add NAME` for Azurite's container `offsite`, reached at `endpoint`.
fn azure_target(c: &Cluster, endpoint: &str, name: &str, keys: &Path) {
    let key = keys.join("account.key");
    std::fs::write(&key, testkit::AZURITE_KEY).unwrap();
    c.cli_ok(&[
        "storage",
        "add",
        name,
        "--kind",
        "azure",
        "--account",
        testkit::AZURITE_ACCOUNT,
        "--container",
        "offsite",
        "--endpoint",
        endpoint,
        "--key-file",
        s(&key),
    ]);
}

#[test]
fn online_copies_are_listed_read_back_and_attached_by_a_new_server() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let vms = t.path().join("vms");
    let disk = make_vm(&vms, &work);
    let az = testkit::Azurite::start();
    az.create_container("offsite");

    let one = t.path().join("one");
    let mut c = Cluster::start(&one, FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    azure_target(&c, &az.endpoint(), "cloud", &work);
    c.protect_daily("g", &["hv01/web"]);
    // Online protection turned on later, as an administrator would; the key saved.
    let key = work.join("cloud.key");
    c.cli_ok(&[
        "pg",
        "modify",
        "g",
        "--online",
        "cloud",
        "--online-times",
        "03:00",
        "--online-retention",
        "daily=7,weekly=4",
        "--online-key-file",
        s(&key),
    ]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A target in use is not removed.
    let out = c.cli(&["storage", "remove", "cloud"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("used by"));

    let first_job = copy_now(&c, "g")[0];
    let first = c.job(first_job).recovery_point.unwrap();
    let full = uploaded(&c, first_job);
    let rps = points(&c, "hv01/web");
    assert_eq!(rps.len(), 1);
    assert_eq!(rps[0].locations, vec!["disk", "online:cloud"]);
    assert_eq!(rps[0].id, first);

    // One 64 KiB block changed: the second copy sends about that, not the disk.
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(20 << 20)).unwrap();
    f.write_all(&Rng::new(9).bytes(64 << 10)).unwrap();
    drop(f);
    c.cli_ok(&["backup-now", "hv01/web", "--wait"]);
    let second_job = copy_now(&c, "g")[0];
    let second = c.job(second_job).recovery_point.unwrap();
    let incr = uploaded(&c, second_job);
    assert!(
        incr * 4 < full && incr < 1 << 20,
        "incremental copy sent {incr} bytes, the first {full}"
    );
    // Copying again sends nothing new.
    let again = copy_now(&c, "g")[0];
    assert!(uploaded(&c, again) < 64 << 10);
    // Both copies are of one day: the daily rule keeps the newest copy of the day, so
    // the first point now lives on disk only.
    let rps = points(&c, "hv01/web");
    let at = |id: &str| rps.iter().find(|p| p.id == id).unwrap().locations.clone();
    assert_eq!(at(&first), vec!["disk"]);
    assert_eq!(at(&second), vec!["disk", "online:cloud"]);

    let want = std::fs::read(&disk).unwrap();
    // A point the target does not hold is refused by name.
    let out = c.cli(&[
        "ilr",
        "ls",
        "hv01/web",
        "--from",
        "online:nowhere",
        "--point",
        &first,
    ]);
    assert!(!out.status.success());

    // The server is lost. A new one attaches the copy with the key alone.
    c.kill_server();
    drop(c);
    let two = t.path().join("two");
    let mut c2 = Cluster::start(&two, FAST);
    azure_target(&c2, &az.endpoint(), "cloud", &work);
    let r: AttachReport = serde_json::from_str(&c2.cli_ok(&[
        "storage",
        "attach",
        "cloud",
        "--key-file",
        s(&key),
        "--json",
    ]))
    .unwrap();
    assert_eq!(r.recovery_points, 1);
    assert_eq!(r.sources, vec!["hv01/web"]);
    let rps = points(&c2, "hv01/web");
    let ids: Vec<&str> = rps.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, vec![second.as_str()]);
    assert!(rps.iter().all(|p| p.locations == vec!["online:cloud"]));
    // The calendar shows the day of the online copy.
    let days: serde_json::Value = serde_json::from_str(&c2.cli_ok(&[
        "recovery-points",
        "list",
        "--vm",
        "hv01/web",
        "--days",
        "--json",
    ]))
    .unwrap();
    assert_eq!(days[0]["recovery_points"], 1, "{days}");
    assert_eq!(days[0]["vms"][0], "hv01/web", "{days}");
    // Block reads (what `export-nbd --from online:cloud` serves) come from the copy: this
    // server has the point nowhere else.
    let at = 20u64 << 20;
    let bytes = c2
        .admin()
        .get_bytes(&format!(
            "/recovery-points/{second}/disks/0/data?offset={at}&length=65536&from=online:cloud"
        ))
        .unwrap();
    assert!(bytes[..] == want[at as usize..at as usize + 65536]);
    // Item-level recovery from the online copy, on the server that has it nowhere else.
    let got = work.join("got");
    c2.cli_ok(&[
        "ilr",
        "get",
        "hv01/web",
        "--from",
        "online:cloud",
        "--point",
        &second,
        "/big.bin",
        "--to-folder",
        s(&got),
    ]);
    assert_eq!(
        std::fs::read(got.join("big.bin")).unwrap(),
        Rng::new(5).bytes(1 << 20)
    );
    // A wrong key is refused and changes nothing.
    let wrong = work.join("wrong.key");
    std::fs::write(&wrong, "not a key\n").unwrap();
    assert!(
        !c2.cli(&["storage", "attach", "cloud", "--key-file", s(&wrong)])
            .status
            .success()
    );

    // The VM's disk is damaged meanwhile; its host's agent enrolls with the new server,
    // which recovers the VM from the copy.
    std::fs::write(&disk, vec![0xEEu8; 24 << 20]).unwrap();
    c2.agent("hv01", &vms);
    c2.wait_datasources(1);
    let out = work.join("restored");
    let j: JobInfo = serde_json::from_str(&c2.cli_ok(&[
        "recover",
        "hv01/web",
        "--from",
        "online:cloud",
        "--copy-to",
        &format!("hv01:{}", s(&out)),
        "--wait",
        "--json",
    ]))
    .unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert_eq!(j.recovery_point.as_deref(), Some(second.as_str()));
    let folder = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(std::fs::read(folder.join("web.raw")).unwrap() == want);

    // With no server at all: any machine restores from the target with the two keys.
    let account_key = work.join("account.key");
    let img = work.join("local.raw");
    let out = std::process::Command::new(BIN)
        .args([
            "restore",
            "-d",
            &format!("az://{}/offsite", testkit::AZURITE_ACCOUNT),
            "--key-file",
            s(&key),
            "--source",
            "hv01/web",
            "--point",
            &second,
            "-o",
            s(&img),
            "-f",
            "raw",
        ])
        .env("HOLDFAST_STORAGE_KEY_FILE", &account_key)
        .env("HOLDFAST_STORAGE_ENDPOINT", az.endpoint())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&img).unwrap() == want);
}

#[test]
fn online_retention_prunes_verify_finds_damage_and_gc_reclaims() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let vms = t.path().join("vms");
    let disk = make_vm(&vms, &work);
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    let nas = t.path().join("nas");
    c.cli_ok(&[
        "storage",
        "add",
        "nas",
        "--kind",
        "folder",
        "--path",
        s(&nas),
    ]);
    // Without --online-retention online protection is refused by name.
    let out = c.cli(&[
        "pg",
        "create",
        "g",
        "--member",
        "hv01/web",
        "--retention-days",
        "7",
        "--sync-frequency",
        "1440",
        "--recovery-point-times",
        "20:00",
        "--online",
        "nas",
        "--online-times",
        "03:00",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--online-retention"));
    c.create_group(
        "g",
        &["hv01/web"],
        &[
            "--recovery-point-times",
            "20:00",
            "--online",
            "nas",
            "--online-times",
            "03:00",
            "--online-retention",
            "daily=1",
            "--online-bandwidth",
            "100000",
        ],
    );
    wait_until("the initial replica", Duration::from_secs(120), || {
        points(&c, "hv01/web").len() == 1
    });
    copy_now(&c, "g");
    // A second point the same day: daily=1 keeps only the newest copy of the day.
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(12 << 20)).unwrap();
    f.write_all(&Rng::new(3).bytes(4 << 20)).unwrap();
    drop(f);
    c.cli_ok(&["backup-now", "hv01/web", "--wait"]);
    copy_now(&c, "g");
    let rps = points(&c, "hv01/web");
    assert_eq!(rps.len(), 2);
    assert_eq!(rps[0].locations, vec!["disk"]);
    assert_eq!(rps[1].locations, vec!["disk", "online:nas"]);
    let manifests = std::fs::read_dir(nas.join("points")).unwrap().count();
    assert_eq!(manifests, 1);

    // gc on the server's schedule reclaims the pruned copy's data on the target too.
    let packs = |dir: &Path| walk(&dir.join("packs")).len();
    let before = packs(&nas);
    let gc: JobInfo = c
        .admin()
        .post("/jobs", &serde_json::json!({"kind": "gc"}))
        .unwrap();
    let gc = c.wait_job(gc.id);
    assert_eq!(gc.state, JobState::Succeeded, "{:?}", gc.error);
    assert!(
        gc.log.iter().any(|l| l.message.contains("online:nas")),
        "{:?}",
        gc.log
    );
    assert!(packs(&nas) <= before);

    // Clean: verify (all, and a sample) passes. Then one pack is damaged: found.
    c.cli_ok(&["verify", "--storage", "nas"]);
    c.cli_ok(&["verify", "--storage", "nas", "--sample", "50"]);
    let victim = walk(&nas.join("packs"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = victim.unwrap();
    let mut b = std::fs::read(&victim).unwrap();
    b[100] ^= 0xff;
    std::fs::write(&victim, b).unwrap();
    let out = c.cli(&["verify", "--storage", "nas"]);
    assert!(!out.status.success());
    let alerts = c.alerts();
    assert!(
        alerts
            .iter()
            .any(|a| a.subject == "online:nas" && a.kind == "damage"),
        "{alerts:?}"
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// An online copy whose target stops answering mid-upload fails cleanly (no copy
/// listed, the error names the target); once it answers again, the next copy sends
/// only what had not landed.
#[test]
fn a_copy_cut_off_mid_upload_fails_cleanly_and_resumes() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    let dir = vms.join("db");
    std::fs::create_dir_all(&dir).unwrap();
    // Random data: 48 MiB is six 8 MiB packs on the target.
    std::fs::write(dir.join("db.raw"), Rng::new(21).bytes(48 << 20)).unwrap();
    std::fs::write(dir.join("vm.toml"), "name = \"db\"\ndisks = [\"db.raw\"]\n").unwrap();
    let az = testkit::Azurite::start();
    az.create_container("offsite");
    let proxy = testkit::FaultProxy::start(az.port());
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    let endpoint = format!(
        "http://127.0.0.1:{}/{}",
        proxy.port(),
        testkit::AZURITE_ACCOUNT
    );
    azure_target(&c, &endpoint, "cloud", t.path());
    c.protect_daily("g", &["hv01/db"]);
    c.cli_ok(&[
        "pg",
        "modify",
        "g",
        "--online",
        "cloud",
        "--online-times",
        "03:00",
        "--online-retention",
        "daily=7",
    ]);

    // Each request takes a while; after two packs have gone up, every connection is
    // dropped without an answer.
    proxy.delay_ms(150);
    let before = proxy.counts().bytes_up;
    let q: OnlineCopyQueued =
        serde_json::from_str(&c.cli_ok(&["pg", "online-copy", "g", "--json"])).unwrap();
    wait_until("two packs uploaded", Duration::from_secs(60), || {
        proxy.counts().bytes_up - before >= 16 << 20
    });
    proxy.reset(true);
    let j = c.wait_job(q.jobs[0]);
    assert_eq!(j.state, JobState::Failed, "{:?}", j.log);
    let err = j.error.unwrap_or_default();
    assert!(err.contains("online:cloud"), "{err}");
    let landed = proxy.counts().bytes_up - before;
    assert!(landed < 48 << 20, "{landed}");
    let rps = points(&c, "hv01/db");
    assert_eq!(
        rps[0].locations,
        vec!["disk"],
        "a failed copy is not listed"
    );

    // The target answers again: the copy completes, without sending what landed.
    proxy.reset(false);
    proxy.delay_ms(0);
    let again = copy_now(&c, "g")[0];
    let resent = uploaded(&c, again);
    assert!(
        resent + landed < (48 << 20) + (8 << 20),
        "second try sent {resent} bytes after {landed} had landed"
    );
    let rps = points(&c, "hv01/db");
    assert_eq!(rps[0].locations, vec!["disk", "online:cloud"]);
}
