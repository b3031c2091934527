//! The waypoint's Prometheus metrics: requests by destination Service,
//! route and status with their duration, and tunnels by mode or by the
//! reason they were refused. Labels come from the config (Services and
//! routes) or fixed sets, so their number is bounded by the config.

use std::time::Duration;

use metrics::{Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

const REQUESTS: &str = "ambit_requests_total";
const REQUEST_DURATION: &str = "ambit_request_duration_seconds";
const TUNNELS: &str = "ambit_waypoint_tunnels_total";
const REFUSED: &str = "ambit_waypoint_tunnels_refused_total";

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

/// Request duration buckets, seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        for (name, help) in [
            (
                REQUESTS,
                "HTTP requests answered, by destination Service, route and status.",
            ),
            (
                TUNNELS,
                "Tunnels accepted, by destination and mode (http: routed, tcp: passed on).",
            ),
            (REFUSED, "Tunnels refused, by destination and reason."),
        ] {
            recorder.describe_counter(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        }
        recorder.describe_histogram(
            KeyName::from_const_str(REQUEST_DURATION),
            Some(Unit::Seconds),
            SharedString::const_str("From a request's arrival to its response's headers."),
        );
        Self { recorder, handle }
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> metrics::Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &META)
    }

    /// A tunnel was accepted for `destination`, served as `mode`.
    pub fn opened(&self, destination: &str, mode: &'static str) {
        self.counter(
            TUNNELS,
            vec![
                Label::new("destination_service", destination.to_string()),
                Label::new("mode", mode),
            ],
        )
        .increment(1);
    }

    /// A tunnel was refused; `reason` is a code from a fixed set.
    pub fn failed(&self, destination: &str, reason: &'static str) {
        self.counter(
            REFUSED,
            vec![
                Label::new("destination_service", destination.to_string()),
                Label::new("reason", reason),
            ],
        )
        .increment(1);
    }

    /// A request was answered with `status` after `elapsed`.
    pub fn request(&self, destination: &str, route: &str, status: u16, elapsed: Duration) {
        let destination = Label::new("destination_service", destination.to_string());
        let code = Label::new("response_code", status.to_string());
        self.counter(
            REQUESTS,
            vec![
                Label::new("reporter", "waypoint"),
                destination.clone(),
                Label::new(
                    "route",
                    if route.is_empty() { "none" } else { route }.to_string(),
                ),
                code.clone(),
            ],
        )
        .increment(1);
        self.recorder
            .register_histogram(
                &Key::from_parts(REQUEST_DURATION, vec![destination, code]),
                &META,
            )
            .record(elapsed.as_secs_f64());
    }

    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}
