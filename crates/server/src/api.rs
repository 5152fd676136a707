//! The HTTPS API's router: users and scripts (the admin token, API tokens, session
//! cookies; each with a role), agents (client certificate) and enrollment (one-time
//! token). The handlers live in the modules below and in `ilr`, `instant` and
//! `recover`; who may call what is decided by their extractors (`crate::auth`: `Admin`,
//! `Operate`, `Restore`, `Read`, `AgentHost`), and crates/holdfast/tests/roles.rs checks
//! every route against its table.

mod agent;
mod clusters;
mod datasources;
mod enroll;
mod groups;
mod jobs;
mod storage;
mod users;

use crate::http::{ApiErr, not_found};
use crate::state::AppState;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use protocol::API;
use std::sync::Arc;

pub fn router(st: Arc<AppState>) -> Router {
    let json_limit = st.config.limits.max_json_body;
    let blob_limit = st.config.limits.max_blob_batch;
    let bulk = Router::new()
        .route("/agent/jobs/{id}/missing", post(agent::agent_missing))
        .route("/agent/jobs/{id}/blobs", post(agent::agent_blobs))
        .layer(DefaultBodyLimit::max(blob_limit));
    let api = Router::new()
        .route("/status", get(enroll::status))
        .route("/ca", get(enroll::ca))
        .route("/enroll", post(enroll::enroll))
        .route("/agent-tokens", post(enroll::agent_token))
        .route("/agents", get(enroll::agents_list))
        .route("/agents/{host}/revoke", post(enroll::agent_revoke))
        .route("/datasources", get(datasources::datasources))
        .route(
            "/datasources/{host}/{vm}/backup",
            post(datasources::backup_now),
        )
        .route(
            "/datasources/{host}/{vm}/move",
            post(datasources::datasource_move),
        )
        .route(
            "/clusters",
            get(clusters::clusters_list).post(clusters::cluster_create),
        )
        .route(
            "/clusters/{name}",
            get(clusters::cluster_show).delete(clusters::cluster_delete),
        )
        .route("/clusters/{name}/hosts", post(clusters::cluster_add_hosts))
        .route(
            "/storage",
            get(storage::storage_list).post(storage::storage_add),
        )
        .route(
            "/storage/{name}",
            get(storage::storage_show).delete(storage::storage_remove),
        )
        .route("/storage/{name}/test", post(storage::storage_test))
        .route("/storage/{name}/key", get(storage::storage_key))
        .route("/storage/{name}/attach", post(storage::storage_attach))
        .route("/storage/{name}/verify", post(storage::storage_verify))
        .route(
            "/clusters/{name}/hosts/{host}",
            axum::routing::delete(clusters::cluster_remove_host),
        )
        .route(
            "/datasources/{host}/{vm}/exclusions",
            get(datasources::exclusions_get).put(datasources::exclusions_put),
        )
        .route(
            "/datasources/{host}/{vm}/consistency-check",
            post(datasources::consistency_check),
        )
        .route(
            "/protection-groups",
            get(groups::groups_list).post(groups::group_create),
        )
        .route(
            "/protection-groups/{name}",
            get(groups::group_show)
                .patch(groups::group_modify)
                .delete(groups::group_delete),
        )
        .route(
            "/protection-groups/{name}/online-copy",
            post(groups::group_online_copy),
        )
        .route("/recovery-points", get(jobs::recovery_points))
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
        .route("/jobs", get(jobs::jobs_list).post(jobs::job_create))
        .route("/jobs/{id}", get(jobs::job_show))
        .route("/jobs/{id}/cancel", post(jobs::job_cancel))
        .route("/alerts", get(jobs::alerts_list))
        .route("/alerts/{id}/resolve", post(jobs::alert_resolve))
        .route("/audit", get(jobs::audit_list))
        .route(
            "/session",
            get(users::session_show)
                .post(users::session_create)
                .delete(users::session_delete),
        )
        .route("/users", get(users::users_list).post(users::user_create))
        .route("/users/{name}", patch(users::user_modify))
        .route("/users/{name}/password", post(users::user_password))
        .route("/tokens", get(users::tokens_list).post(users::token_create))
        .route("/tokens/{id}", delete(users::token_delete))
        .route("/agent/inventory", post(agent::agent_inventory))
        .route("/agent/replica-params", post(agent::agent_replica_params))
        .route("/agent/jobs/{id}/start", post(agent::agent_start))
        .route("/agent/jobs/{id}/blob/{blob}", get(agent::agent_blob))
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
        .route("/agent/jobs/{id}/progress", post(agent::agent_progress))
        .route("/agent/jobs/{id}/commit", post(agent::agent_commit))
        .route("/agent/jobs/{id}/fail", post(agent::agent_fail))
        .layer(DefaultBodyLimit::max(json_limit))
        .merge(bulk);
    // The long poll stays cancellable: an agent that goes away while it waits must not
    // be handed a job it will never run.
    let poll = Router::new()
        .route("/agent/poll", post(agent::agent_poll))
        .layer(DefaultBodyLimit::max(json_limit));
    Router::new()
        .nest(
            API,
            api.layer(axum::middleware::from_fn(run_to_completion))
                .merge(poll),
        )
        .fallback(|| async { not_found("no such API route") })
        .with_state(st)
}

/// Runs each request's handler as its own task. Hyper drops a request's future when its
/// client goes away, and handlers await the catalog between steps (a job's failure, then
/// its alert and notification): a disconnect must not stop a handler halfway. The task
/// runs on after the client is gone; every wait inside it has its own deadline. Not for
/// the agents' long poll (see `router`).
async fn run_to_completion(req: Request, next: Next) -> Response {
    match tokio::spawn(next.run(req)).await {
        Ok(response) => response,
        Err(e) => ApiErr(StatusCode::INTERNAL_SERVER_ERROR, format!("worker: {e}")).into_response(),
    }
}
