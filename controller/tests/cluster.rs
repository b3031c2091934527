//! The cluster's objects into the mesh config: meshed pods, opt-out,
//! services and their endpoints, policies, waypoints.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use controller::cluster::Cluster;
use model::{InboundProtocol, Snapshot};

fn objects<T: serde::de::DeserializeOwned>(yaml: &str) -> Vec<std::sync::Arc<T>> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| std::sync::Arc::new(serde::Deserialize::deserialize(doc).unwrap()))
        .collect()
}

fn pod(ns: &str, name: &str, ip: &str, node: &str, extra_labels: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  uid: uid-{name}
  labels: {{app: {app}, pod-template-hash: 5d9c7b{extra_labels}}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {app}-5d9c7b, uid: rs, controller: true}}]
spec: {{nodeName: {node}, serviceAccountName: {app}, containers: [{{name: c, image: i}}]}}
status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}
",
        app = name.rsplit_once('-').map_or(name, |(a, _)| a),
    )
}

fn cluster() -> Cluster {
    Cluster {
        trust_domain: "cluster.local".into(),
        namespaces: objects(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n",
        ),
        nodes: objects(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-a}}\n",
        ),
        pods: objects(
            &[
                pod("shop", "web-0", "10.0.0.1", "n1", ""),
                pod("shop", "web-1", "10.0.0.2", "n2", ""),
                pod("shop", "batch-0", "10.0.0.3", "n1", ", ambit.dev/dataplane-mode: none"),
                pod("legacy", "old-0", "10.0.1.1", "n2", ""),
            ]
            .join("---\n"),
        ),
        services: objects(
            "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  trafficDistribution: PreferClose
  ports: [{name: http, port: 80, targetPort: http-alt}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
",
        ),
        endpoint_slices: objects(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.0.0.1], targetRef: {kind: Pod, name: web-0, uid: uid-web-0}}
  - {addresses: [10.0.0.2], conditions: {ready: false}, targetRef: {kind: Pod, name: web-1, uid: uid-web-1}}
",
        ),
        ..Cluster::default()
    }
}

#[test]
fn labelled_namespaces_mesh_their_pods_unless_a_pod_opts_out() {
    let config = cluster().mesh_config();
    let protocol = |name: &str| {
        config
            .workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap()
            .protocol
    };
    assert_eq!(protocol("web-0"), InboundProtocol::Hbone);
    assert_eq!(protocol("batch-0"), InboundProtocol::Tcp);
    assert_eq!(protocol("old-0"), InboundProtocol::Tcp);
    let web = config.workloads.iter().find(|w| w.name == "web-0").unwrap();
    assert_eq!(web.service_account, "web");
    assert_eq!(web.workload_name.as_deref(), Some("web"));
    assert_eq!(
        (web.locality.region.as_str(), web.locality.zone.as_str()),
        ("eu", "eu-a")
    );
    assert_eq!(web.node, "n1");
    // The result is a config the data plane accepts.
    Snapshot::new(config, 1).unwrap();
}

