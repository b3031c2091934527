//! HTTP through a waypoint on loopback against the same requests over a
//! direct HBONE tunnel to the backend (the L4 mesh path), both with the
//! client's HTTP/1.1 connection kept alive.
//!
//! The waypoint path: client → HBONE to the waypoint (`:authority` the
//! Service VIP:port) → route matched → HBONE with the waypoint's identity
//! to the backend's 15008 → the app. The direct path: client → HBONE to the
//! backend's 15008 → the app.
//!
//! Run: `cargo bench -p waypoint --bench waypoint` (prints a Markdown
//! table). `WAYPOINT_BENCH_SECS` sets the seconds per throughput run
//! (default 3).

#![allow(clippy::unwrap_used)] // A benchmark: a panic is the failure report.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use waypoint::testing::{Setup, setup};

const ROUTE: &str = r#"  - namespace: demo
    name: echo
    kind: HTTPRoute
    parents: [{service: demo/echo, port: 80, waypoint: demo/waypoint}]
    rules:
      - matches: [{path: !prefix /}]
        filters: [!requestHeaders {add: [[x-through, waypoint]]}]
        backends: []
"#;

/// Requests measured one at a time for the latency percentiles.
const LATENCY_REQUESTS: usize = 5_000;
/// Client connections for the throughput runs.
const CONCURRENCY: usize = 16;

#[derive(Clone, Copy)]
enum Path {
    Waypoint,
    Direct,
}

async fn connect(s: &Setup, path: Path) -> SendRequest<Empty<Bytes>> {
    let io = match path {
        Path::Waypoint => s.tunnel("10.96.0.1:80").await.unwrap(),
        Path::Direct => s.direct_tunnel(8080).await.unwrap(),
    };
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn request(send: &mut SendRequest<Empty<Bytes>>) {
    let req = hyper::Request::builder()
        .uri("/hello")
        .header("host", "echo.demo")
        .body(Empty::new())
        .unwrap();
    // The connection takes the next request once it has finished the last.
    send.ready().await.unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
}

/// p50 and p99 of one request at a time on one connection, µs.
async fn latency(s: &Setup, path: Path) -> (u64, u64) {
    let mut send = connect(s, path).await;
    for _ in 0..500 {
        request(&mut send).await;
    }
    let mut h = Histogram::<u64>::new(3).unwrap();
    for _ in 0..LATENCY_REQUESTS {
        let started = Instant::now();
        request(&mut send).await;
        h.record(started.elapsed().as_micros() as u64).unwrap();
    }
    (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
}

/// Requests per second with `CONCURRENCY` connections for `secs`.
async fn throughput(s: &Setup, path: Path, secs: Duration) -> f64 {
    let mut senders = Vec::new();
    for _ in 0..CONCURRENCY {
        senders.push(connect(s, path).await);
    }
    let deadline = Instant::now() + secs;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut send| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    request(&mut send).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let secs = Duration::from_secs(
        std::env::var("WAYPOINT_BENCH_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
    );
    let s = setup(9, ROUTE).await;
    println!("| path | p50 µs | p99 µs | requests/s ({CONCURRENCY} connections) |");
    println!("|---|---|---|---|");
    for (name, path) in [
        ("direct HBONE to the backend", Path::Direct),
        ("through the waypoint (HTTPRoute)", Path::Waypoint),
    ] {
        let (p50, p99) = latency(&s, path).await;
        let rps = throughput(&s, path, secs).await;
        println!("| {name} | {p50} | {p99} | {rps:.0} |");
    }
}
