//! The server's CA and its TLS server certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::fsutil::{PRIVATE, PUBLIC, ensure_dir, read_opt, write_durable};
use crate::{Error, Result, alpn, hex, parse_certs, provider, random_bytes, sha256_hex};

const DAY: u64 = 24 * 60 * 60;
const CA_DAYS: u64 = 20 * 365 + 5;
const SERVER_DAYS: u64 = 2 * 365;
const CLIENT_DAYS: u64 = 365;
/// A server certificate expiring sooner than this is re-issued at start.
const RENEW_BEFORE_DAYS: u64 = 30;
/// Names the server certificate always carries, so local tools just work.
const DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The server's CA and server certificate, kept in the data dir as
/// `ca.pem`, `ca.key` (0600), `server.pem`, `server.key` (0600).
pub struct ServerPki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// Server certificate followed by the CA certificate: sending the CA lets
    /// an enrolling agent check it against its pinned fingerprint
    /// ([`crate::pinned_ca_config`]).
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ServerPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerPki")
            .field("ca_fingerprint", &self.ca_fingerprint())
            .finish_non_exhaustive()
    }
}

impl ServerPki {
    /// Loads the CA and server certificate from `dir`, creating them on first
    /// start.
    ///
    /// The server certificate names `localhost`, `127.0.0.1`, `::1` and
    /// `names`; it is re-issued (keeping the CA) when it lacks one of them,
    /// expires within 30 days, does not chain to the CA, or does not match
    /// its key. The CA is never replaced once `ca.pem` exists, because every
    /// enrolled agent pins it.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<ServerPki> {
        let names = server_names(names)?;
        ensure_dir(dir)?;
        let ca_pem_path = dir.join("ca.pem");
        let ca_key_path = dir.join("ca.key");

