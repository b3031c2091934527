//! A lab definition turned into concrete objects: node and pod addresses,
//! namespace and cgroup names, service VIPs and endpoints. Pure: computing
//! a plan touches nothing on the host.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::cidr::Ipv4Cidr;
use crate::spec::{App, LabSpec};

/// Where the lab's cgroups live.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/ambit-lab";

/// Port of the echo app's HTTP listener.
pub const ECHO_HTTP_PORT: u16 = 8080;
/// Port of the echo app's TCP echo listener.
pub const ECHO_TCP_PORT: u16 = 9000;
/// Port of the echo app's gRPC listener.
pub const ECHO_GRPC_PORT: u16 = 9090;

#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: LabSpec,
    pub net_netns: String,
    /// The cluster network's own address (on its bridge).
    pub bridge_ip: Ipv4Addr,
    pub nodes: Vec<NodePlan>,
    pub pods: Vec<PodPlan>,
    pub services: Vec<ServicePlan>,
    /// The lab's cgroup: every process of the lab runs below it.
    pub cgroup: PathBuf,
}

#[derive(Debug, Clone)]
pub struct NodePlan {
    pub name: String,
    pub index: usize,
    pub netns: String,
    /// Address on the cluster network (`eth0` in the node namespace).
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Cidr,
    /// The node's address on every pod link: each pod's default gateway.
    pub pod_gateway: Ipv4Addr,
    /// Interface in the cluster network namespace leading to this node.
    pub uplink: String,
    pub cgroup: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PodPlan {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub app: App,
    /// In the mesh: its namespace is labelled `ambit.dev/dataplane-mode:
    /// ambient` and the pod does not opt out with `none`.
    pub meshed: bool,
    pub netns: String,
    /// The node-side end of the pod's veth pair (the pod side is `eth0`).
    pub host_veth: String,
    pub cgroup: PathBuf,
}

impl PodPlan {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone)]
pub struct ServicePlan {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: Ipv4Addr,
    pub selector: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortPlan>,
    /// Indices into `Plan::pods`.
    pub endpoints: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct PortPlan {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
}

impl ServicePlan {
    /// `name.namespace.svc.cluster.local`.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// Prefix of every network namespace (and `/etc/netns` entry) of a lab.
pub fn netns_prefix(lab: &str) -> String {
    format!("ambit-{lab}.")
}

impl Plan {
    /// Computes the plan of a validated spec.
    pub fn new(spec: &LabSpec) -> Plan {
        let net = &spec.network;
        let prefix = netns_prefix(&spec.name);
        let lab_cgroup = PathBuf::from(CGROUP_ROOT).join(&spec.name);
        let nodes: Vec<NodePlan> = spec
            .nodes
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let pod_cidr = net
                    .pod_cidr
                    .subnet(24, index as u64)
                    .expect("validated: podCidr has a /24 per node");
                NodePlan {
                    name: name.clone(),
                    index,
                    netns: format!("{prefix}node.{name}"),
                    ip: net
                        .node_cidr
                        .nth(10 + index as u64)
                        .expect("validated size"),
                    pod_gateway: pod_cidr.nth(1).expect("a /24 has .1"),
                    pod_cidr,
                    uplink: format!("n{index}"),
                    cgroup: lab_cgroup.join("nodes").join(name),
                }
            })
            .collect();
        let mut pods = Vec::new();
        let mut per_node = vec![0u64; nodes.len()];
        for d in &spec.all_deployments() {
            for replica in 0..d.replicas {
                let node = pods.len() % nodes.len();
                let slot = per_node[node];
                per_node[node] += 1;
                let name = format!("{}-{replica}", d.name);
                pods.push(PodPlan {
                    uid: pod_uid(&spec.name, &d.namespace, &name),
                    netns: format!("{prefix}{}.{name}", d.namespace),
                    host_veth: format!("p{slot}"),
                    cgroup: lab_cgroup
                        .join("pods")
                        .join(format!("{}.{name}", d.namespace)),
                    ip: nodes[node]
                        .pod_cidr
                        .nth(2 + slot)
                        .expect("validated: pods fit"),
                    name,
                    namespace: d.namespace.clone(),
                    node,
                    service_account: d.service_account().to_string(),
                    meshed: meshed(spec, &d.namespace, &d.pod_labels()),
                    labels: d.pod_labels(),
                    app: d.app,
                });
            }
        }
        let services = spec
            .all_services()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let selector = s.selector();
                ServicePlan {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    cluster_ip: net.service_cidr.nth(10 + i as u64).expect("validated size"),
                    endpoints: pods
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| {
                            p.namespace == s.namespace
                                && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                        })
                        .map(|(i, _)| i)
                        .collect(),
                    selector,
                    labels: s.labels.clone(),
                    ports: s
                        .ports
                        .iter()
                        .map(|p| PortPlan {
                            name: p.name.clone(),
                            port: p.port,
                            target_port: p.target_port(),
                        })
                        .collect(),
                }
            })
            .collect();
        Plan {
            spec: spec.clone(),
            net_netns: format!("{prefix}net"),
            bridge_ip: net.node_cidr.nth(1).expect("validated size"),
            nodes,
            pods,
            services,
            cgroup: lab_cgroup,
        }
    }

    /// The pod called `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<&PodPlan> {
        self.pods.iter().find(|p| p.key() == key)
    }

    /// The lab's cgroup, parent of every node and pod cgroup.
    pub fn cgroup(&self) -> PathBuf {
        PathBuf::from(CGROUP_ROOT).join(&self.spec.name)
    }
}

