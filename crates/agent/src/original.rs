//! Recovery over a VM's original instance (`recover --original [--stop-vm [--start]]`).
//!
//! The provider's [`Instance`] says where the disks are and how to stop and start the
//! VM; the flow here keeps the VM's downtime short and never leaves a half-written
//! disk:
//! 1. every disk's restored copy is written, complete and fsynced, to a hidden
//!    temporary sibling of its original file (same folder, so the rename is atomic),
//!    in the recovery point's format, while the VM still runs (cancellable);
//! 2. a running VM is stopped (refused unless the plan says `stop_vm`);
//! 3. each copy is renamed over its original and the folder fsynced;
//! 4. with `start`, the VM is started again.
//!
//! Any failure before 3 removes the copies and leaves the disks as they were.

use crate::fetch::{Fetch, image_options, open_disk};
use crate::provider::{Instance, OriginalDisk};
use crate::{Error, Result};
use datastore::DiskRecord;
use protocol::{RecoveryPlan, RecoveryTarget};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;
use vdisk::Format;
use vdisk::copy::TempPath;

/// Runs a recovery over the original instance. `progress(done, total)` follows the
/// bytes of virtual disk written; `note` receives the lines for the job log (VM
/// stopped, files replaced, VM started). Returns the files replaced.
pub fn recover(
    fetch: &Fetch,
    plan: &RecoveryPlan,
    vm: &str,
    inst: &mut dyn Instance,
    progress: &mut dyn FnMut(u64, u64),
    note: &mut dyn FnMut(&str),
) -> Result<Vec<PathBuf>> {
    let RecoveryTarget::Original { stop_vm, start } = plan.target else {
        return Err(Error::Invalid(
            "not a recovery to the original instance".into(),
        ));
    };
    if start && !stop_vm {
        return Err(Error::Invalid("start needs stop_vm".into()));
    }
    let m = &datastore::Manifest::from(plan.manifest.clone());
    let files = inst.disk_files()?;
    let targets = match_disks(&m.disks, &files, vm, &m.id)?;
    // Checked before anything is written; checked again right before stopping.
    let was_running = inst.running()?;
    if was_running && !stop_vm {
        return Err(Error::Invalid(format!(
            "VM {vm} is running; add --stop-vm to stop it for the recovery"
        )));
    }

    // 1. The copies, while the VM runs. Each TempPath removes its file when dropped,
    // so any error or a cancel from here to the renames leaves nothing behind.
    let total: u64 = m.disks.iter().map(|r| r.virtual_size).sum();
    let mut before = 0u64;
    let mut copies: Vec<(TempPath, PathBuf)> = Vec::new();
    for (rec, path) in m.disks.iter().zip(&targets) {
        let tmp = TempPath::next_to(path).map_err(|err| disk_err(vm, err))?;
        write_copy(fetch, &m.id, rec, &tmp, vm, &mut |done| {
            progress(before.saturating_add(done), total)
        })?;
        before = before.saturating_add(rec.virtual_size);
        copies.push((tmp, path.clone()));
    }
    if fetch.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled("the recovery was cancelled".into()));
    }
    note(&format!(
        "{} restored disk(s) written beside the originals",
        copies.len()
    ));
    // The note's progress reply may carry a cancel: the last moment to honour it.
    if fetch.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled("the recovery was cancelled".into()));
    }

    // The restored files will not hold the old change tracking (QEMU keeps its
    // bitmaps in the qcow2 being replaced). Forgotten before stopping, so a failure
    // here leaves the VM running; at worst the next backup reads everything.
    inst.forget_tracking()?;

    // 2. Stop. From here on a cancel is not honoured: the rest takes seconds, and
    // stopping halfway would leave the VM down for nothing. A failed stop says in its
    // error whether the VM is down.
    let running = inst.running()?;
    let stopped_at = Instant::now();
    if running {
        let how = inst.stop()?;
        note(&format!("VM {vm} stopped ({how})"));
    }

    // 3. Swap the files in.
    let n = copies.len();
    let mut replaced = Vec::new();
    for (i, (tmp, path)) in copies.into_iter().enumerate() {
        if let Err(err) = tmp.persist(&path, true) {
            let state = if running {
                "; the VM was left stopped"
            } else {
                ""
            };
            return Err(Error::Invalid(format!(
                "replacing {}: {err}; {} of {n} disk file(s) were replaced before it ({}){state}",
                path.display(),
                i,
                if replaced.is_empty() {
                    "none".to_string()
                } else {
                    replaced
                        .iter()
                        .map(|p: &PathBuf| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        }
        replaced.push(path);
    }
    note(&format!("{n} disk file(s) replaced"));

    // 4. Start again, or say that the VM stays stopped.
    if running {
        if start {
            match inst.start() {
                Ok(how) => note(&format!(
                    "VM {vm} started again ({how}); it was down for {} ms",
                    stopped_at.elapsed().as_millis()
                )),
                Err(e) => {
                    return Err(Error::Hypervisor {
                        vm: vm.to_string(),
                        msg: format!(
                            "the disks were replaced, but the VM did not start again: {e}"
                        ),
                    });
                }
            }
        } else {
            note(&format!("VM {vm} left stopped (no --start)"));
        }
    } else if was_running {
        note(&format!(
            "VM {vm} had stopped by itself before its disks were replaced; it was not started"
        ));
    }
    Ok(replaced)
}

/// The original file of each disk of the point, by name; refused when a disk is gone
/// or the hypervisor opens it in another format than the point's.
fn match_disks(
    disks: &[DiskRecord],
    files: &[OriginalDisk],
    vm: &str,
    point: &str,
) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for (i, rec) in disks.iter().enumerate() {
        let f = files.iter().find(|f| f.name == rec.name).ok_or_else(|| {
            Error::Invalid(format!(
                "disk {i} ({}) of recovery point {point} is no longer a disk of VM {vm}; recover with --alternate",
                rec.name
            ))
        })?;
        // Written in the point's format, which must be one this agent writes.
        if rec.format.parse::<Format>().is_err() {
            return Err(Error::Invalid(format!(
                "disk {i} ({}) of recovery point {point} is a {} image, which cannot be written; recover with --alternate --format",
                rec.name, rec.format
            )));
        }
        if let Some(fmt) = &f.format
            && fmt != &rec.format
        {
            return Err(Error::Invalid(format!(
                "disk {i} ({}) of VM {vm} is opened as {fmt}, but recovery point {point} holds it as {}; recover with --alternate",
                rec.name, rec.format
            )));
        }
        if out.contains(&f.path) {
            return Err(Error::Invalid(format!(
                "two disks of VM {vm} are the same file {}",
                f.path.display()
            )));
        }
        out.push(f.path.clone());
    }
    Ok(out)
}

fn disk_err(vm: &str, err: vdisk::Error) -> Error {
    Error::Disk {
        vm: vm.to_string(),
        err,
    }
}

/// Writes one disk of the point, complete and fsynced, into `tmp` in its format.
fn write_copy(
    fetch: &Fetch,
    point: &str,
    rec: &DiskRecord,
    tmp: &TempPath,
    vm: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let format: Format = rec
        .format
        .parse()
        .map_err(|e: vdisk::Error| Error::Invalid(e.to_string()))?;
    let disk = open_disk(fetch, point, rec)?;
    let opts = image_options(format, rec);
    let result = (|| {
        let mut sink = vdisk::create(tmp.path(), &opts)?;
        vdisk::copy(&disk, sink.as_mut(), progress)?;
        // finish() fsyncs the file (the options are durable).
        sink.finish()
    })();
    result.map_err(|err| {
        if fetch.cancel.load(Ordering::Relaxed) {
            Error::Cancelled("the recovery was cancelled".into())
        } else {
            disk_err(vm, err)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, format: &str) -> DiskRecord {
        DiskRecord {
            index: 0,
            name: name.into(),
            format: format.into(),
            virtual_size: 1 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            block_size: 65536,
            piece_blocks: 1024,
            pieces: Vec::new(),
            stats: Default::default(),
            excluded: Vec::new(),
        }
    }

    fn disk(name: &str, path: &str, format: Option<&str>) -> OriginalDisk {
        OriginalDisk {
            name: name.into(),
            path: path.into(),
            format: format.map(str::to_string),
        }
    }

    #[test]
    fn disks_are_matched_by_name_and_format() {
        let files = [
            disk("b", "/vm/b.raw", Some("raw")),
            disk("a", "/vm/a.qcow2", Some("qcow2")),
        ];
        let got = match_disks(&[rec("a", "qcow2"), rec("b", "raw")], &files, "vm", "p").unwrap();
        assert_eq!(
            got,
            [PathBuf::from("/vm/a.qcow2"), PathBuf::from("/vm/b.raw")]
        );
        let e = match_disks(&[rec("c", "raw")], &files, "vm", "p").unwrap_err();
        assert!(e.to_string().contains("no longer a disk"), "{e}");
        let e = match_disks(&[rec("a", "raw")], &files, "vm", "p").unwrap_err();
        assert!(e.to_string().contains("opened as qcow2"), "{e}");
        let e = match_disks(&[rec("a", "vmdk")], &files, "vm", "p").unwrap_err();
        assert!(e.to_string().contains("cannot be written"), "{e}");
        let same = [disk("a", "/x", None), disk("b", "/x", None)];
        let e = match_disks(&[rec("a", "raw"), rec("b", "raw")], &same, "vm", "p").unwrap_err();
        assert!(e.to_string().contains("same file"), "{e}");
    }
}
