//! Protection groups, with their disk allocation review.

use crate::auth::{Operate, Read};
use crate::http::{ApiErr, ApiResult, St, bad, forbidden, json, now, parse};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use protocol::*;
use serde::Deserialize;

pub(crate) fn group_info(st: &AppState, g: catalog::GroupRow) -> GroupInfo {
    let allocation = crate::allocation::review(st, g.data_size(), &g.policy);
    GroupInfo {
        members: g.member_names(),
        name: g.name,
        policy: g.policy,
        created: g.created,
        allocation,
    }
}

pub(crate) async fn groups_list(State(st): St, _: Read) -> ApiResult<Response> {
    let out = st
        .offload(|st| {
            let rows = st.cat().groups()?;
            Ok(rows
                .into_iter()
                .map(|g| group_info(st, g))
                .collect::<Vec<GroupInfo>>())
        })
        .await?;
    Ok(json(&out))
}

pub(crate) async fn group_show(
    State(st): St,
    _: Read,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let g = st
        .offload(move |st| {
            let g = st.cat().group(&name)?;
            Ok(group_info(st, g))
        })
        .await?;
    Ok(json(&g))
}

/// Refuses a group whose members cannot fit the datastore under its policy.
pub(crate) fn check_fits(st: &AppState, size: u64, policy: &Policy) -> ApiResult<AllocationReview> {
    let r = crate::allocation::review(st, size, policy);
    if !r.fits {
        return Err(ApiErr(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "disk allocation review: the members hold {} bytes and this policy needs about {} bytes (size + size x {}% churn x {} days), but the datastore has {} bytes free; free space, shorten retention or split the group",
                r.data_size,
                r.required,
                policy.churn_percent,
                policy.retention_days,
                r.datastore_free
            ),
        ));
    }
    Ok(r)
}

/// A policy with online protection gets its target's online copy ready (made when the
/// target is empty): a target that cannot be reached or holds another copy is refused
/// now, not at the first copy.
fn ready_online(st: &AppState, policy: &Policy) -> ApiResult<()> {
    if let Some(o) = &policy.online {
        match st.cat().storage(&o.storage) {
            Err(catalog::Error::NotFound(_)) => {
                return Err(bad(format!(
                    "policy.online.storage: no storage target {:?}; add it with `holdfast storage add`",
                    o.storage
                )));
            }
            r => r?,
        };
        crate::online::store(st, &o.storage, true)?;
    }
    Ok(())
}

pub(crate) fn mark_schedules_now(st: &AppState, g: &catalog::GroupRow) -> ApiResult<()> {
    let cat = st.cat();
    let t = now();
    for m in &g.members {
        for k in ["sync", "rp", "ef", "cc"] {
            let key = format!("{k}:{}", m.datasource_id);
            if cat.schedule_last(&key)?.is_none() {
                cat.set_schedule_last(&key, t)?;
            }
        }
    }
    Ok(())
}

pub(crate) async fn group_create(
    State(st): St,
    Operate(caller): Operate,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateGroup = parse(&body)?;
    req.validate().map_err(bad)?;
    let g = st
        .offload(move |st| {
            let mut size = 0u64;
            for m in &req.members {
                if let Some((h, v)) = split_vm(m) {
                    size = size.saturating_add(st.cat().datasource_by_name(h, v)?.size);
                }
            }
            check_fits(st, size, &req.policy)?;
            ready_online(st, &req.policy)?;
            let g = st
                .cat()
                .create_group(now(), &req.name, &req.policy, &req.members)?;
            mark_schedules_now(st, &g)?;
            st.cat().audit(
                now(),
                &caller.name,
                "pg create",
                &format!("{} members {}", g.name, g.member_names().join(",")),
            )?;
            st.wake.notify_waiters();
            Ok(group_info(st, g))
        })
        .await?;
    let mut r = json(&g);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

pub(crate) async fn group_modify(
    State(st): St,
    Operate(caller): Operate,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ModifyGroup = parse(&body)?;
    req.validate().map_err(bad)?;
    let g = st
        .offload(move |st| {
            let before = st.cat().group(&name)?;
            if let Some(p) = &req.policy {
                ready_online(st, p)?;
            }
            let g = st.cat().modify_group(
                &name,
                &req.add_members,
                &req.remove_members,
                req.policy.as_ref(),
            )?;
            // Removed members keep their data, which expires by the retention it had.
            for m in &before.members {
                if !g.members.iter().any(|x| x.datasource_id == m.datasource_id) {
                    st.cat().set_setting(
                        &format!("retention:{}", m.datasource_id),
                        &before.policy.retention_days.to_string(),
                    )?;
                }
            }
            mark_schedules_now(st, &g)?;
            st.cat().audit(now(), &caller.name, "pg modify", &name)?;
            Ok(group_info(st, g))
        })
        .await?;
    Ok(json(&g))
}

#[derive(Deserialize)]
pub(crate) struct DeleteQuery {
    #[serde(default)]
    delete_data: bool,
}

pub(crate) async fn group_delete(
    State(st): St,
    Operate(caller): Operate,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Response> {
    // Deleting the data is deleting recovery points: admins only.
    if q.delete_data && caller.role < protocol::Role::Admin {
        return Err(forbidden(format!(
            "{} (role {}) may not delete recovery points (--delete-data): it needs role admin",
            caller.name, caller.role
        )));
    }
    let n = name.clone();
    let deleted = st
        .offload(move |st| {
            let name = n;
            let g = st.cat().delete_group(&name)?;
            let mut deleted = 0u64;
            for m in &g.members {
                if q.delete_data {
                    let points = st.cat().recovery_points(Some(&m.datasource_id))?;
                    for p in points {
                        st.datastore.forget(&p.id)?;
                        st.cat().delete_recovery_point(&p.id)?;
                        deleted += 1;
                    }
                } else {
                    // Kept data expires by the retention it was protected with.
                    st.cat().set_setting(
                        &format!("retention:{}", m.datasource_id),
                        &g.policy.retention_days.to_string(),
                    )?;
                }
            }
            st.cat().audit(
                now(),
                &caller.name,
                "pg delete",
                &format!("{name} delete_data={} points={deleted}", q.delete_data),
            )?;
            Ok(deleted)
        })
        .await?;
    Ok(json(&DeleteGroupResponse {
        name,
        recovery_points_deleted: deleted,
    }))
}

/// `POST /protection-groups/{name}/online-copy`: copy every member's newest recovery
/// point to the group's storage target now.
pub(crate) async fn group_online_copy(
    State(st): St,
    Operate(caller): Operate,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let out = st
        .offload(move |st| {
            let g = st.cat().group(&name)?;
            if g.policy.online.is_none() {
                return Err(ApiErr(
                    StatusCode::CONFLICT,
                    format!("protection group {name:?} has no online protection (pg modify --online STORAGE ...)"),
                ));
            }
            let jobs = crate::online::queue_group(st, now(), &name, &caller.name)?;
            st.cat()
                .audit(now(), &caller.name, "online copy", &format!("{name}: jobs {jobs:?}"))?;
            Ok(OnlineCopyQueued { group: name, jobs })
        })
        .await?;
    let mut r = json(&out);
    *r.status_mut() = StatusCode::ACCEPTED;
    Ok(r)
}
