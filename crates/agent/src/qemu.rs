//! Provider `qemu`: live KVM/QEMU VMs through their QMP sockets.
//!
//! Inventory: a folder holds one QMP socket per VM (`NAME.qmp`) and optionally its
//! guest-agent socket (`NAME.qga`), and/or VMs are listed with their sockets
//! ([`ListedVm`]); the VM is `HOST/NAME` to the server, its id is the QEMU UUID, its
//! disks are the block devices with a medium that is not read-only.
//!
//! A backup takes a point-in-time view of every disk in one QMP `transaction`:
//! - a new persistent dirty bitmap `hf-<ms>` starts tracking the writes after the view;
//! - the previous bitmap, which holds the writes since the previous view, is disabled;
//! - `blockdev-backup sync=none` into a fleecing node (an empty qcow2 whose backing is
//!   the disk) copies old data there before the guest overwrites it, so the fleecing
//!   node reads as the disk at the view's moment.
//!
//! Around the transaction the guest is quiesced: file systems frozen through the guest
//! agent when its socket answers (with a timeout; always thawed), else the VM is paused
//! (`stop`/`cont`). Either lasts milliseconds, not the backup.
//!
//! The fleecing nodes are exported over QEMU's NBD server on a unix socket and read
//! with our NBD client (`nbd` crate): `base:allocation` says what is allocated, and
//! `qemu:dirty-bitmap:<previous>` says what changed. An incremental reads only the
//! dirty extents; everything else is reused from the base recovery point.
//!
//! Change tracking is never trusted blindly. The previous bitmap is used only when
//! the agent's own record says which bitmap belongs to the latest recovery point and
//! QEMU agrees: the bitmap exists, records, is persistent and consistent, the disk is
//! the same node with the same size, and the base recovery point is the one made from
//! that view. Otherwise every block is read and compared by checksum (a consistency
//! check) and the server raises an informational alert.
//!
//! On success the previous bitmap is removed; on failure or cancellation the new one
//! is merged back into it, so no write is ever lost. Export, job, fleecing node,
//! NBD server and temporary files are removed either way; a view left by a crashed
//! agent is undone the same way on the next start (its record is written before the
//! transaction).

mod original;

use crate::provider::{Instance, Provider, View};
use crate::readahead::{self, ReadAhead};
use crate::{Error, Result};
use datastore::DiskInput;
use locks::lock;
use protocol::{Consistency, JobKind, Manifest, Note, VmDisk, VmInfo};
use qemu::qga::Qga;
use qemu::qmp::{BlockDevice, Qmp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Prefix of everything this provider creates in QEMU (nodes, jobs, exports, bitmaps):
/// leftovers are recognised by it.
const PREFIX: &str = "hf-";
const QMP_CONNECT: Duration = Duration::from_secs(2);
const QGA_CONNECT: Duration = Duration::from_secs(3);

/// Options of the `qemu` provider.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// Folder of `NAME.qmp` (and `NAME.qga`) sockets, if any.
    pub sockets: Option<PathBuf>,
    /// VMs listed one by one (they win over a socket of the same name in the folder).
    pub listed: Vec<ListedVm>,
    /// Where the provider keeps its records and temporary files (fleecing images, NBD
    /// socket): the agent's data folder + `/qemu`.
    pub state_dir: PathBuf,
    /// How long the guest agent may take to freeze the file systems.
    pub freeze_timeout: Duration,
    /// The longest wait for one answer from QEMU: a QMP reply, an NBD reply. A QEMU
    /// that stops answering fails the backup after this, never hangs it.
    pub io_timeout: Duration,
}

impl QemuOptions {
    /// Options with the defaults: no sockets, freeze timeout 10 s, QEMU answers
    /// within [`DEFAULT_IO_TIMEOUT`].
    pub fn new(state_dir: PathBuf) -> QemuOptions {
        QemuOptions {
            sockets: None,
            listed: Vec::new(),
            state_dir,
            freeze_timeout: Duration::from_secs(10),
            io_timeout: DEFAULT_IO_TIMEOUT,
        }
    }
}

/// Default of [`QemuOptions::io_timeout`].
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The test hook `HOLDFAST_TEST_STALL_READ=VM`: the first backup of VM `VM` in this
/// agent process has one read that never completes (its read-ahead chunk is never
/// fetched), as a reader stuck in a bug would. Only a cancel or the read deadline ends
/// it. For the watchdog's test; never set in production.
fn stall_hook(vm: &str) -> readahead::Hook {
    static USED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let wanted = std::env::var("HOLDFAST_TEST_STALL_READ").is_ok_and(|v| v == vm);
    if wanted && !USED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        readahead::Hook::StallFirstChunk
    } else {
        readahead::Hook::None
    }
}

/// A VM given by its sockets rather than found in the folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedVm {
    pub name: String,
    pub qmp: PathBuf,
    pub qga: Option<PathBuf>,
}

impl ListedVm {
    /// Parses `NAME=QMP_PATH[,qga=QGA_PATH]` (the agent's `--qmp-socket`).
    pub fn parse(s: &str) -> Result<ListedVm> {
        let bad = |why: &str| Error::Invalid(format!("--qmp-socket {s:?}: {why}"));
        let (name, rest) = s.split_once('=').ok_or_else(|| bad("expected NAME=PATH"))?;
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(bad("the VM name must be a plain name"));
        }
        let mut parts = rest.split(',');
        let qmp = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("no QMP socket path"))?;
        let mut qga = None;
        for p in parts {
            match p.split_once('=') {
                Some(("qga", path)) if !path.is_empty() => qga = Some(PathBuf::from(path)),
                _ => return Err(bad("after the QMP path only qga=PATH may follow")),
            }
        }
        Ok(ListedVm {
            name: name.to_string(),
            qmp: PathBuf::from(qmp),
            qga,
        })
    }
}

/// The `qemu` provider.
pub struct QemuProvider {
    inner: Arc<Inner>,
}

/// The provider's state, shared with the views it hands out (which outlive the
/// borrow of the provider).
struct Inner {
    opts: QemuOptions,
    vms: Mutex<HashMap<String, Arc<VmSlot>>>,
}

