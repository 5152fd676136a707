//! NBD client for reading QEMU disk exports and their metadata contexts, and a small
//! NBD server ([`server`]) with a copy-on-write overlay ([`overlay`]) for serving a
//! recovery point to QEMU (instant recovery).
//!
//! The backup agent reads a point-in-time view of a live disk through QEMU's built-in
//! NBD server and asks it which ranges are allocated (`base:allocation`) and which
//! changed since the last backup (`qemu:dirty-bitmap:NAME`). No existing crate reads
//! dirty-bitmap contexts, so this one speaks the protocol itself: the fixed-newstyle
//! handshake, structured replies (required), `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`
//! with block-size constraints, pipelined `NBD_CMD_READ` and `NBD_CMD_BLOCK_STATUS`.
//! Extended headers are deliberately not negotiated.
//!
//! The server is not trusted: every length, offset, cookie and type read from the
//! socket is checked (see [`proto`], pure parsers that are fuzzed) and a violation
//! becomes [`Error::Protocol`]. After a protocol or I/O error the connection is marked
//! broken and every later call fails with [`Error::Broken`], so that a confused stream
//! can never hand out wrong data.
//!
//! ```no_run
//! let (addr, export) = nbd::parse_uri("nbd+unix:///drive0?socket=/run/backup.sock")?;
//! let client = nbd::Client::connect(&addr, &export, &["base:allocation"])?;
//! let extents = client.block_status("base:allocation", 0, client.size())?;
//! let mut buf = vec![0u8; 1 << 20];
//! client.read(0, &mut buf)?;
//! # let _ = extents;
//! # Ok::<(), nbd::Error>(())
//! ```

mod addr;
mod client;
pub mod overlay;
pub mod proto;
pub mod server;

pub use addr::{Addr, DEFAULT_PORT, parse_uri};
pub use client::{
    Client, DEFAULT_DEPTH, DEFAULT_MAX_REQUEST, DEFAULT_TIMEOUT, MAX_BLOCK_STATUS_REQUEST,
    list_exports, list_exports_on,
};
pub use overlay::{CowExport, MemExport, OverlayError};
pub use server::{Export, Listener, Server};

/// `base:allocation` flag: the extent is not allocated on the server (a hole).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME` flag: the extent is dirty (changed since the bitmap started).
pub const DIRTY: u32 = 1;

/// The `base:allocation` metadata context name.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

/// Name of the metadata context QEMU exposes for dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// A range of the export with the flags one metadata context reports for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    /// First byte after the extent (saturating: extents never reach `u64::MAX`).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Everything that can go wrong talking to an NBD server.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// The socket failed (including timeouts and the server closing the connection).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The server broke the protocol; the message names the reply, field and value.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server answered a request with an error (`errno` is the NBD error value).
    #[error("{what}: server error {} ({errno}){}", errno_name(*errno), msg_suffix(message))]
    Server {
        what: String,
        errno: u32,
        message: String,
    },
    /// The server refused an option during the handshake (`reply` is the NBD_REP_ERR_* value).
    #[error("{what}: refused by server with {} ({reply:#x}){}", proto::rep_name(*reply), msg_suffix(message))]
    Refused {
        what: String,
        reply: u32,
        message: String,
    },
    /// A requested metadata context was not granted by the server.
    #[error("server does not offer metadata context {context:?} on export {export:?}")]
    ContextNotAvailable { context: String, export: String },
    /// The server lacks something this client requires (structured replies, NBD_OPT_GO, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The caller asked for something impossible (range past the end, unknown context, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier protocol or I/O error left the connection in an unknown state.
    #[error("NBD connection is unusable after an earlier failure: {0}")]
    Broken(String),
}

impl Error {
    /// Whether this error leaves the byte stream in an unknown state, so that the
    /// connection must not be used again.
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::Protocol(_) | Error::Broken(_)
        )
    }
}

fn msg_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// Name of an NBD error value (the protocol's fixed subset of errno).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        proto::EPERM => "EPERM",
        proto::EIO => "EIO",
        proto::ENOMEM => "ENOMEM",
        proto::EINVAL => "EINVAL",
        proto::ENOSPC => "ENOSPC",
        proto::EOVERFLOW => "EOVERFLOW",
        proto::ENOTSUP => "ENOTSUP",
        proto::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error value",
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn protocol<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Protocol(msg.into()))
}

/// Merges adjacent extents with equal flags, in place (extents must be in order).
pub fn merge_extents(extents: &mut Vec<Extent>) {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..) {
        if e.length == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.flags == e.flags && last.end() == e.offset => {
                last.length = last.length.saturating_add(e.length);
            }
            _ => out.push(e),
        }
    }
    *extents = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_equal_neighbours_only() {
        let mut v = vec![
            Extent {
                offset: 0,
                length: 10,
                flags: 1,
            },
            Extent {
                offset: 10,
                length: 5,
                flags: 1,
            },
            Extent {
                offset: 15,
                length: 5,
                flags: 0,
            },
            Extent {
                offset: 20,
                length: 0,
                flags: 0,
            },
            Extent {
                offset: 20,
                length: 5,
                flags: 0,
            },
        ];
        merge_extents(&mut v);
        assert_eq!(
            v,
            vec![
                Extent {
                    offset: 0,
                    length: 15,
                    flags: 1
                },
                Extent {
                    offset: 15,
                    length: 10,
                    flags: 0
                },
            ]
        );
    }

    #[test]
    fn server_error_display_names_errno() {
        let e = Error::Server {
            what: "read".into(),
            errno: 5,
            message: "bad sector".into(),
        };
        assert_eq!(e.to_string(), "read: server error EIO (5): bad sector");
        assert!(!e.breaks_connection());
        assert!(Error::Protocol("x".into()).breaks_connection());
    }
}
