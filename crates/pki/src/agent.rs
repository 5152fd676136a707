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
/// SHA-256 of the secret of the token the identity was enrolled with: a start with the
/// same `--enroll TOKEN` (a service file keeps it) is not taken for a re-enrollment.
const TOKEN_HASH: &str = "enroll-token.sha256";
/// Suffix of the files of a re-enrollment being put in place; `agent.pem.next`, written
/// last, marks the set complete.
const NEXT: &str = ".next";

fn next(name: &str) -> String {
    format!("{name}{NEXT}")
}

/// A key made for a re-enrollment, held in memory until the server has accepted it.
pub struct PendingKey(KeyPair);

impl fmt::Debug for PendingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PendingKey(..)")
    }
}

impl PendingKey {
    /// A new ECDSA P-256 key.
    pub fn generate() -> Result<PendingKey> {
        KeyPair::generate()
            .map(PendingKey)
            .map_err(|e| Error::Cert(format!("generating agent key: {e}")))
    }

    /// Its public key, SubjectPublicKeyInfo PEM, for the enrollment request.
    pub fn public_key_pem(&self) -> String {
        self.0.public_key_pem()
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| Error::Io {
        path: to.to_path_buf(),
        op: "rename into place",
        source,
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            op: "fsync folder",
            source,
        })
}

