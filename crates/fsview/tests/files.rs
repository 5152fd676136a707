//! ext2/3/4 and FAT12/16/32 made by the real tools (mke2fs -d, mkfs.fat + mcopy) from a
//! tree written here, read back through `fsview::open` (whole image, and inside MBR and
//! GPT disks) and compared with the tree: names, kinds, sizes, content, mtimes, modes,
//! links, labels. Then damaged and truncated images, which must fail, not panic or
//! hang. A missing tool fails the test with an install hint (see scripts/install-deps).

use fsview::{EntryKind, Error, FileSystem, Volume, read_partitions};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

mod support;
use support::{MIB, random_bytes, run};

/// Source mtimes: 2021-06-15T10:20:30.123456789Z (even seconds: FAT keeps 2 s steps).
const MTIME_SECS: u64 = 1_623_752_430;
const MTIME_NANOS: u32 = 123_456_789;

fn set_mtime(path: &Path) {
    let t = UNIX_EPOCH + Duration::new(MTIME_SECS, MTIME_NANOS);
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Which tree to write: FAT has no links or holes; FAT12 volumes are small.
#[derive(Clone, Copy, PartialEq)]
enum Tree {
    Ext,
    Fat,
    FatSmall,
}

/// Writes the source tree under `root` and returns it.
fn make_tree(dir: &Path, tree: Tree) -> PathBuf {
    let root = dir.join("src");
    let w = |rel: &str, data: &[u8]| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        set_mtime(&p);
    };
    std::fs::create_dir_all(root.join("emptydir")).unwrap();
    w("top.txt", b"hello from the top\n");
    w(
        "r\u{e9}sum\u{e9} \u{fc}.txt",
        "caf\u{e9} cr\u{e8}me\n".as_bytes(),
    );
    w("empty.bin", b"");
    w("a/b/c/deep.txt", &b"deep ".repeat(1000));
    w("a/Mixed Case Name.Text", b"case\n");
    if tree != Tree::FatSmall {
        w(
            "a/random.bin",
            &random_bytes(3 * MIB as usize + 123, 0x9E37_79B9_7F4A_7C15),
        );
    } else {
        w("a/random.bin", &random_bytes(70_001, 7));
    }
    if tree == Tree::Ext {
        // Under 60 bytes: inline data (in `i_block`) with `-O inline_data`.
        w("tiny.txt", b"tiny inline\n");
        // With `-O inline_data`: in `i_block` (up to 60 bytes), continued in the
        // `system.data` attribute (61 and up, as far as the inode has room), and too big
        // for the inode (400 bytes with 256-byte inodes; 5000 bytes whatever the size).
        for (i, n) in [0usize, 1, 59, 60, 61, 150, 200, 400, 5000]
            .into_iter()
            .enumerate()
        {
            w(&format!("inline/s{n}"), &random_bytes(n, 100 + i as u64));
        }
        // Small folders are inline too; one of hundreds of entries is an htree.
        w("inline/sub/x.txt", b"x\n");
        w("inline/sub/deeper/y.txt", b"why\n");
        for i in 0..400 {
            w(
                &format!("many/entr\u{e9}e-{i:04}-\u{65e5}\u{672c}.txt"),
                format!("entry {i}\n").as_bytes(),
            );
        }
        // 5 MiB + 7 with holes: only three ranges written.
        let p = root.join("sparse.bin");
        let f = File::create(&p).unwrap();
        f.set_len(5 * MIB + 7).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&random_bytes(65_536, 3), 2 * MIB).unwrap();
        f.write_all_at(b"end", 5 * MIB + 4).unwrap();
        drop(f);
        set_mtime(&p);
        // A fast symlink (target in the inode) and a slow one (target in a block).
        std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("link")).unwrap();
        // 119 bytes: inline data with `-O inline_data`, a block otherwise.
        let long = format!("{}/target-that-does-not-exist", "x".repeat(90));
        std::os::unix::fs::symlink(&long, root.join("a/longlink")).unwrap();
        // 575 bytes: in a block even with `-O inline_data`.
        let longer = format!("{0}/{0}/{0}/\u{fc}", "y".repeat(190));
        std::os::unix::fs::symlink(&longer, root.join("a/longerlink")).unwrap();
        std::fs::hard_link(root.join("top.txt"), root.join("a/hard.txt")).unwrap();
        // Not UTF-8: listed with U+FFFD, and still openable by that name.
        use std::os::unix::ffi::OsStrExt;
        let p = root.join(std::ffi::OsStr::from_bytes(b"a/latin1-\xe9t\xe9.txt"));
        std::fs::write(&p, b"latin-1 name\n").unwrap();
        set_mtime(&p);
        let mut perm = std::fs::metadata(root.join("top.txt"))
            .unwrap()
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o640);
        std::fs::set_permissions(root.join("top.txt"), perm).unwrap();
    }
    root
}

