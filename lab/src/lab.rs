//! Bringing a lab up and down, and operating on a running one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::{Duration, Instant};

use crate::error::LabError;
use crate::plan::{ECHO_GRPC_PORT, ECHO_HTTP_PORT, ECHO_TCP_PORT, Plan, PodPlan};
use crate::process::{self, Placement, Role};
use crate::spec::{App, LabSpec};
use crate::{cgroup, host, k8s, net};

mod node;

/// Where running labs keep their state, one directory per lab.
pub const STATE_ROOT: &str = "/run/ambit-lab";

/// How a lab finds its binaries and keeps its state.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Directory holding `ambit-echo` and the other Ambit binaries.
    pub bin_dir: PathBuf,
    /// The node proxy each node runs: `ztunnel` in `bin_dir` unless set to
    /// another build of it (the benchmarks run the statically linked one).
    pub ztunnel: PathBuf,
    pub state_root: PathBuf,
}

impl LabOptions {
    pub fn new(bin_dir: PathBuf) -> Self {
        Self {
            ztunnel: bin_dir.join("ztunnel"),
            bin_dir,
            state_root: PathBuf::from(STATE_ROOT),
        }
    }
}

/// A running lab.
#[derive(Debug)]
pub struct Lab {
    plan: Plan,
    state: PathBuf,
    bin_dir: PathBuf,
    ztunnel: PathBuf,
}

/// What `status` reports of one pod.
#[derive(Debug, Clone)]
pub struct PodStatus {
    pub key: String,
    pub ip: std::net::Ipv4Addr,
    pub node: String,
    pub identity: String,
    /// Meshed and its node's ztunnel is running.
    pub captured: bool,
    pub app: App,
    pub running: bool,
}

const SPEC_FILE: &str = "lab.yaml";
/// Where each node's ztunnel serves metrics: every address of the node's
/// namespace, as on a real node.
const ZTUNNEL_METRICS: &str = "0.0.0.0:15020";
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The controller's CA and config endpoint (Istio's istiod uses 15012 too).
const CONTROLLER_PORT: u16 = 15012;
/// A waypoint's readiness and metrics port.
const WAYPOINT_READY_PORT: u16 = 15020;
/// Its health, readiness and metrics, on the loopback of its namespace.
const CONTROLLER_OPS: &str = "127.0.0.1:15014";

impl Lab {
    /// Creates the lab described by `spec`. On failure, whatever was created
    /// is removed again before the error is returned.
    pub fn up(spec: LabSpec, opts: &LabOptions) -> Result<Lab, LabError> {
        host::preflight()?;
        spec.validate()?;
        let state = opts.state_root.join(&spec.name);
        if state.join(SPEC_FILE).exists() || !net::leftovers(&spec.name)?.is_empty() {
            return Err(LabError::AlreadyRunning {
                name: spec.name.clone(),
                state,
            });
        }
        check_ranges_free(&spec, &opts.state_root)?;
        for dir in [&state, &state.join("logs")] {
            std::fs::create_dir_all(dir)
                .map_err(LabError::io(format!("create {}", dir.display())))?;
        }
        // Written first: from here on `down` can find and remove everything.
        let spec_path = state.join(SPEC_FILE);
        std::fs::write(&spec_path, spec.to_yaml())
            .map_err(LabError::io(format!("write {}", spec_path.display())))?;
        let lab = Lab {
            plan: Plan::new(&spec),
            state,
            bin_dir: opts.bin_dir.clone(),
            ztunnel: opts.ztunnel.clone(),
        };
        if let Err(e) = lab.build() {
            let _ = Lab::down(&spec.name, opts);
            return Err(e);
        }
        Ok(lab)
    }

    fn build(&self) -> Result<(), LabError> {
        net::create(&self.plan)?;
        k8s::write_all(&self.cluster_dir(), &k8s::manifests(&self.plan))?;
        for node in &self.plan.nodes {
            cgroup::create(&node.cgroup)?;
        }
        for pod in &self.plan.pods {
            cgroup::create(&pod.cgroup)?;
            self.start_app(pod)?;
        }
        self.wait_ready()?;
        if self
            .plan
            .pods
            .iter()
            .any(|p| p.meshed || p.app == App::Waypoint)
        {
            host::ensure_bpffs()?;
            self.start_ztunnels()?;
            for pod in self.waypoint_pods() {
                self.start_waypoint(pod)?;
            }
            for pod in self.waypoint_pods() {
                self.wait_waypoint(pod)?;
            }
        }
        Ok(())
    }

