//! Item-level recovery end to end: three VMs whose disks hold real file systems made by
//! the real tools (NTFS with compressed files and ext4 in a GPT VHDX, FAT32 and an
//! ext4 with hostile names in an MBR qcow2, a whole-disk ext4 in a VHD) are protected by
//! a server and an agent; then `holdfast ilr ls|get` (through the server and straight
//! from the datastore) and the API's single-file download must give back exactly what
//! was written: names (made safe), kinds, sizes, bytes (sha256sum), mtimes, symlinks as
//! links. A missing tool fails the test with the package to install.

mod common;
#[path = "../../fsview/tests/support/mod.rs"]
mod support;

use common::cluster::*;
use common::{fails, hash_file, s};
use protocol::*;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};
use support::MIB;

/// Source mtimes start here (even seconds: FAT keeps 2 s steps), one step per file.
const MTIME: u64 = 1_623_752_430;

/// Writes `data` at `root/rel` (folders made as needed) with mtime `MTIME + 2 * n`.
fn put(root: &Path, rel: &str, data: &[u8], n: u64) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
    set_mtime(&p, MTIME + 2 * n);
}

fn set_mtime(p: &Path, secs: u64) {
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

/// The tree every file system gets: nested folders, a UTF-8 name, an empty file, an
/// empty folder, 3 MiB + 123 of random bytes.
fn base_tree(root: &Path) {
    std::fs::create_dir_all(root.join("emptydir")).unwrap();
    put(root, "top.txt", b"hello from the top\n", 0);
    put(
        root,
        "r\u{e9}sum\u{e9} \u{fc} \u{65e5}\u{672c}.txt",
        "caf\u{e9} cr\u{e8}me\n".as_bytes(),
        1,
    );
    put(root, "empty.bin", b"", 2);
    put(root, "a/b/c/deep.txt", &b"deep ".repeat(1000), 3);
    put(
        root,
        "a/random.bin",
        &support::random_bytes(3 * MIB as usize + 123, 0x9E37_79B9_7F4A_7C15),
        4,
    );
    put(root, "a/b/notes.txt", b"notes\n", 5);
}

/// Hostile names (ext4 allows them): each raw name and the name `ilr get` must give it.
const HOSTILE: [(&str, &str); 5] = [
    ("back\\slash.txt", "back_slash.txt"),
    ("..x", "..x"),
    ("CON", "_CON"),
    ("nul.txt", "_nul.txt"),
    ("new\nline.txt", "new_line.txt"),
];

fn hostile_tree(root: &Path) {
    base_tree(root);
    for (i, (name, _)) in HOSTILE.iter().enumerate() {
        put(
            root,
            name,
            format!("hostile {i}\n").as_bytes(),
            10 + i as u64,
        );
    }
    std::os::unix::fs::symlink("../../../../etc/passwd", root.join("escape")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", root.join("abs")).unwrap();
}

/// The NTFS source: the base tree and a compressed folder (a compressible 1 MiB+ text
/// file, 200 KiB of random bytes).
fn ntfs_tree(root: &Path) -> (Vec<u8>, Vec<u8>) {
    base_tree(root);
    let text: Vec<u8> = b"All work and no play makes Jack a dull boy. 0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize + 4321)
        .collect();
    let random = support::random_bytes(200 << 10, 7);
    put(root, "compressed/text.txt", &text, 20);
    put(root, "compressed/random.bin", &random, 21);
    (text, random)
}

/// Copies `src` into `dst` (folders that exist are reused), keeping file mtimes.
fn copy_tree(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        let m = e.metadata().unwrap();
        if m.is_dir() {
            if !to.exists() {
                std::fs::create_dir(&to).unwrap();
            }
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
            set_mtime(&to, m.mtime() as u64);
        }
    }
}

/// A 64 MiB NTFS image of `src`, through the ntfs-3g mount; `compressed` gets
/// FILE_ATTRIBUTE_COMPRESSED before any file is written into it.
fn ntfs_image(img: &Path, src: &Path, mnt: &Path) {
    support::mkntfs(img, 64 * MIB, "WINDATA");
    let m = support::Mount::new(img, mnt);
    std::fs::create_dir(m.path("compressed")).unwrap();
    support::set_ntfs_compressed(&m.path("compressed"));
    copy_tree(src, &m.path(""));
    m.unmount();
    // Really compressed on disk (attribute flag 0x0001).
    for p in ["/compressed/text.txt", "/compressed/random.bin"] {
        let out = support::run("ntfsinfo", &["-F", p, s(img)], None, &[]);
        let data = out
            .split("Dumping attribute $DATA")
            .nth(1)
            .unwrap_or_else(|| panic!("no $DATA for {p}:\n{out}"));
        assert!(
            data.contains("Attribute flags:\t 0x0001"),
            "{p} not compressed:\n{data}"
        );
    }
}

/// What a folder holds: files (path → full path), folders, links (path → target).
#[derive(Debug, Default)]
struct Tree {
    files: BTreeMap<String, PathBuf>,
    dirs: BTreeSet<String>,
    links: BTreeMap<String, String>,
}

fn scan(root: &Path) -> Tree {
    fn go(root: &Path, dir: &Path, t: &mut Tree) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                t.links.insert(rel, target.to_str().unwrap().to_string());
            } else if m.is_dir() {
                go(root, &p, t);
                t.dirs.insert(rel);
            } else {
                assert!(m.is_file(), "{}: not a regular file", p.display());
                t.files.insert(rel, p);
            }
        }
    }
    let mut t = Tree::default();
    go(root, root, &mut t);
    t
}

