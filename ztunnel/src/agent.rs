//! The node agent: enrolls the node's meshed pods (listeners in each pod's
//! namespace, eBPF capture on its cgroup and interface), serves their
//! captured traffic, and releases them again.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use capture::{
    Capture, CaptureError, Destinations, Exclusions, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, Pod,
    PodCapture,
};
use hbone::{ConnectRequest, EarlyData, Forwarded, Pool, PoolConfig, PoolKey};
use identity::{CertManager, Identity};
use model::{InboundProtocol, Snapshot, Workload};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::conns::Connections;
use crate::inbound::Inbound;
use crate::netns::PodSockets;
use crate::telemetry::{ConnRecord, Direction, Metrics};
use crate::transparent;
use destination::{Balancer, Route};

/// Per-direction buffer of plain forwarding.
const COPY_BUFFER: usize = 128 * 1024;

/// What the agent must know of a pod to capture it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    /// Stable id (the Kubernetes pod UID).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    /// Network namespace file, e.g. `/var/run/netns/<name>`.
    pub netns: PathBuf,
    /// cgroup v2 directory of the pod's processes.
    pub cgroup: PathBuf,
    /// `spiffe://…` identity the pod's traffic will carry.
    pub identity: String,
}

impl PodInfo {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("pod {pod}: cannot enter its network namespace {}: {source}", netns.display())]
    Netns {
        pod: String,
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: cannot listen on {port} in its namespace: {source}")]
    Listen {
        pod: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: identity {identity:?}: {reason}")]
    Identity {
        pod: String,
        identity: String,
        reason: String,
    },
    #[error("pod {pod}: {source}")]
    Capture {
        pod: String,
        #[source]
        source: CaptureError,
    },
}

/// Counters of the agent (exported as metrics).
#[derive(Debug, Default, Serialize)]
pub struct AgentStats {
    pub captured_pods: AtomicU64,
    pub attach_failures: AtomicU64,
    pub outbound_connections: AtomicU64,
    pub inbound_connections: AtomicU64,
    pub connection_failures: AtomicU64,
}

struct Enrolled {
    info: PodInfo,
    capture: PodCapture,
    stop: CancellationToken,
}

/// What the agent needs to speak HBONE: the mesh config and certificates.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub config: watch::Receiver<Arc<Snapshot>>,
    /// `None`: no certificate source; meshed destinations cannot be
    /// reached and inbound HBONE is not served.
    pub certs: Option<CertManager>,
    /// The config comes from a source (the controller or a file): until
    /// its first good config arrives, captured connections are refused,
    /// not routed on an empty config.
    pub awaiting_config: bool,
}

/// What every connection handler of the node uses.
#[derive(Debug)]
pub struct Shared {
    pub config: watch::Receiver<Arc<Snapshot>>,
    pub conns: Arc<Connections>,
    pub metrics: Arc<Metrics>,
    pub stats: Arc<AgentStats>,
    /// As [`Mesh::awaiting_config`].
    pub awaiting_config: bool,
}

impl Shared {
    /// The config in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.borrow().clone()
    }

    /// Why `snapshot` cannot route or judge connections, if it cannot: it
    /// is the empty one from before the source's first good config. With
    /// it, meshed destinations would look unknown and be reached in
    /// plaintext, and no policy would apply.
    pub fn unconfigured(&self, snapshot: &Snapshot) -> Option<&'static str> {
        (self.awaiting_config && snapshot.version() == 0).then_some("no mesh config yet")
    }
}

/// How long open connections may take to finish when ztunnel stops.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long connections closed at the drain deadline may take to log
/// their end.
const CLOSE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

/// Captures and serves the pods of one node.
pub struct NodeAgent {
    capture: Mutex<Capture>,
    /// Looked up per outbound connection, without the capture's lock.
    destinations: Arc<Destinations>,
    mesh: Mesh,
    shared: Arc<Shared>,
    pool: Option<Pool>,
    balancer: Balancer,
    pods: Mutex<HashMap<String, Enrolled>>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent")
            .field("pods", &self.pod_keys())
            .finish_non_exhaustive()
    }
}

