//! The CA service: signs data planes' certificates over TLS, for the
//! identities each caller may hold. A ztunnel may obtain identities of pods
//! scheduled on its own node only, a waypoint only its own; anything else
//! is refused with `PERMISSION_DENIED` and the reason. Data planes use it
//! through `control_client::GrpcCa`.

use std::sync::Arc;

use identity::{CertificateAuthority, Identity};
use model::proto::ca::certificate_service_server::CertificateService;
use model::proto::ca::{SignRequest, SignResponse};
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Caller, authenticate};
use crate::metrics::Metrics;
use crate::stream::{ConfigServer, Placement};

/// Decides whether `caller` may hold `identity`; the error is the reason
/// given to the caller.
pub fn authorize(caller: &Caller, identity: &Identity, mesh: &Placement) -> Result<(), String> {
    match caller {
        Caller::Node(node) => {
            if mesh.runs(node, identity) {
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
    mesh: ConfigServer,
    metrics: Arc<Metrics>,
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
        mesh: ConfigServer,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            ca,
            auth,
            mesh,
            metrics,
        }
    }
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let caller = authenticate(&*self.auth, req.metadata()).await?;
        let req = req.into_inner();
        let identity: Identity = req
            .identity
            .parse()
            .map_err(|e| Status::invalid_argument(format!("identity {:?}: {e}", req.identity)))?;
        let mesh = self.mesh.placement();
        if let Err(reason) = authorize(&caller, &identity, &mesh) {
            tracing::warn!(?caller, %identity, %reason, "certificate refused");
            Metrics::add(&self.metrics.certificates_refused, 1);
            return Err(Status::permission_denied(reason));
        }
        let chain = self
            .ca
            .sign(&req.csr_der, &identity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(?caller, %identity, "certificate signed");
        Metrics::add(&self.metrics.certificates_signed, 1);
        Ok(Response::new(SignResponse {
            leaf_der: chain.leaf.to_vec(),
            intermediates_der: chain.intermediates.iter().map(|c| c.to_vec()).collect(),
            roots_der: chain.roots.iter().map(|c| c.to_vec()).collect(),
        }))
    }
}
