//! `ambit lab`: a whole multi-node mesh cluster on one Linux host, made of
//! network namespaces (a cluster network, nodes, pods), veth pairs, routes,
//! nftables service rules and cgroup v2 directories, running the real
//! binaries. The quick start and the test bed: used by the `ambit` CLI and
//! by `integration-tests`.
//!
//! The host's own network namespace is never modified. Every object a lab
//! creates carries its name, so `Lab::down` can remove it from any state.

mod cgroup;
pub mod cidr;
mod error;
mod host;
pub mod k8s;
mod lab;
mod net;
pub mod plan;
pub mod process;
pub mod spec;

pub use error::LabError;
pub use host::{BPFFS, ensure_bpffs, is_root, preflight};
pub use lab::{Lab, LabOptions, PodStatus, STATE_ROOT};
pub use spec::LabSpec;
