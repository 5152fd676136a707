//! File-system knowledge used by backups, through a real server and agent:
//! - page, hibernation and swap files are found in the view being backed up (NTFS
//!   volumes, Linux swap partitions), left out of the recovery point, recorded in it
//!   and restored as zeros; everything else restores exactly (mkntfs + ntfscp, mkswap);
//! - after each backup the server opens every volume of the stored recovery point and
//!   alerts when one that was readable no longer is (mke2fs).

mod common;

use common::cluster::*;
use common::*;
use protocol::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn tool(cmd: &mut Command, what: &str) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run ({e}); .ci installs it"));
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// GPT disk: p1 NTFS (32 MiB, pagefile.sys of 8 MiB + a document), p2 swap (8 MiB).
fn make_disk(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let ntfs = dir.join("ntfs.img");
    std::fs::File::create(&ntfs)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    tool(
        Command::new("mkntfs")
            .args([
                "-q", "-F", "-Q", "-s", "512", "-p", "2048", "-H", "255", "-S", "63",
            ])
            .arg(&ntfs),
        "mkntfs",
    );
    let page = dir.join("pagefile.sys");
    std::fs::write(&page, b"PAGEFILE".repeat((8 * MIB / 8) as usize)).unwrap();
    let doc = dir.join("doc.txt");
    std::fs::write(&doc, b"keep me\n".repeat(5000)).unwrap();
    for (src, to) in [(&page, "/pagefile.sys"), (&doc, "/doc.txt")] {
        tool(
            Command::new("ntfscp").arg("-q").arg(&ntfs).arg(src).arg(to),
            "ntfscp",
        );
    }
    let swap = dir.join("swap.img");
    std::fs::File::create(&swap)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    tool(
        Command::new("mkswap").arg("-L").arg("SWAPPY").arg(&swap),
        "mkswap",
    );

    let raw = dir.join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(44 * MIB)
        .unwrap();
    let mut sf = Command::new("sfdisk");
    sf.arg("-q").arg(&raw).stdin(std::process::Stdio::piped());
    let mut child = sf.spawn().expect("sfdisk: cannot run; .ci installs fdisk");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"label: gpt\nstart=2048, size=65536, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n\
              start=67584, size=16384, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n",
        )
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut img = std::fs::read(&raw).unwrap();
    let n = std::fs::read(&ntfs).unwrap();
    img[MIB as usize..MIB as usize + n.len()].copy_from_slice(&n);
    let sw = std::fs::read(&swap).unwrap();
    let at = 67584 * 512;
    img[at..at + sw.len()].copy_from_slice(&sw);
    std::fs::write(&raw, &img).unwrap();
    (raw, img)
}

#[test]
fn page_and_swap_files_are_left_out_and_restored_as_zeros() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    std::fs::create_dir_all(vms.join("win")).unwrap();
    let (raw, img) = make_disk(t.path());
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&vms.join("win/win-disk0.qcow2")),
    ]);

    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.cli_ok(&[
        "pg",
        "create",
        "pg",
        "--member",
        "hv01/win",
        "--retention-days",
        "7",
        "--sync-frequency",
        "1440",
        "--recovery-point-times",
        "20:00",
    ]);
    let mut job = None;
    wait_until("the initial replica", Duration::from_secs(60), || {
        job = c
            .jobs()
            .into_iter()
            .find(|j| j.kind == JobKind::InitialReplica && j.state == JobState::Succeeded);
        job.is_some()
    });
    let job = c.job(job.unwrap().id);
    let log: Vec<&str> = job.log.iter().map(|l| l.message.as_str()).collect();
    assert!(
        log.iter()
            .any(|l| l.contains("/pagefile.sys") && l.contains("left out")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("Linux swap")), "{log:#?}");

    // The recovery point records what was left out: the page file (8 MiB, whole
    // clusters) and the swap partition after its kept header.
    let pts = json(&["recovery-points", "-d", s(&c.datastore()), "--json"]);
    let point = pts[0]["id"].as_str().unwrap().to_string();
    let excluded: Vec<(u64, u64)> =
        serde_json::from_value(pts[0]["disks"][0]["excluded"].clone()).unwrap();
    let swap_start = 67584 * 512u64;
    let swap_kept = 64 << 10;
    assert!(
        excluded.contains(&(swap_start + swap_kept, 8 * MIB - swap_kept)),
        "{excluded:?}"
    );
    let total: u64 = excluded.iter().map(|r| r.1).sum();
    assert_eq!(total, 8 * MIB + 8 * MIB - swap_kept, "{excluded:?}");
    let inside = |i: u64| excluded.iter().any(|&(o, l)| i >= o && i < o + l);

    let out = t.path().join("restored.raw");
    restore_raw(&c.datastore(), "hv01/win", &point, &out);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), img.len());
    // Excluded ranges are zeros; every other byte is exactly the source's.
    for (i, (a, b)) in img.iter().zip(&got).enumerate() {
        if inside(i as u64) {
            assert_eq!(*b, 0, "excluded byte {i} is not zero");
        } else {
            assert_eq!(a, b, "byte {i} differs");
        }
    }
    assert!(
        img.windows(8).any(|w| w == b"PAGEFILE"),
        "fixture holds the page file"
    );
    assert!(
        !got.windows(8).any(|w| w == b"PAGEFILE"),
        "the page file's content was backed up"
    );
}

