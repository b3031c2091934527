//! Wiring: one function builds the whole ztunnel, binds every listener and
//! returns their addresses and a shutdown handle, so tests run the real app
//! in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use capture::Exclusions;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use control_client::{Controller, GrpcCa, StreamSource};
use identity::{CertManager, CertificateAuthority, InProcessCa, PluggedCa, TrustDomain};
use model::{ConfigSink, ConfigSource, FileSource};

use crate::agent::{Mesh, NodeAgent};

use crate::admin::{self, Admin, HeapStatsFn, LogControl};
use crate::{enroll, metrics};

/// ztunnel's configuration, read once at start.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    /// Pods to capture, as written by `ambit lab`; re-read on change.
    pub pods_file: Option<PathBuf>,
    /// Unix socket for enrollment requests (CNI plugin, pod watcher).
    pub enroll_socket: Option<PathBuf>,
    pub metrics_addr: SocketAddr,
    /// The admin API; keep it on loopback.
    pub admin_addr: SocketAddr,
    /// Run-time log filter changes through the admin API.
    pub logging: Option<Arc<dyn LogControl>>,
    /// The heap allocator's counters for the admin API.
    pub heap_stats: Option<HeapStatsFn>,
    /// BPF filesystem directory for this node's pinned maps and links.
    pub bpf_dir: PathBuf,
    /// Mesh config file (workloads, services), re-read on change.
    pub mesh_config: Option<PathBuf>,
    /// A CA directory (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`): this
    /// ztunnel signs its pods' certificates itself. Local setups only; in
    /// a cluster certificates come from the controller.
    pub ca_dir: Option<PathBuf>,
    pub trust_domain: String,
    /// The controller: the config stream (unless `mesh_config` is given)
    /// and certificates (unless `ca_dir` is given).
    pub controller: Option<ControllerConfig>,
    /// Outbound destinations never captured (e.g. the API server, node
    /// networks reached by host-network agents' peers).
    pub exclusions: Exclusions,
}

/// How to reach the controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// `host:port`.
    pub addr: String,
    /// The bootstrap or service account token proving this node.
    pub token_file: PathBuf,
    /// The mesh root certificate(s), PEM, to check the controller's.
    pub roots_file: PathBuf,
}

impl ControllerConfig {
    fn connect(&self, trust_domain: &TrustDomain) -> anyhow::Result<Controller> {
        Ok(Controller::from_files(
            self.addr.clone(),
            self.token_file.clone(),
            &self.roots_file,
            trust_domain,
        )?)
    }
}

/// How long start-up waits for the controller's first config before
/// serving without one: pods are captured, and their connections refused
/// until it arrives (`Shared::unconfigured`).
const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(10);

/// A running ztunnel.
#[derive(Debug)]
pub struct App {
    pub agent: Arc<NodeAgent>,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Loads capture, binds the listeners and starts serving.
pub async fn build(config: Config) -> anyhow::Result<App> {
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let sink = ConfigSink::new();
    if let Some(path) = &config.mesh_config {
        let mut source = FileSource::new(path.clone());
        // Start with the file's config, so that the first connections are
        // already routed by it. A file that cannot be read or is invalid
        // is not fatal: ztunnel waits for a good one, refusing captured
        // connections and not ready until then (`awaiting_config`), as it
        // does for the controller's first config.
        let _ = match source.read_first() {
            Ok(mesh) => sink.apply(mesh),
            Err(error) => sink.refuse(error),
        };
        tasks.spawn(Box::new(source).run(sink.clone(), stop.clone()));
    }
    let trust_domain: TrustDomain = config.trust_domain.parse()?;
    let controller = config
        .controller
        .as_ref()
        .map(|c| c.connect(&trust_domain))
        .transpose()?;
    if let (Some(controller), None) = (&controller, &config.mesh_config) {
        let mut first = sink.subscribe();
        tasks
            .spawn(Box::new(StreamSource::new(controller.clone())).run(sink.clone(), stop.clone()));
        if tokio::time::timeout(FIRST_CONFIG_WAIT, first.changed())
            .await
            .is_err()
        {
            tracing::warn!(controller = %controller.addr(), "no config from the controller yet; serving without one");
        }
    }
    let certs = match (&config.ca_dir, &controller) {
        (Some(dir), _) => {
            let ca = CertificateAuthority::plugged(
                trust_domain,
                identity::ca::DEFAULT_LEAF_TTL,
                &PluggedCa::from_dir(dir)?,
            )?;
            Some(CertManager::new(Arc::new(InProcessCa::new(Arc::new(ca)))))
        }
        (None, Some(controller)) => {
            Some(CertManager::new(Arc::new(GrpcCa::new(controller.clone()))))
        }
        (None, None) => None,
    };
    let agent = NodeAgent::new(
        &config.bpf_dir,
        &config.exclusions,
        Mesh {
            config: sink.subscribe(),
            certs,
            awaiting_config: controller.is_some() || config.mesh_config.is_some(),
        },
    )?;
    let metrics = TcpListener::bind(config.metrics_addr).await?;
    let metrics_addr = metrics.local_addr()?;
    let expects_config = config.mesh_config.is_some() || config.controller.is_some();
    tasks.spawn(metrics::serve(
        agent.clone(),
        metrics,
        expects_config,
        stop.clone(),
    ));
    let admin_listener = TcpListener::bind(config.admin_addr).await?;
    let admin_addr = admin_listener.local_addr()?;
    let admin = Admin {
        agent: agent.clone(),
        logging: config.logging.clone(),
        heap_stats: config.heap_stats,
        expects_config,
    };
    tasks.spawn(admin::serve(
        admin_listener,
        move |req| admin.route(req),
        stop.clone(),
    ));
    tasks.spawn(agent.clone().enforce_policy_changes(stop.clone()));
    if let Some(path) = &config.enroll_socket {
        // A stale socket from a previous run would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        tasks.spawn(enroll::serve_socket(agent.clone(), listener, stop.clone()));
    }
    if let Some(path) = config.pods_file.clone() {
        tasks.spawn(enroll::watch_pods_file(agent.clone(), path, stop.clone()));
    }
    tracing::info!(?config, %metrics_addr, %admin_addr, "ztunnel started");
    Ok(App {
        agent,
        metrics_addr,
        admin_addr,
        stop,
        tasks,
    })
}

impl App {
    /// Stops enrolling and serving and waits for connections to end; pods
    /// stay captured (fail closed) until a new ztunnel adopts them.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.agent.shutdown().await;
    }
}
