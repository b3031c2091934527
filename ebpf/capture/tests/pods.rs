//! Capture on real lab pods. Outbound: an unmodified client's connect is
//! redirected to 15001 in its namespace, the original destination recovered,
//! and a plain passthrough delivers the answer. Inbound: new connections to
//! any port of a captured pod reach 15006, never the application directly.
//! Needs root; under CI a missing root is a failure, elsewhere a skip.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use capture::{Capture, INBOUND_PORT, OUTBOUND_PORT, Pod, PodCapture, netns};
use lab::spec::{App, DeploymentSpec, NamespaceSpec, NetworkSpec};
use lab::{Lab, LabOptions, LabSpec};

fn root_or_skip(test: &str) -> bool {
    if lab::is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root and CI is set"
    );
    eprintln!("skipping {test}: needs root");
    false
}

fn bin_dir() -> PathBuf {
    // target/<profile>/deps/<test> → target/<profile>; the echo server is
    // built by the workspace test run (scripts/test builds it first).
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    assert!(
        dir.join("ambit-echo").exists(),
        "{} missing: build the workspace first (scripts/test does)",
        dir.join("ambit-echo").display()
    );
    dir
}

struct Down(String, LabOptions);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = Lab::down(&self.0, &self.1);
    }
}

fn small_lab(name: &str, slot: u8) -> (Lab, Down) {
    let opts = LabOptions::new(bin_dir());
    let _ = Lab::down(name, &opts);
    let deployment = |name: &str, app| DeploymentSpec {
        name: name.into(),
        namespace: "app".into(),
        replicas: 1,
        service_account: None,
        app,
        labels: BTreeMap::new(),
    };
    let spec = LabSpec {
        name: name.into(),
        network: NetworkSpec {
            node_cidr: format!("172.31.{slot}.0/24").parse().unwrap(),
            pod_cidr: format!("10.{}.0.0/16", 150 + slot).parse().unwrap(),
            service_cidr: format!("10.{}.0.0/16", 230 + slot).parse().unwrap(),
        },
        nodes: vec!["n1".into(), "n2".into()],
        namespaces: vec![NamespaceSpec {
            name: "app".into(),
            labels: BTreeMap::new(),
        }],
        deployments: vec![
            deployment("echo", App::Echo),
            deployment("client", App::Sleep),
            deployment("other", App::Sleep),
        ],
        services: vec![],
    };
    let lab = Lab::up(spec, &opts).unwrap();
    (lab, Down(name.into(), opts))
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Captures a lab pod with a fresh 15006 listener in its namespace.
fn capture_pod(capture: &mut Capture, pod: &lab::plan::PodPlan) -> (PodCapture, TcpListener) {
    let ns = netns_path(&pod.netns);
    let inbound = netns::run_in(&ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, INBOUND_PORT)).unwrap()
    })
    .unwrap();
    let captured = capture
        .capture(&Pod {
            cgroup: &pod.cgroup,
            netns: &ns,
            interface: "eth0",
            ip: pod.ip,
            inbound_listener: &inbound,
        })
        .unwrap();
    (captured, inbound)
}

/// A plain passthrough on 15001 in the pod's namespace: accepts one
/// connection, asks capture where it was going, connects there from inside
/// the namespace, and copies. Reports the original destination.
fn passthrough(capture: Capture, pod_netns: &Path) -> mpsc::Receiver<SocketAddrV4> {
    let ns = pod_netns.to_path_buf();
    let listener = netns::run_in(&ns, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)).unwrap()
    })
    .unwrap();
    let cookie = netns::netns_cookie(&listener).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut capture = capture;
        let (client, peer) = listener.accept().unwrap();
        let SocketAddr::V4(peer) = peer else {
            panic!("IPv4 only")
        };
        let orig = capture
            .original_destination(cookie, peer)
            .unwrap()
            .expect("recorded");
        tx.send(orig).unwrap();
        let upstream = netns::run_in(&ns, || TcpStream::connect(orig).unwrap()).unwrap();
        pipe(client, upstream);
    });
    rx
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (mut a, mut b) = (a, b);
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut b, &mut a);
    let _ = a.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

