//! What one object-storage backend holds, shared by its operations (`backend.rs`) and
//! its lease (`lease.rs`): the store, the runtime its calls run on, the deadlines, and
//! the lease's state.

use datastore::{Error as DsError, Result as DsResult};
use object_store::ObjectStore;
use object_store::UpdateVersion;
use object_store::path::Path as ObjPath;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::Options;

/// What requests, the lease's renewal task and lock guards share.
pub(crate) struct Inner {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) location: String,
    pub(crate) opts: Options,
    pub(crate) lease: LeaseCore,
}

impl Inner {
    /// The longest one call may take: every attempt, the backoff between them, and a
    /// margin, so a wait on the channel always ends.
    pub(crate) fn op_limit(&self) -> Duration {
        self.opts.retry_timeout + self.opts.request_timeout + Duration::from_secs(5)
    }

    /// Runs `fut` on the backend's runtime and waits for it at most `limit`.
    pub(crate) fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
        limit: Duration,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let task = self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv_timeout(limit) {
            Ok(v) => Some(v),
            Err(_) => {
                task.abort();
                None
            }
        }
    }

    /// Runs one store call for `key`, mapping its errors to the datastore's, each
    /// naming the target and the key.
    pub(crate) fn call<T: Send + 'static>(
        &self,
        key: &str,
        op: &'static str,
        limit: Duration,
        fut: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> DsResult<T> {
        match self.block(fut, limit) {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(self.map_err(key, op, e)),
            None => Err(DsError::Io {
                path: self.key_location(key).into(),
                op,
                err: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", limit.as_secs()),
                ),
            }),
        }
    }

    pub(crate) fn key_location(&self, key: &str) -> String {
        format!("{}/{key}", self.location)
    }

    pub(crate) fn map_err(&self, key: &str, op: &'static str, e: object_store::Error) -> DsError {
        match e {
            // An object written into a container or bucket that is not there.
            object_store::Error::NotFound { .. } if op.starts_with("put") => DsError::Io {
                path: self.key_location(key).into(),
                op,
                err: std::io::Error::other(format!(
                    "the container or bucket {} does not exist; create it first ({e})",
                    self.location
                )),
            },
            object_store::Error::NotFound { .. } => DsError::Missing { key: key.into() },
            e => DsError::Io {
                path: self.key_location(key).into(),
                op,
                err: std::io::Error::other(e.to_string()),
            },
        }
    }
}

/// A datastore key as an object path; the same rule as `LocalBackend`'s (no empty,
/// `.`, `..` or hidden components).
pub(crate) fn obj_path(key: &str) -> DsResult<ObjPath> {
    if key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('.'))
    {
        return Err(DsError::Invalid(format!("invalid datastore key {key:?}")));
    }
    ObjPath::parse(key).map_err(|e| DsError::Invalid(format!("invalid datastore key {key:?}: {e}")))
}

/// The lease state of one backend.
pub(crate) struct LeaseCore {
    pub(crate) owner: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) duration: Duration,
    pub(crate) state: Mutex<State>,
    pub(crate) cv: Condvar,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) shared: usize,
    pub(crate) exclusive: bool,
    /// Holds ([`hold`]): keep the lease without counting as a shared or exclusive
    /// holder, so a server that holds it for its whole life can still run gc.
    pub(crate) holds: usize,
    pub(crate) held: Option<Held>,
    /// A thread is taking the lease (without holding the state's mutex meanwhile).
    pub(crate) acquiring: bool,
    /// Set once renewal found the lease in another owner's hands; permanent.
    pub(crate) lost: Option<String>,
}

pub(crate) struct Held {
    pub(crate) version: UpdateVersion,
    /// When the last successful renewal (or the taking) was sent.
    pub(crate) renewed: Instant,
    pub(crate) renewal: u64,
    pub(crate) paused: bool,
    pub(crate) task: Option<tokio::task::JoinHandle<()>>,
}
