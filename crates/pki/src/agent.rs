//! The agent's key, certificate and pinned server CA.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::KeyPair;
use rustls::ClientConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::fsutil::{PRIVATE, PUBLIC, ensure_dir, read_opt, write_durable};
use crate::server::roots;
use crate::{Error, Result, alpn, cert_fingerprint, parse_certs, provider};

const KEY: &str = "agent.key";
const CERT: &str = "agent.pem";
const CA: &str = "ca.pem";

/// An enrolled agent's identity, from its data dir: `agent.key` (0600,
/// generated locally, never leaves the host), `agent.pem` (issued at
/// enrollment), `ca.pem` (the pinned server CA).
pub struct AgentIdentity {
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: CertificateDer<'static>,
}

impl fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn read_key(path: &Path) -> Result<Option<(String, PrivateKeyDer<'static>)>> {
    let Some(pem) = read_opt(path)? else {
        return Ok(None);
    };
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        what: format!("bad private key: {e}"),
    })?;
    Ok(Some((pem, der)))
}

impl AgentIdentity {
    /// Generates `agent.key` (ECDSA P-256) if missing and returns its public
    /// key as SubjectPublicKeyInfo PEM, for the enrollment request. Keeping
    /// an existing key lets an interrupted enrollment be retried.
    pub fn prepare(dir: &Path) -> Result<String> {
        ensure_dir(dir)?;
        let path = dir.join(KEY);
        let key = match read_opt(&path)? {
            Some(pem) => KeyPair::from_pem(&pem).map_err(|e| Error::BadFile {
                path: path.clone(),
                what: format!("bad private key: {e}"),
            })?,
            None => {
                let key = KeyPair::generate()
                    .map_err(|e| Error::Cert(format!("generating agent key: {e}")))?;
                write_durable(&path, key.serialize_pem().as_bytes(), PRIVATE)?;
                key
            }
        };
        Ok(key.public_key_pem())
    }

    /// Stores `agent.pem` and `ca.pem` from the enrollment response, durably.
    /// Refuses a certificate that is not for `agent.key` or a CA PEM that
    /// does not parse, so a bad response cannot leave a broken identity.
    pub fn store(dir: &Path, certificate_pem: &str, ca_pem: &str) -> Result<()> {
        let key_path = dir.join(KEY);
        let (_, key) = read_key(&key_path)?.ok_or(Error::NotEnrolled { path: key_path })?;
        let chain = parse_certs(certificate_pem)
            .map_err(|e| Error::Pem(format!("enrollment certificate: {e}")))?;
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
            Error::Cert(format!("enrollment certificate does not match {KEY}: {e}"))
        })?;
        parse_certs(ca_pem).map_err(|e| Error::Pem(format!("enrollment CA: {e}")))?;
        // ca.pem first: agent.pem's presence is what marks the agent enrolled.
        write_durable(&dir.join(CA), ca_pem.as_bytes(), PUBLIC)?;
        write_durable(&dir.join(CERT), certificate_pem.as_bytes(), PUBLIC)?;
        Ok(())
    }

    /// Loads an enrolled identity; [`Error::NotEnrolled`] names the missing file.
    pub fn load(dir: &Path) -> Result<AgentIdentity> {
        let need = |name: &str| -> Result<(PathBuf, String)> {
            let path = dir.join(name);
            match read_opt(&path)? {
                Some(s) => Ok((path, s)),
                None => Err(Error::NotEnrolled { path }),
            }
        };
        let key_path = dir.join(KEY);
        let (_, key) = read_key(&key_path)?.ok_or(Error::NotEnrolled { path: key_path })?;
        let (cert_path, cert_pem) = need(CERT)?;
        let (ca_path, ca_pem) = need(CA)?;
        let cert_chain = parse_certs(&cert_pem).map_err(|what| Error::BadFile {
            path: cert_path,
            what,
        })?;
        let ca = parse_certs(&ca_pem)
            .map_err(|what| Error::BadFile {
                path: ca_path,
                what,
            })?
            .swap_remove(0);
        Ok(AgentIdentity {
            cert_chain,
            key,
            ca,
        })
    }

    /// True if `agent.key`, `agent.pem` and `ca.pem` all exist.
    pub fn enrolled(dir: &Path) -> bool {
        [KEY, CERT, CA].iter().all(|n| dir.join(n).is_file())
    }

    /// SHA-256 of the agent certificate's DER: how the server knows this agent.
    pub fn fingerprint(&self) -> String {
        self.cert_chain
            .first()
            .map(|c| cert_fingerprint(c))
            .unwrap_or_default()
    }

    /// Client config: trusts only the pinned CA, presents `agent.pem` with
    /// `agent.key`; ALPN h2, http/1.1.
    pub fn client_config(&self) -> Result<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(Arc::new(roots(&self.ca)?))
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(|e| Error::Tls(format!("agent certificate: {e}")))?;
        cfg.alpn_protocols = alpn();
        Ok(cfg)
    }
}