    fn waypoint_pods(&self) -> impl Iterator<Item = &PodPlan> {
        self.plan.pods.iter().filter(|p| p.app == App::Waypoint)
    }

    /// A waypoint pod: the `waypoint` binary in the pod's namespace, with
    /// its own bootstrap token, taking config and its certificate from the
    /// controller as the Deployment the controller makes in a cluster does.
    fn start_waypoint(&self, pod: &PodPlan) -> Result<(), LabError> {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let argv = [
            path(self.bin_dir.join("waypoint")),
            "--namespace".into(),
            pod.namespace.clone(),
            "--service-account".into(),
            pod.service_account.clone(),
            "--controller".into(),
            self.controller_addr(),
            "--controller-token".into(),
            path(self.waypoint_token_file(pod)),
            "--mesh-roots".into(),
            path(self.ca_dir().join(identity::ca::ROOT_CERT_FILE)),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        process::spawn_detached(&self.placement(pod), &argv, &self.log_path(&pod.key()))
    }

    /// Waits until the waypoint holds a config and its certificate.
    fn wait_waypoint(&self, pod: &PodPlan) -> Result<(), LabError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("http://127.0.0.1:{WAYPOINT_READY_PORT}/healthz/ready");
        loop {
            let probe = self.exec_captured(&pod.key(), &["curl", "-sf", "-m", "1", &url])?;
            if probe.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline || !cgroup::populated(&pod.cgroup) {
                return Err(self.not_ready(pod, "waypoint", "not ready"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn waypoint_token_file(&self, pod: &PodPlan) -> PathBuf {
        self.state
            .join("waypoint")
            .join(format!("{}.{}.token", pod.namespace, pod.service_account))
    }

    /// The controller, then one ztunnel per node, in the node's namespace,
    /// capturing the node's meshed pods listed in its pods file and taking
    /// config and certificates from the controller.
    fn start_ztunnels(&self) -> Result<(), LabError> {
        let dir = self.state.join("ztunnel");
        std::fs::create_dir_all(&dir).map_err(LabError::io(format!("create {}", dir.display())))?;
        self.write_tokens()?;
        self.start_controller()?;
        for node in &self.plan.nodes {
            self.start_ztunnel(&node.name, &[])?;
        }
        self.wait_captured()
    }

    /// One bootstrap token per node and per waypoint: the controller's
    /// tokens file, and each one's own (readable by root only).
    fn write_tokens(&self) -> Result<(), LabError> {
        let mut entries = String::from("tokens:\n");
        for node in &self.plan.nodes {
            let token = random_token()?;
            entries.push_str(&format!("  - {{token: {token}, node: {}}}\n", node.name));
            write_private(&self.token_file(&node.name), &token)?;
        }
        let dir = self.state.join("waypoint");
        std::fs::create_dir_all(&dir).map_err(LabError::io(format!("create {}", dir.display())))?;
        for pod in self.waypoint_pods() {
            let token = random_token()?;
            entries.push_str(&format!(
                "  - {{token: {token}, waypoint: {}/{}}}\n",
                pod.namespace, pod.service_account
            ));
            write_private(&self.waypoint_token_file(pod), &token)?;
        }
        write_private(&self.state.join("controller-tokens.yaml"), &entries)
    }

    fn token_file(&self, node: &str) -> PathBuf {
        self.state.join("ztunnel").join(format!("{node}.token"))
    }

    /// Starts a node's ztunnel; `extra` arguments go last (a test may
    /// override its config with `--mesh-config`).
    fn start_ztunnel(&self, name: &str, extra: &[&str]) -> Result<(), LabError> {
        let node = self.node(name)?;
        let pods: Vec<serde_json::Value> = self
            .plan
            .pods
            .iter()
            .filter(|p| p.node == node.index && p.meshed)
            .map(|p| {
                serde_json::json!({
                    "uid": p.uid,
                    "name": p.name,
                    "namespace": p.namespace,
                    "ip": p.ip,
                    "netns": Path::new("/var/run/netns").join(&p.netns),
                    "cgroup": p.cgroup,
                    "identity": pod_identity(p),
                })
            })
            .collect();
        let file = self
            .state
            .join("ztunnel")
            .join(format!("{}.json", node.name));
        let json = serde_json::to_string_pretty(&pods).expect("JSON values serialize");
        std::fs::write(&file, json).map_err(LabError::io(format!("write {}", file.display())))?;
        let cgroup = node.cgroup.join("ztunnel");
        cgroup::create(&cgroup)?;
        let place = Placement {
            role: Role::Node,
            netns: &node.netns,
            cgroup: &cgroup,
            env: vec![("NODE_NAME".into(), node.name.clone().into())],
        };
        // Each node pins its own maps: slots and pods are per ztunnel.
        let bpf_dir = self.bpf_dir().join(&node.name);
        let controller = self.controller_addr();
        let roots = self.ca_dir().join(identity::ca::ROOT_CERT_FILE);
        let token = self.token_file(&node.name);
        let bin = &self.ztunnel;
        let mut argv: Vec<String> = vec![
            bin.to_string_lossy().into(),
            "--pods".into(),
            file.to_string_lossy().into(),
            "--metrics".into(),
            ZTUNNEL_METRICS.into(),
            "--bpf-dir".into(),
            bpf_dir.to_string_lossy().into(),
            "--controller".into(),
            controller,
            "--controller-token".into(),
            token.to_string_lossy().into(),
            "--mesh-roots".into(),
            roots.to_string_lossy().into(),
        ];
        argv.extend(extra.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        process::spawn_detached(
            &place,
            &argv,
            &self.log_path(&format!("ztunnel/{}", node.name)),
        )
    }

    /// Kills a node's ztunnel and starts a new one with `extra` arguments;
    /// returns once it captured the node's pods again.
    pub fn restart_ztunnel(&self, node: &str, extra: &[&str]) -> Result<(), LabError> {
        let cgroup = self.node(node)?.cgroup.join("ztunnel");
        cgroup::kill_and_remove(&cgroup)?;
        self.start_ztunnel(node, extra)?;
        self.wait_captured()
    }

    /// The CA and config endpoint, on the cluster network's bridge.
    fn controller_addr(&self) -> String {
        format!("{}:{CONTROLLER_PORT}", self.plan.bridge_ip)
    }

    /// The controller's CA directory (its root is created on first start).
    pub fn ca_dir(&self) -> PathBuf {
        self.state.join("ca")
    }

    /// The controller in local manifests mode, in the cluster network's
    /// namespace: it translates the cluster directory (the objects `up`
    /// wrote, and what `apply` adds: policies) and serves the config stream
    /// and the CA to the ztunnels. Returns once it is ready.
    pub fn start_controller(&self) -> Result<(), LabError> {
        let cgroup = self.plan.cgroup.join("controller");
        cgroup::create(&cgroup)?;
        let place = Placement {
            role: Role::Node,
            netns: &self.plan.net_netns,
            cgroup: &cgroup,
            env: Vec::new(),
        };
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let argv = [
            path(self.bin_dir.join("controller")),
            "run".into(),
            "--manifests".into(),
            path(self.cluster_dir()),
            "--listen".into(),
            self.controller_addr(),
            "--ops".into(),
            CONTROLLER_OPS.into(),
            "--ca-dir".into(),
            path(self.ca_dir()),
            "--tokens".into(),
            path(self.state.join("controller-tokens.yaml")),
            "--mesh-file".into(),
            path(self.mesh_file()),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let log = self.log_path("controller");
        process::spawn_detached(&place, &argv, &log)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.controller_get("/ready").is_none() {
            if Instant::now() > deadline || !cgroup::populated(&cgroup) {
                return Err(LabError::Command {
                    command: "controller run".into(),
                    stderr: format!(
                        "not ready within {}s; see {}",
                        READY_TIMEOUT.as_secs(),
                        log.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the controller (data planes keep their last config).
    pub fn stop_controller(&self) -> Result<(), LabError> {
        cgroup::kill_and_remove(&self.plan.cgroup.join("controller"))
    }

    /// A page of the controller's ops endpoint (`/ready`, `/metrics`) when
    /// it answers 2xx.
    pub fn controller_get(&self, path: &str) -> Option<String> {
        let cgroup = self.plan.cgroup.join("exec");
        cgroup::create(&cgroup).ok()?;
        let place = Placement {
            role: Role::Node,
            netns: &self.plan.net_netns,
            cgroup: &cgroup,
            env: Vec::new(),
        };
        let url = format!("http://{CONTROLLER_OPS}{path}");
        let out = process::run_captured(&place, &["curl", "-sf", "--max-time", "2", &url]).ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until every node's ztunnel reports its pods captured.
    fn wait_captured(&self) -> Result<(), LabError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for node in &self.plan.nodes {
            let want = self
                .plan
                .pods
                .iter()
                .filter(|p| p.node == node.index && p.meshed)
                .count();
            loop {
                if self.ztunnel_metric(&node.name, "ambit_ztunnel_captured_pods")
                    == Some(want as u64)
                {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(LabError::Command {
                        command: format!("ztunnel on {}", node.name),
                        stderr: format!(
                            "did not capture its {want} pods within {}s; see {}",
                            READY_TIMEOUT.as_secs(),
                            self.log_path(&format!("ztunnel/{}", node.name)).display()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The lab's directory of pinned eBPF maps and links, one per node.
    pub fn bpf_dir(&self) -> PathBuf {
        bpf_dir(self.name())
    }

    fn start_app(&self, pod: &PodPlan) -> Result<(), LabError> {
        let echo = self.bin_dir.join("ambit-echo");
        let echo = echo.to_string_lossy();
        let (http, tcp, grpc) = (
            ECHO_HTTP_PORT.to_string(),
            ECHO_TCP_PORT.to_string(),
            ECHO_GRPC_PORT.to_string(),
        );
        let argv: Vec<&str> = match pod.app {
            App::Echo => vec![
                &echo,
                "--http-port",
                &http,
                "--tcp-port",
                &tcp,
                "--grpc-port",
                &grpc,
            ],
            App::Sleep => vec!["sleep", "infinity"],
            // Started once the controller runs: `start_waypoint`.
            App::Waypoint => return Ok(()),
        };
        let log = self.log_path(&pod.key());
        process::spawn_detached(&self.placement(pod), &argv, &log)
    }

    /// `what` in `pod` was still `state` after [`READY_TIMEOUT`]; its log
    /// says why.
    fn not_ready(&self, pod: &PodPlan, what: &str, state: &str) -> LabError {
        LabError::Command {
            command: format!("{what} in {}", pod.key()),
            stderr: format!(
                "{state} after {}s; see {}",
                READY_TIMEOUT.as_secs(),
                self.log_path(&pod.key()).display()
            ),
        }
    }

    fn wait_ready(&self) -> Result<(), LabError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        // `setsid -f` returns before the forked app has joined its pod's
        // cgroup: until it has, the pod is neither running nor killed with
        // its cgroup, and an empty cgroup would read as an app that died.
        for pod in self.plan.pods.iter().filter(|p| p.app != App::Waypoint) {
            while !cgroup::populated(&pod.cgroup) {
                if Instant::now() > deadline {
                    return Err(self.not_ready(pod, "the app", "not in its cgroup"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for pod in self.plan.pods.iter().filter(|p| p.app == App::Echo) {
            let port = ECHO_HTTP_PORT.to_string();
            loop {
                let probe =
                    self.exec_captured(&pod.key(), &["nc", "-z", "-w", "1", "127.0.0.1", &port])?;
                if probe.status.success() {
                    break;
                }
                if Instant::now() > deadline || !cgroup::populated(&pod.cgroup) {
                    let state = format!("not listening on {port}");
                    return Err(self.not_ready(pod, "ambit-echo", &state));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Opens the running lab `name`.
    pub fn open(name: &str, opts: &LabOptions) -> Result<Lab, LabError> {
        let state = opts.state_root.join(name);
        let spec_path = state.join(SPEC_FILE);
        let text = std::fs::read_to_string(&spec_path).map_err(|_| LabError::NotRunning {
            name: name.to_string(),
            state: state.clone(),
        })?;
        let spec = LabSpec::from_yaml(&text)?;
        Ok(Lab {
            plan: Plan::new(&spec),
            state,
            bin_dir: opts.bin_dir.clone(),
            ztunnel: opts.ztunnel.clone(),
        })
    }

    /// Removes lab `name` entirely: processes, cgroups, namespaces, hosts
    /// files, state. Idempotent, and works on the remains of a crashed `up`.
    pub fn down(name: &str, opts: &LabOptions) -> Result<(), LabError> {
        host::preflight()?;
        let root = PathBuf::from(crate::plan::CGROUP_ROOT);
        cgroup::kill_and_remove(&root.join(name))?;
        // The shared parent goes with the last lab; another lab keeps it busy.
        let _ = std::fs::remove_dir(&root);
        net::remove(name)?;
        // Unlinking the pins detaches the programs and frees the maps.
        let pins = bpf_dir(name);
        if pins.exists() {
            std::fs::remove_dir_all(&pins)
                .map_err(LabError::io(format!("remove {}", pins.display())))?;
        }
        let _ = std::fs::remove_dir(pins.parent().expect("the pin directory has a parent"));
        let state = opts.state_root.join(name);
        match std::fs::remove_dir_all(&state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LabError::Io {
                what: format!("remove {}", state.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn name(&self) -> &str {
        &self.plan.spec.name
    }

    /// Directory of the cluster's Kubernetes objects.
    pub fn cluster_dir(&self) -> PathBuf {
        self.state.join("cluster")
    }

    /// Log file of a component (`namespace/pod` for pods).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.state
            .join("logs")
            .join(format!("{}.log", component.replace('/', ".")))
    }

    fn pod(&self, key: &str) -> Result<&PodPlan, LabError> {
        self.plan.pod(key).ok_or_else(|| LabError::NoSuchPod {
            key: key.to_string(),
            lab: self.name().to_string(),
        })
    }

    fn placement<'a>(&'a self, pod: &'a PodPlan) -> Placement<'a> {
        let mut path = OsString::from(&self.bin_dir);
        if let Some(system) = std::env::var_os("PATH") {
            path.push(":");
            path.push(system);
        }
        Placement {
            role: Role::Pod,
            netns: &pod.netns,
            cgroup: &pod.cgroup,
            env: vec![
                ("PATH".into(), path),
                ("POD_NAME".into(), pod.name.clone().into()),
                ("POD_NAMESPACE".into(), pod.namespace.clone().into()),
                (
                    "NODE_NAME".into(),
                    self.plan.nodes[pod.node].name.clone().into(),
                ),
            ],
        }
    }

    /// Runs a command in a pod with the caller's terminal.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Result<ExitStatus, LabError> {
        let pod = self.pod(pod)?;
        process::run_foreground(&self.placement(pod), argv)
    }

    /// Runs a command in a pod and captures its output.
    pub fn exec_captured(&self, pod: &str, argv: &[&str]) -> Result<Output, LabError> {
        let pod = self.pod(pod)?;
        process::run_captured(&self.placement(pod), argv)
    }

    /// Starts `argv` in a pod as a child of the caller, stdout piped. The
    /// caller ends it (it is not part of the lab's processes).
    pub fn spawn(&self, pod: &str, argv: &[&str]) -> Result<std::process::Child, LabError> {
        let pod = self.pod(pod)?;
        process::spawn_piped(&self.placement(pod), argv)
    }

    /// Every pod with its state.
    pub fn pod_status(&self) -> Vec<PodStatus> {
        self.plan
            .pods
            .iter()
            .map(|p| PodStatus {
                key: p.key(),
                ip: p.ip,
                node: self.plan.nodes[p.node].name.clone(),
                identity: pod_identity(p),
                captured: p.meshed && self.ztunnel_running(&self.plan.nodes[p.node].name),
                app: p.app,
                running: cgroup::populated(&p.cgroup),
            })
            .collect()
    }

    /// The mesh config the controller serves, as a file for inspection.
    pub fn mesh_file(&self) -> PathBuf {
        self.state.join("mesh.yaml")
    }

    /// Makes the policy objects in `yaml` (AuthorizationPolicy,
    /// PeerAuthentication manifests) the cluster's only policies, as
    /// `kubectl apply` after deleting the others would. The controller
    /// translates them and the ztunnels apply them within their poll
    /// intervals (about half a second), re-judging open connections.
    pub fn set_policies(&self, yaml: &str) -> Result<Vec<String>, LabError> {
        let objects = k8s::parse_objects("policies", yaml)?;
        let dir = self.cluster_dir();
        for path in k8s::list(&dir) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| {
                n.starts_with("authorizationpolicy.") || n.starts_with("peerauthentication.")
            }) {
                std::fs::remove_file(&path)
                    .map_err(LabError::io(format!("remove {}", path.display())))?;
            }
        }
        k8s::write_all(&dir, &objects)?;
        Ok(objects.into_iter().map(|o| o.file).collect())
    }

    /// Adds or replaces the objects of a YAML file in the cluster.
    pub fn apply(&self, file: &Path) -> Result<Vec<String>, LabError> {
        let text = std::fs::read_to_string(file)
            .map_err(LabError::io(format!("read {}", file.display())))?;
        self.apply_yaml(&file.display().to_string(), &text)
    }

    /// Adds or replaces the objects of `yaml` (named `what` in errors).
    pub fn apply_yaml(&self, what: &str, yaml: &str) -> Result<Vec<String>, LabError> {
        let objects = k8s::parse_objects(what, yaml)?;
        k8s::write_all(&self.cluster_dir(), &objects)?;
        Ok(objects.into_iter().map(|o| o.file).collect())
    }

    /// Removes the objects of a YAML file from the cluster.
    pub fn delete(&self, file: &Path) -> Result<Vec<String>, LabError> {
        let mut removed = Vec::new();
        for obj in read_objects(file)? {
            let path = self.cluster_dir().join(&obj.file);
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(obj.file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LabError::Io {
                        what: format!("remove {}", path.display()),
                        source: e,
                    });
                }
            }
        }
        Ok(removed)
    }
}

fn bpf_dir(lab: &str) -> PathBuf {
    Path::new(host::BPFFS).join("ambit-lab").join(lab)
}

fn pod_identity(pod: &PodPlan) -> String {
    format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        pod.namespace, pod.service_account
    )
}

fn read_objects(file: &Path) -> Result<Vec<k8s::Manifest>, LabError> {
    let text =
        std::fs::read_to_string(file).map_err(LabError::io(format!("read {}", file.display())))?;
    k8s::parse_objects(&file.display().to_string(), &text)
}

/// Refuses a lab whose address ranges overlap those of another running lab:
/// the labs would be isolated from each other, but the same address meaning
/// two things makes every later command ambiguous.
fn check_ranges_free(spec: &LabSpec, root: &Path) -> Result<(), LabError> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join(SPEC_FILE)) else {
            continue;
        };
        let Ok(other) = serde_yaml::from_str::<LabSpec>(&text) else {
            continue;
        };
        if other.name == spec.name {
            continue;
        }
        for mine in spec.network.ranges() {
            if let Some(theirs) = other
                .network
                .ranges()
                .into_iter()
                .find(|r| r.overlaps(&mine))
            {
                return Err(LabError::RangeInUse {
                    range: format!("{mine} (overlaps {theirs})"),
                    other: other.name,
                });
            }
        }
    }
    Ok(())
}

/// 128 random bits, hex.
fn random_token() -> Result<String, LabError> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom")
            .map_err(LabError::io("open /dev/urandom".to_string()))?,
        &mut bytes,
    )
    .map_err(LabError::io("read /dev/urandom".to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a secret readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), LabError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .map_err(LabError::io(format!("write {}", path.display())))
}
