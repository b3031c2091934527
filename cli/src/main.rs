//! `ambit`: the command-line entry point of the Ambit mesh.

use clap::{Parser, Subcommand};

mod demo;

#[derive(Debug, Parser)]
#[command(name = "ambit", version, about = "Ambit: a sidecar-less service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the mesh's identity and mTLS tunnel foundation working on loopback.
    Demo,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMBIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo => demo::run().await,
    }
}
