//! The `controller` binary.

use clap::{Parser, Subcommand};

// As in the data planes (ADR 0004): with many threads and large churning
// maps the system allocator kept freed memory resident.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "controller", version, about = "Ambit controller")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of the Ambit resources (YAML).
    Crds,
    /// Serve the mesh from a directory of manifests (local manifests
    /// mode): the CA and the config stream over TLS, health, readiness
    /// and metrics over plain HTTP. Policy status goes to the log.
    Run(controller::run::LocalOptions),
    /// Serve the mesh of the Kubernetes cluster it runs in (or the one of
    /// `KUBECONFIG`): watches the API server, keeps the CA in a Secret,
    /// authenticates data planes by TokenReview, and writes policy status
    /// while it holds the Lease.
    Serve(controller::run::KubeOptions),
    /// Print the mesh config (YAML) the controller makes of the Kubernetes
    /// objects in a directory, and each policy's status.
    Mesh {
        /// Directory of YAML manifests.
        #[arg(long)]
        manifests: std::path::PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

fn main() {
    if let Err(error) = run() {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crds => print!("{}", controller::crds_yaml()),
        Command::Run(options) => {
            serve_until_signal(async { controller::run::start_local(options).await })?
        }
        Command::Serve(options) => serve_until_signal(async {
            let client = kube::Client::try_default().await?;
            controller::run::start_kubernetes(client, options).await
        })?,
        Command::Mesh {
            manifests,
            trust_domain,
        } => {
            let cluster = controller::manifests::read_dir(&manifests, &trust_domain)?;
            let (config, statuses) = cluster.translate();
            // Status on stderr, so stdout stays the config.
            for status in statuses {
                eprintln!("{status}");
            }
            print!("{}", serde_yaml::to_string(&config)?);
        }
    }
    Ok(())
}

/// Starts the controller with logging, runs until SIGTERM or ^C, then
/// shuts it down gracefully.
fn serve_until_signal(
    start: impl Future<Output = anyhow::Result<controller::run::Running>>,
) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Return freed pages to the kernel without waiting for the next
    // allocation (a full sync frees much at once).
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(%error, "jemalloc background purging not enabled");
    }
    tokio::runtime::Runtime::new()?.block_on(async {
        let running = start.await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        running.shutdown().await;
        Ok(())
    })
}
