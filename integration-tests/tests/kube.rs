//! The controller against a Kubernetes API server (the fake in
//! `integration_tests::fake_api`, speaking the real list/watch protocol) with
//! the real kube watchers and a real data plane client: labelling a
//! namespace meshes its pods on the subscribed ztunnel, a deleted pod
//! disappears, a policy gets its status written back, the CA root lives in
//! a Secret, ztunnels authenticate by TokenReview and may obtain their own
//! node's identities only, and of two replicas one leads. A waypoint
//! Gateway is deployed, enrolls what is labelled for it, and reports
//! whether it is programmed; an HTTPRoute on a Service it serves goes to
//! that waypoint only, with its status written next to other
//! controllers'.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use control_client::{Controller, GrpcCa, StreamSource, controller_identity};
use controller::run::{KubeOptions, Running, Serve, start_kubernetes};
use controller::token_review::NODE_NAME_EXTRA;
use controller::waypoints::WaypointOptions;
use identity::{CertManager, Identity};
use integration_tests::fake_api::FakeApiServer;
use model::{ConfigSink, ConfigSource, InboundProtocol};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/namespaces/shop/pods";
const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes";
const POLICIES: &str = "/apis/security.ambit.dev/v1alpha1/namespaces/shop/authorizationpolicies";
const ZTUNNEL_SA: &str = "system:serviceaccount:ambit-system:ztunnel";

fn pod(name: &str, ip: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "labels": {"app": name.split('-').next().unwrap()}},
        "spec": {"nodeName": node, "serviceAccountName": name.split('-').next().unwrap(),
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"ambit.dev/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

async fn cluster() -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.apply(NAMESPACES, namespace("shop", false));
    api.apply(NAMESPACES, namespace("ambit-system", false));
    for node in ["n1", "n2"] {
        api.apply(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        );
    }
    api.apply(PODS, pod("web-0", "10.1.0.2", "n1"));
    api.apply(PODS, pod("db-0", "10.1.1.2", "n2"));
    api.apply(
        "/api/v1/namespaces/shop/services",
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5"], "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    );
    api.apply(
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abcde", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.2"], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "shop", "uid": "uid-web-0"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
    );
    api.add_token("ztunnel-n1-token", ZTUNNEL_SA, &[(NODE_NAME_EXTRA, "n1")]);
    api
}

async fn controller(api: &FakeApiServer, pod_name: &str) -> Running {
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    start_kubernetes(
        client,
        KubeOptions {
            serving: Serve {
                trust_domain: "cluster.local".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                ops: "127.0.0.1:0".parse().unwrap(),
            },
            namespace: "ambit-system".into(),
            pod_name: pod_name.into(),
            ca_secret: "ambit-ca".into(),
            lease: "ambit-controller".into(),
            lease_seconds: 15,
            ztunnel_service_account: "ztunnel".into(),
            token_audience: "ambit".into(),
            mesh_file: None,
            waypoints: WaypointOptions {
                waypoint_image: "ambit/waypoint:test".into(),
                controller_address: "ambit-controller.ambit-system.svc:15012".into(),
            },
        },
    )
    .await
    .unwrap()
}

