//! `ambit`: the command-line entry point of the Ambit mesh.

use clap::{Parser, Subcommand};

mod demo;
mod lab_cmd;
mod lab_demo;

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
    /// A whole multi-node mesh cluster on this machine (needs root).
    #[command(subcommand)]
    Lab(lab_cmd::LabCommand),
}

fn main() {
    // Errors are for people: the message and its causes, not a backtrace.
    if let Err(error) = run() {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMBIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo => demo::run().await,
        // The lab drives host tools synchronously; keep it off the runtime.
        Command::Lab(cmd) => tokio::task::spawn_blocking(move || lab_cmd::run(cmd)).await?,
    }
}
