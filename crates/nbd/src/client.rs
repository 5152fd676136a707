//! The connection: handshake, pipelined reads and block status over one socket.

use crate::proto::{self, ChunkError, Coverage, Info, ReplyHeader};
use crate::{Addr, Error, Extent, Result, merge_extents, protocol};
use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Requests in flight per call unless changed with [`Client::set_depth`]: enough to
/// hide the round trip on a local socket without queueing much in QEMU.
pub const DEFAULT_DEPTH: usize = 16;
/// Largest read request unless changed with [`Client::set_max_request`].
pub const DEFAULT_MAX_REQUEST: u32 = 2 << 20;
/// Largest block status request: QEMU and the spec handle 32-bit lengths, but staying
/// below 2 GiB avoids servers that treat lengths as signed.
pub const MAX_BLOCK_STATUS_REQUEST: u32 = (1 << 31) - 1;
/// Socket read/write timeout used by [`Client::connect`] and [`list_exports`]: a
/// server that stops answering must fail the backup, not hang it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Without advertised block sizes, the spec tells clients to keep reads within 32 MiB.
const DEFAULT_MAX_BLOCK: u32 = 32 << 20;
/// Upper bound on `set_depth`, so a caller's typo cannot queue unbounded state.
const MAX_DEPTH: usize = 1024;
/// Option replies accepted for one option (NBD_REP_INFO, NBD_REP_SERVER, ...): a
/// server streaming endless replies must not grow our memory without bound.
const MAX_OPTION_REPLIES: usize = 10_000;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One socket and the state of the stream on it.
struct Conn {
    io: BufReader<Box<dyn Stream>>,
    /// Why the stream can no longer be trusted, once something went wrong.
    broken: Option<String>,
    next_cookie: u64,
    wbuf: Vec<u8>,
    timeout: Option<Duration>,
}

impl Conn {
    fn new(stream: Box<dyn Stream>, timeout: Option<Duration>) -> Conn {
        Conn {
            io: BufReader::with_capacity(64 << 10, stream),
            broken: None,
            next_cookie: 1,
            wbuf: Vec::new(),
            timeout,
        }
    }