/// sha256 of each file, by `sha256sum -z` (NUL-ended lines: names are not escaped).
fn sha256(files: &[&Path]) -> Vec<String> {
    if files.is_empty() {
        return Vec::new();
    }
    let mut args = vec!["-z"];
    args.extend(files.iter().map(|p| s(p)));
    let out = support::run_bytes("sha256sum", &args, None, &[]);
    let sums: Vec<String> = out
        .split(|b| *b == 0)
        .filter(|l| !l.is_empty())
        .map(|l| String::from_utf8(l[..64].to_vec()).unwrap())
        .collect();
    assert_eq!(sums.len(), files.len());
    sums
}

/// The extracted folder `out` against its source `src`: the same folders, files and
/// links under the same names (raw source names mapped by `rename`), each file's sha256
/// and mtime (within `mtime_slack` seconds) the source's, each link's target text.
fn same_tree(
    src: &Path,
    out: &Path,
    rename: &dyn Fn(&str) -> String,
    extra_dirs: &[&str],
    mtime_slack: i64,
) {
    let want = scan(src);
    let got = scan(out);
    let map = |rel: &String| -> String { rel.split('/').map(rename).collect::<Vec<_>>().join("/") };
    let mut want_dirs: BTreeSet<String> = want.dirs.iter().map(map).collect();
    want_dirs.extend(extra_dirs.iter().map(|d| d.to_string()));
    assert_eq!(got.dirs, want_dirs, "folders of {}", out.display());
    let want_links: BTreeMap<String, String> = want
        .links
        .iter()
        .map(|(k, v)| (map(k), v.clone()))
        .collect();
    assert_eq!(got.links, want_links, "links of {}", out.display());
    let pairs: Vec<(&Path, &Path)> = want
        .files
        .iter()
        .map(|(rel, p)| {
            let q = got
                .files
                .get(&map(rel))
                .unwrap_or_else(|| panic!("{rel:?} not extracted into {}", out.display()));
            (p.as_path(), q.as_path())
        })
        .collect();
    assert_eq!(
        got.files.len(),
        want.files.len(),
        "files of {}: {:?}",
        out.display(),
        got.files.keys()
    );
    let a = sha256(&pairs.iter().map(|x| x.0).collect::<Vec<_>>());
    let b = sha256(&pairs.iter().map(|x| x.1).collect::<Vec<_>>());
    for (i, (p, q)) in pairs.iter().enumerate() {
        assert_eq!(a[i], b[i], "sha256 of {} vs {}", q.display(), p.display());
        let (ms, mq) = (
            std::fs::metadata(p).unwrap().mtime(),
            std::fs::metadata(q).unwrap().mtime(),
        );
        assert!(
            (ms - mq).abs() <= mtime_slack,
            "{}: mtime {mq}, source {ms}",
            q.display()
        );
    }
}

/// `ilr get VM [ARGS] PATH --to-folder parent/root`; checks that `parent` then holds
/// only `root`. Returns (root, stderr).
fn get(c: &Cluster, parent: &Path, vm: &str, args: &[&str]) -> (PathBuf, String) {
    std::fs::create_dir_all(parent).unwrap();
    let root = parent.join("root");
    let mut all = vec!["ilr", "get", vm];
    all.extend_from_slice(args);
    all.extend(["--to-folder", s(&root)]);
    let o = c.cli(&all);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "holdfast {all:?}: {}{err}",
        String::from_utf8_lossy(&o.stdout)
    );
    let top: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        top,
        [std::ffi::OsString::from("root")],
        "{}",
        parent.display()
    );
    (root, err)
}

