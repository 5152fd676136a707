//! The NBD wire format: constants, request encoders and pure parsers over byte slices.
//!
//! Everything that interprets bytes from the server lives here, away from the socket,
//! so that it can be unit-tested with malformed inputs and fuzzed. Parsers never
//! panic: every length is checked before it is used, and every failure is an
//! [`Error::Protocol`] that names the message, the field and the value.

use crate::{Error, Extent, Result, protocol};
use std::collections::BTreeMap;

// Handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
/// Option reply header: magic, option, reply type, length.
pub const OPT_REPLY_HEADER_LEN: usize = 20;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR_BIT | 10;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (from NBD_INFO_EXPORT).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REQUEST_LEN: usize = 28;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// A simple reply is 16 bytes; a structured chunk header 20. Both start with a magic.
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Cap on any option reply payload: the largest legitimate one is a 4096-byte string
/// plus a few fields, so 64 KiB leaves room without letting a server make us
/// allocate at will.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Strings (names, messages) must not exceed this per the spec.
pub const MAX_STRING: usize = 4096;
/// Largest payload of an error chunk: error, message length, message, offset.
pub const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING as u32 + 8;
/// Block status descriptors accepted in one chunk, whatever the request length: QEMU
/// sends at most 2^17; 2^21 (16 MiB of payload) is far beyond any real server.
pub const MAX_DESCRIPTORS: u64 = 1 << 21;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Reads a big-endian field, failing with a protocol error naming `what` when the
/// buffer is too short (callers size buffers first, so this is a second line of defence).
fn field<T>(v: Option<T>, what: &str) -> Result<T> {
    v.ok_or_else(|| Error::Protocol(format!("{what}: message too short")))
}

/// Name of an option, for messages.
pub fn opt_name(opt: u32) -> String {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        OPT_ABORT => "NBD_OPT_ABORT".into(),
        OPT_LIST => "NBD_OPT_LIST".into(),
        OPT_STARTTLS => "NBD_OPT_STARTTLS".into(),
        OPT_INFO => "NBD_OPT_INFO".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS".into(),
        o => format!("option {o}"),
    }
}

/// Name of an option reply type, for messages.
pub fn rep_name(rep: u32) -> String {
    match rep {
        REP_ACK => "NBD_REP_ACK".into(),
        REP_SERVER => "NBD_REP_SERVER".into(),
        REP_INFO => "NBD_REP_INFO".into(),
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT".into(),
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP".into(),
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY".into(),
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM".into(),
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD".into(),
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN".into(),
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN".into(),
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG".into(),
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD".into(),
        r if r & REP_ERR_BIT != 0 => format!("error reply {r:#x}"),
        r => format!("reply type {r}"),
    }
}

/// Name of a structured reply chunk type, for messages.
pub fn chunk_name(kind: u16) -> String {
    match kind {
        REPLY_TYPE_NONE => "NBD_REPLY_TYPE_NONE".into(),
        REPLY_TYPE_OFFSET_DATA => "NBD_REPLY_TYPE_OFFSET_DATA".into(),
        REPLY_TYPE_OFFSET_HOLE => "NBD_REPLY_TYPE_OFFSET_HOLE".into(),
        REPLY_TYPE_BLOCK_STATUS => "NBD_REPLY_TYPE_BLOCK_STATUS".into(),
        REPLY_TYPE_BLOCK_STATUS_EXT => "NBD_REPLY_TYPE_BLOCK_STATUS_EXT".into(),
        REPLY_TYPE_ERROR => "NBD_REPLY_TYPE_ERROR".into(),
        REPLY_TYPE_ERROR_OFFSET => "NBD_REPLY_TYPE_ERROR_OFFSET".into(),
        k => format!("chunk type {k:#x}"),
    }
}

