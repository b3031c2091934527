//! A validated, indexed config.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use identity::{Identity, TrustDomain};

use crate::config::{MeshConfig, Service, ServicePort, WaypointRef, Workload};
use crate::policy::{self, Action, Connection, PeerAuthMode, PolicyScope, Verdict};

/// Why a config was refused, naming the offending object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot parse config: {0}")]
    Parse(String),
    #[error("trust domain {domain:?}: {reason}")]
    TrustDomain { domain: String, reason: String },
    #[error("workload {uid}: {reason}")]
    Workload { uid: String, reason: String },
    #[error("service {service}: {reason}")]
    Service { service: String, reason: String },
    #[error("policy {policy}: {reason}")]
    Policy { policy: String, reason: String },
    #[error("{kind} {route}: {reason}")]
    Route {
        kind: &'static str,
        route: String,
        reason: String,
    },
}

/// One accepted config with the lookups the data plane needs.
#[derive(Debug, Clone)]
pub struct Snapshot {
    config: MeshConfig,
    version: u64,
    identities: Vec<Identity>,
    by_ip: HashMap<Ipv4Addr, usize>,
    by_uid: HashMap<String, usize>,
    /// `namespace/name` → service.
    by_key: HashMap<String, usize>,
    /// Services by hostname (what HBONE's `forwarded: host=` names).
    by_hostname: HashMap<String, usize>,
    /// (VIP, service port) → (service, port index).
    by_vip: HashMap<SocketAddrV4, (usize, usize)>,
    /// Authorization policies by namespace; `""` holds the global ones.
    policies_by_ns: HashMap<String, Vec<usize>>,
}

/// Validates the policies and routes, and indexes the authorization policies by the
/// namespace whose workloads they can select.
fn index_policies(config: &MeshConfig) -> Result<HashMap<String, Vec<usize>>, ConfigError> {
    let mut seen = HashSet::new();
    let mut by_ns: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, p) in config.authorization_policies.iter().enumerate() {
        let err = |reason: String| ConfigError::Policy {
            policy: p.key(),
            reason,
        };
        p.validate().map_err(err)?;
        if !seen.insert(("authorization", p.key())) {
            return Err(err("defined twice".into()));
        }
        let ns = match p.scope {
            PolicyScope::Namespace => p.namespace.clone(),
            PolicyScope::Global => String::new(),
        };
        by_ns.entry(ns).or_default().push(i);
    }
    for p in &config.peer_authentications {
        let err = |reason: String| ConfigError::Policy {
            policy: p.key(),
            reason,
        };
        p.validate().map_err(err)?;
        if !seen.insert(("peer", p.key())) {
            return Err(err("defined twice".into()));
        }
    }
    for r in &config.routes {
        let err = |reason: String| ConfigError::Route {
            kind: r.kind.as_str(),
            route: r.key(),
            reason,
        };
        r.validate().map_err(err)?;
        if !seen.insert((r.kind.as_str(), r.key())) {
            return Err(err("defined twice".into()));
        }
    }
    Ok(by_ns)
}

/// A Service VIP:port resolved to its service and port.
#[derive(Debug, Clone, Copy)]
pub struct ServiceTarget<'a> {
    pub service: &'a Service,
    pub port: &'a ServicePort,
}

impl Snapshot {
    /// The empty config (nothing known: every destination is passthrough).
    pub fn empty() -> Self {
        Self::new(MeshConfig::default(), 0).expect("the empty config is valid")
    }

