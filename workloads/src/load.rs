//! The load client: N requests or T seconds at a given concurrency, over
//! HTTP/1.1, HTTP/2 (cleartext, prior knowledge) or gRPC; reports status codes,
//! which pods answered, and latency percentiles.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use tonic::transport::Channel;

use crate::echo::POD_HEADER;
use crate::grpc::proto::EchoRequest;
use crate::grpc::proto::echo_client::EchoClient;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: Uri,
    /// Stop after this many requests…
    pub requests: Option<u64>,
    /// …or after this long (whichever is given; requests win if both).
    pub duration: Option<Duration>,
    pub concurrency: usize,
    pub http2: bool,
    /// Call `ambit.echo.v1.Echo/Echo` instead of HTTP GET; `status` then
    /// counts gRPC status codes (0 is OK).
    pub grpc: bool,
    /// A new connection per request (HTTP/1.1), so that each one is load
    /// balanced on its own.
    pub new_connections: bool,
    pub timeout: Duration,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub requests: u64,
    pub errors: u64,
    pub duration_s: f64,
    pub rps: f64,
    /// Responses per status code.
    pub status: BTreeMap<u16, u64>,
    /// Responses per answering pod (the `x-ambit-pod` header).
    pub backends: BTreeMap<String, u64>,
    pub latency_ms: Latency,
    /// Up to five distinct error messages.
    pub error_samples: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    /// The recorded distribution, `[microseconds, count]` per bucket in
    /// increasing order, so that a caller running several rounds can add
    /// them into one histogram and take percentiles over all of them rather
    /// than average the rounds'.
    pub counts_us: Vec<[u64; 2]>,
}

impl Latency {
    /// Milliseconds from a histogram of microseconds.
    pub fn from_micros(hist: &Histogram<u64>) -> Self {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            max: hist.max() as f64 / 1000.0,
            counts_us: hist
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect(),
        }
    }
}

#[derive(Default)]
struct Tally {
    status: BTreeMap<u16, u64>,
    backends: BTreeMap<String, u64>,
    errors: u64,
    error_samples: Vec<String>,
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// What requests go out on: shared by the workers.
#[derive(Clone)]
enum Transport {
    Http(HttpClient),
    /// One multiplexed channel; `None` with `new_connections`.
    Grpc(Option<EchoClient<Channel>>),
}

impl Transport {
    async fn new(cfg: &LoadConfig) -> Result<Self, String> {
        if !cfg.grpc {
            return Ok(Transport::Http(client(cfg)));
        }
        if cfg.new_connections {
            return Ok(Transport::Grpc(None));
        }
        Ok(Transport::Grpc(Some(grpc_connect(cfg).await?)))
    }
}

async fn grpc_connect(cfg: &LoadConfig) -> Result<EchoClient<Channel>, String> {
    let endpoint = Channel::builder(cfg.url.clone())
        .connect_timeout(cfg.timeout)
        .tcp_nodelay(true);
    let channel = tokio::time::timeout(cfg.timeout, endpoint.connect())
        .await
        .map_err(|_| format!("connect timed out after {:?}", cfg.timeout))?
        .map_err(|e| format!("connect {}: {}", cfg.url, chain(&e)))?;
    Ok(EchoClient::new(channel))
}

/// An error with its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn client(cfg: &LoadConfig) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(cfg.timeout));
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(cfg.http2);
    if cfg.new_connections {
        builder.pool_max_idle_per_host(0);
    }
    builder.build(connector)
}

