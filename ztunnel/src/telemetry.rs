//! One record per proxied connection, and what is made of it: the access
//! log line, the Prometheus metrics and the `/debug/connections` entry.
//!
//! Metric names and labels follow Istio's TCP metrics (with an `ambit_`
//! prefix) so dashboards carry over; like Istio, `sent` is the response
//! direction (destination → source) and `received` the request direction.
//! Labels name workloads, identities and services, never addresses or
//! ports, so their number is bounded by the cluster's objects, not by its
//! traffic.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use admin_http::registry::Registry;
use hbone::{PoolKey, PoolObserver};
use metrics::{Label, Unit};
use model::{Service, Workload};
use serde::Serialize;

const OPENED: &str = "ambit_tcp_connections_opened_total";
const CLOSED: &str = "ambit_tcp_connections_closed_total";
const FAILED: &str = "ambit_tcp_connections_failed_total";
const SENT: &str = "ambit_tcp_sent_bytes_total";
const RECEIVED: &str = "ambit_tcp_received_bytes_total";
const DURATION: &str = "ambit_tcp_connection_duration_seconds";
const HANDSHAKE: &str = "ambit_hbone_handshake_duration_seconds";

/// Upper bounds of the duration histograms: sub-millisecond handshakes to
/// half-hour connections.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From a pod of this node (reporter `source`).
    Outbound,
    /// To a pod of this node (reporter `destination`).
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }

    fn reporter(self) -> &'static str {
        match self {
            Self::Outbound => "source",
            Self::Inbound => "destination",
        }
    }
}

/// Who and what one connection is about. Empty strings are unknowns.
#[derive(Debug, Clone, Serialize)]
pub struct ConnRecord {
    pub direction: Direction,
    /// `HBONE` or `TCP`.
    pub protocol: &'static str,
    pub src_addr: SocketAddr,
    /// `namespace/name` of the pod.
    pub src_workload: String,
    /// The namespace and owning workload (Deployment…) for metric labels:
    /// pods come and go, their owners stay.
    #[serde(skip)]
    pub src_owner: (String, String),
    pub src_identity: String,
    /// What the client dialled (a VIP or a pod address).
    pub dst_addr: SocketAddr,
    /// The endpoint actually connected to.
    pub dst_endpoint: String,
    /// The service's hostname (`name.namespace.svc.cluster.local`).
    pub dst_service: String,
    /// Its namespace and name, for metric labels.
    #[serde(skip)]
    pub dst_service_ref: (String, String),
    pub dst_workload: String,
    #[serde(skip)]
    pub dst_owner: (String, String),
    pub dst_identity: String,
    /// The waypoint the connection went through (outbound).
    pub waypoint: String,
    /// The authorization policy that decided (inbound).
    pub policy: String,
    /// AUDIT matches and dry-run outcomes (inbound).
    pub note: String,
    #[serde(serialize_with = "unix_seconds")]
    pub started: SystemTime,
    #[serde(skip)]
    pub clock: Instant,
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    s.serialize_u64(secs)
}

impl ConnRecord {
    pub fn new(direction: Direction, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self {
            direction,
            protocol: "TCP",
            src_addr,
            src_workload: String::new(),
            src_owner: Default::default(),
            src_identity: String::new(),
            dst_addr,
            dst_endpoint: String::new(),
            dst_service: String::new(),
            dst_service_ref: Default::default(),
            dst_workload: String::new(),
            dst_owner: Default::default(),
            dst_identity: String::new(),
            waypoint: String::new(),
            policy: String::new(),
            note: String::new(),
            started: SystemTime::now(),
            clock: Instant::now(),
        }
    }

    /// The source is this workload of the mesh config.
    pub fn set_src(&mut self, w: &Workload) {
        self.src_workload = format!("{}/{}", w.namespace, w.name);
        self.src_owner = owner(w);
    }

    /// The client dialled this service of the mesh config.
    pub fn set_service(&mut self, s: &Service) {
        self.dst_service = s.hostname();
        self.dst_service_ref = (s.namespace.clone(), s.name.clone());
    }

    /// The destination is this workload of the mesh config.
    pub fn set_dst(&mut self, w: &Workload) {
        self.dst_workload = format!("{}/{}", w.namespace, w.name);
        self.dst_owner = owner(w);
    }

