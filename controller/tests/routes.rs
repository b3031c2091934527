//! HTTPRoutes and GRPCRoutes into the mesh config: what a waypoint
//! applies, and a status entry per parent that says why a route does not
//! apply where it does not.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::sync::Arc;

use controller::cluster::{Cluster, ObjectStatus};
use controller::routes::{ROUTE_CONTROLLER, duration_ms};
use controller::translator::{Object, ObjectKind, Translator};
use model::Snapshot;
use model::proto::config::Kind;
use model::route::{
    Backend, HeaderEdits, PathMatch, Retry, RouteFilter, RouteParent, Timeouts, ValueMatch,
};

fn objects<T: serde::de::DeserializeOwned>(yaml: &str) -> Vec<Arc<T>> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Arc::new(serde::Deserialize::deserialize(doc).unwrap()))
        .collect()
}

/// Namespace `shop` in the mesh with the waypoint `waypoint`; Service `web`
/// uses it, Service `db` does not.
fn cluster() -> Cluster {
    Cluster {
        trust_domain: "cluster.local".into(),
        namespaces: objects(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}\n",
        ),
        services: objects(
            "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {ambit.dev/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {clusterIP: 10.96.0.50, ports: [{port: 15008}]}
",
        ),
        gateways: objects(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
",
        ),
        ..Cluster::default()
    }
}

fn http_route(yaml_spec: &str) -> Arc<controller::routes::HttpRoute> {
    objects(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop, generation: 3}}\nspec:\n{yaml_spec}"
    ))
    .remove(0)
}

fn status_of<'a>(statuses: &'a [ObjectStatus], kind: &str, name: &str) -> &'a ObjectStatus {
    statuses
        .iter()
        .find(|s| s.kind == kind && s.name == name)
        .unwrap()
}

/// (parent name, Accepted status and reason, ResolvedRefs status and
/// reason) of each of this controller's parents.
fn parents(s: &ObjectStatus) -> Vec<(String, String, String)> {
    s.parents
        .iter()
        .map(|p| {
            assert_eq!(p.controller_name, ROUTE_CONTROLLER);
            assert!(
                p.conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(3))
            );
            // Enforced as far as accepted: the waypoint applies what it
            // is sent.
            assert_eq!(p.conditions[2].type_, "Enforced");
            assert_eq!(p.conditions[2].status, p.conditions[0].status);
            let c = |i: usize| {
                format!(
                    "{}={} {}",
                    p.conditions[i].type_, p.conditions[i].status, p.conditions[i].reason
                )
            };
            (p.parent_ref.name.clone(), c(0), c(1))
        })
        .collect()
}

#[test]
fn an_http_route_on_a_waypointed_service_is_sent_with_its_rules() {
    let mut c = cluster();
    c.http_routes.push(http_route(
        "  parentRefs: [{group: '', kind: Service, name: web}]
  hostnames: [web.shop.svc.cluster.local]
  rules:
    - matches:
        - path: {type: PathPrefix, value: /api}
          method: GET
          headers: [{name: x-canary, value: 'yes'}]
          queryParams: [{type: RegularExpression, name: v, value: '[0-9]+'}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-route, value: canary}], remove: [x-debug]}
      backendRefs:
        - {name: web, port: 80, weight: 90}
        - {name: web-v2, port: 80, weight: 10}
      timeouts: {request: 1m30s, backendRequest: 500ms}
      retry: {attempts: 2, codes: [503], backoff: 100ms}
    - filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, statusCode: 301}
",
    ));
    let (config, statuses) = c.translate();
    let route = config.routes.iter().find(|r| r.name == "r").unwrap();
    assert_eq!(
        route.parents,
        [RouteParent {
            service: "shop/web".into(),
            port: None,
            waypoint: "shop/waypoint".into(),
        }]
    );
    assert_eq!(route.hostnames, ["web.shop.svc.cluster.local"]);
    let rule = &route.rules[0];
    let m = &rule.matches[0];
    assert_eq!(m.path, Some(PathMatch::Prefix("/api".into())));
    assert_eq!(m.method.as_deref(), Some("GET"));
    assert_eq!(m.headers[0].value, ValueMatch::Exact("yes".into()));
    assert_eq!(m.query_params[0].value, ValueMatch::Regex("[0-9]+".into()));
    assert_eq!(
        rule.filters,
        [RouteFilter::RequestHeaders(HeaderEdits {
            set: vec![("x-route".into(), "canary".into())],
            add: vec![],
            remove: vec!["x-debug".into()],
        })]
    );
    // The missing Service's share is answered 500 by the waypoint.
    assert_eq!(
        rule.backends,
        [
            Backend {
                service: Some("shop/web".into()),
                port: 80,
                weight: 90
            },
            Backend {
                service: None,
                port: 80,
                weight: 10
            },
        ]
    );
    assert_eq!(
        rule.timeouts,
        Timeouts {
            request_ms: Some(90_000),
            backend_request_ms: Some(500),
        }
    );
    assert_eq!(
        rule.retry,
        Some(Retry {
            attempts: 2,
            codes: vec![503],
            backoff_ms: Some(100),
        })
    );
    // A rule without matches matches everything; without backends it
    // goes to the Service addressed.
    let redirect = &route.rules[1];
    assert_eq!(
        redirect.matches[0].path,
        Some(PathMatch::Prefix("/".into()))
    );
    assert!(redirect.backends.is_empty());
    assert!(matches!(&redirect.filters[0], RouteFilter::Redirect(r) if r.status == 301));

    let status = status_of(&statuses, "HTTPRoute", "r");
    assert_eq!(
        parents(status),
        [(
            "web".into(),
            "Accepted=True Accepted".into(),
            "ResolvedRefs=False BackendNotFound".into()
        )]
    );
    assert!(
        status.parents[0].conditions[1]
            .message
            .contains("shop/web-v2")
    );
    // The status written has this controller's entry only (the writer
    // keeps the others').
    assert_eq!(
        status.status()["parents"][0]["controllerName"],
        ROUTE_CONTROLLER
    );
    Snapshot::new(config, 1).unwrap();
}

