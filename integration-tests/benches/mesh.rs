//! The mesh benchmark: one client/server pair across two lab nodes, meshed
//! (captured by both nodes' ztunnels, HBONE between them) against the same
//! pair unmeshed (direct), in one run. Prints a Markdown table for
//! `docs/benchmarks.md`. Needs root; run in release:
//!
//! ```sh
//! cargo bench -p integration-tests --bench mesh
//! ```

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A report, not a library.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use integration_tests::{TestLab, require_root};
use lab::LabSpec;
use serde_json::Value;

const NODES: [&str; 2] = ["node-1", "node-2"];
/// Round trips for the latency and CPU-per-request measurement.
const ROUND_TRIPS: u64 = 20_000;
const NEW_CONNECTIONS: u64 = 3_000;
const IPERF_SECONDS: u64 = 5;

fn json(t: &TestLab, pod: &str, argv: &[&str]) -> Value {
    let out = t.exec(pod, argv);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{argv:?}: {e}: {out}"))
}

/// CPU microseconds of both ztunnels.
fn cpu(t: &TestLab) -> [u64; 2] {
    NODES.map(|n| t.lab.ztunnel_cpu_usec(n).unwrap())
}

fn rss(t: &TestLab) -> [u64; 2] {
    NODES.map(|n| t.lab.ztunnel_rss_kib(n).unwrap())
}

#[derive(Debug, Default)]
struct PathResult {
    gbps: f64,
    cpu_s_per_gb: [f64; 2],
    rr_p50_us: f64,
    rr_p99_us: f64,
    cpu_us_per_request: [f64; 2],
    new_conn_rps: f64,
    new_conn_p50_ms: f64,
    peak_rss_kib: [u64; 2],
}

fn measure(t: &TestLab, ns: &str) -> PathResult {
    let client = format!("{ns}/client-0");
    let server = format!("{ns}/server-0");
    let ip = t.lab.plan().pod(&server).unwrap().ip.to_string();
    let mut r = PathResult::default();
    // Warm up: certificates issued, the pooled HBONE connection open.
    json(
        t,
        &client,
        &["ambit-load", &format!("http://{ip}:8080/"), "--json"],
    );

    // Throughput, with the ztunnels' memory sampled while it runs.
    t.exec(&server, &["iperf3", "--server", "--one-off", "--daemon"]);
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu(t);
    let sampling = AtomicBool::new(true);
    let peaks = [AtomicU64::new(0), AtomicU64::new(0)];
    let iperf = std::thread::scope(|s| {
        s.spawn(|| {
            while sampling.load(Ordering::Relaxed) {
                for (peak, now) in peaks.iter().zip(rss(t)) {
                    peak.fetch_max(now, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let secs = IPERF_SECONDS.to_string();
        let v = json(t, &client, &["iperf3", "-c", &ip, "-t", &secs, "--json"]);
        sampling.store(false, Ordering::Relaxed);
        v
    });
    let after = cpu(t);
    let received = &iperf["end"]["sum_received"];
    r.gbps = received["bits_per_second"].as_f64().unwrap() / 1e9;
    let gb = received["bytes"].as_f64().unwrap() / 1e9;
    r.cpu_s_per_gb = [0, 1].map(|i| (after[i] - before[i]) as f64 / 1e6 / gb);
    r.peak_rss_kib = peaks.map(AtomicU64::into_inner);

    // 1 KiB request/response on one connection.
    let before = cpu(t);
    let n = ROUND_TRIPS.to_string();
    let rr = json(
        t,
        &client,
        &[
            "ambit-load",
            &format!("tcp://{ip}:9000"),
            "--tcp-rr",
            "1024",
            "-n",
            &n,
        ],
    );
    let after = cpu(t);
    r.rr_p50_us = rr["latency_ms"]["p50"].as_f64().unwrap() * 1000.0;
    r.rr_p99_us = rr["latency_ms"]["p99"].as_f64().unwrap() * 1000.0;
    r.cpu_us_per_request = [0, 1].map(|i| (after[i] - before[i]) as f64 / ROUND_TRIPS as f64);

    // A new connection per request (pooled HBONE for the mesh).
    let n = NEW_CONNECTIONS.to_string();
    let conns = json(
        t,
        &client,
        &[
            "ambit-load",
            &format!("http://{ip}:8080/"),
            "-n",
            &n,
            "-c",
            "1",
            "--new-connections",
            "--json",
        ],
    );
    assert_eq!(conns["errors"], 0, "{conns}");
    r.new_conn_rps = conns["rps"].as_f64().unwrap();
    r.new_conn_p50_ms = conns["latency_ms"]["p50"].as_f64().unwrap();
    r
}

fn main() {
    // `cargo test --benches` runs this with `--test`: nothing to check.
    if std::env::args().any(|a| a == "--test") || !require_root("mesh benchmark") {
        return;
    }
    let spec = LabSpec::from_yaml(include_str!("../../bench/mesh-lab.yaml")).unwrap();
    let t = TestLab::up(spec);
    // Idle: after start-up garbage has been purged (jemalloc decays freed
    // pages over about 10 s).
    std::thread::sleep(Duration::from_secs(20));
    let idle = rss(&t);
    let direct = measure(&t, "plain");
    let mesh = measure(&t, "meshed");
    let pair = |a: [f64; 2]| format!("{:.2} / {:.2}", a[0], a[1]);
    println!("| measurement | direct | mesh (HBONE) | mesh vs direct |");
    println!("|---|---|---|---|");
    println!(
        "| iperf3 single stream, {IPERF_SECONDS} s | {:.2} Gbit/s | {:.2} Gbit/s | {:.0}% |",
        direct.gbps,
        mesh.gbps,
        100.0 * mesh.gbps / direct.gbps
    );
    println!(
        "| 1 KiB request/response on one connection, p50 | {:.0} µs | {:.0} µs | +{:.0} µs |",
        direct.rr_p50_us,
        mesh.rr_p50_us,
        mesh.rr_p50_us - direct.rr_p50_us
    );
    println!(
        "| 1 KiB request/response on one connection, p99 | {:.0} µs | {:.0} µs | +{:.0} µs |",
        direct.rr_p99_us,
        mesh.rr_p99_us,
        mesh.rr_p99_us - direct.rr_p99_us
    );
    println!(
        "| new connection + HTTP request, one at a time | {:.0}/s, p50 {:.2} ms | {:.0}/s, p50 {:.2} ms | |",
        direct.new_conn_rps, direct.new_conn_p50_ms, mesh.new_conn_rps, mesh.new_conn_p50_ms
    );
    println!(
        "| ztunnel CPU-seconds per GB (node-1 / node-2) | | {} | |",
        pair(mesh.cpu_s_per_gb)
    );
    println!(
        "| ztunnel CPU µs per 1 KiB request (node-1 / node-2) | | {} | |",
        pair(mesh.cpu_us_per_request)
    );
    println!(
        "| ztunnel RSS idle (node-1 / node-2) | | {} / {} KiB | |",
        idle[0], idle[1]
    );
    println!(
        "| ztunnel RSS peak during iperf3 (node-1 / node-2) | | {} / {} KiB | |",
        mesh.peak_rss_kib[0], mesh.peak_rss_kib[1]
    );
}
