//! `ambit lab demo`: brings up the default lab, drives real traffic between
//! pods on different nodes, and reports what each step proved.

use std::collections::BTreeMap;

use anyhow::{Context, ensure};
use lab::{Lab, LabOptions, LabSpec};
use serde::Deserialize;

use crate::lab_cmd::{DEFAULT_LAB, print_status};

const CLIENT: &str = "demo/sleep-0";
/// The demo's policies, as a user would `ambit lab apply` them.
const DENY_SLEEP: &str = "apiVersion: security.ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: demo}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]}]
";
const STRICT_DEMO: &str = "apiVersion: security.ambit.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
";
const OUTSIDER: &str = "legacy/sleep-0";
/// A meshed client with an identity of its own (an echo pod on the
/// client's node, so never the target), which the DENY on `CLIENT`'s must
/// leave alone.
const OTHER: &str = "demo/echo-1";
const WAYPOINT: &str = "demo/waypoint-0";
/// An HTTPRoute on Service `web` (which uses the waypoint): `/v2/…` goes
/// to Service `echo` with the prefix rewritten and a response header set;
/// everything else to `web`'s own pods with a request header added.
const WEB_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      filters:
        - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
        - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-ambit-route, value: v2}]}}
      backendRefs: [{name: echo, port: 80}]
    - filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-through, value: waypoint}]}}
      backendRefs: [{name: web, port: 80}]
";

/// The part of `ambit-echo`'s reply the demo checks.
#[derive(Debug, Deserialize)]
struct EchoReply {
    pod: String,
    node: String,
    peer: String,
}

/// The part of `ambit-load --json` the demo checks.
#[derive(Debug, Deserialize)]
struct LoadReport {
    requests: u64,
    errors: u64,
    status: BTreeMap<u16, u64>,
    backends: BTreeMap<String, u64>,
}

