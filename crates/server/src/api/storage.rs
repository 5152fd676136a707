//! Storage targets: where online copies go. The secret of a target is written to the
//! server's secret store, never to the catalog, a log or an answer.

use crate::auth::{Admin, Operate, Read};
use crate::http::{ApiErr, ApiResult, St, bad, json, now, parse};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use protocol::*;

fn secret_err(e: pki::Error) -> ApiErr {
    ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub(crate) async fn storage_list(State(st): St, _: Read) -> ApiResult<Response> {
    Ok(json(&st.catalog(|c| c.storage_targets()).await?))
}

pub(crate) async fn storage_show(
    State(st): St,
    _: Read,
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

pub(crate) async fn storage_add(
    State(st): St,
    Admin(caller): Admin,
    body: Bytes,
) -> ApiResult<Response> {
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
                &caller.name,
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
    Admin(caller): Admin,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let t = st
        .offload(move |st| {
            let t = st.cat().remove_storage(&name)?;
            st.secrets.remove(&name).map_err(secret_err)?;
            // The online copy's key stays (`NAME.online-key.secret`): the copy is still
            // there, and a target added again under this name reads it.
            crate::online::forget(st, &name);
            st.cat().audit(
                now(),
                &caller.name,
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

/// Writes, reads back, lists and deletes a probe object: 502 when the target does not
/// answer as it should, with what went wrong.
pub(crate) async fn storage_test(
    State(st): St,
    _: Operate,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let report = st
        .offload(move |st| {
            let t = st.cat().storage(&name)?;
            let gateway = |e: objstore::Error| ApiErr(StatusCode::BAD_GATEWAY, e.to_string());
            let backend = objstore::open(&crate::online::target(st, &t)?).map_err(gateway)?;
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

/// `GET /storage/{name}/key`: the key file of the target's online copy (audited).
pub(crate) async fn storage_key(
    State(st): St,
    Admin(caller): Admin,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let key = st
        .offload(move |st| {
            st.cat().storage(&name)?;
            let path = crate::online::key_path(st, &name)?;
            let key = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => crate::http::not_found(format!(
                    "storage target {name} has no online copy yet (it is made when a protection group first uses the target)"
                )),
                _ => ApiErr(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{}: {e}", path.display()),
                ),
            })?;
            st.cat().audit(now(), &caller.name, "storage key", &name)?;
            Ok(StorageKey { name, key })
        })
        .await?;
    Ok(json(&key))
}

/// `POST /storage/{name}/attach`: keeps the key of the online copy on the target,
/// opens it and records its recovery points (a new server after a disaster). A
/// different key than the one kept is refused.
pub(crate) async fn storage_attach(
    State(st): St,
    Admin(caller): Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: AttachStorage = parse(&body)?;
    if req.key.is_empty() || req.key.len() > 16 << 10 {
        return Err(bad("key: the text of a key file (at most 16 KiB)"));
    }
    let report = st
        .offload(move |st| {
            let t = st.cat().storage(&name)?;
            let path = crate::online::key_path(st, &name)?;
            match std::fs::read_to_string(&path) {
                Ok(have) if have == req.key => {}
                Ok(_) => {
                    return Err(ApiErr(
                        StatusCode::CONFLICT,
                        format!(
                            "storage target {name} already has another online key on this server"
                        ),
                    ));
                }
                Err(_) => {
                    st.secrets
                        .put(&crate::online::key_name(&name), &req.key)
                        .map_err(secret_err)?;
                }
            }
            crate::online::forget(st, &name);
            let opened = crate::online::store(st, &name, false);
            let ds = match opened {
                Ok(ds) => ds,
                Err(e) => {
                    // A key that opens nothing is not kept.
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            };
            let points = crate::online::list_points(&ds)?;
            st.cat().replace_online_points(&name, &points, now())?;
            let mut sources: Vec<String> = points.iter().map(|p| p.vm.clone()).collect();
            sources.sort();
            sources.dedup();
            st.cat().audit(
                now(),
                &caller.name,
                "storage attach",
                &format!("{name}: {} recovery points", points.len()),
            )?;
            Ok(AttachReport {
                name,
                url: t.url,
                recovery_points: points.len() as u64,
                sources,
            })
        })
        .await?;
    Ok(json(&report))
}

/// `POST /storage/{name}/verify`: queues an online verify job (all, or a sample).
pub(crate) async fn storage_verify(
    State(st): St,
    Operate(caller): Operate,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: VerifyStorage = if body.is_empty() {
        VerifyStorage::default()
    } else {
        parse(&body)?
    };
    if let Some(p) = req.sample_percent
        && !(1..=100).contains(&p)
    {
        return Err(bad(format!("sample_percent: {p} is outside 1-100")));
    }
    let job = st
        .offload(move |st| {
            st.cat().storage(&name)?;
            if !crate::online::key_path(st, &name)?.exists() {
                return Err(ApiErr(
                    StatusCode::CONFLICT,
                    format!(
                        "storage target {name} holds no online copy this server has the key of"
                    ),
                ));
            }
            let cat = st.cat();
            let id = crate::state::add_job(
                &cat,
                now(),
                JobKind::OnlineVerify,
                None,
                &format!("{}: verify online:{name}", caller.name),
            )?;
            let row = serde_json::to_string(&(&name, req.sample_percent))
                .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            cat.set_setting(&crate::online::verify_key(id), &row)?;
            Ok(cat.job(id)?)
        })
        .await?;
    let mut r = json(&job);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}
