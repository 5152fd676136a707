//! VHDX (reader to be implemented on branch `vhdx`; the writer lives in `write`).

mod write;
use crate::backing::Backing;
use crate::check::CheckReport;
use crate::sink::{CreateOptions, Sink};
use crate::{Error, OpenCtx, Result, VirtualDisk};
use std::path::Path;
use std::sync::Arc;

pub(crate) fn open(file: Arc<dyn Backing>, _ctx: &OpenCtx) -> Result<Box<dyn VirtualDisk>> {
    Err(Error::unsupported(file.path(), "vhdx not implemented yet"))
}

pub(crate) fn check(file: Arc<dyn Backing>, _ctx: &OpenCtx, report: &mut CheckReport) {
    report.error(
        "file",
        None,
        format!("{}: vhdx check not implemented yet", file.path().display()),
    );
}

pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    write::create(path, opts)
}

/// Replays a dirty log into the file.
pub(crate) fn replay_log_in_place(path: &Path) -> Result<Option<String>> {
    Err(Error::unsupported(
        path,
        "vhdx log replay not implemented yet",
    ))
}
