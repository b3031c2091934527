//! Raw TCP against an echo port: many idle connections held at once (what
//! a proxy pays per connection), and fixed-size round trips over one
//! connection (request/response latency).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::load::Latency;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// What opening the connections took.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HoldReport {
    pub held: usize,
    pub failed: usize,
    pub open_s: f64,
    /// Up to five distinct error messages.
    pub error_samples: Vec<String>,
}

async fn open_one(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"h").await?;
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await?;
        Ok::<_, std::io::Error>(tcp)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no echo within {timeout:?}")),
    }
}

/// Opens `count` connections to `addr`, `concurrency` at a time, and
/// returns them with the report.
pub async fn open(
    addr: SocketAddr,
    count: usize,
    concurrency: usize,
    timeout: Duration,
) -> (Vec<TcpStream>, HoldReport) {
    let started = Instant::now();
    let mut held = Vec::with_capacity(count);
    let mut errors: Vec<String> = Vec::new();
    let mut failed = 0;
    let mut pending = JoinSet::new();
    let mut next = 0;
    loop {
        while next < count && pending.len() < concurrency.max(1) {
            pending.spawn(open_one(addr, timeout));
            next += 1;
        }
        let Some(done) = pending.join_next().await else {
            break;
        };
        match done.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(tcp) => held.push(tcp),
            Err(e) => {
                failed += 1;
                if errors.len() < 5 && !errors.contains(&e) {
                    errors.push(e);
                }
            }
        }
    }
    let report = HoldReport {
        held: held.len(),
        failed,
        open_s: started.elapsed().as_secs_f64(),
        error_samples: errors,
    };
    (held, report)
}

/// Round trips over one connection.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundTrips {
    pub requests: u64,
    pub bytes: usize,
    pub duration_s: f64,
    pub rps: f64,
    pub latency_ms: Latency,
}

/// Sends `size` bytes and reads them back, `count` times, on one
/// connection.
pub async fn round_trips(addr: SocketAddr, size: usize, count: u64) -> std::io::Result<RoundTrips> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let request = vec![0x5a_u8; size];
    let mut reply = vec![0_u8; size];
    let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is valid");
    let started = Instant::now();
    for _ in 0..count {
        let sent = Instant::now();
        tcp.write_all(&request).await?;
        tcp.read_exact(&mut reply).await?;
        let _ = hist.record(sent.elapsed().as_micros() as u64);
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(RoundTrips {
        requests: count,
        bytes: size,
        duration_s: elapsed,
        rps: count as f64 / elapsed.max(1e-9),
        latency_ms: Latency::from_micros(&hist),
    })
}
