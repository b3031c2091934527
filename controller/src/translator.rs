//! The translation, incremental. The cluster's objects are kept by name
//! with indexes of what depends on what, and a change recomputes only what
//! depends on it: a pod its workload (and the Services whose endpoints name
//! it, when it appears or disappears), a namespace its pods and Services,
//! a service account or a node its pods, a waypoint (its Gateway, its
//! Service) the pods and Services it serves and its own status, a Service
//! the routes that name it.
//! [`Translator::flush`] returns the changes to the mesh config since the
//! last flush.
//!
//! The output is valid by construction, so no pass over the whole config is
//! needed to check it: what the data planes would refuse is settled here,
//! the same way whatever the order of events. An address belongs to its
//! first claimant (workloads before Services, then by uid or name); a
//! claimant that does not own all its addresses is left out until it does.
//! Endpoints name only workloads in the config; waypoints only Services in
//! it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use identity::{Identity, TrustDomain};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use model::proto::config::Kind;
use model::resources::{Item, Key};
use model::{
    InboundProtocol, Locality, MeshConfig, Service, ServicePort, TrafficDistribution, WaypointRef,
    Workload,
};

use crate::cluster::{
    Cluster, DATAPLANE_MODE, ObjectStatus, REGION_LABEL, SERVICE_NAME_LABEL, USE_WAYPOINT,
    ZONE_LABEL, cluster_ips, ipv4s, label, owner_name,
};
use crate::crd::{AuthorizationPolicy, Condition, PeerAuthentication};
use crate::gateway::{GATEWAY_NAME_LABEL, Gateway};
use crate::routes::{self, GrpcRoute, HttpRoute};
use crate::translate;

/// An object's namespace (empty for cluster-scoped kinds) and name.
pub type Name = (String, String);

/// The kinds the translation reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
    PeerAuthentication,
    ServiceAccount,
    Gateway,
    /// Waypoints' Deployments only (their availability is the Gateway's
    /// `Programmed`).
    Deployment,
    HttpRoute,
    GrpcRoute,
}

impl ObjectKind {
    pub const ALL: [Self; 12] = [
        Self::Namespace,
        Self::Node,
        Self::Pod,
        Self::Service,
        Self::EndpointSlice,
        Self::AuthorizationPolicy,
        Self::PeerAuthentication,
        Self::ServiceAccount,
        Self::Gateway,
        Self::Deployment,
        Self::HttpRoute,
        Self::GrpcRoute,
    ];

    pub fn parse(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Node => "Node",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::ServiceAccount => "ServiceAccount",
            Self::Gateway => "Gateway",
            Self::Deployment => "Deployment",
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
        }
    }
}

/// One object of a kind the translation reads, shared with the store it
/// came from.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Node(Arc<Node>),
    Pod(Arc<Pod>),
    Service(Arc<KubeService>),
    EndpointSlice(Arc<EndpointSlice>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    PeerAuthentication(Arc<PeerAuthentication>),
    ServiceAccount(Arc<ServiceAccount>),
    Gateway(Arc<Gateway>),
    Deployment(Arc<Deployment>),
    HttpRoute(Arc<HttpRoute>),
    GrpcRoute(Arc<GrpcRoute>),
}

impl Object {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Self::Namespace(_) => ObjectKind::Namespace,
            Self::Node(_) => ObjectKind::Node,
            Self::Pod(_) => ObjectKind::Pod,
            Self::Service(_) => ObjectKind::Service,
            Self::EndpointSlice(_) => ObjectKind::EndpointSlice,
            Self::AuthorizationPolicy(_) => ObjectKind::AuthorizationPolicy,
            Self::PeerAuthentication(_) => ObjectKind::PeerAuthentication,
            Self::ServiceAccount(_) => ObjectKind::ServiceAccount,
            Self::Gateway(_) => ObjectKind::Gateway,
            Self::Deployment(_) => ObjectKind::Deployment,
            Self::HttpRoute(_) => ObjectKind::HttpRoute,
            Self::GrpcRoute(_) => ObjectKind::GrpcRoute,
        }
    }

    pub fn name(&self) -> Name {
        let meta = self.meta();
        let name = meta.name.as_ref().or(meta.generate_name.as_ref());
        (
            meta.namespace.clone().unwrap_or_default(),
            name.cloned().unwrap_or_default(),
        )
    }

    /// The resource version it was read at.
    pub fn resource_version(&self) -> Option<String> {
        self.meta().resource_version.clone()
    }

    fn meta(&self) -> &ObjectMeta {
        fn of(o: &impl ResourceExt) -> &ObjectMeta {
            o.meta()
        }
        match self {
            Self::Namespace(o) => of(&**o),
            Self::Node(o) => of(&**o),
            Self::Pod(o) => of(&**o),
            Self::Service(o) => of(&**o),
            Self::EndpointSlice(o) => of(&**o),
            Self::AuthorizationPolicy(o) => of(&**o),
            Self::PeerAuthentication(o) => of(&**o),
            Self::ServiceAccount(o) => of(&**o),
            Self::Gateway(o) => of(&**o),
            Self::Deployment(o) => of(&**o),
            Self::HttpRoute(o) => of(&**o),
            Self::GrpcRoute(o) => of(&**o),
        }
    }

    /// The object's `status`, as JSON (`null` when it has none).
    pub fn status(&self) -> serde_json::Value {
        let json = match self {
            Self::AuthorizationPolicy(o) => serde_json::to_value(&o.status),
            Self::PeerAuthentication(o) => serde_json::to_value(&o.status),
            Self::Gateway(o) => serde_json::to_value(&o.status),
            Self::HttpRoute(o) => serde_json::to_value(&o.status),
            Self::GrpcRoute(o) => serde_json::to_value(&o.status),
            _ => Ok(serde_json::Value::Null),
        };
        json.unwrap_or_default()
    }
}

