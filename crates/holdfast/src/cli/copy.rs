//! `holdfast copy`: copies recovery points from one datastore into another (a folder, or
//! object storage: the second, online copy), re-encoded with the target's key and
//! deduplicated against what the target holds.

use super::progress::Progress;
use super::store::StoreArgs;
use super::units::human;
use anyhow::{Context, bail};
use clap::Args;
use datastore::{CopyOptions, CopyReport, Datastore, StoreOptions, Throttle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct CopyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The datastore to copy into: a folder, or az://ACCOUNT/CONTAINER or s3://BUCKET
    /// (credentials from HOLDFAST_STORAGE_KEY_FILE, as for -d). Its block size must be
    /// the source's for incremental copies (--create makes it so).
    #[arg(long, value_name = "DEST")]
    to: PathBuf,
    /// Only this source, HOST/VM (repeatable; default: every source in the datastore).
    /// Its newest recovery point is copied.
    #[arg(long = "source", value_name = "HOST/VM")]
    sources: Vec<String>,
    /// Copy this recovery point (instead of each source's newest).
    #[arg(long, value_name = "ID")]
    point: Option<String>,
    /// Key file of the target: read when it is encrypted, written by --create.
    #[arg(long, value_name = "FILE")]
    to_key_file: Option<PathBuf>,
    /// Create the target when it holds no datastore yet: encrypted, its key written to
    /// --to-key-file (which must not exist), the source's block size.
    #[arg(long, requires = "to_key_file")]
    create: bool,
    /// Upload at most this many KiB per second.
    #[arg(long, value_name = "KBPS")]
    bandwidth: Option<u64>,
    /// Machine-readable output: {"copies": [...], "requests": {...}} (requests sent to
    /// the target; zero for a folder).
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// Opens (or with `--create`, creates) the target, with its request counters.
fn open_target(
    a: &CopyArgs,
    src: &Datastore,
) -> anyhow::Result<(Datastore, Arc<objstore::Counters>)> {
    let target = match super::location::object_target(&a.to)? {
        Some(t) => t,
        None => objstore::Target::Folder { path: a.to.clone() },
    };
    let location = target.location();
    let (backend, counters) = objstore::open_counted(&target, &objstore::Options::default())?;
    let exists = backend
        .exists(datastore::CONFIG_KEY)
        .with_context(|| format!("{location}: looking for a datastore"))?;
    let key = a.to_key_file.as_deref();
    let ds = match (exists, a.create) {
        (true, _) | (false, false) => {
            let ds = match &target {
                objstore::Target::Folder { path } => super::store::open_store(path, key)?,
                _ => Datastore::open_on(backend, &location, key)?,
            };
            if ds.config().block_size != src.config().block_size {
                eprintln!(
                    "holdfast: warning: {location} uses {} blocks, the source {}: every copy reads whole disks",
                    human(ds.config().block_size.into()),
                    human(src.config().block_size.into())
                );
            }
            ds
        }
        (false, true) => {
            let Some(key) = key else {
                bail!("--create needs --to-key-file");
            };
            if key.exists() {
                bail!(
                    "{}: exists; --create writes a new key file and never overwrites one",
                    key.display()
                );
            }
            let opts = StoreOptions {
                key_file: Some(key.to_path_buf()),
                zstd_level: src.config().zstd_level,
                block_size: src.config().block_size,
            };
            let ds = match &target {
                objstore::Target::Folder { path } => Datastore::create(path, &opts)?,
                _ => Datastore::create_on(backend, &location, &opts)?,
            };
            eprintln!(
                "created datastore {location}; key file {} (keep a copy somewhere safe)",
                key.display()
            );
            ds
        }
    };
    Ok((ds, counters))
}

/// The recovery points to copy: the given one, else each chosen source's newest.
fn chosen_points(a: &CopyArgs, src: &Datastore) -> anyhow::Result<Vec<(String, u64)>> {
    let size = |m: &datastore::Manifest| m.disks.iter().map(|d| d.virtual_size).sum::<u64>();
    if let Some(id) = &a.point {
        let m = src.point(id)?;
        if !a.sources.is_empty() && !a.sources.contains(&m.source.name) {
            bail!(
                "recovery point {id} belongs to source {:?}, not to a --source given",
                m.source.name
            );
        }
        return Ok(vec![(m.id.clone(), size(&m))]);
    }
    let (points, _) = src.points()?;
    let mut names: Vec<String> = if a.sources.is_empty() {
        points.iter().map(|m| m.source.name.clone()).collect()
    } else {
        a.sources.clone()
    };
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for n in names {
        let Some(m) = points.iter().rev().find(|m| m.source.name == n) else {
            bail!(
                "no recovery point of source {n:?} in {}",
                src.backend().location()
            );
        };
        out.push((m.id.clone(), size(m)));
    }
    Ok(out)
}

fn show(r: &CopyReport) {
    if r.already_there {
        println!("{} {}: already there", r.point, r.source);
        return;
    }
    println!(
        "{} {}: read {}, {} new blobs, uploaded {} in {:.2} s{}{}",
        r.point,
        r.source,
        human(r.bytes_read),
        r.blobs_new,
        human(r.bytes_uploaded),
        r.seconds,
        r.base
            .as_ref()
            .map(|b| format!(", based on {b}"))
            .unwrap_or_default(),
        if r.ranges_compared {
            " (changed blocks only)"
        } else {
            ""
        }
    );
}

pub fn copy(a: &CopyArgs) -> anyhow::Result<ExitCode> {
    let src = a.store.open()?;
    let (dst, counters) = open_target(a, &src)?;
    let points = chosen_points(a, &src)?;
    let throttle = a.bandwidth.and_then(Throttle::new);
    let opts = CopyOptions {
        throttle: throttle.as_ref(),
        cancel: None,
    };
    let mut copies = Vec::new();
    for (id, size) in points {
        let bar = Progress::new(&format!("copying {id}"), size, !a.quiet && !a.json);
        let r = dst.copy_point_from(&src, &id, &opts, &mut |done, _| bar.set(done));
        bar.finish();
        let r = r.with_context(|| format!("copying recovery point {id}"))?;
        if !a.json {
            show(&r);
        }
        copies.push(r);
    }
    if a.json {
        super::admin::print_json(&serde_json::json!({
            "copies": copies,
            "requests": &*counters,
        }))?;
    } else if counters.snapshot().total > 0 {
        let c = counters.snapshot();
        eprintln!(
            "requests to {}: {} ({} put, {} get, {} list, {} head, {} delete), {} up, {} down",
            dst.backend().location(),
            c.total,
            c.put,
            c.get,
            c.list,
            c.head,
            c.delete,
            human(c.bytes_up),
            human(c.bytes_down)
        );
    }
    Ok(ExitCode::SUCCESS)
}
