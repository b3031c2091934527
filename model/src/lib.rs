//! The mesh model: what ztunnels and waypoints need to know about the
//! cluster (and what waypoints do with HTTP: [`route`]), in one form whatever produced it (the controller's stream, or a
//! local file in tests and small setups).
//!
//! [`MeshConfig`] is the wire/file form; [`Snapshot`] is a validated,
//! indexed, immutable view of one config, swapped atomically when a new
//! config is accepted. A config is accepted whole or not at all.

mod config;
pub mod policy;
pub mod resources;
pub mod route;
mod snapshot;
pub mod source;

/// The gRPC wire types and services (generated from `proto/`).
pub mod proto {
    /// The CA service.
    #[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
    pub mod ca {
        tonic::include_proto!("ambit.ca.v1");
    }

    /// The config stream.
    #[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
    pub mod config {
        tonic::include_proto!("ambit.config.v1");
    }
}

pub use config::{
    InboundProtocol, Locality, MeshConfig, Service, ServicePort, TrafficDistribution, WaypointRef,
    Workload,
};
pub use policy::{
    Action, AuthorizationPolicy, Connection, Decision, PeerAuthMode, PeerAuthentication,
    PolicyScope, Verdict,
};
pub use route::{Route, RouteKind};
pub use snapshot::{ConfigError, ServiceTarget, Snapshot};
pub use source::{ConfigSink, ConfigSource, FileSource};