fn exec(lab: &Lab, pod: &str, argv: &[&str]) -> anyhow::Result<String> {
    let out = lab.exec_captured(pod, argv)?;
    ensure!(
        out.status.success(),
        "`{}` in {pod} failed ({}): {}",
        argv.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn curl(lab: &Lab, pod: &str, url: &str) -> anyhow::Result<EchoReply> {
    let body = exec(lab, pod, &["curl", "-sS", "--max-time", "5", url])?;
    serde_json::from_str(&body).with_context(|| format!("unexpected reply from {url}: {body}"))
}

fn metric(lab: &Lab, node: &str, name: &str) -> anyhow::Result<u64> {
    lab.ztunnel_metric(node, name)
        .with_context(|| format!("ztunnel on {node} did not report {name}"))
}

/// Whether `pod` gets an answer from `url`.
fn reaches(lab: &Lab, pod: &str, url: &str) -> bool {
    lab.exec_captured(pod, &["curl", "-sS", "--max-time", "3", url])
        .is_ok_and(|out| out.status.success())
}

/// The latest access log line of a node's ztunnel matching `want`, waiting
/// briefly for it to be written.
fn wait_for_access_line(
    lab: &Lab,
    node: &str,
    want: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let path = lab.log_path(&format!("ztunnel/{node}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(line) = text.lines().rev().find(|l| l.contains("access") && want(l)) {
            return Ok(line.to_string());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no such access log line in {}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// How long a node's ztunnel log is now: lines after it are new.
fn log_len(lab: &Lab, node: &str) -> usize {
    std::fs::metadata(lab.log_path(&format!("ztunnel/{node}"))).map_or(0, |m| m.len() as usize)
}

/// Polls until `pod` can no longer reach `url` *and* `node`'s ztunnel has
/// logged (after byte `since`) the access line `want` explaining why: a
/// request failing for another reason (a slow machine timing out) is not
/// taken for the policy at work. Returns that line.
fn blocked_by(
    lab: &Lab,
    (pod, url): (&str, &str),
    node: &str,
    since: usize,
    want: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let path = lab.log_path(&format!("ztunnel/{node}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut blocked = false;
    loop {
        if !reaches(lab, pod, url) {
            blocked = true;
            let text = std::fs::read(&path).unwrap_or_default();
            let new = String::from_utf8_lossy(text.get(since..).unwrap_or_default());
            if let Some(line) = new.lines().rev().find(|l| l.contains("access") && want(l)) {
                return Ok(line.to_string());
            }
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{}",
            if blocked {
                format!(
                    "{pod} was refused, but {} has no access log line saying why",
                    path.display()
                )
            } else {
                format!("{pod} still reaches {url}")
            }
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `key=value` from a text log line.
/// The access log lines a node's ztunnel wrote after byte `since`.
fn new_access_lines(lab: &Lab, node: &str, since: usize) -> Vec<String> {
    let text = std::fs::read(lab.log_path(&format!("ztunnel/{node}"))).unwrap_or_default();
    String::from_utf8_lossy(text.get(since..).unwrap_or_default())
        .lines()
        .filter(|l| l.contains("access"))
        .map(str::to_string)
        .collect()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let Some(start) = line.find(&format!(" {key}=")) else {
        return "?";
    };
    let rest = &line[start + key.len() + 2..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap_or("?"),
        None => rest.split_whitespace().next().unwrap_or("?"),
    }
}

fn load(lab: &Lab, pod: &str, args: &[&str]) -> anyhow::Result<LoadReport> {
    let mut argv = vec!["ambit-load", "--json"];
    argv.extend_from_slice(args);
    let out = lab.exec_captured(pod, &argv)?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).with_context(|| format!("unexpected ambit-load output: {text}"))
}

struct Steps {
    failed: usize,
}

impl Steps {
    fn check(&mut self, title: &str, result: anyhow::Result<String>) {
        match result {
            Ok(detail) => println!("  ✓ {title}\n      {detail}"),
            Err(e) => {
                self.failed += 1;
                println!("  ✗ {title}\n      {e:#}");
            }
        }
    }
}

/// Runs the demo; `Ok(false)` if a step failed. With `will_remove` the lab
/// is removed by the caller afterwards, so no hints to explore it are shown.
pub(crate) fn run(opts: &LabOptions, will_remove: bool) -> anyhow::Result<bool> {
    if Lab::open(DEFAULT_LAB, opts).is_ok() {
        println!("replacing the running lab {DEFAULT_LAB:?}");
        Lab::down(DEFAULT_LAB, opts)?;
    }
    println!("bringing up lab {DEFAULT_LAB:?}: 2 nodes, 6 pods (one a waypoint), 3 services…");
    let lab = Lab::up(LabSpec::default(), opts)?;
    print_status(&lab);
    let plan = lab.plan();
    let client = plan.pod(CLIENT).context("default lab has demo/sleep-0")?;
    let client_node = &plan.nodes[client.node].name;
    let target = plan
        .pods
        .iter()
        .find(|p| p.name.starts_with("echo-") && p.node != client.node)
        .context("default lab has an echo pod on another node")?;
    let echo = &plan.services[0];
    let vip = echo.cluster_ip;

    let target_node = plan.nodes[target.node].name.clone();
    println!("\nDEMO");
    let mut steps = Steps { failed: 0 };
    steps.check(
        &format!(
            "pod to pod across nodes: {CLIENT} ({client_node}) → {} ({})",
            target.key(),
            plan.nodes[target.node].name
        ),
        (|| {
            let reply = curl(&lab, CLIENT, &format!("http://{}:8080/", target.ip))?;
            ensure!(
                reply.pod == target.name,
                "answered by {} instead of {}",
                reply.pod,
                target.name
            );
            Ok(format!("answered by {} on {}", reply.pod, reply.node))
        })(),
    );
    steps.check(
        "across nodes the connection is mutual TLS (HBONE) with both pods' identities",
        (|| {
            let out_before = metric(&lab, client_node, "ambit_ztunnel_outbound_connections_total")?;
            let reply = curl(&lab, CLIENT, &format!("http://{}:8080/", target.ip))?;
            let outbound = metric(&lab, client_node, "ambit_ztunnel_outbound_connections_total")? - out_before;
            ensure!(outbound >= 1, "ztunnel on {client_node} did not take the connection");
            // Delivered by the target's ztunnel from inside the pod, from
            // the client's address: the app sees who called.
            let client_addr = format!("{}:", plan.pod(CLIENT).context("client")?.ip);
            ensure!(
                reply.peer.starts_with(&client_addr),
                "the app saw {} instead of the client's address",
                reply.peer
            );
            let endpoint = format!("dst_endpoint={}:8080", target.ip);
            let sent = wait_for_access_line(&lab, client_node, |l| l.contains(&endpoint))?;
            ensure!(sent.contains("protocol=\"HBONE\""), "not HBONE: {sent}");
            let client_ip = format!("src_addr={}:", plan.pod(CLIENT).context("client")?.ip);
            let received = wait_for_access_line(&lab, &target_node, |l| {
                l.contains("direction=\"inbound\"") && l.contains(&client_ip)
            })?;
            let identity = |pod: &lab::plan::PodPlan| {
                format!("spiffe://cluster.local/ns/{}/sa/{}", pod.namespace, pod.service_account)
            };
            let (client_id, target_id) = (identity(client), identity(target));
            for (who, line, key, want) in [
                (client_node, &sent, "src_identity", &client_id),
                (client_node, &sent, "dst_identity", &target_id),
                (&target_node, &received, "src_identity", &client_id),
                (&target_node, &received, "dst_identity", &target_id),
            ] {
                ensure!(
                    field(line, key) == want.as_str(),
                    "ztunnel on {who} logged {key}={} instead of {want}",
                    field(line, key)
                );
            }
            Ok(format!(
                "ztunnel on {client_node}: {} → {} over HBONE; ztunnel on {target_node} verified the client as {}; the app saw the client's address {}",
                field(&sent, "src_identity"),
                field(&sent, "dst_identity"),
                field(&received, "src_identity"),
                reply.peer,
            ))
        })(),
    );
    steps.check(
        &format!(
            "pod to Service VIP {vip}:80 spreads over all {} endpoints",
            echo.endpoints.len()
        ),
        (|| {
            let r = load(
                &lab,
                CLIENT,
                &[
                    &format!("http://{vip}/"),
                    "-n",
                    "60",
                    "-c",
                    "3",
                    "--new-connections",
                ],
            )?;
            ensure!(
                r.errors == 0 && r.status.get(&200) == Some(&r.requests),
                "statuses {:?}, {} errors",
                r.status,
                r.errors
            );
            ensure!(
                r.backends.len() == echo.endpoints.len(),
                "only {:?} answered",
                r.backends
            );
            Ok(format!(
                "{} requests, all 200, answered by {:?}",
                r.requests, r.backends
            ))
        })(),
    );
    steps.check(
        "service names resolve in pods (short, namespaced and fully qualified)",
        (|| {
            let mut seen = Vec::new();
            for name in ["echo", "echo.demo", "echo.demo.svc.cluster.local"] {
                let reply = curl(&lab, CLIENT, &format!("http://{name}/"))?;
                seen.push(format!("{name} → {}", reply.pod));
            }
            Ok(seen.join(", "))
        })(),
    );
    steps.check(
        "HTTP/2 through the Service",
        (|| {
            let r = load(
                &lab,
                CLIENT,
                &["http://echo.demo/", "-n", "100", "-c", "4", "--http2"],
            )?;
            ensure!(
                r.errors == 0 && r.status.get(&200) == Some(&100),
                "statuses {:?}, {} errors",
                r.status,
                r.errors
            );
            Ok("100 requests over h2c, all 200".into())
        })(),
    );
    steps.check(
        "gRPC through the Service (port 9090)",
        (|| {
            let r = load(
                &lab,
                CLIENT,
                &[
                    "http://echo.demo:9090",
                    "--grpc",
                    "-n",
                    "30",
                    "-c",
                    "3",
                    "--new-connections",
                ],
            )?;
            ensure!(
                r.errors == 0 && r.status.get(&0) == Some(&30),
                "gRPC codes {:?}, {} errors",
                r.status,
                r.errors
            );
            Ok(format!(
                "30 Echo calls, all OK, answered by {:?}",
                r.backends
            ))
        })(),
    );
    steps.check(
        "raw TCP echo through the Service (port 9000)",
        (|| {
            let out = exec(
                &lab,
                CLIENT,
                &[
                    "sh",
                    "-c",
                    "printf 'ping from the lab' | nc -q 1 -w 3 echo.demo 9000",
                ],
            )?;
            ensure!(out == "ping from the lab", "echoed {out:?}");
            Ok(format!("echoed {out:?}"))
        })(),
    );
    steps.check(
        &format!("an unmeshed pod ({OUTSIDER}) is not captured, and still reaches echo.demo"),
        (|| {
            let node = &plan.nodes[plan.pod(OUTSIDER).context("legacy pod")?.node].name;
            let before = metric(&lab, node, "ambit_ztunnel_outbound_connections_total")?;
            let reply = curl(&lab, OUTSIDER, "http://echo.demo.svc.cluster.local/")?;
            let after = metric(&lab, node, "ambit_ztunnel_outbound_connections_total")?;
            ensure!(
                after == before,
                "ztunnel on {node} took {} of its connections",
                after - before
            );
            Ok(format!(
                "answered by {}; ztunnel on {node} saw none of its connections",
                reply.pod
            ))
        })(),
    );
    steps.check(
        "a waypoint applies an HTTPRoute to Service web, with config and certificate from the controller",
        (|| {
            let waypoint = plan.pod(WAYPOINT).context("default lab has a waypoint")?;
            lab.apply_yaml("the demo's route", WEB_ROUTE)?;
            // The route reaches the waypoint within the controller's poll
            // of its directory.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let (headers, reply) = loop {
                let out = exec(
                    &lab,
                    CLIENT,
                    &["curl", "-sS", "-i", "--max-time", "5", "http://web/v2/items"],
                )?;
                let (headers, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
                if headers.to_ascii_lowercase().contains("x-ambit-route: v2") {
                    break (headers.to_string(), body.to_string());
                }
                ensure!(
                    std::time::Instant::now() < deadline,
                    "the route was not applied within 10 s; last answer:\n{out}"
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            };
            let echoed: serde_json::Value = serde_json::from_str(&reply)
                .with_context(|| format!("unexpected reply: {headers}\n{reply}"))?;
            ensure!(echoed["path"] == "/items", "the path was not rewritten: {echoed}");
            ensure!(
                echoed["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("{}:", waypoint.ip))),
                "the request did not come from the waypoint ({}): {echoed}",
                waypoint.ip
            );
            let other = exec(&lab, CLIENT, &["curl", "-sS", "--max-time", "5", "http://web/hello"])?;
            let other: serde_json::Value = serde_json::from_str(&other)
                .with_context(|| format!("unexpected reply: {other}"))?;
            ensure!(
                other["headers"]["x-through"] == "waypoint",
                "the other rule's request header is missing: {other}"
            );
            let log = std::fs::read_to_string(lab.log_path(WAYPOINT)).unwrap_or_default();
            let line = log
                .lines()
                .rev()
                .find(|l| l.contains("access: http") && l.contains("path=\"/v2/items\""))
                .context("no access log line of the waypoint for /v2/items")?;
            ensure!(
                field(line, "src") == "spiffe://cluster.local/ns/demo/sa/sleep"
                    && field(line, "route") == "HTTPRoute demo/web",
                "the waypoint logged {line}"
            );
            ensure!(
                log.contains("workload certificate issued identity=spiffe://cluster.local/ns/demo/sa/waypoint")
                    && log.contains("subscribed to the controller"),
                "the waypoint's log does not show its certificate and config from the controller"
            );
            Ok(format!(
                "/v2/items from {CLIENT} ({}) → {} → {} as /items on {} (x-ambit-route: v2); /hello got x-through: waypoint",
                field(line, "src"),
                WAYPOINT,
                field(line, "backend"),
                echoed["pod"].as_str().unwrap_or("?"),
            ))
        })(),
    );
    let echo_node = &target_node;
    let echo_url = format!("http://{}:8080/", target.ip);
    steps.check(
        &format!("a DENY policy on {CLIENT}'s identity blocks it, not {OTHER} or {OUTSIDER}"),
        (|| {
            let since = log_len(&lab, echo_node);
            let client_since = log_len(&lab, client_node);
            lab.set_policies(DENY_SLEEP)?;
            let line = blocked_by(&lab, (CLIENT, &echo_url), echo_node, since, |l| {
                l.contains("policy=demo/deny-sleep") && l.contains("denied by")
            })?;
            // What the client's side was told: the tunnel's 401.
            let endpoint = format!("dst_endpoint={}:8080", target.ip);
            let told = new_access_lines(&lab, client_node, client_since)
                .into_iter()
                .find(|l| l.contains(&endpoint) && l.contains("rejected_unauthorized"))
                .with_context(|| format!("ztunnel on {client_node} logged no 401 for the tunnel"))?;
            ensure!(
                reaches(&lab, OTHER, &echo_url),
                "{OTHER} (mTLS, another identity) was blocked too"
            );
            ensure!(
                reaches(&lab, OUTSIDER, &echo_url),
                "{OUTSIDER} was blocked too"
            );
            Ok(format!(
                "{CLIENT}'s tunnel was answered 401 ({}; ztunnel on {client_node}: {}); {OTHER} and {OUTSIDER} still answered",
                field(&line, "reason"),
                field(&told, "reason"),
            ))
        })(),
    );
    steps.check(
        &format!("STRICT peer authentication in demo refuses the plaintext client {OUTSIDER}"),
        (|| {
            let since = log_len(&lab, echo_node);
            lab.set_policies(STRICT_DEMO)?;
            let line = blocked_by(&lab, (OUTSIDER, &echo_url), echo_node, since, |l| {
                l.contains("plaintext refused") && l.contains("policy=demo/strict")
            })?;
            ensure!(
                reaches(&lab, CLIENT, &echo_url),
                "the meshed client {CLIENT} was refused too"
            );
            lab.set_policies("")?;
            Ok(format!(
                "ztunnel on {echo_node} closed it: {}; {CLIENT} (mTLS) still answered",
                field(&line, "reason")
            ))
        })(),
    );
    // Leave the lab open to everyone again, whatever the steps did.
    if let Err(e) = lab.set_policies("") {
        println!("  could not clear the demo's policies: {e}");
    }
    let mut crashed: Vec<String> = lab
        .pod_status()
        .into_iter()
        .filter(|p| !p.running)
        .map(|p| p.key)
        .collect();
    crashed.extend(
        plan.nodes
            .iter()
            .filter(|n| !lab.ztunnel_running(&n.name))
            .map(|n| format!("ztunnel on {}", n.name)),
    );
    steps.check(
        "every pod and ztunnel process is still running",
        if crashed.is_empty() {
            Ok("all running".into())
        } else {
            Err(anyhow::anyhow!("crashed: {crashed:?}"))
        },
    );

    println!();
    if steps.failed > 0 {
        println!(
            "{} step(s) failed; logs in {}",
            steps.failed,
            lab.log_path("")
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        return Ok(false);
    }
    if will_remove {
        println!("All steps held.");
        return Ok(true);
    }
    println!("All steps held. The lab is still up: try");
    println!("  ambit lab exec {CLIENT} -- curl -s echo.demo");
    println!("  ambit lab exec {CLIENT} -- curl -si web/v2/anything   (through the waypoint)");
    println!("  ambit lab status");
    println!("  ambit lab down");
    Ok(true)
}
