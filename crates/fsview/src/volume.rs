//! A partition (or whole disk) as a byte range of a virtual disk, read through a chunk
//! cache: file-system crates issue many small reads (a sector of a directory, an inode),
//! and each read of a recovery point decompresses a whole datastore block, so small
//! reads must hit memory, not the datastore.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use vdisk::VirtualDisk;

/// Bytes per cache chunk (aligned to the volume start).
pub const CHUNK: u64 = 256 << 10;
/// Chunks kept (64 MiB).
pub const CACHE_CHUNKS: usize = 256;

#[derive(Debug, Default)]
struct Cache {
    chunks: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    tick: u64,
}

/// `[start, start + len)` of a disk, readable at any offset, cheap to clone (clones share
/// the cache). Implements [`Read`] + [`Seek`] for crates that want a stream.
#[derive(Debug, Clone)]
pub struct Volume {
    disk: Arc<dyn VirtualDisk>,
    start: u64,
    len: u64,
    cache: Arc<Mutex<Cache>>,
    pos: u64,
}

impl Volume {
    /// The range must lie inside the disk (clip it first: see `Partition`).
    pub fn new(disk: Arc<dyn VirtualDisk>, start: u64, len: u64) -> crate::Result<Volume> {
        match start.checked_add(len) {
            Some(end) if end <= disk.virtual_size() => Ok(Volume {
                disk,
                start,
                len,
                cache: Arc::default(),
                pos: 0,
            }),
            _ => Err(crate::Error::corrupt(
                "volume",
                start,
                format!(
                    "{len} bytes do not fit a disk of {} bytes",
                    disk.virtual_size()
                ),
            )),
        }
    }

    /// The whole disk.
    pub fn whole(disk: Arc<dyn VirtualDisk>) -> Volume {
        let len = disk.virtual_size();
        Volume {
            disk,
            start: 0,
            len,
            cache: Arc::default(),
            pos: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the volume on its disk.
    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn disk(&self) -> &Arc<dyn VirtualDisk> {
        &self.disk
    }

    fn chunk(&self, c: u64) -> io::Result<Arc<Vec<u8>>> {
        {
            let mut g = locks::lock(&self.cache);
            g.tick += 1;
            let tick = g.tick;
            if let Some((data, used)) = g.chunks.get_mut(&c) {
                *used = tick;
                return Ok(data.clone());
            }
        }
        let off = c * CHUNK;
        let n = (self.len - off).min(CHUNK) as usize;
        let mut data = vec![0u8; n];
        self.disk
            .read_at(&mut data, self.start + off)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let data = Arc::new(data);
        let mut g = locks::lock(&self.cache);
        if g.chunks.len() >= CACHE_CHUNKS
            && let Some(old) = g
                .chunks
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| *k)
        {
            g.chunks.remove(&old);
        }
        let tick = g.tick;
        g.chunks.insert(c, (data.clone(), tick));
        Ok(data)
    }

    /// Fills `buf` from volume offset `offset`; the whole range must be inside the
    /// volume (else an `UnexpectedEof` error naming the offset).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at volume offset {offset:#x} passes the volume end ({:#x})",
                        buf.len(),
                        self.len
                    ),
                ));
            }
        }
        // Large reads (file contents) bypass the cache: they are read once. They are
        // split over the cores, because reading a recovery point decompresses and
        // verifies every block, which is CPU work.
        if buf.len() as u64 >= 2 * CHUNK {
            return self.read_parallel(buf, offset);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = pos / CHUNK;
            let data = self.chunk(c)?;
            let within = (pos - c * CHUNK) as usize;
            let n = (data.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[within..within + n]);
            done += n;
        }
        Ok(())
    }
}

impl Volume {
    fn read_parallel(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        // Pieces of whole 64 KiB units, so no datastore block is decoded twice.
        let unit = 64 << 10;
        let per = buf.len().div_ceil(threads).div_ceil(unit) * unit;
        let at = self.start + offset;
        let disk = &self.disk;
        std::thread::scope(|s| {
            let mut jobs = Vec::new();
            for (i, piece) in buf.chunks_mut(per.max(unit)).enumerate() {
                let pos = at + (i * per.max(unit)) as u64;
                jobs.push(s.spawn(move || disk.read_at(piece, pos)));
            }
            for j in jobs {
                match j.join() {
                    Ok(r) => r.map_err(|e| io::Error::other(e.to_string()))?,
                    Err(_) => return Err(io::Error::other("a reader thread panicked")),
                }
            }
            Ok(())
        })
    }
}

impl Read for Volume {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Volume {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the volume",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(n: usize) -> (Volume, Vec<u8>) {
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let disk = vdisk::open_backing(vdisk::MemBacking::new(data.clone(), "v.img")).unwrap();
        (
            Volume::new(Arc::from(disk), 4096, (n - 8192) as u64).unwrap(),
            data,
        )
    }

    #[test]
    fn reads_match_the_disk_across_chunks() {
        let (v, data) = vol(3 << 20);
        for (off, len) in [
            (0u64, 10usize),
            (CHUNK - 3, 7),
            (5, 3 * CHUNK as usize),
            (1000, 200_000),
        ] {
            let mut b = vec![0u8; len];
            v.read_at(&mut b, off).unwrap();
            assert_eq!(b, data[4096 + off as usize..4096 + off as usize + len]);
        }
        let mut b = [0u8; 2];
        let e = v.read_at(&mut b, v.len() - 1).unwrap_err();
        assert!(e.to_string().contains("volume end"), "{e}");
        assert!(Volume::new(v.disk().clone(), 1, 3 << 20).is_err());
    }

    #[test]
    fn stream_reads_stop_at_the_end() {
        let (mut v, data) = vol(1 << 20);
        v.seek(SeekFrom::End(-10)).unwrap();
        let mut rest = Vec::new();
        v.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, data[data.len() - 4096 - 10..data.len() - 4096]);
        assert!(v.seek(SeekFrom::Current(-(1 << 30))).is_err());
    }
}