    /// Wraps an I/O error with what was being done, turning the cryptic kinds a
    /// timeout or a closed socket produce into plain words.
    fn io_err(&self, what: &str, e: io::Error) -> Error {
        let source = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                match self.timeout {
                    Some(t) => format!("server did not respond within {t:?}"),
                    None => "timed out".to_string(),
                },
            ),
            io::ErrorKind::UnexpectedEof => {
                io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection")
            }
            _ => e,
        };
        Error::Io {
            what: what.to_string(),
            source,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.io.read_exact(buf).map_err(|e| self.io_err(what, e))
    }

    fn read_vec(&mut self, len: usize, what: &str) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_exact(&mut v, what)?;
        Ok(v)
    }

    /// Sends what was queued in `wbuf`.
    fn flush_wbuf(&mut self, what: &str) -> Result<()> {
        let r = self
            .io
            .get_mut()
            .write_all(&self.wbuf)
            .and_then(|()| self.io.get_mut().flush());
        self.wbuf.clear();
        r.map_err(|e| self.io_err(what, e))
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        c
    }

    // ---- handshake ----

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.wbuf.clear();
        proto::encode_option(&mut self.wbuf, option, data)?;
        self.flush_wbuf(&format!("sending {}", proto::opt_name(option)))
    }

    /// Reads one option reply (header and capped payload).
    fn read_opt_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let what = format!("reading reply to {}", proto::opt_name(option));
        let mut h = [0u8; proto::OPT_REPLY_HEADER_LEN];
        self.read_exact(&mut h, &what)?;
        let h = proto::parse_opt_reply_header(&h, option)?;
        let payload = self.read_vec(h.len as usize, &what)?;
        Ok((h.reply, payload))
    }

    /// Turns an error reply into the matching error; `what` describes the request.
    fn opt_error(option: u32, reply: u32, payload: &[u8], what: &str) -> Error {
        let message = proto::message_text(payload);
        match reply {
            proto::REP_ERR_UNSUP => Error::Unsupported(format!(
                "{what}: server does not support {}{}",
                proto::opt_name(option),
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            )),
            proto::REP_ERR_TLS_REQD => Error::Unsupported(format!(
                "{what}: server requires TLS, which this client does not support{}",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            )),
            _ => Error::Refused {
                what: what.to_string(),
                reply,
                message,
            },
        }
    }

    fn expect_ack(&mut self, option: u32, what: &str) -> Result<()> {
        let (reply, payload) = self.read_opt_reply(option)?;
        match reply {
            proto::REP_ACK if payload.is_empty() => Ok(()),
            proto::REP_ACK => protocol(format!(
                "NBD_REP_ACK to {} carries {} bytes of payload",
                proto::opt_name(option),
                payload.len()
            )),
            r if r & proto::REP_ERR_BIT != 0 => Err(Self::opt_error(option, r, &payload, what)),
            r => protocol(format!(
                "unexpected {} in reply to {}",
                proto::rep_name(r),
                proto::opt_name(option)
            )),
        }
    }

    /// Reads the greeting and sends our flags. NO_ZEROES only matters for
    /// NBD_OPT_EXPORT_NAME, which is never sent, but is echoed as the spec expects.
    fn greet(&mut self) -> Result<()> {
        let mut g = [0u8; proto::GREETING_LEN];
        self.read_exact(&mut g, "reading server greeting")?;
        let flags = proto::parse_greeting(&g)?;
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if flags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        self.wbuf.clear();
        self.wbuf.extend_from_slice(&cflags.to_be_bytes());
        self.flush_wbuf("sending client flags")
    }

    /// The negotiation after the greeting: structured replies, meta contexts, GO.
    fn negotiate(&mut self, export: &str, contexts: &[&str]) -> Result<Negotiated> {
        self.send_option(proto::OPT_STRUCTURED_REPLY, &[])?;
        self.expect_ack(
            proto::OPT_STRUCTURED_REPLY,
            "negotiating structured replies",
        )?;

        let granted = if contexts.is_empty() {
            Vec::new()
        } else {
            self.set_meta_context(export, contexts)?
        };

        let data = proto::go_data(export, &[proto::INFO_EXPORT, proto::INFO_BLOCK_SIZE])?;
        self.send_option(proto::OPT_GO, &data)?;
        let what = format!("opening export {export:?} (NBD_OPT_GO)");
        let mut export_info: Option<(u64, u16)> = None;
        let mut block_size = None;
        for _ in 0..MAX_OPTION_REPLIES {
            let (reply, payload) = self.read_opt_reply(proto::OPT_GO)?;
            match reply {
                proto::REP_INFO => match proto::parse_rep_info(&payload)? {
                    Info::Export { size, flags } => {
                        if export_info.is_some_and(|e| e != (size, flags)) {
                            return protocol(format!(
                                "NBD_OPT_GO: two different NBD_INFO_EXPORT replies ({export_info:?}, then size {size}, flags {flags:#x})"
                            ));
                        }
                        export_info = Some((size, flags));
                    }
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        block_size = Some((min, preferred, max));
                    }
                    Info::Name(_) | Info::Description(_) | Info::Unknown(_) => {}
                },
                proto::REP_ACK => {
                    if !payload.is_empty() {
                        return protocol(format!(
                            "NBD_REP_ACK to NBD_OPT_GO carries {} bytes of payload",
                            payload.len()
                        ));
                    }
                    let Some((size, flags)) = export_info else {
                        return protocol("NBD_OPT_GO succeeded without an NBD_INFO_EXPORT reply");
                    };
                    return Ok(Negotiated {
                        size,
                        flags,
                        block_size,
                        contexts: granted,
                    });
                }
                proto::REP_ERR_UNSUP => {
                    return Err(Error::Unsupported(format!(
                        "{what}: server does not support NBD_OPT_GO (only the old NBD_OPT_EXPORT_NAME, which cannot report errors or block sizes); upgrade the server"
                    )));
                }
                r if r & proto::REP_ERR_BIT != 0 => {
                    return Err(Self::opt_error(proto::OPT_GO, r, &payload, &what));
                }
                r => {
                    return protocol(format!(
                        "unexpected {} in reply to NBD_OPT_GO",
                        proto::rep_name(r)
                    ));
                }
            }
        }
        protocol(format!(
            "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO"
        ))
    }

    fn set_meta_context(&mut self, export: &str, contexts: &[&str]) -> Result<Vec<(String, u32)>> {
        for (i, c) in contexts.iter().enumerate() {
            if !c.contains(':') || c.starts_with(':') {
                return Err(Error::InvalidArgument(format!(
                    "metadata context {c:?} is not namespace:name"
                )));
            }
            if contexts[..i].contains(c) {
                return Err(Error::InvalidArgument(format!(
                    "metadata context {c:?} requested twice"
                )));
            }
        }
        let data = proto::meta_context_data(export, contexts)?;
        self.send_option(proto::OPT_SET_META_CONTEXT, &data)?;
        let what = format!("selecting metadata contexts {contexts:?} on export {export:?}");
        let mut granted: Vec<(String, u32)> = Vec::new();
        loop {
            let (reply, payload) = self.read_opt_reply(proto::OPT_SET_META_CONTEXT)?;
            match reply {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::parse_rep_meta_context(&payload)?;
                    if !contexts.contains(&name.as_str()) {
                        return protocol(format!(
                            "NBD_OPT_SET_META_CONTEXT: server granted {name:?} (id {id}), which was not requested"
                        ));
                    }
                    if let Some((n, i)) = granted.iter().find(|(n, i)| *n == name || *i == id) {
                        return protocol(format!(
                            "NBD_OPT_SET_META_CONTEXT: {name:?} with id {id} repeats {n:?} with id {i}"
                        ));
                    }
                    granted.push((name, id));
                }
                proto::REP_ACK => {
                    if !payload.is_empty() {
                        return protocol(
                            "NBD_REP_ACK to NBD_OPT_SET_META_CONTEXT carries a payload",
                        );
                    }
                    if let Some(missing) = contexts
                        .iter()
                        .find(|c| !granted.iter().any(|(n, _)| n == *c))
                    {
                        return Err(Error::ContextNotAvailable {
                            context: missing.to_string(),
                            export: export.to_string(),
                        });
                    }
                    return Ok(granted);
                }
                r if r & proto::REP_ERR_BIT != 0 => {
                    return Err(Self::opt_error(
                        proto::OPT_SET_META_CONTEXT,
                        r,
                        &payload,
                        &what,
                    ));
                }
                r => {
                    return protocol(format!(
                        "unexpected {} in reply to NBD_OPT_SET_META_CONTEXT",
                        proto::rep_name(r)
                    ));
                }
            }
        }
    }

    /// Ends option haggling politely (the spec asks clients to, except after a
    /// protocol violation). Best effort: the connection is dropped right after.
    fn abort_options(&mut self) {
        if self.send_option(proto::OPT_ABORT, &[]).is_ok() {
            let _ = self.read_opt_reply(proto::OPT_ABORT);
        }
    }

    // ---- transmission ----

    fn read_reply_header(&mut self) -> Result<ReplyHeader> {
        let mut h = [0u8; proto::STRUCTURED_HEADER_LEN];
        self.read_exact(&mut h[..4], "reading reply header")?;
        let n = proto::reply_kind(&h[..4])?.header_len();
        self.read_exact(&mut h[4..n], "reading reply header")?;
        proto::parse_reply_header(&h[..n])
    }

    /// Reads an error chunk's payload (bounded) and parses it.
    fn read_error_chunk(&mut self, kind: u16, len: u32, cookie: u64) -> Result<ChunkError> {
        if !(6..=proto::MAX_ERROR_CHUNK).contains(&len) {
            return protocol(format!(
                "{} for cookie {cookie}: payload length {len} outside 6..={}",
                proto::chunk_name(kind),
                proto::MAX_ERROR_CHUNK
            ));
        }
        let p = self.read_vec(len as usize, "reading error chunk")?;
        proto::parse_error_chunk(kind, &p)
    }

    /// Pipelined reads of `buf.len()` bytes at `offset` in requests of at most
    /// `max_req` bytes, `depth` at a time. Requests are aligned as the caller made them.
    fn read_pipelined(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        max_req: u32,
        depth: usize,
    ) -> Result<()> {
        let mut op = ReadOp {
            offset,
            total: buf.len(),
            buf,
            max_req: (max_req as usize).max(1),
            next: 0,
        };
        self.pipelined(&mut op, depth)
    }

    /// Pipelined block status for one context over [`offset`, `offset + length`), in
    /// requests of at most `max_req` bytes; a request the server answered only in part
    /// is re-issued for the rest. Returns extents in order, not yet merged or clipped.
    #[allow(clippy::too_many_arguments)]
    fn block_status_pipelined(
        &mut self,
        want_id: u32,
        all_ids: &[u32],
        offset: u64,
        length: u64,
        max_req: u32,
        depth: usize,
        min_block: u32,
    ) -> Result<Vec<Extent>> {
        let end = offset
            .checked_add(length)
            .ok_or_else(|| Error::InvalidArgument("block status range overflows".into()))?;
        let mut queue: VecDeque<(u64, u32)> = VecDeque::new();
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(u64::from(max_req)) as u32;
            queue.push_back((pos, n));
            pos += u64::from(n);
        }
        let mut op = BlockStatusOp {
            want_id,
            all_ids,
            min_block,
            queue,
            done: Vec::new(),
        };
        self.pipelined(&mut op, depth)?;
        tile(op.done, offset, end)
    }

    /// The pipelined request/reply dispatch every command shares: keeps up to `depth`
    /// requests of `op` in flight, matches each reply to its request by cookie, checks
    /// the chunks all commands know (NONE, errors) and hands the others to `op`. A
    /// server error for one request is returned once the others are drained (the
    /// stream stays in step); anything malformed is returned at once.
    fn pipelined<P: Pipeline>(&mut self, op: &mut P, depth: usize) -> Result<()> {
        let mut inflight: HashMap<u64, Inflight<P::State>> = HashMap::new();
        let mut first_err: Option<Error> = None;
        loop {
            self.wbuf.clear();
            while first_err.is_none() && inflight.len() < depth {
                let Some((offset, len, state)) = op.next_request()? else {
                    break;
                };
                let cookie = self.cookie();
                proto::encode_request(&mut self.wbuf, 0, P::CMD, cookie, offset, len);
                let req = Inflight {
                    offset,
                    len,
                    err: None,
                    state,
                };
                inflight.insert(cookie, req);
            }
            if !self.wbuf.is_empty() {
                self.flush_wbuf(P::SENDING)?;
            }
            if inflight.is_empty() {
                break;
            }
            let header = self.read_reply_header()?;
            let (flags, kind, cookie, len) = match header {
                ReplyHeader::Simple { error, cookie } => {
                    let what = inflight.get(&cookie).map(|r| op.describe(r.offset, r.len));
                    // A simple reply is final: it answers the whole request.
                    first_err.get_or_insert(op.simple_reply(&header, error, cookie, what)?);
                    inflight.remove(&cookie);
                    continue;
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    cookie,
                    len,
                } => (flags, kind, cookie, len),
            };
            let Some(req) = inflight.get_mut(&cookie) else {
                return Err(op.unmatched(&header, kind, cookie));
            };
            let what = op.describe(req.offset, req.len);
            match kind {
                proto::REPLY_TYPE_NONE => {
                    if len != 0 || flags & proto::REPLY_FLAG_DONE == 0 {
                        return protocol(format!(
                            "NBD_REPLY_TYPE_NONE for {what}: length {len}, flags {flags:#x} (must be 0 and DONE)"
                        ));
                    }
                }
                k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = self.read_error_chunk(k, len, cookie)?;
                    if let Some(o) = e.offset
                        && !(o >= req.offset && o - req.offset < u64::from(req.len))
                    {
                        return protocol(format!(
                            "NBD_REPLY_TYPE_ERROR_OFFSET for {what}: offset {o} outside the request"
                        ));
                    }
                    if req.err.is_none() {
                        req.err = Some(Error::Server {
                            what: P::failed(what, e.offset),
                            errno: e.errno,
                            message: e.message,
                        });
                    }
                }
                k => {
                    if !op.chunk(self, req, k, len, &what)? {
                        return protocol(format!(
                            "unexpected {} (length {len}) in reply to {what}",
                            proto::chunk_name(k)
                        ));
                    }
                }
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                let Some(req) = inflight.remove(&cookie) else {
                    return protocol("internal: finished request vanished");
                };
                match req.err {
                    Some(e) => {
                        first_err.get_or_insert(e);
                    }
                    None => op.finished(req)?,
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn send_disc(&mut self) -> Result<()> {
        self.wbuf.clear();
        proto::encode_request(&mut self.wbuf, 0, proto::CMD_DISC, 0, 0, 0);
        self.flush_wbuf("sending NBD_CMD_DISC")
    }
}

/// Checks a content chunk lies inside its request and does not overlap earlier ones;
/// returns its position relative to the request.
fn place(
    cov: &mut Coverage,
    req_off: u64,
    chunk_off: u64,
    len: u64,
    name: &str,
    what: &str,
) -> Result<u64> {
    let rel = chunk_off.checked_sub(req_off).ok_or_else(|| {
        Error::Protocol(format!(
            "{name} for {what}: chunk offset {chunk_off} is before the request"
        ))
    })?;
    cov.add(rel, len).map_err(|m| {
        Error::Protocol(format!(
            "{name} for {what}: chunk at offset {chunk_off}: {m}"
        ))
    })?;
    Ok(rel)
}

/// One request of a pipelined command while it is in flight.
struct Inflight<S> {
    offset: u64,
    len: u32,
    /// The server's first error chunk for it, returned once the request is DONE.
    err: Option<Error>,
    /// What the command keeps per request.
    state: S,
}

/// What a pipelined command (`NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS`) adds to the
/// dispatch they share ([`Conn::pipelined`]): its requests, how it names them, the
/// content chunks it expects and what a finished request means.
trait Pipeline {
    /// Per-request state.
    type State;
    const CMD: u16;
    /// What sending requests is called in I/O errors.
    const SENDING: &'static str;
    /// The next request to send as `(offset, length, state)`; `None`: none for now.
    fn next_request(&mut self) -> Result<Option<(u64, u32, Self::State)>>;
    /// How errors name a request.
    fn describe(&self, offset: u64, len: u32) -> String;
    /// A simple reply (`what`: the request it answers, if any): `Ok` is the server's
    /// error for the request, which ends it; `Err` breaks the connection.
    fn simple_reply(
        &self,
        header: &ReplyHeader,
        error: u32,
        cookie: u64,
        what: Option<String>,
    ) -> Result<Error>;
    /// The error for a chunk whose cookie matches no request in flight.
    fn unmatched(&self, header: &ReplyHeader, kind: u16, cookie: u64) -> Error;
    /// The `what` of the [`Error::Server`] an error chunk becomes.
    fn failed(what: String, offset: Option<u64>) -> String {
        let _ = offset;
        what
    }
    /// Reads a content chunk of `kind` and `len` payload bytes for `req`; `false`
    /// when the command expects no such chunk (nothing was read).
    fn chunk(
        &mut self,
        conn: &mut Conn,
        req: &mut Inflight<Self::State>,
        kind: u16,
        len: u32,
        what: &str,
    ) -> Result<bool>;
    /// A request ended (DONE) without an error chunk.
    fn finished(&mut self, req: Inflight<Self::State>) -> Result<()>;
}

/// Reads into `buf`, which holds the export's bytes from `offset`.
struct ReadOp<'a> {
    offset: u64,
    buf: &'a mut [u8],
    total: usize,
    max_req: usize,
    /// Position in `buf` of the next request's first byte.
    next: usize,
}

/// A read request's state: where its bytes go in `buf` and which it has received.
struct ReadState {
    at: usize,
    cov: Coverage,
}

impl ReadOp<'_> {
    /// The part of `buf` a chunk of `n` bytes at `rel` in request `req` fills.
    fn dest(
        &mut self,
        req: &Inflight<ReadState>,
        rel: u64,
        n: u64,
        name: &str,
        what: &str,
    ) -> Result<&mut [u8]> {
        let (at, rel, n) = (req.state.at, rel as usize, n as usize);
        at.checked_add(rel)
            .and_then(|s| self.buf.get_mut(s..s.checked_add(n)?))
            .ok_or_else(|| Error::Protocol(format!("{name} for {what}: out of range")))
    }
}