/// Checks the server greeting and returns its handshake flags. Only fixed newstyle is
/// accepted: the options this client needs do not exist in the older handshakes.
pub fn parse_greeting(b: &[u8]) -> Result<u16> {
    let magic = field(be64(b, 0), "server greeting")?;
    if magic != NBDMAGIC {
        return protocol(format!(
            "server greeting starts with {magic:#018x}, not NBDMAGIC ({NBDMAGIC:#018x}); not an NBD server?"
        ));
    }
    let second = field(be64(b, 8), "server greeting")?;
    if second == OLDSTYLE_MAGIC {
        return Err(Error::Unsupported(
            "server uses the oldstyle NBD handshake (no export names, no options)".into(),
        ));
    }
    if second != IHAVEOPT {
        return protocol(format!(
            "server greeting's second magic is {second:#018x}, not IHAVEOPT ({IHAVEOPT:#018x})"
        ));
    }
    let flags = field(be16(b, 16), "server greeting")?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Unsupported(format!(
            "server does not offer the fixed newstyle handshake (handshake flags {flags:#06x})"
        )));
    }
    Ok(flags)
}

/// Encodes an option request.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| Error::InvalidArgument(format!("{} data too long", opt_name(option))))?;
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Appends a 32-bit length and the string (for export names and context queries).
pub fn put_string32(out: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.len() > MAX_STRING {
        return Err(Error::InvalidArgument(format!(
            "string of {} bytes exceeds the protocol's {MAX_STRING}-byte limit",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(Error::InvalidArgument(format!("string {s:?} contains NUL")));
    }
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Data of `NBD_OPT_GO`/`NBD_OPT_INFO`: export name and the info items requested.
pub fn go_data(export: &str, infos: &[u16]) -> Result<Vec<u8>> {
    let mut d = Vec::new();
    put_string32(&mut d, export)?;
    let n = u16::try_from(infos.len())
        .map_err(|_| Error::InvalidArgument("too many info requests".into()))?;
    d.extend_from_slice(&n.to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    Ok(d)
}

/// Data of `NBD_OPT_SET_META_CONTEXT`/`NBD_OPT_LIST_META_CONTEXT`.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Result<Vec<u8>> {
    let mut d = Vec::new();
    put_string32(&mut d, export)?;
    let n = u32::try_from(queries.len())
        .map_err(|_| Error::InvalidArgument("too many metadata contexts".into()))?;
    d.extend_from_slice(&n.to_be_bytes());
    for q in queries {
        put_string32(&mut d, q)?;
    }
    Ok(d)
}

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

/// Parses an option reply header, checking its magic, that it answers `expect_option`
/// and that its payload length is within [`MAX_OPTION_REPLY`].
pub fn parse_opt_reply_header(b: &[u8], expect_option: u32) -> Result<OptReplyHeader> {
    let what = format!("reply to {}", opt_name(expect_option));
    let magic = field(be64(b, 0), &what)?;
    if magic != OPT_REPLY_MAGIC {
        return protocol(format!(
            "{what}: magic {magic:#018x}, expected {OPT_REPLY_MAGIC:#018x}"
        ));
    }
    let option = field(be32(b, 8), &what)?;
    let reply = field(be32(b, 12), &what)?;
    let len = field(be32(b, 16), &what)?;
    if option != expect_option {
        return protocol(format!("{what}: reply is for {} instead", opt_name(option)));
    }
    if len > MAX_OPTION_REPLY {
        return protocol(format!(
            "{what}: {} payload of {len} bytes exceeds the {MAX_OPTION_REPLY}-byte cap",
            rep_name(reply)
        ));
    }
    Ok(OptReplyHeader { option, reply, len })
}

fn utf8(b: &[u8], what: &str) -> Result<String> {
    if b.len() > MAX_STRING {
        return protocol(format!(
            "{what}: {} bytes, longer than the protocol's {MAX_STRING}-byte string limit",
            b.len()
        ));
    }
    String::from_utf8(b.to_vec()).map_err(|_| Error::Protocol(format!("{what}: not valid UTF-8")))
}

/// Error message text: shown to people only, so invalid UTF-8 is replaced, not fatal.
pub fn message_text(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_STRING)]).into_owned()
}

/// Parses an `NBD_REP_SERVER` payload (from `NBD_OPT_LIST`) and returns the export name.
pub fn parse_rep_server(p: &[u8]) -> Result<String> {
    let n = field(be32(p, 0), "NBD_REP_SERVER")? as usize;
    let name = p.get(4..4usize.saturating_add(n)).ok_or_else(|| {
        Error::Protocol(format!(
            "NBD_REP_SERVER: name length {n} exceeds the {}-byte payload",
            p.len()
        ))
    })?;
    utf8(name, "NBD_REP_SERVER export name")
}

/// Parses an `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn parse_rep_meta_context(p: &[u8]) -> Result<(u32, String)> {
    let id = field(be32(p, 0), "NBD_REP_META_CONTEXT")?;
    let name = utf8(p.get(4..).unwrap_or_default(), "NBD_REP_META_CONTEXT name")?;
    Ok((id, name))
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// Info types this client does not know are ignored, as the spec requires.
    Unknown(u16),
}

