//! The routes of one config, compiled for one waypoint: per Service, every
//! match of every rule that applies to it, in Gateway API precedence order,
//! so the first match that accepts a request is the one that decides.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, Method};
use model::Snapshot;
use model::route::{NamedMatch, PathMatch, RouteMatch, RouteRule, ValueMatch, regex};
use regex::Regex;

/// The rule a request matched, and what it needs to know about its route.
#[derive(Debug)]
pub struct Selected {
    /// `HTTPRoute namespace/name`, for logs and metrics.
    pub route: String,
    pub rule: Arc<RouteRule>,
    /// The prefix the path matched, for prefix rewrites.
    pub prefix: Option<String>,
}

/// What a request is matched on.
#[derive(Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone)]
enum CompiledPath {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
enum CompiledValue {
    Exact(String),
    Regex(Regex),
}

impl CompiledValue {
    fn compile(value: &ValueMatch) -> Result<Self, String> {
        Ok(match value {
            ValueMatch::Exact(v) => Self::Exact(v.clone()),
            ValueMatch::Regex(r) => Self::Regex(regex(r)?),
        })
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => v == value,
            Self::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug)]
struct Entry {
    route: String,
    port: Option<u16>,
    hostnames: Arc<[String]>,
    path: CompiledPath,
    method: Option<Method>,
    headers: Vec<(http::HeaderName, CompiledValue)>,
    query: Vec<(String, CompiledValue)>,
    rule: Arc<RouteRule>,
}

/// Gateway API precedence, highest first: an exact path, then a regular
/// expression (its place is left to implementations; before prefixes, so
/// that a catch-all prefix does not make it unreachable), then the longest
/// prefix, then a method match,
/// then more header matches, then more query matches; ties go to the route
/// first by namespace/name, then to rule and match order.
type Rank = (u8, usize, bool, usize, usize);

impl Entry {
    fn rank(&self) -> Rank {
        let (kind, len) = match &self.path {
            CompiledPath::Exact(p) => (2, p.len()),
            CompiledPath::Regex(_) => (1, 0),
            CompiledPath::Prefix(p) => (0, p.len()),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    /// The prefix matched when it matches.
    fn matches(&self, port: u16, req: &RequestView<'_>) -> Option<Option<String>> {
        if self.port.is_some_and(|p| p != port) {
            return None;
        }
        if !self.hostnames.is_empty() {
            let host = req.host.map(strip_port)?;
            if !self.hostnames.iter().any(|h| host_matches(h, host)) {
                return None;
            }
        }
        if self.method.as_ref().is_some_and(|m| m != req.method) {
            return None;
        }
        for (name, value) in &self.headers {
            // Repeated headers are matched on their values joined, as
            // Gateway API asks for headers that may be combined.
            let joined = req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",");
            if !req.headers.contains_key(name) || !value.matches(&joined) {
                return None;
            }
        }
        for (name, value) in &self.query {
            // Decoded (`%20` and `+` are spaces); the first of repeated
            // parameters counts.
            let found = req
                .query
                .into_iter()
                .flat_map(|q| form_urlencoded::parse(q.as_bytes()))
                .find(|(k, _)| k == name);
            if !found.is_some_and(|(_, v)| value.matches(&v)) {
                return None;
            }
        }
        match &self.path {
            CompiledPath::Exact(p) => (p == req.path).then_some(None),
            CompiledPath::Prefix(p) => prefix_matches(p, req.path).then(|| Some(p.clone())),
            CompiledPath::Regex(r) => r.is_match(req.path).then_some(None),
        }
    }
}

/// Whole path segments: `/foo` matches `/foo`, `/foo/` and `/foo/bar`,
/// not `/foobar`; a trailing `/` in the prefix is ignored.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    // A request without a path (CONNECT) matches no path rule.
    if !path.starts_with('/') {
        return false;
    }
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

pub fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        // `[::1]:80` → `[::1]`; a bare `[::1]` has no port.
        Some((h, port))
            if (h.ends_with(']') || !h.contains(':'))
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            h
        }
        _ => host,
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == host,
    }
}

/// The routes of one snapshot for one waypoint.
#[derive(Debug, Default)]
pub struct RouteTable {
    version: u64,
    by_service: HashMap<String, Vec<Entry>>,
}

