//! The CA service: signs data planes' certificates over TLS, for the
//! identities each caller may hold. A ztunnel may obtain identities of pods
//! scheduled on its own node only, a waypoint only its own; anything else
//! is refused with `PERMISSION_DENIED` and the reason. Callers
//! authenticate with a bearer token ([`Authenticator`]).
//!
//! [`GrpcCa`] is the data planes' side: `identity::CaClient` over this
//! service.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use identity::{CaClient, CaClientError, CertificateAuthority, Identity, SignedChain};
use model::Snapshot;
use model::proto::ca::certificate_service_client::CertificateServiceClient;
use model::proto::ca::certificate_service_server::{CertificateService, CertificateServiceServer};
use model::proto::ca::{SignRequest, SignResponse};
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Who a caller proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The ztunnel of a node.
    Node(String),
    /// A waypoint running as a service account.
    Waypoint {
        namespace: String,
        service_account: String,
    },
}

/// Turns a bearer token into a caller.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, token: &str) -> Option<Caller>;
}

/// Tokens from a file, for setups without Kubernetes:
/// `tokens: [{token: …, node: n1}, {token: …, waypoint: ns/sa}]`.
#[derive(Debug, Default)]
pub struct BootstrapTokens(HashMap<String, Caller>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    waypoint: Option<String>,
}

impl BootstrapTokens {
    pub fn parse(yaml: &str) -> Result<Self, String> {
        let file: TokenFile = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        let mut tokens = HashMap::new();
        for (i, e) in file.tokens.into_iter().enumerate() {
            let caller = match (e.node, e.waypoint) {
                (Some(node), None) => Caller::Node(node),
                (None, Some(wp)) => match wp.split_once('/') {
                    Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => Caller::Waypoint {
                        namespace: ns.into(),
                        service_account: sa.into(),
                    },
                    _ => {
                        return Err(format!(
                            "token {i}: waypoint {wp:?} is not <namespace>/<sa>"
                        ));
                    }
                },
                _ => return Err(format!("token {i}: needs exactly one of node, waypoint")),
            };
            if e.token.len() < 16 {
                return Err(format!("token {i}: shorter than 16 characters"));
            }
            tokens.insert(e.token, caller);
        }
        Ok(Self(tokens))
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate(&self, token: &str) -> Option<Caller> {
        self.0.get(token).cloned()
    }
}

/// Decides whether `caller` may hold `identity` in `mesh`; the error is
/// the reason given to the caller.
pub fn authorize(caller: &Caller, identity: &Identity, mesh: &Snapshot) -> Result<(), String> {
    match caller {
        Caller::Node(node) => {
            let on_node = mesh
                .config()
                .workloads
                .iter()
                .filter(|w| &w.node == node)
                .any(|w| mesh.identity(w) == Some(identity));
            if on_node {
                Ok(())
            } else {
                Err(format!(
                    "node {node} runs no pod with identity {identity}; a ztunnel may only obtain its own node's pods' identities"
                ))
            }
        }
        Caller::Waypoint {
            namespace,
            service_account,
        } => {
            if identity.namespace() == namespace && identity.service_account() == service_account {
                Ok(())
            } else {
                Err(format!(
                    "a waypoint running as {namespace}/{service_account} may only obtain its own identity, not {identity}"
                ))
            }
        }
    }
}

/// The service implementation.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    mesh: watch::Receiver<Arc<Snapshot>>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService").finish_non_exhaustive()
    }
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<dyn Authenticator>,
        mesh: watch::Receiver<Arc<Snapshot>>,
    ) -> Self {
        Self { ca, auth, mesh }
    }
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        let caller = self
            .auth
            .authenticate(token)
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        let req = req.into_inner();
        let identity: Identity = req
            .identity
            .parse()
            .map_err(|e| Status::invalid_argument(format!("identity {:?}: {e}", req.identity)))?;
        let mesh = self.mesh.borrow().clone();
        if let Err(reason) = authorize(&caller, &identity, &mesh) {
            tracing::warn!(?caller, %identity, %reason, "certificate refused");
            return Err(Status::permission_denied(reason));
        }
        let chain = self
            .ca
            .sign(&req.csr_der, &identity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(?caller, %identity, "certificate signed");
        Ok(Response::new(SignResponse {
            leaf_der: chain.leaf.to_vec(),
            intermediates_der: chain.intermediates.iter().map(|c| c.to_vec()).collect(),
            roots_der: chain.roots.iter().map(|c| c.to_vec()).collect(),
        }))
    }
}

/// Serves `service` over TLS (`tls`, from `identity::tls`) until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: CaService,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let svc = CertificateServiceServer::new(service);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => { tracing::warn!(%error, "CA accept"); continue; }
            },
            () = stop.cancelled() => return,
        };
        let acceptor = acceptor.clone();
        let svc = svc.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(error) => {
                    tracing::info!(%peer, %error, "CA TLS handshake failed");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(svc);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .http2_only()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}

/// `identity::CaClient` over the CA service: TLS to `addr` expecting the
/// controller's identity, the caller's token on every request.
#[derive(Clone)]
pub struct GrpcCa {
    addr: SocketAddr,
    token: String,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for GrpcCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcCa")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl GrpcCa {
    /// `roots`: the mesh root(s); `controller`: the identity the CA
    /// service must present.
    pub fn new(
        addr: SocketAddr,
        token: String,
        roots: &[CertificateDer<'static>],
        controller: Identity,
    ) -> Result<Self, rustls::Error> {
        let tls = identity::tls::bootstrap_client_config(roots, vec![controller])?;
        Ok(Self { addr, token, tls })
    }

    async fn client(
        &self,
    ) -> Result<CertificateServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
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
        let channel = tonic::transport::Endpoint::from_static("http://ambit-ca")
            .connect_with_connector(connector)
            .await?;
        Ok(CertificateServiceClient::new(channel))
    }
}

#[async_trait::async_trait]
impl CaClient for GrpcCa {
    async fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: &Identity,
    ) -> Result<SignedChain, CaClientError> {
        let mut client = self.client().await.map_err(|e| {
            // tonic says only "transport error"; the cause (refused, or
            // which identity the server presented) is in the sources.
            let mut reason = format!("CA at {}: {e}", self.addr);
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason.push_str(&format!(": {s}"));
                source = s.source();
            }
            CaClientError::Unavailable(reason.into())
        })?;
        let mut req = Request::new(SignRequest {
            identity: identity.to_string(),
            csr_der,
        });
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .map_err(|e| CaClientError::Refused(Box::new(e)))?;
        req.metadata_mut().insert("authorization", bearer);
        let resp = client
            .sign(req)
            .await
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                    CaClientError::Unavailable(Box::new(status))
                }
                _ => CaClientError::Refused(Box::new(status)),
            })?;
        let resp = resp.into_inner();
        Ok(SignedChain {
            leaf: CertificateDer::from(resp.leaf_der),
            intermediates: resp
                .intermediates_der
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            roots: resp
                .roots_der
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
        })
    }
}
