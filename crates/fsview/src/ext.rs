//! Placeholder until the reader lands.

use crate::fs::FileSystem;
use crate::volume::Volume;
use crate::{Error, Result};

pub fn open(volume: Volume, kind: crate::FsKind) -> Result<Box<dyn FileSystem>> {
    let _ = (volume, kind);
    Err(Error::Unsupported("ext: not implemented yet".into()))
}
