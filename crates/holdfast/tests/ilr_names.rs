//! Item-level recovery with real names, on real volumes (mkfs.fat + mcopy, mke2fs -d)
//! protected by a server and an agent, through all three paths: `ilr get` through the
//! server, straight from the datastore (`-d`), and into a folder on the agent's host
//! (`--to-folder hv01:DIR`, a recovery job).
//!
//! - Items that share a name all land (` (2)`), and two jobs of the same second into
//!   one folder each get their own `holdfast_*` folder.
//! - Names match as the file system does (without case on FAT, exactly on ext4), and
//!   the copy takes the stored name.
//! - A FAT volume patched with a directory loop, a name holding `/` and one holding a
//!   bidirectional override, and two 255-byte ext4 names that differ only in case: the
//!   copy completes, leaves out or renames what it must, and says so.

mod common;
#[path = "../../fsview/tests/support/mod.rs"]
mod support;

use common::cluster::*;
use common::{fails, s};
use std::path::{Path, PathBuf};

/// The FAT partition's (1) tree and the ext4 partition's (2) tree.
fn sources(w: &Path) -> (PathBuf, PathBuf) {
    let fat = w.join("src-fat");
    for (rel, data) in [
        ("Report.txt", "quarterly\n"),
        ("top/a.txt", "a\n"),
        ("top/sub/b.txt", "b\n"),
        ("top/sub/loopdir/c.txt", "c\n"),
        ("wXw hostile.txt", "slash\n"),
        ("bXb bidi.txt", "bidi\n"),
        ("z-last.txt", "last\n"),
    ] {
        let p = fat.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let ext = w.join("src-ext");
    for (rel, data) in [
        ("doc/libc-bin/copyright", "libc\n".to_string()),
        ("doc/bash/copyright", "bash\n".to_string()),
        ("other.txt", "other\n".to_string()),
        (&format!("long/{}", long_name()), "mixed\n".to_string()),
        (
            &format!("long/{}", long_name().to_lowercase()),
            "lower\n".to_string(),
        ),
    ] {
        let p = ext.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    (fat, ext)
}

/// 255 bytes, mixed case.
fn long_name() -> String {
    format!("{}c", "Ab".repeat(127))
}

/// Where `pat` is in `img`: exactly once, or the test's fixture is not what it thinks.
fn find_once(img: &[u8], pat: &[u8]) -> usize {
    let hits: Vec<usize> = img
        .windows(pat.len())
        .enumerate()
        .filter(|(_, w)| *w == pat)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{:?} found at {hits:?}",
        String::from_utf8_lossy(pat)
    );
    hits[0]
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Patches the FAT16 image as a damaged or crafted volume would be: `/top/sub/loopdir`
/// points at `/top`'s cluster (a directory loop), `wXw hostile.txt`'s long name holds
/// `/`, `bXb bidi.txt`'s holds U+202E (RIGHT-TO-LEFT OVERRIDE). Only long-name
/// characters and a first-cluster field change, so every checksum still holds.
fn craft_fat(img: &Path) {
    let mut b = std::fs::read(img).unwrap();
    let top = find_once(&b, b"TOP        ");
    assert_eq!(b[top + 11] & 0x10, 0x10, "TOP is a folder");
    let top_cluster = [b[top + 26], b[top + 27]];
    let lp = find_once(&b, b"LOOPDIR    ");
    assert_eq!(b[lp + 11] & 0x10, 0x10, "LOOPDIR is a folder");
    b[lp + 26..lp + 28].copy_from_slice(&top_cluster);
    let h = find_once(&b, &utf16("wXw h"));
    b[h + 2..h + 4].copy_from_slice(&utf16("/"));
    let d = find_once(&b, &utf16("bXb b"));
    b[d + 2..d + 4].copy_from_slice(&utf16("\u{202e}"));
    std::fs::write(img, b).unwrap();
}

/// A cluster whose agent `hv01` protects VM `names`: one qcow2 disk, partition 1 the
/// crafted FAT16, partition 2 the ext4; its initial replica taken.
fn cluster(t: &Path) -> (Cluster, PathBuf) {
    let w = t.join("work");
    std::fs::create_dir_all(&w).unwrap();
    let (fat_src, ext_src) = sources(&w);
    let fat = w.join("fat.img");
    support::mkfat(&fat, 16, 32, "NAMES", &fat_src);
    craft_fat(&fat);
    let ext = w.join("ext.img");
    support::mke2fs(&ext, "ext4", 16, "NAMES", &ext_src, None);
    let raw = w.join("names.raw");
    support::partitioned_disk(&raw, false, &[(&fat, "e"), (&ext, "83")]);
    let vms = t.join("vms");
    support::convert(&raw, "qcow2", &vms.join("names/names.qcow2"));
    let mut c = Cluster::start(t, FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("names", &["hv01/names"]);
    let ds = c.datastore();
    (c, ds)
}

/// `ilr get hv01/names ARGS --to-folder DIR` through the server (`ds` None) or from
/// the datastore; returns what it printed on stderr.
fn get_local(c: &Cluster, ds: Option<&Path>, dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["ilr", "get", "hv01/names"];
    if let Some(ds) = ds {
        all.extend(["-d", s(ds)]);
    }
    all.extend_from_slice(args);
    all.extend(["--to-folder", s(dir)]);
    let o = c.cli(&all);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "holdfast {all:?}: {err}");
    err
}

/// `ilr get hv01/names ARGS --to-folder hv01:DIR`: the new folder the job made in DIR
/// (which must hold nothing else) and the job log the command printed.
fn get_agent(c: &Cluster, dir: &Path, args: &[&str]) -> (PathBuf, String) {
    let target = format!("hv01:{}", s(dir));
    let mut all = vec!["ilr", "get", "hv01/names"];
    all.extend_from_slice(args);
    all.extend(["--to-folder", &target]);
    let o = c.cli(&all);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "holdfast {all:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let folders: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
    (folders[0].clone(), out)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every file and folder under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn add(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if p.symlink_metadata().unwrap().is_dir() {
                add(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    add(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn items_that_share_a_name_and_jobs_of_one_second_all_land() {
    let t = tempfile::tempdir().unwrap();
    let (c, ds) = cluster(t.path());
    let out = t.path().join("out");
    let items = [
        "--partition",
        "2",
        "/doc/libc-bin/copyright",
        "/doc/bash/copyright",
    ];
    let said = r#""/doc/bash/copyright" saved as "copyright (2)" (another item has the same name"#;
    // Through the server, and from the datastore.
    for (dir, ds) in [(out.join("server"), None), (out.join("local"), Some(&*ds))] {
        let err = get_local(&c, ds, &dir, &items);
        assert_eq!(read(&dir.join("copyright")), "libc\n");
        assert_eq!(read(&dir.join("copyright (2)")), "bash\n");
        assert!(err.contains(said), "{err}");
    }
    // Into a folder on the agent's host.
    let (folder, log) = get_agent(&c, &out.join("agent"), &items);
    assert_eq!(read(&folder.join("copyright")), "libc\n");
    assert_eq!(read(&folder.join("copyright (2)")), "bash\n");
    assert!(log.contains(said), "{log}");

    // Two jobs at once into one folder: each gets its own holdfast_* folder.
    let both = out.join("both");
    let target = format!("hv01:{}", s(&both));
    let args = [
        "ilr",
        "get",
        "hv01/names",
        "--partition",
        "2",
        "/doc",
        "--to-folder",
        &target,
    ];
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| c.cli(&args));
        let b = sc.spawn(|| c.cli(&args));
        (a.join().unwrap(), b.join().unwrap())
    });
    for o in [&a, &b] {
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut folders: Vec<PathBuf> = std::fs::read_dir(&both)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    folders.sort();
    assert_eq!(folders.len(), 2, "{folders:?}");
    for f in &folders {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("holdfast_") && name.contains("_job"),
            "{name}"
        );
        assert_eq!(
            tree(f),
            [
                "doc",
                "doc/bash",
                "doc/bash/copyright",
                "doc/libc-bin",
                "doc/libc-bin/copyright"
            ]
        );
    }
}

#[test]
fn names_match_as_the_file_system_does_and_copies_take_the_stored_name() {
    let t = tempfile::tempdir().unwrap();
    let (c, ds) = cluster(t.path());
    let out = t.path().join("out");
    let fat = ["--partition", "1", "/REPORT.TXT", "/TOP/A.TXT"];
    // `ilr ls` finds them on FAT whatever the case, and shows the stored names.
    let v: serde_json::Value = serde_json::from_str(&c.cli_ok(&[
        "ilr",
        "ls",
        "hv01/names",
        "--partition",
        "1",
        "/REPORT.TXT",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["entries"][0]["name"], "Report.txt", "{v:#}");
    // `ilr get` the same, by every path, into the stored names.
    for (dir, ds) in [(out.join("server"), None), (out.join("local"), Some(&*ds))] {
        get_local(&c, ds, &dir, &fat);
        assert_eq!(tree(&dir), ["Report.txt", "a.txt"], "{}", dir.display());
        assert_eq!(read(&dir.join("Report.txt")), "quarterly\n");
    }
    let (folder, _) = get_agent(&c, &out.join("agent"), &fat);
    assert_eq!(tree(&folder), ["Report.txt", "a.txt"]);
    // ext4 names are exact: the other case is not there, by any path.
    let ext = ["--partition", "2", "/OTHER.TXT"];
    let err = fails(
        1,
        &[
            &["ilr", "get", "hv01/names", "-d", s(&ds)][..],
            &ext,
            &["--to-folder", s(&out.join("x"))],
        ]
        .concat(),
    );
    assert!(err.contains("/OTHER.TXT"), "{err}");
    let o = c.cli(
        &[
            &["ilr", "get", "hv01/names"][..],
            &ext,
            &["--to-folder", s(&out.join("y"))],
        ]
        .concat(),
    );
    assert_eq!(o.status.code(), Some(1));
    let o = c.cli(&["ilr", "ls", "hv01/names", "--partition", "2", "/OTHER.TXT"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!out.join("x").exists() && !out.join("y").exists());
    get_local(
        &c,
        None,
        &out.join("z"),
        &["--partition", "2", "/other.txt"],
    );
    assert_eq!(read(&out.join("z/other.txt")), "other\n");
}

#[test]
fn hostile_names_loops_and_long_names_never_stop_a_copy() {
    let t = tempfile::tempdir().unwrap();
    let (c, ds) = cluster(t.path());
    let out = t.path().join("out");

    // A bidirectional override is shown escaped, never raw.
    let ls = c.cli_ok(&["ilr", "ls", "hv01/names", "--partition", "1", "/"]);
    assert!(ls.contains("b\\u{202e}b bidi.txt"), "{ls}");
    assert!(!ls.contains('\u{202e}'), "{ls}");

    // The whole FAT volume, by every path: the loop and the name holding `/` are left
    // out and reported, the override becomes `_`, everything else is there.
    let want = [
        "Report.txt",
        "b_b bidi.txt",
        "top",
        "top/a.txt",
        "top/sub",
        "top/sub/b.txt",
        "z-last.txt",
    ];
    let said = [
        r#""/top/sub/loopdir" skipped: a loop in the directory tree: it is "/top" again"#,
        r#""/w/w hostile.txt" skipped: its name holds `/`"#,
        r#""/b\u{202e}b bidi.txt" saved as "b_b bidi.txt" (holds control or invisible characters)"#,
    ];
    let root = ["--partition", "1", "/"];
    for (dir, ds) in [(out.join("server"), None), (out.join("local"), Some(&*ds))] {
        let err = get_local(&c, ds, &dir, &root);
        assert_eq!(tree(&dir), want, "{}", dir.display());
        for l in said {
            assert!(err.contains(l), "{l}\n{err}");
        }
        assert!(!err.contains('\u{202e}'), "{err}");
    }
    let (folder, log) = get_agent(&c, &out.join("agent"), &root);
    assert_eq!(tree(&folder), want);
    for l in said {
        assert!(log.contains(l), "{l}\n{log}");
    }
    assert!(!log.contains('\u{202e}'), "{log}");

    // Two 255-byte names that differ only in case: the second listed gets ` (2)`
    // within 255 bytes, by every path.
    let long = ["--partition", "2", "/long"];
    let (mixed, lower) = (long_name(), long_name().to_lowercase());
    let mut dirs = vec![];
    for (dir, ds) in [
        (out.join("l-server"), None),
        (out.join("l-local"), Some(&*ds)),
    ] {
        get_local(&c, ds, &dir, &long);
        dirs.push(dir.join("long"));
    }
    dirs.push(get_agent(&c, &out.join("l-agent"), &long).0.join("long"));
    for d in dirs {
        let got = tree(&d);
        assert_eq!(got.len(), 2, "{got:?}");
        let mut contents = Vec::new();
        for n in got {
            assert!(n.len() <= 255, "{n}");
            let c = read(&d.join(&n));
            match n.strip_suffix(" (2)") {
                None => assert!(n == mixed || n == lower, "{n}"),
                Some(cut) => assert!(mixed.starts_with(cut) || lower.starts_with(cut), "{n}"),
            }
            let expect = if n.starts_with("Ab") {
                "mixed\n"
            } else {
                "lower\n"
            };
            assert_eq!(c, expect, "{n}");
            contents.push(c);
        }
        contents.sort();
        assert_eq!(contents, ["lower\n", "mixed\n"]);
    }
}
