//! The API's view of a recovery point: what travels in [`crate::RecoveryPlan`],
//! [`crate::SessionStart`], [`crate::Commit`] and [`crate::ReplicaSeed`]. These are the
//! API's own types, so the wire format does not follow the datastore's on-disk manifest
//! by accident; the datastore converts (`From` both ways in `datastore::wire`) and a
//! test there checks that both serialize to the same JSON.

use serde::{Deserialize, Serialize};

/// What was protected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `HOST/VM`.
    pub name: String,
    /// A stable id (the VM's UUID when known; else the name).
    pub id: String,
}

/// How consistent the point-in-time view was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Applications flushed (VSS writers / guest hooks).
    ApplicationConsistent,
    /// File systems frozen (guest agent fsfreeze).
    FileConsistent,
    /// As after a power cut (a paused VM, or disk files at rest).
    CrashConsistent,
}

string_enum!(Consistency {
    CrashConsistent => "crash-consistent",
    FileConsistent => "file-consistent",
    ApplicationConsistent => "application-consistent",
});

/// One recovery point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub source: Source,
    /// UTC, RFC 3339.
    pub created: String,
    pub created_unix: i64,
    /// The recovery point this one was based on (unchanged data reused from it).
    pub base: Option<String>,
    pub consistency: Consistency,
    pub disks: Vec<DiskRecord>,
    pub stats: Stats,
}

/// One disk of a recovery point and its index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskRecord {
    /// 0-based position in the recovery point.
    pub index: u32,
    /// File name of the source image.
    pub name: String,
    /// Format of the source image (`raw`, `vhdx`, `vhd`, `qcow2`).
    pub format: String,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Bytes per index entry (the last block may be shorter).
    pub block_size: u32,
    /// Index entries per index piece.
    pub piece_blocks: u32,
    /// Ids (hex) of the index pieces, in disk order; each holds `piece_blocks` block ids.
    pub pieces: Vec<String>,
    pub stats: Stats,
    /// Byte ranges left out of the backup (page file, swap) and stored as zeros,
    /// `(offset, length)`, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<(u64, u64)>,
}

impl DiskRecord {
    /// Number of blocks (index entries) of the disk.
    pub fn blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size.max(1) as u64)
    }
}

/// What a backup did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Bytes read from the source disks.
    pub bytes_read: u64,
    /// Bytes added to the datastore (new blobs, framed, compressed, encrypted).
    pub bytes_stored: u64,
    /// Plaintext bytes of the new data blobs.
    pub bytes_new: u64,
    /// Blocks stored as new blobs.
    pub blocks_new: u64,
    /// Blocks read whose blob the datastore already had.
    pub blocks_dedup: u64,
    /// Blocks taken from the base recovery point without reading (changed-range backups).
    pub blocks_reused: u64,
    /// Blocks that read as zeros (nothing stored).
    pub blocks_zero: u64,
    /// Total of the changed ranges given, when the backup used them.
    pub changed_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistencies_travel_as_their_names() {
        for &c in Consistency::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(Consistency::parse(c.as_str()), Some(c));
            assert_eq!(serde_json::from_str::<Consistency>(&json).unwrap(), c);
        }
        assert_eq!(Consistency::ALL.len(), 3);
        assert_eq!(Consistency::parse("bogus"), None);
    }
}
