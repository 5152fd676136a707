//! qcow2 against qemu-img: reading what qemu-img writes, writing what qemu-img accepts,
//! and refusing or reporting damaged images.
mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vdisk::{CreateOptions, ExtentState, Format, Severity, Subformat};

/// A size that is not a multiple of any cluster size.
const ODD: u64 = (10 << 20) + 1536;

/// Flattens `img` with qemu-img and checks our reader and check against it.
fn assert_reads_like_qemu(img: &Path) {
    let raw = img.with_extension("flat");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&["convert", "-O", "raw", s(img), s(&raw)]);
    let disk = vdisk::open(img).unwrap();
    assert_eq!(disk.info().format, Format::Qcow2);
    assert_disk_matches_raw(disk.as_ref(), &raw);
    assert_check_clean(img);
}

fn assert_check_clean(img: &Path) {
    let r = vdisk::check::check(img);
    assert!(
        r.problems.is_empty(),
        "check {}: {:#?}",
        img.display(),
        r.problems
    );
    assert!(!r.checked.is_empty());
}

fn make(
    d: &tempfile::TempDir,
    name: &str,
    size: u64,
    seed: u64,
    opts: &[&str],
) -> std::path::PathBuf {
    let raw = path(d, &format!("{name}.src"));
    gen_raw(&raw, size, seed);
    let img = path(d, name);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.push(s(&raw));
    args.push(s(&img));
    qemu_img(&args);
    img
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn read_be64(p: &Path, at: u64) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn open_err(p: &Path) -> String {
    vdisk::open(p).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn qemu_v2_and_v3_cluster_sizes() {
    let d = tmp();
    for (i, (compat, cs)) in [
        ("0.10", "64k"),
        ("1.1", "4k"),
        ("1.1", "64k"),
        ("1.1", "2M"),
        ("0.10", "2M"),
    ]
    .into_iter()
    .enumerate()
    {
        let o = format!("compat={compat},cluster_size={cs}");
        let img = make(&d, &format!("v{i}.qcow2"), ODD, i as u64 + 10, &["-o", &o]);
        assert_reads_like_qemu(&img);
        let info = vdisk::open(&img).unwrap().info();
        assert_eq!(info.subformat, Subformat::Dynamic);
        assert!(
            info.details
                .iter()
                .any(|(k, v)| k == "compat" && v == compat),
            "{:?}",
            info.details
        );
    }
}

#[test]
fn qemu_compressed_zlib_and_zstd() {
    let d = tmp();
    let z = make(&d, "zlib.qcow2", ODD, 21, &["-c"]);
    assert_reads_like_qemu(&z);
    let zs = make(
        &d,
        "zstd.qcow2",
        ODD,
        22,
        &["-c", "-o", "compression_type=zstd,cluster_size=4k"],
    );
    assert_reads_like_qemu(&zs);
    let info = vdisk::open(&zs).unwrap().info();
    assert!(
        info.details
            .iter()
            .any(|(k, v)| k == "compression type" && v == "zstd")
    );
    // compressed qcow2 → our raw → identical
    let out = path(&d, "out.raw");
    vdisk::convert(
        &zs,
        &out,
        &CreateOptions::new(Format::Raw, Subformat::Fixed, 0),
        &mut |_, _| {},
    )
    .unwrap();
    qemu_compare(&zs, "qcow2", &out, "raw");
}

#[test]
fn qemu_zero_clusters() {
    let d = tmp();
    let img = make(&d, "z.qcow2", 8 << 20, 31, &[]);
    qemu_io(
        &img,
        &["write -z 0 1M", "write -z 3M 64k", "write -z -u 5M 128k"],
    );
    assert_reads_like_qemu(&img);
    let disk = vdisk::open(&img).unwrap();
    let m = disk.map(0, 1 << 20).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].state, ExtentState::Zero);
}

#[test]
fn qemu_backing_chain_depth_three() {
    let d = tmp();
    make(&d, "base.qcow2", 8 << 20, 41, &[]);
    let mid = path(&d, "mid.qcow2");
    let top = path(&d, "top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&mid),
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0x11 1M 1M",
            "write -z 3M 512k",
            "write -P 0x12 7M 4k",
        ],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "12M",
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x21 1536k 64k",
            "write -P 0x22 9M 1M",
            "write -z 7M 4k",
        ],
    );
    assert_reads_like_qemu(&top);
    let info = vdisk::open(&top).unwrap().info();
    assert_eq!(info.subformat, Subformat::Differencing);
    let p = info.parent.unwrap();
    assert_eq!(p.path, mid);
    assert!(p.parent.is_some());
}

