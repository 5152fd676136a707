//! VHDX and AVHDX (MS-VHDX 1.0): reader with in-memory log replay, differencing
//! chains, structural check, and in-place log replay. The writer lives in `write`.

pub(crate) mod layout;
pub(crate) mod log;
mod read;
mod write;

use crate::backing::{Backing, le};
use crate::report::CheckReport;
use crate::sink::{CreateOptions, Sink};
use crate::{Error, OpenCtx, Result, VirtualDisk};
use layout::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Opens a VHDX or AVHDX image (and its parent chain).
pub(crate) fn open(file: Arc<dyn Backing>, ctx: &OpenCtx) -> Result<Box<dyn VirtualDisk>> {
    let mut diag = Diag::default();
    let parsed = parse(file, &mut diag);
    if let Some(e) = diag.hard.into_iter().next() {
        return Err(e);
    }
    let Some(p) = parsed else {
        return Err(Error::Invalid(
            "vhdx: parsing stopped without an error".into(),
        ));
    };
    let parent = match &p.meta.parent_locator {
        Some(loc) if p.meta.has_parent => Some(open_parent(p.file.path(), loc, ctx)?),
        _ => None,
    };
    Ok(Box::new(read::VhdxDisk::new(p, parent)?))
}

/// Checks a VHDX image, collecting every problem found.
pub(crate) fn check(file: Arc<dyn Backing>, ctx: &OpenCtx, report: &mut CheckReport) {
    let mut diag = Diag::default();
    let parsed = parse(file, &mut diag);
    for e in &diag.hard {
        report.from_error(structure_of(e), e);
    }
    for e in &diag.soft {
        report.from_error(structure_of(e), e);
    }
    for (s, o, d) in &diag.warn {
        report.warning(s.clone(), *o, d.clone());
    }
    for c in diag.checked {
        report.checked(c);
    }
    let Some(p) = parsed else { return };
    read::check_bat(&p, report);
    if p.meta.has_parent
        && let Some(loc) = &p.meta.parent_locator
    {
        match open_parent(p.file.path(), loc, ctx) {
            Ok((disk, path)) => {
                report.checked(format!(
                    "parent {} found, linkage matches its DataWriteGuid",
                    path.display()
                ));
                if disk.virtual_size() != p.geo.virtual_size {
                    report.warning(
                        "parent locator",
                        None,
                        format!(
                            "parent virtual size {} differs from this image's {}",
                            disk.virtual_size(),
                            p.geo.virtual_size
                        ),
                    );
                }
            }
            Err(e) => report.from_error("parent locator", &e),
        }
    }
}

/// Routes creation to the writer.
pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn Sink>> {
    write::create(path, opts)
}

/// Replays a dirty log into the file (read-write); `None` when the log was clean.
pub(crate) fn replay_log_in_place(path: &Path) -> Result<Option<String>> {
    log::replay_in_place(path)
}

fn structure_of(e: &Error) -> &'static str {
    match e {
        Error::Corrupt { structure, .. } | Error::Truncated { structure, .. } => structure,
        Error::Parent { .. } => "parent locator",
        _ => "VHDX",
    }
}

/// Problems found while parsing. `hard` ones make `open` fail; `soft` ones are damage
/// that reading survives (one bad header or region table copy).
#[derive(Default)]
pub(crate) struct Diag {
    pub(crate) hard: Vec<Error>,
    pub(crate) soft: Vec<Error>,
    pub(crate) warn: Vec<(String, Option<u64>, String)>,
    pub(crate) checked: Vec<String>,
}

/// The header selected as current.
pub(crate) struct HeaderSel {
    pub(crate) header: Header,
    pub(crate) slot: usize,
    /// Why the other copy is unusable, if it is.
    pub(crate) bad: Vec<Error>,
}

