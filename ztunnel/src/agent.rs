//! The node agent: enrolls the node's meshed pods (listeners in each pod's
//! namespace, eBPF capture on its cgroup and interface), serves their
//! captured traffic, and releases them again.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use capture::{
    Capture, CaptureError, Exclusions, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, Pod, PodCapture,
};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::netns::PodSockets;

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

/// Captures and serves the pods of one node.
pub struct NodeAgent {
    capture: Mutex<Capture>,
    pods: Mutex<HashMap<String, Enrolled>>,
    stats: Arc<AgentStats>,
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
    ) -> Result<Arc<Self>, CaptureError> {
        let mut capture = Capture::load(bpf_dir)?;
        capture.set_exclusions(exclusions)?;
        Ok(Arc::new(Self {
            capture: Mutex::new(capture),
            pods: Mutex::new(HashMap::new()),
            stats: Arc::new(AgentStats::default()),
            tasks: TaskTracker::new(),
        }))
    }

    pub fn stats(&self) -> &AgentStats {
        &self.stats
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
                self.stats.attach_failures.fetch_add(1, Ordering::Relaxed);
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
        // Reserved for HBONE (the L4 data plane serves it); held so nothing
        // else in the pod can take the port.
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
        self.tasks.spawn(
            self.clone()
                .serve_outbound(outbound, sockets.clone(), cookie, stop.clone())
                .instrument(span.clone()),
        );
        self.tasks.spawn(
            self.clone()
                .serve_inbound(inbound, sockets, stop.clone())
                .instrument(span),
        );
        self.tasks.spawn({
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                drop(hbone);
            }
        });
        tracing::info!(pod = %key, ip = %pod.ip, identity = %pod.identity, "pod captured");
        self.stats.captured_pods.fetch_add(1, Ordering::Relaxed);
        self.lock_pods().insert(
            pod.uid.clone(),
            Enrolled {
                info: pod,
                capture: captured,
                stop,
            },
        );
        Ok(())
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
        self.stats.captured_pods.fetch_sub(1, Ordering::Relaxed);
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
        self.tasks.wait().await;
    }

    async fn serve_outbound(
        self: Arc<Self>,
        listener: TcpListener,
        sockets: PodSockets,
        netns_cookie: u64,
        stop: CancellationToken,
    ) {
        loop {
            let (client, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => { tracing::warn!(%error, "outbound accept"); continue; }
                },
                () = stop.cancelled() => return,
            };
            let SocketAddr::V4(peer) = peer else { continue };
            let orig = self.lock_capture().original_destination(netns_cookie, peer);
            let orig = match orig {
                Ok(Some(orig)) => orig,
                Ok(None) => {
                    // Not redirected by our program (e.g. a direct connect to
                    // 15001): nowhere to send it.
                    tracing::warn!(%peer, "connection on 15001 without an original destination");
                    self.stats
                        .connection_failures
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(error) => {
                    tracing::error!(%error, "original destination lookup failed");
                    continue;
                }
            };
            self.stats
                .outbound_connections
                .fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            let sockets = sockets.clone();
            self.tasks.spawn(
                async move {
                    this.passthrough(client, &sockets, SocketAddr::V4(orig), "outbound")
                        .await
                }
                .instrument(tracing::debug_span!("outbound", src = %peer, dst = %orig)),
            );
        }
    }

    async fn serve_inbound(
        self: Arc<Self>,
        listener: TcpListener,
        sockets: PodSockets,
        stop: CancellationToken,
    ) {
        loop {
            let (client, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => { tracing::warn!(%error, "inbound accept"); continue; }
                },
                () = stop.cancelled() => return,
            };
            // The assigned socket keeps the address the client dialled.
            let Ok(SocketAddr::V4(orig)) = client.local_addr() else {
                continue;
            };
            self.stats
                .inbound_connections
                .fetch_add(1, Ordering::Relaxed);
            let app = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, orig.port()));
            let this = self.clone();
            let sockets = sockets.clone();
            self.tasks.spawn(
                async move { this.passthrough(client, &sockets, app, "inbound").await }
                    .instrument(tracing::debug_span!("inbound", src = %peer, dst = %orig)),
            );
        }
    }

    /// Plain TCP forwarding; HBONE replaces it for meshed destinations.
    async fn passthrough(
        &self,
        mut client: TcpStream,
        sockets: &PodSockets,
        to: SocketAddr,
        dir: &str,
    ) {
        let _ = client.set_nodelay(true);
        match sockets.connect(to).await {
            Ok(mut upstream) => {
                // With tokio's default 8 KiB buffers a captured stream ran
                // at 3.4 Gbit/s, with 128 KiB at 10.2 (scripts/bench-capture).
                let result = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut upstream,
                    COPY_BUFFER,
                    COPY_BUFFER,
                )
                .await;
                tracing::debug!(direction = dir, ?result, "connection closed");
            }
            Err(error) => {
                self.stats
                    .connection_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(direction = dir, %to, %error, "upstream connect failed");
            }
        }
    }
}