/// One VM's QMP connection (QEMU accepts one client per monitor socket, so it is kept
/// and shared by inventory and backups), its last inventory entry, and whether a view
/// of it is held now.
#[derive(Default)]
struct VmSlot {
    qmp: Mutex<Option<Qmp>>,
    last: Mutex<Option<VmInfo>>,
    /// A view of this VM is out (taken and not released): its record's pending
    /// view is in use, not a leftover.
    viewing: AtomicBool,
}

fn hv(vm: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Hypervisor {
        vm: vm.to_string(),
        msg: format!("{what}: {e}"),
    }
}

/// What the provider remembers about one VM between backups (`STATE_DIR/NAME.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct VmState {
    /// Per disk, in recovery-point order: the bitmap holding the writes since the view
    /// of the latest successful backup.
    disks: Vec<Track>,
    /// When that view was taken (unix seconds).
    view_unix: i64,
    /// The recovery point that backup was based on: the recovery point it made has
    /// this as its base (how the next backup knows the bitmap matches its base).
    view_base: Option<String>,
    /// Other bases the bitmaps may serve: after a view was undone, its backup may
    /// still have been committed, and the older bitmap covers that point too.
    #[serde(default)]
    also_bases: Vec<Option<String>>,
    /// A view taken and not released yet. Written before the transaction, so a crash
    /// anywhere leaves enough to undo it.
    pending: Option<Pending>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Track {
    node: String,
    bitmap: String,
    size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Pending {
    /// Per disk: the node, its previous bitmap (if any) and the new one.
    disks: Vec<PendingDisk>,
    /// Whether this view started QEMU's NBD server (then it stops it).
    nbd_server: bool,
    view_unix: i64,
    view_base: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PendingDisk {
    node: String,
    old: Option<String>,
    new: String,
    size: u64,
}

impl QemuProvider {
    /// A provider over `opts.sockets`. Undoes the views a crashed agent left behind
    /// (logged; a VM that is not reachable now is handled at its next backup).
    pub fn new(opts: QemuOptions) -> Result<QemuProvider> {
        std::fs::create_dir_all(&opts.state_dir)
            .map_err(|e| Error::io(&opts.state_dir, "create folder", e))?;
        let p = Inner {
            opts,
            vms: Mutex::new(HashMap::new()),
        };
        for name in p.recorded_vms() {
            if !p.qmp_path(&name).exists() {
                continue;
            }
            if let Err(e) = p.with_qmp(&name, |qmp| p.recover(&name, qmp)) {
                eprintln!("holdfast agent: qemu VM {name}: cleaning up after a crash: {e}");
            }
        }
        Ok(QemuProvider { inner: Arc::new(p) })
    }
}

impl Inner {
    fn qmp_path(&self, vm: &str) -> PathBuf {
        match self.opts.listed.iter().find(|l| l.name == vm) {
            Some(l) => l.qmp.clone(),
            None => self.folder().join(format!("{vm}.qmp")),
        }
    }

    fn qga_path(&self, vm: &str) -> PathBuf {
        match self.opts.listed.iter().find(|l| l.name == vm) {
            // A listed VM without a guest agent socket: a path that does not exist.
            Some(l) => l.qga.clone().unwrap_or_default(),
            None => self.folder().join(format!("{vm}.qga")),
        }
    }

    /// The socket folder; with none, a path where nothing is found.
    fn folder(&self) -> PathBuf {
        self.opts.sockets.clone().unwrap_or_default()
    }

    fn state_path(&self, vm: &str) -> PathBuf {
        self.opts.state_dir.join(format!("{vm}.json"))
    }

    fn nbd_path(&self, vm: &str) -> PathBuf {
        self.opts.state_dir.join(format!("{vm}.nbd"))
    }

    fn fleece_path(&self, vm: &str, disk: usize) -> PathBuf {
        self.opts.state_dir.join(format!("{vm}.fleece{disk}.qcow2"))
    }

    /// VM names with a record in the state folder.
    fn recorded_vms(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.opts.state_dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .collect();
        v.sort();
        v
    }

    fn slot(&self, vm: &str) -> Arc<VmSlot> {
        lock(&self.vms).entry(vm.to_string()).or_default().clone()
    }

    /// Runs `f` on the VM's QMP connection, connecting first when needed. A failed
    /// call drops the connection (it may be out of step); the next call reconnects.
    fn with_qmp<T>(&self, vm: &str, f: impl FnOnce(&mut Qmp) -> Result<T>) -> Result<T> {
        let slot = self.slot(vm);
        let guard = lock(&slot.qmp);
        self.on_qmp(vm, guard, f)
    }

    /// [`Inner::with_qmp`] unless another thread uses the connection now: `None` then.
    fn try_with_qmp<T>(
        &self,
        vm: &str,
        f: impl FnOnce(&mut Qmp) -> Result<T>,
    ) -> Option<Result<T>> {
        let slot = self.slot(vm);
        let guard = locks::try_lock(&slot.qmp)?;
        Some(self.on_qmp(vm, guard, f))
    }

    fn on_qmp<T>(
        &self,
        vm: &str,
        mut guard: MutexGuard<'_, Option<Qmp>>,
        f: impl FnOnce(&mut Qmp) -> Result<T>,
    ) -> Result<T> {
        // A kept connection may be stale (QEMU restarted): check it with a cheap
        // command before relying on it.
        if let Some(q) = guard.as_mut()
            && q.status().is_err()
        {
            *guard = None;
        }
        if guard.is_none() {
            // A socket left behind by a QEMU that is gone refuses at once; a short
            // connect timeout keeps it from holding up the inventory.
            let mut q = Qmp::connect(&self.qmp_path(vm), QMP_CONNECT)
                .map_err(|e| hv(vm, "connecting to QMP", e))?;
            q.set_timeout(self.opts.io_timeout);
            *guard = Some(q);
        }
        let Some(qmp) = guard.as_mut() else {
            return Err(hv(vm, "QMP", "no connection"));
        };
        let r = f(qmp);
        if r.is_err() {
            *guard = None;
        }
        r
    }

    fn load_state(&self, vm: &str) -> Result<VmState> {
        let path = self.state_path(vm);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Config {
                path,
                msg: format!("unreadable change-tracking record: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(VmState::default()),
            Err(e) => Err(Error::io(path, "read", e)),
        }
    }

    /// Writes the record durably (temporary name, fsync, rename, fsync the folder).
    fn save_state(&self, vm: &str, st: &VmState) -> Result<()> {
        let path = self.state_path(vm);
        let data = serde_json::to_vec_pretty(st)
            .map_err(|e| Error::Invalid(format!("encoding the record: {e}")))?;
        crate::write_durably(&path, &data).map_err(|e| Error::io(path, "write durably", e))
    }

    /// The disks to protect: block devices with a medium that is not read-only.
    fn disks(vm: &str, qmp: &mut Qmp) -> Result<Vec<BlockDevice>> {
        let all = qmp.block_devices().map_err(|e| hv(vm, "query-block", e))?;
        Ok(all.into_iter().filter(|d| !d.read_only).collect())
    }

    fn info(&self, vm: &str, qmp: &mut Qmp) -> Result<VmInfo> {
        let status = qmp.status().map_err(|e| hv(vm, "query-status", e))?;
        let uuid = qmp.uuid().map_err(|e| hv(vm, "query-uuid", e))?;
        let disks = Self::disks(vm, qmp)?;
        Ok(VmInfo {
            name: vm.to_string(),
            // QEMU started without -uuid reports all zeros: not an identity.
            vm_id: (!uuid.chars().all(|c| c == '0' || c == '-')).then_some(uuid),
            provider: protocol::ProviderKind::Qemu,
            disks: disks
                .iter()
                .map(|d| VmDisk {
                    name: disk_name(d),
                    format: d.format.clone(),
                    virtual_size: d.virtual_size,
                })
                .collect(),
            running: Some(status.running),
        })
    }

    /// Undoes a view that was never released (crash, or a release that failed):
    /// removes exports, jobs and fleecing nodes with our prefix, stops the NBD server
    /// the view started, merges the view's new bitmaps back into the previous ones,
    /// and deletes the temporary files.
    fn recover(&self, vm: &str, qmp: &mut Qmp) -> Result<()> {
        let mut st = self.load_state(vm)?;
        remove_leftovers(vm, qmp)?;
        let Some(p) = st.pending.take() else {
            self.remove_files(vm);
            return Ok(());
        };
        if p.nbd_server {
            stop_nbd_server(vm, qmp)?;
        }
        undo_view(vm, qmp, &mut st, &p)?;
        self.save_state(vm, &st)?;
        self.remove_files(vm);
        Ok(())
    }

    fn remove_files(&self, vm: &str) {
        let Ok(rd) = std::fs::read_dir(&self.opts.state_dir) else {
            return;
        };
        let fleece = format!("{vm}.fleece");
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&fleece) && name.ends_with(".qcow2") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_file(self.nbd_path(vm));
    }

    /// Freezes the guest's file systems, or pauses the VM when that is impossible.
    fn quiesce(&self, vm: &str, qmp: &mut Qmp, notes: &mut Vec<Note>) -> Result<Quiesced> {
        let qga_path = self.qga_path(vm);
        let since = Instant::now();
        if qga_path.exists() {
            match Qga::connect(&qga_path, QGA_CONNECT) {
                Ok(mut qga) => match qga.fsfreeze_freeze(self.opts.freeze_timeout) {
                    Ok(n) => return Ok(Quiesced::Frozen(qga, n, since, Instant::now())),
                    Err(e) => {
                        // Whatever the freeze did, thaw (a timed-out freeze may still
                        // complete in the guest).
                        let thawed = thaw(&qga_path, Some(qga));
                        notes.push(Note::info(format!(
                            "guest agent could not freeze the file systems ({e}){}; the VM was paused instead",
                            thawed.err().map(|t| format!(", thaw: {t}")).unwrap_or_default()
                        )));
                    }
                },
                Err(e) => notes.push(Note::info(format!(
                    "guest agent socket {} does not answer ({e}); the VM was paused instead",
                    qga_path.display()
                ))),
            }
        }
        let status = qmp.status().map_err(|e| hv(vm, "query-status", e))?;
        if !status.running {
            return Ok(Quiesced::AlreadyPaused);
        }
        // Timed from the request: `stop` itself drains and flushes the disks, and the
        // guest is paused for all of it.
        let since = Instant::now();
        qmp.stop().map_err(|e| hv(vm, "stop", e))?;
        Ok(Quiesced::Paused(since, Instant::now()))
    }

    /// Ends the quiesce: thaws or resumes. Notes how long the guest was held, and
    /// which part of it was the guest's (freeze, thaw) or QEMU's (stop, cont) and which
    /// Holdfast's own (from the quiesce's end to the resume's start: the view's
    /// transaction).
    fn resume(&self, vm: &str, qmp: &mut Qmp, q: Quiesced, notes: &mut Vec<Note>) -> Result<()> {
        let split = |since: Instant, held: Instant, own: Instant, [hold, free]: [&str; 2]| {
            format!(
                "{} ms ({hold} {} ms, Holdfast's view {} ms, {free} {} ms)",
                since.elapsed().as_millis(),
                held.duration_since(since).as_millis(),
                own.duration_since(held).as_millis(),
                own.elapsed().as_millis()
            )
        };
        match q {
            Quiesced::Frozen(qga, n, since, frozen) => {
                let own = Instant::now();
                let r = thaw(&self.qga_path(vm), Some(qga));
                notes.push(Note::info(format!(
                    "file systems frozen by the guest agent ({n}) for {}",
                    split(since, frozen, own, ["freezing", "thawing"])
                )));
                r.map(|_| ()).map_err(|e| hv(vm, "guest-fsfreeze-thaw", e))
            }
            Quiesced::Paused(since, stopped) => {
                let own = Instant::now();
                let r = qmp.cont().map_err(|e| hv(vm, "cont", e));
                notes.push(Note::info(format!(
                    "VM paused for {} for the point-in-time view",
                    split(since, stopped, own, ["stopping", "resuming"])
                )));
                r
            }
            Quiesced::AlreadyPaused => Ok(()),
        }
    }

    /// Whether disk `i`'s recorded bitmap may stand for "what changed since `base`".
    /// `Err(reason)` when not.
    fn trusted(
        st: &VmState,
        i: usize,
        dev: &BlockDevice,
        bitmaps: &[qemu::qmp::Bitmap],
        base: Option<&Manifest>,
    ) -> std::result::Result<String, String> {
        let base = base.ok_or("there is no earlier recovery point")?;
        // The record advances only after the server accepted the recovery point made
        // from the view, so that point's base is the base the view was taken on.
        if base.base != st.view_base && !st.also_bases.contains(&base.base) {
            return Err(format!(
                "the latest recovery point ({}) is not the one made from the view the bitmap started at",
                base.id
            ));
        }
        let t = st
            .disks
            .get(i)
            .ok_or("no change-tracking record for this disk")?;
        if t.node != dev.node_name {
            return Err(format!(
                "the disk is now node {} (was {})",
                dev.node_name, t.node
            ));
        }
        let bd = base
            .disks
            .get(i)
            .ok_or("the latest recovery point has fewer disks")?;
        if bd.virtual_size != dev.virtual_size || t.size != dev.virtual_size {
            return Err(format!(
                "the disk is {} bytes, was {} in the latest recovery point",
                dev.virtual_size, bd.virtual_size
            ));
        }
        let b = bitmaps.iter().find(|b| b.name == t.bitmap).ok_or_else(|| {
            format!(
                "dirty bitmap {} is missing (QEMU restarted without it?)",
                t.bitmap
            )
        })?;
        if b.inconsistent {
            return Err(format!(
                "dirty bitmap {} is marked inconsistent (QEMU did not shut down cleanly)",
                b.name
            ));
        }
        // A bitmap that is not persistent (a raw disk cannot store one) is as good
        // while QEMU runs; a restart loses it, and then it is missing.
        if !b.recording || b.busy {
            return Err(format!(
                "dirty bitmap {} is not recording (recording {}, busy {})",
                b.name, b.recording, b.busy
            ));
        }
        Ok(t.bitmap.clone())
    }
}

/// The name a disk has in recovery points: its device id, else its node name.
fn disk_name(d: &BlockDevice) -> String {
    if let Some(q) = d.qdev.as_deref().filter(|q| !q.is_empty()) {
        q.rsplit('/')
            .find(|s| !s.is_empty() && *s != "virtio-backend")
            .unwrap_or(q)
            .to_string()
    } else if !d.device.is_empty() {
        d.device.clone()
    } else {
        d.node_name.clone()
    }
}

/// How the guest is held still, with when the hold was asked for and when it held.
enum Quiesced {
    Frozen(Qga, u64, Instant, Instant),
    Paused(Instant, Instant),
    AlreadyPaused,
}

/// Thaws through `qga`, or a fresh connection when that one is unusable.
fn thaw(path: &Path, qga: Option<Qga>) -> std::result::Result<u64, qemu::Error> {
    let timeout = Duration::from_secs(10);
    if let Some(mut q) = qga
        && let Ok(n) = q.fsfreeze_thaw(timeout)
    {
        return Ok(n);
    }
    let mut q = Qga::connect(path, QGA_CONNECT)?;
    q.fsfreeze_thaw(timeout)
}

fn remove_leftovers(vm: &str, qmp: &mut Qmp) -> Result<()> {
    let t = Duration::from_secs(30);
    for id in qmp
        .block_exports()
        .map_err(|e| hv(vm, "query-block-exports", e))?
    {
        if id.starts_with(PREFIX) {
            qmp.delete_export_and_wait(&id, t)
                .map_err(|e| hv(vm, &format!("removing export {id}"), e))?;
        }
    }
    for id in qmp
        .block_jobs()
        .map_err(|e| hv(vm, "query-block-jobs", e))?
    {
        if id.starts_with(PREFIX) {
            qmp.cancel_job_and_wait(&id, t)
                .map_err(|e| hv(vm, &format!("cancelling job {id}"), e))?;
        }
    }
    for node in qmp
        .node_names()
        .map_err(|e| hv(vm, "query-named-block-nodes", e))?
    {
        if node.starts_with(PREFIX) {
            qmp.execute("blockdev-del", json!({ "node-name": node }))
                .map_err(|e| hv(vm, &format!("removing node {node}"), e))?;
        }
    }
    Ok(())
}

fn stop_nbd_server(vm: &str, qmp: &mut Qmp) -> Result<()> {
    match qmp.execute("nbd-server-stop", Value::Null) {
        Ok(_) => Ok(()),
        // Already gone (QEMU restarted, or a release got that far): nothing to do.
        Err(qemu::Error::Command { desc, .. }) if desc.contains("not running") => Ok(()),
        Err(e) => Err(hv(vm, "nbd-server-stop", e)),
    }
}

/// Undoes a view whose backup failed, or whose release never finished (then the
/// backup may even have been committed): `st` is updated to what the bitmaps now mean.
///
/// - Every disk still has its previous bitmap: the new bitmap is folded into it and
///   it is enabled again. It then covers every write since the previous view, which
///   is a superset of the writes since this one; so a recovery point made from this
///   view (a commit that succeeded before a crash) is also a base it may serve, and
///   that view's base joins `st.also_bases`.
/// - Otherwise (a first backup, or a previous bitmap lost): the new bitmaps stay, and
///   the record becomes this view's. If the backup was committed they fit its
///   recovery point; if not, the next backup's chain check refuses them.
fn undo_view(vm: &str, qmp: &mut Qmp, st: &mut VmState, p: &Pending) -> Result<()> {
    let mut have = Vec::new();
    for d in &p.disks {
        let names: Vec<String> = qmp
            .bitmaps(&d.node)
            .map_err(|e| hv(vm, "query-named-block-nodes", e))?
            .into_iter()
            .map(|b| b.name)
            .collect();
        have.push(names);
    }
    let all_old = p
        .disks
        .iter()
        .zip(&have)
        .all(|(d, h)| d.old.as_ref().is_some_and(|o| h.contains(o)));
    let mut actions = Vec::new();
    if all_old {
        let mut kept = Vec::new();
        for (d, h) in p.disks.iter().zip(&have) {
            let Some(old) = &d.old else { continue };
            actions.push(json!({"type": "block-dirty-bitmap-enable",
                "data": {"node": d.node, "name": old}}));
            if h.contains(&d.new) {
                actions.push(json!({"type": "block-dirty-bitmap-merge",
                    "data": {"node": d.node, "target": old, "bitmaps": [d.new]}}));
                actions.push(json!({"type": "block-dirty-bitmap-remove",
                    "data": {"node": d.node, "name": d.new}}));
            }
            kept.push(Track {
                node: d.node.clone(),
                bitmap: old.clone(),
                size: d.size,
            });
        }
        st.disks = kept;
        if !st.also_bases.contains(&p.view_base) && st.view_base != p.view_base {
            st.also_bases.push(p.view_base.clone());
        }
    } else {
        let complete = p.disks.iter().zip(&have).all(|(d, h)| h.contains(&d.new));
        for (d, h) in p.disks.iter().zip(&have) {
            if let Some(old) = d.old.as_ref().filter(|o| h.contains(o)) {
                actions.push(json!({"type": "block-dirty-bitmap-remove",
                    "data": {"node": d.node, "name": old}}));
            }
        }
        // Records are positional: one disk without its new bitmap leaves none.
        st.disks = if complete {
            p.disks
                .iter()
                .map(|d| Track {
                    node: d.node.clone(),
                    bitmap: d.new.clone(),
                    size: d.size,
                })
                .collect()
        } else {
            Vec::new()
        };
        st.view_unix = p.view_unix;
        st.view_base = p.view_base.clone();
        st.also_bases.clear();
    }
    if !actions.is_empty() {
        qmp.execute("transaction", json!({ "actions": actions }))
            .map_err(|e| hv(vm, "merging the dirty bitmaps back", e))?;
    }
    Ok(())
}

impl Provider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn inventory(&self) -> Result<Vec<VmInfo>> {
        self.inner.inventory()
    }

    fn open_view(&self, vm: &str, kind: JobKind, base: Option<&Manifest>) -> Result<Box<dyn View>> {
        Inner::open_view(&self.inner, vm, kind, base)
    }

    fn instance(&self, vm: &str) -> Result<Box<dyn Instance + '_>> {
        if !self.inner.qmp_path(vm).exists() {
            return Err(Error::VmMissing(vm.to_string()));
        }
        Ok(Box::new(original::QemuInstance::new(
            self.inner.clone(),
            vm,
        )))
    }
}

