//! A recovery point read through the server's API, for a host with the admin
//! credentials but no datastore: [`RemoteDisk`], its disk as a [`VirtualDisk`]
//! (`GET .../disks/{n}/data` and `.../map`, which the server reads through its own
//! `datastore::PointDisk`), and [`RemoteFs`], a volume's file system as an
//! [`fsview::FileSystem`] (`.../browse` and `.../file`), so that `export-nbd` and
//! `ilr get` through the server work as they do on a datastore folder.

use client::{Client, seg};
use fsview::{Entry, EntryKind, FileSystem};
use protocol::{DiskExtent, IlrEntry, IlrListing};
use std::io::Write;
use vdisk::VirtualDisk;

/// Cache granularity through the server (the default datastore block size).
pub const REMOTE_BLOCK: u32 = 64 << 10;
/// Bytes per `data` request (the server's limit).
const REMOTE_READ: u64 = 4 << 20;

/// A recovery point's disk read through the server's API.
pub struct RemoteDisk {
    cl: Client,
    /// `/recovery-points/{id}/disks/{n}`.
    base: String,
    /// `&from=…` when read from a storage target's online copy, else empty.
    from: String,
    size: u64,
}

impl std::fmt::Debug for RemoteDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDisk")
            .field("base", &self.base)
            .finish()
    }
}

fn remote_err(e: impl std::fmt::Display) -> vdisk::Error {
    vdisk::Error::Invalid(format!("server: {e}"))
}

/// The client's own error, kept whole (the message reads as `remote_err`'s).
fn client_err(e: client::Error) -> vdisk::Error {
    vdisk::Error::other("server", e)
}

impl RemoteDisk {
    /// Disk `disk` (of `size` bytes) of recovery point `point`, read through `cl`
    /// from the server's datastore, or from `from` (`online:NAME`).
    pub fn new(cl: Client, point: &str, disk: usize, size: u64, from: Option<&str>) -> RemoteDisk {
        RemoteDisk {
            base: format!("/recovery-points/{}/disks/{disk}", seg(point)),
            from: from_q(from),
            size,
            cl,
        }
    }

    fn check(&self, offset: u64, len: u64) -> vdisk::Result<()> {
        datastore::check_range(offset, len, self.size)
    }
}

