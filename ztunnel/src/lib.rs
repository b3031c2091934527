//! ztunnel: the per-node Ambit data plane (a DaemonSet in Kubernetes, one
//! process per node in `ambit lab`). Its node agent captures meshed pods'
//! TCP traffic with eBPF (the `capture` crate) and serves it from listeners
//! it creates inside each pod's network namespace.
//!
//! Today captured traffic is forwarded as plain TCP; HBONE with each pod's
//! identity, policy and telemetry build on this (see `docs/architecture.md`).

pub mod agent;
pub mod app;
pub mod enroll;
pub mod metrics;
pub mod netns;
