//! exFAT written by the real tools: mkfs.exfat (exfatprogs) formats, the exfat-fuse
//! mount (as root, on a loop device) fills it from a tree written here (Unicode and
//! 255-character names, nested folders, a folder of hundreds of entries, an empty file,
//! a contiguous multi-MiB file and a fragmented one), then fsview reads it back (whole
//! image, and inside MBR and GPT disks) and compares every name, size, content and
//! mtime with the tree. Then damaged copies (a FAT loop, a bad SetChecksum, a cluster
//! past ClusterCount, a truncated image, random damage) must fail, not panic or hang.

use fsview::{EntryKind, Error, FileSystem, FsKind, Volume, read_partitions};
use std::collections::BTreeMap;
use std::fs::{File, FileTimes};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

mod support;
use support::{MIB, Mount, random_bytes};

/// File mtimes: 2021-06-15T10:20:31Z, an odd second (exFAT's 10 ms field carries it).
const MTIME: u64 = 1_623_752_431;
const LABEL: &str = "HFEXFAT";
const IMG_SIZE: u64 = 64 * MIB;

struct Fixture {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    img: PathBuf,
}

fn long_name() -> String {
    format!("{}.txt", "n".repeat(251))
}

/// Writes `data` at `rel` under both `src` and the mount.
fn put(src: &Path, m: &Mount, rel: &str, data: &[u8]) {
    for root in [src.to_path_buf(), m.path("")] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
}

/// Sets every file's and folder's mtime (folders after their content), on both sides.
fn set_times(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            set_times(&p);
        }
        // Both times: exfat-fuse ignores a change of the mtime alone (atime omitted).
        let t = UNIX_EPOCH + Duration::from_secs(MTIME);
        File::open(&p)
            .unwrap()
            .set_times(FileTimes::new().set_accessed(t).set_modified(t))
            .unwrap();
    }
}

fn build() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let img = tmp.path().join("exfat.img");
    support::mkexfat(&img, IMG_SIZE, LABEL);
    // UTC+5:30: local times with an offset that is not whole hours.
    let m = Mount::exfat(&img, &tmp.path().join("mnt"), "IST-5:30");
    put(&src, &m, "top.txt", b"hello from the top\n");
    put(&src, &m, "empty.bin", b"");
    put(
        &src,
        &m,
        "r\u{e9}sum\u{e9} \u{fc}.txt",
        "caf\u{e9} cr\u{e8}me\n".as_bytes(),
    );
    put(&src, &m, &long_name(), b"255 characters\n");
    put(
        &src,
        &m,
        &format!("{}.txt", "\u{e9}".repeat(100)),
        b"accents\n",
    );
    put(
        &src,
        &m,
        "smile \u{1F600} \u{65e5}\u{672c}.txt",
        b"astral\n",
    );
    put(&src, &m, "a/b/c/deep.txt", &b"deep ".repeat(1000));
    put(&src, &m, "a/Mixed Case Name.Text", b"case\n");
    put(
        &src,
        &m,
        "a/random.bin",
        &random_bytes(5 * MIB as usize + 123, 0x9E37_79B9_7F4A_7C15),
    );
    for i in 0..300 {
        put(
            &src,
            &m,
            &format!("many/entr\u{e9}e-{i:04}-\u{65e5}\u{672c}.txt"),
            format!("entry {i}\n").as_bytes(),
        );
    }
    std::fs::create_dir_all(src.join("emptydir")).unwrap();
    std::fs::create_dir_all(m.path("emptydir")).unwrap();
    // Fragmentation: 40 files of 64 KiB, every other one deleted, then a large file
    // that has to fill the holes.
    for i in 0..40 {
        put(&src, &m, &format!("frag/f{i:02}"), &random_bytes(65_536, i));
    }
    for i in (0..40).step_by(2) {
        let rel = format!("frag/f{i:02}");
        std::fs::remove_file(src.join(&rel)).unwrap();
        std::fs::remove_file(m.path(&rel)).unwrap();
    }
    // exfat-fuse lays this one in the holes (checked below: many ranges, a FAT chain).
    put(
        &src,
        &m,
        "frag/big.bin",
        &random_bytes(3 * MIB as usize + 17, 0xF00D),
    );
    set_times(&src);
    set_times(&m.path(""));
    m.unmount();
    Fixture {
        _tmp: tmp,
        src,
        img,
    }
}

fn disk_of(img: Vec<u8>) -> Arc<dyn vdisk::VirtualDisk> {
    Arc::from(vdisk::open_backing(vdisk::MemBacking::new(img, "x.img")).unwrap())
}

fn open_bytes(img: Vec<u8>) -> fsview::Result<Box<dyn FileSystem>> {
    fsview::open(Volume::whole(disk_of(img)))
}

