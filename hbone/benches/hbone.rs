//! HBONE over loopback against plain TCP over loopback.
//!
//! The HBONE path is the one a meshed connection takes: the application's TCP
//! connection is accepted by an outbound proxy, tunnelled through a pooled
//! mTLS HTTP/2 connection to an HBONE server, which connects to the upstream
//! over TCP. The direct path is the application connecting to the upstream.
//! The relay path has the HBONE path's three TCP connections without TLS or
//! HTTP/2 (two plain TCP relays copying bytes): what the hops alone cost.
//!
//! Run: `cargo bench -p hbone --bench hbone` (prints a Markdown table).
//! `HBONE_BENCH_SECS` sets the seconds per throughput/rate measurement (default 3).
//! `HBONE_BENCH_ONLY` runs one measurement, for profiling: `throughput`,
//! `tunnel`, `connections`, `latency` (HBONE), `latency-relay`, `latency-direct`.

#![allow(clippy::unwrap_used)] // A benchmark: a panic is the failure report.
#![allow(unsafe_code)] // The counting allocator below.

use std::alloc::{GlobalAlloc, Layout};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tikv_jemallocator::Jemalloc;

use hbone::client::{Connection, Timeouts};
use hbone::copy::copy_bidirectional;
use hbone::testing::{Forward, outbound_proxy};
use hbone::{ConnectRequest, Pool, PoolConfig, PoolKey, Server, ServerOptions};
use hdrhistogram::Histogram;
use identity::ca::DEFAULT_LEAF_TTL;
use identity::{CertManager, CertificateAuthority, Identity, InProcessCa, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counts heap allocations around jemalloc, the allocator the data-plane
/// binaries use (ADR 0004): glibc malloc hands big buffers back to the
/// kernel and page-faults them in again, which costs a third of throughput.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates every call unchanged to the system allocator; the
// counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { Jemalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { Jemalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const CLIENT: &str = "spiffe://cluster.local/ns/bench/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/bench/sa/server";

fn secs() -> Duration {
    let s = std::env::var("HBONE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

/// Listens on loopback and runs `handle` on a task per accepted connection.
async fn serve_each<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).unwrap();
            tokio::spawn(handle(tcp));
        }
    });
    addr
}

/// Reads to EOF, then answers with the byte count.
async fn sink() -> SocketAddr {
    serve_each(|mut tcp| async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        let _ = tcp.write_all(&total.to_be_bytes()).await;
    })
    .await
}

