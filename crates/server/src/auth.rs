//! Who is calling: the admin token, API tokens and signed-in users (each with a role),
//! and agents (their client certificate, checked against the catalog). Authorization is
//! decided per route by its extractor (`Admin`, `Operate`, `Restore`, `Read`,
//! `AgentHost`); handlers never trust a name sent in a body.

use crate::http::{ApiErr, ApiResult, forbidden, now};
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use protocol::{JobInfo, JobKind, JobState, Role};
use std::sync::Arc;

/// Who is on the other end of the connection: the fingerprint of the client
/// certificate it presented at the handshake (already checked against our CA).
#[derive(Clone, Debug)]
pub struct Peer {
    pub cert_fingerprint: Option<String>,
}

/// The session cookie's name.
pub(crate) const SESSION_COOKIE: &str = "holdfast_session";
/// The header a session caller repeats its CSRF token in, on every call that is not a
/// GET or HEAD (a cross-site form cannot set it).
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";
/// A session lasts at most 12 hours, and ends after 1 hour without a call. Constants,
/// not configuration: nothing has needed another value yet.
pub(crate) const SESSION_LIFETIME: i64 = 12 * 3600;
pub(crate) const SESSION_IDLE: i64 = 3600;
/// `last_seen` is written at most once a minute, so reads do not each write the catalog.
const TOUCH_EVERY: i64 = 60;

/// Who is calling, once authenticated: a name for the audit log and a role.
#[derive(Clone, Debug)]
pub struct Caller {
    /// A user's name, `admin` for the admin token, `token NAME` for an API token.
    pub name: String,
    pub role: Role,
    /// Set when the caller came with a session cookie: the hash of the session id.
    pub session: Option<String>,
    /// The session's CSRF token, likewise.
    pub csrf: Option<String>,
}

fn unauthorized(msg: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::UNAUTHORIZED, msg.into())
}

/// The bearer token of the request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The value of cookie `name` in the request's Cookie headers, if any.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Any caller but an agent: the admin token, an API token (`hft_...`) or a session
/// cookie (with its CSRF header on changes). A bearer token wins over a cookie. A caller
/// with only an agent certificate gets 403 (agents may never administer).
fn caller(st: &AppState, method: &Method, headers: &HeaderMap, peer: &Peer) -> ApiResult<Caller> {
    let now = now();
    if let Some(t) = bearer(headers) {
        if t.starts_with(pki::API_TOKEN_PREFIX) {
            return api_token(st, now, t);
        }
        if pki::token_eq(t, &st.admin_token) {
            return Ok(Caller {
                name: "admin".into(),
                role: Role::Admin,
                session: None,
                csrf: None,
            });
        }
        return Err(unauthorized("the API token is wrong"));
    }
    if let Some(id) = cookie(headers, SESSION_COOKIE) {
        return session(st, now, method, headers, id);
    }
    if peer.cert_fingerprint.is_some() {
        return Err(forbidden(
            "an agent certificate does not grant administrative access",
        ));
    }
    Err(unauthorized(
        "sign in (POST /api/v1/session) or send an API token (Authorization: Bearer; see --token-file)",
    ))
}

fn api_token(st: &AppState, now: i64, t: &str) -> ApiResult<Caller> {
    let found = st.cat().api_token_by_hash(&pki::secret_hash(t))?;
    let Some(tok) = found else {
        return Err(unauthorized("the API token is wrong or was revoked"));
    };
    if tok.expires.is_some_and(|e| e <= now) {
        return Err(unauthorized(format!(
            "API token {:?} expired at {}",
            tok.info.name,
            tok.info.expires.unwrap_or_default()
        )));
    }
    if tok.creator_disabled {
        return Err(unauthorized(format!(
            "API token {:?}: its creator {:?} is disabled",
            tok.info.name, tok.info.created_by
        )));
    }
    Ok(Caller {
        name: format!("token {}", tok.info.name),
        role: tok.info.role,
        session: None,
        csrf: None,
    })
}

fn session(
    st: &AppState,
    now: i64,
    method: &Method,
    headers: &HeaderMap,
    id: &str,
) -> ApiResult<Caller> {
    let id_hash = pki::secret_hash(id);
    let cat = st.cat();
    let Some(s) = cat.session(&id_hash)? else {
        return Err(unauthorized("the session ended; sign in again"));
    };
    let idle_end = s.last_seen.saturating_add(SESSION_IDLE);
    if s.expires <= now || idle_end <= now {
        cat.delete_session(&id_hash)?;
        return Err(unauthorized("the session expired; sign in again"));
    }
    if s.disabled {
        return Err(unauthorized(format!("user {:?} is disabled", s.user)));
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        let sent = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !pki::token_eq(sent, &s.csrf) {
            return Err(forbidden("CSRF token missing or wrong"));
        }
    }
    if now.saturating_sub(s.last_seen) >= TOUCH_EVERY {
        cat.touch_session(now, &id_hash)?;
    }
    Ok(Caller {
        name: s.user,
        role: s.role,
        session: Some(id_hash),
        csrf: Some(s.csrf),
    })
}

/// Authenticates on a blocking thread (the catalog) unless the admin token settles it.
async fn authenticate(parts: &Parts, st: &Arc<AppState>) -> ApiResult<Caller> {
    // The admin token needs no catalog: the CLI's calls stay off the blocking pool.
    if bearer(&parts.headers).is_some_and(|t| pki::token_eq(t, &st.admin_token)) {
        return Ok(Caller {
            name: "admin".into(),
            role: Role::Admin,
            session: None,
            csrf: None,
        });
    }
    let peer = peer_of(parts);
    let method = parts.method.clone();
    let headers = parts.headers.clone();
    st.offload(move |st| caller(st, &method, &headers, &peer))
        .await
}

/// Extractors by the least role a route needs; each holds the [`Caller`]. Roles are
/// ordered (`auditor` < `restore` < `operator` < `admin`), so a route's extractor is
/// its whole rule.
macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        pub struct $name(pub Caller);

        impl FromRequestParts<Arc<AppState>> for $name {
            type Rejection = ApiErr;

            async fn from_request_parts(parts: &mut Parts, st: &Arc<AppState>) -> ApiResult<$name> {
                let c = authenticate(parts, st).await?;
                if c.role < $role {
                    return Err(forbidden(format!(
                        "{} (role {}) may not do this: it needs role {} or higher",
                        c.name, c.role, $role
                    )));
                }
                Ok($name(c))
            }
        }
    };
}

role_extractor!(
    /// Everything: users, tokens, storage targets and their keys, agents, clusters,
    /// deleting recovery points.
    Admin,
    Role::Admin
);
role_extractor!(
    /// Protection groups, backups, jobs, alerts, consistency checks.
    Operate,
    Role::Operator
);
role_extractor!(
    /// Reading file contents and disk data of recovery points, recovering.
    Restore,
    Role::Restore
);
role_extractor!(
    /// Reading anything that is not a secret.
    Read,
    Role::Auditor
);

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
