//! The controller process, in a cluster (watchers on the API server) or in
//! local manifests mode: the pipeline, the CA and config services on one
//! TLS port, and the ops endpoint (`/healthz`, `/ready`, `/metrics`). Built here rather than in `main`
//! so that tests run the real thing in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use admin_http::{Method, StatusCode, text};
use identity::ca::{CA_KEY_FILE, DEFAULT_LEAF_TTL};
use identity::{CertificateAuthority, PluggedCa, TrustDomain};
use model::proto::ca::certificate_service_server::CertificateServiceServer;
use model::proto::config::config_service_server::ConfigServiceServer;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::auth::{Authenticator, BootstrapTokens};
use crate::ca::CaService;
use crate::cluster::ObjectStatus;
use crate::gateway::Gateway;
use crate::lease::LeaseLock;
use crate::local::LocalMode;
use crate::metrics::Metrics;
use crate::pipeline::{Flushed, Pipeline};
use crate::routes::{GrpcRoute, HttpRoute, ROUTE_CONTROLLER};
use crate::server::{ServingCert, serve};
use crate::stream::ConfigServer;
use crate::token_review::TokenReviewer;
use crate::translator::{Name, Object, ObjectKind};
use crate::watch::Touch;
use crate::waypoints::WaypointOptions;
use crate::{ca_secret, crd, watch, waypoints};

/// What both modes serve and where.
#[derive(Debug, Clone, clap::Args)]
pub struct Serve {
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The CA and config stream (TLS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// `/healthz`, `/ready`, `/metrics` (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub ops: SocketAddr,
}

/// What `controller run` is given.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalOptions {
    /// Directory of YAML manifests (the cluster's objects).
    #[arg(long)]
    pub manifests: PathBuf,
    #[command(flatten)]
    pub serving: Serve,
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

/// Answers `/ready`: what the controller is serving from, or why it is not
/// ready yet.
type Readiness = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

async fn serve_all(
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    listen: SocketAddr,
    ops: SocketAddr,
    ready: Readiness,
) -> anyhow::Result<Running> {
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let metrics = Arc::new(Metrics::default());
    let config = ConfigServer::new(auth.clone(), metrics.clone(), stop.clone());
    let routes = tonic::service::Routes::new(CertificateServiceServer::new(CaService::new(
        ca.clone(),
        auth,
        config.clone(),
        metrics.clone(),
    )))
    .add_service(ConfigServiceServer::new(config.clone()));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    tasks.spawn(serve(
        listener,
        ServingCert::new(ca.clone()),
        routes,
        stop.clone(),
    ));

    let ops_listener = TcpListener::bind(ops)
        .await
        .map_err(|e| anyhow::anyhow!("listen on {ops}: {e}"))?;
    let ops_addr = ops_listener.local_addr()?;
    let (ops_config, ops_metrics) = (config.clone(), metrics.clone());
    tasks.spawn(admin_http::serve(
        ops_listener,
        move |req| match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            // Ready once there is a config to serve.
            (&Method::GET, "/ready") => match (ready(), ops_config.version()) {
                (Err(why), _) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                (Ok(_), 0) => text(StatusCode::SERVICE_UNAVAILABLE, "no config yet\n".into()),
                (Ok(what), v) => text(
                    StatusCode::OK,
                    format!("serving config version {v}; {what}\n"),
                ),
            },
            (&Method::GET, "/metrics") => text(StatusCode::OK, ops_metrics.render()),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        },
        stop.clone(),
    ));
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

pub async fn start_local(opts: LocalOptions) -> anyhow::Result<Running> {
    let trust_domain: TrustDomain = opts.serving.trust_domain.parse()?;
    let ca = Arc::new(load_or_create_ca(&opts.ca_dir, &trust_domain)?);
    let tokens_text = std::fs::read_to_string(&opts.tokens)
        .map_err(|e| anyhow::anyhow!("read {}: {e}", opts.tokens.display()))?;
    let tokens = BootstrapTokens::parse(&tokens_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.tokens.display()))?;
    let running = serve_all(
        ca,
        Arc::new(tokens),
        opts.serving.listen,
        opts.serving.ops,
        Arc::new(|| Ok("local manifests".to_string())),
    )
    .await?;
    let mut pipeline = Pipeline::new(
        &opts.serving.trust_domain,
        running.config.clone(),
        running.metrics.clone(),
        opts.mesh_file.clone(),
    );
    let local = LocalMode::new(opts.manifests.clone(), opts.serving.trust_domain.clone());
    let (poll, stop) = (Duration::from_millis(opts.poll_ms), running.stop.clone());
    // Reading a directory blocks: the pipeline has its own thread.
    running.tasks.spawn_blocking(move || {
        let mut last_error = None;
        while !stop.is_cancelled() {
            match local.sync(&mut pipeline) {
                Ok(_) => last_error = None,
                Err(e) if last_error.as_ref() != Some(&e) => {
                    tracing::error!(error = %e, "the last good config stays");
                    last_error = Some(e);
                }
                Err(_) => {}
            }
            std::thread::sleep(poll);
        }
    });
    Ok(running)
}

