//! How an inbound connection is judged (peer authentication, then
//! authorization), and the open connections of a ztunnel: listed by
//! `/debug/connections`, re-judged when policy changes (those now denied
//! are closed), and closed when a drain runs out of time.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use identity::Identity;
use model::{Connection, PeerAuthMode, Snapshot, Workload};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::telemetry::ConnRecord;

/// What an inbound connection was authorized on, to judge it again.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// `None`: plaintext.
    pub src_identity: Option<Identity>,
    pub src_ip: Ipv4Addr,
    /// The destination workload as it was when the connection was opened;
    /// re-judged as the new config knows it when it is still there.
    pub dst: Workload,
    pub dst_port: u16,
}

/// The outcome of judging one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy, or empty.
    pub policy: String,
    /// The access log's reason when refused.
    pub reason: String,
    /// A metrics reason code when refused.
    pub code: &'static str,
    /// AUDIT matches and dry-run outcomes, for the access log.
    pub note: String,
}

impl Authorized {
    /// Peer authentication first (a plaintext client of a STRICT workload
    /// is refused whatever the policies say), then authorization.
    pub fn judge(&self, snapshot: &Snapshot) -> Judgement {
        let dst = snapshot.workload(&self.dst.uid).unwrap_or(&self.dst);
        if self.src_identity.is_none() {
            let (mode, policy) = snapshot.peer_authentication(dst);
            if mode == PeerAuthMode::Strict {
                return Judgement {
                    allowed: false,
                    policy: policy.unwrap_or_default(),
                    reason: "plaintext refused: peer authentication is STRICT".into(),
                    code: "peer_authentication_strict",
                    note: String::new(),
                };
            }
        }
        let verdict = snapshot.authorize(&Connection {
            src_identity: self.src_identity.as_ref(),
            src_ip: self.src_ip,
            dst,
            dst_port: self.dst_port,
        });
        let mut notes = Vec::new();
        if !verdict.audited_by.is_empty() {
            notes.push(format!("audited by {}", verdict.audited_by.join(", ")));
        }
        if let Some(dry) = &verdict.dry_run {
            notes.push(format!("dry run: {}", dry.reason()));
        }
        Judgement {
            allowed: verdict.allowed(),
            policy: verdict.enforced.policy.clone().unwrap_or_default(),
            reason: if verdict.allowed() {
                String::new()
            } else {
                verdict.enforced.reason()
            },
            code: "policy_denied",
            note: notes.join("; "),
        }
    }
}

struct Open {
    record: ConnRecord,
    authorized: Option<Authorized>,
    close: CancellationToken,
    /// Why it was closed by us, if it was.
    closed_for: Arc<Mutex<Option<Closure>>>,
}

/// Why the registry closed a connection.
#[derive(Debug, Clone)]
struct Closure {
    reason: String,
    /// `namespace/name` of the policy that now refuses it, or empty.
    policy: String,
}

/// The registry of open connections.
#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("open", &self.lock().len())
            .finish()
    }
}

/// One open connection's entry; removed when dropped.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    registry: Arc<Connections>,
    close: CancellationToken,
    closed_for: Arc<Mutex<Option<Closure>>>,
}

impl Tracked {
    /// Resolves when the connection must be closed.
    pub async fn closed(&self) {
        self.close.cancelled().await;
    }

    /// The access log's reason for a copy that ended with `error`: why
    /// the registry closed it (policy change, drain deadline) when it did,
    /// naming in `record` the policy that now refuses it.
    pub fn close_reason(&self, record: &mut ConnRecord, error: impl std::fmt::Display) -> String {
        let closure = self
            .closed_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match closure {
            Some(closure) => {
                if !closure.policy.is_empty() {
                    record.policy = closure.policy;
                }
                closure.reason
            }
            None => error.to_string(),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// One line of `/debug/connections`.
#[derive(Debug, Serialize)]
pub struct ConnView {
    pub id: u64,
    #[serde(flatten)]
    pub record: ConnRecord,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn track(self: &Arc<Self>, record: ConnRecord, authorized: Option<Authorized>) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        let closed_for = Arc::new(Mutex::new(None));
        self.lock().insert(
            id,
            Open {
                record,
                authorized,
                close: close.clone(),
                closed_for: closed_for.clone(),
            },
        );
        Tracked {
            id,
            registry: self.clone(),
            close,
            closed_for,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn list(&self) -> Vec<ConnView> {
        let mut list: Vec<ConnView> = self
            .lock()
            .iter()
            .map(|(id, o)| ConnView {
                id: *id,
                record: o.record.clone(),
            })
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// Judges every authorized connection against `snapshot` and closes
    /// those it refuses. Returns how many were closed.
    pub fn reevaluate(&self, snapshot: &Snapshot) -> usize {
        let mut closed = 0;
        for open in self.lock().values() {
            let Some(authorized) = &open.authorized else {
                continue;
            };
            if open.close.is_cancelled() {
                continue;
            }
            let judgement = authorized.judge(snapshot);
            if !judgement.allowed {
                tracing::info!(
                    src = %open.record.src_addr,
                    dst = %open.record.dst_addr,
                    policy = %judgement.policy,
                    reason = %judgement.reason,
                    "closing connection after a policy change"
                );
                close(
                    open,
                    Closure {
                        reason: format!("policy changed: {}", judgement.reason),
                        policy: judgement.policy,
                    },
                );
                closed += 1;
            }
        }
        closed
    }

    /// Closes every open connection (a drain ran out of time).
    pub fn close_all(&self, reason: &str) {
        for open in self.lock().values() {
            close(
                open,
                Closure {
                    reason: reason.to_string(),
                    policy: String::new(),
                },
            );
        }
    }
}

fn close(open: &Open, closure: Closure) {
    *open
        .closed_for
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(closure);
    open.close.cancel();
}
