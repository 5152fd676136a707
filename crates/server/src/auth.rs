//! Who is calling: admins (the bearer token) and agents (their client certificate,
//! checked against the catalog). Authorization is decided per route from these
//! extractors; handlers never trust a host name sent in a body.

use crate::http::{ApiErr, ApiResult, forbidden, now};
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use protocol::{JobInfo, JobKind, JobState};
use std::sync::Arc;

/// Who is on the other end of the connection: the fingerprint of the client
/// certificate it presented at the handshake (already checked against our CA).
#[derive(Clone, Debug)]
pub struct Peer {
    pub cert_fingerprint: Option<String>,
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
        let peer = peer_of(parts);
        st.offload(move |st| agent(st, &peer)).await.map(AgentHost)
    }
}

fn peer_of(parts: &Parts) -> Peer {
    parts.extensions.get::<Peer>().cloned().unwrap_or(Peer {
        cert_fingerprint: None,
    })
}

/// The job must be this agent's and running (the catalog read on a blocking thread).
pub(crate) async fn own_job(st: &Arc<AppState>, host: &str, id: i64) -> ApiResult<JobInfo> {
    let host = host.to_string();
    st.offload(move |st| own_job_sync(st, &host, id)).await
}

/// [`own_job`], on a blocking thread already.
pub(crate) fn own_job_sync(st: &AppState, host: &str, id: i64) -> ApiResult<JobInfo> {
    let job = st.cat().job(id)?;
    let ds = job
        .datasource_id
        .as_deref()
        .ok_or_else(|| forbidden(format!("job {id} is not an agent's job")))?;
    let ds = st.cat().datasource(ds)?;
    // A recovery runs on its target host, which may be another than the VM's.
    let job_host = if job.kind == JobKind::Recovery {
        crate::recovery_plan::stored(&st.cat(), id)?.host
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
