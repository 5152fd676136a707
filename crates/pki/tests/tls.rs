//! Real TLS handshakes over loopback TCP between configs built by `pki`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use pki::{
    AgentIdentity, Error, ServerPki, cert_fingerprint, client_config_trusting, pem_cert_to_der,
    pinned_ca_config,
};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What the server side saw of a successful handshake.
#[derive(Debug)]
struct Accepted {
    peer_fingerprint: Option<String>,
    alpn: Option<Vec<u8>>,
}

/// Runs one connection: the server accepts, records the peer certificate
/// and writes "ok"; the client connects as `name` and reads 2 bytes. Under
/// TLS 1.3 a rejected client certificate surfaces on the client only when it
/// reads, hence the read.
async fn exchange(
    server: Arc<ServerConfig>,
    client: ClientConfig,
    name: &str,
) -> (Result<Accepted, String>, Result<Vec<u8>, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let accepted = Accepted {
            peer_fingerprint: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| cert_fingerprint(c)),
            alpn: conn.alpn_protocol().map(|p| p.to_vec()),
        };
        tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(accepted)
    });
    let name = ServerName::try_from(name.to_string()).unwrap();
    let client_result = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 2];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(buf)
    }
    .await;
    (server_task.await.unwrap(), client_result)
}

fn enroll(pki: &ServerPki, trusted_ca_pem: &str, dir: &Path) -> (AgentIdentity, String) {
    let public_key = AgentIdentity::prepare(dir).unwrap();
    let cert = pki.issue_client_cert("host1.example", &public_key).unwrap();
    AgentIdentity::store(dir, &cert, trusted_ca_pem).unwrap();
    (AgentIdentity::load(dir).unwrap(), cert)
}

#[tokio::test]
async fn enrolled_agent_completes_handshake_and_is_identified() {
    let server_dir = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::load_or_create(server_dir.path(), &[]).unwrap();
    assert!(!AgentIdentity::enrolled(agent_dir.path()));
    let (agent, cert_pem) = enroll(&pki, pki.ca_pem(), agent_dir.path());
    assert!(AgentIdentity::enrolled(agent_dir.path()));
    let expected = cert_fingerprint(&pem_cert_to_der(&cert_pem).unwrap());
    assert_eq!(agent.fingerprint(), expected);

    let (server, client) = exchange(
        pki.server_config().unwrap(),
        agent.client_config().unwrap(),
        "localhost",
    )
    .await;
    let accepted = server.unwrap();
    assert_eq!(
        accepted.peer_fingerprint.as_deref(),
        Some(expected.as_str())
    );
    assert_eq!(accepted.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(client.unwrap(), b"ok");
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let server_dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::load_or_create(server_dir.path(), &[]).unwrap();
    let other = ServerPki::load_or_create(other_dir.path(), &[]).unwrap();
    assert_ne!(pki.ca_fingerprint(), other.ca_fingerprint());
    // Trusts our server, but its certificate comes from the other CA.
    let (agent, _) = enroll(&other, pki.ca_pem(), agent_dir.path());

    let (server, client) = exchange(
        pki.server_config().unwrap(),
        agent.client_config().unwrap(),
        "localhost",
    )
    .await;
    let err = server.unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(client.is_err(), "client must not get data: {client:?}");
}

#[tokio::test]
async fn no_client_cert_is_accepted_and_seen_as_none() {
    let server_dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::load_or_create(server_dir.path(), &[]).unwrap();
    let (server, client) = exchange(
        pki.server_config().unwrap(),
        client_config_trusting(pki.ca_pem()).unwrap(),
        "127.0.0.1",
    )
    .await;
    let accepted = server.unwrap();
    assert_eq!(accepted.peer_fingerprint, None);
    assert_eq!(client.unwrap(), b"ok");
}

#[tokio::test]
async fn admin_client_trusts_only_its_ca() {
    let server_dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::load_or_create(server_dir.path(), &[]).unwrap();
    let other = ServerPki::load_or_create(other_dir.path(), &[]).unwrap();

    let (server, client) = exchange(
        pki.server_config().unwrap(),
        client_config_trusting(pki.ca_pem()).unwrap(),
        "::1",
    )
    .await;
    server.unwrap();
    assert_eq!(client.unwrap(), b"ok");

    let (server, client) = exchange(
        pki.server_config().unwrap(),
        client_config_trusting(other.ca_pem()).unwrap(),
        "localhost",
    )
    .await;
    let err = client.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("issuer"),
        "{err}"
    );
    assert!(server.is_err());

    // A name the server certificate does not carry is refused too.
    let (_, client) = exchange(
        pki.server_config().unwrap(),
        client_config_trusting(pki.ca_pem()).unwrap(),
        "elsewhere.example",
    )
    .await;
    assert!(client.is_err());
}

