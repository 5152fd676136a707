//! The HTTPS API: one router for admins (bearer token), agents (client certificate) and
//! enrollment (one-time token). Authorization is decided here, per route, from who the
//! caller is; handlers never trust a host name sent in a body.

use crate::state::AppState;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use datastore::Id;
use protocol::*;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Who is on the other end of the connection: the fingerprint of the client
/// certificate it presented at the handshake (already checked against our CA).
#[derive(Clone, Debug)]
pub struct Peer {
    pub cert_fingerprint: Option<String>,
}

pub(crate) type St = State<Arc<AppState>>;

/// An error answer: status and a message for humans.
#[derive(Debug)]
pub struct ApiErr(pub StatusCode, pub String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ApiError { error: self.1 }).unwrap_or_default();
        (self.0, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

impl From<catalog::Error> for ApiErr {
    fn from(e: catalog::Error) -> Self {
        let code = match &e {
            catalog::Error::NotFound(_) | catalog::Error::Moved { .. } => StatusCode::NOT_FOUND,
            catalog::Error::Conflict(_) => StatusCode::CONFLICT,
            catalog::Error::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiErr(code, e.to_string())
    }
}

impl From<datastore::Error> for ApiErr {
    fn from(e: datastore::Error) -> Self {
        let code = match &e {
            datastore::Error::Rejected(_) | datastore::Error::Invalid(_) => StatusCode::BAD_REQUEST,
            datastore::Error::Missing { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiErr(code, e.to_string())
    }
}

pub(crate) fn bad(msg: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::BAD_REQUEST, msg.into())
}

fn forbidden(msg: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::FORBIDDEN, msg.into())
}

pub(crate) fn not_found(msg: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::NOT_FOUND, msg.into())
}

pub(crate) type ApiResult<T> = Result<T, ApiErr>;

pub(crate) fn json<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Parses a JSON body ourselves, so a malformed one is a 400 naming the problem.
pub(crate) fn parse<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| bad(format!("request body: {e}")))
}

fn now() -> i64 {
    utc::now()
}

/// Admin calls: the bearer token. A caller with an agent certificate gets 403 (agents
/// may never administer: delete recovery points, read other hosts' data...).
fn admin(st: &AppState, headers: &HeaderMap, peer: &Peer) -> ApiResult<()> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t) if pki::token_eq(t.trim(), &st.admin_token) => Ok(()),
        Some(_) => Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "the API token is wrong".into(),
        )),
        None if peer.cert_fingerprint.is_some() => Err(forbidden(
            "an agent certificate does not grant administrative access",
        )),
        None => Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "an API token is required (Authorization: Bearer; see --token-file)".into(),
        )),
    }
}

/// Agent calls: the client certificate, which must belong to an enrolled, unrevoked
/// agent. Returns the agent's host.
fn agent(st: &AppState, peer: &Peer) -> ApiResult<String> {
    let fp = peer.cert_fingerprint.as_deref().ok_or_else(|| {
        ApiErr(
            StatusCode::UNAUTHORIZED,
            "agent calls need the agent's client certificate".into(),
        )
    })?;
    let cat = st.cat();
    match cat.agent_by_fingerprint(fp)? {
        Some(a) if !a.revoked => {
            cat.touch_agent(now(), &a.host)?;
            Ok(a.host)
        }
        Some(a) => Err(forbidden(format!(
            "the certificate of agent {:?} was revoked",
            a.host
        ))),
        None => Err(forbidden("this client certificate belongs to no agent")),
    }
}

/// An admin caller (extractor): the bearer token checked by [`admin`].
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> ApiResult<Admin> {
        let peer = peer_of(parts);
        admin(st, &parts.headers, &peer).map(|_| Admin)
    }
}

/// An agent caller (extractor): its host, from its certificate, by [`agent`].
pub struct AgentHost(pub String);

impl FromRequestParts<Arc<AppState>> for AgentHost {
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> ApiResult<AgentHost> {
        agent(st, &peer_of(parts)).map(AgentHost)
    }
}