#[test]
fn qemu_backing_smaller_and_raw_declared() {
    let d = tmp();
    let base = path(&d, "base.raw");
    gen_raw(&base, 3 << 20, 51);
    let top = path(&d, "top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&top),
        "8M",
    ]);
    qemu_io(&top, &["write -P 0x33 2M 2M"]);
    assert_reads_like_qemu(&top);
    let info = vdisk::open(&top).unwrap().info();
    assert_eq!(info.parent.unwrap().format, Format::Raw);
}

#[test]
fn qemu_extended_l2_subclusters() {
    let d = tmp();
    let base = make(&d, "base.qcow2", 4 << 20, 61, &[]);
    let top = path(&d, "top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x44 6k 4k",
            "write -z 70k 2k",
            "write -P 0x45 1M 130k",
        ],
    );
    assert_reads_like_qemu(&top);
    let _ = base;
}

#[test]
fn ours_convert_to_qcow2_passes_qemu_check() {
    let d = tmp();
    for (i, (size, cs)) in [
        (16u64 << 20, None),
        (ODD, Some(4096u64)),
        (ODD, Some(2u64 << 20)),
    ]
    .into_iter()
    .enumerate()
    {
        let src = path(&d, &format!("src{i}.img"));
        gen_raw(&src, size, 70 + i as u64);
        let dst = path(&d, &format!("dst{i}.qcow2"));
        let mut opts = CreateOptions::new(Format::Qcow2, Subformat::Dynamic, 0);
        opts.block_size = cs;
        vdisk::convert(&src, &dst, &opts, &mut |_, _| {}).unwrap();
        let out = qemu_img(&["check", "-f", "qcow2", s(&dst)]);
        assert!(out.contains("No errors were found"), "{out}");
        assert!(!out.contains("leaked"), "{out}");
        qemu_compare(&src, "raw", &dst, "qcow2");
        assert_reads_like_qemu(&dst);
        // zero ranges stay unallocated: no larger than what qemu-img writes
        let theirs = path(&d, &format!("qemu{i}.qcow2"));
        let o = format!("cluster_size={}", cs.unwrap_or(65536));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            s(&src),
            s(&theirs),
        ]);
        let ours = std::fs::metadata(&dst).unwrap().len();
        let qemu = std::fs::metadata(&theirs).unwrap().len();
        assert!(
            ours <= qemu + 4 * cs.unwrap_or(65536),
            "ours {ours} qemu {qemu}"
        );
    }
}

#[test]
fn ours_empty_and_tiny_images() {
    let d = tmp();
    for size in [0u64, 512, 3 << 20] {
        let dst = path(&d, &format!("e{size}.qcow2"));
        let mut sink = vdisk::create(
            &dst,
            &CreateOptions::new(Format::Qcow2, Subformat::Dynamic, size),
        )
        .unwrap();
        if size > 0 {
            sink.write_data(0, &[7u8; 512]).unwrap();
        }
        sink.finish().unwrap();
        qemu_check(&dst, "qcow2");
        assert_check_clean(&dst);
        assert_eq!(vdisk::open(&dst).unwrap().virtual_size(), size);
    }
}

#[test]
fn corrupt_headers_are_refused() {
    let d = tmp();
    let good = make(&d, "good.qcow2", 4 << 20, 81, &[]);
    let bytes = std::fs::read(&good).unwrap();
    let variant = |name: &str, f: &dyn Fn(&Path)| {
        let p = path(&d, name);
        std::fs::write(&p, &bytes).unwrap();
        f(&p);
        p
    };
    let t = variant("trunc.qcow2", &|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(50)
            .unwrap()
    });
    assert!(open_err(&t).contains("truncated"), "{}", open_err(&t));
    let v = variant("ver.qcow2", &|p| patch(p, 4, &7u32.to_be_bytes()));
    assert!(open_err(&v).contains("version 7"), "{}", open_err(&v));
    let e = variant("enc.qcow2", &|p| patch(p, 32, &1u32.to_be_bytes()));
    assert!(open_err(&e).contains("encrypted"), "{}", open_err(&e));
    let x = variant("ext.qcow2", &|p| patch(p, 72, &4u64.to_be_bytes()));
    assert!(
        open_err(&x).contains("external data file"),
        "{}",
        open_err(&x)
    );
    let u = variant("unk.qcow2", &|p| patch(p, 72, &(1u64 << 9).to_be_bytes()));
    assert!(
        open_err(&u).contains("incompatible feature bit 9"),
        "{}",
        open_err(&u)
    );
    let c = variant("cb.qcow2", &|p| patch(p, 20, &30u32.to_be_bytes()));
    assert!(open_err(&c).contains("cluster_bits"), "{}", open_err(&c));
    let s_ = variant("size.qcow2", &|p| patch(p, 24, &(1u64 << 62).to_be_bytes()));
    assert!(open_err(&s_).contains("L1 table"), "{}", open_err(&s_));
    let l = variant("l1size.qcow2", &|p| patch(p, 36, &u32::MAX.to_be_bytes()));
    assert!(open_err(&l).contains("exceeds 32 MiB"), "{}", open_err(&l));
    let o = variant("l1off.qcow2", &|p| {
        patch(p, 40, &(1u64 << 40).to_be_bytes())
    });
    assert!(open_err(&o).contains("beyond the end"), "{}", open_err(&o));
    // each is reported by check too, never a panic
    for p in [&t, &v, &e, &x, &c, &s_, &l, &o] {
        let r = vdisk::check::check(p);
        assert!(!r.problems.is_empty(), "{}", p.display());
    }
    // bad magic: no longer detected as qcow2 at all
    let m = variant("magic.qcow2", &|p| patch(p, 0, b"QFI\0"));
    assert_ne!(vdisk::open(&m).unwrap().info().format, Format::Qcow2);
}

