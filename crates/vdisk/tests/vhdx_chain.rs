//! AVHDX chains written by vdisk's differencing writer, read back (qemu-img cannot
//! open differencing VHDX) through a naive test-only reader and through vdisk's own
//! reader, and compared with a flattened raw copy at every step.
mod common;
mod vhdx_common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vdisk::{CreateOptions, Format, Subformat};
use vhdx_common::TestVhdx;

const MIB: u64 = 1 << 20;

/// Applies scattered changes to a copy of `prev` (written to `next`) and returns the
/// changed ranges, sorted and disjoint. Changes are random data, explicit zeros (which
/// must hide the parent) and, once per step, a whole aligned block of zeros and one of
/// data, so FULLY_PRESENT, PARTIALLY_PRESENT and ZERO blocks all occur.
fn mutate(prev: &Path, next: &Path, sector: u64, block: u64, seed: u64) -> Vec<(u64, u64)> {
    std::fs::copy(prev, next).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(next).unwrap();
    let size = f.metadata().unwrap().len();
    let mut rng = Rng::new(seed);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    // one whole block of zeros and one whole block of data (when the disk has room)
    let nblocks = size / block;
    if nblocks >= 2 {
        let zb = rng.below(nblocks) * block;
        let db = (zb + block) % (nblocks * block);
        ranges.push((zb, block));
        ranges.push((db, block));
        f.write_all_at(&vec![0u8; block as usize], zb).unwrap();
        let mut b = vec![0u8; block as usize];
        rng.fill(&mut b);
        f.write_all_at(&b, db).unwrap();
    }
    for _ in 0..24 {
        let len = (1 + rng.below(3 * MIB / sector)) * sector;
        let off = rng.below((size - len) / sector) * sector;
        let mut b = vec![0u8; len as usize];
        if rng.below(3) != 0 {
            rng.fill(&mut b);
        }
        f.write_all_at(&b, off).unwrap();
        ranges.push((off, len));
    }
    // the last sector changes too (truncation bugs)
    f.write_all_at(&vec![0x5Au8; sector as usize], size - sector)
        .unwrap();
    ranges.push((size - sector, sector));
    f.sync_all().unwrap();
    merge(ranges)
}

fn merge(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in r {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => {
                let end = (last.0 + last.1).max(o + l);
                last.1 = end - last.0;
            }
            _ => out.push((o, l)),
        }
    }
    out
}

/// Writes a differencing child of `parent` holding `ranges` of the raw `src`.
fn write_child(
    child: &Path,
    parent: &Path,
    src: &Path,
    ranges: &[(u64, u64)],
    block: u64,
    sector: u32,
) {
    let mut o = CreateOptions::new(Format::Vhdx, Subformat::Differencing, 0);
    o.parent = Some(parent.to_path_buf());
    o.block_size = Some(block);
    o.logical_sector_size = sector;
    let raw = vdisk::open(src).unwrap();
    let mut sink = vdisk::create(child, &o).unwrap();
    vdisk::copy_ranges(raw.as_ref(), sink.as_mut(), ranges, &mut |_| {}).unwrap();
    sink.finish().unwrap();
}

/// Which reader verifies the layers.
#[derive(Clone, Copy, PartialEq)]
enum Reader {
    /// The naive reader in `vhdx_common` (independent of vdisk's reader).
    Test,
    /// vdisk's reader, plus its structural check.
    Vdisk,
}

fn verify(reader: Reader, img: &Path, raw: &Path, sector: u64, differencing: bool) {
    match reader {
        Reader::Test => {
            let t = TestVhdx::open(img);
            assert_eq!(t.sector, sector);
            assert_eq!(t.parent.is_some(), differencing);
            t.assert_matches_raw(raw);
        }
        Reader::Vdisk => {
            let disk = vdisk::open(img).unwrap();
            let info = disk.info();
            assert_eq!(info.logical_sector_size as u64, sector);
            assert_eq!(info.parent.is_some(), differencing);
            if differencing {
                assert_eq!(info.subformat, Subformat::Differencing);
            }
            assert_disk_matches_raw(disk.as_ref(), raw);
            let r = vdisk::check::check(img);
            assert!(!r.is_damaged(), "{}: {:?}", img.display(), r.problems);
        }
    }
}

