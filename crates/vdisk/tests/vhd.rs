//! VHD against qemu-img (`vpc`): qemu-made images read by us, our images read by qemu,
//! differencing chains built by our writer, detection and damaged images.
mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vdisk::{CreateOptions, Error, ExtentState, Format, Subformat};

/// Converts raw `src` to a VHD with qemu-img.
fn qemu_to_vpc(src: &Path, dst: &Path, opts: &str) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        opts,
        s(src),
        s(dst),
    ]);
}

/// The raw bytes qemu reads from a VHD.
fn qemu_to_raw(src: &Path, dst: &Path) {
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", s(src), s(dst)]);
}

fn convert_ours(src: &Path, dst: &Path, sub: Subformat) {
    let opts = CreateOptions::new(Format::Vhd, sub, 0);
    vdisk::convert(src, dst, &opts, &mut |_, _| {}).unwrap();
}

fn assert_clean(p: &Path) {
    let r = vdisk::check::check(p);
    assert_eq!(r.format, Some(Format::Vhd));
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
    assert!(!r.checked.is_empty());
}

#[test]
fn reads_qemu_made_images() {
    let d = tmp();
    let src = path(&d, "src.img");
    // 10 MiB + 3 sectors: not a CHS size, so force_size matters.
    gen_raw(&src, (10 << 20) + 1536, 11);
    for opts in [
        "subformat=dynamic",
        "subformat=dynamic,force_size=on",
        "subformat=fixed",
        "subformat=fixed,force_size=on",
    ] {
        let img = path(&d, "img.bin");
        let reference = path(&d, "ref.raw");
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(&reference);
        qemu_to_vpc(&src, &img, opts);
        qemu_to_raw(&img, &reference);
        let disk = vdisk::open(&img).unwrap();
        let info = disk.info();
        assert_eq!(info.format, Format::Vhd, "{opts}");
        assert_eq!(
            disk.virtual_size(),
            qemu_virtual_size(&img, "vpc"),
            "{opts}"
        );
        if opts.contains("force_size") {
            assert_eq!(disk.virtual_size(), (10 << 20) + 1536, "{opts}");
        }
        assert_disk_matches_raw(disk.as_ref(), &reference);
        if opts.contains("dynamic") {
            assert_eq!(info.subformat, Subformat::Dynamic);
            assert_eq!(info.block_size, Some(2 << 20));
            let map = disk.map(0, disk.virtual_size()).unwrap();
            assert!(
                map.iter().any(|e| e.state == ExtentState::Unallocated),
                "{opts}: {map:?}"
            );
        } else {
            assert_eq!(info.subformat, Subformat::Fixed);
        }
        assert_clean(&img);
    }
}

#[test]
fn qemu_reads_our_images_with_exact_size() {
    let d = tmp();
    // A CHS-exact size (302/4/17) and sizes that are not.
    for (i, size) in [10_514_432u64, (10 << 20) + 1536, 16 << 20]
        .into_iter()
        .enumerate()
    {
        let src = path(&d, &format!("src{i}.img"));
        gen_raw(&src, size, 20 + i as u64);
        for sub in [Subformat::Dynamic, Subformat::Fixed] {
            let dst = path(&d, &format!("out{i}-{}.bin", sub.name()));
            convert_ours(&src, &dst, sub);
            assert_eq!(qemu_virtual_size(&dst, "vpc"), size, "{sub:?} {size}");
            qemu_compare(&src, "raw", &dst, "vpc");
            let disk = vdisk::open(&dst).unwrap();
            assert_eq!(disk.info().subformat, sub);
            assert_disk_matches_raw(disk.as_ref(), &src);
            assert_clean(&dst);
            let alloc = std::fs::metadata(&dst)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap();
            assert!(alloc < size, "{sub:?}: {alloc} bytes allocated for {size}");
        }
    }
}

#[test]
fn fixed_vhd_is_detected_by_content() {
    let d = tmp();
    let src = path(&d, "src.img");
    gen_raw(&src, 4 << 20, 3);
    let fixed = path(&d, "fixed.bin");
    convert_ours(&src, &fixed, Subformat::Fixed);
    let b = vdisk::FileBacking::open(&fixed).unwrap();
    assert_eq!(vdisk::detect(b.as_ref()).unwrap(), Format::Vhd);
    let b = vdisk::FileBacking::open(&src).unwrap();
    assert_eq!(vdisk::detect(b.as_ref()).unwrap(), Format::Raw);
    // a tiny file is raw, not an error
    let tiny = path(&d, "tiny.bin");
    std::fs::write(&tiny, b"conectix").unwrap();
    let b = vdisk::FileBacking::open(&tiny).unwrap();
    assert_eq!(vdisk::detect(b.as_ref()).unwrap(), Format::Vhd);
    assert!(vdisk::open(&tiny).is_err());
    std::fs::write(&tiny, b"hello").unwrap();
    let b = vdisk::FileBacking::open(&tiny).unwrap();
    assert_eq!(vdisk::detect(b.as_ref()).unwrap(), Format::Raw);
}