fn curl(lab: &Lab, pod: &str, url: &str) -> Result<String, String> {
    let out = lab
        .exec_captured(pod, &["curl", "-sS", "--max-time", "5", url])
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn captured_client_reaches_its_destination_through_15001() {
    if !root_or_skip("captured_client_reaches_its_destination_through_15001") {
        return;
    }
    let (lab, _down) = small_lab("cap-out", 1);
    let plan = lab.plan();
    let client = plan.pod("app/client-0").unwrap();
    let echo = plan.pod("app/echo-0").unwrap();
    let mut capture = Capture::load().unwrap();
    let (pod, _inbound) = capture_pod(&mut capture, client);
    let seen = passthrough(capture, &netns_path(&client.netns));

    let body = curl(&lab, "app/client-0", &format!("http://{}:8080/", echo.ip)).unwrap();
    let orig = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("connection captured");
    assert_eq!(
        orig,
        SocketAddrV4::new(echo.ip, 8080),
        "original destination"
    );
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["pod"], "echo-0", "the app still gets its answer");
    drop(pod);
}

#[test]
fn uncaptured_pod_is_untouched_and_release_restores_direct_traffic() {
    if !root_or_skip("uncaptured_pod_is_untouched_and_release_restores_direct_traffic") {
        return;
    }
    let (lab, _down) = small_lab("cap-rel", 2);
    let plan = lab.plan();
    let client = plan.pod("app/client-0").unwrap();
    let echo = plan.pod("app/echo-0").unwrap();
    let url = format!("http://{}:8080/", echo.ip);
    let mut capture = Capture::load().unwrap();
    let (pod, _inbound) = capture_pod(&mut capture, client);

    // Captured with nothing on 15001: refused, never sent around ztunnel.
    let err = curl(&lab, "app/client-0", &url).unwrap_err();
    assert!(
        err.contains("Connection refused") || err.contains("Failed to connect"),
        "{err}"
    );
    // Another pod on the same node is not captured.
    curl(&lab, "app/other-0", &url).unwrap();
    // Loopback inside the captured pod is not captured either.
    let out = lab
        .exec_captured("app/client-0", &["sh", "-c", "nc -l -p 7777 -q 1 </dev/null & sleep 0.2; printf x | nc -q 1 127.0.0.1 7777; wait"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    capture.release(pod).unwrap();
    curl(&lab, "app/client-0", &url).expect("direct again after release");
}

#[test]
fn inbound_to_any_port_goes_through_15006_even_where_the_app_listens() {
    if !root_or_skip("inbound_to_any_port_goes_through_15006_even_where_the_app_listens") {
        return;
    }
    let (lab, _down) = small_lab("cap-in", 3);
    let plan = lab.plan();
    let echo = plan.pod("app/echo-0").unwrap().clone();
    let client = plan.pod("app/client-0").unwrap();
    let url = format!("http://{}:8080/", echo.ip);
    // Before capture the app sees the client itself.
    let direct: serde_json::Value =
        serde_json::from_str(&curl(&lab, "app/client-0", &url).unwrap()).unwrap();
    assert!(
        direct["peer"]
            .as_str()
            .unwrap()
            .starts_with(&client.ip.to_string())
    );

    let mut capture = Capture::load().unwrap();
    let (pod, inbound) = capture_pod(&mut capture, &echo);
    let ns = netns_path(&echo.netns);
    let (tx, rx) = mpsc::channel();
    let proxy = std::thread::spawn(move || {
        let (conn, _) = inbound.accept().unwrap();
        // The accepted socket keeps the address the client dialled.
        let SocketAddr::V4(orig) = conn.local_addr().unwrap() else {
            panic!("IPv4 only")
        };
        tx.send(orig).unwrap();
        let app = netns::run_in(&ns, || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, orig.port())).unwrap()
        })
        .unwrap();
        pipe(conn, app);
        inbound
    });
    let body = curl(&lab, "app/client-0", &url).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        SocketAddrV4::new(echo.ip, 8080)
    );
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        reply["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "the app was reached only through the proxy: {reply}"
    );
    // ztunnel gone (listener closed): new connections fail, none reach the app.
    drop(proxy.join().unwrap());
    let err = lab
        .exec_captured("app/client-0", &["curl", "-sS", "--max-time", "2", &url])
        .unwrap();
    assert!(
        !err.status.success(),
        "a captured pod without ztunnel must not be reachable"
    );
    capture.release(pod).unwrap();
    curl(&lab, "app/client-0", &url).expect("direct again after release");
}
