//! Newline-delimited reads and whole-buffer writes on a unix stream socket, each bounded
//! by a deadline, so that a peer that stops talking (a hung QEMU main loop, a guest
//! without an agent) costs the caller a timeout, never a hang.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Longest reply line accepted (16 MiB). QMP's largest routine replies
/// (`query-named-block-nodes` on a VM with long backing chains) stay far below; anything
/// longer is treated as a broken peer rather than buffered without limit.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// Bytes asked of the kernel per read.
const CHUNK: usize = 64 * 1024;

/// How much of a bad line is quoted in a [`Error::Protocol`] message.
const EXCERPT: usize = 160;

/// The longest wait honoured; longer timeouts are clipped so that `Instant + Duration`
/// cannot overflow.
const MAX_WAIT: Duration = Duration::from_secs(100 * 24 * 3600);

/// The instant `timeout` from now.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout.min(MAX_WAIT)).unwrap_or(now)
}

/// Time left before `deadline`, or `None` once it has passed.
pub(crate) fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// A short, printable quotation of bytes received from a peer.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let cut = bytes.get(..EXCERPT).unwrap_or(bytes);
    let text = String::from_utf8_lossy(cut);
    if cut.len() < bytes.len() {
        format!("{text:?}... ({} bytes)", bytes.len())
    } else {
        format!("{text:?}")
    }
}

/// A connected socket plus the bytes read from it but not yet consumed.
pub(crate) struct LineConn {
    stream: UnixStream,
    /// The socket path, for messages.
    label: String,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    /// Unconsumed bytes before this offset are known to hold no newline.
    scanned: usize,
}

