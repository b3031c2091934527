//! The mesh certificate authority: turns certificate signing requests into
//! X.509-SVIDs for identities the caller has authorized.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;

use crate::spiffe::{Identity, SpiffeId, TrustDomain};
use crate::x509;

/// Default lifetime of a workload certificate.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a self-generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start being valid a little in the past so that a peer whose clock
/// runs slightly behind the CA's does not reject a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(60);

/// The file names of a plugged-in CA directory (the layout Istio uses, so that
/// existing `cacerts` secrets can be reused).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// Why the CA could not be set up or refused to sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error(
        "the CA certificate does not chain to the root certificates: a test leaf failed verification ({reason})"
    )]
    BrokenChain { reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is malformed or its signature is invalid: {0}")]
    BadCsr(rcgen::Error),
    #[error("the CSR key is {found}; workload keys must be ECDSA P-256")]
    KeyAlgorithm { found: String },
    #[error(
        "the CSR must request exactly one URI SAN (the workload identity), it requests {count} subject alternative names"
    )]
    SanCount { count: usize },
    #[error("the CSR requests {requested:?}, which is not a valid SPIFFE ID: {reason}")]
    BadRequestedId { requested: String, reason: String },
    #[error("the CSR requests {requested} but the caller is only authorized for {authorized}")]
    NotAuthorized {
        requested: String,
        authorized: Identity,
    },
    #[error("{identity} is outside this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: TrustDomain,
    },
}

/// A certificate chain issued for one identity: the leaf, the intermediates
/// up to (not including) the root, and the roots a peer must trust.
#[derive(Debug, Clone)]
pub struct SignedChain {
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// PEM contents of a plugged-in root or intermediate CA.
#[derive(Clone)]
pub struct PluggedCa {
    /// The certificate that signs workload certificates (a root or an intermediate).
    pub ca_cert_pem: String,
    /// Its private key (PKCS#8, SEC1 or PKCS#1 PEM).
    pub ca_key_pem: String,
    /// The root certificate(s) peers trust.
    pub root_cert_pem: String,
    /// Further intermediates between the CA certificate and the root, if any.
    pub cert_chain_pem: Option<String>,
}

impl std::fmt::Debug for PluggedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("PluggedCa")
            .field("intermediates", &self.cert_chain_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl PluggedCa {
    /// Reads `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` and the optional
    /// `cert-chain.pem` from a directory.
    pub fn from_dir(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| CaError::Read { path, source })
        };
        let chain_path = dir.join(CERT_CHAIN_FILE);
        Ok(Self {
            ca_cert_pem: read(CA_CERT_FILE)?,
            ca_key_pem: read(CA_KEY_FILE)?,
            root_cert_pem: read(ROOT_CERT_FILE)?,
            cert_chain_pem: chain_path
                .exists()
                .then(|| read(CERT_CHAIN_FILE))
                .transpose()?,
        })
    }
}

/// Parameters and key of a new self-signed ECDSA P-256 root.
fn root_params(trust_domain: &TrustDomain) -> Result<(CertificateParams, KeyPair), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, "Ambit mesh root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_TTL;
    params.serial_number = Some(random_serial());
    Ok((params, key))
}

