//! Checks the controller's RBAC in `manifests/controller.yaml` against the
//! requests it really made of the fake API server: every request must be
//! allowed by the ClusterRole, or by the Role in the controller's
//! namespace. A watcher, a write or a subresource added without its
//! permission fails the test that exercises it.

use serde_yaml::Value;

/// One rule: API groups × resources × verbs.
#[derive(Debug)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

fn rules(doc: &Value) -> Vec<Rule> {
    doc["rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|r| Rule {
            groups: strings(&r["apiGroups"]),
            resources: strings(&r["resources"]),
            verbs: strings(&r["verbs"]),
        })
        .collect()
}

fn allows(rules: &[Rule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.groups.iter().any(|g| g == group)
            && r.resources.iter().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

/// `(group, resource or resource/subresource, namespace, verbs)` of one
/// logged request (`METHOD /path`).
fn needs(request: &str) -> Option<(String, String, Option<String>, Vec<&'static str>)> {
    let (method, path) = request.split_once(' ')?;
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", group, _, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(ns.to_string()), r),
        r => (None, r),
    };
    let (resource, named) = match rest {
        [plural] => (plural.to_string(), false),
        [plural, _name] => (plural.to_string(), true),
        [plural, _name, sub] => (format!("{plural}/{sub}"), true),
        _ => return None,
    };
    let verbs = match (method, named) {
        // A collection GET is a list or a watch: both are needed.
        ("GET", false) => vec!["list", "watch"],
        ("GET", true) => vec!["get"],
        ("POST", _) => vec!["create"],
        ("PUT", _) => vec!["update"],
        ("PATCH", _) => vec!["patch"],
        ("DELETE", _) => vec!["delete"],
        _ => return None,
    };
    Some((group.to_string(), resource, namespace, verbs))
}

/// The requests the RBAC of `manifests` does not allow, with why.
pub fn denied(manifests: &str, requests: &[String]) -> Vec<String> {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(manifests)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .collect();
    let of_kind = |kind: &'static str| {
        docs.iter().filter(move |d| {
            d["kind"].as_str() == Some(kind) && d["metadata"]["name"] == "ambit-controller"
        })
    };
    let cluster: Vec<Rule> = of_kind("ClusterRole").flat_map(rules).collect();
    let (role_ns, role): (Option<String>, Vec<Rule>) = of_kind("Role")
        .map(|d| {
            (
                d["metadata"]["namespace"].as_str().map(str::to_string),
                rules(d),
            )
        })
        .next()
        .unwrap_or_default();
    let mut denied = Vec::new();
    for request in requests {
        let Some((group, resource, namespace, verbs)) = needs(request) else {
            denied.push(format!("{request}: not an API path"));
            continue;
        };
        for verb in verbs {
            let by_role = namespace.is_some()
                && namespace == role_ns
                && allows(&role, &group, &resource, verb);
            if !by_role && !allows(&cluster, &group, &resource, verb) {
                denied.push(format!("{request}: {verb} {resource} in group {group:?}"));
            }
        }
    }
    denied.sort();
    denied.dedup();
    denied
}

/// The controller's manifests as committed.
pub fn controller_manifests() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/controller.yaml");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}
