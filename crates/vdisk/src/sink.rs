//! Writing images: every writer is a [`Sink`] fed in increasing offset order, so a
//! conversion streams from any [`VirtualDisk`](crate::VirtualDisk) without holding more
//! than one piece in memory, and ranges that hold nothing stay holes.

use crate::{Error, Format, Result, Subformat};
use std::path::{Path, PathBuf};

/// Destination of a streaming write.
///
/// Contract for callers (checked by the writers, which refuse violations with
/// [`Error::Invalid`]):
/// - calls come in strictly increasing, non-overlapping offset order;
/// - offsets and lengths are multiples of the logical sector size, except a final
///   piece that ends exactly at the virtual size;
/// - ranges never mentioned are unallocated: zeros, or the parent's data for a
///   differencing image;
/// - nothing is durable until [`Sink::finish`] returns; on error the caller deletes the
///   file.
pub trait Sink: Send {
    /// Stores `data` at virtual offset `offset`. Writers that implement
    /// [`Sink::place_data`] get this for free.
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match self.place_data(offset, data.len() as u64)? {
            Some(p) => p.write(data),
            None => Err(Error::Invalid(
                "writer implements neither write_data nor place_data".into(),
            )),
        }
    }
    /// Declares that `[offset, offset+len)` reads as zeros. Non-differencing writers may
    /// leave it unallocated; differencing writers must record it so the parent does not
    /// show through.
    fn write_zero(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Writes the remaining metadata (tables, footers) and fsyncs the file.
    fn finish(self: Box<Self>) -> Result<()>;

    /// Fast path for parallel copies: does all the bookkeeping `write_data(offset,
    /// data)` would do for `len` bytes, except writing them, and says where they go.
    /// The caller then writes the bytes through [`Placement::write`] (on any thread,
    /// in any order relative to other placed writes) before calling `finish`.
    /// `None` means this writer has no fast path: call `write_data` instead. A writer
    /// implements at least one of the two.
    fn place_data(&mut self, offset: u64, len: u64) -> Result<Option<Placement>> {
        let _ = (offset, len);
        Ok(None)
    }
}

/// Where the bytes of one placed write go in the output file.
#[derive(Debug, Clone)]
pub struct Placement {
    pub file: std::sync::Arc<OutFile>,
    /// `(start in the data, file offset, length)` pieces covering the data.
    pub pieces: Vec<(usize, u64, usize)>,
}

impl Placement {
    /// Writes `data` (the bytes the placement was made for) to its places.
    pub fn write(&self, data: &[u8]) -> Result<()> {
        for &(start, at, len) in &self.pieces {
            let piece = start
                .checked_add(len)
                .and_then(|end| data.get(start..end))
                .ok_or_else(|| Error::Invalid("placement outside its data".into()))?;
            self.file.write_at(piece, at)?;
        }
        Ok(())
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub format: Format,
    /// `Fixed` or `Dynamic`; `Differencing` requires [`CreateOptions::parent`].
    pub subformat: Subformat,
    pub virtual_size: u64,
    /// 512, or 4096 (VHDX only).
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// VHDX/VHD block size or qcow2 cluster size; `None` picks the format's default.
    pub block_size: Option<u64>,
    /// Parent image of a differencing image.
    pub parent: Option<PathBuf>,
    /// Make the image durable: fsync it in `finish` (and its folder after the rename
    /// in [`crate::copy::write_image`]). `false` leaves flushing to the operating
    /// system, as `qemu-img convert` does: faster, but a crash soon after may leave
    /// the image incomplete. Default `true`.
    pub durable: bool,
}

impl CreateOptions {
    /// Options for a non-differencing image with default sectors and block size.
    pub fn new(format: Format, subformat: Subformat, virtual_size: u64) -> Self {
        CreateOptions {
            format,
            subformat,
            virtual_size,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            block_size: None,
            parent: None,
            durable: true,
        }
    }
}

/// Creates `path` exclusively for writing (never truncates an existing file), durable
/// or not as `opts` says.
pub(crate) fn create_file(path: &Path, opts: &CreateOptions) -> Result<OutFile> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map(|f| {
            let mut out = OutFile::new(f, path);
            out.durable = opts.durable;
            if opts.durable {
                out.open_direct(path);
            }
            out
        })
        .map_err(|e| Error::io(path, "create", e))
}

/// Tracks the ordering contract of [`Sink`] for a writer and validates each call.
#[derive(Debug, Clone)]
pub struct OrderCheck {
    next: u64,
    size: u64,
    sector: u64,
}

impl OrderCheck {
    /// A checker for a disk of `size` bytes with `sector`-byte logical sectors.
    pub fn new(size: u64, sector: u32) -> Self {
        OrderCheck {
            next: 0,
            size,
            sector: u64::from(sector.max(1)),
        }
    }

    /// Validates a call covering `[offset, offset+len)` and advances.
    pub fn advance(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            })?;
        if offset < self.next {
            return Err(Error::Invalid(format!(
                "writer: offset {offset:#x} is before the end of the previous write {:#x}",
                self.next
            )));
        }
        if !offset.is_multiple_of(self.sector)
            || (!len.is_multiple_of(self.sector) && end != self.size)
        {
            return Err(Error::Invalid(format!(
                "writer: range {offset:#x}+{len:#x} is not aligned to {}-byte sectors",
                self.sector
            )));
        }
        self.next = end;
        Ok(())
    }
}