fn peer_of(parts: &Parts) -> Peer {
    parts.extensions.get::<Peer>().cloned().unwrap_or(Peer {
        cert_fingerprint: None,
    })
}

fn octets(out: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response()
}

pub fn router(st: Arc<AppState>) -> Router {
    let json_limit = st.config.limits.max_json_body;
    let blob_limit = st.config.limits.max_blob_batch;
    let bulk = Router::new()
        .route("/agent/jobs/{id}/missing", post(agent_missing))
        .route("/agent/jobs/{id}/blobs", post(agent_blobs))
        .layer(DefaultBodyLimit::max(blob_limit));
    let api = Router::new()
        .route("/status", get(status))
        .route("/ca", get(ca))
        .route("/enroll", post(enroll))
        .route("/agent-tokens", post(agent_token))
        .route("/agents", get(agents_list))
        .route("/agents/{host}/revoke", post(agent_revoke))
        .route("/datasources", get(datasources))
        .route("/datasources/{host}/{vm}/backup", post(backup_now))
        .route("/datasources/{host}/{vm}/move", post(datasource_move))
        .route("/clusters", get(clusters_list).post(cluster_create))
        .route("/clusters/{name}", get(cluster_show).delete(cluster_delete))
        .route("/clusters/{name}/hosts", post(cluster_add_hosts))
        .route(
            "/clusters/{name}/hosts/{host}",
            axum::routing::delete(cluster_remove_host),
        )
        .route(
            "/datasources/{host}/{vm}/exclusions",
            get(exclusions_get).put(exclusions_put),
        )
        .route(
            "/datasources/{host}/{vm}/consistency-check",
            post(consistency_check),
        )
        .route("/protection-groups", get(groups_list).post(group_create))
        .route(
            "/protection-groups/{name}",
            get(group_show).patch(group_modify).delete(group_delete),
        )
        .route("/recovery-points", get(recovery_points))
        .route("/recovery-points/{id}/browse", get(crate::ilr::browse))
        .route("/recovery-points/{id}/file", get(crate::ilr::file))
        .route(
            "/recovery-points/{id}/disks/{n}/data",
            get(crate::instant::data),
        )
        .route(
            "/recovery-points/{id}/disks/{n}/map",
            get(crate::instant::map),
        )
        .route("/recoveries", post(crate::recover::create))
        .route("/jobs", get(jobs_list).post(job_create))
        .route("/jobs/{id}", get(job_show))
        .route("/jobs/{id}/cancel", post(job_cancel))
        .route("/alerts", get(alerts_list))
        .route("/alerts/{id}/resolve", post(alert_resolve))
        .route("/audit", get(audit_list))
        .route("/agent/inventory", post(agent_inventory))
        .route("/agent/poll", post(agent_poll))
        .route("/agent/replica-params", post(agent_replica_params))
        .route("/agent/jobs/{id}/start", post(agent_start))
        .route("/agent/jobs/{id}/blob/{blob}", get(agent_blob))
        .route(
            "/agent/jobs/{id}/recovery-blob/{blob}",
            get(crate::recover::agent_blob),
        )
        .route(
            "/agent/jobs/{id}/recovery-blobs",
            post(crate::recover::agent_blobs),
        )
        .route(
            "/agent/jobs/{id}/recovered",
            post(crate::recover::agent_done),
        )
        .route("/agent/jobs/{id}/progress", post(agent_progress))
        .route("/agent/jobs/{id}/commit", post(agent_commit))
        .route("/agent/jobs/{id}/fail", post(agent_fail))
        .layer(DefaultBodyLimit::max(json_limit))
        .merge(bulk);
    Router::new()
        .nest(API, api)
        .fallback(|| async { not_found("no such API route") })
        .with_state(st)
}

// ------------------------------------------------------------------------------
// Status, CA, enrollment

