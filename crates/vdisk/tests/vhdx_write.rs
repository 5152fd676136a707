//! The VHDX writer against qemu-img: `qemu-img check` must be clean and `qemu-img
//! compare` must find the written image identical to the raw it came from.
mod common;
mod vhdx_common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vdisk::{CreateOptions, Format, Subformat};
use vhdx_common::TestVhdx;

const MIB: u64 = 1 << 20;

fn opts(sub: Subformat, size: u64, block: u64, sector: u32) -> CreateOptions {
    let mut o = CreateOptions::new(Format::Vhdx, sub, size);
    o.block_size = Some(block);
    o.logical_sector_size = sector;
    o
}

fn allocated(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512
}

/// Converts a generated raw disk through `vdisk::convert` and checks it with qemu-img.
fn convert_and_verify(sub: Subformat, block: u64, sector: u32, size: u64, seed: u64) {
    eprintln!("convert {sub:?} block {block} sector {sector} size {size}");
    let d = tmp();
    let src = path(&d, "src.img");
    gen_raw(&src, size, seed);
    let dst = path(&d, "dst.vhdx");
    vdisk::convert(&src, &dst, &opts(sub, 0, block, sector), &mut |_, _| {}).unwrap();
    qemu_check(&dst, "vhdx");
    qemu_compare(&src, "raw", &dst, "vhdx");
    // the test-only reader must agree with qemu where qemu can judge
    TestVhdx::open(&dst).assert_matches_raw(&src);
    assert_eq!(qemu_virtual_size(&dst, "vhdx"), size);
    let info = qemu_img(&["info", "-f", "vhdx", "--output=json", s(&dst)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["cluster-size"].as_u64(), Some(block), "{info}");
}

#[test]
fn dynamic_convert_block_sizes_512() {
    // Sizes deliberately not a multiple of the block size.
    convert_and_verify(Subformat::Dynamic, MIB, 512, 13 * MIB + 7 * 512, 11);
    convert_and_verify(Subformat::Dynamic, 8 * MIB, 512, 21 * MIB + 4096, 12);
    convert_and_verify(Subformat::Dynamic, 32 * MIB, 512, 40 * MIB + 512, 13);
}

#[test]
fn fixed_convert_block_sizes_512() {
    convert_and_verify(Subformat::Fixed, MIB, 512, 13 * MIB + 7 * 512, 21);
    convert_and_verify(Subformat::Fixed, 8 * MIB, 512, 21 * MIB + 4096, 22);
    convert_and_verify(Subformat::Fixed, 32 * MIB, 512, 40 * MIB + 512, 23);
}

/// How to verify what qemu-img cannot read.
#[derive(Clone, Copy, PartialEq)]
enum Reader {
    /// The naive test-only reader in `vhdx_common`.
    Test,
    /// vdisk's reader and check.
    Vdisk,
}

fn verify_own(reader: Reader, img: &Path, raw: &Path) {
    match reader {
        Reader::Test => TestVhdx::open(img).assert_matches_raw(raw),
        Reader::Vdisk => {
            let disk = vdisk::open(img).unwrap();
            assert_eq!(disk.info().logical_sector_size, 4096);
            assert_disk_matches_raw(disk.as_ref(), raw);
            let report = vdisk::check::check(img);
            assert!(!report.is_damaged(), "{:?}", report.problems);
        }
    }
}

/// qemu-img (10.0) refuses VHDX with 4096-byte logical sectors ("Operation not
/// supported"), so these images are verified with our readers.
fn convert_4096_and_verify(reader: Reader, sub: Subformat, block: u64, size: u64, seed: u64) {
    eprintln!("convert 4096 {sub:?} block {block} size {size}");
    let d = tmp();
    let src = path(&d, "src.img");
    gen_raw(&src, size, seed);
    let dst = path(&d, "dst.vhdx");
    vdisk::convert(&src, &dst, &opts(sub, 0, block, 4096), &mut |_, _| {}).unwrap();
    assert_eq!(TestVhdx::open(&dst).sector, 4096);
    verify_own(reader, &dst, &src);
}

#[test]
fn qemu_refuses_4096_sector_vhdx() {
    let d = tmp();
    let dst = path(&d, "x.vhdx");
    let sink = vdisk::create(&dst, &opts(Subformat::Dynamic, 4 * MIB, MIB, 4096)).unwrap();
    sink.finish().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-f", "vhdx", s(&dst)])
        .output()
        .unwrap();
    // If this starts passing, qemu learned 4096-byte sectors: compare with it too.
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported"));
}

fn convert_4096(reader: Reader) {
    convert_4096_and_verify(reader, Subformat::Dynamic, MIB, 13 * MIB + 3 * 4096, 31);
    convert_4096_and_verify(reader, Subformat::Dynamic, 32 * MIB, 40 * MIB + 4096, 32);
    convert_4096_and_verify(reader, Subformat::Fixed, 8 * MIB, 21 * MIB + 4096, 33);
}

#[test]
fn convert_4096_logical_sectors() {
    convert_4096(Reader::Test);
}

#[test]
fn vdisk_reader_convert_4096_logical_sectors() {
    convert_4096(Reader::Vdisk);
}

#[test]
fn default_block_size_is_32_mib() {
    let d = tmp();
    let src = path(&d, "src.img");
    gen_raw(&src, 5 * MIB, 41);
    let dst = path(&d, "dst.vhdx");
    let o = CreateOptions::new(Format::Vhdx, Subformat::Dynamic, 0);
    vdisk::convert(&src, &dst, &o, &mut |_, _| {}).unwrap();
    let info = qemu_img(&["info", "-f", "vhdx", "--output=json", s(&dst)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["cluster-size"].as_u64(), Some(32 * MIB), "{info}");
    qemu_compare(&src, "raw", &dst, "vhdx");
}

/// Feeds a sink directly with a deterministic mix of data pieces, zero ranges and
/// untouched ranges at sector (not block) granularity, mirroring the data into a raw.
fn sink_and_verify(sub: Subformat, block: u64, sector: u32, size: u64, seed: u64) {
    sink_and_verify_with(Reader::Test, sub, block, sector, size, seed);
}

fn sink_and_verify_with(
    reader: Reader,
    sub: Subformat,
    block: u64,
    sector: u32,
    size: u64,
    seed: u64,
) {
    eprintln!("sink {sub:?} block {block} sector {sector} size {size}");
    let d = tmp();
    let raw = path(&d, "ref.img");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    let dst = path(&d, "out.vhdx");
    let mut sink = vdisk::create(&dst, &opts(sub, size, block, sector)).unwrap();
    let mut rng = Rng::new(seed);
    let mut pos = 0u64;
    let sec = u64::from(sector);
    while pos < size {
        let len = ((1 + rng.below(3 * MIB / sec)) * sec).min(size - pos);
        match rng.below(4) {
            0 => {}
            1 => sink.write_zero(pos, len).unwrap(),
            _ => {
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                sink.write_data(pos, &b).unwrap();
                f.write_all_at(&b, pos).unwrap();
            }
        }
        pos += len + rng.below(3) * sec;
    }
    sink.finish().unwrap();
    if sector == 512 {
        qemu_check(&dst, "vhdx");
        qemu_compare(&raw, "raw", &dst, "vhdx");
        TestVhdx::open(&dst).assert_matches_raw(&raw);
    } else {
        verify_own(reader, &dst, &raw);
    }
}

#[test]
fn sink_partial_blocks_and_zeros() {
    sink_and_verify(Subformat::Dynamic, MIB, 512, 17 * MIB + 512, 51);
    sink_and_verify(Subformat::Dynamic, 8 * MIB, 512, 30 * MIB, 52);
    sink_and_verify(Subformat::Fixed, MIB, 512, 9 * MIB + 1024, 53);
}

fn sink_4096(reader: Reader) {
    sink_and_verify_with(
        reader,
        Subformat::Dynamic,
        2 * MIB,
        4096,
        19 * MIB + 4096,
        54,
    );
    sink_and_verify_with(reader, Subformat::Fixed, 32 * MIB, 4096, 33 * MIB, 55);
}

#[test]
fn sink_partial_blocks_4096() {
    sink_4096(Reader::Test);
}

#[test]
fn vdisk_reader_sink_partial_blocks_4096() {
    sink_4096(Reader::Vdisk);
}

#[test]
fn zero_only_blocks_stay_unallocated() {
    let d = tmp();
    let dst = path(&d, "z.vhdx");
    let size = 64 * MIB;
    let mut sink = vdisk::create(&dst, &opts(Subformat::Dynamic, size, MIB, 512)).unwrap();
    sink.write_zero(0, 10 * MIB).unwrap();
    sink.write_data(10 * MIB + 4096, &[7u8; 4096]).unwrap();
    sink.write_zero(11 * MIB, size - 11 * MIB).unwrap();
    sink.finish().unwrap();
    qemu_check(&dst, "vhdx");
    // header + log + metadata + BAT (4 MiB) and exactly one 1 MiB block.
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 5 * MIB);
    assert!(allocated(&dst) < 2 * MIB, "only written parts take space");
    // qemu-img map calls every VHDX block data, so read the BAT (at 3 MiB) instead.
    let bytes = std::fs::read(&dst).unwrap();
    let bat: Vec<u64> = bytes[3 << 20..(3 << 20) + 64 * 8]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (i, e) in bat.iter().enumerate() {
        if i == 10 {
            assert_eq!(*e, (4 << 20) | 6, "block 10 FULLY_PRESENT at 4 MiB");
        } else {
            assert_eq!(*e, 0, "block {i} must be NOT_PRESENT");
        }
    }
}

#[test]
fn fixed_is_preallocated_but_sparse() {
    let d = tmp();
    let dst = path(&d, "f.vhdx");
    let size = 20 * MIB;
    let sink = vdisk::create(&dst, &opts(Subformat::Fixed, size, 8 * MIB, 512)).unwrap();
    sink.finish().unwrap();
    qemu_check(&dst, "vhdx");
    // 4 MiB of metadata areas then 3 whole blocks.
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 4 * MIB + 24 * MIB);
    assert!(allocated(&dst) < 2 * MIB);
    let info = qemu_img(&["info", "-f", "vhdx", "--output=json", s(&dst)]);
    assert!(info.contains("\"virtual-size\": 20971520"), "{info}");
}

