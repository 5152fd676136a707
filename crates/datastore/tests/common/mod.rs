//! Shared helpers for the datastore integration tests: deterministic fixtures (a seeded
//! PRNG; random data, compressible text, written zeros and holes), mutations that
//! report the exact ranges they changed, backup/restore shorthands, byte-for-byte
//! comparison, and an independent oracle of which recovery points and disks reference
//! which blobs (for checking verify's reports).
#![allow(dead_code)]

use datastore::format::{self, PackEntry};
use datastore::{
    BackupRequest, BaseChoice, Consistency, Datastore, DiskInput, Id, Manifest, Source,
    StoreOptions, VerifyReport,
};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vdisk::VirtualDisk;

/// The datastore's default block size.
pub const BS: u64 = 64 * 1024;
/// A plaintext string every fixture holds many times (encryption tests grep for it).
pub const MARKER: &str = "HOLDFAST-PLAINTEXT-MARKER";
/// 20 MiB + 4 KiB: not a multiple of the block size.
pub const ODD_SIZE: u64 = (20 << 20) + 4096;

// Not every test binary uses both.
#[allow(unused_imports)]
pub use testkit::{Rng, qemu_img};

/// Compressible text holding [`MARKER`], `len` bytes.
pub fn text(len: usize, tag: u64) -> Vec<u8> {
    let line = format!("{MARKER} {tag:x} log line: status=ok, all systems nominal\n");
    line.bytes().cycle().take(len).collect()
}