impl NodeAgent {
    /// Loads the capture programs, pinning maps and links under `bpf_dir`
    /// (a restarted agent adopts them); fails with the missing privilege or
    /// kernel feature named. Outbound connects to `exclusions` are not
    /// captured.
    pub fn new(
        bpf_dir: &std::path::Path,
        exclusions: &Exclusions,
        mesh: Mesh,
    ) -> Result<Arc<Self>, CaptureError> {
        let mut capture = Capture::load(bpf_dir)?;
        capture.set_exclusions(exclusions)?;
        let metrics = Arc::new(Metrics::new());
        let pool = mesh
            .certs
            .clone()
            .map(|certs| Pool::with_observer(certs, PoolConfig::default(), metrics.clone()));
        let shared = Arc::new(Shared {
            config: mesh.config.clone(),
            conns: Arc::default(),
            metrics,
            stats: Arc::default(),
            awaiting_config: mesh.awaiting_config,
        });
        Ok(Arc::new(Self {
            destinations: capture.destinations(),
            capture: Mutex::new(capture),
            mesh,
            shared,
            pool,
            balancer: Balancer::default(),
            pods: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        }))
    }

    pub fn stats(&self) -> &AgentStats {
        &self.shared.stats
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The workload certificates held now.
    pub fn certificates(&self) -> Vec<Arc<identity::WorkloadCert>> {
        self.mesh
            .certs
            .as_ref()
            .map(CertManager::certificates)
            .unwrap_or_default()
    }

    /// The enrolled pods as enrollment described them.
    pub fn pods(&self) -> Vec<PodInfo> {
        let mut pods: Vec<PodInfo> = self.lock_pods().values().map(|p| p.info.clone()).collect();
        pods.sort_by_key(PodInfo::key);
        pods
    }

    /// Re-judges open connections whenever the config changes, closing
    /// those the new policies refuse, until `stop`.
    pub async fn enforce_policy_changes(self: Arc<Self>, stop: CancellationToken) {
        let mut config = self.mesh.config.clone();
        loop {
            tokio::select! {
                changed = config.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
            }
            let snapshot = config.borrow_and_update().clone();
            let closed = self.shared.conns.reevaluate(&snapshot);
            if closed > 0 {
                tracing::info!(
                    closed,
                    version = snapshot.version(),
                    "policy change closed connections"
                );
            }
        }
    }

    /// The enrolled pods, `namespace/name`.
    pub fn pod_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.lock_pods().values().map(|p| p.info.key()).collect();
        keys.sort();
        keys
    }