/// Parses an `NBD_REP_INFO` payload, checking each known type's exact length and
/// the block size constraints.
pub fn parse_rep_info(p: &[u8]) -> Result<Info> {
    let kind = field(be16(p, 0), "NBD_REP_INFO")?;
    let body = p.get(2..).unwrap_or_default();
    match kind {
        INFO_EXPORT => {
            if p.len() != 12 {
                return protocol(format!("NBD_INFO_EXPORT: length {} instead of 12", p.len()));
            }
            let size = field(be64(p, 2), "NBD_INFO_EXPORT")?;
            let flags = field(be16(p, 10), "NBD_INFO_EXPORT")?;
            if flags & TFLAG_HAS_FLAGS == 0 {
                return protocol(format!(
                    "NBD_INFO_EXPORT: transmission flags {flags:#06x} lack NBD_FLAG_HAS_FLAGS"
                ));
            }
            if size > i64::MAX as u64 {
                return protocol(format!(
                    "NBD_INFO_EXPORT: export size {size} is implausible"
                ));
            }
            Ok(Info::Export { size, flags })
        }
        INFO_NAME => Ok(Info::Name(utf8(body, "NBD_INFO_NAME")?)),
        INFO_DESCRIPTION => Ok(Info::Description(message_text(body))),
        INFO_BLOCK_SIZE => {
            if p.len() != 14 {
                return protocol(format!(
                    "NBD_INFO_BLOCK_SIZE: length {} instead of 14",
                    p.len()
                ));
            }
            let min = field(be32(p, 2), "NBD_INFO_BLOCK_SIZE")?;
            let preferred = field(be32(p, 6), "NBD_INFO_BLOCK_SIZE")?;
            let max = field(be32(p, 10), "NBD_INFO_BLOCK_SIZE")?;
            check_block_size(min, preferred, max)?;
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        k => Ok(Info::Unknown(k)),
    }
}

/// The spec's rules for block size constraints: the client promises to obey them, so
/// nonsense (zero, non-power-of-two minimum, maximum below minimum) is refused.
pub fn check_block_size(min: u32, preferred: u32, max: u32) -> Result<()> {
    let bad = |why: &str| {
        protocol(format!(
            "NBD_INFO_BLOCK_SIZE: min {min}, preferred {preferred}, max {max}: {why}"
        ))
    };
    if min == 0 || !min.is_power_of_two() || min > 65536 {
        return bad("minimum must be a power of 2 no larger than 65536");
    }
    if !preferred.is_power_of_two() || preferred < min {
        return bad("preferred must be a power of 2 at least the minimum");
    }
    if max != u32::MAX && (max < min || !max.is_multiple_of(min)) {
        return bad("maximum must be a multiple of the minimum or 0xffffffff");
    }
    Ok(())
}

/// Encodes a transmission request (no payload: this client only reads).
pub fn encode_request(out: &mut Vec<u8>, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Which kind of reply a 4-byte magic announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Simple,
    Structured,
}

impl ReplyKind {
    /// Total header length for this kind (including the magic).
    pub fn header_len(self) -> usize {
        match self {
            ReplyKind::Simple => SIMPLE_REPLY_LEN,
            ReplyKind::Structured => STRUCTURED_HEADER_LEN,
        }
    }
}

/// Classifies a reply by its magic. Extended-header replies are refused because they
/// were never negotiated.
pub fn reply_kind(b: &[u8]) -> Result<ReplyKind> {
    match field(be32(b, 0), "reply magic")? {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        EXTENDED_REPLY_MAGIC => {
            protocol("server sent an extended-header reply, which was not negotiated")
        }
        m => protocol(format!(
            "reply magic {m:#010x} is neither simple ({SIMPLE_REPLY_MAGIC:#010x}) nor structured ({STRUCTURED_REPLY_MAGIC:#010x})"
        )),
    }
}

/// A reply header in the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Parses a whole reply header (16 bytes for simple, 20 for structured).
pub fn parse_reply_header(b: &[u8]) -> Result<ReplyHeader> {
    match reply_kind(b)? {
        ReplyKind::Simple => Ok(ReplyHeader::Simple {
            error: field(be32(b, 4), "simple reply")?,
            cookie: field(be64(b, 8), "simple reply")?,
        }),
        ReplyKind::Structured => Ok(ReplyHeader::Chunk {
            flags: field(be16(b, 4), "structured reply")?,
            kind: field(be16(b, 6), "structured reply")?,
            cookie: field(be64(b, 8), "structured reply")?,
            len: field(be32(b, 16), "structured reply")?,
        }),
    }
}

/// An error chunk's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    pub errno: u32,
    pub message: String,
    /// Set by `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// Parses the payload of an error chunk (any type with bit 15 set). Known types must
/// have exactly their documented length; unknown error types need only hold the
/// common error and message fields, as the spec asks clients to accept them.
pub fn parse_error_chunk(kind: u16, p: &[u8]) -> Result<ChunkError> {
    let name = chunk_name(kind);
    let errno = field(be32(p, 0), &name)?;
    let msg_len = field(be16(p, 4), &name)? as usize;
    if errno == 0 {
        return protocol(format!("{name}: error value is 0"));
    }
    if msg_len > MAX_STRING {
        return protocol(format!(
            "{name}: message length {msg_len} exceeds {MAX_STRING}"
        ));
    }
    let rest = p.len().checked_sub(6 + msg_len).ok_or_else(|| {
        Error::Protocol(format!(
            "{name}: message length {msg_len} does not fit the {}-byte payload",
            p.len()
        ))
    })?;
    let message = message_text(p.get(6..6 + msg_len).unwrap_or_default());
    let offset = match kind {
        REPLY_TYPE_ERROR if rest != 0 => {
            return protocol(format!("{name}: {rest} bytes after the message"));
        }
        REPLY_TYPE_ERROR => None,
        REPLY_TYPE_ERROR_OFFSET => {
            if rest != 8 {
                return protocol(format!(
                    "{name}: {rest} bytes after the message instead of an 8-byte offset"
                ));
            }
            Some(field(be64(p, 6 + msg_len), &name)?)
        }
        _ => None,
    };
    Ok(ChunkError {
        errno,
        message,
        offset,
    })
}

/// Parses an `NBD_REPLY_TYPE_OFFSET_HOLE` payload: offset and nonzero size.
pub fn parse_offset_hole(p: &[u8]) -> Result<(u64, u32)> {
    if p.len() != 12 {
        return protocol(format!(
            "NBD_REPLY_TYPE_OFFSET_HOLE: payload length {} instead of 12",
            p.len()
        ));
    }
    let offset = field(be64(p, 0), "NBD_REPLY_TYPE_OFFSET_HOLE")?;
    let size = field(be32(p, 8), "NBD_REPLY_TYPE_OFFSET_HOLE")?;
    if size == 0 {
        return protocol("NBD_REPLY_TYPE_OFFSET_HOLE: hole size 0");
    }
    Ok((offset, size))
}

/// Reads the offset at the start of an `NBD_REPLY_TYPE_OFFSET_DATA` payload.
pub fn parse_offset_data_header(p: &[u8]) -> Result<u64> {
    field(be64(p, 0), "NBD_REPLY_TYPE_OFFSET_DATA")
}

/// Largest `NBD_REPLY_TYPE_BLOCK_STATUS` payload accepted for a request of `req_len`
/// bytes when the minimum block size is `min_block`: every descriptor but the last
/// covers at least `min_block` bytes inside the request, so the count is bounded.
pub fn max_block_status_payload(req_len: u32, min_block: u32) -> u64 {
    let descs = (u64::from(req_len) / u64::from(min_block.max(1)))
        .saturating_add(1)
        .min(MAX_DESCRIPTORS);
    4 + 8 * descs
}

/// Parses an `NBD_REPLY_TYPE_BLOCK_STATUS` payload: the context id and one or more
/// (length, flags) descriptors, each with a nonzero length.
pub fn parse_block_status(p: &[u8]) -> Result<(u32, Vec<(u32, u32)>)> {
    let name = "NBD_REPLY_TYPE_BLOCK_STATUS";
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return protocol(format!(
            "{name}: payload length {} is not 4 + a positive multiple of 8",
            p.len()
        ));
    }
    let id = field(be32(p, 0), name)?;
    let mut descs = Vec::with_capacity((p.len() - 4) / 8);
    for (i, d) in p[4..].chunks_exact(8).enumerate() {
        let len = field(be32(d, 0), name)?;
        let flags = field(be32(d, 4), name)?;
        if len == 0 {
            return protocol(format!(
                "{name}: descriptor {i} of context {id} has length 0"
            ));
        }
        descs.push((len, flags));
    }
    Ok((id, descs))
}

