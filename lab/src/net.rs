//! The lab's network: a bridge in its own namespace joins the nodes; each
//! pod hangs off its node by a veth pair with a /32 address and the node as
//! gateway (a flat L3 CNI); nodes route each other's pod ranges; services are
//! nftables DNAT rules in every node, as kube-proxy would install. The host's
//! own network namespace is never touched.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::error::LabError;
use crate::host::{exec_in, ip, ip_in, netns_list};
use crate::plan::{NodePlan, Plan, PodPlan, netns_prefix};

/// Bridge in the cluster network namespace.
const BRIDGE: &str = "br0";
/// Marks connections a pod makes to a VIP that lands on itself: they must be
/// masqueraded or the reply would skip the reverse NAT (hairpin).
const HAIRPIN_MARK: &str = "0x4000";

/// Creates every namespace, link, address, route and rule of the plan.
pub(crate) fn create(plan: &Plan) -> Result<(), LabError> {
    let net = &plan.net_netns;
    let node_prefix = plan.spec.network.node_cidr.prefix();
    new_netns(net)?;
    ip_in(net, &["link", "add", BRIDGE, "type", "bridge"])?;
    ip_in(
        net,
        &[
            "addr",
            "add",
            &format!("{}/{node_prefix}", plan.bridge_ip),
            "dev",
            BRIDGE,
        ],
    )?;
    ip_in(net, &["link", "set", BRIDGE, "up"])?;
    for node in &plan.nodes {
        create_node(plan, node)?;
    }
    for pod in &plan.pods {
        create_pod(&plan.nodes[pod.node], pod)?;
    }
    for node in &plan.nodes {
        exec_in(&node.netns, &["nft", "-f", "-"], Some(&service_rules(plan)))?;
    }
    write_hosts_files(plan)
}

fn create_node(plan: &Plan, node: &NodePlan) -> Result<(), LabError> {
    let net = &plan.net_netns;
    let ns = &node.netns;
    let prefix = plan.spec.network.node_cidr.prefix();
    new_netns(ns)?;
    veth_to_eth0(net, &node.uplink, ns)?;
    ip_in(net, &["link", "set", &node.uplink, "master", BRIDGE, "up"])?;
    ip_in(
        ns,
        &[
            "addr",
            "add",
            &format!("{}/{prefix}", node.ip),
            "dev",
            "eth0",
        ],
    )?;
    ip_in(ns, &["link", "set", "eth0", "up"])?;
    exec_in(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"], None)?;
    let node_ip = node.ip.to_string();
    ip_in(
        net,
        &["route", "add", &node.pod_cidr.to_string(), "via", &node_ip],
    )?;
    for other in plan.nodes.iter().filter(|o| o.index != node.index) {
        ip_in(
            ns,
            &[
                "route",
                "add",
                &other.pod_cidr.to_string(),
                "via",
                &other.ip.to_string(),
            ],
        )?;
    }
    Ok(())
}

/// A network namespace with its loopback up.
fn new_netns(ns: &str) -> Result<(), LabError> {
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// A veth pair from `host_if` in `host_ns` to `eth0` in `peer_ns`.
fn veth_to_eth0(host_ns: &str, host_if: &str, peer_ns: &str) -> Result<(), LabError> {
    let args = [
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", peer_ns,
    ];
    ip_in(host_ns, &args).map(|_| ())
}

fn create_pod(node: &NodePlan, pod: &PodPlan) -> Result<(), LabError> {
    let (ns, host) = (&pod.netns, &node.netns);
    let gateway = node.pod_gateway.to_string();
    new_netns(ns)?;
    veth_to_eth0(host, &pod.host_veth, ns)?;
    ip_in(
        host,
        &[
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            &pod.host_veth,
        ],
    )?;
    ip_in(host, &["link", "set", &pod.host_veth, "up"])?;
    ip_in(
        host,
        &[
            "route",
            "add",
            &format!("{}/32", pod.ip),
            "dev",
            &pod.host_veth,
        ],
    )?;
    ip_in(
        ns,
        &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
    )?;
    ip_in(ns, &["link", "set", "eth0", "up"])?;
    ip_in(
        ns,
        &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
    )?;
    ip_in(
        ns,
        &["route", "add", "default", "via", &gateway, "dev", "eth0"],
    )?;
    Ok(())
}

/// The nftables ruleset every node runs for the lab's services: VIP:port is
/// DNATed to a random ready endpoint's target port.
pub(crate) fn service_rules(plan: &Plan) -> String {
    let mut out = String::from("table ip ambit-lab {\n");
    let mut dispatch = String::new();
    for svc in &plan.services {
        for port in &svc.ports {
            let chain = format!("svc-{}-{}-{}", svc.namespace, svc.name, port.port);
            let _ = writeln!(
                dispatch,
                "    ip daddr {} tcp dport {} jump {chain}",
                svc.cluster_ip, port.port
            );
            let _ = writeln!(out, "  chain {chain} {{");
            if svc.endpoints.is_empty() {
                // Like kube-proxy: no endpoints, the connection is refused.
                let _ = writeln!(out, "    reject with tcp reset");
            } else {
                let ips: Vec<String> = svc
                    .endpoints
                    .iter()
                    .map(|&i| plan.pods[i].ip.to_string())
                    .collect();
                let _ = writeln!(
                    out,
                    "    ip saddr {{ {} }} meta mark set mark | {HAIRPIN_MARK}",
                    ips.join(", ")
                );
                let targets: Vec<String> = ips
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| format!("{i} : {ip} . {}", port.target_port))
                    .collect();
                let _ = writeln!(
                    out,
                    "    meta l4proto tcp dnat ip to numgen random mod {} map {{ {} }}",
                    ips.len(),
                    targets.join(", ")
                );
            }
            let _ = writeln!(out, "  }}");
        }
    }
    let _ = write!(
        out,
        "  chain services {{\n{dispatch}  }}\n\
         \x20 chain prerouting {{\n    type nat hook prerouting priority -100;\n    jump services\n  }}\n\
         \x20 chain output {{\n    type nat hook output priority -100;\n    jump services\n  }}\n\
         \x20 chain postrouting {{\n    type nat hook postrouting priority 100;\n    \
         meta mark & {HAIRPIN_MARK} == {HAIRPIN_MARK} masquerade\n  }}\n}}\n"
    );
    out
}

/// `ip netns exec` bind-mounts `/etc/netns/<netns>/hosts` over `/etc/hosts`:
/// that is how service names resolve inside pods.
fn hosts_dir(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns)
}