/// An output file that starts writeback of what it has written every
/// [`OutFile::KICK`] bytes (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the disk
/// works while the copy goes on and the final fsync only waits for the tail, instead
/// of flushing gigabytes of dirty pages at the end. Same method names as
/// [`std::fs::File`], so writers use it as a drop-in.
#[derive(Debug)]
pub struct OutFile {
    file: std::fs::File,
    path: PathBuf,
    /// When false, neither early writeback nor fsync: flushing is left to the
    /// operating system, exactly as `qemu-img convert` does (see
    /// [`CreateOptions::durable`]).
    durable: bool,
    /// (lowest offset, highest end, bytes) written since the last kick.
    pending: std::sync::Mutex<(u64, u64, u64)>,
    /// The same file opened with `O_DIRECT`, for durable outputs: aligned data goes
    /// straight to the disk, with no page-cache pages to allocate, fill and flush (on
    /// this project's VMs allocating page cache under memory pressure costs more than
    /// the copy itself). `None` where the file system refuses direct I/O.
    direct: Option<std::fs::File>,
    /// Set when a direct write failed: everything after goes through the page cache.
    direct_off: std::sync::atomic::AtomicBool,
}

impl OutFile {
    /// Bytes written between two writeback kicks.
    pub const KICK: u64 = 32 << 20;

    /// Wraps a file opened for writing; `path` names it in errors.
    pub fn new(file: std::fs::File, path: &Path) -> Self {
        OutFile {
            file,
            path: path.to_path_buf(),
            durable: true,
            pending: std::sync::Mutex::new((u64::MAX, 0, 0)),
            direct: None,
            direct_off: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Opens `path` (this file) a second time with `O_DIRECT`, for aligned writes;
    /// silently stays buffered where direct I/O is unavailable (tmpfs...).
    pub fn open_direct(&mut self, path: &Path) {
        use std::os::unix::fs::OpenOptionsExt;
        self.direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
    }

    /// Writes the [`ALIGN`](crate::aligned::ALIGN)-aligned middle of `buf` with direct
    /// I/O when memory and file offsets allow; returns the (head, tail) byte counts
    /// left for buffered writes, or `None` when nothing went direct.
    fn write_direct(&self, buf: &[u8], offset: u64) -> Option<(usize, usize)> {
        use crate::aligned::ALIGN;
        use std::os::unix::fs::FileExt;
        let d = self.direct.as_ref()?;
        if self.direct_off.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mis = (offset % ALIGN as u64) as usize;
        if (buf.as_ptr() as usize) % ALIGN != mis % ALIGN {
            return None;
        }
        let head = (ALIGN - mis) % ALIGN;
        let body = buf.len().checked_sub(head)? / ALIGN * ALIGN;
        if body == 0 {
            return None;
        }
        match d.write_all_at(&buf[head..head + body], offset + head as u64) {
            Ok(()) => Some((head, buf.len() - head - body)),
            Err(_) => {
                // Retried buffered below; direct I/O stays off for this file.
                self.direct_off
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                None
            }
        }
    }

    /// Largest single write. Linux 6.x page caches allocate folios as large as the
    /// write (up to 2 MiB); allocating those needs memory compaction once memory is
    /// fragmented, and on this project's machines 2 MiB writes into the page cache
    /// measured 2-4x slower than 128 KiB ones (`dd bs=2M` 3.3-4.0 s, `bs=128K` 0.9 s
    /// for 2.4 GiB).
    pub const WRITE_MAX: usize = 128 << 10;

    /// Positioned write of all of `buf`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if let Some((head, tail)) = self.write_direct(buf, offset) {
            self.write_buffered(&buf[..head], offset)?;
            let t = buf.len() - tail;
            return self.write_buffered(&buf[t..], offset + t as u64);
        }
        self.write_buffered(buf, offset)
    }

    fn write_buffered(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if buf.is_empty() {
            return Ok(());
        }
        let mut at = offset;
        for piece in buf.chunks(Self::WRITE_MAX) {
            self.file.write_all_at(piece, at)?;
            at = at.saturating_add(piece.len() as u64);
        }
        let kick = {
            let mut p = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            p.0 = p.0.min(offset);
            p.1 = p.1.max(offset.saturating_add(buf.len() as u64));
            p.2 = p.2.saturating_add(buf.len() as u64);
            if p.2 >= Self::KICK {
                let r = (p.0, p.1);
                *p = (u64::MAX, 0, 0);
                Some(r)
            } else {
                None
            }
        };
        if let Some((lo, hi)) = kick
            && self.durable
        {
            self.start_writeback(lo, hi);
        }
        Ok(())
    }

    /// [`OutFile::write_all_at`] with the error naming the file.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "write", e))
    }

    fn start_writeback(&self, lo: u64, hi: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(len)) = (i64::try_from(lo), i64::try_from(hi.saturating_sub(lo))) else {
            return;
        };
        // SAFETY: plain syscall on a valid fd; no memory passed. Failure only means no
        // early writeback: the final fsync still makes everything durable.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// See [`std::fs::File::set_len`].
    pub fn set_len(&self, size: u64) -> std::io::Result<()> {
        self.file.set_len(size)
    }

    /// Flushes data and metadata to stable storage.
    pub fn sync_all(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    /// [`OutFile::sync_all`] with the error naming the file; nothing when the file
    /// was created non-durable.
    pub fn sync(&self) -> Result<()> {
        if !self.durable {
            return Ok(());
        }
        self.sync_all()
            .map_err(|e| Error::io(&self.path, "fsync", e))
    }

    /// The underlying file.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }
}
