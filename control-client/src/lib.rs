//! How data planes talk to the controller: one TLS endpoint
//! ([`Controller`]) carrying the config stream ([`StreamSource`], a
//! `model::ConfigSource`) and the CA ([`GrpcCa`], an `identity::CaClient`).
//!
//! Data planes have no certificate before the controller signs one: they
//! check the controller's certificate against the mesh root and its
//! identity, and prove who they are with a bearer token.

mod ca;
mod channel;
mod stream;

pub use ca::GrpcCa;
pub use channel::{ClientError, Controller};
pub use stream::{StreamSource, Subscription};

/// The namespace and service account the controller runs as; data planes
/// expect its certificate to carry that identity.
pub const CONTROLLER_NAMESPACE: &str = "ambit-system";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "ambit-controller";

/// The controller's identity in `trust_domain`.
pub fn controller_identity(trust_domain: &identity::TrustDomain) -> identity::Identity {
    identity::Identity::new(
        trust_domain.clone(),
        CONTROLLER_NAMESPACE,
        CONTROLLER_SERVICE_ACCOUNT,
    )
    .expect("constant namespace and service account are valid")
}