/// The one entry of folder `dir`.
fn only_entry(dir: &Path) -> PathBuf {
    let all: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(all.len(), 1, "{all:?}");
    all.into_iter().next().unwrap()
}

/// `ilr get VM [ARGS] --to-folder hv01:DIR` through the agent; returns the
/// `holdfast_<time>` folder it made in `DIR` and what the command printed.
fn agent_get(c: &Cluster, dir: &Path, vm: &str, args: &[&str]) -> (PathBuf, String) {
    let target = format!("hv01:{}", s(dir));
    let mut all = vec!["ilr", "get", vm];
    all.extend_from_slice(args);
    all.extend(["--to-folder", &target]);
    let o = c.cli(&all);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "holdfast {all:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let folder = only_entry(dir);
    assert!(
        folder
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("holdfast_"),
        "{}",
        folder.display()
    );
    (folder, out)
}

fn ls_json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let out = c.cli_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// The `entries` of an `ilr ls --json` as name → (type, size of files).
fn entries(v: &serde_json::Value) -> BTreeMap<String, (String, u64)> {
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let kind = e["type"].as_str().unwrap().to_string();
            let size = if kind == "file" {
                e["size"].as_u64().unwrap()
            } else {
                0
            };
            (e["name"].as_str().unwrap().to_string(), (kind, size))
        })
        .collect()
}

/// A folder's top level as `entries` would list it.
fn source_root(src: &Path) -> BTreeMap<String, (String, u64)> {
    std::fs::read_dir(src)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let kind = if m.file_type().is_symlink() {
                "symlink"
            } else if m.is_dir() {
                "dir"
            } else {
                "file"
            };
            let size = if kind == "file" { m.len() } else { 0 };
            (
                e.file_name().to_str().unwrap().to_string(),
                (kind.to_string(), size),
            )
        })
        .collect()
}

fn status<T: std::fmt::Debug>(r: client::Result<T>) -> Option<u16> {
    r.expect_err("an error answer").status()
}

