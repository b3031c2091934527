//! The controller process in local manifests mode: the manifests pipeline,
//! the CA and config services on one TLS port, and the ops endpoint
//! (`/healthz`, `/ready`, `/metrics`). Built here rather than in `main`
//! so that tests run the real thing in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use admin_http::{Method, StatusCode, text};
use identity::ca::{CA_KEY_FILE, DEFAULT_LEAF_TTL};
use identity::{CertificateAuthority, PluggedCa, TrustDomain};
use model::proto::ca::certificate_service_server::CertificateServiceServer;
use model::proto::config::config_service_server::ConfigServiceServer;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::BootstrapTokens;
use crate::ca::CaService;
use crate::local::LocalMode;
use crate::metrics::Metrics;
use crate::server::{ServingCert, serve};
use crate::stream::ConfigServer;

/// What `controller run` is given.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalOptions {
    /// Directory of YAML manifests (the cluster's objects).
    #[arg(long)]
    pub manifests: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The CA and config stream (TLS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// `/healthz`, `/ready`, `/metrics` (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub ops: SocketAddr,
    /// The CA's directory (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`);
    /// a root is created there on first start when it is empty.
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Data planes' bootstrap tokens:
    /// `tokens: [{token: …, node: …}, {token: …, waypoint: ns/sa}]`.
    #[arg(long)]
    pub tokens: PathBuf,
    /// How often the manifests are re-read.
    #[arg(long, default_value_t = 250)]
    pub poll_ms: u64,
    /// Also write the config being served to this file, for inspection.
    #[arg(long)]
    pub mesh_file: Option<PathBuf>,
}

/// A running controller.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    pub roots: Vec<CertificateDer<'static>>,
    pub config: ConfigServer,
    pub metrics: Arc<Metrics>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Running {
    /// Ends every subscription (`UNAVAILABLE`, so data planes reconnect)
    /// and stops serving.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Loads the CA in `dir`, creating a root there on first start.
pub fn load_or_create_ca(
    dir: &Path,
    trust_domain: &TrustDomain,
) -> anyhow::Result<CertificateAuthority> {
    if !dir.join(CA_KEY_FILE).exists() {
        CertificateAuthority::write_root(dir, trust_domain)?;
        tracing::info!(dir = %dir.display(), "mesh root CA created");
    }
    Ok(CertificateAuthority::plugged(
        trust_domain.clone(),
        DEFAULT_LEAF_TTL,
        &PluggedCa::from_dir(dir)?,
    )?)
}

pub async fn start_local(opts: LocalOptions) -> anyhow::Result<Running> {
    let trust_domain: TrustDomain = opts.trust_domain.parse()?;
    let ca = Arc::new(load_or_create_ca(&opts.ca_dir, &trust_domain)?);
    let tokens_text = std::fs::read_to_string(&opts.tokens)
        .map_err(|e| anyhow::anyhow!("read {}: {e}", opts.tokens.display()))?;
    let tokens = BootstrapTokens::parse(&tokens_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.tokens.display()))?;
    let auth: Arc<dyn crate::auth::Authenticator> = Arc::new(tokens);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let metrics = Arc::new(Metrics::default());
    let (mesh_tx, mesh_rx) = watch::channel(Arc::new(model::Snapshot::empty()));
    let config = ConfigServer::new(auth.clone(), metrics.clone(), stop.clone());

    let routes = tonic::service::Routes::new(CertificateServiceServer::new(CaService::new(
        ca.clone(),
        auth,
        mesh_rx,
        metrics.clone(),
    )))
    .add_service(ConfigServiceServer::new(config.clone()));
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr()?;
    tasks.spawn(serve(
        listener,
        ServingCert::new(ca.clone()),
        routes,
        stop.clone(),
    ));

    let ops = TcpListener::bind(opts.ops)
        .await
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", opts.ops))?;
    let ops_addr = ops.local_addr()?;
    let (ops_config, ops_metrics) = (config.clone(), metrics.clone());
    tasks.spawn(admin_http::serve(
        ops,
        move |req| match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            // Ready once there is a config to serve.
            (&Method::GET, "/ready") => match ops_config.version() {
                0 => text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n".into()),
                v => text(StatusCode::OK, format!("serving config version {v}\n")),
            },
            (&Method::GET, "/metrics") => text(StatusCode::OK, ops_metrics.render()),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        },
        stop.clone(),
    ));

    let mut local = LocalMode::new(opts.manifests.clone(), opts.trust_domain.clone());
    let (pipeline_config, pipeline_metrics, pipeline_stop) =
        (config.clone(), metrics.clone(), stop.clone());
    let (poll, mesh_file) = (Duration::from_millis(opts.poll_ms), opts.mesh_file.clone());
    // Reading a directory blocks: the pipeline has its own thread.
    tasks.spawn_blocking(move || {
        let mut last_error = None;
        while !pipeline_stop.is_cancelled() {
            match local.sync() {
                Ok(Some(t)) => {
                    pipeline_metrics.translated(t.took);
                    pipeline_metrics.set_objects(t.objects);
                    if let Some(path) = &mesh_file
                        && let Err(error) = write_atomic(path, &t.config)
                    {
                        tracing::warn!(%error, "mesh file not written");
                    }
                    mesh_tx.send_replace(Arc::new(t.snapshot));
                    let version = pipeline_config.publish(t.config);
                    tracing::info!(version, took = ?t.took, "config published");
                    last_error = None;
                }
                Ok(None) => last_error = None,
                Err(e) if last_error.as_ref() != Some(&e) => {
                    tracing::error!(error = %e, "the last good config stays");
                    last_error = Some(e);
                }
                Err(_) => {}
            }
            std::thread::sleep(poll);
        }
    });
    tracing::info!(%addr, %ops_addr, "controller serving");
    Ok(Running {
        addr,
        ops_addr,
        roots: ca.roots().to_vec(),
        config,
        metrics,
        stop,
        tasks,
    })
}

fn write_atomic(path: &Path, config: &model::MeshConfig) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml::to_string(config)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
