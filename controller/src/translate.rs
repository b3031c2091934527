//! Ambit's policy resources into the mesh model, with the status that says
//! whether and how each is enforced. Nothing is silently dropped: a part
//! ztunnel cannot check is either enforced more strictly (fail closed) or
//! reported as not enforced, with the reason.

use kube::ResourceExt;
use model::policy::{DestinationMatch, IpBlock, PolicyScope, Rule, SourceMatch};

use crate::crd::{self, Action, AuthorizationPolicy, Condition, MtlsMode, PeerAuthentication};

/// The namespace whose selector-less policies apply to the whole mesh
/// (Istio's root namespace).
pub const ROOT_NAMESPACE: &str = "ambit-system";

/// A translated policy: what ztunnels enforce (if anything) and the
/// conditions to write back.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated<T> {
    pub policy: Option<T>,
    pub accepted: Condition,
    pub enforced: Condition,
}

fn refused<T>(reason: &str, message: String) -> Translated<T> {
    Translated {
        policy: None,
        accepted: Condition::new("Accepted", false, reason, message.clone()),
        enforced: Condition::new("Enforced", false, reason, message),
    }
}

fn accepted() -> Condition {
    Condition::new("Accepted", true, "Accepted", "valid")
}

fn scope(namespace: &str, has_selector: bool) -> PolicyScope {
    if namespace == ROOT_NAMESPACE && !has_selector {
        PolicyScope::Global
    } else {
        PolicyScope::Namespace
    }
}

/// Translates one AuthorizationPolicy for ztunnels.
pub fn authorization_policy(ap: &AuthorizationPolicy) -> Translated<model::AuthorizationPolicy> {
    let Some(namespace) = ap.namespace() else {
        return refused("InvalidSpec", "the policy has no namespace".into());
    };
    let spec = &ap.spec;
    if spec.selector.is_some() && !spec.target_refs.is_empty() {
        return refused(
            "InvalidSpec",
            "selector and targetRefs cannot both be set".into(),
        );
    }
    if !spec.target_refs.is_empty() {
        // Attached to a waypoint: ztunnels leave it alone.
        return Translated {
            policy: None,
            accepted: accepted(),
            enforced: Condition::new(
                "Enforced",
                false,
                "WaypointNotAvailable",
                "policies attached with targetRefs are enforced by waypoints, and waypoints do not enforce policies yet (a waypoint Gateway only deploys the proxy and routes traffic through it)",
            ),
        };
    }
    let mut rules = Vec::new();
    let mut l7_notes = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let mut to = Vec::new();
        let mut l7 = Vec::new();
        for op in rule.to.iter().map(|t| &t.operation) {
            l7.extend(op.l7_fields());
            match (ports(&op.ports), ports(&op.not_ports)) {
                (Ok(ports), Ok(not_ports)) => to.push(DestinationMatch { ports, not_ports }),
                (Err(e), _) | (_, Err(e)) => {
                    return refused("InvalidPort", format!("rule {i}: {e}"));
                }
            }
        }
        let from = match rule.from.iter().map(|f| source(&f.source)).collect() {
            Ok(from) => from,
            Err(e) => return refused("InvalidIpBlock", format!("rule {i}: {e}")),
        };
        let translated = Rule { from, to };
        if l7.is_empty() {
            rules.push(translated);
            continue;
        }
        l7.dedup();
        match spec.action {
            // Checking only the L4 part denies more than asked: safe.
            Action::Deny => {
                l7_notes.push(format!(
                    "rule {i}: {} not checked without a waypoint; denied on its other fields",
                    l7.join(", ")
                ));
                rules.push(translated);
            }
            // Allowing on the L4 part would allow more than asked: the
            // rule is left out, so it allows nothing (fail closed).
            Action::Allow | Action::Audit => l7_notes.push(format!(
                "rule {i}: {} need a waypoint; the rule matches nothing without one",
                l7.join(", ")
            )),
        }
    }
    let policy = model::AuthorizationPolicy {
        name: ap.name_any(),
        namespace: namespace.clone(),
        scope: scope(&namespace, spec.selector.is_some()),
        selector: spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default(),
        action: match spec.action {
            Action::Allow => model::Action::Allow,
            Action::Deny => model::Action::Deny,
            Action::Audit => model::Action::Audit,
        },
        dry_run: spec.dry_run,
        rules,
    };
    if let Err(reason) = policy.validate() {
        return refused("InvalidSpec", reason);
    }
    let enforced = if l7_notes.is_empty() {
        Condition::new("Enforced", true, "Enforced", "enforced by ztunnel")
    } else {
        Condition::new(
            "Enforced",
            false,
            "L7RulesNeedWaypoint",
            l7_notes.join("; "),
        )
    };
    Translated {
        policy: Some(policy),
        accepted: accepted(),
        enforced,
    }
}

/// Translates one PeerAuthentication.
pub fn peer_authentication(pa: &PeerAuthentication) -> Translated<model::PeerAuthentication> {
    let Some(namespace) = pa.namespace() else {
        return refused("InvalidSpec", "the policy has no namespace".into());
    };
    let selector = pa
        .spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default();
    let policy = model::PeerAuthentication {
        name: pa.name_any(),
        namespace: namespace.clone(),
        scope: scope(&namespace, !selector.is_empty()),
        selector,
        mode: match pa.spec.mtls.mode {
            MtlsMode::Strict => model::PeerAuthMode::Strict,
            MtlsMode::Permissive => model::PeerAuthMode::Permissive,
        },
    };
    Translated {
        policy: Some(policy),
        accepted: accepted(),
        enforced: Condition::new("Enforced", true, "Enforced", "enforced by ztunnel"),
    }
}

fn ports(list: &[String]) -> Result<Vec<u16>, String> {
    list.iter()
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!("{p:?} is not a port")),
        })
        .collect()
}

fn source(s: &crd::Source) -> Result<SourceMatch, String> {
    let blocks = |list: &[String]| -> Result<Vec<IpBlock>, String> {
        list.iter().map(|b| IpBlock::try_from(b.clone())).collect()
    };
    Ok(SourceMatch {
        principals: s.principals.clone(),
        not_principals: s.not_principals.clone(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
        service_accounts: s.service_accounts.clone(),
        not_service_accounts: s.not_service_accounts.clone(),
        ip_blocks: blocks(&s.ip_blocks)?,
        not_ip_blocks: blocks(&s.not_ip_blocks)?,
    })
}