/// Turns the descriptors answering a block status request for [`offset`,
/// `offset + req_len`) into extents, checking the spec's rule that all descriptors
/// but the last end inside the request, and clipping the last to the request's end.
/// The result covers a nonempty prefix of the request.
pub fn descriptors_to_extents(
    offset: u64,
    req_len: u32,
    descs: &[(u32, u32)],
) -> Result<Vec<Extent>> {
    let req_len = u64::from(req_len);
    let mut out = Vec::with_capacity(descs.len());
    let mut pos = 0u64;
    for (i, &(len, flags)) in descs.iter().enumerate() {
        if pos >= req_len {
            return protocol(format!(
                "NBD_REPLY_TYPE_BLOCK_STATUS: descriptor {i} starts at {pos} bytes past the request offset {offset}, beyond the requested {req_len} bytes"
            ));
        }
        if len == 0 {
            return protocol(format!(
                "NBD_REPLY_TYPE_BLOCK_STATUS: descriptor {i} has length 0"
            ));
        }
        let take = u64::from(len).min(req_len - pos);
        let start = offset.checked_add(pos).ok_or_else(|| {
            Error::Protocol("NBD_REPLY_TYPE_BLOCK_STATUS: offset overflow".into())
        })?;
        out.push(Extent {
            offset: start,
            length: take,
            flags,
        });
        pos += take;
    }
    if out.is_empty() {
        return protocol("NBD_REPLY_TYPE_BLOCK_STATUS: no descriptors");
    }
    Ok(out)
}

