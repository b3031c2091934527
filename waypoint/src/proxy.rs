//! The waypoint's HBONE handler. A ztunnel sends a connection here with the
//! address its client dialled as `:authority` (a Service VIP:port, or a
//! workload IP:port); the waypoint checks that the destination uses it,
//! then either serves HTTP on the tunnel (the Service's port has routes:
//! [`crate::http`]) or passes the bytes on to an endpoint it picks. Either
//! way the next hop is HBONE with the waypoint's own identity to the
//! endpoint's 15008, or plain TCP to an endpoint outside the mesh.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, PoisonError};

use destination::{Balancer, Route};
use hbone::copy::{Attached, attach, copy_bidirectional};
use hbone::{ConnectRequest, Forwarded, Handler, InboundRequest, Pool, PoolKey, Rejection, Tunnel};
use identity::Identity;
use model::{Snapshot, WaypointRef, Workload};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::either::Either;

use crate::metrics::Metrics;
use crate::table::RouteTable;
use crate::upstream::Upstreams;

/// A connection to the next hop, as a byte stream.
pub type Upstream = Either<TcpStream, Attached>;

/// What the client addressed, once known to use this waypoint.
#[derive(Debug, Clone)]
pub enum Target {
    Service {
        /// `namespace/name`.
        key: String,
        hostname: String,
        /// The dialled VIP:port.
        addr: SocketAddrV4,
    },
    Workload {
        name: String,
        addr: SocketAddrV4,
    },
}

impl Target {
    pub fn addr(&self) -> SocketAddrV4 {
        match self {
            Self::Service { addr, .. } | Self::Workload { addr, .. } => *addr,
        }
    }

    /// For logs and metrics: the Service key, or the workload.
    pub fn name(&self) -> &str {
        match self {
            Self::Service { key, .. } => key,
            Self::Workload { name, .. } => name,
        }
    }

    /// The Service's hostname, for `forwarded: host=`.
    pub fn hostname(&self) -> Option<String> {
        match self {
            Self::Service { hostname, .. } => Some(hostname.clone()),
            Self::Workload { .. } => None,
        }
    }
}

/// Who sent the connection.
#[derive(Debug, Clone)]
pub struct Client {
    pub identity: Identity,
    /// The original client's address (from `forwarded`), else the peer's.
    pub addr: SocketAddr,
}

/// One waypoint; cheap to clone.
#[derive(Debug, Clone)]
pub struct Waypoint {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `namespace/name` of its Gateway (and service account).
    name: String,
    identity: Identity,
    config: watch::Receiver<Arc<Snapshot>>,
    table: Mutex<Arc<RouteTable>>,
    balancer: Balancer,
    pool: Pool,
    upstreams: Arc<Upstreams>,
    metrics: Arc<Metrics>,
}

impl Waypoint {
    pub fn new(
        identity: Identity,
        config: watch::Receiver<Arc<Snapshot>>,
        pool: Pool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: format!("{}/{}", identity.namespace(), identity.service_account()),
                identity,
                config,
                table: Mutex::new(Arc::new(RouteTable::default())),
                balancer: Balancer::default(),
                pool,
                upstreams: Arc::default(),
                metrics,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// HTTP connections to endpoints, kept for reuse.
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.inner.upstreams
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.config.borrow().clone()
    }

    /// The routes of `snapshot`, compiled once per config version.
    pub fn table(&self, snapshot: &Snapshot) -> Arc<RouteTable> {
        let mut table = self
            .inner
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if table.version() != snapshot.version() {
            *table = Arc::new(RouteTable::build(snapshot, &self.inner.name));
        }
        table.clone()
    }

    /// What `dialled` is, when it uses this waypoint (`me`).
    fn addressed(
        &self,
        snapshot: &Snapshot,
        me: &Workload,
        dialled: SocketAddrV4,
    ) -> Result<Target, (&'static str, String)> {
        let ours = |wp: Option<&WaypointRef>| {
            wp.is_some_and(|wp| {
                snapshot
                    .waypoint_endpoints(wp)
                    .iter()
                    .any(|w| w.uid == me.uid)
            })
        };
        if let Some(t) = snapshot.service_by_vip(dialled) {
            let key = t.service.key();
            return if ours(t.service.waypoint.as_ref()) {
                Ok(Target::Service {
                    hostname: t.service.hostname(),
                    key,
                    addr: dialled,
                })
            } else {
                Err((
                    "not_this_waypoint",
                    format!("service {key} does not use waypoint {}", self.name()),
                ))
            };
        }
        match snapshot.workload_by_ip(*dialled.ip()) {
            Some(w) if ours(w.waypoint.as_ref()) => Ok(Target::Workload {
                name: format!("{}/{}", w.namespace, w.name),
                addr: dialled,
            }),
            Some(w) => Err((
                "not_this_waypoint",
                format!(
                    "workload {}/{} does not use waypoint {}",
                    w.namespace,
                    w.name,
                    self.name()
                ),
            )),
            None => Err((
                "unknown_destination",
                format!("{dialled} is no service or workload of the mesh"),
            )),
        }
    }

    /// Connects to the first of `routes` that answers; endpoints that do
    /// not are skipped for a while.
    pub async fn connect(
        &self,
        routes: &[Route],
        client: &Client,
        target: &Target,
    ) -> Result<(Upstream, SocketAddr), String> {
        let mut errors = Vec::new();
        for route in routes {
            match self.connect_one(route, client, target).await {
                Ok(upstream) => return Ok((upstream, route.endpoint())),
                Err(error) => {
                    self.inner.balancer.eject(route.hbone_endpoint());
                    errors.push(format!("{}: {error}", route.endpoint()));
                }
            }
        }
        Err(if errors.is_empty() {
            "no endpoint".into()
        } else {
            errors.join("; ")
        })
    }

