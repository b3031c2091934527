//! The TLS connection to the controller's gRPC endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use identity::Identity;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// Why the controller could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection (refused, TLS failure, wrong identity presented).
    #[error("controller at {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The controller answered with an error.
    #[error("controller at {addr}: {status}")]
    Status {
        addr: SocketAddr,
        status: Box<tonic::Status>,
    },
    /// The controller sent something this data plane cannot follow.
    #[error("controller at {addr}: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
}

/// Where the controller is and how to reach it.
#[derive(Clone)]
pub struct Controller {
    addr: SocketAddr,
    token: String,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Controller")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// `roots`: the mesh root(s); `expected`: the identity the controller
    /// must present ([`crate::controller_identity`]).
    pub fn new(
        addr: SocketAddr,
        token: String,
        roots: &[CertificateDer<'static>],
        expected: Identity,
    ) -> Result<Self, rustls::Error> {
        let tls = identity::tls::bootstrap_client_config(roots, vec![expected])?;
        Ok(Self { addr, token, tls })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A request carrying the caller's token.
    pub(crate) fn request<T>(&self, message: T) -> Result<tonic::Request<T>, ClientError> {
        let mut req = tonic::Request::new(message);
        let bearer =
            format!("Bearer {}", self.token)
                .parse()
                .map_err(|_| ClientError::Protocol {
                    addr: self.addr,
                    reason: "the token is not a valid header value".into(),
                })?;
        req.metadata_mut().insert("authorization", bearer);
        Ok(req)
    }

    /// A new HTTP/2 connection. Keepalive pings notice a controller that
    /// went away without closing the connection.
    pub(crate) async fn channel(&self) -> Result<Channel, ClientError> {
        let (addr, tls) = (self.addr, self.tls.clone());
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(identity::tls::server_name(addr.ip()), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        // The URI only names the channel: the connector dials `addr`.
        tonic::transport::Endpoint::from_static("http://ambit-controller")
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_with_connector(connector)
            .await
            .map_err(|e| ClientError::Connect {
                addr: self.addr,
                reason: chain(&e),
            })
    }

    pub(crate) fn status(&self, status: tonic::Status) -> ClientError {
        ClientError::Status {
            addr: self.addr,
            status: Box::new(status),
        }
    }
}

/// An error with its sources: tonic says only "transport error"; the
/// cause (refused, or which identity the server presented) is below.
fn chain(error: &dyn std::error::Error) -> String {
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    reason
}
