//! Streaming copy from a [`VirtualDisk`] into a [`Sink`], and whole-file conversion.
//!
//! Reading and zero detection run on worker threads, writing on the caller's thread, so
//! that the two overlap; pieces are re-ordered before they reach the sink. Memory is
//! bounded by a fixed pool of piece buffers, whatever the disk size.

use crate::aligned::AlignedBuf;
use crate::extent::ExtentState;
use crate::sink::{CreateOptions, Placement, Sink};
use crate::{Error, Result, VirtualDisk};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

/// Largest piece read at once.
const PIECE: u64 = 2 << 20;
/// How much of the disk is mapped at a time (bounds the extent list).
const WINDOW: u64 = 1 << 30;
/// Granularity of zero detection inside data (what `qemu-img convert -S 4k` does).
const ZERO_GRAIN: u64 = 4096;

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyStats {
    /// Bytes read from the source (data extents).
    pub bytes_read: u64,
    /// Bytes handed to the sink as data.
    pub bytes_written: u64,
    /// Bytes handed to the sink as zeros (including data that turned out to be zeros).
    pub zero_bytes: u64,
}

/// Copies the whole of `src` into `sink` (the caller then calls `finish`).
/// `progress` receives the number of virtual bytes done so far.
pub fn copy(
    src: &dyn VirtualDisk,
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64),
) -> Result<CopyStats> {
    copy_ranges(src, sink, &[(0, src.virtual_size())], progress)
}

/// Copies only `ranges` (`(offset, length)` pairs, sorted and non-overlapping) of `src`
/// into `sink`; everything else stays unallocated in the destination (used to write a
/// differencing image holding only changed ranges).
pub fn copy_ranges(
    src: &dyn VirtualDisk,
    sink: &mut dyn Sink,
    ranges: &[(u64, u64)],
    progress: &mut dyn FnMut(u64),
) -> Result<CopyStats> {
    let size = src.virtual_size();
    let mut prev_end = 0u64;
    for &(off, len) in ranges {
        if off < prev_end {
            return Err(Error::Invalid(format!(
                "ranges overlap or are unsorted at offset {off:#x}"
            )));
        }
        prev_end = crate::extent::map_range_end(off, len, size)?;
    }

    // Readers read and scan pieces; writers write placed data; the caller's thread
    // keeps the sink's bookkeeping in order. On two cores this overlaps reading,
    // page-cache copies of the output and metadata work.
    let readers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    // One writer: ext4 (like most file systems) serialises buffered writes to one file
    // on the inode lock, and a second writer only spins on it.
    let writers = 1;
    let nbufs = readers + writers + 4;
    let abort = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let (task_tx, task_rx) = sync_channel::<Result<Task>>(nbufs);
    // Shared by the workers only: when the last one exits (on an error), the channel
    // closes and a producer blocked on a full queue wakes up and stops.
    let task_rx = Arc::new(Mutex::new(task_rx));
    let (pool_tx, pool_rx) = sync_channel::<AlignedBuf>(nbufs);
    for _ in 0..nbufs {
        pool_tx
            .send(AlignedBuf::new())
            .map_err(|_| Error::Invalid("copy: buffer pool closed".into()))?;
    }
    let pool_rx = Mutex::new(pool_rx);
    let (done_tx, done_rx) = sync_channel::<Result<Done>>(nbufs);
    let (write_tx, write_rx) = sync_channel::<WriteJob>(nbufs);
    let write_rx = Mutex::new(write_rx);

    let r = std::thread::scope(|s| {
        let abort_ref = &abort;
        s.spawn(move || produce(src, ranges, task_tx, abort_ref));
        for _ in 0..readers {
            let done_tx = done_tx.clone();
            let task_rx = task_rx.clone();
            let (pool_rx, abort) = (&pool_rx, &abort);
            s.spawn(move || work(src, &task_rx, pool_rx, done_tx, abort));
        }
        drop(done_tx);
        drop(task_rx);
        for _ in 0..writers {
            let pool_tx = pool_tx.clone();
            let (write_rx, abort, failure) = (&write_rx, &abort, &failure);
            s.spawn(move || write_placed(write_rx, pool_tx, abort, failure));
        }
        let r = consume(sink, done_rx, pool_tx, write_tx, &abort, progress);
        if r.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        r
    });
    // Every writer has finished here (the scope joined them): report their failure.
    if let Some(e) = failure
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(e);
    }
    r
}

struct Task {
    idx: u64,
    offset: u64,
    len: u64,
    state: ExtentState,
}

struct Done {
    idx: u64,
    offset: u64,
    len: u64,
    /// False for zero/unallocated extents (nothing was read).
    data: bool,
    buf: AlignedBuf,
    /// (relative offset, length, is_zero) runs covering the piece.
    runs: Vec<(u64, u64, bool)>,
}