    async fn connect_one(
        &self,
        route: &Route,
        client: &Client,
        target: &Target,
    ) -> Result<Upstream, String> {
        match route {
            Route::Hbone {
                hbone,
                authority,
                identity,
                ..
            } => {
                let key = PoolKey::new(
                    self.inner.identity.clone(),
                    vec![identity.clone()],
                    *hbone,
                    None,
                );
                let mut req = ConnectRequest::new(*authority);
                req.forwarded = Some(Forwarded {
                    for_addr: client.addr,
                    host: target.hostname(),
                });
                let stream = self
                    .inner
                    .pool
                    .connect(&key, &req)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Either::Right(attach(stream)))
            }
            Route::Plain { dst, .. } | Route::Passthrough { dst } => {
                let tcp = TcpStream::connect(dst).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                Ok(Either::Left(tcp))
            }
        }
    }

    /// The endpoints for `addr` (a Service VIP:port or a workload), best
    /// first; never this waypoint again.
    pub fn plan(
        &self,
        snapshot: &Snapshot,
        me: &Workload,
        addr: SocketAddrV4,
    ) -> Result<Vec<Route>, String> {
        self.inner
            .balancer
            .plan(snapshot, Some(me), addr)
            .map(|p| p.routes)
            .map_err(|e| e.to_string())
    }

    /// Passes a connection on as bytes.
    async fn forward_tcp(
        &self,
        snapshot: &Snapshot,
        me: &Workload,
        target: Target,
        client: Client,
        tunnel: Tunnel,
    ) {
        let metrics = &self.inner.metrics;
        let routes = match self.plan(snapshot, me, target.addr()) {
            Ok(routes) => routes,
            Err(reason) => {
                metrics.failed(target.name(), "no_healthy_endpoint");
                tracing::info!(target: "access", dst = %target.addr(), src = %client.identity, %reason, "tcp refused");
                tunnel.reject(&Rejection::unavailable(reason));
                return;
            }
        };
        let (upstream, endpoint) = match self.connect(&routes, &client, &target).await {
            Ok(up) => up,
            Err(reason) => {
                metrics.failed(target.name(), "connect_failed");
                tracing::info!(target: "access", dst = %target.addr(), src = %client.identity, %reason, "tcp refused");
                tunnel.reject(&Rejection::unavailable(reason));
                return;
            }
        };
        let Ok(stream) = tunnel.accept() else {
            return;
        };
        metrics.opened(target.name(), "tcp");
        let started = std::time::Instant::now();
        let (reader, writer) = tokio::io::split(upstream);
        let (sent, received, reason) = match copy_bidirectional(reader, writer, stream).await {
            Ok(t) => (t.sent, t.received, String::new()),
            Err(e) => (
                e.transferred.sent,
                e.transferred.received,
                e.source.to_string(),
            ),
        };
        tracing::info!(
            target: "access",
            src = %client.identity,
            src_addr = %client.addr,
            dst = %target.addr(),
            destination = target.name(),
            %endpoint,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis() as u64,
            reason,
            "tcp"
        );
    }
}

impl Handler for Waypoint {
    async fn serve(&self, req: InboundRequest, tunnel: Tunnel) {
        let snapshot = self.snapshot();
        let client = Client {
            identity: req.peer_identity.clone(),
            addr: req
                .metadata
                .forwarded
                .as_ref()
                .map_or(req.peer_addr, |f| f.for_addr),
        };
        let refuse = |code: &'static str, reason: String, tunnel: Tunnel| {
            self.inner.metrics.failed("unknown", code);
            tracing::info!(target: "access", dst = %req.authority, src = %client.identity, %reason, "refused");
            tunnel.reject(&Rejection::unavailable(reason));
        };
        let SocketAddr::V4(dialled) = req.authority else {
            return refuse(
                "unsupported_address",
                format!("{} is not IPv4", req.authority),
                tunnel,
            );
        };
        let me = match req.local_addr.ip().to_canonical() {
            IpAddr::V4(ip) => snapshot.workload_by_ip(ip),
            IpAddr::V6(_) => None,
        };
        let Some(me) = me else {
            return refuse(
                "no_config",
                format!(
                    "waypoint {} at {} is not in the mesh config (version {}) yet",
                    self.name(),
                    req.local_addr.ip(),
                    snapshot.version()
                ),
                tunnel,
            );
        };
        let target = match self.addressed(&snapshot, me, dialled) {
            Ok(target) => target,
            Err((code, reason)) => return refuse(code, reason, tunnel),
        };
        // HTTP when the port has routes, unless it is declared as another
        // protocol (a route for all ports of a Service with a database
        // port must not feed the database's bytes to an HTTP parser).
        let routed = match &target {
            Target::Service { key, addr, .. } => {
                self.table(&snapshot).routes(key, addr.port())
                    && snapshot
                        .service_by_vip(*addr)
                        .is_none_or(|t| t.port.http() != Some(false))
            }
            Target::Workload { .. } => false,
        };
        if routed {
            let Ok(stream) = tunnel.accept() else {
                return;
            };
            self.inner.metrics.opened(target.name(), "http");
            crate::http::serve(self.clone(), me.clone(), target, client, attach(stream)).await;
        } else {
            self.forward_tcp(&snapshot, me, target, client, tunnel)
                .await;
        }
    }
}
