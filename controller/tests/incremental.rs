//! The incremental translator against translation from scratch: after
//! every random change to a small cluster full of conflicts (pods sharing
//! IPs, Services on pods' IPs, waypoints coming and going, pods recreated
//! under the same name, routes whose parents and backends come and go), the config built from the flushed changes is the
//! config translated from scratch, and the data planes accept it. And a
//! change translates only what depends on it.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use controller::cluster::Cluster;
use controller::translator::{Object, ObjectKind, Translator};
use model::Snapshot;
use model::resources::{Item, Key, assemble};
use serde_json::{Value, json};

/// xorshift: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];
const NODES: [&str; 3] = ["n0", "n1", "n2"];
const SERVICES: [&str; 4] = ["wp", "s1", "s2", "s3"];

/// Drops null fields (an absent label), which Kubernetes types refuse.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

fn object(kind: ObjectKind, value: Value) -> Object {
    let value = without_nulls(value);
    fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }
    match kind {
        ObjectKind::Namespace => Object::Namespace(Arc::new(from(value))),
        ObjectKind::Node => Object::Node(Arc::new(from(value))),
        ObjectKind::Pod => Object::Pod(Arc::new(from(value))),
        ObjectKind::Service => Object::Service(Arc::new(from(value))),
        ObjectKind::EndpointSlice => Object::EndpointSlice(Arc::new(from(value))),
        ObjectKind::AuthorizationPolicy => Object::AuthorizationPolicy(Arc::new(from(value))),
        ObjectKind::PeerAuthentication => Object::PeerAuthentication(Arc::new(from(value))),
        ObjectKind::ServiceAccount => Object::ServiceAccount(Arc::new(from(value))),
        ObjectKind::Gateway => Object::Gateway(Arc::new(from(value))),
        ObjectKind::Deployment => Object::Deployment(Arc::new(from(value))),
        ObjectKind::HttpRoute => Object::HttpRoute(Arc::new(from(value))),
        ObjectKind::GrpcRoute => Object::GrpcRoute(Arc::new(from(value))),
    }
}

/// The cluster as objects by (kind, namespace, name).
#[derive(Default)]
struct World {
    objects: BTreeMap<(ObjectKind, String, String), Object>,
    /// Pod → uid generation (a recreated pod gets a new uid; uids are
    /// unique, as Kubernetes makes them).
    generation: HashMap<String, u64>,
}

impl World {
    fn cluster(&self) -> Cluster {
        let mut c = Cluster {
            trust_domain: "cluster.local".into(),
            ..Cluster::default()
        };
        for o in self.objects.values() {
            match o.clone() {
                Object::Namespace(x) => c.namespaces.push(x),
                Object::Node(x) => c.nodes.push(x),
                Object::Pod(x) => c.pods.push(x),
                Object::Service(x) => c.services.push(x),
                Object::EndpointSlice(x) => c.endpoint_slices.push(x),
                Object::AuthorizationPolicy(x) => c.authorization_policies.push(x),
                Object::PeerAuthentication(x) => c.peer_authentications.push(x),
                Object::ServiceAccount(x) => c.service_accounts.push(x),
                Object::Gateway(x) => c.gateways.push(x),
                Object::Deployment(x) => c.deployments.push(x),
                Object::HttpRoute(x) => c.http_routes.push(x),
                Object::GrpcRoute(x) => c.grpc_routes.push(x),
            }
        }
        c
    }

    fn uids(&self) -> Vec<String> {
        self.objects
            .values()
            .filter_map(|o| match o {
                Object::Pod(p) => p.metadata.uid.clone(),
                _ => None,
            })
            .collect()
    }

