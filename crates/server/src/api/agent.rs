//! What agents call (client certificate): inventory, polls for jobs, backup sessions
//! (missing blobs, blob batches, progress, commit, failure) and replica seeds.

use super::datasources::{exclusions, moved};
use crate::auth::{AgentHost, own_job};
use crate::http::{ApiErr, ApiResult, St, bad, blocking, json, not_found, now, octets, parse};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use datastore::Id;
use protocol::*;
use std::sync::Arc;
use std::time::Duration;

pub(crate) async fn agent_inventory(
    State(st): St,
    AgentHost(host): AgentHost,
    body: Bytes,
) -> ApiResult<Response> {
    let mut inv: Inventory = parse(&body)?;
    // A VM whose name breaks the name grammar is left out (with an alert), not the
    // whole report: the host's other VMs stay protected.
    let refused = inv.take_invalid();
    let t = now();
    st.offload(move |st| inventory(st, t, &host, &inv.vms, &refused))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Records an agent's inventory: its VMs, the alerts of invalid names, VM id conflicts,
/// moves and VMs reported again.
fn inventory(
    st: &AppState,
    t: i64,
    host: &str,
    vms: &[VmInfo],
    refused: &[(VmInfo, String)],
) -> ApiResult<()> {
    let cat = st.cat();
    let out = cat.upsert_inventory(t, host, vms)?;
    let subject = format!("agent {host}");
    if refused.is_empty() {
        st.notify
            .resolve_alerts(&cat, t, &subject, Some("vm-name-invalid"))?;
    } else {
        let why: Vec<String> = refused.iter().map(|(_, w)| w.clone()).collect();
        let msg = format!(
            "{host} reported {} VM(s) whose name Holdfast cannot use; they are not protected until renamed: {}",
            refused.len(),
            why.join("; ")
        );
        eprintln!("holdfast server: inventory of {host}: {msg}");
        st.notify.raise_alert(
            &cat,
            t,
            Severity::Warning,
            &subject,
            "vm-name-invalid",
            &msg,
        )?;
    }
    for c in &out.conflicts {
        // On the holder: the data source under attack (or whose VM really moved).
        let msg = format!(
            "{} reports VM id {}, which belongs to {} ({}); the data source stays on its host \
             and {} is not backed up as it. If the VM really moved, run `holdfast datasources \
             move {} --to {}`; otherwise check host {}",
            c.claimant,
            c.vm_id,
            c.holder,
            if c.holder_present {
                "still reported by its host"
            } else {
                "no longer reported by its host, which is in no cluster with the claimant"
            },
            c.claimant,
            c.holder,
            c.claimant.split('/').next().unwrap_or(host),
            host,
        );
        st.notify.raise_alert(
            &cat,
            t,
            Severity::Critical,
            &c.holder,
            "vm-id-conflict",
            &msg,
        )?;
        if c.new {
            cat.audit(
                t,
                &format!("agent {host}"),
                "vm-id conflict",
                &format!("{} claims VM id {} of {}", c.claimant, c.vm_id, c.holder),
            )?;
        }
    }
    for name in &out.conflicts_ended {
        st.notify.resolve_alerts_noted(
            &cat,
            t,
            name,
            Some("vm-id-conflict"),
            Some("no host claims its VM id any more"),
        )?;
    }
    for m in &out.moves {
        moved(st, &cat, t, &format!("agent {host}"), m)?;
    }
    for name in &out.back {
        st.notify.resolve_alerts_noted(
            &cat,
            t,
            name,
            Some("vm-missing"),
            Some("its agent reports it again"),
        )?;
    }
    Ok(())
}

/// Hands the agent its next runnable job, waiting up to `poll_seconds` for one.
pub(crate) async fn agent_poll(State(st): St, AgentHost(host): AgentHost) -> ApiResult<Response> {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(st.config.scheduler.poll_seconds);
    loop {
        locks::lock(&st.polling).insert(host.clone(), std::time::Instant::now());
        let notified = st.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let h = host.clone();
        let job = st
            .offload(move |st| Ok(crate::scheduler::dispatch(st, &h)?))
            .await?;
        if let Some(job) = job {
            return Ok(json(&PollResponse { job: Some(job) }));
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(json(&PollResponse { job: None }));
        }
    }
}

pub(crate) fn session(st: &AppState, id: i64) -> ApiResult<Arc<datastore::Ingest>> {
    locks::lock(&st.sessions).get(&id).cloned().ok_or_else(|| {
        not_found(format!(
            "job {id} has no open backup session (the server restarted or the job ended)"
        ))
    })
}

pub(crate) async fn agent_start(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
) -> ApiResult<Response> {
    let job = own_job(&st, &host, id).await?;
    if !job.kind.is_backup() {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            format!("job {id} is a {} job, not a backup", job.kind.as_str()),
        ));
    }
    let ds_id = job.datasource_id.clone().unwrap_or_default();
    let ds = st.catalog(move |c| c.datasource(&ds_id)).await?;
    let source = Source {
        name: ds.name.to_string(),
        id: ds.id.clone(),
    };
    let store = st.datastore.clone();
    let kind = job.kind;
    let (ingest, base) = blocking(move || {
        let ingest = store.begin_ingest(source.into())?;
        // A consistency check or first replica builds on nothing: every block is read
        // and compared; a sync builds on the latest recovery point.
        let base = match kind {
            JobKind::Sync | JobKind::ExpressFull => ingest.latest()?,
            _ => None,
        };
        Ok((ingest, base))
    })
    .await?;
    let params = ingest.params();
    locks::lock(&st.sessions).insert(id, Arc::new(ingest));
    let line = format!(
        "started on {host}{}",
        base.as_ref()
            .map(|b| format!(", based on recovery point {}", b.id))
            .unwrap_or_default()
    );
    let ds_id = ds.id.clone();
    let excluded = st
        .offload(move |st| {
            st.cat().job_log(now(), id, &line)?;
            Ok(exclusions(st, &ds_id)?.disks)
        })
        .await?;
    Ok(json(&SessionStart {
        block_size: params.block_size,
        piece_blocks: params.piece_blocks,
        zstd_level: params.zstd_level,
        master_key: st.master_key.map(|k| hex(&k)),
        base: base.map(Into::into),
        excluded,
        source: Source {
            name: ds.name.to_string(),
            id: ds.id,
        },
    }))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) async fn agent_missing(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    own_job(&st, &host, id).await?;
    if !body.len().is_multiple_of(32) {
        return Err(bad(format!(
            "missing: body of {} bytes is not a list of 32-byte ids",
            body.len()
        )));
    }
    if body.len() / 32 > MAX_MISSING_IDS {
        return Err(ApiErr(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("missing: at most {MAX_MISSING_IDS} ids per request"),
        ));
    }
    let s = session(&st, id)?;
    let out = blocking(move || {
        let ids: Vec<Id> = body.chunks_exact(32).filter_map(Id::from_slice).collect();
        let m = s.missing(&ids)?;
        Ok(m.into_iter().map(u8::from).collect::<Vec<u8>>())
    })
    .await?;
    Ok(octets(out))
}