/// Reads both headers and picks the valid one with the higher sequence number.
pub(crate) fn select_header(file: &dyn Backing) -> Result<HeaderSel> {
    let mut found: Vec<(usize, Header)> = Vec::new();
    let mut bad = Vec::new();
    for (slot, &off) in HEADER_OFFSETS.iter().enumerate() {
        let mut b = vec![0u8; HEADER_SIZE];
        match file
            .read_exact_at(&mut b, off, "VHDX header")
            .and_then(|()| Header::parse(&b, file.path(), off))
        {
            Ok(h) => found.push((slot, h)),
            Err(e) => bad.push(e),
        }
    }
    let best = found.iter().max_by(|a, b| {
        // equal sequence numbers: keep the first copy
        a.1.sequence.cmp(&b.1.sequence).then(b.0.cmp(&a.0))
    });
    match best {
        Some(&(slot, header)) => Ok(HeaderSel { header, slot, bad }),
        None => {
            let why: Vec<String> = bad.iter().map(|e| e.to_string()).collect();
            Err(Error::corrupt(
                file.path(),
                "VHDX headers",
                HEADER_OFFSETS[0],
                format!("both headers are invalid: {}", why.join("; ")),
            ))
        }
    }
}

/// Values from the metadata region.
#[derive(Debug, Clone)]
pub(crate) struct Metadata {
    pub(crate) block_size: u32,
    pub(crate) leave_allocated: bool,
    pub(crate) has_parent: bool,
    pub(crate) virtual_size: u64,
    pub(crate) logical_sector: u32,
    pub(crate) physical_sector: u32,
    pub(crate) page83: Option<Guid>,
    pub(crate) parent_locator: Option<Vec<(String, String)>>,
}

/// Everything `parse` learnt about a file.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// The file, seen through its replayed log when the log was dirty.
    pub(crate) file: Arc<dyn Backing>,
    pub(crate) creator: String,
    pub(crate) header: Header,
    pub(crate) log_state: String,
    pub(crate) bat_region: RegionEntry,
    pub(crate) meta_region: RegionEntry,
    pub(crate) meta: Metadata,
    pub(crate) geo: Geometry,
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Largest metadata item (MS-VHDX 2.6.1.2).
const MAX_ITEM_LEN: u32 = 1 << 20;

/// Parses and validates everything but the BAT entries. Returns `None` when a problem
/// stops parsing (it is then in `diag.hard`).
pub(crate) fn parse(file: Arc<dyn Backing>, diag: &mut Diag) -> Option<Parsed> {
    let path = file.path().to_path_buf();
    let mut ident = vec![0u8; CREATOR_OFFSET + CREATOR_LEN];
    let creator = match file
        .read_exact_at(&mut ident, 0, "VHDX file identifier")
        .and_then(|()| parse_file_identifier(&ident, &path))
    {
        Ok(c) => c,
        Err(e) => {
            diag.hard.push(e);
            return None;
        }
    };
    let sel = match select_header(file.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            diag.hard.push(e);
            return None;
        }
    };
    diag.soft.extend(sel.bad);
    let h = sel.header;
    diag.checked.push(format!(
        "headers: using header {} (sequence {})",
        sel.slot + 1,
        h.sequence
    ));

    // The log first: region tables are not logged but BAT and metadata are.
    let (file, log_state) = open_log(file, &h, diag)?;
    let file_len = file.len();
    let regions = read_region_tables(file.as_ref(), &path, diag)?;
    let (bat_region, meta_region) = find_regions(&regions, &path, diag)?;
    check_layout(&h, &regions, file_len, &path, diag);
    diag.checked.push(format!(
        "region table: BAT at {:#x} ({} bytes), metadata at {:#x} ({} bytes), {} regions",
        bat_region.file_offset,
        bat_region.length,
        meta_region.file_offset,
        meta_region.length,
        regions.len()
    ));

    let meta = parse_metadata(file.as_ref(), &meta_region, diag)?;
    let geo = Geometry::new(
        meta.block_size,
        meta.logical_sector,
        meta.virtual_size,
        meta.has_parent,
    );
    let need = geo.bat_entries.saturating_mul(8);
    if need > u64::from(bat_region.length) {
        diag.hard.push(Error::corrupt(
            &path,
            "VHDX BAT region",
            bat_region.file_offset,
            format!(
                "{} bytes long but {} entries ({need} bytes) are needed",
                bat_region.length, geo.bat_entries
            ),
        ));
        return None;
    }
    diag.checked.push(format!(
        "metadata: virtual size {}, block size {}, logical sector {}, physical sector {}, chunk ratio {}{}",
        meta.virtual_size,
        meta.block_size,
        meta.logical_sector,
        meta.physical_sector,
        geo.chunk_ratio,
        if meta.has_parent { ", has parent" } else { "" }
    ));
    Some(Parsed {
        file,
        creator,
        header: h,
        log_state,
        bat_region,
        meta_region,
        meta,
        geo,
    })
}