impl Pipeline for ReadOp<'_> {
    type State = ReadState;
    const CMD: u16 = proto::CMD_READ;
    const SENDING: &'static str = "sending read requests";

    fn next_request(&mut self) -> Result<Option<(u64, u32, ReadState)>> {
        if self.next >= self.total {
            return Ok(None);
        }
        let n = self.max_req.min(self.total - self.next);
        let off = self
            .offset
            .checked_add(self.next as u64)
            .ok_or_else(|| Error::InvalidArgument("read offset overflows".into()))?;
        let state = ReadState {
            at: self.next,
            cov: Coverage::new(n as u64),
        };
        self.next += n;
        // n <= max_req <= u32::MAX
        Ok(Some((off, n as u32, state)))
    }

    fn describe(&self, offset: u64, len: u32) -> String {
        format!("read of {len} bytes at offset {offset}")
    }

    fn simple_reply(
        &self,
        _header: &ReplyHeader,
        error: u32,
        cookie: u64,
        what: Option<String>,
    ) -> Result<Error> {
        let known = if what.is_some() { "" } else { "unknown " };
        protocol(format!(
            "simple reply (error {error}) to NBD_CMD_READ with {known}cookie {cookie}, although structured replies were negotiated"
        ))
    }

    fn unmatched(&self, _header: &ReplyHeader, kind: u16, cookie: u64) -> Error {
        Error::Protocol(format!(
            "{} for cookie {cookie}, which matches no outstanding read",
            proto::chunk_name(kind)
        ))
    }

    fn failed(what: String, offset: Option<u64>) -> String {
        match offset {
            Some(o) => format!("{what} (failed at offset {o})"),
            None => what,
        }
    }

    fn chunk(
        &mut self,
        conn: &mut Conn,
        req: &mut Inflight<ReadState>,
        kind: u16,
        len: u32,
        what: &str,
    ) -> Result<bool> {
        match kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                const NAME: &str = "NBD_REPLY_TYPE_OFFSET_DATA";
                let data_len = u64::from(len)
                    .checked_sub(8)
                    .filter(|&d| d > 0 && d <= u64::from(req.len));
                let Some(data_len) = data_len else {
                    return protocol(format!(
                        "{NAME} for {what}: payload length {len} must be 9..={}",
                        u64::from(req.len) + 8
                    ));
                };
                let mut o = [0u8; 8];
                conn.read_exact(&mut o, "reading NBD_REPLY_TYPE_OFFSET_DATA")?;
                let chunk_off = proto::parse_offset_data_header(&o)?;
                let rel = place(
                    &mut req.state.cov,
                    req.offset,
                    chunk_off,
                    data_len,
                    NAME,
                    what,
                )?;
                let dst = self.dest(req, rel, data_len, NAME, what)?;
                conn.read_exact(dst, "reading NBD_REPLY_TYPE_OFFSET_DATA payload")?;
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                const NAME: &str = "NBD_REPLY_TYPE_OFFSET_HOLE";
                if len != 12 {
                    return protocol(format!(
                        "{NAME} for {what}: payload length {len} instead of 12"
                    ));
                }
                let p = conn.read_vec(12, "reading NBD_REPLY_TYPE_OFFSET_HOLE")?;
                let (chunk_off, size) = proto::parse_offset_hole(&p)?;
                let size = u64::from(size);
                let rel = place(&mut req.state.cov, req.offset, chunk_off, size, NAME, what)?;
                self.dest(req, rel, size, NAME, what)?.fill(0);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finished(&mut self, req: Inflight<ReadState>) -> Result<()> {
        if !req.state.cov.is_complete() {
            return protocol(format!(
                "read of {} bytes at offset {} finished (DONE) with only {} bytes covered by data and hole chunks",
                req.len,
                req.offset,
                req.state.cov.covered()
            ));
        }
        Ok(())
    }
}

