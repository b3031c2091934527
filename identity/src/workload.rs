//! A workload's certificate and key, checked once on receipt and ready to use
//! in handshakes.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use tokio::time::Instant;

use crate::ca::SignedChain;
use crate::spiffe::Identity;
use crate::tls;
use crate::x509::{self, Usage};

/// Why an issued certificate was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvalidCertError {
    #[error("issued chain does not verify for {usage}: {reason}")]
    Chain { usage: &'static str, reason: String },
    #[error("issued certificate names {found}, {expected} was requested")]
    WrongIdentity { expected: Identity, found: String },
    #[error("issued certificate does not match the private key: {0}")]
    Key(String),
    #[error("issued certificate validity cannot be read: {0}")]
    Validity(String),
}

/// The certificate, key, trust roots and prepared TLS server configuration of
/// one identity. Immutable; rotation replaces the whole value.
pub struct WorkloadCert {
    identity: Identity,
    certified_key: Arc<CertifiedKey>,
    anchors: Arc<[TrustAnchor<'static>]>,
    roots: Vec<CertificateDer<'static>>,
    server_config: Arc<ServerConfig>,
    not_before: SystemTime,
    not_after: SystemTime,
    expires_at: Instant,
    refresh_at: Instant,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Checks an issued chain (it verifies against its roots for both server
    /// and client use, names `identity`, matches `key`) and prepares it.
    pub fn new(
        identity: Identity,
        key: PrivateKeyDer<'static>,
        chain: SignedChain,
    ) -> Result<Self, InvalidCertError> {
        let now = UnixTime::now();
        for (usage, name) in [(Usage::Server, "serverAuth"), (Usage::Client, "clientAuth")] {
            x509::verify_leaf(&chain, now, usage).map_err(|reason| InvalidCertError::Chain {
                usage: name,
                reason,
            })?;
        }
        let found = tls::identity_of(&chain.leaf).map_err(|e| InvalidCertError::WrongIdentity {
            expected: identity.clone(),
            found: e.to_string(),
        })?;
        if found != identity {
            return Err(InvalidCertError::WrongIdentity {
                expected: identity,
                found: found.to_string(),
            });
        }
        let validity = x509::validity(&chain.leaf).map_err(InvalidCertError::Validity)?;
        let signing_key = tls::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| InvalidCertError::Key(e.to_string()))?;
        let mut cert_chain = Vec::with_capacity(1 + chain.intermediates.len());
        cert_chain.push(chain.leaf);
        cert_chain.extend(chain.intermediates);
        let certified_key = Arc::new(CertifiedKey::new(cert_chain, signing_key));
        certified_key
            .keys_match()
            .map_err(|e| InvalidCertError::Key(e.to_string()))?;
        let anchors: Arc<[TrustAnchor<'static>]> = x509::trust_anchors(&chain.roots)
            .map_err(|reason| InvalidCertError::Chain {
                usage: "trust anchors",
                reason,
            })?
            .into();
        let server_config = tls::server_config(
            certified_key.clone(),
            anchors.clone(),
            identity.trust_domain().clone(),
        )
        .map_err(|e| InvalidCertError::Key(e.to_string()))?;
        let (expires_at, refresh_at) = deadlines(validity.1);
        Ok(Self {
            identity,
            certified_key,
            anchors,
            roots: chain.roots,
            server_config,
            not_before: validity.0,
            not_after: validity.1,
            expires_at,
            refresh_at,
        })
    }

    /// The identity this certificate proves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Leaf plus intermediates, and the signing key.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The roots this workload trusts, as webpki anchors.
    pub fn trust_anchors(&self) -> &Arc<[TrustAnchor<'static>]> {
        &self.anchors
    }

    /// The roots this workload trusts, as DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// A TLS server configuration presenting this certificate.
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.server_config
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When, on the runtime's clock, the certificate stops being usable.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// When, on the runtime's clock, a replacement should be obtained (half life).
    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
    }

    /// Whether the certificate is past its validity.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.expires_at
    }
}

/// Converts wall-clock validity into deadlines on the runtime clock once, on
/// receipt, so that scheduling follows `tokio::time` (and tests can pause it).
/// Renewal is due at half of the lifetime left at receipt (not counted from
/// `not_before`, which is backdated) and never sooner than
/// [`MIN_REFRESH`], so a very short-lived certificate cannot make the
/// manager hammer the CA.
fn deadlines(not_after: SystemTime) -> (Instant, Instant) {
    let now = Instant::now();
    let remaining = not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    (now + remaining, now + (remaining / 2).max(MIN_REFRESH))
}

/// Shortest time between receiving a certificate and renewing it.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
