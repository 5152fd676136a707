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

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            err: source,
        }
    }
}
