//! The config stream, controller side: every published config becomes a
//! versioned table of resources; each subscriber gets what it needs of it
//! as deltas against what it holds, one update in flight at a time
//! (later changes are folded into the next update), and answers each with
//! an ACK or a NACK.
//!
//! Workloads and services go to every ztunnel (a pod may connect to any of
//! them); policies only to the ztunnels of the workloads they select, and
//! to the waypoints of their namespace; routes only to the waypoints that
//! apply them. What a subscriber holds is known as "the table at version
//! v" plus its policies and routes, so a subscriber costs memory for those
//! only, and an update is computed from the keys
//! changed since v (kept for the last [`LOG_VERSIONS`] versions; a
//! subscriber further behind gets a full update).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use model::MeshConfig;
use model::proto::config::config_service_server::ConfigService;
use model::proto::config::subscribe_request::Request as Message;
use model::proto::config::{ConfigUpdate, Hello, Kind, Resource, ResourceKey, SubscribeRequest};
use model::resources::{BUCKETS, Item, Key, bucket, items, mark, wire_key};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Authenticator, Caller, authenticate};
use crate::metrics::Metrics;

/// Versions whose changed keys are remembered for catching up.
pub const LOG_VERSIONS: usize = 1024;

/// One resource, encoded once for every subscriber.
#[derive(Debug)]
struct Entry {
    item: Item,
    resource: Resource,
    /// Its bucket and its share of the bucket's digest
    /// ([`model::resources::bucket_digests`]).
    bucket: usize,
    mark: u64,
}

impl Entry {
    fn new(key: &Key, item: Item) -> Self {
        let resource = item.encode();
        Self {
            bucket: bucket(key.0, &key.1),
            mark: mark(key.0, &key.1, resource.digest),
            item,
            resource,
        }
    }
}

/// One published config. Persistent maps: a new version shares all but
/// what changed with the one before, so publishing costs what changed.
#[derive(Debug, Default, Clone)]
struct Table {
    version: u64,
    trust_domain: String,
    entries: imbl::HashMap<Key, Arc<Entry>>,
    /// Node → its workloads, to find the policies a node needs and what
    /// identities its ztunnel may hold.
    by_node: imbl::HashMap<String, imbl::HashSet<Key>>,
    /// Policies and routes: what goes to some subscribers only.
    selective: imbl::HashSet<Key>,
    /// The bucket digests of everything but policies and routes (empty
    /// until something is published; then [`BUCKETS`] long).
    buckets: Vec<u64>,
}

impl Table {
    fn index(&mut self, key: &Key, entry: &Entry) {
        if !is_selective(key.0) {
            self.buckets.resize(BUCKETS, 0);
            self.buckets[entry.bucket] ^= entry.mark;
        }
        match &entry.item {
            Item::Workload(w) => {
                self.by_node
                    .entry(w.node.clone())
                    .or_default()
                    .insert(key.clone());
            }
            Item::AuthorizationPolicy(_) | Item::PeerAuthentication(_) | Item::Route(_) => {
                self.selective.insert(key.clone());
            }
            Item::Service(_) => {}
        }
    }