/// Base (from `make_base`), then three children, each checked against the flattened
/// raw of its step; earlier layers must still read as they did.
fn chain(
    reader: Reader,
    sector: u64,
    size: u64,
    child_blocks: [u64; 3],
    make_base: impl Fn(&Path, &Path),
) {
    let d = tmp();
    let sub = d.path().join("snapshots");
    std::fs::create_dir(&sub).unwrap();
    let raw0 = path(&d, "step0.img");
    gen_raw(&raw0, size, 77 + sector);
    let base = path(&d, "base.vhdx");
    make_base(&raw0, &base);
    let mut layers: Vec<(PathBuf, PathBuf)> = vec![(base.clone(), raw0.clone())];
    for (k, &block) in child_blocks.iter().enumerate() {
        let (parent, prev_raw) = layers.last().cloned().unwrap();
        let raw = path(&d, &format!("step{}.img", k + 1));
        let ranges = mutate(&prev_raw, &raw, sector, block, 1000 + k as u64);
        // the middle child lives in a sub-folder: relative path `..\`-style parents
        let child = if k == 1 {
            sub.join("child2.avhdx")
        } else {
            path(&d, &format!("child{}.avhdx", k + 1))
        };
        write_child(&child, &parent, &raw, &ranges, block, sector as u32);
        verify(reader, &child, &raw, sector, true);
        layers.push((child, raw));
    }
    for (i, (img, raw)) in layers.iter().enumerate() {
        verify(reader, img, raw, sector, i > 0);
    }
}

fn qemu_base(raw: &Path, base: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "block_size=8M",
        s(raw),
        s(base),
    ]);
}

fn own_base_4096(raw: &Path, base: &Path) {
    let mut o = CreateOptions::new(Format::Vhdx, Subformat::Dynamic, 0);
    o.logical_sector_size = 4096;
    o.block_size = Some(MIB);
    vdisk::convert(raw, base, &o, &mut |_, _| {}).unwrap();
}

fn fixed_base(raw: &Path, base: &Path) {
    let mut o = CreateOptions::new(Format::Vhdx, Subformat::Fixed, 0);
    o.block_size = Some(2 * MIB);
    vdisk::convert(raw, base, &o, &mut |_, _| {}).unwrap();
}

#[test]
fn chain_of_three_on_qemu_base() {
    chain(
        Reader::Test,
        512,
        24 * MIB + 3 * 512,
        [MIB, 2 * MIB, 8 * MIB],
        qemu_base,
    );
}

#[test]
fn chain_of_three_on_own_base_4096() {
    chain(
        Reader::Test,
        4096,
        20 * MIB + 4096,
        [MIB, 4 * MIB, MIB],
        own_base_4096,
    );
}

#[test]
fn chain_on_fixed_base() {
    chain(
        Reader::Test,
        512,
        10 * MIB,
        [MIB, MIB, 32 * MIB],
        fixed_base,
    );
}

#[test]
fn vdisk_reader_chain_of_three_on_qemu_base() {
    chain(
        Reader::Vdisk,
        512,
        24 * MIB + 3 * 512,
        [MIB, 2 * MIB, 8 * MIB],
        qemu_base,
    );
}

#[test]
fn vdisk_reader_chain_of_three_on_own_base_4096() {
    chain(
        Reader::Vdisk,
        4096,
        20 * MIB + 4096,
        [MIB, 4 * MIB, MIB],
        own_base_4096,
    );
}

#[test]
fn vdisk_reader_chain_on_fixed_base() {
    chain(
        Reader::Vdisk,
        512,
        10 * MIB,
        [MIB, MIB, 32 * MIB],
        fixed_base,
    );
}

fn empty_and_zero_children(reader: Reader) {
    let d = tmp();
    let raw = path(&d, "r.img");
    gen_raw(&raw, 8 * MIB, 5);
    let base = path(&d, "base.vhdx");
    qemu_img(&["convert", "-f", "raw", "-O", "vhdx", s(&raw), s(&base)]);
    // nothing written: reads the parent
    let empty = path(&d, "empty.avhdx");
    write_child(&empty, &base, &raw, &[], MIB, 512);
    verify(reader, &empty, &raw, 512, true);
    // everything zeroed: reads zeros although the parent has data
    let zeros = path(&d, "zeros.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let zc = path(&d, "zero.avhdx");
    write_child(&zc, &base, &zeros, &[(0, 8 * MIB)], MIB, 512);
    verify(reader, &zc, &zeros, 512, true);
    // whole-block zeros need no data blocks at all
    assert!(std::fs::metadata(&zc).unwrap().len() <= 4 * MIB);
}

#[test]
fn empty_child_shows_parent_and_zero_child_hides_it() {
    empty_and_zero_children(Reader::Test);
}

#[test]
fn vdisk_reader_empty_and_zero_children() {
    empty_and_zero_children(Reader::Vdisk);
}
