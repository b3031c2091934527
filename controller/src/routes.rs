//! Gateway API `HTTPRoute` and `GRPCRoute` bound to Services (GAMMA): what
//! the waypoint serving a Service does with its HTTP and gRPC requests.
//! Only the fields Ambit reads are typed; anything else in a route or rule
//! is kept aside so that a field Ambit does not implement makes the route
//! not accepted, with the field named, instead of being ignored.
//!
//! A route applies to a parent Service only through that Service's
//! waypoint: a Service without one (or outside the route's namespace)
//! gets `Accepted=False` for that parent, and the route goes to the
//! waypoints of the parents that accepted it.

use std::collections::BTreeMap;

use kube::CustomResource;
use model::route::{
    Backend, HeaderEdits, NamedMatch, PathMatch, PathRewrite, Redirect, Retry, Rewrite,
    RouteFilter, RouteKind, RouteMatch, RouteParent, RouteRule, Timeouts, ValueMatch,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crd::Condition;
use crate::translator::Name;

/// The `controllerName` of the route status entries this controller
/// writes (other controllers' entries are left as they are).
pub const ROUTE_CONTROLLER: &str = "ambit.dev/waypoint-controller";

#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    root = "HttpRoute",
    namespaced,
    status = "RouteStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRule>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    root = "GrpcRoute",
    namespaced,
    status = "RouteStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRule>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HttpRetry>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<TypedValue>,
    #[serde(default)]
    pub headers: Vec<NamedValue>,
    #[serde(default)]
    pub query_params: Vec<NamedValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethod>,
    #[serde(default)]
    pub headers: Vec<NamedValue>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMethod {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypedValue {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedValue {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Value>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpTimeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    #[serde(default)]
    pub codes: Vec<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: ParentRef,
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// What a route's translation needs to know of the cluster.
pub trait Resolver {
    /// The Service `name`: `None` if there is none, else the waypoint
    /// (Gateway name) serving it, if one does.
    fn service(&self, name: &Name) -> Option<Option<Name>>;
    /// Whether the Service `name` has the service port `port`.
    fn has_port(&self, name: &Name, port: u16) -> bool;
    /// Whether `name` is a waypoint's Gateway.
    fn is_waypoint(&self, name: &Name) -> bool;
}

/// A route's translation: what waypoints apply (if anything), the status
/// of each parent this controller is responsible for, and the Services and
/// Gateways it read (to translate it again when one of them changes).
#[derive(Debug, Clone, PartialEq)]
pub struct TranslatedRoute {
    pub route: Option<model::Route>,
    pub parents: Vec<RouteParentStatus>,
    pub reads: Vec<Name>,
}

/// A rule with its backend references, before they are resolved.
type RuleDraft = (RouteRule, Vec<BackendRef>);

/// The common form of both kinds before parents and backends are
/// resolved.
struct Draft {
    rules: Vec<RuleDraft>,
}

/// Translates an HTTPRoute.
pub fn http_route(route: &HttpRoute, resolver: &impl Resolver) -> TranslatedRoute {
    let spec = &route.spec;
    let draft = draft(&spec.other, &spec.rules, http_rule);
    finish(
        RouteKind::Http,
        route,
        &spec.parent_refs,
        &spec.hostnames,
        draft,
        resolver,
    )
}

/// Translates a GRPCRoute: its method matches become path matches.
pub fn grpc_route(route: &GrpcRoute, resolver: &impl Resolver) -> TranslatedRoute {
    let spec = &route.spec;
    let draft = draft(&spec.other, &spec.rules, grpc_rule);
    finish(
        RouteKind::Grpc,
        route,
        &spec.parent_refs,
        &spec.hostnames,
        draft,
        resolver,
    )
}

/// The rules of either kind (no rules: one that matches everything), or
/// the first thing in the spec that is not implemented.
fn draft<R: Default>(
    other: &BTreeMap<String, Value>,
    rules: &[R],
    rule: fn(&R) -> Result<RuleDraft, String>,
) -> Result<Draft, String> {
    unsupported("", other)?;
    let default = [R::default()];
    let rules = if rules.is_empty() {
        &default[..]
    } else {
        rules
    };
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r).map_err(|e| format!("rule {i}: {e}")))
        .collect::<Result<_, _>>()
        .map(|rules| Draft { rules })
}

fn unsupported(at: &str, other: &BTreeMap<String, Value>) -> Result<(), String> {
    match other.keys().next() {
        None => Ok(()),
        Some(field) => Err(format!("{at}{field} is not supported")),
    }
}

fn http_rule(rule: &HttpRule) -> Result<RuleDraft, String> {
    unsupported("", &rule.other)?;
    let mut matches = rule
        .matches
        .iter()
        .map(http_match)
        .collect::<Result<Vec<_>, _>>()?;
    if matches.is_empty() {
        matches.push(any_path());
    }
    let timeouts = match &rule.timeouts {
        None => Timeouts::default(),
        Some(t) => Timeouts {
            request_ms: t.request.as_deref().map(duration_ms).transpose()?.flatten(),
            backend_request_ms: t
                .backend_request
                .as_deref()
                .map(duration_ms)
                .transpose()?
                .flatten(),
        },
    };
    let retry = match &rule.retry {
        None => None,
        Some(r) => Some(Retry {
            attempts: u32::try_from(r.attempts.unwrap_or(1))
                .map_err(|_| "retry attempts is negative".to_string())?,
            codes: r
                .codes
                .iter()
                .map(|c| status_code(*c))
                .collect::<Result<_, _>>()?,
            backoff_ms: r.backoff.as_deref().map(duration_ms).transpose()?.flatten(),
        }),
    };
    Ok((
        RouteRule {
            name: rule.name.clone(),
            matches,
            filters: filters(&rule.filters, true)?,
            backends: Vec::new(),
            timeouts,
            retry,
        },
        rule.backend_refs.clone(),
    ))
}

fn grpc_rule(rule: &GrpcRule) -> Result<RuleDraft, String> {
    unsupported("", &rule.other)?;
    let mut matches = rule
        .matches
        .iter()
        .map(grpc_match)
        .collect::<Result<Vec<_>, _>>()?;
    if matches.is_empty() {
        matches.push(any_path());
    }
    Ok((
        RouteRule {
            name: rule.name.clone(),
            matches,
            filters: filters(&rule.filters, false)?,
            backends: Vec::new(),
            timeouts: Timeouts::default(),
            retry: None,
        },
        rule.backend_refs.clone(),
    ))
}

fn any_path() -> RouteMatch {
    RouteMatch {
        path: Some(PathMatch::Prefix("/".into())),
        ..RouteMatch::default()
    }
}

fn http_match(m: &HttpMatch) -> Result<RouteMatch, String> {
    unsupported("match: ", &m.other)?;
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            match p.type_.as_deref().unwrap_or("PathPrefix") {
                "PathPrefix" => PathMatch::Prefix(value),
                "Exact" => PathMatch::Exact(value),
                "RegularExpression" => PathMatch::Regex(value),
                other => return Err(format!("path match type {other} is not supported")),
            }
        }
    };
    Ok(RouteMatch {
        path: Some(path),
        method: m.method.clone(),
        headers: named(&m.headers, "header")?,
        query_params: named(&m.query_params, "query parameter")?,
    })
}