/// The source file for a listed path (whose U+FFFD may stand for a non-UTF-8 byte).
fn src_path(src: &Path, rel: &str) -> PathBuf {
    if rel.contains('\u{FFFD}') {
        let p = src.join("a/latin1-\u{FFFD}t\u{FFFD}.txt");
        assert_eq!(src.join(rel), p, "only one such name");
        use std::os::unix::ffi::OsStrExt;
        return src.join(std::ffi::OsStr::from_bytes(b"a/latin1-\xe9t\xe9.txt"));
    }
    src.join(rel)
}

/// Everything the tree says must be readable back from `fs`.
fn check(fs: &mut dyn FileSystem, src: &Path, tree: Tree, label: &str) {
    assert_eq!(fs.label().as_deref(), Some(label));
    let mut want = support::source_map(src);
    let mut got = support::fs_map(fs);
    if tree == Tree::Ext {
        // mke2fs adds it; the source has none.
        want.insert("lost+found".into(), (EntryKind::Dir, 0));
        let lf = got.remove("lost+found").unwrap();
        assert_eq!(lf.mode, Some(0o700));
    }
    let got_kinds: BTreeMap<_, _> = got
        .iter()
        .map(|(k, e)| {
            let size = if e.kind == EntryKind::Dir { 0 } else { e.size };
            (k.clone(), (e.kind, size))
        })
        .collect();
    want.remove("lost+found");
    assert_eq!(got_kinds, want);

    for (rel, e) in &got {
        let path = format!("/{rel}");
        let on_src = src_path(src, rel);
        let sm = std::fs::symlink_metadata(&on_src).unwrap();
        // stat agrees with list.
        assert_eq!(&fs.stat(&path).unwrap(), e, "{path}");
        match e.kind {
            EntryKind::File => {
                let mut data = Vec::new();
                let n = fs.read_file(&path, &mut data).unwrap();
                assert_eq!(n, data.len() as u64, "{path}");
                assert!(
                    data == std::fs::read(&on_src).unwrap(),
                    "{path}: content differs"
                );
                let mtime = e.mtime.unwrap_or_else(|| panic!("{path}: no mtime"));
                if tree == Tree::Ext {
                    assert_eq!(mtime, sm.mtime(), "{path}");
                    assert_eq!(e.mode, Some(sm.mode() & 0o7777), "{path}");
                } else {
                    assert!(
                        (mtime - sm.mtime()).abs() <= 2,
                        "{path}: {mtime} vs {}",
                        sm.mtime()
                    );
                    assert_eq!(e.mode, None);
                }
            }
            EntryKind::Symlink => {
                let target = std::fs::read_link(&on_src).unwrap();
                assert_eq!(fs.read_link(&path).unwrap(), target.to_str().unwrap());
                assert!(matches!(
                    fs.read_file(&path, &mut Vec::new()),
                    Err(Error::WrongKind(_))
                ));
            }
            EntryKind::Dir => {
                assert!(matches!(
                    fs.read_file(&path, &mut Vec::new()),
                    Err(Error::WrongKind(_))
                ));
            }
            EntryKind::Other => panic!("{path}: unexpected kind"),
        }
    }

    // Identities: distinct files differ; hard links (ext) share one.
    let mut ids: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for (rel, e) in &got {
        ids.entry(e.id).or_default().push(rel);
    }
    for (id, paths) in &ids {
        if tree == Tree::Ext && paths.contains(&"top.txt") {
            assert_eq!(paths, &["a/hard.txt", "top.txt"], "id {id}");
        } else {
            assert_eq!(paths.len(), 1, "id {id} shared by {paths:?}");
        }
    }
    let root = fs.stat("/").unwrap();
    assert_eq!((root.name.as_str(), root.kind), ("", EntryKind::Dir));
    if tree == Tree::Ext {
        assert_eq!(root.id, 2, "root inode");
        assert_eq!(got["top.txt"].mode, Some(0o640));
        assert_eq!(got["top.txt"].mtime_nanos, MTIME_NANOS, "nanoseconds kept");
        assert_eq!(got["a/hard.txt"].mtime_nanos, MTIME_NANOS);
        assert!(got.contains_key("a/latin1-\u{FFFD}t\u{FFFD}.txt"));
        assert_eq!(got["link"].kind, EntryKind::Symlink);
        // A symlinked directory's path components are followed; the link itself is not a file.
        assert!(matches!(fs.read_link("/top.txt"), Err(Error::WrongKind(_))));
    } else {
        // Case-insensitive lookup, same identity whatever the spelling.
        let a = fs.stat("/A/MIXED CASE NAME.TEXT").unwrap();
        assert_eq!(a.id, got["a/Mixed Case Name.Text"].id);
        assert_eq!(a.name, "Mixed Case Name.Text");
        let mut data = Vec::new();
        fs.read_file("/a/b/C/DEEP.TXT", &mut data).unwrap();
        assert_eq!(data, b"deep ".repeat(1000));
        assert!(matches!(fs.read_link("/top.txt"), Err(Error::WrongKind(_))));
    }

    // Errors.
    assert!(matches!(fs.stat("/nope"), Err(Error::NotFound(p)) if p == "/nope"));
    assert!(matches!(fs.list("/a/nope"), Err(Error::NotFound(_))));
    assert!(matches!(
        fs.read_file("/a/b/nope.txt", &mut Vec::new()),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(fs.list("/top.txt"), Err(Error::WrongKind(_))));
    assert!(matches!(
        fs.stat("/top.txt/x"),
        Err(Error::WrongKind(_) | Error::NotFound(_))
    ));
    assert!(matches!(fs.stat("/a/../top.txt"), Err(Error::BadPath(_))));
    assert!(matches!(fs.list(".."), Err(Error::BadPath(_))));
}

fn mkext(dir: &Path, src: &Path, t: &str, size_mib: u64, features: Option<&str>) -> PathBuf {
    let img = dir.join(format!("{t}{}.img", features.unwrap_or("")));
    let label = format!("TEST{}", t.to_uppercase());
    support::mke2fs(&img, t, size_mib, &label, src, features);
    // mke2fs -d drops sub-second times: set top.txt's (and so its hard link's) by hand,
    // nanoseconds << 2 in the extra field.
    let extra = format!("sif /top.txt mtime_extra {}", MTIME_NANOS << 2);
    run(
        "debugfs",
        &["-w", "-R", &extra, img.to_str().unwrap()],
        None,
        &[],
    );
    img
}

fn mkfat(dir: &Path, src: &Path, bits: u8, size_mib: u64) -> PathBuf {
    let img = dir.join(format!("fat{bits}.img"));
    support::mkfat(&img, bits, size_mib, &format!("TESTFAT{bits}"), src);
    img
}

/// `fs_img` inside a new MBR (or GPT) disk, at 1 MiB.
fn partitioned(dir: &Path, fs_img: &Path, gpt: bool, mbr_type: &str) -> PathBuf {
    let name = format!(
        "{}-{}.disk",
        fs_img.file_stem().unwrap().to_str().unwrap(),
        if gpt { "gpt" } else { "mbr" }
    );
    let disk = dir.join(name);
    let ty = if gpt { "L" } else { mbr_type };
    assert_eq!(
        support::partitioned_disk(&disk, gpt, &[(fs_img, ty)]),
        [MIB]
    );
    disk
}

fn disk(path: &Path) -> Arc<dyn vdisk::VirtualDisk> {
    Arc::from(vdisk::open(path).unwrap())
}

fn open_whole(path: &Path) -> Box<dyn FileSystem> {
    fsview::open(Volume::whole(disk(path))).unwrap()
}

fn open_first_partition(path: &Path, fs_len: u64) -> Box<dyn FileSystem> {
    let d = disk(path);
    let t = read_partitions(d.as_ref()).unwrap();
    let p = &t.partitions[0];
    assert_eq!((p.start, p.length), (MIB, fs_len));
    fsview::open(Volume::new(d.clone(), p.start, p.length).unwrap()).unwrap()
}

fn ext_case(t: &str, size_mib: u64, version: u8) {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    let img = mkext(tmp.path(), &src, t, size_mib, None);
    let label = format!("TEST{}", t.to_uppercase());
    let fs = open_whole(&img);
    assert_eq!(fs.kind(), fsview::FsKind::Ext { version });
    // Opened on one thread, browsed on another (the trait object is `Send`).
    let (src2, label2) = (src.clone(), label.clone());
    std::thread::spawn(move || {
        let mut fs = fs;
        check(fs.as_mut(), &src2, Tree::Ext, &label2)
    })
    .join()
    .unwrap();
    let mbr = partitioned(tmp.path(), &img, false, "83");
    check(
        open_first_partition(&mbr, size_mib * MIB).as_mut(),
        &src,
        Tree::Ext,
        &label,
    );
    if t == "ext4" {
        let gpt = partitioned(tmp.path(), &img, true, "");
        check(
            open_first_partition(&gpt, size_mib * MIB).as_mut(),
            &src,
            Tree::Ext,
            &label,
        );
    }
}

/// `debugfs -R "stat PATH"` of `img`.
fn debugfs_stat(img: &Path, path: &str) -> String {
    run(
        "debugfs",
        &["-R", &format!("stat {path}"), img.to_str().unwrap()],
        None,
        &[],
    )
}

/// The inode flags debugfs shows for `path`.
fn inode_flags(img: &Path, path: &str) -> u32 {
    let st = debugfs_stat(img, path);
    let f = st
        .split("Flags: 0x")
        .nth(1)
        .unwrap_or_else(|| panic!("{path}: {st}"));
    let hex: String = f.chars().take_while(char::is_ascii_hexdigit).collect();
    u32::from_str_radix(&hex, 16).unwrap()
}

/// `e2fsck -fyD`: mke2fs -d writes linear folders; this indexes the large ones (htree).
fn index_dirs(img: &Path) {
    let st = std::process::Command::new("e2fsck")
        .arg("-fyD")
        .arg(img)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("e2fsck could not be started ({e}): install e2fsprogs"));
    // 0: nothing to fix, 1: fixed (the folders were optimised).
    assert!(matches!(st.code(), Some(0 | 1)), "e2fsck -fyD: {st}");
}

