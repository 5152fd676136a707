//! Storage targets: where online copies go. The secret of a target is written to the
//! server's secret store, never to the catalog, a log or an answer.

use crate::auth::Admin;
use crate::http::{ApiErr, ApiResult, St, bad, json, now, parse};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use protocol::*;

fn secret_err(e: pki::Error) -> ApiErr {
    ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub(crate) async fn storage_list(State(st): St, _admin: Admin) -> ApiResult<Response> {
    Ok(json(&st.catalog(|c| c.storage_targets()).await?))
}

pub(crate) async fn storage_show(
    State(st): St,
    _admin: Admin,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    Ok(json(&st.catalog(move |c| c.storage(&name)).await?))
}

/// A folder target must be apart from the server's own folders: a copy into the
/// datastore (or a folder holding it) would mix the two, and gc of one would delete
/// the other's data. Compared as written (absolute, no `..`, checked by `validate`).
fn check_apart(st: &crate::state::AppState, req: &AddStorage) -> ApiResult<()> {
    let Some(path) = req.location.path.as_deref().map(std::path::Path::new) else {
        return Ok(());
    };
    let data_dir = st.secrets.dir().parent().unwrap_or(st.secrets.dir());
    for (what, own) in [
        ("the datastore", st.datastore_dir.as_path()),
        ("the server's data folder", data_dir),
    ] {
        if path.starts_with(own) || own.starts_with(path) {
            return Err(bad(format!(
                "path: {} overlaps {what} ({}); a storage target needs a folder of its own",
                path.display(),
                own.display()
            )));
        }
    }
    Ok(())
}

pub(crate) async fn storage_add(State(st): St, _admin: Admin, body: Bytes) -> ApiResult<Response> {
    let req: AddStorage = parse(&body)?;
    req.validate().map_err(bad)?;
    check_apart(&st, &req)?;
    let t = st
        .offload(move |st| {
            // The row first: a name in use is refused before its secret is touched.
            let t = st.cat().add_storage(now(), &req)?;
            let stored = match &req.secret {
                Some(s) => st.secrets.put(&req.name, s),
                None => st.secrets.remove(&req.name),
            };
            if let Err(e) = stored {
                // Nothing half-made: a target without its secret is not kept.
                st.cat().remove_storage(&req.name)?;
                return Err(secret_err(e));
            }
            st.cat().audit(
                now(),
                "admin",
                "storage add",
                &format!("{} ({}, {})", t.name, t.kind, t.url),
            )?;
            Ok(t)
        })
        .await?;
    let mut r = json(&t);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

pub(crate) async fn storage_remove(
    State(st): St,
    _admin: Admin,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let t = st
        .offload(move |st| {
            let t = st.cat().remove_storage(&name)?;
            st.secrets.remove(&name).map_err(secret_err)?;
            st.cat().audit(
                now(),
                "admin",
                "storage remove",
                &format!("{} ({})", t.name, t.url),
            )?;
            Ok(t)
        })
        .await?;
    Ok(json(&t))
}

/// Bytes of the probe object `storage test` writes (half a pack: enough to show
/// throughput, small enough for a slow link).
const PROBE_BYTES: usize = 4 << 20;

/// The target `t` as the object-storage crate opens it, with its secret.
fn target(st: &crate::state::AppState, t: &StorageInfo) -> ApiResult<objstore::Target> {
    let l = &t.location;
    let missing = |what: &str| {
        ApiErr(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "storage target {}: {what} is missing from the catalog",
                t.name
            ),
        )
    };
    let secret = || -> ApiResult<objstore::Secret> {
        Ok(objstore::Secret::new(
            st.secrets.get(&t.name).map_err(secret_err)?,
        ))
    };
    Ok(match t.kind {
        StorageKind::Azure => objstore::Target::Azure {
            account: l.account.clone().ok_or_else(|| missing("account"))?,
            container: l.container.clone().ok_or_else(|| missing("container"))?,
            endpoint: l.endpoint.clone(),
            access_key: secret()?,
        },
        StorageKind::S3 => objstore::Target::S3 {
            bucket: l.bucket.clone().ok_or_else(|| missing("bucket"))?,
            endpoint: l.endpoint.clone(),
            region: l.region.clone().ok_or_else(|| missing("region"))?,
            access_key_id: l
                .access_key_id
                .clone()
                .ok_or_else(|| missing("access_key_id"))?,
            secret_access_key: secret()?,
        },
        StorageKind::Folder => objstore::Target::Folder {
            path: l.path.clone().ok_or_else(|| missing("path"))?.into(),
        },
    })
}

/// Writes, reads back, lists and deletes a probe object: 502 when the target does not
/// answer as it should, with what went wrong.
pub(crate) async fn storage_test(
    State(st): St,
    _admin: Admin,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let report = st
        .offload(move |st| {
            let t = st.cat().storage(&name)?;
            let gateway = |e: objstore::Error| ApiErr(StatusCode::BAD_GATEWAY, e.to_string());
            let backend = objstore::open(&target(st, &t)?).map_err(gateway)?;
            let p = objstore::probe(backend.as_ref(), PROBE_BYTES).map_err(gateway)?;
            Ok(StorageTestReport {
                name: t.name,
                url: t.url,
                bytes: p.bytes,
                put_ms: p.put_ms,
                get_ms: p.get_ms,
                list_ms: p.list_ms,
                delete_ms: p.delete_ms,
                write_bytes_per_sec: p.write_bytes_per_sec,
                read_bytes_per_sec: p.read_bytes_per_sec,
            })
        })
        .await?;
    Ok(json(&report))
}
