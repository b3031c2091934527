//! ztunnel: the per-node Ambit data plane (a DaemonSet in Kubernetes, one
//! process per node in `ambit lab`). It captures meshed pods' TCP traffic
//! with eBPF, tunnels it over HBONE with each pod's SPIFFE identity,
//! enforces L4 policy and exports node-level telemetry.
//!
//! The proxy is built on the `identity` and `hbone` crates; capture,
//! configuration and policy land with the capture and L4 data plane work.
