//! Every rustls configuration in Ambit is built here: TLS 1.3 only, AES-GCM
//! suites only, ALPN `h2`, no SNI, no resumption, and SPIFFE identity checks
//! in place of host names.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::spiffe::{Identity, TrustDomain};
use crate::workload::WorkloadCert;
use crate::x509::{self, Usage};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// The workspace's one crypto provider: aws-lc-rs restricted to the suites
/// and groups HBONE peers use.
pub fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let base = aws_lc_rs::default_provider();
        Arc::new(CryptoProvider {
            cipher_suites: vec![
                aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ],
            kx_groups: vec![
                aws_lc_rs::kx_group::X25519,
                aws_lc_rs::kx_group::SECP256R1,
                aws_lc_rs::kx_group::SECP384R1,
            ],
            ..base
        })
    })
}

fn algorithms() -> &'static WebPkiSupportedAlgorithms {
    &provider().signature_verification_algorithms
}

/// Why a peer's certificate was refused after its chain verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("peer certificate cannot be read: {0}")]
    Parse(String),
    #[error("peer certificate carries {count} URI SANs; exactly one SPIFFE ID is required")]
    UriSanCount { count: usize },
    #[error("peer certificate URI SAN {uri:?} is not a mesh identity: {reason}")]
    NotAnIdentity { uri: String, reason: String },
    #[error("peer presented {presented}, expected {}", list(.expected))]
    Unexpected {
        presented: Identity,
        expected: Vec<Identity>,
    },
    #[error("peer {presented} is outside the trust domain {trust_domain}")]
    ForeignTrustDomain {
        presented: Identity,
        trust_domain: TrustDomain,
    },
}

fn list(ids: &[Identity]) -> String {
    let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
    if names.len() == 1 {
        names.concat()
    } else {
        format!("one of [{}]", names.join(", "))
    }
}

impl From<PeerIdentityError> for rustls::Error {
    fn from(e: PeerIdentityError) -> Self {
        // `Other` makes rustls send the `certificate_unknown` alert, as HBONE
        // peers do on an identity mismatch.
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// Reads the single SPIFFE identity of a certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, PeerIdentityError> {
    let uris = x509::uri_sans(cert).map_err(PeerIdentityError::Parse)?;
    match uris.as_slice() {
        [uri] => Identity::parse(uri).map_err(|e| PeerIdentityError::NotAnIdentity {
            uri: uri.clone(),
            reason: e.to_string(),
        }),
        _ => Err(PeerIdentityError::UriSanCount { count: uris.len() }),
    }
}

/// The identity a finished handshake's peer proved, if it presented a certificate.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| identity_of(leaf).ok())
}

/// Finds the `PeerIdentityError` inside a handshake error, so that callers
/// can report which identity was expected and which was presented.
pub fn peer_identity_error(error: &rustls::Error) -> Option<&PeerIdentityError> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<PeerIdentityError>()
        }
        _ => None,
    }
}

/// Server configuration presenting `cert`, requiring a client certificate
/// from the same trust domain.
pub(crate) fn server_config(
    cert: Arc<CertifiedKey>,
    anchors: Arc<[TrustAnchor<'static>]>,
    trust_domain: TrustDomain,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let verifier = Arc::new(TrustDomainClientVerifier {
        anchors,
        trust_domain,
    });
    let mut config = ServerConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCert(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client configuration presenting `cert` and accepting only a server whose
/// identity is one of `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = Arc::new(IdentityServerVerifier {
        anchors: cert.trust_anchors().clone(),
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedCert(cert.certified_key().clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Server configuration of a service whose clients have no certificate
/// yet (the CA: callers prove who they are with a token): presents `cert`,
/// asks for none.
pub fn bootstrap_server_config(cert: &WorkloadCert) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(cert.certified_key().clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client configuration without a certificate (for reaching the CA before
/// having one), accepting only a server chained to `roots` whose identity
/// is one of `expected`.
pub fn bootstrap_client_config(
    roots: &[CertificateDer<'static>],
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let anchors: Arc<[TrustAnchor<'static>]> = crate::x509::trust_anchors(roots)
        .map_err(rustls::Error::General)?
        .into();
    let verifier = Arc::new(IdentityServerVerifier { anchors, expected });
    let mut config = ClientConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server name handed to rustls: never sent (SNI is off) nor checked
/// (identities are), but rustls needs one.
pub fn server_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client side: the chain must reach a mesh root and the leaf's single URI
/// SAN must be one of the expected identities.
struct IdentityServerVerifier {
    anchors: Arc<[TrustAnchor<'static>]>,
    expected: Vec<Identity>,
}

impl fmt::Debug for IdentityServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        x509::verify_path(end_entity, intermediates, &self.anchors, now, Usage::Server)?;
        let presented = identity_of(end_entity)?;
        if !self.expected.contains(&presented) {
            return Err(PeerIdentityError::Unexpected {
                presented,
                expected: self.expected.clone(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not allowed in the mesh".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: a client certificate is mandatory, must reach a mesh root
/// and must name exactly one identity in the server's trust domain.
struct TrustDomainClientVerifier {
    anchors: Arc<[TrustAnchor<'static>]>,
    trust_domain: TrustDomain,
}

impl fmt::Debug for TrustDomainClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustDomainClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        x509::verify_path(end_entity, intermediates, &self.anchors, now, Usage::Client)?;
        let presented = identity_of(end_entity)?;
        if presented.trust_domain() != &self.trust_domain {
            return Err(PeerIdentityError::ForeignTrustDomain {
                presented,
                trust_domain: self.trust_domain.clone(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not allowed in the mesh".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
