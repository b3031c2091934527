//! Ambit's policy resources into the mesh model, with the status that says
//! whether and how each is enforced. Nothing is silently dropped: a part
//! that is invalid or that ztunnel cannot check is enforced more strictly
//! (fail closed, ADR 0023) or reported as not enforced, with the reason.

use std::collections::BTreeMap;

use kube::ResourceExt;
use model::policy::{
    DestinationMatch, IpBlock, PolicyScope, Rule, SourceMatch, validate_pattern,
    validate_service_account,
};

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

/// A peer authentication in the root namespace is mesh-wide only without a
/// selector: with one, it is about the root namespace's own workloads.
fn scope(namespace: &str, has_selector: bool) -> PolicyScope {
    if namespace == ROOT_NAMESPACE && !has_selector {
        PolicyScope::Global
    } else {
        PolicyScope::Namespace
    }
}

/// An authorization policy in the root namespace applies across the mesh,
/// to the workloads its selector picks in every namespace (as in Istio).
fn authorization_scope(namespace: &str) -> PolicyScope {
    if namespace == ROOT_NAMESPACE {
        PolicyScope::Global
    } else {
        PolicyScope::Namespace
    }
}

/// Translates one AuthorizationPolicy for ztunnels.
///
/// A part that cannot be enforced as written (an invalid value, a field
/// ztunnel cannot check) never lets more through than the valid policy
/// would: an ALLOW (or AUDIT) rule with such a part is left out, so it
/// matches nothing, while the policy stays and its workloads still need an
/// ALLOW to match; a DENY rule is enforced without that part, so it denies
/// more. Dropping the whole policy instead would open its workloads when it
/// was their only ALLOW.
pub fn authorization_policy(ap: &AuthorizationPolicy) -> Translated<model::AuthorizationPolicy> {
    let Some(namespace) = ap.namespace() else {
        return refused("InvalidSpec", "the policy has no namespace".into());
    };
    let spec = &ap.spec;
    if spec.selector.is_some() && !spec.target_refs.is_empty() {
        return both_selector_and_target_refs(ap, namespace);
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
    let mut invalid = Vec::new();
    let mut notes = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let t = translate_rule(rule);
        if t.invalid.is_empty() && t.l7.is_empty() {
            rules.push(t.rule);
            continue;
        }
        invalid.extend(
            t.invalid
                .iter()
                .map(|v| (v.reason, format!("rule {i}: {}", v.message))),
        );
        notes.push(format!("rule {i}: {}", t.fail_closed_note(spec.action)));
        if spec.action == Action::Deny {
            rules.push(t.rule);
        }
    }
    let policy = model_policy(ap, namespace, rules);
    // Every value was checked above: only a nameless object (one not from
    // an API server) fails here, and it has no key to be enforced under.
    if let Err(reason) = policy.validate() {
        return refused("InvalidSpec", reason);
    }
    let (accepted, enforced) = conditions(&invalid, &notes);
    Translated {
        policy: Some(policy),
        accepted,
        enforced,
    }
}

/// `Accepted` from the invalid values (reason of the first, every one
/// named), `Enforced` from the notes on rules not enforced as written.
fn conditions(invalid: &[(&str, String)], notes: &[String]) -> (Condition, Condition) {
    let accepted = match invalid.first() {
        None => accepted(),
        Some((reason, _)) => {
            let all: Vec<_> = invalid.iter().map(|(_, m)| m.as_str()).collect();
            Condition::new("Accepted", false, reason, all.join("; "))
        }
    };
    let enforced = if notes.is_empty() {
        Condition::new("Enforced", true, "Enforced", "enforced by ztunnel")
    } else if invalid.is_empty() {
        Condition::new("Enforced", false, "L7RulesNeedWaypoint", notes.join("; "))
    } else {
        Condition::new("Enforced", false, "EnforcedFailClosed", notes.join("; "))
    };
    (accepted, enforced)
}

/// The model policy for `ap`'s selector and action, with `rules`.
fn model_policy(
    ap: &AuthorizationPolicy,
    namespace: String,
    rules: Vec<Rule>,
) -> model::AuthorizationPolicy {
    let spec = &ap.spec;
    model::AuthorizationPolicy {
        name: ap.name_any(),
        scope: authorization_scope(&namespace),
        namespace,
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
    }
}

