//! Whole-VM recovery on the agent: a recovery point's disks read from the server
//! ([`RemotePointDisk`], through [`crate::fetch`]) and written as image files with [`vdisk::copy::write_image`]
//! (temporary name, fsync, rename: a cancelled or failed recovery leaves no partial
//! file behind).

use crate::fetch::{Fetch, RemotePointDisk, image_options, open_disk};
use crate::{Error, Result};
use datastore::DiskRecord;
use protocol::{RecoveryPlan, RecoveryTarget};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use vdisk::{CreateOptions, Format, Subformat};

/// A file name from a disk name of the manifest: its last path component, without
/// anything that could leave the target folder; `fallback` when nothing usable is left.
pub fn safe_name(name: &str, fallback: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = last
        .chars()
        .filter(|c| !c.is_control() && *c != ':')
        .collect();
    let clean = clean.trim().trim_start_matches('.').to_string();
    if clean.is_empty() || clean == ".." {
        fallback.to_string()
    } else {
        clean
    }
}

/// `name` with its extension replaced by `format`'s.
fn with_ext(name: &str, format: &str) -> String {
    let stem = match name.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s,
        _ => name,
    };
    format!("{stem}.{format}")
}

/// One image to write.
struct Output {
    disk: usize,
    path: PathBuf,
    format: Format,
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |err| Error::Io {
        path: path.to_path_buf(),
        op,
        err,
    }
}

/// A folder made by this recovery: removed with what it holds unless kept.
struct NewDir {
    path: PathBuf,
    keep: bool,
}

impl NewDir {
    fn create(path: PathBuf) -> Result<NewDir> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent, "creating the folder"))?;
        }
        std::fs::create_dir(&path).map_err(|err| {
            if err.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Invalid(format!(
                    "{} already exists; recovery writes only into a new folder",
                    path.display()
                ))
            } else {
                Error::Io {
                    path: path.clone(),
                    op: "creating the folder",
                    err,
                }
            }
        })?;
        Ok(NewDir { path, keep: false })
    }
}

impl NewDir {
    /// A new folder `dir/base`, or `dir/base-2`, `dir/base-3`... when the name is
    /// taken (another job's, made the same second): created with `create_dir`, which
    /// fails rather than reuse a folder, so two jobs never share one.
    fn create_unique(dir: &Path, base: &str) -> Result<NewDir> {
        std::fs::create_dir_all(dir).map_err(io(dir, "creating the folder"))?;
        let mut last = None;
        for n in 1..=100u32 {
            let path = match n {
                1 => dir.join(base),
                n => dir.join(format!("{base}-{n}")),
            };
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(NewDir { path, keep: false }),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => last = Some(path),
                Err(err) => {
                    return Err(Error::Io {
                        path,
                        op: "creating the folder",
                        err,
                    });
                }
            }
        }
        Err(Error::Invalid(format!(
            "{} and 99 other names like it already exist; recovery writes only into a new folder",
            last.unwrap_or_else(|| dir.join(base)).display()
        )))
    }
}

impl Drop for NewDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn timestamp(unix: i64) -> String {
    // 2026-11-25T19:04:05Z -> 20261125-190405
    let s = utc::rfc3339(unix);
    let digits: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
    match (digits.get(..8), digits.get(8..14)) {
        (Some(d), Some(t)) => format!("{d}-{t}"),
        _ => digits,
    }
}

