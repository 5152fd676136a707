//! Read-ahead for a disk read over NBD: the backup pipeline reads one run of blocks
//! at a time, in disk order, and waits a round trip for each. When what it will read is
//! known beforehand (the allocated extents of a full backup, the dirty extents of an
//! incremental), a few threads with connections of their own fetch it ahead, within a
//! bounded window, and the pipeline's reads are served from memory.
//!
//! The read-ahead serves a read only when that can never wait for a chunk that will not
//! come; everything else goes to the disk's own connection (`Ok(false)` from
//! [`ReadAhead::read`]):
//! - before [`ReadAhead::arm`]: the page-file search reads partition tables and file
//!   system structures all over the disk before the backup starts, and must not move
//!   the window (a disk holding file systems once hung every backup this way: the
//!   window had moved past the start of the disk, whose chunks were then never
//!   fetched, and the pipeline waited for them forever);
//! - a read behind the window (its chunks were dropped or skipped), or one spanning
//!   more chunks than the window holds;
//! - a read outside the plan (a base piece found damaged makes the pipeline read
//!   blocks it did not plan to).
//!
//! A read served from the window waits for its chunks only as long as the deadline
//! given at arming, and not past a cancel. Correctness never depends on the plan: a
//! chunk is only ever the bytes the export returned at its offset.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes fetched per request of a read-ahead thread.
const CHUNK: u64 = 1 << 20;
/// How many chunks past the pipeline's position may be fetched (memory bound:
/// 64 MiB per disk).
const WINDOW: usize = 64;
/// Read-ahead threads, each with its own connection.
const THREADS: usize = 4;
/// How often a wait looks at the cancel flag.
const POLL: Duration = Duration::from_millis(200);

#[derive(Default)]
struct State {
    /// Fetched chunks by plan index.
    chunks: BTreeMap<usize, Vec<u8>>,
    /// The lowest plan index the pipeline may still ask for: chunks before it are
    /// dropped (or skipped when not fetched yet); chunks from `next + WINDOW` on wait.
    next: usize,
    /// Set by [`ReadAhead::arm`]: the pipeline's in-order reads have begun.
    armed: Option<Armed>,
    failed: Option<String>,
    stop: bool,
}

#[derive(Clone)]
struct Armed {
    /// Longest wait for one chunk.
    wait: Duration,
    cancel: Arc<AtomicBool>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        locks::lock(&self.state)
    }

    /// Waits for a change, at most `d`.
    fn wait<'a>(&self, st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        locks::wait_timeout(&self.changed, st, d)
    }
}

/// A test hook: the fetch of one chunk that never happens, as a stuck read would.
/// Only cancellation (or the read deadline) ends the wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    None,
    /// The first chunk of the plan is never fetched.
    StallFirstChunk,
}

/// The running read-ahead of one disk; stops its threads when dropped.
pub(crate) struct ReadAhead {
    shared: Arc<Shared>,
    /// The planned chunks `(offset, length)`, sorted, disjoint.
    plan: Arc<Vec<(u64, u64)>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadAhead({} chunks)", self.plan.len())
    }
}

/// Splits sorted, disjoint `ranges` widened to `block` boundaries (clipped to `size`)
/// into chunks of at most [`CHUNK`] bytes that never cross a `CHUNK` boundary.
pub(crate) fn plan_chunks(ranges: &[(u64, u64)], block: u64, size: u64) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in ranges {
        let a = o / block * block;
        let z = o
            .saturating_add(l)
            .div_ceil(block)
            .saturating_mul(block)
            .min(size);
        if z <= a {
            continue;
        }
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(z),
            _ => merged.push((a, z)),
        }
    }
    let mut out = Vec::new();
    for (mut a, z) in merged {
        while a < z {
            let e = ((a / CHUNK + 1) * CHUNK).min(z);
            out.push((a, e - a));
            a = e;
        }
    }
    out
}