/// Opens the file through its log: as it is when the log is clean or holds nothing,
/// else through an overlay with the log replayed in memory. Returns the file and the
/// log's state for the report.
fn open_log(
    file: Arc<dyn Backing>,
    h: &Header,
    diag: &mut Diag,
) -> Option<(Arc<dyn Backing>, String)> {
    Some(if h.log_guid.is_zero() {
        (file, "clean".to_string())
    } else {
        match log::find_active(file.as_ref(), h) {
            Ok(active) if active.entries == 0 => {
                diag.warn.push((
                    "VHDX log".into(),
                    Some(h.log_offset),
                    "the header names a log but it holds no valid entry: nothing to replay".into(),
                ));
                (file, "log GUID set, no valid entries".to_string())
            }
            Ok(active) => {
                let n = active.entries;
                diag.warn.push((
                    "VHDX log".into(),
                    Some(h.log_offset),
                    format!("dirty log: {n} entries must be replayed (replayed in memory for reading; `repair` writes them)"),
                ));
                let o: Arc<dyn Backing> = Arc::new(log::Overlay::new(file, active));
                (o, format!("dirty: {n} entries replayed in memory"))
            }
            Err(e) => {
                diag.hard.push(e);
                return None;
            }
        }
    })
}

/// Reads both region tables and returns the first valid one.
fn read_region_tables(
    file: &dyn Backing,
    path: &Path,
    diag: &mut Diag,
) -> Option<Vec<RegionEntry>> {
    let mut tables = Vec::new();
    for &off in &REGION_TABLE_OFFSETS {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        match file
            .read_exact_at(&mut b, off, "VHDX region table")
            .and_then(|()| parse_region_table(&b, path, off))
        {
            Ok(t) => tables.push(t),
            Err(e) => diag.soft.push(e),
        }
    }
    if tables.is_empty() {
        let why: Vec<String> = diag
            .soft
            .iter()
            .rev()
            .take(2)
            .rev()
            .map(|e| e.to_string())
            .collect();
        diag.hard.push(Error::corrupt(
            path,
            "VHDX region tables",
            REGION_TABLE_OFFSETS[0],
            format!("both region tables are invalid: {}", why.join("; ")),
        ));
        return None;
    }
    if let [a, b] = tables.as_slice()
        && a != b
    {
        diag.warn.push((
            "VHDX region table 2".into(),
            Some(REGION_TABLE_OFFSETS[1]),
            "differs from region table 1".into(),
        ));
    }
    Some(tables.swap_remove(0))
}

/// The BAT and metadata regions of `regions`, refusing unknown required ones.
fn find_regions(
    regions: &[RegionEntry],
    path: &Path,
    diag: &mut Diag,
) -> Option<(RegionEntry, RegionEntry)> {
    let mut bat_region = None;
    let mut meta_region = None;
    for r in regions {
        if r.guid == REGION_BAT {
            bat_region = Some(*r);
        } else if r.guid == REGION_METADATA {
            meta_region = Some(*r);
        } else if r.required {
            diag.hard.push(Error::unsupported(
                path,
                format!("unknown required region {} in the region table", r.guid),
            ));
            return None;
        } else {
            diag.checked
                .push(format!("ignored optional region {}", r.guid));
        }
    }
    let (Some(bat_region), Some(meta_region)) = (bat_region, meta_region) else {
        diag.hard.push(Error::corrupt(
            path,
            "VHDX region table",
            REGION_TABLE_OFFSETS[0],
            "the BAT or metadata region is missing",
        ));
        return None;
    };
    Some((bat_region, meta_region))
}

