//! The server against this crate's client and against hand-written requests, including
//! hostile ones: every bad request gets an error reply and the connection goes on,
//! except a bad magic, which closes it.

use super::*;
use crate::overlay::{CowExport, MemExport};
use crate::{Client, Error};
use std::sync::atomic::AtomicBool;

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect()
}

/// A server thread on one end of a socket pair; the other end is returned.
fn spawn(export: Arc<dyn Export>) -> (UnixStream, std::thread::JoinHandle<io::Result<()>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || Server::new(export).serve_stream(b));
    (a, t)
}

fn mem(n: usize) -> Arc<dyn Export> {
    Arc::new(MemExport(pattern(n)))
}

#[test]
fn the_client_reads_at_odd_offsets() {
    let data = pattern(3 << 20);
    let (s, t) = spawn(Arc::new(MemExport(data.clone())));
    let c = Client::from_stream(s, "", &[]).unwrap();
    assert_eq!(c.size(), data.len() as u64);
    assert!(c.read_only() && c.can_multi_conn());
    assert_eq!(c.block_size(), Some((1, 4096, 32 << 20)));
    for (off, len) in [
        (0usize, 512usize),
        (1, 1),
        (4095, 3),
        (12345, 99999),
        (0, 3 << 20),
    ] {
        let mut buf = vec![0u8; len];
        c.read(off as u64, &mut buf).unwrap();
        assert_eq!(buf, data[off..off + len], "{len} bytes at {off}");
    }
    c.disconnect().unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn unknown_export_names_are_refused_and_list_shows_the_only_one() {
    let (s, t) = spawn(mem(4096));
    match Client::from_stream(s, "nope", &[]) {
        Err(Error::Refused { reply, .. }) => assert_eq!(reply, REP_ERR_UNKNOWN),
        other => panic!("expected NBD_REP_ERR_UNKNOWN, got {:?}", other.err()),
    }
    t.join().unwrap().unwrap();
    let (s, t) = spawn(mem(4096));
    assert_eq!(crate::list_exports_on(s).unwrap(), vec![String::new()]);
    t.join().unwrap().unwrap();
    // base:allocation is the only metadata context.
    let (s, t) = spawn(mem(4096));
    assert!(matches!(
        Client::from_stream(s, "", &["qemu:dirty-bitmap:x"]),
        Err(Error::ContextNotAvailable { .. })
    ));
    t.join().unwrap().unwrap();
    let (s, t) = spawn(mem(4096));
    let c = Client::from_stream(s, "", &["base:allocation"]).unwrap();
    assert_eq!(
        c.block_status("base:allocation", 1, 4000).unwrap(),
        vec![crate::Extent {
            offset: 1,
            length: 4000,
            flags: 0
        }]
    );
    c.disconnect().unwrap();
    t.join().unwrap().unwrap();
}

/// A hand-driven connection: simple replies unless `structured`.
struct Raw {
    s: UnixStream,
    size: u64,
    flags: u16,
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    proto::encode_option(&mut b, opt, data).unwrap();
    s.write_all(&b).unwrap();
}

/// Reads one option reply: (reply type, payload).
fn opt_reply(s: &mut UnixStream, opt: u32) -> (u32, Vec<u8>) {
    let h = proto::parse_opt_reply_header(&read_n(s, 20), opt).unwrap();
    (h.reply, read_n(s, h.len as usize))
}

impl Raw {
    fn open(mut s: UnixStream) -> Raw {
        let g = read_n(&mut s, GREETING_LEN);
        assert_eq!(
            proto::parse_greeting(&g).unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        send_opt(&mut s, OPT_GO, &proto::go_data("", &[INFO_NAME]).unwrap());
        let (mut size, mut flags, mut name) = (None, 0, false);
        loop {
            let (rep, p) = opt_reply(&mut s, OPT_GO);
            match rep {
                REP_INFO => match proto::parse_rep_info(&p).unwrap() {
                    proto::Info::Export { size: z, flags: f } => (size, flags) = (Some(z), f),
                    proto::Info::Name(n) => name = n.is_empty(),
                    _ => {}
                },
                REP_ACK => break,
                r => panic!("unexpected reply {r:#x}"),
            }
        }
        assert!(name, "NBD_INFO_NAME was requested");
        Raw {
            s,
            size: size.unwrap(),
            flags,
        }
    }

    fn send(&mut self, cmd: u16, off: u64, len: u32, payload: &[u8]) {
        let mut b = Vec::new();
        proto::encode_request(&mut b, 0, cmd, 77, off, len);
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Sends a request; returns the error value and, for a successful read, the data.
    fn req(&mut self, cmd: u16, off: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        self.send(cmd, off, len, payload);
        let h = read_n(&mut self.s, 16);
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[8..], &77u64.to_be_bytes());
        let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let data = if cmd == CMD_READ && errno == 0 {
            read_n(&mut self.s, len as usize)
        } else {
            Vec::new()
        };
        (errno, data)
    }
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let data = pattern(1 << 20);
    let (s, t) = spawn(Arc::new(MemExport(data.clone())));
    let mut r = Raw::open(s);
    assert_eq!(r.size, 1 << 20);
    assert_ne!(r.flags & TFLAG_READ_ONLY, 0);
    assert_eq!(r.flags & TFLAG_SEND_WRITE_ZEROES, 0);
    let end = 1u64 << 20;
    assert_eq!(r.req(CMD_READ, end - 10, 11, &[]).0, EINVAL);
    assert_eq!(r.req(CMD_READ, end, 1, &[]).0, EINVAL);
    assert_eq!(r.req(CMD_READ, u64::MAX - 3, 8, &[]).0, EINVAL);
    assert_eq!(r.req(CMD_READ, 0, 0, &[]).0, EINVAL);
    assert_eq!(r.req(CMD_READ, 0, MAX_REQUEST + 1, &[]).0, EINVAL);
    assert_eq!(r.req(CMD_WRITE, 0, 5, b"hello").0, EPERM);
    assert_eq!(r.req(CMD_WRITE_ZEROES, 0, 4096, &[]).0, EPERM);
    assert_eq!(r.req(CMD_TRIM, 0, 4096, &[]).0, EPERM);
    assert_eq!(r.req(CMD_BLOCK_STATUS, 0, 4096, &[]).0, EINVAL);
    assert_eq!(r.req(99, 0, 4096, &[]).0, EINVAL);
    assert_eq!(r.req(CMD_FLUSH, 0, 0, &[]).0, 0);
    let (e, d) = r.req(CMD_READ, end - 10, 10, &[]);
    assert_eq!((e, &d[..]), (0, &data[data.len() - 10..]));
    // A bad magic ends the connection.
    r.s.write_all(&[0u8; REQUEST_LEN]).unwrap();
    let mut rest = Vec::new();
    r.s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let err = t.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn an_oversized_write_is_drained_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cow: Arc<dyn Export> = Arc::new(CowExport::new(mem(64 << 20), dir.path()).unwrap());
    let (s, t) = spawn(cow);
    let mut r = Raw::open(s);
    let big = vec![7u8; MAX_REQUEST as usize + 4096];
    let w = {
        let mut s2 = r.s.try_clone().unwrap();
        let big = big.clone();
        std::thread::spawn(move || {
            let mut b = Vec::new();
            proto::encode_request(&mut b, 0, CMD_WRITE, 77, 0, big.len() as u32);
            s2.write_all(&b).unwrap();
            s2.write_all(&big).unwrap();
        })
    };
    let h = read_n(&mut r.s, 16);
    w.join().unwrap();
    assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), EINVAL);
    // Out-of-range writes on a writable export: EINVAL, payload skipped.
    assert_eq!(r.req(CMD_WRITE, (64 << 20) - 2, 4, b"abcd").0, EINVAL);
    assert_eq!(r.req(CMD_READ, 0, 4, &[]).1, pattern(4));
    // DISC gets no reply; the server just ends the connection.
    r.send(CMD_DISC, 0, 0, &[]);
    t.join().unwrap().unwrap();
}

