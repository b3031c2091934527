//! Where the agent learns which pods to capture.
//!
//! - A pods file (JSON array of [`PodInfo`]), re-read when it changes: what
//!   `ambit lab` writes for each node.
//! - A Unix socket speaking newline-delimited JSON, for a chained CNI plugin
//!   or a node-local pod watcher in Kubernetes (ADR 0007): a request is
//!   `{"add": <PodInfo>}`, `{"remove": "<uid>"}` or `{"snapshot": [<PodInfo>…]}`
//!   (the whole set, e.g. after a restart: pods not in it are released, pins
//!   left by an earlier run included), the answer `{"ok": true}` or
//!   `{"ok": false, "error": "<reason>"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::agent::{NodeAgent, PodInfo};

/// How often the pods file is checked for changes.
const POLL: Duration = Duration::from_millis(250);

/// Keeps the agent's pods equal to the file's until `stop`.
pub async fn watch_pods_file(agent: Arc<NodeAgent>, path: PathBuf, stop: CancellationToken) {
    let mut seen: Option<SystemTime> = None;
    loop {
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified != seen {
            match read_pods(&path) {
                Ok(pods) => {
                    seen = modified;
                    agent.reconcile(pods).await;
                }
                // Keep the last good set; a half-written file is retried.
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "pods file not applied")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = stop.cancelled() => return,
        }
    }
}

fn read_pods(path: &Path) -> Result<Vec<PodInfo>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| e.to_string()),
        // No file: no pods on this node yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// A request on the enrollment socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Request {
    Add(PodInfo),
    Remove(String),
    /// Every pod of the node that must be captured.
    Snapshot(Vec<PodInfo>),
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Serves the enrollment protocol on `listener` until `stop`.
pub async fn serve_socket(agent: Arc<NodeAgent>, listener: UnixListener, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => conn,
                Err(error) => { admin_http::after_accept_error(&error, "enrollment").await; continue; }
            },
            () = stop.cancelled() => return,
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let (read, mut write) = conn.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = handle(&agent, &line).await;
                let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                out.push(b'\n');
                if write.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn handle(agent: &Arc<NodeAgent>, line: &str) -> Reply {
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return Reply {
                ok: false,
                error: Some(format!("invalid request: {e}")),
            };
        }
    };
    match request {
        Request::Add(pod) => match agent.enroll(pod).await {
            Ok(()) => Reply {
                ok: true,
                error: None,
            },
            Err(e) => Reply {
                ok: false,
                error: Some(e.to_string()),
            },
        },
        Request::Remove(uid) => {
            agent.remove(&uid);
            Reply {
                ok: true,
                error: None,
            }
        }
        Request::Snapshot(pods) => {
            let failed = agent.reconcile(pods).await;
            Reply {
                ok: failed.is_empty(),
                error: (!failed.is_empty()).then(|| failed.join("; ")),
            }
        }
    }
}