/// Checks that the header section, the log and the regions lie in the file and do not
/// overlap each other.
fn check_layout(h: &Header, regions: &[RegionEntry], file_len: u64, path: &Path, diag: &mut Diag) {
    let mut areas: Vec<(&str, u64, u64)> = vec![("header section", 0, HEADER_SECTION)];
    if h.log_length > 0 {
        areas.push((
            "log",
            h.log_offset,
            h.log_offset.saturating_add(u64::from(h.log_length)),
        ));
    }
    for r in regions {
        let name = if r.guid == REGION_BAT {
            "BAT region"
        } else if r.guid == REGION_METADATA {
            "metadata region"
        } else {
            "region"
        };
        areas.push((
            name,
            r.file_offset,
            r.file_offset.saturating_add(u64::from(r.length)),
        ));
    }
    for (i, a) in areas.iter().enumerate() {
        if a.2 > file_len {
            diag.hard.push(Error::corrupt(
                path,
                "VHDX region table",
                a.1,
                format!(
                    "{} {:#x}..{:#x} extends beyond the end of the file ({file_len:#x})",
                    a.0, a.1, a.2
                ),
            ));
        }
        for b in areas.iter().skip(i + 1) {
            if ranges_overlap((a.1, a.2), (b.1, b.2)) {
                diag.hard.push(Error::corrupt(
                    path,
                    "VHDX region table",
                    b.1,
                    format!(
                        "{} {:#x}..{:#x} overlaps {} {:#x}..{:#x}",
                        b.0, b.1, b.2, a.0, a.1, a.2
                    ),
                ));
            }
        }
    }
}

fn parse_metadata(file: &dyn Backing, region: &RegionEntry, diag: &mut Diag) -> Option<Metadata> {
    let path = file.path().to_path_buf();
    let base = region.file_offset;
    let region_len = u64::from(region.length);
    if region_len < METADATA_TABLE_SIZE as u64 {
        diag.hard.push(Error::corrupt(
            &path,
            "VHDX metadata region",
            base,
            "shorter than its 64 KiB table",
        ));
        return None;
    }
    let table = match file.read_vec(base, METADATA_TABLE_SIZE, "VHDX metadata table") {
        Ok(t) => t,
        Err(e) => {
            diag.hard.push(e);
            return None;
        }
    };
    let entries = match parse_metadata_table(&table, &path, base, region_len) {
        Ok(e) => e,
        Err(e) => {
            diag.hard.push(e);
            return None;
        }
    };
    let before = diag.hard.len();
    let items = read_items(file, &entries, base, &path, diag)?;
    check_items(items, base, &path, diag, before)
}

/// The known items of a metadata table, as read (validated by [`check_items`]).
#[derive(Default)]
struct Items {
    /// Block size and flags.
    fp: Option<(u32, u32)>,
    vsize: Option<u64>,
    logical: Option<u32>,
    physical: Option<u32>,
    page83: Option<Guid>,
    locator: Option<Vec<(String, String)>>,
    /// File offsets of file parameters, virtual size, logical and physical sector size.
    item_off: [u64; 4],
}

/// Reads the known items the table lists; `None` for an unknown required item.
fn read_items(
    file: &dyn Backing,
    entries: &[MetadataEntry],
    base: u64,
    path: &Path,
    diag: &mut Diag,
) -> Option<Items> {
    let mut it = Items::default();
    for e in entries {
        let off = base + u64::from(e.offset);
        let known = !e.is_user
            && [
                META_FILE_PARAMETERS,
                META_VIRTUAL_DISK_SIZE,
                META_PAGE83,
                META_LOGICAL_SECTOR,
                META_PHYSICAL_SECTOR,
                META_PARENT_LOCATOR,
            ]
            .contains(&e.item_id);
        if !known {
            if e.is_required {
                diag.hard.push(Error::unsupported(
                    path,
                    format!("unknown required metadata item {} at {off:#x}", e.item_id),
                ));
                return None;
            }
            continue;
        }
        let want = match e.item_id {
            g if g == META_FILE_PARAMETERS || g == META_VIRTUAL_DISK_SIZE => 8,
            g if g == META_PAGE83 => 16,
            g if g == META_PARENT_LOCATOR => 20,
            _ => 4,
        };
        if e.length < want || e.length > MAX_ITEM_LEN {
            diag.hard.push(Error::corrupt(
                path,
                "VHDX metadata item",
                off,
                format!(
                    "item {} has length {} (expected {want})",
                    e.item_id, e.length
                ),
            ));
            continue;
        }
        let len = if e.item_id == META_PARENT_LOCATOR {
            e.length
        } else {
            want
        };
        let b = match file.read_vec(off, len as usize, "VHDX metadata item") {
            Ok(b) => b,
            Err(err) => {
                diag.hard.push(err);
                continue;
            }
        };
        match e.item_id {
            g if g == META_FILE_PARAMETERS => {
                it.fp = Some((le::u32(&b, 0), le::u32(&b, 4)));
                it.item_off[0] = off;
            }
            g if g == META_VIRTUAL_DISK_SIZE => {
                it.vsize = Some(le::u64(&b, 0));
                it.item_off[1] = off;
            }
            g if g == META_PAGE83 => it.page83 = Some(Guid::read(&b, 0)),
            g if g == META_LOGICAL_SECTOR => {
                it.logical = Some(le::u32(&b, 0));
                it.item_off[2] = off;
            }
            g if g == META_PHYSICAL_SECTOR => {
                it.physical = Some(le::u32(&b, 0));
                it.item_off[3] = off;
            }
            _ => match parse_locator(&b, path, off) {
                Ok(l) => it.locator = Some(l),
                Err(err) => diag.hard.push(err),
            },
        }
    }
    Some(it)
}