/// Block status for one context (`want_id`) of those negotiated (`all_ids`).
struct BlockStatusOp<'a> {
    want_id: u32,
    all_ids: &'a [u32],
    min_block: u32,
    /// Requests still to send: `(offset, length)`.
    queue: VecDeque<(u64, u32)>,
    /// Finished requests: their offset and the wanted context's extents.
    done: Vec<(u64, Vec<Extent>)>,
}

/// A block status request's state: the context ids answered so far, and the wanted
/// context's extents once they came.
#[derive(Default)]
struct StatusState {
    seen: Vec<u32>,
    got: Option<Vec<Extent>>,
}

impl Pipeline for BlockStatusOp<'_> {
    type State = StatusState;
    const CMD: u16 = proto::CMD_BLOCK_STATUS;
    const SENDING: &'static str = "sending block status requests";

    fn next_request(&mut self) -> Result<Option<(u64, u32, StatusState)>> {
        Ok(self
            .queue
            .pop_front()
            .map(|(off, len)| (off, len, StatusState::default())))
    }

    fn describe(&self, offset: u64, len: u32) -> String {
        format!("block status of {len} bytes at offset {offset}")
    }

    fn simple_reply(
        &self,
        header: &ReplyHeader,
        error: u32,
        cookie: u64,
        what: Option<String>,
    ) -> Result<Error> {
        let Some(what) = what else {
            return Err(self.unmatched(header, 0, cookie));
        };
        if error == 0 {
            return protocol(format!(
                "simple reply without error to {what}: block status needs a structured reply"
            ));
        }
        Ok(Error::Server {
            what,
            errno: error,
            message: String::new(),
        })
    }

    fn unmatched(&self, header: &ReplyHeader, _kind: u16, _cookie: u64) -> Error {
        Error::Protocol(format!(
            "reply {header:?} matches no outstanding block status request"
        ))
    }

    fn chunk(
        &mut self,
        conn: &mut Conn,
        req: &mut Inflight<StatusState>,
        kind: u16,
        len: u32,
        what: &str,
    ) -> Result<bool> {
        if kind != proto::REPLY_TYPE_BLOCK_STATUS {
            return Ok(false);
        }
        let cap = proto::max_block_status_payload(req.len, self.min_block);
        if u64::from(len) > cap {
            return protocol(format!(
                "NBD_REPLY_TYPE_BLOCK_STATUS for {what}: payload length {len} exceeds {cap} (more descriptors than the range can hold)"
            ));
        }
        let p = conn.read_vec(len as usize, "reading NBD_REPLY_TYPE_BLOCK_STATUS")?;
        let (id, descs) = proto::parse_block_status(&p)?;
        if !self.all_ids.contains(&id) {
            return protocol(format!(
                "NBD_REPLY_TYPE_BLOCK_STATUS for {what}: context id {id} was never negotiated (have {:?})",
                self.all_ids
            ));
        }
        if req.state.seen.contains(&id) {
            return protocol(format!(
                "NBD_REPLY_TYPE_BLOCK_STATUS for {what}: second chunk for context id {id}"
            ));
        }
        req.state.seen.push(id);
        let extents = proto::descriptors_to_extents(req.offset, req.len, &descs)?;
        if id == self.want_id {
            req.state.got = Some(extents);
        }
        Ok(true)
    }

    fn finished(&mut self, req: Inflight<StatusState>) -> Result<()> {
        if let Some(missing) = self.all_ids.iter().find(|i| !req.state.seen.contains(i)) {
            return protocol(format!(
                "block status of {} bytes at offset {} finished (DONE) without a chunk for context id {missing}",
                req.len, req.offset
            ));
        }
        let Some(extents) = req.state.got else {
            return protocol("internal: wanted context seen but not kept");
        };
        let covered: u64 = extents.iter().map(|e| e.length).sum();
        if covered < u64::from(req.len) {
            let rest = req.offset + covered;
            if !rest.is_multiple_of(u64::from(self.min_block.max(1))) {
                return protocol(format!(
                    "block status of {} bytes at offset {} answered {covered} bytes, not a multiple of the minimum block size {}",
                    req.len, req.offset, self.min_block
                ));
            }
            // The server may answer a prefix; ask again for the rest, first.
            self.queue.push_front((rest, req.len - covered as u32));
        }
        self.done.push((req.offset, extents));
        Ok(())
    }
}

