//! A small Kubernetes API server for tests: it speaks the real REST and
//! watch JSON protocol (list with a collection `resourceVersion`, watch as
//! newline-delimited events, label selectors, optimistic concurrency on
//! replace, JSON merge patches, server-side apply (as create-or-merge: field
//! ownership is not tracked), the `/status` subresource, `Status` errors),
//! so kube's
//! watchers, reflectors and clients run against it unchanged. Objects live
//! in memory; every change is an event with a new resource version.
//! TokenReviews are answered from a table the test fills.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

/// `group/version/plural`, `group` empty for the core API.
type Collection = String;

#[derive(Debug, Clone)]
struct Event {
    collection: Collection,
    namespace: Option<String>,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    objects: BTreeMap<(Collection, Option<String>, String), Value>,
    /// Every event with its resource version, for watches that start in
    /// the past.
    log: Vec<(u64, Event)>,
    /// token → (username, extra)
    tokens: HashMap<String, (String, BTreeMap<String, Vec<String>>)>,
    /// `METHOD path` of every request, oldest first.
    requests: Vec<String>,
}

/// The server; dropping it stops it.
#[derive(Debug)]
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(u64, Event)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where a request points.
#[derive(Debug)]
struct Target {
    collection: Collection,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let collection = |plural: &str| format!("{group}/{version}/{plural}");
    let target = |plural: &str, namespace: Option<&str>, name: Option<&str>, status| Target {
        collection: collection(plural),
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        status,
    };
    Some(match rest {
        [plural] => target(plural, None, None, false),
        ["namespaces", ns, plural] => target(plural, Some(ns), None, false),
        ["namespaces", ns, plural, name] => target(plural, Some(ns), Some(name), false),
        ["namespaces", ns, plural, name, "status"] => target(plural, Some(ns), Some(name), true),
        [plural, name] => target(plural, None, Some(name), false),
        [plural, name, "status"] => target(plural, None, Some(name), true),
        _ => return None,
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A Kubernetes `Status` error.
fn failure(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// Whether `object`'s labels satisfy a `labelSelector` (equality and
/// existence terms: `k=v`, `k==v`, `k!=v`, `k`, `!k`).
fn selects(selector: Option<&String>, object: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &object["metadata"]["labels"];
    selector.split(',').all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k].as_str() == Some(v.trim_start_matches('='))
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else {
            labels.get(term).is_some()
        }
    })
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Percent-decoding of a query component.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeApiServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        let state = Arc::new(Mutex::new(State::default()));
        let (events, _) = broadcast::channel(4096);
        let (st, ev) = (state.clone(), events.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (st, ev) = (st.clone(), ev.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (st, ev) = (st.clone(), ev.clone());
                        async move { Ok::<_, Infallible>(handle(&st, &ev, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                });
            }
        });
        Self {
            addr,
            state,
            events,
            task,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The URL for a kube client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A TokenReview of `token` authenticates `username` with `extra`.
    pub fn add_token(&self, token: &str, username: &str, extra: &[(&str, &str)]) {
        let extra = extra
            .iter()
            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
            .collect();
        self.lock()
            .tokens
            .insert(token.into(), (username.into(), extra));
    }

    /// Creates or replaces an object, as `kubectl apply` would. `path` is
    /// its collection URL (`/api/v1/namespaces/shop/pods`).
    pub fn apply(&self, path: &str, object: Value) {
        let key = object_key(path, &object);
        let mut state = self.lock();
        let kind = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        record(&mut state, &self.events, key, Some(object), kind);
    }

    /// Stores an object without telling watchers, as if their watch were
    /// behind: a writer holding the previous version gets 409 Conflict.
    pub fn apply_unannounced(&self, path: &str, mut object: Value) {
        let key = object_key(path, &object);
        let mut state = self.lock();
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.objects.insert(key, object);
    }

    /// Deletes an object.
    pub fn delete(&self, path: &str, name: &str) {
        let target = parse_path(path).expect("a collection path");
        let mut state = self.lock();
        let key = (target.collection, target.namespace, name.to_string());
        if state.objects.contains_key(&key) {
            record(&mut state, &self.events, key, None, "DELETED");
        }
    }

    /// An object as stored.
    pub fn get(&self, path: &str, name: &str) -> Option<Value> {
        let target = parse_path(path).expect("a collection path");
        self.lock()
            .objects
            .get(&(target.collection, target.namespace, name.to_string()))
            .cloned()
    }

    /// Requests served so far, as `METHOD path`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }
}

/// Where `object`, of the collection at `path`, is stored.
fn object_key(path: &str, object: &Value) -> (Collection, Option<String>, String) {
    let target = parse_path(path).expect("a collection path");
    let name = object["metadata"]["name"]
        .as_str()
        .expect("metadata.name")
        .to_string();
    (target.collection, target.namespace, name)
}

/// Stores (or removes, when `object` is `None`) and logs one change.
fn record(
    state: &mut State,
    events: &broadcast::Sender<(u64, Event)>,
    key: (Collection, Option<String>, String),
    object: Option<Value>,
    kind: &'static str,
) -> Value {
    state.version += 1;
    let version = state.version;
    let mut stored = match object {
        Some(mut object) => {
            let meta = &mut object["metadata"];
            meta["resourceVersion"] = json!(version.to_string());
            if meta.get("uid").is_none() {
                meta["uid"] = json!(format!("uid-{version}"));
            }
            if meta.get("generation").is_none() {
                meta["generation"] = json!(1);
            }
            if let Some(ns) = &key.1 {
                meta["namespace"] = json!(ns);
            }
            state.objects.insert(key.clone(), object.clone());
            object
        }
        None => state.objects.remove(&key).unwrap_or(Value::Null),
    };
    if kind == "DELETED" {
        stored["metadata"]["resourceVersion"] = json!(version.to_string());
    }
    let event = Event {
        collection: key.0,
        namespace: key.1,
        kind,
        object: stored.clone(),
    };
    state.log.push((version, event.clone()));
    let _ = events.send((version, event));
    stored
}

async fn handle(
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<(u64, Event)>,
    req: Request<Incoming>,
) -> Response<Body> {
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    let path = req.uri().path().to_string();
    lock().requests.push(format!("{} {path}", req.method()));
    let Some(target) = parse_path(&path) else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {path}"),
        );
    };
    let q = query(&req);
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
        }
    };
    let key = |name: &str| {
        (
            target.collection.clone(),
            target.namespace.clone(),
            name.to_string(),
        )
    };
    match (method, &target.name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true") => {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290);
            let selector = q.get("labelSelector").cloned();
            watch(
                state,
                events,
                target,
                selector,
                from,
                Duration::from_secs(timeout),
            )
        }
        (Method::GET, None) => {
            let state = lock();
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|((c, ns, _), v)| {
                    *c == target.collection
                        && (target.namespace.is_none() || *ns == target.namespace)
                        && selects(q.get("labelSelector"), v)
                })
                .map(|(_, v)| v.clone())
                .collect();
            full(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": state.version.to_string()},
                        "items": items}),
            )
        }
        (Method::GET, Some(name)) => match lock().objects.get(&key(name)) {
            Some(v) => full(StatusCode::OK, v),
            None => failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{name} not found"),
            ),
        },
        (Method::POST, None) if target.collection.ends_with("/tokenreviews") => {
            let token = body["spec"]["token"].as_str().unwrap_or("");
            let mut review = body.clone();
            review["status"] = match lock().tokens.get(token) {
                Some((username, extra)) => json!({"authenticated": true,
                    "user": {"username": username, "extra": extra},
                    "audiences": body["spec"]["audiences"]}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            full(StatusCode::CREATED, &review)
        }
        (Method::POST, None) => {
            let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
            let mut state = lock();
            if state.objects.contains_key(&key(&name)) {
                return failure(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{name} already exists"),
                );
            }
            let stored = record(&mut state, events, key(&name), Some(body), "ADDED");
            full(StatusCode::CREATED, &stored)
        }
        (Method::PUT, Some(name)) => {
            let mut state = lock();
            let Some(current) = state.objects.get(&key(name)) else {
                return failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                );
            };
            let want = body["metadata"]["resourceVersion"].as_str();
            if want.is_some() && want != current["metadata"]["resourceVersion"].as_str() {
                return failure(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "the object {name} has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            let stored = record(&mut state, events, key(name), Some(body), "MODIFIED");
            full(StatusCode::OK, &stored)
        }
        (Method::PATCH, Some(name)) => {
            let apply = content_type.starts_with("application/apply-patch");
            if !apply && !content_type.starts_with("application/merge-patch+json") {
                return failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!("this fake takes merge patches and apply patches, not {content_type}"),
                );
            }
            if apply && q.get("fieldManager").is_none_or(String::is_empty) {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "PATCH, application/apply-patch+yaml: fieldManager is required".into(),
                );
            }
            let mut state = lock();
            let Some(mut object) = state.objects.get(&key(name)).cloned() else {
                if apply && !target.status {
                    // Server-side apply creates what is not there.
                    let mut object = body;
                    if let Some(o) = object.as_object_mut() {
                        o.remove("status");
                    }
                    let stored = record(&mut state, events, key(name), Some(object), "ADDED");
                    return full(StatusCode::CREATED, &stored);
                }
                return failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                );
            };
            // A resource version in a patch is a precondition.
            let want = body["metadata"]["resourceVersion"].as_str();
            if want.is_some() && want != object["metadata"]["resourceVersion"].as_str() {
                return failure(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "the object {name} has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            // The status subresource changes the status only; the main
            // resource everything but.
            let mut patch = body;
            if let Some(p) = patch.as_object_mut() {
                if target.status {
                    p.retain(|k, _| k == "status");
                } else {
                    p.remove("status");
                }
            }
            merge(&mut object, &patch);
            let stored = record(&mut state, events, key(name), Some(object), "MODIFIED");
            full(StatusCode::OK, &stored)
        }
        (Method::DELETE, Some(name)) => {
            let mut state = lock();
            if !state.objects.contains_key(&key(name)) {
                return failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                );
            }
            let stored = record(&mut state, events, key(name), None, "DELETED");
            full(StatusCode::OK, &stored)
        }
        (m, _) => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} {path}"),
        ),
    }
}