    fn lock_pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, Enrolled>> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_capture(&self) -> std::sync::MutexGuard<'_, Capture> {
        self.capture.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the set of enrolled pods equal to `pods`, and releases pins an
    /// earlier run left for pods not among them. Returns the reasons of
    /// pods that could not be captured.
    pub async fn reconcile(self: &Arc<Self>, pods: Vec<PodInfo>) -> Vec<String> {
        let wanted: HashMap<String, PodInfo> =
            pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
        let stale: Vec<String> = self
            .lock_pods()
            .iter()
            .filter(|(uid, e)| wanted.get(*uid) != Some(&e.info))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            self.remove(&uid);
        }
        let mut failed = Vec::new();
        for (uid, pod) in wanted {
            if self.lock_pods().contains_key(&uid) {
                continue;
            }
            if let Err(error) = self.enroll(pod).await {
                self.shared
                    .stats
                    .attach_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "pod not captured");
                failed.push(error.to_string());
            }
        }
        let pods = self.lock_pods();
        let live: Vec<&PodCapture> = pods.values().map(|p| &p.capture).collect();
        match self.lock_capture().prune(&live) {
            Ok(0) => {}
            Ok(n) => tracing::info!(pods = n, "released capture of pods no longer in the mesh"),
            Err(error) => tracing::warn!(%error, "releasing stale capture"),
        }
        failed
    }

    /// Creates the pod's listeners in its namespace, starts serving them and
    /// attaches capture (inbound first: nothing reaches the app around us).
    pub async fn enroll(self: &Arc<Self>, pod: PodInfo) -> Result<(), AgentError> {
        let key = pod.key();
        let identity: Identity =
            pod.identity
                .parse()
                .map_err(|e: identity::SpiffeIdError| AgentError::Identity {
                    pod: key.clone(),
                    identity: pod.identity.clone(),
                    reason: e.to_string(),
                })?;
        let sockets = PodSockets::new(&pod.netns).map_err(|source| AgentError::Netns {
            pod: key.clone(),
            netns: pod.netns.clone(),
            source,
        })?;
        let listen = |ip, port| {
            let sockets = sockets.clone();
            let key = key.clone();
            async move {
                sockets
                    .listen(ip, port)
                    .await
                    .map_err(|source| AgentError::Listen {
                        pod: key,
                        port,
                        source,
                    })
            }
        };
        let outbound = listen(Ipv4Addr::LOCALHOST, OUTBOUND_PORT).await?;
        let inbound = listen(Ipv4Addr::UNSPECIFIED, INBOUND_PORT).await?;
        let hbone = listen(pod.ip, HBONE_PORT).await?;
        let cookie =
            capture::netns::netns_cookie(&outbound).map_err(|source| AgentError::Netns {
                pod: key.clone(),
                netns: pod.netns.clone(),
                source,
            })?;
        let captured = self
            .lock_capture()
            .capture(&Pod {
                cgroup: &pod.cgroup,
                netns: &pod.netns,
                interface: "eth0",
                ip: pod.ip,
                inbound_listener: &inbound,
            })
            .map_err(|source| AgentError::Capture {
                pod: key.clone(),
                source,
            })?;
        let stop = CancellationToken::new();
        let span = tracing::info_span!("pod", pod = %key);
        let source = Source {
            ip: pod.ip,
            identity: identity.clone(),
            workload: key.clone(),
            sockets: sockets.clone(),
            dialer: Arc::new(sockets.clone()),
        };
        self.tasks.spawn(
            self.clone()
                .serve_outbound(outbound, source, cookie, stop.clone())
                .instrument(span.clone()),
        );
        let netns = pod.netns.clone();
        let transparent = tokio::task::spawn_blocking(move || transparent::install(&netns))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(reason) = &transparent {
            tracing::warn!(
                pod = %key,
                %reason,
                "no return path in the pod: inbound connections reach it from its own address"
            );
        }
        let handler = Inbound::new(
            self.workload_of(&pod, &identity),
            identity.clone(),
            sockets.clone(),
            self.shared.clone(),
            transparent.is_ok(),
        );
        self.tasks.spawn(
            self.clone()
                .serve_inbound(inbound, handler.clone(), stop.clone())
                .instrument(span.clone()),
        );
        match &self.mesh.certs {
            Some(certs) => {
                let server = hbone::Server::new(handler, hbone::ServerOptions::default());
                self.tasks.spawn(
                    server
                        .clone()
                        .serve(hbone, certs.clone(), identity.clone())
                        .instrument(span.clone()),
                );
                let stop = stop.clone();
                self.tasks.spawn(async move {
                    stop.cancelled().await;
                    server.shutdown().await;
                });
            }
            // No certificates: the port stays reserved, and refuses nothing
            // it could have served.
            None => {
                let stop = stop.clone();
                self.tasks.spawn(async move {
                    stop.cancelled().await;
                    drop(hbone);
                });
            }
        }
        tracing::info!(pod = %key, ip = %pod.ip, identity = %pod.identity, "pod captured");
        // Listed before counted, so that the gauge never runs ahead of
        // the pods the agent reports.
        self.lock_pods().insert(
            pod.uid.clone(),
            Enrolled {
                info: pod,
                capture: captured,
                stop,
            },
        );
        self.shared
            .stats
            .captured_pods
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The pod as the mesh config knows it, or as enrollment describes it
    /// (policies by namespace still apply; those by label need the
    /// config). By its uid only: a workload of the config with the same
    /// address may be an earlier pod whose address this one reuses.
    fn workload_of(&self, pod: &PodInfo, identity: &Identity) -> Workload {
        if let Some(w) = self.shared.snapshot().workload(&pod.uid) {
            return w.clone();
        }
        Workload {
            uid: pod.uid.clone(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: identity.service_account().to_string(),
            ips: vec![pod.ip],
            node: String::new(),
            protocol: InboundProtocol::Hbone,
            workload_name: None,
            labels: Default::default(),
            locality: Default::default(),
            waypoint: None,
        }
    }

    /// Releases a pod: capture detached (its traffic goes direct again),
    /// listeners closed; open connections finish on their own.
    pub fn remove(&self, uid: &str) {
        let Some(pod) = self.lock_pods().remove(uid) else {
            return;
        };
        if let Err(error) = self.lock_capture().release(pod.capture) {
            tracing::warn!(pod = %pod.info.key(), %error, "release failed");
        }
        pod.stop.cancel();
        let netns = pod.info.netns.clone();
        self.tasks
            .spawn_blocking(move || transparent::remove(&netns));
        self.shared
            .stats
            .captured_pods
            .fetch_sub(1, Ordering::Relaxed);
        tracing::info!(pod = %pod.info.key(), "pod released");
    }

    /// Stops serving and waits for open connections to end. Capture stays
    /// pinned: until a new agent adopts the pods, their connections fail
    /// rather than bypass the mesh. Pods leave the mesh only by `remove`.
    pub async fn shutdown(&self) {
        for pod in self.lock_pods().values() {
            pod.stop.cancel();
        }
        self.tasks.close();
        if tokio::time::timeout(DRAIN_DEADLINE, self.tasks.wait())
            .await
            .is_err()
        {
            let open = self.shared.conns.len();
            tracing::info!(open, "drain deadline passed, closing remaining connections");
            self.shared.conns.close_all("ztunnel shutting down");
            // What is still connecting (a destination that does not answer
            // its SYNs) is not waited for: exiting ends it.
            if tokio::time::timeout(CLOSE_DEADLINE, self.tasks.wait())
                .await
                .is_err()
            {
                tracing::info!("connections still being made at exit");
            }
        }
    }

    async fn serve_outbound(
        self: Arc<Self>,
        listener: TcpListener,
        source: Source,
        netns_cookie: u64,
        stop: CancellationToken,
    ) {
        let source = Arc::new(source);
        loop {
            let (client, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => { admin_http::after_accept_error(&error, "outbound").await; continue; }
                },
                () = stop.cancelled() => return,
            };
            let SocketAddr::V4(peer) = peer else { continue };
            let orig = match self.destinations.original_destination(netns_cookie, peer) {
                Ok(Some(orig)) => orig,
                // Not redirected by our program (a direct connect to 15001),
                // or the record could not be read: nowhere to send it.
                looked_up => {
                    let reason = match looked_up {
                        Err(error) => format!("original destination lookup failed: {error}"),
                        Ok(_) => "no original destination: not redirected by the capture".into(),
                    };
                    self.unroutable(&client, peer, &source, &reason);
                    continue;
                }
            };
            self.shared
                .stats
                .outbound_connections
                .fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            let source = source.clone();
            self.tasks.spawn(
                async move { this.outbound(client, peer, orig, &source).await }
                    .instrument(tracing::debug_span!("outbound", src = %peer, dst = %orig)),
            );
        }
    }

    /// Resolves and proxies one captured outbound connection, then writes
    /// its access log line and metrics.
    async fn outbound(
        &self,
        mut client: TcpStream,
        peer: SocketAddrV4,
        orig: SocketAddrV4,
        source: &Source,
    ) {
        let _ = client.set_nodelay(true);
        // The app's socket is bound to loopback (its connect was redirected
        // there); the address the mesh knows it by is the pod's.
        let peer = SocketAddrV4::new(source.ip, peer.port());
        let snapshot = self.shared.snapshot();
        let src_workload = snapshot.workload_by_ip(source.ip);
        let mut record = ConnRecord::new(Direction::Outbound, peer.into(), orig.into());
        match src_workload {
            Some(w) => record.set_src(w),
            None => record.src_workload = source.workload.clone(),
        }
        record.src_identity = source.identity.to_string();
        let metrics = &self.shared.metrics;
        if let Some(reason) = self.shared.unconfigured(&snapshot) {
            self.failed();
            metrics.failed(&record, "no_config");
            record.log(0, 0, reason);
            return;
        }
        let plan = match self.balancer.plan(&snapshot, src_workload, orig) {
            Ok(plan) => plan,
            Err(error) => {
                self.failed();
                metrics.failed(&record, error.code());
                record.log(0, 0, &error.to_string());
                return;
            }
        };
        if let Some(service) = plan
            .hostname
            .as_deref()
            .and_then(|h| snapshot.service_by_hostname(h))
        {
            record.set_service(service);
        }
        if let Some(waypoint) = plan.waypoint {
            record.waypoint = waypoint.to_string();
        }
        // The client's bytes go with the CONNECT, up to its answer, and
        // again to the next endpoint if one refused it without acting on it.
        let mut early = EarlyData::new(EARLY_DATA);
        let mut last = None;
        // A refused endpoint of a service is skipped for the next one; a
        // single destination is tried once.
        for route in plan.routes.iter().take(MAX_ATTEMPTS) {
            describe(&mut record, route);
            if let Some(w) = ipv4(route.endpoint()).and_then(|ip| snapshot.workload_by_ip(ip)) {
                record.set_dst(w);
            }
            let opened = self
                .open(
                    route,
                    peer,
                    plan.hostname.as_deref(),
                    source,
                    &mut client,
                    &mut early,
                )
                .await;
            if let Some(error) = early.take_error() {
                self.failed();
                metrics.failed(&record, "client_error");
                record.log(0, 0, &format!("client: {error}"));
                return;
            }
            let upstream = match opened {
                Ok(upstream) => upstream,
                Err(failure) => {
                    if endpoint_fault(failure.code) {
                        self.balancer.eject(route.hbone_endpoint());
                    }
                    // A tunnel that broke after the server may have
                    // forwarded the client's first bytes is not tried
                    // elsewhere: they would reach two backends.
                    let retry = plan.service.is_some() && (failure.not_sent || early.is_empty());
                    last = Some((failure.code, failure.reason));
                    if !retry {
                        break;
                    }
                    continue;
                }
            };
            let tracked = self.shared.conns.track(record.clone(), None);
            metrics.opened(&record);
            let (to_dst, to_src, reason) = match upstream {
                Upstream::Hbone(stream) => {
                    // Sent (h2 holds what it has not written yet).
                    drop(early);
                    let (reader, writer) = client.into_split();
                    match hbone::copy::copy_bidirectional_until(
                        reader,
                        writer,
                        stream,
                        tracked.closed(),
                    )
                    .await
                    {
                        Ok(t) => (t.sent, t.received, String::new()),
                        Err(e) => (
                            e.transferred.sent,
                            e.transferred.received,
                            tracked.close_reason(&mut record, e.source),
                        ),
                    }
                }
                Upstream::Tcp(mut upstream) => {
                    let early_sent = upstream.write_all(early.bytes()).await;
                    let early_len = early.bytes().len() as u64;
                    drop(early);
                    let (to_dst, to_src, copied) = match early_sent {
                        Ok(()) => {
                            let (to_dst, to_src, result) =
                                copy_plain_until(&mut client, &mut upstream, tracked.closed())
                                    .await;
                            (early_len + to_dst, to_src, result)
                        }
                        Err(e) => (0, 0, Err(e)),
                    };
                    match copied {
                        Ok(()) => (to_dst, to_src, String::new()),
                        Err(e) => (to_dst, to_src, tracked.close_reason(&mut record, e)),
                    }
                }
            };
            metrics.closed(&record, to_dst, to_src);
            record.log(to_dst, to_src, &reason);
            return;
        }
        self.failed();
        let (code, reason) = last.unwrap_or(("no_route", "no route".into()));
        metrics.failed(&record, code);
        record.log(0, 0, &reason);
    }

    /// Counts and logs a captured connection that cannot be routed; the
    /// client's socket is closed when the caller drops it.
    fn unroutable(&self, client: &TcpStream, peer: SocketAddrV4, source: &Source, reason: &str) {
        let dst = client
            .local_addr()
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)));
        let peer = SocketAddrV4::new(source.ip, peer.port());
        let mut record = ConnRecord::new(Direction::Outbound, peer.into(), dst);
        match self.shared.snapshot().workload_by_ip(source.ip) {
            Some(w) => record.set_src(w),
            None => record.src_workload = source.workload.clone(),
        }
        record.src_identity = source.identity.to_string();
        self.failed();
        self.shared
            .metrics
            .failed(&record, "no_original_destination");
        record.log(0, 0, reason);
    }

    fn failed(&self) {
        self.shared
            .stats
            .connection_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Connects to one route: an HBONE tunnel (the client's bytes go ahead
    /// of the answer) or a TCP connection from the source pod's namespace.
    async fn open(
        &self,
        route: &Route,
        peer: SocketAddrV4,
        hostname: Option<&str>,
        source: &Source,
        client: &mut TcpStream,
        early: &mut EarlyData,
    ) -> Result<Upstream, OpenFailure> {
        match route {
            Route::Hbone {
                hbone,
                authority,
                identity,
                ..
            } => {
                let pool = self.pool.as_ref().ok_or(OpenFailure {
                    code: "certificate_unavailable",
                    reason: "no certificate source: cannot reach meshed workloads".to_string(),
                    not_sent: true,
                })?;
                let key = PoolKey::new(
                    source.identity.clone(),
                    vec![identity.clone()],
                    *hbone,
                    Some(source.ip.into()),
                )
                .via(source.dialer.clone());
                let mut req = ConnectRequest::new(*authority);
                req.forwarded = Some(Forwarded {
                    for_addr: SocketAddr::V4(peer),
                    host: hostname.map(str::to_string),
                });
                pool.connect_with(&key, &req, client, early)
                    .await
                    .map(Upstream::Hbone)
                    .map_err(|e| OpenFailure {
                        code: e.reason(),
                        reason: format!("{}: {e}", e.reason()),
                        not_sent: e.not_processed(),
                    })
            }
            Route::Plain { dst, .. } | Route::Passthrough { dst } => source
                .sockets
                // As long as the pool's HBONE connects may take, so that
                // an endpoint that drops SYNs is given up on and tried
                // last, like one behind HBONE.
                .connect_within(*dst, hbone::client::Timeouts::default().connect)
                .await
                .map(Upstream::Tcp)
                .map_err(|e| {
                    let code = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => "connect_refused",
                        std::io::ErrorKind::TimedOut => "timeout",
                        _ => "connect_failed",
                    };
                    // The early data is written only once connected.
                    OpenFailure {
                        code,
                        reason: format!("connect {dst}: {e}"),
                        not_sent: true,
                    }
                }),
        }
    }

    async fn serve_inbound(
        self: Arc<Self>,
        listener: TcpListener,
        handler: Inbound,
        stop: CancellationToken,
    ) {
        loop {
            let (client, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => { admin_http::after_accept_error(&error, "inbound").await; continue; }
                },
                () = stop.cancelled() => return,
            };
            self.shared
                .stats
                .inbound_connections
                .fetch_add(1, Ordering::Relaxed);
            self.tasks.spawn(
                handler
                    .clone()
                    .plaintext(client, peer)
                    .instrument(tracing::debug_span!("inbound", src = %peer)),
            );
        }
    }
}