#[test]
fn refuses_bad_options() {
    let d = tmp();
    let p = path(&d, "bad.vhdx");
    let bad = [
        opts(Subformat::Dynamic, MIB + 100, MIB, 512),
        opts(Subformat::Dynamic, MIB + 512, MIB, 4096),
        opts(Subformat::Dynamic, MIB, 3 * MIB, 512),
        opts(Subformat::Dynamic, MIB, 512 * 1024, 512),
        opts(Subformat::Dynamic, MIB, 512 * MIB, 512),
        opts(Subformat::Dynamic, (64u64 << 40) + 512, 32 * MIB, 512),
        opts(Subformat::Dynamic, MIB, MIB, 1024),
    ];
    for o in &bad {
        assert!(
            matches!(vdisk::create(&p, o), Err(vdisk::Error::Invalid(_))),
            "{o:?}"
        );
        assert!(!p.exists());
    }
    let mut o = opts(Subformat::Dynamic, MIB, MIB, 512);
    o.physical_sector_size = 1000;
    assert!(vdisk::create(&p, &o).is_err());
    // out of order and unaligned writes are refused
    let mut sink = vdisk::create(&p, &opts(Subformat::Dynamic, 4 * MIB, MIB, 512)).unwrap();
    sink.write_data(MIB, &[1u8; 512]).unwrap();
    assert!(sink.write_data(0, &[1u8; 512]).is_err());
    assert!(sink.write_data(2 * MIB + 1, &[1u8; 512]).is_err());
    assert!(sink.write_zero(3 * MIB, 2 * MIB).is_err());
    drop(sink);
    // differencing on a non-VHDX parent
    let raw = path(&d, "parent.img");
    gen_raw(&raw, 4 * MIB, 1);
    let q = path(&d, "child.avhdx");
    let mut o = opts(Subformat::Differencing, 4 * MIB, MIB, 512);
    o.parent = Some(raw);
    assert!(matches!(
        vdisk::create(&q, &o),
        Err(vdisk::Error::Parent { .. })
    ));
    o.parent = Some(path(&d, "missing.vhdx"));
    assert!(vdisk::create(&q, &o).is_err());
}

