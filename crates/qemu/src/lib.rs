//! Synchronous clients for QEMU's machine protocol ([`qmp::Qmp`]) and guest agent
//! ([`qga::Qga`]), over unix stream sockets, std only.
//!
//! Both protocols are newline-delimited JSON. This crate treats everything read from a
//! socket as untrusted: reply lines are bounded ([`MAX_LINE`]), every blocking read and
//! write has a deadline, numbers are range-checked on conversion, and nothing panics.
//!
//! After a failure that leaves the byte stream in an unknown position (a timeout with a
//! reply outstanding, an I/O error, a malformed reply) a [`qmp::Qmp`] refuses further
//! calls with [`Error::Broken`]; a [`qga::Qga`] resynchronises with the agent instead
//! (see the `qga` module), because a hung guest is an expected condition, not a fault.

// Storage-product rules, enforced outside tests: nothing read from a socket may panic
// the caller or wrap around.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation
    )
)]

use std::time::Duration;

mod conn;
pub mod qga;
pub mod qmp;

pub use conn::MAX_LINE;
pub use qga::Qga;
pub use qmp::{Bitmap, BlockDevice, Qmp, RunState};

/// Everything that can go wrong talking to QEMU or its guest agent.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// The operating system refused an operation on the socket, or the peer closed it.
    /// `what` is the socket path and the action (`/run/vm1/qmp.sock: read`).
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Nothing (or not the expected thing) arrived in time; the text says what was awaited.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The peer sent something that is not the protocol: malformed JSON, an oversized
    /// line, a reply of the wrong shape. The text quotes a short excerpt.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// QEMU or the agent executed the command and reported `{"error":{"class","desc"}}`.
    #[error("{command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// The connection was abandoned after an earlier failure (the text repeats it);
    /// reconnect to continue. Returned instead of risking a reply being matched to the
    /// wrong request.
    #[error("connection unusable after an earlier failure ({0}); reconnect")]
    Broken(String),
    /// A name given by the caller (block node, ...) does not exist in QEMU.
    #[error("not found: {0}")]
    NotFound(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// True when the byte stream may be at an unknown position after this error, so
    /// that the next reply read could belong to an earlier request.
    pub(crate) fn desynchronises(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::Timeout(_) | Error::Protocol(_)
        )
    }
}

/// Formats a duration for messages: `1.5s`, `250ms`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_format_readably() {
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_secs(30)), "30.0s");
    }

    #[test]
    fn error_messages_name_the_command() {
        let e = Error::Command {
            command: "blockdev-del".into(),
            class: "GenericError".into(),
            desc: "Failed to find node".into(),
        };
        assert_eq!(
            e.to_string(),
            "blockdev-del: GenericError: Failed to find node"
        );
        assert!(!e.desynchronises());
        assert!(Error::Timeout("x".into()).desynchronises());
    }
}