/// The most of a client's bytes sent ahead of its tunnel's answer: one read
/// of the copy loop's first size.
const EARLY_DATA: usize = 16 * 1024;

/// Plain TCP forwarding both ways until both sides close or `stop`
/// resolves: the bytes written (client → upstream, back), also when the
/// copy ends with an error, and how it ended.
pub(crate) async fn copy_plain_until(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    stop: impl Future<Output = ()>,
) -> (u64, u64, std::io::Result<()>) {
    let mut client = Counted::new(client);
    let mut upstream = Counted::new(upstream);
    // With tokio's default 8 KiB buffers a captured stream ran at 3.4
    // Gbit/s, with 128 KiB at 10.2 (docs/benchmarks.md, capture with plain
    // forwarding).
    let result = tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER) => result.map(drop),
        () = stop => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "closed by the proxy")),
    };
    (upstream.written, client.written, result)
}

/// A stream that counts what was written to it: tokio's copy reports its
/// counts only when it ends well.
struct Counted<'a> {
    io: &'a mut TcpStream,
    written: u64,
}

impl<'a> Counted<'a> {
    fn new(io: &'a mut TcpStream) -> Self {
        Self { io, written: 0 }
    }
}

impl tokio::io::AsyncRead for Counted<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted<'_> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut *this.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            this.written += n as u64;
        }
        polled
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// Why a route could not be opened.
struct OpenFailure {
    /// The metrics label.
    code: &'static str,
    /// The access log's reason.
    reason: String,
    /// Nothing reached the application: the client's first bytes may go
    /// to another endpoint.
    not_sent: bool,
}

