//! INTERIM sign-in, until user sessions land (issue 17): the form takes the server's
//! admin token, checks it against `GET /api/v1/status`, and keeps it in an HttpOnly,
//! Secure, SameSite=Strict cookie that the console turns into `Authorization: Bearer`
//! for its API calls. Replace with `POST /api/v1/session` and its `holdfast_session`.

use crate::api::{ADMIN_COOKIE, Api, ApiError, Caller};
use crate::view::{page, respond};
use axum::Form;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
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

pub async fn login(State(api): State<Api>, Form(f): Form<Login>) -> Response {
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

pub async fn logout() -> Response {
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
