//! ztunnel's admin API on each lab node (127.0.0.1:15000 in the node's
//! namespace): readiness, config dump with certificates, open connections,
//! memory and run-time log levels.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::time::Duration;

use integration_tests::{TestLab, require_root, spec, wait_until};

/// `curl` on a node; (HTTP status, body).
fn admin(t: &TestLab, node: &str, method: &str, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:15000{path}");
    let out = t
        .lab
        .node_exec_captured(
            node,
            &[
                "curl",
                "-sS",
                "-X",
                method,
                "--max-time",
                "3",
                "-w",
                "\n%{http_code}",
                &url,
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn the_admin_api_reports_config_connections_and_sets_log_levels() {
    if !require_root("the_admin_api_reports_config_connections_and_sets_log_levels") {
        return;
    }
    let mut spec = spec("it-admin", 17, 2, 1);
    spec.namespaces[0]
        .labels
        .insert(lab::plan::DATAPLANE_MODE.into(), "ambient".into());
    let t = TestLab::up(spec);
    let plan = t.lab.plan();
    let echo = plan.pod("app/echo-0").unwrap();
    let node = plan.nodes[echo.node].name.clone();

    assert_eq!(
        admin(&t, &node, "GET", "/healthz/ready"),
        (200, "ready\n".into())
    );
    // Metrics are served on the node's address, for a Prometheus elsewhere
    // in the cluster; the admin API only inside the node.
    let ip = plan.nodes[echo.node].ip;
    let other = &plan.nodes[(echo.node + 1) % plan.nodes.len()].name;
    let from_other = |url: String| {
        t.lab
            .node_exec_captured(other, &["curl", "-sS", "--max-time", "3", &url])
            .unwrap()
    };
    let scraped = from_other(format!("http://{ip}:15020/metrics"));
    assert!(
        scraped.status.success()
            && String::from_utf8_lossy(&scraped.stdout).contains("ambit_ztunnel_captured_pods"),
        "{scraped:?}"
    );
    assert!(
        !from_other(format!("http://{ip}:15000/healthz/ready"))
            .status
            .success()
    );

    // A connection held open shows in /debug/connections, and the echo
    // pod's certificate in /config_dump. A first request gets both
    // ztunnels their certificates and the pooled tunnel, so that the held
    // one is open at once.
    t.curl("app/sleep-0", &format!("http://{}:8080/", echo.ip));
    let slow = format!("http://{}:8080/delay/5000", echo.ip);
    let dst = format!("{}:8080", echo.ip);
    let listed = || {
        let (code, body) = admin(&t, &node, "GET", "/debug/connections");
        assert_eq!(code, 200, "{body}");
        let conns: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        conns.into_iter().find(|c| c["dst_addr"] == dst.as_str())
    };
    wait_until(
        "the first request's connection is gone",
        Duration::from_secs(10),
        || admin(&t, &node, "GET", "/debug/connections").1,
        || listed().is_none(),
    );
    std::thread::scope(|s| {
        let held = s.spawn(|| {
            t.lab
                .exec_captured("app/sleep-0", &["curl", "-sS", "--max-time", "20", &slow])
                .unwrap()
        });
        wait_until(
            "the held connection is listed",
            Duration::from_secs(10),
            || admin(&t, &node, "GET", "/debug/connections").1,
            || listed().is_some(),
        );
        let conn = listed().unwrap();
        assert_eq!(conn["direction"], "inbound");
        assert_eq!(conn["protocol"], "HBONE");
        assert_eq!(
            conn["src_identity"],
            "spiffe://cluster.local/ns/app/sa/sleep"
        );
        let out = held.join().unwrap();
        assert!(
            out.status.success(),
            "the held request failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });

    let (code, body) = admin(&t, &node, "GET", "/config_dump");
    assert_eq!(code, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(dump["version"].as_u64().unwrap() >= 1);
    let workloads = dump["config"]["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), plan.pods.len());
    assert!(
        dump["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "echo-0")
    );
    let cert = dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/app/sa/echo")
        .unwrap_or_else(|| panic!("no certificate for echo: {dump:#}"));
    let expires = cert["expiresInSeconds"].as_i64().unwrap();
    assert!(expires > 0 && expires <= 24 * 3600, "{cert}");

    // Memory: the kernel's split of resident memory and jemalloc's counters
    // (the binary runs with jemalloc and reports it).
    let (code, body) = admin(&t, &node, "GET", "/debug/memory");
    assert_eq!(code, 200, "{body}");
    let mem: serde_json::Value = serde_json::from_str(&body).unwrap();
    let bytes = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{mem:#}"));
    let process = &mem["process"];
    let rss = bytes(&process["rss"]);
    assert!(rss > 1 << 20, "{mem:#}");
    assert!(
        bytes(&process["rssAnon"]) + bytes(&process["rssFile"]) <= rss,
        "{mem:#}"
    );
    assert!(bytes(&process["rssPeak"]) >= rss, "{mem:#}");
    let heap = &mem["heap"];
    let allocated = bytes(&heap["allocated"]);
    assert!(allocated > 0, "{mem:#}");
    assert!(bytes(&heap["threadCached"]) <= allocated, "{mem:#}");
    assert!(bytes(&heap["active"]) >= allocated, "{mem:#}");
    assert!(bytes(&heap["metadata"]) > 0, "{mem:#}");
    // One arena per CPU (the binary's jemalloc options), not four, and
    // jemalloc's own for allocations of several MiB.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count() as u64;
    let arenas = bytes(&heap["arenas"]);
    assert!((2..=cpus + 1).contains(&arenas), "{cpus} CPUs: {mem:#}");

    // Log level: changed, shown, and a bad filter refused with the reason.
    // The access log stays at info unless the filter names it.
    let debug = (200, "debug,access=info\n".to_string());
    assert_eq!(admin(&t, &node, "POST", "/logging?level=debug"), debug);
    assert_eq!(admin(&t, &node, "GET", "/logging"), debug);
    let (code, body) = admin(&t, &node, "POST", "/logging?level=ztunnel=loud");
    assert_eq!(code, 400, "{body}");
    assert!(body.starts_with("invalid level:"), "{body}");
    assert_eq!(admin(&t, &node, "GET", "/logging"), debug);
    assert_eq!(admin(&t, &node, "GET", "/logging?level=warn").0, 405);
    // An empty level would silence every log but the access log.
    let (code, body) = admin(&t, &node, "POST", "/logging?level=");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("empty log filter"), "{body}");
    assert_eq!(admin(&t, &node, "GET", "/logging"), debug);
    // So would a word that is not a level (a target, to the filter).
    let (code, body) = admin(&t, &node, "POST", "/logging?level=warning");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unknown log level \"warning\""), "{body}");
    assert_eq!(admin(&t, &node, "GET", "/logging"), debug);

    // Under `warn` a connection is still in the access log.
    assert_eq!(
        admin(&t, &node, "POST", "/logging?level=warn"),
        (200, "warn,access=info\n".into())
    );
    let log = t.lab.log_path(&format!("ztunnel/{node}"));
    let access_lines = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("connection complete"))
            .count()
    };
    let before = access_lines();
    t.curl("app/sleep-0", &format!("http://{}:8080/", echo.ip));
    wait_until(
        "the access line of a request made under warn",
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).unwrap(),
        || access_lines() > before,
    );
    assert_eq!(
        admin(&t, &node, "POST", "/logging?level=warn,access=off"),
        (200, "warn,access=off\n".into())
    );
    assert_eq!(admin(&t, &node, "GET", "/nowhere").0, 404);
    assert_eq!(admin(&t, &node, "POST", "/config_dump").0, 405);
}
