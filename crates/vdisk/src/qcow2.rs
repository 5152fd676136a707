//! qcow2 (to be implemented).
use crate::backing::Backing;
use crate::check::CheckReport;
use crate::sink::{CreateOptions, Sink};
use crate::{Error, OpenCtx, Result, VirtualDisk};
use std::path::Path;
use std::sync::Arc;

pub(crate) fn open(file: Arc<dyn Backing>, _ctx: &OpenCtx) -> Result<Box<dyn VirtualDisk>> {
    Err(Error::unsupported(file.path(), "qcow2 not implemented yet"))
}

pub(crate) fn check(file: Arc<dyn Backing>, _ctx: &OpenCtx, report: &mut CheckReport) {
    report.error(
        "file",
        None,
        format!("{}: qcow2 check not implemented yet", file.path().display()),
    );
}

pub(crate) fn create(path: &Path, _opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    Err(Error::unsupported(path, "qcow2 writer not implemented yet"))
}

/// The qcow2 signature `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
