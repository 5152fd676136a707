//! Data sources: the list, backups on demand, exclusions and moves to another host.

use crate::auth::{Admin, Operate, Read};
use crate::http::{ApiErr, ApiResult, St, bad, check_recipients, json, now, parse};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use protocol::*;

pub(crate) async fn datasources(State(st): St, _: Read) -> ApiResult<Response> {
    Ok(json(&st.catalog(|c| c.datasources()).await?))
}

pub(crate) fn queue_for_vm(
    st: &AppState,
    host: &str,
    vm: &str,
    kind: JobKind,
    notify: &[String],
    who: &str,
) -> ApiResult<Response> {
    let ds = st.cat().datasource_by_name(host, vm)?;
    // An active backup job is answered as is; a recovery is not a backup to follow.
    if let Some(j) = st.cat().active_job_for(&ds.id)?
        && j.kind == JobKind::Recovery
    {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            format!(
                "{host}/{vm} has recovery job {} {}; start the backup when it has ended",
                j.id,
                j.state.as_str()
            ),
        ));
    }
    let (id, new) = st.queue(now(), kind, Some(&ds.id), who)?;
    // Told before the job can end: the agent picks it up no sooner than its next poll.
    st.notify_job(id, notify)?;
    st.cat()
        .audit(now(), who, kind.as_str(), &format!("{host}/{vm} job {id}"))?;
    let job = st.cat().job(id)?;
    let mut r = json(&job);
    if new {
        *r.status_mut() = StatusCode::CREATED;
    }
    Ok(r)
}

pub(crate) async fn backup_now(
    State(st): St,
    Operate(caller): Operate,
    Path((host, vm)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: BackupNowRequest = parse(&body)?;
    check_recipients(&st, &req.notify)?;
    st.offload(move |st| {
        let has_point = st
            .cat()
            .datasource_by_name(&host, &vm)?
            .last_recovery_point
            .is_some();
        let kind = if !has_point {
            JobKind::InitialReplica
        } else if req.express_full {
            JobKind::ExpressFull
        } else {
            JobKind::Sync
        };
        queue_for_vm(st, &host, &vm, kind, &req.notify, &caller.name)
    })
    .await
}

pub(crate) async fn consistency_check(
    State(st): St,
    Operate(caller): Operate,
    Path((host, vm)): Path<(String, String)>,
) -> ApiResult<Response> {
    st.offload(move |st| queue_for_vm(st, &host, &vm, JobKind::ConsistencyCheck, &[], &caller.name))
        .await
}

pub(crate) fn exclusions(st: &AppState, ds_id: &str) -> ApiResult<Exclusions> {
    match st.cat().setting(&format!("exclusions:{ds_id}"))? {
        Some(v) => serde_json::from_str(&v).map_err(|e| {
            ApiErr(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("stored exclusions of {ds_id} are unreadable: {e}"),
            )
        }),
        None => Ok(Exclusions::default()),
    }
}

pub(crate) async fn exclusions_get(
    State(st): St,
    _: Read,
    Path((host, vm)): Path<(String, String)>,
) -> ApiResult<Response> {
    let ex = st
        .offload(move |st| {
            let ds = st.cat().datasource_by_name(&host, &vm)?;
            exclusions(st, &ds.id)
        })
        .await?;
    Ok(json(&ex))
}

pub(crate) async fn exclusions_put(
    State(st): St,
    Operate(caller): Operate,
    Path((host, vm)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let ex: Exclusions = parse(&body)?;
    ex.validate(&[]).map_err(bad)?;
    let ex = st
        .offload(move |st| {
            let ds = st.cat().datasource_by_name(&host, &vm)?;
            // Against the disks the agent last reported, when it reported them.
            let sizes: Vec<u64> = ds.disks.iter().map(|d| d.virtual_size).collect();
            ex.validate(&sizes).map_err(bad)?;
            let key = format!("exclusions:{}", ds.id);
            if ex.disks.iter().all(Vec::is_empty) {
                st.cat().delete_setting(&key)?;
            } else {
                let v = serde_json::to_string(&ex)
                    .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                st.cat().set_setting(&key, &v)?;
            }
            st.cat()
                .audit(now(), &caller.name, "exclusions", &format!("{host}/{vm}"))?;
            Ok(ex)
        })
        .await?;
    Ok(json(&ex))
}

/// After a data source's `HOST/VM` changed: audited, and the alerts of the old name
/// (nothing would ever clear them: the name is gone) resolved with a note.
pub(crate) fn moved(
    st: &AppState,
    cat: &catalog::Catalog,
    t: i64,
    actor: &str,
    m: &catalog::Move,
) -> ApiResult<()> {
    cat.audit(
        t,
        actor,
        "datasource move",
        &format!("{} -> {} ({})", m.from, m.to, m.how),
    )?;
    st.notify.resolve_alerts_noted(
        cat,
        t,
        &m.from,
        None,
        Some(&format!("{} moved to {} ({})", m.from, m.to, m.how)),
    )?;
    Ok(())
}

/// An administrator moves a data source (group, recovery points, schedule) to the VM
/// another host reports under its id or name.
pub(crate) async fn datasource_move(
    State(st): St,
    Admin(caller): Admin,
    Path((host, vm)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: MoveDataSource = parse(&body)?;
    check_host_name("to", &req.to).map_err(bad)?;
    let t = now();
    let ds = st
        .offload(move |st| {
            let cat = st.cat();
            if let Some(j) = cat.active_job_for(&cat.datasource_by_name(&host, &vm)?.id)? {
                return Err(ApiErr(
                    StatusCode::CONFLICT,
                    format!(
                        "{host}/{vm} has {} job {} {}; move it when the job has ended",
                        j.kind.as_str(),
                        j.id,
                        j.state.as_str()
                    ),
                ));
            }
            let m = cat.move_datasource(t, &host, &vm, &req.to)?;
            moved(st, &cat, t, &caller.name, &m)?;
            Ok(cat.datasource(&m.datasource_id)?)
        })
        .await?;
    Ok(json(&ds))
}
