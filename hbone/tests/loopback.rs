//! HBONE end to end over loopback: real TCP, real mutual TLS, real HTTP/2.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hbone::copy::Attached;
use hbone::testing::{Forward, attach};
use hbone::{ConnectRequest, Error, Pool, PoolConfig, PoolKey, Server, ServerOptions};
use identity::ca::DEFAULT_LEAF_TTL;
use identity::testing::{TestRoot, unchecked_client};
use identity::tls::PeerIdentityError;
use identity::{CaClient, CertManager, CertificateAuthority, Identity, InProcessCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

fn id(s: &str) -> Identity {
    Identity::parse(s).unwrap()
}

struct Fixture {
    certs: CertManager,
    server: Arc<Server<Forward>>,
    handler: Forward,
    hbone_addr: SocketAddr,
    pool: Pool,
}

impl Fixture {
    async fn new(ca: CertificateAuthority) -> Self {
        Self::with_options(ca, ServerOptions::default(), PoolConfig::default()).await
    }

    async fn with_options(
        ca: CertificateAuthority,
        options: ServerOptions,
        pool: PoolConfig,
    ) -> Self {
        let ca: Arc<dyn CaClient> = Arc::new(InProcessCa::new(Arc::new(ca)));
        let certs = CertManager::new(ca);
        let handler = Forward::default();
        let server = Server::new(handler.clone(), options);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hbone_addr = listener.local_addr().unwrap();
        tokio::spawn(server.clone().serve(listener, certs.clone(), id(SERVER)));
        let pool = Pool::new(certs.clone(), pool);
        Self {
            certs,
            server,
            handler,
            hbone_addr,
            pool,
        }
    }

    fn key(&self) -> PoolKey {
        PoolKey::new(id(CLIENT), vec![id(SERVER)], self.hbone_addr, None)
    }

    async fn tunnel(&self, upstream: SocketAddr) -> Result<Attached, Error> {
        let stream = self
            .pool
            .connect(&self.key(), &ConnectRequest::new(upstream))
            .await?;
        Ok(attach(stream))
    }
}

fn mesh_ca() -> CertificateAuthority {
    TestRoot::new().ca("cluster.local", DEFAULT_LEAF_TTL)
}

/// Echoes each connection until EOF, then closes its write side.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn echo_through_a_tunnel() {
    let fx = Fixture::new(mesh_ca()).await;
    let upstream = echo_server().await;
    let mut app = fx.tunnel(upstream).await.unwrap();
    app.write_all(b"hello through hbone").await.unwrap();
    let mut buf = [0u8; 19];
    app.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello through hbone");

    let seen = fx.handler.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authority, upstream);
    assert_eq!(
        seen[0].peer_identity,
        id(CLIENT),
        "server saw the client's identity"
    );
    assert!(seen[0].metadata.traceparent.is_some());
    assert_eq!(fx.pool.connection_count(), 1);
}

#[tokio::test]
async fn wrong_server_identity_refuses_the_handshake() {
    let fx = Fixture::new(mesh_ca()).await;
    let upstream = echo_server().await;
    let key = PoolKey::new(
        id(CLIENT),
        vec![id("spiffe://cluster.local/ns/shop/sa/payments")],
        fx.hbone_addr,
        None,
    );
    let err = fx
        .pool
        .connect(&key, &ConnectRequest::new(upstream))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "identity_mismatch", "{err}");
    match err.peer_identity_error() {
        Some(PeerIdentityError::Unexpected {
            presented,
            expected,
        }) => {
            assert_eq!(presented, &id(SERVER));
            assert_eq!(
                expected,
                &vec![id("spiffe://cluster.local/ns/shop/sa/payments")]
            );
        }
        other => panic!("{other:?}: {err}"),
    }
    assert!(fx.handler.seen().is_empty());
    assert_eq!(fx.pool.connection_count(), 0);
}

/// Opens a raw TLS connection with `config` and tries one CONNECT over it.
async fn raw_attempt(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    upstream: SocketAddr,
) -> Result<http::StatusCode, String> {
    raw_request(addr, config, "CONNECT", &upstream.to_string()).await
}

