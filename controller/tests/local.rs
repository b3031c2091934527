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
