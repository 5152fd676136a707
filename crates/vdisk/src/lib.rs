//! Virtual disk formats behind one random-access interface.
//!
//! `vdisk` reads raw, VHD (fixed, dynamic, differencing), VHDX (fixed, dynamic,
//! differencing AVHDX chains, with log replay) and qcow2 (v2/v3, backing chains,
//! compressed clusters), and writes raw, VHD, VHDX and qcow2. It knows nothing about
//! backups: callers see a [`VirtualDisk`] with a size, `read_at` and an extent [`map`],
//! and write images through a [`Sink`] fed in increasing offset order (see [`copy`]).
//!
//! Formats are always detected from content ([`detect`]), never from file names.
//! Every structure read from a file is bounds-checked; damage becomes an [`Error`]
//! naming the file, the structure and the offset.
//!
//! [`map`]: VirtualDisk::map

pub mod aligned;
pub mod backing;
pub mod check;
pub mod copy;
mod error;
pub mod extent;
pub mod qcow2;
pub mod raw;
mod report;
pub mod sink;
pub mod vhd;
pub mod vhdx;
pub mod window;

pub use backing::{Backing, FileBacking, MemBacking};
pub use check::{CheckReport, Problem, Severity};
pub use copy::{CopyStats, convert, copy, copy_ranges};
pub use error::{Error, Result};
pub use extent::{Extent, ExtentState};
pub use sink::{CreateOptions, Sink};

use serde::Serialize;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Container formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Vhd,
    Vhdx,
    Qcow2,
}

impl Format {
    /// Lower-case name, as on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(Format::Raw),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::Invalid(format!(
                "unknown format {other:?} (expected raw, vhd, vhdx or qcow2)"
            ))),
        }
    }
}

/// How a container stores its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subformat {
    /// Every block preallocated (fixed VHD/VHDX); a raw file is also reported as fixed.
    Fixed,
    /// Blocks allocated on first write (dynamic VHD/VHDX, qcow2 without backing).
    Dynamic,
    /// Holds only what differs from a parent (differencing VHD, AVHDX, qcow2 with backing).
    Differencing,
}

impl Subformat {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Subformat::Fixed => "fixed",
            Subformat::Dynamic => "dynamic",
            Subformat::Differencing => "differencing",
        }
    }
}

impl std::str::FromStr for Subformat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fixed" => Ok(Subformat::Fixed),
            "dynamic" => Ok(Subformat::Dynamic),
            "differencing" => Ok(Subformat::Differencing),
            other => Err(Error::Invalid(format!(
                "unknown subformat {other:?} (expected dynamic or fixed)"
            ))),
        }
    }
}

/// What `holdfast image info` shows; one per file in a chain.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    pub path: PathBuf,
    pub format: Format,
    pub subformat: Subformat,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Allocation unit: VHD/VHDX block, qcow2 cluster; `None` for raw.
    pub block_size: Option<u64>,
    /// Length of the file.
    pub file_size: u64,
    /// Bytes the file occupies on the host file system.
    pub allocated_bytes: u64,
    /// Format-specific facts (creator, version, disk id, compression type...).
    pub details: Vec<(String, String)>,
    /// The parent (backing file) this image reads through, if any.
    pub parent: Option<Box<DiskInfo>>,
}

/// A virtual disk open for reading. Implementations are safe to share between threads:
/// readers use positioned reads and keep caches behind locks.
pub trait VirtualDisk: Send + Sync + Debug {
    /// Facts about the image and its parent chain.
    fn info(&self) -> DiskInfo;
    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;
    /// Fills `buf` with the virtual disk's bytes at `offset`. The whole range must lie
    /// within the virtual size (else [`Error::OutOfRange`]). Any offset and length work,
    /// sector-aligned ones are fastest.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The extents covering exactly `[offset, offset + length)`, in order, adjacent
    /// extents of the same state merged, resolved through the parent chain.
    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;
}

/// Longest parent chain we follow: deeper chains are refused rather than recursed.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// State carried while opening a chain: the files already open (loop detection) and
/// the depth.
#[derive(Debug, Clone, Default)]
pub struct OpenCtx {
    chain: Vec<PathBuf>,
}

