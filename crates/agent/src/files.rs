//! Provider `files`: VMs at rest, one folder each under a root folder.
//!
//! A VM folder is either a Hyper-V export (`Virtual Hard Disks/*.vhdx|vhd|avhdx`, the
//! VM's GUID from `Virtual Machines/<GUID>.vmcx`) or any folder of
//! `*.vhdx|vhd|avhdx|qcow2|raw|img` images, optionally described by a `vm.toml`:
//!
//! ```toml
//! name = "web01"                  # default: the folder name
//! id = "4c4c4544-0031-..."        # the VM's stable id
//! disks = ["os.qcow2", "data/d1.vhdx"]   # explicit list and order
//! ```
//!
//! Without an explicit list, only the leaves of differencing chains are disks (a leaf
//! reads through its parents), sorted by file name. Files at rest make crash-consistent
//! recovery points; there is no change tracking, so every backup reads everything and
//! the pipeline compares blocks by checksum.

use crate::provider::{Provider, View};
use crate::{Error, Result};
use datastore::DiskInput;
use protocol::{Consistency, JobKind, Manifest, VmDisk, VmInfo};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use vdisk::VirtualDisk;

/// Extensions of disk images in a plain VM folder (compared case-insensitively).
const DISK_EXT: &[&str] = &["vhdx", "vhd", "avhdx", "qcow2", "raw", "img"];
/// Extensions of disk images in a Hyper-V export's `Virtual Hard Disks` folder.
const HYPERV_EXT: &[&str] = &["vhdx", "vhd", "avhdx"];
const HYPERV_DISKS: &str = "virtual hard disks";
const HYPERV_VMS: &str = "virtual machines";
const VM_TOML: &str = "vm.toml";

/// The `files` provider over one root folder.
#[derive(Debug, Clone)]
pub struct FilesProvider {
    root: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmToml {
    name: Option<String>,
    id: Option<String>,
    disks: Option<Vec<String>>,
}

/// A VM folder as a scan finds it, before any image is opened.
#[derive(Debug)]
struct Found {
    name: String,
    id: Option<String>,
    dir: PathBuf,
    /// Disk names (relative to `dir`, `/`-separated), in order.
    disks: Vec<String>,
    /// From `vm.toml`: taken as listed (no chain-leaf filtering; missing = error).
    explicit: bool,
}

/// An opened disk of a VM.
#[derive(Debug)]
struct Opened {
    name: String,
    format: String,
    disk: Box<dyn VirtualDisk>,
}

impl FilesProvider {
    pub fn new(root: impl Into<PathBuf>) -> FilesProvider {
        FilesProvider { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every sub-folder of the root that is a VM, sorted by folder name; a folder whose
    /// `vm.toml` is unusable comes back as `Err((folder name, error))`.
    #[allow(clippy::type_complexity)]
    fn scan(&self) -> Result<Vec<std::result::Result<Found, (String, Error)>>> {
        let mut dirs = Vec::new();
        for (name, path) in list_dir(&self.root)? {
            // Hidden folders are tool state (`.holdfast`, `.snapshots`), not VMs.
            if name.starts_with('.') || !path.is_dir() {
                continue;
            }
            dirs.push((name, path));
        }
        dirs.sort();
        let mut out = Vec::new();
        let mut names = HashSet::new();
        for (folder, dir) in dirs {
            match scan_vm(&folder, &dir) {
                Ok(Some(f)) => {
                    if names.insert(f.name.clone()) {
                        out.push(Ok(f));
                    } else {
                        let e = Error::Config {
                            path: dir.join(VM_TOML),
                            msg: format!("another folder already holds a VM named {:?}", f.name),
                        };
                        out.push(Err((folder, e)));
                    }
                }
                Ok(None) => {}
                Err(e) => out.push(Err((folder, e))),
            }
        }
        Ok(out)
    }
}

/// The entries of a folder with UTF-8 names (others cannot be VM or disk names).
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "listing", e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, "listing", e))?;
        if let Ok(name) = ent.file_name().into_string() {
            out.push((name, ent.path()));
        }
    }
    Ok(out)
}

