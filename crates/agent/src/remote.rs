//! The server as the backup pipeline's [`BlockTarget`]: "ask first, then send".
//!
//! The pipeline asks which blocks the server lacks (`missing`), and hands over framed
//! blobs (`put`) in disk order; they are batched to about 4 MiB and posted by a
//! background thread, at most two batches queued behind the one in flight, so reading
//! and sending overlap with bounded memory. Every call is retried after transient
//! failures: posting blobs is idempotent, and a rerun asks first, so it re-sends only
//! what the server still lacks.

use crate::Error;
use datastore::{BlockParams, BlockTarget, Id, decode_framed_piece};
use protocol::MAX_MISSING_IDS;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A blob batch is posted once it reaches this size.
pub const BATCH_BYTES: usize = 4 << 20;
/// How long a call keeps retrying after transient failures.
pub const RETRY_BUDGET: Duration = Duration::from_secs(60);

/// The two byte-oriented calls the target makes. [`client::Client`] is the real one;
/// tests put an in-process fake server behind it.
pub trait Transport: Send + Sync {
    fn post_bytes(&self, path: &str, body: Vec<u8>) -> client::Result<Vec<u8>>;
    fn get_bytes(&self, path: &str) -> client::Result<Vec<u8>>;
}

impl Transport for client::Client {
    fn post_bytes(&self, path: &str, body: Vec<u8>) -> client::Result<Vec<u8>> {
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
type Sender = (SyncSender<Vec<u8>>, JoinHandle<()>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder leaves plain data behind; nothing to repair.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
        let handle = {
            let (transport, path, sent, error) = (
                transport.clone(),
                format!("{prefix}/blobs"),
                sent.clone(),
                error.clone(),
            );
            let (cancel, abort) = (cancel.clone(), abort.clone());
            let stopped = move || cancel.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed);
            std::thread::spawn(move || send_loop(transport, path, rx, sent, error, stopped, budget))
        };
        RemoteTarget {
            transport,
            prefix,
            params,
            cancel,
            sent,
            budget,
            batch: Mutex::new(Vec::new()),
            sender: Mutex::new(Some((tx, handle))),
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
        if let Some((tx, handle)) = taken {
            drop(tx);
            if handle.join().is_err() {
                lock(&self.error).get_or_insert(Error::Invalid("the blob sender panicked".into()));
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
    rx: Receiver<Vec<u8>>,
    sent: Arc<AtomicU64>,
    error: Slot,
    stopped: impl Fn() -> bool,
    budget: Duration,
) {
    for batch in rx {
        if stopped() {
            return;
        }
        let len = batch.len() as u64;
        match retry(budget, &stopped, || {
            transport.post_bytes(&path, batch.clone())
        }) {
            Ok(_) => {
                sent.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => {
                lock(&error).get_or_insert(Error::Client(e));
                // Dropping the receiver makes the next hand-over fail at once.
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
                || self.transport.post_bytes(&path, body.clone()),
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
