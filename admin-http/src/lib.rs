//! The small HTTP servers of admin, metrics and health endpoints: plain
//! HTTP/1 or HTTP/2 on a listener the caller binds (loopback for admin),
//! each request answered synchronously from in-memory state; and the
//! Prometheus [`registry::Registry`] such endpoints render.

pub mod registry;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::body::Incoming;
use hyper::service::service_fn;
pub use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A request as handlers see it.
pub type Req = Request<Incoming>;

/// A complete response.
pub type Reply = Response<Full<Bytes>>;

pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

pub fn json(value: &impl Serialize) -> Reply {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

pub fn text(status: StatusCode, body: String) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

/// `405` for a path that exists under other methods, naming them in
/// `Allow` as HTTP requires.
pub fn method_not_allowed(allow: &'static str, body: String) -> Reply {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, body);
    resp.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    resp
}

/// Logs a failed `accept` and waits a little before the next: the usual
/// cause, running out of file descriptors, lasts a while, and retrying at
/// once would spin a core and flood the log.
pub async fn after_accept_error(error: &std::io::Error, listener: &str) {
    tracing::warn!(%error, listener, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` with `route` until `stop`.
pub async fn serve<F>(listener: TcpListener, route: F, stop: CancellationToken)
where
    F: Fn(&Req) -> Reply + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    after_accept_error(&error, "admin").await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = route(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