/// Checks the items' values and that the required ones are there.
fn check_items(
    it: Items,
    base: u64,
    path: &Path,
    diag: &mut Diag,
    before: usize,
) -> Option<Metadata> {
    let Items {
        fp,
        vsize,
        logical,
        physical,
        page83,
        locator,
        item_off,
    } = it;
    let bad = |what: &str, off: u64, d: String| {
        Error::corrupt(path, "VHDX metadata item", off, format!("{what}: {d}"))
    };
    let missing = |what: &str| {
        Error::corrupt(
            path,
            "VHDX metadata table",
            base,
            format!("required item {what} is missing"),
        )
    };
    let (Some((block_size, flags)), Some(vsize), Some(logical), Some(physical)) =
        (fp, vsize, logical, physical)
    else {
        for (v, n) in [
            (fp.is_some(), "file parameters"),
            (vsize.is_some(), "virtual disk size"),
            (logical.is_some(), "logical sector size"),
            (physical.is_some(), "physical sector size"),
        ] {
            if !v {
                diag.hard.push(missing(n));
            }
        }
        return None;
    };
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        diag.hard.push(bad(
            "file parameters",
            item_off[0],
            format!("block size {block_size} is not a power of two between 1 MiB and 256 MiB"),
        ));
    }
    if logical != 512 && logical != 4096 {
        diag.hard.push(bad(
            "logical sector size",
            item_off[2],
            format!("{logical} (expected 512 or 4096)"),
        ));
    }
    if physical != 512 && physical != 4096 {
        diag.hard.push(bad(
            "physical sector size",
            item_off[3],
            format!("{physical} (expected 512 or 4096)"),
        ));
    }
    if vsize > MAX_VIRTUAL_SIZE || (logical != 0 && vsize % u64::from(logical) != 0) {
        diag.hard.push(bad(
            "virtual disk size",
            item_off[1],
            format!(
                "{vsize} is above 64 TiB or not a multiple of the logical sector size {logical}"
            ),
        ));
    }
    let has_parent = flags & FILE_FLAG_HAS_PARENT != 0;
    if has_parent && locator.is_none() {
        diag.hard.push(missing("parent locator (HasParent is set)"));
    }
    if !has_parent && locator.is_some() {
        diag.warn.push((
            "VHDX metadata".into(),
            Some(base),
            "parent locator present but HasParent is clear: ignored".into(),
        ));
    }
    if page83.is_none() {
        diag.warn.push((
            "VHDX metadata".into(),
            Some(base),
            "page 83 data (disk id) item is missing".into(),
        ));
    }
    if diag.hard.len() > before {
        return None;
    }
    Some(Metadata {
        block_size,
        leave_allocated: flags & FILE_FLAG_LEAVE_BLOCKS_ALLOCATED != 0,
        has_parent,
        virtual_size: vsize,
        logical_sector: logical,
        physical_sector: physical,
        page83,
        parent_locator: locator,
    })
}

