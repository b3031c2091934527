//! Waypoint deployment. For each Gateway of class `ambit-waypoint` the
//! leader applies (server-side apply, field manager `ambit-controller`) a
//! ServiceAccount, a Service on the HBONE port and a Deployment of the
//! Gateway's name, and the mesh root certificate in ConfigMap
//! `ambit-root-cert` of its namespace. All are owned by the Gateway, so
//! deleting it deletes them. The waypoint runs as its own service account:
//! the CA gives it that identity only, and the stream its namespace's view.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cluster::DATAPLANE_MODE;
use crate::gateway::{GATEWAY_NAME_LABEL, Gateway, HBONE_PORT};

/// The ConfigMap holding the mesh root certificate(s), PEM.
pub const ROOT_CONFIGMAP: &str = "ambit-root-cert";
pub const FIELD_MANAGER: &str = "ambit-controller";
/// The audience of the token a waypoint presents to the controller.
pub const TOKEN_AUDIENCE: &str = "ambit";

/// How waypoints are deployed.
#[derive(Debug, Clone, clap::Args)]
pub struct WaypointOptions {
    /// The waypoint container image.
    #[arg(long, default_value = concat!("ambit/waypoint:", env!("CARGO_PKG_VERSION")))]
    pub waypoint_image: String,
    /// Where waypoints reach the controller (config stream and CA).
    #[arg(long, default_value = "ambit-controller.ambit-system.svc:15012")]
    pub controller_address: String,
}

/// What is applied for one waypoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub service_account: Value,
    pub service: Value,
    pub deployment: Value,
    pub root_cert: Value,
}

/// The resources of the waypoint `gateway`; `None` when the Gateway has no
/// uid or namespace yet (nothing could own them).
pub fn resources(gateway: &Gateway, roots_pem: &str, opts: &WaypointOptions) -> Option<Resources> {
    let name = gateway.name_any();
    let namespace = gateway.namespace()?;
    let owner = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": name,
        "uid": gateway.uid()?,
        "controller": true,
        "blockOwnerDeletion": true,
    });
    let labels: BTreeMap<&str, &str> = [
        (GATEWAY_NAME_LABEL, name.as_str()),
        ("app.kubernetes.io/name", "ambit-waypoint"),
        ("app.kubernetes.io/managed-by", FIELD_MANAGER),
    ]
    .into();
    let meta = |name: &str| json!({"name": name, "namespace": namespace, "labels": labels, "ownerReferences": [owner]});
    let selector = json!({ GATEWAY_NAME_LABEL: name });
    Some(Resources {
        service_account: json!({
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(&name),
        }),
        service: json!({
            "apiVersion": "v1", "kind": "Service", "metadata": meta(&name),
            "spec": {
                "selector": selector,
                "ports": [{"name": "mesh", "port": HBONE_PORT, "protocol": "TCP"}],
            },
        }),
        root_cert: json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(ROOT_CONFIGMAP),
            "data": {"root-cert.pem": roots_pem},
        }),
        deployment: json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(&name),
            "spec": {
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": {
                        GATEWAY_NAME_LABEL: name,
                        "app.kubernetes.io/name": "ambit-waypoint",
                        // The waypoint terminates HBONE itself.
                        DATAPLANE_MODE: "none",
                    }},
                    "spec": {
                        "serviceAccountName": name,
                        "automountServiceAccountToken": false,
                        "containers": [{
                            "name": "waypoint",
                            "image": opts.waypoint_image,
                            "args": [
                                "--controller", opts.controller_address,
                                "--controller-token", "/var/run/secrets/ambit/token",
                                "--mesh-roots", "/etc/ambit/root-cert.pem",
                            ],
                            "env": [
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                            ],
                            "ports": [
                                {"name": "mesh", "containerPort": HBONE_PORT},
                                {"name": "metrics", "containerPort": 15020},
                            ],
                            "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15020}},
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "securityContext": {
                                "runAsNonRoot": true,
                                "runAsUser": 1337,
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "token", "mountPath": "/var/run/secrets/ambit", "readOnly": true},
                                {"name": "root-cert", "mountPath": "/etc/ambit", "readOnly": true},
                            ],
                        }],
                        "volumes": [
                            {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                                "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token",
                            }}]}},
                            {"name": "root-cert", "configMap": {"name": ROOT_CONFIGMAP}},
                        ],
                    },
                },
            },
        }),
    })
}

/// Publishes the mesh root in ConfigMap `ambit-root-cert` of `namespace`
/// (data planes check the controller's certificate with it).
pub async fn apply_root_cert(
    client: &Client,
    namespace: &str,
    roots_pem: &str,
) -> Result<(), kube::Error> {
    let object = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
        "data": {"root-cert.pem": roots_pem},
    });
    apply_one::<ConfigMap>(client, namespace, &object).await
}

/// Applies the waypoint's resources.
pub async fn apply(
    client: &Client,
    gateway: &Gateway,
    roots_pem: &str,
    opts: &WaypointOptions,
) -> Result<(), kube::Error> {
    let Some(r) = resources(gateway, roots_pem, opts) else {
        return Ok(());
    };
    let namespace = gateway.namespace().unwrap_or_default();
    apply_one::<ServiceAccount>(client, &namespace, &r.service_account).await?;
    apply_one::<ConfigMap>(client, &namespace, &r.root_cert).await?;
    apply_one::<Service>(client, &namespace, &r.service).await?;
    apply_one::<Deployment>(client, &namespace, &r.deployment).await
}

async fn apply_one<K>(client: &Client, namespace: &str, object: &Value) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(name, &params, &Patch::Apply(object))
        .await
        .map(drop)
}
