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
}

fn main() {
    match Args::parse().command {
        Command::Crds => print!("{}", controller::crds_yaml()),
    }
}
