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
        let dst = match snapshot.workload(&self.dst.uid) {
            Some(dst) => dst,
            // Enrolled before the config knows it: its labels are unknown,
            // so a policy that selects by label can be judged neither way.
            None => match snapshot
                .label_selected_policy(&self.dst.namespace, self.src_identity.is_none())
            {
                Some(policy) => {
                    return Judgement {
                        allowed: false,
                        reason: format!(
                            "the destination pod is not in the mesh config yet, and {policy} selects workloads by label"
                        ),
                        policy,
                        code: "destination_unknown",
                        note: String::new(),
                    };
                }
                None => &self.dst,
            },
        };
        if self.src_identity.is_none() {
            let (mode, policy) = snapshot.peer_authentication(dst, self.dst_port);
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
    /// Set by [`Connections::close_all`]: a connection registered later
    /// (it was still connecting) is closed at once, so that it does not
    /// outlive the drain.
    closing_for: Mutex<Option<String>>,
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

impl Tracked {
    /// Judges this connection against `snapshot`, closing it if refused.
    pub fn judge_again(&self, snapshot: &Snapshot) {
        if let Some(open) = self.registry.lock().get(&self.id) {
            rejudge(open, snapshot);
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
        let open = Open {
            record,
            authorized,
            close: close.clone(),
            closed_for: closed_for.clone(),
        };
        let mut registry = self.lock();
        // Read under the registry's lock, which `close_all` holds while it
        // sets it: every connection is closed by one or the other.
        let closing = self
            .closing_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(reason) = closing {
            close_for(&open, reason);
        }
        registry.insert(id, open);
        drop(registry);
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
        self.lock()
            .values()
            .filter(|open| rejudge(open, snapshot))
            .count()
    }

    /// Closes every open connection, and every one registered from now
    /// on (a drain ran out of time).
    pub fn close_all(&self, reason: &str) {
        let registry = self.lock();
        *self
            .closing_for
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason.to_string());
        for open in registry.values() {
            close_for(open, reason.to_string());
        }
    }
}

/// Judges one open connection against `snapshot` and closes it if
/// refused; true when it closed it.
fn rejudge(open: &Open, snapshot: &Snapshot) -> bool {
    let Some(authorized) = &open.authorized else {
        return false;
    };
    if open.close.is_cancelled() {
        return false;
    }
    let judgement = authorized.judge(snapshot);
    if judgement.allowed {
        return false;
    }
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
    true
}

/// Closes `open` for `reason`, with no policy to name.
fn close_for(open: &Open, reason: String) {
    close(
        open,
        Closure {
            reason,
            policy: String::new(),
        },
    );
}

fn close(open: &Open, closure: Closure) {
    *open
        .closed_for
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(closure);
    open.close.cancel();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use std::time::Duration;

    use super::*;
    use crate::telemetry::Direction;

    const WORKLOADS: &str = "
workloads:
  - {uid: echo, name: echo-0, namespace: demo, ips: [10.0.0.1]}
";
    const DENY_ALL: &str = "
authorizationPolicies:
  - {name: deny-all, namespace: demo, action: DENY, rules: [{}]}
";

    fn snapshot(policies: &str, version: u64) -> Snapshot {
        let config = serde_yaml::from_str(&format!("{WORKLOADS}{policies}")).unwrap();
        Snapshot::new(config, version).unwrap()
    }

    /// A destination the config does not know yet has no labels: a policy
    /// that selects by label cannot be judged, so the connection is refused
    /// rather than judged as if it were not selected.
    #[test]
    fn a_destination_unknown_to_the_config_is_refused_while_label_policies_apply() {
        let selecting = "
authorizationPolicies:
  - {name: deny-echo, namespace: demo, selector: {app: echo}, action: DENY, rules: [{}]}
";
        let snap = snapshot(selecting, 1);
        let mut stranger = snap.workload("echo").unwrap().clone();
        stranger.uid = "new-pod".into();
        stranger.labels.clear();
        let judge = |snap: &Snapshot| {
            Authorized {
                src_identity: None,
                src_ip: Ipv4Addr::new(10, 0, 0, 9),
                dst: stranger.clone(),
                dst_port: 8080,
            }
            .judge(snap)
        };
        let judgement = judge(&snap);
        assert!(!judgement.allowed, "{judgement:?}");
        assert_eq!(judgement.policy, "demo/deny-echo");
        assert_eq!(judgement.code, "destination_unknown");
        // Namespace-wide policies need no labels: judged as usual.
        assert!(judge(&snapshot("", 2)).allowed);
        assert!(!judge(&snapshot(DENY_ALL, 3)).allowed);
    }

    /// Only what could decide the connection makes an unknown destination
    /// unjudgeable: not a dry-run or AUDIT policy, and not peer
    /// authentication when the client proved an identity.
    #[test]
    fn an_unknown_destination_is_judged_past_policies_that_decide_nothing() {
        let snap = snapshot(
            "
authorizationPolicies:
  - {name: would-deny, namespace: demo, selector: {app: echo}, action: DENY, dryRun: true, rules: [{}]}
  - {name: audit-echo, namespace: demo, selector: {app: echo}, action: AUDIT, rules: [{}]}
peerAuthentications:
  - {name: strict-echo, namespace: demo, selector: {app: echo}, mode: STRICT}
",
            1,
        );
        let mut stranger = snap.workload("echo").unwrap().clone();
        stranger.uid = "new-pod".into();
        stranger.labels.clear();
        let judge = |src_identity: Option<Identity>| {
            Authorized {
                src_identity,
                src_ip: Ipv4Addr::new(10, 0, 0, 9),
                dst: stranger.clone(),
                dst_port: 8080,
            }
            .judge(&snap)
        };
        let client = Identity::parse("spiffe://cluster.local/ns/demo/sa/sleep").unwrap();
        let judgement = judge(Some(client));
        assert!(judgement.allowed, "{judgement:?}");
        // A plaintext client: the label-selected STRICT may apply.
        let judgement = judge(None);
        assert!(!judgement.allowed, "{judgement:?}");
        assert_eq!(judgement.policy, "demo/strict-echo");
        assert_eq!(judgement.code, "destination_unknown");
    }

    /// A connection judged on an older config than the current one (a
    /// policy change landed while it was being connected, and was
    /// re-evaluated before it was registered) is closed by judging it again.
    #[tokio::test]
    async fn judging_again_closes_a_connection_the_new_config_denies() {
        let before = snapshot("", 1);
        let after = snapshot(DENY_ALL, 2);
        let registry = Arc::new(Connections::default());
        let authorized = Authorized {
            src_identity: None,
            src_ip: Ipv4Addr::new(10, 0, 0, 9),
            dst: before.workload("echo").unwrap().clone(),
            dst_port: 8080,
        };
        assert!(authorized.judge(&before).allowed);
        let record = ConnRecord::new(
            Direction::Inbound,
            "10.0.0.9:40000".parse().unwrap(),
            "10.0.0.1:8080".parse().unwrap(),
        );
        let tracked = registry.track(record.clone(), Some(authorized));
        // Re-evaluation of the new config already ran: nothing is closed.
        tracked.judge_again(&before);
        let open = tokio::time::timeout(Duration::from_millis(50), tracked.closed()).await;
        assert!(open.is_err(), "closed although still allowed");

        tracked.judge_again(&after);
        tokio::time::timeout(Duration::from_secs(1), tracked.closed())
            .await
            .expect("not closed after the new config denies it");
        let mut record = record;
        let reason = tracked.close_reason(&mut record, "copy ended");
        assert!(reason.starts_with("policy changed: "), "{reason}");
        assert_eq!(record.policy, "demo/deny-all");
    }

    /// At the drain deadline every connection is closed, including one
    /// that was still connecting and registers only afterwards.
    #[tokio::test]
    async fn connections_registered_after_close_all_are_closed_at_once() {
        let registry = Arc::new(Connections::default());
        let record = ConnRecord::new(
            Direction::Outbound,
            "10.0.0.9:40000".parse().unwrap(),
            "10.0.0.1:8080".parse().unwrap(),
        );
        let before = registry.track(record.clone(), None);
        let open = tokio::time::timeout(Duration::from_millis(50), before.closed()).await;
        assert!(open.is_err(), "closed before the drain deadline");
        registry.close_all("ztunnel shutting down");
        let after = registry.track(record.clone(), None);
        for tracked in [&before, &after] {
            tokio::time::timeout(Duration::from_secs(1), tracked.closed())
                .await
                .expect("not closed");
            let mut record = record.clone();
            assert_eq!(
                tracked.close_reason(&mut record, "copy ended"),
                "ztunnel shutting down"
            );
        }
    }
}