/// Endpoints one connection tries before it fails. Each failed one is
/// tried last by later connections for a while, so a service with many
/// dead endpoints costs each client at most this many connect (and TLS
/// handshake) timeouts rather than one per endpoint.
const MAX_ATTEMPTS: usize = 3;

/// Whether a failure to open a route says the endpoint itself is unwell,
/// so it is tried last for a while. Refusals that depend on the client
/// (policy, its request, its own certificate) or on one port of the
/// endpoint do not, and must not push a healthy endpoint back for every
/// other client of the node.
fn endpoint_fault(code: &str) -> bool {
    matches!(
        code,
        "connect_refused"
            | "connect_failed"
            | "timeout"
            | "tls_failed"
            | "identity_mismatch"
            | "http2_error"
            | "io_error"
    )
}

/// Fills in where `route` goes.
fn describe(record: &mut ConnRecord, route: &Route) {
    record.dst_endpoint = route.endpoint().to_string();
    match route {
        Route::Hbone {
            workload, identity, ..
        } => {
            record.protocol = "HBONE";
            record.dst_workload = workload.clone();
            record.dst_identity = identity.to_string();
        }
        Route::Plain { workload, .. } => {
            record.protocol = "TCP";
            record.dst_workload = workload.clone();
            record.dst_identity.clear();
        }
        Route::Passthrough { .. } => {
            record.protocol = "TCP";
            record.dst_workload.clear();
            record.dst_owner = Default::default();
            record.dst_identity.clear();
        }
    }
}

