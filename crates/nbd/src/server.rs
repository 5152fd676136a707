//! A small synchronous NBD server: one export, one thread per connection.
//!
//! It serves an [`Export`] (a recovery point's disk, possibly behind a copy-on-write
//! overlay) to QEMU, `qemu-img`, `nbdcopy` and this crate's own [`crate::Client`].
//!
//! Handshake: fixed newstyle with `NBD_FLAG_NO_ZEROES`; options `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_GO`, `NBD_OPT_INFO` (`NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE` of 1 / 4096 /
//! 32 MiB, `NBD_INFO_NAME` on request), `NBD_OPT_LIST`, `NBD_OPT_ABORT` and
//! `NBD_OPT_STRUCTURED_REPLY`. Structured replies are accepted because this crate's
//! client requires them; with them every read is answered by a single
//! `NBD_REPLY_TYPE_OFFSET_DATA` chunk and errors by `NBD_REPLY_TYPE_ERROR`, so they cost
//! nothing. With structured replies the one metadata context `base:allocation` can be
//! selected (`NBD_OPT_SET_META_CONTEXT`, listed by `NBD_OPT_LIST_META_CONTEXT`); it
//! reports what [`Export::block_status`] says, so clients skip zero ranges. Other
//! options are refused with `NBD_REP_ERR_UNSUP`. The only export name is `""`.
//!
//! Transmission: `NBD_CMD_READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`,
//! `BLOCK_STATUS` (once `base:allocation` is selected) and `DISC`.
//! Writes, trims and write-zeroes fail with `EPERM` on a read-only export; any other
//! command with `EINVAL`.
//!
//! Clients are not trusted. Every request is checked: a bad request magic closes the
//! connection (the stream cannot be resynchronised); a range past the end of the export
//! (with checked arithmetic), a zero length or a length above [`MAX_REQUEST`] is
//! answered with `EINVAL` and the connection goes on. The payload of a write that is
//! refused (too long, read-only, out of range) is read and thrown away in 64 KiB
//! pieces, so the stream stays in step and memory stays bounded: a connection holds at
//! most one request's data ([`MAX_REQUEST`]) at a time. Option data above
//! [`MAX_OPTION_DATA`] is likewise discarded and refused with `NBD_REP_ERR_TOO_BIG`.

use crate::proto::{self, *};
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest read or write request served, and the maximum block size advertised.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Preferred block size advertised: the overlay's granularity.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option payload read into memory; bigger ones are discarded and refused.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Connections served at once; more are closed right after `accept`.
pub const MAX_CONNECTIONS: usize = 64;
/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(25);
/// Options accepted per connection before the server gives up on the client.
const MAX_OPTIONS: usize = 1000;