/// Which bytes of one read request the server has described so far, to refuse
/// overlapping chunks and to insist on full coverage before success. Ranges are kept
/// merged, so a well-behaved server's in-order chunks cost one entry.
#[derive(Debug, Clone, Default)]
pub struct Coverage {
    len: u64,
    covered: u64,
    ranges: BTreeMap<u64, u64>,
}

impl Coverage {
    pub fn new(len: u64) -> Coverage {
        Coverage {
            len,
            covered: 0,
            ranges: BTreeMap::new(),
        }
    }

    /// Records [`start`, `start + len`) (relative to the request), failing with a
    /// message when it is empty, leaves the request or overlaps what is covered.
    pub fn add(&mut self, start: u64, len: u64) -> std::result::Result<(), String> {
        let end = start
            .checked_add(len)
            .filter(|&e| len > 0 && e <= self.len)
            .ok_or_else(|| {
                format!(
                    "range of {len} bytes at {start} is empty or outside the {}-byte request",
                    self.len
                )
            })?;
        let mut new_start = start;
        let mut new_end = end;
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e > start {
                return Err(format!(
                    "range of {len} bytes at {start} overlaps earlier chunk [{s}, {e})"
                ));
            }
            if e == start {
                new_start = s;
            }
        }
        if let Some((&s, &e)) = self.ranges.range(start..).next() {
            if s < end {
                return Err(format!(
                    "range of {len} bytes at {start} overlaps earlier chunk [{s}, {e})"
                ));
            }
            if s == end {
                self.ranges.remove(&s);
                new_end = e;
            }
        }
        self.ranges.insert(new_start, new_end);
        self.covered += len;
        Ok(())
    }

    pub fn covered(&self) -> u64 {
        self.covered
    }

    pub fn is_complete(&self) -> bool {
        self.covered == self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(flags: u16) -> Vec<u8> {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&flags.to_be_bytes());
        g
    }

    fn is_protocol<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
        match r {
            Err(Error::Protocol(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            other => panic!("expected protocol error containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn greeting_accepts_fixed_newstyle_only() {
        assert_eq!(parse_greeting(&greeting(3)).unwrap(), 3);
        assert!(matches!(
            parse_greeting(&greeting(0)),
            Err(Error::Unsupported(_))
        ));
        let mut old = NBDMAGIC.to_be_bytes().to_vec();
        old.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        old.extend_from_slice(&[0, 0]);
        assert!(
            matches!(parse_greeting(&old), Err(Error::Unsupported(m)) if m.contains("oldstyle"))
        );
        let mut bad = greeting(1);
        bad[0] = b'X';
        is_protocol(parse_greeting(&bad), "not NBDMAGIC");
        let mut bad = greeting(1);
        bad[9] ^= 1;
        is_protocol(parse_greeting(&bad), "IHAVEOPT");
        is_protocol(parse_greeting(&greeting(1)[..17]), "too short");
        is_protocol(parse_greeting(&[]), "too short");
    }

    fn opt_reply(option: u32, reply: u32, len: u32) -> Vec<u8> {
        let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&reply.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn option_reply_header_checks_magic_option_and_length() {
        let h = parse_opt_reply_header(&opt_reply(OPT_GO, REP_INFO, 12), OPT_GO).unwrap();
        assert_eq!(
            h,
            OptReplyHeader {
                option: OPT_GO,
                reply: REP_INFO,
                len: 12
            }
        );
        is_protocol(
            parse_opt_reply_header(&opt_reply(OPT_LIST, REP_ACK, 0), OPT_GO),
            "is for NBD_OPT_LIST",
        );
        is_protocol(
            parse_opt_reply_header(&opt_reply(OPT_GO, REP_INFO, MAX_OPTION_REPLY + 1), OPT_GO),
            "exceeds",
        );
        let mut b = opt_reply(OPT_GO, REP_ACK, 0);
        b[7] ^= 0xff;
        is_protocol(parse_opt_reply_header(&b, OPT_GO), "magic");
        let good = opt_reply(OPT_GO, REP_ACK, 0);
        is_protocol(parse_opt_reply_header(&good[..10], OPT_GO), "too short");
    }

    #[test]
    fn info_replies() {
        let mut e = INFO_EXPORT.to_be_bytes().to_vec();
        e.extend_from_slice(&(64u64 << 20).to_be_bytes());
        e.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        assert_eq!(
            parse_rep_info(&e).unwrap(),
            Info::Export {
                size: 64 << 20,
                flags: 3
            }
        );
        is_protocol(parse_rep_info(&e[..11]), "length 11");
        let mut long = e.clone();
        long.push(0);
        is_protocol(parse_rep_info(&long), "length 13");
        let mut noflags = e.clone();
        noflags[11] = 0;
        is_protocol(parse_rep_info(&noflags), "HAS_FLAGS");

        let bs = |min: u32, pref: u32, max: u32| {
            let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [min, pref, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b
        };
        assert_eq!(
            parse_rep_info(&bs(512, 4096, 32 << 20)).unwrap(),
            Info::BlockSize {
                min: 512,
                preferred: 4096,
                max: 32 << 20
            }
        );
        assert!(parse_rep_info(&bs(1, 4096, u32::MAX)).is_ok());
        is_protocol(parse_rep_info(&bs(0, 4096, 1 << 20)), "minimum");
        is_protocol(parse_rep_info(&bs(3, 4096, 1 << 20)), "minimum");
        is_protocol(parse_rep_info(&bs(1 << 17, 1 << 17, 1 << 20)), "minimum");
        is_protocol(parse_rep_info(&bs(4096, 512, 1 << 20)), "preferred");
        is_protocol(parse_rep_info(&bs(512, 4096, 1000)), "maximum");
        is_protocol(parse_rep_info(&bs(512, 4096, 256)), "maximum");
        is_protocol(parse_rep_info(&bs(512, 4096, 1 << 20)[..13]), "length 13");

        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"disk");
        assert_eq!(parse_rep_info(&name).unwrap(), Info::Name("disk".into()));
        name.push(0xff);
        is_protocol(parse_rep_info(&name), "UTF-8");
        assert_eq!(
            parse_rep_info(&[0x12, 0x34, 1]).unwrap(),
            Info::Unknown(0x1234)
        );
        is_protocol(parse_rep_info(&[0]), "too short");
    }

    #[test]
    fn server_and_meta_context_replies() {
        let mut s = 4u32.to_be_bytes().to_vec();
        s.extend_from_slice(b"diskdescription");
        assert_eq!(parse_rep_server(&s).unwrap(), "disk");
        let mut s = 40u32.to_be_bytes().to_vec();
        s.extend_from_slice(b"disk");
        is_protocol(parse_rep_server(&s), "exceeds");
        let mut s = u32::MAX.to_be_bytes().to_vec();
        s.extend_from_slice(b"disk");
        is_protocol(parse_rep_server(&s), "exceeds");
        is_protocol(parse_rep_server(&[0, 0]), "too short");

        let mut m = 7u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_rep_meta_context(&m).unwrap(),
            (7, "base:allocation".into())
        );
        is_protocol(parse_rep_meta_context(&[0, 0, 1]), "too short");
        let mut big = 1u32.to_be_bytes().to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_STRING + 1));
        is_protocol(parse_rep_meta_context(&big), "string limit");
    }

    #[test]
    fn request_encoding() {
        let mut b = Vec::new();
        encode_request(
            &mut b,
            CMD_FLAG_REQ_ONE,
            CMD_BLOCK_STATUS,
            0x0102,
            4096,
            512,
        );
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(&b[..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(&b[4..6], &[0, 8]);
        assert_eq!(&b[6..8], &[0, 7]);
        assert_eq!(&b[8..16], &0x0102u64.to_be_bytes());
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(&b[24..28], &512u32.to_be_bytes());
        let d = go_data("x", &[INFO_EXPORT, INFO_BLOCK_SIZE]).unwrap();
        assert_eq!(d, [0, 0, 0, 1, b'x', 0, 2, 0, 0, 0, 3]);
        assert!(put_string32(&mut Vec::new(), "a\0b").is_err());
        assert!(put_string32(&mut Vec::new(), &"a".repeat(MAX_STRING + 1)).is_err());
    }

    #[test]
    fn reply_headers() {
        let mut s = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&5u32.to_be_bytes());
        s.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            parse_reply_header(&s).unwrap(),
            ReplyHeader::Simple {
                error: 5,
                cookie: 9
            }
        );
        let mut c = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        c.extend_from_slice(&1u16.to_be_bytes());
        c.extend_from_slice(&2u16.to_be_bytes());
        c.extend_from_slice(&3u64.to_be_bytes());
        c.extend_from_slice(&12u32.to_be_bytes());
        assert_eq!(
            parse_reply_header(&c).unwrap(),
            ReplyHeader::Chunk {
                flags: 1,
                kind: 2,
                cookie: 3,
                len: 12
            }
        );
        is_protocol(parse_reply_header(&c[..19]), "too short");
        is_protocol(
            parse_reply_header(&EXTENDED_REPLY_MAGIC.to_be_bytes()),
            "extended",
        );
        is_protocol(parse_reply_header(&[1, 2, 3, 4]), "0x01020304");
        is_protocol(reply_kind(&[1, 2]), "too short");
    }

    fn err_payload(errno: u32, msg: &[u8], offset: Option<u64>) -> Vec<u8> {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        if let Some(o) = offset {
            p.extend_from_slice(&o.to_be_bytes());
        }
        p
    }

    #[test]
    fn error_chunks() {
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR, &err_payload(5, b"oops", None)).unwrap(),
            ChunkError {
                errno: 5,
                message: "oops".into(),
                offset: None
            }
        );
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &err_payload(22, b"", Some(512))).unwrap(),
            ChunkError {
                errno: 22,
                message: String::new(),
                offset: Some(512)
            }
        );
        // Unknown error types are errors with whatever follows the message ignored.
        let unknown = REPLY_TYPE_ERROR_BIT | 0x77;
        let mut p = err_payload(5, b"m", None);
        p.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_error_chunk(unknown, &p).unwrap().errno, 5);
        // Malformed.
        is_protocol(
            parse_error_chunk(REPLY_TYPE_ERROR, &err_payload(0, b"", None)),
            "error value is 0",
        );
        is_protocol(
            parse_error_chunk(REPLY_TYPE_ERROR, &p),
            "bytes after the message",
        );
        is_protocol(
            parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &err_payload(5, b"m", None)),
            "instead of an 8-byte offset",
        );
        let mut short = err_payload(5, b"message", None);
        short.truncate(8);
        is_protocol(parse_error_chunk(REPLY_TYPE_ERROR, &short), "does not fit");
        is_protocol(
            parse_error_chunk(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0]),
            "too short",
        );
        let mut huge = 5u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u16::MAX.to_be_bytes());
        is_protocol(parse_error_chunk(REPLY_TYPE_ERROR, &huge), "exceeds");
        // Invalid UTF-8 in a message is shown, not fatal.
        let m = parse_error_chunk(REPLY_TYPE_ERROR, &err_payload(5, &[0xff, b'a'], None)).unwrap();
        assert_eq!(m.message, "\u{fffd}a");
    }

    #[test]
    fn offset_hole_and_data() {
        let mut p = 4096u64.to_be_bytes().to_vec();
        p.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_offset_hole(&p).unwrap(), (4096, 512));
        is_protocol(parse_offset_hole(&p[..11]), "instead of 12");
        p[8..].copy_from_slice(&[0; 4]);
        is_protocol(parse_offset_hole(&p), "hole size 0");
        assert_eq!(parse_offset_data_header(&p).unwrap(), 4096);
        is_protocol(parse_offset_data_header(&p[..7]), "too short");
    }

    fn bs_payload(id: u32, descs: &[(u32, u32)]) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        for (l, f) in descs {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        p
    }

    #[test]
    fn block_status_payloads() {
        let p = bs_payload(3, &[(4096, 3), (512, 0)]);
        assert_eq!(
            parse_block_status(&p).unwrap(),
            (3, vec![(4096, 3), (512, 0)])
        );
        is_protocol(parse_block_status(&bs_payload(3, &[])), "positive multiple");
        is_protocol(parse_block_status(&p[..15]), "positive multiple");
        is_protocol(
            parse_block_status(&bs_payload(3, &[(4096, 0), (0, 1)])),
            "descriptor 1",
        );
        assert_eq!(max_block_status_payload(4096, 512), 4 + 8 * 9);
        assert_eq!(
            max_block_status_payload(u32::MAX, 1),
            4 + 8 * MAX_DESCRIPTORS
        );
        assert_eq!(max_block_status_payload(0, 0), 12);
    }

    #[test]
    fn descriptors_become_clipped_extents() {
        let e = descriptors_to_extents(1000, 300, &[(100, 1), (500, 2)]).unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 1000,
                    length: 100,
                    flags: 1
                },
                Extent {
                    offset: 1100,
                    length: 200,
                    flags: 2
                },
            ]
        );
        // A prefix answer is fine.
        let e = descriptors_to_extents(0, 300, &[(100, 1)]).unwrap();
        assert_eq!(
            e,
            vec![Extent {
                offset: 0,
                length: 100,
                flags: 1
            }]
        );
        // Descriptors after the request's end are a violation.
        is_protocol(
            descriptors_to_extents(0, 300, &[(300, 1), (1, 0)]),
            "descriptor 1",
        );
        is_protocol(descriptors_to_extents(0, 300, &[]), "no descriptors");
        is_protocol(descriptors_to_extents(0, 300, &[(0, 0)]), "length 0");
        is_protocol(
            descriptors_to_extents(u64::MAX, 300, &[(1, 0), (1, 0)]),
            "overflow",
        );
        is_protocol(descriptors_to_extents(0, 0, &[(1, 0)]), "beyond");
    }

    #[test]
    fn coverage_detects_overlap_and_gaps() {
        let mut c = Coverage::new(100);
        c.add(10, 10).unwrap();
        c.add(30, 10).unwrap();
        assert!(c.add(15, 2).unwrap_err().contains("overlaps"));
        assert!(c.add(5, 6).unwrap_err().contains("overlaps"));
        assert!(c.add(19, 12).unwrap_err().contains("overlaps"));
        assert!(c.add(10, 10).unwrap_err().contains("overlaps"));
        assert!(c.add(95, 6).unwrap_err().contains("outside"));
        assert!(c.add(50, 0).unwrap_err().contains("empty"));
        assert!(c.add(u64::MAX, 2).unwrap_err().contains("outside"));
        c.add(20, 10).unwrap();
        assert_eq!(c.ranges.len(), 1, "adjacent ranges merge: {:?}", c.ranges);
        assert!(!c.is_complete());
        c.add(0, 10).unwrap();
        c.add(40, 60).unwrap();
        assert!(c.is_complete());
        assert_eq!(c.covered(), 100);
        assert_eq!(c.ranges.len(), 1);
    }
}
