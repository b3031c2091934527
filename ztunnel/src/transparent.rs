//! Source address preservation for inbound connections. ztunnel connects
//! to the application from the client's address (`IP_TRANSPARENT`), so the
//! application, its logs and its own access rules see the real client, not
//! the pod's own address.
//!
//! The application's replies are then addressed to a remote IP and would
//! leave through the pod's interface. A return path inside the pod's
//! namespace hands them back: ztunnel's connection carries a mark that
//! conntrack keeps (nftables), the application's replies get it back, and
//! marked packets are routed to a table whose default route is local. This
//! is the scheme of Istio's in-pod mode. It is installed per pod when the
//! pod is enrolled; where it cannot be (no `nft` or `ip`, no privilege), the
//! pod's inbound connections come from its own address and the reason is
//! logged.

use std::path::Path;
use std::process::{Command, Stdio};

/// The socket mark of ztunnel's transparent connections.
pub const MARK: u32 = 0x539;
/// The routing table with the local default route, and its rule's priority.
const TABLE: &str = "133";
const RULE_PREF: &str = "32764";
const NFT_TABLE: &str = "ambit_inpod";

fn run(netns: &Path, argv: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .args(argv)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        std::io::Write::write_all(&mut pipe, input.as_bytes())
            .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
    }
    let out = child
        .wait_with_output()
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
    remove(netns);
    let mark = format!("{MARK:#x}");
    run(
        netns,
        &[
            "ip", "rule", "add", "fwmark", &mark, "lookup", TABLE, "pref", RULE_PREF,
        ],
        None,
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
        None,
    )?;
    // A `route` chain re-routes a packet whose mark it changed.
    let rules = format!(
        "table ip {NFT_TABLE} {{\n\
         \tchain output {{\n\
         \t\ttype route hook output priority mangle; policy accept;\n\
         \t\tmeta mark {mark} ct mark set {mark}\n\
         \t\tct mark {mark} meta mark set {mark}\n\
         \t}}\n\
         }}\n"
    );
    run(netns, &["nft", "-f", "-"], Some(&rules))
}

/// Removes the return path (nothing to do if there is none).
pub fn remove(netns: &Path) {
    let _ = run(netns, &["nft", "delete", "table", "ip", NFT_TABLE], None);
    let _ = run(netns, &["ip", "rule", "del", "pref", RULE_PREF], None);
    let _ = run(netns, &["ip", "route", "flush", "table", TABLE], None);
}
