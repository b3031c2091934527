//! Local manifests mode: the mesh file follows the manifests directory,
//! and a broken manifest leaves the last good config in place.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use controller::local::{LocalMode, Synced};

#[test]
fn the_mesh_file_follows_the_manifests_and_survives_a_broken_one() {
    let plan = lab::plan::Plan::new(&lab::LabSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("cluster");
    std::fs::create_dir(&manifests).unwrap();
    lab::k8s::write_all(&manifests, &lab::k8s::manifests(&plan)).unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    let mut local = LocalMode::new(manifests.clone(), mesh_file.clone(), "cluster.local".into());
    let read = || -> model::MeshConfig {
        serde_yaml::from_str(&std::fs::read_to_string(&mesh_file).unwrap()).unwrap()
    };

    assert_eq!(local.sync().unwrap(), Synced::Written);
    assert_eq!(read().workloads.len(), plan.pods.len());
    assert_eq!(local.sync().unwrap(), Synced::Unchanged);

    // A policy applied as a manifest reaches the mesh file.
    std::fs::write(
        manifests.join("authorizationpolicy.demo.deny.yaml"),
        "apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: demo}\nspec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}\n",
    )
    .unwrap();
    assert_eq!(local.sync().unwrap(), Synced::Written);
    assert_eq!(read().authorization_policies[0].name, "deny");

    // A broken manifest: the error names it and the file keeps the last
    // good config.
    let broken = manifests.join("pod.demo.broken.yaml");
    std::fs::write(
        &broken,
        "kind: Pod\nmetadata: {name: b}\nspec: {containers: 7}\n",
    )
    .unwrap();
    let before = std::fs::read_to_string(&mesh_file).unwrap();
    let err = local.sync().unwrap_err();
    assert!(err.contains("pod.demo.broken.yaml"), "{err}");
    assert_eq!(std::fs::read_to_string(&mesh_file).unwrap(), before);
    std::fs::remove_file(&broken).unwrap();
    assert_eq!(local.sync().unwrap(), Synced::Unchanged);
}
