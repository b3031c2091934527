//! `ambit demo`: the mesh's security foundation on loopback, step by step.
//! A CA issues workload certificates, one workload reaches another through
//! an HBONE tunnel with mutual TLS, and the refusals a mesh must make are
//! shown to happen. Exits non-zero if any step does not hold.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use hbone::{
    Connect, ConnectRequest, InboundRequest, Pool, PoolConfig, PoolKey, Rejection, Server,
    ServerOptions,
};
use identity::ca::DEFAULT_LEAF_TTL;
use identity::{CertManager, CertificateAuthority, Identity, InProcessCa, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The demo's destination workload: tunnels may reach its one app port.
struct EchoWorkload {
    app: SocketAddr,
    seen: mpsc::UnboundedSender<InboundRequest>,
}

impl Connect for EchoWorkload {
    async fn connect(&self, req: InboundRequest) -> Result<TcpStream, Rejection> {
        let _ = self.seen.send(req.clone());
        if req.authority.port() != self.app.port() {
            return Err(Rejection::unavailable(format!(
                "no application listens on port {}",
                req.authority.port()
            )));
        }
        TcpStream::connect(self.app)
            .await
            .map_err(|e| Rejection::unavailable(format!("connect {}: {e}", self.app)))
    }
}

struct Report {
    failures: usize,
}

impl Report {
    fn step(&mut self, what: &str, result: anyhow::Result<String>) {
        match result {
            Ok(detail) => println!("  ✓ {what}\n      {detail}"),
            Err(e) => {
                self.failures += 1;
                println!("  ✗ {what}\n      {e:#}");
            }
        }
    }
}

async fn echo_app() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Sends `msg` through a tunnel and returns the echo.
async fn round_trip(
    pool: &Pool,
    key: &PoolKey,
    to: SocketAddr,
    msg: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let stream = pool.connect(key, &ConnectRequest::new(to)).await?;
    let mut app = hbone::copy::attach(stream);
    app.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut back))
        .await
        .context("no echo within 5 s")??;
    Ok(back)
}

pub(crate) async fn run() -> anyhow::Result<()> {
    let mut report = Report { failures: 0 };
    let td = TrustDomain::new("cluster.local")?;
    let client_id = Identity::new(td.clone(), "demo", "sleep")?;
    let server_id = Identity::new(td.clone(), "demo", "echo")?;
    println!("Ambit foundation demo: identities, mutual TLS and HBONE on loopback\n");

    let ca = Arc::new(CertificateAuthority::self_signed(td, DEFAULT_LEAF_TTL)?);
    let certs = CertManager::new(Arc::new(InProcessCa::new(ca)));
    report.step(
        "the CA issues a short-lived X.509-SVID per workload identity",
        async {
            let mut lines = Vec::new();
            for id in [&client_id, &server_id] {
                let cert = certs.fetch(id).await?;
                let left = cert
                    .not_after()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                lines.push(format!(
                    "{id} (valid {} h more, rotated at half life)",
                    left.as_secs() / 3600
                ));
            }
            Ok(lines.join("\n      "))
        }
        .await,
    );

    let app = echo_app().await?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let server = Server::new(
        EchoWorkload { app, seen: seen_tx },
        ServerOptions::default(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let hbone_addr = listener.local_addr()?;
    tokio::spawn(
        server
            .clone()
            .serve(listener, certs.clone(), server_id.clone()),
    );
    let pool = Pool::new(certs.clone(), PoolConfig::default());
    let key = PoolKey::new(client_id.clone(), vec![server_id.clone()], hbone_addr, None);

    report.step(
        "sleep reaches echo through an HBONE tunnel (HTTP/2 CONNECT over mTLS)",
        async {
            let back = round_trip(&pool, &key, app, b"hello from sleep").await?;
            if back != b"hello from sleep" {
                bail!("echo returned {back:?}");
            }
            let req = seen_rx.recv().await.context("server saw no request")?;
            if req.peer_identity != client_id {
                bail!("server saw {} instead of {client_id}", req.peer_identity);
            }
            Ok(format!(
                "echo's side authenticated the client as {}; CONNECT {}",
                req.peer_identity, req.authority
            ))
        }
        .await,
    );

    report.step(
        "a client expecting another identity refuses echo's certificate",
        async {
            let impostor = Identity::new(server_id.trust_domain().clone(), "demo", "payments")?;
            let key = PoolKey::new(client_id.clone(), vec![impostor], hbone_addr, None);
            match pool.connect(&key, &ConnectRequest::new(app)).await {
                Ok(_) => bail!("the tunnel opened"),
                Err(e) if e.reason() == "identity_mismatch" => Ok(format!("refused: {e}")),
                Err(e) => bail!("refused for the wrong reason: {e}"),
            }
        }
        .await,
    );

    report.step(
        "a CONNECT whose authority is not the connected IP gets 400",
        async {
            let elsewhere = SocketAddr::new([127, 0, 0, 2].into(), app.port());
            expect_status(&pool, &key, elsewhere, 400).await
        }
        .await,
    );

    report.step(
        "a CONNECT to a port with no application gets 503",
        async {
            let closed = SocketAddr::new(hbone_addr.ip(), 1);
            expect_status(&pool, &key, closed, 503).await
        }
        .await,
    );

    report.step(
        "100 concurrent tunnels share one pooled connection",
        async {
            let tasks: Vec<_> = (0..100)
                .map(|i| {
                    let (pool, key) = (pool.clone(), key.clone());
                    tokio::spawn(async move {
                        let msg = format!("tunnel {i}");
                        round_trip(&pool, &key, app, msg.as_bytes()).await
                    })
                })
                .collect();
            for t in tasks {
                t.await??;
            }
            match pool.connections_for(&key) {
                1 => Ok("100 echoes over 1 mTLS connection".into()),
                n => bail!("{n} connections were opened"),
            }
        }
        .await,
    );

    server.shutdown().await;
    println!();
    if report.failures > 0 {
        bail!("{} step(s) failed", report.failures);
    }
    println!("All steps held.");
    Ok(())
}

async fn expect_status(
    pool: &Pool,
    key: &PoolKey,
    to: SocketAddr,
    want: u16,
) -> anyhow::Result<String> {
    match pool.connect(key, &ConnectRequest::new(to)).await {
        Err(hbone::Error::Status { status, .. }) if status.as_u16() == want => {
            Ok(format!("CONNECT {to} → {status}"))
        }
        Err(e) => bail!("expected {want}, got: {e}"),
        Ok(_) => bail!("expected {want}, the tunnel opened"),
    }
}
