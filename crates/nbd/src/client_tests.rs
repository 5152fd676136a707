//! The client against scripted servers: well-formed replies in awkward orders, and
//! every kind of malformed or hostile reply, each of which must become a clear error
//! (and, where the stream is no longer trustworthy, a broken connection).

use super::*;
use crate::proto::*;
use std::sync::Arc;

/// Replays `input` as the server's bytes and records what the client sends.
struct Fake {
    input: io::Cursor<Vec<u8>>,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Read for Fake {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Fake {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sent.lock().expect("sent").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Builds a server's side of a conversation.
#[derive(Clone)]
struct S(Vec<u8>);

const CTX: &str = "base:allocation";
const DIRTY: &str = "qemu:dirty-bitmap:b0";

impl S {
    fn greeting() -> S {
        let mut b = NBDMAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        S(b)
    }
    fn opt(mut self, option: u32, reply: u32, payload: &[u8]) -> S {
        self.0.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&option.to_be_bytes());
        self.0.extend_from_slice(&reply.to_be_bytes());
        self.0
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.0.extend_from_slice(payload);
        self
    }
    fn meta(self, id: u32, name: &str) -> S {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        self.opt(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &p)
    }
    fn info_export(self, size: u64) -> S {
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(
            &(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN).to_be_bytes(),
        );
        self.opt(OPT_GO, REP_INFO, &p)
    }
    fn go(self, size: u64, block: Option<(u32, u32, u32)>) -> S {
        let mut s = self.info_export(size);
        if let Some((a, b, c)) = block {
            let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [a, b, c] {
                p.extend_from_slice(&v.to_be_bytes());
            }
            s = s.opt(OPT_GO, REP_INFO, &p);
        }
        s.opt(OPT_GO, REP_ACK, &[])
    }
    /// A complete successful handshake granting `contexts` with ids 10, 11, ...
    fn handshake(size: u64, block: Option<(u32, u32, u32)>, contexts: &[&str]) -> S {
        let mut s = S::greeting().opt(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        if !contexts.is_empty() {
            for (i, c) in contexts.iter().enumerate() {
                s = s.meta(10 + i as u32, c);
            }
            s = s.opt(OPT_SET_META_CONTEXT, REP_ACK, &[]);
        }
        s.go(size, block)
    }
    fn chunk(mut self, flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> S {
        self.0
            .extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&flags.to_be_bytes());
        self.0.extend_from_slice(&kind.to_be_bytes());
        self.0.extend_from_slice(&cookie.to_be_bytes());
        self.0
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.0.extend_from_slice(payload);
        self
    }
    fn data(self, cookie: u64, done: bool, offset: u64, bytes: &[u8]) -> S {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        self.chunk(done as u16, REPLY_TYPE_OFFSET_DATA, cookie, &p)
    }
    fn hole(self, cookie: u64, done: bool, offset: u64, size: u32) -> S {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        self.chunk(done as u16, REPLY_TYPE_OFFSET_HOLE, cookie, &p)
    }
    fn none(self, cookie: u64) -> S {
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
    }
    fn err(self, cookie: u64, kind: u16, errno: u32, msg: &str, offset: Option<u64>) -> S {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        if let Some(o) = offset {
            p.extend_from_slice(&o.to_be_bytes());
        }
        self.chunk(0, kind, cookie, &p)
    }
    fn bs(self, cookie: u64, done: bool, id: u32, descs: &[(u32, u32)]) -> S {
        let mut p = id.to_be_bytes().to_vec();
        for (l, f) in descs {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        self.chunk(done as u16, REPLY_TYPE_BLOCK_STATUS, cookie, &p)
    }
    fn simple(mut self, error: u32, cookie: u64) -> S {
        self.0.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&error.to_be_bytes());
        self.0.extend_from_slice(&cookie.to_be_bytes());
        self
    }
}

/// Connects to a scripted server; returns the client, what it sent, and how much of
/// that was the handshake.
type Sent = Arc<Mutex<Vec<u8>>>;

fn connect(script: S, contexts: &[&str]) -> Result<(Client, Sent, usize)> {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        input: io::Cursor::new(script.0),
        sent: sent.clone(),
    };
    let c = Client::from_stream(fake, "", contexts)?;
    let n = sent.lock().expect("sent").len();
    Ok((c, sent, n))
}

/// Transmission requests sent after the handshake: (command, cookie, offset, length).
fn requests(sent: &Mutex<Vec<u8>>, skip: usize) -> Vec<(u16, u64, u64, u32)> {
    let b = sent.lock().expect("sent");
    b[skip..]
        .chunks(REQUEST_LEN)
        .map(|r| {
            assert_eq!(&r[..4], &REQUEST_MAGIC.to_be_bytes());
            (
                u16::from_be_bytes([r[6], r[7]]),
                u64::from_be_bytes(r[8..16].try_into().unwrap()),
                u64::from_be_bytes(r[16..24].try_into().unwrap()),
                u32::from_be_bytes(r[24..28].try_into().unwrap()),
            )
        })
        .collect()
}

fn pat(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[track_caller]
fn protocol_err<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
    match r {
        Err(Error::Protocol(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected protocol error with {needle:?}, got {other:?}"),
    }
}

#[test]
fn handshake_reports_export_and_contexts() {
    let (c, sent, n) = connect(
        S::handshake(1 << 20, Some((1, 4096, 1 << 16)), &[CTX, DIRTY]),
        &[CTX, DIRTY],
    )
    .unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert!(c.read_only() && c.can_multi_conn());
    assert_eq!(c.block_size(), Some((1, 4096, 1 << 16)));
    assert_eq!(
        c.contexts(),
        &[(CTX.to_string(), 10), (DIRTY.to_string(), 11)]
    );
    assert_eq!(c.max_request(), 1 << 16, "capped by the server's maximum");
    // Client flags, then STRUCTURED_REPLY, SET_META_CONTEXT, GO.
    let b = sent.lock().unwrap().clone();
    assert_eq!(
        &b[..4],
        &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()
    );
    assert_eq!(&b[4..12], &IHAVEOPT.to_be_bytes());
    assert_eq!(&b[12..16], &OPT_STRUCTURED_REPLY.to_be_bytes());
    drop(c);
    // Dropping says goodbye with NBD_CMD_DISC.
    assert_eq!(requests(&sent, n), vec![(CMD_DISC, 0, 0, 0)]);
}

#[test]
fn handshake_failures() {
    // Contexts: one not granted.
    let s = S::greeting()
        .opt(OPT_STRUCTURED_REPLY, REP_ACK, &[])
        .meta(1, CTX)
        .opt(OPT_SET_META_CONTEXT, REP_ACK, &[]);
    match connect(s, &[CTX, DIRTY]) {
        Err(Error::ContextNotAvailable { context, .. }) => assert_eq!(context, DIRTY),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // A context that was not asked for, or granted twice, or an id reused.
    let base = S::greeting().opt(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    protocol_err(
        connect(base.clone().meta(1, DIRTY), &[CTX]),
        "not requested",
    );
    protocol_err(
        connect(base.clone().meta(1, CTX).meta(2, CTX), &[CTX]),
        "repeats",
    );
    protocol_err(
        connect(base.clone().meta(1, CTX).meta(1, DIRTY), &[CTX, DIRTY]),
        "repeats",
    );
    protocol_err(
        connect(
            base.clone().opt(OPT_SET_META_CONTEXT, REP_INFO, &[]),
            &[CTX],
        ),
        "unexpected NBD_REP_INFO",
    );
    // Structured replies are required.
    let s = S::greeting().opt(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"old");
    assert!(
        matches!(connect(s, &[]), Err(Error::Unsupported(m)) if m.contains("NBD_OPT_STRUCTURED_REPLY"))
    );
    // NBD_OPT_GO unsupported, export unknown (with the abort sent politely after).
    let s = base.clone().opt(OPT_GO, REP_ERR_UNSUP, &[]);
    assert!(matches!(connect(s, &[]), Err(Error::Unsupported(m)) if m.contains("NBD_OPT_GO")));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        input: io::Cursor::new(
            base.clone()
                .opt(OPT_GO, REP_ERR_UNKNOWN, b"no such export")
                .0,
        ),
        sent: sent.clone(),
    };
    match Client::from_stream(fake, "x", &[]) {
        Err(
            e @ Error::Refused {
                reply: REP_ERR_UNKNOWN,
                ..
            },
        ) => {
            assert!(e.to_string().contains("no such export"), "{e}");
            assert!(e.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{e}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let b = sent.lock().unwrap().clone();
    let abort = [
        &IHAVEOPT.to_be_bytes()[..],
        &OPT_ABORT.to_be_bytes(),
        &[0, 0, 0, 0],
    ]
    .concat();
    assert!(b.ends_with(&abort), "NBD_OPT_ABORT not sent");
    // TLS required.
    let s = base.clone().opt(OPT_GO, REP_ERR_TLS_REQD, &[]);
    assert!(matches!(connect(s, &[]), Err(Error::Unsupported(m)) if m.contains("TLS")));
    // GO without NBD_INFO_EXPORT, or with a malformed one.
    protocol_err(
        connect(base.clone().opt(OPT_GO, REP_ACK, &[]), &[]),
        "without an NBD_INFO_EXPORT",
    );
    protocol_err(
        connect(base.clone().opt(OPT_GO, REP_INFO, &[0, 0, 1]), &[]),
        "NBD_INFO_EXPORT",
    );
    protocol_err(
        connect(base.clone().info_export(5).info_export(6), &[]),
        "two different",
    );
    protocol_err(
        connect(base.clone().info_export(5).opt(OPT_GO, REP_ACK, &[1]), &[]),
        "payload",
    );
    // Oversized reply, reply for another option, bad magic, EOF.
    let mut s = base.clone();
    s.0.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    s.0.extend_from_slice(&OPT_GO.to_be_bytes());
    s.0.extend_from_slice(&REP_INFO.to_be_bytes());
    s.0.extend_from_slice(&u32::MAX.to_be_bytes());
    protocol_err(connect(s, &[]), "exceeds");
    protocol_err(
        connect(base.clone().opt(OPT_LIST, REP_ACK, &[]), &[]),
        "is for NBD_OPT_LIST",
    );
    protocol_err(
        connect(S(b"NBDMAGIC but not really".to_vec()), &[]),
        "IHAVEOPT",
    );
    assert!(matches!(connect(base.clone(), &[]), Err(Error::Io { .. })));
    assert!(matches!(connect(S(vec![]), &[]), Err(Error::Io { .. })));
    // Nonsense block sizes.
    protocol_err(
        connect(base.go(1 << 20, Some((3, 4096, 1 << 20))), &[]),
        "NBD_INFO_BLOCK_SIZE",
    );
}

#[test]
fn read_reassembles_chunks_in_any_order() {
    let data = pat(1, 8192);
    let s = S::handshake(1 << 20, None, &[])
        .data(1, false, 4096, &data[4096..])
        .hole(1, false, 1024, 3072)
        .data(1, false, 0, &data[..1024])
        .none(1);
    let (c, sent, n) = connect(s, &[]).unwrap();
    let mut buf = vec![0xee; 8192];
    c.read(0, &mut buf).unwrap();
    let mut want = data.clone();
    want[1024..4096].fill(0);
    assert_eq!(buf, want);
    assert_eq!(requests(&sent, n), vec![(CMD_READ, 1, 0, 8192)]);
}

#[test]
fn read_pipelines_and_matches_cookies() {
    let data = pat(2, 12288);
    // Three requests in flight, answered out of order and interleaved.
    let s = S::handshake(1 << 20, None, &[])
        .data(3, true, 8192 + 100, &data[8192..])
        .data(1, false, 100, &data[..2000])
        .hole(2, true, 4096 + 100, 4096)
        .data(1, true, 2100, &data[2000..4096]);
    let (mut c, sent, n) = connect(s, &[]).unwrap();
    c.set_max_request(4096);
    let mut buf = vec![0xee; 12288];
    c.read(100, &mut buf).unwrap();
    let mut want = data.clone();
    want[4096..8192].fill(0);
    assert_eq!(buf, want);
    assert_eq!(
        requests(&sent, n),
        vec![
            (CMD_READ, 1, 100, 4096),
            (CMD_READ, 2, 4196, 4096),
            (CMD_READ, 3, 8292, 4096)
        ]
    );
}

#[test]
fn read_depth_limits_requests_in_flight() {
    let s = S::handshake(1 << 20, None, &[])
        .hole(1, true, 0, 512)
        .hole(2, true, 512, 512)
        .hole(3, true, 1024, 512);
    let (mut c, sent, n) = connect(s, &[]).unwrap();
    c.set_max_request(512);
    c.set_depth(2);
    let mut buf = vec![1u8; 1536];
    c.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // Cookie 3 was sent only after cookie 1 completed: with a replayed script we can
    // only see the order, which must be 1, 2, 3.
    let r = requests(&sent, n);
    assert_eq!(r.iter().map(|r| r.1).collect::<Vec<_>>(), vec![1, 2, 3]);
}

/// Runs one read of 4096 bytes at 0 against `replies` (for cookie 1) and expects a
/// protocol error mentioning `needle`, after which the client must be broken.
#[track_caller]
fn bad_read(replies: impl FnOnce(S) -> S, needle: &str) {
    let s = replies(S::handshake(1 << 20, None, &[]));
    let (c, _, _) = connect(s, &[]).unwrap();
    let mut buf = vec![0u8; 4096];
    protocol_err(c.read(0, &mut buf), needle);
    assert!(matches!(c.read(0, &mut buf), Err(Error::Broken(m)) if m.contains(needle)));
    assert!(matches!(
        c.block_status(CTX, 0, 1),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn malformed_read_replies_break_the_connection() {
    let d = pat(3, 4096);
    bad_read(
        |s| {
            s.data(1, false, 0, &d[..2048])
                .data(1, true, 1024, &d[..2048])
        },
        "overlaps",
    );
    bad_read(
        |s| s.hole(1, false, 0, 4096).hole(1, true, 0, 1),
        "overlaps",
    );
    bad_read(|s| s.data(1, true, 4000, &d[..200]), "outside");
    bad_read(|s| s.data(1, true, 0, &pat(0, 4097)), "payload length 4105");
    bad_read(
        |s| s.chunk(1, REPLY_TYPE_OFFSET_DATA, 1, &[0; 8]),
        "payload length 8",
    );
    bad_read(|s| s.hole(1, true, 8192, 10), "outside");
    bad_read(|s| s.hole(1, true, 0, 0), "hole size 0");
    bad_read(
        |s| s.chunk(1, REPLY_TYPE_OFFSET_HOLE, 1, &[0; 16]),
        "instead of 12",
    );
    bad_read(|s| s.data(2, true, 0, &d), "cookie 2");
    bad_read(|s| s.data(1, true, 0, &d[..4095]), "only 4095 bytes");
    bad_read(|s| s.none(1), "only 0 bytes");
    bad_read(|s| s.simple(0, 1), "simple reply");
    bad_read(
        |s| s.chunk(0, REPLY_TYPE_NONE, 1, &[]),
        "must be 0 and DONE",
    );
    bad_read(
        |s| s.chunk(1, REPLY_TYPE_NONE, 1, &[0]),
        "must be 0 and DONE",
    );
    bad_read(
        |s| s.bs(1, true, 10, &[(4096, 0)]),
        "unexpected NBD_REPLY_TYPE_BLOCK_STATUS",
    );
    bad_read(|s| s.chunk(1, 3, 1, &[]), "unexpected chunk type 0x3");
    bad_read(
        |s| s.err(1, REPLY_TYPE_ERROR, 0, "", None),
        "error value is 0",
    );
    bad_read(
        |s| s.err(1, REPLY_TYPE_ERROR_OFFSET, 5, "", Some(4096)),
        "outside the request",
    );
    bad_read(
        |s| s.chunk(1, REPLY_TYPE_ERROR, 1, &[0, 0, 0, 5, 0]),
        "payload length 5",
    );
    bad_read(
        |s| s.data(1, false, 0, &d).data(1, true, 0, &d[..1]),
        "overlaps",
    );
    // A chunk for a request that already finished.
    let s = S::handshake(1 << 20, None, &[])
        .data(1, true, 0, &d)
        .data(1, true, 0, &d);
    let (c, _, _) = connect(s, &[]).unwrap();
    let mut buf = vec![0u8; 4096];
    c.read(0, &mut buf).unwrap();
    protocol_err(
        c.read(0, &mut buf),
        "cookie 1, which matches no outstanding",
    );
}

#[test]
fn short_stream_is_an_io_error_then_broken() {
    let mut s = S::handshake(1 << 20, None, &[]).data(1, true, 0, &pat(4, 4096));
    s.0.truncate(s.0.len() - 100);
    let (c, _, _) = connect(s, &[]).unwrap();
    let mut buf = vec![0u8; 4096];
    match c.read(0, &mut buf) {
        Err(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            assert!(source.to_string().contains("closed"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(c.read(0, &mut buf), Err(Error::Broken(_))));
    assert!(matches!(c.disconnect(), Err(Error::Broken(_))));
}

#[test]
fn server_errors_are_reported_and_drained() {
    let d = pat(5, 4096);
    let s = S::handshake(1 << 20, None, &[])
        .data(1, true, 0, &d[..1024])
        .err(2, REPLY_TYPE_ERROR_OFFSET, EIO, "bad sector", Some(1500))
        .data(2, false, 1024, &d[..100])
        .none(2)
        .data(3, true, 2048, &d[..1024])
        // The next call works: the stream is still in step.
        .data(4, false, 0, &d[..1024])
        .err(
            4,
            REPLY_TYPE_ERROR_BIT | 0x55,
            ENOSPC,
            "future error type",
            None,
        )
        .none(4)
        .hole(5, true, 0, 100);
    let (mut c, _, _) = connect(s, &[]).unwrap();
    c.set_max_request(1024);
    let mut buf = vec![0u8; 3072];
    match c.read(0, &mut buf) {
        Err(e @ Error::Server { errno: EIO, .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("bad sector") && m.contains("EIO") && m.contains("1500"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    match c.read(0, &mut buf[..1024]) {
        Err(Error::Server {
            errno: ENOSPC,
            message,
            ..
        }) => assert_eq!(message, "future error type"),
        other => panic!("{other:?}"),
    }
    c.read(0, &mut buf[..100]).unwrap();
    assert!(buf[..100].iter().all(|&b| b == 0));
}

#[test]
fn eshutdown_disconnects() {
    let s = S::handshake(1 << 20, None, &[])
        .err(1, REPLY_TYPE_ERROR, ESHUTDOWN, "bye", None)
        .none(1);
    let (c, sent, n) = connect(s, &[]).unwrap();
    let mut buf = vec![0u8; 512];
    assert!(matches!(
        c.read(0, &mut buf),
        Err(Error::Server {
            errno: ESHUTDOWN,
            ..
        })
    ));
    assert!(matches!(c.read(0, &mut buf), Err(Error::Broken(m)) if m.contains("shutting down")));
    let r = requests(&sent, n);
    assert_eq!(r.last(), Some(&(CMD_DISC, 0, 0, 0)));
}

#[test]
fn unaligned_reads_use_whole_minimum_blocks() {
    let block = pat(6, 1024);
    let s = S::handshake(1 << 20, Some((512, 4096, 1 << 20)), &[])
        // Head block [0, 512), middle [512, 1024) direct, tail block [1024, 1536).
        .data(1, true, 0, &block[..512])
        .data(2, true, 512, &block[512..])
        .data(3, true, 1024, &block[..512]);
    let (c, sent, n) = connect(s, &[]).unwrap();
    let mut buf = vec![0u8; 1000];
    c.read(100, &mut buf).unwrap();
    let mut want = block[100..].to_vec();
    want.extend_from_slice(&block[..76]);
    assert_eq!(buf, want);
    assert_eq!(
        requests(&sent, n),
        vec![
            (CMD_READ, 1, 0, 512),
            (CMD_READ, 2, 512, 512),
            (CMD_READ, 3, 1024, 512)
        ]
    );
    // Inside one block: a single bounce.
    let s =
        S::handshake(1 << 20, Some((512, 4096, 1 << 20)), &[]).data(1, true, 512, &block[..512]);
    let (c, sent, n) = connect(s, &[]).unwrap();
    let mut buf = vec![0u8; 10];
    c.read(600, &mut buf).unwrap();
    assert_eq!(buf, block[88..98]);
    assert_eq!(requests(&sent, n), vec![(CMD_READ, 1, 512, 512)]);
}

#[test]
fn block_status_follows_partial_answers_and_clips() {
    let size = 1 << 20;
    let s = S::handshake(size, None, &[CTX, DIRTY])
        // Cookie 1 answers a prefix for both contexts (in either order).
        .bs(1, false, 11, &[(size as u32, 0)])
        .bs(1, true, 10, &[(4096, 3), (4096, 3)])
        // Cookie 2 asks for the rest; its last descriptor runs past the end.
        .bs(2, false, 10, &[(1000, 0), (size as u32, 1)])
        .bs(2, true, 11, &[(size as u32, 1)]);
    let (c, sent, n) = connect(s, &[CTX, DIRTY]).unwrap();
    let e = c.block_status(CTX, 0, size).unwrap();
    assert_eq!(
        e,
        vec![
            Extent {
                offset: 0,
                length: 8192,
                flags: 3
            },
            Extent {
                offset: 8192,
                length: 1000,
                flags: 0
            },
            Extent {
                offset: 9192,
                length: size - 9192,
                flags: 1
            },
        ]
    );
    assert_eq!(
        requests(&sent, n),
        vec![
            (CMD_BLOCK_STATUS, 1, 0, size as u32),
            (CMD_BLOCK_STATUS, 2, 8192, size as u32 - 8192)
        ]
    );
}

#[test]
fn block_status_sub_range_is_clipped_and_merged() {
    let s = S::handshake(1 << 20, Some((512, 4096, 1 << 20)), &[CTX])
        // Widened to [0, 2048) for alignment.
        .bs(1, true, 10, &[(512, 1), (512, 1), (1024, 2)]);
    let (c, sent, n) = connect(s, &[CTX]).unwrap();
    let e = c.block_status(CTX, 100, 1500).unwrap();
    assert_eq!(
        e,
        vec![
            Extent {
                offset: 100,
                length: 924,
                flags: 1
            },
            Extent {
                offset: 1024,
                length: 576,
                flags: 2
            }
        ]
    );
    assert_eq!(requests(&sent, n), vec![(CMD_BLOCK_STATUS, 1, 0, 2048)]);
}

/// One block status of 4096 bytes at 0 with contexts CTX (id 10) and DIRTY (id 11).
#[track_caller]
fn bad_status(replies: impl FnOnce(S) -> S, needle: &str) {
    let s = replies(S::handshake(
        1 << 20,
        Some((512, 4096, 1 << 20)),
        &[CTX, DIRTY],
    ));
    let (c, _, _) = connect(s, &[CTX, DIRTY]).unwrap();
    protocol_err(c.block_status(CTX, 0, 4096), needle);
    assert!(matches!(
        c.block_status(CTX, 0, 4096),
        Err(Error::Broken(_))
    ));
}

#[test]
fn malformed_block_status_breaks_the_connection() {
    let ok11 = |s: S| s.bs(1, false, 11, &[(4096, 0)]);
    bad_status(
        |s| ok11(s).bs(1, true, 12, &[(4096, 0)]),
        "never negotiated",
    );
    bad_status(|s| ok11(s).bs(1, true, 11, &[(4096, 0)]), "second chunk");
    bad_status(
        |s| s.bs(1, true, 10, &[(4096, 0)]),
        "without a chunk for context id 11",
    );
    bad_status(
        |s| ok11(s).bs(1, true, 10, &[(4096, 0), (0, 1)]),
        "length 0",
    );
    bad_status(
        |s| ok11(s).bs(1, true, 10, &[(4096, 0), (512, 1)]),
        "beyond the requested",
    );
    bad_status(|s| ok11(s).bs(1, true, 10, &[]), "positive multiple of 8");
    bad_status(
        |s| ok11(s).chunk(1, REPLY_TYPE_BLOCK_STATUS, 1, &[0; 13]),
        "positive multiple of 8",
    );
    bad_status(
        |s| ok11(s).bs(1, true, 10, &[(100, 0)]),
        "minimum block size",
    );
    bad_status(|s| ok11(s).bs(1, true, 10, &[(512, 0); 10]), "exceeds");
    bad_status(|s| s.simple(0, 1), "structured reply");
    bad_status(
        |s| s.data(1, true, 0, &[0; 16]),
        "unexpected NBD_REPLY_TYPE_OFFSET_DATA",
    );
    bad_status(
        |s| s.chunk(1, REPLY_TYPE_BLOCK_STATUS_EXT, 1, &[0; 20]),
        "BLOCK_STATUS_EXT",
    );
    bad_status(
        |s| ok11(s).bs(7, true, 10, &[(4096, 0)]),
        "matches no outstanding",
    );
}

#[test]
fn block_status_errors_keep_the_connection() {
    let s = S::handshake(1 << 20, None, &[CTX])
        .simple(EINVAL, 1)
        .err(2, REPLY_TYPE_ERROR, EIO, "cannot", None)
        .none(2)
        .bs(3, true, 10, &[(4096, 2)]);
    let (c, _, _) = connect(s, &[CTX]).unwrap();
    assert!(matches!(
        c.block_status(CTX, 0, 4096),
        Err(Error::Server { errno: EINVAL, .. })
    ));
    assert!(matches!(
        c.block_status(CTX, 0, 4096),
        Err(Error::Server { errno: EIO, .. })
    ));
    assert_eq!(
        c.block_status(CTX, 0, 4096).unwrap(),
        vec![Extent {
            offset: 0,
            length: 4096,
            flags: 2
        }]
    );
}

#[test]
fn timeouts_become_io_errors() {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let t = std::time::Instant::now();
    match Client::from_stream(a, "", &[]) {
        Err(Error::Io { source, what }) => {
            assert_eq!(source.kind(), io::ErrorKind::TimedOut, "{what}: {source}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(b);
}

#[test]
fn lists_exports() {
    let mut name = 4u32.to_be_bytes().to_vec();
    name.extend_from_slice(b"diskdescription");
    let s = S::greeting()
        .opt(OPT_LIST, REP_SERVER, &name)
        .opt(OPT_LIST, REP_SERVER, &[0, 0, 0, 0])
        .opt(OPT_LIST, REP_ACK, &[]);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let names = list_exports_on(Fake {
        input: io::Cursor::new(s.0),
        sent,
    })
    .unwrap();
    assert_eq!(names, vec!["disk".to_string(), String::new()]);
    let s = S::greeting().opt(OPT_LIST, REP_ERR_POLICY, b"not here");
    let sent = Arc::new(Mutex::new(Vec::new()));
    assert!(matches!(
        list_exports_on(Fake {
            input: io::Cursor::new(s.0),
            sent
        }),
        Err(Error::Refused {
            reply: REP_ERR_POLICY,
            ..
        })
    ));
}

#[test]
fn settings_are_clamped() {
    let (mut c, _, _) =
        connect(S::handshake(1 << 30, Some((4096, 4096, 1 << 20)), &[]), &[]).unwrap();
    c.set_max_request(0);
    assert_eq!(c.max_request(), 4096);
    c.set_max_request(10_000);
    assert_eq!(c.max_request(), 8192);
    c.set_max_request(u32::MAX);
    assert_eq!(c.max_request(), 1 << 20);
    c.set_depth(0);
    assert_eq!(c.depth(), 1);
    c.set_depth(usize::MAX);
    assert_eq!(c.depth(), MAX_DEPTH);
    let (mut c, _, _) = connect(S::handshake(1 << 30, None, &[]), &[]).unwrap();
    c.set_max_request(u32::MAX);
    assert_eq!(c.max_request(), DEFAULT_MAX_BLOCK);
    let mut b = [0u8; 1];
    assert!(matches!(
        c.read(1 << 30, &mut b),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.block_status(CTX, 0, 1),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn client_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Client>();
}
