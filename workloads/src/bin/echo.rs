//! `ambit-echo`: the lab's echo server.

use clap::Parser;
use tokio::net::TcpListener;
use workloads::echo::{self, Identity};
use workloads::grpc;

#[derive(Debug, Parser)]
#[command(
    name = "ambit-echo",
    version,
    about = "HTTP/1.1 + HTTP/2 echo server with TCP and gRPC echo ports"
)]
struct Args {
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    #[arg(long, default_value_t = 9000)]
    tcp_port: u16,
    #[arg(long, default_value_t = 9090)]
    grpc_port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: std::net::IpAddr,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    namespace: String,
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node: String,
}

fn main() {
    if let Err(error) = run() {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let http = TcpListener::bind((args.bind, args.http_port)).await?;
    let tcp = TcpListener::bind((args.bind, args.tcp_port)).await?;
    let grpc_addr = std::net::SocketAddr::new(args.bind, args.grpc_port);
    eprintln!(
        "ambit-echo {}/{} on {}: HTTP {}, TCP echo {}, gRPC {grpc_addr}",
        args.namespace,
        args.pod,
        args.node,
        http.local_addr()?,
        tcp.local_addr()?
    );
    let identity = Identity {
        pod: args.pod,
        namespace: args.namespace,
        node: args.node,
    };
    let grpc = tonic::transport::Server::builder()
        .add_service(grpc::EchoService::new(identity.clone()))
        .serve(grpc_addr);
    tokio::select! {
        r = echo::serve_http(http, identity) => r?,
        r = echo::serve_tcp(tcp) => r?,
        r = grpc => r?,
    }
    Ok(())
}
