//! The echo server: answers every HTTP/1.1 or HTTP/2 (cleartext, prior
//! knowledge or upgrade-free) request with what it received and who it is,
//! and echoes raw bytes on a TCP port.
//!
//! - any path: `200` with a JSON body (pod, namespace, node, the peer address
//!   seen, method, path, HTTP version, request headers) and `x-ambit-pod`;
//! - `/status/<code>`: answers with that status;
//! - `/delay/<ms>`: answers after that many milliseconds (at most 60 s).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

/// Header carrying the answering pod's name, for load spread reports.
pub const POD_HEADER: &str = "x-ambit-pod";
const MAX_DELAY: Duration = Duration::from_secs(60);

/// Who this server is.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Identity {
    pub pod: String,
    pub namespace: String,
    pub node: String,
}

#[derive(Debug, Serialize)]
struct Reply<'a> {
    #[serde(flatten)]
    identity: &'a Identity,
    peer: String,
    method: String,
    path: String,
    version: String,
    headers: BTreeMap<String, String>,
    body_bytes: usize,
}

/// Serves HTTP on `http` until the task is dropped.
pub async fn serve_http(http: TcpListener, identity: Identity) -> io::Result<()> {
    let identity = std::sync::Arc::new(identity);
    loop {
        let (tcp, peer) = http.accept().await?;
        let _ = tcp.set_nodelay(true);
        let identity = identity.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, peer, identity.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder.serve_connection(TokioIo::new(tcp), service).await {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        });
    }
}

/// Echoes every byte on `tcp` connections back, until the task is dropped.
pub async fn serve_tcp(tcp: TcpListener) -> io::Result<()> {
    loop {
        let (mut conn, _) = tcp.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = conn.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    identity: std::sync::Arc<Identity>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let mut status = StatusCode::OK;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match ms.parse::<u64>() {
            Ok(ms) => tokio::time::sleep(Duration::from_millis(ms).min(MAX_DELAY)).await,
            Err(_) => status = StatusCode::BAD_REQUEST,
        }
    }
    let (parts, body) = req.into_parts();
    let body_bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let reply = Reply {
        identity: &identity,
        peer: peer.to_string(),
        method: parts.method.to_string(),
        path,
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_bytes,
    };
    let mut json = serde_json::to_vec_pretty(&reply).unwrap_or_default();
    json.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Ok(pod) = http::HeaderValue::from_str(&identity.pod) {
        headers.insert(POD_HEADER, pod);
    }
    Ok(resp)
}