/// What `controller serve` (in a cluster) is given.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeOptions {
    #[command(flatten)]
    pub serving: Serve,
    /// The controller's namespace (its CA Secret and Lease live there;
    /// ztunnel runs there too).
    #[arg(long, env = "POD_NAMESPACE", default_value = control_client::CONTROLLER_NAMESPACE)]
    pub namespace: String,
    /// This replica, for leader election.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: String,
    /// The Secret holding the mesh CA (created on first start).
    #[arg(long, default_value = "ambit-ca")]
    pub ca_secret: String,
    /// The Lease electing the replica that writes status.
    #[arg(long, default_value = "ambit-controller")]
    pub lease: String,
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// ztunnel's service account (its tokens stand for their node).
    #[arg(long, default_value = "ztunnel")]
    pub ztunnel_service_account: String,
    /// The audience data planes' tokens are issued for.
    #[arg(long, default_value = "ambit")]
    pub token_audience: String,
    /// Also write the config being served to this file, for inspection.
    #[arg(long)]
    pub mesh_file: Option<PathBuf>,
    #[command(flatten)]
    pub waypoints: WaypointOptions,
}

/// The controller in a cluster: watchers on the API server, TokenReview,
/// the CA in a Secret, and status written by the Lease holder.
pub async fn start_kubernetes(client: Client, opts: KubeOptions) -> anyhow::Result<Running> {
    let trust_domain: TrustDomain = opts.serving.trust_domain.parse()?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &opts.namespace);
    let ca = Arc::new(ca_secret::load_or_create(&secrets, &opts.ca_secret, &trust_domain).await?);
    let auth = Arc::new(TokenReviewer::new(
        client.clone(),
        vec![opts.token_audience.clone()],
        opts.namespace.clone(),
        opts.ztunnel_service_account.clone(),
    ));
    let synced = Arc::new(AtomicBool::new(false));
    let ready_synced = synced.clone();
    let running = serve_all(
        ca,
        auth,
        opts.serving.listen,
        opts.serving.ops,
        Arc::new(move || {
            if ready_synced.load(Ordering::Relaxed) {
                Ok("watching the API server".into())
            } else {
                Err("the first lists from the API server are not complete".into())
            }
        }),
    )
    .await?;
    let gateway_api = watch::GatewayApi::discover(&client).await?;
    for (installed, kind, what) in [
        (gateway_api.gateways, "Gateway", "no waypoints"),
        (gateway_api.http_routes, "HTTPRoute", "no HTTP routes"),
        (gateway_api.grpc_routes, "GRPCRoute", "no gRPC routes"),
    ] {
        if !installed {
            tracing::warn!(
                "the Gateway API kind {kind} is not installed (gateway.networking.k8s.io/v1): {what} until it is and the controller restarts"
            );
        }
    }
    let (touched, touches) = mpsc::unbounded_channel();
    let watched = watch::watch_all(
        gateway_api,
        &client,
        &touched,
        &running.tasks,
        &running.stop,
    );
    let roots_pem: String = running
        .roots
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect();
    // ztunnels (in this namespace) check the controller with it.
    waypoints::apply_root_cert(&client, &opts.namespace, &roots_pem).await?;
    let (leader_tx, leader) = tokio::sync::watch::channel(false);
    let lock = LeaseLock {
        api: Api::namespaced(client.clone(), &opts.namespace),
        name: opts.lease.clone(),
        holder: opts.pod_name.clone(),
        duration: Duration::from_secs(opts.lease_seconds),
    };
    running
        .tasks
        .spawn(lock.run(leader_tx, running.stop.clone()));
    let pipeline = KubePipeline {
        watched,
        touches,
        leader,
        pipeline: Some(Pipeline::new(
            &opts.serving.trust_domain,
            running.config.clone(),
            running.metrics.clone(),
            opts.mesh_file.clone(),
        )),
        status: StatusWriter {
            client: client.clone(),
        },
        deployer: Deployer {
            client,
            roots_pem,
            options: opts.waypoints.clone(),
        },
        synced,
    };
    running.tasks.spawn(pipeline.run(running.stop.clone()));
    Ok(running)
}

