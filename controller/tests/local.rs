//! Local manifests mode: the config follows the manifests directory, and
//! a broken manifest leaves the last good config in place.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use controller::local::LocalMode;

#[test]
fn the_config_follows_the_manifests_and_survives_a_broken_one() {
    let plan = lab::plan::Plan::new(&lab::LabSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("cluster");
    std::fs::create_dir(&manifests).unwrap();
    lab::k8s::write_all(&manifests, &lab::k8s::manifests(&plan)).unwrap();
    let mut local = LocalMode::new(manifests.clone(), "cluster.local".into());

    let first = local.sync().unwrap();
    assert_eq!(first.config.workloads.len(), plan.pods.len());
    assert!(first.objects.contains(&("Pod", plan.pods.len() as u64)));
    assert_eq!(local.sync().unwrap().config, first.config, "unchanged");

    // A policy applied as a manifest reaches the config.
    std::fs::write(
        manifests.join("authorizationpolicy.demo.deny.yaml"),
        "apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}\n",
    )
    .unwrap();
    let next = local.sync().unwrap();
    assert_eq!(next.config.authorization_policies[0].name, "deny");

    // A broken manifest: the error names it, and once it is gone the
    // config is as before.
    let broken = manifests.join("pod.demo.broken.yaml");
    std::fs::write(
        &broken,
        "kind: Pod\nmetadata: {name: b}\nspec: {containers: 7}\n",
    )
    .unwrap();
    let err = local.sync().unwrap_err();
    assert!(err.contains("pod.demo.broken.yaml"), "{err}");
    std::fs::remove_file(&broken).unwrap();
    assert_eq!(local.sync().unwrap().config, next.config);
}