/// Signs workload certificates for one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    issuer_not_after: OffsetDateTime,
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    leaf_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .field("leaf_ttl", &self.leaf_ttl)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a root CA and writes it to `dir` in the plugged-in layout
    /// (`ca-cert.pem` = `root-cert.pem`, `ca-key.pem` readable by its owner
    /// only), for local setups that share one root between processes.
    pub fn write_root(dir: &Path, trust_domain: &TrustDomain) -> Result<(), CaError> {
        let root = Self::generate_root(trust_domain)?;
        let write = |name: &str, text: &str, mode: u32| {
            use std::os::unix::fs::OpenOptionsExt;
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
                .map_err(|source| CaError::Read { path, source })
        };
        std::fs::create_dir_all(dir).map_err(|source| CaError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        write(CA_KEY_FILE, &root.ca_key_pem, 0o600)?;
        write(CA_CERT_FILE, &root.ca_cert_pem, 0o644)?;
        write(ROOT_CERT_FILE, &root.root_cert_pem, 0o644)
    }

    /// Generates a root CA in the plugged-in form (PEM texts), to be kept
    /// somewhere durable (a directory, a Kubernetes Secret) and loaded with
    /// [`CertificateAuthority::plugged`].
    pub fn generate_root(trust_domain: &TrustDomain) -> Result<PluggedCa, CaError> {
        let (params, key) = root_params(trust_domain)?;
        let root = params.self_signed(&key)?;
        Ok(PluggedCa {
            ca_cert_pem: root.pem(),
            ca_key_pem: key.serialize_pem(),
            root_cert_pem: root.pem(),
            cert_chain_pem: None,
        })
    }

    /// Creates a CA with a freshly generated ECDSA P-256 root.
    pub fn self_signed(trust_domain: TrustDomain, leaf_ttl: Duration) -> Result<Self, CaError> {
        let (params, key) = root_params(&trust_domain)?;
        let root = params.self_signed(&key)?;
        Ok(Self {
            trust_domain,
            issuer_not_after: params.not_after,
            issuer: Issuer::new(params, key),
            intermediates: Vec::new(),
            roots: vec![root.der().clone()],
            leaf_ttl,
        })
    }

    /// Uses a plugged-in root or intermediate. The CA signs a test leaf and
    /// verifies it against the roots, so a mismatched key or a chain that does
    /// not reach the root is refused here rather than at the first handshake.
    pub fn plugged(
        trust_domain: TrustDomain,
        leaf_ttl: Duration,
        ca: &PluggedCa,
    ) -> Result<Self, CaError> {
        let ca_cert = one_cert(&ca.ca_cert_pem, CA_CERT_FILE)?;
        let key = KeyPair::from_pem(&ca.ca_key_pem).map_err(|e| CaError::Pem {
            what: CA_KEY_FILE,
            reason: e.to_string(),
        })?;
        if x509::spki(&ca_cert).map_err(|reason| CaError::Pem {
            what: CA_CERT_FILE,
            reason,
        })? != key.subject_public_key_info()
        {
            return Err(CaError::KeyMismatch);
        }
        let roots = certs(&ca.root_cert_pem, ROOT_CERT_FILE)?;
        let mut intermediates = Vec::new();
        if !roots.contains(&ca_cert) {
            intermediates.push(ca_cert.clone());
        }
        for cert in ca
            .cert_chain_pem
            .as_deref()
            .map(|pem| certs(pem, CERT_CHAIN_FILE))
            .transpose()?
            .unwrap_or_default()
        {
            if !roots.contains(&cert) && !intermediates.contains(&cert) {
                intermediates.push(cert);
            }
        }
        let issuer_not_after = x509::not_after(&ca_cert).map_err(|reason| CaError::Pem {
            what: CA_CERT_FILE,
            reason,
        })?;
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| CaError::Pem {
            what: CA_CERT_FILE,
            reason: e.to_string(),
        })?;
        let this = Self {
            trust_domain,
            issuer,
            issuer_not_after,
            intermediates,
            roots,
            leaf_ttl,
        };
        this.self_check()?;
        Ok(this)
    }

    fn self_check(&self) -> Result<(), CaError> {
        let probe = Identity::new(self.trust_domain.clone(), "ambit-system", "ca-self-check")
            .expect("constant identity parts are valid");
        let (csr, _key) = generate_csr(&probe)?;
        let chain = self.sign(&csr, &probe)?;
        x509::verify_leaf(&chain, UnixTime::now(), x509::Usage::Server)
            .map_err(|reason| CaError::BrokenChain { reason })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificates peers must trust.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Lifetime of issued leaves.
    pub fn leaf_ttl(&self) -> Duration {
        self.leaf_ttl
    }

    /// Signs `csr_der` if it requests exactly `authorized`, the identity the
    /// caller was authorized for, with an ECDSA P-256 key.
    pub fn sign(&self, csr_der: &[u8], authorized: &Identity) -> Result<SignedChain, CaError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(CaError::BadCsr)?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::KeyAlgorithm {
                found: format!("{:?}", csr.public_key.algorithm()),
            });
        }
        let requested = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri.as_str().to_string(),
            other => return Err(CaError::SanCount { count: other.len() }),
        };
        let requested_id = SpiffeId::parse(&requested).map_err(|e| CaError::BadRequestedId {
            requested: requested.clone(),
            reason: e.to_string(),
        })?;
        if requested_id != authorized.to_spiffe_id() {
            return Err(CaError::NotAuthorized {
                requested,
                authorized: authorized.clone(),
            });
        }
        if authorized.trust_domain() != &self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                identity: authorized.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let params = self.leaf_params(&requested)?;
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(SignedChain {
            leaf: leaf.der().clone(),
            intermediates: self.intermediates.clone(),
            roots: self.roots.clone(),
        })
    }

    fn leaf_params(&self, uri: &str) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        // An empty subject: the identity lives only in the URI SAN, which rcgen
        // then marks critical as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        // A leaf never outlives the certificate that signed it.
        params.not_after = (now + self.leaf_ttl).min(self.issuer_not_after);
        Ok(params)
    }
}

/// Generates an ECDSA P-256 key and a CSR requesting `identity` as the only
/// URI SAN. Returns the DER CSR and the PKCS#8 key.
pub fn generate_csr(identity: &Identity) -> Result<(Vec<u8>, PrivateKeyDer<'static>), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().as_str().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((csr.der().to_vec(), key_der))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Every certificate of a PEM text; `what` names it in errors.
pub fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaError::Pem {
            what,
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

fn one_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, CaError> {
    let mut all = certs(pem, what)?;
    if all.len() != 1 {
        return Err(CaError::Pem {
            what,
            reason: format!(
                "expected exactly one certificate, found {} (put further intermediates in {CERT_CHAIN_FILE})",
                all.len()
            ),
        });
    }
    Ok(all.remove(0))
}
