//! Holdfast's own certificate authority and TLS configuration.
//!
//! The server runs a private CA ([`ServerPki`]). Agents generate their key
//! locally ([`AgentIdentity::prepare`]), enroll with a one-time token
//! ([`make_token`] / [`parse_token`]) and afterwards talk to the server only
//! over mutual TLS. The admin CLI uses TLS without a client certificate plus a
//! bearer token ([`load_or_create_admin_token`]).
//!
//! Every rustls config here is built with the aws-lc-rs provider passed
//! explicitly, so nothing depends on a process-wide default provider.

mod agent;
mod fsutil;
mod password;
mod secrets;
mod server;
mod token;
mod verify;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub use agent::{AgentIdentity, PendingKey};
pub use password::{
    API_TOKEN_PREFIX, MAX_PASSWORD, hash_password, make_api_token, random_secret, verify_password,
};
pub use secrets::SecretStore;
pub use server::ServerPki;
pub use token::{load_or_create_admin_token, make_token, parse_token, secret_hash, token_eq};
pub use verify::{client_config_trusting, pinned_ca_config};

/// Errors of this crate; those about a file name the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is unusable.
    #[error("{}: {what}", path.display())]
    BadFile { path: PathBuf, what: String },
    /// The agent has no identity yet (this file is missing).
    #[error("{}: missing; the agent is not enrolled", path.display())]
    NotEnrolled { path: PathBuf },
    /// A PEM string passed in (not read from a file) is unusable.
    #[error("{0}")]
    Pem(String),
    /// The public key sent by an agent is unusable.
    #[error("public key: {0}")]
    PublicKey(String),
    /// Generating or signing a certificate failed.
    #[error("certificate: {0}")]
    Cert(String),
    /// Building a TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// An enrollment token is malformed.
    #[error("enrollment token: {0}")]
    Token(String),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// Hashing a password failed (or it is too long).
    #[error("password: {0}")]
    Password(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// ALPN protocols offered and accepted everywhere: HTTP/2 first, HTTP/1.1 as fallback.
pub(crate) fn alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// The aws-lc-rs provider, passed explicitly to every builder. TLS 1.3 with
/// AES-128-GCM is preferred over AES-256-GCM: both are TLS 1.3's standard suites, and
/// 128-bit keys encrypt the bulk backup traffic with 10 AES rounds instead of 14.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of `data`, lowercase hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// `N` random bytes from the system CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| Error::Rng)?;
    Ok(buf)
}

/// SHA-256 of a DER certificate, lowercase hex (64 chars).
///
/// The server identifies agents by this fingerprint of the client certificate
/// they present, and enrollment tokens pin the CA by it.
pub fn cert_fingerprint(der: &[u8]) -> String {
    sha256_hex(der)
}

/// Parses the first certificate of a PEM string to DER.
pub fn pem_cert_to_der(pem: &str) -> Result<Vec<u8>> {
    parse_certs(pem)
        .map_err(Error::Pem)?
        .into_iter()
        .next()
        .map(|c| c.to_vec())
        .ok_or_else(|| Error::Pem("no CERTIFICATE block in PEM".into()))
}

/// All certificates of a PEM string; at least one, else an error message.
pub(crate) fn parse_certs(pem: &str) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in PEM".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_sha256_hex() {
        // SHA-256("abc"), a published test vector.
        assert_eq!(
            cert_fingerprint(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn pem_cert_to_der_rejects_garbage() {
        assert!(matches!(pem_cert_to_der("hello"), Err(Error::Pem(_))));
        let bad = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(pem_cert_to_der(bad), Err(Error::Pem(_))));
    }
}
