//! `holdfast image check` for VHD: footers, dynamic header, BAT, block placement and
//! parent linkage. Collects every problem; never stops at the first.

use super::{
    DYN_HEADER_SIZE, DynHeader, FOOTER_SIZE, Footer, Geometry, MAX_SIZE, TYPE_DIFFERENCING,
    TYPE_DYNAMIC, TYPE_FIXED, UNALLOCATED, block_span, geometry, open_parent, read_bat,
    read_footer, read_locator, size_rule, tag, uuid,
};
use crate::OpenCtx;
use crate::backing::Backing;
use crate::report::CheckReport;
use std::sync::Arc;

/// Most problems reported per kind (a wholly damaged BAT would otherwise flood).
const MAX_PER_KIND: usize = 20;

/// Checks the fields of a valid footer.
fn check_footer_fields(f: &Footer, at: u64, name: &str, r: &mut CheckReport) {
    if f.version != 0x0001_0000 {
        r.error(
            name,
            Some(at + 12),
            format!("version {:#010x}, expected 0x00010000", f.version),
        );
    }
    if f.features & 2 == 0 {
        r.warning(
            name,
            Some(at + 8),
            format!("features {:#x} lack the reserved bit 2", f.features),
        );
    }
    if !matches!(f.disk_type, TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING) {
        r.error(
            name,
            Some(at + 60),
            format!("unknown disk type {}", f.disk_type),
        );
    }
    let (size, rule) = size_rule(f);
    if size > MAX_SIZE {
        r.error(
            name,
            Some(at + 48),
            format!("virtual size {size} ({rule}) exceeds 2040 GiB"),
        );
    }
    if !f.current_size.is_multiple_of(512) {
        r.warning(
            name,
            Some(at + 48),
            format!("current size {} is not a multiple of 512", f.current_size),
        );
    }
    if f.saved_state != 0 {
        r.warning(
            name,
            Some(at + 84),
            "saved state flag is set (a VM was suspended on it)",
        );
    }
}

/// Checks the VHD in `file`, adding problems and what was examined to `r`.
pub(crate) fn check(file: Arc<dyn Backing>, ctx: &OpenCtx, r: &mut CheckReport) {
    let len = file.len();
    if len < FOOTER_SIZE {
        r.error(
            "VHD footer",
            Some(0),
            format!("file of {len} bytes is shorter than a footer"),
        );
        return;
    }
    let end_off = len - FOOTER_SIZE;
    let end = match read_footer(file.as_ref(), end_off) {
        Ok(f) => f,
        Err(e) => {
            r.from_error("VHD footer", &e);
            return;
        }
    };
    let head = read_footer(file.as_ref(), 0).unwrap_or_else(|e| Err(e.to_string()));
    r.checked(format!("footer at {end_off:#x}"));
    let footer = match (&end, &head) {
        (Ok(f), _) => {
            check_footer_fields(f, end_off, "VHD footer", r);
            if f.disk_type != TYPE_FIXED {
                r.checked("footer copy at 0");
                match &head {
                    Ok(h) if h.raw != f.raw => r.warning(
                        "VHD footer copy",
                        Some(0),
                        "valid but differs from the footer at the end (the end one is used)",
                    ),
                    Ok(_) => {}
                    Err(e) => r.warning(
                        "VHD footer copy",
                        Some(0),
                        format!("damaged ({e}); the footer at the end is used"),
                    ),
                }
            }
            f.clone()
        }
        (Err(e), Ok(h)) if h.disk_type != TYPE_FIXED => {
            r.warning(
                "VHD footer",
                Some(end_off),
                format!("damaged ({e}); the copy at offset 0 is used"),
            );
            r.checked("footer copy at 0");
            check_footer_fields(h, 0, "VHD footer copy", r);
            h.clone()
        }
        (Err(e), Ok(_)) => {
            r.error(
                "VHD footer",
                Some(end_off),
                format!("damaged ({e}) and the copy at 0 says fixed"),
            );
            return;
        }
        (Err(e), Err(h)) => {
            r.error("VHD footer", Some(end_off), e.clone());
            r.error("VHD footer copy", Some(0), h.clone());
            return;
        }
    };
    let (size, rule) = size_rule(&footer);
    r.checked(format!(
        "virtual size {size} bytes by {rule} (creator {}, geometry {}/{}/{})",
        tag(&footer.creator_app),
        footer.cylinders,
        footer.heads,
        footer.sectors
    ));
    match footer.disk_type {
        TYPE_FIXED => {
            if size > end_off {
                r.error(
                    "VHD data",
                    Some(0),
                    format!(
                        "fixed disk of {size} bytes but only {end_off} bytes precede the footer"
                    ),
                );
            } else if size < end_off {
                r.warning(
                    "VHD data",
                    Some(size),
                    format!("{} bytes between the data and the footer", end_off - size),
                );
            }
            if footer.data_offset != u64::MAX {
                r.warning(
                    "VHD footer",
                    Some(end_off + 16),
                    format!("fixed disk with DataOffset {:#x}", footer.data_offset),
                );
            }
            r.checked("fixed disk data length");
        }
        TYPE_DYNAMIC | TYPE_DIFFERENCING => check_sparse(&file, ctx, &footer, size, r),
        _ => {}
    }
}

