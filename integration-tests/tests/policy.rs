//! L4 policy in the lab: authorization (ALLOW, DENY, AUDIT, dry run),
//! peer authentication (STRICT refuses plaintext), live re-evaluation of
//! open connections, and connection metrics that count exactly the bytes
//! sent.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::time::{Duration, Instant};

use integration_tests::{TestLab, require_root, spec, wait_until};
use lab::spec::{App, DeploymentSpec, NamespaceSpec};

/// Namespace `app` is meshed (echo, sleep, probe); `legacy` is not (a
/// plaintext client).
fn policy_lab(name: &str, slot: u8) -> TestLab {
    let mut spec = spec(name, slot, 2, 1);
    spec.namespaces[0]
        .labels
        .insert(lab::plan::DATAPLANE_MODE.into(), "ambient".into());
    spec.namespaces.push(NamespaceSpec {
        name: "legacy".into(),
        labels: Default::default(),
    });
    for (name, namespace) in [("probe", "app"), ("sleep", "legacy")] {
        spec.deployments.push(DeploymentSpec {
            name: name.into(),
            namespace: namespace.into(),
            replicas: 1,
            service_account: None,
            app: App::Sleep,
            labels: Default::default(),
        });
    }
    TestLab::up(spec)
}

/// An AuthorizationPolicy manifest in namespace `app`.
fn authz(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: app}}\nspec: {spec}\n---\n"
    )
}

/// Policy changes reach every ztunnel (controller and ztunnel polls,
/// re-judgement) well within this.
const PROPAGATION: Duration = Duration::from_secs(10);

fn eventually(what: &str, check: impl FnMut() -> bool) {
    wait_until(what, PROPAGATION, String::new, check);
}

fn access_log(t: &TestLab, node: &str) -> Vec<String> {
    let path = t.lab.log_path(&format!("ztunnel/{node}"));
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" access: "))
        .map(str::to_string)
        .collect()
}

/// How many access lines `node` has written: the mark from which
/// [`until_logged`] looks, so that a line an earlier step left does not
/// pass for the one a later step must write.
fn log_mark(t: &TestLab, node: &str) -> usize {
    access_log(t, node).len()
}

/// Waits until `act` succeeds and then `node`'s access log has a line
/// matching `line` after the first `since`; `act` runs again on every
/// try, so a connection that failed for another reason (re-evaluation of
/// one in flight) is retried.
fn until_logged(
    t: &TestLab,
    (node, since): (&str, usize),
    what: &str,
    mut act: impl FnMut() -> bool,
    line: impl Fn(&str) -> bool,
) {
    wait_until(
        what,
        PROPAGATION,
        || {
            format!(
                "{:#?}",
                &access_log(t, node).get(since..).unwrap_or_default()
            )
        },
        || act() && access_log(t, node).iter().skip(since).any(|l| line(l)),
    );
}

