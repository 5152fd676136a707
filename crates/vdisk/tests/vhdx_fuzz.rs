//! Mutation fuzzing of the VHDX reader and checker under a capped allocator: headers,
//! region tables, metadata, BAT and a dirty log are corrupted; nothing may panic or
//! allocate by an untrusted size.
mod common;
use common::*;
use std::path::Path;

#[global_allocator]
static A: common::CappedAlloc = common::CappedAlloc;

const MIB: usize = 1 << 20;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn fix_crc(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let c = crc32c::crc32c(b);
    b[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// A 4 MiB disk with 1 MiB blocks made by qemu-img from deterministic data.
fn qemu_image(dir: &Path) -> Vec<u8> {
    let raw = dir.join("f.raw");
    gen_raw(&raw, 4 << 20, 77);
    let img = dir.join("f.vhdx");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        s(&raw),
        s(&img),
    ]);
    std::fs::read(&img).unwrap()
}

/// Adds a dirty log to `img` (qemu layout: log at 1 MiB, BAT at 2 MiB): one entry that
/// rewrites the first BAT sector (block 0 becomes ZERO) and zeroes 8 KiB of metadata
/// padding.
fn make_dirty(img: &mut [u8]) {
    let guid = [9u8; 16];
    let h = if le64(img, 128 << 10 | 8) > le64(img, 64 << 10 | 8) {
        128 << 10
    } else {
        64 << 10
    };
    let log = le64(img, h + 72) as usize;
    let bat = 2 * MIB;
    let mut sector = img[bat..bat + 4096].to_vec();
    sector[..8].copy_from_slice(&2u64.to_le_bytes());
    let seq = 5u64;
    let mut e = vec![0u8; 8192];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&8192u32.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&2u32.to_le_bytes());
    e[32..48].copy_from_slice(&guid);
    let len = img.len() as u64;
    e[48..56].copy_from_slice(&len.to_le_bytes());
    e[56..64].copy_from_slice(&len.to_le_bytes());
    // data descriptor
    e[64..68].copy_from_slice(b"desc");
    e[68..72].copy_from_slice(&sector[4092..]);
    e[72..80].copy_from_slice(&sector[..8]);
    e[80..88].copy_from_slice(&(bat as u64).to_le_bytes());
    e[88..96].copy_from_slice(&seq.to_le_bytes());
    // zero descriptor
    e[96..100].copy_from_slice(b"zero");
    e[104..112].copy_from_slice(&8192u64.to_le_bytes());
    e[112..120].copy_from_slice(&((3 * MIB + (512 << 10)) as u64).to_le_bytes());
    e[120..128].copy_from_slice(&seq.to_le_bytes());
    e[4096..4100].copy_from_slice(b"data");
    e[4104..8188].copy_from_slice(&sector[8..4092]);
    e[8188..].copy_from_slice(&(seq as u32).to_le_bytes());
    fix_crc(&mut e, 4);
    img[log..log + 8192].copy_from_slice(&e);
    img[h + 48..h + 64].copy_from_slice(&guid);
    fix_crc(&mut img[h..h + 4096], 4);
}

/// Hot regions: file identifier, both headers, both region tables, the metadata
/// table and items, and the start of the BAT.
fn hot(img: &[u8]) -> Vec<(usize, usize)> {
    let table = &img[192 << 10..(192 << 10) + 4096];
    let mut v = vec![
        (0, 16),
        (64 << 10, 128),
        (128 << 10, 128),
        (192 << 10, 96),
        (256 << 10, 96),
    ];
    for i in 0..le32(table, 8).min(4) as usize {
        let off = le64(table, 16 + 32 * i + 16) as usize;
        v.push((off, 256));
        v.push((off + (64 << 10), 128));
    }
    v
}

#[test]
fn mutants_never_panic_or_overallocate() {
    let d = tmp();
    let img = qemu_image(d.path());
    assert!(vdisk::open_backing(vdisk::MemBacking::new(img.clone(), "ok.vhdx")).is_ok());
    let opened = mutate_and_exercise(&img, 1200, 1, &hot(&img));
    assert!(
        opened > 50,
        "only {opened} mutants opened: the exercise is not meaningful"
    );

    let mut dirty = img.clone();
    make_dirty(&mut dirty);
    let disk = vdisk::open_backing(vdisk::MemBacking::new(dirty.clone(), "dirty.vhdx")).unwrap();
    assert!(
        disk.info()
            .details
            .iter()
            .any(|(k, v)| k == "log" && v.contains("dirty: 1"))
    );
    let mut h = hot(&dirty);
    h.push((MIB, 8192));
    let opened = mutate_and_exercise(&dirty, 1200, 2, &h);
    assert!(opened > 50, "only {opened} dirty mutants opened");
}