impl Inner {
    fn inventory(&self) -> Result<Vec<VmInfo>> {
        let mut names: Vec<String> = self.opts.listed.iter().map(|l| l.name.clone()).collect();
        if let Some(dir) = &self.opts.sockets {
            let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list", e))?;
            names.extend(rd.filter_map(|e| e.ok()).filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".qmp"))
                    .filter(|n| !n.is_empty() && !n.contains('/'))
                    .map(str::to_string)
            }));
        }
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for name in names {
            let slot = self.slot(&name);
            // A VM whose monitor a backup is using is reported as last seen; one that
            // does not answer is left out of this inventory (logged). A view that a
            // failed release left behind (QEMU did not answer then) is undone here
            // once QEMU answers again, not only at the VM's next backup.
            let r = self.try_with_qmp(&name, |qmp| {
                // Read under the monitor's lock: a view marks itself before it
                // takes the lock.
                let viewing = slot.viewing.load(std::sync::atomic::Ordering::SeqCst);
                if !viewing && self.load_state(&name)?.pending.is_some() {
                    self.recover(&name, qmp)?;
                    eprintln!("holdfast agent: qemu VM {name}: undid a view left behind");
                }
                self.info(&name, qmp)
            });
            match r {
                Some(Ok(info)) => {
                    *lock(&slot.last) = Some(info.clone());
                    out.push(info);
                }
                Some(Err(e)) => eprintln!("holdfast agent: qemu VM {name}: {e}"),
                None => out.extend(lock(&slot.last).clone()),
            }
        }
        Ok(out)
    }

    fn open_view(
        self: &Arc<Self>,
        vm: &str,
        kind: JobKind,
        base: Option<&Manifest>,
    ) -> Result<Box<dyn View>> {
        if !self.qmp_path(vm).exists() {
            return Err(Error::VmMissing(vm.to_string()));
        }
        let mut notes = Vec::new();
        // Marked before the monitor is locked (see `inventory`); cleared by release,
        // or here when no view came of it.
        let slot = self.slot(vm);
        slot.viewing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let view = self.with_qmp(vm, |qmp| {
            self.recover(vm, qmp)?;
            match self.take_view(vm, qmp, kind, base, &mut notes) {
                Ok(v) => Ok(v),
                Err(e) => {
                    // Undo what the attempt created (its record says what).
                    if let Err(re) = self.recover(vm, qmp) {
                        eprintln!("holdfast agent: qemu VM {vm}: undoing a failed view: {re}");
                    }
                    Err(e)
                }
            }
        });
        let view = match view {
            Ok(v) => v,
            Err(e) => {
                slot.viewing
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        };
        let mut disks = Vec::new();
        let result = (|| -> Result<()> {
            for (i, d) in view.disks.iter().enumerate() {
                disks.push(NbdDisk::open(
                    vm,
                    &self.nbd_path(vm),
                    i,
                    d,
                    self.opts.io_timeout,
                )?);
            }
            Ok(())
        })();
        let snap = QemuView {
            provider: self.clone(),
            vm: vm.to_string(),
            consistency: view.consistency,
            disks,
            pending: view.pending,
            notes,
        };
        match result {
            Ok(()) => Ok(Box::new(snap)),
            Err(e) => {
                if let Err(re) = Box::new(snap).release(false) {
                    eprintln!("holdfast agent: qemu VM {vm}: releasing after a failure: {re}");
                }
                Err(e)
            }
        }
    }
}