/// Puts the finished block status answers in order and checks they tile
/// [`offset`, `end`) exactly.
fn tile(mut done: Vec<(u64, Vec<Extent>)>, offset: u64, end: u64) -> Result<Vec<Extent>> {
    done.sort_by_key(|(o, _)| *o);
    let mut out: Vec<Extent> = Vec::new();
    let mut expect = offset;
    for (_, extents) in done {
        for e in extents {
            if e.offset != expect {
                return protocol(format!(
                    "block status answers do not tile the range: extent at {} where {expect} was expected",
                    e.offset
                ));
            }
            expect = e.end();
            out.push(e);
        }
    }
    if expect != end {
        return protocol(format!(
            "block status answers end at {expect} instead of {end}"
        ));
    }
    Ok(out)
}

struct Negotiated {
    size: u64,
    flags: u16,
    block_size: Option<(u32, u32, u32)>,
    contexts: Vec<(String, u32)>,
}

/// One NBD connection to one export.
///
/// Safe to share between threads: calls take turns on the socket (one call's requests
/// are pipelined, different calls are not interleaved). Open several clients for
/// parallel streams when [`Client::can_multi_conn`] says the server allows it.
pub struct Client {
    conn: Mutex<Conn>,
    export: String,
    size: u64,
    flags: u16,
    block_size: Option<(u32, u32, u32)>,
    contexts: Vec<(String, u32)>,
    depth: usize,
    max_request: u32,
    /// Set once NBD_CMD_DISC was sent, so Drop does not send it again.
    closed: bool,
}