pub(crate) fn hosts_file(plan: &Plan, pod: &PodPlan) -> String {
    let mut out = format!(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{} {}\n",
        pod.ip, pod.name
    );
    for svc in &plan.services {
        let fqdn = svc.fqdn();
        let _ = write!(
            out,
            "{} {fqdn} {}.{}.svc {}.{}",
            svc.cluster_ip, svc.name, svc.namespace, svc.name, svc.namespace
        );
        if svc.namespace == pod.namespace {
            let _ = write!(out, " {}", svc.name);
        }
        out.push('\n');
    }
    out
}

fn write_hosts_files(plan: &Plan) -> Result<(), LabError> {
    for pod in &plan.pods {
        let dir = hosts_dir(&pod.netns);
        std::fs::create_dir_all(&dir).map_err(LabError::io(format!("create {}", dir.display())))?;
        let path = dir.join("hosts");
        std::fs::write(&path, hosts_file(plan, pod))
            .map_err(LabError::io(format!("write {}", path.display())))?;
    }
    Ok(())
}

/// Removes every namespace and `/etc/netns` entry of lab `name`, whatever
/// state it was left in. Idempotent.
pub(crate) fn remove(name: &str) -> Result<(), LabError> {
    let prefix = netns_prefix(name);
    for ns in netns_list()?.into_iter().filter(|n| n.starts_with(&prefix)) {
        ip(&["netns", "del", &ns])?;
    }
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let path = entry.path();
                std::fs::remove_dir_all(&path)
                    .map_err(LabError::io(format!("remove {}", path.display())))?;
            }
        }
    }
    Ok(())
}

/// Network namespaces of lab `name` that exist now.
pub(crate) fn leftovers(name: &str) -> Result<Vec<String>, LabError> {
    let prefix = netns_prefix(name);
    Ok(netns_list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::LabSpec;

    #[test]
    fn service_rules_dnat_each_port_to_its_endpoints() {
        let plan = Plan::new(&LabSpec::default());
        let rules = service_rules(&plan);
        assert!(rules.contains("ip daddr 10.96.0.10 tcp dport 80 jump svc-demo-echo-80"));
        assert!(rules.contains(
            "dnat ip to numgen random mod 3 map { 0 : 10.244.0.2 . 8080, 1 : 10.244.1.2 . 8080, 2 : 10.244.0.3 . 8080 }"
        ));
        assert!(rules.contains("ip daddr 10.96.0.10 tcp dport 9000 jump svc-demo-echo-9000"));
        assert!(rules.contains("masquerade"));
    }

    #[test]
    fn hosts_file_resolves_services_and_short_names_in_the_same_namespace() {
        let plan = Plan::new(&LabSpec::default());
        let demo = plan.pod("demo/sleep-0").unwrap();
        let legacy = plan.pod("legacy/sleep-0").unwrap();
        let line = "10.96.0.10 echo.demo.svc.cluster.local echo.demo.svc echo.demo";
        assert!(hosts_file(&plan, demo).contains(&format!("{line} echo\n")));
        assert!(hosts_file(&plan, legacy).contains(&format!("{line}\n")));
    }
}