    /// A random new version of some object, or a deletion.
    fn change(&mut self, rng: &mut Rng) -> Change {
        let kind = match rng.below(17) {
            0 => ObjectKind::Namespace,
            1 => ObjectKind::Node,
            2..=5 => ObjectKind::Pod,
            6 | 7 => ObjectKind::Service,
            8 | 9 => ObjectKind::EndpointSlice,
            10 => ObjectKind::AuthorizationPolicy,
            11 => ObjectKind::PeerAuthentication,
            12 => ObjectKind::ServiceAccount,
            13 => ObjectKind::Gateway,
            14 => ObjectKind::Deployment,
            15 => ObjectKind::HttpRoute,
            _ => ObjectKind::GrpcRoute,
        };
        let ns = rng.pick(&NAMESPACES).to_string();
        let waypoint = if rng.chance(30) {
            json!("wp")
        } else {
            Value::Null
        };
        let (namespace, name, value) = match kind {
            ObjectKind::Namespace => {
                let mode = if rng.chance(60) { "ambient" } else { "off" };
                (
                    String::new(),
                    ns.clone(),
                    json!({
                        "metadata": {"name": ns, "labels": {
                            "ambit.dev/dataplane-mode": mode,
                            "ambit.dev/use-waypoint": waypoint,
                        }}
                    }),
                )
            }
            ObjectKind::Node => {
                let node = rng.pick(&NODES);
                let zone = rng.pick(&["a", "b"]);
                (
                    String::new(),
                    node.to_string(),
                    json!({
                        "metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": zone}}
                    }),
                )
            }
            ObjectKind::Pod => {
                let name = format!("p{}", rng.below(12));
                let generation = self.generation.entry(format!("{ns}/{name}")).or_default();
                if rng.chance(20) {
                    *generation += 1;
                }
                let ip = format!("10.0.0.{}", rng.below(10));
                let phase = if rng.chance(10) {
                    "Succeeded"
                } else {
                    "Running"
                };
                let status = if rng.chance(10) {
                    json!({"phase": "Pending"})
                } else {
                    json!({"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]})
                };
                let opt_out = if rng.chance(15) {
                    json!("none")
                } else {
                    Value::Null
                };
                (
                    ns.clone(),
                    name.clone(),
                    json!({
                        "metadata": {
                            "name": name, "namespace": ns, "uid": format!("{ns}-{name}-{generation}"),
                            "labels": {
                                "app": rng.pick(&["a", "b"]),
                                "ambit.dev/dataplane-mode": opt_out,
                                "ambit.dev/use-waypoint": if rng.chance(20) { json!("wp") } else { Value::Null },
                            }
                        },
                        "spec": {
                            "nodeName": rng.pick(&NODES),
                            "serviceAccountName": rng.pick(&["sa1", "sa2"]),
                            "containers": [],
                        },
                        "status": status,
                    }),
                )
            }
            ObjectKind::Service => {
                let name = rng.pick(&SERVICES);
                let ip = match rng.below(10) {
                    0 => "None".to_string(),
                    1 | 2 => format!("10.0.0.{}", rng.below(10)),
                    _ => format!("10.96.0.{}", rng.below(5)),
                };
                let target = if rng.chance(50) {
                    json!("http")
                } else {
                    json!(8080)
                };
                let own = name == "wp" && rng.chance(50);
                (
                    ns.clone(),
                    name.to_string(),
                    json!({
                        "metadata": {"name": name, "namespace": ns, "labels": {
                            "ambit.dev/use-waypoint": waypoint,
                            "gateway.networking.k8s.io/gateway-name": if own { json!("wp") } else { Value::Null },
                        }},
                        "spec": {
                            "clusterIP": ip,
                            "ports": [{"name": "http", "port": 80, "targetPort": target}],
                        },
                    }),
                )
            }
            ObjectKind::EndpointSlice => {
                let service = rng.pick(&SERVICES);
                let name = format!("{service}-{}", rng.below(2));
                let uids = self.uids();
                let endpoints: Vec<Value> = (0..rng.below(4))
                    .filter(|_| !uids.is_empty())
                    .map(|_| {
                        let uid = &uids[rng.below(uids.len() as u64) as usize];
                        json!({
                            "addresses": ["10.0.0.1"],
                            "conditions": {"ready": !rng.chance(20)},
                            "targetRef": {"kind": "Pod", "uid": uid},
                        })
                    })
                    .collect();
                (
                    ns.clone(),
                    name.clone(),
                    json!({
                        "metadata": {"name": name, "namespace": ns,
                            "labels": {"kubernetes.io/service-name": service}},
                        "addressType": "IPv4",
                        "ports": [{"name": "http", "port": 9090}],
                        "endpoints": endpoints,
                    }),
                )
            }
            ObjectKind::AuthorizationPolicy => {
                let name = rng.pick(&["allow", "deny"]);
                let action = if name == "allow" { "ALLOW" } else { "DENY" };
                let selector = if rng.chance(50) {
                    json!({"matchLabels": {"app": "a"}})
                } else {
                    Value::Null
                };
                (
                    ns.clone(),
                    name.to_string(),
                    json!({
                        "apiVersion": "security.ambit.dev/v1alpha1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": name, "namespace": ns, "generation": rng.below(3) + 1},
                        "spec": {"action": action, "selector": selector,
                            "rules": [{"from": [{"source": {"namespaces": [rng.pick(&NAMESPACES)]}}]}]},
                    }),
                )
            }
            ObjectKind::ServiceAccount => {
                let name = rng.pick(&["sa1", "sa2"]);
                let label = match rng.below(3) {
                    0 => json!("wp"),
                    1 => json!("none"),
                    _ => Value::Null,
                };
                (
                    ns.clone(),
                    name.to_string(),
                    json!({
                        "metadata": {"name": name, "namespace": ns, "labels": {"ambit.dev/use-waypoint": label}},
                    }),
                )
            }
            ObjectKind::Gateway => {
                let class = if rng.chance(10) {
                    "other"
                } else {
                    "ambit-waypoint"
                };
                let (port, protocol) = if rng.chance(10) {
                    (80, "HTTP")
                } else {
                    (15008, "HBONE")
                };
                (
                    ns.clone(),
                    "wp".to_string(),
                    json!({
                        "metadata": {"name": "wp", "namespace": ns, "uid": format!("gw-{ns}"),
                            "generation": rng.below(3) + 1},
                        "spec": {"gatewayClassName": class,
                            "listeners": [{"name": "mesh", "port": port, "protocol": protocol}]},
                    }),
                )
            }
            ObjectKind::Deployment => (
                ns.clone(),
                "wp".to_string(),
                json!({
                    "metadata": {"name": "wp", "namespace": ns},
                    "spec": {"selector": {}, "template": {}},
                    "status": {"availableReplicas": rng.below(2)},
                }),
            ),
            ObjectKind::HttpRoute | ObjectKind::GrpcRoute => {
                let name = rng.pick(&["r1", "r2"]);
                let parents: Vec<Value> = (0..=rng.below(2))
                    .map(|_| match rng.below(4) {
                        0 => json!({"kind": "Gateway", "name": "wp"}),
                        1 => json!({"group": "", "kind": "Service", "name": rng.pick(&SERVICES),
                            "namespace": rng.pick(&NAMESPACES)}),
                        _ => json!({"group": "", "kind": "Service", "name": rng.pick(&SERVICES),
                            "port": match rng.below(10) { 0 => json!(81), 1..=3 => json!(80), _ => Value::Null }}),
                    })
                    .collect();
                let backends: Vec<Value> = (0..rng.below(3))
                    .map(|_| {
                        json!({"name": rng.pick(&["s1", "s2", "s3", "gone"]), "port": 80,
                        "weight": rng.below(3)})
                    })
                    .collect();
                let filters = if rng.chance(15) {
                    json!([{"type": "RequestMirror", "requestMirror": {}}])
                } else {
                    json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x", "value": "1"}]}}])
                };
                let path = if rng.chance(10) { "(" } else { "/a.*" };
                let matches = if kind == ObjectKind::HttpRoute {
                    json!([{"path": {"type": "RegularExpression", "value": path}}])
                } else {
                    json!([{"method": {"service": "pkg.S", "method": "M"}}])
                };
                let api_kind = if kind == ObjectKind::HttpRoute {
                    "HTTPRoute"
                } else {
                    "GRPCRoute"
                };
                (
                    ns.clone(),
                    name.to_string(),
                    json!({
                        "apiVersion": "gateway.networking.k8s.io/v1", "kind": api_kind,
                        "metadata": {"name": name, "namespace": ns, "generation": rng.below(3) + 1},
                        "spec": {"parentRefs": parents, "rules": [{
                            "matches": matches, "filters": filters, "backendRefs": backends,
                        }]},
                    }),
                )
            }
            ObjectKind::PeerAuthentication => {
                let mode = rng.pick(&["STRICT", "PERMISSIVE"]);
                (
                    ns.clone(),
                    "mtls".to_string(),
                    json!({
                        "apiVersion": "security.ambit.dev/v1alpha1", "kind": "PeerAuthentication",
                        "metadata": {"name": "mtls", "namespace": ns},
                        "spec": {"mtls": {"mode": mode}},
                    }),
                )
            }
        };
        let key = (kind, namespace.clone(), name.clone());
        if self.objects.contains_key(&key) && rng.chance(25) {
            self.objects.remove(&key);
            return Change::Delete(kind, (namespace, name));
        }
        let o = object(kind, value);
        self.objects.insert(key, o.clone());
        Change::Apply(o)
    }
}