/// Offset of the first L2 table and its first non-zero entry's position.
fn first_l2(p: &Path) -> (u64, u64) {
    let l1_off = read_be64(p, 40);
    let l2 = read_be64(p, l1_off) & 0x00ff_ffff_ffff_fe00;
    let mut at = l2;
    while read_be64(p, at) == 0 {
        at += 8;
    }
    (l2, at)
}

#[test]
fn corrupt_tables_are_reported() {
    let d = tmp();
    let good = make(&d, "good.qcow2", 4 << 20, 91, &[]);
    let bytes = std::fs::read(&good).unwrap();
    let copy = |name: &str| {
        let p = path(&d, name);
        std::fs::write(&p, &bytes).unwrap();
        p
    };
    // L2 entry beyond EOF: read error and check error
    let p = copy("l2eof.qcow2");
    let (_, at) = first_l2(&p);
    patch(&p, at, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    let disk = vdisk::open(&p).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let err = disk.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(err.contains("beyond the end"), "{err}");
    let r = vdisk::check::check(&p);
    assert!(r.is_damaged());
    assert_problem(&r, "beyond the end");

    // Two L2 entries pointing at the same data cluster: overlap and refcount error.
    let p = copy("dup.qcow2");
    let (_, at) = first_l2(&p);
    let e = read_be64(&p, at);
    patch(&p, at + 8, &e.to_be_bytes());
    let r = vdisk::check::check(&p);
    assert_problem(&r, "overlaps");
    assert_problem(&r, "lower than");

    // L1 entry pointing at the L1 table itself (overlapping metadata).
    let p = copy("l2overlap.qcow2");
    let l1_off = read_be64(&p, 40);
    patch(
        &p,
        l1_off,
        &((1u64 << 63) | read_be64(&p, 48)).to_be_bytes(),
    );
    let r = vdisk::check::check(&p);
    assert_problem(&r, "overlaps the refcount table");

    // Leaked cluster: warning only.
    let p = copy("leak.qcow2");
    let (_, at) = first_l2(&p);
    patch(&p, at, &0u64.to_be_bytes());
    let r = vdisk::check::check(&p);
    assert!(!r.is_damaged(), "{:#?}", r.problems);
    assert!(
        r.problems
            .iter()
            .any(|x| x.severity == Severity::Warning && x.detail.contains("leaked"))
    );
}

#[test]
fn corrupt_compressed_cluster_gives_clear_error() {
    let d = tmp();
    let img = make(&d, "c.qcow2", 2 << 20, 101, &["-c"]);
    let (_, at) = first_l2(&img);
    let e = read_be64(&img, at);
    assert!(e & (1 << 62) != 0);
    let coff = e & ((1u64 << 54) - 1);
    patch(&img, coff, &[0xff; 64]);
    let disk = vdisk::open(&img).unwrap();
    let mut buf = vec![0u8; 65536];
    let err = disk.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(err.contains("compressed cluster"), "{err}");
}

#[test]
fn backing_loop_and_missing_backing() {
    let d = tmp();
    let a = path(&d, "a.qcow2");
    let b = path(&d, "b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
    ]);
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        s(&a),
    ]);
    let err = open_err(&a);
    assert!(err.contains("loop"), "{err}");
    let r = vdisk::check::check(&a);
    assert_problem(&r, "loop");

    let c = path(&d, "c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        s(&c),
        "1M",
    ]);
    let err = open_err(&c);
    assert!(err.contains("does not exist"), "{err}");
    assert!(vdisk::check::check(&c).is_damaged());
}
