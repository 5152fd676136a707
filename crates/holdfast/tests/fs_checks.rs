//! File-system knowledge used by backups, through a real server and agent:
//! - page, hibernation and swap files are found in the view being backed up (NTFS
//!   volumes, Linux swap partitions), left out of the recovery point, recorded in it
//!   and restored as zeros; everything else restores exactly (mkntfs + ntfscp, mkswap);
//! - after each backup the server opens every volume of the stored recovery point and
//!   alerts when one that was readable no longer is (mke2fs).

mod common;
#[path = "../../fsview/tests/support/mod.rs"]
mod support;

use common::cluster::*;
use common::*;
use protocol::*;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// GPT disk: p1 NTFS (32 MiB, pagefile.sys of 8 MiB + a document), p2 swap (8 MiB).
/// Returns the raw disk, its bytes and the swap partition's start.
fn make_disk(dir: &Path) -> (std::path::PathBuf, Vec<u8>, u64) {
    let ntfs = dir.join("ntfs.img");
    support::mkntfs(&ntfs, 32 * MIB, "WIN");
    let page = dir.join("pagefile.sys");
    std::fs::write(&page, b"PAGEFILE".repeat((8 * MIB / 8) as usize)).unwrap();
    let doc = dir.join("doc.txt");
    std::fs::write(&doc, b"keep me\n".repeat(5000)).unwrap();
    for (src, to) in [(&page, "/pagefile.sys"), (&doc, "/doc.txt")] {
        support::run("ntfscp", &["-q", s(&ntfs), s(src), to], None, &[]);
    }
    let swap = dir.join("swap.img");
    support::blank(&swap, 8 * MIB);
    support::run("mkswap", &["-L", "SWAPPY", s(&swap)], None, &[]);
    let raw = dir.join("disk.raw");
    let starts = support::partitioned_disk(
        &raw,
        true,
        &[
            (&ntfs, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
            (&swap, "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
        ],
    );
    let img = std::fs::read(&raw).unwrap();
    (raw, img, starts[1])
}

#[test]
fn page_and_swap_files_are_left_out_and_restored_as_zeros() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    std::fs::create_dir_all(vms.join("win")).unwrap();
    let (raw, img, swap_start) = make_disk(t.path());
    support::convert(&raw, "qcow2", &vms.join("win/win-disk0.qcow2"));

    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("pg", &["hv01/win"]);
    let job = c
        .jobs()
        .into_iter()
        .find(|j| j.kind == JobKind::InitialReplica)
        .unwrap();
    let job = c.job(job.id);
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
    support::mke2fs(&ext, "ext4", 16, "LIN", &src, None);
    let good = std::fs::read(&ext).unwrap();
    let disk = vms.join("lin/lin-disk0.raw");
    std::fs::write(&disk, &good).unwrap();

    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("pg", &["hv01/lin"]);
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
