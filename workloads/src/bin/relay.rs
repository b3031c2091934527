//! `ambit-relay`: a plain TCP relay, for benchmarks. Placed where the
//! ztunnels sit, it has the mesh path's TCP hops and does nothing else
//! (no capture, TLS, HTTP/2 or policy), so it shows what the hops alone
//! cost.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

/// The copy buffer per direction: the largest buffer ztunnel's copy loop
/// grows to for a bulk transfer.
const BUFFER: usize = 256 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "ambit-relay",
    version,
    about = "Plain TCP relay: accepts on each LISTEN address and connects to its TARGET"
)]
struct Args {
    /// LISTEN=TARGET, e.g. 0.0.0.0:15101=10.60.1.2:5201; repeatable.
    #[arg(long = "route", required = true, value_parser = parse_route)]
    routes: Vec<(SocketAddr, SocketAddr)>,
}

fn parse_route(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, target) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not LISTEN=TARGET"))?;
    let addr = |a: &str| {
        a.parse::<SocketAddr>()
            .map_err(|e| format!("{a:?} in {s:?}: {e}"))
    };
    Ok((addr(listen)?, addr(target)?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bound = build(Args::parse().routes).await?;
    // Ready: every route listens (the benchmark waits for this line).
    let bound: Vec<String> = bound.iter().map(SocketAddr::to_string).collect();
    println!("ready {}", bound.join(" "));
    std::future::pending().await
}

/// Binds every route's listener and starts relaying on it; returns the
/// bound addresses.
async fn build(routes: Vec<(SocketAddr, SocketAddr)>) -> anyhow::Result<Vec<SocketAddr>> {
    let mut bound = Vec::new();
    for (listen, target) in routes {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen on {listen}"))?;
        bound.push(listener.local_addr()?);
        tokio::spawn(relay(listener, target));
    }
    Ok(bound)
}

async fn relay(listener: TcpListener, target: SocketAddr) {
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors or a connection reset before it was
                // accepted: the route stays, the next accept may succeed.
                eprintln!("accept for {target}: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let result = async {
                client.set_nodelay(true)?;
                let mut upstream = TcpStream::connect(target).await?;
                upstream.set_nodelay(true)?;
                tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER)
                    .await
            }
            .await;
            if let Err(error) = result {
                eprintln!("{peer} → {target}: {error}");
            }
        });
    }
}
