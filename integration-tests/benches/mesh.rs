//! The mesh benchmark: one client/server pair across two lab nodes, meshed
//! (captured by both nodes' ztunnels, HBONE between them) against the same
//! pair unmeshed (direct), in one run. A third path sends the unmeshed
//! pair's traffic through a plain TCP relay on each node (`ambit-relay`,
//! where the ztunnels sit): the mesh path's TCP hops and nothing else.
//! Prints a Markdown table for `docs/benchmarks.md`. Needs root; run in
//! release:
//!
//! ```sh
//! cargo bench -p integration-tests --bench mesh
//! ```

#![allow(clippy::unwrap_used, clippy::print_stdout)] // A report, not a library.

use std::io::BufRead;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use integration_tests::{TestLab, bin_dir, require_root};
use lab::LabSpec;
use serde_json::Value;

const NODES: [&str; 2] = ["node-1", "node-2"];
/// Each measurement runs in rounds, the paths taking turns within a round,
/// so that a slow stretch of the shared machine (its round-trip times
/// have been seen to double for minutes at a time) falls on every path
/// alike; percentiles are over all of a path's rounds.
const ROUNDS: u64 = 5;
/// 1 KiB round trips per round, for latency and CPU per request.
const ROUND_TRIPS_PER_ROUND: u64 = 4_000;
const NEW_CONNECTIONS_PER_ROUND: u64 = 600;
const IPERF_ROUND_SECONDS: u64 = 2;

fn json(t: &TestLab, pod: &str, argv: &[&str]) -> Value {
    let out = t.exec(pod, argv);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{argv:?}: {e}: {out}"))
}

/// CPU microseconds of both ztunnels.
fn cpu(t: &TestLab) -> [u64; 2] {
    NODES.map(|n| t.lab.ztunnel_cpu_usec(n).unwrap())
}

/// The server ports a path's client uses: iperf3, TCP echo, HTTP.
const PORTS: [u16; 3] = [5201, 9000, 8080];
/// Where the relays listen, for the ports above in that order.
const RELAY_PORTS: [u16; 3] = [15101, 15102, 15103];
/// The relays' cgroup below each node's.
const RELAY: &str = "relay";

/// Where a path's client connects, and whose CPU is counted.
struct Route<'a> {
    /// Client and server pods' namespace.
    ns: &'a str,
    host: String,
    /// iperf3, TCP echo, HTTP.
    ports: [u16; 3],
    /// CPU microseconds of the proxies on node-1 and node-2.
    cpu: Box<dyn Fn() -> [u64; 2] + 'a>,
}

impl Route<'_> {
    fn client(&self) -> String {
        format!("{}/client-0", self.ns)
    }
}

/// The relays on both nodes; ended when dropped.
struct Relays(Vec<Child>);

impl Drop for Relays {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a relay on the client's node to one on the server's node, which
/// connects to the server pod: client → relay → relay → server, as the
/// mesh path goes client → ztunnel → ztunnel → server.
fn relay_route(t: &TestLab) -> (Relays, Route<'_>) {
    let plan = t.lab.plan();
    let client = plan.pod("plain/client-0").unwrap();
    let server = plan.pod("plain/server-0").unwrap();
    assert_ne!(client.node, server.node, "the pair spans both nodes");
    let (client_node, server_node) = (&plan.nodes[client.node], &plan.nodes[server.node]);
    let bin = bin_dir().join("ambit-relay");
    let mut relays = Relays(Vec::new());
    // The server's node relays to the server's ports, the client's node to
    // the relay ports of the server's node.
    for (node, target, ports) in [
        (server_node, server.ip, PORTS),
        (client_node, server_node.ip, RELAY_PORTS),
    ] {
        let mut argv = vec![bin.to_string_lossy().into_owned()];
        for (listen, port) in RELAY_PORTS.iter().zip(ports) {
            argv.push("--route".into());
            argv.push(format!("0.0.0.0:{listen}={target}:{port}"));
        }
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let child = t.lab.node_spawn(&node.name, RELAY, &argv).unwrap();
        relays.0.push(child);
        let child = relays.0.last_mut().unwrap();
        // The relay's errors go to ours, and its pipe never fills.
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let name = node.name.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("ambit-relay on {name}: {line}");
            }
        });
        let mut ready = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert!(
            ready.starts_with("ready"),
            "ambit-relay on {} did not start (its errors are above)",
            node.name
        );
    }
    let route = Route {
        ns: "plain",
        host: client_node.pod_gateway.to_string(),
        ports: RELAY_PORTS,
        cpu: Box::new(|| NODES.map(|n| t.lab.node_cpu_usec(n, RELAY).unwrap())),
    };
    (relays, route)
}

/// The pair's server itself, with the ztunnels' CPU counted.
fn server_route<'a>(t: &'a TestLab, ns: &'a str) -> Route<'a> {
    let server = format!("{ns}/server-0");
    Route {
        ns,
        host: t.lab.plan().pod(&server).unwrap().ip.to_string(),
        ports: PORTS,
        cpu: Box::new(|| cpu(t)),
    }
}