/// Runs a recovery into new files: the plan's disks (or a volume, or items) where its
/// target says ([`RecoveryTarget::Original`] is [`crate::original`]'s).
/// `progress(done, total)` follows the bytes of virtual disk written. Returns the files
/// written.
pub fn recover(
    fetch: &Fetch,
    plan: &RecoveryPlan,
    job: i64,
    vm: &str,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Recovered> {
    let m = &datastore::Manifest::from(plan.manifest.clone());
    let planned = match &plan.target {
        RecoveryTarget::Original { .. } => {
            // Over the original instance: crate::original (stop, swap in, start).
            return Err(Error::Invalid(
                "a recovery over the original instance runs through crate::original".into(),
            ));
        }
        RecoveryTarget::Alternate { dir, format, .. } => {
            plan_alternate(m, vm, Path::new(dir), format.as_deref())?
        }
        RecoveryTarget::CopyTo {
            dir,
            disk,
            partition,
            items,
            ..
        } => {
            // The job id keeps two jobs of the same second apart.
            let base = format!("holdfast_{}_job{job}", timestamp(utc::now()));
            let mut d = NewDir::create_unique(Path::new(dir), &base)?;
            if partition.is_some() || !items.is_empty() {
                let i = disk.unwrap_or(0) as usize;
                let rec = m.disks.get(i).ok_or_else(|| {
                    Error::Invalid(format!("recovery point {} has no disk {i}", m.id))
                })?;
                let src = open_disk(fetch, &m.id, rec)?;
                let out = if items.is_empty() {
                    let p = partition.unwrap_or(0);
                    copy_volume(fetch, &src, vm, i, p, &d.path, progress)?
                } else {
                    copy_items(fetch, &src, vm, i, *partition, items, &d.path, progress)?
                };
                d.keep = true;
                return Ok(out);
            }
            plan_copies(m, *disk, d)?
        }
    };
    write_planned(fetch, m, vm, planned, progress)
}

fn fmt_of(rec: &DiskRecord) -> Format {
    rec.format.parse().unwrap_or(Format::Raw)
}

/// What a recovery into new files writes, into a folder it made.
struct Planned {
    outputs: Vec<Output>,
    /// Description files written next to the disks once they are complete.
    descriptions: Vec<(PathBuf, String)>,
    dir: NewDir,
}

/// `--alternate`: a new VM folder `dir/<vm>` with every disk (in `format`, else its
/// own), a `vm.toml`, and for KVM formats a libvirt `domain.xml`.
fn plan_alternate(
    m: &datastore::Manifest,
    vm: &str,
    dir: &Path,
    format: Option<&str>,
) -> Result<Planned> {
    let folder = dir.join(safe_name(vm, "vm"));
    if folder.exists() {
        return Err(Error::Invalid(format!(
            "{} already exists; choose another folder or remove it",
            folder.display()
        )));
    }
    let d = NewDir::create(folder.clone())?;
    let mut outputs = Vec::new();
    let mut names = Vec::new();
    for (i, rec) in m.disks.iter().enumerate() {
        let f = match format {
            Some(f) => f
                .parse()
                .map_err(|e: vdisk::Error| Error::Invalid(e.to_string()))?,
            None => fmt_of(rec),
        };
        let base = safe_name(&rec.name, &format!("disk{i}"));
        let mut name = with_ext(&base, f.name());
        if names.contains(&name) {
            name = format!("disk{i}-{name}");
        }
        names.push(name.clone());
        outputs.push(Output {
            disk: i,
            path: folder.join(&name),
            format: f,
        });
    }
    let quoted: Vec<String> = names.iter().map(|n| toml_str(n)).collect();
    let mut descriptions = vec![(
        folder.join("vm.toml"),
        format!(
            "# Recovered by holdfast from recovery point {}\nname = {}\ndisks = [{}]\n",
            m.id,
            toml_str(vm),
            quoted.join(", ")
        ),
    )];
    // KVM targets (every disk qcow2 or raw) also get a libvirt domain.
    let kvm: Vec<(PathBuf, &'static str)> = outputs
        .iter()
        .filter_map(|o| match o.format {
            Format::Qcow2 => Some((o.path.clone(), "qcow2")),
            Format::Raw => Some((o.path.clone(), "raw")),
            _ => None,
        })
        .collect();
    if kvm.len() == outputs.len() {
        descriptions.push((
            folder.join("domain.xml"),
            libvirt_domain(&safe_name(vm, "vm"), &m.id, &kvm),
        ));
    }
    Ok(Planned {
        outputs,
        descriptions,
        dir: d,
    })
}

/// `--copy-to` of disk files: every disk (or disk `disk`) in its own format, into `d`.
fn plan_copies(m: &datastore::Manifest, disk: Option<u32>, d: NewDir) -> Result<Planned> {
    let mut outputs = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, rec) in m.disks.iter().enumerate() {
        if disk.is_some_and(|d| d as usize != i) {
            continue;
        }
        let mut name = safe_name(&rec.name, &format!("disk{i}.{}", rec.format));
        if names.contains(&name) {
            name = format!("disk{i}-{name}");
        }
        names.push(name.clone());
        outputs.push(Output {
            disk: i,
            path: d.path.join(name),
            format: fmt_of(rec),
        });
    }
    if outputs.is_empty() {
        return Err(Error::Invalid(format!(
            "recovery point {} has no disk {}",
            m.id,
            disk.unwrap_or(0)
        )));
    }
    Ok(Planned {
        outputs,
        descriptions: Vec::new(),
        dir: d,
    })
}

/// Writes the planned images, then their descriptions; the folder is kept only when
/// all of it was written.
fn write_planned(
    fetch: &Fetch,
    m: &datastore::Manifest,
    vm: &str,
    planned: Planned,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Recovered> {
    let Planned {
        outputs,
        descriptions,
        dir: mut dir_guard,
    } = planned;
    let total: u64 = outputs
        .iter()
        .filter_map(|o| m.disks.get(o.disk))
        .map(|r| r.virtual_size)
        .sum();
    let mut before = 0u64;
    let mut written = Vec::new();
    for o in &outputs {
        let rec = m
            .disks
            .get(o.disk)
            .ok_or_else(|| Error::Invalid(format!("no disk {}", o.disk)))?;
        let disk = open_disk(fetch, &m.id, rec)?;
        let opts = image_options(o.format, rec);
        vdisk::copy::write_image(&disk, &o.path, &opts, &mut |done, _| {
            progress(before.saturating_add(done), total)
        })
        .map_err(|err| cancelled_or(fetch, vm, err))?;
        before = before.saturating_add(rec.virtual_size);
        written.push(o.path.clone());
    }
    for (path, text) in descriptions {
        write_file(&path, text.as_bytes())?;
        written.push(path);
    }
    dir_guard.keep = true;
    Ok(Recovered {
        files: written,
        notes: Vec::new(),
    })
}

/// What a recovery wrote: the files (or, for items, the folder), and lines for the
/// job log.
#[derive(Debug, Default)]
pub struct Recovered {
    pub files: Vec<PathBuf>,
    pub notes: Vec<String>,
}

/// Partition `partition` of disk `disk` (0 = a disk without a partition table) as a
/// raw image `disk{N}-part{P}.img` in `folder`, its holes kept.
fn copy_volume(
    fetch: &Fetch,
    src: &RemotePointDisk<'_>,
    vm: &str,
    disk: usize,
    partition: u32,
    folder: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Recovered> {
    let fs_err =
        |e: fsview::Error| Error::Invalid(format!("disk {disk}: reading its partition table: {e}"));
    let (_, vols) = fsview::volumes(src).map_err(fs_err)?;
    let v = vols.iter().find(|v| v.number == partition).ok_or_else(|| {
        let have: Vec<String> = vols.iter().map(|v| v.number.to_string()).collect();
        Error::Invalid(format!(
            "disk {disk} has no partition {partition} (it has: {})",
            have.join(", ")
        ))
    })?;
    let window = vdisk::window::Window::new(src, v.start, v.length).map_err(|err| Error::Disk {
        vm: vm.to_string(),
        err,
    })?;
    let path = folder.join(format!("disk{disk}-part{partition}.img"));
    let opts = CreateOptions::new(Format::Raw, Subformat::Fixed, v.length);
    vdisk::copy::write_image(&window, &path, &opts, &mut |done, total| {
        progress(done, total)
    })
    .map_err(|err| cancelled_or(fetch, vm, err))?;
    Ok(Recovered {
        notes: vec![format!(
            "partition {partition} of disk {disk} ({}, {} bytes from byte {}) written as a raw image",
            v.fs.name(),
            v.length,
            v.start
        )],
        files: vec![path],
    })
}

/// Files and folders of a volume's file system into `folder` (through
/// [`fsview::extract`]: safe names, nothing followed, nothing overwritten).
#[allow(clippy::too_many_arguments)]
fn copy_items(
    fetch: &Fetch,
    src: &RemotePointDisk<'_>,
    vm: &str,
    disk: usize,
    partition: Option<u32>,
    items: &[String],
    folder: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Recovered> {
    let place = match partition {
        Some(p) => format!("disk {disk} partition {p}"),
        None => format!("disk {disk}"),
    };
    let (report, fs_name) = fsview::scoped(src, |d| -> Result<(fsview::Report, String)> {
        let err = |e: fsview::Error| {
            if fetch.cancel.load(Ordering::Relaxed) {
                Error::Cancelled("the recovery was cancelled".into())
            } else {
                Error::Invalid(format!("{place}: {e}"))
            }
        };
        let vol = fsview::open_volume(d, partition).map_err(err)?;
        let mut fs = fsview::open(vol).map_err(err)?;
        let mut report = fsview::Report::default();
        // All items at once: same-named ones get ` (2)`... instead of failing.
        fsview::extract_all(fs.as_mut(), items, folder, &mut report).map_err(|e| {
            if fetch.cancel.load(Ordering::Relaxed) {
                Error::Cancelled("the recovery was cancelled".into())
            } else {
                Error::Invalid(format!("{place}: copying {}: {e}", items.join(", ")))
            }
        })?;
        progress(report.bytes, 0);
        Ok((report, fs.kind().name().to_string()))
    })?;
    let mut notes = vec![format!(
        "{} file(s), {} folder(s), {} link(s), {} bytes copied from {place} ({fs_name}) of {vm}",
        report.files, report.dirs, report.links, report.bytes
    )];
    let changes = report.renamed.len() + report.skipped.len();
    notes.extend(report.lines().take(512));
    if changes > 512 {
        notes.push(format!(
            "... and {} more renamed or skipped entries",
            changes - 512
        ));
    }
    Ok(Recovered {
        files: vec![folder.to_path_buf()],
        notes,
    })
}

fn cancelled_or(fetch: &Fetch, vm: &str, err: vdisk::Error) -> Error {
    if fetch.cancel.load(Ordering::Relaxed) {
        Error::Cancelled("the recovery was cancelled".into())
    } else {
        Error::Disk {
            vm: vm.to_string(),
            err,
        }
    }
}

/// A libvirt domain for the recovered disks (`virsh define domain.xml`). Memory and
/// vCPUs are not part of a recovery point: 1 GiB and 1 vCPU, to be set before the
/// first start; no UUID, so libvirt gives the copy its own.
fn libvirt_domain(name: &str, point: &str, disks: &[(PathBuf, &str)]) -> String {
    let mut x = format!(
        "<!-- Recovered by holdfast from recovery point {}.\n     Memory and vCPUs are not recorded in a recovery point: set them (virsh edit) before the first start. -->\n\
         <domain type='kvm'>\n  <name>{}</name>\n  <memory unit='MiB'>1024</memory>\n  <vcpu>1</vcpu>\n\
         \x20 <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    <boot dev='hd'/>\n  </os>\n\
         \x20 <features>\n    <acpi/>\n    <apic/>\n  </features>\n  <devices>\n",
        xml_text(&comment_safe(point)),
        xml_text(name)
    );
    for (i, (path, format)) in disks.iter().enumerate() {
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{format}'/>\n\
             \x20     <source file='{}'/>\n      <target dev='{}' bus='virtio'/>\n    </disk>\n",
            xml_text(&path.display().to_string()),
            virtio_name(i)
        ));
    }
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// `s` without "--" (not allowed inside an XML comment).
fn comment_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out
}

/// `vda`, ..., `vdz`, `vdaa`, ... (the kernel's naming of virtio disks).
fn virtio_name(i: usize) -> String {
    let mut n = i + 1;
    let mut letters = Vec::new();
    while n > 0 {
        n -= 1;
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

/// Text for XML content and single-quoted attributes.
fn xml_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c if c.is_control() => out.push('_'),
            c => out.push(c),
        }
    }
    out
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io(path, "creating"))?;
    f.write_all(bytes).map_err(io(path, "writing"))?;
    f.sync_all().map_err(io(path, "syncing"))?;
    vdisk::copy::fsync_parent(path).map_err(|err| Error::Disk {
        vm: String::new(),
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_names_follow_the_kernel() {
        let n: Vec<String> = [0, 1, 25, 26, 27, 701, 702].map(virtio_name).to_vec();
        assert_eq!(n, ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]);
    }

    #[test]
    fn domain_xml_escapes_names_and_paths() {
        let x = libvirt_domain(
            "a<b>&'c",
            "rp---1",
            &[(PathBuf::from("/x/it's.qcow2"), "qcow2")],
        );
        assert!(x.contains("<name>a&lt;b&gt;&amp;&apos;c</name>"));
        assert!(x.contains("<source file='/x/it&apos;s.qcow2'/>"));
        assert!(x.contains("type='qcow2'") && x.contains("dev='vda'"));
        // A comment must not hold "--".
        assert!(x.contains("point rp-1."));
    }

    #[test]
    fn names_stay_in_the_folder() {
        assert_eq!(safe_name("os.qcow2", "d"), "os.qcow2");
        assert_eq!(safe_name("data/d1.vhdx", "d"), "d1.vhdx");
        assert_eq!(safe_name("../../etc/passwd", "d"), "passwd");
        assert_eq!(safe_name("..", "d"), "d");
        assert_eq!(safe_name("a/..", "d"), "d");
        assert_eq!(safe_name("", "d"), "d");
        assert_eq!(safe_name("C:\\x\\y.vhd", "d"), "y.vhd");
        assert_eq!(with_ext("os.qcow2", "raw"), "os.raw");
        assert_eq!(with_ext("disk", "raw"), "disk.raw");
        assert_eq!(toml_str("a\"b"), "\"a\\\"b\"");
    }

    #[test]
    fn folders_of_one_second_are_told_apart() {
        let t = tempfile::tempdir().unwrap();
        let a = NewDir::create_unique(t.path(), "holdfast_x_job1").unwrap();
        let b = NewDir::create_unique(t.path(), "holdfast_x_job1").unwrap();
        assert_eq!(a.path, t.path().join("holdfast_x_job1"));
        assert_eq!(b.path, t.path().join("holdfast_x_job1-2"));
        // Dropped unkept: both removed, nothing else touched.
        drop((a, b));
        assert!(std::fs::read_dir(t.path()).unwrap().next().is_none());
    }

    #[test]
    fn timestamps_are_compact() {
        assert_eq!(timestamp(0), "19700101-000000");
    }
}
