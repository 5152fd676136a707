//! Mutation fuzzing of qcow2 images under an allocator that refuses huge allocations.
mod common;
use common::*;

#[global_allocator]
static A: common::CappedAlloc = common::CappedAlloc;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Metadata regions of a qcow2 image: header, L1, L2 tables, refcount table/blocks.
fn hot_regions(img: &[u8]) -> Vec<(usize, usize)> {
    let cs = 1usize << u32::from_be_bytes(img[20..24].try_into().unwrap());
    let l1_off = be64(img, 40) as usize;
    let l1_size = u32::from_be_bytes(img[36..40].try_into().unwrap()) as usize;
    let rt_off = be64(img, 48) as usize;
    let mut hot = vec![(0, 512), (l1_off, l1_size * 8), (rt_off, 64)];
    for i in 0..l1_size {
        let l2 = (be64(img, l1_off + i * 8) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 != 0 {
            hot.push((l2, cs.min(1024)));
        }
    }
    let rb = (be64(img, rt_off) & !0x1ff) as usize;
    if rb != 0 {
        hot.push((rb, 256));
    }
    hot
}

#[test]
fn qcow2_mutants_never_panic() {
    let d = tmp();
    let raw = path(&d, "src.raw");
    gen_raw(&raw, 384 << 10, 7);
    // Plain v3 with 4 KiB clusters and zero clusters.
    let plain = path(&d, "plain.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&raw),
        s(&plain),
    ]);
    qemu_io(&plain, &["write -z 8k 8k", "write -z 100k 4k"]);
    // Compressed (zlib) and extended-L2 images.
    let comp = path(&d, "comp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&raw),
        s(&comp),
    ]);
    let ext = path(&d, "ext.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=16k,extended_l2=on",
        s(&raw),
        s(&ext),
    ]);
    qemu_io(&ext, &["write -z 1k 2k"]);
    for (i, p) in [plain, comp, ext].iter().enumerate() {
        let img = std::fs::read(p).unwrap();
        assert!(vdisk::open_backing(vdisk::MemBacking::new(img.clone(), "x.qcow2")).is_ok());
        let hot = hot_regions(&img);
        let opened = mutate_and_exercise(&img, 1500, 1000 + i as u64, &hot);
        eprintln!("{}: {opened} of 1500 mutants opened", p.display());
        assert!(
            opened > 150,
            "only {opened} of 1500 mutants of {} opened",
            p.display()
        );
    }
}
