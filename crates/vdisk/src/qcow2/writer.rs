//! Streaming qcow2 v3 writer.
//!
//! Layout: header in cluster 0; data clusters appended as data arrives (pieces arrive
//! in order, so a piece maps to host-contiguous clusters and is written with one
//! `pwrite`); an L2 table is appended when the writer leaves its range (only the
//! current one is in memory); at `finish` the L1 table, the refcount blocks and the
//! refcount table are appended, and the header is written last.

use super::{COPIED, MAGIC, MAX_L1_BYTES, OFFSET_MASK};
use crate::sink::{CreateOptions, OrderCheck, OutFile, Placement, Sink, create_file};
use crate::{Error, Result, Subformat};
use std::path::Path;
use std::sync::Arc;

/// Default cluster size (as qemu-img).
const DEFAULT_CLUSTER: u64 = 64 << 10;
/// Length of the v3 header we write (with the compression type byte and padding).
const HEADER_LEN: usize = 112;

/// Writer of qcow2 v3 images (refcount_order 4, no compression, no backing file).
#[derive(Debug)]
pub(crate) struct Qcow2Writer {
    file: Arc<OutFile>,
    order: OrderCheck,
    size: u64,
    cluster_bits: u32,
    l1: Vec<u64>,
    /// The L2 table being filled and the L1 index it belongs to.
    l2: Vec<u64>,
    l2_index: Option<u64>,
    l2_used: bool,
    /// End of the allocated host clusters (always cluster-aligned).
    next_host: u64,
}

/// Creates a qcow2 image at `path`.
pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn crate::Sink>> {
    if opts.parent.is_some() || opts.subformat == Subformat::Differencing {
        return Err(Error::unsupported(
            path,
            "writing qcow2 images with a backing file is not implemented",
        ));
    }
    if opts.subformat == Subformat::Fixed {
        return Err(Error::Invalid(
            "qcow2 has no fixed subformat (preallocation is not implemented): use dynamic".into(),
        ));
    }
    let cs = opts.block_size.unwrap_or(DEFAULT_CLUSTER);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::Invalid(format!(
            "qcow2 cluster size {cs} must be a power of two from 512 bytes to 2 MiB"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    let size = opts.virtual_size;
    if size > i64::MAX as u64 {
        return Err(Error::Invalid(format!(
            "qcow2 virtual size {size} too large"
        )));
    }
    let l1_size = size.div_ceil(cs * (cs / 8));
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error::Invalid(format!(
            "qcow2 virtual size {size} needs an L1 table over 32 MiB with {cs}-byte clusters"
        )));
    }
    let file = create_file(path, opts)?;
    Ok(Box::new(Qcow2Writer {
        file: Arc::new(file),
        order: OrderCheck::new(size, opts.logical_sector_size),
        size,
        cluster_bits,
        l1: vec![0; l1_size as usize],
        l2: vec![0; (cs / 8) as usize],
        l2_index: None,
        l2_used: false,
        next_host: cs,
    }))
}

