//! The accept loop: TLS (rustls) on every connection, HTTP/1.1 or HTTP/2 by ALPN, and
//! the client certificate's fingerprint handed to the router as a request extension.
//! (axum's own `serve` cannot see client certificates.)

use crate::api::Peer;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                eprintln!("holdfast server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A handshake that stalls (or a foreign certificate) ends here.
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(15), acceptor.accept(tcp)).await
            else {
                return;
            };
            let peer = Peer {
                cert_fingerprint: stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| pki::cert_fingerprint(c.as_ref())),
            };
            let svc =
                app.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http2()
                .max_concurrent_streams(64)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .max_frame_size(1 << 20);
            let _ = builder
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await;
        });
    }
}
