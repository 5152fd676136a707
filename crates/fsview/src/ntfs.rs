//! Placeholder until the reader lands.

use crate::fs::FileSystem;
use crate::volume::Volume;
use crate::{Error, Result};

pub fn open(volume: Volume) -> Result<Box<dyn FileSystem>> {
    let _ = volume;
    Err(Error::Unsupported("ntfs: not implemented yet".into()))
}