impl ReadAhead {
    /// Starts fetching `plan` (from [`plan_chunks`]) through connections made by
    /// `connect`. A thread that cannot connect or read records why; reads that need
    /// its chunks then fail with that reason. Nothing is served before
    /// [`ReadAhead::arm`], but fetching begins at once.
    pub(crate) fn start<C>(plan: Vec<(u64, u64)>, connect: C, hook: Hook) -> ReadAhead
    where
        C: Fn() -> Result<nbd::Client, String> + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let connect = Arc::new(connect);
        let plan = Arc::new(plan);
        let threads = (0..THREADS.min(plan.len()))
            .map(|t| {
                let (shared, connect, plan) = (shared.clone(), connect.clone(), plan.clone());
                std::thread::spawn(move || fetch_loop(t, &shared, &*connect, &plan, hook))
            })
            .collect();
        ReadAhead {
            shared,
            plan,
            threads,
        }
    }

    /// The backup pipeline's in-order reads begin: from now on planned reads are
    /// served from the window, each waiting at most `wait` for its chunks and not past
    /// `cancel`.
    pub(crate) fn arm(&self, wait: Duration, cancel: Arc<AtomicBool>) {
        self.shared.lock().armed = Some(Armed { wait, cancel });
        self.shared.changed.notify_all();
    }

    /// Serves `[offset, offset + buf.len())` from fetched chunks when it may (see the
    /// module documentation), waiting for chunks still on their way; `Ok(false)` when
    /// the caller must read it itself.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, String> {
        let end = offset.saturating_add(buf.len() as u64);
        // The plan's chunks overlapping the range, which must cover it without gaps.
        let first = self.plan.partition_point(|&(o, l)| o + l <= offset);
        let mut covered = offset;
        let mut last = first;
        for (i, &(o, l)) in self.plan.iter().enumerate().skip(first) {
            if o >= end || o > covered {
                break;
            }
            covered = o + l;
            last = i;
        }
        if covered < end || buf.is_empty() {
            return Ok(false);
        }
        let mut st = self.shared.lock();
        let Some(armed) = st.armed.clone() else {
            return Ok(false);
        };
        if first < st.next || last >= first + WINDOW {
            return Ok(false);
        }
        if first > st.next {
            st.next = first;
            // Chunks before the new position will never be asked for.
            st.chunks = st.chunks.split_off(&first);
            self.shared.changed.notify_all();
        }
        for i in first..=last {
            let (o, l) = self.plan[i];
            let deadline = Instant::now() + armed.wait;
            let chunk = loop {
                if let Some(c) = st.chunks.get(&i) {
                    break c;
                }
                if let Some(why) = &st.failed {
                    return Err(why.clone());
                }
                if armed.cancel.load(Ordering::Relaxed) {
                    return Err("cancelled while waiting for data".into());
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(format!(
                        "read-ahead of {l} bytes at offset {o} did not arrive within {} s",
                        armed.wait.as_secs()
                    ));
                }
                st = self.shared.wait(st, POLL.min(deadline - now));
            };
            let a = offset.max(o);
            let z = end.min(o + l);
            let src = &chunk[(a - o) as usize..(z - o) as usize];
            buf[(a - offset) as usize..(z - offset) as usize].copy_from_slice(src);
        }
        Ok(true)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Thread `t` fetches chunks t, t + THREADS, ... in order, each once the pipeline's
