//! `export-nbd`: serve one disk of a recovery point as an NBD export (instant recovery).
//!
//! With `-d` the recovery point is read in place through `datastore::PointDisk`;
//! without, through the server's API ([`RemoteDisk`]: `GET .../disks/{n}/data` and
//! `.../map` over mutual TLS), so any host with the admin credentials can serve a point
//! to its hypervisor on a local socket. A small cache of whole datastore blocks sits in
//! front, since clients read in pieces (QEMU in 64 KiB, `nbdcopy` in 256 KiB) far
//! smaller than a datastore block, and every read of a block otherwise decompresses
//! (and decrypts, or fetches) all of it. `--writable` puts a copy-on-write overlay
//! (`nbd::CowExport`) in front, thrown away at exit.

use super::admin::ServerArgs;
use super::store::choose_disk;
use anyhow::{Context, anyhow, bail};
use clap::Args;
use client::{Client, seg};
use nbd::{CowExport, Export, Listener, Server};
use protocol::{DiskExtent, RecoveryPointInfo};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vdisk::VirtualDisk;

#[derive(Debug, Args)]
pub struct ExportNbdArgs {
    /// The recovery point's source name (HOST/VM for points the server made).
    source: String,
    /// Read this datastore folder directly (on the backup server's machine) instead of
    /// through the server's API.
    #[arg(long, short = 'd')]
    datastore: Option<PathBuf>,
    /// Key file of an encrypted datastore (with -d; default: DATASTORE.key beside it).
    #[arg(long, requires = "datastore")]
    key_file: Option<PathBuf>,
    /// Recovery point id, or `latest`.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Disk number (from 0); needed when the recovery point has several disks.
    #[arg(long)]
    disk: Option<usize>,
    /// Where to listen: `unix:PATH` (a new socket file) or `ADDR:PORT` (TCP; port 0
    /// picks a free one). The URI to connect to is printed on stdout.
    #[arg(long)]
    listen: String,
    /// Accept writes, keeping them in a temporary overlay file that is deleted at exit;
    /// the recovery point itself is never modified.
    #[arg(long)]
    writable: bool,
    /// Folder for the overlay file (with --writable; default: $TMPDIR or /tmp).
    #[arg(long, requires = "writable")]
    overlay_dir: Option<PathBuf>,
    /// Decompressed datastore blocks kept in memory (0 = no cache).
    #[arg(long, default_value_t = 64)]
    cache_blocks: usize,
}

/// Set by SIGINT/SIGTERM; the server polls it.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let old = unsafe { libc::signal(sig, handler as libc::sighandler_t) };
        if old == libc::SIG_ERR {
            bail!(
                "installing a handler for signal {sig}: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// A recovery point's disk as an NBD export, with a cache of whole blocks.
struct PointExport {
    disk: Arc<dyn VirtualDisk>,
    block: u64,
    cache: Option<Mutex<BlockCache>>,
}

/// The most recently used blocks, by block number.
struct BlockCache {
    cap: usize,
    blocks: HashMap<u64, Arc<Vec<u8>>>,
    /// Least recently used first.
    order: VecDeque<u64>,
}

impl BlockCache {
    fn get(&mut self, b: u64) -> Option<Arc<Vec<u8>>> {
        let data = self.blocks.get(&b)?.clone();
        if let Some(i) = self.order.iter().position(|&x| x == b) {
            self.order.remove(i);
        }
        self.order.push_back(b);
        Some(data)
    }

    fn put(&mut self, b: u64, data: Arc<Vec<u8>>) {
        if self.blocks.insert(b, data).is_some() {
            return;
        }
        self.order.push_back(b);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.blocks.remove(&old);
            }
        }
    }
}

fn io_err(e: vdisk::Error) -> io::Error {
    match e {
        vdisk::Error::OutOfRange { .. } => io::Error::new(io::ErrorKind::InvalidInput, e),
        e => io::Error::other(e),
    }
}

impl PointExport {
    fn new(disk: Arc<dyn VirtualDisk>, block: u32, cache_blocks: usize) -> PointExport {
        let block = u64::from(block.max(1));
        PointExport {
            disk,
            block,
            cache: (cache_blocks > 0).then(|| {
                Mutex::new(BlockCache {
                    cap: cache_blocks,
                    blocks: HashMap::new(),
                    order: VecDeque::new(),
                })
            }),
        }
    }

