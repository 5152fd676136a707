//! The accept loop: TLS (rustls) on every connection, HTTP/1.1 or HTTP/2 by ALPN, and
//! the client certificate's fingerprint handed to the router as a request extension.
//! (axum's own `serve` cannot see client certificates.)
//!
//! Every connection is bounded (`[http]` in holdfast.toml): at most
//! `max_connections` in all and `max_connections_per_address` per client address
//! (more are closed at once); a connection must send its first request header within
//! `header_timeout_seconds` of its handshake (hyper's HTTP/1-or-2 detection waits for
//! bytes with no timer of its own); a connection with no request in progress is closed
//! after `idle_timeout_seconds`, and an HTTP/1.1 connection that has begun its next
//! header must finish it within `header_timeout_seconds`. A request in progress (an
//! upload, a download, an agent's long poll) is never cut by these timers.

use crate::auth::Peer;
use crate::config::Http;
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// A stalled handshake (or a foreign certificate) ends after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// After its timer ran out, a connection gets this long to go after a GOAWAY (HTTP/2)
/// or close (HTTP/1.1), counted anew while a request that raced in is still running.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Refused connections are logged at most once per this long (a flood is one line).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router, http: Http) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Slots::new(&http));
    let mut refusals = RefusalLog::default();
    let header = Duration::from_secs(http.header_timeout_seconds);
    let idle = Duration::from_secs(http.idle_timeout_seconds);
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                eprintln!("holdfast server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ip = addr.ip().to_canonical();
        let slot = match slots.take(ip) {
            Ok(s) => s,
            Err(why) => {
                // Dropping the socket closes it at once.
                refusals.refused(ip, why);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let peer = Peer {
                cert_fingerprint: stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| pki::cert_fingerprint(c.as_ref())),
            };
            let svc = app.map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            let conn = Arc::new(ConnWatch::new());
            let svc = Tracked {
                inner: TowerToHyperService::new(svc),
                conn: conn.clone(),
            };
            let io = TokioIo::new(Watched {
                inner: stream,
                conn: conn.clone(),
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http2()
                .max_concurrent_streams(64)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .max_frame_size(1 << 20);
            let served = builder.serve_connection(io, svc);
            tokio::pin!(served);
            tokio::select! {
                _ = served.as_mut() => return,
                _ = conn.expired(header, idle) => {}
            }
            // Out of time: a GOAWAY lets an HTTP/2 client retry elsewhere; a request
            // that raced in still completes.
            served.as_mut().graceful_shutdown();
            conn.lock().restart_idle();
            tokio::select! {
                _ = served => {}
                _ = conn.expired(SHUTDOWN_GRACE, SHUTDOWN_GRACE) => {}
            }
        });
    }
}

/// Open connections, in all and per client address.
struct Slots {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Total,
    PerAddress,
}

impl Slots {
    fn new(http: &Http) -> Slots {
        Slots {
            max_total: http.max_connections,
            max_per_address: http.max_connections_per_address,
            open: Mutex::new((0, HashMap::new())),
        }
    }

    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let mut open = locks::lock(&self.open);
        if open.0 >= self.max_total {
            return Err(Refused::Total);
        }
        let n = open.1.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return Err(Refused::PerAddress);
        }
        *n += 1;
        open.0 += 1;
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

/// One open connection's place; given back when the connection ends (dropped).
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = locks::lock(&self.slots.open);
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// Logs the first refused connection of a burst, then counts quietly.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn refused(&mut self, ip: IpAddr, why: Refused) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY)
        {
            self.unlogged = self.unlogged.saturating_add(1);
            return;
        }
        let why = match why {
            Refused::Total => "http.max_connections reached",
            Refused::PerAddress => "http.max_connections_per_address reached for it",
        };
        let before = if self.unlogged > 0 {
            format!(" ({} more refused since the last report)", self.unlogged)
        } else {
            String::new()
        };
        eprintln!(
            "holdfast server: refusing connections: one from {ip} closed, {why}{before}; \
             more in the next {} s are counted, not logged",
            REFUSAL_LOG_EVERY.as_secs()
        );
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// What the timers of one connection look at.
struct ConnWatch {
    state: Mutex<ConnState>,
    changed: Notify,
}

struct ConnState {
    /// Requests in progress (from their header to the end of their response body).
    active: usize,
    /// Requests seen so far.
    requests: u64,
    /// Since when no request is in progress.
    idle_since: Instant,
    /// An HTTP/1.1 connection with no request in progress received bytes of its next
    /// one at this time.
    head_started: Option<Instant>,
    /// The first bytes, to tell HTTP/2 (its preface starts with `PRI`) from HTTP/1.1.
    prefix: Vec<u8>,
}