#[test]
fn differencing_header_and_locator() {
    let d = tmp();
    let base = path(&d, "base.vhdx");
    qemu_img(&["create", "-f", "vhdx", s(&base), "8M"]);
    let sub = d.path().join("snaps");
    std::fs::create_dir(&sub).unwrap();
    let child = sub.join("child.avhdx");
    let mut o = opts(Subformat::Differencing, 0, MIB, 512);
    o.parent = Some(base.clone());
    let mut sink = vdisk::create(&child, &o).unwrap();
    sink.write_data(MIB, &[9u8; 4096]).unwrap();
    sink.write_zero(2 * MIB, MIB).unwrap();
    sink.finish().unwrap();
    let bytes = std::fs::read(&child).unwrap();
    let text: String = char::decode_utf16(
        bytes[2 << 20..3 << 20]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]])),
    )
    .map(|c| c.unwrap_or('\u{0}'))
    .collect();
    assert!(text.contains("parent_linkage"), "locator keys missing");
    assert!(text.contains("..\\base.vhdx"), "relative path missing");
    assert!(
        text.contains(base.to_str().unwrap()),
        "absolute path missing"
    );
    // qemu-img refuses differencing VHDX: make sure it says so rather than misreading.
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-f", "vhdx", s(&child)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // the size comes from the parent; a different stated size is refused
    let mut o2 = o.clone();
    o2.virtual_size = 4 * MIB;
    assert!(vdisk::create(&sub.join("c2.avhdx"), &o2).is_err());
    o2.virtual_size = 8 * MIB;
    o2.logical_sector_size = 4096;
    assert!(vdisk::create(&sub.join("c3.avhdx"), &o2).is_err());
}

#[test]
fn large_sparse_disk_has_small_file() {
    let d = tmp();
    let dst = path(&d, "big.vhdx");
    let size = 2u64 << 40;
    let mut sink = vdisk::create(&dst, &opts(Subformat::Dynamic, size, 32 * MIB, 512)).unwrap();
    sink.write_data(MIB, &[1u8; 4096]).unwrap();
    sink.write_zero(2 * MIB, size / 2).unwrap();
    sink.write_data(size - 512, &[2u8; 512]).unwrap();
    sink.finish().unwrap();
    qemu_check(&dst, "vhdx");
    assert_eq!(qemu_virtual_size(&dst, "vhdx"), size);
    // metadata (3 MiB) + BAT (1 MiB for 65536 + 511 entries) + two 32 MiB blocks
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 4 * MIB + 64 * MIB);
    let t = TestVhdx::open(&dst);
    let mut b = [0u8; 512];
    t.read_sector((size - 512) / 512, &mut b);
    assert_eq!(b, [2u8; 512]);
    t.read_sector(MIB / 512, &mut b);
    assert_eq!(b, [1u8; 512]);
    t.read_sector(size / 1024, &mut b);
    assert_eq!(b, [0u8; 512]);
}