/// Opens a raw TLS connection with `config` and sends one request with
/// `method` and `uri` over it, as no HBONE client would.
async fn raw_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    uri: &str,
) -> Result<http::StatusCode, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = identity::tls::server_name(addr.ip());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (client, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let mut client = client.ready().await.map_err(|e| format!("h2: {e}"))?;
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .unwrap();
    let (resp, _send) = client
        .send_request(req, false)
        .map_err(|e| format!("h2: {e}"))?;
    let resp = resp.await.map_err(|e| format!("h2: {e}"))?;
    Ok(resp.status())
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let root = TestRoot::new();
    let fx = Fixture::new(root.ca("cluster.local", DEFAULT_LEAF_TTL)).await;
    let upstream = echo_server().await;
    // Same root, so the chain is fine: only the trust-domain rule refuses it.
    let config = unchecked_client(Some(root.leaf(&["spiffe://other.local/ns/shop/sa/cart"])));
    let result = raw_attempt(fx.hbone_addr, config, upstream).await;
    assert!(result.is_err(), "refused, got {result:?}");
    assert!(fx.handler.seen().is_empty(), "no tunnel was opened");
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let fx = Fixture::new(mesh_ca()).await;
    let upstream = echo_server().await;
    let result = raw_attempt(fx.hbone_addr, unchecked_client(None), upstream).await;
    let err = result.unwrap_err();
    assert!(
        err.contains("CertificateRequired") || err.contains("certificate"),
        "{err}"
    );
    assert!(fx.handler.seen().is_empty());
    // The handler is told, for its access log and metrics.
    let refusal = refused(&fx.handler).await;
    assert_eq!(refusal.code, "tls_failed");
    assert!(refusal.peer_identity.is_none());
    assert!(refusal.reason.contains("certificate"), "{refusal:?}");
}

/// The first refusal the server told the handler of, waiting briefly: the
/// server records it after the client has seen the failure.
async fn refused(handler: &Forward) -> hbone::Refusal {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(refusal) = handler.refused().into_iter().next() {
            return refusal;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the handler was not told"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn authority_ip_other_than_the_connected_ip_gets_400() {
    let fx = Fixture::new(mesh_ca()).await;
    let upstream = echo_server().await;
    let elsewhere = SocketAddr::new("127.0.0.2".parse().unwrap(), upstream.port());
    let err = fx.tunnel(elsewhere).await.unwrap_err();
    assert!(
        matches!(err, Error::Status { status, .. } if status == http::StatusCode::BAD_REQUEST),
        "{err}"
    );
    assert_eq!(err.reason(), "rejected_bad_request");
    assert!(fx.handler.seen().is_empty());
    let refusal = refused(&fx.handler).await;
    assert_eq!(refusal.code, "rejected_bad_request");
    assert_eq!(refusal.peer_identity, Some(id(CLIENT)));
    assert!(refusal.reason.starts_with("400 "), "{refusal:?}");

    // The connection stays usable for well-formed requests.
    let mut app = fx.tunnel(upstream).await.unwrap();
    app.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    app.read_exact(&mut buf).await.unwrap();
    assert_eq!(fx.pool.connection_count(), 1);
}

/// A request that is not a CONNECT, and a CONNECT to a name rather than
/// an address, get 400, and the handler is told why (for the access log).
#[tokio::test]
async fn a_request_hbone_cannot_serve_gets_400_with_its_reason() {
    let root = TestRoot::new();
    let fx = Fixture::new(root.ca("cluster.local", DEFAULT_LEAF_TTL)).await;
    let upstream = echo_server().await;
    for (i, (method, uri, why)) in [
        (
            "GET",
            format!("https://{upstream}/"),
            "method GET is not CONNECT",
        ),
        (
            "CONNECT",
            format!("echo.shop.svc.cluster.local:{}", upstream.port()),
            "is not an IP:port",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let config = unchecked_client(Some(root.leaf(&[CLIENT])));
        let status = raw_request(fx.hbone_addr, config, method, &uri)
            .await
            .unwrap();
        assert_eq!(status, http::StatusCode::BAD_REQUEST, "{method} {uri}");
        // Recorded after the client saw the answer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while fx.handler.refused().len() <= i {
            assert!(tokio::time::Instant::now() < deadline, "not told");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refusal = fx.handler.refused().remove(i);
        assert_eq!(refusal.code, "rejected_bad_request");
        assert_eq!(refusal.peer_identity, Some(id(CLIENT)));
        assert!(refusal.reason.contains(why), "{refusal:?}");
    }
    assert!(fx.handler.seen().is_empty());
}

/// An authority written as an IPv4-mapped IPv6 address is the IPv4
/// address, for the IP check and for the handler alike.
#[tokio::test]
async fn an_ipv4_mapped_authority_is_its_ipv4_address() {
    let fx = Fixture::new(mesh_ca()).await;
    let upstream = echo_server().await;
    let mapped = SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), upstream.port());
    let mut app = fx.tunnel(mapped).await.unwrap();
    app.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    app.read_exact(&mut buf).await.unwrap();
    assert_eq!(fx.handler.seen()[0].authority, upstream);
}

