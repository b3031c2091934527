//! The controller's gRPC endpoint: the CA and the config stream on one TLS
//! port, with a certificate for the controller's own identity signed by
//! the mesh CA in-process (and renewed like any workload's, at half life).

use std::sync::Arc;
use std::time::Duration;

use identity::{CertManager, CertificateAuthority, Identity, InProcessCa};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The controller's serving certificate.
#[derive(Debug, Clone)]
pub struct ServingCert {
    certs: CertManager,
    identity: Identity,
}

impl ServingCert {
    /// Certificates for the controller's identity from `ca`.
    pub fn new(ca: Arc<CertificateAuthority>) -> Self {
        let identity = control_client::controller_identity(ca.trust_domain());
        Self {
            certs: CertManager::new(Arc::new(InProcessCa::new(ca))),
            identity,
        }
    }

    async fn config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let cert = self
            .certs
            .fetch(&self.identity)
            .await
            .map_err(|e| e.to_string())?;
        identity::tls::bootstrap_server_config(&cert).map_err(|e| e.to_string())
    }
}

/// How long open streams get to end after `stop`.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `routes` over TLS until `stop`, then lets open connections
/// drain (streams are ended by their services) for a few seconds.
/// Bytes a connection may send the controller ahead of its reading.
const RECEIVE_WINDOW: u32 = 64 << 10;

pub async fn serve(
    listener: TcpListener,
    cert: ServingCert,
    routes: tonic::service::Routes,
    stop: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept");
                    // Out of descriptors, typically: give it a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let tls = match cert.config().await {
            Ok(tls) => tls,
            Err(error) => {
                tracing::error!(%error, "no serving certificate; connection dropped");
                continue;
            }
        };
        let routes = routes.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let tls = match tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await {
                Ok(tls) => tls,
                Err(error) => {
                    tracing::info!(%peer, %error, "TLS handshake failed");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(routes);
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder = builder.http2_only();
            // Data planes send little (a Hello, ACKs, CSRs): small receive
            // windows bound what a connection can make the controller
            // buffer before it is read, with 1,000 of them connected.
            builder
                .http2()
                .initial_stream_window_size(RECEIVE_WINDOW)
                .initial_connection_window_size(RECEIVE_WINDOW);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(DRAIN, conn).await;
        });
    }
    connections.close();
    connections.wait().await;
}
