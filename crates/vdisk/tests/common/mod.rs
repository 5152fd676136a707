//! Shared helpers for the vdisk integration tests: deterministic test disks and the
//! real `qemu-img`, which every interop test compares against.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

// Not every test binary uses both.
#[allow(unused_imports)]
pub use testkit::{Rng, qemu_img};

/// Writes a deterministic raw disk of `size` bytes at `path`: a mix of holes, written
/// zeros, random data, compressible text and a repeated pattern, in runs of 4 KiB to
/// 3 MiB at 512-byte-aligned (not block-aligned) offsets. `size` should be a multiple
/// of 512.
pub fn gen_raw(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut pos = 0u64;
    while pos < size {
        let len = ((rng.below(6 * 1024) + 8) * 512).min(size - pos);
        match rng.below(6) {
            0 | 1 => {} // hole
            2 => f.write_all_at(&vec![0u8; len as usize], pos).unwrap(),
            3 => {
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                f.write_all_at(&b, pos).unwrap();
            }
            4 => {
                let line = format!("{seed} log line at {pos:#x} status=ok\n");
                let b: Vec<u8> = line.bytes().cycle().take(len as usize).collect();
                f.write_all_at(&b, pos).unwrap();
            }
            _ => {
                // sparse data: mostly zeros with a byte every 4 KiB (zero-detection edge)
                let mut b = vec![0u8; len as usize];
                for i in (0..b.len()).step_by(4096) {
                    b[i] = (i / 4096) as u8 | 1;
                }
                f.write_all_at(&b, pos).unwrap();
            }
        }
        pos += len;
    }
    // make sure the very last sector holds data, so size truncation bugs show
    let tail = [0xA5u8; 512];
    f.write_all_at(&tail, size - 512).unwrap();
    f.sync_all().unwrap();
}

/// `qemu-img compare -f FA -F FB A B` must say identical.
pub fn qemu_compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = qemu_img(&["compare", "-f", fa, "-F", fb, s(a), s(b)]);
    assert!(out.contains("identical"), "qemu-img compare: {out}");
}

/// `qemu-img check -f FMT P` must pass (vpc has no check in qemu: skipped by callers).
pub fn qemu_check(p: &Path, fmt: &str) {
    qemu_img(&["check", "-f", fmt, s(p)]);
}

