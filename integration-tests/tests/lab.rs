//! The lab as a cluster: real namespaces, routes, nftables and processes.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use integration_tests::{TestLab, bin_dir, leftovers, options, require_root, spec};
use lab::{Lab, LabError};

#[test]
fn cross_node_pod_to_pod_tcp_and_http() {
    if !require_root("cross_node_pod_to_pod_tcp_and_http") {
        return;
    }
    let t = TestLab::up(spec("it-p2p", 1, 2, 2));
    let plan = t.lab.plan();
    let client = plan.pod("app/sleep-0").unwrap();
    let server = plan
        .pods
        .iter()
        .find(|p| p.name.starts_with("echo") && p.node != client.node)
        .expect("an echo pod on the other node");
    let reply = t.curl("app/sleep-0", &format!("http://{}:8080/hello", server.ip));
    assert_eq!(reply["pod"], server.name.as_str());
    assert_eq!(reply["path"], "/hello");
    let peer = reply["peer"].as_str().unwrap();
    assert!(
        peer.starts_with(&format!("{}:", client.ip)),
        "server saw {peer}, not the pod IP"
    );
    let echoed = t.exec(
        "app/sleep-0",
        &[
            "sh",
            "-c",
            &format!("printf tcp-bytes | nc -q 1 -w 3 {} 9000", server.ip),
        ],
    );
    assert_eq!(echoed, "tcp-bytes");
    let grpc = t.exec(
        "app/sleep-0",
        &[
            "ambit-load",
            &format!("http://{}:9090", server.ip),
            "--grpc",
            "-n",
            "5",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&grpc).unwrap();
    assert_eq!(report["status"]["0"], 5, "{grpc}");
    assert_eq!(report["backends"][&server.name], 5, "{grpc}");
    // Ordinary tools work in pods too: iperf3 across nodes.
    let server_pod = format!("app/{}", server.name);
    t.exec(
        &server_pod,
        &["iperf3", "--server", "--one-off", "--daemon"],
    );
    let ip = server.ip.to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = t
            .lab
            .exec_captured("app/sleep-0", &["iperf3", "-c", &ip, "-t", "1", "--json"])
            .unwrap();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100)); // the daemon is still starting
    };
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        bps > 0.0,
        "iperf3 measured nothing: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn service_vip_spreads_over_three_endpoints() {
    if !require_root("service_vip_spreads_over_three_endpoints") {
        return;
    }
    let t = TestLab::up(spec("it-vip", 2, 2, 3));
    let vip = t.lab.plan().services[0].cluster_ip;
    let out = t.exec(
        "app/sleep-0",
        &[
            "ambit-load",
            &format!("http://{vip}/"),
            "-n",
            "90",
            "-c",
            "3",
            "--new-connections",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["errors"], 0, "{out}");
    assert_eq!(report["status"]["200"], 90, "{out}");
    let backends: BTreeMap<String, u64> =
        serde_json::from_value(report["backends"].clone()).unwrap();
    assert_eq!(backends.len(), 3, "{backends:?}");
    // Random choice: each of three endpoints gets far more than 5 of 90.
    assert!(backends.values().all(|&n| n >= 5), "{backends:?}");
}

#[test]
fn service_names_resolve_in_pods() {
    if !require_root("service_names_resolve_in_pods") {
        return;
    }
    let t = TestLab::up(spec("it-dns", 3, 1, 1));
    for name in [
        "echo",
        "echo.app",
        "echo.app.svc",
        "echo.app.svc.cluster.local",
    ] {
        let reply = t.curl("app/sleep-0", &format!("http://{name}/"));
        assert_eq!(reply["pod"], "echo-0", "{name}");
        assert_eq!(reply["headers"]["host"], name);
    }
}

#[test]
fn down_leaves_nothing_behind_and_is_idempotent() {
    if !require_root("down_leaves_nothing_behind_and_is_idempotent") {
        return;
    }
    let name = "it-down";
    let t = TestLab::up(spec(name, 4, 2, 1));
    assert!(!leftovers(name).is_empty());
    drop(t);
    assert_eq!(leftovers(name), Vec::<String>::new());
    Lab::down(name, &options()).unwrap();
    assert_eq!(leftovers(name), Vec::<String>::new());
}

#[test]
fn labs_with_the_same_name_or_overlapping_ranges_are_refused() {
    if !require_root("labs_with_the_same_name_or_overlapping_ranges_are_refused") {
        return;
    }
    let _a = TestLab::up(spec("it-own", 5, 1, 1));
    let again = Lab::up(spec("it-own", 5, 1, 1), &options()).unwrap_err();
    assert!(matches!(again, LabError::AlreadyRunning { .. }), "{again}");
    let overlapping = Lab::up(spec("it-other", 5, 1, 1), &options()).unwrap_err();
    assert!(
        matches!(overlapping, LabError::RangeInUse { .. }),
        "{overlapping}"
    );
    assert!(overlapping.to_string().contains("it-own"), "{overlapping}");
    assert!(
        leftovers("it-other").is_empty(),
        "a refused lab creates nothing"
    );
}

