//! Whole-VM recovery: `POST /recoveries` queues a recovery job on the target host's
//! agent, and the agent reads the recovery point's blobs through
//! `GET /agent/jobs/{id}/recovery-blob/{blob}`, limited to the blobs of that point.

use crate::auth::{AgentHost, Restore};
use crate::caches::Access;
use crate::http::{ApiErr, ApiResult, St, bad, blocking, json, not_found};
use crate::recovery_plan::{Stored, key, stored};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use catalog::NewJob;
use datastore::{Id, Manifest};
use protocol::{
    DataSourceInfo, JobInfo, JobKind, ProviderKind, RecoveryDone, RecoveryPointInfo,
    RecoveryRequest, RecoveryTarget, split_vm,
};
use std::collections::HashSet;
use std::sync::Arc;

fn internal(msg: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::INTERNAL_SERVER_ERROR, msg.into())
}

fn check_host(st: &AppState, host: &str) -> ApiResult<()> {
    let agents = st.cat().agents()?;
    match agents.iter().find(|a| a.host == host) {
        Some(a) if !a.revoked => Ok(()),
        Some(_) => Err(bad(format!("the agent of host {host:?} is revoked"))),
        None => Err(not_found(format!("no agent is enrolled for host {host:?}"))),
    }
}

/// `POST /recoveries` (restore or higher).
pub(crate) async fn create(
    State(st): St,
    Restore(caller): Restore,
    body: Bytes,
) -> ApiResult<Response> {
    let req: RecoveryRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("request body: {e}")))?;
    req.validate().map_err(bad)?;
    let job = st
        .offload(move |st| plan_and_queue(st, &req, &caller.name))
        .await?;
    let mut r = json(&job);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

/// The phases of `POST /recoveries`: the data source and its point, the target host
/// and its agent, then the job queued with its stored plan.
fn plan_and_queue(st: &AppState, req: &RecoveryRequest, who: &str) -> ApiResult<JobInfo> {
    let (host, vm) =
        split_vm(&req.vm).ok_or_else(|| bad(format!("{:?} is not HOST/VM", req.vm)))?;
    let ds = st.cat().datasource_by_name(host, vm)?;
    let points = match crate::online::parse_from(req.from.as_deref())? {
        None => st.cat().recovery_points(Some(&ds.id))?,
        Some(name) => {
            st.cat().storage(&name)?;
            st.cat()
                .online_points(Some(&name))?
                .into_iter()
                .map(|(_, rp)| rp)
                .filter(|rp| ds.name == rp.vm || rp.datasource_id == ds.id)
                .collect()
        }
    };
    let point = pick_point(req, &ds, &points)?;
    let target_host = target_host(st, &req.target, &ds, point)?;
    check_host(st, &target_host)?;
    crate::http::check_recipients(st, &req.notify)?;
    let id = queue_job(st, req, &ds, point, &target_host, who)?;
    st.notify_job(id, &req.notify)?;
    st.wake.notify_waiters();
    Ok(st.cat().job(id)?)
}

/// The recovery point asked for: by id, the newest at or before a time, or the latest.
fn pick_point<'a>(
    req: &RecoveryRequest,
    ds: &DataSourceInfo,
    points: &'a [RecoveryPointInfo],
) -> ApiResult<&'a RecoveryPointInfo> {
    Ok(match (&req.point, &req.at) {
        (Some(_), Some(_)) => return Err(bad("give a recovery point or a time, not both")),
        (None, Some(at)) => {
            let t = protocol::check_time("at", at).map_err(bad)?;
            points
                .iter()
                .filter(|p| p.created_unix <= t)
                .max_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)))
                .ok_or_else(|| {
                    not_found(format!(
                        "{} has no recovery point at or before {at}",
                        ds.name
                    ))
                })?
        }
        (p, None) if p.as_deref().is_none_or(|p| p == "latest") => points
            .iter()
            .max_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)))
            .ok_or_else(|| not_found(format!("{} has no recovery point", ds.name)))?,
        (Some(p), None) => points
            .iter()
            .find(|r| &r.id == p)
            .ok_or_else(|| not_found(format!("{} has no recovery point {p:?}", ds.name)))?,
        (None, None) => return Err(bad("no recovery point")),
    })
}

