//! Node components of a lab: commands and processes in a node's network
//! namespace and cgroup, and what the lab reads from each node's ztunnel.

use std::process::Output;

use super::{Lab, ZTUNNEL_METRICS};
use crate::cgroup;
use crate::error::LabError;
use crate::plan::NodePlan;
use crate::process::{self, Placement, Role};

impl Lab {
    /// The node named `name`, or an error naming the lab.
    pub(super) fn node(&self, name: &str) -> Result<&NodePlan, LabError> {
        self.plan
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::Spec {
                reason: format!("no node {name:?} in lab {:?}", self.name()),
            })
    }

    /// Runs a command in a node's network namespace (as a node component).
    pub fn node_exec_captured(&self, node: &str, argv: &[&str]) -> Result<Output, LabError> {
        self.in_node(node, "exec", |place| process::run_captured(place, argv))
    }

    /// Starts `argv` in a node's network namespace, in the node's cgroup
    /// `component` (for [`Lab::node_cpu_usec`]), as a child of the caller
    /// with stdout and stderr piped. The caller ends it before the lab goes
    /// down.
    pub fn node_spawn(
        &self,
        node: &str,
        component: &str,
        argv: &[&str],
    ) -> Result<std::process::Child, LabError> {
        self.in_node(node, component, |place| process::spawn_piped(place, argv))
    }

    /// Runs `start` with a node component's placement: the node's network
    /// namespace and its cgroup `component` (created if missing).
    fn in_node<T>(
        &self,
        node: &str,
        component: &str,
        start: impl FnOnce(&Placement<'_>) -> Result<T, LabError>,
    ) -> Result<T, LabError> {
        let node = self.node(node)?;
        let cgroup = node.cgroup.join(component);
        cgroup::create(&cgroup)?;
        start(&Placement {
            role: Role::Node,
            netns: &node.netns,
            cgroup: &cgroup,
            env: Vec::new(),
        })
    }

    /// A value from a node's ztunnel metrics, if it answers.
    pub fn ztunnel_metric(&self, node: &str, name: &str) -> Option<u64> {
        self.ztunnel_metrics(node)?
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// A node's ztunnel metrics page, if it answers.
    pub fn ztunnel_metrics(&self, node: &str) -> Option<String> {
        let url = format!("http://{ZTUNNEL_METRICS}/metrics");
        let out = self
            .node_exec_captured(node, &["curl", "-s", "--max-time", "2", &url])
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether a node's ztunnel process is alive.
    pub fn ztunnel_running(&self, node: &str) -> bool {
        self.node(node)
            .is_ok_and(|n| cgroup::populated(&n.cgroup.join("ztunnel")))
    }

    /// CPU time a node's ztunnel has used, in microseconds (its cgroup's
    /// `cpu.stat`).
    pub fn ztunnel_cpu_usec(&self, node: &str) -> Option<u64> {
        self.node_cpu_usec(node, "ztunnel")
    }

    /// CPU time the processes of a node's cgroup `component` have used, in
    /// microseconds (`cpu.stat`).
    pub fn node_cpu_usec(&self, node: &str, component: &str) -> Option<u64> {
        let node = self.node(node).ok()?;
        let stat = std::fs::read_to_string(node.cgroup.join(component).join("cpu.stat")).ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
    }

    /// Resident memory of a node's ztunnel, in KiB (`VmRSS`).
    pub fn ztunnel_rss_kib(&self, node: &str) -> Option<u64> {
        self.ztunnel_pids(node)
            .into_iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|status| {
                status.lines().find_map(|l| {
                    l.strip_prefix("VmRSS:")?
                        .trim()
                        .strip_suffix("kB")?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            })
            .reduce(|a, b| a + b)
    }

    /// The processes of a node's ztunnel (its cgroup's `cgroup.procs`);
    /// empty when the node is unknown or ztunnel is not running.
    pub fn ztunnel_pids(&self, node: &str) -> Vec<u32> {
        let Ok(node) = self.node(node) else {
            return Vec::new();
        };
        std::fs::read_to_string(node.cgroup.join("ztunnel/cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    }
}
