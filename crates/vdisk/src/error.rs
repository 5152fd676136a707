//! One error type for every format: each variant names the file, and where it applies
//! the structure and the byte offset, so an operator can find the damage.

use std::path::PathBuf;

/// Everything that can go wrong while opening, reading, checking or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation on a file.
    #[error("{}: {op}: {err}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        /// Not a `#[source]`: the message already includes it, and chained printing
        /// would repeat it.
        err: std::io::Error,
    },
    /// A structure extends past the end of the file.
    #[error("{}: truncated: {structure} at offset {offset:#x} needs {len} bytes but the file ends at {file_len:#x}", path.display())]
    Truncated {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    /// A structure is present but its content is invalid.
    #[error("{}: corrupt {structure} at offset {offset:#x}: {detail}", path.display())]
    Corrupt {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        detail: String,
    },
    /// A valid image using a feature this implementation refuses (on purpose) to read.
    #[error("{}: unsupported: {detail}", path.display())]
    Unsupported { path: PathBuf, detail: String },
    /// The parent (backing file) of a differencing image is missing, wrong or loops.
    #[error("{}: parent: {detail}", path.display())]
    Parent { path: PathBuf, detail: String },
    /// A read or write outside the virtual disk.
    #[error(
        "out of range: offset {offset:#x} + length {len:#x} is beyond the virtual size {size:#x}"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A caller asked for something impossible (bad option, bad size...).
    #[error("{0}")]
    Invalid(String),
    /// An error of another crate, carried whole: a [`VirtualDisk`](crate::VirtualDisk)
    /// implemented elsewhere (a recovery point's blocks, a disk read over NBD or
    /// HTTPS) fails with its own error, which callers can still inspect
    /// (`error.downcast_ref`). `what` says what failed, empty when the error says it
    /// all. Like [`Error::Io`], not a `#[source]`: the message already includes it.
    #[error("{}", other_message(.what, .error.as_ref()))]
    Other {
        what: String,
        error: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// The message of [`Error::Other`]: `what: error`, or the error alone.
fn other_message(what: &str, error: &(dyn std::error::Error + Send + Sync)) -> String {
    if what.is_empty() {
        error.to_string()
    } else {
        format!("{what}: {error}")
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(
        path: impl Into<PathBuf>,
        structure: &'static str,
        offset: u64,
        detail: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            path: path.into(),
            structure,
            offset,
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Error::Parent`].
    pub fn parent(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Parent {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Error::Other`]: another crate's `error`, with what failed
    /// (`""` when the error says it all).
    pub fn other(
        what: impl Into<String>,
        error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Other {
            what: what.into(),
            error: error.into(),
        }
    }

    /// The foreign error an [`Error::Other`] carries, if it is a `T`.
    pub fn foreign<T: std::error::Error + 'static>(&self) -> Option<&T> {
        match self {
            Error::Other { error, .. } => error.downcast_ref::<T>(),
            _ => None,
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            err: source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("blob 7 is missing")]
    struct Foreign;

    #[test]
    fn other_keeps_the_foreign_error() {
        let e = Error::other("", Foreign);
        assert_eq!(e.to_string(), "blob 7 is missing");
        assert!(e.foreign::<Foreign>().is_some());
        assert!(e.foreign::<std::io::Error>().is_none());
        let e = Error::other("server", Foreign);
        assert_eq!(e.to_string(), "server: blob 7 is missing");
        assert!(std::error::Error::source(&e).is_none());
        assert!(Error::Invalid("x".into()).foreign::<Foreign>().is_none());
    }
}
