//! Partition tables and file systems made by the real tools (sfdisk, sgdisk, mke2fs,
//! mkfs.fat, mkntfs, mkswap, qemu-img), compared with what `sfdisk --json` reports.
//! A missing tool fails the test with an install hint (see scripts/install-deps).

use fsview::{Error, FsKind, PartKind, PartitionTable, TableKind, probe, read_partitions};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod support;
use support::{MIB, blank};

/// Runs a tool (see [`support::run`]). Returns stdout.
fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> String {
    support::run(tool, args, stdin.map(str::as_bytes), &[])
}

/// Makes a file system of `size` bytes with `mk` (given the file path) in a file of its
/// own, then copies it into `disk` at `offset`.
fn put_fs(dir: &Path, disk: &Path, offset: u64, size: u64, mk: &[&str]) {
    let fs = dir.join("fs.tmp");
    blank(&fs, size);
    let mut args: Vec<&str> = mk[1..].to_vec();
    let fs_s = fs.to_str().unwrap();
    args.push(fs_s);
    run(mk[0], &args, None);
    let data = std::fs::read(&fs).unwrap();
    let f = OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(&data, offset).unwrap();
    std::fs::remove_file(&fs).unwrap();
}

fn open(path: &Path) -> Box<dyn vdisk::VirtualDisk> {
    vdisk::open(path).unwrap()
}

/// One partition as sfdisk reports it, in bytes.
#[derive(Debug)]
struct Expected {
    number: u32,
    start: u64,
    size: u64,
    ptype: String,
    bootable: bool,
    name: Option<String>,
}

fn sfdisk_json(path: &Path) -> (serde_json::Value, Vec<Expected>) {
    let out = run("sfdisk", &["--json", path.to_str().unwrap()], None);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pt = v["partitiontable"].clone();
    let ss = pt["sectorsize"].as_u64().unwrap_or(512);
    let parts = pt["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let digits = node.len() - node.chars().rev().take_while(char::is_ascii_digit).count();
            Expected {
                number: node[digits..].parse().unwrap(),
                start: p["start"].as_u64().unwrap() * ss,
                size: p["size"].as_u64().unwrap() * ss,
                ptype: p["type"].as_str().unwrap().to_lowercase(),
                bootable: p["bootable"].as_bool().unwrap_or(false)
                    || p["attrs"]
                        .as_str()
                        .is_some_and(|a| a.contains("LegacyBIOSBootable")),
                name: p["name"].as_str().map(str::to_string),
            }
        })
        .collect();
    (pt, parts)
}

fn assert_matches_sfdisk(t: &PartitionTable, path: &Path) {
    let (pt, want) = sfdisk_json(path);
    assert_eq!(t.partitions.len(), want.len(), "{t:#?} vs {want:#?}");
    for (p, w) in t.partitions.iter().zip(&want) {
        assert_eq!(p.number, w.number, "{p:?} vs {w:?}");
        assert_eq!(p.start, w.start, "{p:?} vs {w:?}");
        assert_eq!(p.length, w.size, "{p:?} vs {w:?}");
        assert_eq!(p.bootable, w.bootable, "{p:?} vs {w:?}");
        match &p.kind {
            PartKind::Mbr(t) => {
                assert_eq!(format!("{t:x}"), w.ptype, "{p:?} vs {w:?}");
                assert_eq!(p.name, None);
            }
            PartKind::Gpt { type_guid, .. } => {
                assert_eq!(type_guid, &w.ptype, "{p:?} vs {w:?}");
                assert_eq!(
                    p.name.as_deref().unwrap_or(""),
                    w.name.as_deref().unwrap_or("")
                );
            }
        }
    }
    match t.kind {
        TableKind::Mbr => assert_eq!(pt["label"], "dos"),
        TableKind::Gpt => {
            assert_eq!(pt["label"], "gpt");
            assert_eq!(
                t.disk_guid.as_deref().unwrap(),
                pt["id"].as_str().unwrap().to_lowercase()
            );
        }
        TableKind::None => panic!("no table found but sfdisk sees one"),
    }
}

fn probes(disk: &dyn vdisk::VirtualDisk, t: &PartitionTable) -> Vec<(u32, FsKind)> {
    t.partitions
        .iter()
        .map(|p| (p.number, probe(disk, p.start, p.length).unwrap()))
        .collect()
}

fn qcow2_of(raw: &Path) -> PathBuf {
    let q = raw.with_extension("qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
        None,
    );
    q
}

