//! The Gateway API objects the controller reads. A `Gateway` of class
//! `ambit-waypoint` is a waypoint: the controller deploys it (see
//! [`crate::waypoints`]), writes its status, and sends the traffic of what
//! is labelled `ambit.dev/use-waypoint: <its name>` through it. Only the
//! fields Ambit reads are typed; the CRDs are Gateway API's own, installed
//! with Gateway API, not generated here.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::Condition;

/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "ambit-waypoint";
/// The label Gateway API implementations put on what they deploy for a
/// Gateway; the controller's watch of Deployments selects on it.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Where waypoints take HBONE.
pub const HBONE_PORT: i32 = 15008;

#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "Gateway",
    namespaced,
    status = "GatewayStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    #[serde(default)]
    pub name: String,
    pub port: i32,
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub value: String,
}

impl Gateway {
    /// Whether this Gateway is a waypoint (other classes belong to other
    /// controllers, and are left alone).
    pub fn is_waypoint(&self) -> bool {
        self.spec.gateway_class_name == WAYPOINT_CLASS
    }

    /// Why the Gateway cannot be a waypoint, if it cannot: waypoints take
    /// HBONE on 15008 and nothing else.
    pub fn listener_problem(&self) -> Option<String> {
        let bad: Vec<String> = self
            .spec
            .listeners
            .iter()
            .filter(|l| l.port != HBONE_PORT || l.protocol != "HBONE")
            .map(|l| format!("{} ({} {})", l.name, l.protocol, l.port))
            .collect();
        (!bad.is_empty()).then(|| {
            format!(
                "a waypoint takes HBONE on port {HBONE_PORT} only; unsupported listeners: {}",
                bad.join(", ")
            )
        })
    }
}