/// position is within [`WINDOW`] of it.
fn fetch_loop(
    t: usize,
    shared: &Shared,
    connect: &(dyn Fn() -> Result<nbd::Client, String> + Send + Sync),
    plan: &[(u64, u64)],
    hook: Hook,
) {
    let fail = |why: String| {
        let mut st = shared.lock();
        st.failed.get_or_insert(why);
        shared.changed.notify_all();
    };
    let client = match connect() {
        Ok(c) => c,
        Err(e) => return fail(format!("read-ahead connection: {e}")),
    };
    for i in (t..plan.len()).step_by(THREADS) {
        let (o, l) = plan[i];
        {
            let mut st = shared.lock();
            while !st.stop && i >= st.next.saturating_add(WINDOW) {
                st = shared.wait(st, POLL);
            }
            if st.stop {
                return;
            }
            if i < st.next {
                // Passed already: the pipeline did not need it.
                continue;
            }
            if i == 0 && hook == Hook::StallFirstChunk {
                // Never fetched: only the end of the read-ahead ends this.
                while !st.stop {
                    st = shared.wait(st, POLL);
                }
                return;
            }
        }
        let mut buf = vec![0u8; l as usize];
        if let Err(e) = client.read(o, &mut buf) {
            return fail(format!("read-ahead of {l} bytes at offset {o}: {e}"));
        }
        let mut st = shared.lock();
        if i >= st.next {
            st.chunks.insert(i, buf);
        }
        shared.changed.notify_all();
    }
    let _ = client.disconnect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd::server::{Export, Listener, Server};

    #[test]
    fn plans_widen_to_blocks_merge_and_split_at_chunk_boundaries() {
        let b = 64 << 10;
        // Two ranges in the same block merge; the disk's end clips.
        assert_eq!(
            plan_chunks(&[(100, 10), (200, 10)], b, 1 << 30),
            vec![(0, b)]
        );
        assert_eq!(plan_chunks(&[(1000, 10)], b, 5000), vec![(0, 5000)]);
        // A range across a chunk boundary is split there.
        let mib = 1 << 20;
        assert_eq!(
            plan_chunks(&[(mib - b, 2 * b)], b, 1 << 30),
            vec![(mib - b, b), (mib, b)]
        );
        // Long ranges: whole chunks.
        assert_eq!(
            plan_chunks(&[(0, 3 * mib)], b, 1 << 30),
            vec![(0, mib), (mib, mib), (2 * mib, mib)]
        );
        assert!(plan_chunks(&[], b, 1 << 30).is_empty());
    }

    struct Mem(Vec<u8>);

    impl Export for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
            buf.copy_from_slice(&self.0[off as usize..off as usize + buf.len()]);
            Ok(())
        }
    }

    /// A disk of `size` patterned bytes served over NBD on a unix socket.
    struct Served {
        data: Vec<u8>,
        addr: nbd::Addr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<std::io::Result<()>>>,
        _dir: tempfile::TempDir,
    }

    impl Served {
        fn new(size: usize) -> Served {
            let data: Vec<u8> = (0..size).map(|i| (i / 4096 * 7 + i) as u8).collect();
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("nbd.sock");
            let listener = Listener::unix(&sock).unwrap();
            let server = Server::new(Arc::new(Mem(data.clone())));
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            let thread = Some(std::thread::spawn(move || server.serve(&listener, &s2)));
            Served {
                data,
                addr: nbd::Addr::Unix(sock),
                stop,
                thread,
                _dir: dir,
            }
        }

        fn ahead(&self, plan: Vec<(u64, u64)>, hook: Hook) -> ReadAhead {
            let addr = self.addr.clone();
            ReadAhead::start(
                plan,
                move || nbd::Client::connect(&addr, "", &[]).map_err(|e| e.to_string()),
                hook,
            )
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    const MIB: u64 = 1 << 20;

    /// The field bug: reads all over the disk (a page-file search opening partitions
    /// and file systems) before the in-order backup reads. It must neither hang nor
    /// serve wrong bytes, and the backup's reads are served from the window.
    #[test]
    fn scattered_reads_before_the_backup_never_stall_it() {
        let size = 200 * MIB;
        let srv = Served::new(size as usize);
        let ra = srv.ahead(plan_chunks(&[(0, size)], 64 << 10, size), Hook::None);
        let mut buf = vec![0u8; 4096];
        // Not armed: nothing is served, whatever the offset (GPT backup header, an
        // NTFS MFT 150 MiB in, a superblock).
        for off in [0, 512, size - 512 * 33, 150 * MIB, 3 * MIB + 1024] {
            let mut b = vec![0u8; 512];
            assert_eq!(ra.read(off, &mut b), Ok(false), "offset {off}");
        }
        let cancel = Arc::new(AtomicBool::new(false));
        ra.arm(Duration::from_secs(20), cancel);
        let t0 = Instant::now();
        let mut served = 0;
        let mut off = 0;
        while off < size {
            let n = (4 * MIB).min(size - off) as usize;
            buf.resize(n, 0);
            assert_eq!(ra.read(off, &mut buf), Ok(true), "offset {off}");
            assert!(
                buf == srv.data[off as usize..off as usize + n],
                "offset {off}"
            );
            served += n as u64;
            off += n as u64;
        }
        assert_eq!(served, size);
        assert!(t0.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn reads_behind_or_beyond_the_window_go_direct_and_never_wait() {
        let size = 100 * MIB;
        let srv = Served::new(size as usize);
        let ra = srv.ahead(plan_chunks(&[(0, size)], 64 << 10, size), Hook::None);
        ra.arm(Duration::from_secs(20), Arc::new(AtomicBool::new(false)));
        let mut b = vec![0u8; 65536];
        // A jump forward inside the window moves it.
        assert_eq!(ra.read(10 * MIB, &mut b), Ok(true));
        assert!(b == srv.data[10 << 20..(10 << 20) + 65536]);
        // Behind it: the caller reads it (those chunks may never be fetched).
        assert_eq!(ra.read(0, &mut b), Ok(false));
        assert_eq!(ra.read(9 * MIB, &mut b), Ok(false));
        // Wider than the window: direct too.
        let mut big = vec![0u8; 70 << 20];
        assert_eq!(ra.read(11 * MIB, &mut big), Ok(false));
        // Outside the plan: direct.
        let ra2 = srv.ahead(vec![(0, MIB)], Hook::None);
        ra2.arm(Duration::from_secs(20), Arc::new(AtomicBool::new(false)));
        assert_eq!(ra2.read(2 * MIB, &mut b), Ok(false));
        assert_eq!(ra2.read(MIB - 100, &mut b), Ok(false));
        assert_eq!(ra2.read(0, &mut b), Ok(true));
    }

    #[test]
    fn a_chunk_that_never_comes_ends_at_cancel_or_at_the_deadline() {
        let size = 8 * MIB;
        let srv = Served::new(size as usize);
        let plan = plan_chunks(&[(0, size)], 64 << 10, size);
        let mut b = vec![0u8; 65536];

        let ra = srv.ahead(plan.clone(), Hook::StallFirstChunk);
        let cancel = Arc::new(AtomicBool::new(false));
        ra.arm(Duration::from_secs(600), cancel.clone());
        let c2 = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c2.store(true, Ordering::Relaxed);
        });
        let t0 = Instant::now();
        let e = ra.read(0, &mut b).unwrap_err();
        assert!(e.contains("cancelled"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        t.join().unwrap();

        let ra = srv.ahead(plan, Hook::StallFirstChunk);
        ra.arm(Duration::from_millis(500), Arc::new(AtomicBool::new(false)));
        let t0 = Instant::now();
        let e = ra.read(0, &mut b).unwrap_err();
        assert!(e.contains("did not arrive"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // Dropping it stops the stalled thread (the test would hang otherwise).
        drop(ra);
    }
}