fn check_sparse(
    file: &Arc<dyn Backing>,
    ctx: &OpenCtx,
    footer: &Footer,
    size: u64,
    r: &mut CheckReport,
) {
    let len = file.len();
    let Some((h, geo, bat)) = read_dynamic(file.as_ref(), footer, size, r) else {
        return;
    };
    let meta = metadata_areas(&h, footer, len);
    check_blocks(&h, &geo, &bat, &meta, size, len, r);
    if footer.disk_type == TYPE_DIFFERENCING {
        check_parent(file.as_ref(), ctx, &h, size, r);
    }
}

/// Reads the dynamic header (checking its version and DataOffset), the geometry and
/// the BAT; `None` when one cannot be read (reported).
fn read_dynamic(
    file: &dyn Backing,
    footer: &Footer,
    size: u64,
    r: &mut CheckReport,
) -> Option<(DynHeader, Geometry, Vec<u32>)> {
    let h = match DynHeader::read(file, footer.data_offset) {
        Ok(h) => h,
        Err(e) => {
            r.from_error("VHD dynamic header", &e);
            return None;
        }
    };
    r.checked(format!("dynamic header at {:#x}", h.offset));
    if h.version != 0x0001_0000 {
        r.error(
            "VHD dynamic header",
            Some(h.offset + 24),
            format!("version {:#010x}, expected 0x00010000", h.version),
        );
    }
    if h.data_offset != u64::MAX {
        r.warning(
            "VHD dynamic header",
            Some(h.offset + 8),
            format!("DataOffset {:#x}, expected all ones", h.data_offset),
        );
    }
    let geo = match geometry(file, &h, size) {
        Ok(g) => g,
        Err(e) => {
            r.from_error("VHD dynamic header", &e);
            return None;
        }
    };
    let bat = match read_bat(file, &h, &geo) {
        Ok(b) => b,
        Err(e) => {
            r.from_error("BAT", &e);
            return None;
        }
    };
    Some((h, geo, bat))
}

/// Metadata areas no block may overlap: (start, end, name).
fn metadata_areas(h: &DynHeader, footer: &Footer, len: u64) -> Vec<(u64, u64, String)> {
    let table_len = (u64::from(h.max_entries) * 4).div_ceil(512) * 512;
    let mut meta: Vec<(u64, u64, String)> = vec![
        (0, FOOTER_SIZE, "footer copy".into()),
        (
            h.offset,
            h.offset + DYN_HEADER_SIZE,
            "dynamic header".into(),
        ),
        (
            h.table_offset,
            h.table_offset.saturating_add(table_len),
            "BAT".into(),
        ),
        (len - FOOTER_SIZE, len, "footer".into()),
    ];
    if footer.disk_type == TYPE_DIFFERENCING {
        for (i, l) in h.locators.iter().enumerate() {
            if l.code == [0; 4] {
                continue;
            }
            meta.push((
                l.offset,
                l.offset.saturating_add(u64::from(l.length)),
                format!("parent locator {i}"),
            ));
        }
    }
    meta
}

