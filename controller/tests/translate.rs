//! Policy resources into the mesh model, with the status each gets.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use controller::crd::{AuthorizationPolicy, PeerAuthentication};
use controller::translate::{authorization_policy, peer_authentication};
use model::policy::PolicyScope;

fn ap(yaml: &str) -> AuthorizationPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

const HEAD: &str = "apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n";

#[test]
fn an_l4_policy_is_enforced_as_written() {
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: deny-sleep, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: DENY
  rules:
    - from: [{{source: {{principals: [cluster.local/ns/demo/sa/sleep], ipBlocks: [10.0.0.0/8, 192.0.2.1]}}}}]
      to: [{{operation: {{ports: [\"8080\"]}}}}]"
    )));
    assert!(t.accepted.is_true() && t.enforced.is_true(), "{t:?}");
    let p = t.policy.unwrap();
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str()),
        ("demo", "deny-sleep")
    );
    assert_eq!(p.scope, PolicyScope::Namespace);
    assert_eq!(p.selector.get("app").map(String::as_str), Some("echo"));
    assert_eq!(p.action, model::Action::Deny);
    assert_eq!(p.rules[0].to[0].ports, [8080]);
    assert_eq!(p.rules[0].from[0].ip_blocks.len(), 2);
}

#[test]
fn root_namespace_policies_without_selector_are_global() {
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: mesh, namespace: ambit-system}}\nspec: {{action: DENY, rules: [{{}}]}}"
    )));
    assert_eq!(t.policy.unwrap().scope, PolicyScope::Global);
}

#[test]
fn l7_rules_fail_closed_and_say_they_are_not_enforced() {
    let allow = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: get-only, namespace: demo}}
spec:
  rules:
    - to: [{{operation: {{methods: [GET], paths: [/api/*]}}}}]
    - from: [{{source: {{namespaces: [demo]}}}}]"
    )));
    assert!(allow.accepted.is_true());
    assert!(!allow.enforced.is_true());
    assert_eq!(allow.enforced.reason, "L7RulesNeedWaypoint");
    assert!(
        allow
            .enforced
            .message
            .contains("rule 0: methods, paths need a waypoint"),
        "{:?}",
        allow.enforced
    );
    // The HTTP rule is left out: it cannot widen what is allowed.
    let p = allow.policy.unwrap();
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].from[0].namespaces, ["demo"]);

    let deny = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: no-admin, namespace: demo}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/admin], ports: [\"8080\"]}}}}]}}]"
    )));
    // Denied on its port alone: more than asked, never less.
    assert_eq!(deny.policy.unwrap().rules[0].to[0].ports, [8080]);
    assert!(deny.enforced.message.contains("denied on its other fields"));
}

#[test]
fn invalid_policies_are_not_accepted_and_say_why() {
    let cases = [
        (
            "spec: {rules: [{to: [{operation: {ports: [\"99999\"]}}]}]}",
            "InvalidPort",
            "rule 0: \"99999\" is not a port",
        ),
        (
            "spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]}",
            "InvalidIpBlock",
            "rule 0: \"10.0.0.300\" is not an IPv4 address or CIDR",
        ),
        (
            "spec: {rules: [{from: [{source: {principals: [\"a*b\"]}}]}]}",
            "InvalidSpec",
            "`*` is allowed only alone, at the start or at the end",
        ),
        (
            "spec: {selector: {matchLabels: {a: b}}, targetRefs: [{kind: Gateway, name: w}]}",
            "InvalidSpec",
            "selector and targetRefs cannot both be set",
        ),
    ];
    for (spec, reason, message) in cases {
        let t = authorization_policy(&ap(&format!(
            "{HEAD}metadata: {{name: p, namespace: demo}}\n{spec}"
        )));
        assert!(t.policy.is_none(), "{spec}");
        assert!(!t.accepted.is_true());
        assert_eq!(t.accepted.reason, reason, "{spec}");
        assert!(t.accepted.message.contains(message), "{:?}", t.accepted);
    }
}

#[test]
fn waypoint_attached_policies_are_reported_unenforced_without_a_waypoint() {
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: l7, namespace: demo}}\nspec: {{targetRefs: [{{kind: Service, name: echo}}], rules: [{{}}]}}"
    )));
    assert!(t.accepted.is_true());
    assert_eq!(t.enforced.reason, "WaypointNotAvailable");
    assert!(t.policy.is_none());
}

#[test]
fn peer_authentication_modes_and_scopes() {
    let pa = |ns: &str, extra: &str| -> PeerAuthentication {
        serde_yaml::from_str(&format!(
            "apiVersion: security.ambit.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: {ns}}}\nspec: {{mtls: {{mode: STRICT}}{extra}}}"
        ))
        .unwrap()
    };
    let mesh = peer_authentication(&pa("ambit-system", "")).policy.unwrap();
    assert_eq!(mesh.scope, PolicyScope::Global);
    assert_eq!(mesh.mode, model::PeerAuthMode::Strict);
    let selected = peer_authentication(&pa("demo", ", selector: {matchLabels: {app: echo}}"))
        .policy
        .unwrap();
    assert_eq!(selected.scope, PolicyScope::Namespace);
    assert_eq!(selected.selector.len(), 1);
}

#[test]
fn the_committed_crds_are_current() {
    let committed = include_str!("../../manifests/crds.yaml");
    assert!(
        committed == controller::crds_yaml(),
        "manifests/crds.yaml is stale: run `cargo run -p controller -- crds > manifests/crds.yaml`"
    );
}
