//! `ObjectBackend`: the datastore's `Backend` over an `object_store` store.

use crate::inner::{Inner, LeaseCore, obj_path};
use crate::lease;
use crate::{Error, Options, Target};
use datastore::backend::{Entry, LockGuard};
use datastore::{Backend, Error as DsError, Result as DsResult};
use futures::TryStreamExt;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Requests a backend sent, by kind, and the object bytes moved: for figures (requests
/// per GiB copied; what a provider bills). Counted per datastore call: the client's own
/// retries are not counted again, a listing counts its pages (1,000 keys a page on S3,
/// 5,000 on Azure), and the lease's requests (lock, renewals) are not counted.
#[derive(Debug, Default)]
pub struct Counters {
    get: AtomicU64,
    put: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    head: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// A [`Counters`] reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    pub get: u64,
    pub put: u64,
    pub list: u64,
    pub delete: u64,
    pub head: u64,
    /// Every request above.
    pub total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Counters {
    pub fn snapshot(&self) -> RequestCounts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (get, put, list, delete, head) = (
            r(&self.get),
            r(&self.put),
            r(&self.list),
            r(&self.delete),
            r(&self.head),
        );
        RequestCounts {
            get,
            put,
            list,
            delete,
            head,
            total: get
                .saturating_add(put)
                .saturating_add(list)
                .saturating_add(delete)
                .saturating_add(head),
            bytes_up: r(&self.bytes_up),
            bytes_down: r(&self.bytes_down),
        }
    }

    fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}

impl serde::Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(s)
    }
}

/// A datastore in an Azure Blob container or an S3 bucket.
pub struct ObjectBackend {
    pub(crate) inner: Arc<Inner>,
    counters: Arc<Counters>,
    /// Keys a listing page holds (S3 1,000, Azure 5,000), to count listing requests.
    list_page: u64,
    /// Owned here only so that dropping the backend stops its threads; taken in `Drop`.
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ObjectBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectBackend")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectBackend {
    fn drop(&mut self) {
        // Never blocks: dropping a runtime the normal way panics inside another
        // runtime's async context.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl ObjectBackend {
    /// Builds the client for an Azure or S3 target (no request is sent yet).
    pub fn new(target: &Target, opts: &Options) -> Result<ObjectBackend, Error> {
        let location = target.location();
        let bad = |detail: String| Error::Target {
            location: location.clone(),
            detail,
        };
        let client = |endpoint: &Option<String>| {
            let mut c = ClientOptions::new()
                .with_connect_timeout(opts.connect_timeout)
                .with_timeout(opts.request_timeout);
            if endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
            {
                c = c.with_allow_http(true);
            }
            c
        };
        let retry = RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: opts.max_retries,
            retry_timeout: opts.retry_timeout,
        };
        let store: Arc<dyn ObjectStore> = match target {
            Target::Azure {
                account,
                container,
                endpoint,
                access_key,
            } => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                    .with_account(account)
                    .with_container_name(container)
                    .with_access_key(access_key.expose())
                    .with_client_options(client(endpoint))
                    .with_retry(retry);
                if let Some(e) = endpoint {
                    // An explicit endpoint, not emulator mode: emulator mode takes its
                    // URL from a process-wide environment variable.
                    b = b.with_endpoint(e.clone());
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            Target::S3 {
                bucket,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_access_key_id(access_key_id)
                    .with_secret_access_key(secret_access_key.expose())
                    .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
                    .with_client_options(client(endpoint))
                    .with_retry(retry);
                if let Some(e) = endpoint {
                    b = b
                        .with_endpoint(e.clone())
                        .with_virtual_hosted_style_request(false);
                }
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            Target::Folder { .. } => {
                return Err(bad(
                    "a folder is a LocalBackend; open it with objstore::open".into(),
                ));
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("objstore")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        let lease = LeaseCore::new(opts.lease)?;
        let list_page = match target {
            Target::S3 { .. } => 1000,
            _ => 5000,
        };
        Ok(ObjectBackend {
            counters: Arc::default(),
            list_page,
            inner: Arc::new(Inner {
                store,
                handle: rt.handle().clone(),
                location,
                opts: opts.clone(),
                lease,
            }),
            rt: Some(rt),
        })
    }

    /// Test hook: the renewal task stops renewing, as in a server that hangs or loses
    /// its network while holding the lease (the lease then expires under it).
    #[doc(hidden)]
    pub fn stop_renewing(&self) {
        lease::stop_renewing(&self.inner);
    }

    /// The request counters of this backend (shared: they keep counting).
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The random id this backend writes into the lease object.
    pub fn owner_id(&self) -> &str {
        &self.inner.lease.owner
    }
}

impl ObjectBackend {
    fn put_mode(
        &self,
        key: &str,
        data: &[u8],
        mode: PutMode,
    ) -> DsResult<object_store::Result<()>> {
        let limit = lease::write_limit(&self.inner, key)?;
        let path = obj_path(key)?;
        Counters::add(&self.counters.put, 1);
        Counters::add(&self.counters.bytes_up, data.len() as u64);
        let store = self.inner.store.clone();
        let payload = PutPayload::from(data.to_vec());
        let op = "put";
        match self.inner.block(
            async move {
                store
                    .put_opts(&path, payload, PutOptions::from(mode))
                    .await
                    .map(|_| ())
            },
            limit,
        ) {
            Some(r) => Ok(r),
            None => Err(DsError::Io {
                path: self.inner.key_location(key).into(),
                op,
                err: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", limit.as_secs()),
                ),
            }),
        }
    }
}

impl Backend for ObjectBackend {
    fn put(&self, key: &str, data: &[u8]) -> DsResult<()> {
        self.put_mode(key, data, PutMode::Overwrite)?
            .map_err(|e| self.inner.map_err(key, "put", e))
    }

    fn put_new(&self, key: &str, data: &[u8]) -> DsResult<bool> {
        match self.put_mode(key, data, PutMode::Create)? {
            Ok(()) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            // S3 answers 412 to If-None-Match; some object_store paths report it so.
            Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => Err(DsError::Invalid(format!(
                "{}: this store cannot create an object only if it is absent (conditional PUT); \
                 a datastore needs it for manifests and its lease",
                self.inner.key_location(key)
            ))),
            Err(e) => Err(self.inner.map_err(key, "put (create only)", e)),
        }
    }

    fn get(&self, key: &str) -> DsResult<Vec<u8>> {
        let path = obj_path(key)?;
        let store = self.inner.store.clone();
        Counters::add(&self.counters.get, 1);
        let got = self
            .inner
            .call(key, "get", self.inner.op_limit(), async move {
                let r = store.get(&path).await?;
                r.bytes().await.map(|b| b.to_vec())
            })?;
        Counters::add(&self.counters.bytes_down, got.len() as u64);
        Ok(got)
    }

    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> DsResult<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = obj_path(key)?;
        let len = buf.len() as u64;
        let truncated = || DsError::Corrupt {
            key: key.into(),
            detail: format!(
                "truncated: {} bytes at offset {offset} are past its end",
                buf.len()
            ),
        };
        let Some(end) = offset.checked_add(len) else {
            return Err(truncated());
        };
        let store = self.inner.store.clone();
        let p = path.clone();
        Counters::add(&self.counters.get, 1);
        let got = self
            .inner
            .call(key, "read", self.inner.op_limit(), async move {
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(offset..end)),
                    ..Default::default()
                };
                let r = store.get_opts(&p, opts).await?;
                r.bytes().await
            });
        match got {
            Ok(b) if b.len() as u64 == len => {
                Counters::add(&self.counters.bytes_down, len);
                buf.copy_from_slice(&b);
                Ok(())
            }
            Ok(_) => Err(truncated()),
            Err(DsError::Missing { key }) => Err(DsError::Missing { key }),
            Err(e) => {
                // A range starting past the end is refused by the store (416); name it
                // as the short object it is, like LocalBackend does.
                let store = self.inner.store.clone();
                Counters::add(&self.counters.head, 1);
                match self
                    .inner
                    .call(key, "stat", self.inner.op_limit(), async move {
                        store.head(&path).await
                    }) {
                    Ok(meta) if meta.size < end => Err(truncated()),
                    _ => Err(e),
                }
            }
        }
    }