#[tokio::test]
async fn unreachable_upstream_gets_503() {
    let fx = Fixture::new(mesh_ca()).await;
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = fx.tunnel(closed).await.unwrap_err();
    assert!(
        matches!(err, Error::Status { status, .. } if status == http::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
}

#[tokio::test]
async fn client_half_close_reaches_upstream_and_the_reply_still_flows() {
    let fx = Fixture::new(mesh_ca()).await;
    let upstream = echo_server().await;
    let mut app = fx.tunnel(upstream).await.unwrap();
    app.write_all(b"request body").await.unwrap();
    // The echo server replies fully only after it sees EOF, then closes.
    app.shutdown().await.unwrap();
    let mut reply = Vec::new();
    app.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"request body");
}

#[tokio::test]
async fn upstream_half_close_reaches_client_and_the_request_still_flows() {
    let fx = Fixture::new(mesh_ca()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(b"banner").await.unwrap();
        tcp.shutdown().await.unwrap(); // server is done talking...
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap(); // ...but keeps listening
        got_tx.send(got).unwrap();
    });
    let mut app = fx.tunnel(upstream).await.unwrap();
    let mut banner = Vec::new();
    app.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner", "EOF arrived after the banner");
    app.write_all(b"late request").await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(got_rx.await.unwrap(), b"late request");
}

