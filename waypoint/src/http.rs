//! HTTP through the waypoint. Requests on a tunnel to a routed Service
//! (HTTP/1.1, or HTTP/2 with prior knowledge: gRPC) are matched against the
//! Service's routes; the deciding rule's filters are applied (header edits,
//! redirect, rewrite), a backend is picked by weight, and the request goes
//! to one of its endpoints in the version it arrived in, with the rule's
//! timeouts and retries. Every request gets an access log line and its
//! metrics; a request no route matches is answered 404.

use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::{Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use model::route::{Backend, HeaderEdits, PathRewrite, Redirect, Rewrite, RouteFilter, RouteRule};
use model::{Snapshot, Workload};

use crate::body::{Seen, Watched};
use crate::proxy::{Client, Target, Waypoint};
use crate::table::{RequestView, Selected, prefix_matches};
use crate::upstream::{Key, ReuseError};

pub use crate::upstream::Body;

/// The largest request body kept for retries; a request with a larger one
/// is tried once.
const RETRY_BODY_LIMIT: usize = 1 << 20;

/// Serves the HTTP requests of one tunnel until the client closes it.
pub async fn serve(
    waypoint: Waypoint,
    me: Workload,
    target: Target,
    client: Client,
    io: hbone::copy::Attached,
) {
    let ctx = Arc::new(Context {
        waypoint,
        me,
        target,
        client,
    });
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(error) = served {
        tracing::debug!(%error, "HTTP connection ended");
    }
}

struct Context {
    waypoint: Waypoint,
    me: Workload,
    target: Target,
    client: Client,
}

/// How a request ended, for the access log and metrics.
struct Outcome {
    route: String,
    backend: String,
    endpoint: String,
    reason: String,
}

/// An answer the waypoint makes itself.
fn local(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{reason}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Context {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let mut outcome = Outcome {
            route: String::new(),
            backend: String::new(),
            endpoint: String::new(),
            reason: String::new(),
        };
        let resp = self.respond(req, &mut outcome).await;
        let status = resp.status();
        self.waypoint.metrics().request(
            self.target.name(),
            &outcome.route,
            status.as_u16(),
            started.elapsed(),
        );
        tracing::info!(
            target: "access",
            src = %self.client.identity,
            src_addr = %self.client.addr,
            destination = self.target.name(),
            %method,
            path,
            route = outcome.route,
            backend = outcome.backend,
            endpoint = outcome.endpoint,
            status = status.as_u16(),
            duration_ms = started.elapsed().as_millis() as u64,
            reason = outcome.reason,
            "http"
        );
        resp
    }

    async fn respond(&self, mut req: Request<Incoming>, outcome: &mut Outcome) -> Response<Body> {
        // Upgrades (WebSocket) are not forwarded yet: refused rather than
        // sent on as a plain request. An `h2c` upgrade is an offer the
        // request stands without.
        if let Some(upgrade) = req.headers().get(header::UPGRADE)
            && !upgrade.as_bytes().eq_ignore_ascii_case(b"h2c")
        {
            outcome.reason = format!(
                "upgrade to {} is not supported by the waypoint",
                String::from_utf8_lossy(upgrade.as_bytes())
            );
            return local(StatusCode::NOT_IMPLEMENTED, &outcome.reason);
        }
        // Rules see, and backends get, the path in one form: `/a/../b`,
        // `//b` or `/%62` must not slip past a rule for `/b`.
        let normalized = normalize_path(req.uri().path());
        if normalized != req.uri().path()
            && let Err(reason) = set_path(&mut req, normalized)
        {
            outcome.reason = reason;
            return local(StatusCode::BAD_REQUEST, &outcome.reason);
        }
        let snapshot = self.waypoint.snapshot();
        let table = self.waypoint.table(&snapshot);
        let port = self.target.addr().port();
        let host = host(&req).map(str::to_string);
        let selected = table.select(
            self.target.name(),
            port,
            &RequestView {
                method: req.method(),
                path: req.uri().path(),
                query: req.uri().query(),
                host: host.as_deref(),
                headers: req.headers(),
            },
        );
        let Some(selected) = selected else {
            outcome.reason = "no route matches".into();
            return local(StatusCode::NOT_FOUND, &outcome.reason);
        };
        outcome.route.clone_from(&selected.route);
        let mut response_edits = Vec::new();
        for filter in &selected.rule.filters {
            match filter {
                RouteFilter::RequestHeaders(edits) => edit(req.headers_mut(), edits),
                RouteFilter::ResponseHeaders(edits) => response_edits.push(edits),
                RouteFilter::Redirect(redirect) => {
                    outcome.reason = "redirected".into();
                    return redirect_response(redirect, &req, host.as_deref(), port, &selected);
                }
                RouteFilter::Rewrite(rewrite) => {
                    if let Err(reason) = rewrite_request(&mut req, rewrite, &selected) {
                        outcome.reason = reason;
                        return local(StatusCode::INTERNAL_SERVER_ERROR, &outcome.reason);
                    }
                }
            }
        }
        let backend = match pick(&selected.rule.backends) {
            Picked::Addressed => (self.target.name().to_string(), port),
            Picked::Service(service, port) => (service.to_string(), port),
            Picked::Unresolved(port) => {
                outcome.backend = format!("<unresolved>:{port}");
                outcome.reason = "the backend's reference did not resolve".into();
                return local(StatusCode::INTERNAL_SERVER_ERROR, &outcome.reason);
            }
            Picked::Nothing => {
                outcome.reason = "every backend has weight 0".into();
                return local(StatusCode::INTERNAL_SERVER_ERROR, &outcome.reason);
            }
        };
        outcome.backend = format!("{}:{}", backend.0, backend.1);
        let forwarded = self.forward(&snapshot, req, &backend, &selected.rule, outcome);
        let mut resp = match selected.rule.timeouts.request_ms {
            Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), forwarded).await {
                Ok(resp) => resp,
                Err(_) => {
                    outcome.reason = format!("no response within the route's {ms} ms timeout");
                    local(StatusCode::GATEWAY_TIMEOUT, &outcome.reason)
                }
            },
            None => forwarded.await,
        };
        for edits in response_edits {
            edit(resp.headers_mut(), edits);
        }
        resp
    }

    /// Sends `req` to an endpoint of `backend`, retrying as `rule` says.
    async fn forward(
        &self,
        snapshot: &Snapshot,
        req: Request<Incoming>,
        backend: &(String, u16),
        rule: &RouteRule,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let Some(service) = snapshot.service(&backend.0) else {
            outcome.reason = format!("backend service {} is not in the mesh config", backend.0);
            return local(StatusCode::SERVICE_UNAVAILABLE, &outcome.reason);
        };
        let Some(vip) = service.vips.first() else {
            outcome.reason = format!("backend service {} has no cluster IP", backend.0);
            return local(StatusCode::SERVICE_UNAVAILABLE, &outcome.reason);
        };
        let addr = SocketAddrV4::new(*vip, backend.1);
        // A port the Service does not have would resolve to nothing in the
        // mesh and go out as plain TCP: refused instead.
        if snapshot.service_by_vip(addr).is_none() {
            outcome.reason = format!("backend service {} has no port {}", backend.0, backend.1);
            return local(StatusCode::INTERNAL_SERVER_ERROR, &outcome.reason);
        }
        let target = Target::Service {
            key: backend.0.clone(),
            hostname: service.hostname(),
            addr,
        };
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        strip_hop_by_hop(head.headers_mut());
        let Some(retry) = &rule.retry else {
            return match self
                .try_once(snapshot, &target, &head, body.boxed(), rule, outcome)
                .await
            {
                Ok(resp) => resp,
                Err(failure) => {
                    outcome.reason = failure.reason;
                    local(failure.status, &outcome.reason)
                }
            };
        };
        // The first try streams the body (a client may wait for the
        // response before it ends its request, as streaming gRPC does);
        // what it sends is kept, up to a bound, for the retries.
        let kept = Arc::new(Mutex::new(Kept::default()));
        let keeper = kept.clone();
        let mut body = Watched::new(body, move |seen| {
            keeper
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .see(seen);
        })
        .boxed();
        let backoff = Duration::from_millis(retry.backoff_ms.unwrap_or(25));
        let mut attempt = 0;
        loop {
            let mut result = self
                .try_once(snapshot, &target, &head, body, rule, outcome)
                .await;
            let retryable = match &result {
                Ok(resp) => retry.codes.contains(&resp.status().as_u16()),
                // Nothing reached an endpoint, or it did not answer.
                Err(_) => true,
            };
            let last = !retryable || attempt >= retry.attempts;
            // The next try's body: what this one did not send at all, or
            // the copy kept of what it sent.
            let unsent = match &mut result {
                Err(failure) => failure.unsent.take(),
                Ok(_) => None,
            };
            let next = unsent.or_else(|| {
                let kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                kept.replay()
                    .map(|b| Full::new(b).map_err(|never| match never {}).boxed())
            });
            let (Some(next), false) = (next, last) else {
                let not_kept = if last {
                    ""
                } else {
                    "; not retried: the request body was not kept (over the bound, with trailers, or not read to its end)"
                };
                return match result {
                    Ok(resp) => {
                        outcome.reason = not_kept.trim_start_matches("; ").to_string();
                        resp
                    }
                    Err(failure) => {
                        outcome.reason = format!("{}{not_kept}", failure.reason);
                        local(failure.status, &outcome.reason)
                    }
                };
            };
            attempt += 1;
            outcome.reason = match &result {
                Ok(resp) => format!("retry {attempt} after {}", resp.status()),
                Err(failure) => format!("retry {attempt} after: {}", failure.reason),
            };
            body = next;
            tokio::time::sleep(backoff).await;
        }
    }

    /// One try: an endpoint, a connection to it, the request and the
    /// response's head, all within the rule's `backendRequest` timeout.
    async fn try_once(
        &self,
        snapshot: &Snapshot,
        target: &Target,
        head: &Request<()>,
        body: Body,
        rule: &RouteRule,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, Failure> {
        outcome.endpoint.clear();
        let attempt = async {
            let req = upstream_request(head, body, target);
            let unsent = |req: Request<Body>, status, reason: String| Failure {
                status,
                reason,
                unsent: Some(req.into_body()),
            };
            let routes = match self.waypoint.plan(snapshot, &self.me, target.addr()) {
                Ok(routes) => routes,
                Err(e) => return Err(unsent(req, StatusCode::SERVICE_UNAVAILABLE, e)),
            };
            let upstreams = self.waypoint.upstreams();
            let key = |endpoint| Key {
                endpoint,
                http2: head.version() == Version::HTTP_2,
                client: self.client.addr,
                host: target.hostname(),
            };
            let mut req = req;
            // A kept connection to the endpoint the balancer chose first.
            if let Some(first) = routes.first() {
                let endpoint = first.endpoint();
                match upstreams.send_reused(&key(endpoint), req).await {
                    Ok(resp) => {
                        outcome.endpoint = endpoint.to_string();
                        return Ok(resp);
                    }
                    Err(ReuseError::Failed(e)) => {
                        outcome.endpoint = endpoint.to_string();
                        return Err(Failure::sent(
                            StatusCode::BAD_GATEWAY,
                            format!("upstream: {e}"),
                        ));
                    }
                    Err(ReuseError::NoConnection(back)) => req = *back,
                }
            }
            let (upstream, endpoint) =
                match self.waypoint.connect(&routes, &self.client, target).await {
                    Ok(connected) => connected,
                    Err(e) => return Err(unsent(req, StatusCode::SERVICE_UNAVAILABLE, e)),
                };
            outcome.endpoint = endpoint.to_string();
            upstreams
                .send_new(key(endpoint), upstream, req)
                .await
                .map_err(|e| Failure::sent(StatusCode::BAD_GATEWAY, format!("upstream: {e}")))
        };
        let resp = match rule.timeouts.backend_request_ms {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), attempt)
                .await
                .map_err(|_| {
                    Failure::sent(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("no response within the backend's {ms} ms timeout"),
                    )
                })??,
            None => attempt.await?,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// A try that failed, and the request body when it was not sent at all
/// (no endpoint, no connection): the next try sends it.
struct Failure {
    status: StatusCode,
    reason: String,
    unsent: Option<Body>,
}

impl Failure {
    /// A failure after the body went (or may have gone) out.
    fn sent(status: StatusCode, reason: String) -> Self {
        Self {
            status,
            reason,
            unsent: None,
        }
    }
}

/// What the first try sent of the request body.
#[derive(Debug, Default)]
struct Kept {
    data: BytesMut,
    /// The body was read to its end.
    complete: bool,
    /// Over the bound, or with trailers: cannot be sent again.
    lost: bool,
}

impl Kept {
    fn see(&mut self, seen: Seen<'_>) {
        match seen {
            Seen::Data(_) if self.lost => {}
            Seen::Data(data) if self.data.len() + data.len() > RETRY_BODY_LIMIT => {
                self.lost = true;
                self.data = BytesMut::new();
            }
            Seen::Data(data) => self.data.extend_from_slice(data),
            Seen::Trailers | Seen::Error => self.lost = true,
            Seen::End => self.complete = true,
        }
    }

    /// The whole body, when it can be sent again.
    fn replay(&self) -> Option<Bytes> {
        (self.complete && !self.lost).then(|| self.data.clone().freeze())
    }
}

/// The request as sent on: origin-form for HTTP/1.1, absolute for HTTP/2
/// (its `:scheme` and `:authority`).
fn upstream_request(head: &Request<()>, body: Body, target: &Target) -> Request<Body> {
    let mut uri = http::uri::Parts::default();
    uri.path_and_query = Some(
        head.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    if head.version() == Version::HTTP_2 {
        // The client's host when it is a valid authority, else the
        // address it dialled.
        let authority = host(head)
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .or_else(|| target.addr().to_string().parse().ok());
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = authority;
    }
    let mut req = Request::new(body);
    *req.method_mut() = head.method().clone();
    *req.version_mut() = head.version();
    *req.headers_mut() = head.headers().clone();
    match Uri::from_parts(uri) {
        Ok(uri) => *req.uri_mut() = uri,
        // Only an authority-less HTTP/2 URI could fail, and a socket
        // address always is one: the request's own URI is kept.
        Err(_) => *req.uri_mut() = head.uri().clone(),
    }
    req
}

/// The host the client addressed: `Host`, or the HTTP/2 `:authority`.
fn host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// Headers of one hop only (RFC 9110 §7.6.1); `te: trailers` is kept
/// (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    let only_trailers = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !only_trailers {
        headers.remove(header::TE);
    }
}

