//! Choosing a volume of a disk: the partitions (with the file system each holds), or
//! the whole disk when it has no partition table.

use crate::probe::{FsKind, probe};
use crate::table::{PartKind, PartitionTable, TableKind, read_partitions};
use crate::volume::Volume;
use crate::{Error, Result};
use std::sync::Arc;
use vdisk::VirtualDisk;

/// One volume of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The partition number (1-based, as in /dev/sda1); 0 for a whole-disk volume.
    pub number: u32,
    pub start: u64,
    pub length: u64,
    /// The file system found by signature.
    pub fs: FsKind,
    /// What the partition table calls it ("Microsoft basic data", "MBR type 0x83"...).
    pub partition_type: String,
    /// GPT partition name.
    pub name: Option<String>,
}

/// The disk's partition table and its volumes (extended-partition containers left
/// out: their logical partitions are listed instead).
pub fn volumes(disk: &dyn VirtualDisk) -> Result<(PartitionTable, Vec<VolumeInfo>)> {
    let table = read_partitions(disk)?;
    let mut out = Vec::new();
    if table.kind == TableKind::None {
        out.push(VolumeInfo {
            number: 0,
            start: 0,
            length: disk.virtual_size(),
            fs: probe(disk, 0, disk.virtual_size())?,
            partition_type: "whole disk".into(),
            name: None,
        });
    }
    for p in &table.partitions {
        let partition_type = match &p.kind {
            PartKind::Mbr(0x05 | 0x0F | 0x85) => continue,
            PartKind::Mbr(t) => format!("MBR type {t:#04x}"),
            PartKind::Gpt { description, .. } => description.to_string(),
        };
        out.push(VolumeInfo {
            number: p.number,
            start: p.start,
            length: p.length,
            fs: probe(disk, p.start, p.length)?,
            partition_type,
            name: p.name.clone(),
        });
    }
    Ok((table, out))
}

/// The volume `partition` of `disk`; without a number: the whole disk when it has no
/// partition table, its only partition when it has one, else an error listing them.
pub fn open_volume(disk: Arc<dyn VirtualDisk>, partition: Option<u32>) -> Result<Volume> {
    let (_, vols) = volumes(disk.as_ref())?;
    let v = match partition {
        Some(n) => vols.iter().find(|v| v.number == n).ok_or_else(|| {
            Error::NotFound(format!("partition {n} (the disk has {})", describe(&vols)))
        })?,
        None => match vols.as_slice() {
            [one] => one,
            [] => {
                return Err(Error::NotFound(
                    "the disk's partition table lists no partitions".into(),
                ));
            }
            _ => {
                return Err(Error::WrongKind(format!(
                    "the disk has several partitions; choose one with --partition: {}",
                    describe(&vols)
                )));
            }
        },
    };
    if v.number == 0 {
        Ok(Volume::whole(disk))
    } else {
        Volume::new(disk, v.start, v.length)
    }
}

fn describe(vols: &[VolumeInfo]) -> String {
    if vols.is_empty() {
        return "no partitions".into();
    }
    vols.iter()
        .map(|v| format!("{} ({}, {} bytes)", v.number, v.fs.name(), v.length))
        .collect::<Vec<_>>()
        .join(", ")
}
