//! The cluster's objects from the API server: one watcher and reflector
//! store per kind, and for every change the name of what changed (or, after
//! a re-list, the kind), from which the pipeline reads the stores.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    Namespace, Node, Pod, PodSpec, PodStatus, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::crd::{AuthorizationPolicy, PeerAuthentication};
use crate::gateway::{GATEWAY_NAME_LABEL, Gateway};
use crate::routes::{GrpcRoute, HttpRoute};
use crate::translator::{Name, Object, ObjectKind};

/// What changed in the stores.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Touch {
    /// This object was created, changed or deleted.
    Object(ObjectKind, Name),
    /// The kind was listed again (after a watch expired): objects deleted
    /// meanwhile were never announced, so the whole kind is compared.
    Relisted(ObjectKind),
}

/// One reflector store per watched kind.
#[derive(Debug, Clone)]
pub struct Watched {
    pub namespaces: Store<Namespace>,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub authorization_policies: Store<AuthorizationPolicy>,
    pub peer_authentications: Store<PeerAuthentication>,
    pub service_accounts: Store<ServiceAccount>,
    /// `None` when the Gateway API is not installed: no waypoints then.
    pub gateways: Option<Store<Gateway>>,
    /// Waypoints' Deployments.
    pub deployments: Store<Deployment>,
    /// `None` when their kind is not installed.
    pub http_routes: Option<Store<HttpRoute>>,
    pub grpc_routes: Option<Store<GrpcRoute>>,
}

/// Which Gateway API kinds the cluster has (a cluster may have Gateways
/// without GRPCRoutes, from before Gateway API 1.1).
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayApi {
    pub gateways: bool,
    pub http_routes: bool,
    pub grpc_routes: bool,
}

impl GatewayApi {
    /// Lists each kind once: a 404 means it is not installed.
    pub async fn discover(client: &Client) -> Result<Self, kube::Error> {
        Ok(Self {
            gateways: installed::<Gateway>(client).await?,
            http_routes: installed::<HttpRoute>(client).await?,
            grpc_routes: installed::<GrpcRoute>(client).await?,
        })
    }
}

/// Watches every kind the controller translates; every change is sent to
/// `touched`. Gateway API kinds are watched when installed.
pub fn watch_all(
    gateway_api: GatewayApi,
    client: &Client,
    touched: &mpsc::UnboundedSender<Touch>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Watched {
    use ObjectKind as K;
    let w = Watcher {
        touched,
        tasks,
        stop,
    };
    Watched {
        namespaces: w.reflect(K::Namespace, Api::all(client.clone()), trim_meta),
        nodes: w.reflect(K::Node, Api::all(client.clone()), trim_node),
        pods: w.reflect(K::Pod, Api::all(client.clone()), trim_pod),
        services: w.reflect(K::Service, Api::all(client.clone()), trim_meta),
        endpoint_slices: w.reflect(K::EndpointSlice, Api::all(client.clone()), trim_meta),
        authorization_policies: w.reflect(
            K::AuthorizationPolicy,
            Api::all(client.clone()),
            trim_meta,
        ),
        peer_authentications: w.reflect(K::PeerAuthentication, Api::all(client.clone()), trim_meta),
        service_accounts: w.reflect(K::ServiceAccount, Api::all(client.clone()), trim_meta),
        gateways: gateway_api
            .gateways
            .then(|| w.reflect(K::Gateway, Api::all(client.clone()), trim_meta)),
        http_routes: gateway_api
            .http_routes
            .then(|| w.reflect(K::HttpRoute, Api::all(client.clone()), trim_meta)),
        grpc_routes: gateway_api
            .grpc_routes
            .then(|| w.reflect(K::GrpcRoute, Api::all(client.clone()), trim_meta)),
        deployments: w.reflect_selected(
            K::Deployment,
            Api::all(client.clone()),
            watcher::Config::default().labels(GATEWAY_NAME_LABEL),
            trim_deployment,
        ),
    }
}

/// Whether the kind `K` is installed (can be listed).
async fn installed<K>(client: &Client) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    match api
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

struct Watcher<'a> {
    touched: &'a mpsc::UnboundedSender<Touch>,
    tasks: &'a TaskTracker,
    stop: &'a CancellationToken,
}

impl Watcher<'_> {
    fn reflect<K>(&self, object_kind: ObjectKind, api: Api<K>, trim: fn(&mut K)) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + Hash + Clone,
    {
        self.reflect_selected(object_kind, api, watcher::Config::default(), trim)
    }

    fn reflect_selected<K>(
        &self,
        object_kind: ObjectKind,
        api: Api<K>,
        config: watcher::Config,
        trim: fn(&mut K),
    ) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + Hash + Clone,
    {
        let kind = K::kind(&K::DynamicType::default()).into_owned();
        let (reader, writer) = reflector::store();
        let stream =
            reflector::reflector(writer, watcher(api, config).modify(trim)).default_backoff();
        let (touched, stop) = (self.touched.clone(), self.stop.clone());
        let name = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        self.tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    () = stop.cancelled() => return,
                };
                let touch = match event {
                    Some(Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o))) => {
                        Touch::Object(object_kind, name(&o))
                    }
                    Some(Ok(watcher::Event::InitDone)) => Touch::Relisted(object_kind),
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                    // The backoff retries; the stores keep their contents.
                    Some(Err(error)) => {
                        tracing::warn!(%kind, %error, "watch failed; retrying");
                        continue;
                    }
                    None => return,
                };
                if touched.send(touch).is_err() {
                    return;
                }
            }
        });
        reader
    }
}