/// Events of `target`'s collection after version `from`, then new ones as
/// they happen, one JSON object per line, until `timeout`.
fn watch(
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<(u64, Event)>,
    target: Target,
    selector: Option<String>,
    from: u64,
    timeout: Duration,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    // Subscribe before reading the log, so nothing falls in between.
    let mut live = events.subscribe();
    let past: Vec<(u64, Event)> = state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .log
        .iter()
        .filter(|(v, _)| *v > from)
        .cloned()
        .collect();
    let matches = move |e: &Event| {
        e.collection == target.collection
            && (target.namespace.is_none() || e.namespace == target.namespace)
            && selects(selector.as_ref(), &e.object)
    };
    tokio::spawn(async move {
        let line = |e: &Event| {
            Ok(Frame::data(Bytes::from(format!(
                "{}\n",
                json!({"type": e.kind, "object": e.object})
            ))))
        };
        let mut last = from;
        for (v, e) in past.iter().filter(|(_, e)| matches(e)) {
            last = *v;
            if tx.send(line(e)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok((v, e)) if v > last && matches(&e) => {
                        last = v;
                        if tx.send(line(&e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too far behind: tell the watcher to relist.
                        let gone = json!({"type": "ERROR", "object": {"kind": "Status",
                            "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                            "message": "too old resource version", "code": 410}});
                        let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{gone}\n"))))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = &mut deadline => return,
                () = tx.closed() => return,
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
