//! How capture reports what it cannot do. Needs root; under CI a missing
//! root is a failure, elsewhere a skip.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::path::Path;

use capture::{Capture, CaptureError};
use integration_tests::require_root;

#[test]
fn a_program_the_verifier_refuses_is_reported_with_its_log() {
    if !require_root("a_program_the_verifier_refuses_is_reported_with_its_log") {
        return;
    }
    let err = capture::load_verifier_probe().unwrap_err();
    let CaptureError::Rejected { program, detail } = &err else {
        panic!("expected a rejection, got {err:?}");
    };
    assert_eq!(*program, "unchecked_read");
    // The kernel's own words about the bad access, not just "EACCES".
    assert!(detail.contains("verifier log:"), "{detail}");
    assert!(detail.contains("invalid access to packet"), "{detail}");
    assert!(err.to_string().contains("unchecked_read"), "{err}");
}

#[test]
fn pins_outside_a_bpf_filesystem_are_refused_with_the_fix() {
    if !require_root("pins_outside_a_bpf_filesystem_are_refused_with_the_fix") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let err = Capture::load(&dir.path().join("pins")).unwrap_err();
    assert!(matches!(err, CaptureError::NoBpffs { .. }), "{err:?}");
    assert!(err.to_string().contains("mount -t bpf"), "{err}");
}

#[test]
fn a_missing_cgroup_is_named() {
    if !require_root("a_missing_cgroup_is_named") {
        return;
    }
    lab::ensure_bpffs().unwrap();
    let pins = Path::new(lab::BPFFS).join("ambit-test").join("cap-err");
    let _ = std::fs::remove_dir_all(&pins);
    let mut capture = Capture::load(&pins).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = capture
        .capture(&capture::Pod {
            cgroup: Path::new("/sys/fs/cgroup/unified/ambit-no-such-pod"),
            netns: Path::new("/var/run/netns/ambit-no-such-pod"),
            interface: "eth0",
            ip: "10.255.255.1".parse().unwrap(),
            inbound_listener: &listener,
        })
        .unwrap_err();
    drop(capture);
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_dir(pins.parent().unwrap());
    assert!(matches!(err, CaptureError::Cgroup { .. }), "{err:?}");
    assert!(err.to_string().contains("ambit-no-such-pod"), "{err}");
}