    fn list(&self, prefix: &str) -> DsResult<Vec<Entry>> {
        let trimmed = prefix.trim_end_matches('/');
        let p = if trimmed.is_empty() {
            None
        } else {
            Some(obj_path(trimmed)?)
        };
        let store = self.inner.store.clone();
        let mut out: Vec<Entry> =
            self.inner
                .call(prefix, "list", self.inner.op_limit(), async move {
                    store
                        .list(p.as_ref())
                        .map_ok(|m| Entry {
                            key: m.location.to_string(),
                            size: m.size,
                        })
                        .try_collect::<Vec<_>>()
                        .await
                })?;
        Counters::add(
            &self.counters.list,
            (out.len() as u64).div_ceil(self.list_page).max(1),
        );
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> DsResult<()> {
        let limit = lease::write_limit(&self.inner, key)?;
        let path = obj_path(key)?;
        let store = self.inner.store.clone();
        Counters::add(&self.counters.delete, 1);
        match self.inner.call(
            key,
            "delete",
            limit,
            async move { store.delete(&path).await },
        ) {
            Ok(()) | Err(DsError::Missing { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn exists(&self, key: &str) -> DsResult<bool> {
        let path = obj_path(key)?;
        let store = self.inner.store.clone();
        Counters::add(&self.counters.head, 1);
        match self
            .inner
            .call(key, "stat", self.inner.op_limit(), async move {
                store.head(&path).await
            }) {
            Ok(_) => Ok(true),
            Err(DsError::Missing { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn lock(&self, exclusive: bool, wait: bool) -> DsResult<Box<dyn LockGuard>> {
        lease::lock(&self.inner, exclusive, wait)
    }

    fn hold(&self) -> DsResult<Option<Box<dyn datastore::backend::LeaseHold>>> {
        lease::hold(&self.inner).map(Some)
    }

    fn remove_leftovers(&self) -> DsResult<u64> {
        // Every write is one atomic PUT: nothing temporary is ever left behind.
        Ok(0)
    }

    fn location(&self) -> String {
        self.inner.location.clone()
    }
}
