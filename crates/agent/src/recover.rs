//! Whole-VM recovery on the agent: a recovery point's disks read from the server
//! ([`RemotePointDisk`], blob by blob through the job's `recovery-blob` route, each blob
//! checked against its id) and written as image files with [`vdisk::copy::write_image`]
//! (temporary name, fsync, rename: a cancelled or failed recovery leaves no partial
//! file behind).

use crate::remote::{Transport, retry};
use crate::{Error, Result};
use datastore::crypto::Keys;
use datastore::{DiskRecord, Id, decode_framed_block, decode_framed_piece};
use protocol::{RecoveryPlan, RecoveryTarget};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vdisk::{CreateOptions, DiskInfo, Extent, Format, Subformat, VirtualDisk};

/// Block requests in flight per read (the copy runs up to four reads at once).
const FETCHERS: usize = 4;
/// Index pieces kept in memory.
const PIECE_CACHE: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A token bucket over bytes per second, at a fixed rate or one that follows a
/// work-hours schedule (looked up at each take); waits are cut short by `cancel`.
#[derive(Debug)]
pub struct Throttle {
    rate: Rate,
    /// Tokens (may go negative: a debt paid by waiting) and when last refilled.
    state: Mutex<(f64, Instant)>,
}

#[derive(Debug)]
enum Rate {
    Fixed(f64),
    Schedule(protocol::ThrottleSchedule),
}

impl Throttle {
    /// `kbps` KiB per second (0 = none).
    pub fn new(kbps: u64) -> Option<Throttle> {
        (kbps > 0).then(|| Throttle {
            rate: Rate::Fixed(kbps as f64 * 1024.0),
            state: Mutex::new((0.0, Instant::now())),
        })
    }

    /// The plan's limit: its fixed rate, else its schedule, else none.
    pub fn for_plan(
        kbps: Option<u64>,
        schedule: Option<&protocol::ThrottleSchedule>,
    ) -> Option<Throttle> {
        match (kbps.and_then(Throttle::new), schedule) {
            (Some(t), _) => Some(t),
            (None, Some(s)) => Some(Throttle {
                rate: Rate::Schedule(s.clone()),
                state: Mutex::new((0.0, Instant::now())),
            }),
            (None, None) => None,
        }
    }

    /// Bytes per second now, `None` for no limit.
    fn rate_now(&self) -> Option<f64> {
        match &self.rate {
            Rate::Fixed(r) => Some(*r),
            Rate::Schedule(s) => s.kbps_at(utc::now()).map(|k| k as f64 * 1024.0),
        }
    }

    /// Takes `n` bytes' worth of tokens, waiting until they are earned.
    pub fn take(&self, n: u64, cancel: &AtomicBool) {
        let wait = {
            let mut s = lock(&self.state);
            let now = Instant::now();
            let Some(rate) = self.rate_now() else {
                // Unlimited for now: no debt carried into a limited period.
                *s = (0.0, now);
                return;
            };
            // A burst of at most a quarter second.
            let burst = rate / 4.0;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate).min(burst);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 < 0.0 { -s.0 / rate } else { 0.0 }
        };
        let end = Instant::now() + Duration::from_secs_f64(wait.min(3600.0));
        while !cancel.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

/// What every disk of a recovery shares.
pub struct Fetch {
    pub transport: Arc<dyn Transport>,
    /// `/agent/jobs/{id}`.
    pub prefix: String,
    pub keys: Keys,
    pub cancel: Arc<AtomicBool>,
    pub throttle: Option<Throttle>,
    /// Framed bytes fetched so far.
    pub fetched: AtomicU64,
    pub budget: Duration,
}

impl Fetch {
    fn get(&self, id: Id) -> Result<Vec<u8>> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled("the recovery was cancelled".into()));
        }
        let path = format!("{}/recovery-blob/{}", self.prefix, id.to_hex());
        let framed = retry(
            self.budget,
            || self.cancel.load(Ordering::Relaxed),
            || self.transport.get_bytes(&path),
        )?;
        let n = framed.len() as u64;
        self.fetched.fetch_add(n, Ordering::Relaxed);
        if let Some(t) = &self.throttle {
            t.take(n, &self.cancel);
        }
        Ok(framed)
    }

    /// Several blobs in one round trip (`recovery-blobs`), in the order asked.
    fn get_many(&self, ids: &[Id]) -> Result<Vec<Vec<u8>>> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled("the recovery was cancelled".into()));
        }
        let mut body = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            body.extend_from_slice(&id.0);
        }
        let body = bytes::Bytes::from(body);
        let path = format!("{}/recovery-blobs", self.prefix);
        let all = retry(
            self.budget,
            || self.cancel.load(Ordering::Relaxed),
            || self.transport.post_bytes(&path, body.clone()),
        )?;
        let n = all.len() as u64;
        let out = split_batch(&all, ids.len())?;
        self.fetched.fetch_add(n, Ordering::Relaxed);
        if let Some(t) = &self.throttle {
            t.take(n, &self.cancel);
        }
        Ok(out)
    }
}