fn read(fs: &mut dyn FileSystem, path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    let n = fs.read_file(path, &mut v).unwrap();
    assert_eq!(n, v.len() as u64, "{path}");
    v
}

/// The file's data ranges read back from `vol` (the volume's bytes), zero-filled to the
/// file size.
fn ranges_content(vol: &[u8], fs: &mut dyn FileSystem, path: &str, size: u64) -> Vec<u8> {
    let ranges = fs.data_ranges(path).unwrap().unwrap();
    let mut out = Vec::new();
    for (o, l) in ranges {
        out.extend_from_slice(&vol[o as usize..(o + l) as usize]);
    }
    out.resize(size as usize, 0);
    out
}

/// Everything in `src` must read back from `fs` (`vol`: the volume's bytes).
fn check(fs: &mut dyn FileSystem, src: &Path, vol: &[u8]) {
    assert_eq!(fs.kind(), FsKind::ExFat);
    assert_eq!(fs.label().as_deref(), Some(LABEL));
    let want = support::source_map(src);
    let got = support::fs_map(fs);
    let kinds: BTreeMap<_, _> = got
        .iter()
        .map(|(k, e)| (k.clone(), (e.kind, e.size)))
        .collect();
    assert_eq!(kinds, want);
    for (rel, e) in &got {
        let path = format!("/{rel}");
        assert_eq!(&fs.stat(&path).unwrap(), e, "{path}");
        assert_eq!(e.mtime, Some(MTIME as i64), "{path}");
        assert_eq!(e.mode, None);
        if e.kind == EntryKind::File {
            let data = read(fs, &path);
            assert!(
                data == std::fs::read(src.join(rel)).unwrap(),
                "{path}: content differs"
            );
            assert!(ranges_content(vol, fs, &path, e.size) == data, "{path}");
            assert!(matches!(fs.list(&path), Err(Error::WrongKind(_))));
        } else {
            assert!(matches!(
                fs.read_file(&path, &mut Vec::new()),
                Err(Error::WrongKind(_))
            ));
        }
        assert!(matches!(fs.read_link(&path), Err(Error::WrongKind(_))));
    }
    // Ids: distinct, and the File entry's volume offset (its type byte is 0x85).
    let mut ids = BTreeMap::new();
    for (rel, e) in &got {
        assert_eq!(vol[e.id as usize], 0x85, "{rel}");
        assert!(ids.insert(e.id, rel).is_none(), "{rel}: id shared");
    }
    assert_eq!(got["many"].kind, EntryKind::Dir);
    assert_eq!(fs.list("/many").unwrap().len(), 300);
    assert!(got.contains_key(&long_name()));
    // Case-insensitive lookup, one identity whatever the spelling.
    let a = fs.stat("/A/MIXED CASE NAME.TEXT").unwrap();
    assert_eq!(a.id, got["a/Mixed Case Name.Text"].id);
    assert_eq!(a.name, "Mixed Case Name.Text");
    let r = fs.stat("/R\u{c9}SUM\u{c9} \u{dc}.TXT").unwrap();
    assert_eq!(r.name, "r\u{e9}sum\u{e9} \u{fc}.txt");
    // The mtime was written as 15:50:31 local at UTC+5:30 (22 quarters), with the odd
    // second in the 10 ms field.
    let top = got["top.txt"].id as usize;
    assert_eq!((vol[top + 21], vol[top + 23]), (100, 0x80 | 22));
    // Contiguous (NoFatChain) and fragmented (FAT chain) files.
    let big = got["a/random.bin"].id as usize;
    assert_eq!(vol[big + 32], 0xC0, "stream extension");
    assert_eq!(vol[big + 33] & 2, 2, "random.bin written contiguously");
    assert_eq!(fs.data_ranges("/a/random.bin").unwrap().unwrap().len(), 1);
    let frag = got["frag/big.bin"].id as usize;
    assert_eq!(vol[frag + 33] & 2, 0, "big.bin has a FAT chain");
    let runs = fs.data_ranges("/frag/big.bin").unwrap().unwrap();
    assert!(runs.len() >= 10, "big.bin fills the holes: {runs:?}");
    // The root.
    let root = fs.stat("/").unwrap();
    assert_eq!(
        (root.name.as_str(), root.kind, root.id),
        ("", EntryKind::Dir, 0)
    );
    // Errors.
    assert!(matches!(fs.stat("/nope"), Err(Error::NotFound(p)) if p == "/nope"));
    assert!(matches!(fs.list("/a/nope"), Err(Error::NotFound(_))));
    assert!(matches!(
        fs.stat("/top.txt/x"),
        Err(Error::WrongKind(_) | Error::NotFound(_))
    ));
    assert!(matches!(fs.stat("/a/../top.txt"), Err(Error::BadPath(_))));
}

