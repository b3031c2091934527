//! Test and benchmark support (feature `testing`): a handler that forwards
//! every tunnel to its authority on loopback, and a minimal outbound proxy
//! that turns accepted TCP connections into tunnels, as ztunnel's outbound
//! listener does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpStream};

use crate::copy::copy_bidirectional;
use crate::{Connect, ConnectRequest, InboundRequest, Pool, PoolKey, Refusal, Rejection};

/// Connects each tunnel to its authority; records every request it saw,
/// and what the server refused before one.
#[derive(Debug, Default, Clone)]
pub struct Forward {
    seen: Arc<Mutex<Vec<InboundRequest>>>,
    refused: Arc<Mutex<Vec<Refusal>>>,
}

impl Forward {
    /// The requests handled so far.
    pub fn seen(&self) -> Vec<InboundRequest> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What the server refused before a request reached the handler.
    pub fn refused(&self) -> Vec<Refusal> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Connect for Forward {
    async fn connect(&self, req: InboundRequest) -> Result<TcpStream, Rejection> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(req.clone());
        let tcp = TcpStream::connect(req.authority)
            .await
            .map_err(|e| Rejection::unavailable(format!("connect {}: {e}", req.authority)))?;
        tcp.set_nodelay(true)
            .map_err(|e| Rejection::unavailable(e.to_string()))?;
        Ok(tcp)
    }

    fn refused(&self, refusal: Refusal) {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(refusal);
    }
}

pub use crate::copy::attach;

/// Accepts TCP on `listener` and tunnels each connection to `target`
/// through `pool` with `key`, until the task is dropped.
pub async fn outbound_proxy(listener: TcpListener, pool: Pool, key: PoolKey, target: SocketAddr) {
    let key = Arc::new(key);
    while let Ok((mut tcp, _)) = listener.accept().await {
        let pool = pool.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(stream) = pool.connect(&key, &ConnectRequest::new(target)).await {
                let (r, w) = tcp.split();
                let _ = copy_bidirectional(r, w, stream).await;
            }
        });
    }
}