const INLINE_FL: u32 = 0x1000_0000;
const EXTENTS_FL: u32 = 0x8_0000;

/// Volume byte ranges of `path`, read back and joined.
fn ranges_content(img: &Path, fs: &mut dyn FileSystem, path: &str) -> Option<Vec<u8>> {
    let ranges = fs.data_ranges(path).unwrap()?;
    let f = File::open(img).unwrap();
    let mut out = Vec::new();
    for (o, l) in ranges {
        let mut b = vec![0u8; l as usize];
        f.read_exact_at(&mut b, o).unwrap();
        out.extend_from_slice(&b);
    }
    Some(out)
}

/// ext4 with `inline_data` (which ext4-view 1.0 refuses) is read by fsview's own
/// reader: tiny files in `i_block` and in the `system.data` attribute, inline folders,
/// an htree folder, extents, holes, fast, inline and slow links, Unicode and non-UTF-8
/// names, with 256- and 512-byte inodes, whole and in MBR and GPT disks.
#[test]
fn ext4_inline_data_files_folders_and_links() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    for inode_size in [512u32, 256] {
        let img = tmp.path().join(format!("inline{inode_size}.img"));
        support::mke2fs_sized(
            &img,
            "ext4",
            64,
            "TESTEXT4",
            &src,
            Some("inline_data"),
            4096,
            inode_size,
        );
        let extra = format!("sif /top.txt mtime_extra {}", MTIME_NANOS << 2);
        run(
            "debugfs",
            &["-w", "-R", &extra, img.to_str().unwrap()],
            None,
            &[],
        );
        index_dirs(&img);
        // The fixture really holds what the test is about.
        let inline: &[u32] = if inode_size == 512 {
            &[0, 1, 59, 60, 61, 150, 200]
        } else {
            &[0, 1, 59, 60, 61]
        };
        for &n in inline {
            let p = format!("/inline/s{n}");
            assert_eq!(inode_flags(&img, &p), INLINE_FL, "{p}");
            if n > 60 {
                assert!(debugfs_stat(&img, &p).contains("system.data"), "{p}");
            }
        }
        assert_eq!(inode_flags(&img, "/inline/s5000"), EXTENTS_FL);
        assert_eq!(inode_flags(&img, "/inline/s400") & INLINE_FL, 0);
        assert_eq!(inode_flags(&img, "/inline/sub"), INLINE_FL);
        assert_eq!(inode_flags(&img, "/inline/sub/deeper"), INLINE_FL);
        assert_ne!(inode_flags(&img, "/many") & 0x1000, 0, "htree (INDEX_FL)");
        assert_eq!(inode_flags(&img, "/a/longerlink"), EXTENTS_FL);
        if inode_size == 512 {
            assert_eq!(inode_flags(&img, "/a/longlink"), INLINE_FL);
        }

        let mut fs = open_whole(&img);
        assert_eq!(fs.kind(), fsview::FsKind::Ext { version: 4 });
        check(fs.as_mut(), &src, Tree::Ext, "TESTEXT4");
        assert_eq!(fs.list("/many").unwrap().len(), 400);
        // Inline data has no range of its own; block data is exactly the content.
        assert_eq!(fs.data_ranges("/inline/s61").unwrap(), None);
        assert_eq!(fs.data_ranges("/empty.bin").unwrap(), None);
        assert_eq!(
            ranges_content(&img, fs.as_mut(), "/a/random.bin").unwrap(),
            std::fs::read(src.join("a/random.bin")).unwrap()
        );
        let sparse: u64 = fs
            .data_ranges("/sparse.bin")
            .unwrap()
            .unwrap()
            .iter()
            .map(|r| r.1)
            .sum();
        assert!(sparse < MIB, "holes have no ranges: {sparse}");
        assert!(matches!(fs.data_ranges("/a"), Err(Error::WrongKind(_))));

        let mbr = partitioned(tmp.path(), &img, false, "83");
        check(
            open_first_partition(&mbr, 64 * MIB).as_mut(),
            &src,
            Tree::Ext,
            "TESTEXT4",
        );
        if inode_size == 512 {
            let gpt = partitioned(tmp.path(), &img, true, "");
            check(
                open_first_partition(&gpt, 64 * MIB).as_mut(),
                &src,
                Tree::Ext,
                "TESTEXT4",
            );
        }
    }
}

