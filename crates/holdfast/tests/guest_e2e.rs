//! Booted Debian 12 guests (the rig of `scripts/guest-rig`: a real kernel, systemd and
//! qemu-guest-agent) protected end to end through `holdfast server` and `holdfast agent
//! --qmp-dir`, while a process in the guest keeps writing and syncing files:
//! - the initial replica and incrementals are file-consistent (frozen through the real
//!   guest agent); every recovery point restores to disks whose ext4 passes
//!   `e2fsck -fn` and hold every file the guest had synced before the point, byte for
//!   byte; item-level recovery gives back a file the guest wrote, from each point;
//! - two disks in one VM, and a second VM of the same host backed up at the same time;
//! - a guest shut down and started again between backups: the next one is still an
//!   incremental (the persistent bitmap);
//! - the guest agent stopped inside the guest: the backup pauses the VM instead and says
//!   crash-consistent;
//! - `recover --alternate` as qcow2, booted in a new QEMU: its guest agent answers.

mod common;
#[path = "../../fsview/tests/support/mod.rs"]
mod support;

use common::cluster::*;
use common::guest::*;
use common::vm::{log_has, manual_group, point, start_cluster};
use common::*;
use protocol::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The in-guest writer: file `/data/w/fN` holds `yes "file N" | head -c 16384`, and
/// `/data/w/synced` lists N once the file is synced; `/data2/gN` is the same on the
/// second disk, when there is one. Runs until killed.
const WRITER: &str = "mkdir -p /data/w; n=0; while true; do n=$((n+1)); \
    yes \"file $n\" | head -c 16384 > /data/w/f$n; \
    if mountpoint -q /data2; then yes \"two $n\" | head -c 8192 > /data2/g$n; fi; \
    sync; echo $n >> /data/w/synced; sync; sleep 0.3; done";