/// Gateway API header modifiers: set replaces, add appends, remove drops.
/// Names and values were checked by the controller; one that is still not
/// valid HTTP is skipped.
fn edit(headers: &mut HeaderMap, edits: &HeaderEdits) {
    let pair = |(n, v): &(String, String)| {
        Some((
            HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (name, value) in edits.set.iter().filter_map(pair) {
        headers.insert(name, value);
    }
    for (name, value) in edits.add.iter().filter_map(pair) {
        headers.append(name, value);
    }
    for name in &edits.remove {
        if let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            headers.remove(name);
        }
    }
}

/// The path after a prefix rewrite: the matched prefix replaced.
fn replace_prefix(path: &str, matched: &str, replacement: &str) -> String {
    let rest = path
        .get(matched.trim_end_matches('/').len()..)
        .unwrap_or_default();
    let joined = format!("{}{rest}", replacement.trim_end_matches('/'));
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

fn rewritten_path(
    rewrite: Option<&PathRewrite>,
    path: &str,
    selected: &Selected,
) -> Result<String, String> {
    Ok(match rewrite {
        None => path.to_string(),
        Some(PathRewrite::Full(p)) => p.clone(),
        Some(PathRewrite::Prefix(p)) => match &selected.prefix {
            Some(matched) if prefix_matches(matched, path) => replace_prefix(path, matched, p),
            _ => return Err("a prefix rewrite on a rule without a path prefix match".into()),
        },
    })
}

fn rewrite_request<B>(
    req: &mut Request<B>,
    rewrite: &Rewrite,
    selected: &Selected,
) -> Result<(), String> {
    if let Some(hostname) = &rewrite.hostname {
        let value = HeaderValue::from_str(hostname).map_err(|e| format!("hostname: {e}"))?;
        req.headers_mut().insert(header::HOST, value);
    }
    if rewrite.path.is_some() {
        let path = rewritten_path(rewrite.path.as_ref(), req.uri().path(), selected)?;
        set_path(req, path)?;
    }
    Ok(())
}

/// Replaces the request's path, keeping its query.
fn set_path<B>(req: &mut Request<B>, path: String) -> Result<(), String> {
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|e| format!("path {path_and_query:?}: {e}"))?,
    );
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| format!("URI: {e}"))?;
    Ok(())
}