/// Reads to EOF, hashing; answers with the SHA-256 digest and the length.
async fn digest_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            total += n as u64;
        }
        tcp.write_all(ctx.finish().as_ref()).await.unwrap();
        tcp.write_all(&total.to_be_bytes()).await.unwrap();
        tcp.shutdown().await.unwrap();
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_arrives_intact() {
    const TOTAL: usize = 1 << 30;
    let fx = Fixture::new(mesh_ca()).await;
    let upstream = digest_server().await;
    let mut app = fx.tunnel(upstream).await.unwrap();
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut chunk = vec![0u8; 1 << 20];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..TOTAL / chunk.len() {
        // xorshift: cheap bytes that differ everywhere, so reordering or
        // duplication anywhere changes the digest.
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        ctx.update(&chunk);
        app.write_all(&chunk).await.unwrap();
    }
    app.shutdown().await.unwrap();
    let mut reply = Vec::new();
    app.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply.len(), 32 + 8);
    assert_eq!(
        u64::from_be_bytes(reply[32..].try_into().unwrap()),
        TOTAL as u64
    );
    assert_eq!(&reply[..32], ctx.finish().as_ref(), "SHA-256 matches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_share_pooled_connections() {
    const STREAMS: usize = 1000;
    let fx = Arc::new(Fixture::new(mesh_ca()).await);
    let upstream = echo_server().await;
    let all_open = Arc::new(tokio::sync::Barrier::new(STREAMS));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let fx = fx.clone();
            let all_open = all_open.clone();
            tokio::spawn(async move {
                let mut app = fx.tunnel(upstream).await.unwrap();
                // Every stream is open at once before any finishes.
                all_open.wait().await;
                let msg = format!("stream {i:04}");
                app.write_all(msg.as_bytes()).await.unwrap();
                app.shutdown().await.unwrap();
                let mut back = String::new();
                app.read_to_string(&mut back).await.unwrap();
                assert_eq!(back, msg);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(fx.handler.seen().len(), STREAMS);
    // 100 streams per connection: exactly ten handshakes for 1,000 streams.
    assert_eq!(fx.pool.connections_for(&fx.key()), STREAMS / 100);
}

#[tokio::test]
async fn drain_sends_goaway_and_lets_open_tunnels_finish() {
    let options = ServerOptions {
        drain_timeout: Duration::from_secs(5),
        ..ServerOptions::default()
    };
    let fx = Fixture::with_options(mesh_ca(), options, PoolConfig::default()).await;
    let upstream = echo_server().await;
    let mut app = fx.tunnel(upstream).await.unwrap();
    let server = fx.server.clone();
    let shutdown = tokio::spawn(async move { server.shutdown().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!shutdown.is_finished(), "waits for the open tunnel");
    // GOAWAY: the pooled connection takes no new tunnel, and with the
    // listener closed there is no other connection to open.
    assert!(
        fx.tunnel(upstream).await.is_err(),
        "a new tunnel opened during the drain"
    );

    // The open tunnel still works after GOAWAY...
    app.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    app.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    // ...and the drain completes once it closes.
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("drain finished")
        .unwrap();
    // No new tunnels: the listener is closed.
    assert!(fx.tunnel(upstream).await.is_err());
}

/// A server that sends GOAWAY while something else already listens on
/// its address (a replaced ztunnel): the pooled connection takes no new
/// tunnels, so the next tunnel opens a new connection instead of failing
/// on the draining one.
#[tokio::test]
async fn after_a_goaway_new_tunnels_open_a_new_connection() {
    let fx = Fixture::new(mesh_ca()).await;
    let upstream = echo_server().await;
    let mut held = fx.tunnel(upstream).await.unwrap();
    let server = fx.server.clone();
    let draining = tokio::spawn(async move { server.shutdown().await });
    // The replacement, once the old listener is closed.
    let handler = Forward::default();
    let replacement = Server::new(handler.clone(), ServerOptions::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match TcpListener::bind(fx.hbone_addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    tokio::spawn(
        replacement
            .clone()
            .serve(listener, fx.certs.clone(), id(SERVER)),
    );
    // Let the GOAWAY arrive before the next tunnels.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !draining.is_finished(),
        "the held tunnel keeps the drain waiting"
    );
    for i in 0..3 {
        let mut app = fx
            .tunnel(upstream)
            .await
            .unwrap_or_else(|e| panic!("tunnel {i} after GOAWAY: {e}"));
        app.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        app.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
    assert_eq!(handler.seen().len(), 3, "the replacement served them");
    assert_eq!(fx.pool.connections_for(&fx.key()), 1);
    // The tunnel on the old connection still works.
    held.write_all(b"old").await.unwrap();
    let mut buf = [0u8; 3];
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"old");
    drop(held);
    draining.await.unwrap();
    replacement.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_released() {
    let config = PoolConfig {
        idle_timeout: Duration::from_secs(1),
        ..PoolConfig::default()
    };
    let fx = Fixture::with_options(mesh_ca(), ServerOptions::default(), config).await;
    let upstream = echo_server().await;
    let mut app = fx.tunnel(upstream).await.unwrap();
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    drop(app);
    assert_eq!(fx.pool.connection_count(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fx.pool.connection_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle connection never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new tunnel handshakes again.
    let _app = fx.tunnel(upstream).await.unwrap();
    assert_eq!(fx.pool.connection_count(), 1);
    let _ = fx.certs.certificates();
}

/// Denies every tunnel, as an authorization policy would.
struct DenyAll;

impl hbone::Connect for DenyAll {
    async fn connect(&self, req: hbone::InboundRequest) -> Result<TcpStream, hbone::Rejection> {
        Err(hbone::Rejection::denied(format!(
            "no policy allows {}",
            req.peer_identity
        )))
    }
}

#[tokio::test]
async fn denied_tunnel_gets_401() {
    let ca: Arc<dyn CaClient> = Arc::new(InProcessCa::new(Arc::new(mesh_ca())));
    let certs = CertManager::new(ca);
    let server = Server::new(DenyAll, ServerOptions::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, certs.clone(), id(SERVER)));
    let pool = Pool::new(certs, PoolConfig::default());
    let key = PoolKey::new(id(CLIENT), vec![id(SERVER)], addr, None);
    let upstream = echo_server().await;
    let err = pool
        .connect(&key, &ConnectRequest::new(upstream))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Status { status, .. } if status == http::StatusCode::UNAUTHORIZED),
        "{err}"
    );
    assert_eq!(err.reason(), "rejected_unauthorized");
}

/// The leaf certificate an HBONE server presents to a new connection.
async fn presented_leaf(addr: SocketAddr, root: &TestRoot) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let config = unchecked_client(Some(root.leaf(&[CLIENT])));
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(identity::tls::server_name(addr.ip()), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn rotated_certificate_is_used_by_new_connections_without_restart() {
    let root = TestRoot::new();
    // 4 s certificates: renewed about 2 s after issue.
    let fx = Fixture::new(root.ca("cluster.local", Duration::from_secs(4))).await;
    let first = presented_leaf(fx.hbone_addr, &root).await;
    let issued = fx.certs.fetch(&id(SERVER)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while Arc::ptr_eq(&fx.certs.fetch(&id(SERVER)).await.unwrap(), &issued) {
        assert!(tokio::time::Instant::now() < deadline, "never rotated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = presented_leaf(fx.hbone_addr, &root).await;
    assert_ne!(
        first, second,
        "the same server now presents the renewed certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_stops_the_client_instead_of_buffering() {
    let fx = Fixture::new(mesh_ca()).await;
    // Accepts and never reads.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (_tcp, _) = listener.accept().await.unwrap();
        let _ = hold_rx.await;
    });
    let mut app = fx.tunnel(upstream).await.unwrap();
    let chunk = vec![1u8; 64 * 1024];
    let mut accepted = 0usize;
    // Write until a write makes no progress for 2 s (or 256 MiB went in).
    while accepted < 256 << 20 {
        match tokio::time::timeout(Duration::from_secs(2), app.write_all(&chunk)).await {
            Ok(result) => {
                result.unwrap();
                accepted += chunk.len();
            }
            Err(_) => break,
        }
    }
    eprintln!("accepted {} KiB before the tunnel stalled", accepted >> 10);
    // Stream window (4 MiB) + h2 send buffer + copy buffers + socket buffers:
    // bounded, far below what an unbounded queue would take in.
    assert!(
        accepted < 64 << 20,
        "{} MiB accepted with nobody reading",
        accepted >> 20
    );
    drop(hold_tx);
}

#[tokio::test]
async fn keepalive_drops_a_connection_whose_peer_went_silent() {
    let certs = test_certs();
    // A server that completes TLS and the HTTP/2 preface, then never polls
    // the connection again: PINGs go unanswered, like a frozen peer.
    let (frozen_tx, frozen_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, _) = raw_h2_server(&certs, |_frozen| async move {
        let _ = frozen_rx.await;
    })
    .await;
    let timeouts = hbone::client::Timeouts {
        keepalive: hbone::Keepalive {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
        },
        ..Default::default()
    };
    let cert = certs.fetch(&id(CLIENT)).await.unwrap();
    let conn = hbone::client::Connection::establish(&cert, vec![id(SERVER)], addr, None, timeouts)
        .await
        .unwrap();
    assert!(!conn.is_closed());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !conn.is_closed() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "silent peer never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(frozen_tx);
}

/// A server for one tunnel that answers `200` only once `wanted` bytes of
/// the tunnel have arrived, then sends "answer" and reads the rest: it
/// waits forever for a client that holds its bytes back until the answer.
/// Returns the bytes before the answer and after it.
async fn answers_after(
    certs: &CertManager,
    wanted: usize,
) -> (SocketAddr, tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>) {
    raw_h2_server(certs, move |mut conn| async move {
        let (request, mut respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut body = request.into_body();
        let mut before_answer = Vec::new();
        while before_answer.len() < wanted {
            let chunk = body.data().await.unwrap().unwrap();
            before_answer.extend_from_slice(&chunk);
        }
        let mut send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        send.send_data(bytes::Bytes::from_static(b"answer"), true)
            .unwrap();
        let mut after_answer = Vec::new();
        while let Some(chunk) = body.data().await {
            after_answer.extend_from_slice(&chunk.unwrap());
        }
        (before_answer, after_answer)
    })
    .await
}

async fn client_conn(certs: &CertManager, addr: SocketAddr) -> hbone::client::Connection {
    let cert = certs.fetch(&id(CLIENT)).await.unwrap();
    hbone::client::Connection::establish(&cert, vec![id(SERVER)], addr, None, Default::default())
        .await
        .unwrap()
}

type AppSide = tokio::io::DuplexStream;
type ProxyRead = tokio::io::ReadHalf<tokio::io::DuplexStream>;
type ProxyWrite = tokio::io::WriteHalf<tokio::io::DuplexStream>;

/// An app connected to a proxy: the app's end, and the proxy's two halves.
fn app_and_proxy() -> (AppSide, ProxyRead, ProxyWrite) {
    let (app, proxy) = tokio::io::duplex(1024);
    let (r, w) = tokio::io::split(proxy);
    (app, r, w)
}

/// Opens a tunnel for the proxy's reader, reading ahead up to `limit`;
/// `stuck` says what it means if the server never answers.
async fn open_for(
    conn: &hbone::client::Connection,
    r: &mut ProxyRead,
    limit: usize,
    stuck: &str,
) -> (hbone::H2Stream, hbone::EarlyData) {
    let req = ConnectRequest::new("127.0.0.1:7".parse().unwrap());
    let mut early = hbone::EarlyData::new(limit);
    let stream = tokio::time::timeout(Duration::from_secs(10), conn.open_with(&req, r, &mut early))
        .await
        .expect(stuck)
        .unwrap();
    (stream, early)
}

/// Copies through the open tunnel while the app sends `more` and closes
/// its side; checks the server's answer arrives and returns the bytes the
/// copy counts as sent.
async fn finish(
    mut app: AppSide,
    r: ProxyRead,
    w: ProxyWrite,
    stream: hbone::H2Stream,
    more: &[u8],
) -> u64 {
    let copy = tokio::spawn(hbone::copy::copy_bidirectional(r, w, stream));
    app.write_all(more).await.unwrap();
    app.shutdown().await.unwrap();
    let mut answer = Vec::new();
    app.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"answer");
    copy.await.unwrap().unwrap().sent
}

#[tokio::test]
async fn early_data_travels_with_the_connect_and_counts_as_sent() {
    let certs = test_certs();
    let (addr, server) = answers_after(&certs, b"early bytes".len()).await;
    let conn = client_conn(&certs, addr).await;
    // The client has sent its first bytes before the tunnel is asked for.
    let (mut app, mut r, w) = app_and_proxy();
    app.write_all(b"early bytes").await.unwrap();
    let (stream, early) = open_for(
        &conn,
        &mut r,
        16 * 1024,
        "the server saw no early data before answering",
    )
    .await;
    assert_eq!(early.bytes(), b"early bytes");
    let sent = finish(app, r, w, stream, b", then more").await;
    assert_eq!(sent, (b"early bytes".len() + b", then more".len()) as u64);
    let (before, after) = server.await.unwrap();
    assert_eq!(before, b"early bytes");
    assert_eq!(after, b", then more");
}

#[tokio::test]
async fn bytes_sent_while_the_answer_is_pending_go_ahead_of_it() {
    let certs = test_certs();
    let (addr, server) = answers_after(&certs, b"first, second".len()).await;
    let conn = client_conn(&certs, addr).await;
    // Nothing is there when the tunnel is asked for; the client speaks
    // while the CONNECT is on its way.
    let (mut app, mut r, w) = app_and_proxy();
    let speaking = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        app.write_all(b"first").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        app.write_all(b", second").await.unwrap();
        app
    });
    let (stream, early) = open_for(
        &conn,
        &mut r,
        16 * 1024,
        "the client's bytes were held back until the answer",
    )
    .await;
    assert_eq!(early.bytes(), b"first, second");
    let sent = finish(speaking.await.unwrap(), r, w, stream, b"").await;
    assert_eq!(sent, b"first, second".len() as u64);
    let (before, after) = server.await.unwrap();
    assert_eq!(before, b"first, second");
    assert!(after.is_empty(), "sent twice: {after:?}");
}

#[tokio::test]
async fn reading_ahead_stops_at_the_limit_until_the_answer() {
    let certs = test_certs();
    // The server answers after 4 bytes; the client has sent 10, of which
    // only the first 4 (the limit) may go before the answer.
    let (addr, server) = answers_after(&certs, 4).await;
    let conn = client_conn(&certs, addr).await;
    let (mut app, mut r, w) = app_and_proxy();
    app.write_all(b"0123456789").await.unwrap();
    let (stream, early) = open_for(&conn, &mut r, 4, "no answer after 4 bytes").await;
    assert_eq!(early.bytes(), b"0123");
    assert_eq!(finish(app, r, w, stream, b"").await, 10);
    let (before, after) = server.await.unwrap();
    assert_eq!(before, b"0123");
    assert_eq!(after, b"456789");
}

fn test_certs() -> CertManager {
    let ca: Arc<dyn CaClient> = Arc::new(InProcessCa::new(Arc::new(mesh_ca())));
    CertManager::new(ca)
}

type RawConnection =
    h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, bytes::Bytes>;

/// A server for one connection that does TLS with the server's identity and
/// the HTTP/2 handshake, then hands the connection to `serve`: for
/// behaviour `hbone::Server` does not have.
async fn raw_h2_server<F, Fut>(
    certs: &CertManager,
    serve: F,
) -> (SocketAddr, tokio::task::JoinHandle<Fut::Output>)
where
    F: FnOnce(RawConnection) -> Fut + Send + 'static,
    Fut: std::future::Future + Send,
    Fut::Output: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_cert = certs.fetch(&id(SERVER)).await.unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server_cert.server_config().clone())
            .accept(tcp)
            .await
            .unwrap();
        serve(h2::server::handshake(tls).await.unwrap()).await
    });
    (addr, task)
}

/// A CA that takes `delay` to answer, or refuses.
#[derive(Debug)]
struct SlowCa {
    inner: InProcessCa,
    delay: Duration,
    refuse: bool,
}

#[async_trait::async_trait]
impl CaClient for SlowCa {
    async fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: &Identity,
    ) -> Result<identity::SignedChain, identity::CaClientError> {
        tokio::time::sleep(self.delay).await;
        if self.refuse {
            return Err(identity::CaClientError::Unavailable(
                "down for the test".into(),
            ));
        }
        self.inner.sign(csr_der, identity).await
    }
}

