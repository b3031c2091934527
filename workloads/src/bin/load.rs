//! `ambit-load`: the lab's load client.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use workloads::load::{self, LoadConfig};

#[derive(Debug, Parser)]
#[command(
    name = "ambit-load",
    version,
    about = "HTTP load client reporting statuses, backends and latency"
)]
struct Args {
    /// e.g. `http://echo.demo/`
    url: http::Uri,
    /// Number of requests (default 1 unless --duration is given).
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Run for this many seconds.
    #[arg(short = 'd', long)]
    duration: Option<f64>,
    #[arg(short = 'c', long, default_value_t = 1)]
    concurrency: usize,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Call the gRPC echo service (`ambit.echo.v1.Echo`) instead of HTTP GET.
    #[arg(long, conflicts_with = "http2")]
    grpc: bool,
    /// Open a new connection for every request.
    #[arg(long)]
    new_connections: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Instead of requests: open this many TCP connections to the URL's
    /// host:port (an echo port), check each with a one-byte echo, print
    /// the report and keep them open for --duration seconds (default 60).
    #[arg(long, conflicts_with_all = ["grpc", "http2", "requests"])]
    hold: Option<usize>,
    /// Instead of HTTP: send this many bytes to the URL's host:port (an
    /// echo port) and read them back, -n times, on one connection.
    #[arg(long, conflicts_with_all = ["grpc", "http2", "hold"])]
    tcp_rr: Option<usize>,
}

fn main() {
    if let Err(error) = run() {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    if let Some(count) = args.hold {
        return hold(&args, count).await;
    }
    if let Some(size) = args.tcp_rr {
        let report =
            workloads::tcp::round_trips(echo_addr(&args).await?, size, args.requests.unwrap_or(1))
                .await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let report = load::run(LoadConfig {
        url: args.url,
        requests: args.requests,
        duration: args.duration.map(Duration::from_secs_f64),
        concurrency: args.concurrency,
        http2: args.http2,
        grpc: args.grpc,
        new_connections: args.new_connections,
        timeout: Duration::from_secs_f64(args.timeout),
    })
    .await
    .map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    // Failed requests make the run fail, so scripts can rely on the exit code.
    if report.errors > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// The URL's host:port, resolved.
async fn echo_addr(args: &Args) -> anyhow::Result<std::net::SocketAddr> {
    let host = args.url.host().context("the URL has no host")?;
    let port = args.url.port_u16().context("the URL has no port")?;
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .with_context(|| format!("{host} does not resolve"))
}

async fn hold(args: &Args, count: usize) -> anyhow::Result<()> {
    let addr = echo_addr(args).await?;
    let (conns, report) = workloads::tcp::open(
        addr,
        count,
        args.concurrency,
        Duration::from_secs_f64(args.timeout),
    )
    .await;
    // One line, printed as soon as everything is open: callers wait for it.
    println!("{}", serde_json::to_string(&report)?);
    std::io::Write::flush(&mut std::io::stdout())?;
    tokio::time::sleep(Duration::from_secs_f64(args.duration.unwrap_or(60.0))).await;
    drop(conns);
    if report.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
