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

pub(crate) async fn storage_add(State(st): St, _admin: Admin, body: Bytes) -> ApiResult<Response> {
    let req: AddStorage = parse(&body)?;
    req.validate().map_err(bad)?;
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
