//! vhd (to be implemented).
use crate::backing::Backing;
use crate::check::CheckReport;
use crate::sink::{CreateOptions, Sink};
use crate::{Error, OpenCtx, Result, VirtualDisk};
use std::path::Path;
use std::sync::Arc;

pub(crate) fn open(file: Arc<dyn Backing>, _ctx: &OpenCtx) -> Result<Box<dyn VirtualDisk>> {
    Err(Error::unsupported(file.path(), "vhd not implemented yet"))
}

pub(crate) fn check(file: Arc<dyn Backing>, _ctx: &OpenCtx, report: &mut CheckReport) {
    report.error(
        "file",
        None,
        format!("{}: vhd check not implemented yet", file.path().display()),
    );
}

pub(crate) fn create(path: &Path, _opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    Err(Error::unsupported(path, "vhd writer not implemented yet"))
}

/// True when the last 512 bytes of `file` hold a valid VHD footer (a fixed VHD).
pub(crate) fn has_fixed_footer(file: &dyn Backing) -> Result<bool> {
    let _ = file;
    Ok(false)
}
