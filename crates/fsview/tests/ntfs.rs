//! NTFS written by the real tools: mkntfs formats, the ntfs-3g FUSE mount (as root)
//! fills it (folders, Unicode names, a hard link, an Interix symlink as ntfs-3g makes them,
//! Windows reparse-point symlinks set through `system.ntfs_reparse_data`, a sparse file,
//! LZNT1-compressed files in a folder with the compressed attribute, pagefile.sys), then
//! fsview must read back exactly what was written. A missing tool fails the test with an
//! install hint (see scripts/install-deps).

use fsview::{EntryKind, Error, FileSystem, FsKind, Volume, read_partitions};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;
use support::{MIB, Mount, random_bytes, setxattr};

/// Runs a tool (see [`support::run`]). Returns stdout.
fn run(tool: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    support::run(tool, args, stdin, &[])
}

fn mkntfs(img: &Path, size: u64) {
    support::mkntfs(img, size, "TESTNTFS");
}

/// Reparse data of a Windows symlink (IO_REPARSE_TAG_SYMLINK).
fn symlink_reparse(sub: &str, print: &str, relative: bool) -> Vec<u8> {
    let u = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let (sub, print) = (u(sub), u(print));
    let mut buf = Vec::new();
    for v in [0, sub.len(), sub.len(), print.len()] {
        buf.extend_from_slice(&(v as u16).to_le_bytes());
    }
    buf.extend_from_slice(&(relative as u32).to_le_bytes());
    buf.extend_from_slice(&sub);
    buf.extend_from_slice(&print);
    let mut d = 0xA000_000Cu32.to_le_bytes().to_vec();
    d.extend_from_slice(&(buf.len() as u16).to_le_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&buf);
    d
}

struct Fixture {
    _dir: tempfile::TempDir,
    img: PathBuf,
    /// Path inside the file system -> content.
    files: BTreeMap<&'static str, Vec<u8>>,
}

const PAGEFILE_LEN: usize = 16 << 20;

fn pagefile() -> Vec<u8> {
    b"PAGEFILE".repeat(PAGEFILE_LEN / 8)
}

