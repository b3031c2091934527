//! The node-local admin API (127.0.0.1:15000): what this ztunnel runs with
//! and what it is doing, for operators and `ambit` commands.
//!
//! - `GET /config_dump`: the mesh config in force (workloads, services,
//!   policies), the enrolled pods and their certificates with expiry.
//! - `GET /debug/connections`: the open connections.
//! - `GET /healthz/ready`: `200` once ztunnel serves with its config.
//! - `GET /logging` shows the log filter, `POST /logging?level=<filter>`
//!   changes it (the access log stays at `info` unless the filter names
//!   the `access` target).
//! - `GET /debug/memory`: resident memory by kind and the heap allocator's
//!   own account, to tell a leak from cached pages or mapped code.

use std::sync::Arc;
use std::time::SystemTime;

pub use admin_http::serve;
use admin_http::{Method, Reply, Req, StatusCode, json, method_not_allowed, text};
use serde::Serialize;

use crate::agent::{NodeAgent, PodInfo};
use crate::conns::ConnView;

/// Changes the log filter at run time; returns the filter now in force.
pub trait LogControl: std::fmt::Debug + Send + Sync + 'static {
    fn current(&self) -> String;
    fn set(&self, filter: &str) -> Result<String, String>;
}

/// The heap allocator's counters, in bytes. Only the binary knows which
/// allocator it runs with, so it supplies them.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeapStats {
    /// Held by live allocations, including the freed ones in `thread_cached`.
    pub allocated: u64,
    /// Freed allocations that threads keep for their next allocations of
    /// the same size, still counted in `allocated`.
    pub thread_cached: u64,
    /// In pages that hold live allocations.
    pub active: u64,
    /// The allocator's own bookkeeping.
    pub metadata: u64,
    /// Resident pages the allocator maps (live, cached and bookkeeping).
    pub resident: u64,
    /// Kept mapped for reuse but returned to the kernel.
    pub retained: u64,
    /// Arenas the allocator spreads threads over, each with its own pages
    /// (jemalloc: one more for allocations of several MiB).
    pub arenas: u32,
}

/// Reads the heap allocator's counters.
pub type HeapStatsFn = fn() -> Result<HeapStats, String>;

/// What the admin API serves from.
#[derive(Debug)]
pub struct Admin {
    pub agent: Arc<NodeAgent>,
    pub logging: Option<Arc<dyn LogControl>>,
    pub heap_stats: Option<HeapStatsFn>,
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

/// `/healthz/ready`, on the admin port and on the metrics port (which a
/// kubelet can reach): ready once the config it expects has arrived.
pub fn readiness(agent: &NodeAgent, expects_config: bool) -> Reply {
    if expects_config && agent.shared().snapshot().version() == 0 {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no mesh config yet\n".into(),
        )
    } else {
        text(StatusCode::OK, "ready\n".into())
    }
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
            (&Method::GET, "/healthz/ready") => readiness(&self.agent, self.expects_config),
            (&Method::GET | &Method::POST, "/logging") => self.logging(req),
            (&Method::GET, "/debug/memory") => self.memory(),
            (_, "/logging") => method_not_allowed("GET, POST", "use GET or POST\n".into()),
            (_, "/config_dump" | "/debug/connections" | "/healthz/ready" | "/debug/memory") => {
                method_not_allowed("GET", "use GET\n".into())
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /config_dump, /debug/connections, /debug/memory, \
                 /healthz/ready, /logging\n"
                    .into(),
            ),
        }
    }

    fn memory(&self) -> Reply {
        match self.memory_view() {
            Ok(view) => json(&view),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }

    fn memory_view(&self) -> Result<MemoryView, String> {
        let status = |e: String| format!("reading /proc/self/status: {e}");
        let process = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| e.to_string())
            .and_then(|text| ProcessMemory::parse(&text))
            .map_err(status)?;
        let heap = self
            .heap_stats
            .map(|read| read())
            .transpose()
            .map_err(|e| format!("reading the heap allocator's counters: {e}"))?;
        Ok(MemoryView { process, heap })
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
            // A link or a prefetch must not change what the node logs.
            Some(_) if req.method() != Method::POST => {
                method_not_allowed("POST", "changing the level takes POST\n".into())
            }
            Some(level) => match percent_decode(level).and_then(|l| control.set(&l)) {
                Ok(now) => text(StatusCode::OK, format!("{now}\n")),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid level: {e}\n")),
            },
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MemoryView {
    process: ProcessMemory,
    /// Absent when the binary does not report its allocator.
    heap: Option<HeapStats>,
}

/// Resident memory of the whole process, in bytes, from the kernel.
#[derive(Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ProcessMemory {
    rss: u64,
    /// Private memory: heap, stacks, relocated data.
    rss_anon: u64,
    /// Mapped file pages (the binary and shared libraries), shared with
    /// the page cache.
    rss_file: u64,
    /// The peak of `rss` since start.
    rss_peak: u64,
}

impl ProcessMemory {
    /// Reads the `Vm*`/`Rss*` lines of `/proc/<pid>/status` (values in kB);
    /// a value that is not a number is an error naming its line.
    fn parse(status: &str) -> Result<Self, String> {
        let mut m = Self::default();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let field = match key {
                "VmRSS" => &mut m.rss,
                "RssAnon" => &mut m.rss_anon,
                "RssFile" => &mut m.rss_file,
                "VmHWM" => &mut m.rss_peak,
                _ => continue,
            };
            let kb = value.trim().trim_end_matches("kB").trim();
            let kb: u64 = kb
                .parse()
                .map_err(|_| format!("unexpected line {line:?}"))?;
            *field = kb * 1024;
        }
        Ok(m)
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
    use super::{ProcessMemory, percent_decode};

    #[test]
    fn process_memory_is_read_from_status_lines() {
        let status = "Name:\tztunnel\nVmHWM:\t   25784 kB\nVmRSS:\t   15424 kB\n\
                      RssAnon:\t    3180 kB\nRssFile:\t   12244 kB\nRssShmem:\t       0 kB\n";
        assert_eq!(
            ProcessMemory::parse(status),
            Ok(ProcessMemory {
                rss: 15424 * 1024,
                rss_anon: 3180 * 1024,
                rss_file: 12244 * 1024,
                rss_peak: 25784 * 1024,
            })
        );
        assert_eq!(
            ProcessMemory::parse("VmRSS:\t lots kB\n"),
            Err("unexpected line \"VmRSS:\\t lots kB\"".into())
        );
    }

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