fn connect_stream(addr: &Addr, timeout: Option<Duration>) -> Result<Box<dyn Stream>> {
    let what = format!("connecting to NBD server at {addr}");
    let io_err = |e: io::Error| Error::Io {
        what: what.clone(),
        source: e,
    };
    match addr {
        Addr::Unix(path) => {
            let s = UnixStream::connect(path).map_err(io_err)?;
            s.set_read_timeout(timeout).map_err(io_err)?;
            s.set_write_timeout(timeout).map_err(io_err)?;
            Ok(Box::new(s))
        }
        Addr::Tcp(hostport) => {
            let addrs = hostport.to_socket_addrs().map_err(io_err)?;
            let mut last =
                io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address");
            for a in addrs {
                let r = match timeout {
                    Some(t) => TcpStream::connect_timeout(&a, t),
                    None => TcpStream::connect(a),
                };
                match r {
                    Ok(s) => {
                        s.set_read_timeout(timeout).map_err(io_err)?;
                        s.set_write_timeout(timeout).map_err(io_err)?;
                        // Requests are small; Nagle would hold them back.
                        s.set_nodelay(true).map_err(io_err)?;
                        return Ok(Box::new(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(io_err(last))
        }
    }
}

fn check_timeout(timeout: Duration) -> Result<()> {
    if timeout.is_zero() {
        return Err(Error::InvalidArgument("timeout must be nonzero".into()));
    }
    Ok(())
}

impl Client {
    /// Connects, does the fixed-newstyle handshake, negotiates structured replies
    /// (required), selects `contexts` with NBD_OPT_SET_META_CONTEXT (each must be
    /// granted, else [`Error::ContextNotAvailable`]) and enters transmission with
    /// NBD_OPT_GO, asking for the export size and block size constraints. Socket
    /// operations time out after [`DEFAULT_TIMEOUT`].
    pub fn connect(addr: &Addr, export: &str, contexts: &[&str]) -> Result<Client> {
        Self::connect_timeout(addr, export, contexts, DEFAULT_TIMEOUT)
    }

    /// [`Client::connect`] with the given socket connect/read/write timeout.
    pub fn connect_timeout(
        addr: &Addr,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
    ) -> Result<Client> {
        check_timeout(timeout)?;
        let stream = connect_stream(addr, Some(timeout))?;
        Self::handshake(Conn::new(stream, Some(timeout)), export, contexts)
    }

    /// Runs the handshake over an already connected stream (a tunnel, a test double,
    /// a fuzzer's bytes). Timeouts, if wanted, are the stream's business.
    pub fn from_stream<S: Read + Write + Send + 'static>(
        stream: S,
        export: &str,
        contexts: &[&str],
    ) -> Result<Client> {
        Self::handshake(Conn::new(Box::new(stream), None), export, contexts)
    }

    fn handshake(mut conn: Conn, export: &str, contexts: &[&str]) -> Result<Client> {
        conn.greet()?;
        let n = match conn.negotiate(export, contexts) {
            Ok(n) => n,
            Err(e) => {
                if !e.breaks_connection() {
                    conn.abort_options();
                }
                return Err(e);
            }
        };
        let mut client = Client {
            conn: Mutex::new(conn),
            export: export.to_string(),
            size: n.size,
            flags: n.flags,
            block_size: n.block_size,
            contexts: n.contexts,
            depth: DEFAULT_DEPTH,
            max_request: DEFAULT_MAX_REQUEST,
            closed: false,
        };
        client.set_max_request(DEFAULT_MAX_REQUEST);
        Ok(client)
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export name this connection was opened with.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Transmission flags from NBD_INFO_EXPORT (`proto::TFLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    pub fn read_only(&self) -> bool {
        self.flags & proto::TFLAG_READ_ONLY != 0
    }

    /// Whether the server allows several connections to the same export to be used
    /// together (for parallel reads from several clients).
    pub fn can_multi_conn(&self) -> bool {
        self.flags & proto::TFLAG_CAN_MULTI_CONN != 0
    }

    /// Minimum, preferred and maximum block size, if the server advertised them.
    pub fn block_size(&self) -> Option<(u32, u32, u32)> {
        self.block_size
    }

    /// The metadata contexts granted, with the ids the server gave them.
    pub fn contexts(&self) -> &[(String, u32)] {
        &self.contexts
    }

    /// Current read pipeline depth and request size.
    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    /// Sets how many requests one call keeps in flight (clamped to 1..=1024).
    pub fn set_depth(&mut self, depth: usize) {
        self.depth = depth.clamp(1, MAX_DEPTH);
    }

    /// Sets the largest read request. It is capped by the server's maximum block size
    /// (or the spec's 32 MiB default), rounded down to a multiple of the minimum block
    /// size, and at least one minimum block.
    pub fn set_max_request(&mut self, bytes: u32) {
        let min = self.min_block();
        let server_max = match self.block_size {
            Some((_, _, max)) if max != u32::MAX => max,
            _ => DEFAULT_MAX_BLOCK,
        };
        let b = bytes.min(server_max);
        self.max_request = (b - b % min).max(min);
    }

    fn min_block(&self) -> u32 {
        self.block_size.map_or(1, |(min, _, _)| min.max(1))
    }

    /// Runs `f` on the connection unless it is broken; marks it broken when `f` fails
    /// in a way that leaves the stream in an unknown state.
    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut guard: MutexGuard<'_, Conn> = self
            .conn
            .lock()
            .map_err(|_| Error::Broken("a thread panicked while using the connection".into()))?;
        if let Some(why) = &guard.broken {
            return Err(Error::Broken(why.clone()));
        }
        let r = f(&mut guard);
        match &r {
            Err(e) if e.breaks_connection() => guard.broken = Some(e.to_string()),
            // The spec requires a soft disconnect once the server says it is shutting down.
            Err(Error::Server {
                errno: proto::ESHUTDOWN,
                ..
            }) => {
                let _ = guard.send_disc();
                guard.broken = Some("server is shutting down (ESHUTDOWN)".into());
            }
            _ => {}
        }
        r
    }

    fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(Error::InvalidArgument(format!(
                "{what} of {len} bytes at offset {offset} goes past the export's end ({})",
                self.size
            ))),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// The range is split into requests of at most [`Client::max_request`] bytes with
    /// up to [`Client::depth`] in flight; replies are matched by cookie in any order,
    /// data chunks copied into place and hole chunks zero-filled, and every byte must
    /// be covered exactly once. Unaligned ranges are widened to the server's minimum
    /// block size through small bounce buffers. A server error is returned as
    /// [`Error::Server`] after the other requests in flight are drained (the connection
    /// stays usable); `buf` is then partly written.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = self.check_range(offset, buf.len() as u64, "read")?;
        if buf.is_empty() {
            return Ok(());
        }
        let min = u64::from(self.min_block());
        let (depth, max_req) = (self.depth, self.max_request);
        self.with_conn(|c| {
            if min <= 1 || (offset.is_multiple_of(min) && end.is_multiple_of(min)) {
                return c.read_pipelined(offset, buf, max_req, depth);
            }
            // Head: the partial block holding `offset`.
            let mut pos = offset;
            if !pos.is_multiple_of(min) {
                let block = pos - pos % min;
                let take = (block + min).min(end) - pos;
                read_bounced(c, block, min, self.size, pos, sub(buf, 0, take)?)?;
                pos += take;
            }
            // Middle: whole blocks straight into the caller's buffer.
            let mid_end = end - end % min;
            if pos < mid_end {
                let part = sub(buf, pos - offset, mid_end - pos)?;
                c.read_pipelined(pos, part, max_req, depth)?;
                pos = mid_end;
            }
            // Tail: the partial block holding `end - 1`.
            if pos < end {
                read_bounced(
                    c,
                    pos,
                    min,
                    self.size,
                    pos,
                    sub(buf, pos - offset, end - pos)?,
                )?;
            }
            Ok(())
        })
    }

    /// Extents of `context` covering [`offset`, `offset + length`) exactly, in order,
    /// adjacent extents with equal flags merged.
    ///
    /// Issues NBD_CMD_BLOCK_STATUS in requests below 2 GiB (aligned to the minimum
    /// block size), several in flight, and asks again for whatever part a server
    /// answered only in part; the last descriptor is clipped to the range.
    pub fn block_status(&self, context: &str, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = self.check_range(offset, length, "block status")?;
        let Some(&(_, want_id)) = self.contexts.iter().find(|(n, _)| n == context) else {
            return Err(Error::InvalidArgument(format!(
                "metadata context {context:?} was not negotiated on this connection (have {:?})",
                self.contexts
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
            )));
        };
        if length == 0 {
            return Ok(Vec::new());
        }
        let all_ids: Vec<u32> = self.contexts.iter().map(|(_, id)| *id).collect();
        let min = self.min_block();
        let m = u64::from(min);
        let a_start = offset - offset % m;
        let a_end = end.div_ceil(m).saturating_mul(m).min(self.size);
        let max_req = MAX_BLOCK_STATUS_REQUEST - MAX_BLOCK_STATUS_REQUEST % min;
        let depth = self.depth;
        let mut extents = self.with_conn(|c| {
            c.block_status_pipelined(
                want_id,
                &all_ids,
                a_start,
                a_end - a_start,
                max_req,
                depth,
                min,
            )
        })?;
        // Clip the alignment padding back off.
        extents.retain_mut(|e| {
            let s = e.offset.max(offset);
            let t = e.end().min(end);
            e.offset = s;
            e.length = t.saturating_sub(s);
            e.length > 0
        });
        merge_extents(&mut extents);
        Ok(extents)
    }

    /// Sends NBD_CMD_DISC and closes the connection.
    pub fn disconnect(mut self) -> Result<()> {
        self.closed = true;
        let conn = self
            .conn
            .get_mut()
            .map_err(|_| Error::Broken("a thread panicked while using the connection".into()))?;
        if let Some(why) = &conn.broken {
            return Err(Error::Broken(why.clone()));
        }
        conn.send_disc()
    }
}

/// `buf[at..at + n]`, checked.
fn sub(buf: &mut [u8], at: u64, n: u64) -> Result<&mut [u8]> {
    let at = usize::try_from(at).ok();
    let end = at
        .zip(usize::try_from(n).ok())
        .and_then(|(a, n)| a.checked_add(n));
    at.zip(end)
        .and_then(|(a, e)| buf.get_mut(a..e))
        .ok_or_else(|| Error::InvalidArgument("read range outside the buffer".into()))
}

/// Reads the block at `block` (one minimum block, cut at the export's end) into a
/// bounce buffer and copies the part at `pos` into `out`.
fn read_bounced(
    c: &mut Conn,
    block: u64,
    min: u64,
    size: u64,
    pos: u64,
    out: &mut [u8],
) -> Result<()> {
    let n = (block + min).min(size) - block;
    let mut bounce = vec![0u8; n as usize];
    c.read_pipelined(block, &mut bounce, n as u32, 1)?;
    let from = (pos - block) as usize;
    let src = bounce
        .get(from..from + out.len())
        .ok_or_else(|| Error::InvalidArgument("unaligned read past the export's end".into()))?;
    out.copy_from_slice(src);
    Ok(())
}

impl Drop for Client {
    /// Says goodbye (NBD_CMD_DISC) unless the connection is broken or already closed,
    /// so the server does not log an abrupt disconnect.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Ok(conn) = self.conn.get_mut()
            && conn.broken.is_none()
        {
            let _ = conn.send_disc();
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.export)
            .field("size", &self.size)
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("block_size", &self.block_size)
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

/// Lists the server's exports with NBD_OPT_LIST, then ends the session with
/// NBD_OPT_ABORT.
pub fn list_exports(addr: &Addr) -> Result<Vec<String>> {
    let stream = connect_stream(addr, Some(DEFAULT_TIMEOUT))?;
    let mut conn = Conn::new(stream, Some(DEFAULT_TIMEOUT));
    list_on(&mut conn)
}

fn list_on(conn: &mut Conn) -> Result<Vec<String>> {
    conn.greet()?;
    conn.send_option(proto::OPT_LIST, &[])?;
    let mut names = Vec::new();
    for _ in 0..MAX_OPTION_REPLIES {
        let (reply, payload) = conn.read_opt_reply(proto::OPT_LIST)?;
        match reply {
            proto::REP_SERVER => names.push(proto::parse_rep_server(&payload)?),
            proto::REP_ACK => {
                conn.abort_options();
                return Ok(names);
            }
            r if r & proto::REP_ERR_BIT != 0 => {
                let e = Conn::opt_error(proto::OPT_LIST, r, &payload, "listing exports");
                conn.abort_options();
                return Err(e);
            }
            r => {
                return protocol(format!(
                    "unexpected {} in reply to NBD_OPT_LIST",
                    proto::rep_name(r)
                ));
            }
        }
    }
    protocol(format!(
        "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_LIST"
    ))
}

/// Lists exports over an already connected stream (see [`Client::from_stream`]).
pub fn list_exports_on<S: Read + Write + Send + 'static>(stream: S) -> Result<Vec<String>> {
    let mut conn = Conn::new(Box::new(stream), None);
    list_on(&mut conn)
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