#[test]
fn mbr_with_extended_and_logicals() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    blank(&img, 96 * MIB);
    run(
        "sfdisk",
        &["-q", img.to_str().unwrap()],
        Some("label: dos\n,16M,83,*\n,40M,c\n,,5\n,8M,83\n,8M,82\n"),
    );
    let disk = open(&img);
    let t = read_partitions(disk.as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::Mbr);
    assert_eq!(t.disk_guid, None);
    assert!(t.notes.is_empty(), "{:?}", t.notes);
    assert_matches_sfdisk(&t, &img);
    let numbers: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 6]);

    let at = |n: u32| t.partitions.iter().find(|p| p.number == n).unwrap().clone();
    let (p1, p2, p5, p6) = (at(1), at(2), at(5), at(6));
    put_fs(
        dir.path(),
        &img,
        p1.start,
        p1.length,
        &["mke2fs", "-q", "-F", "-t", "ext4"],
    );
    put_fs(
        dir.path(),
        &img,
        p2.start,
        p2.length,
        &["mkfs.fat", "-F", "32", "-s", "1"],
    );
    put_fs(
        dir.path(),
        &img,
        p5.start,
        p5.length,
        &["mke2fs", "-q", "-F", "-t", "ext2"],
    );
    put_fs(dir.path(), &img, p6.start, p6.length, &["mkswap"]);
    let disk = open(&img);
    let want = vec![
        (1, FsKind::Ext { version: 4 }),
        (2, FsKind::Fat { bits: 32 }),
        (3, FsKind::Unknown),
        (5, FsKind::Ext { version: 2 }),
        (6, FsKind::LinuxSwap),
    ];
    assert_eq!(probes(disk.as_ref(), &t), want);
    // The file systems did not disturb the table.
    assert_eq!(read_partitions(disk.as_ref()).unwrap(), t);

    // The same disk as qcow2 reads the same.
    let q = open(&qcow2_of(&img));
    assert_eq!(read_partitions(q.as_ref()).unwrap(), t);
    assert_eq!(probes(q.as_ref(), &t), want);
}

#[test]
fn mbr_fat12_fat16_ntfs_ext3() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    blank(&img, 48 * MIB);
    run(
        "sfdisk",
        &["-q", img.to_str().unwrap()],
        Some("label: dos\n,4M,1\n,16M,6\n,16M,7,*\n,,83\n"),
    );
    let t = read_partitions(open(&img).as_ref()).unwrap();
    assert_matches_sfdisk(&t, &img);
    let p = &t.partitions;
    put_fs(
        dir.path(),
        &img,
        p[0].start,
        p[0].length,
        &["mkfs.fat", "-F", "12"],
    );
    put_fs(
        dir.path(),
        &img,
        p[1].start,
        p[1].length,
        &["mkfs.fat", "-F", "16"],
    );
    put_fs(
        dir.path(),
        &img,
        p[2].start,
        p[2].length,
        &["mkntfs", "-q", "-F", "-Q"],
    );
    put_fs(
        dir.path(),
        &img,
        p[3].start,
        p[3].length,
        &["mke2fs", "-q", "-F", "-t", "ext3"],
    );
    let disk = open(&img);
    assert_eq!(read_partitions(disk.as_ref()).unwrap(), t);
    assert_eq!(
        probes(disk.as_ref(), &t),
        vec![
            (1, FsKind::Fat { bits: 12 }),
            (2, FsKind::Fat { bits: 16 }),
            (3, FsKind::Ntfs),
            (4, FsKind::Ext { version: 3 }),
        ]
    );
    assert!(FsKind::Ntfs.supported() && FsKind::Ext { version: 3 }.supported());
}

fn make_gpt(dir: &Path) -> PathBuf {
    let img = dir.join("gpt.img");
    blank(&img, 64 * MIB);
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+16M",
            "-t",
            "1:ef00",
            "-c",
            "1:EFI system partition",
            "-n",
            "2:0:+16M",
            "-t",
            "2:0700",
            "-c",
            "2:Données",
            "-A",
            "2:set:2",
            "-n",
            "3:0:+16M",
            "-t",
            "3:8300",
            "-c",
            "3:root",
            "-n",
            "5:0:+8M",
            "-t",
            "5:8200",
            img.to_str().unwrap(),
        ],
        None,
    );
    img
}

#[test]
fn gpt_matches_sfdisk_and_probes() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_gpt(dir.path());
    let t = read_partitions(open(&img).as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::Gpt);
    assert!(t.notes.is_empty(), "{:?}", t.notes);
    assert_matches_sfdisk(&t, &img);
    let numbers: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3, 5], "entry 4 is empty and skipped");
    let descs: Vec<&str> = t
        .partitions
        .iter()
        .map(|p| match &p.kind {
            PartKind::Gpt { description, .. } => *description,
            PartKind::Mbr(_) => panic!("MBR kind in a GPT"),
        })
        .collect();
    assert_eq!(
        descs,
        [
            "EFI system",
            "Microsoft basic data",
            "Linux filesystem",
            "Linux swap"
        ]
    );
    assert_eq!(t.partitions[1].name.as_deref(), Some("Données"));
    assert!(t.partitions[1].bootable && !t.partitions[0].bootable);

    let p = &t.partitions;
    put_fs(
        dir.path(),
        &img,
        p[0].start,
        p[0].length,
        &["mkfs.fat", "-F", "16"],
    );
    put_fs(
        dir.path(),
        &img,
        p[1].start,
        p[1].length,
        &["mkntfs", "-q", "-F", "-Q"],
    );
    put_fs(
        dir.path(),
        &img,
        p[2].start,
        p[2].length,
        &["mke2fs", "-q", "-F", "-t", "ext4"],
    );
    put_fs(dir.path(), &img, p[3].start, p[3].length, &["mkswap"]);
    let want = vec![
        (1, FsKind::Fat { bits: 16 }),
        (2, FsKind::Ntfs),
        (3, FsKind::Ext { version: 4 }),
        (5, FsKind::LinuxSwap),
    ];
    let disk = open(&img);
    assert_eq!(probes(disk.as_ref(), &t), want);
    let q = open(&qcow2_of(&img));
    assert_eq!(read_partitions(q.as_ref()).unwrap(), t);
    assert_eq!(probes(q.as_ref(), &t), want);
}