/// Writes a deterministic raw disk of `size` bytes (a multiple of 512) at `path` and
/// returns its bytes: runs of 4 KiB to ~1.5 MiB at 512-aligned offsets of holes (never
/// written), written zeros, random data, compressible text and sparse bytes. The last
/// sector always holds data.
pub fn gen_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    assert_eq!(size % 512, 0);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut data = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    let mut pos = 0u64;
    while pos < size {
        let len = ((rng.below(3 * 1024) + 8) * 512).min(size - pos);
        let r = pos as usize..(pos + len) as usize;
        match rng.below(6) {
            0 => {}                                      // hole
            1 => f.write_all_at(&data[r], pos).unwrap(), // written zeros
            2 | 3 => {
                rng.fill(&mut data[r.clone()]);
                f.write_all_at(&data[r], pos).unwrap();
            }
            4 => {
                data[r.clone()].copy_from_slice(&text(len as usize, seed ^ pos));
                f.write_all_at(&data[r], pos).unwrap();
            }
            _ => {
                for i in (0..len as usize).step_by(4096) {
                    data[r.start + i] = (i / 4096) as u8 | 1;
                }
                f.write_all_at(&data[r], pos).unwrap();
            }
        }
        pos += len;
    }
    let end = size as usize;
    data[end - 512..].fill(0xA5);
    f.write_all_at(&data[end - 512..], size - 512).unwrap();
    f.sync_all().unwrap();
    data
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Creates a datastore at `dir`; encrypted ones get their key at the default place.
pub fn create_store(dir: &Path, encrypted: bool) -> Datastore {
    Datastore::create(
        dir,
        &StoreOptions {
            key_file: encrypted.then(|| datastore::default_key_path(dir)),
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn source(name: &str) -> Source {
    Source {
        name: name.into(),
        id: format!("{name}-uuid"),
    }
}

/// One disk of a backup: the image path (opened fresh, so size changes are seen) and
/// the changed ranges, if any.
pub struct In<'a> {
    pub path: &'a Path,
    pub changed: Option<Vec<(u64, u64)>>,
}

/// Backs up `disks` as recovery point of `src`.
pub fn try_backup(
    ds: &Datastore,
    src: &str,
    base: BaseChoice,
    disks: &[In<'_>],
) -> datastore::Result<Manifest> {
    let opened: Vec<Box<dyn VirtualDisk>> =
        disks.iter().map(|d| vdisk::open(d.path).unwrap()).collect();
    let inputs = disks
        .iter()
        .zip(&opened)
        .map(|(d, o)| DiskInput {
            disk: o.as_ref(),
            name: d.path.file_name().unwrap().to_string_lossy().into_owned(),
            format: o.info().format.name().to_string(),
            changed: d.changed.clone(),
            excluded: Vec::new(),
        })
        .collect();
    let mut last = (0, 0);
    let m = ds.backup(
        BackupRequest {
            source: source(src),
            consistency: Consistency::CrashConsistent,
            base,
            disks: inputs,
        },
        &mut |done, total| {
            assert!(done >= last.0 && done <= total, "progress {done}/{total}");
            last = (done, total);
        },
    )?;
    Ok(m)
}

pub fn backup(ds: &Datastore, src: &str, base: BaseChoice, disks: &[In<'_>]) -> Manifest {
    try_backup(ds, src, base, disks).unwrap()
}

/// Backs up one disk without changed ranges.
pub fn backup_full(ds: &Datastore, src: &str, path: &Path) -> Manifest {
    backup(
        ds,
        src,
        BaseChoice::Latest,
        &[In {
            path,
            changed: None,
        }],
    )
}

/// Panics with the first differing offset unless `got == want`.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: content differs at offset {i:#x} (block {}): got {:02x?}, want {:02x?}",
            i as u64 / BS,
            &got[i..(i + 16).min(got.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
}

/// Reads a whole virtual disk in pieces that straddle block boundaries, plus a few
/// unaligned reads checked against the first read; also checks that the extent map
/// never calls non-zero bytes zero.
pub fn read_disk(disk: &dyn VirtualDisk) -> Vec<u8> {
    let size = disk.virtual_size();
    let mut out = vec![0u8; size as usize];
    let step = (1 << 20) + 3 * 512;
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(step);
        disk.read_at(&mut out[pos as usize..(pos + n) as usize], pos)
            .unwrap();
        pos += n;
    }
    for (off, len) in [
        (1u64, 3usize),
        (BS - 7, 70001),
        (size - 1, 1),
        (size / 3 + 5, 4099),
    ] {
        if off + len as u64 <= size {
            let mut x = vec![0u8; len];
            disk.read_at(&mut x, off).unwrap();
            assert!(
                x[..] == out[off as usize..off as usize + len],
                "unaligned read at {off:#x}+{len} differs"
            );
        }
    }
    assert!(disk.read_at(&mut [0u8; 2], size - 1).is_err());
    for e in disk.map(0, size).unwrap() {
        if e.state != vdisk::ExtentState::Data {
            assert!(
                vdisk::copy::is_zero(&out[e.offset as usize..e.end() as usize]),
                "map says {:?} at {:#x} but the disk has data",
                e.state,
                e.offset
            );
        }
    }
    out
}

/// Disk `disk` of `m`, read through `open_disk`.
pub fn restore(ds: &Datastore, m: &Manifest, disk: usize) -> Vec<u8> {
    let idx = Arc::new(ds.blob_index().unwrap());
    let pd = ds.open_disk(m, disk, idx).unwrap();
    read_disk(&pd)
}

/// Disk `disk` of `m`, written through `vdisk::copy::write_image` to a raw file at
/// `dst`, then read back.
pub fn restore_to_raw(ds: &Datastore, m: &Manifest, disk: usize, dst: &Path) -> Vec<u8> {
    let idx = Arc::new(ds.blob_index().unwrap());
    let pd = ds.open_disk(m, disk, idx).unwrap();
    let opts = vdisk::CreateOptions::new(
        vdisk::Format::Raw,
        vdisk::Subformat::Fixed,
        pd.virtual_size(),
    );
    vdisk::copy::write_image(&pd, dst, &opts, &mut |_, _| {}).unwrap();
    let b = std::fs::read(dst).unwrap();
    std::fs::remove_file(dst).unwrap();
    b
}

/// Sorts and merges ranges (overlapping or touching).
pub fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        match out.last_mut() {
            Some(m) if o <= m.0 + m.1 => m.1 = m.1.max(o + l - m.0),
            _ => out.push((o, l)),
        }
    }
    out
}

/// Blocks (of `BS`) that the ranges touch.
pub fn touched_blocks(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for &(o, l) in ranges {
        set.extend(o / BS..(o + l).div_ceil(BS));
    }
    set
}

/// Punches a hole (reads as zeros, deallocated).
pub fn punch_hole(f: &std::fs::File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
    };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// Applies `n` scattered writes (4 KiB-aligned, 4 KiB to 96 KiB) to the raw file at
/// `path` and to `model`: random data, text, written zeros, punched holes, writes
/// into regions that were zero, and the last sector. Returns the changed ranges,
/// sorted and merged.
pub fn mutate(path: &Path, model: &mut [u8], rng: &mut Rng, n: usize) -> Vec<(u64, u64)> {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = model.len() as u64;
    let mut ranges = Vec::new();
    for i in 0..n {
        let mut off = rng.below(size / 4096) * 4096;
        if i % 5 == 1 {
            // Into a region that was zero (a hole or written zeros), when one is found.
            for _ in 0..64 {
                let o = rng.below(size / 4096) * 4096;
                let e = (o + BS).min(size) as usize;
                if vdisk::copy::is_zero(&model[o as usize..e]) {
                    off = o;
                    break;
                }
            }
        }
        if i == n - 1 {
            off = size - 4096;
        }
        let len = ((rng.below(24) + 1) * 4096).min(size - off);
        let r = off as usize..(off + len) as usize;
        match rng.below(5) {
            0 | 1 => rng.fill(&mut model[r.clone()]),
            2 => model[r.clone()].copy_from_slice(&text(len as usize, rng.next_u64())),
            3 => model[r.clone()].fill(0),
            _ => {
                model[r.clone()].fill(0);
                punch_hole(&f, off, len);
                ranges.push((off, len));
                continue;
            }
        }
        f.write_all_at(&model[r], off).unwrap();
        ranges.push((off, len));
    }
    f.sync_all().unwrap();
    merge(ranges)
}

/// Flips one byte of a file.
pub fn flip(path: &Path, off: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
}

/// Every file under `dir/sub`, sorted.
pub fn files(dir: &Path, sub: &str) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join(sub), &mut out);
    out.sort();
    out
}

