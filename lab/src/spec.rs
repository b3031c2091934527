//! The lab definition file: nodes, namespaces, deployments, services and
//! the address ranges, in YAML. `LabSpec::default()` is the built-in lab.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::cidr::Ipv4Cidr;
use crate::error::LabError;

/// A whole lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabSpec {
    /// Lab name: lowercase letters, digits and '-', at most 16 characters.
    /// Every host object the lab creates carries it, so labs never collide.
    pub name: String,
    #[serde(default)]
    pub network: NetworkSpec,
    /// Node names, in order; pods are spread over them round-robin.
    pub nodes: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pub deployments: Vec<DeploymentSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Waypoints (Gateways of class `ambit-waypoint`): the lab runs each
    /// one's pod and Service as the controller deploys them in a cluster.
    #[serde(default)]
    pub waypoints: Vec<WaypointSpec>,
}

/// A waypoint for a namespace: Services, service accounts or pods labelled
/// `ambit.dev/use-waypoint: <name>` send their traffic through it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointSpec {
    pub name: String,
    pub namespace: String,
}

/// The label naming a waypoint's Gateway on its pods and Service.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The waypoint's HBONE port, its Service's only port.
pub const WAYPOINT_PORT: u16 = 15008;

/// Address ranges. Each node takes the `/24` of `podCidr` with its index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// The link between nodes; nodes are `.10`, `.11`, ….
    pub node_cidr: Ipv4Cidr,
    /// Pod addresses; at most a `/16`, split into one `/24` per node.
    pub pod_cidr: Ipv4Cidr,
    /// Service virtual IPs, from `.10` on.
    pub service_cidr: Ipv4Cidr,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            node_cidr: Ipv4Cidr::new(Ipv4Addr::new(172, 18, 0, 0), 24),
            pod_cidr: Ipv4Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16),
            service_cidr: Ipv4Cidr::new(Ipv4Addr::new(10, 96, 0, 0), 16),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What a pod runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum App {
    /// `ambit-echo`: HTTP/1.1 + HTTP/2 echo on 8080, TCP echo on 9000,
    /// gRPC echo on 9090.
    Echo,
    /// Nothing but a sleeping process: a client to `exec` into.
    Sleep,
    /// The `waypoint` binary; only from a `waypoints` entry.
    #[serde(skip)]
    Waypoint,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default = "one")]
    pub replicas: u32,
    /// Defaults to the deployment name.
    #[serde(default)]
    pub service_account: Option<String>,
    pub app: App,
    /// Pod labels; `app: <name>` is always added.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