/// gRPC requests are `POST /<service>/<method>`.
fn grpc_match(m: &GrpcMatch) -> Result<RouteMatch, String> {
    unsupported("match: ", &m.other)?;
    let path = match &m.method {
        None => None,
        Some(method) => {
            let (service, name) = (method.service.as_deref(), method.method.as_deref());
            match method.type_.as_deref().unwrap_or("Exact") {
                "Exact" => match (service, name) {
                    (Some(s), Some(n)) => Some(PathMatch::Exact(format!("/{s}/{n}"))),
                    (Some(s), None) => Some(PathMatch::Prefix(format!("/{s}"))),
                    (None, Some(n)) => {
                        Some(PathMatch::Regex(format!("/[^/]+/{}", regex::escape(n))))
                    }
                    (None, None) => None,
                },
                // Grouped, so that an alternation stays within its part.
                "RegularExpression" => Some(PathMatch::Regex(format!(
                    "/(?:{})/(?:{})",
                    service.unwrap_or("[^/]+"),
                    name.unwrap_or("[^/]+")
                ))),
                other => return Err(format!("method match type {other} is not supported")),
            }
        }
    };
    Ok(RouteMatch {
        path: path.or(Some(PathMatch::Prefix("/".into()))),
        method: None,
        headers: named(&m.headers, "header")?,
        query_params: Vec::new(),
    })
}

