//! [`FaultProxy`]: a small HTTP/1.1 proxy on loopback that a test puts between a
//! client and a real server, and flips at run time: pass through, answer the next N
//! requests with `503 Service Unavailable` without forwarding them, delay every
//! request, or drop connections without an answer. std threads only.
//!
//! One request per connection: the proxy reads the request's head and its
//! `Content-Length` body, then either refuses it, drops it, or sends it to the upstream
//! on a fresh connection with `Connection: close` and copies the answer back (with
//! `Connection: close` too, so the client never reuses the connection), then closes.
//! Chunked request bodies are not supported (object_store sends sized bodies): such a
//! request is answered `501`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// No read or write on either side waits longer than this.
const IO_DEADLINE: Duration = Duration::from_secs(60);
/// The longest request head the proxy accepts.
const MAX_HEAD: usize = 64 << 10;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Requests still to refuse with 503 (`u64::MAX`: all of them).
    refuse: AtomicU64,
    delay_ms: AtomicU64,
    reset: AtomicBool,
    seen: AtomicU64,
    forwarded: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    /// Request body bytes forwarded upstream.
    bytes_up: AtomicU64,
}

/// What the proxy counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    /// Requests read completely from clients.
    pub seen: u64,
    /// Requests sent to the upstream.
    pub forwarded: u64,
    /// Requests answered 503 without forwarding.
    pub refused: u64,
    /// Requests whose connection was dropped without an answer.
    pub dropped: u64,
    /// Request body bytes forwarded to the upstream.
    pub bytes_up: u64,
}

/// A fault-injecting proxy to `127.0.0.1:upstream_port`; stopped when dropped.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and passes every request through.
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if sh.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let sh = sh.clone();
                    // Detached: each ends within its I/O deadlines.
                    let _ = std::thread::Builder::new()
                        .name("fault-proxy-conn".into())
                        .spawn(move || serve(conn, upstream_port, &sh));
                }
            })
            .unwrap();
        FaultProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The proxy's own loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Back to passing every request through, at once (clears refusals, delay, drops).
    pub fn pass(&self) {
        self.shared.refuse.store(0, Ordering::SeqCst);
        self.shared.delay_ms.store(0, Ordering::SeqCst);
        self.shared.reset.store(false, Ordering::SeqCst);
    }

    /// Answers the next `n` requests with 503 without forwarding them.
    pub fn refuse_next(&self, n: u64) {
        self.shared.refuse.store(n, Ordering::SeqCst);
    }

    /// Answers every request with 503 until [`FaultProxy::pass`] or `refuse_next`.
    pub fn refuse_all(&self) {
        self.shared.refuse.store(u64::MAX, Ordering::SeqCst);
    }

    /// Delays every request by `ms` before handling it (0: no delay).
    pub fn delay_ms(&self, ms: u64) {
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Drops every connection after reading its request, without an answer.
    pub fn reset(&self, on: bool) {
        self.shared.reset.store(on, Ordering::SeqCst);
    }

    /// The counts so far.
    pub fn counts(&self) -> ProxyCounts {
        let s = &self.shared;
        ProxyCounts {
            seen: s.seen.load(Ordering::SeqCst),
            forwarded: s.forwarded.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            dropped: s.dropped.load(Ordering::SeqCst),
            bytes_up: s.bytes_up.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Takes one from the refusal budget; `u64::MAX` never runs out.
fn take_refusal(s: &Shared) -> bool {
    s.refuse
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
            0 => None,
            u64::MAX => Some(u64::MAX),
            n => Some(n - 1),
        })
        .is_ok()
}

fn serve(mut client: TcpStream, upstream_port: u16, s: &Shared) {
    let _ = client.set_read_timeout(Some(IO_DEADLINE));
    let _ = client.set_write_timeout(Some(IO_DEADLINE));
    let Some((head, body)) = read_request(&mut client) else {
        return;
    };
    s.seen.fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    if s.reset.load(Ordering::SeqCst) {
        s.dropped.fetch_add(1, Ordering::SeqCst);
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    if take_refusal(s) {
        s.refused.fetch_add(1, Ordering::SeqCst);
        let _ = client.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        let _ = client.flush();
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Some(body) = body else {
        let _ = client.write_all(
            b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    };
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        // The server is down: the client sees its connection closed, as it would.
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = up.set_read_timeout(Some(IO_DEADLINE));
    let _ = up.set_write_timeout(Some(IO_DEADLINE));
    s.forwarded.fetch_add(1, Ordering::SeqCst);
    s.bytes_up.fetch_add(body.len() as u64, Ordering::SeqCst);
    let head = with_connection_close(&head);
    if up.write_all(head.as_bytes()).is_err() || up.write_all(&body).is_err() {
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    // The answer's head, made `Connection: close`, then the rest as it comes.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    let end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        match up.read(&mut chunk) {
            Ok(0) | Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > MAX_HEAD {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let Ok(answer_head) = std::str::from_utf8(&buf[..end]) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let answer_head = with_connection_close(answer_head);
    if client.write_all(answer_head.as_bytes()).is_err() || client.write_all(&buf[end..]).is_err() {
        return;
    }
    loop {
        match up.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if client.write_all(&chunk[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = client.flush();
    let _ = client.shutdown(Shutdown::Both);
}

/// Where the head ends (just past `\r\n\r\n`).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads one request: its head (as text, ending in the blank line) and its body;
/// the body is `None` for a chunked request. `None` when the client sent no complete
/// request.
fn read_request(c: &mut TcpStream) -> Option<(String, Option<Vec<u8>>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    let end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8(buf[..end].to_vec()).ok()?;
    let mut len = 0usize;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") {
            len = value.trim().parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            return Some((head, None));
        }
    }
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(len);
    Some((head, Some(body)))
}

/// The head with its `Connection` headers replaced by `Connection: close`.
fn with_connection_close(head: &str) -> String {
    let mut out = String::with_capacity(head.len() + 20);
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let is_conn = line
            .split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("connection"));
        if !is_conn {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny upstream answering every request `200` with its own body length.
    fn upstream() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming().take(16) {
                let Ok(mut c) = c else { break };
                if let Some((_, Some(body))) = read_request(&mut c) {
                    let b = body.len().to_string();
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{b}",
                        b.len()
                    );
                }
            }
        });
        port
    }

    fn ask(port: u16, body: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut a = String::new();
        let _ = s.read_to_string(&mut a);
        a
    }

    #[test]
    fn passes_refuses_and_drops() {
        let p = FaultProxy::start(upstream());
        let a = ask(p.port(), "hello");
        assert!(
            a.starts_with("HTTP/1.1 200") && a.ends_with("\r\n\r\n5"),
            "{a}"
        );
        assert!(
            a.contains("Connection: close") && !a.contains("keep-alive"),
            "{a}"
        );
        p.refuse_next(2);
        for _ in 0..2 {
            let a = ask(p.port(), "x");
            assert!(
                a.starts_with("HTTP/1.1 503 ") && a.contains("Content-Length: 0"),
                "{a}"
            );
        }
        assert!(ask(p.port(), "abc").ends_with("\r\n\r\n3"));
        p.reset(true);
        assert_eq!(ask(p.port(), "abc"), "");
        p.pass();
        assert!(ask(p.port(), "").starts_with("HTTP/1.1 200"));
        assert_eq!(
            p.counts(),
            ProxyCounts {
                seen: 6,
                forwarded: 3,
                refused: 2,
                dropped: 1,
                bytes_up: 8,
            }
        );
    }
}