/// Applies `edits` to a flat copy and writes them to a new differencing image.
/// Each edit is (offset, len, Some(byte) = data, None = zeros).
fn make_child(parent: &Path, child: &Path, flat: &Path, edits: &[(u64, u64, Option<u8>)]) {
    let size = std::fs::metadata(flat).unwrap().len();
    let mut opts = CreateOptions::new(Format::Vhd, Subformat::Differencing, size);
    opts.parent = Some(parent.to_path_buf());
    let mut sink = vdisk::create(child, &opts).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(flat).unwrap();
    for &(off, len, byte) in edits {
        match byte {
            Some(b) => {
                let data: Vec<u8> = (0..len).map(|i| b ^ (i as u8)).collect();
                sink.write_data(off, &data).unwrap();
                f.write_all_at(&data, off).unwrap();
            }
            None => {
                sink.write_zero(off, len).unwrap();
                f.write_all_at(&vec![0u8; len as usize], off).unwrap();
            }
        }
    }
    sink.finish().unwrap();
}

#[test]
fn differencing_chain_reads_flattened() {
    let d = tmp();
    let size = 12u64 << 20;
    let src = path(&d, "base.raw");
    gen_raw(&src, size, 5);
    let sub = d.path().join("kids");
    std::fs::create_dir(&sub).unwrap();
    let base = path(&d, "base.vhd");
    // small blocks in the base, so that some stay unallocated under the chain
    let mut opts = CreateOptions::new(Format::Vhd, Subformat::Dynamic, 0);
    opts.block_size = Some(64 << 10);
    vdisk::convert(&src, &base, &opts, &mut |_, _| {}).unwrap();
    let flat = path(&d, "flat.raw");
    std::fs::copy(&src, &flat).unwrap();
    let c1 = sub.join("c1.vhd");
    make_child(
        &base,
        &c1,
        &flat,
        &[
            (512, 1024, Some(1)),
            (3 << 20, 5000 * 512, Some(2)),
            ((6 << 20) + 1024, 8192, None),
        ],
    );
    let disk = vdisk::open(&c1).unwrap();
    assert_eq!(disk.info().subformat, Subformat::Differencing);
    assert_disk_matches_raw(disk.as_ref(), &flat);
    let c2 = sub.join("c2.vhd");
    make_child(
        &c1,
        &c2,
        &flat,
        &[
            (0, 4096, None),
            ((2 << 20) - 512, 1024, Some(3)),
            (size - 512, 512, Some(4)),
        ],
    );
    let c3 = path(&d, "c3.vhd");
    make_child(&c2, &c3, &flat, &[((5 << 20) + 512, 2048, Some(5))]);
    let disk = vdisk::open(&c3).unwrap();
    let info = disk.info();
    assert_eq!(
        info.parent
            .as_ref()
            .and_then(|p| p.parent.as_ref())
            .map(|p| p.subformat),
        Some(Subformat::Differencing)
    );
    assert_disk_matches_raw(disk.as_ref(), &flat);
    // map: the child's own sectors are data; untouched holes of the base stay unallocated
    let map = disk.map(0, size).unwrap();
    assert!(map.iter().any(|e| e.state == ExtentState::Unallocated));
    for p in [&c1, &c2, &c3] {
        assert_clean(p);
    }
    // flattening through our converter gives what qemu sees as the same disk
    let out = path(&d, "out.raw");
    let opts = CreateOptions::new(Format::Raw, Subformat::Fixed, 0);
    vdisk::convert(&c3, &out, &opts, &mut |_, _| {}).unwrap();
    qemu_compare(&flat, "raw", &out, "raw");
    // moving the whole tree keeps the relative locators working
    let moved = d.path().join("moved");
    std::fs::create_dir(&moved).unwrap();
    std::fs::rename(&sub, moved.join("kids")).unwrap();
    std::fs::rename(&base, moved.join("base.vhd")).unwrap();
    std::fs::rename(&c3, moved.join("c3.vhd")).unwrap();
    let disk = vdisk::open(&moved.join("c3.vhd")).unwrap();
    assert_disk_matches_raw(disk.as_ref(), &flat);
}

// ---- damage ---------------------------------------------------------------

fn ones_complement(b: &[u8], skip: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |a, (_, &x)| a.wrapping_add(x as u32));
    !sum
}