async fn status(State(st): St, _admin: Admin) -> ApiResult<Response> {
    let c = st.cat().counts()?;
    Ok(json(&ServerStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        server_time: utc::rfc3339(now()),
        datastore: st.datastore.backend().location(),
        datastore_encrypted: st.master_key.is_some(),
        ca_fingerprint: st.pki.ca_fingerprint(),
        agents: c.agents,
        datasources: c.datasources,
        protection_groups: c.protection_groups,
        recovery_points: c.recovery_points,
        active_alerts: c.active_alerts,
        running_jobs: c.running_jobs,
        scheduler_tick_ms: st
            .last_tick
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|d| d.as_secs_f64() * 1000.0),
        notifications_sent: st.notify.counters.sent.load(Ordering::Relaxed),
        notifications_failed: st.notify.counters.failed.load(Ordering::Relaxed),
        notifications_dropped: st.notify.counters.dropped.load(Ordering::Relaxed),
    }))
}

async fn ca(State(st): St) -> Response {
    json(&serde_json::json!({
        "ca_pem": st.pki.ca_pem(),
        "ca_fingerprint": st.pki.ca_fingerprint(),
    }))
}

async fn agent_token(State(st): St, _admin: Admin, body: Bytes) -> ApiResult<Response> {
    let req: AgentTokenRequest = parse(&body)?;
    req.validate().map_err(bad)?;
    let host = req.host.as_str();
    let minutes = req.valid_minutes.unwrap_or(60);
    let (token, secret) = pki::make_token(&st.pki.ca_fingerprint())
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let expires = now() + minutes as i64 * 60;
    {
        let cat = st.cat();
        cat.add_enroll_token(now(), host, &pki::secret_hash(&secret), expires)?;
        cat.audit(now(), "admin", "agent-token create", host)?;
    }
    Ok(json(&AgentTokenResponse {
        token,
        host: host.to_string(),
        expires: utc::rfc3339(expires),
    }))
}

async fn enroll(State(st): St, body: Bytes) -> ApiResult<Response> {
    let req: EnrollRequest = parse(&body)?;
    let (fp, secret) = pki::parse_token(&req.token).map_err(|e| bad(e.to_string()))?;
    if fp != st.pki.ca_fingerprint() {
        return Err(forbidden("this enrollment token is for another server"));
    }
    req.validate().map_err(bad)?;
    let hash = pki::secret_hash(&secret);
    let refused = |e: catalog::Error| match e {
        catalog::Error::NotFound(_) | catalog::Error::Invalid(_) => {
            forbidden(format!("enrollment refused: {e}"))
        }
        e => e.into(),
    };
    // The whole request is checked (the token may be used, the key makes a
    // certificate) before the token is spent: a malformed key costs nothing.
    let host = st.cat().enroll_token_host(now(), &hash).map_err(refused)?;
    let cert = st
        .pki
        .issue_client_cert(&host, &req.public_key_pem)
        .map_err(|e| bad(format!("public_key_pem: {e}")))?;
    let der = pki::pem_cert_to_der(&cert)
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    {
        let cat = st.cat();
        // Token and agent in one transaction: a token raced away meanwhile enrolls
        // nothing.
        let got = cat
            .enroll_with_token(now(), &hash, &pki::cert_fingerprint(&der), &req.version)
            .map_err(refused)?;
        if got != host {
            return Err(ApiErr(
                StatusCode::INTERNAL_SERVER_ERROR,
                "enrollment token changed host".into(),
            ));
        }
        cat.audit(now(), &format!("agent {host}"), "enroll", &req.version)?;
    }
    Ok(json(&EnrollResponse {
        host,
        certificate_pem: cert,
        ca_pem: st.pki.ca_pem().to_string(),
    }))
}

// ------------------------------------------------------------------------------
// Agents, data sources

async fn agents_list(State(st): St, _admin: Admin) -> ApiResult<Response> {
    let rows = st.cat().agents()?;
    let polling = st.polling.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let window = Duration::from_secs(st.config.scheduler.poll_seconds + 15);
    let out: Vec<AgentInfo> = rows
        .into_iter()
        .map(|a| {
            let connected =
                !a.revoked && polling.get(&a.host).is_some_and(|t| t.elapsed() < window);
            a.into_info(connected)
        })
        .collect();
    Ok(json(&out))
}

