//! Source address preservation for inbound connections. ztunnel connects
//! to the application from the client's address (`IP_TRANSPARENT`), so the
//! application, its logs and its own access rules see the real client, not
//! the pod's own address.
//!
//! The application's replies are then addressed to a remote IP and would
//! leave through the pod's interface. A return path inside the pod's
//! namespace hands them back: ztunnel's connection carries a mark, the
//! kernel gives the application's accepted socket the mark of the SYN that
//! opened it (`net.ipv4.tcp_fwmark_accept`) and its own replies without a
//! socket (a reset for a closed port) the mark of the packet they answer
//! (`net.ipv4.fwmark_reflect`), and marked packets are routed to a table
//! whose default route is local. Unlike a conntrack mark (Istio's in-pod
//! mode), this keeps connection tracking out of the pod's namespace, so
//! none of its packets is looked up in a conntrack table: a meshed bulk
//! transfer took 9% less CPU on the receiving node (docs/benchmarks.md),
//! and ztunnel needs no `nft`. It is installed per pod when the pod is
//! enrolled; where it cannot be (no `ip`, no privilege), the pod's inbound
//! connections come from its own address and the reason is logged.

use std::path::Path;
use std::process::{Command, Stdio};

/// The socket mark of ztunnel's transparent connections.
pub const MARK: u32 = 0x539;
/// The routing table with the local default route, and its rule's priority.
const TABLE: &str = "133";
const RULE_PREF: &str = "32764";
/// The nftables table of the conntrack-mark return path that earlier
/// versions installed; removed when a pod is enrolled or released.
const LEGACY_NFT_TABLE: &str = "ambit_inpod";
/// The pod's settings that mark the application's side of ztunnel's
/// connections.
const SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/tcp_fwmark_accept",
    "/proc/sys/net/ipv4/fwmark_reflect",
];

fn run(netns: &Path, argv: &[&str]) -> Result<(), String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Installs the return path in a pod's namespace (idempotent: an earlier
/// one, e.g. from a ztunnel that was restarted, is replaced).
pub fn install(netns: &Path) -> Result<(), String> {
    // The settings are only ever written to 1 here, so an adopted pod keeps
    // them throughout; the rule is replaced.
    clear_routing(netns);
    let mark = format!("{MARK:#x}");
    run(
        netns,
        &[
            "ip", "rule", "add", "fwmark", &mark, "lookup", TABLE, "pref", RULE_PREF,
        ],
    )?;
    run(
        netns,
        &[
            "ip",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            TABLE,
        ],
    )?;
    set_sysctls(netns, true)
}

/// Writes [`SYSCTLS`] in the pod's namespace: files under `/proc/sys/net`
/// are those of the namespace of the thread that opens them, so a thread
/// enters the namespace for this and ends afterwards.
fn set_sysctls(netns: &Path, on: bool) -> Result<(), String> {
    let ns = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    let value = if on { "1\n" } else { "0\n" };
    std::thread::Builder::new()
        .name("netns-sysctl".into())
        .spawn(move || {
            use std::os::fd::AsFd;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("enter the pod's network namespace: {e}"))?;
            for path in SYSCTLS {
                std::fs::write(path, value).map_err(|e| format!("write {path}: {e}"))?;
            }
            Ok(())
        })
        .map_err(|e| format!("start a thread for the pod's sysctls: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the pod's sysctl thread panicked".into()))
}

/// Removes the return path (nothing to do if there is none).
pub fn remove(netns: &Path) {
    clear_routing(netns);
    let _ = set_sysctls(netns, false);
}

/// Deletes the rule, the table's route and an earlier version's nftables
/// table, whichever are there.
fn clear_routing(netns: &Path) {
    // Best effort: `nft` may be absent, and then so is the table.
    let _ = run(netns, &["nft", "delete", "table", "ip", LEGACY_NFT_TABLE]);
    let _ = run(netns, &["ip", "rule", "del", "pref", RULE_PREF]);
    let _ = run(netns, &["ip", "route", "flush", "table", TABLE]);
}
