//! `holdfast image ...`: inspect, convert and check virtual disk images.

use super::progress::Progress;
use super::units::{human, parse_size};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use protocol::DiskFormat;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use vdisk::{CreateOptions, DiskInfo, ExtentState, Format, Subformat};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Format, sizes, block size, allocation and parent chain of an image.
    Info(InfoArgs),
    /// Extents of the virtual disk: data, zero or unallocated.
    Map(MapArgs),
    /// Convert an image to another format (written under a temporary name, renamed
    /// when complete).
    Convert(ConvertArgs),
    /// Validate an image's structures; exits 2 when damage is found.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Image file (format detected from content).
    file: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct MapArgs {
    /// Image file.
    file: PathBuf,
    /// Machine-readable output (a list of {offset, length, state}).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source image (any supported format, detected from content).
    src: PathBuf,
    /// Destination file.
    dst: PathBuf,
    /// Destination format.
    #[arg(long, short = 'f')]
    format: DiskFormat,
    /// dynamic (default) or fixed, for VHD and VHDX.
    #[arg(long, value_parser = ["dynamic", "fixed"])]
    subformat: Option<String>,
    /// VHD/VHDX block size or qcow2 cluster size (e.g. 32M, 64K); format default if
    /// omitted.
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// Logical sector size of a VHDX destination (512 or 4096); default: the source's.
    #[arg(long, value_parser = ["512", "4096"])]
    logical_sector_size: Option<String>,
    /// Replace DST if it exists (it is replaced only once the new image is complete).
    #[arg(long)]
    overwrite: bool,
    /// Do not fsync: leave flushing to the operating system, as qemu-img convert does.
    /// Faster on slow disks, but a crash soon after may leave DST incomplete.
    #[arg(long)]
    no_fsync: bool,
    /// No progress bar and no summary.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Image file.
    file: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Repair what can be repaired in place (replays a VHDX's dirty log) before
    /// checking.
    #[arg(long)]
    repair: bool,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Info(a) => info(&a),
        ImageCommand::Map(a) => map(&a),
        ImageCommand::Convert(a) => convert(&a),
        ImageCommand::Check(a) => check(&a),
    }
}

fn info(a: &InfoArgs) -> anyhow::Result<ExitCode> {
    let disk = vdisk::open(&a.file)?;
    let info = disk.info();
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&info_json(&info))?)?;
    } else {
        print_info(&mut out, &info, 0)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// JSON form of [`DiskInfo`]: details become an object, parents nest.
fn info_json(i: &DiskInfo) -> Value {
    let details: serde_json::Map<String, Value> = i
        .details
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "path": i.path,
        "format": i.format,
        "subformat": i.subformat,
        "virtual_size": i.virtual_size,
        "logical_sector_size": i.logical_sector_size,
        "physical_sector_size": i.physical_sector_size,
        "block_size": i.block_size,
        "file_size": i.file_size,
        "allocated_bytes": i.allocated_bytes,
        "details": details,
        "parent": i.parent.as_deref().map(info_json),
    })
}

fn print_info(out: &mut impl Write, i: &DiskInfo, depth: usize) -> std::io::Result<()> {
    let pad = "  ".repeat(depth);
    writeln!(out, "{pad}file:             {}", i.path.display())?;
    writeln!(
        out,
        "{pad}format:           {} ({})",
        i.format,
        i.subformat.name()
    )?;
    writeln!(
        out,
        "{pad}virtual size:     {} ({} bytes)",
        human(i.virtual_size),
        i.virtual_size
    )?;
    writeln!(
        out,
        "{pad}sector size:      {} logical, {} physical",
        i.logical_sector_size, i.physical_sector_size
    )?;
    if let Some(b) = i.block_size {
        writeln!(out, "{pad}block size:       {}", human(b))?;
    }
    writeln!(
        out,
        "{pad}file size:        {} ({} bytes)",
        human(i.file_size),
        i.file_size
    )?;
    writeln!(
        out,
        "{pad}allocated:        {} ({} bytes)",
        human(i.allocated_bytes),
        i.allocated_bytes
    )?;
    let width = i
        .details
        .iter()
        .map(|(k, _)| k.len() + 2)
        .max()
        .unwrap_or(0)
        .max(18);
    for (k, v) in &i.details {
        writeln!(out, "{pad}{:<width$}{v}", format!("{k}:"))?;
    }
    if let Some(p) = &i.parent {
        writeln!(out, "{pad}parent:")?;
        print_info(out, p, depth + 1)?;
    }
    Ok(())
}

/// How much of the disk is mapped per call, so memory stays bounded on huge disks.
const MAP_WINDOW: u64 = 1 << 34;

