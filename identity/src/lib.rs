//! Identity for the Ambit mesh: SPIFFE IDs, the certificate authority that
//! issues X.509-SVIDs, the certificate manager data planes use to obtain and
//! rotate them, and every rustls configuration in the workspace.
//!
//! Used by ztunnel and waypoints (client and server TLS per workload
//! identity), by the controller (the CA) and by the HBONE crate.

pub mod ca;
pub mod manager;
pub mod spiffe;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod workload;
pub mod x509;

pub use ca::{CaError, CertificateAuthority, PluggedCa, SignedChain};
pub use manager::{CaClient, CaClientError, CertError, CertManager, InProcessCa};
pub use spiffe::{Identity, SpiffeId, SpiffeIdError, TrustDomain};
pub use workload::WorkloadCert;