fn has_ext(name: &str, exts: &[&str]) -> bool {
    match name.rsplit_once('.') {
        Some((stem, ext)) => !stem.is_empty() && exts.iter().any(|e| ext.eq_ignore_ascii_case(e)),
        None => false,
    }
}

/// `8-4-4-4-12` hex digits, as Hyper-V names its configuration files.
fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The sub-folder of `dir` whose name matches `want` case-insensitively.
fn sub_dir(dir: &Path, want: &str) -> Result<Option<(String, PathBuf)>> {
    Ok(list_dir(dir)?
        .into_iter()
        .filter(|(n, p)| n.eq_ignore_ascii_case(want) && p.is_dir())
        .min())
}

/// Image files directly in `dir` with one of `exts`, named `prefix` + file name.
fn images_in(dir: &Path, exts: &[&str], prefix: &str) -> Result<Vec<String>> {
    Ok(list_dir(dir)?
        .into_iter()
        .filter(|(n, p)| has_ext(n, exts) && p.is_file())
        .map(|(n, _)| format!("{prefix}{n}"))
        .collect())
}

fn hyperv_guid(dir: &Path) -> Result<Option<String>> {
    let Some((_, vms)) = sub_dir(dir, HYPERV_VMS)? else {
        return Ok(None);
    };
    let mut ids: Vec<String> = list_dir(&vms)?
        .into_iter()
        .filter_map(|(n, _)| {
            let (stem, ext) = n.rsplit_once('.')?;
            let cfg = ext.eq_ignore_ascii_case("vmcx") || ext.eq_ignore_ascii_case("xml");
            (cfg && is_guid(stem)).then(|| stem.to_string())
        })
        .collect();
    ids.sort();
    Ok(ids.into_iter().next())
}

/// A disk name from `vm.toml`: relative, inside the VM folder.
fn check_rel(path: &Path, rel: &str) -> Result<()> {
    let p = Path::new(rel);
    let inside = !rel.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if inside {
        Ok(())
    } else {
        Err(Error::Config {
            path: path.to_path_buf(),
            msg: format!("disk {rel:?} must be a path relative to the VM folder, without `..`"),
        })
    }
}

/// Reads one VM folder; `None` when it holds no disks (not a VM).
fn scan_vm(folder: &str, dir: &Path) -> Result<Option<Found>> {
    let toml_path = dir.join(VM_TOML);
    let cfg = match std::fs::read_to_string(&toml_path) {
        Ok(text) => Some(toml::from_str::<VmToml>(&text).map_err(|e| Error::Config {
            path: toml_path.clone(),
            msg: e.to_string(),
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&toml_path, "reading", e)),
    };
    let cfg = cfg.unwrap_or(VmToml {
        name: None,
        id: None,
        disks: None,
    });
    let name = cfg.name.unwrap_or_else(|| folder.to_string());
    if name.trim().is_empty() || name.contains('/') {
        return Err(Error::Config {
            path: toml_path,
            msg: format!("VM name {name:?} must be non-empty and must not contain `/`"),
        });
    }
    let id = match cfg.id {
        Some(id) if !id.trim().is_empty() => Some(id),
        _ => hyperv_guid(dir)?,
    };
    let (disks, explicit) = match cfg.disks {
        Some(list) => {
            if list.is_empty() {
                return Err(Error::Config {
                    path: toml_path,
                    msg: "disks = [] lists no disks".into(),
                });
            }
            for rel in &list {
                check_rel(&toml_path, rel)?;
            }
            (list, true)
        }
        None => {
            let mut list = images_in(dir, DISK_EXT, "")?;
            if let Some((sub, path)) = sub_dir(dir, HYPERV_DISKS)? {
                list.extend(images_in(&path, HYPERV_EXT, &format!("{sub}/"))?);
            }
            list.sort();
            (list, false)
        }
    };
    if disks.is_empty() {
        return Ok(None);
    }
    Ok(Some(Found {
        name,
        id,
        dir: dir.to_path_buf(),
        disks,
        explicit,
    }))
}

/// The files an image reads through (its parents), canonical when possible.
fn ancestors(disk: &dyn VirtualDisk) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = disk.info().parent;
    while let Some(p) = cur {
        out.push(std::fs::canonicalize(&p.path).unwrap_or(p.path));
        cur = p.parent;
    }
    out
}

