//! The CA service over TLS with the real certificate manager as client: a
//! ztunnel obtains its own node's pods' identities and nothing else, a
//! waypoint only its own, unknown callers nothing.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::sync::Arc;

use control_client::{Controller, GrpcCa, controller_identity};
use controller::auth::BootstrapTokens;
use controller::ca::CaService;
use controller::metrics::Metrics;
use controller::server::{ServingCert, serve};
use controller::stream::ConfigServer;
use identity::ca::DEFAULT_LEAF_TTL;
use identity::{CertManager, CertificateAuthority, Identity, TrustDomain};
use model::MeshConfig;
use model::proto::ca::certificate_service_server::CertificateServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const NODE_ONE: &str = "node-one-bootstrap-token";
const WAYPOINT: &str = "waypoint-bootstrap-token";

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local".parse().unwrap(), ns, sa).unwrap()
}

#[tokio::test]
async fn callers_get_only_the_identities_they_may_hold() {
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let ca = Arc::new(CertificateAuthority::self_signed(td.clone(), DEFAULT_LEAF_TTL).unwrap());
    let controller = controller_identity(&td);
    let config: MeshConfig = serde_yaml::from_str(
        "workloads:
  - {uid: a, name: web-0, namespace: shop, serviceAccount: web, ips: [10.0.0.1], node: n1}
  - {uid: b, name: db-0, namespace: shop, serviceAccount: db, ips: [10.0.0.2], node: n2}",
    )
    .unwrap();
    let tokens = Arc::new(
        BootstrapTokens::parse(&format!(
            "tokens: [{{token: {NODE_ONE}, node: n1}}, {{token: {WAYPOINT}, waypoint: shop/wp}}]"
        ))
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let mesh = ConfigServer::new(tokens.clone(), metrics.clone(), stop.clone());
    mesh.publish(config);
    let routes = tonic::service::Routes::new(CertificateServiceServer::new(CaService::new(
        ca.clone(),
        tokens,
        mesh,
        metrics.clone(),
    )));
    tokio::spawn(serve(
        listener,
        ServingCert::new(ca.clone()),
        routes,
        stop.clone(),
    ));
    let roots = ca.roots().to_vec();
    let manager = |token: &str, expect: Identity| {
        CertManager::new(Arc::new(GrpcCa::new(
            Controller::new(addr, token.into(), &roots, expect).unwrap(),
        )))
    };

    // n1's ztunnel gets its pod's identity, a certificate that works.
    let node_one = manager(NODE_ONE, controller.clone());
    let cert = node_one.fetch(&id("shop", "web")).await.unwrap();
    assert_eq!(cert.identity(), &id("shop", "web"));
    // A pod of another node: refused, with the reason.
    let err = node_one.fetch(&id("shop", "db")).await.unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains("does not have permission")
            && err
                .contains("node n1 runs no pod with identity spiffe://cluster.local/ns/shop/sa/db"),
        "{err}"
    );

    // A waypoint: its own identity only.
    let waypoint = manager(WAYPOINT, controller.clone());
    waypoint.fetch(&id("shop", "wp")).await.unwrap();
    let err = waypoint
        .fetch(&id("shop", "web"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("may only obtain its own identity"), "{err}");

    // Unknown token: nothing.
    let err = manager("not-a-token-at-all", controller.clone())
        .fetch(&id("shop", "web"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("valid authentication credentials") && err.contains("unknown token"),
        "{err}"
    );

    // A server that is not the controller is not trusted.
    let err = manager(NODE_ONE, id("ambit-system", "impostor"))
        .fetch(&id("shop", "web"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("impostor"), "{err}");
    assert_eq!(Metrics::get(&metrics.certificates_signed), 2);
    assert_eq!(Metrics::get(&metrics.certificates_refused), 2);
    stop.cancel();
}

#[test]
fn bootstrap_token_files_are_checked() {
    for (yaml, want) in [
        (
            "tokens: [{token: abcdefghijklmnopq}]",
            "needs exactly one of node, waypoint",
        ),
        (
            "tokens: [{token: short, node: n1}]",
            "shorter than 16 characters",
        ),
        (
            "tokens: [{token: abcdefghijklmnopq, waypoint: wp}]",
            "is not <namespace>/<sa>",
        ),
    ] {
        let err = BootstrapTokens::parse(yaml).unwrap_err();
        assert!(err.contains(want), "{yaml}: {err}");
    }
}
