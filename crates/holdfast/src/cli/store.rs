//! Local-mode datastore commands: `datastore create`, `backup`, `recovery-points`,
//! `restore`, `verify`, `prune`, `gc`, `forget`. They work on a datastore folder
//! directly, with no server (also the operator's disaster-recovery tools).

use super::progress::Progress;
use super::units::human;
use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use datastore::{BackupRequest, BaseChoice, Datastore, DiskInput, Manifest, Retention, Source};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use vdisk::{CreateOptions, Format, Subformat};

#[derive(Debug, Subcommand)]
pub enum DatastoreCommand {
    /// Create a datastore in a new or empty folder.
    Create(CreateArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Folder for the datastore, or object storage: az://ACCOUNT/CONTAINER or
    /// s3://BUCKET (credentials from HOLDFAST_STORAGE_KEY_FILE, see docs/cli.md).
    dir: PathBuf,
    /// Encrypt everything stored (AES-256-GCM); writes a key file, by default DIR.key
    /// beside the folder. Keep a copy of it: without it nothing can be restored.
    #[arg(long)]
    encrypt: bool,
    /// Where to write the key file (with --encrypt).
    #[arg(long, requires = "encrypt")]
    key_file: Option<PathBuf>,
    /// zstd compression level, 1 (fastest) to 22.
    #[arg(long, default_value_t = 1)]
    zstd_level: i32,
}

/// Options every command that opens a datastore shares.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The datastore folder, or az://ACCOUNT/CONTAINER or s3://BUCKET (credentials
    /// from HOLDFAST_STORAGE_KEY_FILE, see docs/cli.md).
    #[arg(long, short = 'd')]
    datastore: PathBuf,
    /// Key file of an encrypted datastore (default: DATASTORE.key beside the folder).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

impl StoreArgs {
    pub(super) fn open(&self) -> anyhow::Result<Datastore> {
        open_store(&self.datastore, self.key_file.as_deref())
    }
}

/// Opens a datastore folder the way every local-mode command does: a key file given
/// for a plain datastore is refused (by `Datastore::open`), and the key of an
/// encrypted one that its group or others can read is warned about on stderr.
pub(super) fn open_store(dir: &Path, key_file: Option<&Path>) -> anyhow::Result<Datastore> {
    if let Some(target) = super::location::object_target(dir)? {
        // Object storage has no "beside the folder": an encrypted one needs --key-file.
        let backend = objstore::open(&target)?;
        return Ok(Datastore::open_on(backend, &target.location(), key_file)?);
    }
    let ds = Datastore::open(dir, key_file)?;
    if ds.keys().encrypted() {
        let key = key_file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| datastore::default_key_path(dir));
        if let Some(w) = datastore::crypto::key_file_exposure(&key) {
            eprintln!("holdfast: warning: {w}");
        }
    }
    Ok(ds)
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Name of what is protected (a VM name; HOST/VM once a server exists).
    #[arg(long)]
    source: String,
    /// Stable id of the source (the VM's UUID); default: the name.
    #[arg(long)]
    source_id: Option<String>,
    /// Changed ranges since the previous recovery point of this source, from change
    /// tracking: `OFFSET LENGTH` lines in bytes; `disk N` lines start the list of disk N
    /// when several disks are backed up. Without it, every block is read and compared.
    #[arg(long)]
    changed_ranges: Option<PathBuf>,
    /// Recovery point to build on: `latest` (default), an id, or `none` (store as new,
    /// still deduplicated).
    #[arg(long, default_value = "latest")]
    base: String,
    /// Consistency of the disks' point-in-time view.
    #[arg(long, value_enum, default_value = "crash-consistent")]
    consistency: protocol::Consistency,
    /// Machine-readable output: id, bytes_read, bytes_stored and more.
    #[arg(long)]
    json: bool,
    /// No progress bar or summary.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Disk images (raw, VHD, VHDX/AVHDX, qcow2), in the order they are numbered.
    #[arg(required = true)]
    disks: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PointsArgs {
    /// `list` (optional).
    #[arg(value_parser = ["list"])]
    action: Option<String>,
    /// Read a datastore folder directly instead of asking the server.
    #[arg(long, short = 'd')]
    datastore: Option<PathBuf>,
    /// Key file of an encrypted datastore (with -d).
    #[arg(long, requires = "datastore")]
    key_file: Option<PathBuf>,
    /// Only this source (with -d).
    #[arg(long, requires = "datastore")]
    source: Option<String>,
    /// Only this VM, HOST/VM (from the server).
    #[arg(long, conflicts_with = "datastore")]
    pub vm: Option<String>,
    /// Only the latest recovery point at or before this time (UTC), per VM:
    /// "2026-11-24 18:00".
    #[arg(long)]
    pub at: Option<String>,
    /// The calendar: the days that have recovery points, with counts.
    #[arg(long, conflicts_with = "at")]
    pub days: bool,
    #[arg(long)]
    pub json: bool,
}

impl PointsArgs {
    pub fn datastore_given(&self) -> bool {
        self.datastore.is_some()
    }
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    source: String,
    /// Recovery point id, or `latest`.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Disk number (from 0); needed when the recovery point has several disks.
    #[arg(long)]
    disk: Option<usize>,
    /// Image file to write (temporary name, renamed when complete).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Output format; default: the disk's original format.
    #[arg(long, short = 'f')]
    format: Option<protocol::DiskFormat>,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// Skip the final fsync (faster; the file may be incomplete after a power cut).
    #[arg(long)]
    no_fsync: bool,
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The datastore folder, or az://ACCOUNT/CONTAINER or s3://BUCKET (credentials
    /// from HOLDFAST_STORAGE_KEY_FILE, see docs/cli.md).
    #[arg(long, short = 'd', required_unless_present = "storage")]
    datastore: Option<PathBuf>,
    /// Key file of an encrypted datastore (default: DATASTORE.key beside the folder).
    #[arg(long, requires = "datastore")]
    key_file: Option<PathBuf>,
    /// Verify the online copy on this storage target instead, through the server (a
    /// job; damage raises an alert as on disk).
    #[arg(long, conflicts_with = "datastore")]
    pub storage: Option<String>,
    /// Read only this percent of the packs, chosen at random (every manifest and index
    /// is still read).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub sample: Option<u8>,
    #[arg(long)]
    pub json: bool,
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only these sources (repeatable); default: all.
    #[arg(long)]
    source: Vec<String>,
    /// Keep every recovery point of the last DAYS days (the retention range).
    #[arg(long, value_name = "DAYS")]
    keep_within: Option<u32>,
    /// Keep the newest N.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest recovery point of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Recovery point ids to remove (their data goes at the next gc).
    #[arg(long = "point", required = true)]
    points: Vec<String>,
}

pub fn create(a: &CreateArgs) -> anyhow::Result<ExitCode> {
    let target = super::location::object_target(&a.dir)?;
    if target.is_some() && a.encrypt && a.key_file.is_none() {
        bail!("--encrypt on object storage needs --key-file (there is no folder to put it beside)");
    }
    let key_file = a.encrypt.then(|| {
        a.key_file
            .clone()
            .unwrap_or_else(|| datastore::default_key_path(&a.dir))
    });
    let opts = datastore::StoreOptions {
        key_file: key_file.clone(),
        zstd_level: a.zstd_level,
        ..Default::default()
    };
    let ds = match &target {
        Some(t) => Datastore::create_on(objstore::open(t)?, &t.location(), &opts)?,
        None => Datastore::create(&a.dir, &opts)?,
    };
    println!(
        "created datastore {} (id {})",
        a.dir.display(),
        ds.config().id
    );
    if let Some(k) = key_file {
        println!(
            "key file: {} (keep a copy somewhere safe: without it nothing can be restored)",
            k.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn backup(a: &BackupArgs) -> anyhow::Result<ExitCode> {
    let ds = a.store.open()?;
    let disks: Vec<Box<dyn vdisk::VirtualDisk>> = a
        .disks
        .iter()
        .map(|p| vdisk::open(p).with_context(|| format!("opening disk {}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    let changed = match &a.changed_ranges {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let sizes: Vec<u64> = disks.iter().map(|d| d.virtual_size()).collect();
            Some(datastore::ranges::parse(
                &path.display().to_string(),
                &text,
                &sizes,
            )?)
        }
        None => None,
    };
    let inputs = disks
        .iter()
        .zip(&a.disks)
        .enumerate()
        .map(|(i, (d, p))| DiskInput {
            disk: d.as_ref(),
            name: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            format: d.info().format.name().to_string(),
            changed: changed.as_ref().map(|c| c[i].clone()),
            excluded: Vec::new(),
        })
        .collect();
    let base = match a.base.as_str() {
        "latest" => BaseChoice::Latest,
        "none" => BaseChoice::None,
        id => BaseChoice::Point(id.to_string()),
    };
    let total: u64 = disks.iter().map(|d| d.virtual_size()).sum();
    let bar = Progress::new("backing up", total, !a.quiet && !a.json);
    let t = Instant::now();
    let m = ds.backup(
        BackupRequest {
            source: Source {
                name: a.source.clone(),
                id: a.source_id.clone().unwrap_or_else(|| a.source.clone()),
            },
            consistency: a.consistency.into(),
            base,
            disks: inputs,
        },
        &mut |done, _| bar.set(done),
    );
    bar.finish();
    let m = m?;
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        let s = &m.stats;
        println!(
            "{}",
            json!({
                "id": m.id,
                "source": m.source.name,
                "created": m.created,
                "base": m.base,
                "bytes_read": s.bytes_read,
                "bytes_stored": s.bytes_stored,
                "bytes_new": s.bytes_new,
                "blocks_new": s.blocks_new,
                "blocks_dedup": s.blocks_dedup,
                "blocks_reused": s.blocks_reused,
                "blocks_zero": s.blocks_zero,
                "changed_bytes": s.changed_bytes,
                "seconds": secs,
            })
        );
    } else {
        println!("{}", m.id);
        if !a.quiet {
            eprintln!(
                "recovery point {} of {}: {} disk(s), {} virtual; read {}, stored {} new in {:.2} s{}",
                m.id,
                m.source.name,
                m.disks.len(),
                human(total),
                human(m.stats.bytes_read),
                human(m.stats.bytes_stored),
                secs,
                m.base
                    .as_ref()
                    .map(|b| format!(" (based on {b})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn point_json(m: &Manifest) -> serde_json::Value {
    json!({
        "id": m.id,
        "source": m.source.name,
        "source_id": m.source.id,
        "created": m.created,
        "base": m.base,
        "consistency": m.consistency,
        "disks": m.disks.iter().map(|d| json!({
            "index": d.index, "name": d.name, "format": d.format,
            "virtual_size": d.virtual_size, "logical_sector_size": d.logical_sector_size,
            "excluded": d.excluded,
        })).collect::<Vec<_>>(),
        "stats": m.stats,
    })
}

pub fn points(a: &PointsArgs) -> anyhow::Result<ExitCode> {
    let store = StoreArgs {
        datastore: a.datastore.clone().unwrap_or_default(),
        key_file: a.key_file.clone(),
    };
    let ds = store.open()?;
    let (list, damaged) = ds.points()?;
    for d in &damaged {
        eprintln!(
            "holdfast: warning: {}: unreadable recovery point: {}",
            d.key, d.error
        );
    }
    let mut list: Vec<&Manifest> = list
        .iter()
        .filter(|m| a.source.as_ref().is_none_or(|s| &m.source.name == s))
        .collect();
    if let Some(t) = &a.at {
        let owned: Vec<Manifest> = list.iter().map(|m| (*m).clone()).collect();
        let keep: Vec<String> = super::calendar::at(owned, super::calendar::parse_at(t)?)
            .into_iter()
            .map(|m| m.id)
            .collect();
        list.retain(|m| keep.contains(&m.id));
        if list.is_empty() {
            bail!("no recovery point at or before {t}");
        }
    }
    if a.days {
        let owned: Vec<Manifest> = list.iter().map(|m| (*m).clone()).collect();
        let d = super::calendar::days(&owned);
        if a.json {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            super::calendar::print_days(&d);
        }
    } else if a.json {
        let v: Vec<_> = list.iter().map(|m| point_json(m)).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<33} {:<20} {:<21} {:>5} {:>10} {:>10}",
            "ID", "SOURCE", "CREATED", "DISKS", "SIZE", "NEW"
        );
        let mut headers = super::calendar::DayHeaders::new();
        for m in list {
            headers.row(m.created_unix);
            let size: u64 = m.disks.iter().map(|d| d.virtual_size).sum();
            println!(
                "{:<33} {:<20} {:<21} {:>5} {:>10} {:>10}",
                m.id,
                m.source.name,
                m.created,
                m.disks.len(),
                human(size),
                human(m.stats.bytes_stored)
            );
        }
    }
    Ok(if damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// The disk of `m` a command works on: `--disk N`, or the only one (a point with
/// several disks needs `--disk`). Out-of-range numbers are refused when the disk is
/// opened, with the count in the message.
pub(super) fn choose_disk(m: &Manifest, disk: Option<usize>) -> anyhow::Result<usize> {
    Ok(match (disk, m.disks.len()) {
        (Some(n), _) => n,
        (None, 1) => 0,
        (None, n) => bail!(
            "recovery point {} has {n} disks; choose one with --disk (0 to {})",
            m.id,
            n.saturating_sub(1)
        ),
    })
}

pub fn restore(a: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let ds = a.store.open()?;
    let m = ds.find_point(&a.source, Some(&a.point))?;
    let disk_no = choose_disk(&m, a.disk)?;
    if a.output.exists() && !a.overwrite {
        bail!(
            "{} exists; pass --overwrite to replace it",
            a.output.display()
        );
    }
    let index = Arc::new(ds.blob_index()?);
    let disk = ds.open_disk(&m, disk_no, index)?;
    let rec = disk.record().clone();
    let format: Format = match &a.format {
        Some(f) => super::image::image_format(*f),
        None => rec.format.parse().unwrap_or(Format::Raw),
    };
    let subformat = if format == Format::Raw {
        Subformat::Fixed
    } else {
        Subformat::Dynamic
    };
    let mut opts = CreateOptions::new(format, subformat, rec.virtual_size);
    opts.durable = !a.no_fsync;
    opts.logical_sector_size = if format == Format::Vhdx {
        rec.logical_sector_size
    } else {
        512
    };
    opts.physical_sector_size = rec.physical_sector_size.max(opts.logical_sector_size);
    let bar = Progress::new("restoring", rec.virtual_size, !a.quiet);
    let t = Instant::now();
    let stats = vdisk::copy::write_image(&disk, &a.output, &opts, &mut |done, _| bar.set(done));
    bar.finish();
    let stats =
        stats.with_context(|| format!("restoring recovery point {} disk {disk_no}", m.id))?;
    if !a.quiet {
        eprintln!(
            "restored {} disk {disk_no} ({}) to {} ({format}, {} virtual, {} of data) in {:.2} s",
            m.id,
            rec.name,
            a.output.display(),
            human(rec.virtual_size),
            human(stats.bytes_written),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(a: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let dir = a
        .datastore
        .as_deref()
        .ok_or_else(|| anyhow!("give -d DATASTORE (or --storage NAME)"))?;
    let ds = open_store(dir, a.key_file.as_deref())?;
    let bar = Progress::new("verifying", 0, !a.quiet && !a.json);
    let mut set_len = true;
    let mut progress = |done, total| {
        if set_len {
            bar.set_len(total);
            set_len = false;
        }
        bar.set(done)
    };
    let r = ds.verify_sample(a.sample.unwrap_or(100), &mut progress);
    bar.finish();
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "checked {} recovery point(s), {} pack(s){}, {} blob(s), {}",
            r.points,
            r.packs,
            if r.packs_read < r.packs {
                format!(
                    " ({} read in full: a {}% sample)",
                    r.packs_read, r.sample_percent
                )
            } else {
                String::new()
            },
            r.blobs,
            human(r.bytes)
        );
        for f in &r.damaged_files {
            println!("damaged: {}: {}", f.key, f.error);
        }
        for p in &r.damaged_points {
            match &p.error {
                Some(e) => println!("recovery point {}: unreadable: {e}", p.id),
                None => {
                    for d in &p.disks {
                        println!(
                            "recovery point {} ({}) disk {}: {} damaged block(s), {} damaged index piece(s), first at offset {}",
                            p.id,
                            p.source.as_deref().unwrap_or("?"),
                            d.disk,
                            d.bad_blocks,
                            d.bad_index_pieces,
                            d.first_bad_offset
                        );
                    }
                }
            }
        }
        if r.unreferenced_damage > 0 {
            println!(
                "{} damaged blob copies that no recovery point needs (gc removes them)",
                r.unreferenced_damage
            );
        }
        if r.is_clean() {
            println!("ok: every recovery point restores exactly");
        } else {
            println!(
                "DAMAGED: {} recovery point(s) affected; the next backup of an affected source stores damaged blocks again",
                r.damaged_points.len()
            );
        }
    }
    Ok(if r.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub fn prune(a: &PruneArgs) -> anyhow::Result<ExitCode> {
    let ds = a.store.open()?;
    let rules = Retention {
        within_days: a.keep_within,
        last: a.keep_last,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    let plan = ds.prune(&rules, &a.source, a.dry_run)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"dry_run": a.dry_run, "decisions": plan}))?
        );
    } else {
        for d in &plan {
            println!(
                "{} {} {} {}{}",
                if d.keep {
                    "keep  "
                } else if a.dry_run {
                    "would remove"
                } else {
                    "remove"
                },
                d.id,
                d.source,
                d.created,
                if d.keep {
                    format!(" ({})", d.reasons.join(", "))
                } else {
                    String::new()
                }
            );
        }
        let removed = plan.iter().filter(|d| !d.keep).count();
        println!(
            "{} {removed} of {} recovery point(s){}",
            if a.dry_run { "would remove" } else { "removed" },
            plan.len(),
            if a.dry_run || removed == 0 {
                ""
            } else {
                "; run gc to reclaim their space"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(a: &GcArgs) -> anyhow::Result<ExitCode> {
    let ds = a.store.open()?;
    let r = ds.gc(&mut |msg| eprintln!("holdfast: {msg}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "gc: {} recovery point(s), {} live blob(s); {} pack(s) removed, {} compacted into {}; freed {}",
            r.points,
            r.live_blobs,
            r.packs_deleted,
            r.packs_repacked,
            r.packs_written,
            human(r.bytes_freed.max(0) as u64)
        );
        if r.unhealed_blobs + r.missing_blobs > 0 {
            println!(
                "warning: {} referenced blob(s) exist only as damaged copies and {} are missing: run verify to see which recovery points are affected; backing up their sources again heals what the source still has",
                r.unhealed_blobs, r.missing_blobs
            );
        }
    }
    Ok(if r.unhealed_blobs + r.missing_blobs > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn forget(a: &ForgetArgs) -> anyhow::Result<ExitCode> {
    let ds = a.store.open()?;
    for id in &a.points {
        match ds.point(id) {
            // A damaged manifest can still be removed by id.
            Ok(_) | Err(datastore::Error::Corrupt { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        ds.forget(id)?;
        println!("removed recovery point {id}; run gc to reclaim its space");
    }
    Ok(ExitCode::SUCCESS)
}
