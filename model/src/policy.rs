//! L4 authorization policies and peer authentication, and how a connection
//! is judged against them.
//!
//! The semantics are Istio's, so policies written for Istio ambient read the
//! same here: any matching DENY denies; when no ALLOW policy selects the
//! workload everything else is allowed; otherwise an ALLOW must match.
//! AUDIT policies never change the decision, they mark it. A dry-run policy
//! is evaluated beside the enforced ones and its would-be outcome reported,
//! never enforced.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use identity::Identity;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::Workload;

/// Which workloads a policy applies to, together with its `selector`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyScope {
    /// The workloads of the policy's namespace.
    #[default]
    Namespace,
    /// Workloads of every namespace (Istio: a policy in the root namespace).
    Global,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Marks matching connections in the access log; decides nothing.
    Audit,
}

/// An L4 authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub scope: PolicyScope,
    /// Labels the selected workloads must all carry; empty selects every
    /// workload in scope.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub action: Action,
    /// Evaluated and reported, not enforced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// A connection matches the policy when it matches any rule. No rules:
    /// an ALLOW matches nothing (so it denies everything it selects), a DENY
    /// matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn selects(&self, workload: &Workload) -> bool {
        selects(self.scope, &self.namespace, &self.selector, workload)
    }

    fn matches(&self, conn: &Connection<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }
}

/// Matches when one of `from` (or any source when empty) and one of `to`
/// (or any destination when empty) match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<SourceMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<DestinationMatch>,
}

impl Rule {
    fn matches(&self, conn: &Connection<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn)))
            && (self.to.is_empty() || self.to.iter().any(|d| d.matches(conn)))
    }
}

/// Who the client is. Every field set must hold; a list matches when any
/// entry does; a `not…` list matches when no entry does. Principals,
/// namespaces and service accounts come from the client's certificate: a
/// plaintext client has none, so it never matches a positive list of them
/// and always matches a negative one (`notPrincipals: ["*"]` selects
/// plaintext clients).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceMatch {
    /// `<trust domain>/ns/<ns>/sa/<sa>` (a `spiffe://` prefix is accepted);
    /// `*` alone, as a prefix or as a suffix is a wildcard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// `<namespace>/<service account>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// The client's IP (the TCP peer), as CIDRs or single addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpBlock>,
}

impl SourceMatch {
    fn matches(&self, conn: &Connection<'_>) -> bool {
        let id = conn.src_identity;
        let principal = id.map(principal);
        let namespace = id.map(|i| i.namespace().to_string());
        let account = id.map(|i| format!("{}/{}", i.namespace(), i.service_account()));
        let ip = conn.src_ip;
        let in_blocks = |blocks: &[IpBlock]| blocks.iter().any(|b| b.0.contains(&ip));
        either(&self.principals, &self.not_principals, principal.as_deref())
            && either(&self.namespaces, &self.not_namespaces, namespace.as_deref())
            && either(
                &self.service_accounts,
                &self.not_service_accounts,
                account.as_deref(),
            )
            && (self.ip_blocks.is_empty() || in_blocks(&self.ip_blocks))
            && !in_blocks(&self.not_ip_blocks)
    }

    /// Every pattern, for validation.
    fn patterns(&self) -> impl Iterator<Item = &String> {
        self.principals
            .iter()
            .chain(&self.not_principals)
            .chain(&self.namespaces)
            .chain(&self.not_namespaces)
            .chain(&self.service_accounts)
            .chain(&self.not_service_accounts)
    }
}

/// An IPv4 network, written as a CIDR or as a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpBlock(pub Ipv4Net);

impl TryFrom<String> for IpBlock {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse::<Ipv4Net>()
            .or_else(|_| s.parse::<Ipv4Addr>().map(Ipv4Net::from))
            .map(Self)
            .map_err(|_| format!("{s:?} is not an IPv4 address or CIDR"))
    }
}

impl From<IpBlock> for String {
    fn from(b: IpBlock) -> Self {
        b.0.to_string()
    }
}

/// Where the connection goes (the destination workload's port).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
}