/// Every object of `cluster`, by kind.
fn objects(cluster: &Cluster, kind: ObjectKind) -> Vec<Object> {
    fn wrap<K>(list: &[Arc<K>], f: fn(Arc<K>) -> Object) -> Vec<Object> {
        list.iter().cloned().map(f).collect()
    }
    match kind {
        ObjectKind::Namespace => wrap(&cluster.namespaces, Object::Namespace),
        ObjectKind::Node => wrap(&cluster.nodes, Object::Node),
        ObjectKind::Pod => wrap(&cluster.pods, Object::Pod),
        ObjectKind::Service => wrap(&cluster.services, Object::Service),
        ObjectKind::EndpointSlice => wrap(&cluster.endpoint_slices, Object::EndpointSlice),
        ObjectKind::AuthorizationPolicy => {
            wrap(&cluster.authorization_policies, Object::AuthorizationPolicy)
        }
        ObjectKind::PeerAuthentication => {
            wrap(&cluster.peer_authentications, Object::PeerAuthentication)
        }
        ObjectKind::ServiceAccount => wrap(&cluster.service_accounts, Object::ServiceAccount),
        ObjectKind::Gateway => wrap(&cluster.gateways, Object::Gateway),
        ObjectKind::Deployment => wrap(&cluster.deployments, Object::Deployment),
        ObjectKind::HttpRoute => wrap(&cluster.http_routes, Object::HttpRoute),
        ObjectKind::GrpcRoute => wrap(&cluster.grpc_routes, Object::GrpcRoute),
    }
}

/// The changes since the last flush.
#[derive(Debug, Default)]
pub struct Delta {
    /// Upserts (`Some`) and removals (`None`) of mesh config resources.
    pub changes: Vec<(Key, Option<Item>)>,
    /// The conditions of the policies, Gateways and routes translated
    /// again.
    pub statuses: Vec<ObjectStatus>,
    /// How many pods, Services, policies, Gateways and routes were
    /// translated again.
    pub translated: usize,
    /// Waypoints whose Gateway changed, or whose Deployment or Service went
    /// away: their resources are to be applied.
    pub waypoints: Vec<Name>,
    pub took: Duration,
}

/// Who claims an address. The derived order decides conflicts: workloads
/// before Services, then by uid or name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Claimant {
    Workload { uid: String, pod: Name },
    Service(Name),
}

/// What a waypoint's address is needed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Dependent {
    Pod(Name),
    Service(Name),
}

/// A pod's translation.
#[derive(Debug, Default)]
struct PodOut {
    /// The workload, when the pod is one (it may still not own its IPs).
    workload: Option<Workload>,
    node: String,
    service_account: Option<Name>,
    waypoint: Option<Name>,
    /// The uid under which it is in the config.
    published: Option<String>,
}

/// A Service's translation.
#[derive(Debug, Default)]
struct ServiceOut {
    service: Option<Service>,
    waypoint: Option<Name>,
    /// The uids its EndpointSlices name, in the config or not.
    uids: Vec<String>,
    published: bool,
    /// Its address as a waypoint, while it is in the config.
    address: Option<Ipv4Addr>,
}

/// A policy's translation.
#[derive(Debug)]
struct PolicyOut {
    item: Option<Item>,
    status: ObjectStatus,
}

/// A route's translation.
#[derive(Debug)]
struct RouteOut {
    item: Option<Item>,
    status: ObjectStatus,
    /// The Services (and waypoint Gateways) it read.
    reads: Vec<Name>,
}

/// The incremental translator.
#[derive(Debug)]
pub struct Translator {
    trust_domain: String,
    parsed_trust_domain: Option<TrustDomain>,

    namespaces: HashMap<String, Arc<Namespace>>,
    nodes: HashMap<String, Arc<Node>>,
    pods: HashMap<Name, Arc<Pod>>,
    services: HashMap<Name, Arc<KubeService>>,
    slices: HashMap<Name, Arc<EndpointSlice>>,
    authorization_policies: HashMap<Name, Arc<AuthorizationPolicy>>,
    peer_authentications: HashMap<Name, Arc<PeerAuthentication>>,
    service_accounts: HashMap<Name, Arc<ServiceAccount>>,
    /// Waypoints only.
    gateways: HashMap<Name, Arc<Gateway>>,
    deployments: HashMap<Name, Arc<Deployment>>,
    http_routes: HashMap<Name, Arc<HttpRoute>>,
    grpc_routes: HashMap<Name, Arc<GrpcRoute>>,

    /// What depends on what.
    pods_in_namespace: HashMap<String, HashSet<Name>>,
    services_in_namespace: HashMap<String, HashSet<Name>>,
    pods_of_service_account: HashMap<Name, HashSet<Name>>,
    pods_on_node: HashMap<String, HashSet<Name>>,
    slices_of_service: HashMap<Name, BTreeSet<Name>>,
    services_naming_uid: HashMap<String, HashSet<Name>>,
    waypoint_users: HashMap<Name, HashSet<Dependent>>,
    /// Service or Gateway → the routes that read it.
    routes_reading: HashMap<Name, HashSet<(ObjectKind, Name)>>,
    claims: HashMap<Ipv4Addr, BTreeSet<Claimant>>,
    published_uids: HashSet<String>,

    pod_out: HashMap<Name, PodOut>,
    service_out: HashMap<Name, ServiceOut>,
    policy_out: BTreeMap<(ObjectKind, Name), PolicyOut>,
    gateway_out: BTreeMap<Name, ObjectStatus>,
    route_out: BTreeMap<(ObjectKind, Name), RouteOut>,

    dirty_pods: HashSet<Name>,
    dirty_services: HashSet<Name>,
    dirty_policies: BTreeSet<(ObjectKind, Name)>,
    dirty_gateways: BTreeSet<Name>,
    dirty_routes: BTreeSet<(ObjectKind, Name)>,
    reconcile: BTreeSet<Name>,
    changes: HashMap<Key, Option<Item>>,
}

impl Translator {
    pub fn new(trust_domain: &str) -> Self {
        let parsed_trust_domain = match trust_domain.parse() {
            Ok(td) => Some(td),
            Err(error) => {
                tracing::error!(%error, trust_domain, "invalid trust domain: no workload can have an identity");
                None
            }
        };
        Self {
            trust_domain: trust_domain.to_string(),
            parsed_trust_domain,
            namespaces: HashMap::new(),
            nodes: HashMap::new(),
            pods: HashMap::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            authorization_policies: HashMap::new(),
            peer_authentications: HashMap::new(),
            service_accounts: HashMap::new(),
            gateways: HashMap::new(),
            deployments: HashMap::new(),
            http_routes: HashMap::new(),
            grpc_routes: HashMap::new(),
            pods_in_namespace: HashMap::new(),
            services_in_namespace: HashMap::new(),
            pods_of_service_account: HashMap::new(),
            pods_on_node: HashMap::new(),
            slices_of_service: HashMap::new(),
            services_naming_uid: HashMap::new(),
            waypoint_users: HashMap::new(),
            routes_reading: HashMap::new(),
            claims: HashMap::new(),
            published_uids: HashSet::new(),
            pod_out: HashMap::new(),
            service_out: HashMap::new(),
            policy_out: BTreeMap::new(),
            gateway_out: BTreeMap::new(),
            route_out: BTreeMap::new(),
            dirty_pods: HashSet::new(),
            dirty_services: HashSet::new(),
            dirty_policies: BTreeSet::new(),
            dirty_gateways: BTreeSet::new(),
            dirty_routes: BTreeSet::new(),
            reconcile: BTreeSet::new(),
            changes: HashMap::new(),
        }
    }

