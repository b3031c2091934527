//! The `waypoint` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use waypoint::app::{self, Config, Source};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "waypoint", version, about = "Ambit L7 waypoint proxy")]
struct Args {
    /// The namespace of the waypoint's Gateway.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// The service account it runs as (its Gateway's name).
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// Log (and access log) format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: logging::Format,
    /// `/metrics` and `/healthz/ready`.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    /// The controller's address, `host:port` (config stream and CA, TLS).
    #[arg(long, requires_all = ["controller_token", "mesh_roots"], conflicts_with_all = ["mesh_config", "ca_dir"])]
    controller: Option<String>,
    /// File holding the token presented to the controller (read for
    /// every request: a rotated token is picked up).
    #[arg(long)]
    controller_token: Option<PathBuf>,
    /// The mesh root certificate(s), PEM: the controller's certificate
    /// must chain to them.
    #[arg(long)]
    mesh_roots: Option<PathBuf>,
    /// Without a controller: the mesh config file (YAML or JSON) …
    #[arg(long, requires = "ca_dir")]
    mesh_config: Option<PathBuf>,
    /// … and the CA directory signing the waypoint's certificate.
    #[arg(long, requires = "mesh_config")]
    ca_dir: Option<PathBuf>,
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
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    logging::Logging::init(args.log_format, &filter).context("RUST_LOG")?;
    let source = match (
        args.controller,
        args.controller_token,
        args.mesh_roots,
        args.mesh_config,
        args.ca_dir,
    ) {
        (Some(addr), Some(token_file), Some(roots_file), None, None) => Source::Controller {
            addr,
            token_file,
            roots_file,
        },
        (None, None, None, Some(mesh_config), Some(ca_dir)) => Source::Local {
            mesh_config,
            ca_dir,
        },
        _ => anyhow::bail!(
            "give --controller, --controller-token and --mesh-roots, or --mesh-config and --ca-dir"
        ),
    };
    let app = app::build(Config {
        namespace: args.namespace,
        service_account: args.service_account,
        trust_domain: args.trust_domain,
        listen: args.listen,
        metrics_addr: args.metrics,
        source,
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
