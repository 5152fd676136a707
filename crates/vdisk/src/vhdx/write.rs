//! VHDX writer: written on the `vhdxw` branch; this stub keeps the crate building
//! until that branch is merged.

use crate::sink::{CreateOptions, Sink};
use crate::{Error, Result};
use std::path::Path;

/// Creates a VHDX image (not available in this branch).
pub(crate) fn create(path: &Path, _opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    Err(Error::unsupported(path, "vhdx writer not implemented yet"))
}