/// The 64 MiB image every test reads (built in its own tempdir).
fn build() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ntfs.img");
    mkntfs(&img, 64 * MIB);
    let mut files: BTreeMap<&'static str, Vec<u8>> = BTreeMap::new();
    files.insert(
        "Users/alice/Documents/report.txt",
        b"quarterly numbers\n".to_vec(),
    );
    files.insert(
        "Users/alice/Documents/résumé ü.txt",
        "café naïve\n".as_bytes().to_vec(),
    );
    files.insert("日本語.txt", "こんにちは\n".as_bytes().to_vec());
    files.insert("Windows/System32/empty.dll", Vec::new());
    files.insert(
        "Users/alice/big.bin",
        random_bytes(3 * MIB as usize + 123, 42),
    );
    let text: Vec<u8> = b"All work and no play makes Jack a dull boy. 0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize + 4321)
        .collect();
    files.insert("compressed/text.txt", text.clone());
    files.insert("compressed/random.bin", random_bytes(200 << 10, 7));
    let mut holes = text[..100_000].to_vec();
    holes.extend(std::iter::repeat_n(0u8, 300_000));
    holes.extend_from_slice(&text[..77_777]);
    files.insert("compressed/holes.bin", holes);
    // Enough units (each: compressed clusters + a sparse run) to need an $ATTRIBUTE_LIST.
    let mut big_text = Vec::new();
    for i in 0..240 * 1024u32 {
        big_text.extend_from_slice(
            format!("line {i:08} of a long and compressible text file ....\n").as_bytes(),
        );
    }
    files.insert("compressed/big-text.txt", big_text);
    files.insert("pagefile.sys", pagefile());

    let m = Mount::new(&img, &dir.path().join("mnt"));
    std::fs::create_dir(m.path("compressed")).unwrap();
    // FILE_ATTRIBUTE_COMPRESSED on the folder: files created inside inherit it.
    support::set_ntfs_compressed(&m.path("compressed"));
    for (p, data) in &files {
        let full = m.path(p);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, data).unwrap();
    }
    std::fs::create_dir_all(m.path("Program Files/App")).unwrap();
    std::fs::create_dir(m.path("empty_dir")).unwrap();
    // An 8.3 alias (a DOS-namespace $FILE_NAME next to the Win32 one), as Windows makes.
    setxattr(
        &m.path("Program Files"),
        "system.ntfs_dos_name",
        b"PROGRA~1",
    );
    // Sparse: 8 MiB with data only at both ends (written past the end: a hole).
    let f = std::fs::File::create(m.path("sparse.bin")).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", 8 * MIB - 4).unwrap();
    drop(f);
    let mut sparse = vec![0u8; 8 * MIB as usize];
    sparse[..4].copy_from_slice(b"head");
    sparse[8 * MIB as usize - 4..].copy_from_slice(b"tail");
    files.insert("sparse.bin", sparse);
    // 4 KiB written every 8 KiB: 1200 runs (data, hole, data...), more than one MFT
    // record holds, so ntfs-3g spreads $DATA over extension records (an $ATTRIBUTE_LIST).
    let f = std::fs::File::create(m.path("holey.bin")).unwrap();
    let mut holey = vec![0u8; 599 * 8192 + 4096];
    for i in 0..600u64 {
        let piece = [(i % 251 + 1) as u8; 4096];
        f.write_all_at(&piece, i * 8192).unwrap();
        holey[i as usize * 8192..][..4096].copy_from_slice(&piece);
    }
    drop(f);
    files.insert("holey.bin", holey);
    std::fs::hard_link(
        m.path("Users/alice/Documents/report.txt"),
        m.path("Users/alice/report-link.txt"),
    )
    .unwrap();
    // ntfs-3g makes `ln -s` an Interix symlink.
    std::os::unix::fs::symlink("Documents/report.txt", m.path("Users/alice/link-to-report"))
        .unwrap();
    // Windows symlinks (reparse points): absolute and relative.
    std::fs::write(m.path("winlink-abs"), b"").unwrap();
    setxattr(
        &m.path("winlink-abs"),
        "system.ntfs_reparse_data",
        &symlink_reparse(r"\??\C:\Users\alice", r"C:\Users\alice", false),
    );
    std::fs::write(m.path("winlink-rel"), b"").unwrap();
    setxattr(
        &m.path("winlink-rel"),
        "system.ntfs_reparse_data",
        &symlink_reparse(r"Users\alice", r"Users\alice", true),
    );
    m.unmount();
    Fixture {
        _dir: dir,
        img,
        files,
    }
}

fn open_img(img: &Path) -> Box<dyn FileSystem> {
    let disk: Arc<dyn vdisk::VirtualDisk> = Arc::from(vdisk::open(img).unwrap());
    fsview::open(Volume::whole(disk)).unwrap()
}

fn read(fs: &mut dyn FileSystem, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let n = fs
        .read_file(path, &mut out)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(n, out.len() as u64, "{path}");
    out
}

/// The $DATA section of `ntfsinfo -F path img`.
fn ntfsinfo_data(img: &Path, path: &str) -> String {
    let out = run("ntfsinfo", &["-F", path, img.to_str().unwrap()], None);
    out.split("Dumping attribute $DATA")
        .nth(1)
        .unwrap_or_else(|| panic!("no $DATA for {path} in ntfsinfo output:\n{out}"))
        .to_string()
}

fn field(section: &str, name: &str) -> u64 {
    let line = section
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no {name:?} in\n{section}"));
    let v = line
        .split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    v.parse().unwrap_or_else(|_| panic!("{line}"))
}