fn rss(t: &TestLab) -> [u64; 2] {
    NODES.map(|n| t.lab.ztunnel_rss_kib(n).unwrap())
}

/// What one path measured, added up over its rounds.
#[derive(Debug)]
struct PathResult {
    iperf_bytes: f64,
    iperf_seconds: f64,
    iperf_cpu_us: [u64; 2],
    peak_rss_kib: [u64; 2],
    /// Round-trip times, µs.
    rr: Histogram<u64>,
    rr_cpu_us: [u64; 2],
    /// New connection + request times, µs.
    conns: Histogram<u64>,
    conn_requests: f64,
    conn_seconds: f64,
    conn_cpu_us: [u64; 2],
}

impl PathResult {
    fn new() -> Self {
        let hist = || Histogram::new(3).unwrap();
        Self {
            iperf_bytes: 0.0,
            iperf_seconds: 0.0,
            iperf_cpu_us: [0; 2],
            peak_rss_kib: [0; 2],
            rr: hist(),
            rr_cpu_us: [0; 2],
            conns: hist(),
            conn_requests: 0.0,
            conn_seconds: 0.0,
            conn_cpu_us: [0; 2],
        }
    }

    fn gbps(&self) -> f64 {
        self.iperf_bytes * 8.0 / self.iperf_seconds / 1e9
    }

    fn cpu_s_per_gb(&self) -> [f64; 2] {
        self.iperf_cpu_us
            .map(|us| us as f64 / 1e6 / (self.iperf_bytes / 1e9))
    }

    fn rr_us(&self, q: f64) -> f64 {
        self.rr.value_at_quantile(q) as f64
    }

    fn cpu_us_per_request(&self) -> [f64; 2] {
        self.rr_cpu_us.map(|us| us as f64 / self.rr.len() as f64)
    }

    fn new_conn_rps(&self) -> f64 {
        self.conn_requests / self.conn_seconds
    }

    fn cpu_us_per_new_conn(&self) -> [f64; 2] {
        self.conn_cpu_us.map(|us| us as f64 / self.conn_requests)
    }

    fn new_conn_p50_ms(&self) -> f64 {
        self.conns.value_at_quantile(0.5) as f64 / 1000.0
    }
}

fn add(total: &mut [u64; 2], before: [u64; 2], after: [u64; 2]) {
    for i in 0..2 {
        total[i] += after[i] - before[i];
    }
}

/// Adds an `ambit-load --json` report's latency distribution to `hist`.
fn add_counts(hist: &mut Histogram<u64>, report: &Value) {
    for c in report["latency_ms"]["counts_us"].as_array().unwrap() {
        hist.record_n(c[0].as_u64().unwrap(), c[1].as_u64().unwrap())
            .unwrap();
    }
}

/// Certificates issued, the pooled HBONE connection open.
fn warm_up(t: &TestLab, route: &Route<'_>) {
    let url = format!("http://{}:{}/", route.host, route.ports[2]);
    json(t, &route.client(), &["ambit-load", &url, "--json"]);
}

/// One round of iperf3 single stream, with the ztunnels' memory sampled
/// while it runs.
fn throughput(t: &TestLab, route: &Route<'_>, r: &mut PathResult) {
    let client = route.client();
    let server = format!("{}/server-0", route.ns);
    t.exec(&server, &["iperf3", "--server", "--one-off", "--daemon"]);
    std::thread::sleep(Duration::from_millis(500));
    let before = (route.cpu)();
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
        let (port, secs) = (route.ports[0].to_string(), IPERF_ROUND_SECONDS.to_string());
        let argv = [
            "iperf3",
            "-c",
            &route.host,
            "-p",
            &port,
            "-t",
            &secs,
            "--json",
        ];
        let v = json(t, &client, &argv);
        sampling.store(false, Ordering::Relaxed);
        v
    });
    add(&mut r.iperf_cpu_us, before, (route.cpu)());
    let received = &iperf["end"]["sum_received"];
    r.iperf_bytes += received["bytes"].as_f64().unwrap();
    r.iperf_seconds += received["seconds"].as_f64().unwrap();
    for (peak, now) in r.peak_rss_kib.iter_mut().zip(peaks) {
        *peak = (*peak).max(now.into_inner());
    }
}

/// One round of 1 KiB request/response on one connection.
fn round_trips(t: &TestLab, route: &Route<'_>, r: &mut PathResult) {
    let url = format!("tcp://{}:{}", route.host, route.ports[1]);
    let n = ROUND_TRIPS_PER_ROUND.to_string();
    let argv = ["ambit-load", &url, "--tcp-rr", "1024", "-n", &n];
    let before = (route.cpu)();
    let rr = json(t, &route.client(), &argv);
    add(&mut r.rr_cpu_us, before, (route.cpu)());
    add_counts(&mut r.rr, &rr);
}

