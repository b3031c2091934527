//! Where a proxied connection goes: the dialled address resolved against
//! the mesh config (a destination with a waypoint → HBONE to the waypoint,
//! Service VIP → endpoint, meshed → HBONE, unmeshed → plain TCP, unknown →
//! passthrough). Shared by ztunnel (outbound) and waypoints (to the chosen
//! backend: a waypoint is never sent to itself).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use identity::Identity;
use model::{InboundProtocol, Snapshot, TrafficDistribution, WaypointRef, Workload};

/// How long an endpoint that refused a connection is skipped.
const EJECTION: Duration = Duration::from_secs(5);

/// One way to reach the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// HBONE to the workload's 15008, tunnelling to `authority`.
    Hbone {
        hbone: SocketAddr,
        authority: SocketAddr,
        identity: Identity,
        workload: String,
    },
    /// Plain TCP to a known workload outside the mesh.
    Plain { dst: SocketAddr, workload: String },
    /// An address the mesh does not know: plain TCP as dialled.
    Passthrough { dst: SocketAddr },
}

impl Route {
    /// The address the connection is finally made to.
    pub fn endpoint(&self) -> SocketAddr {
        match self {
            Route::Hbone { authority, .. } => *authority,
            Route::Plain { dst, .. } | Route::Passthrough { dst } => *dst,
        }
    }

    /// The address the TCP connection goes to: the HBONE port of the
    /// destination (or waypoint) for tunnels. Health is tracked by it.
    pub fn hbone_endpoint(&self) -> SocketAddr {
        match self {
            Route::Hbone { hbone, .. } => *hbone,
            Route::Plain { dst, .. } | Route::Passthrough { dst } => *dst,
        }
    }
}

/// The routes to try, best first, and the service that was dialled.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `namespace/name` of the service dialled, if any.
    pub service: Option<String>,
    /// Its hostname (for `forwarded: host=`).
    pub hostname: Option<String>,
    /// The waypoint the routes go through, when the destination has one.
    pub waypoint: Option<Ipv4Addr>,
    pub routes: Vec<Route>,
}

/// Why there is no route at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    /// Never bypassed: the waypoint enforces the destination's L7 policy.
    #[error("waypoint {0} has no endpoints")]
    NoWaypoint(Ipv4Addr),
}

impl RouteError {
    /// The metrics reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoEndpoints(_) => "no_healthy_endpoint",
            Self::NoWaypoint(_) => "no_waypoint",
        }
    }
}