/// `meta_bg` (which ext4-view also refuses) with inline data: 1 KiB blocks, 256-block
/// groups and 8 inodes each, so the tree's inodes lie in groups whose descriptors are
/// in several meta groups.
#[test]
fn ext4_inline_data_with_meta_bg() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    let img = tmp.path().join("metabg.img");
    support::blank(&img, 64 * MIB);
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "1024",
            "-g",
            "256",
            "-N",
            "2048",
            "-I",
            "256",
            "-L",
            "TESTEXT4",
            "-O",
            "inline_data,meta_bg,^resize_inode",
            "-d",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
        None,
        &[],
    );
    let extra = format!("sif /top.txt mtime_extra {}", MTIME_NANOS << 2);
    run(
        "debugfs",
        &["-w", "-R", &extra, img.to_str().unwrap()],
        None,
        &[],
    );
    index_dirs(&img);
    let st = debugfs_stat(&img, "/many/entr\u{e9}e-0399-\u{65e5}\u{672c}.txt");
    let ino: u64 = st
        .split("Inode: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    // 8 inodes a group, 16 descriptors a block (64-byte descriptors, 1 KiB blocks).
    assert!(
        (ino - 1) / 8 >= 16,
        "inode {ino} is in the first meta group"
    );
    assert_eq!(inode_flags(&img, "/inline/s61"), INLINE_FL);
    let mut fs = open_whole(&img);
    check(fs.as_mut(), &src, Tree::Ext, "TESTEXT4");
}

