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
    /// Keep a mesh config file current with a directory of manifests
    /// (local manifests mode), polling it; policy status on stderr.
    Run {
        #[arg(long)]
        manifests: std::path::PathBuf,
        /// The file ztunnels follow (`ztunnel --mesh-config`).
        #[arg(long)]
        mesh_file: std::path::PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value_t = 250)]
        poll_ms: u64,
    },
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
        Command::Run {
            manifests,
            mesh_file,
            trust_domain,
            poll_ms,
        } => {
            let mut local = controller::local::LocalMode::new(manifests, mesh_file, trust_domain);
            let mut last_error = None;
            loop {
                match local.sync() {
                    Ok(controller::local::Synced::Written) => {
                        eprintln!("mesh config written to {}", local.mesh_file.display());
                        last_error = None;
                    }
                    Ok(controller::local::Synced::Unchanged) => last_error = None,
                    Err(e) if last_error.as_ref() != Some(&e) => {
                        eprintln!("error: {e}; the last good mesh config stays");
                        last_error = Some(e);
                    }
                    Err(_) => {}
                }
                std::thread::sleep(std::time::Duration::from_millis(poll_ms));
            }
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