    /// How many objects of each kind, for metrics.
    pub fn object_counts(&self) -> [(&'static str, u64); 12] {
        ObjectKind::ALL.map(|kind| (kind.as_str(), self.len(kind) as u64))
    }

    fn len(&self, kind: ObjectKind) -> usize {
        match kind {
            ObjectKind::Namespace => self.namespaces.len(),
            ObjectKind::Node => self.nodes.len(),
            ObjectKind::Pod => self.pods.len(),
            ObjectKind::Service => self.services.len(),
            ObjectKind::EndpointSlice => self.slices.len(),
            ObjectKind::AuthorizationPolicy => self.authorization_policies.len(),
            ObjectKind::PeerAuthentication => self.peer_authentications.len(),
            ObjectKind::ServiceAccount => self.service_accounts.len(),
            ObjectKind::Gateway => self.gateways.len(),
            ObjectKind::Deployment => self.deployments.len(),
            ObjectKind::HttpRoute => self.http_routes.len(),
            ObjectKind::GrpcRoute => self.grpc_routes.len(),
        }
    }

    /// The names of the objects of `kind` held.
    fn names(&self, kind: ObjectKind) -> Vec<Name> {
        fn cluster_scoped<K>(m: &HashMap<String, K>) -> Vec<Name> {
            m.keys().map(|n| (String::new(), n.clone())).collect()
        }
        fn namespaced<K>(m: &HashMap<Name, K>) -> Vec<Name> {
            m.keys().cloned().collect()
        }
        match kind {
            ObjectKind::Namespace => cluster_scoped(&self.namespaces),
            ObjectKind::Node => cluster_scoped(&self.nodes),
            ObjectKind::Pod => namespaced(&self.pods),
            ObjectKind::Service => namespaced(&self.services),
            ObjectKind::EndpointSlice => namespaced(&self.slices),
            ObjectKind::AuthorizationPolicy => namespaced(&self.authorization_policies),
            ObjectKind::PeerAuthentication => namespaced(&self.peer_authentications),
            ObjectKind::ServiceAccount => namespaced(&self.service_accounts),
            ObjectKind::Gateway => namespaced(&self.gateways),
            ObjectKind::Deployment => namespaced(&self.deployments),
            ObjectKind::HttpRoute => namespaced(&self.http_routes),
            ObjectKind::GrpcRoute => namespaced(&self.grpc_routes),
        }
    }

    /// Makes `objects` all there is of `kind`: what is missing is deleted,
    /// what differs applied (after a re-list, or a re-read manifests
    /// directory).
    pub fn replace_all(&mut self, kind: ObjectKind, objects: Vec<Object>) {
        let present: HashSet<Name> = objects.iter().map(Object::name).collect();
        for name in self.names(kind) {
            if !present.contains(&name) {
                self.delete(kind, &name);
            }
        }
        for object in objects {
            self.apply(object);
        }
    }

    /// Makes the whole of `cluster` what the translator holds.
    pub fn sync(&mut self, cluster: &Cluster) {
        for kind in ObjectKind::ALL {
            self.replace_all(kind, objects(cluster, kind));
        }
    }

    /// An object was created or changed. A change of nothing the
    /// translation reads (a resource version, a status) costs a
    /// comparison.
    pub fn apply(&mut self, object: Object) {
        let name = object.name();
        match object {
            Object::Namespace(ns) => {
                let key = name.1;
                let old = self.namespaces.insert(key.clone(), ns.clone());
                if old.is_none_or(|o| o.labels() != ns.labels()) {
                    self.namespace_changed(&key);
                }
            }
            Object::Node(node) => {
                let key = name.1;
                let old = self.nodes.insert(key.clone(), node.clone());
                if old.is_none_or(|o| o.labels() != node.labels()) {
                    self.node_changed(&key);
                }
            }
            Object::Pod(pod) => {
                let old = self.pods.insert(name.clone(), pod.clone());
                if old.is_none_or(|o| !same_pod(&o, &pod)) {
                    self.pods_in_namespace
                        .entry(name.0.clone())
                        .or_default()
                        .insert(name.clone());
                    self.dirty_pods.insert(name);
                }
            }
            Object::Service(svc) => {
                let old = self.services.insert(name.clone(), svc.clone());
                if old.is_none_or(|o| o.labels() != svc.labels() || o.spec != svc.spec) {
                    self.services_in_namespace
                        .entry(name.0.clone())
                        .or_default()
                        .insert(name.clone());
                    self.dirty_services.insert(name);
                }
            }
            Object::EndpointSlice(slice) => {
                let old = self.slices.insert(name.clone(), slice.clone());
                let same = old.as_ref().is_some_and(|o| {
                    o.labels() == slice.labels()
                        && o.endpoints == slice.endpoints
                        && o.ports == slice.ports
                });
                if !same {
                    if let Some(old) = old {
                        self.unlink_slice(&name, &old);
                    }
                    if let Some(service) = slice_service(&name, &slice) {
                        self.slices_of_service
                            .entry(service.clone())
                            .or_default()
                            .insert(name);
                        self.dirty_services.insert(service);
                    }
                }
            }
            Object::AuthorizationPolicy(ap) => {
                let old = self.authorization_policies.insert(name.clone(), ap.clone());
                if old.is_none_or(|o| {
                    o.metadata.generation != ap.metadata.generation || o.spec != ap.spec
                }) {
                    self.dirty_policies
                        .insert((ObjectKind::AuthorizationPolicy, name));
                }
            }
            Object::ServiceAccount(sa) => {
                let old = self.service_accounts.insert(name.clone(), sa.clone());
                if old.is_none_or(|o| o.labels() != sa.labels()) {
                    self.service_account_changed(&name);
                }
            }
            Object::Gateway(gw) if !gw.is_waypoint() => {
                // Another controller's Gateway (or one that stopped being
                // a waypoint).
                self.delete(ObjectKind::Gateway, &name);
            }
            Object::Gateway(gw) => {
                let old = self.gateways.insert(name.clone(), gw.clone());
                if old.is_none_or(|o| {
                    o.metadata.generation != gw.metadata.generation
                        || o.spec != gw.spec
                        || o.metadata.uid != gw.metadata.uid
                }) {
                    self.waypoint_changed(&name);
                    self.reconcile.insert(name);
                }
            }
            Object::Deployment(d) => {
                let available =
                    |d: &Deployment| d.status.as_ref().and_then(|s| s.available_replicas);
                let old = self.deployments.insert(name.clone(), d.clone());
                if old.is_none_or(|o| available(&o) != available(&d)) {
                    self.dirty_gateways.insert(name);
                }
            }
            Object::HttpRoute(r) => {
                let old = self.http_routes.insert(name.clone(), r.clone());
                if old.is_none_or(|o| {
                    o.metadata.generation != r.metadata.generation || o.spec != r.spec
                }) {
                    self.dirty_routes.insert((ObjectKind::HttpRoute, name));
                }
            }
            Object::GrpcRoute(r) => {
                let old = self.grpc_routes.insert(name.clone(), r.clone());
                if old.is_none_or(|o| {
                    o.metadata.generation != r.metadata.generation || o.spec != r.spec
                }) {
                    self.dirty_routes.insert((ObjectKind::GrpcRoute, name));
                }
            }
            Object::PeerAuthentication(pa) => {
                let old = self.peer_authentications.insert(name.clone(), pa.clone());
                if old.is_none_or(|o| {
                    o.metadata.generation != pa.metadata.generation || o.spec != pa.spec
                }) {
                    self.dirty_policies
                        .insert((ObjectKind::PeerAuthentication, name));
                }
            }
        }
    }

    /// An object was deleted.
    pub fn delete(&mut self, kind: ObjectKind, name: &Name) {
        match kind {
            ObjectKind::Namespace => {
                if self.namespaces.remove(&name.1).is_some() {
                    self.namespace_changed(&name.1);
                }
            }
            ObjectKind::Node => {
                if self.nodes.remove(&name.1).is_some() {
                    self.node_changed(&name.1);
                }
            }
            ObjectKind::Pod => {
                if self.pods.remove(name).is_some() {
                    if let Some(pods) = self.pods_in_namespace.get_mut(&name.0) {
                        pods.remove(name);
                        if pods.is_empty() {
                            self.pods_in_namespace.remove(&name.0);
                        }
                    }
                    self.dirty_pods.insert(name.clone());
                }
            }
            ObjectKind::Service => {
                if self.services.remove(name).is_some() {
                    remove_from(&mut self.services_in_namespace, &name.0, name);
                    self.dirty_services.insert(name.clone());
                    if self.gateways.contains_key(name) {
                        self.reconcile.insert(name.clone());
                    }
                }
            }
            ObjectKind::ServiceAccount => {
                if self.service_accounts.remove(name).is_some() {
                    self.service_account_changed(name);
                }
            }
            ObjectKind::Gateway => {
                if self.gateways.remove(name).is_some() {
                    self.waypoint_changed(name);
                }
            }
            ObjectKind::Deployment => {
                if self.deployments.remove(name).is_some() {
                    self.dirty_gateways.insert(name.clone());
                    if self.gateways.contains_key(name) {
                        self.reconcile.insert(name.clone());
                    }
                }
            }
            ObjectKind::EndpointSlice => {
                if let Some(old) = self.slices.remove(name) {
                    self.unlink_slice(name, &old);
                }
            }
            ObjectKind::AuthorizationPolicy => {
                if self.authorization_policies.remove(name).is_some() {
                    self.dirty_policies.insert((kind, name.clone()));
                }
            }
            ObjectKind::PeerAuthentication => {
                if self.peer_authentications.remove(name).is_some() {
                    self.dirty_policies.insert((kind, name.clone()));
                }
            }
            ObjectKind::HttpRoute => {
                if self.http_routes.remove(name).is_some() {
                    self.dirty_routes.insert((kind, name.clone()));
                }
            }
            ObjectKind::GrpcRoute => {
                if self.grpc_routes.remove(name).is_some() {
                    self.dirty_routes.insert((kind, name.clone()));
                }
            }
        }
    }

    fn namespace_changed(&mut self, namespace: &str) {
        if let Some(pods) = self.pods_in_namespace.get(namespace) {
            self.dirty_pods.extend(pods.iter().cloned());
        }
        if let Some(services) = self.services_in_namespace.get(namespace) {
            self.dirty_services.extend(services.iter().cloned());
        }
    }

    fn service_account_changed(&mut self, name: &Name) {
        if let Some(pods) = self.pods_of_service_account.get(name) {
            self.dirty_pods.extend(pods.iter().cloned());
        }
    }

    /// A waypoint's Gateway came, went or changed: its status, and what
    /// it serves.
    fn waypoint_changed(&mut self, name: &Name) {
        self.dirty_gateways.insert(name.clone());
        self.waypoint_users_changed(name);
        self.routes_read(name);
    }

    /// The routes that read the Service or Gateway `name`.
    fn routes_read(&mut self, name: &Name) {
        if let Some(routes) = self.routes_reading.get(name) {
            self.dirty_routes.extend(routes.iter().cloned());
        }
    }

    fn waypoint_users_changed(&mut self, name: &Name) {
        if let Some(users) = self.waypoint_users.get(name) {
            for user in users {
                match user {
                    Dependent::Pod(p) => self.dirty_pods.insert(p.clone()),
                    Dependent::Service(s) => self.dirty_services.insert(s.clone()),
                };
            }
        }
    }

    fn node_changed(&mut self, node: &str) {
        if let Some(pods) = self.pods_on_node.get(node) {
            self.dirty_pods.extend(pods.iter().cloned());
        }
    }

    fn unlink_slice(&mut self, name: &Name, slice: &EndpointSlice) {
        if let Some(service) = slice_service(name, slice) {
            if let Some(slices) = self.slices_of_service.get_mut(&service) {
                slices.remove(name);
                if slices.is_empty() {
                    self.slices_of_service.remove(&service);
                }
            }
            self.dirty_services.insert(service);
        }
    }

    /// Translates what changed since the last flush and returns the
    /// changes to the mesh config.
    pub fn flush(&mut self) -> Delta {
        let started = Instant::now();
        let mut statuses = Vec::new();
        let mut translated = self.dirty_policies.len();
        for key in std::mem::take(&mut self.dirty_policies) {
            statuses.extend(self.translate_policy(key));
        }
        // Rounds until nothing is left to do: a workload appearing makes
        // the Services naming it change, a waypoint Service appearing the
        // pods it serves. Each round settles one step of that.
        while !self.dirty_pods.is_empty() || !self.dirty_services.is_empty() {
            let mut touched = HashSet::new();
            let pods = std::mem::take(&mut self.dirty_pods);
            for pod in &pods {
                self.translate_pod(pod, &mut touched);
            }
            let services = std::mem::take(&mut self.dirty_services);
            translated += pods.len() + services.len();
            for service in &services {
                self.translate_service(service, &mut touched);
            }
            // The claimants of addresses claimed or given up may have
            // won or lost them.
            let (mut other_pods, mut other_services) = (HashSet::new(), HashSet::new());
            for claimant in touched
                .iter()
                .filter_map(|ip| self.claims.get(ip))
                .flatten()
            {
                match claimant {
                    Claimant::Workload { pod, .. } if !pods.contains(pod) => {
                        other_pods.insert(pod.clone());
                    }
                    Claimant::Service(s) if !services.contains(s) => {
                        other_services.insert(s.clone());
                    }
                    _ => {}
                }
            }
            for pod in &pods {
                self.settle_pod(pod, true);
            }
            for pod in &other_pods {
                self.settle_pod(pod, false);
            }
            for service in &services {
                self.settle_service(service, true);
            }
            for service in &other_services {
                self.settle_service(service, false);
            }
            for service in services.iter().chain(&other_services) {
                self.routes_read(service);
            }
        }
        // Last: a Gateway's status reads its Service as settled.
        translated += self.dirty_gateways.len();
        for name in std::mem::take(&mut self.dirty_gateways) {
            statuses.extend(self.translate_gateway(&name));
        }
        // Routes read Services and waypoints as settled.
        translated += self.dirty_routes.len();
        for key in std::mem::take(&mut self.dirty_routes) {
            statuses.extend(self.translate_route(key));
        }
        let waypoints = std::mem::take(&mut self.reconcile)
            .into_iter()
            .filter(|n| self.gateways.contains_key(n))
            .collect();
        Delta {
            changes: self.changes.drain().collect(),
            statuses,
            translated,
            waypoints,
            took: started.elapsed(),
        }
    }

    /// The conditions of every policy, waypoint and route.
    pub fn statuses(&self) -> impl Iterator<Item = &ObjectStatus> {
        self.policy_out
            .values()
            .map(|p| &p.status)
            .chain(self.gateway_out.values())
            .chain(self.route_out.values().map(|r| &r.status))
    }

    /// Every waypoint's Gateway.
    pub fn waypoints(&self) -> impl Iterator<Item = &Arc<Gateway>> {
        self.gateways.values()
    }

    /// A waypoint's status: `Accepted` when its listeners are HBONE on
    /// 15008 (or left to the controller), `Programmed` once its Service has
    /// an address in the mesh and its Deployment an available replica.
    /// `None` when it did not change.
    fn translate_gateway(&mut self, name: &Name) -> Option<ObjectStatus> {
        let Some(gw) = self.gateways.get(name).cloned() else {
            self.gateway_out.remove(name);
            return None;
        };
        let (ns, n) = name;
        let problem = gw.listener_problem();
        let address = self.service_out.get(name).and_then(|s| s.address);
        let available = self
            .deployments
            .get(name)
            .and_then(|d| d.status.as_ref()?.available_replicas)
            .unwrap_or(0);
        let accepted = match &problem {
            None => Condition::new(
                "Accepted",
                true,
                "Accepted",
                format!("waypoint for what is labelled ambit.dev/use-waypoint: {n} in {ns}"),
            ),
            Some(p) => Condition::new("Accepted", false, "ListenersNotValid", p.clone()),
        };
        let programmed = match (problem, address) {
            (Some(_), _) => Condition::new("Programmed", false, "Invalid", "not accepted"),
            (None, None) => Condition::new(
                "Programmed",
                false,
                "AddressNotAssigned",
                format!("Service {n} has no cluster IP in the mesh yet"),
            ),
            (None, Some(_)) if available == 0 => Condition::new(
                "Programmed",
                false,
                "Pending",
                format!("Deployment {n} has no available replica"),
            ),
            (None, Some(ip)) => Condition::new(
                "Programmed",
                true,
                "Programmed",
                format!("{available} replica(s) behind {ip}"),
            ),
        };
        let mut status = ObjectStatus::new("Gateway", &*gw, vec![accepted, programmed]);
        status.addresses = address.into_iter().collect();
        if self.gateway_out.get(name) == Some(&status) {
            return None;
        }
        self.gateway_out.insert(name.clone(), status.clone());
        Some(status)
    }

    /// The mesh config as flushed, whole.
    pub fn config(&self) -> MeshConfig {
        let mut config = MeshConfig {
            trust_domain: self.trust_domain.clone(),
            ..MeshConfig::default()
        };
        config.workloads = self
            .pod_out
            .values()
            .filter(|p| p.published.is_some())
            .filter_map(|p| p.workload.clone())
            .collect();
        config.services = self
            .service_out
            .values()
            .filter(|s| s.published)
            .filter_map(|s| s.service.clone())
            .collect();
        for policy in self.policy_out.values() {
            match &policy.item {
                Some(Item::AuthorizationPolicy(p)) => config.authorization_policies.push(p.clone()),
                Some(Item::PeerAuthentication(p)) => config.peer_authentications.push(p.clone()),
                _ => {}
            }
        }
        for route in self.route_out.values() {
            if let Some(Item::Route(r)) = &route.item {
                config.routes.push(r.clone());
            }
        }
        config.sorted()
    }

    /// A route's parents and backends as settled, its status when it
    /// changed (`None` also when the route is gone: nothing to write to).
    fn translate_route(&mut self, key: (ObjectKind, Name)) -> Option<ObjectStatus> {
        let (kind, name) = &key;
        let resolver = Lookup(self);
        let translated = match kind {
            ObjectKind::HttpRoute => self.http_routes.get(name).map(|r| {
                (
                    routes::http_route(r, &resolver),
                    ObjectStatus::new("HTTPRoute", &**r, Vec::new()),
                )
            }),
            _ => self.grpc_routes.get(name).map(|r| {
                (
                    routes::grpc_route(r, &resolver),
                    ObjectStatus::new("GRPCRoute", &**r, Vec::new()),
                )
            }),
        };
        let wire_kind = match kind {
            ObjectKind::HttpRoute => Kind::HttpRoute,
            _ => Kind::GrpcRoute,
        };
        let wire_key = (wire_kind, format!("{}/{}", name.0, name.1));
        let before = self.route_out.remove(&key).map(|old| {
            for read in &old.reads {
                remove_from(&mut self.routes_reading, read, &key);
            }
            old.status
        });
        let (translated, mut status) = match translated {
            Some(t) => t,
            None => {
                self.changes.insert(wire_key, None);
                return None;
            }
        };
        status.parents = translated.parents;
        let item = translated.route.map(Item::Route);
        for read in &translated.reads {
            self.routes_reading
                .entry(read.clone())
                .or_default()
                .insert(key.clone());
        }
        self.changes.insert(wire_key, item.clone());
        self.route_out.insert(
            key,
            RouteOut {
                item,
                status: status.clone(),
                reads: translated.reads,
            },
        );
        // Routes are translated again whenever a Service they read is:
        // most of the time their status stays.
        (before.as_ref() != Some(&status)).then_some(status)
    }

    fn translate_policy(&mut self, key: (ObjectKind, Name)) -> Option<ObjectStatus> {
        let (kind, name) = &key;
        let translated = match kind {
            ObjectKind::AuthorizationPolicy => self.authorization_policies.get(name).map(|ap| {
                let t = translate::authorization_policy(ap);
                let status = ObjectStatus::new(kind.as_str(), &**ap, vec![t.accepted, t.enforced]);
                (t.policy.map(Item::AuthorizationPolicy), status)
            }),
            _ => self.peer_authentications.get(name).map(|pa| {
                let t = translate::peer_authentication(pa);
                let status = ObjectStatus::new(kind.as_str(), &**pa, vec![t.accepted, t.enforced]);
                (t.policy.map(Item::PeerAuthentication), status)
            }),
        };
        let wire_kind = match kind {
            ObjectKind::AuthorizationPolicy => Kind::AuthorizationPolicy,
            _ => Kind::PeerAuthentication,
        };
        let wire_key = (wire_kind, format!("{}/{}", name.0, name.1));
        match translated {
            Some((item, status)) => {
                self.changes.insert(wire_key, item.clone());
                self.policy_out.insert(
                    key,
                    PolicyOut {
                        item,
                        status: status.clone(),
                    },
                );
                Some(status)
            }
            None => {
                self.changes.insert(wire_key, None);
                self.policy_out.remove(&key);
                None
            }
        }
    }

    fn translate_pod(&mut self, name: &Name, touched: &mut HashSet<Ipv4Addr>) {
        let published = match self.pod_out.remove(name) {
            Some(old) => {
                if let Some(w) = &old.workload {
                    let me = Claimant::Workload {
                        uid: w.uid.clone(),
                        pod: name.clone(),
                    };
                    self.unclaim(&me, &w.ips, touched);
                }
                remove_from(&mut self.pods_on_node, &old.node, name);
                if let Some(sa) = &old.service_account {
                    remove_from(&mut self.pods_of_service_account, sa, name);
                }
                if let Some(wp) = &old.waypoint {
                    remove_from(&mut self.waypoint_users, wp, &Dependent::Pod(name.clone()));
                }
                old.published
            }
            None => None,
        };
        let Some(pod) = self.pods.get(name).cloned() else {
            self.pod_out.insert(
                name.clone(),
                PodOut {
                    published,
                    ..PodOut::default()
                },
            );
            return;
        };
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let service_account: Name = (
            name.0.clone(),
            pod.spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
        );
        // The most specific label wins: pod, service account, namespace.
        let waypoint = if label(pod.labels(), GATEWAY_NAME_LABEL).is_some() {
            // A waypoint's own pods are not sent through a waypoint.
            None
        } else {
            label(pod.labels(), USE_WAYPOINT)
                .or_else(|| {
                    self.service_accounts
                        .get(&service_account)
                        .and_then(|sa| label(sa.labels(), USE_WAYPOINT))
                })
                .or_else(|| self.namespace_waypoint(&name.0))
                .filter(|wp| *wp != "none")
                .map(|wp| (name.0.clone(), wp.to_string()))
        };
        let workload = self.workload(&pod, &node, waypoint.as_ref());
        if let Some(w) = &workload {
            let me = Claimant::Workload {
                uid: w.uid.clone(),
                pod: name.clone(),
            };
            self.claim(&me, &w.ips, touched);
        }
        self.pods_on_node
            .entry(node.clone())
            .or_default()
            .insert(name.clone());
        self.pods_of_service_account
            .entry(service_account.clone())
            .or_default()
            .insert(name.clone());
        if let Some(wp) = &waypoint {
            self.waypoint_users
                .entry(wp.clone())
                .or_default()
                .insert(Dependent::Pod(name.clone()));
        }
        self.pod_out.insert(
            name.clone(),
            PodOut {
                workload,
                node,
                service_account: Some(service_account),
                waypoint,
                published,
            },
        );
    }

    /// Puts the pod's workload in or out of the config, depending on
    /// whether it owns its addresses; `translated`: it may have changed.
    fn settle_pod(&mut self, name: &Name, translated: bool) {
        let Some(out) = self.pod_out.get(name) else {
            return;
        };
        let now = out
            .workload
            .as_ref()
            .filter(|w| {
                let me = Claimant::Workload {
                    uid: w.uid.clone(),
                    pod: name.clone(),
                };
                owns(&self.claims, &me, &w.ips)
            })
            .map(|w| w.uid.clone());
        let before = out.published.clone();
        if let Some(uid) = &now
            && (translated || before != now)
            && let Some(w) = &out.workload
        {
            self.changes.insert(
                (Kind::Workload, uid.clone()),
                Some(Item::Workload(w.clone())),
            );
        }
        if before != now {
            if let Some(uid) = &before {
                self.changes.insert((Kind::Workload, uid.clone()), None);
                self.published_uids.remove(uid);
            }
            if let Some(uid) = &now {
                self.published_uids.insert(uid.clone());
            }
            for uid in before.iter().chain(now.iter()) {
                if let Some(services) = self.services_naming_uid.get(uid) {
                    self.dirty_services.extend(services.iter().cloned());
                }
            }
        }
        let gone = out.workload.is_none() && now.is_none() && !self.pods.contains_key(name);
        if gone {
            self.pod_out.remove(name);
        } else if let Some(out) = self.pod_out.get_mut(name) {
            out.published = now;
        }
    }

    fn translate_service(&mut self, name: &Name, touched: &mut HashSet<Ipv4Addr>) {
        let (published, address) = match self.service_out.remove(name) {
            Some(old) => {
                if let Some(s) = &old.service {
                    self.unclaim(&Claimant::Service(name.clone()), &s.vips, touched);
                }
                for uid in &old.uids {
                    remove_from(&mut self.services_naming_uid, uid, name);
                }
                if let Some(wp) = &old.waypoint {
                    remove_from(
                        &mut self.waypoint_users,
                        wp,
                        &Dependent::Service(name.clone()),
                    );
                }
                (old.published, old.address)
            }
            None => (false, None),
        };
        let mut out = ServiceOut {
            published,
            address,
            ..ServiceOut::default()
        };
        if let Some(svc) = self.services.get(name).cloned() {
            let slices: Vec<Arc<EndpointSlice>> = self
                .slices_of_service
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|s| self.slices.get(s).cloned())
                .collect();
            out.uids = slices
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter_map(|e| e.target_ref.as_ref()?.uid.clone())
                .collect();
            out.uids.sort();
            out.uids.dedup();
            out.waypoint = if label(svc.labels(), GATEWAY_NAME_LABEL).is_some() {
                // A waypoint's own Service.
                None
            } else {
                label(svc.labels(), USE_WAYPOINT)
                    .or_else(|| self.namespace_waypoint(&name.0))
                    .filter(|wp| *wp != "none")
                    .map(|wp| (name.0.clone(), wp.to_string()))
            };
            out.service = self.service(name, &svc, &slices, out.waypoint.as_ref());
        }
        if let Some(s) = &out.service {
            self.claim(&Claimant::Service(name.clone()), &s.vips, touched);
        }
        for uid in &out.uids {
            self.services_naming_uid
                .entry(uid.clone())
                .or_default()
                .insert(name.clone());
        }
        if let Some(wp) = &out.waypoint {
            self.waypoint_users
                .entry(wp.clone())
                .or_default()
                .insert(Dependent::Service(name.clone()));
        }
        self.service_out.insert(name.clone(), out);
    }