/// How long the pipeline waits for further changes before translating.
const DEBOUNCE: Duration = Duration::from_millis(20);

struct KubePipeline {
    watched: watch::Watched,
    touches: mpsc::UnboundedReceiver<Touch>,
    leader: tokio::sync::watch::Receiver<bool>,
    /// Taken by the translation while it runs on a blocking thread.
    pipeline: Option<Pipeline>,
    status: StatusWriter,
    deployer: Deployer,
    synced: Arc<AtomicBool>,
}

impl KubePipeline {
    /// Translates what every change touched (changes arriving together
    /// are taken together), publishes, and, on the leader, writes status
    /// and deploys waypoints: all of them on becoming leader, then what
    /// changed.
    async fn run(mut self, stop: CancellationToken) {
        tokio::select! {
            ready = self.watched.ready() => if ready.is_err() { return },
            () = stop.cancelled() => return,
        }
        self.synced.store(true, Ordering::Relaxed);
        // Everything, once: the stores as first listed.
        let mut touched: Vec<Touch> = ObjectKind::ALL.into_iter().map(Touch::Relisted).collect();
        let mut was_leader = false;
        loop {
            let Some(mut flushed) = self.translate(std::mem::take(&mut touched)).await else {
                return;
            };
            let leader = *self.leader.borrow_and_update();
            if leader
                && !was_leader
                && let Some(p) = &self.pipeline
            {
                flushed = Flushed {
                    statuses: p.translator.statuses().cloned().collect(),
                    waypoints: p
                        .translator
                        .waypoints()
                        .map(|g| (g.namespace().unwrap_or_default(), g.name_any()))
                        .collect(),
                };
            }
            if leader {
                self.deployer
                    .deploy(&self.watched, &flushed.waypoints)
                    .await;
                self.status.write(&self.watched, &flushed.statuses).await;
            }
            was_leader = leader;
            tokio::select! {
                touch = self.touches.recv() => match touch {
                    Some(touch) => touched.push(touch),
                    None => return,
                },
                _ = self.leader.changed() => {}
                () = stop.cancelled() => return,
            }
            // Take a burst of changes (a rollout) in one flush.
            tokio::time::sleep(DEBOUNCE).await;
            while let Ok(touch) = self.touches.try_recv() {
                touched.push(touch);
            }
        }
    }

