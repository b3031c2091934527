//! The L4 data plane in the lab: meshed pods talk over HBONE with their own
//! identities, across nodes and on one node, by pod IP and by Service VIP.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{TestLab, require_root, spec};

/// A meshed two-node lab: namespace `app` (3 echo, sleep) in ambient mode.
fn mesh_lab(name: &str, slot: u8) -> TestLab {
    let mut spec = spec(name, slot, 2, 3);
    spec.namespaces[0]
        .labels
        .insert(lab::plan::DATAPLANE_MODE.into(), "ambient".into());
    TestLab::up(spec)
}

/// tcpdump on one interface of a node, writing a pcap; killed on drop.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(netns: &str, interface: &str, file: PathBuf) -> Capture {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "--immediate-mode",
                "-i",
                interface,
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // tcpdump says "listening on" once the capture is open.
        let mut capture = Capture { child, file };
        let stderr = capture.child.stderr.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line).unwrap();
        assert!(line.contains("listening on"), "tcpdump: {line}");
        capture
    }

    /// Stops the capture and returns the raw pcap bytes.
    fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(200));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }

    /// Packets in the pcap matching a tcpdump filter.
    fn count(file: &Path, filter: &str) -> usize {
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(file)
            .arg(filter)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The access log lines of a node's ztunnel.
fn access_log(t: &TestLab, node: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(t.lab.log_path(&format!("ztunnel/{node}"))).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("access"))
        .map(str::to_string)
        .collect()
}

/// An echo pod on `client`'s node, or on another.
fn echo_pod<'a>(
    plan: &'a lab::plan::Plan,
    client: &lab::plan::PodPlan,
    same_node: bool,
) -> &'a lab::plan::PodPlan {
    plan.pods
        .iter()
        .find(|p| p.name.starts_with("echo") && (p.node == client.node) == same_node)
        .unwrap()
}