impl Found {
    /// Opens the VM's disks. Returns the disks that opened and the errors of those that
    /// did not (inventory shows what it can; a backup fails on the first error).
    fn open(&self) -> (Vec<Opened>, Vec<Error>) {
        let mut opened = Vec::new();
        let mut errors = Vec::new();
        for rel in &self.disks {
            let path = self.dir.join(rel);
            if self.explicit && !path.is_file() {
                errors.push(Error::DiskMissing {
                    vm: self.name.clone(),
                    disk: rel.clone(),
                    detail: format!(": {} (listed in {VM_TOML}) does not exist", path.display()),
                });
                continue;
            }
            match vdisk::open(&path) {
                Ok(disk) => opened.push(Opened {
                    name: rel.clone(),
                    format: disk.info().format.name().to_string(),
                    disk,
                }),
                Err(err) => errors.push(Error::Disk {
                    vm: self.name.clone(),
                    err,
                }),
            }
        }
        if !self.explicit {
            // A disk another disk reads through is part of that disk, not a disk itself.
            let parents: HashSet<PathBuf> = opened
                .iter()
                .flat_map(|o| ancestors(o.disk.as_ref()))
                .collect();
            opened.retain(|o| {
                let p = self.dir.join(&o.name);
                !parents.contains(&std::fs::canonicalize(&p).unwrap_or(p))
            });
        }
        (opened, errors)
    }

    fn info(&self) -> VmInfo {
        let (opened, errors) = self.open();
        for e in errors {
            eprintln!("holdfast agent: files: inventory: {e}");
        }
        VmInfo {
            name: self.name.clone(),
            vm_id: self.id.clone(),
            provider: protocol::ProviderKind::Files,
            disks: opened
                .iter()
                .map(|o| VmDisk {
                    name: o.name.clone(),
                    format: o.format.clone(),
                    virtual_size: o.disk.virtual_size(),
                })
                .collect(),
            running: None,
        }
    }
}

impl Provider for FilesProvider {
    fn name(&self) -> &'static str {
        "files"
    }

    fn disk_files(&self, vm: &str) -> Result<Vec<(String, PathBuf)>> {
        for f in self.scan()? {
            match f {
                Ok(f) if f.name == vm => {
                    let (opened, errors) = f.open();
                    if let Some(e) = errors.into_iter().next() {
                        return Err(e);
                    }
                    return Ok(opened
                        .into_iter()
                        .map(|o| {
                            let path = f.dir.join(&o.name);
                            (o.name, path)
                        })
                        .collect());
                }
                Err((folder, e)) if folder == vm => return Err(e),
                _ => {}
            }
        }
        Err(Error::VmMissing(vm.to_string()))
    }

    fn inventory(&self) -> Result<Vec<VmInfo>> {
        let mut out = Vec::new();
        for f in self.scan()? {
            match f {
                Ok(f) => out.push(f.info()),
                Err((folder, e)) => {
                    eprintln!("holdfast agent: files: skipping folder {folder:?}: {e}")
                }
            }
        }
        Ok(out)
    }

    fn open_view(&self, vm: &str, kind: JobKind, base: Option<&Manifest>) -> Result<Box<dyn View>> {
        let mut broken = None;
        let mut found = None;
        for f in self.scan()? {
            match f {
                Ok(f) if f.name == vm => found = Some(f),
                Ok(_) => {}
                // The VM may be the one whose vm.toml broke: say so rather than "missing".
                Err((folder, e)) if folder == vm => broken = Some(e),
                Err(_) => {}
            }
        }
        let Some(found) = found else {
            return Err(broken.unwrap_or_else(|| Error::VmMissing(vm.to_string())));
        };
        let (disks, errors) = found.open();
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        if let (JobKind::Sync, Some(base)) = (kind, base) {
            for bd in &base.disks {
                let Some(now) = disks.iter().find(|d| d.name == bd.name) else {
                    return Err(Error::DiskMissing {
                        vm: vm.to_string(),
                        disk: bd.name.clone(),
                        detail: format!(
                            ": it is in recovery point {} but no longer in {}",
                            base.id,
                            found.dir.display()
                        ),
                    });
                };
                let size = now.disk.virtual_size();
                if size != bd.virtual_size {
                    return Err(Error::DiskResized {
                        vm: vm.to_string(),
                        disk: bd.name.clone(),
                        from: bd.virtual_size,
                        to: size,
                    });
                }
            }
        }
        Ok(Box::new(FilesView { disks }))
    }
}

