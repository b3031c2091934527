//! The install manifests, checked offline: every object parses as its
//! Kubernetes type with no field lost (a misspelt field would be), and the
//! controller Deployment's arguments, environment and ports are the ones
//! `controller serve` takes. Its RBAC is checked against the requests the
//! controller really makes in `integration-tests/tests/kube.rs`.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use clap::Parser;
use controller::run::KubeOptions;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    options: KubeOptions,
}

/// Parses `doc` as `K` and checks nothing was dropped on the way.
fn typed<K: DeserializeOwned + Serialize>(doc: &Value) -> K {
    let object: K = serde_json::from_value(doc.clone()).unwrap();
    assert_eq!(
        &serde_json::to_value(&object).unwrap(),
        doc,
        "fields lost parsing {}",
        doc["metadata"]["name"]
    );
    object
}

#[test]
fn the_controller_manifests_are_valid_and_match_what_the_controller_takes() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/controller.yaml"
    ))
    .unwrap();
    let mut kinds = Vec::new();
    let mut deployment = None;
    let mut service = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        let kind = doc["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "Namespace" => drop(typed::<Namespace>(&doc)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(&doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(&doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc)),
            "Role" => drop(typed::<Role>(&doc)),
            "RoleBinding" => drop(typed::<RoleBinding>(&doc)),
            "Service" => service = Some(typed::<Service>(&doc)),
            "Deployment" => deployment = Some(typed::<Deployment>(&doc)),
            other => panic!("unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment"
        ]
    );

    let deployment = deployment.unwrap();
    let pod = deployment.spec.template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("ambit-controller")
    );
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    assert_eq!(args[0], "serve");
    // POD_NAME comes from the environment in the cluster.
    let argv = ["controller"]
        .into_iter()
        .map(String::from)
        .chain(args[1..].iter().cloned())
        .chain(["--pod-name".into(), "controller-0".into()]);
    let serve = Cli::try_parse_from(argv).unwrap().options;
    let env: Vec<(&str, &str)> = container
        .env
        .iter()
        .flatten()
        .map(|e| {
            let field = e.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
            (e.name.as_str(), field.field_path.as_str())
        })
        .collect();
    assert_eq!(
        env,
        [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace")
        ]
    );
    let ports: Vec<(&str, i32)> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("grpc", i32::from(serve.serving.listen.port())),
            ("ops", i32::from(serve.serving.ops.port()))
        ]
    );
    for probe in [&container.readiness_probe, &container.liveness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert!(["/ready", "/healthz"].contains(&get.path.as_deref().unwrap()));
    }
    // The Service reaches the container's ports by name.
    let service = service.unwrap().spec.unwrap();
    for port in service.ports.unwrap() {
        let target = port.target_port.unwrap();
        let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) = target else {
            panic!("port {} targets a number", port.port);
        };
        assert!(ports.iter().any(|(n, _)| *n == name), "{name}");
    }
}