    /// Validates `config` whole; `version` identifies it in logs and dumps.
    pub fn new(config: MeshConfig, version: u64) -> Result<Self, ConfigError> {
        let trust_domain: TrustDomain =
            config
                .trust_domain
                .parse()
                .map_err(
                    |e: identity::spiffe::SpiffeIdError| ConfigError::TrustDomain {
                        domain: config.trust_domain.clone(),
                        reason: e.to_string(),
                    },
                )?;
        let mut identities = Vec::with_capacity(config.workloads.len());
        let mut by_ip = HashMap::new();
        let mut by_uid = HashMap::new();
        for (i, w) in config.workloads.iter().enumerate() {
            let err = |reason: String| ConfigError::Workload {
                uid: w.uid.clone(),
                reason,
            };
            if w.uid.is_empty() || w.name.is_empty() || w.namespace.is_empty() {
                return Err(err("uid, name and namespace must not be empty".into()));
            }
            if by_uid.insert(w.uid.clone(), i).is_some() {
                return Err(err("uid used twice".into()));
            }
            if w.ips.is_empty() {
                return Err(err("no IP address".into()));
            }
            for ip in &w.ips {
                if let Some(other) = by_ip.insert(*ip, i) {
                    return Err(err(format!(
                        "IP {ip} is also workload {}'s",
                        config.workloads[other].uid
                    )));
                }
            }
            let id = Identity::new(trust_domain.clone(), &w.namespace, &w.service_account)
                .map_err(|e| err(format!("identity: {e}")))?;
            identities.push(id);
        }
        let mut by_vip = HashMap::new();
        let mut by_key = HashMap::new();
        let mut by_hostname = HashMap::new();
        for (i, s) in config.services.iter().enumerate() {
            let err = |reason: String| ConfigError::Service {
                service: s.key(),
                reason,
            };
            if by_key.insert(s.key(), i).is_some() {
                return Err(err("defined twice".into()));
            }
            // Telemetry only: a hostname two services claim names the first.
            by_hostname.entry(s.hostname()).or_insert(i);
            if s.ports.is_empty() {
                return Err(err("no ports".into()));
            }
            for p in &s.ports {
                if p.port == 0 || p.target_port() == 0 {
                    return Err(err(format!(
                        "port {} → {}: 0 is not a port",
                        p.port,
                        p.target_port()
                    )));
                }
            }
            for uid in &s.endpoints {
                if !by_uid.contains_key(uid) {
                    return Err(err(format!("endpoint {uid} is not a known workload")));
                }
            }
            for (uid, ports) in &s.endpoint_ports {
                if !s.endpoints.contains(uid) {
                    return Err(err(format!("endpoint ports for {uid}, not an endpoint")));
                }
                for (port, target) in ports {
                    if !s.ports.iter().any(|p| p.port == *port) {
                        return Err(err(format!(
                            "endpoint {uid}: port {port} is not a port of the service"
                        )));
                    }
                    if *target == 0 {
                        return Err(err(format!(
                            "endpoint {uid}: port {port} → 0: 0 is not a port"
                        )));
                    }
                }
            }
            for vip in &s.vips {
                if by_ip.contains_key(vip) {
                    return Err(err(format!("VIP {vip} is a workload's IP")));
                }
                for (j, p) in s.ports.iter().enumerate() {
                    let addr = SocketAddrV4::new(*vip, p.port);
                    if let Some((other, _)) = by_vip.insert(addr, (i, j)) {
                        return Err(err(format!(
                            "{addr} is also service {}'s",
                            config.services[other].key()
                        )));
                    }
                }
            }
        }
        // Waypoints are checked once every address is known.
        let vips: HashSet<Ipv4Addr> = by_vip.keys().map(|a| *a.ip()).collect();
        let known = |ip: &Ipv4Addr| by_ip.contains_key(ip) || vips.contains(ip);
        for w in &config.workloads {
            if let Some(wp) = w.waypoint.as_ref().filter(|wp| !known(&wp.address)) {
                return Err(ConfigError::Workload {
                    uid: w.uid.clone(),
                    reason: format!("waypoint {} is no known workload or service", wp.address),
                });
            }
        }
        for s in &config.services {
            if let Some(wp) = s.waypoint.as_ref().filter(|wp| !known(&wp.address)) {
                return Err(ConfigError::Service {
                    service: s.key(),
                    reason: format!("waypoint {} is no known workload or service", wp.address),
                });
            }
        }
        let policies_by_ns = index_policies(&config)?;
        Ok(Self {
            config,
            version,
            identities,
            by_ip,
            by_uid,
            by_key,
            by_hostname,
            by_vip,
            policies_by_ns,
        })
    }

    /// Judges a connection to `conn.dst` against the authorization
    /// policies that select it.
    pub fn authorize(&self, conn: &Connection<'_>) -> Verdict {
        let ns = |n: &str| self.policies_by_ns.get(n).into_iter().flatten();
        let candidates = ns(&conn.dst.namespace)
            .chain(ns(""))
            .map(|&i| &self.config.authorization_policies[i]);
        policy::authorize(candidates, conn)
    }