/// A `recovery-blobs` answer: `count` times (u32 LE length, bytes), nothing after.
fn split_batch(all: &[u8], count: usize) -> Result<Vec<Vec<u8>>> {
    let bad = |what: String| Error::Server(format!("recovery-blobs answer: {what}"));
    let mut out = Vec::with_capacity(count);
    let mut rest = all;
    for i in 0..count {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| bad(format!("blob {i} of {count} is missing")))?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(bad(format!(
                "blob {i} claims {len} bytes, {} are left",
                tail.len()
            )));
        }
        let (blob, tail) = tail.split_at(len);
        out.push(blob.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the last blob", rest.len())));
    }
    Ok(out)
}

/// One block to fetch for a read: block number, id, offset in the block, destination.
type Task<'b> = (u64, Id, usize, &'b mut [u8]);

/// One disk of a recovery point, read from the server through a recovery job.
#[derive(Debug)]
pub struct RemotePointDisk<'a> {
    fetch: &'a Fetch,
    point: String,
    rec: DiskRecord,
    pieces: Vec<Id>,
    cache: Mutex<HashMap<usize, Arc<Vec<Id>>>>,
}

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn invalid(e: impl std::fmt::Display) -> vdisk::Error {
    vdisk::Error::Invalid(e.to_string())
}

