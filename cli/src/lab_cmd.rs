//! `ambit lab …`: run a whole mesh cluster on this machine.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use lab::{Lab, LabOptions, LabSpec};

use crate::lab_demo;

/// The lab used when no name or file is given.
pub(crate) const DEFAULT_LAB: &str = "ambit";

#[derive(Debug, Subcommand)]
pub(crate) enum LabCommand {
    /// Create the lab: nodes, pods and services as network namespaces.
    Up {
        /// Lab definition (YAML); the built-in two-node lab if omitted.
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
    },
    /// Remove the lab and everything it created (idempotent).
    Down {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Nodes, pods, services and the health of every process.
    Status {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Add or change Kubernetes objects (policies, labels, routes).
    Apply {
        #[arg(short = 'f', long)]
        file: PathBuf,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Remove the Kubernetes objects of a file.
    Delete {
        #[arg(short = 'f', long)]
        file: PathBuf,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Run a command inside a pod: `ambit lab exec demo/sleep-0 -- curl echo`.
    Exec {
        /// namespace/pod
        pod: String,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a component's log (`namespace/pod`).
    Logs {
        component: String,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Bring up the default lab, prove traffic flows, and report.
    Demo {
        /// Remove the lab when the demo is done.
        #[arg(long)]
        down: bool,
    },
}

pub(crate) fn options() -> anyhow::Result<LabOptions> {
    let exe = std::env::current_exe().context("cannot locate the ambit binary")?;
    let bin_dir = exe
        .parent()
        .context("the ambit binary has no parent directory")?
        .to_path_buf();
    Ok(LabOptions::new(bin_dir))
}

pub(crate) fn run(cmd: LabCommand) -> anyhow::Result<()> {
    let opts = options()?;
    match cmd {
        LabCommand::Up { file } => {
            let spec = match file {
                Some(path) => LabSpec::from_yaml(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )?,
                None => LabSpec::default(),
            };
            let lab = Lab::up(spec, &opts)?;
            println!("lab {:?} is up", lab.name());
            print_status(&lab);
        }
        LabCommand::Down { name } => {
            Lab::down(&name, &opts)?;
            println!("lab {name:?} is down");
        }
        LabCommand::Status { name } => print_status(&Lab::open(&name, &opts)?),
        LabCommand::Apply { file, name } => {
            let lab = Lab::open(&name, &opts)?;
            for obj in lab.apply(&file)? {
                println!("applied {obj}");
            }
            println!(
                "the lab's controller translates them; `ambit lab logs controller` shows each policy's status"
            );
        }
        LabCommand::Delete { file, name } => {
            for obj in Lab::open(&name, &opts)?.delete(&file)? {
                println!("deleted {obj}");
            }
        }
        LabCommand::Exec { pod, name, command } => {
            let argv: Vec<&str> = command.iter().map(String::as_str).collect();
            let status = Lab::open(&name, &opts)?.exec(&pod, &argv)?;
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCommand::Logs { component, name } => {
            let path = Lab::open(&name, &opts)?.log_path(&component);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("no log for {component:?} at {}", path.display()))?;
            print!("{text}");
        }
        LabCommand::Demo { down } => {
            let ok = lab_demo::run(&opts, down)?;
            if down {
                Lab::down(DEFAULT_LAB, &opts)?;
            }
            if !ok {
                bail!("the demo failed");
            }
        }
    }
    Ok(())
}

pub(crate) fn print_status(lab: &Lab) {
    let plan = lab.plan();
    println!("\nNODES");
    for node in &plan.nodes {
        println!("  {:<12} {:<15} pods {}", node.name, node.ip, node.pod_cidr);
    }
    println!("\nPODS");
    println!(
        "  {:<24} {:<13} {:<8} {:<9} {:<8} IDENTITY",
        "NAME", "IP", "NODE", "CAPTURED", "STATE"
    );
    for pod in lab.pod_status() {
        println!(
            "  {:<24} {:<13} {:<8} {:<9} {:<8} {}",
            pod.key,
            pod.ip,
            pod.node,
            if pod.captured { "yes" } else { "no" },
            if pod.running { "running" } else { "CRASHED" },
            pod.identity
        );
    }
    println!("\nZTUNNELS");
    if plan.pods.iter().any(|p| p.meshed) {
        for node in &plan.nodes {
            let state = if lab.ztunnel_running(&node.name) {
                "running"
            } else {
                "CRASHED"
            };
            let captured = lab
                .ztunnel_metric(&node.name, "ambit_ztunnel_captured_pods")
                .map_or("?".to_string(), |n| n.to_string());
            println!("  {:<12} {:<8} captured pods {captured}", node.name, state);
        }
    } else {
        println!("  none (no namespace is labelled ambit.dev/dataplane-mode=ambient)");
    }
    println!("\nSERVICES");
    for svc in &plan.services {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| format!("{}:{}→{}", p.name, p.port, p.target_port))
            .collect();
        let endpoints: Vec<String> = svc
            .endpoints
            .iter()
            .map(|&i| plan.pods[i].ip.to_string())
            .collect();
        println!(
            "  {:<24} {:<13} {}  endpoints {}",
            format!("{}/{}", svc.namespace, svc.name),
            svc.cluster_ip,
            ports.join(" "),
            endpoints.join(", ")
        );
    }
    println!(
        "\nstate and logs: {}",
        lab.cluster_dir()
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
}
