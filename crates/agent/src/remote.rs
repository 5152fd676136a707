//! The server as the backup pipeline's [`BlockTarget`]: "ask first, then send".
//!
//! The pipeline asks which blocks the server lacks (`missing`), and hands over framed
//! blobs (`put`) in disk order; they are batched to about 4 MiB and posted by a
//! background thread, at most two batches queued behind the one in flight, so reading
//! and sending overlap with bounded memory. Every call is retried after transient
//! failures: posting blobs is idempotent, and a rerun asks first, so it re-sends only
//! what the server still lacks.

use crate::Error;
use bytes::Bytes;
use datastore::{BlockParams, BlockTarget, Id, decode_framed_piece};
use locks::lock;
use protocol::MAX_MISSING_IDS;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A blob batch is posted once it reaches this size.
pub const BATCH_BYTES: usize = 4 << 20;
/// How long a call keeps retrying after transient failures.
pub const RETRY_BUDGET: Duration = Duration::from_secs(60);

/// The two byte-oriented calls the target makes. [`client::Client`] is the real one;
/// tests put an in-process fake server behind it.
pub trait Transport: Send + Sync {
    fn post_bytes(&self, path: &str, body: Bytes) -> client::Result<Vec<u8>>;
    fn get_bytes(&self, path: &str) -> client::Result<Vec<u8>>;
}

impl Transport for client::Client {
    fn post_bytes(&self, path: &str, body: Bytes) -> client::Result<Vec<u8>> {
        client::Client::post_bytes(self, path, body)
    }

    fn get_bytes(&self, path: &str) -> client::Result<Vec<u8>> {
        client::Client::get_bytes(self, path)
    }
}

/// Runs `f` again after transient failures with growing pauses, for about `budget`,
/// unless `stopped()` (as [`client::Client::retrying`], for any transport).
pub(crate) fn retry<T>(
    budget: Duration,
    stopped: impl Fn() -> bool,
    mut f: impl FnMut() -> client::Result<T>,
) -> client::Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        match f() {
            Err(e) if e.transient() && !stopped() && start.elapsed() + pause < budget => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

type Slot = Arc<Mutex<Option<Error>>>;
/// The queue to the sender thread, and the thread.
type Sender = (SyncSender<Vec<u8>>, Vec<JoinHandle<()>>);

/// Batches posted at once: the server verifies one while the next is on the wire.
const SENDERS: usize = 3;

/// One job's backup target on the server.
pub struct RemoteTarget {
    transport: Arc<dyn Transport>,
    prefix: String,
    params: BlockParams,
    cancel: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    budget: Duration,
    batch: Mutex<Vec<u8>>,
    sender: Mutex<Option<Sender>>,
    /// Set when the target is dropped unfinished: the sender drops what it holds.
    abort: Arc<AtomicBool>,
    /// The first failure, with its kind (the pipeline only carries a message).
    error: Slot,
}

impl RemoteTarget {
    /// A target for job `job_id`. Setting `cancel` makes the next `missing`/`put` fail.
    pub fn new(
        transport: Arc<dyn Transport>,
        job_id: i64,
        params: BlockParams,
        cancel: Arc<AtomicBool>,
    ) -> RemoteTarget {
        Self::with_budget(transport, job_id, params, cancel, RETRY_BUDGET)
    }

    /// As [`RemoteTarget::new`] with another retry budget.
    pub fn with_budget(
        transport: Arc<dyn Transport>,
        job_id: i64,
        params: BlockParams,
        cancel: Arc<AtomicBool>,
        budget: Duration,
    ) -> RemoteTarget {
        let prefix = format!("/agent/jobs/{job_id}");
        let sent = Arc::new(AtomicU64::new(0));
        let error: Slot = Arc::new(Mutex::new(None));
        // Bounded at 2: with the batch being filled and the one being posted, at most
        // about four batches (~16 MiB) exist at once.
        let (tx, rx) = sync_channel::<Vec<u8>>(2);
        let abort = Arc::new(AtomicBool::new(false));
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..SENDERS)
            .map(|_| {
                let (transport, path, sent, error, rx) = (
                    transport.clone(),
                    format!("{prefix}/blobs"),
                    sent.clone(),
                    error.clone(),
                    rx.clone(),
                );
                let (cancel, abort) = (cancel.clone(), abort.clone());
                let stopped =
                    move || cancel.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed);
                std::thread::spawn(move || {
                    send_loop(transport, path, rx, sent, error, stopped, budget)
                })
            })
            .collect();
        RemoteTarget {
            transport,
            prefix,
            params,
            cancel,
            sent,
            budget,
            batch: Mutex::new(Vec::new()),
            sender: Mutex::new(Some((tx, handles))),
            abort,
            error,
        }
    }

    /// Framed bytes the server has accepted so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The counter behind [`RemoteTarget::bytes_sent`], for a progress reporter.
    pub fn sent_counter(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }

    /// The error behind a failed pipeline call, with its kind (a `client::Error` with
    /// its HTTP status, or [`Error::Cancelled`]), if this target caused the failure.
    pub fn take_error(&self) -> Option<Error> {
        lock(&self.error).take()
    }

    /// Records `e` as the failure (the first one wins) and converts it for the pipeline.
    fn fail(&self, e: Error) -> datastore::Error {
        let msg = e.to_string();
        lock(&self.error).get_or_insert(e);
        datastore::Error::Invalid(msg)
    }

    /// Fails when cancelled or when the sender thread has failed.
    fn check(&self) -> datastore::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(self.fail(Error::Cancelled("the backup was cancelled".into())));
        }
        if let Some(e) = lock(&self.error).as_ref() {
            return Err(datastore::Error::Invalid(e.to_string()));
        }
        Ok(())
    }

    fn hand_over(&self, batch: Vec<u8>) -> datastore::Result<()> {
        let guard = lock(&self.sender);
        let Some((tx, _)) = guard.as_ref() else {
            return Err(self.fail(Error::Invalid("blobs put after finish".into())));
        };
        if tx.send(batch).is_err() {
            // The sender thread stopped: it recorded why.
            drop(guard);
            self.check()?;
            return Err(self.fail(Error::Invalid("the blob sender stopped".into())));
        }
        Ok(())
    }

    /// Stops the sender thread after it has posted what it holds.
    fn join_sender(&self) {
        let taken = lock(&self.sender).take();
        if let Some((tx, handles)) = taken {
            drop(tx);
            for handle in handles {
                if handle.join().is_err() {
                    lock(&self.error)
                        .get_or_insert(Error::Invalid("the blob sender panicked".into()));
                }
            }
        }
    }
}

