//! Starting processes inside a pod (or node): in its network namespace, in
//! its cgroup from the first instruction, with its hosts file, detached from
//! the caller and logging to the lab's state directory.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use crate::error::LabError;

/// Joins the cgroup, raises the open-files limit as container runtimes do
/// for pods (1048576; kept as is where not permitted), then becomes the
/// command inside the namespace. `ip
/// netns exec` also bind-mounts `/etc/netns/<ns>/hosts` over `/etc/hosts`
/// (how pods resolve service names).
const ENTER_POD: &str = r#"cg="$1"; ns="$2"; shift 2; echo $$ > "$cg/cgroup.procs" || exit 125; ulimit -n 1048576 2>/dev/null; exec ip netns exec "$ns" "$@""#;
/// For node components: `ip netns exec` remounts /sys, which hides the
/// cgroup and BPF filesystems ztunnel needs, so only the network namespace
/// is entered.
const ENTER_NODE: &str = r#"cg="$1"; ns="$2"; shift 2; echo $$ > "$cg/cgroup.procs" || exit 125; ulimit -n 1048576 2>/dev/null; exec nsenter --net="/var/run/netns/$ns" "$@""#;

/// What kind of process is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An application in a pod: sees the pod's hosts file.
    Pod,
    /// A node component (ztunnel): sees the host's filesystems.
    Node,
}

/// Where a process runs and what it sees.
#[derive(Debug, Clone)]
pub struct Placement<'a> {
    pub role: Role,
    pub netns: &'a str,
    pub cgroup: &'a Path,
    pub env: Vec<(String, OsString)>,
}

fn enter_command(place: &Placement<'_>, argv: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    let script = match place.role {
        Role::Pod => ENTER_POD,
        Role::Node => ENTER_NODE,
    };
    cmd.arg("-c")
        .arg(script)
        .arg("sh")
        .arg(place.cgroup)
        .arg(place.netns)
        .args(argv)
        .envs(place.env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Starts `argv` in the background, detached (its own session, reparented
/// away from the caller), with output appended to `log`.
pub fn spawn_detached(place: &Placement<'_>, argv: &[&str], log: &Path) -> Result<(), LabError> {
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(LabError::io(format!("open log {}", log.display())))
    };
    let inner = enter_command(place, argv);
    // `setsid -f` forks: the process is not our child, so it neither becomes
    // a zombie of a long-lived caller (tests) nor dies with the caller.
    let mut cmd = Command::new("setsid");
    cmd.arg("-f")
        .arg(inner.get_program())
        .args(inner.get_args())
        .envs(place.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?);
    let status = cmd
        .status()
        .map_err(LabError::io(format!("start {}", argv.join(" "))))?;
    if !status.success() {
        return Err(LabError::Command {
            command: argv.join(" "),
            stderr: format!("could not be started in {} ({status})", place.netns),
        });
    }
    Ok(())
}

/// Starts `argv` as a child with its stdout piped (tests that must act
/// while it runs).
pub fn spawn_piped(place: &Placement<'_>, argv: &[&str]) -> Result<std::process::Child, LabError> {
    enter_command(place, argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(LabError::io(format!("start {}", argv.join(" "))))
}

/// Runs `argv` in the foreground with the caller's terminal.
pub fn run_foreground(place: &Placement<'_>, argv: &[&str]) -> Result<ExitStatus, LabError> {
    enter_command(place, argv)
        .status()
        .map_err(LabError::io(format!("run {}", argv.join(" "))))
}

/// Runs `argv` and captures its output (for the demo and tests).
pub fn run_captured(
    place: &Placement<'_>,
    argv: &[&str],
) -> Result<std::process::Output, LabError> {
    enter_command(place, argv)
        .stdin(Stdio::null())
        .output()
        .map_err(LabError::io(format!("run {}", argv.join(" "))))
}
