//! Authorization and peer authentication decisions, as a table of policies
//! and connections.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::net::Ipv4Addr;

use identity::Identity;
use model::{Connection, MeshConfig, PeerAuthMode, Snapshot};

const WORKLOADS: &str = "
workloads:
  - {uid: echo, name: echo-0, namespace: demo, ips: [10.0.0.1], labels: {app: echo}}
  - {uid: other, name: other-0, namespace: demo, ips: [10.0.0.2], labels: {app: other}}
  - {uid: web, name: web-0, namespace: shop, ips: [10.0.1.1], labels: {app: web}}
";

fn snapshot(policies: &str) -> Snapshot {
    let config: MeshConfig = serde_yaml::from_str(&format!("{WORKLOADS}{policies}")).unwrap();
    Snapshot::new(config, 1).unwrap()
}

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

const SLEEP: &str = "spiffe://cluster.local/ns/demo/sa/sleep";
const INTRUDER: &str = "spiffe://cluster.local/ns/other/sa/intruder";

/// (allowed, deciding policy) of a connection to `dst`'s `port`; `src`
/// `None` is a plaintext client.
fn judge(
    snap: &Snapshot,
    src: Option<&str>,
    ip: &str,
    dst: &str,
    port: u16,
) -> (bool, Option<String>) {
    let identity = src.map(id);
    let verdict = snap.authorize(&Connection {
        src_identity: identity.as_ref(),
        src_ip: ip.parse::<Ipv4Addr>().unwrap(),
        dst: snap.workload(dst).unwrap(),
        dst_port: port,
    });
    (verdict.enforced.allowed, verdict.enforced.policy)
}

fn allowed(by: Option<&str>) -> (bool, Option<String>) {
    (true, by.map(str::to_string))
}

fn denied(by: Option<&str>) -> (bool, Option<String>) {
    (false, by.map(str::to_string))
}

#[test]
fn without_policies_everything_is_allowed() {
    let snap = snapshot("");
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.9.0.1", "echo", 8080),
        allowed(None)
    );
    assert_eq!(judge(&snap, None, "10.9.0.1", "echo", 8080), allowed(None));
}

#[test]
fn a_matching_deny_denies_and_others_pass() {
    let snap = snapshot(&format!(
        "
authorizationPolicies:
  - name: deny-sleep
    namespace: demo
    action: DENY
    rules: [{{from: [{{principals: [\"{SLEEP}\"]}}]}}]
"
    ));
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "echo", 8080),
        denied(Some("demo/deny-sleep"))
    );
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.0.0.9", "echo", 8080),
        allowed(None)
    );
    // Namespace scope: shop's workloads are not selected.
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "web", 8080),
        allowed(None)
    );
}

#[test]
fn once_an_allow_selects_a_workload_only_matching_connections_pass() {
    let snap = snapshot(
        "
authorizationPolicies:
  - name: echo-from-demo
    namespace: demo
    selector: {app: echo}
    rules: [{from: [{namespaces: [demo]}]}]
",
    );
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "echo", 8080),
        allowed(Some("demo/echo-from-demo"))
    );
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.0.0.9", "echo", 8080),
        denied(None)
    );
    // Plaintext has no namespace to match.
    assert_eq!(judge(&snap, None, "10.0.0.9", "echo", 8080), denied(None));
    // The selector leaves `other` without any ALLOW: open.
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.0.0.9", "other", 8080),
        allowed(None)
    );
}

#[test]
fn an_allow_without_rules_denies_everything_it_selects() {
    let snap = snapshot("authorizationPolicies: [{name: allow-nothing, namespace: demo}]\n");
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "echo", 8080),
        denied(None)
    );
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "web", 8080),
        allowed(None)
    );
}

#[test]
fn deny_wins_over_a_matching_allow() {
    let snap = snapshot(
        "
authorizationPolicies:
  - {name: allow-all, namespace: demo, rules: [{}]}
  - {name: deny-9000, namespace: demo, action: DENY, rules: [{to: [{ports: [9000]}]}]}
",
    );
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "echo", 9000),
        denied(Some("demo/deny-9000"))
    );
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "echo", 8080),
        allowed(Some("demo/allow-all"))
    );
}

#[test]
fn negations_match_what_is_absent_or_different() {
    let snap = snapshot(
        "
authorizationPolicies:
  - name: deny-plaintext
    namespace: demo
    action: DENY
    rules: [{from: [{notPrincipals: ['*']}]}]
  - name: deny-outsiders
    namespace: shop
    action: DENY
    rules: [{from: [{notNamespaces: [shop, 'dem*']}], to: [{notPorts: [15021]}]}]
",
    );
    assert_eq!(
        judge(&snap, None, "10.0.0.9", "echo", 8080),
        denied(Some("demo/deny-plaintext"))
    );
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.0.0.9", "echo", 8080),
        allowed(None)
    );
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.0.0.9", "web", 8080),
        denied(Some("shop/deny-outsiders"))
    );
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.0.0.9", "web", 15021),
        allowed(None)
    );
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "web", 8080),
        allowed(None)
    );
}

