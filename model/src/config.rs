//! The config as written in a file or sent by the controller. Field names
//! are camelCase like Kubernetes objects; unknown fields are refused so a
//! typo is an error, not a silently ignored setting.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::policy::{AuthorizationPolicy, PeerAuthentication};
use crate::route::Route;

/// Everything a data plane needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    /// `cluster.local` unless set.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
    /// HTTPRoutes and GRPCRoutes, for waypoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            workloads: Vec::new(),
            services: Vec::new(),
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
            routes: Vec::new(),
        }
    }
}

impl MeshConfig {
    /// Every list in key order (workloads by uid, the rest by
    /// `namespace/name`): one form for configs assembled from maps, so
    /// they compare and print the same whatever the maps' order.
    pub fn sorted(mut self) -> Self {
        self.workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        self.services.sort_by_key(Service::key);
        self.authorization_policies
            .sort_by_key(crate::AuthorizationPolicy::key);
        self.peer_authentications
            .sort_by_key(crate::PeerAuthentication::key);
        self.routes.sort_by_key(|r| (r.kind.as_str(), r.key()));
        self
    }
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

/// A pod (or another addressable workload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Stable id (the Kubernetes pod UID).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub ips: Vec<Ipv4Addr>,
    /// The node it runs on.
    #[serde(default)]
    pub node: String,
    /// How it accepts mesh traffic: HBONE when it is captured by a ztunnel,
    /// plain TCP otherwise.
    #[serde(default)]
    pub protocol: InboundProtocol,
    /// The owning workload (Deployment, StatefulSet…), for telemetry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub locality: Locality,
    /// Traffic addressed to this workload's IP goes through this waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// A waypoint (L7 proxy) that traffic to a workload or service must pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointRef {
    /// The waypoint's Service VIP, or a waypoint workload's IP. It is
    /// reached with HBONE on its endpoints' port 15008.
    pub address: Ipv4Addr,
}

fn default_service_account() -> String {
    "default".into()
}

/// How a workload accepts traffic from the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InboundProtocol {
    /// Not in the mesh: plain TCP to its address.
    #[default]
    Tcp,
    /// In the mesh: HBONE to `<ip>:15008`.
    Hbone,
}

/// Where a workload runs, for locality-aware load balancing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
}

/// A Service: virtual IPs, ports and the workloads behind them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.cluster.local` unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub vips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// Uids of the workloads serving it.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The ports of endpoints that differ from their port's `targetPort`:
    /// by workload uid, service port → that workload's port. A named
    /// target port is resolved per pod, and the pods of one Service may
    /// number it differently (a rollout that moves the container port).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoint_ports: BTreeMap<String, BTreeMap<u16, u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<TrafficDistribution>,
    /// Traffic addressed to this service's VIPs goes through this waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

impl Service {
    pub fn hostname(&self) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", self.name, self.namespace))
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port `port` reaches on the endpoint `uid`.
    pub fn endpoint_port(&self, uid: &str, port: &ServicePort) -> u16 {
        self.endpoint_ports
            .get(uid)
            .and_then(|ports| ports.get(&port.port))
            .copied()
            .unwrap_or_else(|| port.target_port())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// The endpoints' port; the service port when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// Kubernetes' `appProtocol` of the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// Protocols that are HTTP to a proxy (`h2c` and WebSocket start as HTTP).
const HTTP_PROTOCOLS: &[&str] = &[
    "http",
    "http2",
    "grpc",
    "grpc-web",
    "h2c",
    "kubernetes.io/h2c",
    "kubernetes.io/ws",
];
/// Protocols declared as something else: passed on as bytes.
const OPAQUE_PROTOCOLS: &[&str] = &[
    "tcp",
    "tls",
    "https",
    "mongo",
    "mysql",
    "redis",
    "udp",
    "kubernetes.io/wss",
];

impl ServicePort {
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }

    /// Whether the port carries HTTP, as declared by its `appProtocol` or,
    /// as Istio reads it, by its name (`<protocol>` or `<protocol>-…`):
    /// `Some(false)` for another protocol, `None` when nothing says.
    /// Any other `appProtocol` is not HTTP.
    pub fn http(&self) -> Option<bool> {
        if let Some(declared) = &self.app_protocol {
            return Some(HTTP_PROTOCOLS.contains(&declared.to_ascii_lowercase().as_str()));
        }
        let name = self.name.as_deref()?.to_ascii_lowercase();
        let prefix = HTTP_PROTOCOLS
            .iter()
            .chain(OPAQUE_PROTOCOLS)
            .filter(|p| name == **p || name.starts_with(&format!("{p}-")))
            .max_by_key(|p| p.len())?;
        Some(HTTP_PROTOCOLS.contains(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_say_whether_they_carry_http() {
        let port = |name: Option<&str>, app: Option<&str>| ServicePort {
            name: name.map(str::to_string),
            port: 80,
            target_port: None,
            app_protocol: app.map(str::to_string),
        };
        assert_eq!(port(Some("http"), None).http(), Some(true));
        assert_eq!(port(Some("grpc-web-api"), None).http(), Some(true));
        assert_eq!(port(Some("HTTP2-x"), None).http(), Some(true));
        assert_eq!(port(Some("tcp-echo"), None).http(), Some(false));
        assert_eq!(port(Some("mysql"), None).http(), Some(false));
        assert_eq!(port(Some("web"), None).http(), None);
        assert_eq!(port(None, None).http(), None);
        assert_eq!(port(Some("http"), Some("postgresql")).http(), Some(false));
        assert_eq!(
            port(Some("db"), Some("kubernetes.io/h2c")).http(),
            Some(true)
        );
    }
}

/// Kubernetes' `spec.trafficDistribution`: which endpoints to prefer. The
/// others are used only when no preferred endpoint is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficDistribution {
    /// Endpoints on the client's node first.
    PreferSameNode,
    /// Endpoints in the client's zone first (`PreferClose` is the older name).
    #[serde(alias = "PreferClose")]
    PreferSameZone,
}