    /// Puts the Service in or out of the config, depending on whether it
    /// owns its VIPs; `translated`: it may have changed.
    fn settle_service(&mut self, name: &Name, translated: bool) {
        let Some(out) = self.service_out.get(name) else {
            return;
        };
        let me = Claimant::Service(name.clone());
        let service = out
            .service
            .as_ref()
            .filter(|s| owns(&self.claims, &me, &s.vips));
        let key = (Kind::Service, format!("{}/{}", name.0, name.1));
        match service {
            Some(s) if translated || !out.published => {
                self.changes.insert(key, Some(Item::Service(s.clone())));
            }
            None if out.published => {
                self.changes.insert(key, None);
            }
            _ => {}
        }
        let address = service.and_then(|s| s.vips.first().copied());
        let published = service.is_some();
        let address_changed = address != out.address;
        let gone = out.service.is_none() && !published && !self.services.contains_key(name);
        if gone {
            self.service_out.remove(name);
        } else if let Some(out) = self.service_out.get_mut(name) {
            out.published = published;
            out.address = address;
        }
        if address_changed {
            self.waypoint_users_changed(name);
            if self.gateways.contains_key(name) {
                self.dirty_gateways.insert(name.clone());
            }
        }
    }

    fn claim(&mut self, me: &Claimant, ips: &[Ipv4Addr], touched: &mut HashSet<Ipv4Addr>) {
        for ip in ips {
            self.claims.entry(*ip).or_default().insert(me.clone());
            touched.insert(*ip);
        }
    }