/// Runs the load and reports; fails only if a gRPC channel cannot be opened.
pub async fn run(cfg: LoadConfig) -> Result<Report, String> {
    let client = Transport::new(&cfg).await?;
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let limit = cfg
        .requests
        .or(if deadline.is_some() { None } else { Some(1) });
    let workers: Vec<_> = (0..cfg.concurrency.max(1))
        .map(|_| {
            let (client, cfg, issued, tally) =
                (client.clone(), cfg.clone(), issued.clone(), tally.clone());
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is valid");
                loop {
                    let n = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if limit.is_some_and(|l| n >= l)
                        || deadline.is_some_and(|d| Instant::now() >= d)
                    {
                        break;
                    }
                    let t = Instant::now();
                    let outcome = one_request(&client, &cfg).await;
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                    record(&tally, outcome);
                }
                hist
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is valid");
    for w in workers {
        if let Ok(h) = w.await {
            let _ = hist.add(h);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Report {
        requests: hist.len(),
        errors: tally.errors,
        duration_s: elapsed,
        rps: hist.len() as f64 / elapsed.max(1e-9),
        status: tally.status,
        backends: tally.backends,
        latency_ms: Latency::from_micros(&hist),
        error_samples: tally.error_samples,
    })
}

async fn one_request(
    client: &Transport,
    cfg: &LoadConfig,
) -> Result<(u16, Option<String>), String> {
    match client {
        Transport::Http(http) => http_request(http, cfg).await,
        Transport::Grpc(channel) => {
            let mut client = match channel {
                Some(c) => c.clone(),
                None => grpc_connect(cfg).await?,
            };
            let call = client.echo(EchoRequest {
                message: "ambit-load".into(),
            });
            match tokio::time::timeout(cfg.timeout, call).await {
                Err(_) => Err(format!("timed out after {:?}", cfg.timeout)),
                Ok(Ok(resp)) => Ok((0, Some(resp.into_inner().pod))),
                Ok(Err(status)) => Ok((status.code() as u16, None)),
            }
        }
    }
}

async fn http_request(
    client: &HttpClient,
    cfg: &LoadConfig,
) -> Result<(u16, Option<String>), String> {
    let req = Request::get(cfg.url.clone())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:#}"))?;
        let status = resp.status().as_u16();
        let pod = resp
            .headers()
            .get(POD_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, pod))
    };
    tokio::time::timeout(cfg.timeout, fut)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {:?}", cfg.timeout)))
}

fn record(tally: &Mutex<Tally>, outcome: Result<(u16, Option<String>), String>) {
    let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
    match outcome {
        Ok((status, pod)) => {
            *t.status.entry(status).or_default() += 1;
            if let Some(pod) = pod {
                *t.backends.entry(pod).or_default() += 1;
            }
        }
        Err(e) => {
            t.errors += 1;
            if t.error_samples.len() < 5 && !t.error_samples.contains(&e) {
                t.error_samples.push(e);
            }
        }
    }
}

impl Report {
    /// Human-readable form.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{} requests in {:.2}s ({:.1}/s), {} errors\nlatency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
            self.requests,
            self.duration_s,
            self.rps,
            self.errors,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.max
        );
        for (code, n) in &self.status {
            out.push_str(&format!("status {code}: {n}\n"));
        }
        for (pod, n) in &self.backends {
            out.push_str(&format!("answered by {pod}: {n}\n"));
        }
        for e in &self.error_samples {
            out.push_str(&format!("error: {e}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_added_up_give_the_percentiles_of_all_rounds() {
        let mut all = Histogram::<u64>::new(3).unwrap();
        let mut pooled = Histogram::<u64>::new(3).unwrap();
        for round in 0..3_u64 {
            let mut h = Histogram::<u64>::new(3).unwrap();
            for i in 0..1_000 {
                // Rounds at different levels, as on a machine whose speed
                // changes; values above 2,048 share buckets.
                let v = 20 + round * 4_000 + (i * 7919) % 3_000;
                h.record(v).unwrap();
                all.record(v).unwrap();
            }
            for [value, count] in Latency::from_micros(&h).counts_us {
                pooled.record_n(value, count).unwrap();
            }
        }
        assert_eq!(pooled.len(), 3_000);
        for q in [0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                pooled.value_at_quantile(q),
                all.value_at_quantile(q),
                "q = {q}"
            );
        }
    }
}
