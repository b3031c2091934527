//! The ztunnel binary without the privileges capture needs says which ones
//! are missing. Needs root (to drop them); under CI a missing root is a
//! failure, elsewhere a skip.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::process::Command;

use integration_tests::require_root;

#[test]
fn without_cap_bpf_ztunnel_names_the_missing_privilege() {
    if !require_root("without_cap_bpf_ztunnel_names_the_missing_privilege") {
        return;
    }
    lab::ensure_bpffs().unwrap();
    let pins = std::path::Path::new(lab::BPFFS).join(format!("ambit-nocap-{}", std::process::id()));
    // Still uid 0, but with an empty capability set: no CAP_BPF,
    // CAP_NET_ADMIN or CAP_SYS_ADMIN.
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", "--"])
        .arg(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["--node", "n1", "--metrics", "127.0.0.1:0", "--bpf-dir"])
        .arg(&pins)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&pins);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started without privileges: {stderr}"
    );
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
}
