//! Prometheus text for the agent's counters on the metrics port.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use admin_http::{Method, StatusCode, method_not_allowed, reply, text};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::NodeAgent;

/// Renders the agent's state in the Prometheus text format.
pub fn render(agent: &NodeAgent) -> String {
    let s = agent.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "ambit_ztunnel_captured_pods",
        "gauge",
        "Pods whose traffic this node captures.",
        s.captured_pods.load(Ordering::Relaxed),
    );
    metric(
        "ambit_ztunnel_capture_attach_failures_total",
        "counter",
        "Pods that could not be captured.",
        s.attach_failures.load(Ordering::Relaxed),
    );
    metric(
        "ambit_ztunnel_ebpf_programs_loaded",
        "gauge",
        "eBPF capture programs loaded in the kernel.",
        capture::PROGRAMS as u64,
    );
    metric(
        "ambit_ztunnel_outbound_connections_total",
        "counter",
        "Captured outbound connections.",
        s.outbound_connections.load(Ordering::Relaxed),
    );
    metric(
        "ambit_ztunnel_inbound_connections_total",
        "counter",
        "Plaintext connections captured to pods' inbound port.",
        s.inbound_connections.load(Ordering::Relaxed),
    );
    metric(
        "ambit_ztunnel_connection_failures_total",
        "counter",
        "Captured connections that could not be forwarded.",
        s.connection_failures.load(Ordering::Relaxed),
    );
    metric(
        "ambit_ztunnel_open_connections",
        "gauge",
        "Connections being proxied now.",
        agent.shared().conns.len() as u64,
    );
    out.push_str(&agent.shared().metrics.render());
    out
}

/// Serves `/metrics` and `/healthz/ready` until `stop`.
pub async fn serve(
    agent: Arc<NodeAgent>,
    listener: TcpListener,
    expects_config: bool,
    stop: CancellationToken,
) {
    crate::admin::serve(
        listener,
        move |req| match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                reply(StatusCode::OK, "text/plain; version=0.0.4", render(&agent))
            }
            (&Method::GET, "/healthz/ready") => crate::admin::readiness(&agent, expects_config),
            (_, "/metrics" | "/healthz/ready") => method_not_allowed("GET", "use GET\n".into()),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz/ready\n".into(),
            ),
        },
        stop,
    )
    .await;
}