impl VirtualDisk for RemoteDisk {
    fn info(&self) -> vdisk::DiskInfo {
        vdisk::DiskInfo {
            path: format!("server:{}", self.base).into(),
            format: vdisk::Format::Raw,
            subformat: vdisk::Subformat::Fixed,
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            block_size: Some(u64::from(REMOTE_BLOCK)),
            file_size: 0,
            allocated_bytes: 0,
            details: Vec::new(),
            parent: None,
        }
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut pos = offset;
        for piece in buf.chunks_mut(REMOTE_READ as usize) {
            let n = piece.len() as u64;
            let got = self
                .cl
                .get_bytes(&format!(
                    "{}/data?offset={pos}&length={n}{}",
                    self.base, self.from
                ))
                .map_err(client_err)?;
            if got.len() as u64 != n {
                return Err(remote_err(format!(
                    "{} bytes at {pos}, asked for {n}",
                    got.len()
                )));
            }
            piece.copy_from_slice(&got);
            pos += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> vdisk::Result<Vec<vdisk::Extent>> {
        self.check(offset, length)?;
        let list: Vec<DiskExtent> = self
            .cl
            .get(&format!(
                "{}/map?offset={offset}&length={length}{}",
                self.base, self.from
            ))
            .map_err(client_err)?;
        // The answer must tile the asked range exactly.
        let mut pos = offset;
        let mut out = Vec::with_capacity(list.len());
        for e in list {
            if e.offset != pos || e.length == 0 {
                return Err(remote_err(format!(
                    "allocation map gap or overlap at {pos}"
                )));
            }
            pos = pos
                .checked_add(e.length)
                .filter(|&p| p <= offset + length)
                .ok_or_else(|| remote_err("allocation map passes the asked range"))?;
            out.push(vdisk::Extent {
                offset: e.offset,
                length: e.length,
                state: if e.zero {
                    vdisk::ExtentState::Zero
                } else {
                    vdisk::ExtentState::Data
                },
            });
        }
        if pos != offset + length {
            return Err(remote_err("allocation map ends early"));
        }
        Ok(out)
    }
}

/// `/recovery-points/{point}/browse?disk=N[&partition=P][&from=F]`; a `path` goes
/// after it ([`path_q`]).
pub fn browse_path(point: &str, disk: u32, partition: Option<u32>, from: Option<&str>) -> String {
    let mut p = format!("/recovery-points/{}/browse?disk={disk}", seg(point));
    if let Some(n) = partition {
        p.push_str(&format!("&partition={n}"));
    }
    p.push_str(&from_q(from));
    p
}

/// The `&from=` query parameter (`online:NAME`), or nothing for the datastore.
pub fn from_q(from: Option<&str>) -> String {
    from.map(|f| format!("&from={}", seg(f)))
        .unwrap_or_default()
}

/// The `&path=` query parameter.
pub fn path_q(path: &str) -> String {
    format!("&path={}", seg(path))
}

/// A recovery point's file system seen through the server's API, so `ilr get` against
/// a server uses the same safe extraction as local mode.
pub struct RemoteFs {
    cl: Client,
    base: String,
    file: String,
    /// Whether the file system matches names without case (from the first listing).
    ignore_case: Option<bool>,
}

impl RemoteFs {
    /// The file system of `disk` (`partition`, when given) of recovery point `point`.
    pub fn new(
        cl: Client,
        point: &str,
        disk: u32,
        partition: Option<u32>,
        from: Option<&str>,
    ) -> RemoteFs {
        let base = browse_path(point, disk, partition, from);
        RemoteFs {
            file: base.replace("/browse?", "/file?"),
            base,
            cl,
            ignore_case: None,
        }
    }

    fn listing(&mut self, path: &str) -> fsview::Result<IlrListing> {
        let l: IlrListing = self
            .cl
            .get(&format!("{}{}", self.base, path_q(path)))
            .map_err(|e| match e.status() {
                Some(404) => fsview::Error::NotFound(format!("{path}: {e}")),
                Some(400 | 422) => fsview::Error::WrongKind(e.to_string()),
                _ => fsview::Error::Io(std::io::Error::other(e.to_string())),
            })?;
        if let Some(fs) = &l.fs {
            self.ignore_case = Some(fsview::FsKind::name_ignores_case(fs));
        }
        Ok(l)
    }
}

fn from_api(e: IlrEntry) -> Entry {
    Entry {
        name: e.name,
        kind: match e.kind.as_str() {
            "file" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            _ => EntryKind::Other,
        },
        size: e.size,
        mtime: e.modified_unix,
        mtime_nanos: 0,
        mode: e.mode,
        id: e.id,
    }
}

impl FileSystem for RemoteFs {
    fn kind(&self) -> fsview::FsKind {
        fsview::FsKind::Unknown
    }
    fn label(&self) -> Option<String> {
        None
    }
    fn list(&mut self, path: &str) -> fsview::Result<Vec<Entry>> {
        Ok(self
            .listing(path)?
            .entries
            .into_iter()
            .map(from_api)
            .collect())
    }
    fn stat(&mut self, path: &str) -> fsview::Result<Entry> {
        let parts = fsview::components(path)?;
        let Some((last, dir)) = parts.split_last() else {
            return Ok(Entry::root(0));
        };
        let parent = format!("/{}", dir.join("/"));
        let entries = self.listing(&parent)?.entries;
        // The rule the server's own lookups follow (case-insensitive on NTFS/FAT/exFAT).
        let ci = self.ignore_case.unwrap_or(false);
        fsview::find_name(&entries, last, ci, |e| e.name.as_str().into())
            .cloned()
            .map(from_api)
            .ok_or_else(|| fsview::Error::NotFound(path.to_string()))
    }
    fn read_link(&mut self, path: &str) -> fsview::Result<String> {
        self.listing(path)?
            .entries
            .into_iter()
            .next()
            .and_then(|e| e.target)
            .ok_or_else(|| fsview::Error::WrongKind(format!("{path} is not a symbolic link")))
    }
    fn read_file(&mut self, path: &str, out: &mut dyn Write) -> fsview::Result<u64> {
        self.cl
            .get_to(&format!("{}{}", self.file, path_q(path)), out)
            .map_err(|e| fsview::Error::Io(std::io::Error::other(e.to_string())))
    }
}
