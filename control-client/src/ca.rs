//! `identity::CaClient` over the controller's CA service.

use identity::{CaClient, CaClientError, Identity, SignedChain};
use model::proto::ca::SignRequest;
use model::proto::ca::certificate_service_client::CertificateServiceClient;
use rustls_pki_types::CertificateDer;

use crate::channel::Controller;

/// Certificates signed by the controller, for the identities this caller
/// may hold.
#[derive(Debug, Clone)]
pub struct GrpcCa {
    controller: Controller,
}

impl GrpcCa {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }
}

#[async_trait::async_trait]
impl CaClient for GrpcCa {
    async fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: &Identity,
    ) -> Result<SignedChain, CaClientError> {
        let channel = self
            .controller
            .channel()
            .await
            .map_err(|e| CaClientError::Unavailable(Box::new(e)))?;
        let req = self
            .controller
            .request(SignRequest {
                identity: identity.to_string(),
                csr_der,
            })
            .map_err(|e| CaClientError::Refused(Box::new(e)))?;
        let resp = CertificateServiceClient::new(channel)
            .sign(req)
            .await
            .map_err(|status| {
                let unavailable = matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                );
                let error = Box::new(self.controller.status(status));
                if unavailable {
                    CaClientError::Unavailable(error)
                } else {
                    CaClientError::Refused(error)
                }
            })?
            .into_inner();
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
