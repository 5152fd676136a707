//! A small blocking client for Holdfast's HTTPS API, shared by the protection agent
//! (mutual TLS with its client certificate) and the admin CLI (bearer token). It knows
//! the transport (TLS, retries, error bodies), not the meaning of any call.

use protocol::{API, ApiError};
use reqwest::StatusCode;
use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status.
    #[error("{method} {path}: {status}: {message}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    /// The request did not get an answer (connection refused, reset, TLS failure...).
    #[error("{method} {path}: {source}")]
    Transport {
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("{path}: the answer is not what this client expects: {message}")]
    Decode { path: String, message: String },
}

impl Error {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth retrying: the connection failed or the server is temporarily unable.
    pub fn transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Status { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// How requests authenticate.
#[derive(Clone)]
pub enum Auth {
    /// The TLS client certificate does it (agents).
    ClientCert,
    /// `Authorization: Bearer` (admins).
    Token(String),
    None,
}

/// One server; cheap to clone (connections are pooled and shared, HTTP/2 multiplexes
/// concurrent requests from several threads over one connection).
#[derive(Clone)]
pub struct Client {
    http: Http,
    base: String,
    auth: Auth,
}

impl Client {
    /// `base`: `https://HOST:PORT`. `tls` decides whom to trust and what to present.
    pub fn new(base: &str, tls: rustls::ClientConfig, auth: Auth) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            return Err(Error::Setup(format!(
                "server URL {base:?} must start with https://"
            )));
        }
        let http = Http::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            .build()
            .map_err(|e| Error::Setup(format!("HTTP client: {e}")))?;
        Ok(Client { http, base, auth })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{API}{path}", self.base)
    }

    fn authed(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.auth {
            Auth::Token(t) => rb.bearer_auth(t),
            _ => rb,
        }
    }

    fn send(&self, method: &'static str, path: &str, rb: RequestBuilder) -> Result<Response> {
        let resp = self.authed(rb).send().map_err(|source| Error::Transport {
            method,
            path: path.to_string(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&text)
            .map(|e| e.error)
            .unwrap_or_else(|_| {
                if text.is_empty() {
                    status
                        .canonical_reason()
                        .unwrap_or("no message")
                        .to_string()
                } else {
                    text
                }
            });
        Err(Error::Status {
            method,
            path: path.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    fn decode<T: DeserializeOwned>(path: &str, resp: Response) -> Result<T> {
        let bytes = resp.bytes().map_err(|e| Error::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.send("GET", path, self.http.get(self.url(path)))?;
        Self::decode(path, r)
    }

    /// Streams the answer's body into `out`; fails if fewer bytes arrive than the
    /// server announced.
    pub fn get_to(&self, path: &str, out: &mut dyn std::io::Write) -> Result<u64> {
        let mut r = self.send("GET", path, self.http.get(self.url(path)))?;
        let want = r.content_length();
        let n = r.copy_to(out).map_err(|e| Error::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        match want {
            Some(w) if w != n => Err(Error::Decode {
                path: path.to_string(),
                message: format!("transfer ended after {n} of {w} bytes"),
            }),
            _ => Ok(n),
        }
    }

    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let r = self.send("GET", path, self.http.get(self.url(path)))?;
        r.bytes().map(|b| b.to_vec()).map_err(|e| Error::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let r = self.send("POST", path, self.http.post(self.url(path)).json(body))?;
        Self::decode(path, r)
    }

    /// A POST whose answer carries nothing of interest.
    pub fn post_ok<B: Serialize>(&self, path: &str, body: &B) -> Result<()> {
        self.send("POST", path, self.http.post(self.url(path)).json(body))
            .map(|_| ())
    }

    pub fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let r = self.send("PATCH", path, self.http.patch(self.url(path)).json(body))?;
        Self::decode(path, r)
    }

    pub fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let r = self.send("PUT", path, self.http.put(self.url(path)).json(body))?;
        Self::decode(path, r)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.send("DELETE", path, self.http.delete(self.url(path)))?;
        Self::decode(path, r)
    }

    /// POSTs raw bytes (block ids, framed blobs) and returns the raw answer.
    pub fn post_bytes(&self, path: &str, body: impl Into<bytes::Bytes>) -> Result<Vec<u8>> {
        let body: bytes::Bytes = body.into();
        let rb = self
            .http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let r = self.send("POST", path, rb)?;
        r.bytes().map(|b| b.to_vec()).map_err(|e| Error::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Runs `f` again after transient failures (connection lost, server restarting), with
    /// growing pauses up to about `budget`; other errors return at once.
    pub fn retrying<T>(&self, budget: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            match f() {
                Err(e) if e.transient() && start.elapsed() + pause < budget => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                r => return r,
            }
        }
    }
}

/// Percent-encodes one path segment (VM and group names may hold spaces).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether an error means "not found".
pub fn is_not_found(e: &Error) -> bool {
    e.status() == Some(StatusCode::NOT_FOUND.as_u16())
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_are_escaped() {
        assert_eq!(super::seg("a b/c"), "a%20b%2Fc");
        assert_eq!(super::seg("vm-1.x_y"), "vm-1.x_y");
    }
}