    /// Writes the access log line. `to_dst` and `to_src` are the bytes of
    /// each direction; `reason` is empty for a clean close.
    pub fn log(&self, to_dst: u64, to_src: u64, reason: &str) {
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            protocol = self.protocol,
            src_addr = %self.src_addr,
            src_workload = %self.src_workload,
            src_identity = %self.src_identity,
            dst_addr = %self.dst_addr,
            dst_service = %self.dst_service,
            dst_endpoint = %self.dst_endpoint,
            dst_workload = %self.dst_workload,
            dst_identity = %self.dst_identity,
            waypoint = %self.waypoint,
            policy = %self.policy,
            authz = %self.note,
            bytes_sent = to_dst,
            bytes_received = to_src,
            duration_ms = self.clock.elapsed().as_millis() as u64,
            reason,
            "connection complete"
        );
    }

    fn labels(&self) -> Vec<Label> {
        let (src_ns, src_name) = self.src_owner.clone();
        let (dst_ns, dst_name) = self.dst_owner.clone();
        let (svc_ns, svc_name) = self.dst_service_ref.clone();
        let or_unknown = |s: String| if s.is_empty() { "unknown".into() } else { s };
        let security = if self.protocol == "HBONE" {
            "mutual_tls"
        } else {
            "none"
        };
        vec![
            Label::new("reporter", self.direction.reporter()),
            Label::new("source_workload", or_unknown(src_name)),
            Label::new("source_workload_namespace", or_unknown(src_ns)),
            Label::new("source_principal", or_unknown(self.src_identity.clone())),
            Label::new("destination_workload", or_unknown(dst_name)),
            Label::new("destination_workload_namespace", or_unknown(dst_ns)),
            Label::new(
                "destination_principal",
                or_unknown(self.dst_identity.clone()),
            ),
            Label::new("destination_service", or_unknown(self.dst_service.clone())),
            Label::new("destination_service_name", or_unknown(svc_name)),
            Label::new("destination_service_namespace", or_unknown(svc_ns)),
            Label::new("connection_security_policy", security),
        ]
    }
}

fn owner(w: &Workload) -> (String, String) {
    (
        w.namespace.clone(),
        w.workload_name.clone().unwrap_or_else(|| w.name.clone()),
    )
}

/// The Prometheus registry of connection metrics of one ztunnel.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new(BUCKETS);
        registry.describe_counter(OPENED, None, "TCP connections opened.");
        registry.describe_counter(CLOSED, None, "TCP connections closed after being opened.");
        registry.describe_counter(
            FAILED,
            None,
            "TCP connections that failed or were refused, by reason.",
        );
        registry.describe_counter(
            SENT,
            Some(Unit::Bytes),
            "Bytes sent in the response direction (destination to source).",
        );
        registry.describe_counter(
            RECEIVED,
            Some(Unit::Bytes),
            "Bytes received in the request direction (source to destination).",
        );
        registry.describe_histogram(DURATION, "How long connections stayed open.");
        registry.describe_histogram(
            HANDSHAKE,
            "HBONE connection set-up (TCP and TLS handshakes).",
        );
        Self { registry }
    }

    pub fn opened(&self, record: &ConnRecord) {
        self.registry.counter(OPENED, record.labels()).increment(1);
    }

    /// A connection that was opened ended; `to_dst`/`to_src` as in
    /// [`ConnRecord::log`].
    pub fn closed(&self, record: &ConnRecord, to_dst: u64, to_src: u64) {
        let labels = record.labels();
        self.registry.counter(CLOSED, labels.clone()).increment(1);
        self.registry
            .counter(RECEIVED, labels.clone())
            .increment(to_dst);
        self.registry.counter(SENT, labels).increment(to_src);
        self.registry
            .histogram(
                DURATION,
                vec![
                    Label::new("reporter", record.direction.reporter()),
                    Label::new(
                        "destination_service",
                        if record.dst_service.is_empty() {
                            "unknown".to_string()
                        } else {
                            record.dst_service.clone()
                        },
                    ),
                ],
            )
            .record(record.clock.elapsed().as_secs_f64());
    }

    /// A connection that could not be made or was refused. `reason` is a
    /// short code from a fixed set (it is a label).
    pub fn failed(&self, record: &ConnRecord, reason: &'static str) {
        let mut labels = record.labels();
        labels.push(Label::new("reason", reason));
        self.registry.counter(FAILED, labels).increment(1);
    }

    fn handshake(&self, elapsed: Duration, result: &'static str) {
        self.registry
            .histogram(HANDSHAKE, vec![Label::new("result", result)])
            .record(elapsed.as_secs_f64());
    }

    /// The Prometheus text of every connection metric.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

