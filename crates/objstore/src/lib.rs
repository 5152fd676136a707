//! Object storage (Azure Blob, S3) as a datastore [`Backend`](datastore::Backend).
//!
//! [`open`] turns a [`Target`] into a backend: a folder becomes a
//! [`datastore::LocalBackend`], a container or bucket an [`ObjectBackend`], which
//! speaks to the store through the `object_store` crate. The datastore's format does
//! not change: every object is written by one atomic PUT (a pack, an index file, a
//! manifest), so there is nothing to rename and nothing half-written to clean up
//! (`remove_leftovers` is 0). `put_new` is a conditional create (`If-None-Match: *`),
//! which is what makes manifests and the configuration write-once.
//!
//! # The datastore lock: a lease object
//!
//! Object stores have no `flock`. The lock is a lease object, `locks/lease.json`,
//! holding the owner (a random id per backend), the host name, the process id and
//! `expires_unix`:
//!
//! - **Taking it**: a conditional create (`PutMode::Create`). If a lease is there and
//!   its expiry has passed, it is taken over by a conditional update on the etag it was
//!   read with (`PutMode::Update`). Both are atomic on the store, so of two servers
//!   racing, exactly one wins; the other sees a precondition failure and reads again.
//! - **Keeping it**: a background task renews it every lease/3 (counted from when the
//!   previous renewal was sent, so slow answers do not stretch the period) with a
//!   conditional update on the last etag, moving the expiry to (time the renewal was
//!   sent) + lease.
//!   If renewal finds the lease in someone else's hands, the backend is marked lost and
//!   every later write (`put`, `put_new`, `delete`) fails with "lease lost: another
//!   server holds …".
//! - **Stopping before it can expire**: a holder that cannot renew (network down,
//!   process stalled) starts no write once lease/2 has passed since the last successful
//!   renewal (measured from when that renewal was *sent*, on the monotonic clock), and
//!   abandons a write still in flight at 3/4 of the lease. A taker acts only once the
//!   expiry written in the object has passed on *its* wall clock, which is at least one
//!   full lease after the last renewal was sent. So a live writer and a taker never
//!   overlap as long as the two machines' clocks differ by less than lease/4 (15 s with
//!   the default 60 s lease; NTP keeps real servers within milliseconds), and as long as
//!   the store does not apply a request later than the client abandoned it.
//! - **Letting go**: when the last guard drops, the renewal stops and the lease object
//!   is deleted, but only while it is surely still ours (renewed less than lease/2
//!   ago); otherwise it is left to expire.
//!
//! Inside one process, shared and exclusive guards behave like `LocalBackend`'s flock
//! (many shared, or one exclusive); across processes the lease is exclusive: one server
//! writes a datastore at a time. A *hold* (`Backend::hold`) keeps the lease for as long
//! as it lives without counting as either, so a server can hold it for its whole life
//! and still run its own gc (exclusive); it is taken without waiting, and reports when
//! the lease was lost. A crash leaves at most a lease that expires after one
//! lease length, and objects no manifest references, which gc removes.
//!
//! # Threads
//!
//! `Backend` is a synchronous trait; each `ObjectBackend` owns a small tokio runtime.
//! A call spawns its request onto that runtime and waits on a std channel with a
//! deadline, so it works from a plain thread and from another runtime's blocking thread
//! alike (never `block_on`, which panics inside a runtime).

mod backend;
mod inner;
mod lease;

pub use backend::{Counters, ObjectBackend, RequestCounts};

use datastore::Backend;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A secret (an access key): held only in memory; `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that signs requests with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// Where a storage target is; secrets are held here only in memory, and Debug redacts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An Azure Blob container. `endpoint` is the account's blob URL
    /// (default `https://ACCOUNT.blob.core.windows.net`; Azurite:
    /// `http://127.0.0.1:PORT/devstoreaccount1`).
    Azure {
        account: String,
        container: String,
        endpoint: Option<String>,
        access_key: Secret,
    },
    /// An S3 bucket; `endpoint` for S3-compatible servers (path-style requests).
    S3 {
        bucket: String,
        endpoint: Option<String>,
        region: String,
        access_key_id: String,
        secret_access_key: Secret,
    },
    /// A folder (a second disk, a NAS mount).
    Folder { path: PathBuf },
}

impl Target {
    /// The target as a URL-like name for messages (`az://account/container`,
    /// `s3://bucket`, the folder); never holds a secret.
    pub fn location(&self) -> String {
        match self {
            Target::Azure {
                account, container, ..
            } => format!("az://{account}/{container}"),
            Target::S3 { bucket, .. } => format!("s3://{bucket}"),
            Target::Folder { path } => path.display().to_string(),
        }
    }
}

/// Timeouts, retries and the lease length of an [`ObjectBackend`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Lease length (default 60 s): renewed every third of it.
    pub lease: Duration,
    /// How long `lock(_, wait = true)` waits for another server's lease.
    pub lock_wait: Duration,
    /// How long `lock(_, wait = true)` waits for this process's own conflicting
    /// guards (gc waiting for a backup to finish).
    pub local_wait: Duration,
    /// TCP connect timeout of one attempt.
    pub connect_timeout: Duration,
    /// Whole-request timeout of one attempt (an 8 MiB pack must fit in it: 30 s is
    /// about 2.2 Mbit/s).
    pub request_timeout: Duration,
    /// Retries of a failed request (5xx, connection errors), with exponential backoff.
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        let lease = Duration::from_secs(60);
        Options {
            lease,
            lock_wait: lease * 2 + Duration::from_secs(10),
            local_wait: Duration::from_secs(24 * 3600),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_retries: 5,
            retry_timeout: Duration::from_secs(20),
        }
    }
}