/// Round-robin state per service and recently failed endpoints.
#[derive(Debug, Default)]
pub struct Balancer {
    next: Mutex<HashMap<String, usize>>,
    ejected: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Balancer {
    /// Resolves `orig`, dialled by `src`.
    pub fn plan(
        &self,
        snapshot: &Snapshot,
        src: Option<&Workload>,
        orig: SocketAddrV4,
    ) -> Result<Plan, RouteError> {
        if let Some(target) = snapshot.service_by_vip(orig) {
            let key = target.service.key();
            if let Some(waypoint) = &target.service.waypoint
                && let Some(routes) = self.via_waypoint(snapshot, src, waypoint, orig)?
            {
                return Ok(Plan {
                    service: Some(key),
                    hostname: Some(target.service.hostname()),
                    waypoint: Some(waypoint.address),
                    routes,
                });
            }
            let endpoints: Vec<&Workload> = snapshot.endpoints(target.service).collect();
            if endpoints.is_empty() {
                return Err(RouteError::NoEndpoints(key));
            }
            // A source whose node or zone is not known prefers nothing:
            // matching unknown to unknown would put endpoints that are
            // not known to be near ahead of the rest.
            let preferred = |w: &Workload| match (target.service.traffic_distribution, src) {
                (Some(TrafficDistribution::PreferSameNode), Some(src)) if !src.node.is_empty() => {
                    w.node == src.node
                }
                (Some(TrafficDistribution::PreferSameZone), Some(src))
                    if !src.locality.zone.is_empty() =>
                {
                    w.locality.zone == src.locality.zone && w.locality.region == src.locality.region
                }
                _ => true,
            };
            let start = self.advance(&key);
            // Preferred endpoints first, each group rotated round-robin;
            // endpoints that failed recently go last.
            let mut routes: Vec<(u8, Route)> = Vec::with_capacity(endpoints.len());
            for group in [true, false] {
                let members: Vec<&&Workload> =
                    endpoints.iter().filter(|w| preferred(w) == group).collect();
                for i in 0..members.len() {
                    let w = members[(start + i) % members.len()];
                    let port = target.service.endpoint_port(&w.uid, target.port);
                    let route = workload_route(snapshot, w, port);
                    let rank =
                        u8::from(!group) + 2 * u8::from(self.is_ejected(route.hbone_endpoint()));
                    routes.push((rank, route));
                }
            }
            routes.sort_by_key(|(rank, _)| *rank);
            return Ok(Plan {
                service: Some(key),
                hostname: Some(target.service.hostname()),
                waypoint: None,
                routes: routes.into_iter().map(|(_, r)| r).collect(),
            });
        }
        let dst = snapshot.workload_by_ip(*orig.ip());
        if let Some(waypoint) = dst.and_then(|w| w.waypoint.as_ref())
            && let Some(routes) = self.via_waypoint(snapshot, src, waypoint, orig)?
        {
            return Ok(Plan {
                service: None,
                hostname: None,
                waypoint: Some(waypoint.address),
                routes,
            });
        }
        let route = match dst {
            Some(w) => workload_route(snapshot, w, orig.port()),
            None => Route::Passthrough {
                dst: SocketAddr::V4(orig),
            },
        };
        Ok(Plan {
            service: None,
            hostname: None,
            waypoint: None,
            routes: vec![route],
        })
    }

    /// Routes through `waypoint`'s endpoints (round-robin), tunnelling to
    /// the address the client dialled. `None` when the client is the
    /// waypoint itself: what it sends on goes to the destination directly.
    fn via_waypoint(
        &self,
        snapshot: &Snapshot,
        src: Option<&Workload>,
        waypoint: &WaypointRef,
        orig: SocketAddrV4,
    ) -> Result<Option<Vec<Route>>, RouteError> {
        let endpoints = snapshot.waypoint_endpoints(waypoint);
        if src.is_some_and(|s| endpoints.iter().any(|w| w.uid == s.uid)) {
            return Ok(None);
        }
        let mut routes: Vec<Route> = endpoints
            .iter()
            .filter_map(|w| {
                let identity = snapshot.identity(w)?.clone();
                Some(Route::Hbone {
                    hbone: SocketAddr::V4(SocketAddrV4::new(w.ips[0], hbone::HBONE_PORT)),
                    authority: SocketAddr::V4(orig),
                    identity,
                    workload: format!("{}/{}", w.namespace, w.name),
                })
            })
            .collect();
        if routes.is_empty() {
            return Err(RouteError::NoWaypoint(waypoint.address));
        }
        let start = self.advance(&format!("waypoint/{}", waypoint.address));
        let len = routes.len();
        routes.rotate_left(start % len);
        // Waypoint endpoints that failed recently go last.
        routes.sort_by_key(|r| self.is_ejected(r.hbone_endpoint()));
        Ok(Some(routes))
    }

    /// The round-robin position for `key`, moved on by one.
    fn advance(&self, key: &str) -> usize {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let n = next.entry(key.to_string()).or_default();
        let start = *n;
        *n = n.wrapping_add(1);
        start
    }

    /// Records that connecting to `endpoint` failed: it is tried last for a while.
    pub fn eject(&self, endpoint: SocketAddr) {
        self.ejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(endpoint, Instant::now() + EJECTION);
    }

    fn is_ejected(&self, endpoint: SocketAddr) -> bool {
        let mut ejected = self.ejected.lock().unwrap_or_else(PoisonError::into_inner);
        match ejected.get(&endpoint) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                ejected.remove(&endpoint);
                false
            }
            None => false,
        }
    }
}

