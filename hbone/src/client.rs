//! One client HBONE connection: TCP, mutual TLS with the source workload's
//! certificate (the server must prove one of the expected identities), then
//! HTTP/2 carrying one CONNECT stream per tunnel.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use h2::client::SendRequest;
use identity::{Identity, WorkloadCert};
use tokio::io::AsyncRead;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::Instrument;

use crate::headers::ConnectRequest;
use crate::{EarlyData, Error, H2Stream, Keepalive, settings};

/// Makes the TCP connection under an HBONE connection, for callers that
/// must not connect from their own network namespace (ztunnel connects from
/// inside the source pod's).
pub trait Dialer: Send + Sync + std::fmt::Debug {
    fn dial(&self, dst: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpStream>>;
}

/// Time limits for establishing and keeping a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub handshake: Duration,
    pub keepalive: Keepalive,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            keepalive: Keepalive::default(),
        }
    }
}

/// An established HBONE client connection. Cheap to clone; the connection
/// closes (GOAWAY) once every clone is dropped and its streams have ended.
#[derive(Debug, Clone)]
pub struct Connection {
    send_request: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    peer: SocketAddr,
    peer_identity: Identity,
}

impl Connection {
    /// Connects to `dst` (an HBONE port), from `src_ip` if given, presenting
    /// `cert` and accepting only a server proving one of `expected`.
    pub async fn establish(
        cert: &WorkloadCert,
        expected: Vec<Identity>,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
        timeouts: Timeouts,
    ) -> Result<Self, Error> {
        Self::establish_over(tcp_connect(dst, src_ip), cert, expected, dst, timeouts).await
    }

    /// Like [`Connection::establish`] over a TCP connection made by `dial`
    /// (e.g. from inside a pod's network namespace).
    pub async fn establish_over(
        dial: impl Future<Output = std::io::Result<TcpStream>>,
        cert: &WorkloadCert,
        expected: Vec<Identity>,
        dst: SocketAddr,
        timeouts: Timeouts,
    ) -> Result<Self, Error> {
        let tcp = tokio::time::timeout(timeouts.connect, dial)
            .await
            .map_err(|_| Error::Timeout {
                what: "TCP connect",
                addr: dst,
            })?
            .map_err(|source| Error::Connect { addr: dst, source })?;
        let config = identity::tls::client_config(cert, expected).map_err(Error::TlsConfig)?;
        let tls = tokio::time::timeout(
            timeouts.handshake,
            TlsConnector::from(config).connect(identity::tls::server_name(dst.ip()), tcp),
        )
        .await
        .map_err(|_| Error::Timeout {
            what: "TLS handshake",
            addr: dst,
        })?
        .map_err(|source| Error::Tls { addr: dst, source })?;
        let peer_identity =
            identity::tls::peer_identity(tls.get_ref().1).ok_or_else(|| Error::Tls {
                addr: dst,
                source: std::io::Error::other("server presented no identity"),
            })?;
        let (send_request, mut conn) = settings::client_builder().handshake(tls).await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping_pong = conn.ping_pong();
        let driver_closed = closed.clone();
        let span =
            tracing::debug_span!("hbone_client_conn", peer = %dst, identity = %peer_identity);
        tokio::spawn(
            async move {
                tokio::select! {
                    result = conn => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                    }
                    failure = timeouts.keepalive.run(ping_pong) => {
                        tracing::warn!(?failure, "keepalive failed, dropping connection");
                    }
                }
                driver_closed.store(true, Ordering::Release);
            }
            .instrument(span),
        );
        Ok(Self {
            send_request,
            closed,
            peer: dst,
            peer_identity,
        })
    }

    /// Opens a tunnel: sends CONNECT and waits for the answer; anything but
    /// `200` is an error carrying the status.
    pub async fn open(&self, req: &ConnectRequest) -> Result<H2Stream, Error> {
        self.open_with(req, &mut tokio::io::empty(), &mut EarlyData::new(0))
            .await
    }

    /// Opens a tunnel for `client`: sends CONNECT, then, until the answer
    /// comes, what `early` holds and whatever `client` sends meanwhile
    /// (kept in `early` for a retry). Anything but `200` is an error
    /// carrying the status.
    pub async fn open_with<R: AsyncRead + Unpin + ?Sized>(
        &self,
        req: &ConnectRequest,
        client: &mut R,
        early: &mut EarlyData,
    ) -> Result<H2Stream, Error> {
        let mut ready = self.send_request.clone().ready().await?;
        let (mut response, mut send) = ready.send_request(req.to_http(), false)?;
        // Queued within the stream's initial window: what is there now goes
        // out with the request's HEADERS.
        let mut sending = match early.replay() {
            Some(kept) => send.send_data(kept, false),
            None => Ok(()),
        };
        let response = loop {
            if sending.is_err() || early.done() {
                break response.await?;
            }
            tokio::select! {
                biased;
                answer = &mut response => break answer?,
                more = early.read_more(client) => {
                    if let Some(chunk) = more {
                        sending = send.send_data(chunk, false);
                    }
                }
            }
        };
        if response.status() != http::StatusCode::OK {
            return Err(Error::Status {
                status: response.status(),
                authority: req.authority,
            });
        }
        // A stream the server reset while answering `200`.
        sending?;
        let mut stream = H2Stream::new(send, response.into_body(), None);
        stream.sent_early = early.bytes().len() as u64;
        Ok(stream)
    }

    /// Whether the connection has ended (closed, failed or keepalive timeout).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// How many streams the server currently allows at once.
    pub fn peer_max_streams(&self) -> usize {
        self.send_request.current_max_send_streams()
    }

    /// The address connected to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The identity the server proved.
    pub fn peer_identity(&self) -> &Identity {
        &self.peer_identity
    }
}

async fn tcp_connect(dst: SocketAddr, src_ip: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src_ip {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(dst).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}
