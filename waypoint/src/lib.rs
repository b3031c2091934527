//! waypoint: the optional L7 proxy of Ambit, deployed per namespace or per
//! service account. It terminates HBONE from ztunnels, applies Gateway API
//! routing, L7 policy and resilience, and re-originates HBONE to the chosen
//! endpoint.
//!
//! Built on the `identity` and `hbone` crates; the L7 stack lands with the
//! waypoint work.
