//! Holdfast's datastore: where recovery points of virtual disks live.
//!
//! A recovery point is a manifest listing its disks; each disk is an index of
//! fixed-size blocks (64 KiB by default), each block a content id or "zero". Blocks are
//! stored once as blobs (zstd-compressed when that pays, AES-256-GCM-encrypted when the
//! datastore is), many blobs to a pack file; index pieces are blobs too. Every
//! recovery point is therefore a full image by reference, and an incremental stores
//! only the blocks that changed, plus the index pieces that changed.
//!
//! docs/datastore-format.md describes the on-disk format; ARCHITECTURE.md places this
//! crate in the whole.

pub mod backend;
mod backup;
mod copy;
pub mod crypto;
pub mod error;
pub mod format;
mod gc;
pub mod id;
mod ingest;
pub mod manifest;
pub mod prune;
pub mod ranges;
mod restore;
mod store;
mod throttle;
mod verify;
mod wire;

pub use backend::{Backend, LocalBackend};
pub use backup::{BackupRequest, BaseChoice, BlockParams, BlockTarget, DiskInput, backup_disks};
pub use copy::{CopyOptions, CopyReport};
pub use error::{Error, Result};
pub use gc::GcReport;
pub use id::Id;
pub use ingest::{Ingest, MAX_REMOTE_DISK, decode_framed_block, decode_framed_piece};
pub use manifest::{Consistency, DiskRecord, Manifest, Source, Stats};
pub use prune::{Decision, Retention};
pub use restore::{
    BlobSource, BlockRead, DiskRef, LocalBlobs, LocalPointDisk, PointDisk, block_extents,
    check_range,
};
pub use store::{BlobIndex, CONFIG_KEY, DamagedPoint, Datastore, StoreOptions, default_key_path};
pub use throttle::Throttle;
pub use verify::{DiskDamage, FileDamage, PointDamage, VerifyReport};