pub(crate) async fn agent_blobs(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    own_job(&st, &host, id).await?;
    let s = session(&st, id)?;
    let res = blocking(move || Ok(s.put(&body)?)).await;
    if let Err(e) = &res {
        // A rejected batch ends the session (the datastore refuses further use).
        let line = format!("blob batch refused: {}", e.1);
        st.catalog(move |c| c.job_log(now(), id, &line)).await?;
    }
    res?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn agent_blob(
    State(st): St,
    AgentHost(host): AgentHost,
    Path((id, blob)): Path<(i64, String)>,
) -> ApiResult<Response> {
    own_job(&st, &host, id).await?;
    let bid =
        Id::from_hex(&blob).ok_or_else(|| bad(format!("blob id {blob:?} is not 64 hex digits")))?;
    let s = session(&st, id)?;
    let out = blocking(move || Ok(s.framed_blob(bid)?)).await?;
    Ok(octets(out))
}

pub(crate) async fn agent_progress(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    own_job(&st, &host, id).await?;
    let p: JobProgress = parse(&body)?;
    st.progressed(id, &p);
    let cancel = st
        .catalog(move |cat| {
            cat.set_job_progress(id, &p)?;
            if let Some(m) = &p.message {
                cat.job_log(now(), id, m)?;
            }
            Ok::<_, catalog::Error>(cat.setting(&format!("cancel:{id}"))?.is_some())
        })
        .await?;
    Ok(json(&JobProgressReply { cancel }))
}

pub(crate) async fn agent_commit(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let job = own_job(&st, &host, id).await?;
    let mut c: Commit = parse(&body)?;
    let notes = std::mem::take(&mut c.notes);
    // A cancel that arrived after the agent's last progress report still wins: no
    // recovery point from a cancelled job.
    st.offload(move |st| {
        if st.cat().setting(&format!("cancel:{id}"))?.is_some() {
            st.job_failed(id, now(), "cancelled", "cancelled by an administrator")?;
            return Err(ApiErr(
                StatusCode::CONFLICT,
                format!("job {id} was cancelled"),
            ));
        }
        Ok(())
    })
    .await?;
    let s = locks::lock(&st.sessions)
        .remove(&id)
        .ok_or_else(|| not_found(format!("job {id} has no open backup session")))?;
    // From here the server works and the agent waits (the job then ends either way).
    st.server_busy(id, true);
    let manifest = blocking(move || {
        // Other requests of this job may still hold the session for a moment.
        let mut s = s;
        let ingest = loop {
            match Arc::try_unwrap(s) {
                Ok(i) => break i,
                Err(again) => {
                    s = again;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let disks = c.disks.into_iter().map(Into::into).collect();
        Ok(ingest.commit(c.consistency.into(), c.base, disks, c.stats.into())?)
    })
    .await;
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => {
            let why = format!("commit refused: {}", e.1);
            st.offload(move |st| Ok(st.job_failed(id, now(), "server", &why)?))
                .await?;
            return Err(e);
        }
    };
    let m = manifest.clone();
    let vm = job.vm.clone();
    st.offload(move |st| record_point(st, id, &m, vm.as_deref(), &notes))
        .await?;
    crate::ilr::check_point(st.clone(), id, job.vm.clone(), manifest.clone()).await;
    st.offload(move |st| Ok(st.job_succeeded(id, now())?))
        .await?;
    Ok(json(&CommitResponse {
        recovery_point: manifest.id,
    }))
}

/// A committed backup in the catalog: the job's final figures, the recovery point,
/// the agent's notes in the job log, and the change-tracking alerts they raise or clear.
fn record_point(
    st: &AppState,
    id: i64,
    manifest: &datastore::Manifest,
    vm: Option<&str>,
    notes: &[Note],
) -> ApiResult<()> {
    let rp = crate::rp_info(manifest, Some(id));
    {
        let cat = st.cat();
        // Final figures from the recovery point itself (progress reports are periodic,
        // a short job may end before its first one).
        let total: u64 = manifest.disks.iter().map(|d| d.virtual_size).sum();
        let sent = cat.job(id).map(|j| j.bytes_sent).unwrap_or(0);
        cat.set_job_progress(
            id,
            &JobProgress {
                bytes_done: total,
                bytes_total: total,
                bytes_read: manifest.stats.bytes_read,
                bytes_sent: sent.max(manifest.stats.bytes_stored),
                message: None,
                step: None,
            },
        )?;
        cat.add_recovery_point(&rp)?;
        cat.set_job_recovery_point(id, &manifest.id)?;
        cat.job_log(
            now(),
            id,
            &format!(
                "recovery point {} ({} bytes read, {} stored)",
                manifest.id, manifest.stats.bytes_read, manifest.stats.bytes_stored
            ),
        )?;
        for n in notes.iter().take(64) {
            // Bounded: a note is a line of the job log, not a payload.
            let msg = protocol::cap_chars(&n.message, protocol::MAX_MESSAGE_CHARS);
            cat.job_log(now(), id, &msg)?;
            if n.kind == "change-tracking-reset"
                && let Some(vm) = vm
            {
                st.notify.raise_alert(
                    &cat,
                    now(),
                    Severity::Info,
                    vm,
                    "change-tracking-reset",
                    &msg,
                )?;
            }
        }
        // A backup that used change tracking clears the earlier reset.
        if manifest.stats.changed_bytes.is_some()
            && let Some(vm) = vm
        {
            st.notify
                .resolve_alerts(&cat, now(), vm, Some("change-tracking-reset"))?;
        }
    }
    Ok(())
}

pub(crate) async fn agent_fail(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    own_job(&st, &host, id).await?;
    let f: Failure = parse(&body)?;
    let kind: String = f
        .kind
        .chars()
        .filter(|c| c.is_ascii_lowercase() || *c == '-')
        .take(32)
        .collect();
    let kind = if kind.is_empty() {
        "backup-failed".into()
    } else {
        kind
    };
    // Bounded: the error also goes into the job's log and an alert.
    let error = protocol::cap_chars(&f.error, protocol::MAX_MESSAGE_CHARS).into_owned();
    st.offload(move |st| Ok(st.job_failed(id, now(), &kind, &error)?))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Parameters for an offline seed of one of the calling agent's VMs.
pub(crate) async fn agent_replica_params(
    State(st): St,
    AgentHost(host): AgentHost,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ReplicaParamsRequest = parse(&body)?;
    let start = st
        .offload(move |st| {
            let ds = st.cat().datasource_by_name(&host, &req.vm)?;
            let p = st.datastore.block_params();
            st.cat()
                .audit(now(), &format!("agent {host}"), "replica export", &ds.name)?;
            Ok(SessionStart {
                block_size: p.block_size,
                piece_blocks: p.piece_blocks,
                zstd_level: p.zstd_level,
                master_key: st.master_key.map(|k| hex(&k)),
                base: None,
                excluded: exclusions(st, &ds.id)?.disks,
                source: Source {
                    name: ds.name.to_string(),
                    id: ds.id,
                },
            })
        })
        .await?;
    Ok(json(&start))
}
