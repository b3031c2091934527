//! The config stream over TLS with the real data plane client: snapshot
//! then deltas, per-node policies, ordering, NACK, reconnect and resume,
//! a controller restart under running data planes, refused strangers.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control_client::{Controller, StreamSource, Subscription, controller_identity};
use controller::auth::BootstrapTokens;
use controller::metrics::Metrics;
use controller::server::{ServingCert, serve};
use controller::stream::ConfigServer;
use identity::ca::DEFAULT_LEAF_TTL;
use identity::{CertificateAuthority, TrustDomain};
use model::proto::config::config_service_server::ConfigServiceServer;
use model::proto::config::{ConfigUpdate, Hello, Kind, ResourceVersion};
use model::{ConfigSink, ConfigSource, MeshConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn token(node: &str) -> String {
    format!("{node}-bootstrap-token-0123456789")
}

/// A controller's config endpoint on loopback.
struct Server {
    addr: SocketAddr,
    config: ConfigServer,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    /// The serving task; done once its listener is closed.
    served: tokio::task::JoinHandle<()>,
}

async fn start(ca: &Arc<CertificateAuthority>, addr: SocketAddr) -> Server {
    let tokens = NODES
        .iter()
        .map(|n| format!("{{token: {}, node: {n}}}", token(n)))
        .collect::<Vec<_>>()
        .join(", ");
    let auth = Arc::new(BootstrapTokens::parse(&format!("tokens: [{tokens}]")).unwrap());
    let metrics = Arc::new(Metrics::default());
    let stop = CancellationToken::new();
    let config = ConfigServer::new(auth, metrics.clone(), stop.clone());
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = tonic::service::Routes::new(ConfigServiceServer::new(config.clone()));
    let served = tokio::spawn(serve(
        listener,
        ServingCert::new(ca.clone()),
        routes,
        stop.clone(),
    ));
    Server {
        addr,
        config,
        metrics,
        stop,
        served,
    }
}

fn new_ca() -> Arc<CertificateAuthority> {
    let td: TrustDomain = "cluster.local".parse().unwrap();
    Arc::new(CertificateAuthority::self_signed(td, DEFAULT_LEAF_TTL).unwrap())
}

fn controller(ca: &CertificateAuthority, addr: SocketAddr, token: String) -> Controller {
    Controller::new(
        addr,
        token,
        ca.roots(),
        controller_identity(ca.trust_domain()),
    )
    .unwrap()
}

/// A ztunnel's config: its sink fed by the stream.
fn subscribe(
    ca: &CertificateAuthority,
    addr: SocketAddr,
    node: &str,
) -> (ConfigSink, CancellationToken) {
    let sink = ConfigSink::new();
    let stop = CancellationToken::new();
    let source = Box::new(StreamSource::new(controller(ca, addr, token(node))));
    tokio::spawn(source.run(sink.clone(), stop.clone()));
    (sink, stop)
}

/// Pods `web-<i>` on the nodes in turn, a service over all, and a policy
/// selecting `app=web-0` (on n1) only.
fn mesh(pods: usize, label: &str) -> MeshConfig {
    let mut yaml = String::from("workloads:\n");
    for i in 0..pods {
        yaml.push_str(&format!(
            "  - {{uid: u{i}, name: web-{i}, namespace: shop, serviceAccount: web, ips: [10.0.{}.{}], node: {}, labels: {{app: web-{i}, rev: \"{label}\"}}}}\n",
            i / 250,
            i % 250 + 1,
            NODES[i % NODES.len()]
        ));
    }
    yaml.push_str("services:\n  - {name: web, namespace: shop, vips: [10.96.0.1], ports: [{port: 80}], endpoints: [");
    yaml.push_str(
        &(0..pods)
            .map(|i| format!("u{i}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    yaml.push_str("]}\nauthorizationPolicies:\n  - {name: deny-legacy, namespace: shop, selector: {app: web-0}, action: DENY, rules: [{from: [{namespaces: [legacy]}]}]}\n");
    serde_yaml::from_str(&yaml).unwrap()
}

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(what, Duration::from_secs(10), check).await;
}

async fn eventually_within<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rev(sink: &ConfigSink) -> Option<String> {
    sink.current()
        .config()
        .workloads
        .first()?
        .labels
        .get("rev")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_subscribers_follow_ordered_updates_with_their_own_policies() {
    let ca = new_ca();
    let server = start(&ca, "127.0.0.1:0".parse().unwrap()).await;
    server.config.publish(mesh(6, "0"));
    let subs: Vec<_> = NODES
        .iter()
        .map(|n| subscribe(&ca, server.addr, n))
        .collect();
    for (sink, _) in &subs {
        eventually("the first config", || async {
            sink.current().config().workloads.len() == 6
        })
        .await;
    }
    // Every node gets every workload and service; the policy only goes to
    // n1, whose pod it selects.
    let policies: Vec<usize> = subs
        .iter()
        .map(|(s, _)| s.current().config().authorization_policies.len())
        .collect();
    assert_eq!(policies, [1, 0, 0]);
    assert!(
        subs.iter()
            .all(|(s, _)| s.current().config().services.len() == 1)
    );

    // Twenty updates in a row: each subscriber sees the revisions in order
    // (updates may be folded together, never reordered) and ends on the last.
    let mut watchers: Vec<_> = subs.iter().map(|(s, _)| s.subscribe()).collect();
    let seen = watchers
        .iter_mut()
        .map(|rx| {
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let mut revs = Vec::new();
                while rx.changed().await.is_ok() {
                    let r: u32 = rx.borrow_and_update().config().workloads[0].labels["rev"]
                        .parse()
                        .unwrap();
                    revs.push(r);
                    if r == 20 {
                        break;
                    }
                }
                revs
            })
        })
        .collect::<Vec<_>>();
    for r in 1..=20 {
        server.config.publish(mesh(6, &r.to_string()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for task in seen {
        let revs = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            revs.windows(2).all(|w| w[0] < w[1]),
            "out of order: {revs:?}"
        );
        assert_eq!(revs.last(), Some(&20));
    }
    // A policy that now selects n2's pod too reaches n2, and n1 keeps it.
    let mut config = mesh(6, "20");
    config.authorization_policies[0].selector.clear();
    config.authorization_policies[0]
        .selector
        .insert("rev".into(), "20".into());
    server.config.publish(config);
    for (sink, _) in &subs {
        eventually("the widened policy", || async {
            sink.current().config().authorization_policies.len() == 1
        })
        .await;
    }
    assert_eq!(Metrics::get(&server.metrics.nacks), 0);
    assert_eq!(
        server
            .metrics
            .subscribers
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    for (_, stop) in subs {
        stop.cancel();
    }
    server.stop.cancel();
}

/// The first update of a subscription from nothing, acknowledged.
async fn first_update(ctl: &Controller) -> ConfigUpdate {
    let mut sub = Subscription::open(ctl, Hello::default()).await.unwrap();
    let first = sub.next_update().await.unwrap().unwrap();
    sub.ack(first.version).await.unwrap();
    first
}

/// `mesh(600, "a")` after one pod changed and one went away (and so the
/// Service's endpoints changed).
fn one_changed_one_gone() -> MeshConfig {
    let mut config = mesh(600, "a");
    config.workloads[4]
        .labels
        .insert("extra".into(), "1".into());
    config.workloads.remove(29);
    config.services[0].endpoints.retain(|e| e != "u29");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubscriber_gets_only_what_changed_since_what_it_holds() {
    let ca = new_ca();
    let server = start(&ca, "127.0.0.1:0".parse().unwrap()).await;
    server.config.publish(mesh(600, "a"));
    let ctl = controller(&ca, server.addr, token("n2"));

    // From nothing: everything n2 needs (600 workloads and the service).
    let first = first_update(&ctl).await;
    assert_eq!(first.upserts.len(), 601);
    assert!(first.removals.is_empty());
    let held: Vec<ResourceVersion> = first
        .upserts
        .iter()
        .map(|r| ResourceVersion {
            kind: r.kind,
            name: r.name.clone(),
            digest: r.digest,
        })
        .collect();

    // Meanwhile one pod changed and one went away.
    server.config.publish(one_changed_one_gone());

    // Back with what it holds (601 resources: a Hello in 3 parts): only
    // the differences come.
    let mut sub = Subscription::open(
        &ctl,
        Hello {
            held,
            version: first.version,
            ..Hello::default()
        },
    )
    .await
    .unwrap();
    let update = sub.next_update().await.unwrap().unwrap();
    let mut upserts: Vec<&str> = update.upserts.iter().map(|r| r.name.as_str()).collect();
    upserts.sort_unstable();
    assert_eq!(upserts, ["shop/web", "u4"]);
    assert_eq!(update.removals.len(), 1);
    assert_eq!(update.removals[0].name, "u29");
    assert_eq!(update.removals[0].kind, i32::from(Kind::Workload));
    assert!(!update.full);
    server.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubscriber_summing_up_by_bucket_gets_the_buckets_that_changed() {
    use model::resources::{bucket, bucket_digests};
    let ca = new_ca();
    let server = start(&ca, "127.0.0.1:0".parse().unwrap()).await;
    server.config.publish(mesh(600, "a"));
    let ctl = controller(&ca, server.addr, token("n2"));
    let first = first_update(&ctl).await;
    let buckets = bucket_digests(
        first
            .upserts
            .iter()
            .map(|r| (Kind::try_from(r.kind).unwrap(), r.name.as_str(), r.digest)),
    );

    // Unchanged: an empty first update.
    let hello = || Hello {
        buckets: buckets.clone(),
        version: first.version,
        ..Hello::default()
    };
    let mut sub = Subscription::open(&ctl, hello()).await.unwrap();
    let update = sub.next_update().await.unwrap().unwrap();
    assert!(update.upserts.is_empty() && update.removals.is_empty());
    assert!(update.replaced_buckets.is_empty());
    drop(sub);

    // One pod changed, one went away (and so the Service changed): the
    // buckets of those three, whole, and nothing else.
    let config = one_changed_one_gone();
    server.config.publish(config.clone());
    let mut sub = Subscription::open(&ctl, hello()).await.unwrap();
    let update = sub.next_update().await.unwrap().unwrap();
    let mut replaced: Vec<usize> = [
        bucket(Kind::Workload, "u4"),
        bucket(Kind::Workload, "u29"),
        bucket(Kind::Service, "shop/web"),
    ]
    .into();
    replaced.sort_unstable();
    replaced.dedup();
    let got: Vec<usize> = update
        .replaced_buckets
        .iter()
        .map(|b| *b as usize)
        .collect();
    assert_eq!(got, replaced);
    let mut upserts: Vec<String> = update.upserts.iter().map(|r| r.name.clone()).collect();
    let mut expected: Vec<String> = model::resources::items(config)
        .map(|i| i.key())
        .filter(|(k, n)| replaced.contains(&bucket(*k, n)))
        .map(|(_, n)| n)
        .collect();
    upserts.sort();
    expected.sort();
    assert_eq!(upserts, expected);
    assert!(upserts.len() < 20, "{} resent", upserts.len());
    assert!(update.removals.is_empty() && !update.full);
    server.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refused_first_update_the_next_replaces_everything() {
    let ca = new_ca();
    let server = start(&ca, "127.0.0.1:0".parse().unwrap()).await;
    server.config.publish(mesh(3, "a"));
    let ctl = controller(&ca, server.addr, token("n2"));
    let mut sub = Subscription::open(&ctl, Hello::default()).await.unwrap();
    let first = sub.next_update().await.unwrap().unwrap();
    sub.nack(first.version, "refused".into()).await.unwrap();
    // What the subscriber holds is not known any more: the next update is
    // a whole config, not a delta against nothing.
    server.config.publish(mesh(3, "b"));
    let next = sub.next_update().await.unwrap().unwrap();
    assert!(next.full);
    assert_eq!(next.upserts.len(), 4);
    server.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_is_reported_and_the_last_good_config_stays() {
    let ca = new_ca();
    let server = start(&ca, "127.0.0.1:0".parse().unwrap()).await;
    server.config.publish(mesh(3, "good"));
    let (sink, stop) = subscribe(&ca, server.addr, "n1");
    eventually("the first config", || async {
        rev(&sink).as_deref() == Some("good")
    })
    .await;

    // Two pods on one IP: the data plane refuses the update whole.
    let mut bad = mesh(3, "bad");
    bad.workloads[1].ips = bad.workloads[0].ips.clone();
    server.config.publish(bad);
    eventually("the NACK", || async {
        Metrics::get(&server.metrics.nacks) == 1
    })
    .await;
    assert_eq!(rev(&sink).as_deref(), Some("good"));
    assert_eq!(sink.rejected(), 1);

    // The next good config is taken.
    server.config.publish(mesh(3, "fixed"));
    eventually("the fixed config", || async {
        rev(&sink).as_deref() == Some("fixed")
    })
    .await;
    assert_eq!(Metrics::get(&server.metrics.nacks), 1);
    stop.cancel();
    server.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_planes_keep_their_config_through_a_controller_restart() {
    let ca = new_ca();
    let server = start(&ca, "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    server.config.publish(mesh(6, "before"));
    let subs: Vec<_> = NODES.iter().map(|n| subscribe(&ca, addr, n)).collect();
    for (sink, _) in &subs {
        eventually("the first config", || async {
            rev(sink).as_deref() == Some("before")
        })
        .await;
    }

    // The controller goes away: the data planes keep serving what they had.
    // Its address is free again once the serving task has ended.
    server.stop.cancel();
    server.served.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (sink, _) in &subs {
        assert_eq!(rev(sink).as_deref(), Some("before"));
        assert_eq!(sink.current().config().workloads.len(), 6);
    }

    // A new controller (same CA, same address) with a newer config: every
    // data plane reconnects and resyncs, sending what it holds, so only the
    // changed workloads travel.
    let server = start(&ca, addr).await;
    let mut config = mesh(6, "before");
    config.workloads[0]
        .labels
        .insert("rev".into(), "after".into());
    server.config.publish(config);
    for (sink, _) in &subs {
        eventually("the resync", || async {
            rev(sink).as_deref() == Some("after")
        })
        .await;
    }
    // One update per data plane, each carrying the one changed workload
    // (n1's also its policy, which it held too: not resent).
    assert_eq!(Metrics::get(&server.metrics.updates_sent), 3);
    let one_workload = model::resources::items(mesh(1, "after"))
        .next()
        .unwrap()
        .encode();
    let bytes = Metrics::get(&server.metrics.update_bytes_sent);
    assert!(
        bytes < 3 * (prost::Message::encoded_len(&one_workload) as u64 + 64),
        "{bytes} bytes resent"
    );
    for (_, stop) in subs {
        stop.cancel();
    }
    server.stop.cancel();
}

#[tokio::test]
async fn unauthenticated_subscribers_are_refused() {
    let ca = new_ca();
    let server = start(&ca, "127.0.0.1:0".parse().unwrap()).await;
    server.config.publish(mesh(1, "x"));
    let ctl = controller(&ca, server.addr, "not-a-known-token-at-all".into());
    let err = match Subscription::open(&ctl, Hello::default()).await {
        Err(e) => e,
        Ok(mut sub) => sub.next_update().await.unwrap_err(),
    };
    let err = err.to_string();
    assert!(err.contains("unknown token"), "{err}");
    assert_eq!(Metrics::get(&server.metrics.subscribers_refused), 1);
    server.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_update_arrives_in_parts_and_is_applied_whole() {
    let ca = new_ca();
    let server = start(&ca, "127.0.0.1:0".parse().unwrap()).await;
    // About 8 MiB of workloads: more than one part, and more than gRPC's
    // default message limit if it were sent at once.
    let mut config = mesh(20_000, "big");
    for w in &mut config.workloads {
        w.labels.insert("padding".into(), "x".repeat(300));
    }
    server.config.publish(config);
    let ctl = controller(&ca, server.addr, token("n1"));
    let mut sub = Subscription::open(&ctl, Hello::default()).await.unwrap();
    let mut parts = 0;
    loop {
        let part = sub.next().await.unwrap().unwrap();
        parts += 1;
        assert!(prost::Message::encoded_len(&part) < 2 << 20);
        if !part.more {
            break;
        }
    }
    assert!(parts >= 5, "{parts} parts");
    drop(sub);

    let (sink, stop) = subscribe(&ca, server.addr, "n1");
    // Building 20,000 workloads' snapshot is unoptimised test-profile code
    // on a shared machine; what is checked is that all of them arrive.
    eventually_within("the whole config", Duration::from_secs(60), || async {
        sink.current().config().workloads.len() == 20_000
    })
    .await;
    assert_eq!(Metrics::get(&server.metrics.nacks), 0);
    stop.cancel();
    server.stop.cancel();
}