impl OpenCtx {
    /// A context for opening a top-level image.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `path` as part of the chain; fails on a loop or a chain too deep.
    fn enter(&self, path: &Path) -> Result<OpenCtx> {
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(first) = self.chain.first()
            && self.chain.contains(&canon)
        {
            return Err(Error::parent(
                first,
                format!(
                    "loop in the parent chain: {} appears twice",
                    canon.display()
                ),
            ));
        }
        if self.chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::parent(
                path,
                format!("parent chain deeper than {MAX_CHAIN_DEPTH} images"),
            ));
        }
        let mut next = self.clone();
        next.chain.push(canon);
        Ok(next)
    }

    /// Depth of the image being opened (0 = the top image).
    pub fn depth(&self) -> usize {
        self.chain.len().saturating_sub(1)
    }

    /// Opens the parent `parent` of `child`. `expected` restricts the format (a VHDX
    /// parent must be VHDX); `None` accepts any (qcow2 backing files).
    pub fn open_parent(
        &self,
        child: &Path,
        parent: &Path,
        expected: Option<Format>,
    ) -> Result<Box<dyn VirtualDisk>> {
        if !parent.exists() {
            return Err(Error::parent(
                child,
                format!("parent {} does not exist", parent.display()),
            ));
        }
        let file = FileBacking::open(parent)?;
        let format = detect(file.as_ref())?;
        if let Some(want) = expected
            && want != format
        {
            return Err(Error::parent(
                child,
                format!("parent {} is {format}, expected {want}", parent.display()),
            ));
        }
        open_backing_ctx(file, self)
    }
}

/// Detects the container format from the first and last bytes of a file.
pub fn detect(file: &dyn Backing) -> Result<Format> {
    let mut head = [0u8; 8];
    let n = file.len().min(8) as usize;
    file.read_exact_at(&mut head[..n], 0, "file signature")?;
    if &head == b"vhdxfile" {
        return Ok(Format::Vhdx);
    }
    if head[..4] == qcow2::MAGIC {
        return Ok(Format::Qcow2);
    }
    if &head == b"conectix" {
        return Ok(Format::Vhd);
    }
    if vhd::has_fixed_footer(file)? {
        return Ok(Format::Vhd);
    }
    Ok(Format::Raw)
}

/// Opens an image read-only, detecting its format and opening its parent chain.
pub fn open(path: &Path) -> Result<Box<dyn VirtualDisk>> {
    open_backing(FileBacking::open(path)?)
}

/// Opens an image from any [`Backing`] (files, or memory in tests and fuzzing).
pub fn open_backing(file: Arc<dyn Backing>) -> Result<Box<dyn VirtualDisk>> {
    open_backing_ctx(file, &OpenCtx::new())
}

fn open_backing_ctx(file: Arc<dyn Backing>, ctx: &OpenCtx) -> Result<Box<dyn VirtualDisk>> {
    let ctx = ctx.enter(file.path())?;
    match detect(file.as_ref())? {
        Format::Raw => raw::open(file),
        Format::Vhd => vhd::open(file, &ctx),
        Format::Vhdx => vhdx::open(file, &ctx),
        Format::Qcow2 => qcow2::open(file, &ctx),
    }
}

/// Creates a new image file at `path` (which must not exist) and returns its writer.
/// The dispatch by format lives here, above both [`sink`] and the writers, so the
/// writers can use the sink's types without the sink importing every format.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    if opts.subformat == Subformat::Differencing && opts.parent.is_none() {
        return Err(Error::Invalid(
            "a differencing image needs a parent".to_string(),
        ));
    }
    match opts.format {
        Format::Raw => raw::create(path, opts),
        Format::Vhd => vhd::create(path, opts),
        Format::Vhdx => vhdx::create(path, opts),
        Format::Qcow2 => qcow2::create(path, opts),
    }
}

/// Repairs what can be repaired in place: today, replays a VHDX's dirty log into the
/// file (as Hyper-V does when it opens a disk for writing). Returns a description of
/// what was done, or `None` when nothing needed doing.
pub fn repair(path: &Path) -> Result<Option<String>> {
    let file = FileBacking::open(path)?;
    match detect(file.as_ref())? {
        Format::Vhdx => {
            drop(file);
            vhdx::replay_log_in_place(path)
        }
        _ => Ok(None),
    }
}

/// Checks that a range lies within the virtual disk; shared by every reader.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            offset,
            len: len as u64,
            size,
        }),
    }
}