/// Files at rest need no view: the opened images are the view.
struct FilesView {
    disks: Vec<Opened>,
}

impl View for FilesView {
    fn consistency(&self) -> Consistency {
        Consistency::CrashConsistent
    }

    fn disks(&self) -> Vec<DiskInput<'_>> {
        self.disks
            .iter()
            .map(|o| DiskInput {
                disk: o.disk.as_ref(),
                name: o.name.clone(),
                format: o.format.clone(),
                changed: None,
                excluded: Vec::new(),
            })
            .collect()
    }

    fn release(self: Box<Self>, _ok: bool) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use protocol::{DiskRecord, Source, Stats};
    use testkit::qemu_img;

    fn p(path: &Path) -> &str {
        path.to_str().expect("utf-8 temp path")
    }

    fn mkdir(path: &Path) {
        std::fs::create_dir_all(path).expect("mkdir");
    }

    fn raw(path: &Path, size: u64) {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(size))
            .expect("raw image");
    }

    fn avhdx(child: &Path, parent: &Path) {
        let mut o =
            vdisk::CreateOptions::new(vdisk::Format::Vhdx, vdisk::Subformat::Differencing, 0);
        o.parent = Some(parent.to_path_buf());
        o.virtual_size = vdisk::open(parent).expect("parent").virtual_size();
        vdisk::create(child, &o)
            .expect("create avhdx")
            .finish()
            .expect("finish avhdx");
    }

    fn names(vm: &VmInfo) -> Vec<&str> {
        vm.disks.iter().map(|d| d.name.as_str()).collect()
    }

    fn base_with(disks: &[(&str, u64)]) -> Manifest {
        Manifest {
            format: "holdfast-recovery-point".into(),
            version: 1,
            id: "rp1".into(),
            source: Source {
                name: "h1/vm".into(),
                id: "vm".into(),
            },
            created: "2025-01-01T00:00:00Z".into(),
            created_unix: 0,
            base: None,
            consistency: Consistency::CrashConsistent,
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, (n, size))| DiskRecord {
                    index: i as u32,
                    name: n.to_string(),
                    format: "qcow2".into(),
                    virtual_size: *size,
                    logical_sector_size: 512,
                    physical_sector_size: 4096,
                    block_size: 65536,
                    piece_blocks: 4096,
                    pieces: vec![],
                    stats: Stats::default(),
                    excluded: Vec::new(),
                })
                .collect(),
            stats: Stats::default(),
        }
    }

    const GUID: &str = "6F1A5C52-3B7E-4E0F-9D2A-0123456789AB";

    #[test]
    fn hyperv_export_backs_up_only_the_chain_leaf() {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("vm1");
        let vhd = vm.join("Virtual Hard Disks");
        mkdir(&vhd);
        mkdir(&vm.join("Virtual Machines"));
        mkdir(&vm.join("Snapshots"));
        std::fs::write(
            vm.join("Virtual Machines").join(format!("{GUID}.vmcx")),
            b"x",
        )
        .unwrap();
        std::fs::write(vm.join("Virtual Machines").join("notaguid.vmcx"), b"x").unwrap();
        qemu_img(&["create", "-q", "-f", "vhdx", p(&vhd.join("os.vhdx")), "8M"]);
        avhdx(&vhd.join("os_1.AVHDX"), &vhd.join("os.vhdx"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            p(&vhd.join("data.vhdx")),
            "4M",
        ]);

        let prov = FilesProvider::new(t.path());
        let inv = prov.inventory().unwrap();
        assert_eq!(inv.len(), 1);
        assert_eq!(inv[0].name, "vm1");
        assert_eq!(inv[0].vm_id.as_deref(), Some(GUID));
        assert_eq!(inv[0].provider, protocol::ProviderKind::Files);
        assert_eq!(inv[0].running, None);
        assert_eq!(
            names(&inv[0]),
            [
                "Virtual Hard Disks/data.vhdx",
                "Virtual Hard Disks/os_1.AVHDX"
            ]
        );
        assert_eq!(inv[0].disks[1].format, "vhdx");
        assert_eq!(inv[0].disks[1].virtual_size, 8 << 20);

        let snap = prov.open_view("vm1", JobKind::Sync, None).unwrap();
        assert_eq!(snap.consistency(), Consistency::CrashConsistent);
        let disks = snap.disks();
        assert_eq!(disks.len(), 2);
        assert!(disks.iter().all(|d| d.changed.is_none()));
        assert_eq!(disks[1].disk.virtual_size(), 8 << 20);
        drop(disks);
        snap.release(true).unwrap();
    }

    #[test]
    fn loose_folder_with_qcow2_backing_and_raw() {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("web");
        mkdir(&vm);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            p(&vm.join("base.qcow2")),
            "16M",
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            p(&vm.join("top.qcow2")),
        ]);
        raw(&vm.join("data.RAW"), 1 << 20);
        std::fs::write(vm.join("notes.txt"), b"not a disk").unwrap();
        let inv = FilesProvider::new(t.path()).inventory().unwrap();
        assert_eq!(inv.len(), 1);
        assert_eq!(inv[0].vm_id, None);
        assert_eq!(names(&inv[0]), ["data.RAW", "top.qcow2"]);
        assert_eq!(inv[0].disks[0].format, "raw");
        assert_eq!(inv[0].disks[1].format, "qcow2");
        assert_eq!(inv[0].disks[1].virtual_size, 16 << 20);
    }

    #[test]
    fn vm_toml_names_orders_and_identifies() {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("folder");
        mkdir(&vm.join("sub"));
        raw(&vm.join("sub/a.raw"), 1 << 20);
        qemu_img(&["create", "-q", "-f", "qcow2", p(&vm.join("z.qcow2")), "2M"]);
        raw(&vm.join("ignored.img"), 1 << 20);
        std::fs::write(
            vm.join("vm.toml"),
            "name = \"db01\"\nid = \"uuid-1\"\ndisks = [\"z.qcow2\", \"sub/a.raw\"]\n",
        )
        .unwrap();
        let prov = FilesProvider::new(t.path());
        let inv = prov.inventory().unwrap();
        assert_eq!(inv.len(), 1);
        assert_eq!(inv[0].name, "db01");
        assert_eq!(inv[0].vm_id.as_deref(), Some("uuid-1"));
        assert_eq!(names(&inv[0]), ["z.qcow2", "sub/a.raw"]);
        let snap = prov.open_view("db01", JobKind::ExpressFull, None).unwrap();
        let d: Vec<String> = snap.disks().into_iter().map(|d| d.name).collect();
        assert_eq!(d, ["z.qcow2", "sub/a.raw"]);
        // The folder name is not the VM's name any more.
        let e = prov.open_view("folder", JobKind::Sync, None).err().unwrap();
        assert_eq!(e.kind(), "vm-missing");
    }

    #[test]
    fn missing_listed_disk_fails_the_backup_but_not_the_inventory() {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("vm");
        mkdir(&vm);
        raw(&vm.join("a.raw"), 1 << 20);
        std::fs::write(vm.join("vm.toml"), "disks = [\"a.raw\", \"gone.vhdx\"]\n").unwrap();
        let prov = FilesProvider::new(t.path());
        let inv = prov.inventory().unwrap();
        assert_eq!(names(&inv[0]), ["a.raw"]);
        let e = prov
            .open_view("vm", JobKind::ExpressFull, None)
            .err()
            .unwrap();
        assert_eq!(e.kind(), "disk-missing");
        assert!(e.to_string().contains("gone.vhdx"), "{e}");
    }

    #[test]
    fn sync_detects_resize_and_vanished_disks_full_backups_accept_them() {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("vm");
        mkdir(&vm);
        qemu_img(&["create", "-q", "-f", "qcow2", p(&vm.join("os.qcow2")), "4M"]);
        let prov = FilesProvider::new(t.path());

        let same = base_with(&[("os.qcow2", 4 << 20)]);
        assert!(prov.open_view("vm", JobKind::Sync, Some(&same)).is_ok());

        let smaller = base_with(&[("os.qcow2", 2 << 20)]);
        let e = prov
            .open_view("vm", JobKind::Sync, Some(&smaller))
            .err()
            .unwrap();
        assert_eq!(e.kind(), "disk-resized");
        let msg = e.to_string();
        assert!(
            msg.contains("os.qcow2")
                && msg.contains("from 2097152 to 4194304 bytes")
                && msg.contains("consistency check"),
            "{msg}"
        );
        for kind in [
            JobKind::ExpressFull,
            JobKind::ConsistencyCheck,
            JobKind::InitialReplica,
        ] {
            assert!(
                prov.open_view("vm", kind, Some(&smaller)).is_ok(),
                "{kind:?}"
            );
        }

        let gone = base_with(&[("os.qcow2", 4 << 20), ("old.raw", 1 << 20)]);
        let e = prov
            .open_view("vm", JobKind::Sync, Some(&gone))
            .err()
            .unwrap();
        assert_eq!(e.kind(), "disk-missing");
        assert!(e.to_string().contains("old.raw"), "{e}");
        assert!(
            prov.open_view("vm", JobKind::ExpressFull, Some(&gone))
                .is_ok()
        );
    }

    #[test]
    fn corrupt_image_is_named() {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("vm");
        mkdir(&vm);
        let mut junk = b"vhdxfile".to_vec();
        junk.resize(300_000, 0xAB);
        std::fs::write(vm.join("broken.vhdx"), junk).unwrap();
        let prov = FilesProvider::new(t.path());
        let inv = prov.inventory().unwrap();
        assert_eq!(inv.len(), 1);
        assert!(inv[0].disks.is_empty());
        let e = prov.open_view("vm", JobKind::Sync, None).err().unwrap();
        assert_eq!(e.kind(), "io");
        assert!(e.to_string().contains("broken.vhdx"), "{e}");
    }

    #[test]
    fn folders_without_disks_and_bad_configs_are_skipped() {
        let t = tempfile::tempdir().unwrap();
        mkdir(&t.path().join("empty"));
        mkdir(&t.path().join("docs"));
        std::fs::write(t.path().join("docs/readme.txt"), b"hi").unwrap();
        mkdir(&t.path().join(".hidden"));
        raw(&t.path().join(".hidden/x.raw"), 4096);
        raw(&t.path().join("loose-file.raw"), 4096);
        let bad = t.path().join("bad");
        mkdir(&bad);
        raw(&bad.join("x.raw"), 4096);
        std::fs::write(bad.join("vm.toml"), "disks = [\"../escape.raw\"]\n").unwrap();
        let ok = t.path().join("ok");
        mkdir(&ok);
        raw(&ok.join("x.raw"), 4096);
        let prov = FilesProvider::new(t.path());
        let inv = prov.inventory().unwrap();
        assert_eq!(
            inv.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["ok"]
        );
        let e = prov.open_view("bad", JobKind::Sync, None).err().unwrap();
        assert_eq!(e.kind(), "config");
        assert!(e.to_string().contains("vm.toml"), "{e}");
        assert_eq!(
            prov.open_view("empty", JobKind::Sync, None)
                .err()
                .unwrap()
                .kind(),
            "vm-missing"
        );
        // No root at all is an error naming it, not a panic.
        let e = FilesProvider::new(t.path().join("nope"))
            .inventory()
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