fn workload_route(snapshot: &Snapshot, w: &Workload, port: u16) -> Route {
    let ip = w.ips[0];
    let authority = SocketAddr::V4(SocketAddrV4::new(ip, port));
    match (w.protocol, snapshot.identity(w)) {
        (InboundProtocol::Hbone, Some(identity)) => Route::Hbone {
            hbone: SocketAddr::V4(SocketAddrV4::new(ip, hbone::HBONE_PORT)),
            authority,
            identity: identity.clone(),
            workload: format!("{}/{}", w.namespace, w.name),
        },
        _ => Route::Plain {
            dst: authority,
            workload: format!("{}/{}", w.namespace, w.name),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn snapshot(distribution: &str) -> Snapshot {
        let yaml = format!(
            r#"
workloads:
  - {{uid: e1, name: echo-1, namespace: demo, ips: [10.0.1.1], node: n1, protocol: HBONE, locality: {{zone: a}}}}
  - {{uid: e2, name: echo-2, namespace: demo, ips: [10.0.2.1], node: n2, protocol: HBONE, locality: {{zone: b}}}}
  - {{uid: e3, name: echo-3, namespace: demo, ips: [10.0.2.2], node: n2, locality: {{zone: b}}}}
  - {{uid: c, name: client, namespace: demo, ips: [10.0.1.9], node: n1, protocol: HBONE, locality: {{zone: a}}}}
  - {{uid: d, name: client-b, namespace: demo, ips: [10.0.3.9], node: n3, protocol: HBONE, locality: {{zone: b}}}}
services:
  - name: echo
    namespace: demo
    vips: [10.96.0.1]
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints: [e1, e2, e3]
    {distribution}
  - {{name: empty, namespace: demo, vips: [10.96.0.2], ports: [{{port: 80}}]}}
"#
        );
        Snapshot::new(serde_yaml::from_str(&yaml).unwrap(), 1).unwrap()
    }

    fn first(plan: &Plan) -> String {
        match &plan.routes[0] {
            Route::Hbone { workload, .. } | Route::Plain { workload, .. } => workload.clone(),
            Route::Passthrough { dst } => dst.to_string(),
        }
    }

    #[test]
    fn a_vip_round_robins_over_endpoints_with_the_target_port() {
        let snap = snapshot("");
        let lb = Balancer::default();
        let vip = "10.96.0.1:80".parse().unwrap();
        let picks: Vec<String> = (0..6)
            .map(|_| first(&lb.plan(&snap, None, vip).unwrap()))
            .collect();
        assert_eq!(
            picks,
            ["demo/echo-1", "demo/echo-2", "demo/echo-3"].repeat(2)
        );
        let plan = lb.plan(&snap, None, vip).unwrap();
        assert_eq!(plan.service.as_deref(), Some("demo/echo"));
        assert_eq!(plan.routes.len(), 3, "the others are fallbacks");
        let Route::Hbone {
            hbone,
            authority,
            identity,
            ..
        } = &plan.routes[0]
        else {
            panic!("meshed endpoint over HBONE: {plan:?}")
        };
        assert_eq!(hbone.to_string(), "10.0.1.1:15008");
        assert_eq!(authority.to_string(), "10.0.1.1:8080");
        assert_eq!(
            identity.to_string(),
            "spiffe://cluster.local/ns/demo/sa/default"
        );
    }

    #[test]
    fn an_endpoint_that_numbers_the_target_port_differently_gets_its_own() {
        let mut config = snapshot("").config().clone();
        config.services[0].endpoint_ports = [("e2".to_string(), [(80, 8081)].into())].into();
        let snap = Snapshot::new(config, 2).unwrap();
        let lb = Balancer::default();
        let vip = "10.96.0.1:80".parse().unwrap();
        let ports: Vec<String> = (0..3)
            .map(|_| {
                lb.plan(&snap, None, vip).unwrap().routes[0]
                    .endpoint()
                    .to_string()
            })
            .collect();
        assert_eq!(ports, ["10.0.1.1:8080", "10.0.2.1:8081", "10.0.2.2:8080"]);
    }

    #[test]
    fn unmeshed_unknown_and_empty_destinations() {
        let snap = snapshot("");
        let lb = Balancer::default();
        let plan = lb
            .plan(&snap, None, "10.0.2.2:9000".parse().unwrap())
            .unwrap();
        assert_eq!(
            plan.routes,
            [Route::Plain {
                dst: "10.0.2.2:9000".parse().unwrap(),
                workload: "demo/echo-3".into()
            }]
        );
        let plan = lb
            .plan(&snap, None, "192.0.2.1:443".parse().unwrap())
            .unwrap();
        assert_eq!(
            plan.routes,
            [Route::Passthrough {
                dst: "192.0.2.1:443".parse().unwrap()
            }]
        );
        assert_eq!(
            lb.plan(&snap, None, "10.96.0.2:80".parse().unwrap())
                .unwrap_err(),
            RouteError::NoEndpoints("demo/empty".into())
        );
    }

    /// A client whose zone and node are not known prefers no endpoint:
    /// not the ones whose zone and node are not known either.
    #[test]
    fn a_source_of_unknown_locality_prefers_nothing() {
        for distribution in ["PreferSameZone", "PreferSameNode"] {
            let yaml = format!(
                r#"
workloads:
  - {{uid: e1, name: echo-1, namespace: demo, ips: [10.0.1.1], node: n1, locality: {{zone: a}}}}
  - {{uid: e2, name: echo-2, namespace: demo, ips: [10.0.2.1], node: n2, locality: {{zone: b}}}}
  - {{uid: e4, name: echo-4, namespace: demo, ips: [10.0.4.1]}}
  - {{uid: u, name: client, namespace: demo, ips: [10.0.9.9]}}
services:
  - {{name: echo, namespace: demo, vips: [10.96.0.1], ports: [{{port: 80}}], endpoints: [e1, e2, e4], trafficDistribution: {distribution}}}
"#
            );
            let snap = Snapshot::new(serde_yaml::from_str(&yaml).unwrap(), 1).unwrap();
            let lb = Balancer::default();
            let client = snap.workload("u").unwrap();
            let vip = "10.96.0.1:80".parse().unwrap();
            let firsts: std::collections::BTreeSet<String> = (0..3)
                .map(|_| first(&lb.plan(&snap, Some(client), vip).unwrap()))
                .collect();
            assert_eq!(
                firsts.into_iter().collect::<Vec<_>>(),
                ["demo/echo-1", "demo/echo-2", "demo/echo-4"],
                "{distribution}"
            );
        }
    }

    #[test]
    fn traffic_distribution_prefers_then_falls_back() {
        let lb = Balancer::default();
        let vip = "10.96.0.1:80".parse().unwrap();
        let snap = snapshot("trafficDistribution: PreferSameNode");
        let client = snap.workload("c").unwrap();
        for _ in 0..4 {
            let plan = lb.plan(&snap, Some(client), vip).unwrap();
            assert_eq!(first(&plan), "demo/echo-1");
            assert_eq!(plan.routes.len(), 3, "other nodes remain as fallbacks");
        }
        // The only same-node endpoint failed (its HBONE port refused, as
        // the agent records it): the others are used.
        let failed = lb.plan(&snap, Some(client), vip).unwrap().routes[0].hbone_endpoint();
        assert_eq!(failed.to_string(), "10.0.1.1:15008");
        lb.eject(failed);
        let plan = lb.plan(&snap, Some(client), vip).unwrap();
        assert_ne!(first(&plan), "demo/echo-1");
        // By zone, from a node with no endpoint: zone b's two endpoints
        // take turns and the other zone's is never first, until both of
        // them fail.
        let snap = snapshot("trafficDistribution: PreferSameZone");
        let lb = Balancer::default();
        let client = snap.workload("d").unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let plan = lb.plan(&snap, Some(client), vip).unwrap();
            seen.insert(first(&plan));
            assert_eq!(plan.routes.len(), 3, "the other zone remains a fallback");
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["demo/echo-2", "demo/echo-3"]
        );
        for _ in 0..2 {
            let plan = lb.plan(&snap, Some(client), vip).unwrap();
            lb.eject(plan.routes[0].hbone_endpoint());
        }
        let plan = lb.plan(&snap, Some(client), vip).unwrap();
        assert_eq!(first(&plan), "demo/echo-1");
    }

    #[test]
    fn destinations_with_a_waypoint_are_tunnelled_to_it() {
        let yaml = r#"
workloads:
  - {uid: e1, name: echo-1, namespace: demo, ips: [10.0.1.1], protocol: HBONE, waypoint: {address: 10.96.0.50}}
  - {uid: w1, name: waypoint-1, namespace: demo, serviceAccount: waypoint, ips: [10.0.5.1], protocol: HBONE}
  - {uid: w2, name: waypoint-2, namespace: demo, serviceAccount: waypoint, ips: [10.0.5.2], protocol: HBONE}
  - {uid: c, name: client, namespace: demo, ips: [10.0.1.9], protocol: HBONE}
services:
  - {name: echo, namespace: demo, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], endpoints: [e1], waypoint: {address: 10.96.0.50}}
  - {name: waypoint, namespace: demo, vips: [10.96.0.50], ports: [{port: 15008}], endpoints: [w1, w2]}
  - {name: lonely, namespace: demo, vips: [10.96.0.3], ports: [{port: 80}], endpoints: [e1], waypoint: {address: 10.96.0.60}}
  - {name: gone, namespace: demo, vips: [10.96.0.60], ports: [{port: 15008}]}
"#;
        let snap = Snapshot::new(serde_yaml::from_str(yaml).unwrap(), 1).unwrap();
        let lb = Balancer::default();
        let client = snap.workload("c");
        // Service traffic: to the waypoint, `:authority` the VIP as dialled.
        let mut picked = Vec::new();
        for _ in 0..2 {
            let plan = lb
                .plan(&snap, client, "10.96.0.1:80".parse().unwrap())
                .unwrap();
            assert_eq!(plan.waypoint, Some("10.96.0.50".parse().unwrap()));
            assert_eq!(plan.service.as_deref(), Some("demo/echo"));
            let Route::Hbone {
                hbone,
                authority,
                identity,
                workload,
            } = &plan.routes[0]
            else {
                panic!("waypoint over HBONE: {plan:?}")
            };
            assert_eq!(authority.to_string(), "10.96.0.1:80");
            assert_eq!(hbone.port(), 15008);
            assert_eq!(
                identity.to_string(),
                "spiffe://cluster.local/ns/demo/sa/waypoint"
            );
            picked.push(workload.clone());
        }
        assert_eq!(picked, ["demo/waypoint-1", "demo/waypoint-2"]);
        // Pod traffic: to the pod's waypoint, `:authority` the pod address.
        let plan = lb
            .plan(&snap, client, "10.0.1.1:8080".parse().unwrap())
            .unwrap();
        assert_eq!(plan.routes[0].endpoint().to_string(), "10.0.1.1:8080");
        assert!(first(&plan).starts_with("demo/waypoint-"));
        // The waypoint's own outbound goes to the destination.
        let plan = lb
            .plan(&snap, snap.workload("w1"), "10.0.1.1:8080".parse().unwrap())
            .unwrap();
        assert_eq!(plan.waypoint, None);
        assert_eq!(first(&plan), "demo/echo-1");
        // A waypoint without endpoints fails closed rather than bypass it.
        assert_eq!(
            lb.plan(&snap, client, "10.96.0.3:80".parse().unwrap())
                .unwrap_err(),
            RouteError::NoWaypoint("10.96.0.60".parse().unwrap())
        );
    }
}
