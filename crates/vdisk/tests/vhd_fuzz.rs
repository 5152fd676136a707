//! Mutation fuzzing of VHD parsing under a capped allocator: no panic, no huge
//! allocation, whatever the damage.
mod common;
use common::*;
use vdisk::{CreateOptions, Format, Subformat};

#[global_allocator]
static A: common::CappedAlloc = common::CappedAlloc;

/// A small VHD written by our writer from a deterministic raw disk.
fn small_image(sub: Subformat, block: u64) -> Vec<u8> {
    let d = tmp();
    let src = path(&d, "src.raw");
    gen_raw(&src, 1 << 20, 42);
    let dst = path(&d, "img.vhd");
    let mut opts = CreateOptions::new(Format::Vhd, sub, 0);
    opts.block_size = Some(block);
    vdisk::convert(&src, &dst, &opts, &mut |_, _| {}).unwrap();
    std::fs::read(&dst).unwrap()
}

#[test]
fn mutated_dynamic_vhd_never_panics() {
    let img = small_image(Subformat::Dynamic, 64 << 10);
    let bat = u64::from_be_bytes(img[528..536].try_into().unwrap()) as usize;
    let n = img.len();
    // footer copy, dynamic header, BAT, a block bitmap, end footer
    let first_block = 4 * 512;
    let hot = [
        (0, 512),
        (512, 1024),
        (bat, 512),
        (first_block, 512),
        (n - 512, 512),
    ];
    let opened = mutate_and_exercise(&img, 2000, 1, &hot);
    eprintln!("dynamic: {opened} of 2000 mutants opened");
    assert!(opened > 200, "only {opened} mutants opened");
}

#[test]
fn mutated_fixed_vhd_never_panics() {
    let img = small_image(Subformat::Fixed, 2 << 20);
    let n = img.len();
    let opened = mutate_and_exercise(&img, 500, 2, &[(n - 512, 512)]);
    assert!(opened > 50, "only {opened} mutants opened");
}
