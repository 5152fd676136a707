//! The bytes under an image: a file on disk, or (for tests and fuzzing) bytes in memory.
//!
//! Every format reads through [`Backing`], so structures are always read with explicit
//! offsets and lengths and a short read becomes [`Error::Truncated`] naming the
//! structure, never a panic.

use crate::{Error, Result};
use std::fmt::Debug;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Random-access, read-only bytes of one image file.
pub trait Backing: Send + Sync + Debug {
    /// The file's path (used in every error message and to resolve relative parents).
    fn path(&self) -> &Path;
    /// Length of the file in bytes.
    fn len(&self) -> u64;
    /// True when the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes the file occupies on its host file system.
    fn allocated_bytes(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`; `structure` names what is being read
    /// for the error message when the file is too short.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64, structure: &'static str) -> Result<()>;
    /// The ranges within `[offset, offset + len)` that hold data in the host file
    /// (`SEEK_DATA`/`SEEK_HOLE`); everything else reads as zeros. The default says
    /// "all of it".
    fn data_regions(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(if len == 0 {
            vec![]
        } else {
            vec![(offset, len)]
        })
    }

    /// Reads `len` bytes into a new buffer. `len` must already be validated against a
    /// bound (the caller is responsible for never sizing an allocation by an untrusted
    /// field); this checks it against the file length before allocating.
    fn read_vec(&self, offset: u64, len: usize, structure: &'static str) -> Result<Vec<u8>> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.len()) {
            return Err(Error::Truncated {
                path: self.path().to_path_buf(),
                structure,
                offset,
                len: len as u64,
                file_len: self.len(),
            });
        }
        let mut v = vec![0u8; len];
        self.read_exact_at(&mut v, offset, structure)?;
        Ok(v)
    }
}

/// A regular file opened read-only.
#[derive(Debug)]
pub struct FileBacking {
    file: File,
    path: PathBuf,
    len: u64,
    allocated: u64,
}

impl FileBacking {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        Self::from_file(file, path)
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, path: &Path) -> Result<Arc<Self>> {
        let md = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        if !md.is_file() && !md.file_type().is_block_device() {
            return Err(Error::Invalid(format!(
                "{}: not a regular file or block device",
                path.display()
            )));
        }
        let len = if md.is_file() {
            md.len()
        } else {
            use std::io::{Seek, SeekFrom};
            let mut f = &file;
            f.seek(SeekFrom::End(0))
                .map_err(|e| Error::io(path, "seek", e))?
        };
        Ok(Arc::new(FileBacking {
            file,
            path: path.to_path_buf(),
            len,
            allocated: md.blocks().saturating_mul(512),
        }))
    }

    /// The underlying file (for formats that want `SEEK_DATA` themselves).
    pub fn file(&self) -> &File {
        &self.file
    }
}

use std::os::unix::fs::FileTypeExt;

impl Backing for FileBacking {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64, structure: &'static str) -> Result<()> {
        let len = buf.len() as u64;
        let truncated = || Error::Truncated {
            path: self.path.clone(),
            structure,
            offset,
            len,
            file_len: self.len,
        };
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => {}
            _ => return Err(truncated()),
        }
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(truncated()),
            Err(e) => Err(Error::io(&self.path, "read", e)),
        }
    }
    fn data_regions(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        seek_data_regions(&self.file, &self.path, offset, len, self.len)
    }
}

/// Lists data regions of `file` within `[offset, offset+len)` with `SEEK_DATA` /
/// `SEEK_HOLE`. Falls back to "all data" on file systems that do not support them.
fn seek_data_regions(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
    file_len: u64,
) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = offset.saturating_add(len).min(file_len);
    let mut out = Vec::new();
    let mut pos = offset;
    let fd = file.as_raw_fd();
    while pos < end {
        let Ok(p) = i64::try_from(pos) else { break };
        // SAFETY: lseek on a valid fd owned by `file`; no memory is passed.
        let data = unsafe { libc::lseek(fd, p, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(out), // no data after pos
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    out.push((pos, end - pos));
                    Ok(out)
                }
                _ => Err(Error::io(path, "seek data", err)),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        if hole <= data {
            break;
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// An image held in memory: used by unit tests, property tests and fuzz targets.
#[derive(Debug, Clone)]
pub struct MemBacking {
    data: Vec<u8>,
    path: PathBuf,
}

impl MemBacking {
    /// Wraps `data`; `name` stands in for the path in messages.
    pub fn new(data: Vec<u8>, name: &str) -> Arc<Self> {
        Arc::new(MemBacking {
            data,
            path: PathBuf::from(name),
        })
    }
}

impl Backing for MemBacking {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn allocated_bytes(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64, structure: &'static str) -> Result<()> {
        let start = usize::try_from(offset).ok();
        let src = start
            .and_then(|s| s.checked_add(buf.len()).map(|e| (s, e)))
            .and_then(|(s, e)| self.data.get(s..e));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::Truncated {
                path: self.path.clone(),
                structure,
                offset,
                len: buf.len() as u64,
                file_len: self.len(),
            }),
        }
    }
}

/// Little helpers to decode fixed-layout structures from a byte slice without panics:
/// out-of-range field offsets read as zero (the structures are read whole first, so
/// that only happens on a programming error, which tests catch).
pub mod le {
    /// u16 little-endian at `at`.
    pub fn u16(b: &[u8], at: usize) -> u16 {
        b.get(at..at + 2)
            .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
    }
    /// u32 little-endian at `at`.
    pub fn u32(b: &[u8], at: usize) -> u32 {
        b.get(at..at + 4)
            .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    /// u64 little-endian at `at`.
    pub fn u64(b: &[u8], at: usize) -> u64 {
        b.get(at..at + 8).map_or(0, |s| {
            u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
        })
    }
    /// Decodes UTF-16LE bytes (stops at a NUL; odd trailing byte ignored; invalid
    /// units become U+FFFD).
    pub fn utf16(b: &[u8]) -> String {
        let units: Vec<u16> = b
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }
    /// Encodes a string as UTF-16LE bytes (no terminating NUL).
    pub fn utf16_bytes(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }
}

/// Big-endian counterparts of [`le`] (VHD and qcow2 are big-endian).
pub mod be {
    /// u16 big-endian at `at`.
    pub fn u16(b: &[u8], at: usize) -> u16 {
        b.get(at..at + 2)
            .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
    }
    /// u32 big-endian at `at`.
    pub fn u32(b: &[u8], at: usize) -> u32 {
        b.get(at..at + 4)
            .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    /// u64 big-endian at `at`.
    pub fn u64(b: &[u8], at: usize) -> u64 {
        b.get(at..at + 8).map_or(0, |s| {
            u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_backing_reports_truncation_with_structure() {
        let m = MemBacking::new(vec![1, 2, 3], "mem.img");
        let mut b = [0u8; 2];
        m.read_exact_at(&mut b, 1, "header").unwrap();
        assert_eq!(b, [2, 3]);
        let err = m.read_exact_at(&mut b, 2, "header").unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");
        assert!(m.read_exact_at(&mut b, u64::MAX, "x").is_err());
        assert!(m.read_vec(0, 4, "x").is_err());
    }

    #[test]
    fn seek_data_finds_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let b = FileBacking::open(&p).unwrap();
        let r = b.data_regions(0, 16 << 20).unwrap();
        // tmpfs/ext4 both report the single written block (possibly rounded to a page)
        assert!(!r.is_empty());
        assert!(
            r.iter()
                .all(|&(o, l)| o <= 8 << 20 && o + l >= (8 << 20) + 4096)
        );
        assert!(r.iter().map(|r| r.1).sum::<u64>() < 16 << 20);
    }
}
