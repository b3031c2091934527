//! The lab's cluster as ordinary Kubernetes objects, one YAML file per object
//! in the state directory: what `controller --manifests DIR` reads, so the lab
//! exercises the same translation code as a real cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    Container, HostIP, Namespace, Node, NodeAddress, NodeSpec, NodeStatus, Pod, PodIP, PodSpec,
    PodStatus, Service, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::error::LabError;
use crate::plan::{Plan, PodPlan, ServicePlan};
use crate::spec::WAYPOINT_PORT;

fn meta(name: &str, namespace: Option<&str>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: (!labels.is_empty()).then_some(labels),
        ..ObjectMeta::default()
    }
}

/// An object ready to be written: its file name and YAML.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub file: String,
    pub yaml: String,
}

fn manifest<T: Serialize>(kind: &str, namespace: Option<&str>, name: &str, obj: &T) -> Manifest {
    Manifest {
        file: file_name(kind, namespace, name),
        yaml: serde_yaml::to_string(obj).expect("Kubernetes objects serialize to YAML"),
    }
}

/// `<kind>.<namespace or _cluster>.<name>.yaml`: unique per object.
fn file_name(kind: &str, namespace: Option<&str>, name: &str) -> String {
    format!(
        "{}.{}.{name}.yaml",
        kind.to_ascii_lowercase(),
        namespace.unwrap_or("_cluster")
    )
}

/// Every object describing the plan's cluster.
pub fn manifests(plan: &Plan) -> Vec<Manifest> {
    let mut out = Vec::new();
    for ns in &plan.spec.namespaces {
        let obj = Namespace {
            metadata: meta(&ns.name, None, ns.labels.clone()),
            ..Namespace::default()
        };
        out.push(manifest("Namespace", None, &ns.name, &obj));
    }
    for node in &plan.nodes {
        let obj = Node {
            metadata: meta(&node.name, None, BTreeMap::new()),
            spec: Some(NodeSpec {
                pod_cidr: Some(node.pod_cidr.to_string()),
                pod_cidrs: Some(vec![node.pod_cidr.to_string()]),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: node.ip.to_string(),
                }]),
                ..NodeStatus::default()
            }),
        };
        out.push(manifest("Node", None, &node.name, &obj));
    }
    let mut accounts: Vec<(&str, &str)> = plan
        .pods
        .iter()
        .map(|p| (p.namespace.as_str(), p.service_account.as_str()))
        .collect();
    accounts.sort();
    accounts.dedup();
    for (ns, sa) in accounts {
        let obj = ServiceAccount {
            metadata: meta(sa, Some(ns), BTreeMap::new()),
            ..ServiceAccount::default()
        };
        out.push(manifest("ServiceAccount", Some(ns), sa, &obj));
    }
    for pod in &plan.pods {
        out.push(manifest(
            "Pod",
            Some(&pod.namespace),
            &pod.name,
            &pod_object(plan, pod),
        ));
    }
    for w in &plan.spec.waypoints {
        let gateway = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": w.name, "namespace": w.namespace},
            "spec": {
                "gatewayClassName": "ambit-waypoint",
                "listeners": [{"name": "mesh", "port": WAYPOINT_PORT, "protocol": "HBONE"}],
            },
        });
        out.push(manifest("Gateway", Some(&w.namespace), &w.name, &gateway));
    }
    for svc in &plan.services {
        let (service, slice) = service_objects(plan, svc);
        out.push(manifest(
            "Service",
            Some(&svc.namespace),
            &svc.name,
            &service,
        ));
        let slice_name = slice.metadata.name.clone().unwrap_or_default();
        out.push(manifest(
            "EndpointSlice",
            Some(&svc.namespace),
            &slice_name,
            &slice,
        ));
    }
    out
}

fn pod_object(plan: &Plan, pod: &PodPlan) -> Pod {
    let node = &plan.nodes[pod.node];
    let mut labels = pod.labels.clone();
    // Lab pods are named `<deployment>-<n>`; owned, as in a cluster, by
    // their Deployment's ReplicaSet, `<deployment>-<template hash>`, whose
    // hash their label repeats (telemetry names the Deployment).
    let deployment = pod.name.rsplit_once('-').map(|(d, _)| d);
    if deployment.is_some() {
        labels.insert("pod-template-hash".into(), "lab".into());
    }
    let mut metadata = meta(&pod.name, Some(&pod.namespace), labels);
    metadata.uid = Some(pod.uid.clone());
    if let Some(deployment) = deployment {
        metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: format!("{deployment}-lab"),
            uid: format!("{}-{deployment}-lab", pod.namespace),
            controller: Some(true),
            block_owner_deletion: None,
        }]);
    }
    Pod {
        metadata,
        spec: Some(PodSpec {
            node_name: Some(node.name.clone()),
            service_account_name: Some(pod.service_account.clone()),
            containers: vec![Container {
                name: "app".into(),
                image: Some(format!("ambit-lab/{:?}", pod.app).to_ascii_lowercase()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(pod.ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: pod.ip.to_string(),
            }]),
            host_ip: Some(node.ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: node.ip.to_string(),
            }]),
            ..PodStatus::default()
        }),
    }
}

