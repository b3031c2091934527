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

/// With a selector, a root-namespace policy picks its workloads in every
/// namespace, not only in the root namespace.
#[test]
fn root_namespace_policies_with_a_selector_apply_across_the_mesh() {
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: no-echo, namespace: ambit-system}}
spec: {{selector: {{matchLabels: {{app: echo}}}}, action: DENY, rules: [{{}}]}}"
    )));
    let mut config: model::MeshConfig = serde_yaml::from_str(WORKLOADS).unwrap();
    config.authorization_policies.push(t.policy.unwrap());
    let snap = model::Snapshot::new(config, 1).unwrap();
    let verdict = snap.authorize(&model::Connection {
        src_identity: None,
        src_ip: "10.0.0.9".parse().unwrap(),
        dst: snap.workload("echo").unwrap(),
        dst_port: 8080,
    });
    assert!(
        !verdict.allowed(),
        "echo in demo is not denied: {verdict:?}"
    );
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
fn invalid_policies_are_not_accepted_and_fail_closed() {
    // Once the only ALLOW of its workloads, so it must stay enforced: a
    // dropped ALLOW would open them to every client.
    let cases = [
        (
            "spec: {rules: [{to: [{operation: {ports: [\"99999\"]}}]}]}",
            "InvalidPort",
            "rule 0: ports \"99999\" is not a port",
        ),
        (
            "spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]}",
            "InvalidIpBlock",
            "rule 0: ipBlocks \"10.0.0.300\" is not an IPv4 address or CIDR",
        ),
        (
            "spec: {rules: [{from: [{source: {principals: [\"a*b\"]}}]}]}",
            "InvalidSpec",
            "rule 0: principals \"a*b\": `*` is allowed only alone, at the start or at the end",
        ),
        (
            "spec: {rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}",
            "InvalidSpec",
            "rule 0: serviceAccounts \"sleep\" is not <namespace>/<name>",
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
        assert!(!t.accepted.is_true());
        assert_eq!(t.accepted.reason, reason, "{spec}");
        assert!(t.accepted.message.contains(message), "{:?}", t.accepted);
        assert_eq!(t.enforced.reason, "EnforcedFailClosed", "{spec}");
        assert!(
            t.enforced.message.contains("matches nothing"),
            "{:?}",
            t.enforced
        );
        let p = t.policy.expect("enforced, not dropped");
        assert_eq!(p.action, model::Action::Allow);
        assert!(p.rules.is_empty(), "{spec}: {p:?}");
    }
}

/// Workloads to judge translated policies against, through the model's
/// own decision.
const WORKLOADS: &str = "
workloads:
  - {uid: echo, name: echo-0, namespace: demo, ips: [10.0.0.1], labels: {app: echo}}
";

const SLEEP: &str = "spiffe://cluster.local/ns/demo/sa/sleep";

/// Translates each policy (it must be enforced) and judges a connection
/// from `src` at `ip` to echo's `port`: whether it is allowed.
fn allowed(policies: &[&str], src: Option<&str>, ip: &str, port: u16) -> bool {
    let mut config: model::MeshConfig = serde_yaml::from_str(WORKLOADS).unwrap();
    for (i, spec) in policies.iter().enumerate() {
        let t = authorization_policy(&ap(&format!(
            "{HEAD}metadata: {{name: p{i}, namespace: demo}}\n{spec}"
        )));
        config
            .authorization_policies
            .push(t.policy.expect("enforced, not dropped"));
    }
    let snap = model::Snapshot::new(config, 1).unwrap();
    let identity: Option<identity::Identity> = src.map(|s| s.parse().unwrap());
    snap.authorize(&model::Connection {
        src_identity: identity.as_ref(),
        src_ip: ip.parse().unwrap(),
        dst: snap.workload("echo").unwrap(),
        dst_port: port,
    })
    .allowed()
}

#[test]
fn an_invalid_ip_block_in_the_only_allow_leaves_its_workloads_closed() {
    let allow = "spec:
  selector: {matchLabels: {app: echo}}
  rules: [{from: [{source: {ipBlocks: [\"fd00::/8\"]}}]}]";
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: p, namespace: demo}}\n{allow}"
    )));
    assert_eq!(t.accepted.reason, "InvalidIpBlock");
    assert_eq!(
        t.enforced.message,
        "rule 0: ipBlocks \"fd00::/8\" is not an IPv4 address or CIDR; the rule matches nothing"
    );
    assert!(!allowed(&[allow], Some(SLEEP), "10.0.0.9", 8080));
    assert!(!allowed(&[allow], None, "192.0.2.1", 8080));
    // A valid rule beside it still allows what it says.
    let with_valid = "spec:
  rules:
    - from: [{source: {ipBlocks: [\"fd00::/8\"]}}]
    - from: [{source: {namespaces: [demo]}}]";
    assert!(allowed(&[with_valid], Some(SLEEP), "10.0.0.9", 8080));
    assert!(!allowed(&[with_valid], None, "10.0.0.9", 8080));
}

#[test]
fn an_invalid_deny_entry_still_denies() {
    // A positive list with an invalid entry is not checked: the rule
    // denies on its other fields.
    let ip = "spec:
  action: DENY
  rules: [{from: [{source: {principals: [\"cluster.local/ns/demo/sa/sleep\"], ipBlocks: [10.0.0.0/8, \"fd00::/8\"]}}]}]";
    assert!(!allowed(&[ip], Some(SLEEP), "10.0.0.9", 8080));
    assert!(!allowed(&[ip], Some(SLEEP), "192.0.2.1", 8080));
    assert!(allowed(&[ip], None, "10.0.0.9", 8080));
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: p, namespace: demo}}\n{ip}"
    )));
    assert_eq!(t.enforced.reason, "EnforcedFailClosed");
    assert_eq!(
        t.enforced.message,
        "rule 0: ipBlocks \"fd00::/8\" is not an IPv4 address or CIDR (the field is not checked); denied on its other fields"
    );

    // A `not…` list loses only the invalid entry: it then excepts fewer.
    let not_ip = "spec:
  action: DENY
  rules: [{from: [{source: {notIpBlocks: [10.1.0.0/16, \"fd00::/8\"]}}]}]";
    assert!(!allowed(&[not_ip], None, "10.2.0.1", 8080));
    assert!(allowed(&[not_ip], None, "10.1.0.1", 8080));
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: p, namespace: demo}}\n{not_ip}"
    )));
    assert!(
        t.enforced.message.contains("(the entry is left out)"),
        "{t:?}"
    );

    let port = "spec: {action: DENY, rules: [{to: [{operation: {ports: [\"8080\", \"99999\"], notPorts: [\"0\"]}}]}]}";
    assert!(!allowed(&[port], Some(SLEEP), "10.0.0.9", 9090));
    let principal = "spec: {action: DENY, rules: [{from: [{source: {notPrincipals: [\"a*b\"], serviceAccounts: [sleep]}}]}]}";
    assert!(!allowed(&[principal], Some(SLEEP), "10.0.0.9", 8080));
}

#[test]
fn selector_and_target_refs_together_apply_the_strictest_reading() {
    let both = "selector: {matchLabels: {app: echo}}, targetRefs: [{kind: Gateway, name: w}]";
    let allow = format!("spec: {{{both}, rules: [{{}}]}}");
    let deny = format!(
        "spec: {{{both}, action: DENY, rules: [{{from: [{{source: {{namespaces: [x]}}}}]}}]}}"
    );
    assert!(!allowed(&[&allow], Some(SLEEP), "10.0.0.9", 8080));
    assert!(!allowed(&[&deny], Some(SLEEP), "10.0.0.9", 8080));
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: p, namespace: demo}}\n{deny}"
    )));
    assert_eq!(t.accepted.reason, "InvalidSpec");
    assert_eq!(
        t.enforced.message,
        "selector and targetRefs cannot both be set; on the selected workloads the policy denies every connection"
    );
}

#[test]
fn conditions_ztunnel_cannot_check_fail_closed_like_l7_fields() {
    // Its only restriction is `when`: read as L4 it would allow everyone.
    let when = "spec:
  selector: {matchLabels: {app: echo}}
  rules: [{when: [{key: \"request.auth.claims[iss]\", values: [\"https://issuer\"]}]}]";
    assert!(!allowed(&[when], Some(SLEEP), "10.0.0.9", 8080));
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: p, namespace: demo}}\n{when}"
    )));
    assert!(t.accepted.is_true());
    assert_eq!(t.enforced.reason, "L7RulesNeedWaypoint");
    assert!(
        t.enforced.message.contains("rule 0: when need a waypoint"),
        "{t:?}"
    );

    let source = "spec: {rules: [{from: [{source: {requestPrincipals: [\"*\"], notRemoteIpBlocks: [10.0.0.0/8]}}]}]}";
    assert!(!allowed(&[source], Some(SLEEP), "10.0.0.9", 8080));
    let t = authorization_policy(&ap(&format!(
        "{HEAD}metadata: {{name: p, namespace: demo}}\n{source}"
    )));
    assert!(
        t.enforced
            .message
            .contains("rule 0: requestPrincipals, notRemoteIpBlocks need a waypoint"),
        "{t:?}"
    );

    // A DENY is enforced on its other fields.
    let deny = "spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [demo], remoteIpBlocks: [192.0.2.0/24]}}], when: [{key: \"request.headers[x]\", values: [y]}]}]";
    assert!(!allowed(&[deny], Some(SLEEP), "10.0.0.9", 8080));
    assert!(allowed(&[deny], None, "10.0.0.9", 8080));
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

/// Port-level modes reach the model and decide per port; without a
/// selector (where the API server's rule did not run) they are refused in
/// the status, and a STRICT among them makes the policy STRICT.
#[test]
fn port_level_mtls_is_translated_and_fails_closed_without_a_selector() {
    let pa = |spec: &str| -> PeerAuthentication {
        serde_yaml::from_str(&format!(
            "apiVersion: security.ambit.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: demo}}\nspec: {spec}"
        ))
        .unwrap()
    };
    let mode_of = |policy: model::PeerAuthentication, port| {
        let mut config: model::MeshConfig = serde_yaml::from_str(WORKLOADS).unwrap();
        config.peer_authentications.push(policy);
        let snap = model::Snapshot::new(config, 1).unwrap();
        snap.peer_authentication(snap.workload("echo").unwrap(), port)
            .0
    };

    let t = peer_authentication(&pa(
        "{selector: {matchLabels: {app: echo}}, mtls: {mode: STRICT}, portLevelMtls: {\"9000\": {mode: PERMISSIVE}}}",
    ));
    assert!(t.accepted.is_true() && t.enforced.is_true(), "{t:?}");
    let policy = t.policy.unwrap();
    assert_eq!(
        mode_of(policy.clone(), 9000),
        model::PeerAuthMode::Permissive
    );
    assert_eq!(mode_of(policy, 8080), model::PeerAuthMode::Strict);

    // Port modes alone: the policy's own mode omitted is UNSET, so its
    // other ports inherit (here: nothing set, PERMISSIVE).
    let t = peer_authentication(&pa(
        "{selector: {matchLabels: {app: echo}}, portLevelMtls: {\"9000\": {mode: STRICT}}}",
    ));
    assert!(t.accepted.is_true(), "{t:?}");
    let policy = t.policy.unwrap();
    assert_eq!(policy.mode, model::PeerAuthMode::Unset);
    assert_eq!(mode_of(policy.clone(), 9000), model::PeerAuthMode::Strict);
    assert_eq!(mode_of(policy, 8080), model::PeerAuthMode::Permissive);

    // A key that is no port: reported, the rest enforced.
    let t = peer_authentication(&pa(
        "{selector: {matchLabels: {app: echo}}, mtls: {mode: UNSET}, portLevelMtls: {http: {mode: STRICT}, \"8080\": {mode: STRICT}}}",
    ));
    assert!(!t.accepted.is_true(), "{t:?}");
    assert!(
        t.accepted.message.contains("\"http\" is not a port"),
        "{t:?}"
    );
    assert!(t.enforced.is_true(), "{t:?}");
    assert_eq!(
        mode_of(t.policy.unwrap(), 8080),
        model::PeerAuthMode::Strict
    );

    // No selector: the port entries cannot apply; STRICT ones make it all
    // STRICT rather than leave their ports open.
    let t = peer_authentication(&pa(
        "{mtls: {mode: PERMISSIVE}, portLevelMtls: {\"8080\": {mode: STRICT}}}",
    ));
    assert!(!t.accepted.is_true(), "{t:?}");
    assert_eq!(t.accepted.message, "portLevelMtls needs a selector");
    assert_eq!(t.enforced.reason, "EnforcedFailClosed", "{t:?}");
    let policy = t.policy.unwrap();
    assert!(policy.port_level_mtls.is_empty());
    assert_eq!(mode_of(policy.clone(), 8080), model::PeerAuthMode::Strict);
    assert_eq!(mode_of(policy, 9000), model::PeerAuthMode::Strict);
    // … and PERMISSIVE ones are dropped, the policy's own mode kept.
    let t = peer_authentication(&pa(
        "{mtls: {mode: STRICT}, portLevelMtls: {\"8080\": {mode: PERMISSIVE}}}",
    ));
    assert!(!t.accepted.is_true(), "{t:?}");
    assert_eq!(
        mode_of(t.policy.unwrap(), 8080),
        model::PeerAuthMode::Strict
    );
}

#[test]
fn the_committed_crds_are_current() {
    let committed = include_str!("../../manifests/crds.yaml");
    assert!(
        committed == controller::crds_yaml(),
        "manifests/crds.yaml is stale: run `cargo run -p controller -- crds > manifests/crds.yaml`"
    );
}