impl DestinationMatch {
    fn matches(&self, conn: &Connection<'_>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&conn.dst_port))
            && !self.not_ports.contains(&conn.dst_port)
    }
}

/// A positive and a negative list over one attribute that may be absent.
fn either(yes: &[String], no: &[String], value: Option<&str>) -> bool {
    let any = |list: &[String], v: &str| list.iter().any(|p| pattern_matches(p, v));
    let positive = yes.is_empty() || value.is_some_and(|v| any(yes, v));
    let negative = no.is_empty() || value.is_none_or(|v| !any(no, v));
    positive && negative
}

/// `*`, `prefix*`, `*suffix` or an exact value.
fn pattern_matches(pattern: &str, value: &str) -> bool {
    let pattern = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

/// Istio's principal form: the SPIFFE ID without its scheme.
fn principal(id: &Identity) -> String {
    let s = id.to_string();
    s.strip_prefix("spiffe://").unwrap_or(&s).to_string()
}

/// Checks one principal, namespace or service account pattern; the reason
/// names it. Public so the controller checks each entry as this model does.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let inner = pattern.trim_start_matches('*').trim_end_matches('*');
    if pattern.is_empty() {
        Err("empty match value".into())
    } else if pattern != "*" && inner.contains('*') {
        Err(format!(
            "{pattern:?}: `*` is allowed only alone, at the start or at the end"
        ))
    } else if pattern.len() > 1 && pattern.starts_with('*') && pattern.ends_with('*') {
        Err(format!("{pattern:?}: `*` at both ends"))
    } else {
        Ok(())
    }
}

/// Checks one `<namespace>/<service account>` entry (a pattern with exactly
/// one `/`).
pub fn validate_service_account(sa: &str) -> Result<(), String> {
    validate_pattern(sa)?;
    if sa.split('/').count() != 2 {
        return Err(format!("{sa:?} is not <namespace>/<name>"));
    }
    Ok(())
}

impl AuthorizationPolicy {
    /// Checks what serde cannot; the reason names the offending value.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err("name and namespace must not be empty".into());
        }
        for rule in &self.rules {
            for source in &rule.from {
                for p in source.patterns() {
                    validate_pattern(p)?;
                }
                for sa in source
                    .service_accounts
                    .iter()
                    .chain(&source.not_service_accounts)
                {
                    validate_service_account(sa).map_err(|e| format!("service account {e}"))?;
                }
            }
            for dst in &rule.to {
                if dst.ports.iter().chain(&dst.not_ports).any(|&p| p == 0) {
                    return Err("0 is not a port".into());
                }
            }
        }
        Ok(())
    }
}

fn selects(
    scope: PolicyScope,
    namespace: &str,
    selector: &BTreeMap<String, String>,
    workload: &Workload,
) -> bool {
    (scope == PolicyScope::Global || namespace == workload.namespace)
        && selector
            .iter()
            .all(|(k, v)| workload.labels.get(k) == Some(v))
}

/// Whether a workload accepts plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerAuthMode {
    /// Mutual TLS (HBONE) and plaintext both accepted.
    #[default]
    Permissive,
    /// Only mutual TLS; plaintext connections are refused.
    Strict,
    /// The next less specific setting decides: a port's falls back to its
    /// policy's mode, a policy's to the namespace's, then the mesh's, then
    /// PERMISSIVE (Istio's `UNSET`).
    Unset,
}

impl fmt::Display for PeerAuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
            Self::Unset => "UNSET",
        })
    }
}

/// Istio's PeerAuthentication: the most specific one applies — a selector
/// in the workload's namespace, then the namespace's, then a global one;
/// one that leaves a port or its mode `UNSET` hands the decision to the
/// next. Ties go to the first by name, so every data plane decides the
/// same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub scope: PolicyScope,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    pub mode: PeerAuthMode,
    /// Modes of single ports of the selected workloads (the port the
    /// application listens on), over `mode`. Only with a selector, as in
    /// Istio.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u16, PeerAuthMode>,
}