fn point_volumes(c: &Cluster, vm: &str) -> Vec<VolumeCheck> {
    let pts: Vec<RecoveryPointInfo> =
        serde_json::from_str(&c.cli_ok(&["recovery-points", "list", "--vm", vm, "--json"]))
            .unwrap();
    pts.last()
        .unwrap()
        .volumes
        .clone()
        .expect("volumes checked")
}

#[test]
fn a_file_system_that_becomes_unreadable_raises_an_alert_until_it_heals() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    std::fs::create_dir_all(vms.join("lin")).unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    let ext = t.path().join("ext.img");
    tool(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&src)
            .arg(&ext)
            .arg("16M"),
        "mke2fs",
    );
    let good = std::fs::read(&ext).unwrap();
    let disk = vms.join("lin/lin-disk0.raw");
    std::fs::write(&disk, &good).unwrap();

    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.cli_ok(&[
        "pg",
        "create",
        "pg",
        "--member",
        "hv01/lin",
        "--retention-days",
        "7",
        "--sync-frequency",
        "1440",
        "--recovery-point-times",
        "20:00",
    ]);
    wait_until("the initial replica", Duration::from_secs(60), || {
        c.jobs()
            .iter()
            .any(|j| j.kind == JobKind::InitialReplica && j.state == JobState::Succeeded)
    });
    let v = point_volumes(&c, "hv01/lin");
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].readable && v[0].fs == "ext4" && v[0].partition == 0,
        "{v:?}"
    );
    assert_eq!(v[0].root_entries, 2, "etc and lost+found: {v:?}");

    // The superblock is wiped: the backup succeeds, but it must not look healthy.
    let mut bad = good.clone();
    bad[1024..2048].fill(0);
    std::fs::write(&disk, &bad).unwrap();
    c.cli_ok(&["backup-now", "hv01/lin", "--wait"]);
    let v = point_volumes(&c, "hv01/lin");
    assert!(!v[0].readable && v[0].problem.is_some(), "{v:?}");
    let alerts = c.alerts();
    let a = alerts
        .iter()
        .find(|a| a.kind == "filesystem-unreadable" && a.subject == "hv01/lin")
        .unwrap_or_else(|| panic!("{alerts:?}"));
    assert_eq!(a.severity, Severity::Warning);
    assert!(a.message.contains("had a readable ext4"), "{}", a.message);

    // Repaired: the next backup resolves the alert.
    std::fs::write(&disk, &good).unwrap();
    c.cli_ok(&["backup-now", "hv01/lin", "--wait"]);
    assert!(point_volumes(&c, "hv01/lin")[0].readable);
    assert!(
        !c.alerts().iter().any(|a| a.kind == "filesystem-unreadable"),
        "{:?}",
        c.alerts()
    );
}