impl DeploymentSpec {
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }

    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.insert("app".into(), self.name.clone());
        labels
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    /// Pods selected; defaults to `app: <name>`.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    pub ports: Vec<ServicePortSpec>,
    /// Service labels (e.g. `ambit.dev/use-waypoint`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl ServiceSpec {
    pub fn selector(&self) -> BTreeMap<String, String> {
        self.selector
            .clone()
            .unwrap_or_else(|| BTreeMap::from([("app".to_string(), self.name.clone())]))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortSpec {
    pub name: String,
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePortSpec {
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

impl Default for LabSpec {
    /// Two nodes; `demo` (labelled for the mesh) with three `echo` replicas,
    /// a `sleep` client and a waypoint serving Service `web` (the `echo`
    /// pods); `legacy` (not labelled) with its own `sleep` client.
    fn default() -> Self {
        let echo_ports = vec![
            ServicePortSpec {
                name: "http".into(),
                port: 80,
                target_port: Some(8080),
            },
            ServicePortSpec {
                name: "tcp-echo".into(),
                port: 9000,
                target_port: None,
            },
            ServicePortSpec {
                name: "grpc".into(),
                port: 9090,
                target_port: None,
            },
        ];
        Self {
            name: "ambit".into(),
            network: NetworkSpec::default(),
            nodes: vec!["node-1".into(), "node-2".into()],
            namespaces: vec![
                NamespaceSpec {
                    name: "demo".into(),
                    labels: BTreeMap::from([("ambit.dev/dataplane-mode".into(), "ambient".into())]),
                },
                NamespaceSpec {
                    name: "legacy".into(),
                    labels: BTreeMap::new(),
                },
            ],
            deployments: vec![
                deployment("echo", "demo", 3, App::Echo),
                deployment("sleep", "demo", 1, App::Sleep),
                deployment("sleep", "legacy", 1, App::Sleep),
            ],
            services: vec![
                ServiceSpec {
                    name: "echo".into(),
                    namespace: "demo".into(),
                    selector: None,
                    ports: echo_ports,
                    labels: BTreeMap::new(),
                },
                // The same pods behind the waypoint: HTTPRoutes on `web`
                // apply there.
                ServiceSpec {
                    name: "web".into(),
                    namespace: "demo".into(),
                    selector: Some(BTreeMap::from([("app".into(), "echo".into())])),
                    ports: vec![ServicePortSpec {
                        name: "http".into(),
                        port: 80,
                        target_port: Some(8080),
                    }],
                    labels: BTreeMap::from([("ambit.dev/use-waypoint".into(), "waypoint".into())]),
                },
            ],
            waypoints: vec![WaypointSpec {
                name: "waypoint".into(),
                namespace: "demo".into(),
            }],
        }
    }
}

fn deployment(name: &str, namespace: &str, replicas: u32, app: App) -> DeploymentSpec {
    DeploymentSpec {
        name: name.into(),
        namespace: namespace.into(),
        replicas,
        service_account: None,
        app,
        labels: BTreeMap::new(),
    }
}

impl LabSpec {
    /// The deployments, and one per waypoint: its pod runs as the
    /// waypoint's service account, outside the mesh (it terminates HBONE
    /// itself), as the controller's Deployment does.
    pub fn all_deployments(&self) -> Vec<DeploymentSpec> {
        let mut all = self.deployments.clone();
        all.extend(self.waypoints.iter().map(|w| DeploymentSpec {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            replicas: 1,
            service_account: None,
            app: App::Waypoint,
            labels: BTreeMap::from([
                (GATEWAY_NAME_LABEL.into(), w.name.clone()),
                ("ambit.dev/dataplane-mode".into(), "none".into()),
            ]),
        }));
        all
    }

    /// The services, and each waypoint's on its HBONE port.
    pub fn all_services(&self) -> Vec<ServiceSpec> {
        let mut all = self.services.clone();
        all.extend(self.waypoints.iter().map(|w| {
            let labels = BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), w.name.clone())]);
            ServiceSpec {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                selector: Some(labels.clone()),
                ports: vec![ServicePortSpec {
                    name: "mesh".into(),
                    port: WAYPOINT_PORT,
                    target_port: None,
                }],
                labels,
            }
        }));
        all
    }
}

/// Longest lab name: it prefixes network namespace and cgroup names.
pub const MAX_LAB_NAME: usize = 16;

