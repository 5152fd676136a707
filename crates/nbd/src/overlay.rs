//! A copy-on-write overlay: writes go to a sparse temporary file, reads merge it with a
//! read-only base. The base is never written.
//!
//! Granularity is [`BLOCK`] (4 KiB): a write covering part of a block first copies the
//! block from the base (read-modify-write), then the block is marked dirty in a bitmap
//! of one bit per block (32 MiB of bitmap per TiB of export, allocated on the first
//! write). Writers are serialised; readers take the lock only to copy the dirty bits of
//! their range, and a block's bit is set only after its data is in the file, so a
//! reader sees either the base or the complete new data.
//!
//! The overlay file is a named temporary file (`holdfast-overlay-*` in the chosen
//! folder), removed when the overlay is dropped.

use crate::server::Export;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Overlay granularity in bytes.
pub const BLOCK: u64 = 4096;

/// Everything an overlay can fail with when it is created.
#[derive(thiserror::Error, Debug)]
pub enum OverlayError {
    #[error("creating the overlay file in {dir}: {source}")]
    Create {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A writable view of a read-only [`Export`]; see the module documentation.
pub struct CowExport {
    base: Arc<dyn Export>,
    size: u64,
    file: tempfile::NamedTempFile,
    /// One bit per block; empty until the first write.
    dirty: Mutex<Vec<u64>>,
}

impl CowExport {
    /// An overlay over `base` whose file lives in `dir`.
    pub fn new(base: Arc<dyn Export>, dir: &Path) -> Result<CowExport, OverlayError> {
        let file = tempfile::Builder::new()
            .prefix("holdfast-overlay-")
            .tempfile_in(dir)
            .map_err(|source| OverlayError::Create {
                dir: dir.to_path_buf(),
                source,
            })?;
        Ok(CowExport {
            size: base.size(),
            base,
            file,
            dirty: Mutex::new(Vec::new()),
        })
    }

    /// Path of the overlay file (it disappears when the overlay is dropped).
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Blocks written so far.
    pub fn dirty_blocks(&self) -> u64 {
        self.bits().iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn bits(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        locks::lock(&self.dirty)
    }

    /// `[off, end)` (not empty) cut where blocks change between written to the
    /// overlay and not: `(start, end, written)` runs, from one look at the bitmap.
    fn runs(&self, off: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let (first, last) = (off / BLOCK, (end - 1) / BLOCK);
        let dirty: Vec<bool> = {
            let bits = self.bits();
            (first..=last).map(|b| is_set(&bits, b)).collect()
        };
        let mut out = Vec::new();
        let mut pos = off;
        let mut i = 0usize;
        while pos < end {
            let state = dirty[i];
            let mut j = i;
            while j + 1 < dirty.len() && dirty[j + 1] == state {
                j += 1;
            }
            let run_end = ((first + j as u64 + 1) * BLOCK).min(end);
            out.push((pos, run_end, state));
            pos = run_end;
            i = j + 1;
        }
        out
    }

    fn file(&self) -> &File {
        self.file.as_file()
    }

    fn check(&self, off: u64, len: usize) -> io::Result<u64> {
        off.checked_add(len as u64)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at {off} go past the end of the export ({})",
                        self.size
                    ),
                )
            })
    }

    /// Length of block `b` (the last one may be short).
    fn block_len(&self, b: u64) -> u64 {
        (self.size - b * BLOCK).min(BLOCK)
    }
}

fn is_set(bits: &[u64], b: u64) -> bool {
    bits.get((b / 64) as usize)
        .is_some_and(|w| w & (1 << (b % 64)) != 0)
}