#[test]
fn a_crashed_pod_is_reported_by_status() {
    if !require_root("a_crashed_pod_is_reported_by_status") {
        return;
    }
    let t = TestLab::up(spec("it-crash", 6, 1, 2));
    assert!(t.lab.pod_status().iter().all(|p| p.running));
    let victim = t.lab.plan().pod("app/echo-1").unwrap();
    std::fs::write(victim.cgroup.join("cgroup.kill"), "1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = t.lab.pod_status();
        let echo1 = status.iter().find(|p| p.key == "app/echo-1").unwrap();
        if !echo1.running {
            assert!(
                status
                    .iter()
                    .filter(|p| p.key != "app/echo-1")
                    .all(|p| p.running)
            );
            break;
        }
        assert!(Instant::now() < deadline, "crash never reported");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn down_cleans_up_after_up_was_killed_half_way() {
    if !require_root("down_cleans_up_after_up_was_killed_half_way") {
        return;
    }
    let name = "it-killed";
    let _ = Lab::down(name, &options());
    let mut big = spec(name, 7, 3, 12);
    big.deployments[1].replicas = 6;
    let file = std::env::temp_dir().join(format!("{name}-{}.yaml", std::process::id()));
    std::fs::write(&file, big.to_yaml()).unwrap();
    // In its own process group, killed as a whole as a terminal's Ctrl-C
    // would: an `ip` it runs must not go on creating after `down` looked.
    let mut up = std::process::Command::new(bin_dir().join("ambit"))
        .args(["lab", "up", "-f"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    // Kill it once it has created some namespaces but not all of them.
    let total = 1 + 3 + 18;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let made = leftovers(name)
            .iter()
            .filter(|l| l.starts_with("netns"))
            .count();
        if made >= 3 {
            assert!(
                made < total,
                "up finished before it could be killed ({made} namespaces)"
            );
            break;
        }
        assert!(Instant::now() < deadline, "up made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let group = nix::unistd::Pid::from_raw(i32::try_from(up.id()).unwrap());
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).unwrap();
    up.wait().unwrap();
    assert!(!leftovers(name).is_empty());
    Lab::down(name, &options()).unwrap();
    assert_eq!(leftovers(name), Vec::<String>::new());
    std::fs::remove_file(file).unwrap();
}

#[test]
fn without_root_the_lab_says_so() {
    if !require_root("without_root_the_lab_says_so") {
        return;
    }
    // Drop to an unprivileged user to see what a user without sudo sees.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_dir().join("ambit"))
        .args(["lab", "up"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs root"), "{stderr}");
}

#[test]
fn killed_ztunnel_fails_closed_and_down_removes_its_pins() {
    if !require_root("killed_ztunnel_fails_closed_and_down_removes_its_pins") {
        return;
    }
    let name = "it-mesh";
    let mut mesh = spec(name, 8, 2, 2);
    mesh.namespaces[0]
        .labels
        .insert(lab::plan::DATAPLANE_MODE.into(), "ambient".into());
    let t = TestLab::up(mesh);
    let plan = t.lab.plan();
    let client = plan.pod("app/sleep-0").unwrap();
    let node = plan.nodes[client.node].name.clone();
    let url = format!("http://{}/", plan.services[0].cluster_ip);
    assert!(
        t.lab.pod_status().iter().all(|p| p.captured),
        "meshed pods are captured"
    );
    let reply = t.curl("app/sleep-0", &url);
    assert!(reply["pod"].as_str().unwrap().starts_with("echo-"));

    // SIGKILL the client node's ztunnel: no clean-up code runs.
    let ztunnel = plan.nodes[client.node].cgroup.join("ztunnel");
    std::fs::write(ztunnel.join("cgroup.kill"), "1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.lab.ztunnel_running(&node) {
        assert!(Instant::now() < deadline, "ztunnel still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = t
        .lab
        .exec_captured("app/sleep-0", &["curl", "-sS", "--max-time", "3", &url])
        .unwrap();
    assert!(
        !out.status.success(),
        "a captured pod's connection bypassed the dead ztunnel"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") || err.contains("Failed to connect"),
        "{err}"
    );
    let captured = t
        .lab
        .pod_status()
        .into_iter()
        .find(|p| p.key == "app/sleep-0")
        .unwrap()
        .captured;
    assert!(
        !captured,
        "status no longer claims capture by a dead ztunnel"
    );

    drop(t);
    assert_eq!(
        leftovers(name),
        Vec::<String>::new(),
        "pins, namespaces and cgroups removed"
    );
}
