//! What admins read and act on: recovery points, jobs, alerts and the audit log.

use crate::auth::{Operate, Read};
use crate::http::{ApiErr, ApiResult, St, bad, json, now, parse};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use protocol::*;
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize)]
pub(crate) struct RpQuery {
    vm: Option<String>,
}

pub(crate) async fn recovery_points(
    State(st): St,
    _: Read,
    Query(q): Query<RpQuery>,
) -> ApiResult<Response> {
    let points = st
        .catalog(move |cat| {
            let ds = match &q.vm {
                Some(vm) => {
                    let (h, v) =
                        split_vm(vm).ok_or_else(|| bad(format!("vm {vm:?} is not HOST/VM")))?;
                    match cat.datasource_by_name(h, v) {
                        Ok(d) => Some(d.id),
                        // Known only from online copies (a server rebuilt after a
                        // disaster, or a VM whose data source is gone).
                        Err(catalog::Error::NotFound(_)) => None,
                        Err(e) => return Err(e.into()),
                    }
                }
                None => None,
            };
            if q.vm.is_some() && ds.is_none() {
                let online = cat.recovery_points_everywhere(None, q.vm.as_deref())?;
                if online.is_empty() {
                    return Err(crate::http::not_found(format!(
                        "no data source and no online copies for {}",
                        q.vm.as_deref().unwrap_or_default()
                    )));
                }
                return Ok(online);
            }
            Ok::<_, ApiErr>(cat.recovery_points_everywhere(ds.as_deref(), q.vm.as_deref())?)
        })
        .await?;
    Ok(json(&points))
}

#[derive(Deserialize)]
pub(crate) struct JobsQuery {
    state: Option<String>,
    kind: Option<String>,
    vm: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn jobs_list(
    State(st): St,
    _: Read,
    Query(q): Query<JobsQuery>,
) -> ApiResult<Response> {
    let state = match &q.state {
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            bad(format!(
                "state {s:?} is not queued, running, succeeded, failed or cancelled"
            ))
        })?),
        None => None,
    };
    let kind = match &q.kind {
        Some(k) => Some(JobKind::parse(k).ok_or_else(|| {
            bad(format!(
                "kind {k:?} is not sync, express-full, consistency-check, initial-replica, recovery, verify, prune or gc"
            ))
        })?),
        None => None,
    };
    let f = catalog::JobFilter {
        state,
        kind,
        vm: q.vm.clone(),
    };
    let limit = q.limit.unwrap_or(200).min(10_000);
    Ok(json(&st.catalog(move |c| c.jobs_where(&f, limit)).await?))
}

#[derive(Deserialize)]
struct NewServerJob {
    kind: String,
}

/// Server-side jobs on demand (verify, prune, gc).
pub(crate) async fn job_create(
    State(st): St,
    Operate(caller): Operate,
    body: Bytes,
) -> ApiResult<Response> {
    let req: NewServerJob = parse(&body)?;
    let kind = JobKind::parse(&req.kind)
        .filter(|k| !k.on_agent() && !matches!(k, JobKind::OnlineCopy | JobKind::OnlineVerify))
        .ok_or_else(|| {
            bad(format!(
                "kind {:?}: verify, prune or gc (backups start with backup-now)",
                req.kind
            ))
        })?;
    let job = st
        .offload(move |st| {
            let (id, _) = st.queue(now(), kind, None, &caller.name)?;
            Ok(st.cat().job(id)?)
        })
        .await?;
    let mut r = json(&job);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

#[derive(Deserialize)]
pub(crate) struct JobQuery {
    /// Long poll: answer as soon as the job ends, or after this many seconds (≤ 60).
    wait_seconds: Option<u64>,
}

pub(crate) async fn job_show(
    State(st): St,
    _: Read,
    Path(id): Path<i64>,
    Query(q): Query<JobQuery>,
) -> ApiResult<Response> {
    let wait = Duration::from_secs(q.wait_seconds.unwrap_or(0).min(60));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before the check, so an end between the two is not missed.
        let ended = st.job_ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        let job = st.catalog(move |c| c.job(id)).await?;
        if job.state.finished() || tokio::time::Instant::now() >= deadline {
            return Ok(json(&job));
        }
        let _ = tokio::time::timeout_at(deadline, ended).await;
    }
}

pub(crate) async fn job_cancel(
    State(st): St,
    Operate(caller): Operate,
    Path(id): Path<i64>,
) -> ApiResult<Response> {
    let job = st
        .offload(move |st| {
            let state = st.cat().job_state(id)?;
            match state {
                JobState::Queued => {
                    st.job_failed(id, now(), "cancelled", "cancelled by an administrator")?;
                }
                JobState::Running => {
                    // The agent learns it at its next progress report and stops; the job
                    // ends as cancelled then. Server-side jobs finish their step.
                    st.cat().set_setting(&format!("cancel:{id}"), "1")?;
                    st.cat().job_log(now(), id, "cancel requested")?;
                }
                s => {
                    return Err(ApiErr(
                        StatusCode::CONFLICT,
                        format!("job {id} already {}", s.as_str()),
                    ));
                }
            }
            st.cat()
                .audit(now(), &caller.name, "job cancel", &id.to_string())?;
            Ok(st.cat().job(id)?)
        })
        .await?;
    Ok(json(&job))
}

#[derive(Deserialize)]
pub(crate) struct AlertsQuery {
    #[serde(default)]
    all: bool,
}

pub(crate) async fn alerts_list(
    State(st): St,
    _: Read,
    Query(q): Query<AlertsQuery>,
) -> ApiResult<Response> {
    Ok(json(&st.catalog(move |c| c.alerts(q.all)).await?))
}

pub(crate) async fn alert_resolve(
    State(st): St,
    Operate(caller): Operate,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ResolveAlert = parse(&body)?;
    req.validate().map_err(bad)?;
    let a = st
        .offload(move |st| {
            let note = req.note.as_deref().map(str::trim).filter(|n| !n.is_empty());
            let cat = st.cat();
            let a = st.notify.resolve_alert(&cat, now(), id, note)?;
            cat.audit(
                now(),
                &caller.name,
                "alert resolve",
                &format!(
                    "{id} {} {}{}",
                    a.subject,
                    a.kind,
                    note.map(|n| format!(": {n}")).unwrap_or_default()
                ),
            )?;
            Ok(a)
        })
        .await?;
    Ok(json(&a))
}

pub(crate) async fn audit_list(State(st): St, _: Read) -> ApiResult<Response> {
    Ok(json(&st.catalog(|c| c.audit_log(500)).await?))
}
