//! INTERIM sign-in, until user sessions land (issue 17): the form takes the server's
//! admin token, checks it against `GET /api/v1/status`, and keeps it in an HttpOnly,
//! Secure, SameSite=Strict cookie that the console turns into `Authorization: Bearer`
//! for its API calls. Replace with `POST /api/v1/session` and its `holdfast_session`.

use crate::api::{ADMIN_COOKIE, Api, ApiError, Caller};
use crate::view::{page, respond};
use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

/// Longer is not a token the server made (and keeps the cookie small).
const MAX_TOKEN: usize = 512;

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

fn login_page(error: Option<&str>) -> Markup {
    let body = html! {
        p { "Interim sign-in: paste the server's admin token (" code { "admin.token" }
            " in its data folder). User accounts and roles replace this." }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form method="post" action="/login" {
            label for="token" { "Admin token" }
            input id="token" name="token" type="password" autocomplete="off" required;
            button type="submit" { "Sign in" }
        }
    };
    page("Sign in", None, body)
}

pub async fn form() -> Response {
    respond(StatusCode::OK, login_page(None))
}

/// Whether a POST came from another site. Browsers name the initiator in
/// `Sec-Fetch-Site`; a form of this console sends `same-origin`. SameSite=Strict already
/// keeps the cookie off cross-site requests; this also stops another site from signing
/// a browser in or out (interim: the user sessions bring CSRF tokens).
fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() != b"same-origin" && v.as_bytes() != b"none")
}

fn refused() -> Response {
    respond(
        StatusCode::FORBIDDEN,
        login_page(Some("Refused: the form was sent from another site.")),
    )
}

pub async fn login(State(api): State<Api>, headers: HeaderMap, Form(f): Form<Login>) -> Response {
    if cross_site(&headers) {
        return refused();
    }
    let token = f.token.trim();
    // Only characters a cookie value may hold unquoted: the token can never break
    // out of its cookie into attributes of its own.
    let valid = !token.is_empty()
        && token.len() <= MAX_TOKEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b));
    if !valid {
        return respond(
            StatusCode::BAD_REQUEST,
            login_page(Some("That is not a token.")),
        );
    }
    match api
        .get::<protocol::ServerStatus>(&Caller::with_token(token), "/status")
        .await
    {
        Ok(_) => {}
        Err(ApiError::SignIn | ApiError::Status(StatusCode::FORBIDDEN, _)) => {
            return respond(
                StatusCode::UNAUTHORIZED,
                login_page(Some("The server refused that token.")),
            );
        }
        Err(e) => return respond(StatusCode::BAD_GATEWAY, login_page(Some(&e.to_string()))),
    }
    let cookie = format!("{ADMIN_COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict");
    with_cookie(Redirect::to("/"), &cookie)
}

pub async fn logout(headers: HeaderMap) -> Response {
    if cross_site(&headers) {
        return refused();
    }
    let cookie = format!("{ADMIN_COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict");
    with_cookie(Redirect::to("/login"), &cookie)
}

fn with_cookie(r: Redirect, cookie: &str) -> Response {
    let mut resp = r.into_response();
    match HeaderValue::from_str(cookie) {
        Ok(v) => {
            resp.headers_mut().insert(header::SET_COOKIE, v);
            resp
        }
        Err(_) => respond(
            StatusCode::BAD_REQUEST,
            login_page(Some("That is not a token.")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn post(path: &str, site: Option<&str>, body: &str) -> Response {
        let mut req =
            Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(s) = site {
            req = req.header("sec-fetch-site", s);
        }
        // The console with an empty API behind it: no token can be checked, so only
        // what is refused before the API is asked shows here.
        let app = crate::router(axum::Router::new());
        app.oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn cross_site_posts_are_refused() {
        for path in ["/login", "/logout"] {
            let r = post(path, Some("cross-site"), "token=abc").await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
            assert!(r.headers().get(header::SET_COOKIE).is_none(), "{path}");
            let r = post(path, Some("same-site"), "token=abc").await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        }
        let r = post("/logout", Some("same-origin"), "").await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let c = r
            .headers()
            .get(header::SET_COOKIE)
            .unwrap()
            .to_str()
            .unwrap();
        assert!(
            c.starts_with("holdfast_admin=; ") && c.contains("Max-Age=0") && c.contains("HttpOnly"),
            "{c}"
        );
    }

    #[tokio::test]
    async fn tokens_that_could_break_the_cookie_are_refused() {
        for bad in ["a%3Bb", "a%20b", "", "a%0D%0Ab"] {
            let r = post("/login", None, &format!("token={bad}")).await;
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
            assert!(r.headers().get(header::SET_COOKIE).is_none());
        }
    }
}
