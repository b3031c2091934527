//! The node-local admin API (127.0.0.1:15000): what this ztunnel runs with
//! and what it is doing, for operators and `ambit` commands.
//!
//! - `GET /config_dump`: the mesh config in force (workloads, services,
//!   policies), the enrolled pods and their certificates with expiry.
//! - `GET /debug/connections`: the open connections.
//! - `GET /healthz/ready`: `200` once ztunnel serves with its config.
//! - `GET|POST /logging?level=<filter>`: shows or changes the log filter.

use std::sync::Arc;
use std::time::SystemTime;

pub use admin_http::serve;
use admin_http::{Method, Reply, Req, StatusCode, json, text};
use serde::Serialize;

use crate::agent::{NodeAgent, PodInfo};
use crate::conns::ConnView;

/// Changes the log filter at run time; returns the filter now in force.
pub trait LogControl: std::fmt::Debug + Send + Sync + 'static {
    fn current(&self) -> String;
    fn set(&self, filter: &str) -> Result<String, String>;
}

/// What the admin API serves from.
#[derive(Debug)]
pub struct Admin {
    pub agent: Arc<NodeAgent>,
    pub logging: Option<Arc<dyn LogControl>>,
    /// Whether a config source was configured (then readiness waits for
    /// its first config).
    pub expects_config: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDump<'a> {
    version: u64,
    config: &'a model::MeshConfig,
    pods: Vec<PodInfo>,
    certificates: Vec<CertView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertView {
    identity: String,
    not_before: u64,
    not_after: u64,
    expires_in_seconds: i64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Admin {
    pub fn route(&self, req: &Req) -> Reply {
        let shared = self.agent.shared();
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/config_dump") => {
                let snapshot = shared.snapshot();
                let now = SystemTime::now();
                let certificates = self
                    .agent
                    .certificates()
                    .iter()
                    .map(|c| CertView {
                        identity: c.identity().to_string(),
                        not_before: unix(c.not_before()),
                        not_after: unix(c.not_after()),
                        expires_in_seconds: match c.not_after().duration_since(now) {
                            Ok(d) => d.as_secs() as i64,
                            Err(e) => -(e.duration().as_secs() as i64),
                        },
                    })
                    .collect();
                json(&ConfigDump {
                    version: snapshot.version(),
                    config: snapshot.config(),
                    pods: self.agent.pods(),
                    certificates,
                })
            }
            (&Method::GET, "/debug/connections") => {
                let list: Vec<ConnView> = shared.conns.list();
                json(&list)
            }
            (&Method::GET, "/healthz/ready") => {
                if self.expects_config && shared.snapshot().version() == 0 {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: no mesh config yet\n".into(),
                    )
                } else {
                    text(StatusCode::OK, "ready\n".into())
                }
            }
            (&Method::GET | &Method::POST, "/logging") => self.logging(req),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /config_dump, /debug/connections, /healthz/ready, /logging\n"
                    .into(),
            ),
        }
    }

    fn logging(&self, req: &Req) -> Reply {
        let Some(control) = &self.logging else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "log level control is not available in this process\n".into(),
            );
        };
        let level = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("level="));
        match level {
            None => text(StatusCode::OK, format!("{}\n", control.current())),
            Some(level) => match percent_decode(level).and_then(|l| control.set(&l)) {
                Ok(now) => text(StatusCode::OK, format!("{now}\n")),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid level: {e}\n")),
            },
        }
    }
}

/// Decodes a query value (`%XX` escapes, `+` for space); a malformed
/// escape is an error, not passed on.
fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = value
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("malformed escape at {:?}", &value[i..]))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_are_decoded_and_bad_escapes_refused() {
        assert_eq!(
            percent_decode("info%2Cztunnel%3Ddebug").as_deref(),
            Ok("info,ztunnel=debug")
        );
        assert_eq!(percent_decode("a+b").as_deref(), Ok("a b"));
        assert!(percent_decode("info%2").is_err());
        assert!(percent_decode("%zz").is_err());
    }
}
