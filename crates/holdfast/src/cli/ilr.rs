//! `holdfast ilr ls|get`: item-level recovery, straight from a datastore folder (`-d`)
//! or through the server's API.

use super::admin::ServerArgs;
use super::units::human;
use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use client::{Client, seg};
use datastore::{Datastore, Manifest};
use fsview::FileSystem;
use protocol::{IlrListing, RecoveryPointInfo};
use recovery::RemoteFs;
use recovery::remote::path_q;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Subcommand)]
pub enum IlrCommand {
    /// List a folder (or a disk's partitions) inside a recovery point.
    Ls(LsArgs),
    /// Copy files and folders out of a recovery point, keeping names and times.
    Get(GetArgs),
}

/// Which recovery point, disk and volume.
#[derive(Debug, Args)]
pub struct Where {
    /// HOST/VM (the recovery points' source name).
    vm: String,
    /// Read this datastore folder directly instead of asking the server.
    #[arg(long, short = 'd')]
    datastore: Option<PathBuf>,
    /// Key file of an encrypted datastore (with -d).
    #[arg(long, requires = "datastore")]
    key_file: Option<PathBuf>,
    /// Recovery point id, or `latest`.
    #[arg(long, default_value = "latest", conflicts_with = "at")]
    point: String,
    /// The latest recovery point at or before this time (UTC), "YYYY-MM-DD HH:MM".
    #[arg(long)]
    at: Option<String>,
    /// Disk number (0-based, in recovery-point order).
    #[arg(long, default_value_t = 0)]
    disk: u32,
    /// Partition number (1-based, as in /dev/sda1); not needed for a disk with one
    /// volume.
    #[arg(long)]
    partition: Option<u32>,
    /// Read the copy on a storage target (through the server): online:NAME.
    #[arg(long, value_name = "online:NAME", conflicts_with = "datastore")]
    from: Option<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    at: Where,
    /// Folder or file inside the file system.
    #[arg(default_value = "/")]
    path: String,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    at: Where,
    /// Files and folders to copy (folders recursively).
    #[arg(required = true)]
    paths: Vec<String>,
    /// Where to copy: a local folder (created if missing), or `HOST:DIR` for a folder
    /// on a host with an agent (a recovery job; the items land in
    /// `DIR/holdfast_<time>_job<ID>/`). A local folder whose name holds a colon: `./a:b`.
    #[arg(long, value_name = "DIR|HOST:DIR")]
    to_folder: String,
    /// With HOST:DIR: limit the data fetched from the server, KiB per second.
    #[arg(long, value_name = "KBPS")]
    throttle: Option<u64>,
    /// With HOST:DIR: e-mail this address when the copy ends (repeatable).
    #[arg(long, value_name = "EMAIL")]
    notify: Vec<String>,
    /// With HOST:DIR: queue the job and return without waiting for it.
    #[arg(long)]
    no_wait: bool,
}