    fn unclaim(&mut self, me: &Claimant, ips: &[Ipv4Addr], touched: &mut HashSet<Ipv4Addr>) {
        for ip in ips {
            remove_from(&mut self.claims, ip, me);
            touched.insert(*ip);
        }
    }

    fn namespace_waypoint(&self, namespace: &str) -> Option<&str> {
        self.namespaces
            .get(namespace)
            .and_then(|n| label(n.labels(), USE_WAYPOINT))
    }

    /// The address of the waypoint `name`: its Gateway is accepted and its
    /// Service is in the config. Otherwise traffic goes direct, and the
    /// Gateway's status (or its absence) says why.
    fn waypoint(&self, name: Option<&Name>) -> Option<WaypointRef> {
        let name = name?;
        let gateway = self.gateways.get(name)?;
        if gateway.listener_problem().is_some() {
            return None;
        }
        let address = self.service_out.get(name)?.address?;
        Some(WaypointRef { address })
    }

    fn locality(&self, node: &str) -> Locality {
        self.nodes
            .get(node)
            .map(|n| Locality {
                region: label(n.labels(), REGION_LABEL).unwrap_or_default().into(),
                zone: label(n.labels(), ZONE_LABEL).unwrap_or_default().into(),
            })
            .unwrap_or_default()
    }