async fn echo() -> SocketAddr {
    serve_each(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

struct Throughput {
    gbit_per_s: f64,
    allocations_per_mib: f64,
    /// Busy time of all the machine's CPUs per gigabyte moved, from
    /// `/proc/stat`: with the benchmark the only thing running, that is the
    /// sender, every relay, the receiver and the kernel's work for them
    /// (softirq included, which the process's own CPU time leaves out).
    cpu_s_per_gb: f64,
}

/// Busy jiffies of all CPUs together.
fn cpu_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice:
    // everything but idle and iowait, and not steal (time the hypervisor
    // gave to others) or guest time (already counted in user and nice).
    fields[..7].iter().sum::<u64>() - fields[3] - fields[4]
}

/// CPU-seconds per GB for `bytes` moved while the busy jiffies went from
/// `before` to now.
fn cpu_per_gb(before: u64, bytes: u64) -> f64 {
    // `/proc/stat` counts in USER_HZ, 100 per second on Linux.
    let busy_secs = (cpu_jiffies() - before) as f64 / 100.0;
    busy_secs / (bytes as f64 / 1e9)
}

async fn throughput(addr: SocketAddr) -> Throughput {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let allocs_before = ALLOCATIONS.load(Ordering::Relaxed);
    let cpu_before = cpu_jiffies();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < secs() {
        tcp.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    tcp.shutdown().await.unwrap();
    let received = tcp.read_u64().await.unwrap();
    let elapsed = start.elapsed();
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - allocs_before;
    assert_eq!(received, sent, "every byte arrived");
    Throughput {
        gbit_per_s: sent as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        allocations_per_mib: allocs as f64 / (sent as f64 / (1 << 20) as f64),
        cpu_s_per_gb: cpu_per_gb(cpu_before, sent),
    }
}

/// Bytes written straight into a tunnel (no application socket on the
/// client side), delivered by the HBONE server to the sink.
async fn tunnel_throughput(pool: &Pool, key: &PoolKey, sink: SocketAddr) -> Throughput {
    let total = (secs().as_secs_f64() * 1e9) as u64;
    let stream = pool.connect(key, &ConnectRequest::new(sink)).await.unwrap();
    let mut reply = Vec::new();
    let allocs_before = ALLOCATIONS.load(Ordering::Relaxed);
    let cpu_before = cpu_jiffies();
    let start = Instant::now();
    let source = tokio::io::repeat(0x5a).take(total);
    copy_bidirectional(source, &mut reply, stream)
        .await
        .unwrap();
    let elapsed = start.elapsed();
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - allocs_before;
    assert_eq!(reply, total.to_be_bytes(), "every byte arrived");
    Throughput {
        gbit_per_s: total as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        allocations_per_mib: allocs as f64 / (total as f64 / (1 << 20) as f64),
        cpu_s_per_gb: cpu_per_gb(cpu_before, total),
    }
}

/// 1 KiB request, 1 KiB response, one connection per path, in rounds that
/// alternate between the paths so that a slow stretch of the shared machine
/// falls on all of them alike.
async fn request_latency(addrs: &[SocketAddr]) -> Vec<Histogram<u64>> {
    const ROUNDS: usize = 5;
    const PER_ROUND: usize = 4_000;
    const WARM_UP: usize = 500;
    let mut conns = Vec::new();
    for addr in addrs {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        conns.push(tcp);
    }
    let req = [7u8; 1024];
    let mut resp = [0u8; 1024];
    let mut hists: Vec<_> = addrs.iter().map(|_| Histogram::new(3).unwrap()).collect();
    for _ in 0..ROUNDS {
        for (tcp, hist) in conns.iter_mut().zip(&mut hists) {
            for i in 0..WARM_UP + PER_ROUND {
                let start = Instant::now();
                tcp.write_all(&req).await.unwrap();
                tcp.read_exact(&mut resp).await.unwrap();
                if i >= WARM_UP {
                    hist.record(start.elapsed().as_nanos() as u64).unwrap();
                }
            }
        }
    }
    hists
}

/// New connections, one at a time: connect, 1-byte round trip, close.
async fn connection_rate(addr: SocketAddr) -> (f64, Histogram<u64>) {
    let mut hist = Histogram::new(3).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs() {
        let t = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        hist.record(t.elapsed().as_nanos() as u64).unwrap();
        n += 1;
    }
    (n as f64 / start.elapsed().as_secs_f64(), hist)
}

/// Like the outbound proxy, but with a fresh mTLS handshake per connection.
async fn fresh_handshake_proxy(
    listener: TcpListener,
    certs: CertManager,
    hbone: SocketAddr,
    target: SocketAddr,
) {
    let src = Identity::parse(CLIENT).unwrap();
    let dst = Identity::parse(SERVER).unwrap();
    while let Ok((mut tcp, _)) = listener.accept().await {
        let (certs, src, dst) = (certs.clone(), src.clone(), dst.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let cert = certs.fetch(&src).await.unwrap();
            let conn = Connection::establish(&cert, vec![dst], hbone, None, Timeouts::default())
                .await
                .unwrap();
            let stream = conn.open(&ConnectRequest::new(target)).await.unwrap();
            let (r, w) = tcp.split();
            let _ = copy_bidirectional(r, w, stream).await;
        });
    }
}

/// A plain TCP relay to `target`: the HBONE path's hops without its work.
async fn relay_to(target: SocketAddr) -> SocketAddr {
    serve_each(move |mut tcp| async move {
        let mut upstream = TcpStream::connect(target).await.unwrap();
        upstream.set_nodelay(true).unwrap();
        let size = hbone::copy::MAX_BUFFER;
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut upstream, size, size).await;
    })
    .await
}

