//! Recovery from the datastore. This part is item-level recovery: a recovery point's
//! disk opened as a virtual disk straight from the datastore ([`open_disk`]), its
//! volumes and file systems browsed ([`browse`]) and files copied out ([`open_fs`] +
//! [`fsview::extract`]), all without restoring the disk; the same through the server's
//! API ([`remote`]); and a recovery point's disk as an NBD export ([`export`]).

pub mod export;
pub mod remote;

pub use export::PointExport;
pub use remote::{RemoteDisk, RemoteFs};

use datastore::{Datastore, Manifest};
use fsview::{Entry, EntryKind, FileSystem};
use protocol::{IlrEntry, IlrListing, IlrVolume};
use std::sync::Arc;
use vdisk::VirtualDisk;

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] datastore::Error),
    /// Not a `#[source]`: the message already includes it (printed once).
    #[error("{context}: {error}")]
    Fs {
        context: String,
        error: fsview::Error,
    },
}

impl Error {
    /// Whether the request named something that is not there (a 404 rather than a
    /// 4xx/5xx for damage).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Fs {
                error: fsview::Error::NotFound(_),
                ..
            }
        )
    }

    /// Whether the request itself is at fault (a path that climbs, a file listed as a
    /// folder, no partition chosen, an unsupported file system).
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            Error::Fs {
                error: fsview::Error::BadPath(_)
                    | fsview::Error::WrongKind(_)
                    | fsview::Error::Unsupported(_),
                ..
            }
        ) || matches!(self, Error::Store(datastore::Error::Invalid(_)))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Disk `disk` of recovery point `m` as a virtual disk that reads the datastore.
pub fn open_disk(ds: &Arc<Datastore>, m: &Manifest, disk: usize) -> Result<Arc<dyn VirtualDisk>> {
    let index = Arc::new(ds.blob_index()?);
    Ok(Arc::new(ds.open_disk_shared(m, disk, index)?))
}

fn fs_err(m: &Manifest, disk: usize, partition: Option<u32>) -> impl Fn(fsview::Error) -> Error {
    let context = match partition {
        Some(p) => format!("recovery point {} disk {disk} partition {p}", m.id),
        None => format!("recovery point {} disk {disk}", m.id),
    };
    move |error| Error::Fs {
        context: context.clone(),
        error,
    }
}

/// The file system of `partition` (see [`fsview::open_volume`] for `None`).
pub fn open_fs(
    disk: Arc<dyn VirtualDisk>,
    m: &Manifest,
    disk_no: usize,
    partition: Option<u32>,
) -> Result<Box<dyn FileSystem>> {
    let e = fs_err(m, disk_no, partition);
    let vol = fsview::open_volume(disk, partition).map_err(&e)?;
    fsview::open(vol).map_err(e)
}

/// Lists `path` in a recovery point's disk. With no partition chosen on a disk that
/// has several volumes (and `path` the root), the answer is the list of volumes.
pub fn browse(
    disk: Arc<dyn VirtualDisk>,
    m: &Manifest,
    disk_no: usize,
    partition: Option<u32>,
    path: &str,
) -> Result<IlrListing> {
    let e = fs_err(m, disk_no, partition);
    let mut out = IlrListing {
        recovery_point: m.id.clone(),
        disk: disk_no as u32,
        partition,
        fs: None,
        label: None,
        path: path.to_string(),
        volumes: Vec::new(),
        entries: Vec::new(),
    };
    if partition.is_none() {
        let (_, vols) = fsview::volumes(disk.as_ref()).map_err(&e)?;
        if vols.len() != 1 {
            if !path.trim_matches('/').is_empty() {
                return Err(e(fsview::Error::WrongKind(format!(
                    "the disk has {} partitions; choose one to browse {path}",
                    vols.len()
                ))));
            }
            out.volumes = vols
                .iter()
                .map(|v| IlrVolume {
                    number: v.number,
                    start: v.start,
                    size: v.length,
                    fs: v.fs.name().into(),
                    supported: v.fs.supported(),
                    partition_type: v.partition_type.clone(),
                    name: v.name.clone(),
                })
                .collect();
            return Ok(out);
        }
    }
    let mut fs = open_fs(disk, m, disk_no, partition)?;
    out.fs = Some(fs.kind().name().into());
    out.label = fs.label();
    let me = fs.stat(path).map_err(&e)?;
    let is_dir = me.kind == EntryKind::Dir;
    out.entries = if is_dir {
        fs.list(path).map_err(&e)?
    } else {
        vec![me]
    }
    .into_iter()
    .map(|en| {
        let target = if en.kind == EntryKind::Symlink {
            let p = join(path, &en.name, is_dir);
            fs.read_link(&p).ok()
        } else {
            None
        };
        entry(en, target)
    })
    .collect();
    Ok(out)
}

/// The path of `name` in folder `dir` (or `dir` itself when it named a file).
fn join(dir: &str, name: &str, listed_dir: bool) -> String {
    if !listed_dir {
        return dir.to_string();
    }
    format!("{}/{name}", dir.trim_end_matches('/'))
}

fn entry(e: Entry, target: Option<String>) -> IlrEntry {
    IlrEntry {
        name: e.name,
        kind: match e.kind {
            fsview::EntryKind::File => protocol::EntryKind::File,
            fsview::EntryKind::Dir => protocol::EntryKind::Dir,
            fsview::EntryKind::Symlink => protocol::EntryKind::Symlink,
            fsview::EntryKind::Other => protocol::EntryKind::Other,
        },
        size: e.size,
        modified: e.mtime.map(utc::rfc3339),
        modified_unix: e.mtime,
        mode: e.mode,
        id: e.id,
        target,
    }
}

/// Opens every volume of a recovery point's disk and lists its root folder: what the
/// server records after each backup, so a backup of a disk whose file system became
/// unreadable does not look healthy. Never fails: problems are the result.
pub fn check_volumes(disk: Arc<dyn VirtualDisk>, disk_no: u32) -> Vec<protocol::VolumeCheck> {
    let vols = match fsview::volumes(disk.as_ref()) {
        Ok((_, v)) => v,
        Err(e) => {
            return vec![protocol::VolumeCheck {
                disk: disk_no,
                partition: 0,
                fs: "unknown".into(),
                readable: false,
                root_entries: 0,
                problem: Some(format!("partition table: {e}")),
            }];
        }
    };
    vols.into_iter()
        .map(|v| {
            let mut c = protocol::VolumeCheck {
                disk: disk_no,
                partition: v.number,
                fs: v.fs.name().into(),
                readable: false,
                root_entries: 0,
                problem: None,
            };
            if !v.fs.supported() {
                c.problem = Some(match v.fs {
                    fsview::FsKind::Unknown => "no file system recognised".into(),
                    other => format!("{}: item-level recovery cannot read it", other.name()),
                });
                return c;
            }
            let listed = fsview::open_volume(disk.clone(), Some(v.number).filter(|n| *n > 0))
                .and_then(fsview::open)
                .and_then(|mut fs| fs.list("/"));
            match listed {
                Ok(entries) => {
                    c.readable = true;
                    c.root_entries = entries.len() as u64;
                }
                Err(e) => c.problem = Some(e.to_string()),
            }
            c
        })
        .collect()
}