    /// A pod is meshed when its namespace is labelled `ambient` and the
    /// pod does not opt out with `none`.
    fn is_meshed(&self, pod: &Pod, namespace: &str) -> bool {
        let ambient = self
            .namespaces
            .get(namespace)
            .is_some_and(|n| label(n.labels(), DATAPLANE_MODE) == Some("ambient"));
        ambient && label(pod.labels(), DATAPLANE_MODE) != Some("none")
    }

    fn workload(&self, pod: &Pod, node: &str, waypoint: Option<&Name>) -> Option<Workload> {
        let spec = pod.spec.as_ref()?;
        let status = pod.status.as_ref()?;
        // Finished pods hold no traffic; host-network pods share the
        // node's address and are not workloads of their own.
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
            || spec.host_network == Some(true)
        {
            return None;
        }
        let ips = match &status.pod_ips {
            Some(ips) if !ips.is_empty() => ipv4s(ips.iter().map(|ip| ip.ip.as_str())),
            _ => ipv4s(status.pod_ip.as_deref().into_iter()),
        };
        let namespace = pod.namespace().filter(|n| !n.is_empty())?;
        let uid = pod.uid().filter(|u| !u.is_empty())?;
        let name = pod.name_any();
        if ips.is_empty() || name.is_empty() {
            return None;
        }
        let service_account = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        // The data planes refuse a config with a workload without a valid
        // identity: such a pod is left out, and said so.
        let valid = self
            .parsed_trust_domain
            .as_ref()
            .is_some_and(|td| Identity::new(td.clone(), &namespace, &service_account).is_ok());
        if !valid {
            tracing::warn!(pod = %format!("{namespace}/{name}"), service_account, "pod left out: no valid identity");
            return None;
        }
        Some(Workload {
            protocol: if self.is_meshed(pod, &namespace) {
                InboundProtocol::Hbone
            } else {
                InboundProtocol::Tcp
            },
            uid,
            name,
            namespace,
            service_account,
            ips,
            locality: self.locality(node),
            node: node.to_string(),
            workload_name: owner_name(pod),
            labels: pod.labels().clone(),
            waypoint: self.waypoint(waypoint),
        })
    }