fn endpoint(running: &Running, token: &str) -> Controller {
    Controller::new(
        running.addr,
        token.into(),
        &running.roots,
        controller_identity(&"cluster.local".parse().unwrap()),
    )
    .unwrap()
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn protocol(sink: &ConfigSink, name: &str) -> Option<InboundProtocol> {
    let config = sink.current();
    config
        .config()
        .workloads
        .iter()
        .find(|w| w.name == name)
        .map(|w| w.protocol)
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local".parse().unwrap(), ns, sa).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_reaches_a_subscribed_ztunnel_and_status_goes_back() {
    let api = cluster().await;
    let running = controller(&api, "controller-0").await;

    // The CA root was created in a Secret.
    let secret = api
        .get("/api/v1/namespaces/ambit-system/secrets", "ambit-ca")
        .unwrap();
    assert!(secret["data"]["ca-key.pem"].is_string());
    // Its certificate is published for the data planes of the namespace.
    let published = api
        .get(
            "/api/v1/namespaces/ambit-system/configmaps",
            "ambit-root-cert",
        )
        .unwrap();
    let root = published["data"]["root-cert.pem"].as_str().unwrap();
    assert_eq!(
        identity::ca::certs(root, "root").unwrap(),
        running.roots,
        "the ConfigMap holds the root the controller serves with"
    );

    // n1's ztunnel subscribes with its service account token.
    let sink = ConfigSink::new();
    let stop = CancellationToken::new();
    tokio::spawn(
        Box::new(StreamSource::new(endpoint(&running, "ztunnel-n1-token")))
            .run(sink.clone(), stop.clone()),
    );
    eventually("the pods, not meshed yet", || async {
        protocol(&sink, "web-0") == Some(InboundProtocol::Tcp)
            && protocol(&sink, "db-0") == Some(InboundProtocol::Tcp)
    })
    .await;
    assert_eq!(sink.current().config().services[0].endpoints, ["uid-web-0"]);

    // Label the namespace: its pods join the mesh.
    api.apply(NAMESPACES, namespace("shop", true));
    eventually("the pods meshed", || async {
        protocol(&sink, "web-0") == Some(InboundProtocol::Hbone)
            && protocol(&sink, "db-0") == Some(InboundProtocol::Hbone)
    })
    .await;

    // n1's ztunnel obtains its own pod's identity, not n2's pod's.
    let certs = CertManager::new(Arc::new(GrpcCa::new(endpoint(
        &running,
        "ztunnel-n1-token",
    ))));
    certs.fetch(&id("shop", "web")).await.unwrap();
    let err = certs
        .fetch(&id("shop", "db"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("node n1 runs no pod with identity"), "{err}");

    // Delete a pod: it disappears.
    api.delete(PODS, "db-0");
    eventually("db-0 gone", || async { protocol(&sink, "db-0").is_none() }).await;

    // A policy: enforced, and its status written back by the leader.
    api.apply(
        POLICIES,
        json!({"apiVersion": "security.ambit.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-legacy", "namespace": "shop", "generation": 3},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}}),
    );
    eventually("the policy at n1", || async {
        sink.current().config().authorization_policies.len() == 1
    })
    .await;
    eventually("the status written", || async {
        api.get(POLICIES, "deny-legacy").is_some_and(|p| {
            p["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.len() == 2)
        })
    })
    .await;
    let conditions = api.get(POLICIES, "deny-legacy").unwrap()["status"]["conditions"].clone();
    assert_eq!(conditions[0]["type"], "Accepted");
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(conditions[1]["type"], "Enforced");
    assert_eq!(conditions[1]["status"], "True");
    assert_eq!(conditions[1]["observedGeneration"], 3);

    // An invalid token is refused by TokenReview.
    let stranger = CertManager::new(Arc::new(GrpcCa::new(endpoint(&running, "forged"))));
    let err = stranger
        .fetch(&id("shop", "web"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid bearer token"), "{err}");

    // The status was written by way of the /status subresource, by the
    // Lease holder.
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("PATCH ") && r.ends_with("/deny-legacy/status"))
    );
    let lease = api
        .get(
            "/apis/coordination.k8s.io/v1/namespaces/ambit-system/leases",
            "ambit-controller",
        )
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "controller-0");
    stop.cancel();
    running.shutdown().await;
    allowed_by_the_manifests(&api);
}

