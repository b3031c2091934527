//! The controller's own metrics, rendered as Prometheus text on the ops
//! endpoint (`/metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Counters shared by the pipeline, the config stream and the CA.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Objects the controller knows, by kind.
    objects: Mutex<BTreeMap<&'static str, u64>>,
    translations: AtomicU64,
    translation_nanos: AtomicU64,
    pub config_version: AtomicU64,
    pub updates_sent: AtomicU64,
    pub update_bytes_sent: AtomicU64,
    pub nacks: AtomicU64,
    pub subscribers: AtomicI64,
    pub subscribers_refused: AtomicU64,
    pub certificates_signed: AtomicU64,
    pub certificates_refused: AtomicU64,
}

impl Metrics {
    pub fn set_objects(&self, counts: impl IntoIterator<Item = (&'static str, u64)>) {
        let mut objects = self.objects.lock().unwrap_or_else(PoisonError::into_inner);
        objects.clear();
        objects.extend(counts);
    }

    pub fn translated(&self, took: Duration) {
        self.translations.fetch_add(1, Ordering::Relaxed);
        self.translation_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        let objects: Vec<(String, String)> = self
            .objects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), n.to_string()))
            .collect();
        metric(
            "ambit_controller_objects",
            "gauge",
            "Kubernetes objects the controller knows, by kind.",
            &objects,
        );
        let nanos = Self::get(&self.translation_nanos);
        metric(
            "ambit_controller_translation_duration_seconds",
            "summary",
            "Time to translate the cluster into the mesh config.",
            &[
                ("_sum".into(), format!("{}", nanos as f64 / 1e9)),
                ("_count".into(), Self::get(&self.translations).to_string()),
            ],
        );
        metric(
            "ambit_controller_config_version",
            "gauge",
            "Version of the config being distributed.",
            &one(Self::get(&self.config_version)),
        );
        metric(
            "ambit_controller_config_updates_sent_total",
            "counter",
            "Config updates sent to subscribers.",
            &one(Self::get(&self.updates_sent)),
        );
        metric(
            "ambit_controller_config_sent_bytes_total",
            "counter",
            "Encoded bytes of the config updates sent.",
            &one(Self::get(&self.update_bytes_sent)),
        );
        metric(
            "ambit_controller_config_nacks_total",
            "counter",
            "Config updates refused by subscribers.",
            &one(Self::get(&self.nacks)),
        );
        metric(
            "ambit_controller_subscribers",
            "gauge",
            "Data planes subscribed to the config stream.",
            &[(
                String::new(),
                self.subscribers.load(Ordering::Relaxed).to_string(),
            )],
        );
        metric(
            "ambit_controller_subscribers_refused_total",
            "counter",
            "Subscriptions refused (unauthenticated or protocol errors).",
            &one(Self::get(&self.subscribers_refused)),
        );
        metric(
            "ambit_controller_certificates_signed_total",
            "counter",
            "Certificates signed by the CA service.",
            &one(Self::get(&self.certificates_signed)),
        );
        metric(
            "ambit_controller_certificates_refused_total",
            "counter",
            "Certificate requests refused by the CA service.",
            &one(Self::get(&self.certificates_refused)),
        );
        out
    }
}