/// A view as taken in QEMU, before the NBD connections.
struct TakenView {
    consistency: Consistency,
    disks: Vec<ViewDisk>,
    pending: Pending,
}

struct ViewDisk {
    device: BlockDevice,
    export: String,
    /// The bitmap to read changes from (incremental), `None` = read everything.
    dirty: Option<String>,
}

impl Inner {
    fn take_view(
        &self,
        vm: &str,
        qmp: &mut Qmp,
        kind: JobKind,
        base: Option<&Manifest>,
        notes: &mut Vec<Note>,
    ) -> Result<TakenView> {
        let st = self.load_state(vm)?;
        let devices = Self::disks(vm, qmp)?;
        if devices.is_empty() {
            return Err(hv(vm, "inventory", "the VM has no writable disk"));
        }
        let (dirty, olds) = Self::choose_bitmaps(vm, qmp, &st, &devices, kind, base, notes)?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let new_name = format!("{PREFIX}{now_ms}");
        self.create_fleece_images(vm, &devices)?;
        let pending = Pending {
            disks: devices
                .iter()
                .zip(&olds)
                .map(|(d, old)| PendingDisk {
                    node: d.node_name.clone(),
                    old: old.clone(),
                    new: new_name.clone(),
                    size: d.virtual_size,
                })
                .collect(),
            nbd_server: true,
            view_unix: (now_ms / 1000) as i64,
            view_base: base.map(|b| b.id.clone()),
        };
        // Recorded before anything else changes in QEMU: a crash from here on is
        // undone by `recover`.
        let mut rec = st.clone();
        rec.pending = Some(pending.clone());
        self.save_state(vm, &rec)?;
        self.start_nbd_server(vm, qmp, &mut rec)?;
        self.add_fleece_nodes(vm, qmp, &devices)?;
        let actions = Self::view_actions(vm, qmp, &devices, &olds, &new_name)?;
        let q = self.quiesce(vm, qmp, notes)?;
        let consistency = match q {
            Quiesced::Frozen(..) => Consistency::FileConsistent,
            _ => Consistency::CrashConsistent,
        };
        let tx = qmp.execute("transaction", json!({ "actions": actions }));
        // Resume first, whatever the transaction did.
        let resumed = self.resume(vm, qmp, q, notes);
        tx.map_err(|e| hv(vm, "point-in-time transaction", e))?;
        resumed?;
        let disks = Self::export_views(vm, qmp, devices, dirty)?;
        Ok(TakenView {
            consistency,
            disks,
            pending,
        })
    }