fn service_objects(plan: &Plan, svc: &ServicePlan) -> (Service, EndpointSlice) {
    let service = Service {
        metadata: meta(&svc.name, Some(&svc.namespace), svc.labels.clone()),
        spec: Some(ServiceSpec {
            cluster_ip: Some(svc.cluster_ip.to_string()),
            cluster_ips: Some(vec![svc.cluster_ip.to_string()]),
            selector: Some(svc.selector.clone()),
            ports: Some(
                svc.ports
                    .iter()
                    .map(|p| ServicePort {
                        name: Some(p.name.clone()),
                        port: i32::from(p.port),
                        target_port: Some(IntOrString::Int(i32::from(p.target_port))),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let labels = BTreeMap::from([("kubernetes.io/service-name".to_string(), svc.name.clone())]);
    let slice = EndpointSlice {
        metadata: meta(&format!("{}-lab", svc.name), Some(&svc.namespace), labels),
        address_type: "IPv4".into(),
        endpoints: Some(
            svc.endpoints
                .iter()
                .map(|&i| {
                    let pod = &plan.pods[i];
                    Endpoint {
                        addresses: vec![pod.ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        node_name: Some(plan.nodes[pod.node].name.clone()),
                        target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                            kind: Some("Pod".into()),
                            name: Some(pod.name.clone()),
                            namespace: Some(pod.namespace.clone()),
                            uid: Some(pod.uid.clone()),
                            ..Default::default()
                        }),
                        ..Endpoint::default()
                    }
                })
                .collect(),
        ),
        ports: Some(
            svc.ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(i32::from(p.target_port)),
                    protocol: Some("TCP".into()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    };
    (service, slice)
}

/// Writes `manifests` into `dir`.
pub fn write_all(dir: &Path, manifests: &[Manifest]) -> Result<(), LabError> {
    std::fs::create_dir_all(dir).map_err(LabError::io(format!("create {}", dir.display())))?;
    for m in manifests {
        // Renamed into place: the controller polling the directory never
        // reads half an object.
        let path = dir.join(&m.file);
        let tmp = dir.join(format!(".{}.tmp", m.file));
        std::fs::write(&tmp, &m.yaml).map_err(LabError::io(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(LabError::io(format!("rename to {}", path.display())))?;
    }
    Ok(())
}

/// Splits a multi-document YAML file into objects, each checked to have
/// `apiVersion`, `kind` and `metadata.name`.
pub fn parse_objects(file: &str, text: &str) -> Result<Vec<Manifest>, LabError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| LabError::Object {
            file: file.to_string(),
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let field = |path: &[&str]| {
            path.iter()
                .try_fold(&value, |v, key| v.get(*key))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let missing = |what: &str| LabError::Object {
            file: file.to_string(),
            reason: format!("document {} has no {what}", i + 1),
        };
        field(&["apiVersion"]).ok_or_else(|| missing("apiVersion"))?;
        let kind = field(&["kind"]).ok_or_else(|| missing("kind"))?;
        let name = field(&["metadata", "name"]).ok_or_else(|| missing("metadata.name"))?;
        let namespace = field(&["metadata", "namespace"]);
        out.push(Manifest {
            file: file_name(&kind, namespace.as_deref(), &name),
            yaml: serde_yaml::to_string(&value).expect("a parsed YAML value serializes"),
        });
    }
    Ok(out)
}

/// The object files currently in `dir`.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::LabSpec;

    #[test]
    fn cluster_objects_carry_what_the_controller_reads() {
        let plan = Plan::new(&LabSpec::default());
        let all = manifests(&plan);
        let get = |file: &str| {
            let m = all
                .iter()
                .find(|m| m.file == file)
                .unwrap_or_else(|| panic!("{file}"));
            serde_yaml::from_str::<serde_yaml::Value>(&m.yaml).unwrap()
        };
        let ns = get("namespace._cluster.demo.yaml");
        assert_eq!(ns["kind"], "Namespace");
        assert_eq!(
            ns["metadata"]["labels"]["ambit.dev/dataplane-mode"],
            "ambient"
        );
        let pod = get("pod.demo.echo-1.yaml");
        assert_eq!(pod["apiVersion"], "v1");
        assert_eq!(pod["spec"]["nodeName"], "node-2");
        assert_eq!(pod["spec"]["serviceAccountName"], "echo");
        assert_eq!(pod["status"]["podIP"], "10.244.1.2");
        assert_eq!(pod["status"]["hostIP"], "172.18.0.11");
        let svc = get("service.demo.echo.yaml");
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
        let slice = get("endpointslice.demo.echo-lab.yaml");
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "echo"
        );
        assert_eq!(slice["endpoints"].as_sequence().unwrap().len(), 3);
        get("serviceaccount.legacy.sleep.yaml");
        get("node._cluster.node-1.yaml");
    }

    #[test]
    fn applied_files_are_split_and_checked() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {a: b}}\n---\n\
                    apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: x}\n";
        let objs = parse_objects("p.yaml", text).unwrap();
        assert_eq!(objs[0].file, "namespace._cluster.x.yaml");
        assert_eq!(objs[1].file, "authorizationpolicy.x.deny.yaml");
        let err = parse_objects("q.yaml", "kind: Pod\nmetadata: {name: a}\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("q.yaml: document 1 has no apiVersion"),
            "{err}"
        );
        let err = parse_objects("r.yaml", "a: [").unwrap_err();
        assert!(err.to_string().contains("r.yaml"), "{err}");
    }
}