async fn proxy_to(pool: &Pool, key: &PoolKey, target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(outbound_proxy(listener, pool.clone(), key.clone(), target));
    addr
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Everything the measurements run against, on one runtime.
struct Setup {
    pool: Pool,
    key: PoolKey,
    sink: SocketAddr,
    echo: SocketAddr,
    /// The outbound proxy (HBONE over the pooled connection) to the sink.
    via_sink: SocketAddr,
    /// The outbound proxy to the echo server.
    via_echo: SocketAddr,
    /// A proxy with a fresh mTLS handshake per connection, to the echo server.
    via_fresh: SocketAddr,
}

async fn setup() -> Setup {
    let td = TrustDomain::new("cluster.local").unwrap();
    let ca = Arc::new(CertificateAuthority::self_signed(td, DEFAULT_LEAF_TTL).unwrap());
    let certs = CertManager::new(Arc::new(InProcessCa::new(ca)));
    let server = Server::new(Forward::default(), ServerOptions::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone_addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, certs.clone(), Identity::parse(SERVER).unwrap()));
    let pool = Pool::new(certs.clone(), PoolConfig::default());
    let key = PoolKey::new(
        Identity::parse(CLIENT).unwrap(),
        vec![Identity::parse(SERVER).unwrap()],
        hbone_addr,
        None,
    );
    let (sink, echo) = (sink().await, echo().await);
    let (via_sink, via_echo) = (
        proxy_to(&pool, &key, sink).await,
        proxy_to(&pool, &key, echo).await,
    );
    let fresh = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via_fresh = fresh.local_addr().unwrap();
    tokio::spawn(fresh_handshake_proxy(fresh, certs, hbone_addr, echo));
    // Warm up: certificates issued, pooled connection open.
    connection_rate_once(via_echo).await;
    Setup {
        pool,
        key,
        sink,
        echo,
        via_sink,
        via_echo,
        via_fresh,
    }
}

/// One measurement alone (`HBONE_BENCH_ONLY`), for profiling.
async fn only(which: &str, s: &Setup) {
    match which {
        "throughput" => {
            let tp = throughput(s.via_sink).await;
            println!("HBONE throughput: {:.2} Gbit/s", tp.gbit_per_s);
        }
        "tunnel" => {
            let tp = tunnel_throughput(&s.pool, &s.key, s.sink).await;
            println!("HBONE tunnel-only throughput: {:.2} Gbit/s", tp.gbit_per_s);
        }
        "connections" => {
            let (rate, h) = connection_rate(s.via_echo).await;
            println!(
                "HBONE new connections over the pooled connection: {rate:.0}/s, p50 {:.1} µs p99 {:.1} µs",
                us(&h, 0.5),
                us(&h, 0.99)
            );
        }
        "latency" | "latency-relay" | "latency-direct" => {
            let (name, addr) = match which {
                "latency-direct" => ("direct", s.echo),
                "latency-relay" => ("relay", relay_to(relay_to(s.echo).await).await),
                _ => ("HBONE", s.via_echo),
            };
            let h = request_latency(&[addr]).await.remove(0);
            println!(
                "{name} 1 KiB p50 {:.1} µs p99 {:.1} µs",
                us(&h, 0.5),
                us(&h, 0.99)
            );
        }
        other => panic!("HBONE_BENCH_ONLY={other}: not a measurement"),
    }
}

/// Every measurement of the table.
struct Results {
    direct_tp: Throughput,
    relay_tp: Throughput,
    tunnel_tp: Throughput,
    hbone_tp: Throughput,
    direct_lat: Histogram<u64>,
    relay_lat: Histogram<u64>,
    hbone_lat: Histogram<u64>,
    direct_rate: f64,
    direct_conn: Histogram<u64>,
    relay_rate: f64,
    relay_conn: Histogram<u64>,
    pooled_rate: f64,
    pooled_conn: Histogram<u64>,
    fresh_rate: f64,
    fresh_conn: Histogram<u64>,
}

