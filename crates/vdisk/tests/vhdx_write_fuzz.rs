//! Mutation fuzzing of what the VHDX writer reads: a differencing child parses its
//! parent's header, region table and metadata, so damaged parents must give errors,
//! never panics or huge allocations (the capped allocator aborts on > 256 MiB).
mod common;
use common::*;
use std::os::unix::fs::FileExt;
use vdisk::{CreateOptions, Format, Subformat};

#[global_allocator]
static A: common::CappedAlloc = common::CappedAlloc;

const MIB: usize = 1 << 20;
/// Header section up to the end of the second region table.
const HEAD: (usize, usize) = (0, 320 << 10);
/// Metadata table and items.
const META: (usize, usize) = (2 * MIB, 128 << 10);

fn small_image(dir: &tempfile::TempDir) -> Vec<u8> {
    let p = path(dir, "small.vhdx");
    let mut o = CreateOptions::new(Format::Vhdx, Subformat::Dynamic, 4 * MIB as u64);
    o.block_size = Some(MIB as u64);
    let mut s = vdisk::create(&p, &o).unwrap();
    s.write_data(MIB as u64, &[0x42u8; 8192]).unwrap();
    s.finish().unwrap();
    std::fs::read(&p).unwrap()
}

#[test]
fn damaged_parents_never_panic() {
    let d = tmp();
    let image = small_image(&d);
    let parent = path(&d, "parent.vhdx");
    let child = path(&d, "child.avhdx");
    let mut rng = Rng::new(0x7668_6478);
    let mut accepted = 0;
    let rounds = 600;
    for _ in 0..rounds {
        // Only the parts the parser reads matter; keep the file small to stay fast.
        let mut m = image[..META.0 + META.1].to_vec();
        for _ in 0..1 + rng.below(4) {
            let (s0, l) = if rng.below(2) == 0 { HEAD } else { META };
            let pos = s0 + rng.below(l as u64) as usize;
            if pos >= m.len() {
                continue;
            }
            match rng.below(5) {
                0 => m[pos] ^= 1 << rng.below(8),
                1 => m[pos] = 0xFF,
                2 => m[pos] = 0,
                3 => m.iter_mut().skip(pos).take(8).for_each(|b| *b = 0xFF),
                _ => m.truncate(pos.max(8)),
            }
        }
        let _ = std::fs::remove_file(&parent);
        let f = std::fs::File::create(&parent).unwrap();
        f.set_len(m.len() as u64).unwrap();
        for (s0, l) in [HEAD, META] {
            if s0 < m.len() {
                f.write_all_at(&m[s0..(s0 + l).min(m.len())], s0 as u64)
                    .unwrap();
            }
        }
        drop(f);
        let mut o = CreateOptions::new(Format::Vhdx, Subformat::Differencing, 0);
        o.parent = Some(parent.clone());
        if let Ok(sink) = vdisk::create(&child, &o) {
            accepted += 1;
            drop(sink);
            std::fs::remove_file(&child).unwrap();
        }
        assert!(!child.exists());
    }
    // Many mutations hit bytes that do not matter (reserved fields, CRC-protected
    // copies): the exercise is meaningful only if some parents still parse.
    assert!(
        accepted > rounds / 10,
        "only {accepted} of {rounds} parents accepted"
    );
    assert!(accepted < rounds, "no mutation was ever refused");
}

#[test]
fn writer_output_through_reader_mutations() {
    let d = tmp();
    let image = small_image(&d);
    let hot = [HEAD, META, (3 * MIB, 64)];
    let opened = mutate_and_exercise(&image, 800, 0x5752_4954, &hot);
    assert!(opened > 0, "no mutant opened");
}