#[test]
fn files_come_back_from_ntfs_ext4_and_fat_in_vhdx_qcow2_and_vhd() {
    let t0 = Instant::now();
    let t = tempfile::tempdir().unwrap();
    let w = t.path().join("work");
    std::fs::create_dir_all(&w).unwrap();

    // Sources.
    let base = w.join("src-base");
    base_tree(&base);
    let hostile = w.join("src-hostile");
    hostile_tree(&hostile);
    let ntfs_src = w.join("src-ntfs");
    let (text, random) = ntfs_tree(&ntfs_src);

    // File systems.
    let ntfs = w.join("ntfs.img");
    ntfs_image(&ntfs, &ntfs_src, &w.join("mnt"));
    let ext_base = w.join("ext-base.img");
    support::mke2fs(&ext_base, "ext4", 64, "WINLINUX", &base, None);
    let ext_hostile = w.join("ext-hostile.img");
    support::mke2fs(&ext_hostile, "ext4", 64, "HOSTILE", &hostile, None);
    let fat = w.join("fat.img");
    support::mkfat(&fat, 32, 64, "LINFAT", &base);

    // VMs.
    let vms = t.path().join("vms");
    let raw = w.join("win.raw");
    support::partitioned_disk(
        &raw,
        true,
        &[(&ntfs, support::GPT_BASIC_DATA), (&ext_base, "L")],
    );
    support::convert(&raw, "vhdx", &vms.join("win/Virtual Hard Disks/win.vhdx"));
    let raw = w.join("lin.raw");
    support::partitioned_disk(&raw, false, &[(&fat, "c"), (&ext_hostile, "83")]);
    support::convert(&raw, "qcow2", &vms.join("lin/lin.qcow2"));
    support::convert(&ext_base, "vpc", &vms.join("old/old.vhd"));
    for f in ["win.raw", "lin.raw", "ntfs.img", "fat.img"] {
        std::fs::remove_file(w.join(f)).unwrap();
    }
    let built = t0.elapsed();

    // Protected by a server and an agent.
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(3);
    c.protect_daily("ilr", &["hv01/win", "hv01/lin", "hv01/old"]);
    let protected = t0.elapsed();

    // The GPT disk's volumes.
    let v = ls_json(&c, &["ilr", "ls", "hv01/win", "--json"]);
    let vols: Vec<(&str, &str, &str)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["type"].as_str().unwrap(),
                e["fs"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        vols,
        [("1", "partition", "ntfs"), ("2", "partition", "ext4")],
        "{v:#}"
    );
    assert_eq!(v["entries"][0]["start"], MIB);
    assert_eq!(v["entries"][0]["size"], 64 * MIB);

    // The NTFS root lists as the source's.
    let v = ls_json(
        &c,
        &["ilr", "ls", "hv01/win", "--partition", "1", "/", "--json"],
    );
    assert_eq!(v["fs"], "ntfs");
    assert_eq!(v["label"], "WINDATA");
    assert_eq!(entries(&v), source_root(&ntfs_src), "{v:#}");

    // Whole roots copied out through the server.
    let out = w.join("out");
    let keep = |n: &str| n.to_string();
    let (root, _) = get(
        &c,
        &out.join("win-ntfs"),
        "hv01/win",
        &["--partition", "1", "/"],
    );
    same_tree(&ntfs_src, &root, &keep, &[], 0);
    assert!(std::fs::read(root.join("compressed/text.txt")).unwrap() == text);
    assert!(std::fs::read(root.join("compressed/random.bin")).unwrap() == random);

    let (root, _) = get(
        &c,
        &out.join("win-ext"),
        "hv01/win",
        &["--partition", "2", "/"],
    );
    same_tree(&base, &root, &keep, &["lost+found"], 0);

    let (root, err) = get(
        &c,
        &out.join("lin-ext"),
        "hv01/lin",
        &["--partition", "2", "/"],
    );
    let safe = |n: &str| {
        HOSTILE
            .iter()
            .find(|h| h.0 == n)
            .map_or(n.to_string(), |h| h.1.to_string())
    };
    same_tree(&hostile, &root, &safe, &["lost+found"], 0);
    for (raw, safe) in HOSTILE.iter().filter(|h| h.0 != h.1) {
        assert!(
            err.contains(&format!("{:?} saved as {safe:?}", format!("/{raw}"))),
            "{raw:?}: {err}"
        );
    }
    for (name, target) in [("escape", "../../../../etc/passwd"), ("abs", "/etc/shadow")] {
        let m = std::fs::symlink_metadata(root.join(name)).unwrap();
        assert!(m.file_type().is_symlink(), "{name}");
        assert_eq!(
            std::fs::read_link(root.join(name)).unwrap(),
            Path::new(target)
        );
    }

    let (root, _) = get(
        &c,
        &out.join("lin-fat"),
        "hv01/lin",
        &["--partition", "1", "/"],
    );
    same_tree(&base, &root, &keep, &[], 2);

    // A whole-disk file system needs no --partition.
    let (root, _) = get(&c, &out.join("old"), "hv01/old", &["/"]);
    same_tree(&base, &root, &keep, &["lost+found"], 0);

    // Single files and folders by path.
    let (root, _) = get(
        &c,
        &out.join("some"),
        "hv01/win",
        &["--partition", "1", "/a/random.bin", "/a/b"],
    );
    same_tree(&base.join("a/b"), &root.join("b"), &keep, &[], 0);
    assert!(
        std::fs::read(root.join("random.bin")).unwrap()
            == std::fs::read(base.join("a/random.bin")).unwrap()
    );

    // The same through the agent, into a folder on its host (a recovery job):
    // folders, files and NTFS-compressed files, then hostile names made safe.
    let (folder, said) = agent_get(
        &c,
        &out.join("agent-some"),
        "hv01/win",
        &["--partition", "1", "/a/random.bin", "/a/b", "/compressed"],
    );
    same_tree(&base.join("a/b"), &folder.join("b"), &keep, &[], 0);
    same_tree(
        &ntfs_src.join("compressed"),
        &folder.join("compressed"),
        &keep,
        &[],
        0,
    );
    assert!(
        std::fs::read(folder.join("random.bin")).unwrap()
            == std::fs::read(base.join("a/random.bin")).unwrap()
    );
    assert!(
        said.contains("copied from disk 0 partition 1 (ntfs)"),
        "{said}"
    );
    let (folder, said) = agent_get(
        &c,
        &out.join("agent-hostile"),
        "hv01/lin",
        &["--partition", "2", "/"],
    );
    same_tree(&hostile, &folder, &safe, &["lost+found"], 0);
    for (raw, safe) in HOSTILE.iter().filter(|h| h.0 != h.1) {
        assert!(
            said.contains(&format!("{:?} saved as {safe:?}", format!("/{raw}"))),
            "{raw:?}: {said}"
        );
    }
    // A whole volume as a raw image: the ext4 partition is the image it was made from.
    let vol = out.join("agent-volume");
    let o = c.cli(&[
        "recover",
        "hv01/win",
        "--copy-to",
        &format!("hv01:{}", s(&vol)),
        "--disk",
        "0",
        "--partition",
        "2",
        "--wait",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let folder = only_entry(&vol);
    assert_eq!(
        hash_file(&folder.join("disk0-part2.img")),
        hash_file(&ext_base)
    );
    // A missing item fails the job and leaves no folder behind.
    let none = out.join("agent-none");
    let o = c.cli(&[
        "ilr",
        "get",
        "hv01/win",
        "--partition",
        "1",
        "/nope.txt",
        "--to-folder",
        &format!("hv01:{}", s(&none)),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("/nope.txt"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(std::fs::read_dir(&none).unwrap().next().is_none());

    // Local mode: the server's datastore read directly.
    let ds = c.datastore();
    let v = ls_json(
        &c,
        &[
            "ilr",
            "ls",
            "hv01/lin",
            "-d",
            s(&ds),
            "--partition",
            "2",
            "--json",
        ],
    );
    assert_eq!(v["fs"], "ext4");
    let mut want = source_root(&hostile);
    want.insert("lost+found".into(), ("dir".into(), 0));
    assert_eq!(entries(&v), want, "{v:#}");
    let esc = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "escape")
        .unwrap();
    assert_eq!(esc["target"], "../../../../etc/passwd");

    // Errors: exit 1 and a message that says what is wrong.
    let cli_fails = |args: &[&str]| -> String {
        let o = c.cli(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let err = cli_fails(&["ilr", "ls", "hv01/win", "--at", "2000-01-01 00:00"]);
    assert!(
        err.contains("no recovery point of hv01/win") && err.contains("2000-01-01 00:00"),
        "{err}"
    );
    let err = fails(
        1,
        &[
            "ilr",
            "ls",
            "hv01/win",
            "-d",
            s(&ds),
            "--at",
            "2000-01-01 00:00",
        ],
    );
    assert!(
        err.contains("no recovery point of hv01/win") && err.contains("2000-01-01 00:00"),
        "{err}"
    );
    let err = cli_fails(&["ilr", "ls", "hv01/win", "--partition", "1", "/a/nope"]);
    assert!(err.contains("/a/nope"), "{err}");
    let err = cli_fails(&[
        "ilr",
        "get",
        "hv01/win",
        "--partition",
        "1",
        "/nope.txt",
        "--to-folder",
        s(&out.join("none")),
    ]);
    assert!(err.contains("/nope.txt"), "{err}");
    let err = cli_fails(&["ilr", "ls", "hv01/win", "--partition", "9"]);
    assert!(
        err.contains("partition 9") && err.contains("1 (ntfs") && err.contains("2 (ext4"),
        "{err}"
    );
    let err = fails(
        1,
        &["ilr", "ls", "hv01/win", "-d", s(&ds), "--partition", "9"],
    );
    assert!(
        err.contains("partition 9") && err.contains("1 (ntfs") && err.contains("2 (ext4"),
        "{err}"
    );

    // The API's single-file download.
    let admin = c.admin();
    let points: Vec<RecoveryPointInfo> = admin
        .get(&format!("/recovery-points?vm={}", client::seg("hv01/win")))
        .unwrap();
    assert_eq!(points.len(), 1);
    let file = |part: u32, path: &str| {
        admin.get_bytes(&format!(
            "/recovery-points/{}/file?disk=0&partition={part}&path={}",
            client::seg(&points[0].id),
            client::seg(path)
        ))
    };
    assert!(file(1, "/compressed/text.txt").unwrap() == text);
    assert!(file(1, "/compressed/random.bin").unwrap() == random);
    let name = "/r\u{e9}sum\u{e9} \u{fc} \u{65e5}\u{672c}.txt";
    assert_eq!(file(2, name).unwrap(), "caf\u{e9} cr\u{e8}me\n".as_bytes());
    assert_eq!(file(2, "/empty.bin").unwrap(), b"");
    assert_eq!(status(file(1, "/a/b")), Some(422));
    assert_eq!(status(file(1, "/a/nope")), Some(404));
    assert_eq!(status(file(9, "/top.txt")), Some(404));

    eprintln!(
        "built in {built:?}, protected by {protected:?}, all done in {:?}",
        t0.elapsed()
    );
}