/// Decodes a parent locator item read at file offset `off`.
fn parse_locator(b: &[u8], path: &Path, off: u64) -> Result<Vec<(String, String)>> {
    let bad = |d: String| Error::corrupt(path, "VHDX parent locator", off, d);
    let ty = Guid::read(b, 0);
    if ty != PARENT_LOCATOR_TYPE {
        return Err(bad(format!(
            "locator type {ty} is not the VHDX parent locator type"
        )));
    }
    let count = usize::from(le::u16(b, 18));
    let mut out = Vec::with_capacity(count.min(b.len() / 12));
    for i in 0..count {
        let at = 20 + 12 * i;
        if at + 12 > b.len() {
            return Err(bad(format!(
                "{count} entries do not fit in {} bytes",
                b.len()
            )));
        }
        let ko = le::u32(b, at) as usize;
        let vo = le::u32(b, at + 4) as usize;
        let kl = usize::from(le::u16(b, at + 8));
        let vl = usize::from(le::u16(b, at + 10));
        let (Some(k), Some(v)) = (
            ko.checked_add(kl).and_then(|e| b.get(ko..e)),
            vo.checked_add(vl).and_then(|e| b.get(vo..e)),
        ) else {
            return Err(bad(format!("entry {i} points outside the item")));
        };
        if kl == 0 || kl % 2 != 0 || vl % 2 != 0 {
            return Err(bad(format!(
                "entry {i}: key or value length is not a positive even number"
            )));
        }
        out.push((le::utf16(k), le::utf16(v)));
    }
    Ok(out)
}

/// Candidate parent paths from a locator, in the order they are tried.
fn parent_candidates(child: &Path, loc: &[(String, String)]) -> Vec<PathBuf> {
    let dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let get = |k: &str| {
        loc.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let mut out = Vec::new();
    if let Some(rel) = get("relative_path") {
        let rel = rel.replace('\\', "/");
        let rel = rel.strip_prefix("./").unwrap_or(&rel);
        out.push(dir.join(rel));
    }
    if let Some(abs) = get("absolute_win32_path") {
        out.push(PathBuf::from(abs));
        let windows = abs.contains('\\') || abs.as_bytes().get(1) == Some(&b':');
        if windows && let Some(name) = abs.rsplit(['\\', '/']).next().filter(|n| !n.is_empty()) {
            out.push(dir.join(name));
        }
    }
    out.dedup();
    out
}

/// Finds, opens and verifies the parent of `child`.
fn open_parent(
    child: &Path,
    loc: &[(String, String)],
    ctx: &OpenCtx,
) -> Result<(Box<dyn VirtualDisk>, PathBuf)> {
    let get = |k: &str| {
        loc.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let Some(link) = get("parent_linkage") else {
        return Err(Error::parent(
            child,
            "the parent locator has no parent_linkage",
        ));
    };
    let Some(link_guid) = Guid::parse(link) else {
        return Err(Error::parent(
            child,
            format!("parent_linkage {link:?} is not a GUID"),
        ));
    };
    let link2 = get("parent_linkage2").and_then(Guid::parse);
    let candidates = parent_candidates(child, loc);
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::parent(
            child,
            format!(
                "parent not found (tried: {})",
                if tried.is_empty() {
                    "no usable path in the locator".to_string()
                } else {
                    tried.join(", ")
                }
            ),
        ));
    };
    let disk = ctx.open_parent(child, found, Some(crate::Format::Vhdx))?;
    let info = disk.info();
    let dwg = info
        .details
        .iter()
        .find(|(k, _)| k == read::DATA_WRITE_GUID_KEY)
        .and_then(|(_, v)| Guid::parse(v));
    if dwg.is_none() || (dwg != Some(link_guid) && dwg != link2) {
        return Err(Error::parent(
            child,
            format!(
                "parent_linkage {link_guid} does not match the DataWriteGuid {} of parent {}",
                dwg.map_or("(unknown)".to_string(), |g| g.to_string()),
                found.display()
            ),
        ));
    }
    Ok((disk, found.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_candidates_handle_windows_paths() {
        let loc = vec![
            ("relative_path".to_string(), ".\\sub\\base.vhdx".to_string()),
            (
                "absolute_win32_path".to_string(),
                "C:\\VMs\\base.vhdx".to_string(),
            ),
        ];
        let c = parent_candidates(Path::new("/d/child.avhdx"), &loc);
        assert_eq!(
            c,
            vec![
                PathBuf::from("/d/sub/base.vhdx"),
                PathBuf::from("C:\\VMs\\base.vhdx"),
                PathBuf::from("/d/base.vhdx")
            ]
        );
    }
}