fn named(list: &[NamedValue], what: &str) -> Result<Vec<NamedMatch>, String> {
    list.iter()
        .map(|v| {
            let value = match v.type_.as_deref().unwrap_or("Exact") {
                "Exact" => ValueMatch::Exact(v.value.clone()),
                "RegularExpression" => ValueMatch::Regex(v.value.clone()),
                other => return Err(format!("{what} match type {other} is not supported")),
            };
            Ok(NamedMatch {
                name: v.name.clone(),
                value,
            })
        })
        .collect()
}

fn filters(list: &[Filter], http: bool) -> Result<Vec<RouteFilter>, String> {
    list.iter()
        .map(|f| {
            let known = ["RequestHeaderModifier", "ResponseHeaderModifier"];
            let http_only = ["RequestRedirect", "URLRewrite"];
            let t = f.type_.as_str();
            if !(known.contains(&t) || http && http_only.contains(&t)) {
                return Err(format!("filter {t} is not supported"));
            }
            unsupported(&format!("filter {t}: "), &f.other)?;
            let missing = || format!("filter {} has no settings", f.type_);
            Ok(match f.type_.as_str() {
                "RequestHeaderModifier" => RouteFilter::RequestHeaders(edits(
                    f.request_header_modifier.as_ref().ok_or_else(missing)?,
                )),
                "ResponseHeaderModifier" => RouteFilter::ResponseHeaders(edits(
                    f.response_header_modifier.as_ref().ok_or_else(missing)?,
                )),
                "RequestRedirect" if http => {
                    let r = f.request_redirect.as_ref().ok_or_else(missing)?;
                    RouteFilter::Redirect(Redirect {
                        scheme: r.scheme.clone(),
                        hostname: r.hostname.clone(),
                        path: r.path.as_ref().map(path_rewrite).transpose()?,
                        port: r.port.map(port).transpose()?,
                        status: status_code(r.status_code.unwrap_or(302))?,
                    })
                }
                "URLRewrite" if http => {
                    let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
                    RouteFilter::Rewrite(Rewrite {
                        hostname: r.hostname.clone(),
                        path: r.path.as_ref().map(path_rewrite).transpose()?,
                    })
                }
                other => return Err(format!("filter {other} is not supported")),
            })
        })
        .collect()
}

fn edits(m: &HeaderModifier) -> HeaderEdits {
    let pairs = |l: &[HeaderValue]| {
        l.iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect()
    };
    HeaderEdits {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.clone(),
    }
}

fn path_rewrite(p: &PathModifier) -> Result<PathRewrite, String> {
    match (
        p.type_.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(path), _) => Ok(PathRewrite::Full(path.clone())),
        ("ReplacePrefixMatch", _, Some(prefix)) => Ok(PathRewrite::Prefix(prefix.clone())),
        (t, _, _) => Err(format!("path modifier {t} without its value")),
    }
}

fn port(p: i32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{p} is not a port"))
}

fn status_code(c: i32) -> Result<u16, String> {
    u16::try_from(c)
        .ok()
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| format!("{c} is not an HTTP status"))
}

/// A Gateway API duration (`1h30m`, `500ms`, up to four parts) in
/// milliseconds; zero means no timeout (`None`).
pub fn duration_ms(text: &str) -> Result<Option<u64>, String> {
    let bad = || format!("{text:?} is not a duration (like 10s, 1m30s, 500ms)");
    let mut total: u64 = 0;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += n * unit;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok((total > 0).then_some(total))
}

