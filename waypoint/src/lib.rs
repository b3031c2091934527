//! waypoint: the optional L7 proxy of Ambit, deployed per namespace or per
//! service account as a Gateway of class `ambit-waypoint`. It terminates
//! HBONE from ztunnels ([`proxy`]), applies the HTTPRoutes and GRPCRoutes
//! of the Services it serves ([`table`], [`http`]), and opens HBONE with its
//! own identity to the endpoint it picks. Config and certificate come from
//! the controller, as for ztunnel.

pub mod app;
pub mod body;
pub mod http;
pub mod metrics;
pub mod proxy;
pub mod table;
#[cfg(feature = "testing")]
pub mod testing;
pub mod upstream;
