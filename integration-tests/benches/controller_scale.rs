//! The controller at scale: a fake API server holding 1,000 nodes, 50,000
//! pods and 10,000 services (with their EndpointSlices), the release
//! `controller serve` process watching it, and one config subscriber per
//! node (real TLS gRPC streams). Measures the first sync, then the time
//! from a pod change at the API server to every subscriber holding it,
//! the bytes sent per subscriber per change, and the controller's memory;
//! then restarts the controller and measures how all subscribers, each
//! saying what it holds, resync with the new process.
//! Prints a Markdown table for `docs/benchmarks.md`:
//!
//! ```sh
//! cargo bench -p integration-tests --bench controller_scale
//! ```
//!
//! `AMBIT_SCALE=nodes,pods,services,changes` changes the sizes.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A report, not a library.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control_client::{Controller, Subscription, controller_identity};
use controller::token_review::NODE_NAME_EXTRA;
use integration_tests::fake_api::FakeApiServer;
use model::proto::config::{Hello, Kind};
use serde_json::json;
use tokio::sync::{mpsc, watch};

/// Kills the controller on drop, also when the benchmark fails.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The release controller binary, built now.
fn controller_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "controller"])
        .current_dir(workspace())
        .status()
        .unwrap();
    assert!(status.success(), "building the controller failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"));
    target.join("release").join("controller")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .unwrap()
}

/// A page of the controller's ops endpoint, if it answers 200.
async fn get(ops: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", ops))
        .await
        .ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_string())
}