    /// Which disks may read their changes from their bitmap (a sync whose bitmap is
    /// trusted; a note says why not when a base was expected to be used), and each
    /// disk's bitmap of the last view, when it still exists.
    #[allow(clippy::type_complexity)]
    fn choose_bitmaps(
        vm: &str,
        qmp: &mut Qmp,
        st: &VmState,
        devices: &[BlockDevice],
        kind: JobKind,
        base: Option<&Manifest>,
        notes: &mut Vec<Note>,
    ) -> Result<(Vec<Option<String>>, Vec<Option<String>>)> {
        let mut dirty: Vec<Option<String>> = Vec::new();
        let mut olds: Vec<Option<String>> = Vec::new();
        for (i, dev) in devices.iter().enumerate() {
            let bitmaps = qmp
                .bitmaps(&dev.node_name)
                .map_err(|e| hv(vm, "query-named-block-nodes", e))?;
            let old = st
                .disks
                .get(i)
                .filter(|t| t.node == dev.node_name)
                .map(|t| t.bitmap.clone())
                .filter(|b| bitmaps.iter().any(|x| &x.name == b));
            olds.push(old);
            let d = if kind == JobKind::Sync {
                match Self::trusted(st, i, dev, &bitmaps, base) {
                    Ok(b) => Some(b),
                    Err(why) => {
                        if base.is_some() {
                            notes.push(Note {
                                kind: "change-tracking-reset".into(),
                                message: format!(
                                    "disk {i} ({}): change tracking not used: {why}; every block is read and compared (consistency check)",
                                    disk_name(dev)
                                ),
                            });
                        }
                        None
                    }
                }
            } else {
                None
            };
            dirty.push(d);
        }
        Ok((dirty, olds))
    }