impl Drop for RemoteTarget {
    fn drop(&mut self) {
        self.abort.store(true, Ordering::Relaxed);
        self.join_sender();
    }
}

fn send_loop(
    transport: Arc<dyn Transport>,
    path: String,
    rx: Arc<Mutex<Receiver<Vec<u8>>>>,
    sent: Arc<AtomicU64>,
    error: Slot,
    stopped: impl Fn() -> bool,
    budget: Duration,
) {
    loop {
        // The lock is held only while waiting for the next batch, not while posting it.
        let Ok(batch) = lock(&rx).recv() else { return };
        if stopped() {
            return;
        }
        let len = batch.len() as u64;
        let batch = Bytes::from(batch);
        match retry(budget, &stopped, || {
            transport.post_bytes(&path, batch.clone())
        }) {
            Ok(_) => {
                sent.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => {
                lock(&error).get_or_insert(Error::Client(e));
                // The failure is recorded: the next hand-over or `check` reports it.
                return;
            }
        }
    }
}

impl BlockTarget for RemoteTarget {
    fn params(&self) -> &BlockParams {
        &self.params
    }

    fn missing(&self, ids: &[Id]) -> datastore::Result<Vec<bool>> {
        self.check()?;
        let path = format!("{}/missing", self.prefix);
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(MAX_MISSING_IDS) {
            let body: Vec<u8> = chunk.iter().flat_map(|id| id.0).collect();
            let answer = retry(
                self.budget,
                || self.cancel.load(Ordering::Relaxed),
                || self.transport.post_bytes(&path, Bytes::from(body.clone())),
            )
            .map_err(|e| self.fail(Error::Client(e)))?;
            if answer.len() != chunk.len() || answer.iter().any(|&b| b > 1) {
                return Err(self.fail(Error::Server(format!(
                    "{path}: asked about {} blocks, the answer is {} bytes of something else than 0/1",
                    chunk.len(),
                    answer.len()
                ))));
            }
            out.extend(answer.iter().map(|&b| b == 1));
        }
        Ok(out)
    }

    fn read_piece(&self, id: Id) -> datastore::Result<Vec<Id>> {
        self.check()?;
        let path = format!("{}/blob/{}", self.prefix, id.to_hex());
        let mut framed = retry(
            self.budget,
            || self.cancel.load(Ordering::Relaxed),
            || self.transport.get_bytes(&path),
        )
        .map_err(|e| self.fail(Error::Client(e)))?;
        decode_framed_piece(&self.params.keys, &mut framed, id)
    }

    fn put(&self, framed: &[u8]) -> datastore::Result<()> {
        self.check()?;
        let full = {
            let mut b = lock(&self.batch);
            if b.capacity() == 0 {
                // Sized once (a batch ends past BATCH_BYTES by at most one blob):
                // growing by doubling would copy every batch again.
                b.reserve_exact(BATCH_BYTES + 2 * datastore::format::MAX_BLOB_PLAIN as usize);
            }
            b.extend_from_slice(framed);
            (b.len() >= BATCH_BYTES).then(|| std::mem::take(&mut *b))
        };
        match full {
            Some(batch) => self.hand_over(batch),
            None => Ok(()),
        }
    }

    fn finish(&self) -> datastore::Result<u64> {
        self.check()?;
        let rest = std::mem::take(&mut *lock(&self.batch));
        if !rest.is_empty() {
            self.hand_over(rest)?;
        }
        self.join_sender();
        self.check()?;
        Ok(self.bytes_sent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::FilesProvider;
    use crate::provider::Provider;
    use datastore::{Consistency, Datastore, Ingest, Source, StoreOptions, backup_disks};
    use protocol::JobKind;
    use std::sync::atomic::AtomicU32;
    use vdisk::VirtualDisk;

    /// An in-process server: the datastore's own ingest behind the agent's routes.
    struct Fake {
        ingest: Ingest,
        /// The next this many calls fail with 503 (transient).
        flaky: AtomicU32,
        /// Status every `blobs` post gets instead of success.
        blobs_status: Option<u16>,
        missing_calls: Mutex<Vec<usize>>,
        batches: Mutex<Vec<usize>>,
    }

    fn status(path: &str, status: u16) -> client::Error {
        client::Error::Status {
            method: "POST",
            path: path.to_string(),
            status,
            message: "fake".into(),
        }
    }

    impl Transport for Fake {
        fn post_bytes(&self, path: &str, body: Bytes) -> client::Result<Vec<u8>> {
            if self.flaky.load(Ordering::Relaxed) > 0 {
                self.flaky.fetch_sub(1, Ordering::Relaxed);
                return Err(status(path, 503));
            }
            let bad = |e: datastore::Error| status(&format!("{path}: {e}"), 400);
            if path.ends_with("/missing") {
                let ids: Vec<Id> = body
                    .chunks_exact(32)
                    .filter_map(|c| c.try_into().ok().map(Id))
                    .collect();
                lock(&self.missing_calls).push(ids.len());
                let m = self.ingest.missing(&ids).map_err(bad)?;
                Ok(m.into_iter().map(u8::from).collect())
            } else if path.ends_with("/blobs") {
                if let Some(s) = self.blobs_status {
                    return Err(status(path, s));
                }
                lock(&self.batches).push(body.len());
                self.ingest.put(&body).map_err(bad)?;
                Ok(Vec::new())
            } else {
                Err(status(path, 404))
            }
        }

        fn get_bytes(&self, path: &str) -> client::Result<Vec<u8>> {
            let hex = path.rsplit('/').next().unwrap_or_default();
            let id = Id::from_hex(hex).ok_or_else(|| status(path, 400))?;
            self.ingest
                .framed_blob(id)
                .map_err(|e| status(&format!("{path}: {e}"), 404))
        }
    }

    fn store(dir: &std::path::Path) -> Arc<Datastore> {
        let opts = StoreOptions {
            key_file: Some(dir.join("key")),
            zstd_level: 3,
            block_size: 65536,
        };
        let ds = Datastore::create(&dir.join("ds"), &opts).unwrap();
        Arc::new(ds)
    }

    fn fake(ds: &Arc<Datastore>) -> Arc<Fake> {
        let source = Source {
            name: "h1/vm".into(),
            id: "vm".into(),
        };
        Arc::new(Fake {
            ingest: ds.begin_ingest(source).unwrap(),
            flaky: AtomicU32::new(0),
            blobs_status: None,
            missing_calls: Mutex::new(Vec::new()),
            batches: Mutex::new(Vec::new()),
        })
    }

    /// A VM folder with one raw disk of incompressible data (so batches fill up) and a
    /// qcow2 disk that is mostly zeros.
    fn vm_folder(root: &std::path::Path) -> Vec<u8> {
        let vm = root.join("vm");
        std::fs::create_dir_all(&vm).unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..(10 << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        std::fs::write(vm.join("a.raw"), &data).unwrap();
        testkit::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            vm.join("b.qcow2").to_str().unwrap(),
            "3M",
        ]);
        data
    }

    fn target(f: &Arc<Fake>, ds: &Datastore, cancel: Arc<AtomicBool>) -> RemoteTarget {
        let t: Arc<dyn Transport> = f.clone();
        RemoteTarget::with_budget(t, 7, ds.block_params(), cancel, Duration::from_secs(5))
    }

    #[test]
    fn files_backup_round_trips_through_the_remote_target() {
        let t = tempfile::tempdir().unwrap();
        let data = vm_folder(t.path());
        let ds = store(t.path());
        let f = fake(&ds);
        f.flaky.store(2, Ordering::Relaxed);
        let remote = target(&f, &ds, Arc::new(AtomicBool::new(false)));
        let prov = FilesProvider::new(t.path());
        let snap = prov.open_view("vm", JobKind::InitialReplica, None).unwrap();
        let disks = snap.disks();
        let (records, stats) = backup_disks(&remote, None, &disks, 2, &mut |_, _| {}).unwrap();
        drop(disks);
        snap.release(true).unwrap();
        assert_eq!(stats.bytes_stored, remote.bytes_sent());
        assert!(remote.bytes_sent() > 10 << 20, "{}", remote.bytes_sent());
        let batches = lock(&f.batches).clone();
        assert!(batches.len() >= 2, "{batches:?}");
        assert!(batches.iter().all(|&b| b <= 2 * BATCH_BYTES), "{batches:?}");

        drop(remote);
        let f = Arc::into_inner(f).map(|f| f.ingest);
        let m = f
            .expect("only owner")
            .commit(Consistency::CrashConsistent, None, records, stats)
            .unwrap();
        assert_eq!(m.disks.len(), 2);
        let idx = Arc::new(ds.blob_index().unwrap());
        let restored = ds.open_disk(&m, 0, idx.clone()).unwrap();
        let mut back = vec![0u8; data.len()];
        restored.read_at(&mut back, 0).unwrap();
        assert!(back == data, "disk 0 restored differently");
        let zeros = ds.open_disk(&m, 1, idx).unwrap();
        let mut back = vec![1u8; 3 << 20];
        zeros.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));

        // A second backup asks first and sends nothing the server has.
        let f2 = fake(&ds);
        let remote = target(&f2, &ds, Arc::new(AtomicBool::new(false)));
        let base = protocol::Manifest::from(m.clone());
        let snap = prov.open_view("vm", JobKind::Sync, Some(&base)).unwrap();
        let (_, stats) = backup_disks(&remote, None, &snap.disks(), 2, &mut |_, _| {}).unwrap();
        assert_eq!(remote.bytes_sent(), 0);
        assert_eq!(stats.blocks_new, 0);
        assert!(lock(&f2.batches).is_empty());
    }

    #[test]
    fn missing_is_split_at_the_protocol_limit() {
        let t = tempfile::tempdir().unwrap();
        let ds = store(t.path());
        let f = fake(&ds);
        let remote = target(&f, &ds, Arc::new(AtomicBool::new(false)));
        let ids: Vec<Id> = (0..MAX_MISSING_IDS + 10)
            .map(|i| {
                let mut b = [0u8; 32];
                b[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                Id(b)
            })
            .collect();
        let m = remote.missing(&ids).unwrap();
        assert_eq!(m.len(), ids.len());
        assert!(m.iter().all(|&x| x));
        assert_eq!(*lock(&f.missing_calls), [MAX_MISSING_IDS, 10]);
    }

    #[test]
    fn cancel_stops_the_pipeline_with_kind_cancelled() {
        let t = tempfile::tempdir().unwrap();
        vm_folder(t.path());
        let ds = store(t.path());
        let f = fake(&ds);
        let cancel = Arc::new(AtomicBool::new(false));
        let remote = target(&f, &ds, cancel.clone());
        let snap = FilesProvider::new(t.path())
            .open_view("vm", JobKind::Sync, None)
            .unwrap();
        let disks = snap.disks();
        let r = backup_disks(&remote, None, &disks, 2, &mut |done, _| {
            if done > 0 {
                cancel.store(true, Ordering::Relaxed);
            }
        });
        assert!(r.is_err());
        assert_eq!(remote.take_error().map(|e| e.kind()), Some("cancelled"));
    }

    #[test]
    fn refused_blobs_surface_with_their_status() {
        let t = tempfile::tempdir().unwrap();
        vm_folder(t.path());
        let ds = store(t.path());
        let mut f = fake(&ds);
        Arc::get_mut(&mut f).unwrap().blobs_status = Some(403);
        let remote = target(&f, &ds, Arc::new(AtomicBool::new(false)));
        let snap = FilesProvider::new(t.path())
            .open_view("vm", JobKind::Sync, None)
            .unwrap();
        let r = backup_disks(&remote, None, &snap.disks(), 2, &mut |_, _| {});
        assert!(r.is_err());
        match remote.take_error() {
            Some(Error::Client(e)) => assert_eq!(e.status(), Some(403)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transient_failures_give_up_after_the_budget() {
        let t = tempfile::tempdir().unwrap();
        let ds = store(t.path());
        let f = fake(&ds);
        f.flaky.store(1000, Ordering::Relaxed);
        let t: Arc<dyn Transport> = f.clone();
        let remote = RemoteTarget::with_budget(
            t,
            7,
            ds.block_params(),
            Arc::new(AtomicBool::new(false)),
            Duration::from_millis(700),
        );
        assert!(remote.missing(&[Id([1; 32])]).is_err());
        assert_eq!(remote.take_error().map(|e| e.kind()), Some("server"));
    }
}
