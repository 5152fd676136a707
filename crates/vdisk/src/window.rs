//! A byte range of a disk as a disk of its own: a partition copied out as a raw image,
//! with its allocation map carried over (holes stay holes).

use crate::{DiskInfo, Error, Extent, Format, Result, Subformat, VirtualDisk};

/// `len` bytes of `disk` from `start`.
#[derive(Debug)]
pub struct Window<'a> {
    disk: &'a dyn VirtualDisk,
    start: u64,
    len: u64,
}

impl<'a> Window<'a> {
    /// Fails when the range passes the disk's end.
    pub fn new(disk: &'a dyn VirtualDisk, start: u64, len: u64) -> Result<Window<'a>> {
        match start.checked_add(len) {
            Some(end) if end <= disk.virtual_size() => Ok(Window { disk, start, len }),
            _ => Err(Error::OutOfRange {
                offset: start,
                len,
                size: disk.virtual_size(),
            }),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }
}

impl VirtualDisk for Window<'_> {
    fn info(&self) -> DiskInfo {
        let inner = self.disk.info();
        DiskInfo {
            path: format!("{}@{}+{}", inner.path.display(), self.start, self.len).into(),
            format: Format::Raw,
            subformat: Subformat::Fixed,
            virtual_size: self.len,
            file_size: 0,
            allocated_bytes: 0,
            details: Vec::new(),
            parent: None,
            ..inner
        }
    }

    fn virtual_size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.disk.read_at(buf, self.start + offset)
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.check(offset, length)?;
        let mut out = self.disk.map(self.start + offset, length)?;
        for e in &mut out {
            // The inner map covers exactly the asked range, so this cannot underflow
            // for a well-behaved disk; a misbehaving one gets an error, not a wrap.
            e.offset = e.offset.checked_sub(self.start).ok_or_else(|| {
                Error::Invalid(format!(
                    "allocation map extent at {} before the window",
                    e.offset
                ))
            })?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBacking;

    #[test]
    fn a_window_reads_and_maps_its_range_only() {
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let disk = crate::open_backing(MemBacking::new(data.clone(), "m.img")).unwrap();
        let w = Window::new(disk.as_ref(), 4096, 65536).unwrap();
        assert_eq!(w.virtual_size(), 65536);
        let mut b = vec![0u8; 100];
        w.read_at(&mut b, 1000).unwrap();
        assert_eq!(b, data[5096..5196]);
        assert!(w.read_at(&mut b, 65500).is_err());
        let m = w.map(0, 65536).unwrap();
        assert_eq!(m.first().map(|e| e.offset), Some(0));
        assert_eq!(m.last().map(|e| e.end()), Some(65536));
        assert!(Window::new(disk.as_ref(), 1 << 20, 1).is_err());
    }
}