fn flip(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5A;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn gpt_damaged_primary_falls_back_to_backup() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_gpt(dir.path());
    let good = read_partitions(open(&img).as_ref()).unwrap();

    // Header field (first usable LBA): header CRC fails.
    flip(&img, 512 + 40);
    let t = read_partitions(open(&img).as_ref()).unwrap();
    assert_eq!(t.partitions, good.partitions);
    assert_eq!(t.disk_guid, good.disk_guid);
    assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
    assert!(
        t.notes[0].contains("backup") && t.notes[0].contains("header CRC32"),
        "{:?}",
        t.notes
    );
    flip(&img, 512 + 40);

    // Entries array: its CRC fails.
    flip(&img, 1024 + 56);
    let t = read_partitions(open(&img).as_ref()).unwrap();
    assert_eq!(t.partitions, good.partitions);
    assert!(t.notes[0].contains("entries-array CRC32"), "{:?}", t.notes);

    // Both copies damaged: refused.
    let len = std::fs::metadata(&img).unwrap().len();
    flip(&img, len - 512 + 40);
    match read_partitions(open(&img).as_ref()) {
        Err(Error::Corrupt { what, detail, .. }) => {
            assert_eq!(what, "GPT");
            assert!(detail.contains("backup"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn truncated_disks() {
    let dir = tempfile::tempdir().unwrap();
    // GPT without its backup (the last MiB is free space): the primary suffices.
    let img = make_gpt(dir.path());
    let good = read_partitions(open(&img).as_ref()).unwrap();
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(63 * MIB)
        .unwrap();
    assert_eq!(read_partitions(open(&img).as_ref()).unwrap(), good);
    // ... and cut into partition 5: clipped, with a note.
    let p5 = good.partitions[3].clone();
    let cut = p5.start + MIB;
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let t = read_partitions(open(&img).as_ref()).unwrap();
    assert_eq!(t.partitions[..3], good.partitions[..3]);
    assert_eq!(t.partitions[3].length, MIB);
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("GPT entry 5") && n.contains("clipped"))
    );
    // Cut before partition 5 starts: that entry is corrupt.
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(p5.start)
        .unwrap();
    match read_partitions(open(&img).as_ref()) {
        Err(Error::Corrupt { what, .. }) => assert_eq!(what, "GPT entry 5"),
        other => panic!("expected Corrupt, got {other:?}"),
    }

    // MBR cut just after the first EBR: its logical partition starts past the end.
    let img = dir.path().join("mbr.img");
    blank(&img, 32 * MIB);
    run(
        "sfdisk",
        &["-q", img.to_str().unwrap()],
        Some("label: dos\n,8M,83\n,,5\n,4M,83\n"),
    );
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(9 * MIB + 512)
        .unwrap();
    match read_partitions(open(&img).as_ref()) {
        Err(Error::Corrupt { what, .. }) => {
            assert_eq!(what, "logical partition 5 (EBR at 0x900000)")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Less than a sector: no table.
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(300)
        .unwrap();
    let t = read_partitions(open(&img).as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::None);
    assert!(t.partitions.is_empty());
    assert_eq!(probe(open(&img).as_ref(), 0, 300).unwrap(), FsKind::Unknown);
}

#[test]
fn whole_disk_file_systems_have_no_table() {
    let dir = tempfile::tempdir().unwrap();
    for (mk, want) in [
        (
            &["mke2fs", "-q", "-F", "-t", "ext4"][..],
            FsKind::Ext { version: 4 },
        ),
        (&["mkfs.fat", "-F", "16"][..], FsKind::Fat { bits: 16 }),
        (&["mkntfs", "-q", "-F", "-Q"][..], FsKind::Ntfs),
    ] {
        let img = dir.path().join("whole.img");
        blank(&img, 24 * MIB);
        put_fs(dir.path(), &img, 0, 24 * MIB, mk);
        let disk = open(&img);
        let t = read_partitions(disk.as_ref()).unwrap();
        assert_eq!(t.kind, TableKind::None, "{mk:?}: {t:?}");
        assert!(t.partitions.is_empty());
        assert_eq!(probe(disk.as_ref(), 0, disk.virtual_size()).unwrap(), want);
    }
}