pub fn run(s: &ServerArgs, cmd: IlrCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        IlrCommand::Ls(a) => {
            let listing = match &a.at.datastore {
                Some(_) => {
                    let (ds, m) = local_point(&a.at)?;
                    let disk = recovery::open_disk(&ds, &m, a.at.disk as usize)?;
                    recovery::browse(disk, &m, a.at.disk as usize, a.at.partition, &a.path)?
                }
                None => {
                    let cl = s.client()?;
                    let id = server_point(&cl, &a.at)?;
                    cl.get(&format!("{}{}", browse_path(&id, &a.at), path_q(&a.path)))?
                }
            };
            print_listing(&listing, a.json)?;
        }
        IlrCommand::Get(a) => {
            if let Some((host, dir)) = host_folder(&a.to_folder) {
                return get_on_host(s, &a, host, dir);
            }
            if a.throttle.is_some() || !a.notify.is_empty() || a.no_wait {
                bail!("--throttle, --notify and --no-wait apply to a HOST:DIR target only");
            }
            let to = PathBuf::from(&a.to_folder);
            let made_to = !to.exists();
            let mut fs: Box<dyn FileSystem> = match &a.at.datastore {
                Some(_) => {
                    let (ds, m) = local_point(&a.at)?;
                    let disk = recovery::open_disk(&ds, &m, a.at.disk as usize)?;
                    recovery::open_fs(disk, &m, a.at.disk as usize, a.at.partition)?
                }
                None => {
                    let cl = s.client()?;
                    let id = server_point(&cl, &a.at)?;
                    Box::new(RemoteFs::new(
                        cl,
                        &id,
                        a.at.disk,
                        a.at.partition,
                        a.at.from.as_deref(),
                    ))
                }
            };
            std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
            let mut report = fsview::Report::default();
            // All items at once, so that same-named ones are told apart; a failure
            // removes what was copied (and the folder, if this made it).
            if let Err(e) = fsview::extract_all(fs.as_mut(), &a.paths, &to, &mut report) {
                if made_to {
                    let _ = std::fs::remove_dir(&to);
                }
                return Err(anyhow!(e).context(format!(
                    "copying {} (nothing was left in {})",
                    a.paths.join(", "),
                    to.display()
                )));
            }
            for l in report.lines() {
                eprintln!("holdfast: {l}");
            }
            println!(
                "copied {} file(s), {} folder(s), {} link(s), {} into {}",
                report.files,
                report.dirs,
                report.links,
                human(report.bytes),
                to.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `HOST:DIR` (a host name before the first colon, no slash in it), else a local path.
fn host_folder(s: &str) -> Option<(&str, &str)> {
    s.split_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains(['/', '\\']))
}

/// `ilr get ... --to-folder HOST:DIR`: a recovery job on that host's agent copies the
/// items out of the recovery point (read through the server), into
/// `DIR/holdfast_<time>_job<ID>/`.
fn get_on_host(s: &ServerArgs, a: &GetArgs, host: &str, dir: &str) -> anyhow::Result<ExitCode> {
    if a.at.datastore.is_some() {
        bail!("--to-folder {host}:{dir} goes through the server; drop -d, or give a local folder");
    }
    let mut req = protocol::RecoveryRequest {
        vm: a.at.vm.clone(),
        point: None,
        at: None,
        target: protocol::RecoveryTarget::CopyTo {
            host: host.to_string(),
            dir: dir.to_string(),
            disk: Some(a.at.disk),
            partition: a.at.partition,
            items: a.paths.clone(),
        },
        throttle_kbps: a.throttle,
        notify: a.notify.clone(),
        from: a.at.from.clone(),
    };
    // The server's own check (folder, items), before anything is asked of it.
    req.validate().map_err(|e| anyhow!(e))?;
    let cl = s.client()?;
    req.point = Some(server_point(&cl, &a.at)?);
    let j: protocol::JobInfo = cl.post("/recoveries", &req)?;
    let id = j.id;
    let code = super::admin::started(&cl, j, !a.no_wait, false)?;
    if !a.no_wait {
        // What was copied, names changed, where it went: the job's log says it.
        let j: protocol::JobInfo = cl.get(&format!("/jobs/{id}"))?;
        for l in &j.log {
            println!("  {}", l.message);
        }
    }
    Ok(code)
}

fn at_time(w: &Where) -> anyhow::Result<Option<i64>> {
    w.at.as_deref()
        .map(|t| {
            utc::parse(t)
                .ok_or_else(|| anyhow!("--at {t:?} is not a time like \"2026-11-24 18:00\" (UTC)"))
        })
        .transpose()
}

fn local_point(w: &Where) -> anyhow::Result<(Arc<Datastore>, Manifest)> {
    let dir = w.datastore.as_deref().unwrap_or(Path::new("."));
    let ds = Arc::new(super::store::open_store(dir, w.key_file.as_deref())?);
    let m = match at_time(w)? {
        Some(t) => {
            let (points, _) = ds.points()?;
            points
                .into_iter()
                .rev()
                .find(|m| m.source.name == w.vm && m.created_unix <= t)
                .ok_or_else(|| {
                    anyhow!(
                        "no recovery point of {} at or before {}",
                        w.vm,
                        w.at.as_deref().unwrap_or("")
                    )
                })?
        }
        None => ds.find_point(&w.vm, Some(&w.point))?,
    };
    Ok((ds, m))
}

/// The chosen recovery point's id, from the server's list for the VM.
fn server_point(cl: &Client, w: &Where) -> anyhow::Result<String> {
    if w.point != "latest" && w.at.is_none() {
        return Ok(w.point.clone());
    }
    let list: Vec<RecoveryPointInfo> = cl.get(&format!("/recovery-points?vm={}", seg(&w.vm)))?;
    let t = at_time(w)?;
    list.iter()
        .filter(|r| super::online::held_at(r, w.from.as_deref()))
        .filter(|r| t.is_none_or(|t| r.created_unix <= t))
        .max_by_key(|r| (r.created_unix, r.id.clone()))
        .map(|r| r.id.clone())
        .ok_or_else(|| match &w.at {
            Some(at) => anyhow!("no recovery point of {} at or before {at}", w.vm),
            None => anyhow!("no recovery point of {}", w.vm),
        })
}

fn browse_path(id: &str, w: &Where) -> String {
    recovery::remote::browse_path(id, w.disk, w.partition, w.from.as_deref())
}

use fsview::shown;

fn print_listing(l: &IlrListing, json: bool) -> anyhow::Result<()> {
    if json {
        // Volumes are entries too (type "partition"), so scripts read one list.
        let mut entries: Vec<serde_json::Value> = l
            .volumes
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.number.to_string(), "type": "partition", "size": v.size,
                    "fs": v.fs, "supported": v.supported, "start": v.start,
                    "partition_type": v.partition_type, "partition_name": v.name,
                })
            })
            .collect();
        for e in &l.entries {
            entries.push(serde_json::to_value(e)?);
        }
        let mut v = serde_json::to_value(l)?;
        v["entries"] = serde_json::Value::Array(entries);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !l.volumes.is_empty() {
        println!(
            "recovery point {} disk {}: choose a partition with --partition",
            l.recovery_point, l.disk
        );
        println!(
            "{:>4} {:>12} {:>10} {:<10} {:<28} NAME",
            "PART", "START", "SIZE", "FS", "TYPE"
        );
        for v in &l.volumes {
            let fs = if v.supported {
                v.fs.clone()
            } else {
                format!("{} (no browsing)", v.fs)
            };
            println!(
                "{:>4} {:>12} {:>10} {:<10} {:<28} {}",
                v.number,
                v.start,
                human(v.size),
                fs,
                v.partition_type,
                v.name.as_deref().map(shown).unwrap_or_default()
            );
        }
        return Ok(());
    }
    println!(
        "recovery point {} disk {}{} ({}{}): {}",
        l.recovery_point,
        l.disk,
        l.partition
            .map(|p| format!(" partition {p}"))
            .unwrap_or_default(),
        l.fs.as_deref().unwrap_or("?"),
        l.label
            .as_deref()
            .map(|x| format!(", label {}", shown(x)))
            .unwrap_or_default(),
        l.path
    );
    println!("{:<7} {:>10} {:<20} NAME", "TYPE", "SIZE", "MODIFIED");
    for e in &l.entries {
        let target = e.target.as_deref().map(|t| format!(" -> {}", shown(t)));
        println!(
            "{:<7} {:>10} {:<20} {}{}",
            e.kind,
            if e.kind == protocol::EntryKind::Dir {
                "-".into()
            } else {
                human(e.size)
            },
            e.modified.as_deref().unwrap_or("-"),
            shown(&e.name),
            target.unwrap_or_default()
        );
    }
    Ok(())
}
