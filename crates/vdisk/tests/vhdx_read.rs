//! VHDX reader, log replay and check against qemu-img: images made by qemu-img (dynamic,
//! fixed, several block sizes, odd sizes), dirty logs crafted here, corruptions, and
//! differencing chains written by vdisk's writer.
mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vdisk::{CreateOptions, ExtentState, Format, Subformat};

const MIB: u64 = 1 << 20;
/// Size not a multiple of any block size: 37 MiB + 3 sectors.
const ODD: u64 = (37 << 20) + 512 * 3;

fn make(
    dir: &tempfile::TempDir,
    name: &str,
    size: u64,
    seed: u64,
    opts: &str,
) -> (PathBuf, PathBuf) {
    let raw = path(dir, &format!("{name}.raw"));
    gen_raw(&raw, size, seed);
    let img = path(dir, &format!("{name}.vhdx"));
    let mut args = vec!["convert", "-f", "raw", "-O", "vhdx"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&raw), s(&img)]);
    qemu_img(&args);
    (raw, img)
}

fn rd(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

fn wr(p: &Path, off: u64, b: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(b, off).unwrap();
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Stores the CRC-32C of `b` (field at `at` zeroed) into that field.
fn fix_crc(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let c = crc32c::crc32c(b);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(&d1.to_le_bytes());
    g[4..6].copy_from_slice(&d2.to_le_bytes());
    g[6..8].copy_from_slice(&d3.to_le_bytes());
    g[8..].copy_from_slice(&d4);
    g
}

/// Offset of the current header (higher sequence number).
fn current_header(p: &Path) -> u64 {
    let s1 = u64le(&rd(p, 64 << 10, 16), 8);
    let s2 = u64le(&rd(p, 128 << 10, 16), 8);
    if s2 > s1 { 128 << 10 } else { 64 << 10 }
}

/// (file offset, length) of the region `g` in region table 1.
fn region(p: &Path, g: [u8; 16]) -> (u64, u64) {
    let t = rd(p, 192 << 10, 64 << 10);
    for i in 0..u32le(&t, 8) as usize {
        let e = &t[16 + 32 * i..48 + 32 * i];
        if e[..16] == g {
            return (u64le(e, 16), u32le(e, 24) as u64);
        }
    }
    panic!("region not found");
}

fn bat_region(p: &Path) -> u64 {
    region(
        p,
        guid(
            0x2DC27766,
            0xF623,
            0x4200,
            [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
        ),
    )
    .0
}

fn meta_region(p: &Path) -> u64 {
    region(
        p,
        guid(
            0x8B7CA206,
            0x4790,
            0x4B9A,
            [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
        ),
    )
    .0
}

/// File offset of metadata item `g`.
fn meta_item(p: &Path, g: [u8; 16]) -> u64 {
    let m = meta_region(p);
    let t = rd(p, m, 64 << 10);
    for i in 0..u16::from_le_bytes([t[10], t[11]]) as usize {
        let e = &t[32 + 32 * i..64 + 32 * i];
        if e[..16] == g {
            return m + u32le(e, 16) as u64;
        }
    }
    panic!("metadata item not found");
}

const FILE_PARAMS: fn() -> [u8; 16] = || {
    guid(
        0xCAA16737,
        0xFA36,
        0x4D43,
        [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
    )
};
const VDISK_SIZE: fn() -> [u8; 16] = || {
    guid(
        0x2FA54224,
        0xCD1B,
        0x4876,
        [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
    )
};

/// Where qemu-img says a range is not data, we must not say data either.
fn assert_map_agrees_with_qemu(disk: &dyn vdisk::VirtualDisk, img: &Path) {
    let out = qemu_img(&["map", "-f", "vhdx", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ours = disk.map(0, disk.virtual_size()).unwrap();
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let qdata = e["data"].as_bool().unwrap() && !e["zero"].as_bool().unwrap();
        if !qdata {
            for o in ours
                .iter()
                .filter(|o| o.offset < start + len && start < o.end())
            {
                assert_ne!(
                    o.state,
                    ExtentState::Data,
                    "qemu says {e} is not data, we say {o:?}"
                );
            }
        }
    }
}

#[test]
fn qemu_images_read_like_their_raw_source() {
    let d = tmp();
    for (i, (opts, block, sub)) in [
        ("", 8 * MIB, Some(Subformat::Dynamic)),
        ("block_size=1M", MIB, Some(Subformat::Dynamic)),
        (
            "block_size=1M,block_state_zero=off",
            MIB,
            Some(Subformat::Dynamic),
        ),
        ("subformat=fixed", 8 * MIB, None),
        (
            "subformat=fixed,block_state_zero=off",
            8 * MIB,
            Some(Subformat::Fixed),
        ),
        (
            "subformat=fixed,block_state_zero=off,block_size=1M",
            MIB,
            Some(Subformat::Fixed),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (raw, img) = make(&d, &format!("img{i}"), ODD, 11 + i as u64, opts);
        let disk = vdisk::open(&img).unwrap();
        let info = disk.info();
        assert_eq!(info.format, Format::Vhdx);
        assert_eq!(info.block_size, Some(block), "{opts}");
        assert_eq!(info.virtual_size, qemu_virtual_size(&img, "vhdx"));
        if let Some(sub) = sub {
            assert_eq!(info.subformat, sub, "{opts}");
        }
        assert!(info.details.iter().any(|(k, v)| k == "log" && v == "clean"));
        assert_disk_matches_raw(disk.as_ref(), &raw);
        assert_map_agrees_with_qemu(disk.as_ref(), &img);
        if sub == Some(Subformat::Fixed) {
            let m = disk.map(0, disk.virtual_size()).unwrap();
            assert!(m.len() == 1 && m[0].state == ExtentState::Data, "{m:?}");
        }
        let r = vdisk::check::check(&img);
        assert!(r.problems.is_empty(), "{opts}: {:?}", r.problems);
        assert!(
            r.checked.iter().any(|c| c.starts_with("BAT:")),
            "{:?}",
            r.checked
        );
    }
}

/// A small dynamic image with 1 MiB blocks: (raw, vhdx).
fn base(d: &tempfile::TempDir, name: &str) -> (PathBuf, PathBuf) {
    make(d, name, 8 * MIB, 5, "block_size=1M")
}

// ---- log replay ----

const LOG_GUID: [u8; 16] = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

enum Op<'a> {
    Data(u64, &'a [u8]),
    Zero(u64, u64),
}

/// Encodes a log entry (MS-VHDX 2.3.1), independently of the crate's encoder.
fn log_entry(seq: u64, tail: u32, flushed: u64, last: u64, ops: &[Op]) -> Vec<u8> {
    let desc_sectors = (64 + 32 * ops.len()).div_ceil(4096);
    let ndata = ops.iter().filter(|o| matches!(o, Op::Data(..))).count();
    let mut b = vec![0u8; (desc_sectors + ndata) * 4096];
    let len = b.len() as u32;
    b[..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..16].copy_from_slice(&tail.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..28].copy_from_slice(&(ops.len() as u32).to_le_bytes());
    b[32..48].copy_from_slice(&LOG_GUID);
    b[48..56].copy_from_slice(&flushed.to_le_bytes());
    b[56..64].copy_from_slice(&last.to_le_bytes());
    let mut ds = desc_sectors * 4096;
    for (i, op) in ops.iter().enumerate() {
        let d = 64 + 32 * i;
        match op {
            Op::Zero(off, l) => {
                b[d..d + 4].copy_from_slice(b"zero");
                b[d + 8..d + 16].copy_from_slice(&l.to_le_bytes());
                b[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
            }
            Op::Data(off, sec) => {
                b[d..d + 4].copy_from_slice(b"desc");
                b[d + 4..d + 8].copy_from_slice(&sec[4092..]);
                b[d + 8..d + 16].copy_from_slice(&sec[..8]);
                b[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
                b[ds..ds + 4].copy_from_slice(b"data");
                b[ds + 4..ds + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                b[ds + 8..ds + 4092].copy_from_slice(&sec[8..4092]);
                b[ds + 4092..ds + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
                ds += 4096;
            }
        }
        b[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
    }
    fix_crc(&mut b, 4);
    b
}

/// Turns `img` (a 1 MiB-block image made from `raw`) into one with a dirty log of two
/// entries: the first moves block 0 to a new block beyond the end of the file holding
/// two logged sectors, the second zeroes 16 KiB of another data block. Writes the
/// expected content to `expect` (a raw file).
fn make_dirty(img: &Path, raw: &Path, expect: &Path) {
    std::fs::copy(raw, expect).unwrap();
    let bat = bat_region(img);
    let len = std::fs::metadata(img).unwrap().len();
    let new_block = len.div_ceil(MIB) * MIB;
    let mut bat_sector = rd(img, bat, 4096);
    // another data block to zero partly
    let m = (1..8)
        .find(|&i| u64le(&bat_sector, 8 * i) & 7 == 6)
        .expect("a FULLY_PRESENT block");
    let m_off = u64le(&bat_sector, 8 * m) & !(MIB - 1);
    bat_sector[..8].copy_from_slice(&(new_block | 6).to_le_bytes());
    let a = vec![0x11u8; 4096];
    let mut b = vec![0u8; 4096];
    Rng::new(99).fill(&mut b);
    // qemu-img (10.0) does not extend the file to LastFileOffset when it replays, so
    // the log also writes the block's last sector (the unit tests cover extension).
    let c = vec![0x22u8; 4096];
    let e1 = log_entry(
        10,
        0,
        len,
        new_block + MIB,
        &[
            Op::Data(bat, &bat_sector),
            Op::Data(new_block, &a),
            Op::Data(new_block + 65536, &b),
            Op::Data(new_block + MIB - 4096, &c),
        ],
    );
    let e2 = log_entry(
        11,
        0,
        len,
        new_block + MIB,
        &[Op::Zero(m_off + 8192, 16384)],
    );
    let h = current_header(img);
    let mut hdr = rd(img, h, 4096);
    let log_off = u64le(&hdr, 72);
    wr(img, log_off, &e1);
    wr(img, log_off + e1.len() as u64, &e2);
    hdr[48..64].copy_from_slice(&LOG_GUID);
    fix_crc(&mut hdr, 4);
    wr(img, h, &hdr);
    // expected virtual content
    let mut blk0 = vec![0u8; MIB as usize];
    blk0[..4096].copy_from_slice(&a);
    blk0[65536..65536 + 4096].copy_from_slice(&b);
    blk0[MIB as usize - 4096..].copy_from_slice(&c);
    wr(expect, 0, &blk0);
    wr(expect, m as u64 * MIB + 8192, &[0u8; 16384]);
}

fn hash(p: &Path) -> u64 {
    // FNV-1a: enough to notice any change
    std::fs::read(p)
        .unwrap()
        .iter()
        .fold(0xcbf29ce484222325u64, |h, &x| {
            (h ^ x as u64).wrapping_mul(0x100000001b3)
        })
}

#[test]
fn dirty_log_is_replayed_in_memory_then_in_place() {
    let d = tmp();
    let (raw, img) = base(&d, "dirty");
    let expect = path(&d, "expect.raw");
    make_dirty(&img, &raw, &expect);
    let before = hash(&img);
    let disk = vdisk::open(&img).unwrap();
    let info = disk.info();
    assert!(
        info.details
            .iter()
            .any(|(k, v)| k == "log" && v.contains("dirty: 2 entries")),
        "{:?}",
        info.details
    );
    assert_disk_matches_raw(disk.as_ref(), &expect);
    let r = vdisk::check::check(&img);
    assert!(!r.is_damaged(), "{:?}", r.problems);
    assert_problem(&r, "dirty log");
    drop(disk);
    assert_eq!(
        hash(&img),
        before,
        "a read-only open must not modify the file"
    );

    // qemu replays the log too when repairing: both must agree
    let qcopy = path(&d, "qemu.vhdx");
    std::fs::copy(&img, &qcopy).unwrap();
    qemu_img(&["check", "-r", "all", "-f", "vhdx", s(&qcopy)]);
    qemu_compare(&expect, "raw", &qcopy, "vhdx");

    let msg = vdisk::repair(&img).unwrap().expect("log replayed");
    assert!(msg.contains("replayed 2 log entries"), "{msg}");
    qemu_check(&img, "vhdx");
    qemu_compare(&expect, "raw", &img, "vhdx");
    let disk = vdisk::open(&img).unwrap();
    assert!(
        disk.info()
            .details
            .iter()
            .any(|(k, v)| k == "log" && v == "clean")
    );
    assert_disk_matches_raw(disk.as_ref(), &expect);
    assert_eq!(vdisk::repair(&img).unwrap(), None);
    assert!(vdisk::check::check(&img).problems.is_empty());
}

#[test]
fn dirty_log_with_a_bad_entry_crc_replays_only_the_valid_prefix() {
    let d = tmp();
    let (raw, img) = base(&d, "dirty2");
    let expect = path(&d, "expect.raw");
    make_dirty(&img, &raw, &expect);
    // break entry 2 (the zeroing): only entry 1 is active
    let h = rd(&img, current_header(&img), 4096);
    let log_off = u64le(&h, 72);
    let e1_len = u32le(&rd(&img, log_off, 64), 8) as u64;
    let mut e2 = rd(&img, log_off + e1_len, 64);
    e2[30] ^= 0xFF; // reserved field: only the CRC notices
    wr(&img, log_off + e1_len, &e2);
    let disk = vdisk::open(&img).unwrap();
    assert!(
        disk.info()
            .details
            .iter()
            .any(|(k, v)| k == "log" && v.contains("1 entries"))
    );
}

// ---- corruptions ----

/// Opening must fail with a message naming the file and containing `needle`, and
/// check must report damage mentioning it.
fn assert_refused(p: &Path, needle: &str) {
    let err = vdisk::open(p).map(|_| ()).unwrap_err().to_string();
    let name = p.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains(name) && err.contains(needle),
        "open error {err:?} lacks {name} / {needle:?}"
    );
    let r = vdisk::check::check(p);
    assert!(r.is_damaged(), "check found nothing: {:?}", r.problems);
    assert!(
        r.problems.iter().any(|q| q.to_string().contains(needle)),
        "check problems lack {needle:?}: {:?}",
        r.problems
    );
}

fn copy_of(d: &tempfile::TempDir, img: &Path, name: &str) -> PathBuf {
    let p = path(d, name);
    std::fs::copy(img, &p).unwrap();
    p
}

#[test]
fn truncated_files_give_clear_errors() {
    let d = tmp();
    let (_, img) = base(&d, "t");
    let len = std::fs::metadata(&img).unwrap().len();
    for cut in [
        100,
        70_000,
        200_000,
        300_000,
        2 * MIB + 10,
        3 * MIB + 100,
        len - MIB / 2,
    ] {
        let p = copy_of(&d, &img, &format!("cut{cut}.vhdx"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let r = vdisk::check::check(&p);
        assert!(r.is_damaged(), "cut at {cut}: {:?}", r.problems);
        let err = match vdisk::open(&p) {
            Err(e) => e.to_string(),
            Ok(disk) => {
                let mut buf = vec![0u8; disk.virtual_size() as usize];
                disk.read_at(&mut buf, 0)
                    .expect_err("reading a truncated image must fail")
                    .to_string()
            }
        };
        assert!(err.contains(&format!("cut{cut}.vhdx")), "{err}");
        assert!(
            err.contains("truncated") || err.contains("beyond the end"),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn one_bad_header_still_reads_both_bad_are_refused() {
    let d = tmp();
    let (raw, img) = base(&d, "h");
    let p = copy_of(&d, &img, "h1.vhdx");
    let mut h = rd(&p, 64 << 10, 4096);
    h[200] ^= 0x40;
    wr(&p, 64 << 10, &h);
    assert_disk_matches_raw(vdisk::open(&p).unwrap().as_ref(), &raw);
    let r = vdisk::check::check(&p);
    assert!(r.is_damaged());
    assert!(
        r.problems
            .iter()
            .any(|q| q.offset == Some(0x10000) && q.detail.contains("CRC")),
        "{:?}",
        r.problems
    );
    let mut h2 = rd(&p, 128 << 10, 4096);
    h2[..4].copy_from_slice(b"HEAD");
    wr(&p, 128 << 10, &h2);
    assert_refused(&p, "both headers are invalid");
}

#[test]
fn bad_region_tables() {
    let d = tmp();
    let (raw, img) = base(&d, "r");
    let p = copy_of(&d, &img, "r1.vhdx");
    let mut t = rd(&p, 192 << 10, 64);
    t[60] ^= 1;
    wr(&p, 192 << 10, &t);
    assert_disk_matches_raw(vdisk::open(&p).unwrap().as_ref(), &raw);
    let r = vdisk::check::check(&p);
    assert!(
        r.problems
            .iter()
            .any(|q| q.offset == Some(192 << 10) && q.detail.contains("CRC")),
        "{:?}",
        r.problems
    );
    wr(&p, (256 << 10) + 60, &[0xEE]);
    assert_refused(&p, "both region tables are invalid");
}

#[test]
fn unknown_required_region_is_refused() {
    let d = tmp();
    let (_, img) = base(&d, "u");
    let p = copy_of(&d, &img, "required.vhdx");
    let g = guid(0x12345678, 0x9ABC, 0xDEF0, [1, 2, 3, 4, 5, 6, 7, 8]);
    for off in [192u64 << 10, 256 << 10] {
        let mut t = rd(&p, off, 64 << 10);
        let n = u32le(&t, 8) as usize;
        let e = 16 + 32 * n;
        t[e..e + 16].copy_from_slice(&g);
        t[e + 16..e + 24].copy_from_slice(&(100 * MIB).to_le_bytes());
        t[e + 24..e + 28].copy_from_slice(&(MIB as u32).to_le_bytes());
        t[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
        t[8..12].copy_from_slice(&(n as u32 + 1).to_le_bytes());
        fix_crc(&mut t, 4);
        wr(&p, off, &t);
    }
    assert_refused(
        &p,
        "unknown required region {12345678-9ABC-DEF0-0102-030405060708}",
    );
    let err = vdisk::open(&p).unwrap_err();
    assert!(matches!(err, vdisk::Error::Unsupported { .. }), "{err:?}");
}

#[test]
fn bat_entries_beyond_eof_or_over_metadata() {
    let d = tmp();
    let (_, img) = base(&d, "b");
    let bat = bat_region(&img);
    let p = copy_of(&d, &img, "beyond.vhdx");
    wr(&p, bat + 8, &((1u64 << 40) | 6).to_le_bytes());
    let disk = vdisk::open(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = disk.read_at(&mut buf, MIB + 512).unwrap_err().to_string();
    assert!(
        err.contains("beyond.vhdx")
            && err.contains("BAT entry")
            && err.contains("beyond the end of the file"),
        "{err}"
    );
    let r = vdisk::check::check(&p);
    assert!(
        r.problems
            .iter()
            .any(|q| q.detail.contains("beyond the end of the file") && q.offset == Some(bat + 8)),
        "{:?}",
        r.problems
    );

    let p = copy_of(&d, &img, "overlap.vhdx");
    wr(&p, bat + 16, &(meta_region(&img) | 6).to_le_bytes());
    let r = vdisk::check::check(&p);
    assert!(r.is_damaged());
    assert_problem(&r, "overlaps the metadata region");
    // two entries pointing at the same block
    let p = copy_of(&d, &img, "twice.vhdx");
    let e1 = rd(&p, bat + 8, 8);
    let st = u64le(&e1, 0) & 7;
    let victim = (2..8).find(|&i| u64le(&rd(&p, bat + 8 * i, 8), 0) & 7 == 6 && st == 6);
    if let Some(v) = victim {
        wr(&p, bat + 8 * v, &e1);
        let r = vdisk::check::check(&p);
        assert_problem(&r, "overlaps the block of entry");
    }
}

#[test]
fn absurd_metadata_values_are_refused() {
    let d = tmp();
    let (_, img) = base(&d, "m");
    let vs = meta_item(&img, VDISK_SIZE());
    let fp = meta_item(&img, FILE_PARAMS());
    let p = copy_of(&d, &img, "huge.vhdx");
    wr(&p, vs, &(65u64 << 40).to_le_bytes());
    assert_refused(&p, "virtual disk size");
    let p = copy_of(&d, &img, "oddsize.vhdx");
    wr(&p, vs, &(8 * MIB + 100).to_le_bytes());
    assert_refused(&p, "virtual disk size");
    // an unknown metadata item flagged IsRequired
    let p = copy_of(&d, &img, "reqitem.vhdx");
    let m = meta_region(&p);
    let mut t = rd(&p, m, 64 << 10);
    let page83 = guid(
        0xBECA12AB,
        0xB2E6,
        0x4523,
        [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
    );
    let i = (0..5)
        .find(|i| t[32 + 32 * i..48 + 32 * i] == page83)
        .unwrap();
    t[32 + 32 * i] ^= 0xFF;
    t[32 + 32 * i + 24] |= 4;
    wr(&p, m, &t);
    assert_refused(&p, "unknown required metadata item");
    for (i, bs) in [3 * MIB as u32, 0, 1 << 31, 512 << 20]
        .into_iter()
        .enumerate()
    {
        let p = copy_of(&d, &img, &format!("bs{i}.vhdx"));
        wr(&p, fp, &bs.to_le_bytes());
        assert_refused(&p, "block size");
    }
}

// ---- differencing ----

/// Writes a differencing child of `parent`: data ranges from `src` plus zero ranges.
fn child(child: &Path, parent: &Path, src: &Path, data: &[(u64, u64)], zeros: &[(u64, u64)]) {
    let mut o = CreateOptions::new(Format::Vhdx, Subformat::Differencing, 0);
    o.parent = Some(parent.to_path_buf());
    o.block_size = Some(MIB);
    let mut sink = vdisk::create(child, &o).unwrap();
    let mut all: Vec<(u64, u64, bool)> = data
        .iter()
        .map(|&(a, b)| (a, b, true))
        .chain(zeros.iter().map(|&(a, b)| (a, b, false)))
        .collect();
    all.sort();
    for (off, len, is_data) in all {
        if is_data {
            sink.write_data(off, &rd(src, off, len as usize)).unwrap();
        } else {
            sink.write_zero(off, len).unwrap();
        }
    }
    sink.finish().unwrap();
}

/// A chain p0 (qemu) <- p1 <- p2 in `dir`, and the flattened raw of p2.
fn chain(d: &tempfile::TempDir) -> (PathBuf, [PathBuf; 3]) {
    let (raw0, p0) = make(d, "p0", 8 * MIB, 21, "block_size=1M");
    let raw1 = path(d, "p1.raw");
    std::fs::copy(&raw0, &raw1).unwrap();
    let mut x = vec![0u8; 3 * MIB as usize];
    Rng::new(3).fill(&mut x);
    wr(&raw1, 512, &x[..5000 & !511]); // partial block
    wr(&raw1, 2 * MIB, &x[..MIB as usize]); // full block
    wr(&raw1, 5 * MIB, &[0u8; MIB as usize]); // zero block hides the parent
    let p1 = path(d, "p1.vhdx");
    child(
        &p1,
        &p0,
        &raw1,
        &[(512, 5000 & !511), (2 * MIB, MIB)],
        &[(5 * MIB, MIB)],
    );
    let raw2 = path(d, "p2.raw");
    std::fs::copy(&raw1, &raw2).unwrap();
    wr(&raw2, 7 * MIB + 4096, &x[MIB as usize..MIB as usize + 8192]);
    wr(
        &raw2,
        3 * MIB - 1024,
        &x[2 * MIB as usize..2 * MIB as usize + 2048],
    );
    let p2 = path(d, "p2.vhdx");
    child(
        &p2,
        &p1,
        &raw2,
        &[(3 * MIB - 1024, 2048), (7 * MIB + 4096, 8192)],
        &[],
    );
    (raw2, [p0, p1, p2])
}

#[test]
fn differencing_chain_reads_flattened_and_survives_a_move() {
    let d = tmp();
    let (raw2, [_, _, p2]) = chain(&d);
    let disk = vdisk::open(&p2).unwrap();
    let info = disk.info();
    assert_eq!(info.subformat, Subformat::Differencing);
    assert_eq!(
        info.parent.as_ref().unwrap().subformat,
        Subformat::Differencing
    );
    assert_eq!(
        info.parent
            .as_ref()
            .unwrap()
            .parent
            .as_ref()
            .unwrap()
            .subformat,
        Subformat::Dynamic
    );
    assert_disk_matches_raw(disk.as_ref(), &raw2);
    // the zero block of p1 is Zero, not the parent's data
    let m = disk.map(5 * MIB, MIB).unwrap();
    assert_eq!(
        m,
        vec![vdisk::Extent {
            offset: 5 * MIB,
            length: MIB,
            state: ExtentState::Zero
        }]
    );
    let r = vdisk::check::check(&p2);
    assert!(!r.is_damaged(), "{:?}", r.problems);
    // move the whole chain: found again through relative_path
    let moved = path(&d, "moved");
    std::fs::create_dir(&moved).unwrap();
    for n in ["p0.vhdx", "p1.vhdx", "p2.vhdx"] {
        std::fs::rename(path(&d, n), moved.join(n)).unwrap();
    }
    assert_disk_matches_raw(vdisk::open(&moved.join("p2.vhdx")).unwrap().as_ref(), &raw2);
}

#[test]
fn missing_parent_is_refused() {
    let d = tmp();
    let (_, [p0, _, p2]) = chain(&d);
    std::fs::remove_file(&p0).unwrap();
    let err = vdisk::open(&p2).unwrap_err();
    assert!(matches!(err, vdisk::Error::Parent { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("parent not found") && msg.contains("p0.vhdx") && msg.contains("p1.vhdx"),
        "{msg}"
    );
    let r = vdisk::check::check(&path(&d, "p1.vhdx"));
    assert!(
        r.is_damaged()
            && r.problems
                .iter()
                .any(|q| q.detail.contains("parent not found")),
        "{:?}",
        r.problems
    );
}

#[test]
fn parent_linkage_mismatch_is_refused() {
    let d = tmp();
    let (_, [p0, p1, _]) = chain(&d);
    // a new DataWriteGuid in the parent (as if it had been modified on its own)
    for off in [64u64 << 10, 128 << 10] {
        let mut h = rd(&p0, off, 4096);
        h[32] ^= 0x55;
        fix_crc(&mut h, 4);
        wr(&p0, off, &h);
    }
    let err = vdisk::open(&p1).unwrap_err();
    assert!(matches!(err, vdisk::Error::Parent { .. }), "{err:?}");
    assert!(
        err.to_string().contains("does not match the DataWriteGuid"),
        "{err}"
    );
    assert_refused(&p1, "does not match the DataWriteGuid");
}

/// Replaces every UTF-16LE occurrence of `from` with `to` (same length) in a file.
fn patch_utf16(p: &Path, from: &str, to: &str) -> usize {
    let enc = |s: &str| {
        s.encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let (f, t) = (enc(from), enc(to));
    let mut b = std::fs::read(p).unwrap();
    let mut n = 0;
    let mut i = 0;
    while i + f.len() <= b.len() {
        if b[i..i + f.len()] == f[..] {
            b[i..i + f.len()].copy_from_slice(&t);
            n += 1;
        }
        i += 1;
    }
    std::fs::write(p, b).unwrap();
    n
}

#[test]
fn parent_loop_is_refused() {
    let d = tmp();
    let (_, [_, p1, p2]) = chain(&d);
    // p1 now names p2 as its parent: p2 -> p1 -> p2
    assert!(patch_utf16(&p1, "p0.vhdx", "p2.vhdx") >= 1);
    let err = vdisk::open(&p2).unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");
    assert!(vdisk::check::check(&p2).is_damaged());
}