impl RouteTable {
    /// Compiles the routes `waypoint` (`namespace/name` of its Gateway)
    /// applies. A match that does not compile (the controller and the
    /// config validation refuse those first) is left out and logged.
    pub fn build(snapshot: &Snapshot, waypoint: &str) -> Self {
        let mut by_service: HashMap<String, Vec<Entry>> = HashMap::new();
        let mut routes: Vec<_> = snapshot
            .config()
            .routes
            .iter()
            .filter(|r| r.serves(waypoint))
            .collect();
        // Ties go to the route first by `namespace/name` (Gateway API puts
        // the oldest first; creation times are not in the model).
        routes.sort_by_key(|r| r.key());
        for route in routes {
            let name = format!("{} {}", route.kind.as_str(), route.key());
            let hostnames: Arc<[String]> = route.hostnames.clone().into();
            for rule in &route.rules {
                let rule = Arc::new(rule.clone());
                for m in &rule.matches {
                    match compile(m) {
                        Ok((path, method, headers, query)) => {
                            for parent in route.parents.iter().filter(|p| p.waypoint == waypoint) {
                                by_service
                                    .entry(parent.service.clone())
                                    .or_default()
                                    .push(Entry {
                                        route: name.clone(),
                                        port: parent.port,
                                        hostnames: hostnames.clone(),
                                        path: path.clone(),
                                        method: method.clone(),
                                        headers: headers.clone(),
                                        query: query.clone(),
                                        rule: rule.clone(),
                                    });
                            }
                        }
                        Err(error) => tracing::warn!(route = %name, %error, "match left out"),
                    }
                }
            }
        }
        for entries in by_service.values_mut() {
            // Stable: ties keep route, rule and match order.
            entries.sort_by_key(|e| Reverse(e.rank()));
        }
        Self {
            version: snapshot.version(),
            by_service,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether requests to `service`'s `port` are routed (and so handled
    /// as HTTP); other traffic is passed on as TCP.
    pub fn routes(&self, service: &str, port: u16) -> bool {
        self.by_service
            .get(service)
            .is_some_and(|e| e.iter().any(|e| e.port.is_none_or(|p| p == port)))
    }

    /// The rule that decides `req` to `service`'s `port`, if any.
    pub fn select(&self, service: &str, port: u16, req: &RequestView<'_>) -> Option<Selected> {
        self.by_service.get(service)?.iter().find_map(|e| {
            e.matches(port, req).map(|prefix| Selected {
                route: e.route.clone(),
                rule: e.rule.clone(),
                prefix,
            })
        })
    }
}

type Compiled = (
    CompiledPath,
    Option<Method>,
    Vec<(http::HeaderName, CompiledValue)>,
    Vec<(String, CompiledValue)>,
);

fn compile(m: &RouteMatch) -> Result<Compiled, String> {
    let path = match &m.path {
        None => CompiledPath::Prefix("/".into()),
        Some(PathMatch::Exact(p)) => CompiledPath::Exact(p.clone()),
        Some(PathMatch::Prefix(p)) => CompiledPath::Prefix(p.clone()),
        Some(PathMatch::Regex(r)) => CompiledPath::Regex(regex(r)?),
    };
    let method = m
        .method
        .as_deref()
        .map(|s| Method::from_bytes(s.as_bytes()).map_err(|e| format!("method {s:?}: {e}")))
        .transpose()?;
    let named =
        |n: &NamedMatch| Ok::<_, String>((n.name.clone(), CompiledValue::compile(&n.value)?));
    // Of entries naming the same header, the first counts.
    let mut seen = std::collections::HashSet::new();
    let headers = m
        .headers
        .iter()
        .filter(|n| seen.insert(n.name.to_ascii_lowercase()))
        .map(|n| {
            let (name, value) = named(n)?;
            let name = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|e| format!("header {name:?}: {e}"))?;
            Ok((name, value))
        })
        .collect::<Result<_, String>>()?;
    let query = m.query_params.iter().map(named).collect::<Result<_, _>>()?;
    Ok((path, method, headers, query))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use super::*;

    fn snapshot(routes: &str) -> Snapshot {
        let yaml = format!(
            r#"
workloads:
  - {{uid: e, name: echo-0, namespace: demo, ips: [10.0.1.1], node: n1, protocol: HBONE}}
services:
  - {{name: echo, namespace: demo, vips: [10.96.0.1], ports: [{{port: 80, targetPort: 8080}}], endpoints: [e]}}
routes:
{routes}
"#
        );
        Snapshot::new(serde_yaml::from_str(&yaml).unwrap(), 7).unwrap()
    }

    fn route(name: &str, matches: &str) -> String {
        format!(
            r#"  - namespace: demo
    name: {name}
    kind: HTTPRoute
    parents: [{{service: demo/echo, waypoint: demo/waypoint}}]
    rules: [{{matches: {matches}, backends: []}}]
"#
        )
    }

    fn select(
        table: &RouteTable,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Option<String> {
        let uri: http::Uri = uri.parse().unwrap();
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let view = RequestView {
            method: &method,
            path: uri.path(),
            query: uri.query(),
            host: Some("echo.demo.svc.cluster.local:80"),
            headers: &map,
        };
        table.select("demo/echo", 80, &view).map(|s| s.route)
    }

    #[test]
    fn the_most_specific_match_wins_whatever_the_order() {
        let routes = [
            route("any", "[{}]"),
            route("prefix-api", "[{path: !prefix /api}]"),
            route("prefix-api-v1", "[{path: !prefix /api/v1/}]"),
            route("exact", "[{path: !exact /api/v1/items}]"),
            route("regex", r#"[{path: !regex "/api/v[0-9]+/x.*"}]"#),
            route("post", "[{path: !prefix /api, method: POST}]"),
            route(
                "header",
                "[{path: !prefix /api, headers: [{name: X-Canary, value: !exact 'yes'}]}]",
            ),
            route(
                "query",
                "[{path: !prefix /api, queryParams: [{name: v, value: !regex '[0-9]'}]}]",
            ),
        ]
        .concat();
        let table = RouteTable::build(&snapshot(&routes), "demo/waypoint");
        assert_eq!(table.version(), 7);
        let name = |n: &str| Some(format!("HTTPRoute demo/{n}"));
        assert_eq!(select(&table, "GET", "/api/v1/items", &[]), name("exact"));
        assert_eq!(
            select(&table, "GET", "/api/v1/other", &[]),
            name("prefix-api-v1")
        );
        assert_eq!(select(&table, "GET", "/api/v1", &[]), name("prefix-api-v1"));
        assert_eq!(select(&table, "GET", "/api/v2/xyz", &[]), name("regex"));
        assert_eq!(
            select(&table, "GET", "/api/v2/abc", &[]),
            name("prefix-api")
        );
        assert_eq!(select(&table, "POST", "/api/v2", &[]), name("post"));
        assert_eq!(
            select(&table, "GET", "/api", &[("x-canary", "yes")]),
            name("header")
        );
        assert_eq!(select(&table, "GET", "/api?a=b&v=3", &[]), name("query"));
        assert_eq!(select(&table, "GET", "/api?%76=3", &[]), name("query"));
        assert_eq!(select(&table, "GET", "/api?v=x", &[]), name("prefix-api"));
        assert_eq!(select(&table, "GET", "/apix", &[]), name("any"));
        assert_eq!(select(&table, "GET", "/", &[]), name("any"));
        assert!(table.routes("demo/echo", 80));
        assert!(!table.routes("demo/other", 80));
        // Another waypoint's routes are not compiled here.
        let other = RouteTable::build(&snapshot(&routes), "demo/other");
        assert!(!other.routes("demo/echo", 80));
    }

    #[test]
    fn ports_and_hostnames_restrict_a_route() {
        let routes = r#"  - namespace: demo
    name: web
    kind: HTTPRoute
    parents: [{service: demo/echo, port: 80, waypoint: demo/waypoint}]
    hostnames: ["*.demo.svc.cluster.local"]
    rules: [{matches: [{path: !prefix /}], backends: []}]
  - namespace: demo
    name: other-port
    kind: HTTPRoute
    parents: [{service: demo/echo, port: 81, waypoint: demo/waypoint}]
    rules: [{matches: [{path: !prefix /}], backends: []}]
"#;
        let table = RouteTable::build(&snapshot(routes), "demo/waypoint");
        assert_eq!(
            select(&table, "GET", "/", &[]),
            Some("HTTPRoute demo/web".into())
        );
        assert!(table.routes("demo/echo", 81));
        assert!(!table.routes("demo/echo", 82));
        assert!(host_matches("*.demo.svc", "echo.demo.svc"));
        assert!(!host_matches("*.demo.svc", "demo.svc"));
        assert!(host_matches("Echo.Demo", "echo.demo"));
        assert_eq!(strip_port("echo:80"), "echo");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert!(host_matches("*.Demo.svc", "echo.demo.SVC"));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/foo", "/foo"));
        assert!(prefix_matches("/foo", "/foo/bar"));
        assert!(prefix_matches("/foo/", "/foo"));
        assert!(!prefix_matches("/foo", "/foobar"));
        assert!(prefix_matches("/", "/anything"));
    }
}
