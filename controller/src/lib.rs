//! controller: the only Ambit component that talks to Kubernetes. It
//! translates the cluster into the mesh model, streams it to ztunnels and
//! waypoints, and runs the CA (`identity::CertificateAuthority`).
//!
//! The watchers, translation pipeline and config/CA services land with the
//! controller work.