    /// Fleecing images: empty qcow2 files the size of each disk.
    fn create_fleece_images(&self, vm: &str, devices: &[BlockDevice]) -> Result<()> {
        for (i, dev) in devices.iter().enumerate() {
            let path = self.fleece_path(vm, i);
            let _ = std::fs::remove_file(&path);
            let mut o = vdisk::CreateOptions::new(
                vdisk::Format::Qcow2,
                vdisk::Subformat::Dynamic,
                dev.virtual_size,
            );
            o.durable = false;
            vdisk::create(&path, &o)
                .and_then(|s| s.finish())
                .map_err(|e| hv(vm, "creating the fleecing image", e))?;
        }
        Ok(())
    }

    /// Starts QEMU's NBD server on the VM's socket; when QEMU refuses, the record says
    /// the server is not ours to stop.
    fn start_nbd_server(&self, vm: &str, qmp: &mut Qmp, rec: &mut VmState) -> Result<()> {
        let sock = self.nbd_path(vm);
        let _ = std::fs::remove_file(&sock);
        if let Err(e) = qmp.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        ) {
            // Not ours to stop (another tool's server, most likely).
            if let Some(p) = rec.pending.as_mut() {
                p.nbd_server = false;
            }
            self.save_state(vm, rec)?;
            return Err(hv(
                vm,
                "nbd-server-start (is another NBD server running in this QEMU?)",
                e,
            ));
        }
        Ok(())
    }

    /// A fleecing node over each disk, backed by it.
    fn add_fleece_nodes(&self, vm: &str, qmp: &mut Qmp, devices: &[BlockDevice]) -> Result<()> {
        for (i, dev) in devices.iter().enumerate() {
            qmp.execute(
                "blockdev-add",
                json!({
                    "driver": "qcow2",
                    "node-name": format!("{PREFIX}fleece{i}"),
                    "backing": dev.node_name,
                    "discard": "unmap",
                    "file": {"driver": "file", "filename": self.fleece_path(vm, i)},
                }),
            )
            .map_err(|e| hv(vm, "adding the fleecing node", e))?;
        }
        Ok(())
    }

    /// The point-in-time transaction's actions: stray bitmaps of ours removed, the new
    /// bitmap added and the last one disabled, and a fleecing backup job per disk.
    fn view_actions(
        vm: &str,
        qmp: &mut Qmp,
        devices: &[BlockDevice],
        olds: &[Option<String>],
        new_name: &str,
    ) -> Result<Vec<Value>> {
        let mut actions = Vec::new();
        for (i, (dev, old)) in devices.iter().zip(olds).enumerate() {
            // Bitmaps of ours that no record names (an agent whose records were lost)
            // would record forever: removed.
            for b in qmp
                .bitmaps(&dev.node_name)
                .map_err(|e| hv(vm, "query-named-block-nodes", e))?
            {
                if b.name.starts_with(PREFIX) && Some(&b.name) != old.as_ref() {
                    actions.push(json!({"type": "block-dirty-bitmap-remove",
                        "data": {"node": dev.node_name, "name": b.name}}));
                }
            }
            // Only qcow2 can store a bitmap; elsewhere it lives as long as QEMU does.
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": dev.node_name, "name": new_name,
                         "persistent": dev.format == "qcow2"}}));
            if let Some(old) = old {
                actions.push(json!({"type": "block-dirty-bitmap-disable",
                    "data": {"node": dev.node_name, "name": old}}));
            }
            actions.push(json!({"type": "blockdev-backup",
                "data": {"job-id": format!("{PREFIX}job{i}"), "device": dev.node_name,
                         "target": format!("{PREFIX}fleece{i}"), "sync": "none",
                         "auto-dismiss": true}}));
        }
        Ok(actions)
    }

    /// Exports each fleecing node over NBD, with the bitmap to read changes from.
    fn export_views(
        vm: &str,
        qmp: &mut Qmp,
        devices: Vec<BlockDevice>,
        dirty: Vec<Option<String>>,
    ) -> Result<Vec<ViewDisk>> {
        let mut disks = Vec::new();
        for (i, (dev, d)) in devices.into_iter().zip(dirty).enumerate() {
            let export = format!("{PREFIX}{i}");
            let mut args = json!({"type": "nbd", "id": format!("{PREFIX}exp{i}"),
                "node-name": format!("{PREFIX}fleece{i}"), "name": export, "writable": false});
            if let Some(b) = &d {
                args["bitmaps"] = json!([b]);
            }
            qmp.execute("block-export-add", args)
                .map_err(|e| hv(vm, "block-export-add", e))?;
            disks.push(ViewDisk {
                device: dev,
                export,
                dirty: d,
            });
        }
        Ok(disks)
    }
}

