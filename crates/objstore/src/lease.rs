//! The datastore lock on object storage: the lease object `locks/lease.json` (the
//! design and why it is safe are in the crate's documentation).

use crate::inner::{Held, Inner, LeaseCore, State};
use datastore::backend::{LeaseHold, LockGuard};
use datastore::{Error as DsError, Result as DsResult};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const LEASE_KEY: &str = "locks/lease.json";

/// Longest a waiting taker sleeps before it looks at the lease again.
const LOOK_AGAIN: Duration = Duration::from_secs(2);

/// The lease object's body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct LeaseBody {
    owner: String,
    host: String,
    pid: u32,
    expires_unix: u64,
    /// Counts renewals, so a renewal whose answer was lost (and whose retry then
    /// failed its precondition) is recognised as ours.
    renewal: u64,
}

impl LeaseBody {
    fn describe(&self) -> String {
        format!(
            "{} (pid {}, owner {}) holds the lease until {}",
            self.host,
            self.pid,
            self.owner,
            utc::rfc3339(i64::try_from(self.expires_unix).unwrap_or(i64::MAX))
        )
    }
}

impl Held {
    /// A lease just taken with the PUT sent at `sent`.
    fn taken(version: UpdateVersion, sent: Instant) -> Held {
        Held {
            version,
            renewed: sent,
            renewal: 0,
            paused: false,
            task: None,
        }
    }
}

impl LeaseCore {
    pub(crate) fn new(duration: Duration) -> Result<LeaseCore, crate::Error> {
        Ok(LeaseCore {
            owner: datastore::crypto::random_hex(8)?,
            host: host_name(),
            pid: std::process::id(),
            duration,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        })
    }