fn map(a: &MapArgs) -> anyhow::Result<ExitCode> {
    let disk = vdisk::open(&a.file)?;
    let size = disk.virtual_size();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if a.json {
        writeln!(out, "[")?;
    } else {
        writeln!(out, "{:>18} {:>18}  state", "offset", "length")?;
    }
    // Extents are merged across window boundaries before printing.
    let mut pending: Option<vdisk::Extent> = None;
    let mut first = true;
    let mut emit = |e: &vdisk::Extent, out: &mut dyn Write| -> std::io::Result<()> {
        let state = state_name(e.state);
        if a.json {
            let sep = if first { "" } else { ",\n" };
            write!(
                out,
                "{sep}  {{\"offset\": {}, \"length\": {}, \"state\": \"{state}\"}}",
                e.offset, e.length
            )?;
        } else {
            writeln!(out, "{:#18x} {:#18x}  {state}", e.offset, e.length)?;
        }
        first = false;
        Ok(())
    };
    let mut pos = 0;
    while pos < size {
        let len = (size - pos).min(MAP_WINDOW);
        for e in disk.map(pos, len)? {
            match &mut pending {
                Some(p) if p.state == e.state && p.end() == e.offset => p.length += e.length,
                _ => {
                    if let Some(p) = pending.take() {
                        emit(&p, &mut out)?;
                    }
                    pending = Some(e);
                }
            }
        }
        pos += len;
    }
    if let Some(p) = pending {
        emit(&p, &mut out)?;
    }
    if a.json {
        writeln!(out, "\n]")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn state_name(s: ExtentState) -> &'static str {
    match s {
        ExtentState::Data => "data",
        ExtentState::Zero => "zero",
        ExtentState::Unallocated => "unallocated",
    }
}

/// The image format the CLI's `--format` names.
pub(super) fn image_format(f: DiskFormat) -> Format {
    match f {
        DiskFormat::Vhdx => Format::Vhdx,
        DiskFormat::Vhd => Format::Vhd,
        DiskFormat::Qcow2 => Format::Qcow2,
        DiskFormat::Raw => Format::Raw,
    }
}

fn convert(a: &ConvertArgs) -> anyhow::Result<ExitCode> {
    let format = image_format(a.format);
    let subformat: Subformat = match &a.subformat {
        Some(s) => s.parse()?,
        None if format == Format::Raw => Subformat::Fixed,
        None => Subformat::Dynamic,
    };
    if a.subformat.is_some() && matches!(format, Format::Raw | Format::Qcow2) {
        bail!("--subformat applies to vhd and vhdx only");
    }
    if same_file(&a.src, &a.dst) {
        bail!(
            "{} and {} are the same file",
            a.src.display(),
            a.dst.display()
        );
    }
    if a.dst.exists() && !a.overwrite {
        bail!("{} exists; pass --overwrite to replace it", a.dst.display());
    }
    let disk = vdisk::open(&a.src)?;
    let src_info = disk.info();
    let mut opts = CreateOptions::new(format, subformat, disk.virtual_size());
    opts.block_size = a.block_size;
    opts.durable = !a.no_fsync;
    opts.logical_sector_size = match (&a.logical_sector_size, format) {
        (Some(s), Format::Vhdx) => s.parse().context("--logical-sector-size")?,
        (Some(_), _) => bail!("--logical-sector-size applies to vhdx only"),
        (None, Format::Vhdx) => src_info.logical_sector_size,
        (None, _) => 512,
    };
    opts.physical_sector_size = src_info.physical_sector_size.max(opts.logical_sector_size);

    let bar = Progress::new("converting", disk.virtual_size(), !a.quiet);
    let t = Instant::now();
    let stats =
        vdisk::copy::write_image(disk.as_ref(), &a.dst, &opts, &mut |done, _| bar.set(done));
    bar.finish();
    let stats = stats?;
    if !a.quiet {
        eprintln!(
            "wrote {} ({} {}, {} virtual, {} of data) in {:.2} s",
            a.dst.display(),
            format,
            subformat.name(),
            human(disk.virtual_size()),
            human(stats.bytes_written),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn check(a: &CheckArgs) -> anyhow::Result<ExitCode> {
    let repaired = if a.repair {
        vdisk::repair(&a.file)?
    } else {
        None
    };
    let report = vdisk::check::check(&a.file);
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = json!({
            "path": report.path,
            "format": report.format,
            "damaged": report.is_damaged(),
            "repaired": repaired,
            "problems": report.problems,
            "checked": report.checked,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        if let Some(r) = &repaired {
            writeln!(out, "repaired: {r}")?;
        }
        for c in &report.checked {
            writeln!(out, "checked: {c}")?;
        }
        for p in &report.problems {
            writeln!(out, "{p}")?;
        }
        let errors = report
            .problems
            .iter()
            .filter(|p| p.severity == vdisk::Severity::Error)
            .count();
        let warnings = report.problems.len() - errors;
        if errors > 0 {
            writeln!(
                out,
                "{}: DAMAGED: {errors} error(s), {warnings} warning(s)",
                a.file.display()
            )?;
        } else {
            writeln!(
                out,
                "{}: no damage found ({warnings} warning(s))",
                a.file.display()
            )?;
        }
    }
    Ok(if report.is_damaged() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
