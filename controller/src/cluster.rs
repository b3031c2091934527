//! The cluster's objects as a whole (a manifests directory, a copy of the
//! stores) and what the translation makes of them: the mesh config and
//! each policy's conditions. The translation itself is
//! [`crate::translator`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use model::MeshConfig;

use crate::crd::{AuthorizationPolicy, Condition, PeerAuthentication};
use crate::gateway::Gateway;
use crate::routes::{GrpcRoute, HttpRoute, RouteParentStatus};
use crate::translator::Translator;

/// Namespaces (and pods, to opt out) join the mesh with this label.
pub const DATAPLANE_MODE: &str = "ambit.dev/dataplane-mode";
/// A namespace, service account, Service or pod labelled with a
/// waypoint's name sends its inbound traffic through that waypoint (the
/// Gateway of class `ambit-waypoint` of that name in the same namespace);
/// `none` opts out of a namespace's waypoint.
pub const USE_WAYPOINT: &str = "ambit.dev/use-waypoint";
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub(crate) const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub(crate) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the controller watches, as its reflector stores hold it (shared,
/// so a pass copies pointers, not objects).
#[derive(Debug, Default, Clone)]
pub struct Cluster {
    pub trust_domain: String,
    pub namespaces: Vec<Arc<Namespace>>,
    pub nodes: Vec<Arc<Node>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<KubeService>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub gateways: Vec<Arc<Gateway>>,
    pub deployments: Vec<Arc<Deployment>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    pub grpc_routes: Vec<Arc<GrpcRoute>>,
}

pub(crate) fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    labels.get(key).map(String::as_str)
}

/// The IPv4 addresses among `ips`, each once, in order.
pub(crate) fn ipv4s<'a>(ips: impl Iterator<Item = &'a str>) -> Vec<Ipv4Addr> {
    let mut seen = std::collections::HashSet::new();
    ips.filter_map(|ip| ip.parse().ok())
        .filter(|ip| seen.insert(*ip))
        .collect()
}

impl Cluster {
    /// The whole mesh config. Policies that are not accepted are left out
    /// (their status says why: [`Cluster::translate`]).
    pub fn mesh_config(&self) -> MeshConfig {
        self.translate().0
    }

    /// The whole mesh config and the status of every policy: what the
    /// incremental translator makes of these objects from scratch.
    pub fn translate(&self) -> (MeshConfig, Vec<ObjectStatus>) {
        let mut translator = Translator::new(&self.trust_domain);
        translator.sync(self);
        translator.flush();
        let statuses = translator.statuses().cloned().collect();
        (translator.config(), statuses)
    }
}

/// One object's conditions for the generation they judged: a policy's
/// `Accepted` and `Enforced`, a waypoint Gateway's `Accepted` and
/// `Programmed` (and its addresses), a route's `Accepted` and
/// `ResolvedRefs` per parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStatus {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub conditions: Vec<Condition>,
    pub addresses: Vec<Ipv4Addr>,
    /// Routes: this controller's entries of `status.parents`.
    pub parents: Vec<RouteParentStatus>,
}

impl ObjectStatus {
    pub(crate) fn new(
        kind: &'static str,
        object: &impl ResourceExt,
        conditions: Vec<Condition>,
    ) -> Self {
        let generation = object.meta().generation;
        Self {
            kind,
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
            conditions: conditions
                .into_iter()
                .map(|c| Condition {
                    observed_generation: generation,
                    ..c
                })
                .collect(),
            addresses: Vec::new(),
            parents: Vec::new(),
        }
    }