async fn measure_all(s: &Setup) -> Results {
    let (relay_sink, relay_echo) = (
        relay_to(relay_to(s.sink).await).await,
        relay_to(relay_to(s.echo).await).await,
    );
    let direct_tp = throughput(s.sink).await;
    let relay_tp = throughput(relay_sink).await;
    let tunnel_tp = tunnel_throughput(&s.pool, &s.key, s.sink).await;
    let hbone_tp = throughput(s.via_sink).await;
    let [direct_lat, relay_lat, hbone_lat]: [Histogram<u64>; 3] =
        request_latency(&[s.echo, relay_echo, s.via_echo])
            .await
            .try_into()
            .unwrap();
    let (direct_rate, direct_conn) = connection_rate(s.echo).await;
    let (relay_rate, relay_conn) = connection_rate(relay_echo).await;
    let (pooled_rate, pooled_conn) = connection_rate(s.via_echo).await;
    let (fresh_rate, fresh_conn) = connection_rate(s.via_fresh).await;
    Results {
        direct_tp,
        relay_tp,
        tunnel_tp,
        hbone_tp,
        direct_lat,
        relay_lat,
        hbone_lat,
        direct_rate,
        direct_conn,
        relay_rate,
        relay_conn,
        pooled_rate,
        pooled_conn,
        fresh_rate,
        fresh_conn,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let s = setup().await;
    match std::env::var("HBONE_BENCH_ONLY") {
        Ok(which) => only(&which, &s).await,
        Err(_) => print_table(&measure_all(&s).await),
    }
}

fn print_table(r: &Results) {
    let percent = |tp: &Throughput| 100.0 * tp.gbit_per_s / r.direct_tp.gbit_per_s;
    println!(
        "| measurement | direct TCP | plain TCP relay, same three hops | HBONE | HBONE / direct |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| single-stream throughput, app → proxy → HBONE → upstream | {:.2} Gbit/s | {:.2} Gbit/s ({:.0}%) | {:.2} Gbit/s | {:.0}% |",
        r.direct_tp.gbit_per_s,
        r.relay_tp.gbit_per_s,
        percent(&r.relay_tp),
        r.hbone_tp.gbit_per_s,
        percent(&r.hbone_tp)
    );
    println!(
        "| single-stream throughput, tunnel only (no client-side socket) | | | {:.2} Gbit/s | {:.0}% |",
        r.tunnel_tp.gbit_per_s,
        percent(&r.tunnel_tp)
    );
    println!(
        "| CPU-seconds per GB, all cores (tunnel only) | {:.2} | {:.2} | {:.2} ({:.2}) | |",
        r.direct_tp.cpu_s_per_gb,
        r.relay_tp.cpu_s_per_gb,
        r.hbone_tp.cpu_s_per_gb,
        r.tunnel_tp.cpu_s_per_gb
    );
    println!(
        "| heap allocations per MiB moved, whole process (tunnel only) | {:.2} | {:.2} | {:.2} ({:.2}) | |",
        r.direct_tp.allocations_per_mib,
        r.relay_tp.allocations_per_mib,
        r.hbone_tp.allocations_per_mib,
        r.tunnel_tp.allocations_per_mib
    );
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        println!(
            "| 1 KiB request/response {name} | {:.1} µs | {:.1} µs (+{:.1}) | {:.1} µs | +{:.1} µs |",
            us(&r.direct_lat, q),
            us(&r.relay_lat, q),
            us(&r.relay_lat, q) - us(&r.direct_lat, q),
            us(&r.hbone_lat, q),
            us(&r.hbone_lat, q) - us(&r.direct_lat, q)
        );
    }
    println!(
        "| new connection, pooled HBONE connection | {:.0}/s, p50 {:.0} µs | {:.0}/s, p50 {:.0} µs | {:.0}/s, p50 {:.0} µs | |",
        r.direct_rate,
        us(&r.direct_conn, 0.5),
        r.relay_rate,
        us(&r.relay_conn, 0.5),
        r.pooled_rate,
        us(&r.pooled_conn, 0.5)
    );
    println!(
        "| new connection, fresh mTLS handshake | | | {:.0}/s, p50 {:.0} µs | |",
        r.fresh_rate,
        us(&r.fresh_conn, 0.5)
    );
}

async fn connection_rate_once(addr: SocketAddr) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await.unwrap();
}