#[test]
fn ntfs_reads_what_ntfs3g_wrote() {
    let fx = build();
    let mut fs = open_img(&fx.img);
    assert_eq!(fs.kind(), FsKind::Ntfs);
    assert_eq!(fs.label().as_deref(), Some("TESTNTFS"));

    // Every file, byte for byte.
    for (p, data) in &fx.files {
        let got = read(fs.as_mut(), &format!("/{p}"));
        assert!(
            got == *data,
            "/{p}: {} bytes read, {} written",
            got.len(),
            data.len()
        );
        let st = fs.stat(p).unwrap();
        assert_eq!(st.kind, EntryKind::File, "{p}");
        assert_eq!(st.size, data.len() as u64, "{p}");
        assert_eq!(st.name, p.rsplit('/').next().unwrap());
    }

    // The root: no metafiles, no ".", Unicode names as written.
    let root = fs.list("/").unwrap();
    let names: Vec<(&str, EntryKind)> = root.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    let mut want = vec![
        ("Program Files", EntryKind::Dir),
        ("Users", EntryKind::Dir),
        ("Windows", EntryKind::Dir),
        ("compressed", EntryKind::Dir),
        ("empty_dir", EntryKind::Dir),
        ("pagefile.sys", EntryKind::File),
        ("sparse.bin", EntryKind::File),
        ("holey.bin", EntryKind::File),
        ("winlink-abs", EntryKind::Symlink),
        ("winlink-rel", EntryKind::Symlink),
        ("日本語.txt", EntryKind::File),
    ];
    let mut got = names.clone();
    got.sort_by_key(|e| e.0);
    want.sort_by_key(|e| e.0);
    assert_eq!(got, want, "root listing: {root:#?}");
    let pf = root.iter().find(|e| e.name == "pagefile.sys").unwrap();
    assert_eq!(pf.size, PAGEFILE_LEN as u64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mt = pf.mtime.unwrap();
    assert!(
        (now - 3600..=now + 60).contains(&mt),
        "mtime {mt} vs now {now}"
    );
    assert!(pf.mode.is_none());
    assert!(fs.list("/empty_dir").unwrap().is_empty());

    // The 8.3 alias is not listed, but it resolves (to the long name).
    let pf_dir = fs.stat("/PROGRA~1").unwrap();
    assert_eq!(pf_dir.name, "Program Files");
    assert_eq!(pf_dir.id, fs.stat("/Program Files").unwrap().id);
    assert_eq!(fs.list("/progra~1").unwrap()[0].name, "App");

    // Case-insensitive lookup; long names (no 8.3 duplicates) in listings.
    assert_eq!(
        read(fs.as_mut(), "/USERS/Alice/documents/REPORT.TXT"),
        b"quarterly numbers\n"
    );
    let docs = fs.list("/Users/alice/Documents").unwrap();
    let mut dn: Vec<&str> = docs.iter().map(|e| e.name.as_str()).collect();
    dn.sort();
    assert_eq!(dn, ["report.txt", "résumé ü.txt"]);
    assert!(matches!(fs.stat("/RÉSUMÉ Ü.TXT"), Err(Error::NotFound(_))));
    assert_eq!(
        fs.stat("/users/alice/documents/RÉSUMÉ Ü.TXT").unwrap().name,
        "résumé ü.txt"
    );

    // Hard links share the MFT record.
    let a = fs.stat("/Users/alice/Documents/report.txt").unwrap();
    let b = fs.stat("/Users/alice/report-link.txt").unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(b.name, "report-link.txt");
    assert_eq!(
        read(fs.as_mut(), "/Users/alice/report-link.txt"),
        b"quarterly numbers\n"
    );
    assert_ne!(a.id, fs.stat("/Users/alice/big.bin").unwrap().id);

    // Symlinks: Interix (ntfs-3g) and reparse points.
    let alice = fs.list("/Users/alice").unwrap();
    let l = alice.iter().find(|e| e.name == "link-to-report").unwrap();
    assert_eq!(l.kind, EntryKind::Symlink);
    assert_eq!(l.size, "Documents/report.txt".len() as u64);
    assert_eq!(
        fs.read_link("/Users/alice/link-to-report").unwrap(),
        "Documents/report.txt"
    );
    assert_eq!(fs.read_link("/winlink-abs").unwrap(), r"C:\Users\alice");
    assert_eq!(fs.read_link("/winlink-rel").unwrap(), "Users/alice");
    assert!(matches!(
        fs.read_link("/Users/alice/big.bin"),
        Err(Error::WrongKind(_))
    ));
    assert!(matches!(fs.read_link("/Users"), Err(Error::WrongKind(_))));

    // Compressed on disk (attribute flag 0x0001, fewer clusters than the data).
    for (p, small) in [
        ("/compressed/text.txt", true),
        ("/compressed/random.bin", false),
        ("/compressed/holes.bin", true),
        ("/compressed/big-text.txt", true),
    ] {
        let s = ntfsinfo_data(&fx.img, p);
        assert!(
            s.contains("Attribute flags:\t 0x0001"),
            "{p} not compressed:\n{s}"
        );
        let data = field(&s, "Data size:");
        let comp = field(&s, "Compressed size:");
        if small {
            assert!(comp * 2 < data, "{p}: compressed size {comp} of {data}");
        }
    }
    assert!(fs.data_ranges("/compressed/text.txt").unwrap().is_none());

    // Both multi-record files really have an attribute list.
    for p in ["/holey.bin", "/compressed/big-text.txt"] {
        let out = run("ntfsinfo", &["-F", p, fx.img.to_str().unwrap()], None);
        assert!(
            out.contains("$ATTRIBUTE_LIST"),
            "{p}: no attribute list:\n{out}"
        );
    }
    let ranges = fs.data_ranges("/holey.bin").unwrap().unwrap();
    assert_eq!(ranges.len(), 600, "{ranges:?}");
    assert!(ranges.iter().all(|r| r.1 == 4096));

    // Sparse: the runs hold far less than the file.
    let s = ntfsinfo_data(&fx.img, "/sparse.bin");
    assert!(
        s.contains("Attribute flags:\t 0x8000"),
        "sparse.bin not sparse:\n{s}"
    );
    let ranges = fs.data_ranges("/sparse.bin").unwrap().unwrap();
    let held: u64 = ranges.iter().map(|r| r.1).sum();
    assert!(held < MIB, "sparse.bin: {ranges:?}");

    // pagefile.sys: its clusters, read straight from the volume, are the pattern.
    let disk: Arc<dyn vdisk::VirtualDisk> = Arc::from(vdisk::open(&fx.img).unwrap());
    let vol = Volume::whole(disk);
    let ranges = fs.data_ranges("/pagefile.sys").unwrap().unwrap();
    let mut raw = Vec::new();
    for (off, len) in &ranges {
        let mut b = vec![0u8; *len as usize];
        vol.read_at(&mut b, *off).unwrap();
        raw.extend_from_slice(&b);
    }
    assert!(raw == pagefile(), "pagefile ranges {ranges:?}");
    // Resident data has no ranges.
    assert!(
        fs.data_ranges("/Users/alice/Documents/report.txt")
            .unwrap()
            .is_none()
    );

    // Errors.
    assert!(matches!(fs.stat("/nope"), Err(Error::NotFound(_))));
    assert!(matches!(fs.list("/Users/nobody"), Err(Error::NotFound(_))));
    assert!(matches!(fs.list("/pagefile.sys"), Err(Error::WrongKind(_))));
    assert!(matches!(
        fs.stat("/pagefile.sys/x"),
        Err(Error::WrongKind(_))
    ));
    assert!(matches!(
        fs.read_file("/Users", &mut Vec::new()),
        Err(Error::WrongKind(_))
    ));
    assert!(matches!(fs.stat("/a/../b"), Err(Error::BadPath(_))));
    let root = fs.stat("/").unwrap();
    assert_eq!((root.name.as_str(), root.kind), ("", EntryKind::Dir));
}

#[test]
fn ntfs_inside_a_gpt_disk() {
    let fx = build();
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("gpt.img");
    let fs_len = std::fs::metadata(&fx.img).unwrap().len();
    let disk_len = fs_len + 4 * MIB;
    std::fs::File::create(&disk_path)
        .unwrap()
        .set_len(disk_len)
        .unwrap();
    let script = format!(
        "label: gpt\nstart=2048, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
        fs_len / 512
    );
    run(
        "sfdisk",
        &["-q", disk_path.to_str().unwrap()],
        Some(script.as_bytes()),
    );
    let data = std::fs::read(&fx.img).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk_path)
        .unwrap()
        .write_all_at(&data, 2048 * 512)
        .unwrap();
    drop(data);

    let disk: Arc<dyn vdisk::VirtualDisk> = Arc::from(vdisk::open(&disk_path).unwrap());
    let table = read_partitions(disk.as_ref()).unwrap();
    let p = &table.partitions[0];
    assert_eq!(p.start, 2048 * 512);
    let vol = Volume::new(disk.clone(), p.start, p.length).unwrap();
    let mut fs = fsview::open(vol.clone()).unwrap();
    assert_eq!(fs.label().as_deref(), Some("TESTNTFS"));
    for (p, want) in &fx.files {
        assert!(read(fs.as_mut(), p) == *want, "{p}");
    }
    // Ranges are volume offsets.
    let ranges = fs.data_ranges("/pagefile.sys").unwrap().unwrap();
    let (off, len) = ranges[0];
    let mut b = vec![0u8; len.min(4096) as usize];
    vol.read_at(&mut b, off).unwrap();
    assert!(b.starts_with(b"PAGEFILE"));
}