impl Qcow2Writer {
    /// Allocates clusters for `[offset, offset+len)` (L2 entries, at the end of the
    /// file) and returns where each host-contiguous run of it goes.
    fn place(&mut self, offset: u64, len: u64) -> Result<Vec<(usize, u64, usize)>> {
        self.order.advance(offset, len)?;
        let cb = self.cluster_bits;
        let cs = self.cs();
        let l2_bits = cb - 3;
        let end = offset + len;
        let mut pos = offset;
        // Host-contiguous runs: (start in the data, host offset, length).
        let mut runs: Vec<(usize, u64, usize)> = Vec::new();
        while pos < end {
            let ci = pos >> cb;
            let l1i = ci >> l2_bits;
            if self.l2_index != Some(l1i) {
                self.flush_l2()?;
                self.l2_index = Some(l1i);
            }
            let l2i = (ci & ((1u64 << l2_bits) - 1)) as usize;
            let cend = ((ci + 1) << cb).min(end);
            let existing = self.l2.get(l2i).map_or(0, |e| e & OFFSET_MASK);
            let host = if existing != 0 {
                existing
            } else {
                let h = self.next_host;
                self.next_host += cs;
                if let Some(slot) = self.l2.get_mut(l2i) {
                    *slot = h | COPIED;
                }
                self.l2_used = true;
                h
            };
            let h = host + (pos & (cs - 1));
            let n = (cend - pos) as usize;
            let s = (pos - offset) as usize;
            match runs.last_mut() {
                Some(last) if last.1 + last.2 as u64 == h => last.2 += n,
                _ => runs.push((s, h, n)),
            }
            pos = cend;
        }
        Ok(runs)
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn pwrite(&self, data: &[u8], at: u64) -> Result<()> {
        self.file.write_at(data, at)
    }

    /// Appends the current L2 table (if it holds anything) and records it in the L1.
    fn flush_l2(&mut self) -> Result<()> {
        if let Some(idx) = self.l2_index
            && self.l2_used
        {
            let mut buf = Vec::with_capacity(self.l2.len() * 8);
            for e in &self.l2 {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            let at = self.next_host;
            self.pwrite(&buf, at)?;
            self.next_host += self.cs();
            if let Some(slot) = self.l1.get_mut(idx as usize) {
                *slot = at | COPIED;
            }
        }
        self.l2.fill(0);
        self.l2_used = false;
        Ok(())
    }
}

impl Sink for Qcow2Writer {
    fn place_data(&mut self, offset: u64, len: u64) -> Result<Option<Placement>> {
        Ok(Some(Placement {
            file: self.file.clone(),
            pieces: self.place(offset, len)?,
        }))
    }

    fn write_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        // Zero ranges stay unallocated (L2 entry 0), as qemu-img convert leaves them.
        self.order.advance(offset, len)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush_l2()?;
        let cs = self.cs();
        // L1 table.
        let l1_off = self.next_host;
        let mut buf = Vec::with_capacity(self.l1.len() * 8);
        for e in &self.l1 {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        // An empty disk has an empty L1 table, which occupies no cluster.
        let l1_clusters = (buf.len() as u64).div_ceil(cs);
        let l1_off = if l1_clusters == 0 { 0 } else { l1_off };
        buf.resize((l1_clusters * cs) as usize, 0);
        self.pwrite(&buf, l1_off)?;
        self.next_host += l1_clusters * cs;

        // Refcount blocks and table must count themselves: iterate to a fixed point.
        let used = self.next_host / cs;
        let per_block = cs / 2; // 16-bit refcounts
        let (mut blocks, mut table) = (1u64, 1u64);
        loop {
            let total = used + blocks + table;
            let nb = total.div_ceil(per_block);
            let nt = (nb * 8).div_ceil(cs);
            if nb == blocks && nt == table {
                break;
            }
            (blocks, table) = (nb, nt);
        }
        let total = used + blocks + table;
        let rb_off = self.next_host;
        // Write refcount blocks in batches of about 1 MiB.
        let batch = ((1u64 << 20) / cs).max(1);
        let mut b = 0u64;
        while b < blocks {
            let n = batch.min(blocks - b);
            let mut buf = vec![0u8; (n * cs) as usize];
            for (i, slot) in buf.as_chunks_mut::<2>().0.iter_mut().enumerate() {
                let cluster = b * per_block + i as u64;
                if cluster < total {
                    *slot = 1u16.to_be_bytes();
                }
            }
            self.pwrite(&buf, rb_off + b * cs)?;
            b += n;
        }
        let rt_off = rb_off + blocks * cs;
        let mut buf = vec![0u8; (table * cs) as usize];
        for (i, slot) in buf
            .as_chunks_mut::<8>()
            .0
            .iter_mut()
            .take(blocks as usize)
            .enumerate()
        {
            *slot = (rb_off + i as u64 * cs).to_be_bytes();
        }
        self.pwrite(&buf, rt_off)?;
        self.next_host = rt_off + table * cs;
        // Header last: until it is written the file is not a qcow2 image. One fsync
        // at the end is enough: the file only gets its final name after `finish`.
        let mut h = [0u8; HEADER_LEN + 8];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&self.size.to_be_bytes());
        h[36..40].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
        h[40..48].copy_from_slice(&l1_off.to_be_bytes());
        h[48..56].copy_from_slice(&rt_off.to_be_bytes());
        h[56..60].copy_from_slice(&(table as u32).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        // Bytes 112..120: the end-of-extensions marker (type 0, length 0).
        self.pwrite(&h, 0)?;
        self.file.sync()
    }
}
