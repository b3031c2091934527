//! Test support (feature `testing`): a root whose key tests hold, so they can
//! run several trust domains under one root and mint certificates the mesh CA
//! never would; and TLS clients that skip the checks the mesh enforces, to
//! prove the server side enforces them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::ca::{PluggedCa, generate_csr};
use crate::{CertificateAuthority, Identity, TrustDomain, WorkloadCert, tls};

/// A self-signed ECDSA P-256 root with its key.
#[derive(Debug)]
pub struct TestRoot {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Default for TestRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl TestRoot {
    /// A root with a unique name (so that chains never confuse two roots).
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("test root {n} of process {}", std::process::id()),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let pem = params.self_signed(&key).expect("self-sign test root").pem();
        Self { params, key, pem }
    }

    /// The root certificate, PEM (what a mesh roots file holds).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A mesh CA for `trust_domain` signing directly with this root.
    pub fn ca(&self, trust_domain: &str, leaf_ttl: Duration) -> CertificateAuthority {
        let plugged = PluggedCa {
            ca_cert_pem: self.pem.clone(),
            ca_key_pem: self.key.serialize_pem(),
            root_cert_pem: self.pem.clone(),
            cert_chain_pem: None,
        };
        let td = TrustDomain::new(trust_domain).expect("valid test trust domain");
        CertificateAuthority::plugged(td, leaf_ttl, &plugged).expect("test CA")
    }

    /// A leaf with arbitrary URI SANs (possibly none or several).
    pub fn leaf(&self, uris: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("test URI is IA5")))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign test leaf");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }
}

/// Issues a workload certificate for `uri` from `ca`.
pub fn workload(ca: &CertificateAuthority, uri: &str) -> WorkloadCert {
    let identity = Identity::parse(uri).expect("valid test identity");
    let (csr, key) = generate_csr(&identity).expect("CSR");
    let chain = ca.sign(&csr, &identity).expect("sign");
    WorkloadCert::new(identity, key, chain).expect("issued cert is valid")
}

/// A TLS 1.3 client that accepts any server and presents `cert` (or none).
pub fn unchecked_client(
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut config = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("test client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