/// Resolves parents and backends, and writes the conditions.
fn finish(
    kind: RouteKind,
    route: &impl kube::ResourceExt,
    parent_refs: &[ParentRef],
    hostnames: &[String],
    draft: Result<Draft, String>,
    resolver: &impl Resolver,
) -> TranslatedRoute {
    let namespace = route.namespace().unwrap_or_default();
    let generation = route.meta().generation;
    let mut reads = Vec::new();

    // Backends: the first problem is the ResolvedRefs reason.
    let mut unresolved: Option<(&str, String)> = None;
    let draft = draft.and_then(|d| {
        let mut rules = Vec::new();
        for (mut rule, refs) in d.rules {
            for r in refs {
                unsupported(&format!("backendRef {}: ", r.name), &r.other)?;
                if !r.filters.is_empty() {
                    return Err(format!("backendRef {}: filters are not supported", r.name));
                }
                let weight = u32::try_from(r.weight.unwrap_or(1))
                    .map_err(|_| format!("backendRef {}: negative weight", r.name))?;
                let target = (r.namespace.clone().unwrap_or(namespace.clone()), r.name.clone());
                let problem = if !is_core(r.group.as_deref()) || !is(r.kind.as_deref(), "Service") {
                    Some(("InvalidKind", format!("backendRef {} is not a Service", r.name)))
                } else if target.0 != namespace {
                    Some((
                        "RefNotPermitted",
                        format!(
                            "backendRef {}/{}: references to other namespaces (ReferenceGrant) are not supported",
                            target.0, target.1
                        ),
                    ))
                } else if r.port.is_none() {
                    Some(("UnsupportedValue", format!("backendRef {} has no port", r.name)))
                } else {
                    reads.push(target.clone());
                    let backend_port = r.port.map(port).transpose()?.unwrap_or(0);
                    if resolver.service(&target).is_none() {
                        Some(("BackendNotFound", format!("Service {}/{} not found", target.0, target.1)))
                    } else if !resolver.has_port(&target, backend_port) {
                        // A port the Service lacks resolves to nothing.
                        Some((
                            "BackendNotFound",
                            format!("Service {}/{} has no port {backend_port}", target.0, target.1),
                        ))
                    } else {
                        None
                    }
                };
                let resolved = problem.is_none();
                if let Some(p) = problem {
                    unresolved.get_or_insert(p);
                }
                rule.backends.push(Backend {
                    service: resolved.then(|| format!("{}/{}", target.0, target.1)),
                    port: r.port.map(port).transpose()?.unwrap_or(0),
                    weight,
                });
            }
            rules.push(rule);
        }
        Ok(rules)
    });

    let resolved_refs = match (&draft, &unresolved) {
        // The backends of a route that is not accepted are not looked at.
        (Err(_), _) => Condition {
            status: "Unknown".into(),
            ..Condition::new(
                "ResolvedRefs",
                false,
                "UnsupportedValue",
                "references not checked: the route is not accepted",
            )
        },
        (Ok(_), None) => Condition::new(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "all references resolved",
        ),
        (Ok(_), Some((reason, message))) => {
            Condition::new("ResolvedRefs", false, reason, message.clone())
        }
    };
    let mut parents = Vec::new();
    let mut accepted = Vec::new();
    for parent in parent_refs {
        let group = parent.group.as_deref();
        let ns = parent.namespace.clone().unwrap_or(namespace.clone());
        let name = (ns, parent.name.clone());
        // A parentRef's group and kind default to Gateway API's Gateway
        // (the API server fills them in): a Service parent names both,
        // the group empty.
        let service_parent_ref =
            matches!(group, Some("" | "core")) && parent.kind.as_deref() == Some("Service");
        let condition = if service_parent_ref {
            reads.push(name.clone());
            service_parent(&name, &namespace, parent, resolver)
        } else if group.unwrap_or("gateway.networking.k8s.io") == "gateway.networking.k8s.io"
            && is(parent.kind.as_deref(), "Gateway")
            && {
                reads.push(name.clone());
                resolver.is_waypoint(&name)
            }
        {
            Err(Box::new(Condition::new(
                "Accepted",
                false,
                "NotAllowedByListeners",
                "routes attach to the Services a waypoint serves (parentRef kind Service), not to the waypoint's Gateway",
            )))
        } else {
            // Another implementation's parent.
            continue;
        };
        let condition = match (&draft, condition) {
            (Err(e), _) => Condition::new("Accepted", false, "UnsupportedValue", e.clone()),
            (Ok(_), Ok((waypoint, port))) => {
                accepted.push(RouteParent {
                    service: format!("{}/{}", name.0, name.1),
                    port,
                    waypoint: format!("{}/{}", waypoint.0, waypoint.1),
                });
                Condition::new(
                    "Accepted",
                    true,
                    "Accepted",
                    format!("sent to waypoint {}/{}", waypoint.0, waypoint.1),
                )
            }
            (Ok(_), Err(c)) => *c,
        };
        let enforced = enforced(&condition);
        parents.push(RouteParentStatus {
            parent_ref: parent.clone(),
            controller_name: ROUTE_CONTROLLER.into(),
            conditions: [condition, resolved_refs.clone(), enforced]
                .into_iter()
                .map(|c| Condition {
                    observed_generation: generation,
                    ..c
                })
                .collect(),
        });
    }
    let route = match draft {
        Ok(rules) if !accepted.is_empty() => Some(model::Route {
            namespace,
            name: route.name_any(),
            kind,
            parents: accepted,
            hostnames: hostnames.to_vec(),
            rules,
        }),
        _ => None,
    };
    // A route the waypoint would refuse is not sent; its parents say why.
    let (route, parents) = match route.as_ref().map(model::Route::validate) {
        Some(Err(e)) => (
            None,
            parents
                .into_iter()
                .map(|mut p| {
                    // Parents refused for their own reason keep it.
                    if !p.conditions[0].is_true() {
                        return p;
                    }
                    let refused = Condition::new("Accepted", false, "UnsupportedValue", e.clone());
                    p.conditions[2] = Condition {
                        observed_generation: generation,
                        ..enforced(&refused)
                    };
                    p.conditions[0] = Condition {
                        observed_generation: generation,
                        ..refused
                    };
                    p
                })
                .collect(),
        ),
        _ => (route, parents),
    };
    reads.sort();
    reads.dedup();
    TranslatedRoute {
        route,
        parents,
        reads,
    }
}

