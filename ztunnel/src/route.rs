//! Where an outbound connection goes: the original destination resolved
//! against the mesh config (Service VIP → endpoint, meshed → HBONE,
//! unmeshed → plain TCP, unknown → passthrough).

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use identity::Identity;
use model::{InboundProtocol, Snapshot, TrafficDistribution, Workload};

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
    /// The address the connection is finally made to (for health tracking).
    pub fn endpoint(&self) -> SocketAddr {
        match self {
            Route::Hbone { authority, .. } => *authority,
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
    pub routes: Vec<Route>,
}

/// Why there is no route at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
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
            let port = target.port.target_port();
            let endpoints: Vec<&Workload> = snapshot.endpoints(target.service).collect();
            if endpoints.is_empty() {
                return Err(RouteError::NoEndpoints(key));
            }
            let preferred = |w: &Workload| match (target.service.traffic_distribution, src) {
                (Some(TrafficDistribution::PreferSameNode), Some(src)) => w.node == src.node,
                (Some(TrafficDistribution::PreferSameZone), Some(src)) => {
                    w.locality.zone == src.locality.zone && w.locality.region == src.locality.region
                }
                _ => true,
            };
            let start = {
                let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
                let n = next.entry(key.clone()).or_default();
                let start = *n;
                *n = n.wrapping_add(1);
                start
            };
            // Preferred endpoints first, each group rotated round-robin;
            // endpoints that failed recently go last.
            let mut routes: Vec<(u8, Route)> = Vec::with_capacity(endpoints.len());
            for group in [true, false] {
                let members: Vec<&&Workload> =
                    endpoints.iter().filter(|w| preferred(w) == group).collect();
                for i in 0..members.len() {
                    let w = members[(start + i) % members.len()];
                    let route = workload_route(snapshot, w, port);
                    let rank = u8::from(!group) + 2 * u8::from(self.is_ejected(route.endpoint()));
                    routes.push((rank, route));
                }
            }
            routes.sort_by_key(|(rank, _)| *rank);
            return Ok(Plan {
                service: Some(key),
                hostname: Some(target.service.hostname()),
                routes: routes.into_iter().map(|(_, r)| r).collect(),
            });
        }
        let route = match snapshot.workload_by_ip(*orig.ip()) {
            Some(w) => workload_route(snapshot, w, orig.port()),
            None => Route::Passthrough {
                dst: SocketAddr::V4(orig),
            },
        };
        Ok(Plan {
            service: None,
            hostname: None,
            routes: vec![route],
        })
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
        // The only same-node endpoint failed: the others are used.
        lb.eject("10.0.1.1:8080".parse().unwrap());
        let plan = lb.plan(&snap, Some(client), vip).unwrap();
        assert_ne!(first(&plan), "demo/echo-1");
        let snap = snapshot("trafficDistribution: PreferSameZone");
        let lb = Balancer::default();
        let plan = lb
            .plan(&snap, Some(snap.workload("c").unwrap()), vip)
            .unwrap();
        assert_eq!(first(&plan), "demo/echo-1");
    }
}