/// The sum of a metric's series whose labels contain all of `labels`.
fn metric_sum(t: &TestLab, node: &str, name: &str, labels: &[&str]) -> u64 {
    let text = t.lab.ztunnel_metrics(node).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn policies_decide_who_reaches_a_workload() {
    if !require_root("policies_decide_who_reaches_a_workload") {
        return;
    }
    let t = policy_lab("it-policy", 13);
    let plan = t.lab.plan();
    let echo = plan.pod("app/echo-0").unwrap();
    let echo_node = plan.nodes[echo.node].name.clone();
    let sleep_node = plan.nodes[plan.pod("app/sleep-0").unwrap().node]
        .name
        .clone();
    let url = format!("http://{}:8080/", echo.ip);
    for client in ["app/sleep-0", "app/probe-0", "legacy/sleep-0"] {
        assert!(t.reaches(client, &url), "{client} before any policy");
    }

    // DENY one principal: that client is refused (401 on its tunnel), the
    // other is not, and the access log names the policy.
    let mark = log_mark(&t, &echo_node);
    t.lab
        .set_policies(&authz(
            "deny-sleep",
            "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/sleep]}}]}]}",
        ))
        .unwrap();
    // A request in flight as the policy lands is closed by re-evaluation
    // and fails too: the client retries until a new stream is refused.
    until_logged(
        &t,
        (&echo_node, mark),
        "sleep refused by app/deny-sleep",
        || !t.reaches("app/sleep-0", &url),
        |l| {
            l.contains("policy=app/deny-sleep")
                && l.contains("reason=\"denied by app/deny-sleep\"")
                && l.contains("src_identity=spiffe://cluster.local/ns/app/sa/sleep")
        },
    );
    assert!(t.reaches("app/probe-0", &url));
    assert!(t.reaches("legacy/sleep-0", &url));
    let log = access_log(&t, &sleep_node);
    assert!(
        log.iter().any(|l| l.contains("rejected_unauthorized")),
        "the client side saw the 401: {log:#?}"
    );

    // STRICT (the DENY is gone with it): the plaintext client is refused,
    // meshed clients are not.
    let strict = "apiVersion: security.ambit.dev/v1alpha1\nkind: PeerAuthentication\n\
                  metadata: {name: strict, namespace: app}\nspec: {mtls: {mode: STRICT}}\n---\n";
    let mark = log_mark(&t, &echo_node);
    t.lab.set_policies(strict).unwrap();
    eventually("plaintext refused", || !t.reaches("legacy/sleep-0", &url));
    assert!(t.reaches("app/sleep-0", &url));
    assert!(t.reaches("app/probe-0", &url));
    // The access line is written as ztunnel drops the connection, which
    // the client can see first.
    until_logged(
        &t,
        (&echo_node, mark),
        "STRICT refusal logged",
        || true,
        |l| {
            l.contains("plaintext refused: peer authentication is STRICT")
                && l.contains("policy=app/strict")
        },
    );

    // Port-level modes: echo's 8080 PERMISSIVE lets the plaintext client
    // in there under the namespace's STRICT; an entry for another port
    // leaves 8080 to the workload's UNSET, so the namespace's STRICT again.
    let echo_ports = |port: u16| {
        format!(
            "{strict}apiVersion: security.ambit.dev/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {{name: echo-ports, namespace: app}}\n\
             spec: {{selector: {{matchLabels: {{app: echo}}}}, mtls: {{mode: UNSET}}, \
             portLevelMtls: {{\"{port}\": {{mode: PERMISSIVE}}}}}}\n"
        )
    };
    t.lab.set_policies(&echo_ports(8080)).unwrap();
    eventually("plaintext allowed on echo's 8080", || {
        t.reaches("legacy/sleep-0", &url)
    });
    // Refusals by the namespace's STRICT before echo-ports landed are
    // logged by now (the client's last try got through): only a new one
    // counts.
    let mark = log_mark(&t, &echo_node);
    until_logged(
        &t,
        (&echo_node, mark),
        "plaintext to 8080 refused again by the namespace's STRICT",
        || {
            t.lab.set_policies(&echo_ports(9000)).unwrap();
            !t.reaches("legacy/sleep-0", &url)
        },
        |l| {
            l.contains("policy=app/strict")
                && l.contains("plaintext refused")
                && l.contains(&format!("dst_addr={}:8080", echo.ip))
        },
    );
    assert!(t.reaches("app/sleep-0", &url));

    // Once an ALLOW selects the workload only what it matches passes;
    // AUDIT marks and a dry-run DENY reports without enforcing.
    let probe = "[{from: [{source: {serviceAccounts: [app/probe]}}]}]";
    let mark = log_mark(&t, &echo_node);
    t.lab
        .set_policies(&format!(
            "{}{}{}",
            authz(
                "allow-probe",
                &format!("{{selector: {{matchLabels: {{app: echo}}}}, rules: {probe}}}")
            ),
            authz("audit-probe", &format!("{{action: AUDIT, rules: {probe}}}")),
            authz(
                "would-deny",
                &format!("{{action: DENY, dryRun: true, rules: {probe}}}")
            ),
        ))
        .unwrap();
    // Until the new set lands, the plaintext client is still refused by
    // STRICT: retry until a fresh refusal for want of an ALLOW is logged.
    until_logged(
        &t,
        (&echo_node, mark),
        "only probe allowed",
        || !t.reaches("app/sleep-0", &url) && !t.reaches("legacy/sleep-0", &url),
        |l| l.contains("reason=\"denied: no ALLOW policy matched\""),
    );
    // The three policies are files the controller may pick up in more
    // than one poll, and a connection is logged when it closes: the probe
    // connects until its line shows all three at work.
    until_logged(
        &t,
        (&echo_node, mark),
        "probe allowed by app/allow-probe, audited and dry-run denied",
        || t.reaches("app/probe-0", &url),
        |l| {
            l.contains("policy=app/allow-probe")
                && l.contains("authz=audited by app/audit-probe; dry run: denied by app/would-deny")
        },
    );
}

/// Holds a slow request from `client` to echo open (until the echo
/// node counts an opened connection with `opened`), applies `policies`,
/// and checks that the request is cut well before it would end and that
/// the closing is logged with `logged` (both fragments).
fn cut_by_policy_change(
    t: &TestLab,
    client: &str,
    opened: &[&str],
    policies: &str,
    logged: [&str; 2],
) {
    let plan = t.lab.plan();
    let echo = plan.pod("app/echo-0").unwrap();
    let echo_node = plan.nodes[echo.node].name.clone();
    let slow = format!("http://{}:8080/delay/20000", echo.ip);
    let opened_before = metric_sum(t, &echo_node, "ambit_tcp_connections_opened_total", opened);
    let started = Instant::now();
    let mark = log_mark(t, &echo_node);
    let outcome = std::thread::scope(|s| {
        let held = s.spawn(|| {
            t.lab
                .exec_captured(client, &["curl", "-sS", "--max-time", "30", &slow])
                .unwrap()
        });
        eventually("the connection is open on the server side", || {
            metric_sum(t, &echo_node, "ambit_tcp_connections_opened_total", opened) > opened_before
        });
        t.lab.set_policies(policies).unwrap();
        held.join().unwrap()
    });
    assert!(
        !outcome.status.success(),
        "the held request completed: {}",
        String::from_utf8_lossy(&outcome.stdout)
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed only after {:?}, not by the policy change",
        started.elapsed()
    );
    // The line is written as the server side ends the copy, which the
    // client can see first.
    until_logged(
        t,
        (&echo_node, mark),
        "the closing logged with its policy",
        || true,
        |l| logged.iter().all(|fragment| l.contains(fragment)),
    );
}

#[test]
fn a_policy_change_closes_open_connections_it_now_denies() {
    if !require_root("a_policy_change_closes_open_connections_it_now_denies") {
        return;
    }
    let t = policy_lab("it-reeval", 14);
    cut_by_policy_change(
        &t,
        "app/sleep-0",
        &["reporter=\"destination\"", "source_workload=\"sleep\""],
        &authz("deny-all", "{action: DENY, rules: [{}]}"),
        [
            "policy changed: denied by app/deny-all",
            "policy=app/deny-all",
        ],
    );
    // A plaintext connection (from the unmeshed namespace, on 15006) held
    // under PERMISSIVE is closed when the namespace turns STRICT.
    t.lab.set_policies("").unwrap();
    let echo = t.lab.plan().pod("app/echo-0").unwrap().ip;
    eventually("the DENY is gone", || {
        t.reaches("legacy/sleep-0", &format!("http://{echo}:8080/"))
    });
    cut_by_policy_change(
        &t,
        "legacy/sleep-0",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"none\"",
        ],
        "apiVersion: security.ambit.dev/v1alpha1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: app}\nspec: {mtls: {mode: STRICT}}\n---\n",
        [
            "policy changed: plaintext refused: peer authentication is STRICT",
            "policy=app/strict",
        ],
    );
}

