//! Holdfast's web console: server-rendered HTML (maud), a small CSS file and a small
//! script embedded in the binary. It adds no business logic: every page gets its data
//! by calling the `/api/v1` routes the CLI uses, in process, through the API's own
//! router with the caller's credentials forwarded, so the API's authorization decides
//! what the console may show (see docs/console.md).

mod api;
mod calendar;
mod pages;
mod signin;
mod view;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};

pub use api::Api;

/// The console's routes, with every other path handed to `api` (the `/api/v1` router,
/// state already applied). The console calls `api` in process for its data.
pub fn router(api: Router) -> Router {
    Router::new()
        .route("/", get(pages::dashboard))
        .route("/hosts", get(pages::hosts))
        .route("/groups", get(pages::groups))
        .route("/jobs", get(pages::jobs))
        .route("/jobs/{id}", get(pages::job))
        .route("/alerts", get(pages::alerts))
        .route("/recovery-points", get(pages::recovery_points))
        .route("/login", get(signin::form).post(signin::login))
        .route("/logout", post(signin::logout))
        .route("/console.css", get(css))
        .route("/console.js", get(js))
        .with_state(Api::new(api.clone()))
        .fallback_service(api)
}

const CSS: &str = include_str!("../assets/console.css");
const JS: &str = include_str!("../assets/console.js");

async fn css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Assets change only with the binary; a short cache keeps upgrades visible.
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
}
