//! Kubernetes objects into the mesh model: which pods are meshed, what
//! every Service's endpoints are, which waypoint serves what, and the
//! policies. One pure function of the watched objects, so the pipeline is
//! tested without a cluster.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use model::{
    InboundProtocol, Locality, MeshConfig, Service, ServicePort, TrafficDistribution, WaypointRef,
    Workload,
};

use crate::crd::{AuthorizationPolicy, Condition, PeerAuthentication};
use crate::translate;

/// Namespaces (and pods, to opt out) join the mesh with this label.
pub const DATAPLANE_MODE: &str = "ambit.dev/dataplane-mode";
/// A namespace, Service or pod labelled with a waypoint's name sends its
/// inbound traffic through that waypoint (its Service in the same
/// namespace).
pub const USE_WAYPOINT: &str = "ambit.dev/use-waypoint";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

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

impl Cluster {
    /// How many objects of each kind, for metrics.
    pub fn object_counts(&self) -> [(&'static str, u64); 7] {
        [
            ("Namespace", self.namespaces.len() as u64),
            ("Node", self.nodes.len() as u64),
            ("Pod", self.pods.len() as u64),
            ("Service", self.services.len() as u64),
            ("EndpointSlice", self.endpoint_slices.len() as u64),
            (
                "AuthorizationPolicy",
                self.authorization_policies.len() as u64,
            ),
            ("PeerAuthentication", self.peer_authentications.len() as u64),
        ]
    }
}

fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    labels.get(key).map(String::as_str)
}

fn ipv4s<'a>(ips: impl Iterator<Item = &'a str>) -> Vec<Ipv4Addr> {
    ips.filter_map(|ip| ip.parse().ok()).collect()
}

/// The cluster indexed for one translation: every lookup by name is a
/// hash lookup, so a pass is linear in the number of objects.
struct View<'a> {
    trust_domain: &'a str,
    namespaces: HashMap<String, &'a Namespace>,
    nodes: HashMap<String, &'a Node>,
    services: HashMap<(String, String), &'a KubeService>,
    /// (namespace, service name) → its slices.
    slices: HashMap<(String, String), Vec<&'a EndpointSlice>>,
}

impl<'a> View<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        let mut slices: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &cluster.endpoint_slices {
            if let Some(service) = label(slice.labels(), SERVICE_NAME_LABEL) {
                slices
                    .entry((slice.namespace().unwrap_or_default(), service.to_string()))
                    .or_default()
                    .push(slice);
            }
        }
        Self {
            trust_domain: &cluster.trust_domain,
            namespaces: cluster
                .namespaces
                .iter()
                .map(|n| (n.name_any(), &**n))
                .collect(),
            nodes: cluster.nodes.iter().map(|n| (n.name_any(), &**n)).collect(),
            services: cluster
                .services
                .iter()
                .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), &**s))
                .collect(),
            slices,
        }
    }

    fn namespace(&self, name: &str) -> Option<&'a Namespace> {
        self.namespaces.get(name).copied()
    }

    /// A pod is meshed when its namespace is labelled `ambient` and the
    /// pod does not opt out with `none`.
    fn is_meshed(&self, pod: &Pod) -> bool {
        let ns = pod.namespace().unwrap_or_default();
        let ns_ambient = self
            .namespace(&ns)
            .is_some_and(|n| label(n.labels(), DATAPLANE_MODE) == Some("ambient"));
        ns_ambient && label(pod.labels(), DATAPLANE_MODE) != Some("none")
    }

    /// The waypoint Service VIP named by `name` in `namespace`, when it
    /// exists (a missing waypoint is not referenced: the config would be
    /// refused whole).
    fn waypoint(&self, namespace: &str, name: Option<&str>) -> Option<WaypointRef> {
        let name = name?;
        self.services
            .get(&(namespace.to_string(), name.to_string()))
            .and_then(|s| cluster_ips(s))
            .and_then(|ips| ips.first().copied())
            .map(|address| WaypointRef { address })
    }

    fn locality(&self, node: &str) -> Locality {
        self.nodes
            .get(node)
            .map(|n| Locality {
                region: label(n.labels(), REGION_LABEL).unwrap_or_default().into(),
                zone: label(n.labels(), ZONE_LABEL).unwrap_or_default().into(),
            })
            .unwrap_or_default()
    }

    fn workload(&self, pod: &Pod) -> Option<Workload> {
        let spec = pod.spec.as_ref()?;
        let status = pod.status.as_ref()?;
        // Finished pods hold no traffic; host-network pods share the
        // node's address and are not workloads of their own.
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
            || spec.host_network == Some(true)
        {
            return None;
        }
        let ips = match &status.pod_ips {
            Some(ips) if !ips.is_empty() => ipv4s(ips.iter().map(|ip| ip.ip.as_str())),
            _ => ipv4s(status.pod_ip.as_deref().into_iter()),
        };
        if ips.is_empty() {
            return None;
        }
        let namespace = pod.namespace()?;
        let node = spec.node_name.clone().unwrap_or_default();
        let waypoint_name = label(pod.labels(), USE_WAYPOINT).or_else(|| {
            self.namespace(&namespace)
                .and_then(|n| label(n.labels(), USE_WAYPOINT))
        });
        Some(Workload {
            uid: pod.uid()?,
            name: pod.name_any(),
            namespace: namespace.clone(),
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
            ips,
            locality: self.locality(&node),
            node,
            protocol: if self.is_meshed(pod) {
                InboundProtocol::Hbone
            } else {
                InboundProtocol::Tcp
            },
            workload_name: owner_name(pod),
            labels: pod.labels().clone(),
            waypoint: self.waypoint(&namespace, waypoint_name),
        })
    }

    fn service(&self, svc: &KubeService, pods: &HashMap<String, &Workload>) -> Option<Service> {
        let vips = cluster_ips(svc)?;
        let spec = svc.spec.as_ref()?;
        let namespace = svc.namespace()?;
        let name = svc.name_any();
        let slices: &[&EndpointSlice] = self
            .slices
            .get(&(namespace.clone(), name.clone()))
            .map_or(&[], Vec::as_slice);
        // A named target port is resolved by the endpoint slices, which
        // carry the number under the service port's name.
        let slice_port = |port_name: Option<&str>| {
            slices
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .find(|p| p.name.as_deref() == port_name)
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target = match &p.target_port {
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    Some(IntOrString::String(_)) => slice_port(p.name.as_deref()),
                    None => Some(port),
                }?;
                Some(ServicePort {
                    name: p.name.clone(),
                    port,
                    target_port: (target != port).then_some(target),
                })
            })
            .collect::<Vec<_>>();
        if ports.is_empty() {
            return None;
        }
        let mut endpoints: Vec<String> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .filter_map(|e| e.target_ref.as_ref()?.uid.clone())
            .filter(|uid| pods.contains_key(uid))
            .collect();
        endpoints.sort();
        endpoints.dedup();
        Some(Service {
            hostname: Some(format!("{name}.{namespace}.svc.{}", self.trust_domain)),
            waypoint: self.waypoint(&namespace, label(svc.labels(), USE_WAYPOINT)),
            name,
            namespace,
            vips,
            ports,
            endpoints,
            traffic_distribution: match spec.traffic_distribution.as_deref() {
                Some("PreferSameNode") => Some(TrafficDistribution::PreferSameNode),
                Some("PreferSameZone" | "PreferClose") => Some(TrafficDistribution::PreferSameZone),
                _ => None,
            },
        })
    }
}