#[test]
fn ip_blocks_service_accounts_and_principal_wildcards() {
    let snap = snapshot(
        "
authorizationPolicies:
  - name: from-lan
    namespace: demo
    selector: {app: echo}
    rules:
      - from: [{ipBlocks: [10.0.0.0/24], notIpBlocks: [10.0.0.66]}]
      - from: [{serviceAccounts: [other/intruder]}]
  - name: demo-principals
    namespace: demo
    selector: {app: other}
    rules: [{from: [{principals: ['cluster.local/ns/demo/*']}]}]
",
    );
    assert_eq!(
        judge(&snap, None, "10.0.0.5", "echo", 8080),
        allowed(Some("demo/from-lan"))
    );
    assert_eq!(judge(&snap, None, "10.0.0.66", "echo", 8080), denied(None));
    assert_eq!(judge(&snap, None, "10.1.0.5", "echo", 8080), denied(None));
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.1.0.5", "echo", 8080),
        allowed(Some("demo/from-lan"))
    );
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.1.0.5", "other", 8080),
        allowed(Some("demo/demo-principals"))
    );
    assert_eq!(
        judge(&snap, Some(INTRUDER), "10.1.0.5", "other", 8080),
        denied(None)
    );
}

#[test]
fn global_policies_select_workloads_of_every_namespace() {
    let snap = snapshot(
        "
authorizationPolicies:
  - {name: no-9000, namespace: ambit-system, scope: Global, action: DENY, rules: [{to: [{ports: [9000]}]}]}
  - {name: web-only, namespace: ambit-system, scope: Global, selector: {app: web}, action: DENY, rules: [{to: [{ports: [7000]}]}]}
",
    );
    for dst in ["echo", "web"] {
        assert_eq!(
            judge(&snap, Some(SLEEP), "10.0.0.9", dst, 9000),
            denied(Some("ambit-system/no-9000"))
        );
    }
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "web", 7000),
        denied(Some("ambit-system/web-only"))
    );
    assert_eq!(
        judge(&snap, Some(SLEEP), "10.0.0.9", "echo", 7000),
        allowed(None)
    );
}

#[test]
fn audit_marks_and_dry_run_reports_without_enforcing() {
    let snap = snapshot(&format!(
        "
authorizationPolicies:
  - {{name: audit-sleep, namespace: demo, action: AUDIT, rules: [{{from: [{{principals: ['{SLEEP}']}}]}}]}}
  - {{name: would-deny, namespace: demo, action: DENY, dryRun: true, rules: [{{from: [{{principals: ['{SLEEP}']}}]}}]}}
"
    ));
    let sleep = id(SLEEP);
    let verdict = snap.authorize(&Connection {
        src_identity: Some(&sleep),
        src_ip: "10.0.0.9".parse().unwrap(),
        dst: snap.workload("echo").unwrap(),
        dst_port: 8080,
    });
    assert!(verdict.allowed());
    assert_eq!(verdict.audited_by, vec!["demo/audit-sleep".to_string()]);
    let dry = verdict.dry_run.unwrap();
    assert!(!dry.allowed);
    assert_eq!(dry.policy.as_deref(), Some("demo/would-deny"));
    assert_eq!(dry.reason(), "denied by demo/would-deny");

    let intruder = id(INTRUDER);
    let verdict = snap.authorize(&Connection {
        src_identity: Some(&intruder),
        src_ip: "10.0.0.9".parse().unwrap(),
        dst: snap.workload("echo").unwrap(),
        dst_port: 8080,
    });
    // AUDIT decides nothing: a client its rule does not match is not
    // denied as an ALLOW's would be.
    assert!(verdict.allowed());
    assert!(verdict.audited_by.is_empty());
    assert!(verdict.dry_run.unwrap().allowed);
    // No dry-run policy selects shop's workloads: nothing to report.
    let verdict = snap.authorize(&Connection {
        src_identity: Some(&intruder),
        src_ip: "10.0.0.9".parse().unwrap(),
        dst: snap.workload("web").unwrap(),
        dst_port: 8080,
    });
    assert!(verdict.dry_run.is_none());
}

#[test]
fn the_most_specific_peer_authentication_applies() {
    let snap = snapshot(
        "
peerAuthentications:
  - {name: mesh, namespace: ambit-system, scope: Global, mode: STRICT}
  - {name: demo, namespace: demo, mode: PERMISSIVE}
  - {name: echo-strict, namespace: demo, selector: {app: echo}, mode: STRICT}
",
    );
    let mode = |uid| snap.peer_authentication(snap.workload(uid).unwrap(), 8080);
    assert_eq!(
        mode("echo"),
        (PeerAuthMode::Strict, Some("demo/echo-strict".into()))
    );
    assert_eq!(
        mode("other"),
        (PeerAuthMode::Permissive, Some("demo/demo".into()))
    );
    assert_eq!(
        mode("web"),
        (PeerAuthMode::Strict, Some("ambit-system/mesh".into()))
    );
    assert_eq!(
        snapshot("").peer_authentication(snap.workload("web").unwrap(), 8080),
        (PeerAuthMode::Permissive, None)
    );
}