impl ConnState {
    /// When the connection is closed if nothing changes; `None` while a request runs.
    fn deadline(&self, header: Duration, idle: Duration) -> Option<Instant> {
        if self.active > 0 {
            return None;
        }
        let wait = if self.requests == 0 { header } else { idle };
        let mut at = self.idle_since + wait;
        if let Some(h) = self.head_started {
            at = at.min(h + header);
        }
        Some(at)
    }

    fn restart_idle(&mut self) {
        self.idle_since = Instant::now();
        self.head_started = None;
    }

    fn is_http2(&self) -> bool {
        self.prefix.starts_with(b"PRI")
    }
}

impl ConnWatch {
    fn new() -> ConnWatch {
        ConnWatch {
            state: Mutex::new(ConnState {
                active: 0,
                requests: 0,
                idle_since: Instant::now(),
                head_started: None,
                prefix: Vec::with_capacity(3),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        locks::lock(&self.state)
    }

    /// Returns once the connection has waited too long: for its first request header
    /// (`header`), with nothing in progress (`idle`), or for the rest of a begun
    /// HTTP/1.1 header (`header`).
    async fn expired(&self, header: Duration, idle: Duration) {
        loop {
            // Registered before the state is read, so no change is missed.
            let changed = self.changed.notified();
            let deadline = self.lock().deadline(header, idle);
            match deadline {
                None => changed.await,
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }

    fn read(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut s = self.lock();
        if s.prefix.len() < 3 {
            let take = (3 - s.prefix.len()).min(bytes.len());
            s.prefix.extend_from_slice(&bytes[..take]);
        }
        // HTTP/2 clients send pings and window updates while idle: only HTTP/1.1
        // bytes between requests start a header.
        if s.active == 0 && s.requests > 0 && s.head_started.is_none() && !s.is_http2() {
            s.head_started = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        {
            let mut s = self.lock();
            s.active = s.active.saturating_add(1);
            s.requests = s.requests.saturating_add(1);
            s.head_started = None;
        }
        self.changed.notify_one();
        InFlight { conn: self.clone() }
    }
}

/// A request in progress; dropped with its response body (sent, or abandoned).
struct InFlight {
    conn: Arc<ConnWatch>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut s = self.conn.lock();
            s.active = s.active.saturating_sub(1);
            if s.active == 0 {
                s.restart_idle();
            }
        }
        self.conn.changed.notify_one();
    }
}

/// The service with each request counted from its header to its response's end.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    conn: Arc<ConnWatch>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body + Unpin + Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.conn.begin();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|inner| TrackedBody {
                inner,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that ends its request's [`InFlight`] when it is dropped.
struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The TLS stream, telling the connection's timers what it reads.
struct Watched<T> {
    inner: T,
    conn: Arc<ConnWatch>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.conn
                .read(buf.filled().get(before..).unwrap_or_default());
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(total: usize, per: usize) -> Http {
        Http {
            max_connections: total,
            max_connections_per_address: per,
            ..Http::default()
        }
    }

    #[test]
    fn slots_cap_per_address_and_in_all_and_come_back_on_drop() {
        let s = Arc::new(Slots::new(&http(3, 2)));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = s.take(a).unwrap();
        let _a2 = s.take(a).unwrap();
        assert_eq!(s.take(a).err(), Some(Refused::PerAddress));
        let _b1 = s.take(b).unwrap();
        assert_eq!(s.take(b).err(), Some(Refused::Total));
        drop(a1);
        let _a3 = s.take(a).unwrap();
        assert_eq!(s.take(b).err(), Some(Refused::Total));
    }

    #[test]
    fn deadlines_follow_requests_and_headers() {
        let header = Duration::from_secs(10);
        let idle = Duration::from_secs(120);
        let c = Arc::new(ConnWatch::new());
        let t0 = c.lock().idle_since;
        // No request yet: the header timeout, whatever arrives.
        c.read(b"GET / HT");
        assert_eq!(c.lock().deadline(header, idle), Some(t0 + header));
        // A request in progress: no deadline, however long it takes.
        let r = c.begin();
        assert_eq!(c.lock().deadline(header, idle), None);
        drop(r);
        let t1 = c.lock().idle_since;
        assert!(t1 >= t0);
        assert_eq!(c.lock().deadline(header, idle), Some(t1 + idle));
        // HTTP/1.1: the next header has begun, so it must end within the header timeout.
        c.read(b"GET");
        let h = c.lock().head_started.unwrap();
        assert_eq!(c.lock().deadline(header, idle), Some(h + header));
        // HTTP/2 pings while idle do not.
        let h2 = Arc::new(ConnWatch::new());
        h2.read(b"PRI * HTTP/2.0");
        drop(h2.begin());
        h2.read(b"\0\0\x08\x06");
        let s = h2.lock();
        assert_eq!(s.head_started, None);
        assert_eq!(s.deadline(header, idle), Some(s.idle_since + idle));
    }
}