fn expected(prefix: &str, n: u64, len: usize) -> Vec<u8> {
    format!("{prefix} {n}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(len)
        .collect()
}

/// The number of files the writer has synced so far.
fn synced(g: &Guest) -> u64 {
    let out = g.exec_ok(
        "tail -n 1 /data/w/synced 2>/dev/null || echo 0",
        Duration::from_secs(60),
    );
    out.trim().parse().unwrap_or(0)
}

/// A GPT disk (64 MiB, qcow2) with one ext4 partition at 1 MiB (mounted on /data2).
fn data_disk(dir: &Path) -> PathBuf {
    let raw = dir.join("data.raw");
    make_data_disk(&raw, 64);
    let img = dir.join("data.qcow2");
    support::convert(&raw, "qcow2", &img);
    std::fs::remove_file(&raw).unwrap();
    img
}

/// Restores disk `disk` of `point` and copies its first partition (at 1 MiB) out.
fn restored_partition(c: &Cluster, vm: &str, point: &str, disk: usize, out: &Path) {
    let raw = c.dir.join("restored.raw");
    let args = vec![
        "restore".to_string(),
        "-d".into(),
        s(&c.datastore()).into(),
        "--source".into(),
        format!("kvm01/{vm}"),
        "--point".into(),
        point.into(),
        "--disk".into(),
        disk.to_string(),
        "-o".into(),
        s(&raw).into(),
        "--format".into(),
        "raw".into(),
        "--overwrite".into(),
        "--no-fsync".into(),
        "-q".into(),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    let parts = fs_json(&raw);
    let start = parts[0] * 512;
    let size = parts[1] * 512;
    let o = std::process::Command::new("dd")
        .args([
            &format!("if={}", s(&raw)),
            &format!("of={}", s(out)),
            "bs=1M",
            "iflag=skip_bytes,count_bytes",
            &format!("skip={start}"),
            &format!("count={size}"),
            "conv=sparse",
            "status=none",
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_file(&raw).unwrap();
}

/// The first partition's start and size in sectors (`sfdisk --json`).
fn fs_json(raw: &Path) -> [u64; 2] {
    let out = support::run("sfdisk", &["--json", s(raw)], None, &[]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = &v["partitiontable"]["partitions"][0];
    [p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap()]
}

/// `e2fsck -fn` must find nothing wrong. A crash-consistent image first gets its
/// journal replayed, as the guest's next boot would.
fn assert_fsck_clean(part: &Path, crash_consistent: bool) {
    if crash_consistent {
        let o = std::process::Command::new("e2fsck")
            .args(["-E", "journal_only", "-y", s(part)])
            .output()
            .unwrap();
        assert!(
            o.status.code().unwrap_or(8) <= 1,
            "journal replay: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = std::process::Command::new("e2fsck")
        .args(["-fn", s(part)])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "e2fsck -fn {}: exit {:?}\n{}{}",
        part.display(),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Files `1..=n` written as `prefix` under `dir` of the ext4 image `part` (dumped with
/// debugfs) have the writer's content.
fn assert_files(part: &Path, dir: &str, name: &str, prefix: &str, len: usize, n: u64) {
    let out = part.with_extension("dump");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let cmds: String = (1..=n)
        .map(|i| format!("dump {dir}/{name}{i} {}/{name}{i}\n", s(&out)))
        .collect();
    let script = out.join("commands");
    std::fs::write(&script, cmds).unwrap();
    support::run("debugfs", &["-f", s(&script), s(part)], None, &[]);
    for i in 1..=n {
        let f = out.join(format!("{name}{i}"));
        let got = std::fs::read(&f).unwrap_or_else(|e| {
            panic!("{dir}/{name}{i}: {e}: synced before the point, missing from it")
        });
        assert!(
            got == expected(prefix, i, len),
            "{dir}/{name}{i}: synced before the point, content differs"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// One recovery point of `deb1` checked: both disks' ext4 clean, the files synced
/// before it present, and `/data/w/f{n}` fetched by item-level recovery.
fn check_point(c: &Cluster, rp: &str, n: u64, crash_consistent: bool) {
    let t = Instant::now();
    let root = c.dir.join("root-part.img");
    restored_partition(c, "deb1", rp, 0, &root);
    assert_fsck_clean(&root, crash_consistent);
    assert_files(&root, "/data/w", "f", "file", 16384, n);
    std::fs::remove_file(&root).unwrap();
    let data = c.dir.join("data-part.img");
    restored_partition(c, "deb1", rp, 1, &data);
    assert_fsck_clean(&data, crash_consistent);
    assert_files(&data, "", "g", "two", 8192, n);
    std::fs::remove_file(&data).unwrap();

    let to = c.dir.join(format!("ilr-{rp}"));
    c.cli_ok(&[
        "ilr",
        "get",
        "kvm01/deb1",
        "--point",
        rp,
        "--partition",
        "1",
        &format!("/data/w/f{n}"),
        "--to-folder",
        s(&to),
    ]);
    let got = std::fs::read(to.join(format!("f{n}"))).unwrap();
    assert!(got == expected("file", n, 16384), "ilr get f{n} from {rp}");
    eprintln!(
        "checked {rp} ({n} files synced before it) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn backup(c: &Cluster, vm: &str) -> JobInfo {
    let t = Instant::now();
    let out = c.cli_ok(&["backup-now", &format!("kvm01/{vm}"), "--wait", "--json"]);
    let j: JobInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let j = c.job(j.id);
    let hold: Vec<&str> = j
        .log
        .iter()
        .map(|l| l.message.as_str())
        .filter(|m| m.contains("frozen by") || m.contains("paused for"))
        .collect();
    eprintln!(
        "{vm}: {:?} in {:.1} s, {} bytes read; {hold:?}",
        j.kind,
        t.elapsed().as_secs_f64(),
        j.bytes_read
    );
    j
}

#[test]
fn booted_guests_are_protected_end_to_end_while_they_write() {
    let rig = Rig::get();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let sockets = dir.join("sockets");
    eprintln!("guest rig: {} ({})", rig.dir.display(), rig.accel);

    // Two guests on one host, booted together; deb1 has a second disk.
    let disk2 = data_disk(dir);
    let mut g1 = Guest::boot(
        &rig,
        dir,
        &sockets,
        "deb1",
        BootOpts::default().data_disk(&disk2, "qcow2"),
    );
    let mut g2 = Guest::boot(
        &rig,
        dir,
        &sockets,
        "deb2",
        BootOpts::default().uuid("5e0c1a7e-0000-4000-8000-00000000b002"),
    );
    g1.wait_agent(boot_deadline(&rig));
    g2.wait_agent(boot_deadline(&rig));
    eprintln!(
        "booted to a guest agent in {:.1} s and {:.1} s",
        g1.boot_seconds().unwrap(),
        g2.boot_seconds().unwrap()
    );
    g1.exec_ok("mountpoint -q /data2", Duration::from_secs(60));

    let mut c = start_cluster(dir);
    c.agent_with(
        "kvm01",
        &["--qmp-dir", s(&sockets), "--freeze-timeout-seconds", "30"],
    );
    c.wait_datasources(2);
    manual_group(&c, "guests", &["kvm01/deb1", "kvm01/deb2"]);
    g1.spawn(WRITER);
    wait_until("the writer's first files", Duration::from_secs(60), || {
        synced(&g1) >= 3
    });

    // The initial replica, while the writer runs: file-consistent.
    let mut points = Vec::new();
    let n0 = synced(&g1);
    let j0 = backup(&c, "deb1");
    assert_eq!(j0.kind, JobKind::InitialReplica);
    assert!(log_has(&j0, "frozen by the guest agent"), "{:?}", j0.log);
    points.push((j0.recovery_point.clone().unwrap(), n0, false));

    // An incremental of deb1 and the initial replica of deb2, at the same time.
    let n1 = synced(&g1);
    let both: Vec<JobInfo> = ["deb1", "deb2"]
        .iter()
        .map(|vm| {
            c.admin()
                .post(
                    &format!("/datasources/kvm01/{vm}/backup"),
                    &BackupNowRequest::default(),
                )
                .unwrap()
        })
        .collect();
    let both: Vec<JobInfo> = both.iter().map(|j| c.wait_job(j.id)).collect();
    for j in &both {
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        let rp = j.recovery_point.as_deref().unwrap();
        assert_eq!(point(&c, rp).consistency, Consistency::FileConsistent);
    }
    assert_eq!(both[0].kind, JobKind::Sync);
    assert!(
        both[0].bytes_read < j0.bytes_read / 4,
        "an incremental reads what changed: {} of {}",
        both[0].bytes_read,
        j0.bytes_read
    );
    points.push((both[0].recovery_point.clone().unwrap(), n1, false));
    let deb2_rp = both[1].recovery_point.clone().unwrap();

    // A second incremental, still while the writer runs.
    let n2 = synced(&g1);
    let j2 = backup(&c, "deb1");
    assert_eq!(j2.kind, JobKind::Sync);
    points.push((j2.recovery_point.clone().unwrap(), n2, false));
    for (rp, _, _) in &points {
        assert_eq!(point(&c, rp).consistency, Consistency::FileConsistent);
    }

    // Shut down and started again: the bitmap persisted, the next backup is still an
    // incremental.
    let took = g1.shutdown(Duration::from_secs(180));
    eprintln!("deb1 shut down in {:.1} s", took.as_secs_f64());
    g1.restart();
    g1.wait_agent(boot_deadline(&rig));
    eprintln!("deb1 booted again in {:.1} s", g1.boot_seconds().unwrap());
    g1.spawn(WRITER);
    let before = synced(&g1);
    wait_until("the writer again", Duration::from_secs(60), || {
        synced(&g1) > before + 2
    });
    let n3 = synced(&g1);
    let j3 = backup(&c, "deb1");
    assert_eq!(j3.kind, JobKind::Sync, "{:?}", j3.log);
    assert!(
        j3.bytes_read < j0.bytes_read / 4,
        "after a restart the backup still reads only what changed: {} of {}",
        j3.bytes_read,
        j0.bytes_read
    );
    points.push((j3.recovery_point.clone().unwrap(), n3, false));

    // The guest agent stopped inside the guest: paused instead, crash-consistent.
    g1.spawn("systemctl stop qemu-guest-agent");
    wait_until("the guest agent to stop", Duration::from_secs(60), || {
        let mut q = match qemu::qga::Qga::connect(&g1.qga_socket(), Duration::from_secs(2)) {
            Ok(q) => q,
            Err(_) => return true,
        };
        q.ping(Duration::from_secs(2)).is_err()
    });
    let t = Instant::now();
    let j4 = backup(&c, "deb1");
    eprintln!(
        "backup with the guest agent stopped: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let rp4 = j4.recovery_point.clone().unwrap();
    assert_eq!(point(&c, &rp4).consistency, Consistency::CrashConsistent);
    assert!(log_has(&j4, "VM paused for"), "{:?}", j4.log);
    // The writer synced files up to at least n3 + 1 before this point.
    points.push((rp4.clone(), n3, true));

    // Every point restores clean and holds what was synced before it.
    for (rp, n, crash) in &points {
        check_point(&c, rp, *n, *crash);
    }
    let part = dir.join("deb2-part.img");
    restored_partition(&c, "deb2", &deb2_rp, 0, &part);
    assert_fsck_clean(&part, false);
    std::fs::remove_file(&part).unwrap();

    // The last file-consistent point, recovered as a new qcow2 VM, boots.
    drop(g2);
    let alt = dir.join("alt");
    let j = c.cli_ok(&[
        "recover",
        "kvm01/deb1",
        "--point",
        &points[3].0,
        "--alternate",
        &format!("kvm01:{}", s(&alt)),
        "--format",
        "qcow2",
        "--wait",
        "--json",
    ]);
    let j: JobInfo = serde_json::from_str(&j).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let toml = std::fs::read_to_string(alt.join("deb1/vm.toml")).unwrap();
    let disks: Vec<PathBuf> = toml
        .lines()
        .find(|l| l.starts_with("disks"))
        .unwrap()
        .split('"')
        .skip(1)
        .step_by(2)
        .map(|n| alt.join("deb1").join(n))
        .collect();
    assert_eq!(disks.len(), 2, "{toml}");
    drop(g1);
    let mut rec = Guest::boot(
        &rig,
        &dir.join("rec"),
        &dir.join("rec-sockets"),
        "recovered",
        BootOpts::default()
            .root(&disks[0], "qcow2")
            .data_disk(&disks[1], "qcow2")
            .uuid("5e0c1a7e-0000-4000-8000-00000000b003"),
    );
    rec.wait_agent(boot_deadline(&rig));
    eprintln!(
        "the recovered VM booted to a guest agent in {:.1} s",
        rec.boot_seconds().unwrap()
    );
    let n = points[3].1;
    let got = rec.exec_ok(
        &format!("cat /data/w/f{n} && cat /data2/g{n}"),
        Duration::from_secs(60),
    );
    let mut want = expected("file", n, 16384);
    want.extend(expected("two", n, 8192));
    assert!(got.as_bytes() == want, "the recovered guest's files");
    rec.shutdown(Duration::from_secs(180));
}