        // ca.key is written before ca.pem, so a missing ca.pem means the CA
        // was never completely created and no agent can have pinned it.
        let (ca_pem, ca_key_pem) = match read_opt(&ca_pem_path)? {
            Some(pem) => {
                let key = read_opt(&ca_key_path)?.ok_or_else(|| Error::BadFile {
                    path: ca_key_path.clone(),
                    what: "missing although ca.pem exists; restore it from a backup \
                           (a new CA would lock out every enrolled agent)"
                        .into(),
                })?;
                (pem, key)
            }
            None => create_ca(&ca_pem_path, &ca_key_path)?,
        };
        let bad = |path: &PathBuf| {
            let path = path.clone();
            move |what: String| Error::BadFile { path, what }
        };
        let ca_der = parse_certs(&ca_pem)
            .map_err(bad(&ca_pem_path))?
            .swap_remove(0);
        let ca_key = KeyPair::from_pem(&ca_key_pem)
            .map_err(|e| bad(&ca_key_path)(format!("bad private key: {e}")))?;
        // Signing with a key that does not belong to ca.pem would produce
        // certificates nobody can verify; catch it here.
        let ca_key_der = PrivateKeyDer::from_pem_slice(ca_key_pem.as_bytes())
            .map_err(|e| bad(&ca_key_path)(format!("bad private key: {e}")))?;
        CertifiedKey::from_der(vec![ca_der.clone()], ca_key_der, &provider())
            .map_err(|e| bad(&ca_key_path)(format!("does not match ca.pem: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)
            .map_err(|e| bad(&ca_pem_path)(format!("not a usable CA certificate: {e}")))?;

        let server_pem_path = dir.join("server.pem");
        let server_key_path = dir.join("server.key");
        let existing = load_server_cert(&server_pem_path, &server_key_path)?;
        let (leaf, server_key) = match existing {
            Some((leaf, key)) if server_cert_ok(&ca_der, &leaf, &key, &names)? => (leaf, key),
            _ => issue_server_cert(
                &issuer,
                &names,
                &server_pem_path,
                &server_key_path,
                SERVER_DAYS,
            )?,
        };

        Ok(ServerPki {
            ca_pem,
            server_chain: vec![leaf, ca_der.clone()],
            ca_der,
            issuer,
            server_key,
        })
    }

    /// The CA certificate, PEM; agents download and pin it.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex (64 chars): what
    /// enrollment tokens pin and what `holdfast server` prints.
    pub fn ca_fingerprint(&self) -> String {
        sha256_hex(&self.ca_der)
    }

    /// Signs a client certificate (CN = `host`, EKU clientAuth, 1 year,
    /// random serial) for the agent's public key, given as SubjectPublicKeyInfo
    /// PEM. Returns the certificate PEM. The agent's private key never leaves
    /// the agent.
    pub fn issue_client_cert(&self, host: &str, public_key_pem: &str) -> Result<String> {
        if host.is_empty() || host.len() > 255 || host.chars().any(char::is_control) {
            return Err(Error::Cert(format!(
                "bad host name for a client certificate: {host:?}"
            )));
        }
        let spki = SubjectPublicKeyInfo::from_pem(public_key_pem)
            .map_err(|e| Error::PublicKey(format!("not a SubjectPublicKeyInfo PEM: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(host);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, CLIENT_DAYS)?;
        let cert = params
            .signed_by(&spki, &self.issuer)
            .map_err(|e| Error::Cert(format!("signing client certificate: {e}")))?;
        Ok(cert.pem())
    }

    /// rustls server config: our server chain; client certificates optional
    /// (the admin CLI has none), but one that is presented must chain to our
    /// CA or the handshake fails. ALPN h2, http/1.1.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&self.ca_der)?), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())
            .map_err(|e| Error::Tls(format!("server certificate: {e}")))?;
        cfg.alpn_protocols = alpn();
        Ok(Arc::new(cfg))
    }
}

/// Root store holding only `ca`.
pub(crate) fn roots(ca: &CertificateDer<'_>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone().into_owned())
        .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
    Ok(roots)
}

/// Default names plus `extra`, deduplicated, each checked to be a valid
/// DNS name or IP address (what a TLS client will ask for).
fn server_names(extra: &[String]) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for n in DEFAULT_NAMES
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
    {
        if ServerName::try_from(n.as_str()).is_err() {
            return Err(Error::Cert(format!(
                "{n:?} is neither a DNS name nor an IP address"
            )));
        }
        if !names.contains(&n) {
            names.push(n);
        }
    }
    Ok(names)
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// 16 random bytes, positive and without a leading zero byte so that DER
/// encodes it as exactly 16 bytes.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = random_bytes::<16>()?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn since_epoch() -> Result<Duration> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::Cert("system clock is before 1970".into()))
}

/// Valid from an hour ago (tolerates clock skew) for `days` days.
fn set_validity(params: &mut CertificateParams, days: u64) -> Result<()> {
    // rcgen's time type is reached through its own constructor, which spares
    // a direct dependency on the `time` crate.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = since_epoch()?;
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(3600));
    params.not_after = epoch + now + Duration::from_secs(days * DAY);
    Ok(())
}

fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |e| Error::Cert(format!("{what}: {e}"))
}

/// Generates a new CA, writes ca.key then ca.pem; returns (cert PEM, key PEM).
fn create_ca(pem_path: &Path, key_path: &Path) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(rcgen_err("generating CA key"))?;
    let mut params = CertificateParams::default();
    // The random suffix keeps CAs of different installations distinguishable.
    params.distinguished_name = common_name(&format!("Holdfast CA {}", hex(&random_bytes::<4>()?)));
    // Only end-entity certificates below the CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, CA_DAYS)?;
    let cert = params
        .self_signed(&key)
        .map_err(rcgen_err("signing CA certificate"))?;
    let key_pem = key.serialize_pem();
    let cert_pem = cert.pem();
    write_durable(key_path, key_pem.as_bytes(), PRIVATE)?;
    write_durable(pem_path, cert_pem.as_bytes(), PUBLIC)?;
    Ok((cert_pem, key_pem))
}