/// Data the sink has placed, for a writer thread to store.
struct WriteJob {
    buf: AlignedBuf,
    /// (placement, start of its data in `buf`)
    writes: Vec<(Placement, usize)>,
}

fn produce(
    src: &dyn VirtualDisk,
    ranges: &[(u64, u64)],
    tx: SyncSender<Result<Task>>,
    abort: &AtomicBool,
) {
    let mut idx = 0u64;
    let send = |t: Task| tx.send(Ok(t)).is_ok() && !abort.load(Ordering::Relaxed);
    for &(start, len) in ranges {
        let end = start + len;
        let mut w = start;
        while w < end {
            let wlen = (end - w).min(WINDOW);
            let extents = match src.map(w, wlen) {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            for e in extents {
                if e.state == ExtentState::Data {
                    let mut o = e.offset;
                    while o < e.end() {
                        // Split at PIECE-aligned boundaries so pieces line up with blocks.
                        let piece_end = ((o / PIECE) + 1).saturating_mul(PIECE).min(e.end());
                        if !send(Task {
                            idx,
                            offset: o,
                            len: piece_end - o,
                            state: ExtentState::Data,
                        }) {
                            return;
                        }
                        idx += 1;
                        o = piece_end;
                    }
                } else {
                    if !send(Task {
                        idx,
                        offset: e.offset,
                        len: e.length,
                        state: e.state,
                    }) {
                        return;
                    }
                    idx += 1;
                }
            }
            w += wlen;
        }
    }
}

fn work(
    src: &dyn VirtualDisk,
    tasks: &Mutex<Receiver<Result<Task>>>,
    pool: &Mutex<Receiver<AlignedBuf>>,
    done: SyncSender<Result<Done>>,
    abort: &AtomicBool,
) {
    loop {
        // Take a buffer before a task, so the oldest task in flight always has one
        // (otherwise later pieces could hold every buffer while the consumer waits).
        let buf = match pool.lock().map(|p| p.recv()) {
            Ok(Ok(b)) => b,
            _ => return,
        };
        let task = match tasks.lock().map(|t| t.recv()) {
            Ok(Ok(t)) => t,
            _ => return,
        };
        if abort.load(Ordering::Relaxed) {
            return;
        }
        let r = match task {
            Err(e) => Err(e),
            Ok(task) if task.state == ExtentState::Data => read_piece(src, task, buf),
            Ok(task) => Ok(Done {
                idx: task.idx,
                offset: task.offset,
                len: task.len,
                data: false,
                buf,
                runs: vec![(0, task.len, true)],
            }),
        };
        if done.send(r).is_err() {
            return;
        }
    }
}

fn read_piece(src: &dyn VirtualDisk, task: Task, mut buf: AlignedBuf) -> Result<Done> {
    let len = usize::try_from(task.len).map_err(|_| Error::Invalid("piece too large".into()))?;
    // Buffers keep their length between uses: no zero-filling on every piece.
    if buf.len() < len {
        buf.resize(len);
    }
    let piece = &mut buf[..len];
    src.read_at(piece, task.offset)?;
    let runs = zero_runs(piece, task.offset);
    Ok(Done {
        idx: task.idx,
        offset: task.offset,
        len: task.len,
        data: true,
        buf,
        runs,
    })
}

/// Splits `buf` (which starts at disk offset `base`) into alternating data and zero
/// runs on [`ZERO_GRAIN`] boundaries of the disk.
pub(crate) fn zero_runs(buf: &[u8], base: u64) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let abs = base + pos as u64;
        let step = (ZERO_GRAIN - abs % ZERO_GRAIN) as usize;
        let end = (pos + step).min(buf.len());
        let z = is_zero(&buf[pos..end]);
        match runs.last_mut() {
            Some(last) if last.2 == z => last.1 += (end - pos) as u64,
            _ => runs.push((pos as u64, (end - pos) as u64, z)),
        }
        pos = end;
    }
    runs
}

/// True when every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    // 512-byte pieces: vectorised within a piece, and data (the common case) is
    // rejected after its first piece instead of after a full scan.
    b.chunks(512).all(|piece| {
        let (chunks, rest) = piece.as_chunks::<16>();
        let acc = chunks
            .iter()
            .fold(0u128, |a, c| a | u128::from_ne_bytes(*c));
        acc == 0 && rest.iter().all(|&x| x == 0)
    })
}