    fn body(&self, renewal: u64) -> Vec<u8> {
        let expires = unix_now() + self.duration.as_secs_f64();
        let body = LeaseBody {
            owner: self.owner.clone(),
            host: self.host.clone(),
            pid: self.pid,
            // Rounded up: a later expiry only delays a taker.
            expires_unix: expires.ceil() as u64,
            renewal,
        };
        serde_json::to_vec_pretty(&body).unwrap_or_default()
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn lease_path() -> ObjPath {
    ObjPath::from(LEASE_KEY)
}

fn lost_error(inner: &Inner, detail: &str) -> DsError {
    DsError::Invalid(format!(
        "lease lost: another server holds {}: {detail}; this server stopped writing to it",
        inner.location
    ))
}

/// Whether a write may start now, and how long it may take: refused once the lease is
/// lost or has gone unrenewed for half its length; otherwise bounded so it ends
/// before 3/4 of the lease after the last renewal.
pub(crate) fn write_limit(inner: &Inner, key: &str) -> DsResult<Duration> {
    let core = &inner.lease;
    let (renewed, lost) = {
        let s = locks::lock(&core.state);
        (s.held.as_ref().map(|h| h.renewed), s.lost.clone())
    };
    if let Some(l) = lost {
        return Err(lost_error(inner, &l));
    }
    let Some(renewed) = renewed else {
        return Ok(inner.op_limit());
    };
    let age = renewed.elapsed();
    if age > core.duration / 2 {
        // Name the new owner when the lease shows one.
        if let Some(body) = read_lease(inner).ok().flatten().map(|(b, _)| b)
            && body.owner != core.owner
        {
            let d = body.describe();
            locks::lock(&core.state).lost = Some(d.clone());
            return Err(lost_error(inner, &d));
        }
        return Err(DsError::Invalid(format!(
            "{}: not writing {key}: the lease on {} was last renewed {:.1} s ago (lease {} s); \
             another server may take over, so writes stop until it is renewed",
            inner.key_location(key),
            inner.location,
            age.as_secs_f64(),
            core.duration.as_secs_f64()
        )));
    }
    let left = (core.duration * 3 / 4).saturating_sub(age);
    Ok(left.min(inner.op_limit()))
}

/// Reads the lease object: its body and version; `None` when there is none.
fn read_lease(inner: &Inner) -> DsResult<Option<(LeaseBody, UpdateVersion)>> {
    let store = inner.store.clone();
    let r = inner.call(LEASE_KEY, "read lease", inner.op_limit(), async move {
        let r = store.get(&lease_path()).await?;
        let v = UpdateVersion {
            e_tag: r.meta.e_tag.clone(),
            version: r.meta.version.clone(),
        };
        Ok((r.bytes().await?, v))
    });
    let (bytes, version) = match r {
        Ok(x) => x,
        Err(DsError::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let body: LeaseBody = serde_json::from_slice(&bytes).map_err(|e| DsError::Corrupt {
        key: inner.key_location(LEASE_KEY),
        detail: format!(
            "the lease object is not a lease ({e}); delete it if no server uses this datastore"
        ),
    })?;
    Ok(Some((body, version)))
}

/// One conditional PUT of the lease; `Ok(None)` when its condition failed.
fn put_lease(inner: &Inner, mode: PutMode, body: Vec<u8>) -> DsResult<Option<UpdateVersion>> {
    let store = inner.store.clone();
    let r = inner.block(
        async move {
            store
                .put_opts(
                    &lease_path(),
                    PutPayload::from(body),
                    PutOptions::from(mode),
                )
                .await
        },
        inner.op_limit(),
    );
    match r {
        Some(Ok(res)) => Ok(Some(UpdateVersion {
            e_tag: res.e_tag,
            version: res.version,
        })),
        Some(Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        )) => Ok(None),
        Some(Err(object_store::Error::NotImplemented { .. })) => Err(DsError::Invalid(format!(
            "{}: this store has no conditional PUT, which the datastore lease needs",
            inner.location
        ))),
        Some(Err(e)) => Err(inner.map_err(LEASE_KEY, "write lease", e)),
        None => Err(DsError::Io {
            path: inner.key_location(LEASE_KEY).into(),
            op: "write lease",
            err: std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"),
        }),
    }
}

/// Takes the lease object: creates it, or takes over an expired one.
fn acquire(inner: &Arc<Inner>, wait: bool) -> DsResult<Held> {
    let core = &inner.lease;
    let deadline = Instant::now()
        + if wait {
            inner.opts.lock_wait
        } else {
            Duration::ZERO
        };
    // Each lost race means another server changed the lease just now; a few are
    // normal, endless ones are not.
    let mut races = 0u32;
    let mut raced = || {
        races += 1;
        if races > 20 {
            Err(DsError::Invalid(format!(
                "{}: the lease object changes under every attempt to take it",
                inner.key_location(LEASE_KEY)
            )))
        } else {
            Ok(())
        }
    };
    loop {
        let sent = Instant::now();
        if let Some(version) = put_lease(inner, PutMode::Create, core.body(0))? {
            return Ok(Held::taken(version, sent));
        }
        let Some((body, version)) = read_lease(inner)? else {
            raced()?; // released between our create and our read
            continue;
        };
        // Ours too: a release whose delete did not reach the store (the network was
        // down) left it behind. This backend holds no guard now (only then is the
        // lease taken), so nobody relies on it: take it back at once rather than
        // wait for its expiry.
        if (body.expires_unix as f64) < unix_now() || body.owner == core.owner {
            let sent = Instant::now();
            if let Some(version) = put_lease(inner, PutMode::Update(version), core.body(0))? {
                return Ok(Held::taken(version, sent));
            }
            raced()?; // another server took it first
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(DsError::Invalid(format!(
                "{}: the datastore is in use by another server: {}; try again later{}",
                inner.location,
                body.describe(),
                if wait { " (waited for it)" } else { "" }
            )));
        }
        let until_expiry = Duration::from_secs_f64(
            (body.expires_unix as f64 - unix_now()).clamp(0.0, 3600.0) + 0.1,
        );
        // A holder that finishes deletes the lease: look again soon rather than at
        // its expiry (a GET and a conditional PUT every 2 s at most).
        std::thread::sleep(
            until_expiry
                .min(core.duration / 3)
                .min(LOOK_AGAIN)
                .min(deadline - now)
                .max(Duration::from_millis(50)),
        );
    }
}

/// The renewal loop, on the backend's runtime.
async fn renew(inner: Arc<Inner>, taken: Instant) {
    let core = &inner.lease;
    // Each attempt starts lease/3 after the previous one was *sent* (the first after
    // the lease was taken), not after its answer: writes stop at lease/2 after the last
    // successful send, so counting from answers would stop them whenever requests take
    // longer than lease/12.
    let mut next = taken + core.duration / 3;
    loop {
        tokio::time::sleep_until(next.into()).await;
        next = Instant::now() + core.duration / 3;
        let (version, renewal) = {
            let s = locks::lock(&core.state);
            match &s.held {
                Some(h) if s.lost.is_none() && !h.paused => (h.version.clone(), h.renewal + 1),
                Some(_) if s.lost.is_none() => continue,
                _ => return,
            }
        };
        let sent = Instant::now();
        let store = inner.store.clone();
        let body = PutPayload::from(core.body(renewal));
        let r = tokio::time::timeout(
            core.duration / 3,
            store.put_opts(
                &lease_path(),
                body,
                PutOptions::from(PutMode::Update(version)),
            ),
        )
        .await;
        match r {
            Ok(Ok(res)) => {
                let mut s = locks::lock(&core.state);
                if let Some(h) = s.held.as_mut() {
                    h.version = UpdateVersion {
                        e_tag: res.e_tag,
                        version: res.version,
                    };
                    h.renewed = sent;
                    h.renewal = renewal;
                }
            }
            Ok(Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            )) => {
                // Ours with a newer version (a retried renewal whose first try landed),
                // or someone else's.
                let store = inner.store.clone();
                let got = tokio::time::timeout(core.duration / 3, async move {
                    let r = store.get(&lease_path()).await?;
                    let v = UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    Ok::<_, object_store::Error>((r.bytes().await?, v))
                })
                .await;
                let mut s = locks::lock(&core.state);
                match got {
                    Ok(Ok((bytes, v))) => match serde_json::from_slice::<LeaseBody>(&bytes) {
                        Ok(b) if b.owner == core.owner && b.renewal == renewal => {
                            if let Some(h) = s.held.as_mut() {
                                h.version = v;
                                h.renewed = sent;
                                h.renewal = renewal;
                            }
                        }
                        Ok(b) => {
                            s.lost = Some(b.describe());
                            return;
                        }
                        Err(_) => {
                            s.lost = Some("the lease object was replaced".into());
                            return;
                        }
                    },
                    Ok(Err(object_store::Error::NotFound { .. })) => {
                        s.lost = Some("the lease object was removed".into());
                        return;
                    }
                    // Unreachable store: try again; writes stop at lease/2 by themselves.
                    _ => {}
                }
            }
            // A failed or slow renewal: try again at the next tick.
            _ => {}
        }
    }
}

pub(crate) fn stop_renewing(inner: &Inner) {
    if let Some(h) = locks::lock(&inner.lease.state).held.as_mut() {
        h.paused = true;
    }
}

/// What a guard counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Shared,
    Exclusive,
    /// Keeps the lease owned; conflicts with nothing in this process.
    Hold,
}

/// The datastore lock: local shared/exclusive counting, and the lease while any guard
/// is held.
pub(crate) fn lock(
    inner: &Arc<Inner>,
    exclusive: bool,
    wait: bool,
) -> DsResult<Box<dyn LockGuard>> {
    let kind = if exclusive {
        Kind::Exclusive
    } else {
        Kind::Shared
    };
    Ok(Box::new(take(inner, kind, wait)?))
}

/// A server's lifetime hold of the lease: taken without waiting for another server,
/// and counted apart from shared and exclusive guards, so the server's own gc
/// (exclusive) still runs while it is held.
pub(crate) fn hold(inner: &Arc<Inner>) -> DsResult<Box<dyn LeaseHold>> {
    Ok(Box::new(take(inner, Kind::Hold, false)?))
}

fn take(inner: &Arc<Inner>, kind: Kind, wait: bool) -> DsResult<Guard> {
    let core = &inner.lease;
    let deadline = Instant::now() + inner.opts.local_wait;
    let mut s = locks::lock(&core.state);
    loop {
        if let Some(l) = &s.lost {
            return Err(lost_error(inner, l));
        }
        let now = Instant::now();
        if s.acquiring {
            // Another thread is taking the lease; its outcome decides ours.
            if now >= deadline {
                return Err(DsError::Invalid(format!(
                    "{}: timed out waiting for the lease",
                    inner.location
                )));
            }
            s = locks::wait_timeout(&core.cv, s, deadline - now);
            continue;
        }
        let conflict = match kind {
            Kind::Shared => s.exclusive,
            Kind::Exclusive => s.exclusive || s.shared > 0,
            Kind::Hold => false,
        };
        if !conflict {
            break;
        }
        if !wait || now >= deadline {
            return Err(DsError::Invalid(format!(
                "{}: the datastore is busy ({}); try again later",
                inner.location,
                if kind == Kind::Exclusive {
                    "a backup, verify or prune is running"
                } else {
                    "gc is running"
                }
            )));
        }
        s = locks::wait_timeout(&core.cv, s, deadline - now);
    }
    if s.held.is_none() {
        // Taken without the state's mutex, so writes and other lockers are not held up
        // behind a wait for another server.
        s.acquiring = true;
        drop(s);
        let got = acquire(inner, wait);
        s = locks::lock(&core.state);
        s.acquiring = false;
        core.cv.notify_all();
        let mut held = got?;
        held.task = Some(inner.handle.spawn(renew(inner.clone(), held.renewed)));
        s.held = Some(held);
    }
    match kind {
        Kind::Exclusive => s.exclusive = true,
        Kind::Shared => s.shared += 1,
        Kind::Hold => s.holds += 1,
    }
    Ok(Guard {
        inner: inner.clone(),
        kind,
    })
}

struct Guard {
    inner: Arc<Inner>,
    kind: Kind,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("location", &self.inner.location)
            .field("kind", &self.kind)
            .finish()
    }
}

