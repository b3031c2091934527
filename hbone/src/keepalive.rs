//! HTTP/2 PING keepalive: detects peers that vanished without closing, so
//! pooled connections and their tunnels do not hang forever.

use std::time::Duration;

use h2::{Ping, PingPong};

/// How often to PING and how long to wait for the PONG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// Istio's ztunnel values: a PING every 10 s, dropped after 20 s silent.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Why keepalive ended: the connection must be dropped.
#[derive(Debug)]
pub(crate) enum Failure {
    NoPong,
    Closed,
}

impl Keepalive {
    /// Pings every `interval`; returns when a PONG is late or the connection
    /// is gone. Must be polled alongside the connection itself.
    pub(crate) async fn run(self, mut ping_pong: Option<PingPong>) -> Failure {
        let Some(ping_pong) = ping_pong.as_mut() else {
            // h2 hands the PingPong out once; without it there is nothing to do.
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(self.interval).await;
            match tokio::time::timeout(self.timeout, ping_pong.ping(Ping::opaque())).await {
                Ok(Ok(_pong)) => {}
                Ok(Err(_)) => return Failure::Closed,
                Err(_) => return Failure::NoPong,
            }
        }
    }
}
