//! Calls into the API router in process with the caller's own credentials, so the
//! API's authorization applies to every page.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use serde::de::DeserializeOwned;
use tower::ServiceExt;

/// The largest API answer a page reads (a VM's recovery points at scale: ~1 KiB each).
const MAX_BODY: usize = 64 << 20;

/// The interim sign-in's cookie: it holds the admin token, and the console turns it into
/// `Authorization: Bearer` for its API calls. To be replaced by the user sessions
/// (`holdfast_session` from `POST /api/v1/session`), which are forwarded as they come.
pub const ADMIN_COOKIE: &str = "holdfast_admin";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials, or the API refused them: sign in.
    #[error("sign in first")]
    SignIn,
    #[error("the API answered {0}: {1}")]
    Status(StatusCode, String),
    #[error("the API's answer could not be read: {0}")]
    Body(String),
}

/// The API router, cloned for each call.
#[derive(Clone)]
pub struct Api(Router);

/// What a caller presented: forwarded to the API untouched (the console adds none).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    authorization: Option<HeaderValue>,
    cookies: Vec<HeaderValue>,
}

impl Caller {
    pub fn from_headers(headers: &HeaderMap) -> Caller {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .cloned()
            .or_else(|| bearer(cookie(headers, ADMIN_COOKIE)?));
        Caller {
            authorization,
            cookies: headers.get_all(header::COOKIE).iter().cloned().collect(),
        }
    }

    /// A caller presenting only this admin token (the interim sign-in's check).
    pub fn with_token(token: &str) -> Caller {
        Caller {
            authorization: bearer(token),
            cookies: Vec::new(),
        }
    }
}

fn bearer(token: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("Bearer {token}")).ok()
}

/// The value of cookie `name`, from every `Cookie` header (HTTP/2 sends one per cookie).
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

impl Api {
    pub fn new(router: Router) -> Api {
        Api(router)
    }

    /// `GET /api/v1{path}` as `caller`, decoded.
    pub async fn get<T: DeserializeOwned>(
        &self,
        caller: &Caller,
        path: &str,
    ) -> Result<T, ApiError> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{path}", protocol::API));
        if let Some(a) = &caller.authorization {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        for c in &caller.cookies {
            req = req.header(header::COOKIE, c.clone());
        }
        let req = req
            .body(Body::empty())
            .map_err(|e| ApiError::Body(format!("request for {path}: {e}")))?;
        // A fresh request: no TLS peer certificate travels with it, so a browser can
        // never pass for an agent through the console.
        let resp = match self.0.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), MAX_BODY)
            .await
            .map_err(|e| ApiError::Body(e.to_string()))?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(ApiError::SignIn);
        }
        if !status.is_success() {
            let msg = serde_json::from_slice::<protocol::ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ApiError::Status(status, msg));
        }
        serde_json::from_slice(&body).map_err(|e| ApiError::Body(e.to_string()))
    }
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
pub fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_across_headers() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; holdfast_admin=tok"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, ADMIN_COOKIE), Some("tok"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
        let c = Caller::from_headers(&h);
        assert_eq!(c.authorization.unwrap(), "Bearer tok");
        assert_eq!(c.cookies.len(), 2);
    }

    #[test]
    fn a_given_authorization_wins_over_the_cookie() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("holdfast_admin=tok"),
        );
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer other"),
        );
        assert_eq!(
            Caller::from_headers(&h).authorization.unwrap(),
            "Bearer other"
        );
    }

    #[test]
    fn encoding_leaves_only_unreserved_characters() {
        assert_eq!(encode("hv01/web 01&x=<"), "hv01%2Fweb%2001%26x%3D%3C");
    }
}