#[test]
fn connection_metrics_count_the_bytes_sent() {
    if !require_root("connection_metrics_count_the_bytes_sent") {
        return;
    }
    let t = policy_lab("it-metrics", 15);
    let plan = t.lab.plan();
    let echo = plan.pod("app/echo-0").unwrap();
    let echo_node = plan.nodes[echo.node].name.clone();
    let probe_node = plan.nodes[plan.pod("app/probe-0").unwrap().node]
        .name
        .clone();
    let labels = |reporter: &'static str| {
        [
            reporter,
            "source_workload=\"probe\"",
            "destination_workload=\"echo\"",
            "connection_security_policy=\"mutual_tls\"",
        ]
    };
    let source = labels("reporter=\"source\"");
    let destination = labels("reporter=\"destination\"");
    let read = |node: &str, labels: &[&str]| {
        [
            "ambit_tcp_received_bytes_total",
            "ambit_tcp_sent_bytes_total",
            "ambit_tcp_connections_opened_total",
            "ambit_tcp_connections_closed_total",
        ]
        .map(|m| metric_sum(&t, node, m, labels))
    };
    let before = (read(&probe_node, &source), read(&echo_node, &destination));
    // The TCP echo port returns what it gets: N bytes each way, one
    // connection.
    const N: u64 = 1_234_567;
    let cmd = format!("head -c {N} /dev/urandom | nc -N {} 9000 | wc -c", echo.ip);
    let echoed = t.exec("app/probe-0", &["sh", "-c", &cmd]);
    assert_eq!(echoed.trim(), N.to_string());
    let want = [N, N, 1, 1];
    let pages = || {
        format!(
            "{}\n{}",
            t.lab.ztunnel_metrics(&probe_node).unwrap_or_default(),
            t.lab.ztunnel_metrics(&echo_node).unwrap_or_default()
        )
    };
    wait_until(
        "both ztunnels counted the connection",
        PROPAGATION,
        pages,
        || {
            let src = read(&probe_node, &source);
            let dst = read(&echo_node, &destination);
            (0..4).all(|i| src[i] - before.0[i] == want[i] && dst[i] - before.1[i] == want[i])
        },
    );
    let text = t.lab.ztunnel_metrics(&echo_node).unwrap();
    assert!(
        text.contains("ambit_tcp_connection_duration_seconds_bucket{"),
        "{text}"
    );
    let text = t.lab.ztunnel_metrics(&probe_node).unwrap();
    assert!(
        text.contains("ambit_hbone_handshake_duration_seconds_bucket{result=\"ok\""),
        "{text}"
    );
}
