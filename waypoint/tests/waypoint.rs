//! The real waypoint on loopback, with a mesh config file and a CA
//! directory: a test client plays the source ztunnel (HBONE with a pod's
//! identity, `:authority` = the Service VIP:port), one backend is meshed
//! (HBONE server with its own identity on its 15008, then its app), the
//! other is plain TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::convert::Infallible;
use std::sync::Arc;
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
use waypoint::app::{self, Config, Source};

/// The addresses of one test's waypoint and backends: each test has its
/// own `127.77.<net>.0/24`, so tests run in parallel.
struct Net {
    waypoint: String,
    v1: String,
    v2: String,
}

impl Net {
    fn new(net: u8) -> Self {
        Self {
            waypoint: format!("127.77.{net}.2"),
            v1: format!("127.77.{net}.3"),
            v2: format!("127.77.{net}.4"),
        }
    }
}

fn mesh(net: &Net, routes: &str) -> String {
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
    ports: [{{port: 80, targetPort: 8080}}, {{port: 9000}}]
    endpoints: [v1]
    waypoint: {{address: 10.96.0.9}}
  - {{name: echo-v2, namespace: demo, vips: [10.96.0.2], ports: [{{port: 80, targetPort: 8080}}], endpoints: [v2]}}
  - {{name: direct, namespace: demo, vips: [10.96.0.3], ports: [{{port: 80, targetPort: 8080}}], endpoints: [v2]}}
routes:
{routes}
"#
    )
}

const ROUTES: &str = r#"  - namespace: demo
    name: echo
    kind: HTTPRoute
    parents: [{service: demo/echo, port: 80, waypoint: demo/waypoint}]
    rules:
      - matches: [{path: !prefix /v2}]
        filters:
          - !responseHeaders {set: [[x-route, v2]]}
          - !rewrite {path: !prefix /}
        backends: [{service: demo/echo-v2, port: 80, weight: 1}]
      - matches: [{path: !exact /moved}]
        filters: [!redirect {path: !full /new, status: 301}]
      - matches: [{path: !prefix /broken}]
        backends: [{port: 80, weight: 1}]
      - matches: [{path: !prefix /}]
        filters: [!requestHeaders {add: [[x-through, waypoint]]}]
        backends: []
"#;

/// An HTTP/1.1 + HTTP/2 app on `ip:8080` that answers with its name, the
/// path it saw and the `x-through` header it got; and a TCP echo on 9000.
async fn app(ip: &str, name: &'static str) {
    let http = TcpListener::bind((ip, 8080)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = http.accept().await {
            tokio::spawn(async move {
                let service = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let through = req
                            .headers()
                            .get("x-through")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        let body = format!("{name} {} {through}", req.uri().path());
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    },
                );
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

struct Setup {
    _dir: tempfile::TempDir,
    waypoint: app::App,
    pool: Pool,
    client: Identity,
    td: TrustDomain,
}

async fn setup(net: u8) -> Setup {
    let net = Net::new(net);
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    CertificateAuthority::write_root(dir.path(), &td).unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh(&net, ROUTES)).unwrap();
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
        waypoint,
        pool: Pool::new(certs, PoolConfig::default()),
        client: Identity::new(td.clone(), "demo", "sleep").unwrap(),
        td,
    }
}

impl Setup {
    /// A tunnel to the waypoint for `authority`, as the source ztunnel
    /// opens it.
    async fn tunnel(&self, authority: &str) -> Result<tokio::io::DuplexStream, hbone::Error> {
        let key = PoolKey::new(
            self.client.clone(),
            vec![Identity::new(self.td.clone(), "demo", "waypoint").unwrap()],
            self.waypoint.hbone_addr,
            None,
        );
        let stream = self
            .pool
            .connect(&key, &ConnectRequest::new(authority.parse().unwrap()))
            .await?;
        Ok(hbone::copy::attach(stream))
    }

    async fn get(
        &self,
        authority: &str,
        path: &str,
        http2: bool,
    ) -> (u16, String, hyper::HeaderMap) {
        let io = TokioIo::new(self.tunnel(authority).await.unwrap());
        let req = hyper::Request::builder()
            .uri(if http2 {
                format!("http://echo.demo{path}")
            } else {
                path.to_string()
            })
            .header("host", "echo.demo")
            .body(Full::new(Bytes::new()))
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

    async fn metrics(&self) -> String {
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

#[tokio::test]
async fn routes_apply_to_http_and_other_traffic_passes_as_tcp() {
    let s = setup(1).await;
    for http2 in [false, true] {
        // The last rule: to the Service addressed, with a header added.
        let (status, body, _) = s.get("10.96.0.1:80", "/hello", http2).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "v1 /hello waypoint"),
            "http2 {http2}"
        );
        // A prefix rule to another Service, path rewritten, response
        // header set.
        let (status, body, headers) = s.get("10.96.0.1:80", "/v2/items", http2).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "v2 /items "),
            "http2 {http2}"
        );
        assert_eq!(headers["x-route"], "v2");
        let (status, _, headers) = s.get("10.96.0.1:80", "/moved?a=1", http2).await;
        assert_eq!(status, 301);
        assert_eq!(headers["location"], "http://echo.demo/new?a=1");
        // A backend whose reference did not resolve: 500, as Gateway API
        // asks.
        let (status, body, _) = s.get("10.96.0.1:80", "/broken", http2).await;
        assert_eq!(status, 500, "{body}");
    }
    // A port without routes: bytes passed on to an endpoint's same port.
    let mut tcp = s.tunnel("10.96.0.1:9000").await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    let metrics = s.metrics().await;
    for line in [
        r#"ambit_requests_total{reporter="waypoint",destination_service="demo/echo",route="HTTPRoute demo/echo",response_code="200"} 4"#,
        r#"ambit_requests_total{reporter="waypoint",destination_service="demo/echo",route="HTTPRoute demo/echo",response_code="301"} 2"#,
        r#"ambit_waypoint_tunnels_total{destination_service="demo/echo",mode="tcp"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    s.waypoint.shutdown().await;
}

#[tokio::test]
async fn destinations_that_do_not_use_the_waypoint_are_refused() {
    let s = setup(2).await;
    // A Service with no waypoint, and an address the mesh does not know.
    for authority in ["10.96.0.3:80", "192.0.2.1:80"] {
        let error = s.tunnel(authority).await.unwrap_err().to_string();
        assert!(error.contains("503"), "{authority}: {error}");
    }
    let metrics = s.metrics().await;
    for line in [
        r#"ambit_waypoint_tunnels_refused_total{destination_service="unknown",reason="not_this_waypoint"} 1"#,
        r#"ambit_waypoint_tunnels_refused_total{destination_service="unknown",reason="unknown_destination"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    s.waypoint.shutdown().await;
}
