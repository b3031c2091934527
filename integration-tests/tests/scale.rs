//! Many connections at once through the mesh: 10,000 idle connections held
//! across nodes, with the ztunnels' memory measured per connection and
//! every connection released afterwards.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::io::BufRead;
use std::process::Child;
use std::time::Duration;

use integration_tests::{TestLab, require_root, spec, wait_until};

const CONNECTIONS: u64 = 10_000;
/// What one held connection may cost each ztunnel (client socket, tunnel
/// stream, first read buffer, task, registry entry). Measured at 10–13 KiB
/// in a debug build; a leak or an eagerly allocated bulk buffer (the copy
/// grows to 256 KiB per direction) would exceed it.
const MAX_BYTES_PER_CONNECTION: u64 = 32 * 1024;

/// Kills the child on drop, also when the test fails.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn open_connections(t: &TestLab, node: &str) -> u64 {
    t.lab
        .ztunnel_metric(node, "ambit_ztunnel_open_connections")
        .unwrap()
}

#[test]
fn ten_thousand_connections_are_held_with_bounded_memory() {
    if !require_root("ten_thousand_connections_are_held_with_bounded_memory") {
        return;
    }
    let mut spec = spec("it-scale", 16, 2, 1);
    spec.namespaces[0]
        .labels
        .insert(lab::plan::DATAPLANE_MODE.into(), "ambient".into());
    let t = TestLab::up(spec);
    let plan = t.lab.plan();
    let echo = plan.pod("app/echo-0").unwrap();
    let client = plan.pod("app/sleep-0").unwrap();
    assert_ne!(echo.node, client.node, "the connections cross nodes");
    let (server_node, client_node) = (
        plan.nodes[echo.node].name.clone(),
        plan.nodes[client.node].name.clone(),
    );
    // Warm up: certificates issued, the HBONE pool connected.
    t.curl("app/sleep-0", &format!("http://{}:8080/", echo.ip));
    let rss = |node: &str| t.lab.ztunnel_rss_kib(node).unwrap();
    let before = (rss(&client_node), rss(&server_node));

    let target = format!("tcp://{}:9000", echo.ip);
    let count = CONNECTIONS.to_string();
    let mut load = Killed(
        t.lab
            .spawn(
                "app/sleep-0",
                &[
                    "ambit-load",
                    &target,
                    "--hold",
                    &count,
                    "-c",
                    "200",
                    "--timeout",
                    "30",
                    "--duration",
                    "120",
                ],
            )
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(load.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("ambit-load said {line:?} ({e})"));
    assert_eq!(report["held"], CONNECTIONS, "{report}");
    wait_until(
        "both ztunnels hold every connection",
        Duration::from_secs(10),
        String::new,
        || {
            open_connections(&t, &client_node) >= CONNECTIONS
                && open_connections(&t, &server_node) >= CONNECTIONS
        },
    );
    let held = (rss(&client_node), rss(&server_node));
    let per_conn = |b: u64, h: u64| h.saturating_sub(b) * 1024 / CONNECTIONS;
    let (client_cost, server_cost) = (per_conn(before.0, held.0), per_conn(before.1, held.1));
    eprintln!(
        "ztunnel RSS, client node: {} → {} KiB ({client_cost} B/connection); \
         server node: {} → {} KiB ({server_cost} B/connection); opened in {}s",
        before.0, held.0, before.1, held.1, report["open_s"]
    );
    assert!(
        client_cost <= MAX_BYTES_PER_CONNECTION && server_cost <= MAX_BYTES_PER_CONNECTION,
        "per connection: client-side ztunnel {client_cost} B, server-side {server_cost} B"
    );

    // Closing the client releases every connection on both sides.
    drop(load);
    wait_until(
        "every connection released",
        Duration::from_secs(20),
        String::new,
        || open_connections(&t, &client_node) == 0 && open_connections(&t, &server_node) == 0,
    );
}