/// The host whose agent runs the recovery, once the target is possible there.
fn target_host(
    st: &AppState,
    target: &RecoveryTarget,
    ds: &DataSourceInfo,
    point: &RecoveryPointInfo,
) -> ApiResult<String> {
    Ok(match target {
        RecoveryTarget::Original { stop_vm, start } => {
            if *start && !*stop_vm {
                return Err(bad(
                    "--start needs --stop-vm (start = start the VM again after stopping it)",
                ));
            }
            match ds.provider {
                // At rest: nothing to stop (stop_vm is accepted and means nothing),
                // and nothing to start.
                ProviderKind::Files if *start => {
                    return Err(bad(format!(
                        "{} is a VM at rest (files provider); there is nothing to start",
                        ds.name
                    )));
                }
                ProviderKind::Files => {}
                // The qemu provider sees only live QEMU processes: its disks are in use
                // until QEMU is stopped, which the admin must ask for.
                ProviderKind::Qemu if !*stop_vm => {
                    return Err(ApiErr(
                        StatusCode::CONFLICT,
                        format!(
                            "{} is a running QEMU VM; add --stop-vm to stop it for the recovery",
                            ds.name
                        ),
                    ));
                }
                ProviderKind::Qemu => {}
                other @ ProviderKind::Hyperv => {
                    return Err(bad(format!(
                        "recovery to the original instance of a {other} VM is not supported yet; use --alternate"
                    )));
                }
            }
            if !ds.present {
                return Err(bad(format!(
                    "{} is no longer reported by its agent; recover it with --alternate",
                    ds.name
                )));
            }
            if let Some(j) = st.cat().active_job_for(&ds.id)? {
                return Err(ApiErr(
                    StatusCode::CONFLICT,
                    format!(
                        "{} has job {} {}; recover when it has ended",
                        ds.name,
                        j.id,
                        j.state.as_str()
                    ),
                ));
            }
            ds.host.clone()
        }
        // Folder and format were checked by validate() above.
        RecoveryTarget::Alternate { host, .. } => host.clone(),
        RecoveryTarget::CopyTo {
            host,
            disk,
            partition,
            items,
            ..
        } => {
            let disk = match disk {
                None if partition.is_some() || !items.is_empty() => &Some(0),
                d => d,
            };
            if let Some(d) = disk
                && *d as usize >= point.disks.len()
            {
                return Err(bad(format!(
                    "recovery point {} has {} disk(s); there is no disk {d} (disks are numbered from 0)",
                    point.id,
                    point.disks.len()
                )));
            }
            host.clone()
        }
    })
}

/// Queues the recovery job with its stored plan; returns its id.
fn queue_job(
    st: &AppState,
    req: &RecoveryRequest,
    ds: &DataSourceInfo,
    point: &RecoveryPointInfo,
    target_host: &str,
    who: &str,
) -> ApiResult<i64> {
    let now = utc::now();
    let s = Stored {
        host: target_host.to_string(),
        point: point.id.clone(),
        target: req.target.clone(),
        throttle_kbps: req.throttle_kbps.filter(|&k| k > 0),
        from: crate::online::parse_from(req.from.as_deref())?,
    };
    let v = serde_json::to_string(&s).map_err(|e| internal(e.to_string()))?;
    let cat = st.cat();
    let id = cat.add_job(
        now,
        &NewJob {
            kind: JobKind::Recovery,
            datasource_id: Some(ds.id.clone()),
            trigger: who.into(),
            not_before: None,
            attempt: 1,
            rerun_of: None,
        },
    )?;
    cat.set_setting(&key(id), &v)?;
    cat.set_job_recovery_point(id, &point.id)?;
    cat.job_log(
        now,
        id,
        &format!(
            "queued: recover {} from recovery point {} on {target_host} ({})",
            ds.name,
            point.id,
            describe(&req.target)
        ),
    )?;
    cat.audit(now, who, "recover", &format!("{} job {id}", ds.name))?;
    Ok(id)
}

