//! Sample workloads for `ambit lab` and the end-to-end tests: `ambit-echo`
//! (HTTP/1.1 + HTTP/2 echo with a TCP echo port) and `ambit-load` (a load
//! client with status, backend and latency reports, and raw TCP modes:
//! many held connections, fixed-size round trips).

pub mod echo;
pub mod grpc;
pub mod load;
pub mod tcp;
