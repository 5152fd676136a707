//! Block access to a recovery point's disk over the API (admin): what `holdfast
//! export-nbd` without `-d` serves as a local NBD export on any machine, so instant
//! recovery needs neither the datastore folder nor an unauthenticated NBD port on the
//! backup server. Reads are decoded and checked here, like every datastore read.

use crate::auth::{Read, Restore};
use crate::http::{ApiErr, ApiResult, St, bad, blocking, json};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use protocol::DiskExtent;
use serde::Deserialize;

/// Largest read one request may ask for.
pub const MAX_READ: u64 = 4 << 20;
/// Largest range one allocation-map request may ask about.
pub const MAX_MAP: u64 = 1 << 40;

#[derive(Deserialize)]
pub struct RangeQuery {
    offset: u64,
    length: u64,
    /// `disk` (default) or `online:NAME`: where to read the point.
    from: Option<String>,
}

fn check(q: &RangeQuery, max: u64, size: u64) -> ApiResult<()> {
    if q.length == 0 || q.length > max {
        return Err(bad(format!("length: 1 to {max} bytes, not {}", q.length)));
    }
    match q.offset.checked_add(q.length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(bad(format!(
            "offset {} + length {} passes the disk's end ({size} bytes)",
            q.offset, q.length
        ))),
    }
}

fn internal(e: vdisk::Error) -> ApiErr {
    ApiErr(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Runs `f` on blocking threads with disk `n` of point `id`, once the range is checked
/// against `max` and the disk's size.
async fn with_disk<T: Send + 'static>(
    st: std::sync::Arc<crate::state::AppState>,
    (id, n): (String, u32),
    q: RangeQuery,
    max: u64,
    f: impl FnOnce(&dyn vdisk::VirtualDisk, RangeQuery) -> vdisk::Result<T> + Send + 'static,
) -> ApiResult<T> {
    blocking(move || {
        let (_, d) = crate::ilr::open(&st, q.from.as_deref(), &id, n)?;
        check(&q, max, d.virtual_size())?;
        f(d.as_ref(), q).map_err(internal)
    })
    .await
}

/// `GET /recovery-points/{id}/disks/{n}/data?offset=O&length=L`: the bytes.
pub async fn data(
    State(st): St,
    _caller: Restore,
    Path(at): Path<(String, u32)>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<Response> {
    let out = with_disk(st, at, q, MAX_READ, |d, q| {
        let mut buf = vec![0u8; q.length as usize];
        d.read_at(&mut buf, q.offset).map(|_| buf)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

/// `GET /recovery-points/{id}/disks/{n}/map?offset=O&length=L`: data and zero extents.
pub async fn map(
    State(st): St,
    _caller: Read,
    Path(at): Path<(String, u32)>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<Response> {
    let out = with_disk(st, at, q, MAX_MAP, |d, q| d.map(q.offset, q.length)).await?;
    let out: Vec<DiskExtent> = out
        .into_iter()
        .map(|e| DiskExtent {
            offset: e.offset,
            length: e.length,
            zero: e.state != vdisk::ExtentState::Data,
        })
        .collect();
    Ok(json(&out))
}
