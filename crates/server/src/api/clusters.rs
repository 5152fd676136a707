//! Clusters: hosts among which a VM may move without a conflict.

use crate::auth::{Admin, Read};
use crate::http::{ApiResult, St, json, now, parse};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use protocol::*;

pub(crate) async fn clusters_list(State(st): St, _: Read) -> ApiResult<Response> {
    Ok(json(&st.catalog(|c| c.clusters()).await?))
}

pub(crate) async fn cluster_show(
    State(st): St,
    _: Read,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    Ok(json(&st.catalog(move |c| c.cluster(&name)).await?))
}

pub(crate) async fn cluster_create(
    State(st): St,
    Admin(caller): Admin,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateCluster = parse(&body)?;
    let k = st
        .catalog(move |cat| {
            let k = cat.create_cluster(now(), &req.name, &req.hosts)?;
            cat.audit(
                now(),
                &caller.name,
                "cluster create",
                &format!("{} hosts {}", k.name, k.hosts.join(",")),
            )?;
            Ok::<_, catalog::Error>(k)
        })
        .await?;
    let mut r = json(&k);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

pub(crate) async fn cluster_add_hosts(
    State(st): St,
    Admin(caller): Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ClusterHosts = parse(&body)?;
    let k = st
        .catalog(move |cat| {
            let k = cat.add_cluster_hosts(&name, &req.hosts)?;
            cat.audit(
                now(),
                &caller.name,
                "cluster add-host",
                &format!("{name} {}", req.hosts.join(",")),
            )?;
            Ok::<_, catalog::Error>(k)
        })
        .await?;
    Ok(json(&k))
}

pub(crate) async fn cluster_remove_host(
    State(st): St,
    Admin(caller): Admin,
    Path((name, host)): Path<(String, String)>,
) -> ApiResult<Response> {
    let k = st
        .catalog(move |cat| {
            let k = cat.remove_cluster_host(&name, &host)?;
            cat.audit(
                now(),
                &caller.name,
                "cluster remove-host",
                &format!("{name} {host}"),
            )?;
            Ok::<_, catalog::Error>(k)
        })
        .await?;
    Ok(json(&k))
}

pub(crate) async fn cluster_delete(
    State(st): St,
    Admin(caller): Admin,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let k = st
        .catalog(move |cat| {
            let k = cat.cluster(&name)?;
            cat.delete_cluster(&name)?;
            cat.audit(now(), &caller.name, "cluster delete", &name)?;
            Ok::<_, catalog::Error>(k)
        })
        .await?;
    Ok(json(&k))
}
