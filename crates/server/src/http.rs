//! What every handler shares: the error answer and its status mapping, JSON and
//! octet-stream answers, body parsing, and running blocking work off the runtime.
//! Handlers import from here; nothing here imports a handler.

use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use protocol::ApiError;
use serde::de::DeserializeOwned;
use std::sync::Arc;

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

pub(crate) fn forbidden(msg: impl Into<String>) -> ApiErr {
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

pub(crate) fn octets(out: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response()
}

pub(crate) fn now() -> i64 {
    utc::now()
}

/// Runs `f` on tokio's blocking threads (datastore reads, decompression).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiErr> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, format!("worker: {e}")))?
}

/// How handlers reach the catalog. SQLite calls run under the catalog's std mutex, so a
/// handler that made them on a runtime thread would hold that thread while it waits for
/// the lock and the disk; these run them on the blocking threads instead. Everything
/// that locks the catalog (`cat()`, and the job bookkeeping of [`AppState`]) goes
/// through them.
impl AppState {
    /// Runs `f` with the catalog, locked for its duration, on a blocking thread.
    pub(crate) async fn catalog<T, E>(
        self: &Arc<Self>,
        f: impl FnOnce(&catalog::Catalog) -> Result<T, E> + Send + 'static,
    ) -> ApiResult<T>
    where
        T: Send + 'static,
        E: Into<ApiErr> + 'static,
    {
        self.offload(move |st| f(&st.cat()).map_err(Into::into))
            .await
    }

    /// Runs `f` with the state on a blocking thread, for work that locks the catalog
    /// more than once or between other steps (each `cat()` as before).
    pub(crate) async fn offload<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&AppState) -> ApiResult<T> + Send + 'static,
    ) -> ApiResult<T> {
        let st = self.clone();
        blocking(move || f(&st)).await
    }
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