impl LineConn {
    pub(crate) fn new(stream: UnixStream, label: String) -> LineConn {
        LineConn {
            stream,
            label,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
        }
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// The pid of the process at the other end (`SO_PEERCRED`: for a socket QEMU
    /// listens on, the QEMU process that created it).
    pub(crate) fn peer_pid(&self) -> io::Result<u32> {
        use std::os::fd::AsRawFd;
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        // 12 bytes: fits.
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
            .map_err(io::Error::other)?;
        // SAFETY: `cred` and `len` are valid for writes of the sizes given, and the fd
        // is owned by `self.stream` for the duration of the call.
        let rc = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        u32::try_from(cred.pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| io::Error::other(format!("no peer process (pid {})", cred.pid)))
    }

    /// Drops every buffered byte (used before a resynchronisation: whatever was
    /// buffered is stale by definition).
    pub(crate) fn discard_buffered(&mut self) {
        self.buf.clear();
        // Give back the memory of an exceptionally large reply.
        self.buf.shrink_to(CHUNK.saturating_mul(2));
        self.start = 0;
        self.scanned = 0;
    }

    fn io_error(&self, action: &str, source: io::Error) -> Error {
        Error::Io {
            what: format!("{}: {action}", self.label),
            source,
        }
    }

    fn timeout(&self, waiting_for: &str) -> Error {
        Error::Timeout(format!("{}: {waiting_for}", self.label))
    }

    /// Writes all of `data` before `deadline`. `waiting_for` describes the write for a
    /// timeout message. A timeout may leave part of `data` written.
    pub(crate) fn write_all(
        &mut self,
        mut data: &[u8],
        deadline: Instant,
        waiting_for: &str,
    ) -> Result<()> {
        while !data.is_empty() {
            let Some(left) = remaining(deadline) else {
                return Err(self.timeout(waiting_for));
            };
            if let Err(e) = self.stream.set_write_timeout(Some(left)) {
                return Err(self.io_error("set write timeout", e));
            }
            match self.stream.write(data) {
                Ok(0) => {
                    return Err(self.io_error(
                        "write",
                        io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes"),
                    ));
                }
                Ok(n) => data = data.get(n..).unwrap_or_default(),
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(self.io_error("write", e)),
            }
        }
        Ok(())
    }

    /// Returns the next line without its `\n` (a `\r` before it is left in place: JSON
    /// treats it as whitespace). Waits until `deadline`; `waiting_for` describes what
    /// was awaited, for the timeout message.
    pub(crate) fn read_line(&mut self, deadline: Instant, waiting_for: &str) -> Result<Vec<u8>> {
        loop {
            let pending = self.buf.get(self.scanned..).unwrap_or_default();
            if let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let end = self.scanned.saturating_add(pos);
                let line = self.buf.get(self.start..end).unwrap_or_default().to_vec();
                if line.len() > MAX_LINE {
                    return Err(self.too_long());
                }
                self.start = end.saturating_add(1);
                self.scanned = self.start;
                if self.start >= self.buf.len() {
                    self.discard_buffered();
                }
                return Ok(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len().saturating_sub(self.start) > MAX_LINE {
                return Err(self.too_long());
            }
            self.fill(deadline, waiting_for)?;
        }
    }

    fn too_long(&self) -> Error {
        let line = self.buf.get(self.start..).unwrap_or_default();
        Error::Protocol(format!(
            "{}: reply line longer than {MAX_LINE} bytes: {}",
            self.label,
            excerpt(line)
        ))
    }

    /// Appends at least one byte from the socket to the buffer, or fails.
    fn fill(&mut self, deadline: Instant, waiting_for: &str) -> Result<()> {
        if self.start > 0 {
            // Compact: consumed lines are dropped only when more bytes are needed.
            self.buf.drain(..self.start.min(self.buf.len()));
            self.scanned = self.scanned.saturating_sub(self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old.saturating_add(CHUNK), 0);
        let result = loop {
            let Some(left) = remaining(deadline) else {
                break Err(self.timeout(waiting_for));
            };
            if let Err(e) = self.stream.set_read_timeout(Some(left)) {
                break Err(self.io_error("set read timeout", e));
            }
            let space = self.buf.get_mut(old..).unwrap_or_default();
            match self.stream.read(space) {
                Ok(0) => {
                    break Err(self.io_error(
                        "read",
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("connection closed by peer while waiting for {waiting_for}"),
                        ),
                    ));
                }
                Ok(n) => break Ok(n),
                // A read timeout surfaces as WouldBlock/TimedOut: loop and let the
                // deadline decide, so an early wake-up cannot end the wait.
                Err(e) if is_retry(&e) => {}
                Err(e) => break Err(self.io_error("read", e)),
            }
        };
        let got = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(old.saturating_add(got));
        result.map(|_| ())
    }
}

/// Errors after which the same call may simply be repeated (signal, socket timeout).
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn pair() -> (LineConn, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (LineConn::new(a, "test.sock".into()), b)
    }

    fn soon() -> Instant {
        deadline_after(Duration::from_secs(5))
    }

    #[test]
    fn lines_split_across_reads_and_several_per_read() {
        let (mut c, mut peer) = pair();
        let writer = thread::spawn(move || {
            peer.write_all(b"{\"a\":").unwrap();
            thread::sleep(Duration::from_millis(20));
            peer.write_all(b"1}\r\n{\"b\":2}\n{\"c\"").unwrap();
            thread::sleep(Duration::from_millis(20));
            peer.write_all(b":3}\n").unwrap();
        });
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"{\"a\":1}\r");
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"{\"b\":2}");
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"{\"c\":3}");
        writer.join().unwrap();
    }

    #[test]
    fn empty_lines_are_returned_as_empty() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"\n\nx\n").unwrap();
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"");
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"");
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"x");
    }

    #[test]
    fn read_times_out_and_keeps_partial_line() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"{\"partial\"").unwrap();
        let t0 = Instant::now();
        let err = c
            .read_line(deadline_after(Duration::from_millis(100)), "a reply")
            .unwrap_err();
        assert!(
            matches!(&err, Error::Timeout(m) if m.contains("test.sock: a reply")),
            "{err}"
        );
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert!(t0.elapsed() < Duration::from_secs(2));
        peer.write_all(b":1}\n").unwrap();
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"{\"partial\":1}");
    }

    #[test]
    fn eof_is_an_io_error() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"half a line").unwrap();
        drop(peer);
        let err = c.read_line(soon(), "the greeting").unwrap_err();
        match err {
            Error::Io { what, source } => {
                assert_eq!(what, "test.sock: read");
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
                assert!(source.to_string().contains("the greeting"));
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn oversized_line_is_a_protocol_error() {
        let (mut c, mut peer) = pair();
        let writer = thread::spawn(move || {
            let block = vec![b'x'; 1024 * 1024];
            // 17 MiB without a newline; the reader stops consuming after 16 MiB, so
            // ignore the write error once it hangs up.
            for _ in 0..17 {
                if peer.write_all(&block).is_err() {
                    return;
                }
            }
            let _ = peer.write_all(b"\n");
        });
        let err = c.read_line(soon(), "x").unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("longer than")),
            "{err}"
        );
        assert!(
            err.to_string().len() < 400,
            "excerpt must stay short: {err}"
        );
        drop(c);
        writer.join().unwrap();
    }

    #[test]
    fn oversized_line_in_one_chunk_with_newline_is_refused() {
        let (mut c, mut peer) = pair();
        let writer = thread::spawn(move || {
            let mut big = vec![b'y'; MAX_LINE + 10];
            big.push(b'\n');
            let _ = peer.write_all(&big);
        });
        assert!(matches!(c.read_line(soon(), "x"), Err(Error::Protocol(_))));
        drop(c);
        writer.join().unwrap();
    }

    #[test]
    fn line_of_exactly_max_len_is_accepted() {
        let (mut c, mut peer) = pair();
        let writer = thread::spawn(move || {
            let mut big = vec![b'z'; MAX_LINE];
            big.push(b'\n');
            peer.write_all(&big).unwrap();
            peer.write_all(b"next\n").unwrap();
        });
        assert_eq!(c.read_line(soon(), "x").unwrap().len(), MAX_LINE);
        assert_eq!(c.read_line(soon(), "x").unwrap(), b"next");
        writer.join().unwrap();
    }

    #[test]
    fn write_to_closed_peer_is_an_io_error() {
        let (mut c, peer) = pair();
        drop(peer);
        let err = c.write_all(b"{}\n", soon(), "x").unwrap_err();
        assert!(matches!(err, Error::Io { ref what, .. } if what == "test.sock: write"));
    }

    #[test]
    fn write_times_out_when_peer_does_not_read() {
        let (mut c, _peer) = pair();
        let big = vec![0u8; 64 * 1024 * 1024];
        let t0 = Instant::now();
        let err = c
            .write_all(&big, deadline_after(Duration::from_millis(100)), "sending")
            .unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn excerpt_is_short_and_escaped() {
        assert_eq!(excerpt(b"ab\"c"), "\"ab\\\"c\"");
        let long = vec![b'q'; 1000];
        let e = excerpt(&long);
        assert!(e.ends_with("... (1000 bytes)"));
        assert!(e.len() < 200);
        assert_eq!(excerpt(&[0xff, b'a']), "\"\u{fffd}a\"");
    }

    #[test]
    fn huge_timeouts_do_not_overflow() {
        let d = deadline_after(Duration::MAX);
        assert!(remaining(d).is_some());
        assert!(remaining(deadline_after(Duration::ZERO)).is_none());
    }
}
