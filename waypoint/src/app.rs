//! Wiring: one function builds the whole waypoint, binds its listeners and
//! returns their addresses and a shutdown handle, so tests run the real
//! waypoint in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use admin_http::{StatusCode, text};
use control_client::{Controller, GrpcCa, StreamSource};
use hbone::{Pool, PoolConfig, Server, ServerOptions};
use identity::{CertManager, CertificateAuthority, Identity, InProcessCa, PluggedCa, TrustDomain};
use model::{ConfigSink, ConfigSource, FileSource};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::proxy::Waypoint;

/// The waypoint's configuration, read once at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The namespace and service account it runs as: its Gateway's.
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    /// HBONE (15008).
    pub listen: SocketAddr,
    /// `/metrics` and `/healthz/ready` (15020).
    pub metrics_addr: SocketAddr,
    pub source: Source,
}

/// Where config and certificates come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The controller: config stream and CA service.
    Controller {
        /// `host:port`.
        addr: String,
        token_file: PathBuf,
        /// The mesh root certificate(s), PEM, to check the controller's.
        roots_file: PathBuf,
    },
    /// A mesh config file and a CA directory (tests, small setups).
    Local {
        mesh_config: PathBuf,
        ca_dir: PathBuf,
    },
}

/// A running waypoint.
#[derive(Debug)]
pub struct App {
    pub hbone_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub identity: Identity,
    server: Arc<Server<Waypoint>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// How often the certificate is tried until the first one arrives.
const CERT_RETRY: Duration = Duration::from_millis(500);

pub async fn build(config: Config) -> anyhow::Result<App> {
    let trust_domain: TrustDomain = config.trust_domain.parse()?;
    let identity = Identity::new(
        trust_domain.clone(),
        &config.namespace,
        &config.service_account,
    )?;
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let sink = ConfigSink::new();
    let certs = match &config.source {
        Source::Controller {
            addr,
            token_file,
            roots_file,
        } => {
            let controller = Controller::from_files(
                addr.clone(),
                token_file.clone(),
                roots_file,
                &trust_domain,
            )?;
            tasks.spawn(
                Box::new(StreamSource::new(controller.clone())).run(sink.clone(), stop.clone()),
            );
            CertManager::new(Arc::new(GrpcCa::new(controller)))
        }
        Source::Local {
            mesh_config,
            ca_dir,
        } => {
            let mut source = FileSource::new(mesh_config.clone());
            match source.read_first() {
                Ok(mesh) => {
                    sink.apply(mesh)?;
                }
                // Logged and counted; serving waits for a good file.
                Err(error) => {
                    let _ = sink.refuse(error);
                }
            }
            tasks.spawn(Box::new(source).run(sink.clone(), stop.clone()));
            let ca = CertificateAuthority::plugged(
                trust_domain,
                identity::ca::DEFAULT_LEAF_TTL,
                &PluggedCa::from_dir(ca_dir)?,
            )?;
            CertManager::new(Arc::new(InProcessCa::new(Arc::new(ca))))
        }
    };
    let metrics = Arc::new(Metrics::new());
    let waypoint = Waypoint::new(
        identity.clone(),
        sink.subscribe(),
        Pool::new(certs.clone(), PoolConfig::default()),
        metrics.clone(),
    );
    let listener = TcpListener::bind(config.listen).await?;
    let hbone_addr = listener.local_addr()?;
    let server = Server::new(
        waypoint.clone(),
        ServerOptions {
            // Clients address the Services and workloads behind the
            // waypoint, not the waypoint itself.
            require_authority_ip_match: false,
            ..ServerOptions::default()
        },
    );
    tasks.spawn(
        server
            .clone()
            .serve(listener, certs.clone(), identity.clone()),
    );

    // Ready once it holds a config and its certificate.
    let has_cert = Arc::new(AtomicBool::new(false));
    tasks.spawn({
        let (certs, identity, has_cert, stop) = (
            certs.clone(),
            identity.clone(),
            has_cert.clone(),
            stop.clone(),
        );
        async move {
            loop {
                match certs.fetch(&identity).await {
                    Ok(_) => {
                        has_cert.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(error) => tracing::warn!(%error, "no certificate yet"),
                }
                tokio::select! {
                    () = tokio::time::sleep(CERT_RETRY) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    });
    let metrics_listener = TcpListener::bind(config.metrics_addr).await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let config_rx = sink.subscribe();
    tasks.spawn(admin_http::serve(
        metrics_listener,
        move |req| match req.uri().path() {
            "/healthz/ready" => {
                let version = config_rx.borrow().version();
                match (version, has_cert.load(Ordering::Relaxed)) {
                    (0, _) => text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n".into()),
                    (_, false) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no certificate yet\n".into(),
                    ),
                    (v, true) => text(StatusCode::OK, format!("ready: config version {v}\n")),
                }
            }
            _ => admin_http::reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.render(),
            ),
        },
        stop.clone(),
    ));
    tracing::info!(%identity, %hbone_addr, %metrics_addr, "waypoint started");
    Ok(App {
        hbone_addr,
        metrics_addr,
        identity,
        server,
        stop,
        tasks,
    })
}

impl App {
    /// Stops accepting, sends GOAWAY and lets open tunnels finish within
    /// the drain timeout.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
