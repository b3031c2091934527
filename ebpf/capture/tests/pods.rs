//! Capture on real lab pods. Outbound: an unmodified client's connect is
//! redirected to 15001 in its namespace, the original destination recovered,
//! and a plain passthrough delivers the answer. Inbound: new connections to
//! any port of a captured pod reach 15006, never the application directly.
//! Needs root; under CI a missing root is a failure, elsewhere a skip.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use capture::{Capture, Exclusions, INBOUND_PORT, OUTBOUND_PORT, Pod, PodCapture, netns};
use integration_tests::{TestLab, require_root, spec};
use lab::Lab;

/// A pin directory of the test's own, removed on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // The shared parent goes with the last test using it.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Capture with its pins in a directory of its own.
struct TestCapture(Capture, Pins);

impl TestCapture {
    fn load(name: &str) -> TestCapture {
        lab::ensure_bpffs().unwrap();
        let dir = Path::new(lab::BPFFS).join("ambit-test").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        TestCapture(Capture::load(&dir).unwrap(), Pins(dir))
    }
}

/// A two-node lab with an echo server, a client and another pod that is
/// never captured, in ranges no other test uses.
fn small_lab(name: &str, slot: u8) -> TestLab {
    let mut spec = spec(name, slot, 2, 1);
    spec.services.clear();
    let mut other = spec.deployments[1].clone();
    other.name = "other".into();
    spec.deployments.push(other);
    TestLab::up(spec)
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

/// A plain passthrough on 15001 in the pod's namespace: accepts
/// connections, asks capture where each was going, connects there from
/// inside the namespace, and copies. Reports each original destination.
fn passthrough(capture: TestCapture, pod_netns: &Path) -> (mpsc::Receiver<SocketAddrV4>, Pins) {
    let TestCapture(capture, pins) = capture;
    // Looked up apart from the capture, as ztunnel does.
    let destinations = capture.destinations();
    let ns = pod_netns.to_path_buf();
    let listener = netns::run_in(&ns, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)).unwrap()
    })
    .unwrap();
    let cookie = netns::netns_cookie(&listener).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Loaded for as long as the passthrough serves.
        let _capture = capture;
        for accepted in listener.incoming() {
            let client = accepted.unwrap();
            let SocketAddr::V4(peer) = client.peer_addr().unwrap() else {
                panic!("IPv4 only")
            };
            let orig = destinations
                .original_destination(cookie, peer)
                .unwrap()
                .expect("recorded");
            if tx.send(orig).is_err() {
                return; // the test is over
            }
            let upstream = netns::run_in(&ns, || TcpStream::connect(orig).unwrap()).unwrap();
            std::thread::spawn(move || pipe(client, upstream));
        }
    });
    (rx, pins)
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
fn unmodified_clients_are_captured_with_their_original_destination() {
    if !require_root("unmodified_clients_are_captured_with_their_original_destination") {
        return;
    }
    let mut spec = spec("cap-out", 21, 2, 1);
    let mut other = spec.deployments[1].clone();
    other.name = "other".into();
    spec.deployments.push(other);
    let t = TestLab::up(spec);
    let lab = &t.lab;
    let plan = lab.plan();
    let client = plan.pod("app/sleep-0").unwrap();
    let echo = plan.pod("app/echo-0").unwrap();
    let vip = plan.services[0].cluster_ip;
    let mut capture = TestCapture::load("cap-out");
    let (pod, _inbound) = capture_pod(&mut capture.0, client);
    let (seen, _pins) = passthrough(capture, &netns_path(&client.netns));
    let next = || {
        seen.recv_timeout(Duration::from_secs(5))
            .expect("connection captured")
    };

    // curl to the pod's IP.
    let body = curl(lab, "app/sleep-0", &format!("http://{}:8080/", echo.ip)).unwrap();
    assert_eq!(next(), SocketAddrV4::new(echo.ip, 8080));
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["pod"], "echo-0", "the app still gets its answer");

    // nc to the TCP echo port.
    let out = lab
        .exec_captured(
            "app/sleep-0",
            &[
                "sh",
                "-c",
                &format!("printf ping | nc -q 2 {} 9000", echo.ip),
            ],
        )
        .unwrap();
    assert_eq!(next(), SocketAddrV4::new(echo.ip, 9000));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ping");

    // A Rust client on tokio's TcpStream (ambit-load).
    let load = integration_tests::bin_dir().join("ambit-load");
    let out = lab
        .exec_captured(
            "app/sleep-0",
            &[
                load.to_str().unwrap(),
                &format!("http://{}:8080/", echo.ip),
                "--requests",
                "1",
                "--json",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(next(), SocketAddrV4::new(echo.ip, 8080));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"]["200"], 1, "{report}");

    // curl to the Service VIP: the original destination is the VIP.
    let body = curl(lab, "app/sleep-0", &format!("http://{vip}/")).unwrap();
    assert_eq!(next(), SocketAddrV4::new(vip, 80));
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["pod"], "echo-0");

    // The uncaptured pod next to it is not seen by the passthrough.
    curl(lab, "app/other-0", &format!("http://{}:8080/", echo.ip)).unwrap();
    assert!(seen.recv_timeout(Duration::from_millis(300)).is_err());
    drop(pod);
}

