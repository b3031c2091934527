//! The gRPC echo service (`ambit.echo.v1.Echo`), served by tonic.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::echo::Identity;

#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("ambit.echo.v1");
}

use proto::echo_server::{Echo, EchoServer};
use proto::{EchoRequest, EchoResponse};

/// Answers each call with the message, the server's identity and what it saw.
#[derive(Debug, Clone)]
pub struct EchoService {
    identity: Arc<Identity>,
}

impl EchoService {
    pub fn new(identity: Identity) -> EchoServer<Self> {
        EchoServer::new(Self {
            identity: Arc::new(identity),
        })
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let metadata: HashMap<String, String> = req
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let id = &self.identity;
        Ok(Response::new(EchoResponse {
            message: req.into_inner().message,
            pod: id.pod.clone(),
            namespace: id.namespace.clone(),
            node: id.node.clone(),
            peer,
            metadata,
        }))
    }
}
