//! End to end: `holdfast recover` through a real server and agent over loopback mutual
//! TLS: copies of a point's disk files, a new VM folder, the original disk files
//! rewritten in place, throttling, bad requests and the agent's blob access.

mod common;

use client::{Auth, Client};
use common::cluster::*;
use common::*;
use protocol::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// VM `web01` under `root`: a qcow2 disk with random runs and a fully random raw disk,
/// listed in a vm.toml. Returns the two disk paths.
fn make_vm(root: &Path) -> (PathBuf, PathBuf) {
    let dir = root.join("web01");
    std::fs::create_dir_all(&dir).unwrap();
    let raw = root.join(".web01.raw");
    make_disk(&raw, 8 << 20, 3 << 20, 7);
    let d0 = dir.join("web01-disk0.qcow2");
    ok(&["image", "convert", s(&raw), s(&d0), "-f", "qcow2"]);
    std::fs::remove_file(&raw).unwrap();
    let d1 = dir.join("data.raw");
    let mut rng = Rng::new(8);
    std::fs::write(&d1, rng.bytes(8 << 20)).unwrap();
    std::fs::write(
        dir.join("vm.toml"),
        "name = \"web01\"\ndisks = [\"web01-disk0.qcow2\", \"data.raw\"]\n",
    )
    .unwrap();
    (d0, d1)
}

/// The raw contents of an image, hashed (through `holdfast image convert -f raw`).
fn content(img: &Path, work: &Path) -> blake3::Hash {
    let tmp = work.join("content.raw");
    ok(&["image", "convert", s(img), s(&tmp), "-f", "raw"]);
    let h = hash_file(&tmp);
    std::fs::remove_file(&tmp).unwrap();
    h
}

fn recover_json(c: &Cluster, args: &[&str]) -> JobInfo {
    let mut all = vec!["recover"];
    all.extend_from_slice(args);
    all.push("--json");
    serde_json::from_str(&c.cli_ok(&all)).unwrap()
}

fn unix(t: &str) -> i64 {
    utc::parse(t).unwrap()
}

fn status_of(e: client::Error) -> Option<u16> {
    e.status()
}