    /// `<Kind> <namespace>/<name>`.
    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    pub fn is_route(&self) -> bool {
        matches!(self.kind, "HTTPRoute" | "GRPCRoute")
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// The `status` to write back (without transition times: the writer
    /// keeps those of conditions that did not change). A route's has only
    /// this controller's parents; the writer keeps the others'.
    pub fn status(&self) -> serde_json::Value {
        if self.is_route() {
            return serde_json::json!({ "parents": self.parents });
        }
        let mut status = serde_json::json!({ "conditions": self.conditions });
        if self.kind == "Gateway" {
            status["addresses"] = self
                .addresses
                .iter()
                .map(|a| serde_json::json!({"type": "IPAddress", "value": a.to_string()}))
                .collect();
        }
        status
    }
}

impl std::fmt::Display for ObjectStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.object())?;
        let parents = self.parents.iter().map(|p| {
            let r = &p.parent_ref;
            (
                format!(
                    " parent {} {}:",
                    r.kind.as_deref().unwrap_or("Gateway"),
                    r.name
                ),
                &p.conditions,
            )
        });
        let all = std::iter::once((String::new(), &self.conditions)).chain(parents);
        for (prefix, conditions) in all {
            f.write_str(&prefix)?;
            for (i, c) in conditions.iter().enumerate() {
                let sep = if i == 0 { " " } else { ", " };
                write!(
                    f,
                    "{sep}{}={} ({}: {})",
                    c.type_, c.status, c.reason, c.message
                )?;
            }
        }
        Ok(())
    }
}

pub(crate) fn cluster_ips(svc: &KubeService) -> Option<Vec<Ipv4Addr>> {
    let spec = svc.spec.as_ref()?;
    let ips = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ipv4s(ips.iter().map(String::as_str)),
        _ => ipv4s(spec.cluster_ip.as_deref().into_iter()),
    };
    (!ips.is_empty()).then_some(ips)
}

/// The owning workload for telemetry, named as Istio names it: a
/// Deployment's ReplicaSet by the Deployment (the name without the pod's
/// `pod-template-hash`), a CronJob's Job by the CronJob (the name without
/// the `-<minutes since the epoch>` suffix of each run), otherwise the
/// direct owner. Each run or rollout would otherwise make new metric
/// series.
pub(crate) fn owner_name(pod: &Pod) -> Option<String> {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))?;
    let name = owner.name.as_str();
    let stripped = match owner.kind.as_str() {
        "ReplicaSet" => label(pod.labels(), "pod-template-hash")
            .and_then(|hash| name.strip_suffix(hash))
            .and_then(|rest| rest.strip_suffix('-')),
        "Job" => name.rsplit_once('-').and_then(|(cronjob, run)| {
            let timestamp =
                (8..=10).contains(&run.len()) && run.bytes().all(|b| b.is_ascii_digit());
            timestamp.then_some(cronjob)
        }),
        _ => None,
    };
    Some(stripped.unwrap_or(name).to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use super::*;

    fn owned(kind: &str, owner: &str, hash: Option<&str>) -> Pod {
        let labels = hash.map_or_else(
            || serde_json::json!({}),
            |h| serde_json::json!({"pod-template-hash": h}),
        );
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "labels": labels, "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "u", "controller": true}
            ]}
        }))
        .unwrap()
    }

    /// Names as Istio gives them, so that a rollout or a CronJob's next
    /// run keeps its metric series.
    #[test]
    fn owners_are_named_by_the_workload_that_outlives_them() {
        let cases = [
            (
                owned("ReplicaSet", "web-7d4f9c8b5", Some("7d4f9c8b5")),
                "web",
            ),
            (
                owned("ReplicaSet", "my-web-7d4f9c8b5", Some("7d4f9c8b5")),
                "my-web",
            ),
            // A ReplicaSet of its own, not a Deployment's: kept whole.
            (owned("ReplicaSet", "cache-blue", None), "cache-blue"),
            (owned("Job", "report-29001234", None), "report"),
            (owned("Job", "backfill-once", None), "backfill-once"),
            (owned("Job", "backfill-1", None), "backfill-1"),
            (owned("StatefulSet", "db", None), "db"),
        ];
        for (pod, want) in cases {
            assert_eq!(owner_name(&pod).as_deref(), Some(want), "{pod:?}");
        }
        let bare: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}})).unwrap();
        assert_eq!(owner_name(&bare), None);
    }
}