/// Istio's port-level modes and UNSET: a port's own mode over its
/// policy's, UNSET handing the decision to the next less specific policy.
#[test]
fn port_level_modes_and_unset_defer_to_the_next_level() {
    let snap = snapshot(
        "
peerAuthentications:
  - {name: mesh, namespace: ambit-system, scope: Global, mode: STRICT}
  - {name: demo, namespace: demo, mode: UNSET}
  - name: echo-ports
    namespace: demo
    selector: {app: echo}
    mode: UNSET
    portLevelMtls: {8080: PERMISSIVE, 9000: UNSET}
  - name: web-ports
    namespace: shop
    selector: {app: web}
    mode: PERMISSIVE
    portLevelMtls: {9000: STRICT}
",
    );
    let mode = |uid, port| snap.peer_authentication(snap.workload(uid).unwrap(), port);
    let set = |m, p: &str| (m, Some(p.to_string()));
    // echo: 8080 by its port entry; 9000 and 7070 fall through the
    // workload's and the namespace's UNSET to the mesh's STRICT.
    assert_eq!(
        mode("echo", 8080),
        set(PeerAuthMode::Permissive, "demo/echo-ports")
    );
    assert_eq!(
        mode("echo", 9000),
        set(PeerAuthMode::Strict, "ambit-system/mesh")
    );
    assert_eq!(
        mode("echo", 7070),
        set(PeerAuthMode::Strict, "ambit-system/mesh")
    );
    // other: the namespace's UNSET, then the mesh.
    assert_eq!(
        mode("other", 8080),
        set(PeerAuthMode::Strict, "ambit-system/mesh")
    );
    // web: one STRICT port of a PERMISSIVE workload.
    assert_eq!(
        mode("web", 9000),
        set(PeerAuthMode::Strict, "shop/web-ports")
    );
    assert_eq!(
        mode("web", 8080),
        set(PeerAuthMode::Permissive, "shop/web-ports")
    );
    // Nothing set anywhere: PERMISSIVE, no policy.
    let unset = snapshot(
        "
peerAuthentications:
  - {name: demo, namespace: demo, mode: UNSET}
",
    );
    assert_eq!(
        unset.peer_authentication(unset.workload("echo").unwrap(), 8080),
        (PeerAuthMode::Permissive, None)
    );
}

#[test]
fn invalid_policies_are_refused_with_the_policy_named() {
    let cases = [
        (
            "authorizationPolicies: [{name: p, namespace: demo, rules: [{from: [{principals: ['a*b']}]}]}]",
            "policy demo/p: \"a*b\": `*` is allowed only alone, at the start or at the end",
        ),
        (
            "authorizationPolicies: [{name: p, namespace: demo, rules: [{from: [{serviceAccounts: [sleep]}]}]}]",
            "policy demo/p: service account \"sleep\" is not <namespace>/<name>",
        ),
        (
            "authorizationPolicies: [{name: p, namespace: demo}, {name: p, namespace: demo}]",
            "policy demo/p: defined twice",
        ),
        (
            "authorizationPolicies: [{name: p, namespace: demo, rules: [{to: [{ports: [0]}]}]}]",
            "policy demo/p: 0 is not a port",
        ),
        (
            "peerAuthentications: [{name: m, namespace: x, scope: Global, selector: {a: b}, mode: STRICT}]",
            "policy x/m: a Global peer authentication cannot have a selector",
        ),
        (
            "peerAuthentications: [{name: m, namespace: demo, mode: STRICT, portLevelMtls: {8080: PERMISSIVE}}]",
            "policy demo/m: portLevelMtls needs a selector",
        ),
        (
            "peerAuthentications: [{name: m, namespace: demo, selector: {app: echo}, mode: STRICT, portLevelMtls: {0: PERMISSIVE}}]",
            "policy demo/m: portLevelMtls: port 0 is not a port",
        ),
    ];
    for (yaml, want) in cases {
        let config: MeshConfig = serde_yaml::from_str(&format!("{WORKLOADS}{yaml}\n")).unwrap();
        let err = Snapshot::new(config, 1).unwrap_err().to_string();
        assert_eq!(err, want);
    }
    let err = serde_yaml::from_str::<MeshConfig>(
        "authorizationPolicies: [{name: p, namespace: demo, action: REJECT}]",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("unknown variant `REJECT`"),
        "{err}"
    );
    let err = serde_yaml::from_str::<MeshConfig>(
        "authorizationPolicies: [{name: p, namespace: demo, rules: [{from: [{ipBlocks: [10.0.0.300/8]}]}]}]",
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("\"10.0.0.300/8\" is not an IPv4 address or CIDR"),
        "{err}"
    );
}