/// ext3 and ext2 with `inline_data`: block maps (no extents) through the own reader.
#[test]
fn ext3_and_ext2_inline_data_with_block_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    for t in ["ext3", "ext2"] {
        let img = mkext(tmp.path(), &src, t, 32, Some("inline_data"));
        index_dirs(&img);
        assert_ne!(inode_flags(&img, "/many") & 0x1000, 0, "htree (INDEX_FL)");
        assert_eq!(inode_flags(&img, "/inline/s61"), INLINE_FL);
        assert_eq!(inode_flags(&img, "/a/random.bin"), 0, "a block map");
        assert_eq!(inode_flags(&img, "/sparse.bin"), 0, "a block map");
        let label = format!("TEST{}", t.to_uppercase());
        let mut fs = open_whole(&img);
        check(fs.as_mut(), &src, Tree::Ext, &label);
        assert_eq!(
            ranges_content(&img, fs.as_mut(), "/a/random.bin").unwrap(),
            std::fs::read(src.join("a/random.bin")).unwrap()
        );
    }
}

/// ext2 without `filetype` (which ext4-view requires) and ext4 with `large_dir` (which
/// it refuses) are read by the own reader.
#[test]
fn ext2_without_filetype_and_ext4_large_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    for (t, features) in [("ext2", "^filetype"), ("ext4", "large_dir")] {
        let img = mkext(tmp.path(), &src, t, 64, Some(features));
        let mut fs = open_whole(&img);
        check(
            fs.as_mut(),
            &src,
            Tree::Ext,
            &format!("TEST{}", t.to_uppercase()),
        );
    }
}

/// The own reader (forced) agrees with the source on volumes ext4-view also reads:
/// ext4 extents, ext3/ext2 block maps.
#[test]
fn own_ext_reader_on_plain_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    for (t, version) in [("ext4", 4), ("ext3", 3), ("ext2", 2)] {
        let img = mkext(tmp.path(), &src, t, 64, None);
        index_dirs(&img);
        let mut fs = fsview::open_ext_own(Volume::whole(disk(&img))).unwrap();
        assert_eq!(fs.kind(), fsview::FsKind::Ext { version });
        check(
            fs.as_mut(),
            &src,
            Tree::Ext,
            &format!("TEST{}", t.to_uppercase()),
        );
    }
}

/// 1 KiB blocks: a sparse file reaching the triple-indirect range of a block map
/// (past 12 + 256 + 65536 blocks), and a 1 KiB-block inline volume.
#[test]
fn own_ext_reader_triple_indirect_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let far = src.join("far.bin");
    let f = File::create(&far).unwrap();
    let size = 66 * MIB + 5;
    f.set_len(size).unwrap();
    f.write_all_at(b"start", 0).unwrap();
    f.write_all_at(&random_bytes(10_000, 9), 100 * 1024)
        .unwrap();
    f.write_all_at(&random_bytes(70_000, 11), 20 * MIB).unwrap();
    f.write_all_at(&random_bytes(8192, 12), 65 * MIB - 3)
        .unwrap();
    f.write_all_at(b"end", size - 3).unwrap();
    drop(f);
    std::fs::write(src.join("small"), b"small file").unwrap();
    let want = std::fs::read(&far).unwrap();
    for features in [None, Some("inline_data")] {
        let img = tmp.path().join(format!("k{}.img", features.is_some()));
        support::mke2fs_sized(&img, "ext2", 16, "K", &src, features, 1024, 256);
        let mut fs = fsview::open_ext_own(Volume::whole(disk(&img))).unwrap();
        let mut got = Vec::new();
        assert_eq!(fs.read_file("/far.bin", &mut got).unwrap(), size);
        assert!(got == want, "far.bin differs");
        assert_eq!(fs.stat("/far.bin").unwrap().size, size);
        let mut got = Vec::new();
        fs.read_file("/small", &mut got).unwrap();
        assert_eq!(got, b"small file");
        let r = fs.data_ranges("/far.bin").unwrap().unwrap();
        let mapped: u64 = r.iter().map(|r| r.1).sum();
        assert!((10_000..200_000).contains(&mapped), "{mapped}");
    }
}