    /// The peer authentication mode of `workload`'s `port` and the policy
    /// that set it (`None`: the PERMISSIVE default). The most specific
    /// policy that sets a mode for the port decides; never `UNSET`.
    pub fn peer_authentication(
        &self,
        workload: &Workload,
        port: u16,
    ) -> (PeerAuthMode, Option<String>) {
        let mut applicable: Vec<_> = self
            .config
            .peer_authentications
            .iter()
            .filter_map(|p| p.rank(workload).map(|r| (r, p)))
            .collect();
        applicable.sort_by(|(ra, a), (rb, b)| ra.cmp(rb).then_with(|| a.key().cmp(&b.key())));
        // Of several at one level only the first counts, as when one
        // policy is picked; an UNSET there defers to the next level.
        applicable.dedup_by_key(|(rank, _)| *rank);
        applicable
            .into_iter()
            .find_map(|(_, p)| p.mode_for(port).map(|m| (m, Some(p.key()))))
            .unwrap_or((PeerAuthMode::default(), None))
    }

    /// A policy that picks workloads by label and could decide a
    /// connection to a workload of `namespace` (`namespace/name`, the first
    /// found): what cannot be judged for a workload whose labels are not
    /// known. Dry-run and AUDIT policies decide nothing, and peer
    /// authentication matters only to a `plaintext` client.
    pub fn label_selected_policy(&self, namespace: &str, plaintext: bool) -> Option<String> {
        let ns = |n: &str| self.policies_by_ns.get(n).into_iter().flatten();
        ns(namespace)
            .chain(ns(""))
            .map(|&i| &self.config.authorization_policies[i])
            .find(|p| !p.selector.is_empty() && !p.dry_run && p.action != Action::Audit)
            .map(|p| p.key())
            .or_else(|| {
                if !plaintext {
                    return None;
                }
                self.config
                    .peer_authentications
                    .iter()
                    .find(|p| p.namespace == namespace && !p.selector.is_empty())
                    .map(|p| p.key())
            })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&i| &self.config.workloads[i])
    }

    pub fn workload(&self, uid: &str) -> Option<&Workload> {
        self.by_uid.get(uid).map(|&i| &self.config.workloads[i])
    }

    /// The SPIFFE identity of a workload of this snapshot.
    pub fn identity(&self, workload: &Workload) -> Option<&Identity> {
        self.by_uid.get(&workload.uid).map(|&i| &self.identities[i])
    }

    /// The service `namespace/name`.
    pub fn service(&self, key: &str) -> Option<&Service> {
        self.by_key.get(key).map(|&i| &self.config.services[i])
    }

    /// The service with this hostname.
    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Service> {
        self.by_hostname
            .get(hostname)
            .map(|&i| &self.config.services[i])
    }

    /// The service a VIP:port belongs to.
    pub fn service_by_vip(&self, addr: SocketAddrV4) -> Option<ServiceTarget<'_>> {
        self.by_vip.get(&addr).map(|&(s, p)| {
            let service = &self.config.services[s];
            ServiceTarget {
                service,
                port: &service.ports[p],
            }
        })
    }

    /// The workloads behind a waypoint address: the waypoint service's
    /// endpoints, or the one workload with that IP.
    pub fn waypoint_endpoints(&self, waypoint: &WaypointRef) -> Vec<&Workload> {
        if let Some(w) = self.workload_by_ip(waypoint.address) {
            return vec![w];
        }
        self.config
            .services
            .iter()
            .find(|s| s.vips.contains(&waypoint.address))
            .map(|s| self.endpoints(s).collect())
            .unwrap_or_default()
    }

    /// A service's endpoints, in config order.
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Workload> {
        service
            .endpoints
            .iter()
            .filter_map(|uid| self.workload(uid))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(yaml: &str) -> MeshConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    const GOOD: &str = r#"
workloads:
  - {uid: a, name: echo-0, namespace: demo, serviceAccount: echo, ips: [10.0.0.1], node: n1, protocol: HBONE}
  - {uid: b, name: sleep-0, namespace: demo, ips: [10.0.0.2], node: n2}
services:
  - name: echo
    namespace: demo
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}, {port: 9000}]
    endpoints: [a]
    trafficDistribution: PreferClose