async fn metric(ops: u16, name: &str) -> f64 {
    get(ops, "/metrics")
        .await
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What a subscriber saw: (subscriber, revision of the probe pod, when).
type Seen = (usize, Option<u64>, Instant);

fn main() {
    // `cargo test --benches` runs this with `--test`: nothing to check.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("AMBIT_SCALE")
        .unwrap_or_else(|_| "1000,50000,10000,40".into())
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    let [nodes, pods, services, changes] = sizes[..] else {
        panic!("AMBIT_SCALE=nodes,pods,services,changes")
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(nodes, pods, services, changes));
}

async fn run(nodes: usize, pods: usize, services: usize, changes: usize) {
    let binary = controller_binary();
    let api = FakeApiServer::start().await;
    let namespaces = (services / 20).max(1);
    let started = Instant::now();
    fill(&api, nodes, pods, services, namespaces);
    eprintln!(
        "cluster of {nodes} nodes, {pods} pods, {services} services in {:?}",
        started.elapsed()
    );

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: '{}'}}}}]\n\
             users: [{{name: bench, user: {{}}}}]\ncontexts: [{{name: bench, context: {{cluster: fake, user: bench}}}}]\n\
             current-context: bench\n",
            api.url()
        ),
    )
    .unwrap();
    let (grpc, ops) = (free_port(), free_port());
    let spawned = Instant::now();
    let child = spawn_controller(&binary, &kubeconfig, grpc, ops);
    let pid = child.0.id();
    while get(ops, "/ready").await.is_none() {
        assert!(
            spawned.elapsed() < Duration::from_secs(300),
            "controller not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_after = spawned.elapsed();
    let rss_ready = status_kib(pid, "VmRSS:");

    // The root the controller created in its Secret.
    let secret = api
        .get("/api/v1/namespaces/ambit-system/secrets", "ambit-ca")
        .unwrap();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret).unwrap();
    let root_pem = String::from_utf8(secret.data.unwrap()["root-cert.pem"].0.clone()).unwrap();
    let roots = identity::ca::certs(&root_pem, "root").unwrap();
    let td: identity::TrustDomain = "cluster.local".parse().unwrap();

    // One subscriber per node. Subscriber 0 keeps what it holds; after the
    // restart every subscriber says it holds that (they all hold the same:
    // the benchmark has no policies).
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    let (resynced_tx, mut resynced) = mpsc::unbounded_channel::<usize>();
    let (resume_tx, resume) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let held: Arc<Mutex<HashMap<(i32, String), u64>>> = Arc::default();
    let probe_uid = "uid-p0".to_string();
    let sync_start = Instant::now();
    for n in 0..nodes {
        let ctl = Controller::new(
            format!("127.0.0.1:{grpc}").parse().unwrap(),
            format!("node-token-{n:05}"),
            &roots,
            controller_identity(&td),
        )
        .unwrap();
        let (tx, probe) = (tx.clone(), probe_uid.clone());
        let (resynced, mut resume) = (resynced_tx.clone(), resume.clone());
        let held = (n == 0).then(|| held.clone());
        tokio::spawn(async move {
            // As data planes do, retry while the controller is busy with
            // everyone's first sync.
            let mut sub = loop {
                match Subscription::open(&ctl, Hello::default()).await {
                    Ok(sub) => break sub,
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            };
            // Ends when the controller is stopped.
            while let Ok(Some(update)) = sub.next_update().await {
                if let Some(held) = &held {
                    let mut held = held.lock().unwrap();
                    if update.full {
                        held.clear();
                    }
                    for r in &update.upserts {
                        held.insert((r.kind, r.name.clone()), r.digest);
                    }
                    for r in &update.removals {
                        held.remove(&(r.kind, r.name.clone()));
                    }
                }
                let at = Instant::now();
                let rev = update
                    .upserts
                    .iter()
                    .find(|r| r.kind == i32::from(Kind::Workload) && r.name == probe)
                    .and_then(|r| {
                        let w: model::Workload = serde_json::from_slice(&r.json).ok()?;
                        w.labels.get("rev")?.parse().ok()
                    });
                let _ = tx.send((n, rev, at));
                if sub.ack(update.version).await.is_err() {
                    break;
                }
            }
            // The controller restarts: back with what it holds, summed up
            // per bucket (as `StreamSource` does).
            let Ok(buckets) = resume.wait_for(Option::is_some).await.map(|l| l.clone()) else {
                return;
            };
            let buckets = buckets.unwrap_or_default();
            let mut sub = loop {
                let hello = Hello {
                    buckets: buckets.to_vec(),
                    ..Hello::default()
                };
                match Subscription::open(&ctl, hello).await {
                    Ok(sub) => break sub,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            if let Ok(Some(update)) = sub.next_update().await {
                let _ = resynced.send(update.upserts.len() + update.removals.len());
                let _ = sub.ack(update.version).await;
                // Stay subscribed until the end.
                while let Ok(Some(_)) = sub.next_update().await {}
            }
        });
    }
    let mut synced = 0;
    while synced < nodes {
        rx.recv().await.unwrap();
        synced += 1;
    }
    let sync_time = sync_start.elapsed();
    let sync_bytes = metric(ops, "ambit_controller_config_sent_bytes_total").await;
    let rss_synced = status_kib(pid, "VmRSS:");
    let translated = || async {
        (
            metric(ops, "ambit_controller_translation_duration_seconds_sum").await,
            metric(ops, "ambit_controller_translation_duration_seconds_count").await,
        )
    };
    let (first_sum, first_count) = translated().await;

    // Pod changes, one at a time.
    let mut propagation = Vec::new();
    let mut bytes_per_update = Vec::new();
    for rev in 1..=changes as u64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        while rx.try_recv().is_ok() {}
        let (sent_before, updates_before) = (
            metric(ops, "ambit_controller_config_sent_bytes_total").await,
            metric(ops, "ambit_controller_config_updates_sent_total").await,
        );
        let t0 = Instant::now();
        api.apply(
            "/api/v1/namespaces/ns-0/pods",
            pod(0, nodes, namespaces, rev),
        );
        let mut seen = 0;
        let mut last = t0;
        while seen < nodes {
            let (_, r, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("every subscriber updated within 30 s")
                .unwrap();
            if r == Some(rev) {
                seen += 1;
                last = last.max(at);
            }
        }
        propagation.push(last - t0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sent = metric(ops, "ambit_controller_config_sent_bytes_total").await - sent_before;
        let updates =
            metric(ops, "ambit_controller_config_updates_sent_total").await - updates_before;
        bytes_per_update.push(sent / updates.max(1.0));
    }
    propagation.sort();
    let (sum, count) = translated().await;
    let translation_first = first_sum / first_count.max(1.0);
    let translation = (sum - first_sum) / (count - first_count).max(1.0);
    let rss_end = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");

    // Restart: every subscriber comes back saying what it holds.
    let held = held.lock().unwrap().clone();
    let held_count = held.len();
    let buckets =
        model::resources::bucket_digests(held.iter().map(|((kind, name), digest)| {
            (Kind::try_from(*kind).unwrap(), name.as_str(), *digest)
        }));
    resume_tx.send_replace(Some(Arc::new(buckets)));
    drop(child);
    let restarted = Instant::now();
    let child = spawn_controller(&binary, &kubeconfig, grpc, ops);
    let pid = child.0.id();
    let mut resent = 0;
    for _ in 0..nodes {
        resent += tokio::time::timeout(Duration::from_secs(600), resynced.recv())
            .await
            .expect("every subscriber resynced within 10 minutes")
            .unwrap();
    }
    let resync_time = restarted.elapsed();
    let resync_bytes = metric(ops, "ambit_controller_config_sent_bytes_total").await;
    let rss_resynced = status_kib(pid, "VmRSS:");
    let hwm_resynced = status_kib(pid, "VmHWM:");
    let mean_bytes = bytes_per_update.iter().sum::<f64>() / bytes_per_update.len() as f64;
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    println!("| {nodes} nodes, {pods} pods, {services} services | |");
    println!("|---|---|");
    println!(
        "| controller ready (lists done, first config) | {} |",
        ms(ready_after)
    );
    println!(
        "| first sync of {nodes} subscribers | {} , {:.0} MB sent ({:.1} MB each) |",
        ms(sync_time),
        sync_bytes / 1e6,
        sync_bytes / 1e6 / nodes as f64
    );
    println!(
        "| pod change → all {nodes} subscribers updated, {changes} changes | p50 {}, p99 {}, max {} |",
        ms(percentile(&propagation, 0.5)),
        ms(percentile(&propagation, 0.99)),
        ms(*propagation.last().unwrap())
    );
    println!("| bytes sent per subscriber per pod change | {mean_bytes:.0} B |");
    println!(
        "| translation: whole cluster (mean of the flushes before the first sync) / per pod change | {:.0} ms / {:.2} ms |",
        translation_first * 1e3,
        translation * 1e3
    );
    println!(
        "| controller RSS ready (no subscriber) / after first sync / at end / peak | {:.0} / {:.0} / {:.0} / {:.0} MB |",
        rss_ready as f64 / 1024.0,
        rss_synced as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "| controller restart → all {nodes} subscribers resynced, each holding {held_count} resources | {}, {resent} resources resent, {:.0} B sent per subscriber |",
        ms(resync_time),
        resync_bytes / nodes as f64
    );
    println!(
        "| restarted controller RSS after the resync / peak | {:.0} / {:.0} MB |",
        rss_resynced as f64 / 1024.0,
        hwm_resynced as f64 / 1024.0
    );
    drop(child);
}

fn spawn_controller(binary: &Path, kubeconfig: &Path, grpc: u16, ops: u16) -> Killed {
    Killed(
        Command::new(binary)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{grpc}"),
                "--ops",
                &format!("127.0.0.1:{ops}"),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", "controller-bench")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn pod(i: usize, nodes: usize, namespaces: usize, rev: u64) -> serde_json::Value {
    let ns = i % namespaces;
    let ip = 0x0a00_0000u32 + 0x1_0000 + i as u32;
    let ip = std::net::Ipv4Addr::from(ip).to_string();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("p{i}"), "namespace": format!("ns-{ns}"), "uid": format!("uid-p{i}"),
                     "labels": {"app": format!("svc-{}", i / 5), "rev": rev.to_string()}},
        "spec": {"nodeName": format!("node-{:05}", i % nodes), "serviceAccountName": format!("sa-{}", i % 7),
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

/// Namespaces `ns-*` (meshed), nodes, pods `p<i>` (service `svc-<i/5>`
/// selects five of them, in the namespace of its first pod), and tokens.
fn fill(api: &FakeApiServer, nodes: usize, pods: usize, services: usize, namespaces: usize) {
    api.apply(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ambit-system"}}),
    );
    for ns in 0..namespaces {
        api.apply(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": format!("ns-{ns}"), "labels": {"ambit.dev/dataplane-mode": "ambient"}}}),
        );
    }
    for n in 0..nodes {
        api.apply(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n:05}")}}),
        );
        api.add_token(
            &format!("node-token-{n:05}"),
            "system:serviceaccount:ambit-system:ztunnel",
            &[(NODE_NAME_EXTRA, &format!("node-{n:05}"))],
        );
    }
    for i in 0..pods {
        let ns = i % namespaces;
        api.apply(
            &format!("/api/v1/namespaces/ns-{ns}/pods"),
            pod(i, nodes, namespaces, 0),
        );
    }
    for s in 0..services {
        // Service s selects pods 5s..5s+5; pods sit in namespace i %
        // namespaces, so the service lives with its first pod and its
        // slice lists the five (cross-namespace endpoints do not occur in
        // Kubernetes, but cost the translation the same).
        let first = s * 5;
        let ns = first % namespaces;
        let vip = std::net::Ipv4Addr::from(0x0a60_0000u32 + s as u32 + 1).to_string();
        api.apply(
            &format!("/api/v1/namespaces/ns-{ns}/services"),
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("svc-{s}"), "namespace": format!("ns-{ns}")},
                "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": format!("svc-{s}")},
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        );
        let endpoints: Vec<_> = (first..(first + 5).min(pods))
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + 0x1_0000 + i as u32).to_string();
                json!({"addresses": [ip], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": format!("p{i}"), "uid": format!("uid-p{i}")}})
            })
            .collect();
        api.apply(
            &format!("/apis/discovery.k8s.io/v1/namespaces/ns-{ns}/endpointslices"),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("svc-{s}-x"), "namespace": format!("ns-{ns}"),
                             "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
                "addressType": "IPv4", "endpoints": endpoints,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
        );
    }
}