/// A journal flagged for recovery is read when empty, refused when it holds
/// transactions (the own reader does not replay it).
#[test]
fn own_ext_reader_and_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    let img = mkext(tmp.path(), &src, "ext4", 64, Some("inline_data"));
    let flag = |img: &Path| {
        run(
            "debugfs",
            &["-w", "-R", "feature needs_recovery", img.to_str().unwrap()],
            None,
            &[],
        );
    };
    let dirty = tmp.path().join("dirty.img");
    std::fs::copy(&img, &dirty).unwrap();
    flag(&dirty);
    browse(Volume::whole(disk(&dirty))).unwrap();
    // s_start (big-endian, at 0x1C of the journal superblock) set: transactions wait.
    let jblock: u64 = run(
        "debugfs",
        &["-R", "bmap <8> 0", dirty.to_str().unwrap()],
        None,
        &[],
    )
    .trim()
    .parse()
    .unwrap();
    let f = File::options().write(true).open(&dirty).unwrap();
    f.write_all_at(&1u32.to_be_bytes(), jblock * 4096 + 0x1C)
        .unwrap();
    drop(f);
    match fsview::open(Volume::whole(disk(&dirty))) {
        Err(Error::Unsupported(m)) => assert!(m.contains("journal"), "{m}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("a journal with transactions was not refused"),
    }
}

/// The inode offset of `path` (debugfs `imap`: block and offset in it).
fn inode_offset(img: &Path, path: &str) -> usize {
    let out = run(
        "debugfs",
        &["-R", &format!("imap {path}"), img.to_str().unwrap()],
        None,
        &[],
    );
    let rest = out.split("located at block ").nth(1).unwrap();
    let block: usize = rest.split(',').next().unwrap().trim().parse().unwrap();
    let off = rest.split("offset 0x").nth(1).unwrap().trim();
    block * 4096 + usize::from_str_radix(off, 16).unwrap()
}

/// Damaged inline attributes, extent headers and directory entries of an inline_data
/// volume: errors naming the damage, never a panic; the rest stays readable.
#[test]
fn damaged_inline_data_volume_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    let img = tmp.path().join("inline.img");
    support::mke2fs_sized(
        &img,
        "ext4",
        64,
        "DAMAGE",
        &src,
        Some("inline_data,^metadata_csum"),
        4096,
        512,
    );
    browse(Volume::whole(disk(&img))).unwrap();
    let s150 = inode_offset(&img, "/inline/s150");
    let random = inode_offset(&img, "/a/random.bin");
    let sub = inode_offset(&img, "/inline/sub");
    let many = inode_offset(&img, "/many");
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, &str, Damage)> = vec![
        // system.data's value size far past the inode end.
        (
            "xattr.img",
            "/inline/s150",
            Box::new(move |d: &mut Vec<u8>| {
                let extra = usize::from(u16::from_le_bytes([d[s150 + 0x80], d[s150 + 0x81]]));
                let first = s150 + 128 + extra + 4;
                d[first + 8..first + 12].copy_from_slice(&0xFFFFu32.to_le_bytes());
            }),
        ),
        // The extent header's magic.
        (
            "magic.img",
            "/a/random.bin",
            Box::new(move |d: &mut Vec<u8>| d[random + 0x28] ^= 0xFF),
        ),
        // An extent depth of 9 (at most 5).
        (
            "depth.img",
            "/a/random.bin",
            Box::new(move |d: &mut Vec<u8>| d[random + 0x28 + 6] = 9),
        ),
        // An extent past the volume end.
        (
            "far.img",
            "/a/random.bin",
            Box::new(move |d: &mut Vec<u8>| {
                d[random + 0x28 + 12 + 6..random + 0x28 + 12 + 8].fill(0xFF)
            }),
        ),
        // An inline folder's first entry with a record length past its end.
        (
            "dirent.img",
            "/inline/sub",
            Box::new(move |d: &mut Vec<u8>| {
                d[sub + 0x28 + 4 + 4..sub + 0x28 + 4 + 6].copy_from_slice(&200u16.to_le_bytes())
            }),
        ),
        // A large folder's first extent starting far past the volume end.
        (
            "many.img",
            "/many",
            Box::new(move |d: &mut Vec<u8>| {
                d[many + 0x28 + 12 + 6..many + 0x28 + 12 + 8].fill(0x7F)
            }),
        ),
    ];
    for (name, path, f) in cases {
        let bad = damaged(&img, name, f);
        let mut fs = fsview::open(Volume::whole(disk(&bad))).unwrap();
        let e = if path == "/inline/sub" || path == "/many" {
            fs.list(path).unwrap_err()
        } else {
            fs.read_file(path, &mut std::io::sink()).unwrap_err()
        };
        assert!(matches!(e, Error::Corrupt { .. }), "{name}: {e:?}");
        // The rest stays readable.
        let mut data = Vec::new();
        fs.read_file("/top.txt", &mut data).unwrap();
        assert_eq!(data, b"hello from the top\n");
        let e = browse(Volume::whole(disk(&bad))).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{name}: {e:?}");
    }
    // Truncated: the file system claims more than there is.
    let e = browse(Volume::new(disk(&img), 0, 32 * MIB).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
}