/// Every request the controller made is allowed by its committed RBAC.
fn allowed_by_the_manifests(api: &FakeApiServer) {
    let denied = integration_tests::rbac::denied(
        &integration_tests::rbac::controller_manifests(),
        &api.requests(),
    );
    assert!(
        denied.is_empty(),
        "not allowed by manifests/controller.yaml:\n{}",
        denied.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_root_and_one_leads() {
    let api = cluster().await;
    let (a, b) = tokio::join!(
        controller(&api, "controller-a"),
        controller(&api, "controller-b")
    );
    assert_eq!(
        a.roots, b.roots,
        "both replicas sign with the root of the one Secret"
    );
    let lease = "/apis/coordination.k8s.io/v1/namespaces/ambit-system/leases";
    eventually("a leader", || async {
        api.get(lease, "ambit-controller").is_some()
    })
    .await;
    let holder = api.get(lease, "ambit-controller").unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        holder == "controller-a" || holder == "controller-b",
        "{holder}"
    );
    // Both serve config.
    for running in [&a, &b] {
        eventually("config served", || async { running.config.version() > 0 }).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/shop/deployments";
const SERVICES: &str = "/api/v1/namespaces/shop/services";

fn waypoint_of(sink: &ConfigSink, name: &str) -> Option<String> {
    let config = sink.current();
    let w = config
        .config()
        .workloads
        .iter()
        .find(|w| w.name == name)?
        .clone();
    w.waypoint.map(|wp| wp.address.to_string())
}

fn condition(api: &FakeApiServer, type_: &str) -> Option<(String, String)> {
    condition_of(api, "waypoint", type_)
}

fn condition_of(api: &FakeApiServer, gateway: &str, type_: &str) -> Option<(String, String)> {
    let gateway = api.get(GATEWAYS, gateway)?;
    let c = gateway["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((c["status"].as_str()?.into(), c["reason"].as_str()?.into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_is_deployed_enrolls_what_is_labelled_and_says_when_it_is_programmed() {
    let api = cluster().await;
    let running = controller(&api, "controller-0").await;
    let sink = ConfigSink::new();
    let stop = CancellationToken::new();
    tokio::spawn(
        Box::new(StreamSource::new(endpoint(&running, "ztunnel-n1-token")))
            .run(sink.clone(), stop.clone()),
    );
    api.apply(
        GATEWAYS,
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop"},
            "spec": {"gatewayClassName": "ambit-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
    );
    // A waypoint must take HBONE: this one is refused, and not deployed.
    api.apply(
        GATEWAYS,
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "http", "namespace": "shop"},
            "spec": {"gatewayClassName": "ambit-waypoint",
                     "listeners": [{"name": "web", "port": 80, "protocol": "HTTP"}]}}),
    );
    // Another controller's Gateway is left alone.
    api.apply(
        GATEWAYS,
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "ingress", "namespace": "shop"},
            "spec": {"gatewayClassName": "other", "listeners": []}}),
    );

    // The leader deploys it: everything owned by the Gateway.
    eventually("the waypoint's resources", || async {
        api.get(DEPLOYMENTS, "waypoint").is_some()
    })
    .await;
    let uid = api.get(GATEWAYS, "waypoint").unwrap()["metadata"]["uid"].clone();
    for (path, name) in [
        (DEPLOYMENTS, "waypoint"),
        (SERVICES, "waypoint"),
        ("/api/v1/namespaces/shop/serviceaccounts", "waypoint"),
        ("/api/v1/namespaces/shop/configmaps", "ambit-root-cert"),
    ] {
        let object = api
            .get(path, name)
            .unwrap_or_else(|| panic!("{path}/{name}"));
        assert_eq!(
            object["metadata"]["ownerReferences"][0]["uid"], uid,
            "{path}/{name}"
        );
    }
    let deployment = api.get(DEPLOYMENTS, "waypoint").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "waypoint");
    assert_eq!(pod["containers"][0]["image"], "ambit/waypoint:test");
    let root = api
        .get("/api/v1/namespaces/shop/configmaps", "ambit-root-cert")
        .unwrap();
    assert!(
        root["data"]["root-cert.pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r == "PATCH /apis/apps/v1/namespaces/shop/deployments/waypoint"),
        "applied server-side"
    );

    // No address yet (the fake API server allocates no cluster IPs).
    // Each Gateway's status is its own write: wait for both.
    eventually("accepted, no address", || async {
        condition(&api, "Accepted") == Some(("True".into(), "Accepted".into()))
            && condition(&api, "Programmed") == Some(("False".into(), "AddressNotAssigned".into()))
            && condition_of(&api, "http", "Accepted")
                == Some(("False".into(), "ListenersNotValid".into()))
    })
    .await;
    assert!(api.get(GATEWAYS, "ingress").unwrap()["status"].is_null());
    assert!(api.get(DEPLOYMENTS, "http").is_none());
    let mut service = api.get(SERVICES, "waypoint").unwrap();
    service["spec"]["clusterIP"] = json!("10.96.0.99");
    api.apply(SERVICES, service);
    eventually("an address, no replica", || async {
        condition(&api, "Programmed") == Some(("False".into(), "Pending".into()))
    })
    .await;
    let mut deployment = api.get(DEPLOYMENTS, "waypoint").unwrap();
    deployment["status"] = json!({"availableReplicas": 1});
    api.apply(DEPLOYMENTS, deployment);
    eventually("programmed", || async {
        condition(&api, "Programmed") == Some(("True".into(), "Programmed".into()))
    })
    .await;
    let gateway = api.get(GATEWAYS, "waypoint").unwrap();
    assert_eq!(gateway["status"]["addresses"][0]["value"], "10.96.0.99");
    assert!(gateway["status"]["conditions"][0]["lastTransitionTime"].is_string());

    // The namespace uses it; db's service account opts out.
    api.apply(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop",
            "labels": {"ambit.dev/dataplane-mode": "ambient", "ambit.dev/use-waypoint": "waypoint"}}}),
    );
    api.apply(
        "/api/v1/namespaces/shop/serviceaccounts",
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "db", "namespace": "shop", "labels": {"ambit.dev/use-waypoint": "none"}}}),
    );
    eventually("web-0 through the waypoint, db-0 not", || async {
        waypoint_of(&sink, "web-0").as_deref() == Some("10.96.0.99")
            && sink
                .current()
                .config()
                .workloads
                .iter()
                .any(|w| w.name == "db-0")
            && waypoint_of(&sink, "db-0").is_none()
    })
    .await;
    let config = sink.current();
    let services = &config.config().services;
    let web = services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(
        web.waypoint.as_ref().unwrap().address.to_string(),
        "10.96.0.99"
    );
    let own = services.iter().find(|s| s.name == "waypoint").unwrap();
    assert!(
        own.waypoint.is_none(),
        "the waypoint's own Service goes direct"
    );

    // An HTTPRoute on web goes to the waypoint, not to ztunnels; another
    // controller's status entry is kept.
    api.add_token("waypoint-token", "system:serviceaccount:shop:waypoint", &[]);
    let waypoint = ConfigSink::new();
    tokio::spawn(
        Box::new(StreamSource::new(endpoint(&running, "waypoint-token")))
            .run(waypoint.clone(), stop.clone()),
    );
    let other = json!({"parentRef": {"name": "ingress"}, "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""}]});
    api.apply(
        HTTP_ROUTES,
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop", "generation": 1},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"},
                                    {"group": "", "kind": "Service", "name": "db"}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                                "backendRefs": [{"name": "web", "port": 80}]}]},
            "status": {"parents": [other.clone()]}}),
    );
    eventually("the route at the waypoint", || async {
        waypoint.current().config().routes.len() == 1
    })
    .await;
    let route = waypoint.current().config().routes[0].clone();
    assert_eq!(route.parents.len(), 1, "there is no Service db: {route:?}");
    assert_eq!(route.parents[0].waypoint, "shop/waypoint");
    assert!(
        sink.current().config().routes.is_empty(),
        "ztunnels get no routes"
    );
    eventually("the route's status", || async {
        let r = api.get(HTTP_ROUTES, "web").unwrap();
        r["status"]["parents"]
            .as_array()
            .is_some_and(|p| p.len() == 3)
    })
    .await;
    let status = api.get(HTTP_ROUTES, "web").unwrap()["status"]["parents"].clone();
    assert_eq!(status[0], other, "another controller's entry kept");
    let accepted = |i: usize| {
        let c = &status[i]["conditions"][0];
        (c["status"].clone(), c["reason"].clone())
    };
    assert_eq!(accepted(1), (json!("True"), json!("Accepted")));
    assert_eq!(accepted(2), (json!("False"), json!("NoMatchingParent")));
    assert_eq!(status[1]["controllerName"], "ambit.dev/waypoint-controller");
    assert!(status[1]["conditions"][0]["lastTransitionTime"].is_string());

    // Another controller writes its entry and the controller's watch has
    // not seen it yet: its next status write meets 409 Conflict, reads the
    // route again and keeps that entry.
    let mut route = api.get(HTTP_ROUTES, "web").unwrap();
    let late = json!({"parentRef": {"name": "mesh-b"}, "controllerName": "example.com/other",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""}]});
    route["status"]["parents"]
        .as_array_mut()
        .unwrap()
        .insert(1, late.clone());
    api.apply_unannounced(HTTP_ROUTES, route);
    api.apply(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.6", "ports": [{"port": 5432}]}}),
    );
    eventually("db's parent accepted, the late entry kept", || async {
        let parents = api.get(HTTP_ROUTES, "web").unwrap()["status"]["parents"].clone();
        let db = parents
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["parentRef"]["name"] == "db")
            .cloned()
            .unwrap_or_default();
        db["conditions"][0]["reason"] == "Accepted" && parents[1] == late && parents[0] == other
    })
    .await;
    assert!(
        api.requests()
            .iter()
            .any(|r| r == "GET /apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web"),
        "read again after the conflict"
    );

    // Its Deployment deleted: applied again.
    api.delete(DEPLOYMENTS, "waypoint");
    eventually("the Deployment back", || async {
        api.get(DEPLOYMENTS, "waypoint").is_some()
    })
    .await;

    // The Gateway deleted: traffic goes direct again, and the route is
    // withdrawn, saying why.
    api.delete(GATEWAYS, "waypoint");
    eventually("web-0 direct", || async {
        waypoint_of(&sink, "web-0").is_none()
    })
    .await;
    eventually("the route withdrawn", || async {
        let r = api.get(HTTP_ROUTES, "web").unwrap();
        let ours = r["status"]["parents"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let web = ours.iter().find(|p| {
            p["parentRef"]["name"] == "web"
                && p["controllerName"] == "ambit.dev/waypoint-controller"
        });
        waypoint.current().config().routes.is_empty()
            && web.is_some_and(|p| p["conditions"][0]["reason"] == "NoWaypoint")
    })
    .await;
    stop.cancel();
    running.shutdown().await;
    allowed_by_the_manifests(&api);
}