/// What can go wrong outside a backend call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target cannot be used as given (bad name, bad endpoint, no runtime).
    #[error("{location}: {detail}")]
    Target { location: String, detail: String },
    /// A backend call failed.
    #[error(transparent)]
    Store(#[from] datastore::Error),
    /// The probe read back something else than it wrote, or did not list its object.
    #[error("{location}: probe failed: {detail}")]
    Probe { location: String, detail: String },
}

/// Opens a target as a datastore backend: Folder → datastore::LocalBackend; Azure/S3 → ObjectBackend.
pub fn open(target: &Target) -> Result<Box<dyn Backend>, Error> {
    open_with(target, &Options::default())
}

/// [`open`] with explicit timeouts and lease length (the folder ignores them).
pub fn open_with(target: &Target, opts: &Options) -> Result<Box<dyn Backend>, Error> {
    match target {
        Target::Folder { path } => Ok(Box::new(datastore::LocalBackend::new(path))),
        _ => Ok(Box::new(ObjectBackend::new(target, opts)?)),
    }
}

/// What [`probe`] measured.
/// [`open_with`], also returning the backend's request counters (see [`Counters`]):
/// a folder target's stay zero, nothing counts local file access.
pub fn open_counted(
    target: &Target,
    opts: &Options,
) -> Result<(Box<dyn Backend>, std::sync::Arc<Counters>), Error> {
    match target {
        Target::Folder { path } => Ok((
            Box::new(datastore::LocalBackend::new(path)),
            std::sync::Arc::default(),
        )),
        _ => {
            let b = ObjectBackend::new(target, opts)?;
            let c = b.counters();
            Ok((Box::new(b), c))
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeReport {
    pub bytes: u64,
    pub put_ms: f64,
    pub get_ms: f64,
    pub list_ms: f64,
    pub delete_ms: f64,
    pub write_bytes_per_sec: u64,
    pub read_bytes_per_sec: u64,
}

/// Writes, reads back (compared), lists and deletes a probe object of `bytes` bytes under
/// `probe/` with a random name; reports per-step latency and throughput.
pub fn probe(backend: &dyn Backend, bytes: usize) -> Result<ProbeReport, Error> {
    let location = backend.location();
    let key = format!("probe/{}", datastore::crypto::random_hex(8)?);
    let mut data = vec![0u8; bytes];
    datastore::crypto::random(&mut data)?;
    let fail = |detail: String| Error::Probe {
        location: location.clone(),
        detail,
    };
    // The store's own errors name the key but not always the target: add it.
    let store = |e: datastore::Error| Error::Probe {
        location: location.clone(),
        detail: e.to_string(),
    };

    let t = Instant::now();
    backend.put(&key, &data).map_err(store)?;
    let put = t.elapsed();

    let t = Instant::now();
    let back = backend.get(&key);
    let get = t.elapsed();
    let back = match back {
        Ok(b) => b,
        Err(e) => {
            let _ = backend.delete(&key);
            return Err(store(e));
        }
    };
    if back != data {
        let _ = backend.delete(&key);
        return Err(fail(format!(
            "{key}: read back {} bytes that differ from the {} written",
            back.len(),
            data.len()
        )));
    }

    let t = Instant::now();
    let listed = backend.list("probe/");
    let list = t.elapsed();
    let listed = match listed {
        Ok(l) => l,
        Err(e) => {
            let _ = backend.delete(&key);
            return Err(store(e));
        }
    };
    if !listed
        .iter()
        .any(|e| e.key == key && e.size == bytes as u64)
    {
        let _ = backend.delete(&key);
        return Err(fail(format!("{key} is missing from the listing of probe/")));
    }

    let t = Instant::now();
    backend.delete(&key).map_err(store)?;
    let delete = t.elapsed();
    if backend.exists(&key).map_err(store)? {
        return Err(fail(format!("{key} still exists after delete")));
    }

    let rate = |d: Duration| -> u64 {
        // At least a microsecond, so a cached answer does not divide by zero.
        let secs = d.as_secs_f64().max(1e-6);
        let r = bytes as f64 / secs;
        if r.is_finite() && r < u64::MAX as f64 {
            r as u64
        } else {
            u64::MAX
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(ProbeReport {
        bytes: bytes as u64,
        put_ms: ms(put),
        get_ms: ms(get),
        list_ms: ms(list),
        delete_ms: ms(delete),
        write_bytes_per_sec: rate(put),
        read_bytes_per_sec: rate(get),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let t = Target::Azure {
            account: "acct".into(),
            container: "c".into(),
            endpoint: None,
            access_key: Secret::new("hunter2"),
        };
        let s = format!("{t:?} {}", Secret::new("hunter2"));
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("<secret>"), "{s}");
        assert_eq!(t.location(), "az://acct/c");
        let t = Target::S3 {
            bucket: "b".into(),
            endpoint: None,
            region: "r".into(),
            access_key_id: "id".into(),
            secret_access_key: Secret::new("hunter2"),
        };
        assert!(!format!("{t:?}").contains("hunter2"));
        assert_eq!(t.location(), "s3://b");
    }
}
