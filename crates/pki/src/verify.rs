//! Client configs for the admin CLI and for an agent's first contact.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{Error, Result, alpn, cert_fingerprint, parse_certs, provider};

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))
}

/// Client config for the admin CLI: trusts only the CA(s) in `ca_pem`, no
/// client certificate (the admin authenticates with a bearer token);
/// ALPN h2, http/1.1.
pub fn client_config_trusting(ca_pem: &str) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for der in parse_certs(ca_pem).map_err(|e| Error::Pem(format!("CA: {e}")))? {
        roots
            .add(der)
            .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
    }
    let mut cfg = builder()?
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn();
    Ok(cfg)
}

/// Client config that trusts a server only if its chain includes a CA
/// certificate whose SHA-256 fingerprint is `ca_fingerprint` (the pin from
/// the enrollment token) and the server certificate verifies against that
/// CA (signature, validity, server name). The server sends its CA with its
/// certificate, so an enrolling agent can send the token over this
/// connection directly. No client certificate.
pub fn pinned_ca_config(ca_fingerprint: &str) -> Result<ClientConfig> {
    let pin = ca_fingerprint.to_ascii_lowercase();
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Token(
            "CA fingerprint must be 64 hex digits (SHA-256)".into(),
        ));
    }
    let provider = provider();
    let mut cfg = builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, provider }))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn();
    Ok(cfg)
}

/// Verifies the server against the CA certificate in its chain whose
/// fingerprint equals the pin.
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for PinnedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCa").field("pin", &self.pin).finish()
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| cert_fingerprint(c) == self.pin)
        else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("pinned CA verifier: {e}")))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