/// Rewrites the checksum of the 512-byte footer at `at`.
fn fix_footer(img: &mut [u8], at: usize) {
    let sum = ones_complement(&img[at..at + 512], 64);
    img[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
}

fn fix_dyn_header(img: &mut [u8]) {
    let sum = ones_complement(&img[512..1536], 36);
    img[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
}

fn bat_offset(img: &[u8]) -> usize {
    u64::from_be_bytes(img[512 + 16..512 + 24].try_into().unwrap()) as usize
}

fn dynamic_image(d: &tempfile::TempDir) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let src = path(d, "src.raw");
    gen_raw(&src, 8 << 20, 9);
    let img = path(d, "dyn.vhd");
    convert_ours(&src, &img, Subformat::Dynamic);
    let bytes = std::fs::read(&img).unwrap();
    (src, img, bytes)
}

fn write_mutant(d: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = path(d, name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open_err(p: &Path) -> Error {
    match vdisk::open(p) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e,
    }
}

#[test]
fn damaged_footers() {
    let d = tmp();
    let (src, _, img) = dynamic_image(&d);
    let n = img.len();
    // end footer damaged: the copy at 0 is used, check warns
    let mut m = img.clone();
    m[n - 512 + 30] ^= 0x55;
    let p = write_mutant(&d, "end.vhd", &m);
    let disk = vdisk::open(&p).unwrap();
    assert_disk_matches_raw(disk.as_ref(), &src);
    let r = vdisk::check::check(&p);
    assert!(!r.is_damaged(), "{:#?}", r.problems);
    assert!(
        r.problems.iter().any(|x| x.structure == "VHD footer"),
        "{:#?}",
        r.problems
    );
    // copy at 0 damaged (cookie gone): still detected and read through the end footer
    let mut m = img.clone();
    m[0] = b'X';
    let p = write_mutant(&d, "head.vhd", &m);
    let disk = vdisk::open(&p).unwrap();
    assert_disk_matches_raw(disk.as_ref(), &src);
    let r = vdisk::check::check(&p);
    assert!(
        !r.is_damaged() && !r.problems.is_empty(),
        "{:#?}",
        r.problems
    );
    // both damaged
    let mut m = img.clone();
    m[n - 512 + 30] ^= 0x55;
    m[30] ^= 0x55;
    let p = write_mutant(&d, "both.vhd", &m);
    let e = open_err(&p);
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(vdisk::check::check(&p).is_damaged());
    // truncated to half
    let p = write_mutant(&d, "trunc.vhd", &img[..n / 2]);
    let e = open_err(&p);
    assert!(e.to_string().contains("BAT"), "{e}");
    assert!(vdisk::check::check(&p).is_damaged());
    let p = write_mutant(&d, "tiny.vhd", &img[..700]);
    assert!(vdisk::open(&p).is_err());
    assert!(vdisk::check::check(&p).is_damaged());
}

#[test]
fn damaged_dynamic_header_and_bat() {
    let d = tmp();
    let (_, _, img) = dynamic_image(&d);
    let bat = bat_offset(&img);
    // dynamic header checksum
    let mut m = img.clone();
    m[512 + 100] ^= 1;
    let p = write_mutant(&d, "hdr.vhd", &m);
    let e = open_err(&p);
    assert!(
        e.to_string().contains("dynamic header") && e.to_string().contains("checksum"),
        "{e}"
    );
    assert!(vdisk::check::check(&p).is_damaged());
    // block sizes: not a power of two, too large
    for bs in [3u32 << 20, 1 << 30, 0] {
        let mut m = img.clone();
        m[512 + 32..512 + 36].copy_from_slice(&bs.to_be_bytes());
        fix_dyn_header(&mut m);
        let p = write_mutant(&d, "bs.vhd", &m);
        let e = open_err(&p);
        assert!(e.to_string().contains("block size"), "{e}");
        assert!(vdisk::check::check(&p).is_damaged());
    }
    // BAT entry beyond EOF
    let mut m = img.clone();
    let first = (0..4)
        .map(|i| bat + 4 * i)
        .find(|&o| m[o..o + 4] != [0xFF; 4])
        .unwrap();
    m[first..first + 4].copy_from_slice(&0x00FF_FFF0u32.to_be_bytes());
    let p = write_mutant(&d, "beyond.vhd", &m);
    let e = open_err(&p);
    assert!(
        e.to_string().contains("BAT") && e.to_string().contains("beyond"),
        "{e}"
    );
    let r = vdisk::check::check(&p);
    assert!(
        r.problems
            .iter()
            .any(|x| x.structure.starts_with("BAT entry") && x.detail.contains("beyond")),
        "{:#?}",
        r.problems
    );
    // two entries pointing at the same block, and one pointing at the BAT itself
    let mut m = img.clone();
    let a: [u8; 4] = m[first..first + 4].try_into().unwrap();
    m[bat + 4 * 3..bat + 4 * 3 + 4].copy_from_slice(&a);
    m[bat + 4 * 2..bat + 4 * 2 + 4].copy_from_slice(&((bat / 512) as u32).to_be_bytes());
    let p = write_mutant(&d, "overlap.vhd", &m);
    let r = vdisk::check::check(&p);
    assert_problem(&r, "overlaps block");
    assert_problem(&r, "overlaps the BAT");
    // absurd sizes: 4 TiB with the maximum geometry; a table too small for the size
    let mut m = img.clone();
    for at in [0, m.len() - 512] {
        m[at + 48..at + 56].copy_from_slice(&(4u64 << 40).to_be_bytes());
        m[at + 56..at + 60].copy_from_slice(&[0xFF, 0xFF, 16, 255]);
        fix_footer(&mut m, at);
    }
    let p = write_mutant(&d, "huge.vhd", &m);
    let e = open_err(&p);
    assert!(e.to_string().contains("2040 GiB"), "{e}");
    assert!(vdisk::check::check(&p).is_damaged());
    let mut m = img.clone();
    for at in [0, m.len() - 512] {
        m[at + 48..at + 56].copy_from_slice(&(1u64 << 40).to_be_bytes());
        m[at + 56..at + 60].copy_from_slice(&[0xFF, 0xFF, 16, 255]);
        fix_footer(&mut m, at);
    }
    let p = write_mutant(&d, "table.vhd", &m);
    let e = open_err(&p);
    assert!(e.to_string().contains("MaxTableEntries"), "{e}");
}

#[test]
fn parent_problems() {
    let d = tmp();
    let size = 4u64 << 20;
    let src = path(&d, "base.raw");
    gen_raw(&src, size, 7);
    let base = path(&d, "base.vhd");
    convert_ours(&src, &base, Subformat::Dynamic);
    let flat = path(&d, "flat.raw");
    std::fs::copy(&src, &flat).unwrap();
    let child = path(&d, "child.vhd");
    make_child(&base, &child, &flat, &[(4096, 4096, Some(9))]);
    vdisk::open(&child).unwrap();

    // wrong UniqueId: another image of the same size in the parent's place
    let other = path(&d, "other.vhd");
    convert_ours(&src, &other, Subformat::Dynamic);
    let saved = path(&d, "saved.vhd");
    std::fs::rename(&base, &saved).unwrap();
    std::fs::copy(&other, &base).unwrap();
    let e = open_err(&child);
    assert!(
        matches!(e, Error::Parent { .. }) && e.to_string().contains("UniqueId"),
        "{e}"
    );
    assert!(vdisk::check::check(&child).is_damaged());

    // missing parent: the error names the paths tried
    std::fs::remove_file(&base).unwrap();
    let e = open_err(&child);
    assert!(
        matches!(e, Error::Parent { .. }) && e.to_string().contains("base.vhd"),
        "{e}"
    );
    let r = vdisk::check::check(&child);
    assert!(
        r.problems.iter().any(|p| p.structure == "parent"),
        "{:#?}",
        r.problems
    );
    std::fs::rename(&saved, &base).unwrap();

    // a loop: the parent's place taken by a child of `child`, whose id `child` expects
    let grandchild = path(&d, "gc.vhd");
    make_child(&child, &grandchild, &flat, &[(0, 512, Some(1))]);
    let gc = std::fs::read(&grandchild).unwrap();
    let gc_uid: [u8; 16] = gc[68..84].try_into().unwrap();
    let mut c = std::fs::read(&child).unwrap();
    c[512 + 40..512 + 56].copy_from_slice(&gc_uid);
    fix_dyn_header(&mut c);
    std::fs::write(&child, &c).unwrap();
    std::fs::remove_file(&base).unwrap();
    std::fs::rename(&grandchild, &base).unwrap();
    let e = open_err(&child);
    assert!(
        matches!(e, Error::Parent { .. }) && e.to_string().contains("loop"),
        "{e}"
    );
    let r = vdisk::check::check(&child);
    assert_problem(&r, "loop");
}

#[test]
fn writer_rejects_bad_options() {
    let d = tmp();
    let p = path(&d, "x.vhd");
    for size in [1000u64, 2041 << 30] {
        let o = CreateOptions::new(Format::Vhd, Subformat::Dynamic, size);
        assert!(vdisk::create(&p, &o).is_err());
    }
    let mut o = CreateOptions::new(Format::Vhd, Subformat::Dynamic, 1 << 20);
    o.block_size = Some(3000);
    assert!(vdisk::create(&p, &o).is_err());
    // out of order writes are refused
    let o = CreateOptions::new(Format::Vhd, Subformat::Dynamic, 1 << 20);
    let mut s = vdisk::create(&p, &o).unwrap();
    s.write_data(4096, &[1; 512]).unwrap();
    assert!(s.write_data(0, &[1; 512]).is_err());
}