/// Damaged copies: errors (or, for damage the reader does not need, success), never a
/// panic or a hang.
#[test]
fn ntfs_damaged_copies_are_errors() {
    let fx = build();
    let clean = std::fs::read(&fx.img).unwrap();
    let open = |img: Vec<u8>| -> fsview::Result<Box<dyn FileSystem>> {
        let disk: Arc<dyn vdisk::VirtualDisk> =
            Arc::from(vdisk::open_backing(vdisk::MemBacking::new(img, "bad.img")).unwrap());
        assert_eq!(
            fsview::probe(disk.as_ref(), 0, disk.virtual_size()).unwrap(),
            FsKind::Ntfs
        );
        fsview::open(Volume::whole(disk))
    };
    let le = |b: &[u8], at: usize, n: usize| -> u64 {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&b[at..at + n]);
        u64::from_le_bytes(a)
    };
    let cluster = le(&clean, 11, 2) * le(&clean, 13, 1);
    let mft = (le(&clean, 0x30, 8) * cluster) as usize;
    let rec = 1024usize;

    // Boot sector: invalid sectors-per-cluster; MFT beyond the volume end.
    let mut b = clean.clone();
    b[13] = 3;
    assert!(matches!(open(b), Err(Error::Corrupt { .. })));
    let mut b = clean.clone();
    b[0x30..0x38].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = open(b).err().expect("MFT past the end");
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");

    // The root directory's record (5) without its signature.
    let mut b = clean.clone();
    b[mft + 5 * rec..mft + 5 * rec + 4].copy_from_slice(b"BAAD");
    assert!(matches!(open(b), Err(Error::Corrupt { .. })));

    // A subdirectory's record: find "Users" through the clean image, then damage it.
    let users = open(clean.clone()).unwrap().stat("/Users").unwrap().id as usize;
    let at = mft + users * rec;
    let mut b = clean.clone();
    b[at + 0x14..at + 0x16].copy_from_slice(&0x3F0u16.to_le_bytes()); // first attribute offset
    let mut fs = open(b).unwrap();
    assert!(fs.list("/Users").is_err());
    // The root still lists, "Users" from its index entry.
    let root = fs.list("/").unwrap();
    let u = root.iter().find(|e| e.name == "Users").unwrap();
    assert_eq!((u.kind, u.id as usize), (EntryKind::Dir, users));
    assert!(fs.stat("/Users/alice/big.bin").is_err());
    assert_eq!(read(fs.as_mut(), "/pagefile.sys").len(), PAGEFILE_LEN);

    // Random damage to the first MFT records: whatever happens, no panic, no hang.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let t0 = Instant::now();
    for _ in 0..40 {
        let mut b = clean.clone();
        for _ in 0..24 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // The metafiles' records and the first user files' (ntfs-3g starts at 64),
            // in the used part of the record (header and attributes).
            let r = match x % 3 {
                0 => (x >> 40) as usize % 16,
                _ => 64 + (x >> 40) as usize % 32,
            };
            let off = (x >> 8) as usize % 0x1C0;
            b[mft + r * rec + off] = (x >> 32) as u8;
        }
        if let Ok(mut fs) = open(b) {
            support::walk_ignoring_errors(fs.as_mut(), "/", 0);
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
}