#[test]
fn a_route_applies_only_where_a_waypoint_can_apply_it() {
    let mut c = cluster();
    c.gateways.extend(objects::<controller::gateway::Gateway>(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: shop}\nspec: {gatewayClassName: other}\n",
    ));
    c.http_routes.push(http_route(
        "  parentRefs:
    - {group: '', kind: Service, name: web, port: 80}
    - {group: '', kind: Service, name: db}
    - {group: '', kind: Service, name: nope}
    - {group: '', kind: Service, name: web, namespace: other}
    - {group: '', kind: Service, name: web, port: 8080}
    - {kind: Service, name: web}
    - {name: waypoint}
    - {name: ingress}
  rules: [{backendRefs: [{name: web, port: 80}]}]
",
    ));
    let (config, statuses) = c.translate();
    let status = status_of(&statuses, "HTTPRoute", "r");
    let resolved = "ResolvedRefs=True ResolvedRefs".to_string();
    // No entry for the other implementation's Gateway, nor for a Service
    // without the core group (its group defaults to Gateway API's).
    assert_eq!(
        parents(status),
        [
            (
                "web".into(),
                "Accepted=True Accepted".into(),
                resolved.clone()
            ),
            (
                "db".into(),
                "Accepted=False NoWaypoint".into(),
                resolved.clone()
            ),
            (
                "nope".into(),
                "Accepted=False NoMatchingParent".into(),
                resolved.clone()
            ),
            (
                "web".into(),
                "Accepted=False UnsupportedValue".into(),
                resolved.clone()
            ),
            (
                "web".into(),
                "Accepted=False NoMatchingParent".into(),
                resolved.clone()
            ),
            (
                "waypoint".into(),
                "Accepted=False NotAllowedByListeners".into(),
                resolved
            ),
        ]
    );
    let route = &config.routes[0];
    assert_eq!(
        route.parents,
        [RouteParent {
            service: "shop/web".into(),
            port: Some(80),
            waypoint: "shop/waypoint".into(),
        }]
    );
    // Without any accepted parent nothing is sent.
    let mut c2 = cluster();
    c2.http_routes.push(http_route(
        "  parentRefs: [{group: '', kind: Service, name: db}]\n",
    ));
    assert!(c2.translate().0.routes.is_empty());
}

#[test]
fn what_is_not_implemented_is_refused_by_name() {
    for (spec, says) in [
        (
            "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: web, port: 80}}}]}]\n",
            "filter RequestMirror is not supported",
        ),
        (
            "  rules: [{sessionPersistence: {type: Cookie}}]\n",
            "rule 0: sessionPersistence is not supported",
        ),
        (
            "  rules: [{matches: [{path: {type: RegularExpression, value: '(unclosed'}}]}]\n",
            "regular expression \"(unclosed\"",
        ),
        (
            "  rules: [{timeouts: {request: 10 seconds}}]\n",
            "is not a duration",
        ),
        (
            "  rules: [{matches: [{path: {value: /a}, cookies: [{name: c}]}]}]\n",
            "match: cookies is not supported",
        ),
        (
            "  rules: [{backendRefs: [{name: web, port: 80, appProtocol: h2c}]}]\n",
            "backendRef web: appProtocol is not supported",
        ),
        (
            "  rules: [{backendRefs: [{name: web, port: 80, filters: [{type: RequestHeaderModifier}]}]}]\n",
            "filters are not supported",
        ),
    ] {
        let mut c = cluster();
        c.http_routes.push(http_route(&format!(
            "  parentRefs: [{{group: '', kind: Service, name: web}}]\n{spec}"
        )));
        let (config, statuses) = c.translate();
        assert!(config.routes.is_empty(), "{spec}");
        let accepted = &status_of(&statuses, "HTTPRoute", "r").parents[0].conditions[0];
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "UnsupportedValue"),
            "{spec}"
        );
        assert!(
            accepted.message.contains(says),
            "{spec}: {}",
            accepted.message
        );
        // Backends not looked at are not said to be resolved (a regular
        // expression is checked last, by the model, after them).
        let resolved = &status_of(&statuses, "HTTPRoute", "r").parents[0].conditions[1];
        let want = if says.starts_with("regular expression") {
            "True"
        } else {
            "Unknown"
        };
        assert_eq!(resolved.status, want, "{spec}");
    }
    // Other references in backendRefs.
    for (backend, reason) in [
        ("{name: web, namespace: other, port: 80}", "RefNotPermitted"),
        ("{group: example.com, kind: Bucket, name: b}", "InvalidKind"),
        // The target port instead of the Service port.
        ("{name: web, port: 8080}", "BackendNotFound"),
    ] {
        let mut c = cluster();
        c.http_routes.push(http_route(&format!(
            "  parentRefs: [{{group: '', kind: Service, name: web}}]\n  rules: [{{backendRefs: [{backend}]}}]\n"
        )));
        let (config, statuses) = c.translate();
        let resolved = &status_of(&statuses, "HTTPRoute", "r").parents[0].conditions[1];
        assert_eq!(resolved.reason, reason);
        assert_eq!(config.routes[0].rules[0].backends[0].service, None);
    }
}

