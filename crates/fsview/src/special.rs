//! Page files, hibernation files and swap: data a backup does not need (the guest
//! rebuilds it), found from the file-system view of the same point in time so the
//! ranges are exact for that moment. Backups store these ranges as zeros.

use crate::probe::FsKind;
use crate::select::volumes;
use crate::volume::Volume;
use crate::{Error, Result, open};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use vdisk::{DiskInfo, Extent, VirtualDisk};

/// Names looked for in the root of every NTFS volume.
pub const PAGE_FILES: [&str; 3] = ["pagefile.sys", "hiberfil.sys", "swapfile.sys"];

/// The start of a swap partition kept: its header page (signature, UUID, label) lets
/// the restored partition be used without `mkswap`.
pub const SWAP_HEADER_KEPT: u64 = 64 << 10;

/// Most ranges reported per disk (a very fragmented page file keeps its largest runs).
pub const MAX_RANGES: usize = 1024;

/// What was found on one disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Special {
    /// Disk byte ranges `(offset, length)`, sorted and disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// Human lines: "partition 2: /pagefile.sys, 16.0 MiB in 3 ranges".
    pub found: Vec<String>,
    /// Volumes that could not be examined, and why.
    pub problems: Vec<String>,
}

/// Finds page/hibernation/swap files on NTFS volumes and Linux swap partitions of
/// `disk`. A volume that cannot be read is reported in `problems`, never guessed at.
pub fn page_and_swap(disk: Arc<dyn VirtualDisk>) -> Result<Special> {
    let (_, vols) = volumes(disk.as_ref())?;
    let mut out = Special::default();
    for v in vols {
        let what = if v.number == 0 {
            "whole disk".to_string()
        } else {
            format!("partition {}", v.number)
        };
        match v.fs {
            FsKind::LinuxSwap if v.length > SWAP_HEADER_KEPT => {
                out.ranges
                    .push((v.start + SWAP_HEADER_KEPT, v.length - SWAP_HEADER_KEPT));
                out.found.push(format!(
                    "{what}: Linux swap, {} bytes after its header",
                    v.length - SWAP_HEADER_KEPT
                ));
            }
            FsKind::Ntfs => {
                let vol = if v.number == 0 {
                    Volume::whole(disk.clone())
                } else {
                    Volume::new(disk.clone(), v.start, v.length)?
                };
                if let Err(e) = ntfs_files(vol, v.start, &what, &mut out) {
                    out.problems.push(format!("{what}: {e}"));
                }
            }
            _ => {}
        }
    }
    out.ranges.sort_unstable();
    if out.ranges.len() > MAX_RANGES {
        out.ranges.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
        out.ranges.truncate(MAX_RANGES);
        out.ranges.sort_unstable();
    }
    // Disjoint: file extents never overlap, but a corrupt volume could claim so.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.ranges.len());
    for (o, l) in std::mem::take(&mut out.ranges) {
        match merged.last_mut() {
            Some(last) if o <= last.0.saturating_add(last.1) => {
                let end = o.saturating_add(l).max(last.0.saturating_add(last.1));
                last.1 = end - last.0;
            }
            _ => merged.push((o, l)),
        }
    }
    out.ranges = merged;
    Ok(out)
}

fn ntfs_files(vol: Volume, start: u64, what: &str, out: &mut Special) -> Result<()> {
    let len = vol.len();
    let mut fs = open(vol)?;
    for name in PAGE_FILES {
        let path = format!("/{name}");
        let ranges = match fs.data_ranges(&path) {
            Ok(Some(r)) => r,
            Ok(None) => continue, // resident or compressed: nothing worth leaving out
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let mut bytes = 0u64;
        let n = ranges.len();
        for (o, l) in ranges {
            // Ranges come from the volume's own metadata: keep them inside it.
            o.checked_add(l).filter(|e| *e <= len).ok_or_else(|| {
                Error::corrupt(format!("{path} data run"), o, "passes the volume end")
            })?;
            out.ranges.push((start + o, l));
            bytes += l;
        }
        out.found
            .push(format!("{what}: {path}, {bytes} bytes in {n} range(s)"));
    }
    Ok(())
}

type Req = (u64, usize, mpsc::Sender<vdisk::Result<Vec<u8>>>);

/// A `'static` stand-in for a borrowed disk: reads are served by the thread that
/// holds the borrow (see [`scoped`]); after it ends they fail.
#[derive(Debug)]
struct Proxy {
    tx: Mutex<mpsc::Sender<Req>>,
    info: DiskInfo,
}

impl VirtualDisk for Proxy {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }
    fn virtual_size(&self) -> u64 {
        self.info.virtual_size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        let (rtx, rrx) = mpsc::channel();
        let gone = || vdisk::Error::Invalid("the disk is no longer available".into());
        locks::lock(&self.tx)
            .send((offset, buf.len(), rtx))
            .map_err(|_| gone())?;
        let data = rrx.recv().map_err(|_| gone())??;
        buf.copy_from_slice(&data);
        Ok(())
    }
    fn map(&self, offset: u64, length: u64) -> vdisk::Result<Vec<Extent>> {
        let _ = (offset, length);
        Err(vdisk::Error::Invalid(
            "allocation maps are not available through a scoped disk".into(),
        ))
    }
}

/// Runs `f` with `disk` as an `Arc<dyn VirtualDisk>` (file-system readers need an
/// owned, `'static` disk; backups hold a borrowed view).
pub fn scoped<R: Send>(
    disk: &dyn VirtualDisk,
    f: impl FnOnce(Arc<dyn VirtualDisk>) -> R + Send,
) -> R {
    let (tx, rx) = mpsc::channel::<Req>();
    let proxy: Arc<dyn VirtualDisk> = Arc::new(Proxy {
        tx: Mutex::new(tx),
        info: disk.info(),
    });
    std::thread::scope(|s| {
        let worker = s.spawn(move || f(proxy));
        // Serves reads until `f` has dropped every handle to the proxy.
        for (offset, len, reply) in rx {
            let mut buf = vec![0u8; len];
            let r = disk.read_at(&mut buf, offset).map(|_| buf);
            let _ = reply.send(r);
        }
        match worker.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_disk_reads_the_borrowed_one() {
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        let disk = vdisk::open_backing(vdisk::MemBacking::new(data.clone(), "m.img")).unwrap();
        let got = scoped(disk.as_ref(), |d| {
            let mut b = vec![0u8; 1000];
            d.read_at(&mut b, 5000).unwrap();
            b
        });
        assert_eq!(got, data[5000..6000]);
    }

    #[test]
    fn blank_disk_has_nothing_special() {
        let disk: Arc<dyn VirtualDisk> = Arc::from(
            vdisk::open_backing(vdisk::MemBacking::new(vec![0u8; 1 << 20], "z")).unwrap(),
        );
        let s = page_and_swap(disk).unwrap();
        assert!(s.ranges.is_empty() && s.found.is_empty());
    }
}