enum Change {
    Apply(Object),
    Delete(ObjectKind, (String, String)),
}

#[test]
fn incremental_translation_equals_translation_from_scratch() {
    let mut routed = 0;
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut world = World::default();
        let mut translator = Translator::new("cluster.local");
        let mut held: HashMap<Key, Item> = HashMap::new();
        for step in 0..150 {
            // One to three changes per flush.
            for _ in 0..=rng.below(3) {
                match world.change(&mut rng) {
                    Change::Apply(o) => translator.apply(o),
                    Change::Delete(kind, name) => translator.delete(kind, &name),
                }
            }
            for (key, item) in translator.flush().changes {
                match item {
                    Some(item) => held.insert(key, item),
                    None => held.remove(&key),
                };
            }
            let incremental = assemble("cluster.local", held.values()).sorted();
            let scratch = world.cluster().mesh_config().sorted();
            assert_eq!(incremental, scratch, "seed {seed}, step {step}");
            assert_eq!(
                translator.config().sorted(),
                scratch,
                "seed {seed}, step {step}"
            );
            let mut statuses: Vec<String> =
                translator.statuses().map(|s| format!("{s:?}")).collect();
            let mut expected: Vec<String> = world
                .cluster()
                .translate()
                .1
                .iter()
                .map(|s| format!("{s:?}"))
                .collect();
            statuses.sort();
            expected.sort();
            assert_eq!(statuses, expected, "seed {seed}, step {step}");
            routed += usize::from(!incremental.routes.is_empty());
            if let Err(e) = Snapshot::new(incremental, 1) {
                panic!("seed {seed}, step {step}: the data planes would refuse it: {e}");
            }
        }
    }
    // Routes were exercised, not always refused.
    println!("{routed} of 3000 steps had a route in the config");
    assert!(routed > 100, "{routed} steps had a route in the config");
}

