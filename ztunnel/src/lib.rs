//! ztunnel: the per-node Ambit data plane (a DaemonSet in Kubernetes, one
//! process per node in `ambit lab`). Its node agent captures meshed pods'
//! TCP traffic with eBPF (the `capture` crate) and serves it from listeners
//! it creates inside each pod's network namespace.
//!
//! Outbound connections are resolved against the mesh config (`route`):
//! meshed destinations are reached over HBONE with the source pod's
//! identity, others over plain TCP; each pod's 15008 terminates HBONE with
//! the pod's own certificate (`inbound`).

pub mod admin;
pub mod agent;
pub mod app;
pub mod conns;
pub mod enroll;
pub mod inbound;
pub mod metrics;
pub mod netns;
pub mod telemetry;
pub mod transparent;
