//! L7 routes: what a waypoint does with the HTTP and gRPC requests sent to
//! the Services it serves. One form for both Gateway API kinds: a
//! GRPCRoute's service/method matches are matches on the request path
//! (`/<service>/<method>`), which is what gRPC puts on the wire.

use serde::{Deserialize, Serialize};

/// An HTTPRoute or GRPCRoute, as far as it was accepted: only the parents
/// a waypoint serves are listed, and a route without any is not sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    pub kind: RouteKind,
    pub parents: Vec<RouteParent>,
    /// Host names the request's `:authority` must match (`*.` wildcard
    /// prefix allowed); empty matches any.
    #[serde(default)]
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "HTTPRoute",
            Self::Grpc => "GRPCRoute",
        }
    }
}

/// A Service the route applies to, and the waypoint that applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteParent {
    /// `namespace/name`.
    pub service: String,
    /// Only requests to this service port; all ports when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The waypoint's Gateway, `namespace/name`.
    pub waypoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one matches; never empty (a rule without matches matches every
    /// request, written as a `/` prefix).
    pub matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
    /// Where matching requests go, by weight. Empty: to the Service the
    /// request was addressed to (unless a redirect filter answers it).
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Timeouts::is_unset")]
    pub timeouts: Timeouts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// All of its parts must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<NamedMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum PathMatch {
    Exact(String),
    /// By whole path segments: `/foo` matches `/foo` and `/foo/bar`, not
    /// `/foobar`.
    Prefix(String),
    /// The whole path must match.
    Regex(String),
}

/// A header (case-insensitive name) or query parameter and its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamedMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum ValueMatch {
    Exact(String),
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RouteFilter {
    RequestHeaders(HeaderEdits),
    ResponseHeaders(HeaderEdits),
    Redirect(Redirect),
    Rewrite(Rewrite),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 or 302.
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum PathRewrite {
    /// Replace the whole path.
    Full(String),
    /// Replace the part the rule's path prefix matched.
    Prefix(String),
}

/// A backend Service port, or (`service` unset) a reference that did not
/// resolve: its share of requests is answered 500, as Gateway API asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// From the request's arrival to the response's headers, retries
    /// included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
    /// Each try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request_ms: Option<u64>,
}

impl Timeouts {
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Tries after the first.
    pub attempts: u32,
    /// Response statuses that are retried.
    pub codes: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
}

impl Route {
    /// `namespace/name`: the key of HTTPRoutes and GRPCRoutes alike (their
    /// kinds keep them apart in the stream).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the waypoint `waypoint` (`namespace/name` of its Gateway)
    /// applies this route to one of its parents.
    pub fn serves(&self, waypoint: &str) -> bool {
        self.parents.iter().any(|p| p.waypoint == waypoint)
    }

    /// Checks what a data plane would otherwise fail on at request time:
    /// regular expressions compile, match and rewrite paths are absolute,
    /// redirect statuses are 301 or 302.
    pub fn validate(&self) -> Result<(), String> {
        if self.parents.is_empty() {
            return Err("no parent".into());
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate().map_err(|e| format!("rule {i}: {e}"))?;
        }
        Ok(())
    }
}

impl RouteRule {
    fn validate(&self) -> Result<(), String> {
        if self.matches.is_empty() {
            return Err("no match".into());
        }
        for m in &self.matches {
            match &m.path {
                Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) if !p.starts_with('/') => {
                    return Err(format!("path {p:?} does not start with /"));
                }
                Some(PathMatch::Regex(r)) => drop(regex(r)?),
                _ => {}
            }
            for v in m.headers.iter().chain(&m.query_params) {
                if let ValueMatch::Regex(r) = &v.value {
                    regex(r)?;
                }
            }
        }
        for f in &self.filters {
            let path = match f {
                RouteFilter::Redirect(r) if !matches!(r.status, 301 | 302) => {
                    return Err(format!("redirect status {} is not 301 or 302", r.status));
                }
                RouteFilter::Redirect(Redirect { path, .. })
                | RouteFilter::Rewrite(Rewrite { path, .. }) => path,
                RouteFilter::RequestHeaders(_) | RouteFilter::ResponseHeaders(_) => &None,
            };
            if let Some(PathRewrite::Full(p) | PathRewrite::Prefix(p)) = path
                && !p.starts_with('/')
            {
                return Err(format!("rewritten path {p:?} does not start with /"));
            }
        }
        Ok(())
    }
}

/// A route's regular expression as the waypoint runs it: whole-string
/// match, size-limited.
pub fn regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("regular expression {pattern:?}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use super::*;
    use crate::proto::config::Kind;
    use crate::resources::{Item, ResourceError};

    fn route(kind: RouteKind, path: PathMatch) -> Route {
        Route {
            namespace: "shop".into(),
            name: "r".into(),
            kind,
            parents: vec![RouteParent {
                service: "shop/web".into(),
                port: None,
                waypoint: "shop/waypoint".into(),
            }],
            hostnames: vec![],
            rules: vec![RouteRule {
                name: None,
                matches: vec![RouteMatch {
                    path: Some(path),
                    ..RouteMatch::default()
                }],
                filters: vec![],
                backends: vec![],
                timeouts: Timeouts::default(),
                retry: None,
            }],
        }
    }

    #[test]
    fn routes_travel_under_their_own_kind() {
        let item = Item::Route(route(RouteKind::Grpc, PathMatch::Exact("/a.B/C".into())));
        let mut wire = item.encode();
        assert_eq!(wire.kind, i32::from(Kind::GrpcRoute));
        assert_eq!(Item::decode(&wire).unwrap(), item);
        // A GRPCRoute's content sent as an HTTPRoute is refused.
        wire.kind = Kind::HttpRoute.into();
        assert!(matches!(
            Item::decode(&wire),
            Err(ResourceError::Invalid { .. })
        ));
    }

    #[test]
    fn what_a_waypoint_would_fail_on_is_refused() {
        let ok = route(RouteKind::Http, PathMatch::Regex("/v[0-9]+/.*".into()));
        ok.validate().unwrap();
        let bad = route(RouteKind::Http, PathMatch::Regex("(".into()));
        assert!(bad.validate().unwrap_err().contains("regular expression"));
        let relative = route(RouteKind::Http, PathMatch::Prefix("api".into()));
        assert!(relative.validate().is_err());
        let mut redirect = ok.clone();
        redirect.rules[0]
            .filters
            .push(RouteFilter::Redirect(Redirect {
                scheme: None,
                hostname: None,
                path: None,
                port: None,
                status: 303,
            }));
        assert!(redirect.validate().unwrap_err().contains("303"));
        let mut orphan = ok;
        orphan.parents.clear();
        assert!(orphan.validate().is_err());
    }
}
