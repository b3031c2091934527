//! The node agent on real lab pods: enrollment over the Unix socket and the
//! pods file, captured outbound and inbound traffic served by ztunnel, and
//! release. Needs root; under CI a missing root is a failure.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::{TestLab, require_root, spec};
use lab::Lab;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use ztunnel::agent::PodInfo;
use ztunnel::app::{self, Config};
use ztunnel::enroll::{Reply, Request};

/// A pin directory of the test's own, removed on drop.
struct Pins(PathBuf);

impl Pins {
    fn new(name: &str) -> Pins {
        lab::ensure_bpffs().unwrap();
        let dir = Path::new(lab::BPFFS).join("ambit-test").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        Pins(dir)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // The shared parent goes with the last test using it.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// What one test runs ztunnel on: a two-node lab with an echo server and a
/// client, not meshed (the test enrolls pods itself), in ranges no other
/// test uses; ztunnel's own pin directory; and a scratch directory for the
/// enrollment socket and the pods file. All of it goes on drop, also when
/// the test fails.
struct Node {
    t: TestLab,
    pins: Pins,
    dir: tempfile::TempDir,
}

impl Node {
    fn up(name: &str, slot: u8) -> Node {
        let mut spec = spec(name, slot, 2, 1);
        spec.services.clear();
        Node {
            t: TestLab::up(spec),
            pins: Pins::new(name),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn lab(&self) -> &Lab {
        &self.t.lab
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("enroll.sock")
    }

    fn pods_file(&self) -> PathBuf {
        self.dir.path().join("pods.json")
    }

    /// Writes the pods file with `pods`.
    fn write_pods(&self, pods: &[&PodInfo]) {
        std::fs::write(self.pods_file(), serde_json::to_string(pods).unwrap()).unwrap();
    }

    /// ztunnel's config, taking its pods from the pods file, the
    /// enrollment socket, or both.
    fn config(&self, pods_file: bool, socket: bool) -> Config {
        Config {
            node: "n1".into(),
            pods_file: pods_file.then(|| self.pods_file()),
            enroll_socket: socket.then(|| self.socket()),
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            logging: None,
            heap_stats: None,
            bpf_dir: self.pins.0.clone(),
            mesh_config: None,
            ca_dir: None,
            trust_domain: "cluster.local".into(),
            controller: None,
            exclusions: Default::default(),
        }
    }

    fn info(&self, key: &str) -> PodInfo {
        info(self.lab(), key)
    }

    /// Enrolls `pods` over the socket; each must be accepted.
    async fn enroll(&self, pods: &[&PodInfo]) {
        for pod in pods {
            let reply = request(&self.socket(), &Request::Add((*pod).clone())).await;
            assert_eq!(
                reply,
                Reply {
                    ok: true,
                    error: None
                },
                "{}",
                pod.name
            );
        }
    }
}

fn info(lab: &Lab, key: &str) -> PodInfo {
    let p = lab.plan().pod(key).unwrap();
    PodInfo {
        uid: p.uid.clone(),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        ip: p.ip,
        netns: Path::new("/var/run/netns").join(&p.netns),
        cgroup: p.cgroup.clone(),
        identity: format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            p.namespace, p.service_account
        ),
    }
}

async fn curl(lab: &Lab, pod: &str, url: &str) -> Result<serde_json::Value, String> {
    let out = lab
        .exec_captured(pod, &["curl", "-sS", "--max-time", "5", url])
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
const FWMARK_REFLECT: &str = "/proc/sys/net/ipv4/fwmark_reflect";

/// The standard output of `argv` run in a pod's network namespace.
fn in_netns(netns: &Path, argv: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(argv)
        .output()
        .unwrap();
    assert!(out.status.success(), "{argv:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

async fn request(socket: &Path, req: &Request) -> Reply {
    let conn = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (read, mut write) = conn.into_split();
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    write.write_all(&line).await.unwrap();
    let mut reply = String::new();
    BufReader::new(read).read_line(&mut reply).await.unwrap();
    serde_json::from_str(&reply).unwrap()
}

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").await
}

/// The whole HTTP/1.1 response, status line first.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tcp, &mut text)
        .await
        .unwrap();
    text
}

/// Asserts that a curl from `pod` to `url` fails at once (not by timing
/// out).
async fn refused_at_once(lab: &Lab, pod: &str, url: &str) {
    let error = curl(lab, pod, url).await.unwrap_err();
    assert!(!error.contains("timed out"), "{url}: {error}");
}

/// Asserts that the failed-connection counter has a series with every one
/// of `labels` (`name="value"`).
async fn failed_with(addr: std::net::SocketAddr, labels: &[&str]) {
    let text = metrics_text(addr).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("ambit_tcp_connections_failed_total{")
                && labels.iter().all(|label| l.contains(label))),
        "no failed connection with {labels:?}: {text}"
    );
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let text = metrics_text(addr).await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits up to 5 s for the gauge or counter `name` to read `want`.
async fn wait_for_metric(addr: std::net::SocketAddr, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = metric(addr, name).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {now}, never {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that the echo server saw the connection come from `ip`.
fn assert_peer(reply: &serde_json::Value, ip: std::net::Ipv4Addr) {
    assert!(
        reply["peer"]
            .as_str()
            .is_some_and(|peer| peer.starts_with(&format!("{ip}:"))),
        "expected a connection from {ip}: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_pods_are_served_by_ztunnel_and_release_restores_direct_traffic() {
    if !require_root("enrolled_pods_are_served_by_ztunnel_and_release_restores_direct_traffic") {
        return;
    }
    let node = Node::up("zt-agent", 31);
    let lab = node.lab();
    let app = app::build(node.config(false, true)).await.unwrap();
    let echo = node.info("app/echo-0");
    let client = node.info("app/sleep-0");
    let url = format!("http://{}:8080/", echo.ip);

    node.enroll(&[&client, &echo]).await;
    assert_eq!(
        metric(app.metrics_addr, "ambit_ztunnel_captured_pods").await,
        2
    );
    // Both ends captured: client → 15001 → ztunnel → echo's 15006 → ztunnel
    // → app, which still sees the client's own address (source preserved).
    let reply = curl(lab, "app/sleep-0", &url).await.unwrap();
    assert_eq!(reply["pod"], "echo-0");
    assert_peer(&reply, client.ip);
    assert!(metric(app.metrics_addr, "ambit_ztunnel_outbound_connections_total").await >= 1);
    assert!(metric(app.metrics_addr, "ambit_ztunnel_inbound_connections_total").await >= 1);
    // The return path marks sockets, not conntrack entries: the pod's
    // namespace has no netfilter rules, so no connection tracking.
    assert_eq!(
        in_netns(&echo.netns, &["cat", FWMARK_ACCEPT, FWMARK_REFLECT]),
        "1\n1\n"
    );
    assert_eq!(in_netns(&echo.netns, &["nft", "list", "ruleset"]), "");
    // The kernel's reset for a closed port finds its way back to ztunnel
    // too, so the client is told at once instead of waiting out its timeout.
    let closed = format!("http://{}:8081/", echo.ip);
    refused_at_once(lab, "app/sleep-0", &closed).await;
    // ztunnel's own inbound port, dialled directly, is closed at once
    // instead of being forwarded to the pod's address: its own listener.
    let own = format!("http://{}:15006/", echo.ip);
    refused_at_once(lab, "app/sleep-0", &own).await;
    // A connection to 15001 the capture did not redirect has nowhere to
    // go: closed, and counted with its reason.
    refused_at_once(lab, "app/sleep-0", "http://127.0.0.1:15001/").await;
    failed_with(
        app.metrics_addr,
        &[
            "reason=\"no_original_destination\"",
            "source_principal=\"spiffe://cluster.local/ns/app/sa/sleep\"",
        ],
    )
    .await;

    // A bad request is answered with the reason, and nothing changes.
    let mut broken = client.clone();
    broken.uid = "other".into();
    broken.netns = "/var/run/netns/does-not-exist".into();
    let reply = request(&node.socket(), &Request::Add(broken)).await;
    assert!(
        !reply.ok && reply.error.as_deref().unwrap().contains("does-not-exist"),
        "{reply:?}"
    );

    for pod in [&client, &echo] {
        request(&node.socket(), &Request::Remove(pod.uid.clone())).await;
    }
    assert_eq!(
        metric(app.metrics_addr, "ambit_ztunnel_captured_pods").await,
        0
    );
    let reply = curl(lab, "app/sleep-0", &url).await.unwrap();
    assert_peer(&reply, client.ip);
    // Release takes the return path down in the background, after its reply.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let settings = in_netns(&echo.netns, &["cat", FWMARK_ACCEPT, FWMARK_REFLECT]);
        if settings == "0\n0\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {settings:?} 10 s after release"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_file_changes_are_applied() {
    if !require_root("pods_file_changes_are_applied") {
        return;
    }
    let node = Node::up("zt-file", 32);
    node.write_pods(&[]);
    let app = app::build(node.config(true, false)).await.unwrap();
    let (echo, client) = (node.info("app/echo-0"), node.info("app/sleep-0"));
    node.write_pods(&[&echo, &client]);
    wait_for_metric(app.metrics_addr, "ambit_ztunnel_captured_pods", 2).await;
    assert_eq!(app.agent.pod_keys(), ["app/echo-0", "app/sleep-0"]);
    // An invalid file keeps the last good set.
    std::fs::write(node.pods_file(), "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.agent.pod_keys().len(), 2);
    node.write_pods(&[&echo]);
    wait_for_metric(app.metrics_addr, "ambit_ztunnel_captured_pods", 1).await;
    assert_eq!(app.agent.pod_keys(), ["app/echo-0"]);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ztunnel_captured_pods_fail_closed_and_a_restart_adopts_them() {
    if !require_root("without_ztunnel_captured_pods_fail_closed_and_a_restart_adopts_them") {
        return;
    }
    let node = Node::up("zt-restart", 33);
    let lab = node.lab();
    let (echo, client) = (node.info("app/echo-0"), node.info("app/sleep-0"));
    node.write_pods(&[&echo, &client]);
    let url = format!("http://{}:8080/", echo.ip);
    let first = app::build(node.config(true, false)).await.unwrap();
    wait_for_metric(first.metrics_addr, "ambit_ztunnel_captured_pods", 2).await;
    curl(lab, "app/sleep-0", &url).await.unwrap();

    // ztunnel goes away: capture stays pinned, nothing bypasses the mesh.
    first.shutdown().await;
    let err = curl(lab, "app/sleep-0", &url).await.unwrap_err();
    assert!(
        err.contains("refused") || err.contains("Failed to connect"),
        "{err}"
    );

    // A new ztunnel adopts the pinned capture and traffic flows again.
    let second = app::build(node.config(true, false)).await.unwrap();
    wait_for_metric(second.metrics_addr, "ambit_ztunnel_captured_pods", 2).await;
    let reply = curl(lab, "app/sleep-0", &url).await.unwrap();
    assert_peer(&reply, client.ip);
    assert!(
        metric(
            second.metrics_addr,
            "ambit_ztunnel_inbound_connections_total"
        )
        .await
            >= 1,
        "the echo pod's inbound was served by the new ztunnel"
    );

    // Leaving the mesh (empty pods file) releases the pins: direct again.
    node.write_pods(&[]);
    wait_for_metric(second.metrics_addr, "ambit_ztunnel_captured_pods", 0).await;
    let outbound = metric(
        second.metrics_addr,
        "ambit_ztunnel_outbound_connections_total",
    )
    .await;
    let reply = curl(lab, "app/sleep-0", &url).await.unwrap();
    assert_peer(&reply, client.ip);
    assert_eq!(
        metric(
            second.metrics_addr,
            "ambit_ztunnel_outbound_connections_total"
        )
        .await,
        outbound,
        "direct again: ztunnel took no connection"
    );
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_releases_pods_that_left_while_ztunnel_was_down() {
    if !require_root("a_snapshot_releases_pods_that_left_while_ztunnel_was_down") {
        return;
    }
    let node = Node::up("zt-prune", 34);
    let lab = node.lab();
    let client = node.info("app/sleep-0");
    let url = format!("http://{}:8080/", node.info("app/echo-0").ip);
    node.write_pods(&[&client]);
    let first = app::build(node.config(true, false)).await.unwrap();
    wait_for_metric(first.metrics_addr, "ambit_ztunnel_captured_pods", 1).await;
    first.shutdown().await;
    let pinned = node.pins.0.join("pods");
    assert_eq!(std::fs::read_dir(&pinned).unwrap().count(), 1);

    // While no ztunnel runs, the pod leaves the mesh. The new ztunnel hears
    // of it through the snapshot; until then the pod stays fail-closed.
    let second = app::build(node.config(false, true)).await.unwrap();
    curl(lab, "app/sleep-0", &url).await.unwrap_err();
    let reply = request(&node.socket(), &Request::Snapshot(vec![])).await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        std::fs::read_dir(&pinned).unwrap().count(),
        0,
        "stale pins released"
    );
    let reply = curl(lab, "app/sleep-0", &url).await.unwrap();
    assert_peer(&reply, client.ip);

    // A snapshot with a pod that cannot be captured says why.
    let mut broken = client.clone();
    broken.netns = "/var/run/netns/ambit-gone".into();
    let reply = request(&node.socket(), &Request::Snapshot(vec![broken])).await;
    assert!(
        !reply.ok && reply.error.as_deref().unwrap().contains("ambit-gone"),
        "{reply:?}"
    );
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_open_connections_then_closes_them_at_the_deadline() {
    if !require_root("shutdown_waits_for_open_connections_then_closes_them_at_the_deadline") {
        return;
    }
    let node = Node::up("zt-drain", 35);
    let echo = node.info("app/echo-0");
    node.write_pods(&[&echo, &node.info("app/sleep-0")]);
    let app = app::build(node.config(true, false)).await.unwrap();
    wait_for_metric(app.metrics_addr, "ambit_ztunnel_captured_pods", 2).await;
    // A request that would take 30 s keeps its connection open.
    let slow = format!("http://{}:8080/delay/30000", echo.ip);
    let name = node.lab().name().to_string();
    let held = std::thread::spawn(move || {
        let lab = Lab::open(&name, &integration_tests::options()).unwrap();
        let started = Instant::now();
        let out = lab
            .exec_captured("app/sleep-0", &["curl", "-sS", "--max-time", "40", &slow])
            .unwrap();
        (out.status.success(), started.elapsed())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    // Both legs (the client's outbound, the server's inbound) are open.
    while metric(app.metrics_addr, "ambit_ztunnel_open_connections").await < 2 {
        assert!(Instant::now() < deadline, "connection not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopping = Instant::now();
    app.shutdown().await;
    let took = stopping.elapsed();
    // It waited for the connection (the 5 s drain), then closed it rather
    // than wait the 30 s the request needed.
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(10),
        "shutdown took {took:?}"
    );
    let (ok, elapsed) = held.join().unwrap();
    assert!(!ok, "the held request completed");
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
}

/// With the controller as its config source, ztunnel serves its pods only
/// once the controller's first config is in: before, their connections are
/// refused (and counted with the reason), not routed on an empty config,
/// where meshed destinations would look unknown and be reached in
/// plaintext and no policy would apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_the_controllers_first_config_captured_connections_are_refused() {
    if !require_root("until_the_controllers_first_config_captured_connections_are_refused") {
        return;
    }
    let node = Node::up("zt-noconfig", 36);
    let (token, roots) = (
        node.dir.path().join("token"),
        node.dir.path().join("roots.pem"),
    );
    std::fs::write(&token, "node token").unwrap();
    std::fs::write(&roots, identity::testing::TestRoot::new().pem()).unwrap();
    // A controller address nothing answers on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = unused.local_addr().unwrap().to_string();
    drop(unused);
    let mut cfg = node.config(false, true);
    cfg.controller = Some(app::ControllerConfig {
        addr,
        token_file: token,
        roots_file: roots,
    });
    let app = app::build(cfg).await.unwrap();
    let echo = node.info("app/echo-0");
    node.enroll(&[&node.info("app/sleep-0"), &echo]).await;
    let url = format!("http://{}:8080/", echo.ip);
    refused_at_once(node.lab(), "app/sleep-0", &url).await;
    failed_with(app.metrics_addr, &["reason=\"no_config\""]).await;
    app.shutdown().await;
}

/// With a local config file that cannot be read when ztunnel starts, its
/// pods' connections are refused as before the controller's first config
/// (not routed on an empty config, where meshed destinations would be
/// reached in plaintext), and served once a good file appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_the_config_file_is_good_captured_connections_are_refused() {
    if !require_root("until_the_config_file_is_good_captured_connections_are_refused") {
        return;
    }
    let node = Node::up("zt-nofile", 37);
    let lab = node.lab();
    let mesh = node.dir.path().join("mesh.yaml");
    let mut cfg = node.config(false, true);
    cfg.mesh_config = Some(mesh.clone());
    let app = app::build(cfg).await.unwrap();
    let echo = node.info("app/echo-0");
    node.enroll(&[&node.info("app/sleep-0"), &echo]).await;
    let url = format!("http://{}:8080/", echo.ip);
    refused_at_once(lab, "app/sleep-0", &url).await;
    failed_with(app.metrics_addr, &["reason=\"no_config\""]).await;
    // Not ready, on the port a kubelet probes.
    let ready = http_get(app.metrics_addr, "/healthz/ready").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    // An invalid file keeps it so.
    std::fs::write(&mesh, "workloads: [{uid: w, name: w}]\n").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    refused_at_once(lab, "app/sleep-0", &url).await;
    // A good one (neither pod in it: plain traffic) is served.
    std::fs::write(&mesh, "{}\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(error) = curl(lab, "app/sleep-0", &url).await {
        assert!(Instant::now() < deadline, "not served: {error}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = http_get(app.metrics_addr, "/healthz/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    app.shutdown().await;
}