/// The label that puts a namespace (or, set to `none`, takes a pod) in or
/// out of the mesh.
pub const DATAPLANE_MODE: &str = "ambit.dev/dataplane-mode";

fn meshed(spec: &LabSpec, namespace: &str, pod_labels: &BTreeMap<String, String>) -> bool {
    let ns_ambient = spec.namespaces.iter().any(|n| {
        n.name == namespace && n.labels.get(DATAPLANE_MODE).is_some_and(|v| v == "ambient")
    });
    ns_ambient && pod_labels.get(DATAPLANE_MODE).is_none_or(|v| v != "none")
}

/// A stable UID per pod, so that regenerated YAML does not churn.
fn pod_uid(lab: &str, namespace: &str, name: &str) -> String {
    // FNV-1a over the identifying names, spread into the UUID layout.
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in lab
        .bytes()
        .chain([0])
        .chain(namespace.bytes())
        .chain([0])
        .chain(name.bytes())
    {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    let hex = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lab_plan() {
        let plan = Plan::new(&LabSpec::default());
        assert_eq!(plan.nodes.len(), 2);
        assert_eq!(plan.nodes[1].ip, Ipv4Addr::new(172, 18, 0, 11));
        assert_eq!(plan.nodes[1].pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(plan.nodes[1].netns, "ambit-ambit.node.node-2");
        // echo-0, echo-1, echo-2, demo/sleep-0, legacy/sleep-0 round-robin.
        let placement: Vec<_> = plan.pods.iter().map(|p| (p.key(), p.node, p.ip)).collect();
        assert_eq!(
            placement[0],
            ("demo/echo-0".into(), 0, Ipv4Addr::new(10, 244, 0, 2))
        );
        assert_eq!(
            placement[1],
            ("demo/echo-1".into(), 1, Ipv4Addr::new(10, 244, 1, 2))
        );
        assert_eq!(
            placement[2],
            ("demo/echo-2".into(), 0, Ipv4Addr::new(10, 244, 0, 3))
        );
        assert_eq!(
            placement[3],
            ("demo/sleep-0".into(), 1, Ipv4Addr::new(10, 244, 1, 3))
        );
        assert_eq!(placement[4].0, "legacy/sleep-0");
        assert!(
            plan.pods[..4].iter().all(|p| p.meshed),
            "demo is labelled ambient"
        );
        assert!(!plan.pods[4].meshed, "legacy is not");
        let echo = &plan.services[0];
        assert_eq!(echo.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(
            echo.endpoints,
            vec![0, 1, 2],
            "selects the three echo pods only"
        );
        assert_eq!(echo.fqdn(), "echo.demo.svc.cluster.local");
        let uids: std::collections::BTreeSet<_> = plan.pods.iter().map(|p| &p.uid).collect();
        assert_eq!(uids.len(), plan.pods.len());
        assert_eq!(
            plan.pods[0].uid,
            Plan::new(&LabSpec::default()).pods[0].uid,
            "stable"
        );
    }
}
