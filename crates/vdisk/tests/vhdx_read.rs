//! VHDX reader, log replay and check against qemu-img.
mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vdisk::{ExtentState, Subformat};

/// Size not a multiple of any block size: 37 MiB + 3 sectors.
const ODD: u64 = (37 << 20) + 512 * 3;

fn make(dir: &tempfile::TempDir, name: &str, size: u64, seed: u64, opts: &str) -> (std::path::PathBuf, std::path::PathBuf) {
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

/// Where qemu-img says data is, we must have data too (qemu's "data": true means
/// allocated in the file).
fn assert_map_agrees_with_qemu(disk: &dyn vdisk::VirtualDisk, img: &Path) {
    let out = qemu_img(&["map", "-f", "vhdx", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ours = disk.map(0, disk.virtual_size()).unwrap();
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let qdata = e["data"].as_bool().unwrap() && !e["zero"].as_bool().unwrap();
        for o in ours.iter().filter(|o| o.offset < start + len && start < o.end()) {
            if !qdata {
                assert_ne!(o.state, ExtentState::Data, "qemu says {e} is not data, we say {o:?}");
            }
        }
    }
}

#[test]
fn dynamic_default_block_size() {
    let d = tmp();
    let (raw, img) = make(&d, "dyn", ODD, 11, "");
    let disk = vdisk::open(&img).unwrap();
    let info = disk.info();
    assert_eq!(info.subformat, Subformat::Dynamic);
    assert_eq!(info.block_size, Some(8 << 20));
    assert_disk_matches_raw(disk.as_ref(), &raw);
    assert_map_agrees_with_qemu(disk.as_ref(), &img);
    let r = vdisk::check::check(&img);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}