/// `Enforced` for a parent, next to Gateway API's conditions (as on Ambit's
/// policies): whether the route changes anything. An accepted route is in
/// its waypoint's config, which the waypoint applies to requests.
fn enforced(accepted: &Condition) -> Condition {
    if accepted.is_true() {
        Condition::new(
            "Enforced",
            true,
            "Enforced",
            format!("{}, which applies it", accepted.message),
        )
    } else {
        Condition::new("Enforced", false, &accepted.reason, "not accepted")
    }
}

/// A Service parent: accepted through the Service's waypoint (and the
/// port given), or the refusing condition.
fn service_parent(
    name: &Name,
    route_namespace: &str,
    parent: &ParentRef,
    resolver: &impl Resolver,
) -> Result<(Name, Option<u16>), Box<Condition>> {
    let refuse = |reason: &str, message: String| {
        Box::new(Condition::new("Accepted", false, reason, message))
    };
    if name.0 != route_namespace {
        return Err(refuse(
            "UnsupportedValue",
            format!(
                "Service {}/{} is in another namespace: routes that apply to one namespace's clients only (consumer routes) are not supported",
                name.0, name.1
            ),
        ));
    }
    if parent.section_name.is_some() {
        return Err(refuse(
            "UnsupportedValue",
            "sectionName on a Service parent is not supported; use port".into(),
        ));
    }
    let port = parent
        .port
        .map(port)
        .transpose()
        .map_err(|e| refuse("UnsupportedValue", e))?;
    match resolver.service(name) {
        None => Err(refuse(
            "NoMatchingParent",
            format!("Service {}/{} not found", name.0, name.1),
        )),
        Some(_) if port.is_some_and(|p| !resolver.has_port(name, p)) => Err(refuse(
            "NoMatchingParent",
            format!(
                "Service {}/{} has no port {}",
                name.0,
                name.1,
                port.unwrap_or_default()
            ),
        )),
        Some(None) => Err(refuse(
            "NoWaypoint",
            format!(
                "Service {}/{} has no waypoint (label it ambit.dev/use-waypoint): ztunnel does not route HTTP",
                name.0, name.1
            ),
        )),
        Some(Some(waypoint)) => Ok((waypoint, port)),
    }
}

fn is_core(group: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core"))
}

fn is(kind: Option<&str>, want: &str) -> bool {
    kind.unwrap_or(want) == want
}