/// Which of the two was meant is unknown, so the selected workloads get the
/// strictest reading: an ALLOW (or AUDIT) that matches nothing, a DENY of
/// every connection.
fn both_selector_and_target_refs(
    ap: &AuthorizationPolicy,
    namespace: String,
) -> Translated<model::AuthorizationPolicy> {
    let problem = "selector and targetRefs cannot both be set";
    let (rules, how) = match ap.spec.action {
        Action::Deny => (vec![Rule::default()], "denies every connection"),
        Action::Allow | Action::Audit => (Vec::new(), "matches nothing"),
    };
    Translated {
        policy: Some(model_policy(ap, namespace, rules)),
        accepted: Condition::new("Accepted", false, "InvalidSpec", problem),
        enforced: Condition::new(
            "Enforced",
            false,
            "EnforcedFailClosed",
            format!("{problem}; on the selected workloads the policy {how}"),
        ),
    }
}

/// One invalid value of a rule.
struct Invalid {
    /// The `Accepted` reason: `InvalidPort`, `InvalidIpBlock` or
    /// `InvalidSpec`.
    reason: &'static str,
    /// Names the field and the value.
    message: String,
    /// In a `not…` list, where leaving the entry out only widens the rule.
    negated: bool,
}

/// One rule in its widest safe form: every invalid value and every field
/// ztunnel cannot check taken out, so it matches at least what was written
/// (a DENY enforces this form; an ALLOW with anything taken out drops it).
struct TranslatedRule {
    rule: Rule,
    invalid: Vec<Invalid>,
    /// Fields ztunnel cannot check, by name, each once.
    l7: Vec<&'static str>,
}

impl TranslatedRule {
    /// How the rule is enforced instead of as written.
    fn fail_closed_note(&self, action: Action) -> String {
        let l7 = self.l7.join(", ");
        if self.invalid.is_empty() {
            return match action {
                Action::Deny => {
                    format!("{l7} not checked without a waypoint; denied on its other fields")
                }
                Action::Allow | Action::Audit => {
                    format!("{l7} need a waypoint; the rule matches nothing without one")
                }
            };
        }
        let mut parts: Vec<String> = self
            .invalid
            .iter()
            .map(|v| match (action, v.negated) {
                (Action::Deny, false) => format!("{} (the field is not checked)", v.message),
                (Action::Deny, true) => format!("{} (the entry is left out)", v.message),
                (Action::Allow | Action::Audit, _) => v.message.clone(),
            })
            .collect();
        if !self.l7.is_empty() {
            parts.push(format!("{l7} need a waypoint"));
        }
        parts.push(match action {
            Action::Deny => "denied on its other fields".into(),
            Action::Allow | Action::Audit => "the rule matches nothing".into(),
        });
        parts.join("; ")
    }
}

fn translate_rule(rule: &crd::Rule) -> TranslatedRule {
    let mut invalid = Vec::new();
    let mut l7 = Vec::new();
    let mut note_l7 = |fields: Vec<&'static str>| {
        for f in fields {
            if !l7.contains(&f) {
                l7.push(f);
            }
        }
    };
    if !rule.when.is_empty() {
        note_l7(vec!["when"]);
    }
    let mut from = Vec::new();
    for f in &rule.from {
        note_l7(f.source.l7_fields());
        from.push(source(&f.source, &mut invalid));
    }
    let mut to = Vec::new();
    for op in rule.to.iter().map(|t| &t.operation) {
        note_l7(op.l7_fields());
        to.push(DestinationMatch {
            ports: list("ports", &op.ports, port, &mut invalid),
            not_ports: list("notPorts", &op.not_ports, port, &mut invalid),
        });
    }
    TranslatedRule {
        rule: Rule { from, to },
        invalid,
        l7,
    }
}