fn describe(t: &RecoveryTarget) -> String {
    match t {
        RecoveryTarget::Original { stop_vm, start } => format!(
            "over the original disk files{}",
            match (stop_vm, start) {
                (true, true) => ", stopping the VM and starting it again",
                (true, false) => ", stopping the VM (left stopped)",
                _ => "",
            }
        ),
        RecoveryTarget::Alternate { dir, format, .. } => format!(
            "as a new VM in {dir}{}",
            format
                .as_ref()
                .map(|f| format!(", {f} disks"))
                .unwrap_or_default()
        ),
        RecoveryTarget::CopyTo {
            dir,
            disk,
            partition,
            items,
            ..
        } => {
            let d = disk.unwrap_or(0);
            let volume = match partition {
                Some(p) => format!("disk {d} partition {p}"),
                None => format!("disk {d}"),
            };
            if !items.is_empty() {
                let shown: Vec<&str> = items.iter().take(5).map(String::as_str).collect();
                format!(
                    "{} item(s) of {volume} copied to {dir}: {}{}",
                    items.len(),
                    shown.join(", "),
                    if items.len() > 5 { ", ..." } else { "" }
                )
            } else if partition.is_some() {
                format!("{volume} copied to {dir} as a raw image")
            } else {
                format!(
                    "disk files copied to {dir}{}",
                    disk.map(|d| format!(", disk {d} only")).unwrap_or_default()
                )
            }
        }
    }
}

/// The blobs a recovery job may read: every index piece and block of its point.
fn build_access(store: Arc<datastore::Datastore>, m: &Manifest) -> ApiResult<Access> {
    let index = Arc::new(store.blob_index()?);
    let mut allowed = HashSet::new();
    for d in &m.disks {
        for h in &d.pieces {
            let pid = Id::from_hex(h)
                .ok_or_else(|| internal(format!("recovery point {}: bad piece id {h:?}", m.id)))?;
            allowed.insert(pid);
            for b in store.read_piece(&index, pid)? {
                if !b.is_zero() {
                    allowed.insert(b);
                }
            }
        }
    }
    Ok(Access {
        store,
        index,
        allowed,
    })
}

/// The running recovery job `id` of agent `host`, and what it may read (built at its
/// first request, kept while it runs).
async fn job_access(st: &Arc<AppState>, host: &str, id: i64) -> ApiResult<Arc<Access>> {
    let job = crate::auth::own_job(st, host, id).await?;
    if job.kind != JobKind::Recovery {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!("job {id} is not a recovery job"),
        ));
    }
    let have = locks::lock(&st.recoveries).get(&id).cloned();
    if let Some(a) = have {
        return Ok(a);
    }
    let a = st
        .offload(move |st| {
            let s = stored(&st.cat(), id)?;
            let (store, _) = crate::recovery_plan::source(st, &s).map_err(internal)?;
            let m = store.point(&s.point)?;
            build_access(store, &m)
        })
        .await?;
    Ok(locks::lock(&st.recoveries)
        .entry(id)
        .or_insert(Arc::new(a))
        .clone())
}

fn check_allowed(access: &Access, id: i64, bid: Id) -> ApiResult<()> {
    if access.allowed.contains(&bid) {
        Ok(())
    } else {
        Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!(
                "blob {} is not part of the recovery point of job {id}",
                bid.to_hex()
            ),
        ))
    }
}