impl Export for CowExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let end = self.check(off, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        // Runs of blocks with the same state, read in one go each.
        for (pos, run_end, state) in self.runs(off, end) {
            let out = &mut buf[(pos - off) as usize..(run_end - off) as usize];
            if state {
                self.file().read_exact_at(out, pos)?;
            } else {
                self.base.read_at(out, pos)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = self.check(off, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut bits = self.bits();
        if bits.is_empty() {
            bits.resize(self.size.div_ceil(BLOCK).div_ceil(64) as usize, 0);
        }
        let (first, last) = (off / BLOCK, (end - 1) / BLOCK);
        let mut block = vec![0u8; BLOCK as usize];
        for b in first..=last {
            let start = b * BLOCK;
            let blen = self.block_len(b);
            let (from, to) = (off.max(start), end.min(start + blen));
            let src = &buf[(from - off) as usize..(to - off) as usize];
            if (from == start && to == start + blen) || is_set(&bits, b) {
                // Whole block, or the file already holds it: write in place.
                self.file().write_all_at(src, from)?;
            } else {
                let blk = &mut block[..blen as usize];
                self.base.read_at(blk, start)?;
                blk[(from - start) as usize..(to - start) as usize].copy_from_slice(src);
                self.file().write_all_at(blk, start)?;
            }
            bits[(b / 64) as usize] |= 1 << (b % 64);
        }
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        let end = self.check(off, usize::try_from(len).unwrap_or(usize::MAX))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        // Written blocks are data; the rest is whatever the base says.
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut push = |l: u64, f: u32| match out.last_mut() {
            Some((pl, pf)) if *pf == f => *pl += l,
            _ => out.push((l, f)),
        };
        for (pos, run_end, state) in self.runs(off, end) {
            if state {
                push(run_end - pos, 0);
            } else {
                let mut covered = 0;
                for (l, f) in self.base.block_status(pos, run_end - pos)? {
                    let l = l.min(run_end - pos - covered);
                    push(l, f);
                    covered += l;
                }
                if covered < run_end - pos {
                    // The base answered a prefix: so do we.
                    break;
                }
            }
        }
        Ok(out)
    }

    fn writable(&self) -> bool {
        true
    }

    fn flush(&self) -> io::Result<()> {
        // The overlay is thrown away at exit: nothing to make durable.
        Ok(())
    }
}

/// A read-only export of bytes in memory (tests, examples).
pub struct MemExport(pub Vec<u8>);

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "out of range"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn writes_land_in_the_overlay_and_reads_merge() {
        let size = 10 * BLOCK as usize + 1000; // a short last block
        let orig = pattern(size);
        let base = Arc::new(MemExport(orig.clone()));
        let dir = tempfile::tempdir().unwrap();
        let cow = CowExport::new(base.clone(), dir.path()).unwrap();
        assert!(cow.path().exists());
        let mut model = orig.clone();
        let mut rng = 0x1234_5678u64;
        for round in 0..200u32 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (rng >> 33) as usize % size;
            let len = 1 + (rng >> 13) as usize % (3 * BLOCK as usize).min(size - off);
            let data: Vec<u8> = (0..len).map(|i| (i as u32 ^ round) as u8).collect();
            cow.write_at(&data, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&data);
            let roff = (rng >> 20) as usize % size;
            let rlen = (rng >> 40) as usize % (size - roff);
            let mut got = vec![0u8; rlen];
            cow.read_at(&mut got, roff as u64).unwrap();
            assert_eq!(got, model[roff..roff + rlen], "round {round}");
        }
        let mut all = vec![0u8; size];
        cow.read_at(&mut all, 0).unwrap();
        assert_eq!(all, model);
        // The base is untouched.
        assert_eq!(base.0, orig);
        // Writes past the end fail cleanly.
        assert!(cow.write_at(&[1], size as u64).is_err());
        assert!(cow.write_at(&[1, 2], size as u64 - 1).is_err());
        assert!(cow.read_at(&mut [0; 2], u64::MAX).is_err());
        let path = cow.path().to_path_buf();
        drop(cow);
        assert!(!path.exists(), "overlay file removed on drop");
    }

    /// All zeros (a hole) in its first half.
    struct HalfHole(MemExport);
    impl Export for HalfHole {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.0.read_at(buf, off)
        }
        fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
            let half = self.size() / 2;
            let mut v = Vec::new();
            if off < half {
                v.push(((half - off).min(len), 3));
            }
            let end = off + len;
            if end > half {
                v.push((end - off.max(half), 0));
            }
            Ok(v)
        }
    }

    #[test]
    fn block_status_shows_written_blocks_as_data() {
        let dir = tempfile::tempdir().unwrap();
        let base = Arc::new(HalfHole(MemExport(vec![0; 16 * BLOCK as usize])));
        let cow = CowExport::new(base, dir.path()).unwrap();
        let all = 16 * BLOCK;
        assert_eq!(
            cow.block_status(0, all).unwrap(),
            vec![(all / 2, 3), (all / 2, 0)]
        );
        cow.write_at(b"x", 2 * BLOCK + 5).unwrap();
        assert_eq!(
            cow.block_status(100, all - 100).unwrap(),
            vec![
                (2 * BLOCK - 100, 3),
                (BLOCK, 0),
                (5 * BLOCK, 3),
                (all / 2, 0)
            ]
        );
        assert!(cow.block_status(1, all).is_err());
    }

    #[test]
    fn a_partial_write_keeps_the_rest_of_its_block() {
        let orig = pattern(3 * BLOCK as usize);
        let dir = tempfile::tempdir().unwrap();
        let cow = CowExport::new(Arc::new(MemExport(orig.clone())), dir.path()).unwrap();
        cow.write_at(b"hello", 4100).unwrap();
        assert_eq!(cow.dirty_blocks(), 1);
        let mut got = vec![0u8; orig.len()];
        cow.read_at(&mut got, 0).unwrap();
        let mut want = orig.clone();
        want[4100..4105].copy_from_slice(b"hello");
        assert_eq!(got, want);
        cow.write_zeroes(0, 2 * BLOCK + 1).unwrap();
        assert_eq!(cow.dirty_blocks(), 3);
        cow.read_at(&mut got, 0).unwrap();
        assert!(got[..2 * BLOCK as usize + 1].iter().all(|&b| b == 0));
        assert_eq!(
            got[2 * BLOCK as usize + 1..],
            orig[2 * BLOCK as usize + 1..]
        );
    }
}