#[test]
fn recover_copies_alternate_original_throttle_and_refusals() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let vms = t.path().join("vms");
    let (d0, d1) = make_vm(&vms);
    let mut c = Cluster::start(t.path(), FAST);
    let adir = c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("g", &["hv01/web01"]);
    let first = c
        .jobs()
        .into_iter()
        .find(|j| j.kind == JobKind::InitialReplica)
        .and_then(|j| j.recovery_point)
        .unwrap();
    let want1 = (content(&d0, &work), content(&d1, &work));

    // Change both disks; a second recovery point.
    let raw = work.join("d0.raw");
    ok(&["image", "convert", s(&d0), s(&raw), "-f", "raw"]);
    mutate(&raw, &mut Rng::new(11), 8);
    let new = work.join("d0.qcow2");
    ok(&["image", "convert", s(&raw), s(&new), "-f", "qcow2"]);
    std::fs::rename(&new, &d0).unwrap();
    std::fs::remove_file(&raw).unwrap();
    mutate(&d1, &mut Rng::new(12), 8);
    c.cli_ok(&["backup-now", "hv01/web01", "--wait"]);
    let want2 = (content(&d0, &work), content(&d1, &work));
    assert_ne!(want1, want2);

    // --copy-to the first point: its files, in their own formats, in a new folder.
    let copies = t.path().join("copies");
    let j = recover_json(
        &c,
        &[
            "hv01/web01",
            "--copy-to",
            &format!("hv01:{}", s(&copies)),
            "--point",
            &first,
            "--wait",
        ],
    );
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert_eq!(j.kind, JobKind::Recovery);
    let folders: Vec<PathBuf> = std::fs::read_dir(&copies)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(folders.len(), 1);
    let name = folders[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // holdfast_YYYYMMDD-HHMMSS_job<ID>: two jobs of one second get their own folders.
    assert!(
        name.starts_with("holdfast_")
            && name.len() == 24 + format!("_job{}", j.id).len()
            && name.ends_with(&format!("_job{}", j.id)),
        "{name}"
    );
    let c0 = folders[0].join("web01-disk0.qcow2");
    let c1 = folders[0].join("data.raw");
    let info = json(&["image", "info", s(&c0), "--json"]);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!((content(&c0, &work), content(&c1, &work)), want1);
    assert!(temp_files_under(&copies).is_empty());

    // --alternate in raw: a new VM folder the files provider can read.
    let alt = t.path().join("alt");
    let j = recover_json(
        &c,
        &[
            "hv01/web01",
            "--alternate",
            &format!("hv01:{}", s(&alt)),
            "--format",
            "raw",
            "--wait",
        ],
    );
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    let vm_dir = alt.join("web01");
    let a0 = vm_dir.join("web01-disk0.raw");
    let a1 = vm_dir.join("data.raw");
    assert_eq!((content(&a0, &work), content(&a1, &work)), want2);
    let toml = std::fs::read_to_string(vm_dir.join("vm.toml")).unwrap();
    assert!(toml.contains("name = \"web01\""), "{toml}");
    assert!(
        toml.contains("disks = [\"web01-disk0.raw\", \"data.raw\"]"),
        "{toml}"
    );
    // A KVM target also gets a libvirt domain over those disks, valid by libvirt's
    // own schema.
    let xml_path = vm_dir.join("domain.xml");
    let xml = std::fs::read_to_string(&xml_path).unwrap();
    for (disk, dev) in [(&a0, "vda"), (&a1, "vdb")] {
        assert!(
            xml.contains(&format!("<source file='{}'/>", s(disk))),
            "{xml}"
        );
        assert!(
            xml.contains(&format!("<target dev='{dev}' bus='virtio'/>")),
            "{xml}"
        );
    }
    assert!(
        xml.contains("<name>web01</name>") && xml.contains("type='raw'"),
        "{xml}"
    );
    let o = std::process::Command::new("virt-xml-validate")
        .args([s(&xml_path), "domain"])
        .output()
        .expect("virt-xml-validate (libvirt-clients; scripts/install-deps installs it)");
    assert!(
        o.status.success(),
        "virt-xml-validate: {}{}\n{xml}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // A second recovery into the same folder is refused, and changes nothing.
    let o = c.cli(&[
        "recover",
        "hv01/web01",
        "--alternate",
        &format!("hv01:{}", s(&alt)),
        "--wait",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(content(&a0, &work), want2.0);
    // A failed recovery raises an alert (never a rerun); the next success resolves it.
    assert!(
        c.alerts()
            .iter()
            .any(|a| a.kind == "recovery-failed" && a.subject == "hv01/web01")
    );

    // --original after the disks were damaged: the files hold the latest point again.
    mutate(&d1, &mut Rng::new(13), 16);
    std::fs::write(&d0, b"not an image any more").unwrap();
    let j = recover_json(&c, &["hv01/web01", "--original", "--wait"]);
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert_eq!((content(&d0, &work), content(&d1, &work)), want2);
    let info = json(&["image", "info", s(&d0), "--json"]);
    assert_eq!(info["format"], "qcow2", "{info}");
    no_temp_files(&vms.join("web01"));
    // Nothing of the data source changed.
    let ds = c.datasources();
    assert_eq!(ds[0].replica_state, protocol::ReplicaState::Ok);
    assert!(
        !c.alerts()
            .iter()
            .any(|a| a.kind == "recovery-failed" || a.kind == "backup-failed")
    );

    // Throttled: 8 MiB of random data at 2 MiB/s takes seconds; meanwhile the agent may
    // read only the blobs of this job's recovery point.
    let thr = t.path().join("throttled");
    let j = recover_json(
        &c,
        &[
            "hv01/web01",
            "--copy-to",
            &format!("hv01:{}", s(&thr)),
            "--disk",
            "1",
            "--throttle",
            "2048",
        ],
    );
    wait_until("the throttled job to run", Duration::from_secs(30), || {
        c.job(j.id).state == JobState::Running
    });
    let id = pki::AgentIdentity::load(&adir).unwrap();
    let agent = Client::new(&c.url, id.client_config().unwrap(), Auth::ClientCert).unwrap();
    let foreign = "ab".repeat(32);
    let e = agent
        .get_bytes(&format!("/agent/jobs/{}/recovery-blob/{foreign}", j.id))
        .unwrap_err();
    assert_eq!(status_of(e), Some(403));
    let e = agent
        .get_bytes(&format!("/agent/jobs/{}/recovery-blob/nothex", j.id))
        .unwrap_err();
    assert_eq!(status_of(e), Some(400));
    let e = agent
        .get_bytes(&format!("/agent/jobs/1/recovery-blob/{foreign}"))
        .unwrap_err();
    assert!(matches!(status_of(e), Some(403 | 409)));
    // The batched route holds to the same rules, for every id of a batch.
    let batch = |body: Vec<u8>| {
        agent.post_bytes(
            &format!("/agent/jobs/{}/recovery-blobs", j.id),
            bytes::Bytes::from(body),
        )
    };
    assert_eq!(status_of(batch(vec![0xab; 32]).unwrap_err()), Some(403));
    assert_eq!(status_of(batch(vec![0xab; 33]).unwrap_err()), Some(400));
    assert_eq!(status_of(batch(Vec::new()).unwrap_err()), Some(400));
    assert_eq!(
        status_of(batch(vec![0xab; 32 * 65]).unwrap_err()),
        Some(400)
    );
    // While it runs, the job shows a rate and the time left (progress comes each
    // second; the copy takes about four).
    let mut eta = None;
    wait_until(
        "a rate and ETA, or the end",
        Duration::from_secs(30),
        || {
            let j = c.job(j.id);
            if j.state == JobState::Running && j.eta_seconds.is_some() {
                eta = Some((j.rate_bytes_per_sec, j.eta_seconds));
            }
            eta.is_some() || j.state.finished()
        },
    );
    let (rate, left) = eta.expect("no rate and ETA while the throttled job ran");
    // 2 MiB/s, measured over whole seconds from the job's start.
    assert!(rate.is_some_and(|r| r > 0 && r <= 4 << 20), "{rate:?}");
    assert!(left.is_some_and(|l| l <= 30), "{left:?}");
    let done = c.wait_job(j.id);
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert!(done.rate_bytes_per_sec.is_some() && done.eta_seconds.is_none());
    let secs = unix(done.finished.as_deref().unwrap()) - unix(done.started.as_deref().unwrap());
    assert!(secs >= 3, "a throttled recovery of 8 MiB took {secs} s");
    assert!(done.bytes_read >= 8 << 20, "{}", done.bytes_read);
    let folder = std::fs::read_dir(&thr)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let files: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["data.raw"]);
    // The recovery history: every recovery job of the VM, newest first, failed ones too.
    let history: Vec<JobInfo> = serde_json::from_str(&c.cli_ok(&[
        "jobs",
        "list",
        "--kind",
        "recovery",
        "--vm",
        "hv01/web01",
        "--json",
    ]))
    .unwrap();
    let ids: Vec<i64> = history.iter().map(|h| h.id).collect();
    assert_eq!(ids.len(), 5, "{history:?}");
    assert_eq!(ids[0], j.id);
    assert!(ids.windows(2).all(|w| w[0] > w[1]));
    assert!(history.iter().all(|h| h.kind == JobKind::Recovery));
    assert_eq!(
        history
            .iter()
            .filter(|h| h.state == JobState::Failed)
            .count(),
        1
    );
    assert_eq!(content(&folder.join("data.raw"), &work), want2.1);

    // Refusals.
    let admin = c.admin();
    let req = |vm: &str, target: RecoveryTarget| RecoveryRequest {
        vm: vm.into(),
        point: None,
        at: None,
        target,
        throttle_kbps: None,
        notify: Vec::new(),
        from: None,
    };
    let copy = |dir: &str, disk: Option<u32>| RecoveryTarget::CopyTo {
        host: "hv01".into(),
        dir: dir.into(),
        disk,
        partition: None,
        items: Vec::new(),
    };
    let e = admin
        .post::<_, JobInfo>("/recoveries", &req("hv01/nope", copy("/tmp/x", None)))
        .unwrap_err();
    assert_eq!(status_of(e), Some(404));
    let o = c.cli(&["recover", "hv01/nope", "--copy-to", "hv01:/tmp/x"]);
    assert_eq!(o.status.code(), Some(1));
    let e = admin
        .post::<_, JobInfo>("/recoveries", &req("hv01/web01", copy("rel/dir", None)))
        .unwrap_err();
    assert_eq!(status_of(e), Some(400));
    let o = c.cli(&[
        "recover",
        "hv01/web01",
        "--copy-to",
        &format!("hv01:{}", s(&thr)),
        "--disk",
        "9",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("there is no disk 9"), "{err}");
    let e = admin
        .post::<_, JobInfo>(
            "/recoveries",
            &req("hv01/web01", copy(s(&thr), None)).tap_host("hv09"),
        )
        .unwrap_err();
    assert_eq!(status_of(e), Some(404));
    let mut bad_format = req(
        "hv01/web01",
        RecoveryTarget::Alternate {
            host: "hv01".into(),
            dir: s(&alt).into(),
            format: Some("vmdk".into()),
        },
    );
    bad_format.throttle_kbps = Some(10);
    let e = admin
        .post::<_, JobInfo>("/recoveries", &bad_format)
        .unwrap_err();
    assert_eq!(status_of(e), Some(400));
    // start without stop_vm, and start for a VM at rest: 400; the CLI refuses
    // --start without --stop-vm itself.
    for (stop_vm, start) in [(false, true), (true, true)] {
        let e = admin
            .post::<_, JobInfo>(
                "/recoveries",
                &req("hv01/web01", RecoveryTarget::Original { stop_vm, start }),
            )
            .unwrap_err();
        assert_eq!(status_of(e), Some(400), "stop_vm {stop_vm} start {start}");
    }
    let o = c.cli(&["recover", "hv01/web01", "--original", "--start"]);
    assert_eq!(o.status.code(), Some(2));
    let o = c.cli(&[
        "recover",
        "hv01/web01",
        "--at",
        "2001-01-01 00:00",
        "--copy-to",
        "hv01:/tmp/x",
    ]);
    assert_eq!(o.status.code(), Some(1));

    // Cancelled while it runs: the job ends cancelled and leaves no file or folder.
    let gone = t.path().join("cancelled");
    let j = recover_json(
        &c,
        &[
            "hv01/web01",
            "--copy-to",
            &format!("hv01:{}", s(&gone)),
            "--throttle",
            "512",
        ],
    );
    wait_until("the job to fetch data", Duration::from_secs(30), || {
        c.job(j.id).bytes_read > 0
    });
    // A backup is not confused with the running recovery.
    let o = c.cli(&["backup-now", "hv01/web01", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("has recovery job"), "{err}");
    c.cli_ok(&["jobs", "cancel", &j.id.to_string()]);
    let done = c.wait_job(j.id);
    assert_eq!(done.state, JobState::Cancelled, "{:?}", done.error);
    assert!(walk(&gone).is_empty(), "{:?}", walk(&gone));
    assert_eq!(std::fs::read_dir(&gone).unwrap().count(), 0);

    // Recovery jobs are never rerun.
    assert!(!c.jobs().iter().any(|j| j.trigger.starts_with("rerun")));
}

trait TapHost {
    fn tap_host(self, host: &str) -> Self;
}

impl TapHost for RecoveryRequest {
    fn tap_host(mut self, host: &str) -> Self {
        if let RecoveryTarget::CopyTo { host: h, .. } = &mut self.target {
            *h = host.into();
        }
        self
    }
}

/// `250.3 KiB/s` after `at ` in a job-log line, as bytes per second.
fn rate_after_at(line: &str) -> f64 {
    let tail = line
        .split(" at ")
        .nth(1)
        .unwrap_or_else(|| panic!("{line}"));
    let mut w = tail.split_whitespace();
    let n: f64 = w.next().unwrap().parse().unwrap();
    let unit = match w.next().unwrap().trim_end_matches(';') {
        "B/s" => 1.0,
        "KiB/s" => 1024.0,
        "MiB/s" => 1024.0 * 1024.0,
        "GiB/s" => 1024.0 * 1024.0 * 1024.0,
        u => panic!("unit {u} in {line}"),
    };
    n * unit
}

/// Regression (issue 14, item 11): a throttled recovery of a disk that is mostly holes
/// reports the bytes it fetched apart from the bytes of disk it wrote, and the rate it
/// shows is the fetch rate, within the throttle (the holes are never fetched).
#[test]
fn a_throttled_recovery_reports_its_fetch_rate_not_its_holes() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    let dir = vms.join("sparse");
    std::fs::create_dir_all(&dir).unwrap();
    // 64 MiB: 1 MiB of random data, 512 KiB of text, the rest holes.
    make_disk(&dir.join("sparse.raw"), 64 << 20, 1 << 20, 31);
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("g", &["hv01/sparse"]);

    const KBPS: u64 = 256;
    let limit = (KBPS * 1024) as f64;
    let out = t.path().join("out");
    let j: serde_json::Value = serde_json::from_str(&c.cli_ok(&[
        "recover",
        "hv01/sparse",
        "--copy-to",
        &format!("hv01:{}", s(&out)),
        "--throttle",
        &KBPS.to_string(),
        "--wait",
        "--json",
    ]))
    .unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    let fetched = j["bytes_fetched"].as_u64().expect("bytes_fetched");
    let written = j["bytes_written"].as_u64().expect("bytes_written");
    assert_eq!(written, 64 << 20, "{j}");
    assert!(fetched >= 1 << 20 && fetched < written, "{j}");
    assert_eq!(j["bytes_read"].as_u64(), Some(fetched), "{j}");
    // The job's rate is the fetch rate: over whole seconds of the server's clock (a
    // run of about 5 s may count one second less), so within half again the limit;
    // counting the holes it was 40 times the limit.
    let rate = j["rate_bytes_per_sec"].as_u64().expect("rate") as f64;
    assert!(
        rate <= limit * 1.5,
        "{rate} B/s fetched at --throttle {KBPS}: {j}"
    );
    let write_rate = j["write_rate_bytes_per_sec"].as_u64().expect("write rate");
    assert!(write_rate as f64 > rate, "{j}");

    // The recovery's last line in the job log (before "succeeded"): both counts, each
    // with its rate over the agent's own measure of the time, the fetch rate within
    // the limit (and a quarter second's burst).
    let id = j["id"].as_i64().unwrap();
    let log = c.job(id).log;
    let n = log.len();
    assert!(n >= 2 && log[n - 1].message == "succeeded", "{log:?}");
    let last = &log[n - 2].message;
    assert!(
        last.contains(&format!("fetched {fetched} bytes"))
            && last.contains(&format!("wrote {written} bytes")),
        "{last}"
    );
    eprintln!("--throttle {KBPS}: job rate {rate} B/s; log: {last}");
    let logged = rate_after_at(last);
    assert!(logged <= limit * 1.1, "{last}");

    // `jobs show` and the waited-for `recover` say the same, apart.
    let show = c.cli_ok(&["jobs", "show", &id.to_string()]);
    assert!(
        show.contains("fetched") && show.contains("holes included"),
        "{show}"
    );
    let again = c.cli_ok(&[
        "recover",
        "hv01/sparse",
        "--copy-to",
        &format!("hv01:{}", s(&t.path().join("out2"))),
        "--wait",
    ]);
    assert!(
        again.contains(": fetched") && again.contains("holes included"),
        "{again}"
    );
}
