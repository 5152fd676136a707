//! The datastore's error type: every message names the file (key) and what is wrong.

use std::path::PathBuf;

/// Everything that can go wrong in the datastore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation on a file.
    #[error("{}: {op}: {err}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        err: std::io::Error,
    },
    /// A stored file is damaged: checksum, tag or structure mismatch.
    #[error("{key}: damaged: {detail}")]
    Corrupt { key: String, detail: String },
    /// A stored file that should exist does not.
    #[error("{key}: missing from the datastore")]
    Missing { key: String },
    /// The datastore was written by a newer holdfast, or is not a datastore at all.
    #[error("{0}")]
    Format(String),
    /// The key is missing or does not belong to this datastore.
    #[error("{0}")]
    Key(String),
    /// A caller asked for something impossible (bad option, bad range, unknown id...).
    #[error("{0}")]
    Invalid(String),
    /// Data sent by a remote agent failed validation (the session is then unusable).
    #[error("rejected: {0}")]
    Rejected(String),
    /// Reading a source disk failed.
    #[error(transparent)]
    Disk(#[from] vdisk::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            err,
        }
    }

    pub(crate) fn corrupt(key: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            key: key.into(),
            detail: detail.into(),
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