#[tokio::test]
async fn first_contact_configs() {
    let server_dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::load_or_create(server_dir.path(), &[]).unwrap();
    let other = ServerPki::load_or_create(other_dir.path(), &[]).unwrap();

    // The pinned config accepts only a server whose chain has the pinned CA.
    let (server, client) = exchange(
        pki.server_config().unwrap(),
        pinned_ca_config(&pki.ca_fingerprint()).unwrap(),
        "localhost",
    )
    .await;
    server.unwrap();
    assert_eq!(client.unwrap(), b"ok");

    let (_, client) = exchange(
        other.server_config().unwrap(),
        pinned_ca_config(&pki.ca_fingerprint()).unwrap(),
        "localhost",
    )
    .await;
    assert!(client.is_err());

    // Pinned CA, but the wrong server name.
    let (_, client) = exchange(
        pki.server_config().unwrap(),
        pinned_ca_config(&pki.ca_fingerprint()).unwrap(),
        "elsewhere.example",
    )
    .await;
    assert!(client.is_err());
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn load_or_create_is_idempotent_and_keys_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerPki::load_or_create(dir.path(), &[]).unwrap();
    let server_pem = std::fs::read(dir.path().join("server.pem")).unwrap();
    let second = ServerPki::load_or_create(dir.path(), &[]).unwrap();
    assert_eq!(first.ca_fingerprint(), second.ca_fingerprint());
    assert_eq!(first.ca_pem(), second.ca_pem());
    assert_eq!(first.ca_fingerprint().len(), 64);
    assert_eq!(
        std::fs::read(dir.path().join("server.pem")).unwrap(),
        server_pem,
        "a valid server certificate is kept"
    );
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    assert_eq!(mode(&dir.path().join("server.key")), 0o600);
    assert_eq!(
        cert_fingerprint(&pem_cert_to_der(first.ca_pem()).unwrap()),
        first.ca_fingerprint()
    );
    let ca_pem_on_disk = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    assert_eq!(ca_pem_on_disk, first.ca_pem());
}

#[tokio::test]
async fn new_name_reissues_server_cert_and_keeps_ca() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerPki::load_or_create(dir.path(), &[]).unwrap();
    let old_pem = std::fs::read(dir.path().join("server.pem")).unwrap();
    let names = vec!["backup.example".to_string(), "10.1.2.3".to_string()];
    let second = ServerPki::load_or_create(dir.path(), &names).unwrap();
    assert_eq!(first.ca_fingerprint(), second.ca_fingerprint());
    let new_pem = std::fs::read(dir.path().join("server.pem")).unwrap();
    assert_ne!(old_pem, new_pem);
    assert_eq!(mode(&dir.path().join("server.key")), 0o600);

    // Same names again: kept.
    ServerPki::load_or_create(dir.path(), &names).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("server.pem")).unwrap(),
        new_pem
    );

    // The new certificate is valid for the new names, still for localhost,
    // and agents enrolled earlier still trust it (same CA).
    for name in ["backup.example", "10.1.2.3", "localhost"] {
        let (server, client) = exchange(
            second.server_config().unwrap(),
            client_config_trusting(first.ca_pem()).unwrap(),
            name,
        )
        .await;
        server.unwrap();
        assert_eq!(client.unwrap(), b"ok", "{name}");
    }
    // The old one was not.
    let (_, client) = exchange(
        first.server_config().unwrap(),
        client_config_trusting(first.ca_pem()).unwrap(),
        "backup.example",
    )
    .await;
    assert!(client.is_err());
}

#[test]
fn damaged_server_cert_is_reissued_but_missing_ca_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerPki::load_or_create(dir.path(), &[]).unwrap();
    std::fs::write(dir.path().join("server.pem"), "garbage").unwrap();
    let second = ServerPki::load_or_create(dir.path(), &[]).unwrap();
    assert_eq!(first.ca_fingerprint(), second.ca_fingerprint());
    pem_cert_to_der(&std::fs::read_to_string(dir.path().join("server.pem")).unwrap()).unwrap();

    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let err = ServerPki::load_or_create(dir.path(), &[]).unwrap_err();
    assert!(err.to_string().contains("ca.key"), "{err}");
}

#[test]
fn invalid_server_name_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let err = ServerPki::load_or_create(dir.path(), &["not a name!".to_string()]).unwrap_err();
    assert!(matches!(err, Error::Cert(_)), "{err}");
}

#[test]
fn issue_client_cert_rejects_garbage_public_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::load_or_create(dir.path(), &[]).unwrap();
    let truncated = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";
    for bad in ["", "garbage", pki.ca_pem(), truncated] {
        let err = pki.issue_client_cert("host", bad).unwrap_err();
        assert!(matches!(err, Error::PublicKey(_)), "{bad:?}: {err}");
    }
    let agent_dir = tempfile::tempdir().unwrap();
    let good = AgentIdentity::prepare(agent_dir.path()).unwrap();
    assert!(matches!(
        pki.issue_client_cert("", &good),
        Err(Error::Cert(_))
    ));
    let cert = pki.issue_client_cert("host", &good).unwrap();
    pem_cert_to_der(&cert).unwrap();
}

#[test]
fn agent_identity_files() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("agent");
    let err = AgentIdentity::load(&sub).unwrap_err();
    assert!(
        matches!(&err, Error::NotEnrolled { path } if path.ends_with("agent.key")),
        "{err}"
    );
    let pk1 = AgentIdentity::prepare(&sub).unwrap();
    assert_eq!(mode(&sub.join("agent.key")), 0o600);
    assert_eq!(AgentIdentity::prepare(&sub).unwrap(), pk1, "key is kept");
    let err = AgentIdentity::load(&sub).unwrap_err();
    assert!(
        matches!(&err, Error::NotEnrolled { path } if path.ends_with("agent.pem")),
        "{err}"
    );

    // A certificate for some other key is refused and nothing is written.
    let server_dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::load_or_create(server_dir.path(), &[]).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other_pk = AgentIdentity::prepare(other_dir.path()).unwrap();
    let wrong = pki.issue_client_cert("h", &other_pk).unwrap();
    assert!(AgentIdentity::store(&sub, &wrong, pki.ca_pem()).is_err());
    assert!(!AgentIdentity::enrolled(&sub));

    let right = pki.issue_client_cert("h", &pk1).unwrap();
    AgentIdentity::store(&sub, &right, pki.ca_pem()).unwrap();
    assert!(AgentIdentity::enrolled(&sub));
    AgentIdentity::load(&sub).unwrap();
}

#[test]
fn server_pki_is_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ServerPki>();
    assert_send_sync::<AgentIdentity>();
}
