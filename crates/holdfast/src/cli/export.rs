//! `export-nbd`: serve one disk of a recovery point as an NBD export (instant recovery).
//!
//! With `-d` the recovery point is read in place through `datastore::PointDisk`;
//! without, through the server's API (`recovery::RemoteDisk`), so any host with the
//! admin credentials can serve a point to its hypervisor on a local socket.
//! `recovery::PointExport` adapts the disk (with its block cache); `--writable` puts a
//! copy-on-write overlay (`nbd::CowExport`) in front, thrown away at exit.

use super::admin::ServerArgs;
use super::store::choose_disk;
use anyhow::{Context, anyhow, bail};
use clap::Args;
use client::seg;
use nbd::{CowExport, Export, Listener, Server};
use protocol::RecoveryPointInfo;
use recovery::{PointExport, RemoteDisk};
use std::io::{self, Write};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Read the copy on a storage target (through the server): online:NAME.
    #[arg(long, value_name = "online:NAME", conflicts_with = "datastore")]
    from: Option<String>,
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
    let mut here = list
        .iter()
        .filter(|r| super::online::held_at(r, a.from.as_deref()));
    let p = match a.point.as_str() {
        "latest" => here.max_by_key(|r| (r.created_unix, r.id.clone())),
        id => here.find(|r| r.id == id),
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
        disk: Arc::new(RemoteDisk::new(
            cl,
            &p.id,
            disk_no,
            d.virtual_size,
            a.from.as_deref(),
        )),
        // The server's datastore block; reads of whole blocks pass through the cache.
        block: recovery::remote::REMOTE_BLOCK,
        point: p.id.clone(),
        disk_no,
        name: d.name.clone(),
    })
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
