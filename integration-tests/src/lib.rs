//! End-to-end tests of Ambit on real network namespaces: each test builds its
//! own small lab (unique name and address ranges, so tests can run in
//! parallel or one after another), drives real traffic and tears the lab
//! down even when it panics.
//!
//! The loopback tests of the foundation crates live beside those crates
//! (`identity/tests`, `hbone/tests`).

pub mod fake_api;
pub mod rbac;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use lab::spec::{App, DeploymentSpec, NamespaceSpec, NetworkSpec, ServicePortSpec, ServiceSpec};
use lab::{Lab, LabOptions, LabSpec};

/// Whether the test can run: root is needed for namespaces and cgroups.
/// Without root a test is skipped with a message, except under CI, where
/// skipping would hide that nothing was tested.
pub fn require_root(test: &str) -> bool {
    if lab::is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root and CI is set: run the tests as root"
    );
    eprintln!("skipping {test}: needs root (network namespaces, cgroups)");
    false
}

/// The target of the node proxy as deployed: statically linked against musl
/// (ADR 0021).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// The directory of the workspace's binaries (`ambit`, `ambit-echo`,
/// `ambit-load`, `ztunnel`, `controller`), built once per test run with the same profile.
pub fn bin_dir() -> &'static Path {
    &built().0
}

/// The ztunnel binary labs run: in release (benchmarks) the deployed build,
/// statically linked for [`STATIC_TARGET`]; otherwise the one in
/// [`bin_dir`].
fn ztunnel_bin() -> &'static Path {
    &built().1
}

fn built() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test> → target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let release = dir.file_name().is_some_and(|p| p == "release");
        let mut args = vec![
            "build",
            "--quiet",
            "-p",
            "cli",
            "-p",
            "workloads",
            "-p",
            "ztunnel",
            "-p",
            "controller",
            "-p",
            "waypoint",
        ];
        if release {
            args.push("--release");
        }
        cargo(&args);
        let ztunnel = if release {
            cargo(&[
                "build",
                "--quiet",
                "--release",
                "-p",
                "ztunnel",
                "--target",
                STATIC_TARGET,
            ]);
            let target = dir.parent().expect("target/<profile> has a parent");
            target.join(STATIC_TARGET).join("release").join("ztunnel")
        } else {
            dir.join("ztunnel")
        };
        (dir, ztunnel)
    })
}

fn cargo(args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "building the lab's binaries failed: cargo {args:?}"
    );
}

pub fn options() -> LabOptions {
    LabOptions {
        ztunnel: ztunnel_bin().to_path_buf(),
        ..LabOptions::new(bin_dir().to_path_buf())
    }
}

/// A small lab: `nodes` nodes, namespace `app` with `echo` replicas of the
/// echo server behind service `echo`, and one `sleep` client. `slot` picks
/// address ranges no other test uses.
pub fn spec(name: &str, slot: u8, nodes: usize, echo: u32) -> LabSpec {
    let cidr = |s: &str| s.parse().expect("valid test range");
    LabSpec {
        name: name.into(),
        network: NetworkSpec {
            node_cidr: cidr(&format!("172.30.{slot}.0/24")),
            pod_cidr: cidr(&format!("10.{}.0.0/16", 100 + slot)),
            service_cidr: cidr(&format!("10.{}.0.0/16", 200 + slot)),
        },
        nodes: (1..=nodes).map(|i| format!("n{i}")).collect(),
        namespaces: vec![NamespaceSpec {
            name: "app".into(),
            labels: BTreeMap::new(),
        }],
        deployments: vec![
            DeploymentSpec {
                name: "echo".into(),
                namespace: "app".into(),
                replicas: echo,
                service_account: None,
                app: App::Echo,
                labels: BTreeMap::new(),
            },
            DeploymentSpec {
                name: "sleep".into(),
                namespace: "app".into(),
                replicas: 1,
                service_account: None,
                app: App::Sleep,
                labels: BTreeMap::new(),
            },
        ],
        services: vec![ServiceSpec {
            name: "echo".into(),
            namespace: "app".into(),
            selector: None,
            ports: vec![
                ServicePortSpec {
                    name: "http".into(),
                    port: 80,
                    target_port: Some(8080),
                },
                ServicePortSpec {
                    name: "tcp".into(),
                    port: 9000,
                    target_port: None,
                },
            ],
            labels: BTreeMap::new(),
        }],
        waypoints: Vec::new(),
    }
}

/// A running lab that is removed when dropped, also on panic.
#[derive(Debug)]
pub struct TestLab {
    pub lab: Lab,
}

impl TestLab {
    pub fn up(spec: LabSpec) -> TestLab {
        TestLab::up_with(spec, &options())
    }

    /// A lab started with other options than [`options`] (another ztunnel
    /// binary).
    pub fn up_with(spec: LabSpec, opts: &LabOptions) -> TestLab {
        // A previous run killed mid-test may have left this lab behind.
        let _ = Lab::down(&spec.name, opts);
        TestLab {
            lab: Lab::up(spec, opts).expect("lab comes up"),
        }
    }

    /// Runs a command in a pod; returns stdout, panicking with stderr on failure.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> String {
        let out = self.lab.exec_captured(pod, argv).expect("exec in pod");
        assert!(
            out.status.success(),
            "`{}` in {pod} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `pod` gets an answer from `url` (3 s at most).
    pub fn reaches(&self, pod: &str, url: &str) -> bool {
        self.lab
            .exec_captured(pod, &["curl", "-sS", "--max-time", "3", url])
            .expect("run curl in the pod")
            .status
            .success()
    }

    /// `curl` from a pod; the echo server's JSON reply.
    pub fn curl(&self, pod: &str, url: &str) -> serde_json::Value {
        let body = self.exec(pod, &["curl", "-sS", "--max-time", "5", url]);
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("reply from {url} is not JSON ({e}): {body}"))
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(self.lab.name(), &options()) {
            eprintln!("could not remove lab {}: {e}", self.lab.name());
        }
    }
}

/// Everything lab `name` could have left on the host; empty when clean.
pub fn leftovers(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    let prefix = lab::plan::netns_prefix(name);
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    for line in String::from_utf8_lossy(&netns.stdout).lines() {
        if line.starts_with(&prefix) {
            found.push(format!("netns {line}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                found.push(format!("{}", e.path().display()));
            }
        }
    }
    for path in [
        Path::new(lab::plan::CGROUP_ROOT).join(name),
        Path::new(lab::STATE_ROOT).join(name),
        Path::new(lab::BPFFS).join("ambit-lab").join(name),
    ] {
        if path.exists() {
            found.push(path.display().to_string());
        }
    }
    found
}

/// Polls `check` until it holds; fails the test after `timeout` with
/// `what` and whatever `context` says then (a metrics page, a log).
pub fn wait_until(
    what: &str,
    timeout: std::time::Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened within {timeout:?}: {what}\n{}",
            context()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
