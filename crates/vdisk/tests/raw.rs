//! Raw images against qemu-img.
mod common;
use common::*;
use vdisk::{CreateOptions, Format, Subformat};

#[test]
fn raw_reads_and_maps_holes() {
    let d = tmp();
    let src = path(&d, "src.img");
    gen_raw(&src, 24 << 20, 1);
    let disk = vdisk::open(&src).unwrap();
    assert_eq!(disk.info().format, Format::Raw);
    assert_disk_matches_raw(disk.as_ref(), &src);
    let map = disk.map(0, disk.virtual_size()).unwrap();
    assert!(
        map.iter()
            .any(|e| e.state == vdisk::ExtentState::Unallocated),
        "holes must be reported"
    );
}

#[test]
fn raw_convert_is_sparse_and_identical() {
    let d = tmp();
    let src = path(&d, "src.img");
    gen_raw(&src, 16 << 20, 2);
    let dst = path(&d, "dst.img");
    let opts = CreateOptions::new(Format::Raw, Subformat::Fixed, 0);
    let stats = vdisk::convert(&src, &dst, &opts, &mut |_, _| {}).unwrap();
    qemu_compare(&src, "raw", &dst, "raw");
    assert!(stats.zero_bytes > 0);
    let alloc = std::fs::metadata(&dst)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap();
    assert!(
        alloc < 16 << 20,
        "output must be sparse, {alloc} bytes allocated"
    );
    // no temporary file left behind
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