/// Checks that every allocated block lies in the data area and overlaps neither
/// metadata nor another block.
fn check_blocks(
    h: &DynHeader,
    geo: &Geometry,
    bat: &[u32],
    meta: &[(u64, u64, String)],
    size: u64,
    len: u64,
    r: &mut CheckReport,
) {
    let mut blocks: Vec<(u64, u64, usize)> = Vec::new();
    let mut beyond = 0usize;
    let mut over_meta = 0usize;
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let entry_at = h.table_offset + 4 * i as u64;
        let start = u64::from(e) * 512;
        let end = start.saturating_add(block_span(geo, i as u64, size));
        if end > len - FOOTER_SIZE {
            beyond += 1;
            if beyond <= MAX_PER_KIND {
                r.error(
                    format!("BAT entry {i}"),
                    Some(entry_at),
                    format!(
                        "block {start:#x}..{end:#x} extends beyond the data area (footer at {:#x})",
                        len - FOOTER_SIZE
                    ),
                );
            }
            continue;
        }
        for (ms, me, name) in meta {
            if start < *me && *ms < end && name != "footer" {
                over_meta += 1;
                if over_meta <= MAX_PER_KIND {
                    r.error(
                        format!("BAT entry {i}"),
                        Some(entry_at),
                        format!(
                            "block {start:#x}..{end:#x} overlaps the {name} at {ms:#x}..{me:#x}"
                        ),
                    );
                }
            }
        }
        blocks.push((start, end, i));
    }
    let allocated = blocks.len() + beyond;
    for (n, what) in [
        (beyond, "beyond the end of the file"),
        (over_meta, "overlapping metadata"),
    ] {
        if n > MAX_PER_KIND {
            r.error(
                "BAT",
                Some(h.table_offset),
                format!("{} more blocks {what}", n - MAX_PER_KIND),
            );
        }
    }
    blocks.sort_unstable();
    let mut overlaps = 0usize;
    for w in blocks.windows(2) {
        if let [a, b] = w
            && b.0 < a.1
        {
            overlaps += 1;
            if overlaps <= MAX_PER_KIND {
                r.error(
                    format!("BAT entry {}", b.2),
                    Some(h.table_offset + 4 * b.2 as u64),
                    format!(
                        "block at {:#x} overlaps block {} at {:#x}..{:#x}",
                        b.0, a.2, a.0, a.1
                    ),
                );
            }
        }
    }
    if overlaps > MAX_PER_KIND {
        r.error(
            "BAT",
            Some(h.table_offset),
            format!("{} more overlapping blocks", overlaps - MAX_PER_KIND),
        );
    }
    r.checked(format!(
        "BAT at {:#x}: {} entries, {allocated} allocated blocks of {} bytes",
        h.table_offset, geo.entries, geo.block_size
    ));
}

/// A differencing image's parent locators and parent.
fn check_parent(file: &dyn Backing, ctx: &OpenCtx, h: &DynHeader, size: u64, r: &mut CheckReport) {
    for (i, l) in h.locators.iter().enumerate() {
        if l.code == [0; 4] {
            continue;
        }
        let at = h.offset + 576 + 24 * i as u64;
        match &l.code {
            b"W2ru" | b"W2ku" => match read_locator(file, l) {
                Ok(p) => r.checked(format!(
                    "parent locator {i} {} ({} bytes in {} reserved): {p}",
                    tag(&l.code),
                    l.length,
                    l.space
                )),
                Err(e) => r.error(format!("parent locator {i}"), Some(at), e),
            },
            other => r.checked(format!("parent locator {i} {} (not used here)", tag(other))),
        }
    }
    match open_parent(file, h, ctx) {
        Ok((p, path)) => {
            if p.virtual_size() != size {
                r.error(
                    "parent",
                    None,
                    format!(
                        "parent {} has {} bytes, this image {size}",
                        path.display(),
                        p.virtual_size()
                    ),
                );
            }
            r.checked(format!(
                "parent {} (UniqueId {})",
                path.display(),
                uuid(&h.parent_uid)
            ));
        }
        Err(e) => r.from_error("parent", &e),
    }
}