/// `qemu-img info --output=json` virtual size.
pub fn qemu_virtual_size(p: &Path, fmt: &str) -> u64 {
    let out = qemu_img(&["info", "-f", fmt, "--output=json", s(p)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs qemu-io's commands `cmds` on the qcow2 image `file`, failing the test on error.
pub fn qemu_io(file: &Path, cmds: &[&str]) {
    let mut c = std::process::Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(s(file)).output().expect("qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compares every byte a [`vdisk::VirtualDisk`] reads with a raw file, in 1 MiB
/// pieces, and checks that its map never calls non-zero bytes zero/unallocated.
pub fn assert_disk_matches_raw(disk: &dyn vdisk::VirtualDisk, raw: &Path) {
    let f = std::fs::File::open(raw).unwrap();
    let size = f.metadata().unwrap().len();
    assert_eq!(
        disk.virtual_size(),
        size,
        "virtual size differs from {}",
        raw.display()
    );
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20) as usize;
        disk.read_at(&mut a[..n], pos).unwrap();
        f.read_exact_at(&mut b[..n], pos).unwrap();
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!("content differs at offset {:#x}", pos + i as u64);
        }
        pos += n as u64;
    }
    // odd-sized, unaligned reads too
    for (off, len) in [(1u64, 3usize), (511, 2), (size / 3 + 7, 70001)] {
        if off + len as u64 <= size {
            let mut x = vec![0u8; len];
            let mut y = vec![0u8; len];
            disk.read_at(&mut x, off).unwrap();
            f.read_exact_at(&mut y, off).unwrap();
            assert!(x == y, "unaligned read at {off:#x}+{len} differs");
        }
    }
    let map = disk.map(0, size).unwrap();
    let mut expect = 0;
    for e in &map {
        assert_eq!(e.offset, expect, "map has a gap or overlap");
        expect = e.offset + e.length;
        if e.state != vdisk::ExtentState::Data {
            let mut p = e.offset;
            while p < e.end() {
                let n = (e.end() - p).min(1 << 20) as usize;
                f.read_exact_at(&mut b[..n], p).unwrap();
                assert!(
                    b[..n].iter().all(|&x| x == 0),
                    "map says {:?} at {p:#x} but raw has data",
                    e.state
                );
                p += n as u64;
            }
        }
    }
    assert_eq!(expect, size, "map does not cover the disk");
}

/// A temporary folder for one test.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Mutation fuzzing: applies `rounds` deterministic corruptions (bit flips, bytes set to
/// extreme values, truncation) to `image` and runs open, map, reads and check on each
/// result. Any panic fails the test; errors are expected. Returns how many mutants
/// still opened (so callers can assert the mutations were not all trivially fatal).
pub fn mutate_and_exercise(
    image: &[u8],
    rounds: usize,
    seed: u64,
    hot: &[(usize, usize)],
) -> usize {
    let mut rng = Rng::new(seed);
    let mut opened = 0;
    for _ in 0..rounds {
        let mut m = image.to_vec();
        let edits = 1 + rng.below(4);
        for _ in 0..edits {
            // half the edits land in the metadata regions the caller names
            let pos = if !hot.is_empty() && rng.below(2) == 0 {
                let (s0, l) = hot[rng.below(hot.len() as u64) as usize];
                s0 + rng.below(l as u64) as usize
            } else {
                rng.below(m.len() as u64) as usize
            };
            if pos >= m.len() {
                continue;
            }
            match rng.below(5) {
                0 => m[pos] ^= 1 << rng.below(8),
                1 => m[pos] = 0xFF,
                2 => m[pos] = 0,
                3 => {
                    for b in m.iter_mut().skip(pos).take(8) {
                        *b = 0xFF;
                    }
                }
                _ => m.truncate(pos),
            }
        }
        let b = vdisk::MemBacking::new(m, "mutant.img");
        let _ = vdisk::check::check_backing(b.clone());
        if let Ok(d) = vdisk::open_backing(b) {
            opened += 1;
            let size = d.virtual_size();
            let _ = d.map(0, size);
            let mut buf = vec![0u8; 64 * 1024];
            for i in 0..8u64 {
                let off = (size / 8) * i;
                let n = (size - off).min(buf.len() as u64) as usize;
                let _ = d.read_at(&mut buf[..n], off);
            }
        }
    }
    opened
}

/// A global allocator for fuzz-style tests: refuses (and so aborts the test with a
/// message) any single allocation over 256 MiB, which catches allocations sized by
/// untrusted fields. Use with
/// `#[global_allocator] static A: common::CappedAlloc = common::CappedAlloc;`.
pub struct CappedAlloc;

pub const ALLOC_CAP: usize = 256 << 20;

unsafe impl std::alloc::GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            eprintln!(
                "CappedAlloc: refused an allocation of {} bytes",
                layout.size()
            );
            return std::ptr::null_mut();
        }
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            eprintln!(
                "CappedAlloc: refused an allocation of {} bytes",
                layout.size()
            );
            return std::ptr::null_mut();
        }
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_CAP {
            eprintln!("CappedAlloc: refused a reallocation to {new_size} bytes");
            return std::ptr::null_mut();
        }
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

/// Asserts that a check report has a problem whose detail contains `needle`, printing
/// every problem when it has not.
pub fn assert_problem(r: &vdisk::CheckReport, needle: &str) {
    assert!(
        r.problems.iter().any(|p| p.detail.contains(needle)),
        "no problem mentions {needle:?}: {:#?}",
        r.problems
    );
}