/// What the translation never reads is not kept: in a real cluster
/// managed fields, annotations and pods' container specs and statuses are
/// most of an object's size.
fn trim_meta<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.annotations_mut().clear();
}

fn trim_node(node: &mut Node) {
    trim_meta(node);
    // Only labels (locality) are read.
    node.spec = None;
    node.status = None;
}

fn trim_deployment(deployment: &mut Deployment) {
    trim_meta(deployment);
    // Only availability is read (the Gateway's `Programmed`).
    deployment.spec = Default::default();
    deployment.status = Some(DeploymentStatus {
        available_replicas: deployment
            .status
            .as_ref()
            .and_then(|s| s.available_replicas),
        ..DeploymentStatus::default()
    });
}

fn trim_pod(pod: &mut Pod) {
    trim_meta(pod);
    if let Some(spec) = &pod.spec {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name.clone(),
            service_account_name: spec.service_account_name.clone(),
            host_network: spec.host_network,
            ..PodSpec::default()
        });
    }
    if let Some(status) = &pod.status {
        pod.status = Some(PodStatus {
            phase: status.phase.clone(),
            pod_ip: status.pod_ip.clone(),
            pod_ips: status.pod_ips.clone(),
            ..PodStatus::default()
        });
    }
}

impl Watched {
    /// Waits until every kind has been listed once.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.namespaces.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.endpoint_slices.wait_until_ready().await?;
        self.authorization_policies.wait_until_ready().await?;
        self.peer_authentications.wait_until_ready().await?;
        self.service_accounts.wait_until_ready().await?;
        if let Some(gateways) = &self.gateways {
            gateways.wait_until_ready().await?;
        }
        self.deployments.wait_until_ready().await
    }

    /// The object `name` of `kind`, `None` when there is none.
    pub fn get(&self, kind: ObjectKind, (namespace, name): &Name) -> Option<Object> {
        fn one<K: Clone + Resource + 'static>(
            store: &Store<K>,
            ns: &str,
            name: &str,
        ) -> Option<Arc<K>>
        where
            K::DynamicType: Default + Eq + Hash + Clone,
        {
            let key = reflector::ObjectRef::new(name);
            store.get(&if ns.is_empty() { key } else { key.within(ns) })
        }
        Some(match kind {
            ObjectKind::Namespace => Object::Namespace(one(&self.namespaces, namespace, name)?),
            ObjectKind::Node => Object::Node(one(&self.nodes, namespace, name)?),
            ObjectKind::Pod => Object::Pod(one(&self.pods, namespace, name)?),
            ObjectKind::Service => Object::Service(one(&self.services, namespace, name)?),
            ObjectKind::EndpointSlice => {
                Object::EndpointSlice(one(&self.endpoint_slices, namespace, name)?)
            }
            ObjectKind::AuthorizationPolicy => {
                Object::AuthorizationPolicy(one(&self.authorization_policies, namespace, name)?)
            }
            ObjectKind::PeerAuthentication => {
                Object::PeerAuthentication(one(&self.peer_authentications, namespace, name)?)
            }
            ObjectKind::ServiceAccount => {
                Object::ServiceAccount(one(&self.service_accounts, namespace, name)?)
            }
            ObjectKind::Gateway => Object::Gateway(one(self.gateways.as_ref()?, namespace, name)?),
            ObjectKind::Deployment => Object::Deployment(one(&self.deployments, namespace, name)?),
            ObjectKind::HttpRoute => {
                Object::HttpRoute(one(self.http_routes.as_ref()?, namespace, name)?)
            }
            ObjectKind::GrpcRoute => {
                Object::GrpcRoute(one(self.grpc_routes.as_ref()?, namespace, name)?)
            }
        })
    }

    /// Every object of `kind` (shared with the store).
    pub fn all(&self, kind: ObjectKind) -> Vec<Object> {
        fn every<K: Clone + Resource + 'static>(
            store: &Store<K>,
            f: fn(Arc<K>) -> Object,
        ) -> Vec<Object>
        where
            K::DynamicType: Eq + Hash + Clone,
        {
            store.state().into_iter().map(f).collect()
        }
        match kind {
            ObjectKind::Namespace => every(&self.namespaces, Object::Namespace),
            ObjectKind::Node => every(&self.nodes, Object::Node),
            ObjectKind::Pod => every(&self.pods, Object::Pod),
            ObjectKind::Service => every(&self.services, Object::Service),
            ObjectKind::EndpointSlice => every(&self.endpoint_slices, Object::EndpointSlice),
            ObjectKind::AuthorizationPolicy => {
                every(&self.authorization_policies, Object::AuthorizationPolicy)
            }
            ObjectKind::PeerAuthentication => {
                every(&self.peer_authentications, Object::PeerAuthentication)
            }
            ObjectKind::ServiceAccount => every(&self.service_accounts, Object::ServiceAccount),
            ObjectKind::Gateway => self
                .gateways
                .as_ref()
                .map(|g| every(g, Object::Gateway))
                .unwrap_or_default(),
            ObjectKind::Deployment => every(&self.deployments, Object::Deployment),
            ObjectKind::HttpRoute => self
                .http_routes
                .as_ref()
                .map(|s| every(s, Object::HttpRoute))
                .unwrap_or_default(),
            ObjectKind::GrpcRoute => self
                .grpc_routes
                .as_ref()
                .map(|s| every(s, Object::GrpcRoute))
                .unwrap_or_default(),
        }
    }
}