#[test]
fn ext4_extents_links_holes_in_whole_mbr_and_gpt_disks() {
    ext_case("ext4", 64, 4);
}

#[test]
fn ext3_in_whole_and_mbr_disks() {
    ext_case("ext3", 32, 3);
}

#[test]
fn ext2_in_whole_and_mbr_disks() {
    ext_case("ext2", 32, 2);
}

fn fat_case(bits: u8, size_mib: u64, mbr_type: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let tree = if bits == 12 {
        Tree::FatSmall
    } else {
        Tree::Fat
    };
    let src = make_tree(tmp.path(), tree);
    let img = mkfat(tmp.path(), &src, bits, size_mib);
    let label = format!("TESTFAT{bits}");
    let fs = open_whole(&img);
    assert_eq!(fs.kind(), fsview::FsKind::Fat { bits });
    let (src2, label2) = (src.clone(), label.clone());
    std::thread::spawn(move || {
        let mut fs = fs;
        check(fs.as_mut(), &src2, tree, &label2)
    })
    .join()
    .unwrap();
    let mbr = partitioned(tmp.path(), &img, false, mbr_type);
    check(
        open_first_partition(&mbr, size_mib * MIB).as_mut(),
        &src,
        tree,
        &label,
    );
}

#[test]
fn fat32_in_whole_and_mbr_disks() {
    fat_case(32, 64, "c");
}

#[test]
fn fat16_in_whole_and_mbr_disks() {
    fat_case(16, 32, "6");
}

#[test]
fn fat12_in_whole_and_mbr_disks() {
    fat_case(12, 4, "1");
}

/// `img` changed by `f`, as a new file.
fn damaged(img: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut data = std::fs::read(img).unwrap();
    f(&mut data);
    let out = img.with_file_name(name);
    std::fs::write(&out, data).unwrap();
    out
}

/// Opens and browses everything; the first error is returned. Must end quickly.
fn browse(vol: Volume) -> fsview::Result<()> {
    let started = Instant::now();
    let r = (|| {
        let mut fs = fsview::open(vol)?;
        let mut todo = vec![String::from("/")];
        while let Some(dir) = todo.pop() {
            for e in fs.list(&dir)? {
                let p = format!("{}/{}", dir.trim_end_matches('/'), e.name);
                match e.kind {
                    EntryKind::Dir => todo.push(p),
                    EntryKind::File => {
                        fs.read_file(&p, &mut std::io::sink())?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    })();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "browsing took {:?}",
        started.elapsed()
    );
    r
}

#[test]
fn damaged_and_truncated_ext4_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    let img = mkext(tmp.path(), &src, "ext4", 64, None);
    browse(Volume::whole(disk(&img))).unwrap();

    // The superblock (and its magic) intact, the group descriptors after it garbage.
    let bad = damaged(&img, "gdt.img", |d| {
        for (i, b) in d[4096..8192].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) ^ 0xA5;
        }
    });
    assert_eq!(
        fsview::probe(disk(&bad).as_ref(), 0, 64 * MIB).unwrap(),
        fsview::FsKind::Ext { version: 4 }
    );
    let e = browse(Volume::whole(disk(&bad))).unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. } | Error::Unsupported(_)),
        "{e:?}"
    );

    // Zeroed inode table region: the root inode is gone.
    let bad = damaged(&img, "inodes.img", |d| {
        // Block group 0's inode table: from the descriptor (bg_inode_table_lo at +8).
        let table = u32::from_le_bytes(d[4096 + 8..4096 + 12].try_into().unwrap()) as usize;
        d[table * 4096..(table + 2) * 4096].fill(0);
    });
    assert!(browse(Volume::whole(disk(&bad))).is_err());

    // Half the volume: the file system claims more than there is.
    let d = disk(&img);
    let e = browse(Volume::new(d, 0, 32 * MIB).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
}

/// Without the 64bit feature, `s_blocks_count_hi` means nothing (the kernel ignores
/// it); ext4-view does not ignore it, so such a volume is read by the own reader (a
/// fuzzer found ext4-view allocating for billions of block groups).
#[test]
fn ext2_with_a_stray_blocks_count_hi() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    let img = mkext(tmp.path(), &src, "ext2", 32, None);
    let bad = damaged(&img, "hi.img", |d| {
        d[1024 + 0x150..1024 + 0x154].copy_from_slice(&5632u32.to_le_bytes());
    });
    check(open_whole(&bad).as_mut(), &src, Tree::Ext, "TESTEXT2");
}