/// One round of a new connection per request (pooled HBONE for the mesh).
fn new_connections(t: &TestLab, route: &Route<'_>, r: &mut PathResult) {
    let url = format!("http://{}:{}/", route.host, route.ports[2]);
    let n = NEW_CONNECTIONS_PER_ROUND.to_string();
    let argv = [
        "ambit-load",
        &url,
        "-n",
        &n,
        "-c",
        "1",
        "--new-connections",
        "--json",
    ];
    let before = (route.cpu)();
    let conns = json(t, &route.client(), &argv);
    add(&mut r.conn_cpu_us, before, (route.cpu)());
    assert_eq!(conns["errors"], 0, "{conns}");
    r.conn_requests += conns["requests"].as_f64().unwrap();
    r.conn_seconds += conns["duration_s"].as_f64().unwrap();
    add_counts(&mut r.conns, &conns);
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
    // The relays idle while the other paths are measured.
    let (_relays, relay) = relay_route(&t);
    let routes = [server_route(&t, "plain"), relay, server_route(&t, "meshed")];
    for route in &routes {
        warm_up(&t, route);
    }
    let mut results = [(); 3].map(|()| PathResult::new());
    let phases: [fn(&TestLab, &Route<'_>, &mut PathResult); 3] =
        [throughput, round_trips, new_connections];
    for phase in phases {
        for _ in 0..ROUNDS {
            for (route, r) in routes.iter().zip(&mut results) {
                phase(&t, route, r);
            }
        }
    }
    let [direct, relay, mesh] = &results;
    println!("{}\n", machine());
    print_table(direct, relay, mesh, idle);
}

/// What the numbers depend on besides the code: the CPU, the kernel, and
/// how an idle CPU waits. In a VM guest whose idle driver does not poll
/// (`cpuidle-haltpoll` with `guest_halt_poll_ns` 0), every wake-up of an
/// idle vCPU is a halt and an exit to the host, and every path wakes one
/// at each of its hops: round trips then take several times longer
/// (`docs/benchmarks.md`, "The guest's idle polling").
fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_owned());
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = read("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "unknown".into());
    let idle =
        read("/sys/devices/system/cpu/cpuidle/current_driver").unwrap_or_else(|_| "none".into());
    let poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .map_or(String::new(), |ns| format!(", guest_halt_poll_ns {ns}"));
    format!("Machine: {model}, {cpus} CPUs, kernel {kernel}, cpuidle driver {idle}{poll}.")
}

fn print_table(direct: &PathResult, relay: &PathResult, mesh: &PathResult, idle: [u64; 2]) {
    let pair = |a: [f64; 2]| format!("{:.2} / {:.2}", a[0], a[1]);
    let pair0 = |a: [f64; 2]| format!("{:.0} / {:.0}", a[0], a[1]);
    println!(
        "| measurement | direct | plain TCP relay on both nodes | mesh (HBONE) | mesh vs direct |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| iperf3 single stream, {ROUNDS} × {IPERF_ROUND_SECONDS} s | {:.2} Gbit/s | {:.2} Gbit/s ({:.0}%) | {:.2} Gbit/s | {:.0}% |",
        direct.gbps(),
        relay.gbps(),
        100.0 * relay.gbps() / direct.gbps(),
        mesh.gbps(),
        100.0 * mesh.gbps() / direct.gbps()
    );
    for (q, d, r, m) in [("p50", 0.5), ("p99", 0.99)]
        .map(|(name, q)| (name, direct.rr_us(q), relay.rr_us(q), mesh.rr_us(q)))
    {
        println!(
            "| 1 KiB request/response on one connection, {q} | {d:.0} µs | {r:.0} µs (+{:.0}) | {m:.0} µs | +{:.0} µs |",
            r - d,
            m - d
        );
    }
    println!(
        "| new connection + HTTP request, one at a time | {:.0}/s, p50 {:.2} ms | {:.0}/s, p50 {:.2} ms | {:.0}/s, p50 {:.2} ms | |",
        direct.new_conn_rps(),
        direct.new_conn_p50_ms(),
        relay.new_conn_rps(),
        relay.new_conn_p50_ms(),
        mesh.new_conn_rps(),
        mesh.new_conn_p50_ms()
    );
    println!(
        "| proxy CPU-seconds per GB (node-1 / node-2) | | {} | {} | |",
        pair(relay.cpu_s_per_gb()),
        pair(mesh.cpu_s_per_gb())
    );
    println!(
        "| proxy CPU µs per 1 KiB request (node-1 / node-2) | | {} | {} | |",
        pair(relay.cpu_us_per_request()),
        pair(mesh.cpu_us_per_request())
    );
    println!(
        "| proxy CPU µs per new connection + request (node-1 / node-2) | | {} | {} | |",
        pair0(relay.cpu_us_per_new_conn()),
        pair0(mesh.cpu_us_per_new_conn())
    );
    println!(
        "| ztunnel RSS idle (node-1 / node-2) | | | {} / {} KiB | |",
        idle[0], idle[1]
    );
    println!(
        "| ztunnel RSS peak during iperf3 (node-1 / node-2) | | | {} / {} KiB | |",
        mesh.peak_rss_kib[0], mesh.peak_rss_kib[1]
    );
}