    fn cached_block(&self, cache: &Mutex<BlockCache>, b: u64) -> io::Result<Arc<Vec<u8>>> {
        let lock = || cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = lock().get(b) {
            return Ok(d);
        }
        // Decoded without the lock held: other readers go on meanwhile.
        let start = b * self.block;
        let len = (self.size() - start).min(self.block) as usize;
        let mut data = vec![0u8; len];
        self.disk.read_at(&mut data, start).map_err(io_err)?;
        let data = Arc::new(data);
        lock().put(b, data.clone());
        Ok(data)
    }
}

impl Export for PointExport {
    fn size(&self) -> u64 {
        self.disk.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let Some(cache) = &self.cache else {
            return self.disk.read_at(buf, off).map_err(io_err);
        };
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read past the end"))?;
        let mut pos = off;
        while pos < end {
            let b = pos / self.block;
            let start = b * self.block;
            let block_end = (start + self.block).min(self.size());
            let to = block_end.min(end);
            let out = &mut buf[(pos - off) as usize..(to - off) as usize];
            if pos == start && to == block_end {
                // Whole blocks (large sequential reads): decoded straight into place, the
                // whole run in one call (one request through the server).
                let run_end = end - (end - pos) % self.block;
                let run_end = if end == self.size() {
                    end
                } else {
                    run_end.max(to)
                };
                let out = &mut buf[(pos - off) as usize..(run_end - off) as usize];
                self.disk.read_at(out, pos).map_err(io_err)?;
                pos = run_end;
                continue;
            } else {
                let data = self.cached_block(cache, b)?;
                out.copy_from_slice(&data[(pos - start) as usize..(to - start) as usize]);
            }
            pos = to;
        }
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        let extents = self.disk.map(off, len).map_err(io_err)?;
        Ok(extents
            .iter()
            .map(|e| match e.state {
                vdisk::ExtentState::Data => (e.length, 0),
                vdisk::ExtentState::Zero | vdisk::ExtentState::Unallocated => {
                    (e.length, nbd::STATE_HOLE | nbd::STATE_ZERO)
                }
            })
            .collect())
    }
}

/// Binds `--listen`: `unix:PATH` or `ADDR:PORT`.
fn bind(listen: &str) -> anyhow::Result<Listener> {
    if let Some(path) = listen.strip_prefix("unix:") {
        if path.is_empty() {
            bail!("--listen unix:PATH needs a path");
        }
        let path = std::path::absolute(path).with_context(|| format!("socket path {path}"))?;
        if path.symlink_metadata().is_ok() {
            bail!(
                "{} exists (another export running? remove it if not)",
                path.display()
            );
        }
        return Listener::unix(&path).with_context(|| format!("listening on {}", path.display()));
    }
    let addrs: Vec<_> = listen
        .to_socket_addrs()
        .with_context(|| format!("bad --listen {listen:?}: expected unix:PATH or ADDR:PORT"))?
        .collect();
    if addrs.is_empty() {
        bail!("--listen {listen:?} resolves to no address");
    }
    Listener::tcp(&addrs[..]).with_context(|| format!("listening on {listen}"))
}

/// What is exported: the disk, its datastore block size, and names for the log.
struct Chosen {
    disk: Arc<dyn VirtualDisk>,
    block: u32,
    point: String,
    disk_no: usize,
    name: String,
}

fn local_disk(a: &ExportNbdArgs, dir: &std::path::Path) -> anyhow::Result<Chosen> {
    let ds = Arc::new(super::store::open_store(dir, a.key_file.as_deref())?);
    let m = ds.find_point(&a.source, Some(&a.point))?;
    let disk_no = choose_disk(&m, a.disk)?;
    let index = Arc::new(ds.blob_index()?);
    let disk = ds.open_disk_shared(&m, disk_no, index)?;
    let rec = disk.record().clone();
    Ok(Chosen {
        disk: Arc::new(disk),
        block: rec.block_size,
        point: m.id,
        disk_no,
        name: rec.name,
    })
}