impl<'a> RemotePointDisk<'a> {
    pub fn open(fetch: &'a Fetch, point: &str, rec: &DiskRecord) -> Result<RemotePointDisk<'a>> {
        let pieces = rec
            .pieces
            .iter()
            .map(|h| {
                Id::from_hex(h).ok_or_else(|| {
                    Error::Server(format!("recovery point {point}: bad piece id {h:?}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if rec.block_size == 0
            || rec.piece_blocks == 0
            || pieces.len() as u64 != rec.blocks().div_ceil(rec.piece_blocks as u64)
        {
            return Err(Error::Server(format!(
                "recovery point {point} disk {}: the index does not cover the disk",
                rec.index
            )));
        }
        Ok(RemotePointDisk {
            fetch,
            point: point.to_string(),
            rec: rec.clone(),
            pieces,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn piece(&self, p: usize) -> Result<Arc<Vec<Id>>> {
        if let Some(ids) = lock(&self.cache).get(&p) {
            return Ok(ids.clone());
        }
        let pid = *self
            .pieces
            .get(p)
            .ok_or_else(|| Error::Invalid(format!("index piece {p} is past the disk's end")))?;
        let mut framed = self.fetch.get(pid)?;
        let ids = decode_framed_piece(&self.fetch.keys, &mut framed, pid).map_err(Error::Backup)?;
        let pb = self.rec.piece_blocks as u64;
        let want = (self.rec.blocks() - p as u64 * pb).min(pb);
        if ids.len() as u64 != want {
            return Err(Error::Server(format!(
                "index piece {pid} holds {} entries, expected {want}",
                ids.len()
            )));
        }
        let ids = Arc::new(ids);
        let mut c = lock(&self.cache);
        if c.len() >= PIECE_CACHE {
            c.clear();
        }
        c.insert(p, ids.clone());
        Ok(ids)
    }

    fn block_id(&self, b: u64) -> Result<Id> {
        let pb = self.rec.piece_blocks as u64;
        let ids = self.piece((b / pb) as usize)?;
        ids.get((b % pb) as usize)
            .copied()
            .ok_or_else(|| Error::Server(format!("block {b} is not in its index piece")))
    }

    fn check_range(&self, offset: u64, len: u64) -> vdisk::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.rec.virtual_size => Ok(()),
            _ => Err(vdisk::Error::OutOfRange {
                offset,
                len,
                size: self.rec.virtual_size,
            }),
        }
    }

    /// Fetches a batch of blocks in one round trip, checks them and places each one's
    /// bytes `within..within+out.len()`.
    fn fill(&self, batch: &mut [Task<'_>]) -> Result<()> {
        let ids: Vec<Id> = batch.iter().map(|t| t.1).collect();
        let blobs = self.fetch.get_many(&ids)?;
        for ((b, id, within, out), framed) in batch.iter_mut().zip(blobs) {
            self.place(*b, *id, *within, out, framed)?;
        }
        Ok(())
    }

    /// Checks one fetched block and copies its bytes `within..within+out.len()`.
    fn place(
        &self,
        b: u64,
        id: Id,
        within: usize,
        out: &mut [u8],
        mut framed: Vec<u8>,
    ) -> Result<()> {
        let bs = self.rec.block_size as u64;
        let block_len = (self.rec.virtual_size - b * bs).min(bs) as usize;
        let plain =
            decode_framed_block(&self.fetch.keys, &mut framed, id).map_err(Error::Backup)?;
        if plain.len() != block_len {
            return Err(Error::Server(format!(
                "recovery point {} disk {} block {b}: {} bytes, expected {block_len}",
                self.point,
                self.rec.index,
                plain.len()
            )));
        }
        let src = plain
            .get(within..within + out.len())
            .ok_or_else(|| Error::Server(format!("block {b} is too short")))?;
        out.copy_from_slice(src);
        Ok(())
    }
}

impl VirtualDisk for RemotePointDisk<'_> {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            path: format!("server#{}/disk{}", self.point, self.rec.index).into(),
            format: Format::Raw,
            subformat: Subformat::Fixed,
            virtual_size: self.rec.virtual_size,
            logical_sector_size: self.rec.logical_sector_size,
            physical_sector_size: self.rec.physical_sector_size,
            block_size: Some(self.rec.block_size as u64),
            file_size: 0,
            allocated_bytes: 0,
            details: vec![("recovery point".into(), self.point.clone())],
            parent: None,
        }
    }

    fn virtual_size(&self) -> u64 {
        self.rec.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let bs = self.rec.block_size as u64;
        // Split the buffer by block; holes are filled here, data blocks are fetched by
        // up to FETCHERS threads at once.
        let mut tasks = Vec::new();
        let mut rest: &mut [u8] = buf;
        let mut pos = offset;
        while !rest.is_empty() {
            let b = pos / bs;
            let within = (pos % bs) as usize;
            let n = (bs as usize - within).min(rest.len());
            let (out, tail) = rest.split_at_mut(n);
            rest = tail;
            let id = self.block_id(b).map_err(invalid)?;
            if id.is_zero() {
                out.fill(0);
            } else {
                tasks.push((b, id, within, out));
            }
            pos += n as u64;
        }
        // Batches spread over the fetchers, each one round trip.
        let per = tasks
            .len()
            .div_ceil(FETCHERS)
            .clamp(1, protocol::RECOVERY_BATCH);
        let mut batches: Vec<Vec<Task<'_>>> = Vec::new();
        let mut it = tasks.into_iter().peekable();
        while it.peek().is_some() {
            batches.push(it.by_ref().take(per).collect());
        }
        let threads = FETCHERS.min(batches.len());
        let queue = Mutex::new(batches.into_iter());
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        if lock(&failure).is_some() {
                            return;
                        }
                        let Some(mut batch) = lock(&queue).next() else {
                            return;
                        };
                        if let Err(e) = self.fill(&mut batch) {
                            lock(&failure).get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match lock(&failure).take() {
            Some(e) => Err(invalid(e)),
            None => Ok(()),
        }
    }

    fn map(&self, offset: u64, length: u64) -> vdisk::Result<Vec<Extent>> {
        self.check_range(offset, length)?;
        datastore::block_extents(offset, length, self.rec.block_size, |b| {
            self.block_id(b).map(|id| id.is_zero()).map_err(invalid)
        })
    }
}

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
    let fmt_of = |rec: &DiskRecord| -> Format { rec.format.parse().unwrap_or(Format::Raw) };
    let mut outputs = Vec::new();
    let dir_guard;
    // Description files written next to the disks once they are complete.
    let mut descriptions: Vec<(PathBuf, String)> = Vec::new();
    match &plan.target {
        RecoveryTarget::Original { .. } => {
            // Over the original instance: crate::original (stop, swap in, start).
            return Err(Error::Invalid(
                "a recovery over the original instance runs through crate::original".into(),
            ));
        }
        RecoveryTarget::Alternate { dir, format, .. } => {
            let folder = Path::new(dir).join(safe_name(vm, "vm"));
            if folder.exists() {
                return Err(Error::Invalid(format!(
                    "{} already exists; choose another folder or remove it",
                    folder.display()
                )));
            }
            let d = NewDir::create(folder.clone())?;
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
            descriptions.push((
                folder.join("vm.toml"),
                format!(
                    "# Recovered by holdfast from recovery point {}\nname = {}\ndisks = [{}]\n",
                    m.id,
                    toml_str(vm),
                    quoted.join(", ")
                ),
            ));
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
            dir_guard = Some(d);
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
            let folder = d.path.clone();
            if partition.is_some() || !items.is_empty() {
                let i = disk.unwrap_or(0) as usize;
                let rec = m.disks.get(i).ok_or_else(|| {
                    Error::Invalid(format!("recovery point {} has no disk {i}", m.id))
                })?;
                let src = RemotePointDisk::open(fetch, &m.id, rec)?;
                let out = if items.is_empty() {
                    let p = partition.unwrap_or(0);
                    copy_volume(fetch, &src, vm, i, p, &folder, progress)?
                } else {
                    copy_items(fetch, &src, vm, i, *partition, items, &folder, progress)?
                };
                d.keep = true;
                return Ok(out);
            }
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
                    path: folder.join(name),
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
            dir_guard = Some(d);
        }
    }
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
        let disk = RemotePointDisk::open(fetch, &m.id, rec)?;
        let subformat = if o.format == Format::Raw {
            Subformat::Fixed
        } else {
            Subformat::Dynamic
        };
        let mut opts = CreateOptions::new(o.format, subformat, rec.virtual_size);
        opts.logical_sector_size = if o.format == Format::Vhdx {
            rec.logical_sector_size
        } else {
            512
        };
        opts.physical_sector_size = rec.physical_sector_size.max(opts.logical_sector_size);
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
    if let Some(mut d) = dir_guard {
        d.keep = true;
    }
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
    fn batch_answers_are_split_and_checked() {
        let mut all = Vec::new();
        for b in [&b"abc"[..], b"", b"xy"] {
            all.extend_from_slice(&(b.len() as u32).to_le_bytes());
            all.extend_from_slice(b);
        }
        let got = split_batch(&all, 3).unwrap();
        assert_eq!(got, [b"abc".to_vec(), Vec::new(), b"xy".to_vec()]);
        // Fewer blobs than asked, a length past the end, bytes left over.
        assert!(
            split_batch(&all, 4)
                .unwrap_err()
                .to_string()
                .contains("blob 3 of 4")
        );
        assert!(
            split_batch(&all[..6], 3)
                .unwrap_err()
                .to_string()
                .contains("claims")
        );
        assert!(
            split_batch(&all, 2)
                .unwrap_err()
                .to_string()
                .contains("after the last")
        );
    }

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

    #[test]
    fn throttle_paces_bytes() {
        let t = Throttle::new(1024).unwrap();
        let cancel = AtomicBool::new(false);
        let start = Instant::now();
        for _ in 0..4 {
            t.take(128 * 1024, &cancel);
        }
        // 512 KiB at 1 MiB/s: about half a second.
        assert!(start.elapsed() >= Duration::from_millis(400));
        assert!(Throttle::new(0).is_none());
    }

    #[test]
    fn scheduled_throttle_follows_the_clock() {
        // Work hours all week, all day: the work rate always applies.
        let always = protocol::ThrottleSchedule {
            work_kbps: 1024,
            other_kbps: 0,
            work_days: (1..=7).collect(),
            work_start: "00:00".into(),
            work_end: "00:00".into(),
        };
        // start == end is an empty window (never work hours): unlimited now.
        let t = Throttle::for_plan(None, Some(&always)).unwrap();
        let cancel = AtomicBool::new(false);
        let start = Instant::now();
        for _ in 0..4 {
            t.take(1 << 20, &cancel);
        }
        assert!(start.elapsed() < Duration::from_millis(200));
        let busy = protocol::ThrottleSchedule {
            other_kbps: 1024,
            ..always.clone()
        };
        let t = Throttle::for_plan(None, Some(&busy)).unwrap();
        let start = Instant::now();
        for _ in 0..4 {
            t.take(128 * 1024, &cancel);
        }
        assert!(start.elapsed() >= Duration::from_millis(400));
        // A fixed rate wins over the schedule; neither means no throttle.
        assert!(matches!(
            Throttle::for_plan(Some(10), Some(&busy)).unwrap().rate,
            Rate::Fixed(_)
        ));
        assert!(Throttle::for_plan(None, None).is_none());
    }
}