async fn agent_revoke(
    State(st): St,
    _admin: Admin,
    Path(host): Path<String>,
) -> ApiResult<Response> {
    let cat = st.cat();
    cat.revoke_agent(now(), &host)?;
    cat.audit(now(), "admin", "agent revoke", &host)?;
    Ok(json(&serde_json::json!({ "host": host, "revoked": true })))
}

async fn datasources(State(st): St, _admin: Admin) -> ApiResult<Response> {
    Ok(json(&st.cat().datasources()?))
}

fn queue_for_vm(
    st: &AppState,
    host: &str,
    vm: &str,
    kind: JobKind,
    notify: &[String],
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
    let (id, new) = st.queue(now(), kind, Some(&ds.id), "admin")?;
    // Told before the job can end: the agent picks it up no sooner than its next poll.
    st.notify_job(id, notify)?;
    st.cat().audit(
        now(),
        "admin",
        kind.as_str(),
        &format!("{host}/{vm} job {id}"),
    )?;
    let job = st.cat().job(id)?;
    let mut r = json(&job);
    if new {
        *r.status_mut() = StatusCode::CREATED;
    }
    Ok(r)
}

async fn backup_now(
    State(st): St,
    _admin: Admin,
    Path((host, vm)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: BackupNowRequest = parse(&body)?;
    check_recipients(&st, &req.notify)?;
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
    queue_for_vm(&st, &host, &vm, kind, &req.notify)
}

/// Addresses a job's end may be e-mailed to.
pub(crate) fn check_recipients(st: &AppState, to: &[String]) -> ApiResult<()> {
    if to.is_empty() {
        return Ok(());
    }
    if !st.notify.can_email() {
        return Err(bad(
            "notify: the server has no [smtp] host configured, so it cannot send e-mail",
        ));
    }
    if to.len() > crate::notify::MAX_JOB_RECIPIENTS {
        return Err(bad(format!(
            "notify: at most {} addresses",
            crate::notify::MAX_JOB_RECIPIENTS
        )));
    }
    for a in to {
        if a.parse::<lettre::Address>().is_err() {
            return Err(bad(format!("notify: {a:?} is not an e-mail address")));
        }
    }
    Ok(())
}

async fn consistency_check(
    State(st): St,
    _admin: Admin,
    Path((host, vm)): Path<(String, String)>,
) -> ApiResult<Response> {
    queue_for_vm(&st, &host, &vm, JobKind::ConsistencyCheck, &[])
}

// ------------------------------------------------------------------------------
// Protection groups

fn group_info(st: &AppState, g: catalog::GroupRow) -> GroupInfo {
    let allocation = crate::allocation::review(st, g.data_size(), &g.policy);
    GroupInfo {
        members: g.member_names(),
        name: g.name,
        policy: g.policy,
        created: g.created,
        allocation,
    }
}

async fn groups_list(State(st): St, _admin: Admin) -> ApiResult<Response> {
    let rows = st.cat().groups()?;
    let out: Vec<GroupInfo> = rows.into_iter().map(|g| group_info(&st, g)).collect();
    Ok(json(&out))
}

async fn group_show(State(st): St, _admin: Admin, Path(name): Path<String>) -> ApiResult<Response> {
    let g = st.cat().group(&name)?;
    Ok(json(&group_info(&st, g)))
}

/// Refuses a group whose members cannot fit the datastore under its policy.
fn check_fits(st: &AppState, size: u64, policy: &Policy) -> ApiResult<AllocationReview> {
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

fn mark_schedules_now(st: &AppState, g: &catalog::GroupRow) -> ApiResult<()> {
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

async fn group_create(State(st): St, _admin: Admin, body: Bytes) -> ApiResult<Response> {
    let req: CreateGroup = parse(&body)?;
    req.validate().map_err(bad)?;
    let mut size = 0u64;
    for m in &req.members {
        if let Some((h, v)) = split_vm(m) {
            size = size.saturating_add(st.cat().datasource_by_name(h, v)?.size);
        }
    }
    check_fits(&st, size, &req.policy)?;
    let g = st
        .cat()
        .create_group(now(), &req.name, &req.policy, &req.members)?;
    mark_schedules_now(&st, &g)?;
    st.cat().audit(
        now(),
        "admin",
        "pg create",
        &format!("{} members {}", g.name, g.member_names().join(",")),
    )?;
    st.wake.notify_waiters();
    let mut r = json(&group_info(&st, g));
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

async fn group_modify(
    State(st): St,
    _admin: Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ModifyGroup = parse(&body)?;
    req.validate().map_err(bad)?;
    let before = st.cat().group(&name)?;
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
    mark_schedules_now(&st, &g)?;
    st.cat().audit(now(), "admin", "pg modify", &name)?;
    Ok(json(&group_info(&st, g)))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    delete_data: bool,
}

async fn group_delete(
    State(st): St,
    _admin: Admin,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Response> {
    let g = st.cat().delete_group(&name)?;
    let mut deleted = 0u64;
    for m in &g.members {
        if q.delete_data {
            let points = st.cat().recovery_points(Some(&m.datasource_id))?;
            for p in points {
                let ds = st.datastore.clone();
                let id = p.id.clone();
                tokio::task::spawn_blocking(move || ds.forget(&id))
                    .await
                    .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
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
        "admin",
        "pg delete",
        &format!("{name} delete_data={} points={deleted}", q.delete_data),
    )?;
    Ok(json(&DeleteGroupResponse {
        name,
        recovery_points_deleted: deleted,
    }))
}

// ------------------------------------------------------------------------------
// Recovery points, jobs, alerts

#[derive(Deserialize)]
struct RpQuery {
    vm: Option<String>,
}

async fn recovery_points(
    State(st): St,
    _admin: Admin,
    Query(q): Query<RpQuery>,
) -> ApiResult<Response> {
    let cat = st.cat();
    let ds = match &q.vm {
        Some(vm) => {
            let (h, v) = split_vm(vm).ok_or_else(|| bad(format!("vm {vm:?} is not HOST/VM")))?;
            Some(cat.datasource_by_name(h, v)?.id)
        }
        None => None,
    };
    Ok(json(&cat.recovery_points(ds.as_deref())?))
}

#[derive(Deserialize)]
struct JobsQuery {
    state: Option<String>,
    kind: Option<String>,
    vm: Option<String>,
    limit: Option<u32>,
}

async fn jobs_list(
    State(st): St,
    _admin: Admin,
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
    Ok(json(
        &st.cat()
            .jobs_where(&f, q.limit.unwrap_or(200).min(10_000))?,
    ))
}

#[derive(Deserialize)]
struct NewServerJob {
    kind: String,
}

/// Server-side jobs on demand (verify, prune, gc).
async fn job_create(State(st): St, _admin: Admin, body: Bytes) -> ApiResult<Response> {
    let req: NewServerJob = parse(&body)?;
    let kind = JobKind::parse(&req.kind)
        .filter(|k| !k.on_agent())
        .ok_or_else(|| {
            bad(format!(
                "kind {:?}: verify, prune or gc (backups start with backup-now)",
                req.kind
            ))
        })?;
    let (id, _) = st.queue(now(), kind, None, "admin")?;
    let mut r = json(&st.cat().job(id)?);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

#[derive(Deserialize)]
struct JobQuery {
    /// Long poll: answer as soon as the job ends, or after this many seconds (≤ 60).
    wait_seconds: Option<u64>,
}

async fn job_show(
    State(st): St,
    _admin: Admin,
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
        let job = st.cat().job(id)?;
        if job.state.finished() || tokio::time::Instant::now() >= deadline {
            return Ok(json(&job));
        }
        let _ = tokio::time::timeout_at(deadline, ended).await;
    }
}

async fn job_cancel(State(st): St, _admin: Admin, Path(id): Path<i64>) -> ApiResult<Response> {
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
        .audit(now(), "admin", "job cancel", &id.to_string())?;
    Ok(json(&st.cat().job(id)?))
}

#[derive(Deserialize)]
struct AlertsQuery {
    #[serde(default)]
    all: bool,
}

async fn alerts_list(
    State(st): St,
    _admin: Admin,
    Query(q): Query<AlertsQuery>,
) -> ApiResult<Response> {
    Ok(json(&st.cat().alerts(q.all)?))
}

async fn alert_resolve(
    State(st): St,
    _admin: Admin,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ResolveAlert = parse(&body)?;
    req.validate().map_err(bad)?;
    let note = req.note.as_deref().map(str::trim).filter(|n| !n.is_empty());
    let cat = st.cat();
    let a = st.notify.resolve_alert(&cat, now(), id, note)?;
    cat.audit(
        now(),
        "admin",
        "alert resolve",
        &format!(
            "{id} {} {}{}",
            a.subject,
            a.kind,
            note.map(|n| format!(": {n}")).unwrap_or_default()
        ),
    )?;
    Ok(json(&a))
}

async fn audit_list(State(st): St, _admin: Admin) -> ApiResult<Response> {
    Ok(json(&st.cat().audit_log(500)?))
}

// ------------------------------------------------------------------------------
// Agent side

async fn agent_inventory(
    State(st): St,
    AgentHost(host): AgentHost,
    body: Bytes,
) -> ApiResult<Response> {
    let mut inv: Inventory = parse(&body)?;
    // A VM whose name breaks the name grammar is left out (with an alert), not the
    // whole report: the host's other VMs stay protected.
    let refused = inv.take_invalid();
    let t = now();
    let cat = st.cat();
    let out = cat.upsert_inventory(t, &host, &inv.vms)?;
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
            c.claimant.split('/').next().unwrap_or(&host),
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
        moved(&st, &cat, t, &format!("agent {host}"), m)?;
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
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// After a data source's `HOST/VM` changed: audited, and the alerts of the old name
/// (nothing would ever clear them: the name is gone) resolved with a note.
fn moved(
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
async fn datasource_move(
    State(st): St,
    _admin: Admin,
    Path((host, vm)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: MoveDataSource = parse(&body)?;
    check_host_name("to", &req.to).map_err(bad)?;
    let t = now();
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
    moved(&st, &cat, t, "admin", &m)?;
    Ok(json(&cat.datasource(&m.datasource_id)?))
}

// ------------------------------------------------------------------------------
// Clusters

async fn clusters_list(State(st): St, _admin: Admin) -> ApiResult<Response> {
    Ok(json(&st.cat().clusters()?))
}

async fn cluster_show(
    State(st): St,
    _admin: Admin,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    Ok(json(&st.cat().cluster(&name)?))
}

async fn cluster_create(State(st): St, _admin: Admin, body: Bytes) -> ApiResult<Response> {
    let req: CreateCluster = parse(&body)?;
    let cat = st.cat();
    let k = cat.create_cluster(now(), &req.name, &req.hosts)?;
    cat.audit(
        now(),
        "admin",
        "cluster create",
        &format!("{} hosts {}", k.name, k.hosts.join(",")),
    )?;
    let mut r = json(&k);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

async fn cluster_add_hosts(
    State(st): St,
    _admin: Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ClusterHosts = parse(&body)?;
    let cat = st.cat();
    let k = cat.add_cluster_hosts(&name, &req.hosts)?;
    cat.audit(
        now(),
        "admin",
        "cluster add-host",
        &format!("{name} {}", req.hosts.join(",")),
    )?;
    Ok(json(&k))
}

async fn cluster_remove_host(
    State(st): St,
    _admin: Admin,
    Path((name, host)): Path<(String, String)>,
) -> ApiResult<Response> {
    let cat = st.cat();
    let k = cat.remove_cluster_host(&name, &host)?;
    cat.audit(
        now(),
        "admin",
        "cluster remove-host",
        &format!("{name} {host}"),
    )?;
    Ok(json(&k))
}

async fn cluster_delete(
    State(st): St,
    _admin: Admin,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let cat = st.cat();
    let k = cat.cluster(&name)?;
    cat.delete_cluster(&name)?;
    cat.audit(now(), "admin", "cluster delete", &name)?;
    Ok(json(&k))
}

/// Hands the agent its next runnable job, waiting up to `poll_seconds` for one.
async fn agent_poll(State(st): St, AgentHost(host): AgentHost) -> ApiResult<Response> {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(st.config.scheduler.poll_seconds);
    loop {
        st.polling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.clone(), std::time::Instant::now());
        let notified = st.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(job) = crate::scheduler::dispatch(&st, &host)? {
            return Ok(json(&PollResponse { job: Some(job) }));
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(json(&PollResponse { job: None }));
        }
    }
}

/// The job must be this agent's and running.
pub(crate) fn own_job(st: &AppState, host: &str, id: i64) -> ApiResult<JobInfo> {
    let job = st.cat().job(id)?;
    let ds = job
        .datasource_id
        .as_deref()
        .ok_or_else(|| forbidden(format!("job {id} is not an agent's job")))?;
    let ds = st.cat().datasource(ds)?;
    // A recovery runs on its target host, which may be another than the VM's.
    let job_host = if job.kind == JobKind::Recovery {
        crate::recover::stored(&st.cat(), id)?.host
    } else {
        ds.host
    };
    if job_host != host {
        return Err(forbidden(format!(
            "job {id} belongs to another host's data source"
        )));
    }
    if job.state != JobState::Running {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            format!("job {id} is {}, not running", job.state.as_str()),
        ));
    }
    st.beat(id);
    Ok(job)
}

fn session(st: &AppState, id: i64) -> ApiResult<Arc<datastore::Ingest>> {
    st.sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .cloned()
        .ok_or_else(|| {
            not_found(format!(
                "job {id} has no open backup session (the server restarted or the job ended)"
            ))
        })
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiErr> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, format!("worker: {e}")))?
}

async fn agent_start(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
) -> ApiResult<Response> {
    let job = own_job(&st, &host, id)?;
    if !job.kind.is_backup() {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            format!("job {id} is a {} job, not a backup", job.kind.as_str()),
        ));
    }
    let ds_id = job.datasource_id.clone().unwrap_or_default();
    let ds = st.cat().datasource(&ds_id)?;
    let source = Source {
        name: ds.name.clone(),
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
    st.sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, Arc::new(ingest));
    st.cat().job_log(
        now(),
        id,
        &format!(
            "started on {host}{}",
            base.as_ref()
                .map(|b| format!(", based on recovery point {}", b.id))
                .unwrap_or_default()
        ),
    )?;
    Ok(json(&SessionStart {
        block_size: params.block_size,
        piece_blocks: params.piece_blocks,
        zstd_level: params.zstd_level,
        master_key: st.master_key.map(|k| hex(&k)),
        base: base.map(Into::into),
        excluded: exclusions(&st, &ds.id)?.disks,
        source: Source {
            name: ds.name,
            id: ds.id,
        },
    }))
}

fn exclusions(st: &AppState, ds_id: &str) -> ApiResult<Exclusions> {
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

async fn exclusions_get(
    State(st): St,
    _admin: Admin,
    Path((host, vm)): Path<(String, String)>,
) -> ApiResult<Response> {
    let ds = st.cat().datasource_by_name(&host, &vm)?;
    Ok(json(&exclusions(&st, &ds.id)?))
}

async fn exclusions_put(
    State(st): St,
    _admin: Admin,
    Path((host, vm)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let ex: Exclusions = parse(&body)?;
    ex.validate(&[]).map_err(bad)?;
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
        .audit(now(), "admin", "exclusions", &format!("{host}/{vm}"))?;
    Ok(json(&ex))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn agent_missing(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    own_job(&st, &host, id)?;
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

async fn agent_blobs(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    own_job(&st, &host, id)?;
    let s = session(&st, id)?;
    let res = blocking(move || Ok(s.put(&body)?)).await;
    if let Err(e) = &res {
        // A rejected batch ends the session (the datastore refuses further use).
        st.cat()
            .job_log(now(), id, &format!("blob batch refused: {}", e.1))?;
    }
    res?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn agent_blob(
    State(st): St,
    AgentHost(host): AgentHost,
    Path((id, blob)): Path<(i64, String)>,
) -> ApiResult<Response> {
    own_job(&st, &host, id)?;
    let bid =
        Id::from_hex(&blob).ok_or_else(|| bad(format!("blob id {blob:?} is not 64 hex digits")))?;
    let s = session(&st, id)?;
    let out = blocking(move || Ok(s.framed_blob(bid)?)).await?;
    Ok(octets(out))
}

async fn agent_progress(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    own_job(&st, &host, id)?;
    let p: Progress = parse(&body)?;
    st.progressed(id, &p);
    let cat = st.cat();
    cat.set_job_progress(id, &p)?;
    if let Some(m) = &p.message {
        cat.job_log(now(), id, m)?;
    }
    let cancel = cat.setting(&format!("cancel:{id}"))?.is_some();
    Ok(json(&ProgressReply { cancel }))
}

async fn agent_commit(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let job = own_job(&st, &host, id)?;
    let mut c: Commit = parse(&body)?;
    let notes = std::mem::take(&mut c.notes);
    // A cancel that arrived after the agent's last progress report still wins: no
    // recovery point from a cancelled job.
    if st.cat().setting(&format!("cancel:{id}"))?.is_some() {
        st.job_failed(id, now(), "cancelled", "cancelled by an administrator")?;
        return Err(ApiErr(
            StatusCode::CONFLICT,
            format!("job {id} was cancelled"),
        ));
    }
    let s = st
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
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
            st.job_failed(id, now(), "server", &format!("commit refused: {}", e.1))?;
            return Err(e);
        }
    };
    let rp = crate::rp_info(&manifest, Some(id));
    {
        let cat = st.cat();
        // Final figures from the recovery point itself (progress reports are periodic,
        // a short job may end before its first one).
        let total: u64 = manifest.disks.iter().map(|d| d.virtual_size).sum();
        let sent = cat.job(id).map(|j| j.bytes_sent).unwrap_or(0);
        cat.set_job_progress(
            id,
            &Progress {
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
                && let Some(vm) = &job.vm
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
            && let Some(vm) = &job.vm
        {
            st.notify
                .resolve_alerts(&cat, now(), vm, Some("change-tracking-reset"))?;
        }
    }
    crate::ilr::check_point(st.clone(), id, job.vm.clone(), manifest.clone()).await;
    st.job_succeeded(id, now())?;
    Ok(json(&CommitResponse {
        recovery_point: manifest.id,
    }))
}

async fn agent_fail(
    State(st): St,
    AgentHost(host): AgentHost,
    Path(id): Path<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    own_job(&st, &host, id)?;
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
    let error = protocol::cap_chars(&f.error, protocol::MAX_MESSAGE_CHARS);
    st.job_failed(id, now(), &kind, &error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Parameters for an offline seed of one of the calling agent's VMs.
async fn agent_replica_params(
    State(st): St,
    AgentHost(host): AgentHost,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ReplicaParamsRequest = parse(&body)?;
    let ds = st.cat().datasource_by_name(&host, &req.vm)?;
    let p = st.datastore.block_params();
    st.cat()
        .audit(now(), &format!("agent {host}"), "replica export", &ds.name)?;
    Ok(json(&SessionStart {
        block_size: p.block_size,
        piece_blocks: p.piece_blocks,
        zstd_level: p.zstd_level,
        master_key: st.master_key.map(|k| hex(&k)),
        base: None,
        excluded: exclusions(&st, &ds.id)?.disks,
        source: Source {
            name: ds.name,
            id: ds.id,
        },
    }))
}
