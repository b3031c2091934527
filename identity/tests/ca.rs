//! The CA issues exactly the X.509-SVIDs the mesh needs, and refuses
//! everything else.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::time::Duration;

use identity::ca::{DEFAULT_LEAF_TTL, generate_csr};
use identity::{CaError, CertificateAuthority, Identity, PluggedCa, SignedChain, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(td(), ns, sa).unwrap()
}

fn issue(ca: &CertificateAuthority, identity: &Identity) -> SignedChain {
    let (csr, _key) = generate_csr(identity).unwrap();
    ca.sign(&csr, identity).unwrap()
}

/// Verifies like a TLS peer would, with webpki, for both uses.
fn webpki_verify(chain: &SignedChain) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = chain
        .roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain.leaf)?;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain.intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

#[test]
fn issued_leaf_verifies_with_webpki_and_has_exact_extensions() {
    let ca = CertificateAuthority::self_signed(td(), DEFAULT_LEAF_TTL).unwrap();
    let identity = id("shop", "checkout");
    let chain = issue(&ca, &identity);
    assert!(chain.intermediates.is_empty());
    assert_eq!(chain.roots, ca.roots());
    webpki_verify(&chain).unwrap();

    let (rest, cert) = X509Certificate::from_der(&chain.leaf).unwrap();
    assert!(rest.is_empty());
    assert_eq!(cert.version().0, 2, "X.509 v3");
    assert!(cert.subject().iter().next().is_none(), "empty subject");
    // ECDSA P-256 key, signed with ECDSA/SHA-256 by the P-256 root.
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1"
    );
    assert_eq!(
        cert.public_key()
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap()
            .to_id_string(),
        "1.2.840.10045.3.1.7"
    );
    assert_eq!(
        cert.signature_algorithm.algorithm.to_id_string(),
        "1.2.840.10045.4.3.2"
    );
    let lifetime = cert.validity().time_to_expiration().unwrap();
    assert!(
        lifetime <= time::Duration::hours(24)
            && lifetime > time::Duration::hours(24) - time::Duration::minutes(1),
        "24 h TTL, got {lifetime}"
    );

    let mut seen = Vec::new();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                assert!(ext.critical, "SAN is critical when the subject is empty");
                let names: Vec<_> = san.general_names.iter().collect();
                assert_eq!(names.len(), 1, "exactly one SAN");
                assert!(
                    matches!(names[0], GeneralName::URI(uri) if *uri == "spiffe://cluster.local/ns/shop/sa/checkout")
                );
                seen.push("san");
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ext.critical, "keyUsage is critical");
                assert!(ku.digital_signature());
                assert_eq!(ku.flags, 1, "digitalSignature only, got {ku}");
                seen.push("ku");
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                assert!(!eku.any && !eku.code_signing && !eku.email_protection);
                assert!(!eku.time_stamping && !eku.ocsp_signing && eku.other.is_empty());
                seen.push("eku");
            }
            ParsedExtension::BasicConstraints(bc) => {
                assert!(!bc.ca, "cA=false");
                seen.push("bc");
            }
            ParsedExtension::AuthorityKeyIdentifier(_) => seen.push("aki"),
            ParsedExtension::SubjectKeyIdentifier(_) => seen.push("ski"),
            other => panic!("unexpected extension {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, ["aki", "bc", "eku", "ku", "san", "ski"]);
}

#[test]
fn ttl_is_configurable() {
    let ca = CertificateAuthority::self_signed(td(), Duration::from_secs(3600)).unwrap();
    let chain = issue(&ca, &id("a", "b"));
    let (_, cert) = X509Certificate::from_der(&chain.leaf).unwrap();
    let lifetime = cert.validity().time_to_expiration().unwrap();
    assert!(lifetime <= time::Duration::hours(1) && lifetime > time::Duration::minutes(59));
}

#[test]
fn refuses_csr_for_an_identity_the_caller_is_not_authorized_for() {
    let ca = CertificateAuthority::self_signed(td(), DEFAULT_LEAF_TTL).unwrap();
    let (csr, _) = generate_csr(&id("shop", "admin")).unwrap();
    let err = ca.sign(&csr, &id("shop", "checkout")).unwrap_err();
    assert!(matches!(err, CaError::NotAuthorized { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/shop/sa/admin")
    );
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/shop/sa/checkout")
    );
}

#[test]
fn refuses_identity_of_another_trust_domain() {
    let ca = CertificateAuthority::self_signed(td(), DEFAULT_LEAF_TTL).unwrap();
    let other = Identity::new(TrustDomain::new("other.local").unwrap(), "a", "b").unwrap();
    let (csr, _) = generate_csr(&other).unwrap();
    let err = ca.sign(&csr, &other).unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
}

fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn refuses_malformed_csrs() {
    let ca = CertificateAuthority::self_signed(td(), DEFAULT_LEAF_TTL).unwrap();
    let who = id("shop", "checkout");
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();

    let none = csr_with(&p256, vec![]);
    assert!(matches!(
        ca.sign(&none, &who),
        Err(CaError::SanCount { count: 0 })
    ));

    let two = csr_with(
        &p256,
        vec![
            uri(&who.to_string()),
            SanType::DnsName("x.example".try_into().unwrap()),
        ],
    );
    assert!(matches!(
        ca.sign(&two, &who),
        Err(CaError::SanCount { count: 2 })
    ));

    let bad_uri = csr_with(&p256, vec![uri("spiffe://cluster.local/ns//sa/x")]);
    assert!(matches!(
        ca.sign(&bad_uri, &who),
        Err(CaError::BadRequestedId { .. })
    ));

    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let wrong_key = csr_with(&p384, vec![uri(&who.to_string())]);
    assert!(matches!(
        ca.sign(&wrong_key, &who),
        Err(CaError::KeyAlgorithm { .. })
    ));

    let mut tampered = csr_with(&p256, vec![uri(&who.to_string())]);
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    assert!(matches!(ca.sign(&tampered, &who), Err(CaError::BadCsr(_))));

    assert!(matches!(
        ca.sign(b"not a csr", &who),
        Err(CaError::BadCsr(_))
    ));
}

struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    cert: CertificateDer<'static>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn root(name: &str) -> TestCa {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = ca_params(name);
    let cert = params.self_signed(&key).unwrap().der().clone();
    TestCa { params, key, cert }
}

