//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS, wire
//! compatible with Istio's ztunnel.
//!
//! The [`Pool`] opens and shares client connections (one per source
//! identity, expected destination identities, destination and source IP),
//! the [`server`] terminates them and hands each CONNECT to a [`Handler`],
//! and [`copy`] moves bytes between a TCP socket and a stream with
//! end-to-end backpressure. Used by ztunnel (both sides) and waypoints.

pub mod client;
pub mod copy;
mod early;
mod error;
pub mod headers;
mod keepalive;
pub mod pool;
pub mod server;
mod settings;
mod stream;
#[cfg(feature = "testing")]
pub mod testing;

pub use client::Dialer;
pub use early::EarlyData;
pub use error::Error;
pub use headers::{Baggage, ConnectRequest, Forwarded, TraceParent};
pub use keepalive::Keepalive;
pub use pool::{Pool, PoolConfig, PoolKey, PoolObserver};
pub use server::{
    Connect, Handler, InboundRequest, Refusal, Rejection, Server, ServerOptions, Tunnel,
};
pub use settings::HBONE_PORT;
pub use stream::H2Stream;