    fn unindex(&mut self, key: &Key, entry: &Entry) {
        if !is_selective(key.0) {
            // XOR: taking a mark out is putting it in again.
            self.buckets[entry.bucket] ^= entry.mark;
        }
        match &entry.item {
            Item::Workload(w) => {
                if let Some(keys) = self.by_node.get_mut(&w.node) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_node.remove(&w.node);
                    }
                }
            }
            Item::AuthorizationPolicy(_) | Item::PeerAuthentication(_) | Item::Route(_) => {
                self.selective.remove(key);
            }
            Item::Service(_) => {}
        }
    }

    /// The workloads scheduled on `node`.
    fn node_workloads(&self, node: &str) -> impl Iterator<Item = &model::Workload> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| match self.entries.get(k).map(|e| &e.item) {
                Some(Item::Workload(w)) => Some(w),
                _ => None,
            })
    }

    /// Whether `caller` needs the policy `key`.
    fn wants(&self, caller: &Caller, entry: &Entry) -> bool {
        match caller {
            Caller::Node(_) if matches!(entry.item, Item::Route(_)) => false,
            Caller::Node(node) => self.node_workloads(node).any(|w| match &entry.item {
                Item::AuthorizationPolicy(p) => p.selects(w),
                Item::PeerAuthentication(p) => p.selects(w),
                _ => false,
            }),
            Caller::Waypoint {
                namespace,
                service_account,
            } => match &entry.item {
                // A waypoint runs as its Gateway's service account, of the
                // Gateway's name.
                Item::Route(r) => r.serves(&format!("{namespace}/{service_account}")),
                Item::AuthorizationPolicy(p) => {
                    &p.namespace == namespace || p.scope == model::PolicyScope::Global
                }
                Item::PeerAuthentication(p) => {
                    &p.namespace == namespace || p.scope == model::PolicyScope::Global
                }
                _ => false,
            },
        }
    }

    /// The policies and routes `caller` needs: key → digest.
    fn selective_for(&self, caller: &Caller) -> HashMap<Key, u64> {
        self.selective
            .iter()
            .filter_map(|k| {
                let entry = self.entries.get(k)?;
                self.wants(caller, entry)
                    .then(|| (k.clone(), entry.resource.digest))
            })
            .collect()
    }
}

/// Kinds that go to some subscribers only: policies and routes.
fn is_selective(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::HttpRoute | Kind::GrpcRoute
    )
}

/// Whether a subscriber needing the policies and routes `selective` needs
/// `key`.
fn wanted(key: &Key, selective: &HashMap<Key, u64>) -> bool {
    !is_selective(key.0) || selective.contains_key(key)
}

#[derive(Debug)]
struct Inner {
    table: watch::Sender<Arc<Table>>,
    /// (version, keys it changed), oldest first.
    log: Mutex<VecDeque<(u64, Arc<[Key]>)>>,
    auth: Arc<dyn Authenticator>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    syncs: Arc<tokio::sync::Semaphore>,
}

/// Which identities the pods of each node have, in one published config:
/// what the CA needs to authorize a ztunnel.
#[derive(Debug, Clone)]
pub struct Placement(Arc<Table>);

impl Placement {
    /// Whether `node` runs a pod with `identity`.
    pub fn runs(&self, node: &str, identity: &identity::Identity) -> bool {
        self.0.trust_domain == identity.trust_domain().as_str()
            && self.0.node_workloads(node).any(|w| {
                w.namespace == identity.namespace()
                    && w.service_account == identity.service_account()
            })
    }
}

/// The config server; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConfigServer {
    inner: Arc<Inner>,
}