fn consume(
    sink: &mut dyn Sink,
    done: Receiver<Result<Done>>,
    pool: SyncSender<AlignedBuf>,
    writes: SyncSender<WriteJob>,
    abort: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut covered = 0u64;
    for r in done.iter() {
        if abort.load(Ordering::Relaxed) {
            // A writer failed; its error is reported by the caller.
            return Ok(stats);
        }
        let d = r?;
        pending.insert(d.idx, d);
        while let Some(d) = pending.remove(&next) {
            next += 1;
            if d.data {
                stats.bytes_read += d.len;
            }
            let mut placed = Vec::new();
            for &(rel, len, zero) in &d.runs {
                let off = d.offset + rel;
                let start = rel as usize;
                if zero {
                    sink.write_zero(off, len)?;
                    stats.zero_bytes += len;
                    continue;
                }
                stats.bytes_written += len;
                match sink.place_data(off, len)? {
                    Some(p) => placed.push((p, start)),
                    None => {
                        let data = d
                            .buf
                            .get(start..start + len as usize)
                            .ok_or_else(|| Error::Invalid("copy: run outside its piece".into()))?;
                        sink.write_data(off, data)?;
                    }
                }
            }
            covered += d.len;
            progress(covered);
            if placed.is_empty() {
                // The pool never holds more than it started with, so this cannot block.
                let _ = pool.try_send(d.buf);
            } else if writes
                .send(WriteJob {
                    buf: d.buf,
                    writes: placed,
                })
                .is_err()
            {
                return Err(Error::Invalid("copy: writers stopped early".into()));
            }
        }
    }
    if !pending.is_empty() {
        return Err(Error::Invalid("copy: a reader stopped early".into()));
    }
    Ok(stats)
}

/// Writer thread: stores placed data, then returns the buffer to the pool.
fn write_placed(
    jobs: &Mutex<Receiver<WriteJob>>,
    pool: SyncSender<AlignedBuf>,
    abort: &AtomicBool,
    failure: &Mutex<Option<Error>>,
) {
    loop {
        let job = match jobs.lock().map(|j| j.recv()) {
            Ok(Ok(j)) => j,
            _ => return,
        };
        if !abort.load(Ordering::Relaxed) {
            for (p, start) in &job.writes {
                let r = job
                    .buf
                    .get(*start..)
                    .ok_or_else(|| Error::Invalid("copy: placement outside its piece".into()))
                    .and_then(|data| p.write(data));
                if let Err(e) = r {
                    abort.store(true, Ordering::Relaxed);
                    let mut f = failure
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    f.get_or_insert(e);
                    break;
                }
            }
        }
        let _ = pool.try_send(job.buf);
    }
}

/// Converts the image at `src` into a new image at `dst` described by `opts`
/// (`virtual_size` is taken from the source). The output is written under a temporary
/// name in the destination's folder, fsynced, and renamed into place only when
/// complete; on any error the temporary file is removed and `dst` is untouched.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &CreateOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CopyStats> {
    let disk = crate::open(src)?;
    let mut opts = opts.clone();
    opts.virtual_size = disk.virtual_size();
    write_image(disk.as_ref(), dst, &opts, progress)
}

/// Writes `disk` into a new image at `dst` (temporary name, fsync, rename, fsync of
/// the folder), as [`convert`] does for a file.
pub fn write_image(
    disk: &dyn VirtualDisk,
    dst: &Path,
    opts: &CreateOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CopyStats> {
    let tmp = TempPath::next_to(dst)?;
    let total = disk.virtual_size();
    let mut sink = crate::create(tmp.path(), opts)?;
    let stats = copy(disk, sink.as_mut(), &mut |done| progress(done, total))?;
    sink.finish()?;
    tmp.persist(dst, opts.durable)?;
    Ok(stats)
}

/// A temporary file name beside a destination, removed on drop unless persisted.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    keep: bool,
}

impl TempPath {
    /// `.NAME.tmp-PID-N` in the folder of `dst`.
    pub fn next_to(dst: &Path) -> Result<Self> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = dst
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a file name", dst.display())))?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp_name = format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id());
        Ok(TempPath {
            path: dst.with_file_name(tmp_name),
            keep: false,
        })
    }

    /// The temporary path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the (already fsynced) file to `dst` and, when `durable`, fsyncs the
    /// folder so the rename survives a crash.
    pub fn persist(mut self, dst: &Path, durable: bool) -> Result<()> {
        std::fs::rename(&self.path, dst).map_err(|e| Error::io(dst, "rename into place", e))?;
        self.keep = true;
        if durable { fsync_parent(dst) } else { Ok(()) }
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Fsyncs the folder holding `path`, making a rename in it durable.
pub fn fsync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, "open folder", e))?;
    f.sync_all().map_err(|e| Error::io(dir, "fsync folder", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_split_on_grain() {
        let mut b = vec![0u8; 3 * 4096];
        b[4096 + 7] = 1;
        let r = zero_runs(&b, 0);
        assert_eq!(
            r,
            vec![(0, 4096, true), (4096, 4096, false), (8192, 4096, true)]
        );
        // unaligned base: first run ends at the next 4 KiB boundary of the disk
        let r = zero_runs(&b[..4096], 512);
        assert_eq!(r, vec![(0, 4096, true)]);
        assert!(is_zero(&[0u8; 33]));
        assert!(!is_zero(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
    }
}
