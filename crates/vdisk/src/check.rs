//! Structural validation (`holdfast image check`): signatures, checksums, table bounds,
//! overlaps and parent linkage. A check collects every problem it can find instead of
//! stopping at the first, so an operator sees the whole extent of the damage.

use crate::backing::{Backing, FileBacking};
use crate::{Format, OpenCtx};
use std::path::Path;
use std::sync::Arc;

pub use crate::report::{CheckReport, Problem, Severity};

/// Checks the image at `path`.
pub fn check(path: &Path) -> CheckReport {
    match FileBacking::open(path) {
        Ok(f) => check_backing(f),
        Err(e) => {
            let mut r = CheckReport::new(path);
            r.from_error("file", &e);
            r
        }
    }
}

/// Checks an image from any [`Backing`].
pub fn check_backing(file: Arc<dyn Backing>) -> CheckReport {
    let mut r = CheckReport::new(file.path());
    let format = match crate::detect(file.as_ref()) {
        Ok(f) => f,
        Err(e) => {
            r.from_error("file signature", &e);
            return r;
        }
    };
    r.format = Some(format);
    let ctx = match OpenCtx::new().enter(file.path()) {
        Ok(c) => c,
        Err(e) => {
            r.from_error("parent chain", &e);
            return r;
        }
    };
    match format {
        Format::Raw => r.checked(format!(
            "raw image of {} bytes: no metadata to check",
            file.len()
        )),
        Format::Vhd => crate::vhd::check(file, &ctx, &mut r),
        Format::Vhdx => crate::vhdx::check(file, &ctx, &mut r),
        Format::Qcow2 => crate::qcow2::check(file, &ctx, &mut r),
    }
    r
}
