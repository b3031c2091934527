//! The cluster's objects as a whole (a manifests directory, a copy of the
//! stores) and what the translation makes of them: the mesh config and
//! each policy's conditions. The translation itself is
//! [`crate::translator`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use model::MeshConfig;

use crate::crd::{AuthorizationPolicy, Condition, PeerAuthentication};
use crate::translator::Translator;

/// Namespaces (and pods, to opt out) join the mesh with this label.
pub const DATAPLANE_MODE: &str = "ambit.dev/dataplane-mode";
/// A namespace, Service or pod labelled with a waypoint's name sends its
/// inbound traffic through that waypoint (its Service in the same
/// namespace).
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
    pub fn translate(&self) -> (MeshConfig, Vec<PolicyStatus>) {
        let mut translator = Translator::new(&self.trust_domain);
        translator.sync(self);
        translator.flush();
        let statuses = translator.statuses().cloned().collect();
        (translator.config(), statuses)
    }
}

/// One policy object's conditions, for the generation they judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStatus {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub accepted: Condition,
    pub enforced: Condition,
}

impl PolicyStatus {
    pub(crate) fn new(
        kind: &'static str,
        object: &impl ResourceExt,
        accepted: Condition,
        enforced: Condition,
    ) -> Self {
        let generation = object.meta().generation;
        Self {
            kind,
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
            accepted: Condition {
                observed_generation: generation,
                ..accepted
            },
            enforced: Condition {
                observed_generation: generation,
                ..enforced
            },
        }
    }

    /// `<Kind> <namespace>/<name>`.
    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// The `status` to write back.
    pub fn status(&self) -> crate::crd::PolicyStatus {
        crate::crd::PolicyStatus {
            conditions: vec![self.accepted.clone(), self.enforced.clone()],
        }
    }
}

impl std::fmt::Display for PolicyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: Accepted={} ({}), Enforced={} ({}: {})",
            self.object(),
            self.accepted.status,
            self.accepted.reason,
            self.enforced.status,
            self.enforced.reason,
            self.enforced.message
        )
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

/// The owning workload for telemetry: a ReplicaSet's Deployment (its name
/// without the template hash), or the direct owner.
pub(crate) fn owner_name(pod: &Pod) -> Option<String> {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))?;
    if owner.kind == "ReplicaSet"
        && let Some((deployment, _hash)) = owner.name.rsplit_once('-')
    {
        return Some(deployment.to_string());
    }
    Some(owner.name.clone())
}