impl Cluster {
    /// The whole mesh config. Policies that are not accepted are left out
    /// (their status says why: [`Cluster::translate`]).
    pub fn mesh_config(&self) -> MeshConfig {
        self.translate().0
    }

    /// The whole mesh config and the status of every policy, each policy
    /// translated once.
    pub fn translate(&self) -> (MeshConfig, Vec<PolicyStatus>) {
        let mut statuses = Vec::new();
        let mut authorization_policies = Vec::new();
        for ap in &self.authorization_policies {
            let t = translate::authorization_policy(ap);
            statuses.push(PolicyStatus::new(
                "AuthorizationPolicy",
                &**ap,
                t.accepted,
                t.enforced,
            ));
            authorization_policies.extend(t.policy);
        }
        let mut peer_authentications = Vec::new();
        for pa in &self.peer_authentications {
            let t = translate::peer_authentication(pa);
            statuses.push(PolicyStatus::new(
                "PeerAuthentication",
                &**pa,
                t.accepted,
                t.enforced,
            ));
            peer_authentications.extend(t.policy);
        }
        let view = View::new(self);
        let mut workloads: Vec<Workload> =
            self.pods.iter().filter_map(|p| view.workload(p)).collect();
        // Two pods claiming one IP (a finished pod not yet reported as
        // such): one is kept, the same one on every run (first by uid),
        // rather than the whole config being refused.
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut seen = HashMap::new();
        workloads.retain(|w| w.ips.iter().all(|ip| seen.insert(*ip, ()).is_none()));
        let by_uid: HashMap<String, &Workload> =
            workloads.iter().map(|w| (w.uid.clone(), w)).collect();
        let services = self
            .services
            .iter()
            .filter_map(|s| view.service(s, &by_uid))
            .collect();
        let config = MeshConfig {
            trust_domain: self.trust_domain.clone(),
            authorization_policies,
            peer_authentications,
            services,
            workloads,
        };
        (config, statuses)
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
    fn new(
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

fn cluster_ips(svc: &KubeService) -> Option<Vec<Ipv4Addr>> {
    let spec = svc.spec.as_ref()?;
    let ips = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ipv4s(ips.iter().map(String::as_str)),
        _ => ipv4s(spec.cluster_ip.as_deref().into_iter()),
    };
    (!ips.is_empty()).then_some(ips)
}

/// The owning workload for telemetry: a ReplicaSet's Deployment (its name
/// without the template hash), or the direct owner.
fn owner_name(pod: &Pod) -> Option<String> {
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