impl LockGuard for Guard {}

impl LeaseHold for Guard {
    fn lost(&self) -> Option<String> {
        let s = locks::lock(&self.inner.lease.state);
        s.lost
            .as_ref()
            .map(|l| lost_error(&self.inner, l).to_string())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let core = &self.inner.lease;
        let mut s = locks::lock(&core.state);
        match self.kind {
            Kind::Exclusive => s.exclusive = false,
            Kind::Shared => s.shared = s.shared.saturating_sub(1),
            Kind::Hold => s.holds = s.holds.saturating_sub(1),
        }
        core.cv.notify_all();
        if s.exclusive || s.shared > 0 || s.holds > 0 {
            return;
        }
        let Some(mut held) = s.held.take() else {
            return;
        };
        let ours = s.lost.is_none() && held.renewed.elapsed() < core.duration / 2;
        if let Some(task) = held.task.take() {
            task.abort();
            // Let an in-flight renewal finish dying, so it cannot re-create the lease
            // after the delete below.
            let _ = self.inner.block(
                async move {
                    let _ = task.await;
                },
                Duration::from_secs(2),
            );
        }
        if ours {
            // Surely still ours (renewed less than lease/2 ago, so unexpired): delete.
            // Otherwise leave it to expire rather than risk deleting a taker's lease.
            let store = self.inner.store.clone();
            let _ = self.inner.block(
                async move { store.delete(&lease_path()).await },
                self.inner.op_limit(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{ObjectBackend, Options, Secret, Target};
    use datastore::Backend;
    use std::time::Duration;
    use testkit::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite};

    /// A hold keeps the lease without conflicting with the process's own shared and
    /// exclusive guards; another process's hold is refused at once, naming it; the
    /// lease goes only when the hold and every guard are gone.
    #[test]
    fn a_hold_keeps_the_lease_and_lets_gc_run() {
        let az = Azurite::start();
        az.create_container("hold");
        let target = Target::Azure {
            account: AZURITE_ACCOUNT.into(),
            container: "hold".into(),
            endpoint: Some(az.endpoint()),
            access_key: Secret::new(AZURITE_KEY),
        };
        let opts = Options {
            lease: Duration::from_secs(3),
            lock_wait: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(5),
            ..Options::default()
        };
        let a = ObjectBackend::new(&target, &opts).unwrap();
        let b = ObjectBackend::new(&target, &opts).unwrap();

        let hold = a.hold().unwrap().expect("object storage holds");
        assert!(a.exists(super::LEASE_KEY).unwrap());
        // gc (exclusive) and then a backup (shared) run under the hold.
        let x = a.lock(true, false).unwrap();
        a.put("packs/x", b"under the hold").unwrap();
        drop(x);
        let sh = a.lock(false, false).unwrap();
        assert!(a.lock(true, false).is_err(), "exclusive beside shared");
        drop(sh);

        let t = std::time::Instant::now();
        let e = b.hold().unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(2), "the hold waited");
        assert!(
            e.contains("in use by another server") && e.contains(a.owner_id()),
            "{e}"
        );
        // Renewed past several lease lengths: still held, writes still go.
        std::thread::sleep(Duration::from_secs(4));
        a.put("packs/y", b"still held").unwrap();
        assert_eq!(hold.lost(), None);

        // Guards dropping leave the lease to the hold; dropping the hold frees it.
        assert!(a.exists(super::LEASE_KEY).unwrap());
        drop(hold);
        assert!(!a.exists(super::LEASE_KEY).unwrap());
        let hb = b.hold().unwrap().unwrap();

        // `a` stopped renewing and taken over: its hold reports the loss.
        drop(hb);
        let ha = a.hold().unwrap().unwrap();
        a.stop_renewing();
        std::thread::sleep(Duration::from_secs(4));
        let hb = b.hold().unwrap().unwrap();
        let e = a
            .put("packs/z", b"after the takeover")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease lost"), "{e}");
        assert!(ha.lost().is_some_and(|l| l.contains("lease lost")));
        drop(hb);
    }
}
