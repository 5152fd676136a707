//! A recovery point's disk as an NBD export (instant recovery, `holdfast export-nbd`):
//! [`PointExport`] adapts any recovery-point [`VirtualDisk`] (read from the datastore,
//! or through the server's API with [`crate::remote::RemoteDisk`]) to [`nbd::Export`],
//! with a small cache of whole datastore blocks in front, since clients read in pieces
//! (QEMU in 64 KiB, `nbdcopy` in 256 KiB) far smaller than a datastore block, and every
//! read of a block otherwise decompresses (and decrypts, or fetches) all of it.

use nbd::Export;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};
use vdisk::VirtualDisk;

/// A recovery point's disk as an NBD export, with a cache of whole blocks.
pub struct PointExport {
    disk: Arc<dyn VirtualDisk>,
    block: u64,
    cache: Option<Mutex<BlockCache>>,
}

/// The most recently used blocks, by block number.
struct BlockCache {
    cap: usize,
    blocks: HashMap<u64, Arc<Vec<u8>>>,
    /// Least recently used first.
    order: VecDeque<u64>,
}

impl BlockCache {
    fn get(&mut self, b: u64) -> Option<Arc<Vec<u8>>> {
        let data = self.blocks.get(&b)?.clone();
        if let Some(i) = self.order.iter().position(|&x| x == b) {
            self.order.remove(i);
        }
        self.order.push_back(b);
        Some(data)
    }

    fn put(&mut self, b: u64, data: Arc<Vec<u8>>) {
        if self.blocks.insert(b, data).is_some() {
            return;
        }
        self.order.push_back(b);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.blocks.remove(&old);
            }
        }
    }
}

fn io_err(e: vdisk::Error) -> io::Error {
    match e {
        vdisk::Error::OutOfRange { .. } => io::Error::new(io::ErrorKind::InvalidInput, e),
        e => io::Error::other(e),
    }
}

impl PointExport {
    /// `disk` served with a cache of `cache_blocks` blocks of `block` bytes (its
    /// datastore block size; 0 blocks = no cache).
    pub fn new(disk: Arc<dyn VirtualDisk>, block: u32, cache_blocks: usize) -> PointExport {
        let block = u64::from(block.max(1));
        PointExport {
            disk,
            block,
            cache: (cache_blocks > 0).then(|| {
                Mutex::new(BlockCache {
                    cap: cache_blocks,
                    blocks: HashMap::new(),
                    order: VecDeque::new(),
                })
            }),
        }
    }

    fn cached_block(&self, cache: &Mutex<BlockCache>, b: u64) -> io::Result<Arc<Vec<u8>>> {
        let lock = || locks::lock(cache);
        if let Some(d) = lock().get(b) {
            return Ok(d);
        }
        // Decoded without the lock held: other readers go on meanwhile.
        let start = b * self.block;
        let len = (self.size() - start).min(self.block) as usize;
        let mut data = vec![0u8; len];
        self.disk.read_at(&mut data, start).map_err(io_err)?;
        let data = Arc::new(data);
        lock().put(b, data.clone());
        Ok(data)
    }
}

impl Export for PointExport {
    fn size(&self) -> u64 {
        self.disk.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let Some(cache) = &self.cache else {
            return self.disk.read_at(buf, off).map_err(io_err);
        };
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read past the end"))?;
        let mut pos = off;
        while pos < end {
            let b = pos / self.block;
            let start = b * self.block;
            let block_end = (start + self.block).min(self.size());
            let to = block_end.min(end);
            let out = &mut buf[(pos - off) as usize..(to - off) as usize];
            if pos == start && to == block_end {
                // Whole blocks (large sequential reads): decoded straight into place, the
                // whole run in one call (one request through the server).
                let run_end = end - (end - pos) % self.block;
                let run_end = if end == self.size() {
                    end
                } else {
                    run_end.max(to)
                };
                let out = &mut buf[(pos - off) as usize..(run_end - off) as usize];
                self.disk.read_at(out, pos).map_err(io_err)?;
                pos = run_end;
                continue;
            } else {
                let data = self.cached_block(cache, b)?;
                out.copy_from_slice(&data[(pos - start) as usize..(to - start) as usize]);
            }
            pos = to;
        }
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        let extents = self.disk.map(off, len).map_err(io_err)?;
        Ok(extents
            .iter()
            .map(|e| match e.state {
                vdisk::ExtentState::Data => (e.length, 0),
                vdisk::ExtentState::Zero | vdisk::ExtentState::Unallocated => {
                    (e.length, nbd::STATE_HOLE | nbd::STATE_ZERO)
                }
            })
            .collect())
    }
}