/// The certificate chain of `certificate_pem` if it is for `key`, and `ca_pem` parses.
fn check_response(certificate_pem: &str, key: PrivateKeyDer<'static>, ca_pem: &str) -> Result<()> {
    let chain = parse_certs(certificate_pem)
        .map_err(|e| Error::Pem(format!("enrollment certificate: {e}")))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| Error::Cert(format!("enrollment certificate does not match {KEY}: {e}")))?;
    parse_certs(ca_pem).map_err(|e| Error::Pem(format!("enrollment CA: {e}")))?;
    Ok(())
}

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
        check_response(certificate_pem, key, ca_pem)?;
        // ca.pem first: agent.pem's presence is what marks the agent enrolled.
        write_durable(&dir.join(CA), ca_pem.as_bytes(), PUBLIC)?;
        write_durable(&dir.join(CERT), certificate_pem.as_bytes(), PUBLIC)?;
        Ok(())
    }

    /// Replaces the key, certificate and CA of an enrolled agent with `key` and what the
    /// server answered its re-enrollment, as one change: the three are written beside
    /// the current ones (`*.next`, the certificate last), then renamed over them. A crash
    /// in between is finished by the next [`AgentIdentity::load`], so the folder never
    /// holds a key and a certificate that do not belong together.
    pub fn replace(
        dir: &Path,
        key: &PendingKey,
        certificate_pem: &str,
        ca_pem: &str,
    ) -> Result<()> {
        let pem = key.0.serialize_pem();
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| Error::Cert(format!("new agent key: {e}")))?;
        check_response(certificate_pem, der, ca_pem)?;
        write_durable(&dir.join(next(KEY)), pem.as_bytes(), PRIVATE)?;
        write_durable(&dir.join(next(CA)), ca_pem.as_bytes(), PUBLIC)?;
        write_durable(&dir.join(next(CERT)), certificate_pem.as_bytes(), PUBLIC)?;
        Self::finish_replace(dir)
    }

    /// Puts a complete re-enrollment (`agent.pem.next` present) in place, or removes
    /// the pieces of one that was not complete.
    fn finish_replace(dir: &Path) -> Result<()> {
        let complete = dir.join(next(CERT)).is_file();
        let mut touched = false;
        for name in [KEY, CA, CERT] {
            let from = dir.join(next(name));
            if !from.is_file() {
                continue;
            }
            touched = true;
            if complete {
                rename(&from, &dir.join(name))?;
            } else {
                std::fs::remove_file(&from).map_err(|source| Error::Io {
                    path: from.clone(),
                    op: "remove",
                    source,
                })?;
            }
        }
        if touched {
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// Whether the identity in `dir` was enrolled with the token whose secret hashes to
    /// `secret_hash` ([`crate::secret_hash`]).
    pub fn enrolled_with(dir: &Path, secret_hash: &str) -> bool {
        matches!(read_opt(&dir.join(TOKEN_HASH)), Ok(Some(h)) if h.trim() == secret_hash)
    }

    /// Records which token the identity in `dir` was enrolled with.
    pub fn record_token(dir: &Path, secret_hash: &str) -> Result<()> {
        write_durable(
            &dir.join(TOKEN_HASH),
            format!("{secret_hash}\n").as_bytes(),
            PUBLIC,
        )
    }

    /// Loads an enrolled identity; [`Error::NotEnrolled`] names the missing file. A
    /// re-enrollment interrupted while being put in place is finished first.
    pub fn load(dir: &Path) -> Result<AgentIdentity> {
        Self::finish_replace(dir)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerPki;

    /// An enrolled identity in `dir` from `ca`; returns its fingerprint.
    fn enroll(ca: &ServerPki, dir: &Path) -> String {
        let public = AgentIdentity::prepare(dir).unwrap();
        let cert = ca.issue_client_cert("hv01", &public).unwrap();
        AgentIdentity::store(dir, &cert, ca.ca_pem()).unwrap();
        AgentIdentity::load(dir).unwrap().fingerprint()
    }

    #[test]
    fn replace_swaps_key_and_certificate_together() {
        let t = tempfile::tempdir().unwrap();
        let ca = ServerPki::load_or_create(&t.path().join("server"), &[]).unwrap();
        let dir = t.path().join("agent");
        let old = enroll(&ca, &dir);
        let old_key = std::fs::read(dir.join(KEY)).unwrap();

        // A certificate for another key is refused and changes nothing.
        let key = PendingKey::generate().unwrap();
        let stray = PendingKey::generate().unwrap();
        let wrong = ca
            .issue_client_cert("hv01", &stray.public_key_pem())
            .unwrap();
        assert!(AgentIdentity::replace(&dir, &key, &wrong, ca.ca_pem()).is_err());
        assert_eq!(AgentIdentity::load(&dir).unwrap().fingerprint(), old);
        assert_eq!(std::fs::read(dir.join(KEY)).unwrap(), old_key);

        let cert = ca.issue_client_cert("hv01", &key.public_key_pem()).unwrap();
        AgentIdentity::replace(&dir, &key, &cert, ca.ca_pem()).unwrap();
        let id = AgentIdentity::load(&dir).unwrap();
        assert_ne!(id.fingerprint(), old);
        assert!(id.client_config().is_ok());
        assert_ne!(std::fs::read(dir.join(KEY)).unwrap(), old_key);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(NEXT)), "{names:?}");
    }

    #[test]
    fn an_interrupted_replace_is_finished_or_undone_at_load() {
        let t = tempfile::tempdir().unwrap();
        let ca = ServerPki::load_or_create(&t.path().join("server"), &[]).unwrap();
        let dir = t.path().join("agent");
        let old = enroll(&ca, &dir);
        let key = PendingKey::generate().unwrap();
        let cert = ca.issue_client_cert("hv01", &key.public_key_pem()).unwrap();

        // Crashed before the certificate was written: the pieces go, the old stays.
        write_durable(
            &dir.join(next(KEY)),
            key.0.serialize_pem().as_bytes(),
            PRIVATE,
        )
        .unwrap();
        assert_eq!(AgentIdentity::load(&dir).unwrap().fingerprint(), old);
        assert!(!dir.join(next(KEY)).exists());

        // Crashed after the key was renamed into place, before the certificate: the
        // certificate follows, so key and certificate match.
        write_durable(&dir.join(next(CERT)), cert.as_bytes(), PUBLIC).unwrap();
        write_durable(&dir.join(KEY), key.0.serialize_pem().as_bytes(), PRIVATE).unwrap();
        let id = AgentIdentity::load(&dir).unwrap();
        assert_ne!(id.fingerprint(), old);
        assert!(id.client_config().is_ok());
        assert!(!dir.join(next(CERT)).exists());
    }

    #[test]
    fn the_enrollment_token_is_remembered_by_its_hash() {
        let t = tempfile::tempdir().unwrap();
        assert!(!AgentIdentity::enrolled_with(t.path(), "abc"));
        AgentIdentity::record_token(t.path(), "abc").unwrap();
        assert!(AgentIdentity::enrolled_with(t.path(), "abc"));
        assert!(!AgentIdentity::enrolled_with(t.path(), "abd"));
    }
}