/// Handshakes the pool reported: how long each took, and whether it failed.
#[derive(Debug, Default)]
struct Handshakes(std::sync::Mutex<Vec<(Duration, bool)>>);

impl hbone::PoolObserver for Handshakes {
    fn handshake(&self, _key: &PoolKey, elapsed: Duration, error: Option<&Error>) {
        self.0.lock().unwrap().push((elapsed, error.is_some()));
    }
}

/// The handshake the pool reports is the connection's, not the time a CA
/// took to sign the client's certificate, and a CA that fails is no
/// handshake.
#[tokio::test]
async fn a_handshake_is_timed_without_signing_the_certificate() {
    let ca = Arc::new(mesh_ca());
    let server_certs = CertManager::new(Arc::new(InProcessCa::new(ca.clone())));
    let server = Server::new(Forward::default(), ServerOptions::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone_addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, server_certs, id(SERVER)));
    let upstream = echo_server().await;
    let delay = Duration::from_millis(500);
    for refuse in [false, true] {
        let slow: Arc<dyn CaClient> = Arc::new(SlowCa {
            inner: InProcessCa::new(ca.clone()),
            delay,
            refuse,
        });
        let observed = Arc::new(Handshakes::default());
        let pool = Pool::with_observer(
            CertManager::new(slow),
            PoolConfig::default(),
            observed.clone(),
        );
        let key = PoolKey::new(id(CLIENT), vec![id(SERVER)], hbone_addr, None);
        let started = std::time::Instant::now();
        let result = pool.connect(&key, &ConnectRequest::new(upstream)).await;
        assert!(started.elapsed() >= delay);
        let observed = observed.0.lock().unwrap().clone();
        if refuse {
            assert!(result.is_err());
            assert!(observed.is_empty(), "{observed:?}");
        } else {
            result.unwrap();
            assert_eq!(observed.len(), 1, "{observed:?}");
            let (elapsed, failed) = observed[0];
            assert!(!failed);
            assert!(elapsed < delay, "{elapsed:?} includes the signing");
        }
    }
}
