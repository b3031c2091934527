//! HTTP/2 PING keepalive: detects peers that vanished without closing, so
//! pooled connections and their tunnels do not hang forever.

use h2::{Ping, PingPong};

use crate::settings::{PING_INTERVAL, PING_TIMEOUT};

/// Why keepalive ended: the connection must be dropped.
#[derive(Debug)]
pub(crate) enum Failure {
    NoPong,
    Closed,
}

/// Pings every [`PING_INTERVAL`]; returns when a PONG is late or the
/// connection is gone. Must be polled alongside the connection itself.
pub(crate) async fn run(mut ping_pong: Option<PingPong>) -> Failure {
    let Some(ping_pong) = ping_pong.as_mut() else {
        // h2 hands the PingPong out once; without it there is nothing to do.
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return Failure::Closed,
            Err(_) => return Failure::NoPong,
        }
    }
}