    fn service(
        &self,
        name: &Name,
        svc: &KubeService,
        slices: &[Arc<EndpointSlice>],
        waypoint: Option<&Name>,
    ) -> Option<Service> {
        let vips = cluster_ips(svc)?;
        let spec = svc.spec.as_ref()?;
        let mut ports = Vec::<ServicePort>::new();
        // Named target ports (service port, its name, the number the
        // service goes by), for the endpoints that number them otherwise.
        let mut named = Vec::<(u16, Option<&str>, u16)>::new();
        for p in spec.ports.iter().flatten() {
            if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
                continue;
            };
            let target = match &p.target_port {
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                // Resolved by the endpoint slices, which carry the number
                // under the service port's name: the first slice's.
                Some(IntOrString::String(_)) => {
                    slices.iter().find_map(|s| slice_port(s, p.name.as_deref()))
                }
                None => Some(port),
            };
            // The data planes refuse port 0 and a port listed twice.
            if target.is_none_or(|t| t == 0) || ports.iter().any(|q| q.port == port) {
                continue;
            }
            if let (Some(IntOrString::String(_)), Some(target)) = (&p.target_port, target) {
                named.push((port, p.name.as_deref(), target));
            }
            ports.push(ServicePort {
                name: p.name.clone(),
                port,
                target_port: target.filter(|t| *t != port),
                app_protocol: p.app_protocol.clone(),
            });
        }
        if ports.is_empty() {
            return None;
        }
        let mut endpoints: Vec<String> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .filter_map(|e| e.target_ref.as_ref()?.uid.clone())
            .filter(|uid| self.published_uids.contains(uid))
            .collect();
        endpoints.sort();
        endpoints.dedup();
        let endpoint_ports = endpoint_ports(slices, &named, &endpoints);
        let (namespace, service_name) = name.clone();
        Some(Service {
            hostname: Some(format!(
                "{service_name}.{namespace}.svc.{}",
                self.trust_domain
            )),
            waypoint: self.waypoint(waypoint),
            name: service_name,
            namespace,
            vips,
            ports,
            endpoints,
            endpoint_ports,
            traffic_distribution: match spec.traffic_distribution.as_deref() {
                Some("PreferSameNode") => Some(TrafficDistribution::PreferSameNode),
                Some("PreferSameZone" | "PreferClose") => Some(TrafficDistribution::PreferSameZone),
                _ => None,
            },
        })
    }
}

