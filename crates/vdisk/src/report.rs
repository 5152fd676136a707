//! What a structural check finds: [`CheckReport`] and its [`Problem`]s. Its own
//! module so the format checkers fill a report without importing [`crate::check`],
//! which dispatches to them.

use crate::Format;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Damage: data may be unreadable or wrong.
    Error,
    /// Worth knowing, but every byte still reads correctly (a stale header copy, a
    /// log waiting for replay, leaked space).
    Warning,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// The structure concerned ("header 1", "BAT entry 17", "L2 table"...).
    pub structure: String,
    /// Byte offset in the file, when known.
    pub offset: Option<u64>,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match self.offset {
            Some(o) => write!(
                f,
                "{sev}: {} at offset {o:#x}: {}",
                self.structure, self.detail
            ),
            None => write!(f, "{sev}: {}: {}", self.structure, self.detail),
        }
    }
}

/// The result of checking one image.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub path: PathBuf,
    /// `None` when the file could not even be read.
    pub format: Option<Format>,
    pub problems: Vec<Problem>,
    /// Short lines saying what was examined (for the operator's confidence).
    pub checked: Vec<String>,
}

impl CheckReport {
    pub(crate) fn new(path: &Path) -> Self {
        CheckReport {
            path: path.to_path_buf(),
            format: None,
            problems: Vec::new(),
            checked: Vec::new(),
        }
    }

    /// Records damage.
    pub fn error(
        &mut self,
        structure: impl Into<String>,
        offset: Option<u64>,
        detail: impl Into<String>,
    ) {
        self.problems.push(Problem {
            severity: Severity::Error,
            structure: structure.into(),
            offset,
            detail: detail.into(),
        });
    }

    /// Records something harmless but notable.
    pub fn warning(
        &mut self,
        structure: impl Into<String>,
        offset: Option<u64>,
        detail: impl Into<String>,
    ) {
        self.problems.push(Problem {
            severity: Severity::Warning,
            structure: structure.into(),
            offset,
            detail: detail.into(),
        });
    }

    /// Records an [`Error`](crate::Error) returned by a parser as damage. The report
    /// is about one file already, so the message drops the path and keeps the
    /// structure and offset as fields.
    pub fn from_error(&mut self, structure: &str, err: &crate::Error) {
        match err {
            crate::Error::Corrupt {
                structure: s,
                offset,
                detail,
                ..
            } => self.error(*s, Some(*offset), detail.clone()),
            crate::Error::Truncated {
                structure: s,
                offset,
                len,
                file_len,
                ..
            } => self.error(
                *s,
                Some(*offset),
                format!("needs {len} bytes but the file ends at {file_len:#x}"),
            ),
            other => self.error(structure, None, other.to_string()),
        }
    }

    /// Notes what was examined.
    pub fn checked(&mut self, what: impl Into<String>) {
        self.checked.push(what.into());
    }

    /// True when at least one problem is an error.
    pub fn is_damaged(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Error)
    }
}