impl PeerAuthentication {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn selects(&self, workload: &Workload) -> bool {
        selects(self.scope, &self.namespace, &self.selector, workload)
    }

    /// What it sets for `port`: the port's own mode, else the policy's;
    /// `None` when both are `UNSET`.
    pub(crate) fn mode_for(&self, port: u16) -> Option<PeerAuthMode> {
        [self.port_level_mtls.get(&port).copied(), Some(self.mode)]
            .into_iter()
            .flatten()
            .find(|m| *m != PeerAuthMode::Unset)
    }

    /// How specific it is for `workload`, when it applies at all.
    pub(crate) fn rank(&self, workload: &Workload) -> Option<u8> {
        if !self.selects(workload) {
            return None;
        }
        Some(match (self.scope, self.selector.is_empty()) {
            (PolicyScope::Namespace, false) => 0,
            (PolicyScope::Namespace, true) => 1,
            (PolicyScope::Global, _) => 2,
        })
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err("name and namespace must not be empty".into());
        }
        if self.scope == PolicyScope::Global && !self.selector.is_empty() {
            return Err("a Global peer authentication cannot have a selector".into());
        }
        if !self.port_level_mtls.is_empty() && self.selector.is_empty() {
            return Err("portLevelMtls needs a selector".into());
        }
        if self.port_level_mtls.contains_key(&0) {
            return Err("portLevelMtls: port 0 is not a port".into());
        }
        Ok(())
    }
}

/// One connection to judge: who is calling, from where, to which
/// workload's port.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// `None`: plaintext, no certificate.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: Ipv4Addr,
    pub dst: &'a Workload,
    pub dst_port: u16,
}

/// An outcome and the policy behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided: the matching DENY, or
    /// the matching ALLOW. `None` when no policy selected the workload, or
    /// when ALLOW policies selected it and none matched.
    pub policy: Option<String>,
}

impl Decision {
    /// The access log's reason.
    pub fn reason(&self) -> String {
        match (self.allowed, &self.policy) {
            (true, Some(p)) => format!("allowed by {p}"),
            (true, None) => "allowed: no ALLOW policy selects the workload".into(),
            (false, Some(p)) => format!("denied by {p}"),
            (false, None) => "denied: no ALLOW policy matched".into(),
        }
    }
}

/// The full judgement of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// What is enforced (dry-run policies left out).
    pub enforced: Decision,
    /// AUDIT policies that matched.
    pub audited_by: Vec<String>,
    /// With dry-run policies counted as enforced, when any selects the
    /// workload.
    pub dry_run: Option<Decision>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.enforced.allowed
    }
}

/// Judges `conn` against the policies that select its destination.
pub(crate) fn authorize<'a>(
    policies: impl Iterator<Item = &'a AuthorizationPolicy> + Clone,
    conn: &Connection<'_>,
) -> Verdict {
    let selected = policies.filter(|p| p.selects(conn.dst));
    let enforced = decide(selected.clone().filter(|p| !p.dry_run), conn);
    let dry_run = selected
        .clone()
        .any(|p| p.dry_run)
        .then(|| decide(selected.clone(), conn));
    let audited_by = selected
        .filter(|p| p.action == Action::Audit && !p.dry_run && p.matches(conn))
        .map(AuthorizationPolicy::key)
        .collect();
    Verdict {
        enforced,
        audited_by,
        dry_run,
    }
}

fn decide<'a>(
    policies: impl Iterator<Item = &'a AuthorizationPolicy> + Clone,
    conn: &Connection<'_>,
) -> Decision {
    let of = |action| policies.clone().filter(move |p| p.action == action);
    if let Some(deny) = of(Action::Deny).find(|p| p.matches(conn)) {
        return Decision {
            allowed: false,
            policy: Some(deny.key()),
        };
    }
    let mut allows = of(Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision {
            allowed: true,
            policy: None,
        };
    }
    match allows.find(|p| p.matches(conn)) {
        Some(allow) => Decision {
            allowed: true,
            policy: Some(allow.key()),
        },
        None => Decision {
            allowed: false,
            policy: None,
        },
    }
}
