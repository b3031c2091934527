//! The mesh TLS configurations, exercised with in-memory handshakes: identity
//! checks on both sides, the trust-domain rule, and certificates carrying zero
//! or several URI SANs.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::sync::Arc;

use identity::Identity;
use identity::ca::DEFAULT_LEAF_TTL;
use identity::testing::{TestRoot, unchecked_client as raw_client, workload};
use identity::tls::{self, PeerIdentityError};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn root() -> TestRoot {
    TestRoot::new()
}

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

/// Drives a handshake in memory; returns each side's outcome.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> (
    Result<ClientConnection, rustls::Error>,
    Result<ServerConnection, rustls::Error>,
) {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut c = ClientConnection::new(client, name).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    let (mut c_err, mut s_err) = (None, None);
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() && s_err.is_none() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            if let Err(e) = s.process_new_packets() {
                s_err = Some(e);
            }
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() && c_err.is_none() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            if let Err(e) = c.process_new_packets() {
                c_err = Some(e);
            }
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    (c_err.map_or(Ok(c), Err), s_err.map_or(Ok(s), Err))
}

fn unexpected(e: &rustls::Error) -> &PeerIdentityError {
    tls::peer_identity_error(e).unwrap_or_else(|| panic!("not an identity error: {e:?}"))
}

#[test]
fn mutual_tls_with_expected_identity() {
    let ca = root().ca("cluster.local", DEFAULT_LEAF_TTL);
    let client = workload(&ca, CART);
    let server = workload(&ca, CHECKOUT);
    let config = tls::client_config(&client, vec![Identity::parse(CHECKOUT).unwrap()]).unwrap();
    let (c, s) = handshake(config, server.server_config().clone());
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!(tls::peer_identity(&c).unwrap().to_string(), CHECKOUT);
    assert_eq!(tls::peer_identity(&s).unwrap().to_string(), CART);
    assert_eq!(c.alpn_protocol(), Some(tls::ALPN_H2));
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(s.server_name(), None, "no SNI is sent");
}

#[test]
fn client_refuses_a_server_with_another_identity() {
    let ca = root().ca("cluster.local", DEFAULT_LEAF_TTL);
    let client = workload(&ca, CART);
    let server = workload(&ca, CHECKOUT);
    let expected = vec![Identity::parse("spiffe://cluster.local/ns/shop/sa/payments").unwrap()];
    let (c, s) = handshake(
        tls::client_config(&client, expected).unwrap(),
        server.server_config().clone(),
    );
    let err = c.unwrap_err();
    match unexpected(&err) {
        PeerIdentityError::Unexpected {
            presented,
            expected,
        } => {
            assert_eq!(presented.to_string(), CHECKOUT);
            assert_eq!(expected[0].service_account(), "payments");
        }
        other => panic!("{other:?}"),
    }
    let s_err = s.unwrap_err();
    assert!(
        matches!(
            s_err,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateUnknown)
        ),
        "{s_err:?}"
    );
}

#[test]
fn any_of_several_expected_identities_is_accepted() {
    let ca = root().ca("cluster.local", DEFAULT_LEAF_TTL);
    let client = workload(&ca, CART);
    let server = workload(&ca, CHECKOUT);
    let expected = vec![
        Identity::parse("spiffe://cluster.local/ns/shop/sa/payments").unwrap(),
        Identity::parse(CHECKOUT).unwrap(),
    ];
    let (c, _) = handshake(
        tls::client_config(&client, expected).unwrap(),
        server.server_config().clone(),
    );
    c.unwrap();
}

#[test]
fn server_refuses_a_client_from_another_trust_domain_even_with_a_shared_root() {
    let root = root();
    let mesh = root.ca("cluster.local", DEFAULT_LEAF_TTL);
    let other = root.ca("other.local", DEFAULT_LEAF_TTL);
    let server = workload(&mesh, CHECKOUT);
    let client = workload(&other, "spiffe://other.local/ns/shop/sa/cart");
    let config = tls::client_config(&client, vec![Identity::parse(CHECKOUT).unwrap()]).unwrap();
    let (_, s) = handshake(config, server.server_config().clone());
    let err = s.unwrap_err();
    assert!(
        matches!(
            unexpected(&err),
            PeerIdentityError::ForeignTrustDomain { .. }
        ),
        "{err}"
    );
}

#[test]
fn server_refuses_a_client_from_another_root() {
    let server = workload(&root().ca("cluster.local", DEFAULT_LEAF_TTL), CHECKOUT);
    let client = workload(&root().ca("cluster.local", DEFAULT_LEAF_TTL), CART);
    let config = tls::client_config(&client, vec![Identity::parse(CHECKOUT).unwrap()]).unwrap();
    let (c, _) = handshake(config, server.server_config().clone());
    // The client already refuses the server's chain (unknown issuer).
    assert!(matches!(
        c.unwrap_err(),
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    ));
}

fn raw_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ServerConfig> {
    Arc::new(
        ServerConfig::builder_with_provider(tls::provider().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

#[test]
fn certificates_with_zero_or_several_uri_sans_are_rejected_by_both_sides() {
    let root = root();
    let ca = root.ca("cluster.local", DEFAULT_LEAF_TTL);
    let server = workload(&ca, CHECKOUT);
    let client = workload(&ca, CART);
    for (uris, count) in [(vec![], 0), (vec![CART, CHECKOUT], 2)] {
        // As a client certificate.
        let (_, s) = handshake(
            raw_client(Some(root.leaf(&uris))),
            server.server_config().clone(),
        );
        let err = s.unwrap_err();
        assert_eq!(
            unexpected(&err),
            &PeerIdentityError::UriSanCount { count },
            "client cert with {count} URI SANs"
        );
        // As a server certificate.
        let (chain, key) = root.leaf(&uris);
        let config = tls::client_config(&client, vec![Identity::parse(CHECKOUT).unwrap()]).unwrap();
        let (c, _) = handshake(config, raw_server(chain, key));
        let err = c.unwrap_err();
        assert_eq!(
            unexpected(&err),
            &PeerIdentityError::UriSanCount { count },
            "server cert with {count} URI SANs"
        );
    }
}

#[test]
fn server_accepts_a_client_that_offers_no_alpn() {
    let root = root();
    let ca = root.ca("cluster.local", DEFAULT_LEAF_TTL);
    let server = workload(&ca, CHECKOUT);
    let mut client = (*raw_client(Some(root.leaf(&[CART])))).clone();
    client.alpn_protocols.clear();
    let (c, s) = handshake(Arc::new(client), server.server_config().clone());
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.alpn_protocol(), None);
    assert_eq!(tls::peer_identity(&s).unwrap().to_string(), CART);
}

#[test]
fn server_requires_a_client_certificate() {
    let ca = root().ca("cluster.local", DEFAULT_LEAF_TTL);
    let server = workload(&ca, CHECKOUT);
    let (c, s) = handshake(raw_client(None), server.server_config().clone());
    assert!(
        matches!(s.unwrap_err(), rustls::Error::NoCertificatesPresented),
        "server demands a certificate"
    );
    assert!(matches!(
        c.unwrap_err(),
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
    ));
}