impl PoolObserver for Metrics {
    fn handshake(&self, _key: &PoolKey, elapsed: Duration, error: Option<&hbone::Error>) {
        Metrics::handshake(self, elapsed, error.map_or("ok", hbone::Error::reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels as Istio's TCP metrics have them: full SPIFFE principals,
    /// the service's hostname, name and namespace, the owning workloads.
    #[test]
    fn a_closed_connection_renders_its_counters_with_istio_labels() {
        let metrics = Metrics::new();
        let mut record = ConnRecord::new(
            Direction::Inbound,
            "10.0.0.1:1234".parse().expect("address"),
            "10.0.0.2:80".parse().expect("address"),
        );
        record.protocol = "HBONE";
        record.src_identity = "spiffe://cluster.local/ns/app/sa/sleep".into();
        record.dst_identity = "spiffe://cluster.local/ns/app/sa/echo".into();
        record.src_owner = ("app".into(), "sleep".into());
        record.dst_owner = ("app".into(), "echo".into());
        let service: Service = serde_yaml::from_str(
            "{name: echo, namespace: app, vips: [10.96.0.10], ports: [{port: 80}]}",
        )
        .expect("service");
        record.set_service(&service);
        metrics.opened(&record);
        metrics.closed(&record, 10, 20);
        let text = metrics.render();
        let labels = concat!(
            r#"reporter="destination",source_workload="sleep","#,
            r#"source_workload_namespace="app","#,
            r#"source_principal="spiffe://cluster.local/ns/app/sa/sleep","#,
            r#"destination_workload="echo",destination_workload_namespace="app","#,
            r#"destination_principal="spiffe://cluster.local/ns/app/sa/echo","#,
            r#"destination_service="echo.app.svc.cluster.local","#,
            r#"destination_service_name="echo",destination_service_namespace="app","#,
            r#"connection_security_policy="mutual_tls""#,
        );
        for line in [
            format!("ambit_tcp_received_bytes_total{{{labels}}} 10"),
            format!("ambit_tcp_sent_bytes_total{{{labels}}} 20"),
            format!("ambit_tcp_connections_opened_total{{{labels}}} 1"),
            format!("ambit_tcp_connections_closed_total{{{labels}}} 1"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in {text}");
        }
    }

    /// The JSON access log: one object per connection, every field of the
    /// text line at the top level, numbers as numbers.
    #[test]
    fn the_json_access_line_carries_each_field() {
        let out = logging::testing::Buffer::default();
        let (subscriber, _logging) =
            logging::build(logging::Format::Json, "warn", out.clone(), false).expect("subscriber");
        let mut record = ConnRecord::new(
            Direction::Inbound,
            "10.0.0.1:1234".parse().expect("address"),
            "10.0.0.2:80".parse().expect("address"),
        );
        record.protocol = "HBONE";
        record.src_identity = "spiffe://cluster.local/ns/app/sa/sleep".into();
        record.dst_identity = "spiffe://cluster.local/ns/app/sa/echo".into();
        record.dst_workload = "app/echo-0".into();
        record.dst_service = "echo.app.svc.cluster.local".into();
        record.policy = "app/allow-sleep".into();
        tracing::subscriber::with_default(subscriber, || record.log(10, 20, "peer reset"));
        let lines = out.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
        let expected = serde_json::json!({
            "target": "access",
            "level": "INFO",
            "message": "connection complete",
            "direction": "inbound",
            "protocol": "HBONE",
            "src_addr": "10.0.0.1:1234",
            "src_workload": "",
            "src_identity": "spiffe://cluster.local/ns/app/sa/sleep",
            "dst_addr": "10.0.0.2:80",
            "dst_service": "echo.app.svc.cluster.local",
            "dst_endpoint": "",
            "dst_workload": "app/echo-0",
            "dst_identity": "spiffe://cluster.local/ns/app/sa/echo",
            "waypoint": "",
            "policy": "app/allow-sleep",
            "authz": "",
            "bytes_sent": 10,
            "bytes_received": 20,
            "reason": "peer reset",
        });
        for (key, value) in expected.as_object().expect("object") {
            assert_eq!(&line[key], value, "{key} in {line}");
        }
        assert!(line["duration_ms"].is_u64(), "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
    }
}