/// A fleecing export read through NBD, as the backup pipeline's disk.
#[derive(Debug)]
struct NbdDisk {
    client: nbd::Client,
    name: String,
    format: String,
    size: u64,
    sock: PathBuf,
    changed: Option<Vec<(u64, u64)>>,
    /// The view's allocation (`base:allocation`), asked once: the view does not change.
    alloc: Vec<vdisk::Extent>,
    /// Fetches what the pipeline will read (the changed blocks, else the allocated
    /// ones) ahead of it.
    ahead: ReadAhead,
    io_timeout: Duration,
}

impl NbdDisk {
    fn open(
        vm: &str,
        sock: &Path,
        i: usize,
        d: &ViewDisk,
        io_timeout: Duration,
    ) -> Result<NbdDisk> {
        let ctx = d.dirty.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut contexts = vec!["base:allocation"];
        if let Some(c) = &ctx {
            contexts.push(c);
        }
        let addr = nbd::Addr::Unix(sock.to_path_buf());
        let mut client = nbd::Client::connect_timeout(&addr, &d.export, &contexts, io_timeout)
            .map_err(|e| hv(vm, &format!("NBD export of disk {i}"), e))?;
        // The pipeline reads up to 4 MiB at a time: in 512 KiB requests, eight are in
        // flight at once.
        client.set_max_request(512 << 10);
        let size = client.size();
        if size != d.device.virtual_size {
            return Err(hv(
                vm,
                &format!("NBD export of disk {i}"),
                format!("{size} bytes, QEMU said {}", d.device.virtual_size),
            ));
        }
        let changed = match &ctx {
            Some(c) => {
                let ext = client
                    .block_status(c, 0, size)
                    .map_err(|e| hv(vm, &format!("dirty extents of disk {i}"), e))?;
                let mut ranges: Vec<(u64, u64)> = Vec::new();
                for e in ext.iter().filter(|e| e.flags & nbd::DIRTY != 0) {
                    match ranges.last_mut() {
                        Some(last) if last.0 + last.1 == e.offset => last.1 += e.length,
                        _ => ranges.push((e.offset, e.length)),
                    }
                }
                Some(ranges)
            }
            None => None,
        };
        let mut alloc = Vec::new();
        for e in client
            .block_status(nbd::CONTEXT_BASE_ALLOCATION, 0, size)
            .map_err(|e| hv(vm, &format!("allocation of disk {i}"), e))?
        {
            let state = if e.flags & nbd::STATE_HOLE != 0 && e.flags & nbd::STATE_ZERO != 0 {
                vdisk::ExtentState::Unallocated
            } else if e.flags & nbd::STATE_ZERO != 0 {
                vdisk::ExtentState::Zero
            } else {
                vdisk::ExtentState::Data
            };
            vdisk::extent::push_extent(&mut alloc, e.offset, e.length, state);
        }
        let planned: Vec<(u64, u64)> = match &changed {
            Some(c) => c.clone(),
            None => alloc
                .iter()
                .filter(|e| !e.state.reads_as_zero())
                .map(|e| (e.offset, e.length))
                .collect(),
        };
        // The datastore's usual block size: the pipeline reads whole blocks. With
        // another block size some reads fall outside the plan and go direct.
        let plan = readahead::plan_chunks(&planned, 64 << 10, size);
        let export = d.export.clone();
        let ahead = ReadAhead::start(
            plan,
            move || {
                nbd::Client::connect_timeout(&addr, &export, &[], io_timeout)
                    .map_err(|e| e.to_string())
            },
            if i == 0 {
                stall_hook(vm)
            } else {
                readahead::Hook::None
            },
        );
        Ok(NbdDisk {
            client,
            name: disk_name(&d.device),
            format: d.device.format.clone(),
            size,
            sock: sock.to_path_buf(),
            changed,
            alloc,
            ahead,
            io_timeout,
        })
    }
}

