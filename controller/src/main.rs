//! The `controller` binary.

use clap::{Parser, Subcommand};

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
            tracing_subscriber::fmt()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let running = controller::run::start_local(options).await?;
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("shutting down");
                running.shutdown().await;
                anyhow::Ok(())
            })?;
        }
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