"#;

    #[test]
    fn a_good_config_is_indexed() {
        let snap = Snapshot::new(config(GOOD), 7).unwrap();
        assert_eq!(snap.version(), 7);
        let echo = snap.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(echo.name, "echo-0");
        assert_eq!(
            snap.identity(echo).unwrap().to_string(),
            "spiffe://cluster.local/ns/demo/sa/echo"
        );
        let sleep = snap.workload("b").unwrap();
        assert_eq!(
            snap.identity(sleep).unwrap().to_string(),
            "spiffe://cluster.local/ns/demo/sa/default"
        );
        let target = snap
            .service_by_vip("10.96.0.10:80".parse().unwrap())
            .unwrap();
        assert_eq!(target.port.target_port(), 8080);
        assert_eq!(target.service.hostname(), "echo.demo.svc.cluster.local");
        assert_eq!(
            target.service.traffic_distribution,
            Some(crate::TrafficDistribution::PreferSameZone)
        );
        let vip9000 = snap
            .service_by_vip("10.96.0.10:9000".parse().unwrap())
            .unwrap();
        assert_eq!(vip9000.port.target_port(), 9000);
        assert!(
            snap.service_by_vip("10.96.0.10:81".parse().unwrap())
                .is_none()
        );
        assert_eq!(snap.endpoints(target.service).count(), 1);
    }

    #[test]
    fn invalid_configs_are_refused_with_the_object_named() {
        let cases = [
            (
                GOOD.replace("ips: [10.0.0.2]", "ips: [10.0.0.1]"),
                "workload b: IP 10.0.0.1 is also workload a's",
            ),
            (
                GOOD.replace("uid: b", "uid: a"),
                "workload a: uid used twice",
            ),
            (
                GOOD.replace("endpoints: [a]", "endpoints: [zz]"),
                "service demo/echo: endpoint zz is not a known workload",
            ),
            (
                GOOD.replace("vips: [10.96.0.10]", "vips: [10.0.0.2]"),
                "service demo/echo: VIP 10.0.0.2 is a workload's IP",
            ),
            (
                GOOD.replace("{port: 9000}", "{port: 80}"),
                "service demo/echo: 10.96.0.10:80 is also service demo/echo's",
            ),
            (
                GOOD.replace("serviceAccount: echo", "serviceAccount: \"\""),
                "workload a: identity",
            ),
            (
                format!("trustDomain: Bad_Domain\n{GOOD}"),
                "trust domain \"Bad_Domain\"",
            ),
            (
                GOOD.replace("ips: [10.0.0.2]", "ips: []"),
                "workload b: no IP address",
            ),
            (
                GOOD.replace("{port: 9000}", "{port: 9000, targetPort: 0}"),
                "0 is not a port",
            ),
            (
                GOOD.replace(
                    "endpoints: [a]",
                    "endpoints: [a]\n    endpointPorts: {b: {80: 8081}}",
                ),
                "service demo/echo: endpoint ports for b, not an endpoint",
            ),
            (
                GOOD.replace(
                    "endpoints: [a]",
                    "endpoints: [a]\n    endpointPorts: {a: {8080: 8081}}",
                ),
                "service demo/echo: endpoint a: port 8080 is not a port of the service",
            ),
            (
                GOOD.replace(
                    "endpoints: [a]",
                    "endpoints: [a]\n    endpointPorts: {a: {80: 0}}",
                ),
                "service demo/echo: endpoint a: port 80 → 0: 0 is not a port",
            ),
            (
                GOOD.replace(
                    "endpoints: [a]",
                    "endpoints: [a]\n    waypoint: {address: 10.96.9.9}",
                ),
                "service demo/echo: waypoint 10.96.9.9 is no known workload or service",
            ),
        ];
        for (yaml, want) in cases {
            let err = Snapshot::new(config(&yaml), 1).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    #[test]
    fn unknown_fields_are_errors_not_ignored() {
        let err = serde_yaml::from_str::<MeshConfig>("workloads: []\nservice: []\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `service`"), "{err}");
    }
}