/// RFC 3986 normalization of a request path: percent-encoded unreserved
/// characters decoded, repeated slashes merged, `.` and `..` segments
/// removed (never above the root). A path without a leading `/` (CONNECT,
/// `*`) is left alone.
fn normalize_path(path: &str) -> String {
    if !path.starts_with('/') {
        return path.to_string();
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
            && (b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            decoded.push(b);
            i += 3;
            continue;
        }
        // Other bytes as they are (a path may hold raw UTF-8).
        decoded.push(bytes[i]);
        i += 1;
    }
    // Only ASCII was decoded into a valid UTF-8 text.
    let decoded = String::from_utf8(decoded).unwrap_or_else(|_| path.to_string());
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in decoded.split('/').skip(1) {
        trailing = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

fn redirect_response<B>(
    redirect: &Redirect,
    req: &Request<B>,
    host: Option<&str>,
    listener_port: u16,
    selected: &Selected,
) -> Response<Body> {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let hostname = redirect
        .hostname
        .clone()
        .or_else(|| host.map(|h| crate::table::strip_port(h).to_string()))
        .unwrap_or_default();
    let default_port = if scheme == "https" { 443 } else { 80 };
    // Neither scheme nor port given: the port the request came to (the
    // Service port), as Gateway API asks.
    let port = match (redirect.port, &redirect.scheme) {
        (Some(p), _) => p,
        (None, None) => listener_port,
        (None, Some(_)) => default_port,
    };
    let port = if port == default_port {
        String::new()
    } else {
        format!(":{port}")
    };
    let path = match rewritten_path(redirect.path.as_ref(), req.uri().path(), selected) {
        Ok(path) => path,
        Err(reason) => return local(StatusCode::INTERNAL_SERVER_ERROR, &reason),
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = format!("{scheme}://{hostname}{port}{path}{query}");
    let status = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND);
    let mut resp = local(status, &format!("redirected to {location}"));
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            resp.headers_mut().insert(header::LOCATION, value);
            resp
        }
        Err(_) => local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "redirect location is not valid",
        ),
    }
}