/// A pack's entries, parsed from its trailer.
pub fn pack_entries(pack: &Path) -> Vec<PackEntry> {
    let b = std::fs::read(pack).unwrap();
    format::parse_pack_trailer(s(pack), b.len() as u64, &b).unwrap()
}

/// The datastore key (`packs/xx/…`) of a file in datastore `dir`.
pub fn key_of(dir: &Path, file: &Path) -> String {
    file.strip_prefix(dir)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Which blobs each (recovery point, disk) needs: its index pieces and its non-zero
/// block ids. Read from an undamaged datastore, before a test damages it.
pub type Refs = HashMap<(String, u32), HashSet<Id>>;

pub fn refs(ds: &Datastore) -> Refs {
    let idx = ds.blob_index().unwrap();
    let (points, bad) = ds.points().unwrap();
    assert!(bad.is_empty());
    let mut out = Refs::new();
    for m in &points {
        for d in &m.disks {
            let set = out.entry((m.id.clone(), d.index)).or_default();
            for h in &d.pieces {
                let pid = Id::from_hex(h).unwrap();
                set.insert(pid);
                set.extend(
                    ds.read_piece(&idx, pid)
                        .unwrap()
                        .into_iter()
                        .filter(|id| !id.is_zero()),
                );
            }
        }
    }
    out
}

/// The (point, disk) pairs that need any of `ids`.
pub fn needing(refs: &Refs, ids: &HashSet<Id>) -> BTreeSet<(String, u32)> {
    refs.iter()
        .filter(|(_, set)| !set.is_disjoint(ids))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The (point, disk) pairs a verify report names as damaged (disks of readable points).
pub fn damaged_disks(r: &VerifyReport) -> BTreeSet<(String, u32)> {
    r.damaged_points
        .iter()
        .flat_map(|p| p.disks.iter().map(|d| (p.id.clone(), d.disk)))
        .collect()
}

pub fn verify(ds: &Datastore) -> VerifyReport {
    ds.verify(&mut |_, _| {}).unwrap()
}

pub fn assert_clean(r: &VerifyReport) {
    assert!(r.is_clean(), "verify is not clean: {r:#?}");
    assert_eq!(r.unreferenced_damage, 0, "{r:#?}");
}
