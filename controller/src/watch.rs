//! The cluster's objects from the API server: one watcher and reflector
//! store per kind, and a notification on every change, from which the
//! pipeline takes a consistent copy of all stores.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::crd::{AuthorizationPolicy, PeerAuthentication};

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
}

/// Watches every kind the controller translates; `changed` is notified on
/// every change once a kind's first list is complete.
pub fn watch_all(
    client: &Client,
    changed: &Arc<Notify>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Watched {
    let w = Watcher {
        changed,
        tasks,
        stop,
    };
    Watched {
        namespaces: w.reflect(Api::all(client.clone()), trim_meta),
        nodes: w.reflect(Api::all(client.clone()), trim_node),
        pods: w.reflect(Api::all(client.clone()), trim_pod),
        services: w.reflect(Api::all(client.clone()), trim_meta),
        endpoint_slices: w.reflect(Api::all(client.clone()), trim_meta),
        authorization_policies: w.reflect(Api::all(client.clone()), trim_meta),
        peer_authentications: w.reflect(Api::all(client.clone()), trim_meta),
    }
}

struct Watcher<'a> {
    changed: &'a Arc<Notify>,
    tasks: &'a TaskTracker,
    stop: &'a CancellationToken,
}

impl Watcher<'_> {
    fn reflect<K>(&self, api: Api<K>, trim: fn(&mut K)) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + Hash + Clone,
    {
        let kind = K::kind(&K::DynamicType::default()).into_owned();
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).modify(trim),
        )
        .default_backoff();
        let (changed, stop) = (self.changed.clone(), self.stop.clone());
        self.tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    () = stop.cancelled() => return,
                };
                match event {
                    Some(Ok(
                        watcher::Event::Apply(_)
                        | watcher::Event::Delete(_)
                        | watcher::Event::InitDone,
                    )) => changed.notify_one(),
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                    // The backoff retries; the stores keep their contents.
                    Some(Err(error)) => tracing::warn!(%kind, %error, "watch failed; retrying"),
                    None => return,
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
        self.peer_authentications.wait_until_ready().await
    }

    /// A copy of everything, for one translation.
    pub fn cluster(&self, trust_domain: &str) -> Cluster {
        fn all<K: Clone + Resource + 'static>(store: &Store<K>) -> Vec<Arc<K>>
        where
            K::DynamicType: Eq + Hash + Clone,
        {
            store.state()
        }
        Cluster {
            trust_domain: trust_domain.to_string(),
            namespaces: all(&self.namespaces),
            nodes: all(&self.nodes),
            pods: all(&self.pods),
            services: all(&self.services),
            endpoint_slices: all(&self.endpoint_slices),
            authorization_policies: all(&self.authorization_policies),
            peer_authentications: all(&self.peer_authentications),
        }
    }
}
