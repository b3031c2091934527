//! A waypoint on loopback for tests and benchmarks, with a mesh config
//! file and a CA directory: a client plays the source ztunnel (HBONE with a
//! pod's identity, `:authority` = the Service VIP:port); backend `v1` is
//! meshed (an HBONE server with its own identity on its 15008, then its
//! app), `v2` is plain TCP. Each setup has its own `127.77.<net>.0/24`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test support: a panic is the failure report.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hbone::testing::Forward;
use hbone::{ConnectRequest, Pool, PoolConfig, PoolKey, Server, ServerOptions};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use identity::{CertManager, CertificateAuthority, Identity, InProcessCa, PluggedCa, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::app::{self, Config, Source};

/// The addresses of one test's waypoint and backends: each test has its
/// own `127.77.<net>.0/24`, so tests run in parallel.
#[derive(Debug)]
pub struct Net {
    pub waypoint: String,
    pub v1: String,
    pub v2: String,
}

impl Net {
    pub fn new(net: u8) -> Self {
        Self {
            waypoint: format!("127.77.{net}.2"),
            v1: format!("127.77.{net}.3"),
            v2: format!("127.77.{net}.4"),
        }
    }
}

/// Services `demo/echo` (endpoint v1, using the waypoint; ports 80 → 8080
/// and `tcp-echo` 9000), `demo/echo-v2` (v2), `demo/direct` (v2, no
/// waypoint), the waypoint's own, and `routes` (YAML list items).
pub fn mesh(net: &Net, routes: &str) -> String {
    let Net {
        waypoint: wp_ip,
        v1: v1_ip,
        v2: v2_ip,
    } = net;
    format!(
        r#"
workloads:
  - {{uid: wp, name: waypoint-0, namespace: demo, serviceAccount: waypoint, ips: [{wp_ip}], node: n1}}
  - {{uid: v1, name: echo-v1, namespace: demo, serviceAccount: echo, ips: [{v1_ip}], node: n1, protocol: HBONE}}
  - {{uid: v2, name: echo-v2, namespace: demo, serviceAccount: echo, ips: [{v2_ip}], node: n1}}
services:
  - {{name: waypoint, namespace: demo, vips: [10.96.0.9], ports: [{{port: 15008}}], endpoints: [wp]}}
  - name: echo
    namespace: demo
    vips: [10.96.0.1]
    ports: [{{port: 80, targetPort: 8080}}, {{name: tcp-echo, port: 9000}}]
    endpoints: [v1]
    waypoint: {{address: 10.96.0.9}}
  - {{name: echo-v2, namespace: demo, vips: [10.96.0.2], ports: [{{port: 80, targetPort: 8080}}], endpoints: [v2]}}
  - {{name: direct, namespace: demo, vips: [10.96.0.3], ports: [{{port: 80, targetPort: 8080}}], endpoints: [v2]}}
routes:
{routes}
"#
    )
}

/// An HTTP/1.1 + HTTP/2 app on `ip:8080` that answers with its name, the
/// path it saw and the `x-through` header it got (`/flaky`: every other
/// call 503, the request body echoed; `/slow`: after 30 s); and a TCP echo
/// on 9000.
pub async fn app(ip: &str, name: &'static str) {
    let http = TcpListener::bind((ip, 8080)).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = http.accept().await {
            let calls = calls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let calls = calls.clone();
                    async move { Ok::<_, Infallible>(answer(name, &calls, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    let tcp = TcpListener::bind((ip, 9000)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

async fn answer(
    name: &str,
    calls: &AtomicUsize,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let through = req
        .headers()
        .get("x-through")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    let got = req.into_body().collect().await.unwrap().to_bytes();
    let mut resp = hyper::Response::new(Full::new(Bytes::from(format!("{name} {path} {through}"))));
    match path.as_str() {
        "/flaky" => {
            if calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
                *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            }
            *resp.body_mut() = Full::new(got);
        }
        "/slow" => tokio::time::sleep(Duration::from_secs(30)).await,
        _ => {}
    }
    resp
}

#[derive(Debug)]
pub struct Setup {
    _dir: tempfile::TempDir,
    pub net: Net,
    pub waypoint: app::App,
    pub pool: Pool,
    pub client: Identity,
    pub td: TrustDomain,
}

/// The apps, v1's HBONE server and the waypoint with `routes`.
pub async fn setup(net: u8, routes: &str) -> Setup {
    let net = Net::new(net);
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    CertificateAuthority::write_root(dir.path(), &td).unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh(&net, routes)).unwrap();
    let ca = CertificateAuthority::plugged(
        td.clone(),
        identity::ca::DEFAULT_LEAF_TTL,
        &PluggedCa::from_dir(dir.path()).unwrap(),
    )
    .unwrap();
    let certs = CertManager::new(Arc::new(InProcessCa::new(Arc::new(ca))));

    // The meshed backend: its ztunnel's HBONE server, then its app.
    app(&net.v1, "v1").await;
    app(&net.v2, "v2").await;
    let echo_id = Identity::new(td.clone(), "demo", "echo").unwrap();
    let hbone = TcpListener::bind((net.v1.as_str(), 15008)).await.unwrap();
    let server = Server::new(Forward::default(), ServerOptions::default());
    tokio::spawn(server.serve(hbone, certs.clone(), echo_id));

    let waypoint = app::build(Config {
        namespace: "demo".into(),
        service_account: "waypoint".into(),
        trust_domain: "cluster.local".into(),
        listen: format!("{}:15008", net.waypoint).parse().unwrap(),
        metrics_addr: format!("{}:0", net.waypoint).parse().unwrap(),
        source: Source::Local {
            mesh_config: mesh_file,
            ca_dir: dir.path().to_path_buf(),
        },
    })
    .await
    .unwrap();
    Setup {
        _dir: dir,
        net,
        waypoint,
        pool: Pool::new(certs, PoolConfig::default()),
        client: Identity::new(td.clone(), "demo", "sleep").unwrap(),
        td,
    }
}

impl Setup {
    /// A tunnel to the waypoint for `authority`, as the source ztunnel
    /// opens it.
    pub async fn tunnel(&self, authority: &str) -> Result<hbone::copy::Attached, hbone::Error> {
        let waypoint = Identity::new(self.td.clone(), "demo", "waypoint").unwrap();
        self.tunnel_via(self.waypoint.hbone_addr, waypoint, authority)
            .await
    }

    /// A tunnel straight to backend v1's HBONE server for its app's
    /// `port`: the path without a waypoint.
    pub async fn direct_tunnel(&self, port: u16) -> Result<hbone::copy::Attached, hbone::Error> {
        let echo = Identity::new(self.td.clone(), "demo", "echo").unwrap();
        let hbone = format!("{}:15008", self.net.v1).parse().unwrap();
        self.tunnel_via(hbone, echo, &format!("{}:{port}", self.net.v1))
            .await
    }

    async fn tunnel_via(
        &self,
        hbone: std::net::SocketAddr,
        expected: Identity,
        authority: &str,
    ) -> Result<hbone::copy::Attached, hbone::Error> {
        let key = PoolKey::new(self.client.clone(), vec![expected], hbone, None);
        let stream = self
            .pool
            .connect(&key, &ConnectRequest::new(authority.parse().unwrap()))
            .await?;
        Ok(hbone::copy::attach(stream))
    }

    pub async fn get(
        &self,
        authority: &str,
        path: &str,
        http2: bool,
    ) -> (u16, String, hyper::HeaderMap) {
        self.send(authority, "GET", path, "", http2).await
    }

    pub async fn send(
        &self,
        authority: &str,
        method: &str,
        path: &str,
        body: &'static str,
        http2: bool,
    ) -> (u16, String, hyper::HeaderMap) {
        let io = TokioIo::new(self.tunnel(authority).await.unwrap());
        let req = hyper::Request::builder()
            .method(method)
            .uri(if http2 {
                format!("http://echo.demo{path}")
            } else {
                path.to_string()
            })
            .header("host", "echo.demo")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = if http2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned(), headers)
    }

    pub async fn metrics(&self) -> String {
        let mut tcp = tokio::net::TcpStream::connect(self.waypoint.metrics_addr)
            .await
            .unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.unwrap();
        text
    }
}