#[test]
fn services_get_their_ready_endpoints_and_resolved_target_ports() {
    let config = cluster().mesh_config();
    assert_eq!(config.services.len(), 1, "headless services have no VIP");
    let web = &config.services[0];
    assert_eq!(
        web.vips,
        ["10.96.0.10".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(web.ports.len(), 1, "UDP ports are not proxied");
    assert_eq!(
        web.ports[0].target_port(),
        8080,
        "named target port resolved"
    );
    assert_eq!(web.endpoints, ["uid-web-0"], "not-ready endpoints left out");
    assert_eq!(web.hostname.as_deref(), Some("web.shop.svc.cluster.local"));
    assert_eq!(
        web.traffic_distribution,
        Some(model::TrafficDistribution::PreferSameZone)
    );
}

#[test]
fn endpoints_that_number_a_named_target_port_otherwise_keep_their_number() {
    // Mid-rollout: web-2's container calls 8081 `http-alt`; the slice
    // controller puts it in a slice of its own.
    let mut c = cluster();
    c.pods
        .extend(objects(&pod("shop", "web-2", "10.0.0.4", "n1", "")));
    c.endpoint_slices.extend(objects(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-def, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints:
  - {addresses: [10.0.0.4], targetRef: {kind: Pod, name: web-2, uid: uid-web-2}}
",
    ));
    let config = c.mesh_config();
    let web = &config.services[0];
    assert_eq!(web.endpoints, ["uid-web-0", "uid-web-2"]);
    assert_eq!(web.ports[0].target_port(), 8080);
    assert_eq!(
        web.endpoint_ports,
        [("uid-web-2".to_string(), [(80, 8081)].into())].into()
    );
    assert_eq!(web.endpoint_port("uid-web-0", &web.ports[0]), 8080);
    assert_eq!(web.endpoint_port("uid-web-2", &web.ports[0]), 8081);
    Snapshot::new(config, 1).unwrap();
}

#[test]
fn deleting_a_pod_removes_it_and_its_endpoint() {
    let mut c = cluster();
    c.pods
        .retain(|p| p.metadata.name.as_deref() != Some("web-0"));
    let config = c.mesh_config();
    assert!(config.workloads.iter().all(|w| w.name != "web-0"));
    assert!(config.services[0].endpoints.is_empty());
}

#[test]
fn policies_are_selected_into_the_config() {
    let mut c = cluster();
    c.authorization_policies = objects(
        "apiVersion: security.ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}
---
apiVersion: security.ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec: {rules: [{to: [{operation: {ports: [\"0\"]}}]}]}
",
    );
    c.peer_authentications = objects(
        "apiVersion: security.ambit.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let config = c.mesh_config();
    let names: Vec<&str> = config
        .authorization_policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["broken", "deny-legacy"]);
    // The invalid ALLOW stays, its rule left out: it matches nothing, so
    // it opens nothing.
    assert!(config.authorization_policies[0].rules.is_empty());
    let snap = Snapshot::new(config, 1).unwrap();
    let web = snap.workload("uid-web-0").unwrap();
    assert_eq!(
        snap.peer_authentication(web, 8080).0,
        model::PeerAuthMode::Strict
    );
}

#[test]
fn waypoint_labels_enroll_workloads_and_services() {
    let mut c = cluster();
    std::sync::Arc::make_mut(&mut c.namespaces[0])
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("ambit.dev/use-waypoint".into(), "waypoint".into());
    c.services.extend(objects::<k8s_openapi::api::core::v1::Service>(
        "apiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\nspec: {clusterIP: 10.96.0.50, ports: [{port: 15008}]}\n",
    ));
    // The Service alone is no waypoint: the Gateway makes it one.
    let config = c.mesh_config();
    assert!(config.workloads.iter().all(|w| w.waypoint.is_none()));
    c.gateways.extend(objects::<controller::gateway::Gateway>(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    ));
    std::sync::Arc::make_mut(&mut c.services[0])
        .metadata
        .labels
        .get_or_insert_default()
        .insert("ambit.dev/use-waypoint".into(), "waypoint".into());
    let config = c.mesh_config();
    let wp = Some(model::WaypointRef {
        address: "10.96.0.50".parse().unwrap(),
    });
    let web = config.workloads.iter().find(|w| w.name == "web-0").unwrap();
    assert_eq!(web.waypoint, wp);
    let svc = config.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(svc.waypoint, wp);
    let own = config
        .services
        .iter()
        .find(|s| s.name == "waypoint")
        .unwrap();
    assert_eq!(own.waypoint, None, "the waypoint's own Service goes direct");
    // A pod's `none` opts out of its namespace's waypoint; a service
    // account's label applies to its pods.
    let mut c2 = c.clone();
    std::sync::Arc::make_mut(&mut c2.pods[0])
        .metadata
        .labels
        .get_or_insert_default()
        .insert("ambit.dev/use-waypoint".into(), "none".into());
    let config = c2.mesh_config();
    let web0 = config.workloads.iter().find(|w| w.name == "web-0").unwrap();
    let web1 = config.workloads.iter().find(|w| w.name == "web-1").unwrap();
    assert_eq!((&web0.waypoint, &web1.waypoint), (&None, &wp));
    let mut c3 = c.clone();
    c3.service_accounts.extend(objects::<k8s_openapi::api::core::v1::ServiceAccount>(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop, labels: {ambit.dev/use-waypoint: none}}\n",
    ));
    let config = c3.mesh_config();
    assert!(
        config
            .workloads
            .iter()
            .filter(|w| w.service_account == "web")
            .all(|w| w.waypoint.is_none())
    );
    // A Gateway of another class is no waypoint.
    let mut c4 = c.clone();
    std::sync::Arc::make_mut(&mut c4.gateways[0])
        .spec
        .gateway_class_name = "other".into();
    assert!(
        c4.mesh_config()
            .workloads
            .iter()
            .all(|w| w.waypoint.is_none())
    );
    // A waypoint that does not exist is not referenced.
    c.services
        .retain(|s| s.metadata.name.as_deref() != Some("waypoint"));
    let config = c.mesh_config();
    assert!(config.workloads.iter().all(|w| w.waypoint.is_none()));
    Snapshot::new(config, 2).unwrap();
}

#[test]
fn the_labs_manifests_translate_to_its_plan() {
    let plan = lab::plan::Plan::new(&lab::LabSpec::default());
    let dir = tempfile::tempdir().unwrap();
    lab::k8s::write_all(dir.path(), &lab::k8s::manifests(&plan)).unwrap();
    let config = controller::manifests::read_dir(dir.path(), "cluster.local")
        .unwrap()
        .mesh_config();
    assert_eq!(config.workloads.len(), plan.pods.len());
    for pod in &plan.pods {
        let w = config.workloads.iter().find(|w| w.uid == pod.uid).unwrap();
        assert_eq!(
            (
                &w.namespace,
                &w.name,
                &w.service_account,
                &w.ips[..],
                &w.node
            ),
            (
                &pod.namespace,
                &pod.name,
                &pod.service_account,
                &[pod.ip][..],
                &plan.nodes[pod.node].name
            )
        );
        let deployment = pod.name.rsplit_once('-').unwrap().0;
        assert_eq!(w.workload_name.as_deref(), Some(deployment));
        let meshed = w.protocol == model::InboundProtocol::Hbone;
        assert_eq!(meshed, pod.meshed, "{}", pod.key());
    }
    for svc in &plan.services {
        let s = config.services.iter().find(|s| s.name == svc.name).unwrap();
        assert_eq!(s.vips, [svc.cluster_ip]);
        let ports: Vec<(u16, u16)> = s.ports.iter().map(|p| (p.port, p.target_port())).collect();
        let want: Vec<(u16, u16)> = svc.ports.iter().map(|p| (p.port, p.target_port)).collect();
        assert_eq!(ports, want);
        let mut endpoints = s.endpoints.clone();
        endpoints.sort();
        let mut want: Vec<String> = svc
            .endpoints
            .iter()
            .map(|&i| plan.pods[i].uid.clone())
            .collect();
        want.sort();
        assert_eq!(endpoints, want);
    }
    model::Snapshot::new(config, 1).unwrap();
}

#[test]
fn a_broken_manifest_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pod.bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: 3}\n",
    )
    .unwrap();
    let err = controller::manifests::read_dir(dir.path(), "cluster.local").unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}", dir.path().join("pod.bad.yaml").display())),
        "{err}"
    );
}
