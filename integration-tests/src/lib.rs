//! End-to-end tests of Ambit: the network-namespace lab harness and
//! whole-mesh scenarios run against the real binaries. The loopback tests of
//! the foundation crates live beside those crates (`identity/tests`,
//! `hbone/tests`).
