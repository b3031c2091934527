//! Local manifests mode: the config follows the manifests directory, and
//! a broken manifest leaves the last good config in place.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::sync::Arc;

use controller::auth::BootstrapTokens;
use controller::local::LocalMode;
use controller::metrics::Metrics;
use controller::pipeline::Pipeline;
use controller::stream::ConfigServer;
use tokio_util::sync::CancellationToken;

#[test]
fn the_config_follows_the_manifests_and_survives_a_broken_one() {
    let plan = lab::plan::Plan::new(&lab::LabSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("cluster");
    std::fs::create_dir(&manifests).unwrap();
    lab::k8s::write_all(&manifests, &lab::k8s::manifests(&plan)).unwrap();
    let local = LocalMode::new(manifests.clone(), "cluster.local".into());
    let metrics = Arc::new(Metrics::default());
    let server = ConfigServer::new(
        Arc::new(BootstrapTokens::parse("tokens: []").unwrap()),
        metrics.clone(),
        CancellationToken::new(),
    );
    let mut pipeline = Pipeline::new("cluster.local", server.clone(), metrics.clone(), None);

    local.sync(&mut pipeline).unwrap();
    let first = server.config();
    assert_eq!(first.workloads.len(), plan.pods.len());
    assert!(
        pipeline
            .translator
            .object_counts()
            .contains(&("Pod", plan.pods.len() as u64))
    );
    assert_eq!(server.version(), 1);
    local.sync(&mut pipeline).unwrap();
    assert_eq!(server.version(), 1, "unchanged: no new version");
    assert_eq!(server.config(), first);

    // A policy applied as a manifest reaches the config, as one change.
    std::fs::write(
        manifests.join("authorizationpolicy.demo.deny.yaml"),
        "apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}\n",
    )
    .unwrap();
    local.sync(&mut pipeline).unwrap();
    let next = server.config();
    assert_eq!(next.authorization_policies[0].name, "deny");
    assert_eq!(server.version(), 2);

    // A broken manifest: the error names it, and once it is gone the
    // config is as before.
    let broken = manifests.join("pod.demo.broken.yaml");
    std::fs::write(
        &broken,
        "kind: Pod\nmetadata: {name: b}\nspec: {containers: 7}\n",
    )
    .unwrap();
    let err = local.sync(&mut pipeline).unwrap_err();
    assert!(err.contains("pod.demo.broken.yaml"), "{err}");
    assert_eq!(server.config(), next);
    std::fs::remove_file(&broken).unwrap();
    local.sync(&mut pipeline).unwrap();
    assert_eq!(server.config(), next);
    assert_eq!(server.version(), 2);
}

#[test]
fn a_policy_with_a_field_its_type_does_not_know_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    let read = || controller::manifests::read_dir(dir.path(), "cluster.local");
    // Istio's fields are known, even those ztunnel cannot check.
    write(
        "ap.yaml",
        "apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  rules:\n    - from: [{source: {requestPrincipals: [\"*\"]}}]\n      when: [{key: \"request.headers[x]\", values: [y]}]\n",
    );
    let cluster = read().unwrap();
    assert_eq!(
        cluster.authorization_policies[0].spec.rules[0].when.len(),
        1
    );

    // Without an API server to prune it, a dropped field could widen the
    // ALLOW: refused instead.
    write(
        "ap.yaml",
        "apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  selector: {matchLabel: {app: echo}}\n  rules: [{from: [{source: {principal: [x]}}]}]\n",
    );
    let err = read().unwrap_err().to_string();
    assert!(err.contains("ap.yaml"), "{err}");
    assert!(
        err.contains(
            "unknown field spec.selector.matchLabel, spec.rules[0].from[0].source.principal"
        ),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("ap.yaml")).unwrap();

    write(
        "pa.yaml",
        "apiVersion: security.ambit.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: demo}\nspec:\n  mtls: {mode: PERMISSIVE}\n  portLevelMTLS: {\"8080\": {mode: STRICT}}\n",
    );
    let err = read().unwrap_err().to_string();
    assert!(
        err.contains("pa.yaml: unknown field spec.portLevelMTLS"),
        "{err}"
    );
}
