//! The `ztunnel` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use capture::Exclusions;
use clap::Parser;
use ztunnel::app::{self, Config};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about = "Ambit node proxy")]
struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// JSON file listing the pods to capture (written by `ambit lab`).
    #[arg(long)]
    pods: Option<PathBuf>,
    /// Unix socket accepting enrollment requests.
    #[arg(long)]
    enroll_socket: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15020")]
    metrics: SocketAddr,
    /// BPF filesystem directory for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    bpf_dir: PathBuf,
    /// Log (and access log) format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Mesh config file (workloads and services, YAML or JSON).
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// Sign pods' certificates with the CA in this directory (local
    /// setups such as `ambit lab`).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// IPv4 networks whose outbound connections are never captured
    /// (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidr: Vec<ipnet::Ipv4Net>,
    /// Destination ports whose outbound connections are never captured.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_port: Vec<u16>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .flatten_event(true)
            .init(),
    }
    let app = app::build(Config {
        node: args.node,
        pods_file: args.pods,
        enroll_socket: args.enroll_socket,
        metrics_addr: args.metrics,
        bpf_dir: args.bpf_dir,
        mesh_config: args.mesh_config,
        ca_dir: args.ca_dir,
        trust_domain: args.trust_domain,
        exclusions: Exclusions {
            nets: args
                .exclude_outbound_cidr
                .iter()
                .map(|n| (n.network(), n.prefix_len()))
                .collect(),
            ports: args.exclude_outbound_port,
        },
    })
    .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}
