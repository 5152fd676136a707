//! Raw images: the virtual disk is the file. Holes (`SEEK_HOLE`) are reported as
//! unallocated, and the writer leaves zero ranges as holes.

use crate::backing::Backing;
use crate::extent::{data_region_extents, map_range_end};
use crate::sink::{CreateOptions, OrderCheck, OutFile, Placement, Sink, create_file};
use crate::{DiskInfo, Error, Extent, Format, Result, Subformat, VirtualDisk, check_range};
use std::path::Path;
use std::sync::Arc;

/// A raw image open for reading.
#[derive(Debug)]
pub struct RawDisk {
    file: Arc<dyn Backing>,
}

/// Opens `file` as a raw image.
pub fn open(file: Arc<dyn Backing>) -> Result<Box<dyn VirtualDisk>> {
    Ok(Box::new(RawDisk { file }))
}

impl VirtualDisk for RawDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            path: self.file.path().to_path_buf(),
            format: Format::Raw,
            subformat: Subformat::Fixed,
            virtual_size: self.file.len(),
            logical_sector_size: 512,
            physical_sector_size: 512,
            block_size: None,
            file_size: self.file.len(),
            allocated_bytes: self.file.allocated_bytes(),
            details: vec![],
            parent: None,
        }
    }

    fn virtual_size(&self) -> u64 {
        self.file.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.file.len())?;
        self.file.read_exact_at(buf, offset, "raw data")
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = map_range_end(offset, length, self.file.len())?;
        data_region_extents(self.file.as_ref(), offset, end)
    }
}

/// Writer of sparse raw images.
#[derive(Debug)]
pub struct RawWriter {
    file: Arc<OutFile>,
    order: OrderCheck,
}

/// Creates a sparse raw image of `opts.virtual_size` bytes.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    if opts.parent.is_some() {
        return Err(Error::Invalid("raw images have no parent".into()));
    }
    let file = create_file(path, opts)?;
    file.set_len(opts.virtual_size)
        .map_err(|e| Error::io(path, "set length", e))?;
    Ok(Box::new(RawWriter {
        file: Arc::new(file),
        // Raw has no sector constraint of its own.
        order: OrderCheck::new(opts.virtual_size, 1),
    }))
}

impl Sink for RawWriter {
    fn place_data(&mut self, offset: u64, len: u64) -> Result<Option<Placement>> {
        self.order.advance(offset, len)?;
        let len = usize::try_from(len).map_err(|_| Error::Invalid("write too large".into()))?;
        Ok(Some(Placement {
            file: self.file.clone(),
            pieces: vec![(0, offset, len)],
        }))
    }

    fn write_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        // The file was created sparse: a hole already reads as zeros.
        self.order.advance(offset, len)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExtentState, MemBacking};

    #[test]
    fn raw_map_and_read() {
        let mut d = vec![0u8; 8192];
        d[100] = 7;
        let disk = open(MemBacking::new(d, "m.img")).unwrap();
        assert_eq!(disk.virtual_size(), 8192);
        let m = disk.map(0, 8192).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].state, ExtentState::Data);
        let mut b = [0u8; 4];
        disk.read_at(&mut b, 99).unwrap();
        assert_eq!(b, [0, 7, 0, 0]);
        assert!(disk.read_at(&mut b, 8190).is_err());
        assert!(disk.map(8000, 200).is_err());
    }
}
