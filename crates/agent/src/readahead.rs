//! Read-ahead for a disk read over NBD: the backup pipeline reads one run of blocks
//! at a time, in disk order, and waits a round trip for each. When what it will read is
//! known beforehand (the allocated extents of a full backup, the dirty extents of an
//! incremental), a few threads with connections of their own fetch it ahead, within a
//! bounded window, and the pipeline's reads are served from memory.
//!
//! Reads outside the plan (a base piece found damaged makes the pipeline read blocks it
//! did not plan to) go to the disk's own connection. Correctness never depends on the
//! plan: a chunk is only ever the bytes the export returned at its offset.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Bytes fetched per request of a read-ahead thread.
const CHUNK: u64 = 1 << 20;
/// How far ahead of the pipeline's position chunks may be fetched (memory bound).
const WINDOW: u64 = 64 << 20;
/// Read-ahead threads, each with its own connection.
const THREADS: usize = 4;

#[derive(Default)]
struct State {
    /// Fetched chunks by offset.
    chunks: BTreeMap<u64, Vec<u8>>,
    /// The pipeline's position: chunks ending before it are dropped, chunks starting
    /// past it + WINDOW wait.
    pos: u64,
    failed: Option<String>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running read-ahead of one disk; stops its threads when dropped.
pub(crate) struct ReadAhead {
    shared: Arc<Shared>,
    /// The planned chunks `(offset, length)`, sorted, disjoint.
    plan: Vec<(u64, u64)>,
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
    /// its chunks then fail with that reason.
    pub(crate) fn start<C>(plan: Vec<(u64, u64)>, connect: C) -> ReadAhead
    where
        C: Fn() -> Result<nbd::Client, String> + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let connect = Arc::new(connect);
        let plan_shared: Arc<Vec<(u64, u64)>> = Arc::new(plan.clone());
        let threads = (0..THREADS.min(plan.len()))
            .map(|t| {
                let (shared, connect, plan) =
                    (shared.clone(), connect.clone(), plan_shared.clone());
                std::thread::spawn(move || fetch_loop(t, &shared, &*connect, &plan))
            })
            .collect();
        ReadAhead {
            shared,
            plan,
            threads,
        }
    }

    /// Serves `[offset, offset + buf.len())` from fetched chunks when the plan covers
    /// it all (waiting for chunks still on their way); `Ok(false)` when it does not.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, String> {
        let end = offset.saturating_add(buf.len() as u64);
        // The plan's chunks overlapping the range, which must cover it without gaps.
        let first = self.plan.partition_point(|&(o, l)| o + l <= offset);
        let mut covered = offset;
        let mut needed = Vec::new();
        for &(o, l) in &self.plan[first..] {
            if o >= end || o > covered {
                break;
            }
            needed.push((o, l));
            covered = o + l;
        }
        if covered < end {
            return Ok(false);
        }
        let mut st = self.shared.lock();
        if offset > st.pos {
            st.pos = offset;
            // Chunks wholly before the new position will never be asked for.
            let keep = st.chunks.split_off(&offset);
            let before = std::mem::replace(&mut st.chunks, keep);
            for (o, c) in before {
                if o + c.len() as u64 > offset {
                    st.chunks.insert(o, c);
                }
            }
            self.shared.changed.notify_all();
        }
        for (o, l) in needed {
            let chunk = loop {
                if let Some(c) = st.chunks.get(&o) {
                    break c;
                }
                if let Some(why) = &st.failed {
                    return Err(why.clone());
                }
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
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
    for &(o, l) in plan.iter().skip(t).step_by(THREADS) {
        {
            let mut st = shared.lock();
            while !st.stop && o >= st.pos.saturating_add(WINDOW) {
                st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
            if o + l <= st.pos {
                // Passed already: the pipeline did not need it.
                continue;
            }
        }
        let mut buf = vec![0u8; l as usize];
        if let Err(e) = client.read(o, &mut buf) {
            return fail(format!("read-ahead of {l} bytes at offset {o}: {e}"));
        }
        let mut st = shared.lock();
        if o + l > st.pos {
            st.chunks.insert(o, buf);
        }
        shared.changed.notify_all();
    }
    let _ = client.disconnect();
}

#[cfg(test)]
mod tests {
    use super::plan_chunks;

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
}