/// The number `slice` gives the service port named `name`.
fn slice_port(slice: &EndpointSlice, name: Option<&str>) -> Option<u16> {
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == name)
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
}

/// The ports of `endpoints` that differ from the service's: an endpoint
/// slice holds the endpoints that resolve the `named` target ports
/// alike.
fn endpoint_ports(
    slices: &[Arc<EndpointSlice>],
    named: &[(u16, Option<&str>, u16)],
    endpoints: &[String],
) -> BTreeMap<String, BTreeMap<u16, u16>> {
    let mut out = BTreeMap::<String, BTreeMap<u16, u16>>::new();
    for slice in slices {
        for (port, name, target) in named {
            let Some(number) = slice_port(slice, *name).filter(|n| *n != 0 && n != target) else {
                continue;
            };
            for uid in slice
                .endpoints
                .iter()
                .flatten()
                .filter_map(|e| e.target_ref.as_ref()?.uid.as_ref())
                .filter(|uid| endpoints.binary_search(uid).is_ok())
            {
                out.entry(uid.clone()).or_default().insert(*port, number);
            }
        }
    }
    out
}

/// What routes read of the translator: Services as settled, waypoints.
struct Lookup<'a>(&'a Translator);

impl routes::Resolver for Lookup<'_> {
    fn service(&self, name: &Name) -> Option<Option<Name>> {
        let t = self.0;
        t.services.get(name)?;
        let out = t.service_out.get(name);
        Some(out.and_then(|o| {
            let referenced =
                o.published && o.service.as_ref().is_some_and(|s| s.waypoint.is_some());
            referenced.then(|| o.waypoint.clone()).flatten()
        }))
    }

    fn has_port(&self, name: &Name, port: u16) -> bool {
        let spec = self.0.services.get(name).and_then(|s| s.spec.as_ref());
        spec.and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .any(|p| p.port == i32::from(port))
    }

    fn is_waypoint(&self, name: &Name) -> bool {
        self.0.gateways.contains_key(name)
    }
}

/// Whether `me` is the first claimant of every one of `ips`.
fn owns(claims: &HashMap<Ipv4Addr, BTreeSet<Claimant>>, me: &Claimant, ips: &[Ipv4Addr]) -> bool {
    ips.iter()
        .all(|ip| claims.get(ip).and_then(BTreeSet::first) == Some(me))
}

/// Removes `value` from the set under `key`, and the set once empty.
fn remove_from<K, S, V>(map: &mut HashMap<K, S>, key: &K, value: &V)
where
    K: std::hash::Hash + Eq,
    S: SetLike<V>,
{
    if let Some(set) = map.get_mut(key) {
        set.remove_value(value);
        if set.is_empty_set() {
            map.remove(key);
        }
    }
}

trait SetLike<V> {
    fn remove_value(&mut self, value: &V);
    fn is_empty_set(&self) -> bool;
}

impl<V: std::hash::Hash + Eq> SetLike<V> for HashSet<V> {
    fn remove_value(&mut self, value: &V) {
        self.remove(value);
    }
    fn is_empty_set(&self) -> bool {
        self.is_empty()
    }
}

impl<V: Ord> SetLike<V> for BTreeSet<V> {
    fn remove_value(&mut self, value: &V) {
        self.remove(value);
    }
    fn is_empty_set(&self) -> bool {
        self.is_empty()
    }
}

/// The Service an EndpointSlice belongs to.
fn slice_service(name: &Name, slice: &EndpointSlice) -> Option<Name> {
    label(slice.labels(), SERVICE_NAME_LABEL).map(|s| (name.0.clone(), s.to_string()))
}

/// Whether two versions of a pod translate the same (most pod updates
/// change only what the translation does not read).
fn same_pod(a: &Pod, b: &Pod) -> bool {
    a.metadata.uid == b.metadata.uid
        && a.metadata.labels == b.metadata.labels
        && a.metadata.owner_references == b.metadata.owner_references
        && a.spec
            .as_ref()
            .map(|s| (&s.node_name, &s.service_account_name, s.host_network))
            == b.spec
                .as_ref()
                .map(|s| (&s.node_name, &s.service_account_name, s.host_network))
        && a.status.as_ref().map(|s| (&s.phase, &s.pod_ip, &s.pod_ips))
            == b.status.as_ref().map(|s| (&s.phase, &s.pod_ip, &s.pod_ips))
}