#[test]
fn excluded_networks_and_ports_go_direct() {
    if !require_root("excluded_networks_and_ports_go_direct") {
        return;
    }
    let t = small_lab("cap-excl", 24);
    let lab = &t.lab;
    let plan = lab.plan();
    let client = plan.pod("app/sleep-0").unwrap();
    let echo = plan.pod("app/echo-0").unwrap();
    let url = format!("http://{}:8080/", echo.ip);
    let mut capture = TestCapture::load("cap-excl");
    let (pod, _inbound) = capture_pod(&mut capture.0, client);
    let direct = |lab: &Lab| {
        let reply: serde_json::Value =
            serde_json::from_str(&curl(lab, "app/sleep-0", &url).unwrap()).unwrap();
        assert!(
            reply["peer"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", client.ip)),
            "{reply}"
        );
    };
    // Captured with nothing on 15001: refused.
    curl(lab, "app/sleep-0", &url).unwrap_err();

    // The echo pod's network (a /24 around it) excluded: direct.
    let net = Ipv4Addr::from_bits(echo.ip.to_bits() & 0xffff_ff00);
    capture
        .0
        .set_exclusions(&Exclusions {
            nets: vec![(Ipv4Addr::new(192, 0, 2, 0), 24), (net, 24)],
            ports: vec![],
        })
        .unwrap();
    direct(lab);

    // Only the port excluded: direct on 8080, still captured on 9000.
    capture
        .0
        .set_exclusions(&Exclusions {
            nets: vec![],
            ports: vec![8080],
        })
        .unwrap();
    direct(lab);
    let out = lab
        .exec_captured(
            "app/sleep-0",
            &[
                "sh",
                "-c",
                &format!("printf x | nc -w 2 -q 1 {} 9000", echo.ip),
            ],
        )
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "port 9000 is still captured (refused), got {:?}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Exclusions removed: captured again.
    capture.0.set_exclusions(&Exclusions::default()).unwrap();
    curl(lab, "app/sleep-0", &url).unwrap_err();
    // A prefix longer than 32 bits is refused with the reason.
    let err = capture
        .0
        .set_exclusions(&Exclusions {
            nets: vec![(net, 33)],
            ports: vec![],
        })
        .unwrap_err();
    assert!(err.to_string().contains("/33"), "{err}");
    capture.0.release(pod).unwrap();
}

#[test]
fn uncaptured_pod_is_untouched_and_release_restores_direct_traffic() {
    if !require_root("uncaptured_pod_is_untouched_and_release_restores_direct_traffic") {
        return;
    }
    let t = small_lab("cap-rel", 22);
    let lab = &t.lab;
    let plan = lab.plan();
    let client = plan.pod("app/sleep-0").unwrap();
    let echo = plan.pod("app/echo-0").unwrap();
    let url = format!("http://{}:8080/", echo.ip);
    let mut capture = TestCapture::load("cap-rel");
    let (pod, _inbound) = capture_pod(&mut capture.0, client);

    // Captured with nothing on 15001: refused, never sent around ztunnel.
    let err = curl(lab, "app/sleep-0", &url).unwrap_err();
    assert!(
        err.contains("Connection refused") || err.contains("Failed to connect"),
        "{err}"
    );
    // Another pod on the same node is not captured.
    curl(lab, "app/other-0", &url).unwrap();
    // Loopback inside the captured pod is not captured either: the
    // listener gets the byte. Bounded by `timeout` so that a refused client
    // fails the test instead of leaving `wait` on the listener for ever.
    // The listener does not read its stdin (`-d`) and ends when the
    // client's half-close (`-N`) arrives, after printing what it got.
    let script = "nc -l -d -p 7777 & l=$!; \
        until ss -Hltn 'sport = :7777' | grep -q .; do sleep 0.05; done; \
        printf x | nc -N 127.0.0.1 7777 || { kill $l; exit 1; }; wait $l";
    let out = lab
        .exec_captured("app/sleep-0", &["timeout", "15", "sh", "-c", script])
        .unwrap();
    assert!(
        out.status.success() && out.stdout == b"x",
        "status {:?}, received {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    capture.0.release(pod).unwrap();
    curl(lab, "app/sleep-0", &url).expect("direct again after release");
}

#[test]
fn inbound_to_any_port_goes_through_15006_even_where_the_app_listens() {
    if !require_root("inbound_to_any_port_goes_through_15006_even_where_the_app_listens") {
        return;
    }
    let t = small_lab("cap-in", 23);
    let lab = &t.lab;
    let plan = lab.plan();
    let echo = plan.pod("app/echo-0").unwrap().clone();
    let client = plan.pod("app/sleep-0").unwrap();
    let url = format!("http://{}:8080/", echo.ip);
    // Before capture the app sees the client itself.
    let direct: serde_json::Value =
        serde_json::from_str(&curl(lab, "app/sleep-0", &url).unwrap()).unwrap();
    assert!(
        direct["peer"]
            .as_str()
            .unwrap()
            .starts_with(&client.ip.to_string())
    );

    let mut capture = TestCapture::load("cap-in");
    let (pod, inbound) = capture_pod(&mut capture.0, &echo);
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
    let body = curl(lab, "app/sleep-0", &url).unwrap();
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
        .exec_captured("app/sleep-0", &["curl", "-sS", "--max-time", "2", &url])
        .unwrap();
    assert!(
        !err.status.success(),
        "a captured pod without ztunnel must not be reachable"
    );
    capture.0.release(pod).unwrap();
    curl(lab, "app/sleep-0", &url).expect("direct again after release");
}