#[test]
fn exfat_reads_what_exfat_fuse_wrote() {
    let fx = build();
    let vol = std::fs::read(&fx.img).unwrap();
    let disk = disk_of(vol.clone());
    assert_eq!(
        fsview::probe(disk.as_ref(), 0, disk.virtual_size()).unwrap(),
        FsKind::ExFat
    );
    assert!(FsKind::ExFat.supported());
    let fs = fsview::open(Volume::whole(disk)).unwrap();
    // Opened on one thread, browsed on another (the trait object is `Send`).
    let (src, v) = (fx.src.clone(), vol.clone());
    std::thread::spawn(move || {
        let mut fs = fs;
        check(fs.as_mut(), &src, &v)
    })
    .join()
    .unwrap();

    // Inside MBR (type 7) and GPT (basic data) disks.
    for gpt in [false, true] {
        let disk_path = fx.img.with_extension(if gpt { "gpt" } else { "mbr" });
        let ty = if gpt { support::GPT_BASIC_DATA } else { "7" };
        assert_eq!(
            support::partitioned_disk(&disk_path, gpt, &[(&fx.img, ty)]),
            [MIB]
        );
        let d: Arc<dyn vdisk::VirtualDisk> = Arc::from(vdisk::open(&disk_path).unwrap());
        let t = read_partitions(d.as_ref()).unwrap();
        let p = &t.partitions[0];
        assert_eq!((p.start, p.length), (MIB, IMG_SIZE));
        assert_eq!(
            fsview::probe(d.as_ref(), p.start, p.length).unwrap(),
            FsKind::ExFat
        );
        let mut fs = fsview::open(Volume::new(d, p.start, p.length).unwrap()).unwrap();
        check(fs.as_mut(), &fx.src, &vol);
    }

    // Extraction of the whole tree.
    let out = tempfile::tempdir().unwrap();
    let mut fs = open_bytes(vol.clone()).unwrap();
    let mut report = fsview::Report::default();
    fsview::extract(fs.as_mut(), "/", out.path(), &mut report).unwrap();
    assert!(report.renamed.is_empty(), "{:?}", report.renamed);
    for (rel, (kind, _)) in support::source_map(&fx.src) {
        if kind == EntryKind::File {
            assert!(
                std::fs::read(out.path().join(&rel)).unwrap()
                    == std::fs::read(fx.src.join(&rel)).unwrap(),
                "{rel}"
            );
        }
    }
}