#[test]
fn meshed_pods_talk_mtls_with_their_identities_and_the_wire_has_no_plaintext() {
    if !require_root("meshed_pods_talk_mtls_with_their_identities_and_the_wire_has_no_plaintext") {
        return;
    }
    let t = mesh_lab("it-hbone", 11);
    let plan = t.lab.plan();
    let client = plan.pod("app/sleep-0").unwrap();
    let client_node = &plan.nodes[client.node];
    let remote = echo_pod(plan, client, false);
    let local = echo_pod(plan, client, true);
    let remote_node = &plan.nodes[remote.node];
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("uplink.pcap");
    // The bridge port of the remote node, in the lab network namespace.
    let capture = Capture::start(&plan.net_netns, &remote_node.uplink, pcap.clone());

    // Cross-node by pod IP: the secret travels only inside the tunnel.
    let secret = "ambit-secret-7f3a9c";
    let reply = t.curl(
        "app/sleep-0",
        &format!("http://{}:8080/{secret}", remote.ip),
    );
    assert_eq!(reply["pod"], remote.name.as_str());
    assert_eq!(reply["path"], format!("/{secret}"));
    // Delivered by the remote ztunnel, yet the app sees the client's own
    // address.
    assert!(
        reply["peer"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", client.ip)),
        "{reply}"
    );
    // TCP echo as well: bytes both ways.
    let echoed = t.exec(
        "app/sleep-0",
        &[
            "sh",
            "-c",
            &format!("printf {secret} | nc -q 1 -w 3 {} 9000", remote.ip),
        ],
    );
    assert_eq!(echoed, secret);

    // By Service VIP (spread over the endpoints, the remote one among
    // them), the secret in the path too.
    let vip = plan.services[0].cluster_ip;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let reply = t.curl("app/sleep-0", &format!("http://{vip}/{secret}"));
        assert_eq!(reply["path"], format!("/{secret}"));
        seen.insert(reply["pod"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 3, "round robin over all endpoints: {seen:?}");
    assert!(seen.contains(remote.name.as_str()), "{seen:?}");
    let bytes = capture.finish();
    assert!(
        Capture::count(&pcap, "tcp port 15008") > 0,
        "the cross-node traffic went to 15008"
    );
    assert_eq!(
        Capture::count(&pcap, "tcp port 80 or tcp port 8080 or tcp port 9000"),
        0,
        "no packet to the application ports crossed the wire"
    );
    assert!(
        !contains(&bytes, secret.as_bytes()),
        "the payload crossed the wire in clear"
    );

    // Same node by pod IP.
    let reply = t.curl("app/sleep-0", &format!("http://{}:8080/", local.ip));
    assert_eq!(reply["pod"], local.name.as_str());

    // The access logs show both identities and the service.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (out, inbound) = loop {
        let out = access_log(&t, &client_node.name);
        let inbound = access_log(&t, &remote_node.name);
        let done = out
            .iter()
            .any(|l| l.contains(&format!("dst_addr={vip}:80")))
            && inbound.iter().any(|l| {
                l.contains("direction=\"inbound\"")
                    && l.contains("dst_service=echo.app.svc.cluster.local ")
            });
        if done || Instant::now() > deadline {
            break (out, inbound);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let remote_line = out
        .iter()
        .find(|l| l.contains(&format!("dst_endpoint={}:8080", remote.ip)))
        .unwrap_or_else(|| panic!("no outbound line for {}: {out:#?}", remote.ip));
    for want in [
        "protocol=\"HBONE\"",
        "src_identity=spiffe://cluster.local/ns/app/sa/sleep",
        "dst_identity=spiffe://cluster.local/ns/app/sa/echo",
        &format!("src_addr={}:", client.ip),
    ] {
        assert!(remote_line.contains(want), "{want} not in {remote_line}");
    }
    assert!(
        out.iter()
            .any(|l| l.contains("dst_service=echo.app.svc.cluster.local ")),
        "{out:#?}"
    );
    assert!(
        inbound.iter().any(|l| l.contains("direction=\"inbound\"")
            && l.contains("src_identity=spiffe://cluster.local/ns/app/sa/sleep")
            && l.contains(&format!("src_addr={}:", client.ip))),
        "the server side saw the client's identity and address: {inbound:#?}"
    );
    // Both sides name the service alike: the server side by the hostname
    // in the client's `forwarded` header, checked against the config.
    assert!(
        inbound.iter().any(|l| l.contains("direction=\"inbound\"")
            && l.contains("dst_service=echo.app.svc.cluster.local ")),
        "{inbound:#?}"
    );

    // ztunnel's own inbound port is not an application's: a tunnel asking
    // for it is refused with the reason, not forwarded to the listener
    // itself.
    assert!(!t.reaches("app/sleep-0", &format!("http://{}:15006/", remote.ip)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !access_log(&t, &remote_node.name)
        .iter()
        .any(|l| l.contains("port 15006 is ztunnel's own"))
    {
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {:#?}",
            access_log(&t, &remote_node.name)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_server_with_the_wrong_identity_is_refused() {
    if !require_root("a_server_with_the_wrong_identity_is_refused") {
        return;
    }
    let t = mesh_lab("it-wrongid", 12);
    let plan = t.lab.plan();
    let client = plan.pod("app/sleep-0").unwrap();
    let echo = plan.pod("app/echo-0").unwrap();
    let url = format!("http://{}:8080/", echo.ip);
    t.curl("app/sleep-0", &url);

    // The client's ztunnel now expects another identity for echo-0 (as if
    // someone else answered on its address): restarted with the
    // controller's config, altered, as a local override.
    let mut config: model::MeshConfig =
        serde_yaml::from_str(&std::fs::read_to_string(t.lab.mesh_file()).unwrap()).unwrap();
    let w = config
        .workloads
        .iter_mut()
        .find(|w| w.uid == echo.uid)
        .unwrap();
    w.service_account = "impostor-check".into();
    let file = t.lab.mesh_file().with_file_name("override.yaml");
    std::fs::write(&file, serde_yaml::to_string(&config).unwrap()).unwrap();
    t.lab
        .restart_ztunnel(
            &plan.nodes[client.node].name,
            &["--mesh-config", &file.to_string_lossy()],
        )
        .unwrap();

    let node = plan.nodes[client.node].name.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = t
            .lab
            .exec_captured("app/sleep-0", &["curl", "-sS", "--max-time", "3", &url])
            .unwrap();
        // The reason names both identities: the one the config expects
        // and the one the server proved.
        let refused = access_log(&t, &node).iter().any(|l| {
            l.contains("identity_mismatch")
                && l.contains(
                    "peer presented spiffe://cluster.local/ns/app/sa/echo, \
                     expected spiffe://cluster.local/ns/app/sa/impostor-check",
                )
        });
        if !out.status.success() && refused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not refused: {} {:#?}",
            String::from_utf8_lossy(&out.stdout),
            access_log(&t, &node)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Counted with its reason on the client's side.
    let metrics = t.lab.ztunnel_metrics(&node).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ambit_tcp_connections_failed_total{")
                && l.contains("reason=\"identity_mismatch\"")
                && l.contains("reporter=\"source\"")),
        "{metrics}"
    );
    // The server's ztunnel logs and counts the handshake its client broke
    // off, where the destination's operator looks.
    let server_node = plan.nodes[echo.node].name.clone();
    let from_client = format!("src_addr={}:", client.ip);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !access_log(&t, &server_node).iter().any(|l| {
        l.contains("direction=\"inbound\"") && l.contains(&from_client) && l.contains("TLS")
    }) {
        assert!(
            Instant::now() < deadline,
            "no refusal on the server side: {:#?}",
            access_log(&t, &server_node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stopping_ztunnel_drains_its_tunnels_before_it_exits() {
    if !require_root("a_stopping_ztunnel_drains_its_tunnels_before_it_exits") {
        return;
    }
    let t = mesh_lab("it-drain", 38);
    let plan = t.lab.plan();
    let client = plan.pod("app/sleep-0").unwrap();
    let remote = echo_pod(plan, client, false);
    let remote_node = plan.nodes[remote.node].name.clone();
    let open = || {
        t.lab
            .ztunnel_metric(&remote_node, "ambit_ztunnel_open_connections")
            .unwrap_or(0)
    };
    // A request that takes 2 s, within the 5 s drain, on an HBONE tunnel
    // into the stopping node.
    let slow = format!("http://{}:8080/delay/2000", remote.ip);
    let (held, stopped) = std::thread::scope(|s| {
        let held = s.spawn(|| {
            t.lab
                .exec_captured("app/sleep-0", &["curl", "-sS", "--max-time", "20", &slow])
                .unwrap()
        });
        integration_tests::wait_until(
            "the tunnel is open on the server side",
            Duration::from_secs(5),
            String::new,
            || open() >= 1,
        );
        let stopping = Instant::now();
        for pid in t.lab.ztunnel_pids(&remote_node) {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        }
        integration_tests::wait_until(
            "the stopping ztunnel exits",
            Duration::from_secs(15),
            String::new,
            || !t.lab.ztunnel_running(&remote_node),
        );
        (held.join().unwrap(), stopping.elapsed())
    });
    assert!(
        held.status.success(),
        "the request in flight was cut: {}",
        String::from_utf8_lossy(&held.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&held.stdout).unwrap();
    assert_eq!(reply["pod"], remote.name.as_str());
    // It exited once the tunnel had ended, not at the drain deadline.
    assert!(stopped < Duration::from_secs(5), "exited after {stopped:?}");
    // The server side logged the drained tunnel as a clean close.
    let line = access_log(&t, &remote_node)
        .into_iter()
        .find(|l| l.contains("direction=\"inbound\"") && l.contains(&format!("{}:8080", remote.ip)))
        .unwrap_or_else(|| panic!("{:#?}", access_log(&t, &remote_node)));
    assert!(line.contains("reason=\"\""), "{line}");
}