impl ConfigServer {
    /// Sessions end (`UNAVAILABLE`) when `stop` is cancelled.
    pub fn new(
        auth: Arc<dyn Authenticator>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Self {
        let (table, _) = watch::channel(Arc::new(Table::default()));
        Self {
            inner: Arc::new(Inner {
                table,
                log: Mutex::new(VecDeque::new()),
                auth,
                metrics,
                stop,
                syncs: Arc::new(tokio::sync::Semaphore::new(SYNC_CONCURRENCY)),
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The version of the last published config, 0 before the first.
    pub fn version(&self) -> u64 {
        self.inner.table.borrow().version
    }

    /// Makes `config` the one subscribers converge to, whole; returns its
    /// version (unchanged when nothing changed). The caller validates: a
    /// config data planes would refuse comes back to it as NACKs.
    pub fn publish(&self, config: MeshConfig) -> u64 {
        let trust_domain = config.trust_domain.clone();
        let mut changes: HashMap<Key, Option<Item>> = self
            .inner
            .table
            .borrow()
            .entries
            .keys()
            .map(|k| (k.clone(), None))
            .collect();
        changes.extend(items(config).map(|item| (item.key(), Some(item))));
        self.apply(&trust_domain, changes)
    }

    /// Applies changes (`None`: removed) to the current config; returns
    /// the new version, or the current one when nothing changed. Costs
    /// what changed, not the size of the config.
    pub fn apply(
        &self,
        trust_domain: &str,
        changes: impl IntoIterator<Item = (Key, Option<Item>)>,
    ) -> u64 {
        let old = self.inner.table.borrow().clone();
        let mut table = Table::clone(&old);
        let mut changed = Vec::new();
        for (key, item) in changes {
            let current = table.entries.get(&key).cloned();
            match item {
                Some(item) if current.as_ref().is_some_and(|e| e.item == item) => continue,
                Some(item) => {
                    if let Some(e) = &current {
                        table.unindex(&key, e);
                    }
                    let entry = Arc::new(Entry::new(&key, item));
                    table.index(&key, &entry);
                    table.entries.insert(key.clone(), entry);
                }
                None => {
                    let Some(e) = current else { continue };
                    table.unindex(&key, &e);
                    table.entries.remove(&key);
                }
            }
            changed.push(key);
        }
        if changed.is_empty() && trust_domain == old.trust_domain && old.version > 0 {
            return old.version;
        }
        let version = old.version + 1;
        table.version = version;
        table.trust_domain = trust_domain.to_string();
        {
            let mut log = self
                .inner
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            log.push_back((version, changed.into()));
            while log.len() > LOG_VERSIONS {
                log.pop_front();
            }
        }
        self.inner
            .metrics
            .config_version
            .store(version, std::sync::atomic::Ordering::Relaxed);
        self.inner.table.send_replace(Arc::new(table));
        version
    }

    /// The config being served, whole (for inspection: the mesh file).
    pub fn config(&self) -> MeshConfig {
        let table = self.inner.table.borrow().clone();
        model::resources::assemble(&table.trust_domain, table.entries.values().map(|e| &e.item))
            .sorted()
    }

    /// Where the pods of the config being served run, for the CA.
    pub fn placement(&self) -> Placement {
        Placement(self.inner.table.borrow().clone())
    }

    async fn sync_permit(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.inner
            .syncs
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Keys changed after `base` up to the current version, or `None`
    /// when the log no longer reaches back that far.
    fn changed_since(&self, base: u64) -> Option<HashSet<Key>> {
        let log = self
            .inner
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match log.front() {
            Some((first, _)) if *first <= base + 1 => {}
            None => return Some(HashSet::new()),
            Some(_) => return None,
        }
        Some(
            log.iter()
                .filter(|(v, _)| *v > base)
                .flat_map(|(_, keys)| keys.iter().cloned())
                .collect(),
        )
    }
}

/// What a subscriber holds: every workload and service of the table at
/// `base`, and `selective` (its policies and routes).
#[derive(Debug, Clone, Default)]
struct Held {
    base: u64,
    selective: HashMap<Key, u64>,
}

/// An update and what the subscriber holds once it accepts it. Resources
/// are referenced, not copied: an update for every subscriber costs a
/// pointer per resource until it is sent, part by part.
struct Pending {
    version: u64,
    trust_domain: String,
    full: bool,
    upserts: Vec<Arc<Entry>>,
    removals: Vec<ResourceKey>,
    /// Buckets whose contents the upserts replace.
    replaced: Vec<u32>,
    held: Held,
}

impl Pending {
    fn new(table: &Table, selective: HashMap<Key, u64>) -> Self {
        Self {
            version: table.version,
            trust_domain: table.trust_domain.clone(),
            full: false,
            upserts: Vec::new(),
            removals: Vec::new(),
            replaced: Vec::new(),
            held: Held {
                base: table.version,
                selective,
            },
        }
    }

    fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.removals.is_empty()
            && self.replaced.is_empty()
            && !self.full
    }

    /// The update as messages of at most [`PART_BYTES`] of resources each
    /// (a single larger resource goes alone), made as they are sent; all
    /// but the last say `more`.
    fn parts(self) -> impl Iterator<Item = ConfigUpdate> {
        let mut upserts = self.upserts.into_iter().peekable();
        let mut removals = Some((self.removals, self.replaced));
        let (version, trust_domain, full) = (self.version, self.trust_domain, self.full);
        std::iter::from_fn(move || {
            // Done once the removals went with the last part.
            removals.as_ref()?;
            let mut part = ConfigUpdate {
                version,
                full,
                trust_domain: trust_domain.clone(),
                ..ConfigUpdate::default()
            };
            let mut size = 0;
            while let Some(e) = upserts
                .next_if(|e| part.upserts.is_empty() || size + e.resource.json.len() <= PART_BYTES)
            {
                size += e.resource.json.len();
                part.upserts.push(e.resource.clone());
            }
            if upserts.peek().is_none() {
                (part.removals, part.replaced_buckets) = removals.take().unwrap_or_default();
            } else {
                part.more = true;
            }
            Some(part)
        })
    }
}

/// The first update: the differences between what the subscriber says it
/// holds and what it needs.
fn initial(table: &Table, caller: &Caller, hello: &Hello) -> Pending {
    if !hello.buckets.is_empty() {
        return initial_by_bucket(table, caller, &hello.buckets);
    }
    let held: HashMap<Key, u64> = hello
        .held
        .iter()
        .filter_map(|r| Some(((Kind::try_from(r.kind).ok()?, r.name.clone()), r.digest)))
        .collect();
    let mut pending = Pending::new(table, table.selective_for(caller));
    let selective = &pending.held.selective;
    for (key, entry) in &table.entries {
        if wanted(key, selective) && held.get(key) != Some(&entry.resource.digest) {
            pending.upserts.push(entry.clone());
        }
    }
    for key in held.keys() {
        if !(table.entries.contains_key(key) && wanted(key, selective)) {
            pending.removals.push(wire_key(key));
        }
    }
    pending
}

/// The first update for a subscriber that summed up what it holds per
/// bucket: the contents of every bucket whose digest differs from that of
/// what it needs (all of them if it sent a wrong number of buckets).
fn initial_by_bucket(table: &Table, caller: &Caller, held: &[u64]) -> Pending {
    let mut pending = Pending::new(table, table.selective_for(caller));
    let mut needed = table.buckets.clone();
    needed.resize(BUCKETS, 0);
    for key in pending.held.selective.keys() {
        let entry = &table.entries[key];
        needed[entry.bucket] ^= entry.mark;
    }
    let differ: Vec<bool> = (0..BUCKETS)
        .map(|b| held.len() != BUCKETS || held[b] != needed[b])
        .collect();
    if !differ.contains(&true) {
        return pending;
    }
    let selective = &pending.held.selective;
    for (key, entry) in &table.entries {
        if differ[entry.bucket] && wanted(key, selective) {
            pending.upserts.push(entry.clone());
        }
    }
    pending.replaced = (0..BUCKETS as u32)
        .filter(|b| differ[*b as usize])
        .collect();
    pending
}

/// The next update for a subscriber holding `held`, from the keys changed
/// since (`changed`), or everything it needs when the log no longer
/// reaches back (`None`); empty when nothing it needs changed.
fn next(table: &Table, caller: &Caller, held: &Held, changed: Option<HashSet<Key>>) -> Pending {
    let mut pending = Pending::new(table, table.selective_for(caller));
    let selective = &pending.held.selective;
    match changed {
        Some(changed) => {
            for key in changed.iter().filter(|k| !is_selective(k.0)) {
                match table.entries.get(key) {
                    Some(entry) => pending.upserts.push(entry.clone()),
                    None => pending.removals.push(wire_key(key)),
                }
            }
            for (key, digest) in selective {
                if held.selective.get(key) != Some(digest) {
                    pending.upserts.push(table.entries[key].clone());
                }
            }
            for key in held
                .selective
                .keys()
                .filter(|k| !selective.contains_key(*k))
            {
                pending.removals.push(wire_key(key));
            }
        }
        None => {
            pending.full = true;
            for (key, entry) in &table.entries {
                if wanted(key, selective) {
                    pending.upserts.push(entry.clone());
                }
            }
        }
    }
    pending
}

/// At most this much of an update in one message. The gRPC encoder keeps
/// a buffer per subscriber as large as the largest message it has sent
/// (rounded up to a power of two), for as long as the subscription lasts:
/// with 256 KiB parts that was 512 KiB per subscriber, half a gigabyte at
/// 1,000 nodes. 16 KiB is one TLS record.
const PART_BYTES: usize = 16 << 10;

/// Whole-config syncs (a first subscription, a subscriber too far behind)
/// in progress at once; the others wait their turn. Deltas do not wait.
/// Bounds memory and keeps a controller restart under 1,000 reconnecting
/// nodes from starving everything else.
pub const SYNC_CONCURRENCY: usize = 32;

/// Why a subscription ended.
enum End {
    /// The subscriber closed it or went away.
    Closed,
    /// The subscriber broke the protocol; told with this status.
    Refused(Status),
    /// The controller is stopping.
    Stopping,
}

/// Reads the Hello, in as many parts as it comes.
async fn read_hello(requests: &mut Streaming<SubscribeRequest>) -> Result<Hello, End> {
    let mut hello = Hello::default();
    loop {
        match requests.message().await {
            Ok(Some(SubscribeRequest {
                request: Some(Message::Hello(part)),
            })) => {
                hello.held.extend(part.held);
                hello.buckets.extend(part.buckets);
                hello.version = part.version;
                if !part.more {
                    return Ok(hello);
                }
            }
            Ok(Some(_)) => {
                return Err(End::Refused(Status::invalid_argument(
                    "the subscription must start with a Hello",
                )));
            }
            Ok(None) | Err(_) => return Err(End::Closed),
        }
    }
}

/// Serves one subscriber until it leaves.
async fn session(
    server: ConfigServer,
    caller: Caller,
    mut requests: Streaming<SubscribeRequest>,
    tx: mpsc::Sender<Result<ConfigUpdate, Status>>,
) -> End {
    // The Hello of a subscriber that held a whole config is as large as a
    // whole config's names: it is read under the sync permit, so that a
    // controller restart does not decode every data plane's at once.
    let first_permit = server.sync_permit().await;
    let hello = match read_hello(&mut requests).await {
        Ok(hello) => hello,
        Err(end) => return end,
    };
    tracing::info!(
        held = hello.held.len(),
        buckets = hello.buckets.len(),
        version = hello.version,
        "subscribed"
    );
    let mut first = Some((hello, first_permit));
    let mut tables = server.inner.table.subscribe();
    let mut held: Option<Held> = None;
    // The version sent, what the subscriber holds once it takes it, and
    // when it was sent.
    let mut in_flight: Option<(u64, Held, Instant)> = None;
    // A refused version is not sent again: the next one may be better.
    let mut refused: Option<u64> = None;
    loop {
        if in_flight.is_none() {
            let table = tables.borrow_and_update().clone();
            // A whole-config sync waits for a permit, taken before the
            // update is computed and held until it is sent.
            let mut permit = None;
            let pending = match &held {
                _ if table.version == 0 || refused == Some(table.version) => None,
                Some(h) if h.base == table.version => None,
                Some(h) => match server.changed_since(h.base) {
                    Some(changed) => Some(next(&table, &caller, h, Some(changed))),
                    None => {
                        permit = Some(server.sync_permit().await);
                        Some(next(&table, &caller, h, None))
                    }
                },
                None => {
                    // The Hello is dropped once the first update is made.
                    match first.take() {
                        Some((hello, first_permit)) => {
                            permit = Some(first_permit);
                            Some(initial(&table, &caller, &hello))
                        }
                        // The first update was refused: what the subscriber
                        // holds now is not known, so everything is replaced.
                        None => {
                            permit = Some(server.sync_permit().await);
                            Some(next(&table, &caller, &Held::default(), None))
                        }
                    }
                }
            };
            match pending {
                Some(p) if p.is_empty() && held.is_some() => held = Some(p.held),
                Some(p) => {
                    let (version, upserts, removals, full) =
                        (p.version, p.upserts.len(), p.removals.len(), p.full);
                    let held_next = p.held.clone();
                    let mut bytes = 0;
                    for part in p.parts() {
                        bytes += prost::Message::encoded_len(&part) as u64;
                        // The channel holds one message: a large update is
                        // encoded as fast as the subscriber reads it.
                        if tx.send(Ok(part)).await.is_err() {
                            return End::Closed;
                        }
                    }
                    tracing::debug!(version, upserts, removals, full, bytes, "update sent");
                    let metrics = &server.inner.metrics;
                    Metrics::add(&metrics.updates_sent, 1);
                    Metrics::add(&metrics.update_bytes_sent, bytes);
                    drop(permit);
                    in_flight = Some((version, held_next, Instant::now()));
                }
                None => {}
            }
        }
        let message = tokio::select! {
            changed = tables.changed() => {
                if changed.is_err() {
                    return End::Stopping;
                }
                continue;
            }
            message = requests.message() => message,
            () = server.inner.stop.cancelled() => return End::Stopping,
        };
        let message = match message {
            Ok(Some(m)) => m.request,
            Ok(None) | Err(_) => return End::Closed,
        };
        let answered = match &message {
            Some(Message::Ack(a)) => a.version,
            Some(Message::Nack(n)) => n.version,
            Some(Message::Hello(_)) | None => {
                return End::Refused(Status::invalid_argument("expected an ACK or a NACK"));
            }
        };
        let Some((version, next_held, sent)) = in_flight.take() else {
            return End::Refused(Status::invalid_argument(format!(
                "answer for version {answered}, but no update is waiting for one"
            )));
        };
        if version != answered {
            return End::Refused(Status::invalid_argument(format!(
                "answer for version {answered}, but version {} is waiting for one",
                version
            )));
        }
        match message {
            Some(Message::Nack(n)) => {
                Metrics::add(&server.inner.metrics.nacks, 1);
                tracing::warn!(version = n.version, reason = %n.reason, "config update refused by the subscriber; it keeps its last good config");
                refused = Some(n.version);
            }
            _ => {
                tracing::debug!(version = answered, elapsed = ?sent.elapsed(), "update acknowledged");
                held = Some(next_held);
                refused = None;
            }
        }
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigServer {
    type SubscribeStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = match authenticate(&*self.inner.auth, req.metadata()).await {
            Ok(caller) => caller,
            Err(status) => {
                tracing::warn!(peer = ?req.remote_addr(), reason = status.message(), "subscriber refused");
                Metrics::add(&self.inner.metrics.subscribers_refused, 1);
                return Err(status);
            }
        };
        let requests = req.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let server = self.clone();
        let span = tracing::info_span!("subscriber", ?caller);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let metrics = server.inner.metrics.clone();
                metrics
                    .subscribers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let end = session(server, caller, requests, tx.clone()).await;
                metrics
                    .subscribers
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                match end {
                    End::Closed => tracing::info!("unsubscribed"),
                    End::Refused(status) => {
                        Metrics::add(&metrics.subscribers_refused, 1);
                        tracing::warn!(
                            reason = status.message(),
                            "subscription ended: protocol error"
                        );
                        let _ = tx.send(Err(status)).await;
                    }
                    End::Stopping => {
                        let _ = tx
                            .send(Err(Status::unavailable("the controller is stopping")))
                            .await;
                    }
                }
            },
            span,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
