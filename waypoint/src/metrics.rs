//! The waypoint's Prometheus metrics: requests by destination Service,
//! route and status with their duration, and tunnels by mode or by the
//! reason they were refused. Labels come from the config (Services and
//! routes) or fixed sets, so their number is bounded by the config.

use std::time::Duration;

use admin_http::registry::Registry;
use metrics::Label;

const REQUESTS: &str = "ambit_requests_total";
const REQUEST_DURATION: &str = "ambit_request_duration_seconds";
const TUNNELS: &str = "ambit_waypoint_tunnels_total";
const REFUSED: &str = "ambit_waypoint_tunnels_refused_total";

/// Request duration buckets, seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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
        registry.describe_counter(
            REQUESTS,
            None,
            "HTTP requests answered, by destination Service, route and status.",
        );
        registry.describe_counter(
            TUNNELS,
            None,
            "Tunnels accepted, by destination and mode (http: routed, tcp: passed on).",
        );
        registry.describe_counter(REFUSED, None, "Tunnels refused, by destination and reason.");
        registry.describe_histogram(
            REQUEST_DURATION,
            "From a request's arrival to its response's headers.",
        );
        Self { registry }
    }

    /// A tunnel was accepted for `destination`, served as `mode`.
    pub fn opened(&self, destination: &str, mode: &'static str) {
        self.registry
            .counter(
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
        self.registry
            .counter(
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
        self.registry
            .counter(
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
        self.registry
            .histogram(REQUEST_DURATION, vec![destination, code])
            .record(elapsed.as_secs_f64());
    }

    pub fn render(&self) -> String {
        self.registry.render()
    }
}