fn intermediate(name: &str, parent: &TestCa) -> TestCa {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = ca_params(name);
    let issuer = rcgen::Issuer::from_params(&parent.params, &parent.key);
    let cert = params.signed_by(&key, &issuer).unwrap().der().clone();
    TestCa { params, key, cert }
}

fn pem(cert: &CertificateDer<'_>) -> String {
    let b64 = base64_encode(cert);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out + "-----END CERTIFICATE-----\n"
}

fn base64_encode(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in der.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

#[test]
fn plugged_in_intermediate_chains_to_its_root() {
    let root = root("test root");
    let mid = intermediate("test intermediate", &root);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("ca-cert.pem"), pem(&mid.cert)).unwrap();
    std::fs::write(dir.join("ca-key.pem"), mid.key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), pem(&root.cert)).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        pem(&mid.cert) + &pem(&root.cert),
    )
    .unwrap();

    let plugged = PluggedCa::from_dir(&dir).unwrap();
    let ca = CertificateAuthority::plugged(td(), DEFAULT_LEAF_TTL, &plugged).unwrap();
    let chain = issue(&ca, &id("shop", "checkout"));
    assert_eq!(
        chain.intermediates,
        vec![mid.cert.clone()],
        "leaf chain includes the intermediate"
    );
    assert_eq!(chain.roots, vec![root.cert.clone()]);
    webpki_verify(&chain).unwrap();

    // Without the intermediate a peer cannot build the path.
    let broken = SignedChain {
        intermediates: vec![],
        ..chain
    };
    assert!(matches!(
        webpki_verify(&broken),
        Err(webpki::Error::UnknownIssuer)
    ));
    drop(tmp);
}

#[test]
fn plugged_in_root_is_used_directly() {
    let root = root("plugged root");
    let plugged = PluggedCa {
        ca_cert_pem: pem(&root.cert),
        ca_key_pem: root.key.serialize_pem(),
        root_cert_pem: pem(&root.cert),
        cert_chain_pem: None,
    };
    let ca = CertificateAuthority::plugged(td(), DEFAULT_LEAF_TTL, &plugged).unwrap();
    let chain = issue(&ca, &id("a", "b"));
    assert!(chain.intermediates.is_empty());
    webpki_verify(&chain).unwrap();
}

#[test]
fn plugged_in_ca_is_checked_at_load() {
    let root_a = root("root a");
    let root_b = root("root b");
    let mid = intermediate("mid of a", &root_a);

    let wrong_key = PluggedCa {
        ca_cert_pem: pem(&mid.cert),
        ca_key_pem: root_a.key.serialize_pem(),
        root_cert_pem: pem(&root_a.cert),
        cert_chain_pem: None,
    };
    let err = CertificateAuthority::plugged(td(), DEFAULT_LEAF_TTL, &wrong_key).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch), "{err}");

    let wrong_root = PluggedCa {
        ca_cert_pem: pem(&mid.cert),
        ca_key_pem: mid.key.serialize_pem(),
        root_cert_pem: pem(&root_b.cert),
        cert_chain_pem: None,
    };
    let err = CertificateAuthority::plugged(td(), DEFAULT_LEAF_TTL, &wrong_root).unwrap_err();
    assert!(matches!(err, CaError::BrokenChain { .. }), "{err}");

    let not_pem = PluggedCa {
        ca_cert_pem: "garbage".into(),
        ..wrong_root.clone()
    };
    let err = CertificateAuthority::plugged(td(), DEFAULT_LEAF_TTL, &not_pem).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::Pem {
                what: "ca-cert.pem",
                ..
            }
        ),
        "{err}"
    );

    let missing = PluggedCa::from_dir(std::path::Path::new("/nonexistent-ambit-ca")).unwrap_err();
    assert!(missing.to_string().contains("ca-cert.pem"), "{missing}");
}

#[test]
fn a_written_root_loads_as_a_plugged_ca_and_keeps_its_key_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    CertificateAuthority::write_root(&ca_dir, &td()).unwrap();
    let mode = std::fs::metadata(ca_dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
    let ca = CertificateAuthority::plugged(
        td(),
        DEFAULT_LEAF_TTL,
        &PluggedCa::from_dir(&ca_dir).unwrap(),
    )
    .unwrap();
    let chain = issue(&ca, &id("demo", "echo"));
    webpki_verify(&chain).unwrap();
    assert!(chain.intermediates.is_empty(), "the root signs directly");
}