fn ipv4(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(_) => None,
    }
}

/// The captured pod an outbound connection comes from.
#[derive(Debug)]
struct Source {
    ip: Ipv4Addr,
    identity: Identity,
    /// `namespace/name`.
    workload: String,
    sockets: PodSockets,
    /// The same sockets as the HBONE pool's dialer, made once per pod.
    dialer: Arc<dyn hbone::Dialer>,
}

enum Upstream {
    Hbone(hbone::H2Stream),
    Tcp(TcpStream),
}

#[cfg(test)]
mod copy_tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use tokio::io::AsyncReadExt;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A plain copy cut short (here by the proxy, as after a policy change)
    /// still reports what it moved, for the access log and the metrics.
    #[tokio::test]
    async fn a_plain_copy_that_ends_in_error_reports_its_bytes() {
        let (mut client_app, mut client) = pair().await;
        let (mut upstream, mut server_app) = pair().await;
        let stop = tokio_util::sync::CancellationToken::new();
        let copy = {
            let stop = stop.clone();
            tokio::spawn(async move {
                copy_plain_until(&mut client, &mut upstream, stop.cancelled()).await
            })
        };
        client_app.write_all(&[1; 1000]).await.unwrap();
        let mut got = [0; 1000];
        server_app.read_exact(&mut got).await.unwrap();
        server_app.write_all(&[2; 300]).await.unwrap();
        let mut back = [0; 300];
        client_app.read_exact(&mut back).await.unwrap();
        stop.cancel();
        let (to_upstream, to_client, result) = copy.await.unwrap();
        assert!(result.is_err());
        assert_eq!((to_upstream, to_client), (1000, 300));
    }

    #[test]
    fn only_faults_of_the_endpoint_push_it_back() {
        for code in ["connect_refused", "connect_failed", "timeout", "tls_failed"] {
            assert!(endpoint_fault(code), "{code}");
        }
        for code in [
            "rejected_unauthorized",
            "rejected_bad_request",
            "rejected_unavailable",
            "certificate_unavailable",
        ] {
            assert!(!endpoint_fault(code), "{code}");
        }
    }
}
