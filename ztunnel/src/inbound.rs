//! Inbound HBONE for one captured pod: tunnels accepted on the pod's 15008
//! (TLS with the pod's own certificate, protocol checks in `hbone`) are
//! connected to the application inside the pod's namespace.

use std::net::{IpAddr, Ipv4Addr};

use hbone::{Handler, InboundRequest, Rejection};
use tokio::net::TcpStream;

use crate::netns::PodSockets;

/// Connects admitted tunnels to the pod's application.
#[derive(Debug)]
pub struct InboundHandler {
    ip: Ipv4Addr,
    sockets: PodSockets,
}

impl InboundHandler {
    pub fn new(ip: Ipv4Addr, sockets: PodSockets) -> Self {
        Self { ip, sockets }
    }
}

impl Handler for InboundHandler {
    async fn connect(&self, req: InboundRequest) -> Result<TcpStream, Rejection> {
        // The server already refused an authority for another IP; this
        // guards a listener that was bound more widely.
        if req.authority.ip() != IpAddr::V4(self.ip) {
            return Err(Rejection::unavailable(format!(
                "no workload {} behind this listener",
                req.authority.ip()
            )));
        }
        // Connecting to the pod's own IP from inside its namespace stays on
        // loopback, so the inbound program does not capture it again.
        self.sockets
            .connect(req.authority)
            .await
            .map_err(|e| Rejection::unavailable(format!("connect {}: {e}", req.authority)))
    }
}
