//! Status, the CA, enrollment of agents (one-time tokens) and the agents list.

use crate::auth::{Admin, Read};
use crate::http::{ApiErr, ApiResult, St, bad, forbidden, json, now, parse};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use protocol::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(crate) async fn status(State(st): St, _: Read) -> ApiResult<Response> {
    let c = st.catalog(|c| c.counts()).await?;
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
        scheduler_tick_ms: locks::lock(&st.last_tick).map(|d| d.as_secs_f64() * 1000.0),
        notifications_sent: st.notify.counters.sent.load(Ordering::Relaxed),
        notifications_failed: st.notify.counters.failed.load(Ordering::Relaxed),
        notifications_dropped: st.notify.counters.dropped.load(Ordering::Relaxed),
    }))
}

pub(crate) async fn ca(State(st): St) -> Response {
    json(&serde_json::json!({
        "ca_pem": st.pki.ca_pem(),
        "ca_fingerprint": st.pki.ca_fingerprint(),
    }))
}

pub(crate) async fn agent_token(
    State(st): St,
    Admin(caller): Admin,
    body: Bytes,
) -> ApiResult<Response> {
    let req: AgentTokenRequest = parse(&body)?;
    req.validate().map_err(bad)?;
    let host = req.host.as_str();
    let minutes = req.valid_minutes.unwrap_or(60);
    let (token, secret) = pki::make_token(&st.pki.ca_fingerprint())
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let expires = now() + minutes as i64 * 60;
    let hash = pki::secret_hash(&secret);
    let h = host.to_string();
    st.catalog(move |cat| {
        cat.add_enroll_token(now(), &h, &hash, expires)?;
        cat.audit(now(), &caller.name, "agent-token create", &h)
    })
    .await?;
    Ok(json(&AgentTokenResponse {
        token,
        host: host.to_string(),
        expires: utc::rfc3339(expires),
    }))
}

/// A catalog refusal of an enrollment token: 403, naming why.
fn refused(e: catalog::Error) -> ApiErr {
    match e {
        catalog::Error::NotFound(_) | catalog::Error::Invalid(_) => {
            forbidden(format!("enrollment refused: {e}"))
        }
        e => e.into(),
    }
}

pub(crate) async fn enroll(State(st): St, body: Bytes) -> ApiResult<Response> {
    let req: EnrollRequest = parse(&body)?;
    let (fp, secret) = pki::parse_token(&req.token).map_err(|e| bad(e.to_string()))?;
    if fp != st.pki.ca_fingerprint() {
        return Err(forbidden("this enrollment token is for another server"));
    }
    req.validate().map_err(bad)?;
    let hash = pki::secret_hash(&secret);
    // The whole request is checked (the token may be used, the key makes a
    // certificate) before the token is spent: a malformed key costs nothing.
    let host = st
        .catalog({
            let hash = hash.clone();
            move |c| c.enroll_token_host(now(), &hash).map_err(refused)
        })
        .await?;
    let cert = st
        .pki
        .issue_client_cert(&host, &req.public_key_pem)
        .map_err(|e| bad(format!("public_key_pem: {e}")))?;
    let der = pki::pem_cert_to_der(&cert)
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let h = host.clone();
    st.catalog(move |cat| {
        // Token and agent in one transaction: a token raced away meanwhile enrolls
        // nothing.
        let got = cat
            .enroll_with_token(now(), &hash, &pki::cert_fingerprint(&der), &req.version)
            .map_err(refused)?;
        if got != h {
            return Err(ApiErr(
                StatusCode::INTERNAL_SERVER_ERROR,
                "enrollment token changed host".into(),
            ));
        }
        cat.audit(now(), &format!("agent {h}"), "enroll", &req.version)?;
        Ok(())
    })
    .await?;
    Ok(json(&EnrollResponse {
        host,
        certificate_pem: cert,
        ca_pem: st.pki.ca_pem().to_string(),
    }))
}

pub(crate) async fn agents_list(State(st): St, _: Read) -> ApiResult<Response> {
    let rows = st.catalog(|c| c.agents()).await?;
    let polling = locks::lock(&st.polling).clone();
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

pub(crate) async fn agent_revoke(
    State(st): St,
    Admin(caller): Admin,
    Path(host): Path<String>,
) -> ApiResult<Response> {
    let h = host.clone();
    st.catalog(move |cat| {
        cat.revoke_agent(now(), &h)?;
        cat.audit(now(), &caller.name, "agent revoke", &h)
    })
    .await?;
    Ok(json(&serde_json::json!({ "host": host, "revoked": true })))
}