#[test]
fn writes_go_to_the_overlay_and_reads_see_them_on_every_connection() {
    let orig = pattern(8 << 20);
    let base = Arc::new(MemExport(orig.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cow = Arc::new(CowExport::new(base.clone(), dir.path()).unwrap());
    let overlay_path = cow.path().to_path_buf();
    let server = Server::new(cow.clone());
    let sock = dir.path().join("nbd.sock");
    let listener = Listener::unix(&sock).unwrap();
    assert_eq!(
        listener.uri().unwrap(),
        format!("nbd+unix:///?socket={}", sock.display())
    );
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let srv = std::thread::spawn(move || server.serve(&listener, &stop2));

    let mut r = Raw::open(UnixStream::connect(&sock).unwrap());
    assert_eq!(r.flags & TFLAG_READ_ONLY, 0);
    assert_ne!(r.flags & TFLAG_SEND_WRITE_ZEROES, 0);
    assert_eq!(r.req(CMD_WRITE, 4093, 7, b"written").0, 0);
    assert_eq!(r.req(CMD_WRITE_ZEROES, 1 << 20, 10_000, &[]).0, 0);
    assert_eq!(r.req(CMD_TRIM, 0, 4096, &[]).0, 0);
    assert_eq!(r.req(CMD_FLUSH, 0, 0, &[]).0, 0);
    assert_eq!(r.req(CMD_WRITE_ZEROES, 8 << 20, 1, &[]).0, EINVAL);

    let mut want = orig.clone();
    want[4093..4100].copy_from_slice(b"written");
    want[1 << 20..(1 << 20) + 10_000].fill(0);
    // A second connection (the crate's client, structured replies) sees the writes.
    let c = Client::connect(&crate::Addr::Unix(sock.clone()), "", &[]).unwrap();
    assert!(!c.read_only());
    let mut got = vec![0u8; want.len()];
    c.read(0, &mut got).unwrap();
    assert!(got == want, "reads merge overlay and base");
    assert_eq!(base.0, orig, "the base is never written");

    // Stopping closes idle connections, removes the socket and returns.
    stop.store(true, Ordering::SeqCst);
    srv.join().unwrap().unwrap();
    assert!(!sock.exists(), "socket file removed");
    let mut rest = Vec::new();
    let _ = r.s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert!(c.read(0, &mut [0u8; 1]).is_err());
    drop(cow);
    assert!(!overlay_path.exists(), "overlay removed");
}

#[test]
fn options_are_checked() {
    let (mut s, t) = spawn(mem(4096));
    read_n(&mut s, GREETING_LEN);
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    // Unknown options and meta contexts: ERR_UNSUP.
    send_opt(&mut s, 77, b"xyz");
    assert_eq!(opt_reply(&mut s, 77).0, REP_ERR_UNSUP);
    send_opt(&mut s, OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(opt_reply(&mut s, OPT_EXTENDED_HEADERS).0, REP_ERR_UNSUP);
    // Metadata contexts: listed; selecting one needs structured replies.
    let q = proto::meta_context_data("", &[]).unwrap();
    send_opt(&mut s, OPT_LIST_META_CONTEXT, &q);
    let (rep, p) = opt_reply(&mut s, OPT_LIST_META_CONTEXT);
    assert_eq!(rep, REP_META_CONTEXT);
    assert_eq!(&p[4..], b"base:allocation");
    assert_eq!(opt_reply(&mut s, OPT_LIST_META_CONTEXT).0, REP_ACK);
    let q = proto::meta_context_data("", &["base:allocation"]).unwrap();
    send_opt(&mut s, OPT_SET_META_CONTEXT, &q);
    assert_eq!(opt_reply(&mut s, OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    send_opt(&mut s, OPT_SET_META_CONTEXT, &q[..q.len() - 1]);
    assert_eq!(opt_reply(&mut s, OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    let q = proto::meta_context_data("other", &[]).unwrap();
    send_opt(&mut s, OPT_LIST_META_CONTEXT, &q);
    assert_eq!(opt_reply(&mut s, OPT_LIST_META_CONTEXT).0, REP_ERR_UNKNOWN);
    // Malformed GO data: ERR_INVALID.
    send_opt(&mut s, OPT_GO, &[0, 0, 0, 9, 1]);
    assert_eq!(opt_reply(&mut s, OPT_GO).0, REP_ERR_INVALID);
    let mut d = proto::go_data("", &[]).unwrap();
    d.push(0);
    send_opt(&mut s, OPT_INFO, &d);
    assert_eq!(opt_reply(&mut s, OPT_INFO).0, REP_ERR_INVALID);
    // Too much data: discarded, ERR_TOO_BIG.
    send_opt(&mut s, OPT_INFO, &vec![0u8; MAX_OPTION_DATA as usize + 1]);
    assert_eq!(opt_reply(&mut s, OPT_INFO).0, REP_ERR_TOO_BIG);
    // INFO works and leaves us in option haggling.
    send_opt(&mut s, OPT_INFO, &proto::go_data("", &[]).unwrap());
    assert_eq!(opt_reply(&mut s, OPT_INFO).0, REP_INFO);
    assert_eq!(opt_reply(&mut s, OPT_INFO).0, REP_INFO);
    assert_eq!(opt_reply(&mut s, OPT_INFO).0, REP_ACK);
    // Old-style EXPORT_NAME: size, flags, 124 zero bytes (NO_ZEROES was not asked).
    send_opt(&mut s, OPT_EXPORT_NAME, b"");
    let b = read_n(&mut s, 8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 4096);
    let mut r = Raw {
        s,
        size: 4096,
        flags: 0,
    };
    assert_eq!(r.req(CMD_READ, 0, 16, &[]).1, pattern(16));
    r.send(CMD_DISC, 0, 0, &[]);
    t.join().unwrap().unwrap();

    // ABORT is acknowledged; an unknown EXPORT_NAME hangs up.
    let (mut s, t) = spawn(mem(4096));
    read_n(&mut s, GREETING_LEN);
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    send_opt(&mut s, OPT_ABORT, &[]);
    assert_eq!(opt_reply(&mut s, OPT_ABORT).0, REP_ACK);
    t.join().unwrap().unwrap();
    let (mut s, t) = spawn(mem(4096));
    read_n(&mut s, GREETING_LEN);
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    send_opt(&mut s, OPT_EXPORT_NAME, b"other");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    t.join().unwrap().unwrap();
    // A bad option magic closes the connection with an error.
    let (mut s, t) = spawn(mem(4096));
    read_n(&mut s, GREETING_LEN);
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s.write_all(&[0u8; 16]).unwrap();
    assert!(t.join().unwrap().is_err());
}

/// Fails reads of its second half.
struct HalfBroken(MemExport);

impl Export for HalfBroken {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if off + buf.len() as u64 > self.size() / 2 {
            return Err(io::Error::other("damaged block"));
        }
        self.0.read_at(buf, off)
    }
}

#[test]
fn export_errors_become_eio_are_logged_and_the_connection_goes_on() {
    let logged = Arc::new(Mutex::new(Vec::<String>::new()));
    let l2 = logged.clone();
    let server = Server::new(Arc::new(HalfBroken(MemExport(pattern(1 << 20))))).with_log(Arc::new(
        move |m: &str| l2.lock().unwrap().push(m.to_string()),
    ));
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || server.serve_stream(b));
    let c = Client::from_stream(a, "", &[]).unwrap();
    let mut buf = vec![0u8; 4096];
    match c.read(900 << 10, &mut buf) {
        Err(Error::Server { errno, .. }) => assert_eq!(errno, EIO),
        other => panic!("expected EIO, got {other:?}"),
    }
    c.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(4096));
    c.disconnect().unwrap();
    t.join().unwrap().unwrap();
    let logged = logged.lock().unwrap();
    assert!(
        logged
            .iter()
            .any(|m| m.contains("damaged block") && m.contains("921600")),
        "{logged:?}"
    );
}