fn pod(ns: &str, name: &str, ip: &str, app: &str) -> Object {
    object(
        ObjectKind::Pod,
        json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": {"app": app}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": ip},
        }),
    )
}

#[test]
fn a_change_translates_only_what_depends_on_it() {
    let mut t = Translator::new("cluster.local");
    t.apply(object(
        ObjectKind::Namespace,
        json!({"metadata": {"name": "shop", "labels": {"ambit.dev/dataplane-mode": "ambient"}}}),
    ));
    t.apply(object(
        ObjectKind::Namespace,
        json!({"metadata": {"name": "other"}}),
    ));
    for i in 0..1000 {
        let ns = if i % 2 == 0 { "shop" } else { "other" };
        t.apply(pod(
            ns,
            &format!("web-{i}"),
            &format!("10.1.{}.{}", i / 250, i % 250),
            "web",
        ));
    }
    t.apply(object(
        ObjectKind::Service,
        json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
        }),
    ));
    let endpoints: Vec<Value> = (0..10)
        .map(|i| json!({"addresses": ["x"], "targetRef": {"uid": format!("uid-web-{}", i * 2)}}))
        .collect();
    t.apply(object(ObjectKind::EndpointSlice, json!({
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": endpoints,
    })));
    let first = t.flush();
    assert_eq!(first.changes.len(), 1001);

    // A pod's label: that pod.
    t.apply(pod("shop", "web-500", "10.1.2.0", "web-v2"));
    let d = t.flush();
    assert_eq!((d.translated, d.changes.len()), (1, 1));
    // The same pod again (a resync, a status change the translation does
    // not read): nothing.
    t.apply(pod("shop", "web-500", "10.1.2.0", "web-v2"));
    let d = t.flush();
    assert_eq!((d.translated, d.changes.len()), (0, 0));
    // A pod the Service names goes away: the pod and the Service.
    t.delete(ObjectKind::Pod, &("shop".into(), "web-4".into()));
    let d = t.flush();
    assert_eq!((d.translated, d.changes.len()), (2, 2));
    // A namespace joins the mesh: its 500 pods.
    t.apply(object(
        ObjectKind::Namespace,
        json!({"metadata": {"name": "other", "labels": {"ambit.dev/dataplane-mode": "ambient"}}}),
    ));
    let d = t.flush();
    assert_eq!((d.translated, d.changes.len()), (500, 500));
}
