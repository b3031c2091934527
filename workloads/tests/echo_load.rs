//! The echo server and the load client against each other on loopback.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use workloads::echo::{self, Identity};
use workloads::grpc::EchoService;
use workloads::load::{self, LoadConfig};

fn identity() -> Identity {
    Identity {
        pod: "echo-7".into(),
        namespace: "shop".into(),
        node: "node-9".into(),
    }
}

async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(echo::serve_http(listener, identity()));
    addr
}

fn config(url: String) -> LoadConfig {
    LoadConfig {
        url: url.parse().unwrap(),
        requests: Some(20),
        duration: None,
        concurrency: 2,
        http2: false,
        grpc: false,
        new_connections: false,
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn http1_and_h2_requests_are_answered_with_the_pod_identity() {
    let addr = http_server().await;
    for http2 in [false, true] {
        let report = load::run(LoadConfig {
            http2,
            ..config(format!("http://{addr}/anything"))
        })
        .await
        .unwrap();
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.status.get(&200), Some(&20));
        assert_eq!(report.backends.get("echo-7"), Some(&20));
        assert!(report.latency_ms.p50 <= report.latency_ms.p99);
    }
}

#[tokio::test]
async fn status_and_delay_paths() {
    let addr = http_server().await;
    let report = load::run(config(format!("http://{addr}/status/503")))
        .await
        .unwrap();
    assert_eq!(report.status.get(&503), Some(&20));
    let report = load::run(LoadConfig {
        requests: Some(2),
        ..config(format!("http://{addr}/delay/150"))
    })
    .await
    .unwrap();
    assert!(report.latency_ms.p50 >= 150.0, "{report:?}");
    let report = load::run(config(format!("http://{addr}/status/abc")))
        .await
        .unwrap();
    assert_eq!(
        report.status.get(&400),
        Some(&20),
        "a bad code is a bad request"
    );
}

#[tokio::test]
async fn reply_describes_the_request_and_the_peer() {
    let addr = http_server().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    tcp.write_all(
        b"GET /x?y=1 HTTP/1.1\r\nhost: test\r\nx-trace: abc\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"));
    assert!(head.to_ascii_lowercase().contains("x-ambit-pod: echo-7"));
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["pod"], "echo-7");
    assert_eq!(json["namespace"], "shop");
    assert_eq!(json["node"], "node-9");
    assert_eq!(json["peer"], local.to_string());
    assert_eq!(json["path"], "/x");
    assert_eq!(json["headers"]["x-trace"], "abc");
}

#[tokio::test]
async fn tcp_port_echoes_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(echo::serve_tcp(listener));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"round trip").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut back = Vec::new();
    tcp.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"round trip");
}

#[tokio::test]
async fn grpc_echo_and_load() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoService::new(identity()))
            .serve(addr),
    );
    let cfg = LoadConfig {
        grpc: true,
        ..config(format!("http://{addr}"))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let report = loop {
        match load::run(cfg.clone()).await {
            Ok(r) => break r,
            // The server may still be binding.
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(report.status.get(&0), Some(&20), "{report:?}");
    assert_eq!(report.backends.get("echo-7"), Some(&20));
}

#[tokio::test]
async fn unreachable_server_is_counted_as_errors() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let report = load::run(LoadConfig {
        requests: Some(3),
        ..config(format!("http://{closed}/"))
    })
    .await
    .unwrap();
    assert_eq!(report.errors, 3);
    assert!(!report.error_samples.is_empty());
}