/// Translates one PeerAuthentication. Port-level modes need a selector
/// (Istio's contract, and the CRD's validation rule); where the API server
/// let one through without, they are dropped, and a STRICT among them makes
/// the whole policy STRICT rather than leave that port open.
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
    let mut mode = model_mode(pa.spec.mtls.mode);
    let mut problems = Vec::new();
    let mut port_level_mtls = BTreeMap::new();
    for (key, mtls) in &pa.spec.port_level_mtls {
        match key.parse::<u16>() {
            Ok(port) if port != 0 => {
                port_level_mtls.insert(port, model_mode(mtls.mode));
            }
            _ => problems.push(format!("portLevelMtls: {key:?} is not a port (1-65535)")),
        }
    }
    let mut fail_closed = None;
    if selector.is_empty() && !pa.spec.port_level_mtls.is_empty() {
        problems.push("portLevelMtls needs a selector".into());
        let strict_port = port_level_mtls
            .values()
            .any(|m| *m == model::PeerAuthMode::Strict);
        if strict_port && mode != model::PeerAuthMode::Strict {
            mode = model::PeerAuthMode::Strict;
            fail_closed = Some("its STRICT ports make the whole policy STRICT");
        }
        port_level_mtls.clear();
    }
    let policy = model::PeerAuthentication {
        name: pa.name_any(),
        namespace: namespace.clone(),
        scope: scope(&namespace, !selector.is_empty()),
        selector,
        mode,
        port_level_mtls,
    };
    let (accepted, enforced) = if problems.is_empty() {
        (
            accepted(),
            Condition::new("Enforced", true, "Enforced", "enforced by ztunnel"),
        )
    } else {
        let problem = problems.join("; ");
        let enforced = match fail_closed {
            Some(how) => Condition::new(
                "Enforced",
                false,
                "EnforcedFailClosed",
                format!("{problem}; {how}"),
            ),
            None => Condition::new(
                "Enforced",
                true,
                "Enforced",
                format!("enforced by ztunnel without the invalid entries: {problem}"),
            ),
        };
        (
            Condition::new("Accepted", false, "InvalidSpec", problem),
            enforced,
        )
    };
    Translated {
        policy: Some(policy),
        accepted,
        enforced,
    }
}

fn model_mode(mode: MtlsMode) -> model::PeerAuthMode {
    match mode {
        MtlsMode::Strict => model::PeerAuthMode::Strict,
        MtlsMode::Permissive => model::PeerAuthMode::Permissive,
        MtlsMode::Unset => model::PeerAuthMode::Unset,
    }
}

/// The valid entries of one list, each invalid one recorded. A list with an
/// invalid entry comes out wider than written: a positive list empty (any
/// value), a `not…` list without the invalid entries.
fn list<T>(
    field: &'static str,
    values: &[String],
    parse: impl Fn(&str) -> Parsed<T>,
    invalid: &mut Vec<Invalid>,
) -> Vec<T> {
    let negated = field.starts_with("not");
    let mut out = Vec::new();
    let mut any_invalid = false;
    for value in values {
        match parse(value) {
            Ok(v) => out.push(v),
            Err((reason, e)) => {
                any_invalid = true;
                invalid.push(Invalid {
                    reason,
                    message: describe(field, value, &e),
                    negated,
                });
            }
        }
    }
    if any_invalid && !negated {
        out.clear();
    }
    out
}

/// `<field> "<value>" <problem>`, whether or not `reason` names the value.
fn describe(field: &str, value: &str, reason: &str) -> String {
    let quoted = format!("{value:?}");
    match reason.strip_prefix(&quoted) {
        Some(rest) => format!("{field} {quoted}{rest}"),
        None => format!("{field} {quoted}: {reason}"),
    }
}

/// A value, or the `Accepted` reason and why it is invalid.
type Parsed<T> = Result<T, (&'static str, String)>;

fn port(p: &str) -> Parsed<u16> {
    match p.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(("InvalidPort", format!("{p:?} is not a port"))),
    }
}

fn ip_block(b: &str) -> Parsed<IpBlock> {
    IpBlock::try_from(b.to_string()).map_err(|e| ("InvalidIpBlock", e))
}

fn pattern(p: &str) -> Parsed<String> {
    validate_pattern(p)
        .map(|()| p.to_string())
        .map_err(|e| ("InvalidSpec", e))
}

fn service_account(sa: &str) -> Parsed<String> {
    validate_service_account(sa)
        .map(|()| sa.to_string())
        .map_err(|e| ("InvalidSpec", e))
}

fn source(s: &crd::Source, invalid: &mut Vec<Invalid>) -> SourceMatch {
    SourceMatch {
        principals: list("principals", &s.principals, pattern, invalid),
        not_principals: list("notPrincipals", &s.not_principals, pattern, invalid),
        namespaces: list("namespaces", &s.namespaces, pattern, invalid),
        not_namespaces: list("notNamespaces", &s.not_namespaces, pattern, invalid),
        service_accounts: list(
            "serviceAccounts",
            &s.service_accounts,
            service_account,
            invalid,
        ),
        not_service_accounts: list(
            "notServiceAccounts",
            &s.not_service_accounts,
            service_account,
            invalid,
        ),
        ip_blocks: list("ipBlocks", &s.ip_blocks, ip_block, invalid),
        not_ip_blocks: list("notIpBlocks", &s.not_ip_blocks, ip_block, invalid),
    }
}