/// A link whose inode claims a terabyte-long target is corrupt, through ext4-view and
/// through the own reader (a fuzzer found ext4-view allocating the claimed size).
#[test]
fn ext_links_claiming_huge_targets_are_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Ext);
    for features in [None, Some("inline_data")] {
        let img = mkext(tmp.path(), &src, "ext4", 64, features);
        for link in ["/link", "/a/longlink", "/a/longerlink"] {
            let at = inode_offset(&img, link);
            let bad = damaged(&img, "biglink.img", |d| {
                d[at + 0x6C..at + 0x70].copy_from_slice(&255u32.to_le_bytes());
            });
            let mut fs = open_whole(&bad);
            let e = fs.read_link(link).unwrap_err();
            assert!(
                matches!(e, Error::Corrupt { .. }),
                "{link} {features:?}: {e:?}"
            );
            assert_eq!(fs.read_link("/link").is_ok(), link != "/link");
        }
    }
}

/// FAT32 layout from the boot sector: (bytes per sector, sectors per cluster, first FAT
/// offset, FAT count, FAT bytes, data offset, root cluster).
fn fat32_layout(d: &[u8]) -> (u64, u64, u64, u64, u64, u64, u32) {
    let le16 = |o: usize| u64::from(u16::from_le_bytes([d[o], d[o + 1]]));
    let le32 = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap());
    let bps = le16(11);
    let spc = u64::from(d[13]);
    let fat_off = le16(14) * bps;
    let nfats = u64::from(d[16]);
    let fat_bytes = u64::from(le32(36)) * bps;
    let data = fat_off + nfats * fat_bytes;
    (bps, spc, fat_off, nfats, fat_bytes, data, le32(44))
}

#[test]
fn damaged_and_truncated_fat_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tree(tmp.path(), Tree::Fat);
    let img = mkfat(tmp.path(), &src, 32, 64);
    browse(Volume::whole(disk(&img))).unwrap();

    // `emptydir`'s cluster filled with deleted entries and chained to itself: a
    // directory that never ends.
    let bad = damaged(&img, "loop.img", |d| {
        let (bps, spc, fat_off, nfats, fat_bytes, data, root) = fat32_layout(d);
        let csize = bps * spc;
        let cl = |c: u32| (data + u64::from(c - 2) * csize) as usize;
        let r = cl(root);
        let ent = (0..csize as usize / 32)
            .map(|i| r + i * 32)
            .find(|&o| &d[o..o + 11] == b"EMPTYDIR   ")
            .expect("emptydir entry");
        let c = u32::from(u16::from_le_bytes([d[ent + 26], d[ent + 27]]))
            | u32::from(u16::from_le_bytes([d[ent + 20], d[ent + 21]])) << 16;
        let start = cl(c);
        for o in (start..start + csize as usize).step_by(32) {
            d[o] = 0xE5;
            d[o + 11] = 0x20;
        }
        for f in 0..nfats {
            let o = (fat_off + f * fat_bytes + u64::from(c) * 4) as usize;
            d[o..o + 4].copy_from_slice(&c.to_le_bytes());
        }
    });
    let mut fs = fsview::open(Volume::whole(disk(&bad))).unwrap();
    let started = Instant::now();
    let e = fs.list("/emptydir").unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The rest stays readable.
    let mut data = Vec::new();
    fs.read_file("/top.txt", &mut data).unwrap();
    assert_eq!(data, b"hello from the top\n");

    // A file whose cluster chain ends early (its second FAT entry marks the end).
    let bad = damaged(&img, "short.img", |d| {
        let (_, _, fat_off, nfats, fat_bytes, _, _) = fat32_layout(d);
        // Every chain link n -> n+1 broken: no multi-cluster file survives.
        for f in 0..nfats {
            let base = (fat_off + f * fat_bytes) as usize;
            for i in 3..(fat_bytes as usize / 4) {
                let o = base + i * 4;
                let v = u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) & 0x0FFF_FFFF;
                if v == i as u32 + 1 {
                    d[o..o + 4].copy_from_slice(&0x0FFF_FFFFu32.to_le_bytes());
                }
            }
        }
    });
    let mut fs = fsview::open(Volume::whole(disk(&bad))).unwrap();
    let e = fs
        .read_file("/a/random.bin", &mut std::io::sink())
        .unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");

    // Total sectors far beyond the image: the boot sector claims more than there is.
    let bad = damaged(&img, "big.img", |d| {
        d[32..36].copy_from_slice(&(u32::MAX / 2).to_le_bytes());
    });
    assert!(browse(Volume::whole(disk(&bad))).is_err());

    // Half the volume.
    let e = browse(Volume::new(disk(&img), 0, 32 * MIB).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
}