#[test]
fn grpc_methods_become_paths() {
    let mut c = cluster();
    c.grpc_routes
        .extend(objects::<controller::routes::GrpcRoute>(
            "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules:
    - matches:
        - method: {service: shop.Cart, method: Get}
        - method: {service: shop.Cart}
        - method: {method: Get}
        - method: {type: RegularExpression, service: 'shop\\..*'}
        - headers: [{name: x-tenant, value: a}]
      backendRefs: [{name: web, port: 80}]
",
        ));
    let (config, _) = c.translate();
    let route = &config.routes[0];
    assert_eq!(route.kind, model::RouteKind::Grpc);
    let paths: Vec<_> = route.rules[0]
        .matches
        .iter()
        .map(|m| m.path.clone().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            PathMatch::Exact("/shop.Cart/Get".into()),
            PathMatch::Prefix("/shop.Cart".into()),
            PathMatch::Regex("/[^/]+/Get".into()),
            PathMatch::Regex("/(?:shop\\..*)/(?:[^/]+)".into()),
            PathMatch::Prefix("/".into()),
        ]
    );
    // An HTTPRoute and a GRPCRoute may share a name: their kinds differ.
    let items: Vec<_> = model::resources::items(config.clone())
        .map(|i| i.key())
        .filter(|k| k.0 == Kind::GrpcRoute)
        .collect();
    assert_eq!(items, [(Kind::GrpcRoute, "shop/g".to_string())]);
    Snapshot::new(config, 1).unwrap();
}

#[test]
fn routes_follow_their_services_and_waypoints() {
    let c = cluster();
    let mut t = Translator::new("cluster.local");
    t.sync(&c);
    t.flush();
    let route = http_route(
        "  parentRefs: [{group: '', kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web-v2, port: 80}]}]\n",
    );
    t.apply(Object::HttpRoute(route));
    let delta = t.flush();
    let key = (Kind::HttpRoute, "shop/r".to_string());
    assert!(delta.changes.iter().any(|(k, v)| *k == key && v.is_some()));
    let reason = |d: &controller::translator::Delta, i: usize| {
        status_of(&d.statuses, "HTTPRoute", "r").parents[0].conditions[i]
            .reason
            .clone()
    };
    assert_eq!(reason(&delta, 1), "BackendNotFound");
    // The backend appears: resolved.
    let v2 = objects::<k8s_openapi::api::core::v1::Service>(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web-v2, namespace: shop}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}\n",
    );
    t.apply(Object::Service(v2[0].clone()));
    let delta = t.flush();
    assert_eq!(reason(&delta, 1), "ResolvedRefs");
    // The parent's waypoint goes away: the route is withdrawn and says so.
    t.delete(ObjectKind::Gateway, &("shop".into(), "waypoint".into()));
    let delta = t.flush();
    assert!(delta.changes.iter().any(|(k, v)| *k == key && v.is_none()));
    assert_eq!(reason(&delta, 0), "NoWaypoint");
    // Deleting the route withdraws its status too.
    t.delete(ObjectKind::HttpRoute, &("shop".into(), "r".into()));
    let delta = t.flush();
    assert!(delta.statuses.is_empty());
    assert!(t.statuses().all(|s| s.kind != "HTTPRoute"));
}

#[test]
fn durations_are_gateway_api_durations() {
    assert_eq!(duration_ms("10s"), Ok(Some(10_000)));
    assert_eq!(duration_ms("1h2m3s4ms"), Ok(Some(3_723_004)));
    assert_eq!(duration_ms("0s"), Ok(None));
    for bad in ["", "10", "1d", "s", "123456s", "1s1s1s1s1s", "-1s"] {
        assert!(duration_ms(bad).is_err(), "{bad}");
    }
}