/// Which backend a request goes to.
#[derive(Debug, PartialEq, Eq)]
enum Picked<'a> {
    /// No backends: the Service the request addressed.
    Addressed,
    Service(&'a str, u16),
    /// A reference that did not resolve got the request: 500.
    Unresolved(u16),
    Nothing,
}

fn pick(backends: &[Backend]) -> Picked<'_> {
    if backends.is_empty() {
        return Picked::Addressed;
    }
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return Picked::Nothing;
    }
    let mut ticket = rand::random_range(0..total);
    for b in backends {
        if ticket < u64::from(b.weight) {
            return match &b.service {
                Some(s) => Picked::Service(s, b.port),
                None => Picked::Unresolved(b.port),
            };
        }
        ticket -= u64::from(b.weight);
    }
    Picked::Nothing
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use super::*;

    #[test]
    fn weights_share_requests() {
        let backends = [
            Backend {
                service: Some("demo/v1".into()),
                port: 80,
                weight: 3,
            },
            Backend {
                service: Some("demo/v2".into()),
                port: 80,
                weight: 1,
            },
            Backend {
                service: Some("demo/never".into()),
                port: 80,
                weight: 0,
            },
        ];
        let mut v1 = 0;
        for _ in 0..4000 {
            match pick(&backends) {
                Picked::Service("demo/v1", 80) => v1 += 1,
                Picked::Service("demo/v2", 80) => {}
                other => panic!("{other:?}"),
            }
        }
        // 3000 expected; 6 standard deviations (≈ 27 each) either side.
        assert!((2840..3160).contains(&v1), "{v1} of 4000 to v1");
        assert_eq!(pick(&[]), Picked::Addressed);
        let unresolved = [Backend {
            service: None,
            port: 80,
            weight: 1,
        }];
        assert_eq!(pick(&unresolved), Picked::Unresolved(80));
        let zero = [Backend {
            service: Some("demo/v1".into()),
            port: 80,
            weight: 0,
        }];
        assert_eq!(pick(&zero), Picked::Nothing);
    }

    #[test]
    fn paths_are_matched_and_sent_in_one_form() {
        for (raw, normal) in [
            ("/admin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/./admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/%2e%2e/admin", "/admin"),
            ("/a%2Fb", "/a%2Fb"),
            ("/../../admin", "/admin"),
            ("/dir/", "/dir/"),
            ("/dir/.", "/dir/"),
            ("/", "/"),
            ("*", "*"),
            ("/caf\u{e9}/./menu", "/caf\u{e9}/menu"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
    }

    #[test]
    fn prefix_rewrites_replace_the_matched_segments() {
        assert_eq!(
            replace_prefix("/api/v1/items", "/api", "/v2"),
            "/v2/v1/items"
        );
        assert_eq!(replace_prefix("/api/items", "/api/", "/"), "/items");
        assert_eq!(replace_prefix("/api", "/api", "/"), "/");
        assert_eq!(replace_prefix("/api", "/api", "/new/"), "/new");
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "close, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        headers.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key(header::TE));
    }

    #[test]
    fn header_edits_set_add_and_remove() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "old".parse().unwrap());
        headers.insert("x-gone", "1".parse().unwrap());
        edit(
            &mut headers,
            &HeaderEdits {
                set: vec![("X-A".into(), "new".into())],
                add: vec![("x-a".into(), "more".into())],
                remove: vec!["X-Gone".into()],
            },
        );
        let values: Vec<&str> = headers
            .get_all("x-a")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(values, ["new", "more"]);
        assert!(!headers.contains_key("x-gone"));
    }
}
