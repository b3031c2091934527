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
    let args = Args::parse();
    let mut tasks = tokio::task::JoinSet::new();
    for (listen, target) in args.routes {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen on {listen}"))?;
        tasks.spawn(relay(listener, target));
    }
    // Ready: every route listens.
    println!("ready");
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn relay(listener: TcpListener, target: SocketAddr) -> anyhow::Result<()> {
    loop {
        let (mut client, peer) = listener.accept().await.context("accept")?;
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