    /// Gives what was touched to the translator, flushes, and returns the
    /// conditions translated again; `None` when the translation panicked.
    async fn translate(&mut self, touched: Vec<Touch>) -> Option<Flushed> {
        let mut pipeline = self.pipeline.take()?;
        let watched = self.watched.clone();
        let done = tokio::task::spawn_blocking(move || {
            let unique: std::collections::HashSet<Touch> = touched.into_iter().collect();
            for touch in unique {
                match touch {
                    Touch::Object(kind, name) => match watched.get(kind, &name) {
                        Some(object) => pipeline.translator.apply(object),
                        None => pipeline.translator.delete(kind, &name),
                    },
                    Touch::Relisted(kind) => {
                        pipeline.translator.replace_all(kind, watched.all(kind));
                    }
                }
            }
            let flushed = pipeline.flush();
            (pipeline, flushed)
        })
        .await;
        match done {
            Ok((pipeline, flushed)) => {
                self.pipeline = Some(pipeline);
                Some(flushed)
            }
            Err(error) => {
                tracing::error!(%error, "translation failed");
                None
            }
        }
    }
}

/// Applies waypoints' resources.
struct Deployer {
    client: Client,
    roots_pem: String,
    options: WaypointOptions,
}

impl Deployer {
    async fn deploy(&self, watched: &watch::Watched, waypoints: &[Name]) {
        for name in waypoints {
            let Some(crate::translator::Object::Gateway(gateway)) =
                watched.get(ObjectKind::Gateway, name)
            else {
                continue;
            };
            let object = format!("Gateway {}/{}", name.0, name.1);
            if let Some(problem) = gateway.listener_problem() {
                // Its status says why; nothing is deployed for it.
                tracing::warn!(%object, %problem, "waypoint not deployed");
                continue;
            }
            match waypoints::apply(&self.client, &gateway, &self.roots_pem, &self.options).await {
                Ok(()) => tracing::info!(%object, "waypoint resources applied"),
                Err(error) => tracing::warn!(%object, %error, "waypoint resources not applied"),
            }
        }
    }
}

/// Writes conditions to the `/status` subresource when they differ from
/// what the object carries.
struct StatusWriter {
    client: Client,
}

impl StatusWriter {
    async fn write(&self, watched: &watch::Watched, statuses: &[ObjectStatus]) {
        let now = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .map(|t| t.to_string())
            .unwrap_or_default();
        for s in statuses {
            let Some(kind) = ObjectKind::parse(s.kind) else {
                continue;
            };
            // Gone meanwhile: nothing to write to.
            let Some(object) = watched.get(kind, &(s.namespace.clone(), s.name.clone())) else {
                continue;
            };
            if s.is_route() {
                self.write_route(kind, s, &object, &now).await;
                continue;
            }
            let current = object.status();
            let want = with_transition_times(s.status(), &current, &now);
            if says_already(&current, &want) {
                continue;
            }
            let patch = Patch::Merge(serde_json::json!({ "status": want }));
            let (client, ns, name) = (&self.client, &s.namespace, &s.name);
            let result = match kind {
                ObjectKind::AuthorizationPolicy => {
                    patch_status::<crd::AuthorizationPolicy>(client, ns, name, &patch).await
                }
                ObjectKind::PeerAuthentication => {
                    patch_status::<crd::PeerAuthentication>(client, ns, name, &patch).await
                }
                ObjectKind::Gateway => patch_status::<Gateway>(client, ns, name, &patch).await,
                _ => continue,
            };
            match result {
                Ok(()) => tracing::info!(status = %s, "status written"),
                Err(error) => tracing::warn!(object = %s.object(), %error, "status not written"),
            }
        }
    }

