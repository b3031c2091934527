//! Running host tools (`ip`, `nft`) and checking that the host can run a lab.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::LabError;

/// Runs `program args…`, feeding `stdin` if given; fails with its stderr.
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(LabError::io(format!("cannot start `{command}`")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(LabError::io(format!("cannot write to `{command}`")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(LabError::io(format!("`{command}` did not finish")))?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip args…`.
pub(crate) fn ip(args: &[&str]) -> Result<String, LabError> {
    run("ip", args, None)
}

/// `ip -n netns args…`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all, None)
}

/// Runs a program inside a network namespace.
pub(crate) fn exec_in(netns: &str, args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
    let mut all = vec!["netns", "exec", netns];
    all.extend_from_slice(args);
    run("ip", &all, stdin)
}

/// Network namespaces currently defined.
pub(crate) fn netns_list() -> Result<Vec<String>, LabError> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    effective_uid() == Some(0)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Where node components pin eBPF maps and links.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts the BPF filesystem at /sys/fs/bpf if nothing is mounted there (as
/// a Kubernetes node has it), so captures can outlive ztunnel processes.
pub fn ensure_bpffs() -> Result<(), LabError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(LabError::io("read /proc/self/mounts"))?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    run("mount", &["-t", "bpf", "bpf", BPFFS], None).map(|_| ())
}

/// Checks privileges, tools and kernel features before touching anything.
pub fn preflight() -> Result<(), LabError> {
    if !is_root() {
        return Err(LabError::NotRoot);
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if !on_path(tool) {
            return Err(LabError::MissingTool { tool, package });
        }
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Err(LabError::KernelFeature {
            feature: "network namespaces",
            detail: "/proc/self/ns/net is missing (CONFIG_NET_NS)".into(),
        });
    }
    let cgroup = Path::new(crate::plan::CGROUP_ROOT)
        .parent()
        .expect("the cgroup root has a parent");
    if !cgroup.join("cgroup.controllers").exists() {
        return Err(LabError::KernelFeature {
            feature: "cgroup v2",
            detail: format!("no cgroup v2 hierarchy mounted at {}", cgroup.display()),
        });
    }
    Ok(())
}
