//! The page frame every page shares (nav bar, main landmark, title), the headers every
//! page carries, and the error pages.

use crate::api::ApiError;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};

/// The nav bar's links: path, label.
const NAV: [(&str, &str); 6] = [
    ("/", "Dashboard"),
    ("/hosts", "Hosts"),
    ("/groups", "Protection groups"),
    ("/jobs", "Jobs"),
    ("/alerts", "Alerts"),
    ("/recovery-points", "Recovery points"),
];

/// A full page: `active` is the nav path to mark current (none on the sign-in page,
/// which also has no nav links to pages it cannot show yet).
pub fn page(title: &str, active: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Holdfast" }
                // No favicon request (it would log a 404 in the browser's console).
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/console.css";
                script src="/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to the content" }
                header {
                    span.brand { "Holdfast" }
                    @if let Some(active) = active {
                        nav aria-label="Main" {
                            ul {
                                @for (href, label) in NAV {
                                    li {
                                        @if href == active {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        form.signout method="post" action="/logout" {
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A rendered page with the headers every console page carries: no inline script
/// anywhere, so the CSP can forbid it; never framed; never cached (pages hold data).
pub fn respond(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        markup.into_string(),
    )
        .into_response()
}

pub fn ok(title: &str, active: &str, body: Markup) -> Response {
    respond(StatusCode::OK, page(title, Some(active), body))
}

/// What a page handler returns when it cannot render.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    BadRequest(String),
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, msg) = match &self {
            PageError::Api(ApiError::SignIn) => return Redirect::to("/login").into_response(),
            PageError::Api(ApiError::Status(s, m)) if *s == StatusCode::FORBIDDEN => {
                (StatusCode::FORBIDDEN, format!("Not allowed: {m}"))
            }
            PageError::Api(ApiError::Status(s, m)) if s.is_client_error() => (*s, m.clone()),
            PageError::Api(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
            PageError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
        };
        let body =
            html! { p.error role="alert" { (msg) } p { a href="/" { "Back to the dashboard" } } };
        respond(status, page("Error", Some(""), body))
    }
}

/// Bytes for people: binary units, one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `done` of `total` as a percentage, clamped to 0..=100 (0 when the total is unknown).
pub fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    let p = (u128::from(done) * 100) / u128::from(total);
    u64::try_from(p.min(100)).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_percentages() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(percent(5, 10), 50);
        assert_eq!(percent(20, 10), 100);
        assert_eq!(percent(u64::MAX, 1), 100);
        assert_eq!(percent(1, 0), 0);
    }

    #[test]
    fn text_is_escaped() {
        let p = page(
            "<x>",
            Some("/"),
            html! { p { ("<script>alert(1)</script>") } },
        )
        .into_string();
        assert!(!p.contains("<script>alert"), "{p}");
        assert!(p.contains("&lt;script&gt;"));
    }
}