/// Boot-sector numbers of an image.
struct Geo {
    fat: usize,
    heap: usize,
    cluster: usize,
    count: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn geo(b: &[u8]) -> Geo {
    let bps = 1usize << b[0x6C];
    Geo {
        fat: le32(b, 0x50) as usize * bps,
        heap: le32(b, 0x58) as usize * bps,
        cluster: bps << b[0x6D],
        count: le32(b, 0x5C),
    }
}

/// Recomputes the SetChecksum of the entry set at `at`.
fn fix_set_checksum(b: &mut [u8], at: usize) {
    let n = 32 * (1 + usize::from(b[at + 1]));
    let mut c: u16 = 0;
    for (i, x) in b[at..at + n].iter().enumerate() {
        if i != 2 && i != 3 {
            c = c.rotate_right(1).wrapping_add(u16::from(*x));
        }
    }
    b[at + 2..at + 4].copy_from_slice(&c.to_le_bytes());
}

fn set_fat(b: &mut [u8], g: &Geo, cluster: u32, value: u32) {
    let at = g.fat + 4 * cluster as usize;
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn exfat_damaged_copies_are_errors() {
    let fx = build();
    let clean = std::fs::read(&fx.img).unwrap();
    let g = geo(&clean);
    let corrupt = |r: fsview::Result<u64>| match r {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    };
    let (frag, random, deep_dir) = {
        let mut fs = open_bytes(clean.clone()).unwrap();
        (
            fs.stat("/frag/big.bin").unwrap().id as usize,
            fs.stat("/a/random.bin").unwrap().id as usize,
            fs.stat("/a/b").unwrap().id as usize,
        )
    };
    let first = |b: &[u8], id: usize| le32(b, id + 32 + 20);

    // A FAT loop: the fragmented file's second cluster chains back to its first.
    let mut b = clean.clone();
    let c1 = first(&b, frag);
    let c2 = le32(&b, g.fat + 4 * c1 as usize);
    set_fat(&mut b, &g, c2, c1);
    let mut fs = open_bytes(b).unwrap();
    corrupt(fs.read_file("/frag/big.bin", &mut std::io::sink()));
    assert!(fs.data_ranges("/frag/big.bin").is_err());
    // A cluster chaining past ClusterCount, and to cluster 1.
    for bad in [g.count + 2, 1, 0xFFFF_FFF7] {
        let mut b = clean.clone();
        set_fat(&mut b, &g, c1, bad);
        let mut fs = open_bytes(b).unwrap();
        corrupt(fs.read_file("/frag/big.bin", &mut std::io::sink()));
    }
    // A first cluster past ClusterCount (contiguous file), checksum kept valid.
    let mut b = clean.clone();
    let at = random + 32 + 20;
    b[at..at + 4].copy_from_slice(&(g.count - 3).to_le_bytes());
    fix_set_checksum(&mut b, random);
    let mut fs = open_bytes(b).unwrap();
    corrupt(fs.read_file("/a/random.bin", &mut std::io::sink()));
    assert_eq!(read(fs.as_mut(), "/a/b/c/deep.txt"), b"deep ".repeat(1000));
    // ValidDataLength short of DataLength: the rest reads as zeros, and is not a range.
    let mut b = clean.clone();
    let valid = 1_000_000u64;
    b[random + 32 + 8..random + 32 + 16].copy_from_slice(&valid.to_le_bytes());
    fix_set_checksum(&mut b, random);
    let mut fs = open_bytes(b).unwrap();
    let data = read(fs.as_mut(), "/a/random.bin");
    let want = std::fs::read(fx.src.join("a/random.bin")).unwrap();
    assert_eq!(data.len(), want.len());
    assert!(data[..valid as usize] == want[..valid as usize]);
    assert!(data[valid as usize..].iter().all(|b| *b == 0));
    let ranges = fs.data_ranges("/a/random.bin").unwrap().unwrap();
    assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), valid);
    // ValidDataLength past DataLength.
    let mut b = clean.clone();
    b[random + 32 + 8..random + 32 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    fix_set_checksum(&mut b, random);
    let mut fs = open_bytes(b).unwrap();
    assert!(matches!(fs.list("/a"), Err(Error::Corrupt { .. })));
    // A bad SetChecksum: the folder holding the set cannot be listed.
    let mut b = clean.clone();
    b[random + 2] ^= 0x55;
    let mut fs = open_bytes(b).unwrap();
    assert!(matches!(fs.list("/a"), Err(Error::Corrupt { .. })));
    assert!(matches!(
        fs.stat("/a/random.bin"),
        Err(Error::Corrupt { .. })
    ));
    assert_eq!(fs.list("/many").unwrap().len(), 300);
    // A folder whose data length is absurd.
    let mut b = clean.clone();
    let at = deep_dir + 32 + 24;
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    fix_set_checksum(&mut b, deep_dir);
    let mut fs = open_bytes(b).unwrap();
    assert!(matches!(fs.list("/a/b"), Err(Error::Corrupt { .. })));
    // The root folder's FAT entry loops onto itself: a bounded chain, then an error.
    let mut b = clean.clone();
    let root = le32(&b, 0x60);
    set_fat(&mut b, &g, root, root);
    assert!(matches!(open_bytes(b), Err(Error::Corrupt { .. })));

    // Boot sector: damage to the main one is survived through the backup; to both, not.
    let mut b = clean.clone();
    b[0x64] ^= 0xFF; // serial number: the checksum no longer matches
    open_bytes(b.clone()).unwrap();
    let bps = 1usize << clean[0x6C];
    b[12 * bps + 0x64] ^= 0xFF;
    assert!(matches!(open_bytes(b), Err(Error::Corrupt { .. })));
    let mut b = clean.clone();
    b[0x6D] = 20; // 512-byte sectors times 2^20: clusters over 32 MiB
    b[12 * bps + 0x6D] = 20;
    assert!(matches!(open_bytes(b), Err(Error::Corrupt { .. })));

    // Truncated images.
    for len in [IMG_SIZE as usize / 2, g.heap + g.cluster, 4096, 600] {
        let e = open_bytes(clean[..len].to_vec()).err().expect("truncated");
        assert!(matches!(e, Error::Corrupt { .. }), "{len}: {e}");
    }

    // Random damage to the FAT and the first clusters (the root folder and the first
    // folders): whatever happens, no panic, no hang.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let t0 = Instant::now();
    for round in 0..60 {
        let mut b = clean.clone();
        for _ in 0..16 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = if round % 2 == 0 {
                g.fat + (x >> 8) as usize % (4 * 64)
            } else {
                g.heap + (x >> 8) as usize % (16 * g.cluster)
            };
            b[off] = (x >> 32) as u8;
        }
        if let Ok(mut fs) = open_bytes(b) {
            support::walk_ignoring_errors(fs.as_mut(), "/", 0);
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
}