/// What the server exports: a fixed-size byte array, read-only unless
/// [`Export::writable`] says otherwise.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from offset `off` (the range is within [`Export::size`]).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes `buf` at `off` (the range is within [`Export::size`]).
    fn write_at(&self, _buf: &[u8], _off: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "export is read-only",
        ))
    }
    /// Writes `len` zero bytes at `off`; by default in 1 MiB pieces through
    /// [`Export::write_at`].
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; (1 << 20).min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.write_at(&zeroes[..n as usize], off + done)?;
            done += n;
        }
        Ok(())
    }
    /// Allocation of `[off, off + len)` for `base:allocation`: `(length, flags)` runs in
    /// order from `off`, flags made of [`crate::STATE_HOLE`] and [`crate::STATE_ZERO`].
    /// They may cover only a prefix of the range. By default everything is data.
    fn block_status(&self, _off: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        Ok(vec![(len, 0)])
    }
    /// Whether writes are accepted (otherwise `NBD_FLAG_READ_ONLY` is advertised).
    fn writable(&self) -> bool {
        false
    }
    /// Makes completed writes durable (as durable as the export is).
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Something that accepts connections: a Unix socket (its file is removed when the
/// listener is dropped) or a TCP socket.
#[derive(Debug)]
pub enum Listener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a Unix socket at `path`, which must not exist yet.
    pub fn unix(path: &Path) -> io::Result<Listener> {
        let listener = UnixListener::bind(path)?;
        Ok(Listener::Unix {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Binds a TCP socket (port 0 picks a free port: see [`Listener::uri`]).
    pub fn tcp(addr: impl std::net::ToSocketAddrs) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// The NBD URI that reaches this listener's export `""`.
    pub fn uri(&self) -> io::Result<String> {
        match self {
            Listener::Unix { path, .. } => Ok(format!("nbd+unix:///?socket={}", path.display())),
            Listener::Tcp(l) => Ok(format!("nbd://{}/", l.local_addr()?)),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix { listener, .. } => listener.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }

    fn accept(&self) -> io::Result<Socket> {
        match self {
            Listener::Unix { listener, .. } => Ok(Socket::Unix(listener.accept()?.0)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok(Socket::Tcp(s))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_nonblocking(on),
            Socket::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Receives one line per noteworthy event (a connection failing, a client breaking
/// the protocol); the server itself never prints.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// Serves one export.
pub struct Server {
    export: Arc<dyn Export>,
    log: Option<Log>,
}

impl Server {
    pub fn new(export: Arc<dyn Export>) -> Server {
        Server { export, log: None }
    }

    /// Sends connection errors to `log` (by default they are dropped).
    pub fn with_log(mut self, log: Log) -> Server {
        self.log = Some(log);
        self
    }

    /// Accepts connections until `stop` becomes true, one thread each; then shuts
    /// every open connection down, waits for their threads and returns. The listener
    /// is polled, so `stop` is noticed within a few tens of milliseconds (it can be
    /// set from a signal handler).
    pub fn serve(&self, listener: &Listener, stop: &AtomicBool) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let open: Arc<Mutex<HashMap<u64, Socket>>> = Arc::default();
        let next_id = AtomicU64::new(0);
        let mut threads: Vec<(u64, JoinHandle<()>)> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            threads.retain(|(_, t)| !t.is_finished());
            let sock = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: report, back off, go on.
                    self.note(&format!("accepting a connection: {e}"));
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            if threads.len() >= MAX_CONNECTIONS {
                self.note(&format!(
                    "refusing a connection: {MAX_CONNECTIONS} are open already"
                ));
                sock.shutdown();
                continue;
            }
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            let setup = sock.set_nonblocking(false).and_then(|()| sock.try_clone());
            let handle = match setup {
                Ok(h) => h,
                Err(e) => {
                    self.note(&format!("setting up a connection: {e}"));
                    continue;
                }
            };
            locks::lock(&open).insert(id, handle);
            let export = self.export.clone();
            let log = self.log.clone();
            let open2 = open.clone();
            let t = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    if let Err(e) = serve_connection(export, sock, log.clone())
                        && let Some(log) = &log
                    {
                        log(&format!("connection {id}: {e}"));
                    }
                    locks::lock(&open2).remove(&id);
                })?;
            threads.push((id, t));
        }
        for s in locks::lock(&open).values() {
            s.shutdown();
        }
        for (_, t) in threads {
            let _ = t.join();
        }
        Ok(())
    }

    /// Serves one already accepted connection on the calling thread (tests, inetd
    /// style use). Returns when the client disconnects.
    pub fn serve_stream<S: Read + Write>(&self, stream: S) -> io::Result<()> {
        serve_connection(self.export.clone(), stream, self.log.clone())
    }

    fn note(&self, msg: &str) {
        if let Some(log) = &self.log {
            log(msg);
        }
    }
}

/// Why a connection ended other than by the client's choice.
fn violation(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

struct Conn<S: Read + Write> {
    r: BufReader<ReadHalf<S>>,
    export: Arc<dyn Export>,
    structured: bool,
    no_zeroes: bool,
    buf: Vec<u8>,
    log: Option<Log>,
    /// `base:allocation` was selected with NBD_OPT_SET_META_CONTEXT.
    base_allocation: bool,
}

/// Lets one stream be wrapped by a `BufReader` for reading while replies are written
/// to the same stream through a `BufWriter` built on demand.
struct ReadHalf<S>(S);

impl<S: Read> Read for ReadHalf<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

fn serve_connection<S: Read + Write>(
    export: Arc<dyn Export>,
    stream: S,
    log: Option<Log>,
) -> io::Result<()> {
    let mut c = Conn {
        r: BufReader::with_capacity(64 << 10, ReadHalf(stream)),
        export,
        structured: false,
        no_zeroes: false,
        buf: Vec::new(),
        log,
        base_allocation: false,
    };
    match c.handshake()? {
        true => c.transmission(),
        false => Ok(()),
    }
}

fn eof_is_ok(r: io::Result<()>) -> io::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Parsed data of NBD_OPT_GO / NBD_OPT_INFO: export name and requested info types.
fn parse_go(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(n)?;
    let name = d.get(4..name_end)?;
    let count = u16::from_be_bytes(d.get(name_end..name_end.checked_add(2)?)?.try_into().ok()?);
    let rest = d.get(name_end + 2..)?;
    if rest.len() != usize::from(count) * 2 {
        return None;
    }
    let infos = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}

/// Parsed data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT: export name
/// and queries.
fn parse_meta(d: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let be32 = |at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(d.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let n = be32(0)?;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let mut at = 4 + n;
    let count = be32(at)?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let l = be32(at)?;
        at += 4;
        queries.push(d.get(at..at.checked_add(l)?)?);
        at += l;
    }
    (at == d.len()).then_some((name, queries))
}

/// Id of `base:allocation`, the only metadata context.
const BASE_ALLOCATION_ID: u32 = 1;
/// Descriptors sent in one block status reply at most (a prefix answer is allowed).
const MAX_DESCRIPTORS: usize = 1 << 16;

impl<S: Read + Write> Conn<S> {
    fn stream(&mut self) -> &mut S {
        &mut self.r.get_mut().0
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let s = self.stream();
        s.write_all(bytes)?;
        s.flush()
    }

    fn tflags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if self.export.writable() {
            f |= TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_TRIM;
        } else {
            f |= TFLAG_READ_ONLY;
        }
        f
    }

    fn opt_reply(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        let len =
            u32::try_from(data.len()).map_err(|_| violation("option reply too long".into()))?;
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&reply.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// Reads and throws away `len` bytes in bounded pieces.
    fn discard(&mut self, len: u64) -> io::Result<()> {
        let n = io::copy(&mut (&mut self.r).take(len), &mut io::sink())?;
        if n != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection mid-request",
            ));
        }
        Ok(())
    }

    /// Greeting and option haggling. `Ok(true)`: enter transmission; `Ok(false)`: the
    /// client went away or aborted.
    fn handshake(&mut self) -> io::Result<bool> {
        if !self.greet()? {
            return Ok(false);
        }
        for _ in 0..MAX_OPTIONS {
            let mut h = [0u8; 16];
            if !eof_is_ok(self.r.read_exact(&mut h))? {
                return Ok(false);
            }
            let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
            let option = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
            if magic != IHAVEOPT {
                return Err(violation(format!(
                    "option header magic {magic:#018x} is not IHAVEOPT"
                )));
            }
            if len > MAX_OPTION_DATA {
                self.discard(u64::from(len))?;
                if option == OPT_EXPORT_NAME {
                    return Ok(false);
                }
                self.opt_reply(option, REP_ERR_TOO_BIG, b"option data too long")?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            self.r.read_exact(&mut data)?;
            if let Some(transmit) = self.option(option, &data)? {
                return Ok(transmit);
            }
        }
        Err(violation(format!(
            "more than {MAX_OPTIONS} options without entering transmission"
        )))
    }

    /// Sends the greeting and reads the client's flags; `Ok(false)`: the client went
    /// away.
    fn greet(&mut self) -> io::Result<bool> {
        let mut g = Vec::with_capacity(GREETING_LEN);
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.send(&g)?;
        let mut cf = [0u8; 4];
        if !eof_is_ok(self.r.read_exact(&mut cf))? {
            return Ok(false);
        }
        let cflags = u32::from_be_bytes(cf);
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(violation(format!(
                "client flags {cflags:#x} include ones this server does not know"
            )));
        }
        self.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        Ok(true)
    }

    /// Answers one option. `None`: read the next; `Some` ends the haggling as
    /// [`Conn::handshake`] does.
    fn option(&mut self, option: u32, data: &[u8]) -> io::Result<Option<bool>> {
        match option {
            OPT_EXPORT_NAME => {
                if !data.is_empty() {
                    // Unknown export: this option has no way to say so but hanging up.
                    return Ok(Some(false));
                }
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&self.export.size().to_be_bytes());
                b.extend_from_slice(&self.tflags().to_be_bytes());
                if !self.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                self.send(&b)?;
                return Ok(Some(true));
            }
            OPT_ABORT => {
                // Best effort: the client may already have hung up.
                let _ = self.opt_reply(option, REP_ACK, &[]);
                return Ok(Some(false));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.opt_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    return Ok(None);
                }
                self.opt_reply(option, REP_SERVER, &0u32.to_be_bytes())?;
                self.opt_reply(option, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.opt_reply(
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                    return Ok(None);
                }
                self.structured = true;
                self.opt_reply(option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => return self.opt_go(option, data),
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => self.opt_meta_context(option, data)?,
            _ => {
                let msg = format!("{} is not supported", proto::opt_name(option));
                self.opt_reply(option, REP_ERR_UNSUP, msg.as_bytes())?;
            }
        }
        Ok(None)
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: the export's size, flags and block sizes; GO then
    /// enters transmission (`Some(true)`).
    fn opt_go(&mut self, option: u32, data: &[u8]) -> io::Result<Option<bool>> {
        let Some((name, infos)) = parse_go(data) else {
            self.opt_reply(option, REP_ERR_INVALID, b"malformed request")?;
            return Ok(None);
        };
        if !name.is_empty() {
            let msg = format!(
                "no export named {:?}; the only export is \"\"",
                String::from_utf8_lossy(&name[..name.len().min(256)])
            );
            self.opt_reply(option, REP_ERR_UNKNOWN, msg.as_bytes())?;
            return Ok(None);
        }
        let mut e = INFO_EXPORT.to_be_bytes().to_vec();
        e.extend_from_slice(&self.export.size().to_be_bytes());
        e.extend_from_slice(&self.tflags().to_be_bytes());
        self.opt_reply(option, REP_INFO, &e)?;
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1, PREFERRED_BLOCK, MAX_REQUEST] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        self.opt_reply(option, REP_INFO, &b)?;
        if infos.contains(&INFO_NAME) {
            self.opt_reply(option, REP_INFO, &INFO_NAME.to_be_bytes())?;
        }
        self.opt_reply(option, REP_ACK, &[])?;
        Ok((option == OPT_GO).then_some(true))
    }

    /// NBD_OPT_SET_META_CONTEXT and NBD_OPT_LIST_META_CONTEXT: `base:allocation` is
    /// the only context.
    fn opt_meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let Some((name, queries)) = parse_meta(data) else {
            return self.opt_reply(option, REP_ERR_INVALID, b"malformed request");
        };
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return self.opt_reply(
                option,
                REP_ERR_INVALID,
                b"metadata contexts need structured replies",
            );
        }
        if !name.is_empty() {
            return self.opt_reply(option, REP_ERR_UNKNOWN, b"the only export is \"\"");
        }
        let name = crate::CONTEXT_BASE_ALLOCATION.as_bytes();
        let wanted = if set {
            queries.contains(&name)
        } else {
            queries.is_empty() || queries.iter().any(|q| *q == name || *q == b"base:")
        };
        if set {
            self.base_allocation = wanted;
        }
        if wanted {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(name);
            self.opt_reply(option, REP_META_CONTEXT, &p)?;
        }
        self.opt_reply(option, REP_ACK, &[])
    }

    /// Sends a reply without data: simple, or a structured NONE/ERROR chunk.
    fn reply(&mut self, cookie: u64, errno: u32) -> io::Result<()> {
        let mut b = Vec::with_capacity(26);
        if !self.structured {
            b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&errno.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
        } else {
            b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            let (kind, len): (u16, u32) = if errno == 0 {
                (REPLY_TYPE_NONE, 0)
            } else {
                (REPLY_TYPE_ERROR, 6)
            };
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            if errno != 0 {
                b.extend_from_slice(&errno.to_be_bytes());
                b.extend_from_slice(&0u16.to_be_bytes());
            }
        }
        self.send(&b)
    }

    /// Sends the data of a successful read held in `self.buf`.
    fn reply_data(&mut self, cookie: u64, offset: u64) -> io::Result<()> {
        let mut h = Vec::with_capacity(28);
        if !self.structured {
            h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            h.extend_from_slice(&0u32.to_be_bytes());
            h.extend_from_slice(&cookie.to_be_bytes());
        } else {
            // buf.len() <= MAX_REQUEST, so the sum fits.
            let len = self.buf.len() as u32 + 8;
            h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            h.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            h.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
            h.extend_from_slice(&cookie.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&offset.to_be_bytes());
        }
        let Conn { r, buf, .. } = self;
        let mut w = BufWriter::with_capacity(64 << 10, &mut r.get_mut().0);
        w.write_all(&h)?;
        w.write_all(buf)?;
        w.flush()?;
        drop(w);
        r.get_mut().0.flush()
    }

    /// Sends `runs` (clipped to `len`, empty runs dropped, at most
    /// [`MAX_DESCRIPTORS`], only the first with `one`) as a block status chunk.
    fn reply_block_status(
        &mut self,
        cookie: u64,
        len: u64,
        runs: &[(u64, u32)],
        one: bool,
    ) -> io::Result<()> {
        let mut descs: Vec<(u32, u32)> = Vec::new();
        let mut covered = 0u64;
        for &(l, flags) in runs {
            let l = l.min(len - covered);
            if l == 0 {
                continue;
            }
            // l <= len <= u32::MAX.
            descs.push((l as u32, flags & (crate::STATE_HOLE | crate::STATE_ZERO)));
            covered += l;
            if covered == len || descs.len() == MAX_DESCRIPTORS || one {
                break;
            }
        }
        if descs.is_empty() {
            // The export said nothing: call it data.
            descs.push((len as u32, 0));
        }
        let plen = 4 + 8 * descs.len() as u32;
        let mut b = Vec::with_capacity(20 + plen as usize);
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        b.extend_from_slice(&REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&plen.to_be_bytes());
        b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (l, f) in descs {
            b.extend_from_slice(&l.to_be_bytes());
            b.extend_from_slice(&f.to_be_bytes());
        }
        self.send(&b)
    }

    /// Logs an export's I/O error (the client only learns the error value) and
    /// returns the error value to send.
    fn failed(&self, what: &str, offset: u64, len: u64, e: &io::Error) -> u32 {
        if let Some(log) = &self.log {
            log(&format!(
                "{what} of {len} bytes at offset {offset} failed: {e}"
            ));
        }
        errno_of(e)
    }

    /// Whether `[offset, offset + len)` is a nonempty range inside the export.
    fn in_range(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.export.size())
    }

    fn transmission(&mut self) -> io::Result<()> {
        loop {
            // Do not keep a 32 MiB buffer around for an idle connection.
            if self.buf.capacity() > (4 << 20) {
                self.buf = Vec::new();
            }
            let mut h = [0u8; REQUEST_LEN];
            if !eof_is_ok(self.r.read_exact(&mut h))? {
                return Ok(());
            }
            let be16 = |a: usize| u16::from_be_bytes([h[a], h[a + 1]]);
            let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let cmd = be16(6);
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
            let offset = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default());
            let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
            if magic != REQUEST_MAGIC {
                return Err(violation(format!(
                    "request magic {magic:#010x} is not NBD_REQUEST_MAGIC; closing"
                )));
            }
            let writable = self.export.writable();
            let len64 = u64::from(len);
            let errno = match cmd {
                CMD_READ => {
                    if len > MAX_REQUEST || !self.in_range(offset, len64) {
                        EINVAL
                    } else {
                        self.buf.resize(len as usize, 0);
                        match self.export.read_at(&mut self.buf, offset) {
                            Ok(()) => {
                                self.reply_data(cookie, offset)?;
                                continue;
                            }
                            Err(e) => self.failed("read", offset, len64, &e),
                        }
                    }
                }
                CMD_WRITE => {
                    if len > MAX_REQUEST || !writable || !self.in_range(offset, len64) {
                        self.discard(len64)?;
                        if len > MAX_REQUEST || (writable && !self.in_range(offset, len64)) {
                            EINVAL
                        } else {
                            EPERM
                        }
                    } else {
                        self.buf.resize(len as usize, 0);
                        self.r.read_exact(&mut self.buf)?;
                        match self.export.write_at(&self.buf, offset) {
                            Ok(()) => 0,
                            Err(e) => self.failed("write", offset, len64, &e),
                        }
                    }
                }
                CMD_FLUSH => match self.export.flush() {
                    Ok(()) => 0,
                    Err(e) => self.failed("flush", 0, 0, &e),
                },
                CMD_TRIM | CMD_WRITE_ZEROES if !writable => EPERM,
                CMD_TRIM | CMD_WRITE_ZEROES if !self.in_range(offset, len64) => EINVAL,
                // Trimmed data may read back as anything: keeping it is allowed.
                CMD_TRIM => 0,
                CMD_WRITE_ZEROES => match self.export.write_zeroes(offset, len64) {
                    Ok(()) => 0,
                    Err(e) => self.failed("write-zeroes", offset, len64, &e),
                },
                CMD_BLOCK_STATUS if !self.base_allocation || !self.in_range(offset, len64) => {
                    EINVAL
                }
                CMD_BLOCK_STATUS => match self.export.block_status(offset, len64) {
                    Ok(runs) => {
                        let one = be16(4) & CMD_FLAG_REQ_ONE != 0;
                        self.reply_block_status(cookie, len64, &runs, one)?;
                        continue;
                    }
                    Err(e) => self.failed("block status", offset, len64, &e),
                },
                CMD_DISC => return Ok(()),
                _ => EINVAL,
            };
            self.reply(cookie, errno)?;
        }
    }
}

/// The NBD error value for an export's I/O error.
fn errno_of(e: &io::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::PermissionDenied => EPERM,
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::StorageFull => ENOSPC,
        io::ErrorKind::OutOfMemory => ENOMEM,
        _ => EIO,
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
