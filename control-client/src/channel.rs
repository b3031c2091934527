//! The TLS connection to the controller's gRPC endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
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
    Connect { addr: String, reason: String },
    /// The controller answered with an error.
    #[error("controller at {addr}: {status}")]
    Status {
        addr: String,
        status: Box<tonic::Status>,
    },
    /// The controller sent something this data plane cannot follow.
    #[error("controller at {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    /// The token to present could not be read.
    #[error("token {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    /// The mesh roots could not be read, or the TLS config not built.
    #[error("mesh roots {path}: {reason}")]
    Roots { path: PathBuf, reason: String },
}

/// The token a data plane presents.
#[derive(Clone)]
enum Token {
    Fixed(String),
    /// Read again for every request: a Kubernetes projected service
    /// account token is rotated in place.
    File(PathBuf),
}

/// Where the controller is and how to reach it.
#[derive(Clone)]
pub struct Controller {
    /// `host:port`; a name is resolved on every connection, so a
    /// controller Service that moves is followed.
    addr: String,
    token: Token,
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
        Ok(Self {
            addr: addr.to_string(),
            token: Token::Fixed(token),
            tls,
        })
    }

    /// The controller at `host:port` (a DNS name or an IP address), with
    /// the token read from `token_file` for every request.
    pub fn at(
        addr: String,
        token_file: PathBuf,
        roots: &[CertificateDer<'static>],
        expected: Identity,
    ) -> Result<Self, rustls::Error> {
        let tls = identity::tls::bootstrap_client_config(roots, vec![expected])?;
        Ok(Self {
            addr,
            token: Token::File(token_file),
            tls,
        })
    }

    /// [`Controller::at`] with the mesh roots read from `roots_file`
    /// (PEM); the token file is read once now, so a missing one fails at
    /// start rather than at the first request.
    pub fn from_files(
        addr: String,
        token_file: PathBuf,
        roots_file: &std::path::Path,
        trust_domain: &identity::TrustDomain,
    ) -> Result<Self, ClientError> {
        std::fs::read_to_string(&token_file).map_err(|e| ClientError::Token {
            path: token_file.clone(),
            reason: e.to_string(),
        })?;
        let roots_err = |reason: String| ClientError::Roots {
            path: roots_file.to_path_buf(),
            reason,
        };
        let pem = std::fs::read_to_string(roots_file).map_err(|e| roots_err(e.to_string()))?;
        let roots =
            identity::ca::certs(&pem, "mesh roots").map_err(|e| roots_err(e.to_string()))?;
        Self::at(
            addr,
            token_file,
            &roots,
            crate::controller_identity(trust_domain),
        )
        .map_err(|e| roots_err(e.to_string()))
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A request carrying the caller's token.
    pub(crate) fn request<T>(&self, message: T) -> Result<tonic::Request<T>, ClientError> {
        let mut req = tonic::Request::new(message);
        let token = match &self.token {
            Token::Fixed(token) => token.clone(),
            Token::File(path) => std::fs::read_to_string(path)
                .map_err(|e| ClientError::Token {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .trim()
                .to_string(),
        };
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Protocol {
                addr: self.addr.clone(),
                reason: "the token is not a valid header value".into(),
            })?;
        req.metadata_mut().insert("authorization", bearer);
        Ok(req)
    }

    /// A new HTTP/2 connection. Keepalive pings notice a controller that
    /// went away without closing the connection.
    pub(crate) async fn channel(&self) -> Result<Channel, ClientError> {
        let (addr, tls) = (self.addr.clone(), self.tls.clone());
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let (addr, tls) = (addr.clone(), tls.clone());
            async move {
                let tcp = TcpStream::connect(addr.as_str()).await?;
                // The controller is checked by its SPIFFE identity; the
                // name sent is its address.
                let ip = tcp.peer_addr()?.ip();
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(identity::tls::server_name(ip), tcp)
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
                addr: self.addr.clone(),
                reason: chain(&e),
            })
    }

    pub(crate) fn status(&self, status: tonic::Status) -> ClientError {
        ClientError::Status {
            addr: self.addr.clone(),
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