/// The existing server certificate and key, or `None` if either is missing
/// or unreadable as PEM (it is then simply re-issued).
fn load_server_cert(
    pem_path: &Path,
    key_path: &Path,
) -> Result<Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>> {
    let (Some(pem), Some(key)) = (read_opt(pem_path)?, read_opt(key_path)?) else {
        return Ok(None);
    };
    let Ok(mut certs) = parse_certs(&pem) else {
        return Ok(None);
    };
    let Ok(key) = PrivateKeyDer::from_pem_slice(key.as_bytes()) else {
        return Ok(None);
    };
    Ok(Some((certs.swap_remove(0), key)))
}

/// True if `leaf` matches `key`, chains to `ca`, carries every name and is
/// still valid 30 days from now.
fn server_cert_ok(
    ca: &CertificateDer<'static>,
    leaf: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
    names: &[String],
) -> Result<bool> {
    if CertifiedKey::from_der(vec![leaf.clone()], key.clone_key(), &provider()).is_err() {
        return Ok(false);
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .map_err(|e| Error::Tls(format!("server verifier: {e}")))?;
    let then =
        UnixTime::since_unix_epoch(since_epoch()? + Duration::from_secs(RENEW_BEFORE_DAYS * DAY));
    for name in names {
        let Ok(server_name) = ServerName::try_from(name.as_str()) else {
            return Ok(false);
        };
        if verifier
            .verify_server_cert(leaf, &[], &server_name, &[], then)
            .is_err()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Issues a new server key and certificate, writes server.key then server.pem.
fn issue_server_cert(
    issuer: &Issuer<'static, KeyPair>,
    names: &[String],
    pem_path: &Path,
    key_path: &Path,
    days: u64,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let key = KeyPair::generate().map_err(rcgen_err("generating server key"))?;
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(rcgen_err("server certificate names"))?;
    params.distinguished_name = common_name("Holdfast server");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, days)?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(rcgen_err("signing server certificate"))?;
    write_durable(key_path, key.serialize_pem().as_bytes(), PRIVATE)?;
    write_durable(pem_path, cert.pem().as_bytes(), PUBLIC)?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((cert.der().clone(), key_der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_cert_expiring_soon_is_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let pem_path = dir.path().join("server.pem");
        let key_path = dir.path().join("server.key");
        let pki = ServerPki::load_or_create(dir.path(), &[]).unwrap();
        let names = server_names(&[]).unwrap();
        let (leaf, key) = load_server_cert(&pem_path, &key_path).unwrap().unwrap();
        assert!(server_cert_ok(&pki.ca_der, &leaf, &key, &names).unwrap());

        // Valid now, but for less than the 30-day renewal margin.
        let (leaf, key) = issue_server_cert(&pki.issuer, &names, &pem_path, &key_path, 10).unwrap();
        assert!(!server_cert_ok(&pki.ca_der, &leaf, &key, &names).unwrap());
        let short_pem = std::fs::read(&pem_path).unwrap();

        let again = ServerPki::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(again.ca_fingerprint(), pki.ca_fingerprint());
        assert_ne!(std::fs::read(&pem_path).unwrap(), short_pem);
        let (leaf, key) = load_server_cert(&pem_path, &key_path).unwrap().unwrap();
        assert!(server_cert_ok(&pki.ca_der, &leaf, &key, &names).unwrap());
    }

    #[test]
    fn server_cert_with_wrong_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ServerPki::load_or_create(dir.path(), &[]).unwrap();
        let names = server_names(&[]).unwrap();
        let other = KeyPair::generate().unwrap();
        let other = PrivateKeyDer::Pkcs8(other.serialize_der().into());
        assert!(!server_cert_ok(&pki.ca_der, &pki.server_chain[0], &other, &names).unwrap());
    }
}