impl LabSpec {
    /// Parses and validates a lab definition.
    pub fn from_yaml(text: &str) -> Result<Self, LabError> {
        let spec: LabSpec = serde_yaml::from_str(text).map_err(|e| LabError::Spec {
            reason: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The lab file form of this spec.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a lab spec serializes")
    }

    /// Checks names, references and address ranges.
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |reason: String| Err(LabError::Spec { reason });
        if self.name.is_empty() || self.name.len() > MAX_LAB_NAME || !is_dns_label(&self.name) {
            return bad(format!(
                "lab name {:?} must be 1-{MAX_LAB_NAME} lowercase letters, digits or '-'",
                self.name
            ));
        }
        if self.nodes.is_empty() {
            return bad("a lab needs at least one node".into());
        }
        unique("node", self.nodes.iter().map(String::as_str))?;
        for node in &self.nodes {
            if !is_dns_label(node) {
                return bad(format!("node name {node:?} is not a DNS label"));
            }
        }
        unique("namespace", self.namespaces.iter().map(|n| n.name.as_str()))?;
        let namespaces: BTreeSet<&str> = self.namespaces.iter().map(|n| n.name.as_str()).collect();
        for ns in &namespaces {
            if !is_dns_label(ns) {
                return bad(format!("namespace {ns:?} is not a DNS label"));
            }
        }
        for w in &self.waypoints {
            if !namespaces.contains(w.namespace.as_str()) || !is_dns_label(&w.name) {
                return bad(format!(
                    "waypoint {}/{}: the name must be a DNS label in a declared namespace",
                    w.namespace, w.name
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for d in &self.all_deployments() {
            if !namespaces.contains(d.namespace.as_str()) {
                return bad(format!(
                    "deployment {}/{} is in an undeclared namespace",
                    d.namespace, d.name
                ));
            }
            if !is_dns_label(&d.name) || !is_dns_label(d.service_account()) {
                return bad(format!(
                    "deployment {}/{}: name and service account must be DNS labels",
                    d.namespace, d.name
                ));
            }
            if !seen.insert((&d.namespace, &d.name)) {
                return bad(format!(
                    "deployment {}/{} is declared twice",
                    d.namespace, d.name
                ));
            }
        }
        let mut seen = BTreeSet::new();
        let services = self.all_services();
        for s in &services {
            if !namespaces.contains(s.namespace.as_str()) || !is_dns_label(&s.name) {
                return bad(format!(
                    "service {}/{}: the name must be a DNS label in a declared namespace",
                    s.namespace, s.name
                ));
            }
            if !seen.insert((&s.namespace, &s.name)) {
                return bad(format!(
                    "service {}/{} is declared twice",
                    s.namespace, s.name
                ));
            }
            if s.ports.is_empty() {
                return bad(format!("service {}/{} has no ports", s.namespace, s.name));
            }
        }
        self.network.validate(self.nodes.len(), services.len())
    }
}

impl NetworkSpec {
    fn validate(&self, nodes: usize, services: usize) -> Result<(), LabError> {
        let bad = |reason: String| Err(LabError::Spec { reason });
        if self.pod_cidr.prefix() > 16 {
            return bad(format!(
                "podCidr {} must be a /16 or larger (one /24 per node)",
                self.pod_cidr
            ));
        }
        if nodes > 250 || self.node_cidr.size() < nodes as u64 + 11 {
            return bad(format!(
                "nodeCidr {} is too small for {nodes} nodes",
                self.node_cidr
            ));
        }
        if self.service_cidr.size() < services as u64 + 11 {
            return bad(format!(
                "serviceCidr {} is too small for {services} services",
                self.service_cidr
            ));
        }
        let ranges = [
            ("nodeCidr", self.node_cidr),
            ("podCidr", self.pod_cidr),
            ("serviceCidr", self.service_cidr),
        ];
        for (i, (a_name, a)) in ranges.iter().enumerate() {
            for (b_name, b) in &ranges[i + 1..] {
                if a.overlaps(b) {
                    return bad(format!("{a_name} {a} overlaps {b_name} {b}"));
                }
            }
        }
        Ok(())
    }

    /// The ranges, for overlap checks between labs.
    pub fn ranges(&self) -> [Ipv4Cidr; 3] {
        [self.node_cidr, self.pod_cidr, self.service_cidr]
    }
}

fn unique<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<(), LabError> {
    let mut seen = BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(LabError::Spec {
                reason: format!("{what} {name:?} is declared twice"),
            });
        }
    }
    Ok(())
}

/// RFC 1123 label: what Kubernetes requires of these names.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lab_is_valid_and_round_trips_through_yaml() {
        let spec = LabSpec::default();
        spec.validate().unwrap();
        let yaml = serde_yaml::to_string(&spec).unwrap();
        assert_eq!(LabSpec::from_yaml(&yaml).unwrap(), spec);
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let spec = LabSpec::from_yaml(
            "name: t1\nnodes: [a, b]\nnamespaces: [{name: x}]\n\
             deployments: [{name: web, namespace: x, app: echo, replicas: 2}]\n\
             services: [{name: web, namespace: x, ports: [{name: http, port: 80, targetPort: 8080}]}]\n",
        )
        .unwrap();
        assert_eq!(spec.network, NetworkSpec::default());
        assert_eq!(spec.deployments[0].service_account(), "web");
        assert_eq!(spec.services[0].selector()["app"], "web");
    }

    #[test]
    fn invalid_files_are_refused_with_the_reason() {
        let table = [
            ("name: Bad\nnodes: [a]\n", "lab name"),
            ("name: this-name-is-far-too-long\nnodes: [a]\n", "lab name"),
            ("name: t\nnodes: []\n", "at least one node"),
            ("name: t\nnodes: [a, a]\n", "declared twice"),
            (
                "name: t\nnodes: [a]\ndeployments: [{name: w, namespace: nope, app: echo}]\n",
                "undeclared namespace",
            ),
            (
                "name: t\nnodes: [a]\nnetwork: {nodeCidr: 10.0.0.0/24, podCidr: 10.0.0.0/16, serviceCidr: 10.96.0.0/16}\n",
                "overlaps",
            ),
            (
                "name: t\nnodes: [a]\nnetwork: {nodeCidr: 172.18.0.0/24, podCidr: 10.244.0.0/24, serviceCidr: 10.96.0.0/16}\n",
                "/16 or larger",
            ),
            ("name: t\nnodes: [a]\nextra: 1\n", "unknown field"),
            (
                "name: t\nnodes: [a]\ndeployments: [{name: w, namespace: x, app: nginx}]\n",
                "unknown variant",
            ),
        ];
        for (yaml, want) in table {
            let err = LabSpec::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(want), "{yaml:?}: {err}");
        }
    }
}