    /// A route's `status.parents` is shared with other controllers and a
    /// merge patch replaces the whole list, so the patch is made against
    /// the version read: when another controller wrote meanwhile (409),
    /// the route is read again and the list rebuilt. A route that never
    /// had an entry of ours and gets none is not written at all.
    async fn write_route(&self, kind: ObjectKind, s: &ObjectStatus, object: &Object, now: &str) {
        let (client, ns, name) = (&self.client, &s.namespace, &s.name);
        let mut current = object.status();
        let mut version = object.resource_version();
        for attempt in 1..=3 {
            let ours_held = current["parents"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["controllerName"] == ROUTE_CONTROLLER);
            let want = route_status(s.status(), &current, now);
            if (s.parents.is_empty() && !ours_held) || says_already(&current, &want) {
                return;
            }
            let patch = Patch::Merge(serde_json::json!({
                "metadata": {"resourceVersion": version},
                "status": want,
            }));
            let result = match kind {
                ObjectKind::HttpRoute => patch_status::<HttpRoute>(client, ns, name, &patch).await,
                _ => patch_status::<GrpcRoute>(client, ns, name, &patch).await,
            };
            match result {
                Ok(()) => {
                    tracing::info!(status = %s, "status written");
                    return;
                }
                Err(kube::Error::Api(e)) if e.code == 409 && attempt < 3 => {
                    let fresh = match kind {
                        ObjectKind::HttpRoute => fresh_status::<HttpRoute>(client, ns, name).await,
                        _ => fresh_status::<GrpcRoute>(client, ns, name).await,
                    };
                    match fresh {
                        Ok((status, v)) => (current, version) = (status, v),
                        Err(error) => {
                            tracing::warn!(object = %s.object(), %error, "status not written");
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(object = %s.object(), %error, "status not written");
                    return;
                }
            }
        }
    }
}

/// An object's status (as JSON) and resource version, read now.
async fn fresh_status<K>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(Value, Option<String>), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + serde::Serialize,
    K::DynamicType: Default,
{
    // The object itself (its status comes with it): `get` is what the
    // controller may do on routes.
    let object = Api::<K>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    let json = serde_json::to_value(&object).unwrap_or_default();
    Ok((json["status"].clone(), object.resource_version()))
}

async fn patch_status<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    patch: &Patch<Value>,
) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .patch_status(name, &PatchParams::default(), patch)
        .await
        .map(drop)
}

/// A condition keeps its `lastTransitionTime` while its status stays the
/// same; a new or changed one gets `now`.
fn with_transition_times(mut want: Value, current: &Value, now: &str) -> Value {
    let held = current["conditions"].as_array();
    if let Some(conditions) = want["conditions"].as_array_mut() {
        for c in conditions {
            let since = held
                .into_iter()
                .flatten()
                .find(|h| h["type"] == c["type"] && h["status"] == c["status"])
                .and_then(|h| h.get("lastTransitionTime"))
                .cloned()
                .unwrap_or_else(|| Value::String(now.to_string()));
            c["lastTransitionTime"] = since;
        }
    }
    want
}

/// A route's `status.parents`: the other controllers' entries as they
/// are, then this controller's, each parent's conditions keeping their
/// transition times.
fn route_status(mut want: Value, current: &Value, now: &str) -> Value {
    let held = current["parents"].as_array();
    let ours = |p: &Value| p["controllerName"] == ROUTE_CONTROLLER;
    let mut parents: Vec<Value> = held
        .into_iter()
        .flatten()
        .filter(|p| !ours(p))
        .cloned()
        .collect();
    if let Some(mine) = want["parents"].as_array_mut() {
        for p in mine.iter_mut() {
            let before = held
                .into_iter()
                .flatten()
                .find(|h| ours(h) && h["parentRef"] == p["parentRef"])
                .cloned()
                .unwrap_or_default();
            *p = with_transition_times(p.take(), &before, now);
        }
        parents.append(mine);
    }
    serde_json::json!({ "parents": parents })
}

/// Whether the object's status already says everything `want` says.
fn says_already(current: &Value, want: &Value) -> bool {
    want.as_object()
        .is_some_and(|w| w.iter().all(|(k, v)| current.get(k) == Some(v)))
}