fn remote_disk(s: &ServerArgs, a: &ExportNbdArgs) -> anyhow::Result<Chosen> {
    let cl = s.client()?;
    let list: Vec<RecoveryPointInfo> =
        cl.get(&format!("/recovery-points?vm={}", seg(&a.source)))?;
    let p = match a.point.as_str() {
        "latest" => list.iter().max_by_key(|r| (r.created_unix, r.id.clone())),
        id => list.iter().find(|r| r.id == id),
    }
    .ok_or_else(|| anyhow!("{} has no recovery point {:?}", a.source, a.point))?;
    let disk_no = match (a.disk, p.disks.len()) {
        (Some(d), n) if d < n => d,
        (Some(d), n) => bail!(
            "recovery point {} has {n} disk(s); there is no disk {d} (numbered from 0)",
            p.id
        ),
        (None, 1) => 0,
        (None, n) => bail!(
            "recovery point {} has {n} disks; choose one with --disk (numbered from 0)",
            p.id
        ),
    };
    let d = &p.disks[disk_no];
    Ok(Chosen {
        disk: Arc::new(RemoteDisk {
            base: format!("/recovery-points/{}/disks/{disk_no}", seg(&p.id)),
            size: d.virtual_size,
            cl,
        }),
        // The server's datastore block; reads of whole blocks pass through the cache.
        block: REMOTE_BLOCK,
        point: p.id.clone(),
        disk_no,
        name: d.name.clone(),
    })
}

/// Cache granularity through the server (the default datastore block size).
const REMOTE_BLOCK: u32 = 64 << 10;
/// Bytes per `data` request (the server's limit).
const REMOTE_READ: u64 = 4 << 20;

/// A recovery point's disk read through the server's API.
struct RemoteDisk {
    cl: Client,
    /// `/recovery-points/{id}/disks/{n}`.
    base: String,
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

impl RemoteDisk {
    fn check(&self, offset: u64, len: u64) -> vdisk::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(vdisk::Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
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
                .get_bytes(&format!("{}/data?offset={pos}&length={n}", self.base))
                .map_err(remote_err)?;
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
                "{}/map?offset={offset}&length={length}",
                self.base
            ))
            .map_err(remote_err)?;
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

pub fn export_nbd(s: &ServerArgs, a: &ExportNbdArgs) -> anyhow::Result<ExitCode> {
    let c = match &a.datastore {
        Some(dir) => local_disk(a, dir)?,
        None => remote_disk(s, a)?,
    };
    let (disk_no, size) = (c.disk_no, c.disk.virtual_size());
    let base: Arc<dyn Export> = Arc::new(PointExport::new(c.disk, c.block, a.cache_blocks));
    let overlay = match a.writable {
        true => {
            let dir = a.overlay_dir.clone().unwrap_or_else(std::env::temp_dir);
            Some(Arc::new(CowExport::new(base.clone(), &dir)?))
        }
        false => None,
    };
    let export: Arc<dyn Export> = match &overlay {
        Some(o) => o.clone(),
        None => base,
    };
    install_signal_handlers()?;
    let listener = bind(&a.listen)?;
    let uri = listener.uri()?;
    // What is served goes to stderr before the URI goes to stdout: a script that waits
    // for the URI finds the description already there.
    eprintln!(
        "holdfast: serving recovery point {} disk {disk_no} ({}, {size} bytes{}) {}; stop with Ctrl-C or SIGTERM",
        c.point,
        c.name,
        if a.datastore.is_some() {
            ""
        } else {
            ", read through the server"
        },
        match &overlay {
            Some(o) => format!("writable, writes go to {}", o.path().display()),
            None => "read-only".to_string(),
        }
    );
    let mut out = io::stdout().lock();
    writeln!(out, "{uri}")?;
    out.flush()?;
    drop(out);
    let server = Server::new(export).with_log(Arc::new(|msg: &str| {
        eprintln!("holdfast: nbd: {msg}");
    }));
    let served = server.serve(&listener, &STOP);
    // Socket file and overlay file go, whatever happened.
    drop(server);
    drop(listener);
    drop(overlay);
    served.context("serving NBD")?;
    eprintln!("holdfast: export stopped");
    Ok(ExitCode::SUCCESS)
}