/// `GET /agent/jobs/{id}/recovery-blob/{blob}` (agent): one framed blob of the job's
/// recovery point, exactly as stored.
pub(crate) async fn agent_blob(
    State(st): St,
    AgentHost(host): AgentHost,
    Path((id, blob)): Path<(i64, String)>,
) -> ApiResult<Response> {
    let bid =
        Id::from_hex(&blob).ok_or_else(|| bad(format!("blob id {blob:?} is not 64 hex digits")))?;
    let access = job_access(&st, &host, id).await?;
    check_allowed(&access, id, bid)?;
    let out = blocking(move || Ok(access.store.framed_blob(&access.index, bid)?)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

/// Blobs per `recovery-blobs` request: 64 blocks of 64 KiB (framed, at most a little
/// more) keep an answer near 4 MiB.
pub const MAX_BATCH: usize = protocol::RECOVERY_BATCH;

/// `POST /agent/jobs/{id}/recovery-blobs` (agent): several framed blobs of the job's
/// recovery point in one round trip. The body is the ids, 32 bytes each (at most
/// [`MAX_BATCH`]); the answer is, for each in order, its length (u32, little-endian)
/// and its framed bytes, exactly as stored.
pub(crate) async fn agent_blobs(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    if body.is_empty() || !body.len().is_multiple_of(32) || body.len() / 32 > MAX_BATCH {
        return Err(bad(format!(
            "body: {} bytes; expected 1 to {MAX_BATCH} blob ids of 32 bytes",
            body.len()
        )));
    }
    let ids: Vec<Id> = body
        .chunks_exact(32)
        .map(|c| {
            let mut b = [0u8; 32];
            b.copy_from_slice(c);
            Id(b)
        })
        .collect();
    let access = job_access(&st, &host, id).await?;
    for &b in &ids {
        check_allowed(&access, id, b)?;
    }
    let out = blocking(move || {
        let mut out = Vec::new();
        for b in ids {
            let framed = access.store.framed_blob(&access.index, b)?;
            let n = u32::try_from(framed.len())
                .map_err(|_| internal(format!("blob {} is over 4 GiB", b.to_hex())))?;
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&framed);
        }
        Ok(out)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

/// `POST /agent/jobs/{id}/recovered` (agent): the recovery job wrote everything.
pub(crate) async fn agent_done(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let job = crate::auth::own_job(&st, &host, id).await?;
    if job.kind != JobKind::Recovery {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!("job {id} is not a recovery job"),
        ));
    }
    let d: RecoveryDone = crate::http::parse(&body)?;
    let now = utc::now();
    st.offload(move |st| {
        {
            let cat = st.cat();
            for f in d.files.iter().take(256) {
                let f: String = f.chars().take(4096).collect();
                cat.job_log(now, id, &format!("wrote {f}"))?;
            }
            for n in d.notes.iter().take(600) {
                let n: String = n.chars().take(4096).collect();
                cat.job_log(now, id, &n)?;
            }
            cat.job_log(now, id, &recovery_summary(&d))?;
        }
        Ok(st.job_succeeded(id, now)?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The job log's last line of a recovery: bytes fetched and bytes of disk written, apart
/// (holes are written but never fetched), each with its rate over the agent's own
/// measure of the recovery's time when it sent one.
fn recovery_summary(d: &RecoveryDone) -> String {
    let secs = d
        .elapsed_ms
        .filter(|&ms| ms > 0)
        .map(|ms| ms as f64 / 1000.0);
    let per_sec = |bytes: u64| match secs {
        Some(s) => format!(" at {}/s", human_bytes((bytes as f64 / s) as u64)),
        None => String::new(),
    };
    let mut line = format!(
        "fetched {} bytes ({}) from the datastore{}",
        d.bytes_fetched,
        human_bytes(d.bytes_fetched),
        per_sec(d.bytes_fetched)
    );
    if let Some(w) = d.bytes_written {
        line.push_str(&format!(
            "; wrote {w} bytes ({}) of disk (holes included){}",
            human_bytes(w),
            per_sec(w)
        ));
    }
    if let Some(s) = secs {
        line.push_str(&format!("; in {s:.1} s"));
    }
    line
}

/// `1.5 MiB` (binary units, one decimal).
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    #[test]
    fn the_summary_rates_fetched_and_written_apart() {
        let d = RecoveryDone {
            files: Vec::new(),
            bytes_fetched: 1 << 20,
            bytes_written: Some(64 << 20),
            elapsed_ms: Some(4000),
            notes: Vec::new(),
        };
        assert_eq!(
            recovery_summary(&d),
            "fetched 1048576 bytes (1.0 MiB) from the datastore at 256.0 KiB/s; \
             wrote 67108864 bytes (64.0 MiB) of disk (holes included) at 16.0 MiB/s; in 4.0 s"
        );
        // An older agent: the bytes fetched, no rate.
        let old = RecoveryDone {
            bytes_written: None,
            elapsed_ms: None,
            ..d
        };
        assert_eq!(
            recovery_summary(&old),
            "fetched 1048576 bytes (1.0 MiB) from the datastore"
        );
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }
}