impl vdisk::VirtualDisk for NbdDisk {
    fn info(&self) -> vdisk::DiskInfo {
        vdisk::DiskInfo {
            path: self.sock.clone(),
            format: vdisk::Format::Raw,
            subformat: vdisk::Subformat::Fixed,
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            block_size: None,
            file_size: self.size,
            allocated_bytes: self.size,
            details: vec![("source".into(), "qemu fleecing export over NBD".into())],
            parent: None,
        }
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        let len = buf.len();
        let why = match self.ahead.read(offset, buf) {
            Ok(true) => return Ok(()),
            Ok(false) => match self.client.read(offset, buf) {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            },
            Err(e) => e,
        };
        Err(vdisk::Error::Invalid(format!(
            "disk {}: reading {len} bytes at offset {offset} from QEMU's NBD export: {why}",
            self.name
        )))
    }

    fn map(&self, offset: u64, length: u64) -> vdisk::Result<Vec<vdisk::Extent>> {
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                vdisk::Error::Invalid(format!("map {offset}+{length} past the disk's end"))
            })?;
        let first = self.alloc.partition_point(|e| e.end() <= offset);
        let mut out = Vec::new();
        for e in &self.alloc[first..] {
            if e.offset >= end {
                break;
            }
            let a = e.offset.max(offset);
            vdisk::extent::push_extent(&mut out, a, e.end().min(end) - a, e.state);
        }
        // The export's answer covered the disk; a gap would be a bug, not data.
        let covered = out.first().map(|e| e.offset) == Some(offset)
            && out.last().map(|e| e.end()) == Some(end);
        if length > 0 && !covered {
            return Err(vdisk::Error::Invalid(format!(
                "allocation map of the NBD export does not cover {offset}+{length}"
            )));
        }
        Ok(out)
    }
}

/// Clears a flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

struct QemuView {
    provider: Arc<Inner>,
    vm: String,
    consistency: Consistency,
    disks: Vec<NbdDisk>,
    pending: Pending,
    notes: Vec<Note>,
}

impl View for QemuView {
    fn consistency(&self) -> Consistency {
        self.consistency
    }

    fn disks(&self) -> Vec<DiskInput<'_>> {
        self.disks
            .iter()
            .map(|d| DiskInput {
                disk: d,
                name: d.name.clone(),
                format: d.format.clone(),
                changed: d.changed.clone(),
                excluded: Vec::new(),
            })
            .collect()
    }

    fn notes(&self) -> Vec<Note> {
        self.notes.clone()
    }

    fn start_reading(&self, cancel: &Arc<AtomicBool>) {
        for d in &self.disks {
            d.ahead.arm(d.io_timeout, cancel.clone());
        }
    }

    fn release(self: Box<Self>, ok: bool) -> Result<()> {
        let QemuView {
            provider,
            vm,
            disks,
            pending,
            ..
        } = *self;
        for d in disks {
            // The export goes anyway; a failed goodbye changes nothing.
            let _ = d.client.disconnect();
        }
        let vm = vm.as_str();
        let slot = provider.slot(vm);
        // Whatever happens below, the view is no longer in use: a release that fails
        // leaves its record pending, and the inventory undoes it once QEMU answers.
        let _in_use = ClearOnDrop(&slot.viewing);
        provider.with_qmp(vm, |qmp| {
            remove_leftovers(vm, qmp)?;
            if pending.nbd_server {
                stop_nbd_server(vm, qmp)?;
            }
            let mut st = provider.load_state(vm)?;
            if ok {
                let mut actions = Vec::new();
                for d in &pending.disks {
                    if let Some(old) = &d.old {
                        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": d.node, "name": old}}));
                    }
                }
                if !actions.is_empty() {
                    qmp.execute("transaction", json!({ "actions": actions }))
                        .map_err(|e| hv(vm, "removing the consumed dirty bitmaps", e))?;
                }
                st.disks = pending
                    .disks
                    .iter()
                    .map(|d| Track {
                        node: d.node.clone(),
                        bitmap: d.new.clone(),
                        size: d.size,
                    })
                    .collect();
                st.view_unix = pending.view_unix;
                st.view_base = pending.view_base.clone();
                st.also_bases.clear();
            } else {
                undo_view(vm, qmp, &mut st, &pending)?;
            }
            st.pending = None;
            provider.save_state(vm, &st)?;
            provider.remove_files(vm);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_vms_parse_and_bad_ones_are_named() {
        assert_eq!(
            ListedVm::parse("web01=/run/q/web01.sock").unwrap(),
            ListedVm {
                name: "web01".into(),
                qmp: "/run/q/web01.sock".into(),
                qga: None
            }
        );
        assert_eq!(
            ListedVm::parse("db=/a/m.sock,qga=/a/g.sock").unwrap().qga,
            Some(PathBuf::from("/a/g.sock"))
        );
        for bad in [
            "",
            "noequals",
            "=/x",
            "a/b=/x",
            "vm=",
            "vm=/x,qgb=/y",
            "vm=/x,qga=",
        ] {
            let e = ListedVm::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--qmp-socket"), "{bad}: {e}");
        }
    }
}
