//! The HBONE server: terminates mutual TLS, checks each CONNECT the way
//! Istio's ztunnel does (`400` for a malformed request or an authority whose
//! IP is not the one connected to) and hands it to the [`Handler`], which
//! answers `401` if it denies, `503` if there is no upstream, or `200` and
//! copies.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use identity::{CertManager, Identity};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::copy::copy_bidirectional;
use crate::headers::Metadata;
use crate::{Error, H2Stream, Keepalive, settings};

/// A CONNECT that passed the protocol checks, for the handler to decide on.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// Destination IP and port from `:authority`.
    pub authority: SocketAddr,
    /// The identity the client proved in the TLS handshake.
    pub peer_identity: Identity,
    /// The client's address as seen on the TCP connection.
    pub peer_addr: SocketAddr,
    /// The address the client connected to.
    pub local_addr: SocketAddr,
    pub metadata: Metadata,
}

/// A handler's refusal: the HTTP status returned and the reason logged.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: String,
}

impl Rejection {
    /// `401`: authorization policy denied the connection.
    pub fn denied(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            reason: reason.into(),
        }
    }

    /// `503`: no such workload or port, or the upstream connect failed.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: reason.into(),
        }
    }

    /// `400`: a malformed request, or one for a destination the server
    /// never forwards to.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }
}

/// Serves CONNECTs that passed the protocol checks.
pub trait Handler: Send + Sync + 'static {
    /// Decides on `req` and answers through `tunnel`: [`Tunnel::reject`]
    /// or [`Tunnel::accept`] and copy. Owning the tunnel lets the handler
    /// close it later (a revoked authorization) and account for it.
    fn serve(&self, req: InboundRequest, tunnel: Tunnel) -> impl Future<Output = ()> + Send;

    /// Told of what the server refused before any request reached
    /// [`Handler::serve`], for the handler's access log and metrics. The
    /// server writes no access line of its own for these, so a handler
    /// that keeps its own log writes the one line there is; by default
    /// it is [`Refusal::log`]'s.
    fn refused(&self, refusal: Refusal) {
        refusal.log();
    }
}

/// The simple handler: authorizes and connects; the server answers, copies
/// and writes the access log.
pub trait Connect: Send + Sync + 'static {
    fn connect(
        &self,
        req: InboundRequest,
    ) -> impl Future<Output = Result<TcpStream, Rejection>> + Send;

    /// As [`Handler::refused`].
    fn refused(&self, refusal: Refusal) {
        refusal.log();
    }
}

impl<C: Connect> Handler for C {
    async fn serve(&self, req: InboundRequest, tunnel: Tunnel) {
        let upstream = self.connect(req).await;
        tunnel.splice(upstream).await;
    }

    fn refused(&self, refusal: Refusal) {
        Connect::refused(self, refusal);
    }
}

/// A connection whose TLS handshake failed, or a request the protocol
/// checks refused, before the handler saw any request of it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub peer_addr: SocketAddr,
    /// `None` when the handshake failed, so no identity was proven.
    pub peer_identity: Option<Identity>,
    /// A short, stable code for metrics: [`Error::reason`]'s, or
    /// `rejected_bad_request`.
    pub code: &'static str,
    /// What happened, for the access log.
    pub reason: String,
}

impl Refusal {
    /// The access line of a refused connection or request.
    pub fn log(&self) {
        tracing::info!(
            target: "access",
            src_identity = self.peer_identity.as_ref().map(tracing::field::display),
            src_addr = %self.peer_addr,
            reason = %self.reason,
            code = self.code,
            "tunnel refused"
        );
    }
}

/// An admitted CONNECT waiting for its answer.
#[derive(Debug)]
pub struct Tunnel {
    respond: SendResponse<Bytes>,
    body: RecvStream,
    ctx: ConnContext,
    authority: SocketAddr,
    started: tokio::time::Instant,
}

impl Tunnel {
    /// Answers `200`: the stream is open.
    pub fn accept(mut self) -> Result<H2Stream, Error> {
        let send = self.respond.send_response(status(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, self.body, None))
    }

    /// Answers with the rejection's status and ends the stream.
    pub fn reject(mut self, rejection: &Rejection) {
        let _ = self.respond.send_response(status(rejection.status), true);
    }

    /// Answers for `upstream`, copies until both sides close, and logs the
    /// tunnel.
    pub async fn splice(self, upstream: Result<TcpStream, Rejection>) {
        let (identity, peer, authority, started) = (
            self.ctx.peer_identity.clone(),
            self.ctx.peer_addr,
            self.authority,
            self.started,
        );
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(rejection) => {
                log_rejection(&identity, &authority.to_string(), &rejection);
                self.reject(&rejection);
                return;
            }
        };
        let stream = match self.accept() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "client went away before the tunnel opened");
                return;
            }
        };
        let (reader, writer) = upstream.into_split();
        let result = copy_bidirectional(reader, writer, stream).await;
        let (transferred, error) = match &result {
            Ok(t) => (*t, None),
            Err(e) => (e.transferred, Some(e.source.to_string())),
        };
        tracing::info!(
            target: "access",
            src_identity = %identity,
            src_addr = %peer,
            dst_addr = %authority,
            bytes_received = transferred.received,
            bytes_sent = transferred.sent,
            duration_ms = started.elapsed().as_millis() as u64,
            error = error.as_deref(),
            "tunnel closed"
        );
    }
}

fn log_rejection(identity: &Identity, authority: &str, rejection: &Rejection) {
    tracing::info!(
        target: "access",
        src_identity = %identity,
        authority,
        status = rejection.status.as_u16(),
        reason = %rejection.reason,
        "tunnel rejected"
    );
}

/// Server behaviour.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Refuse (`400`) a CONNECT whose authority IP is not the IP the TCP
    /// connection was made to. On for workload listeners; off for a
    /// waypoint, whose clients address services (VIP:port).
    pub require_authority_ip_match: bool,
    pub handshake_timeout: Duration,
    /// How long open tunnels may take to finish after a drain starts.
    pub drain_timeout: Duration,
    pub keepalive: Keepalive,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            require_authority_ip_match: true,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            keepalive: Keepalive::default(),
        }
    }
}

/// Serves HBONE connections with one handler.
#[derive(Debug)]
pub struct Server<H> {
    handler: Arc<H>,
    options: ServerOptions,
    drain: CancellationToken,
    tasks: TaskTracker,
}

impl<H: Handler> Server<H> {
    pub fn new(handler: H, options: ServerOptions) -> Arc<Self> {
        Arc::new(Self {
            handler: Arc::new(handler),
            options,
            drain: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Accepts on `listener` for one workload identity until drained.
    /// Each connection is served with that identity's current certificate,
    /// so a rotation applies to new connections without a restart.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, certs: CertManager, id: Identity) {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        // Out of descriptors, typically: retrying at once
                        // would spin a core while it lasts.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = self.drain.cancelled() => return,
            };
            let this = self.clone();
            let certs = certs.clone();
            let id = id.clone();
            self.tasks.spawn(async move {
                let result = match certs.fetch(&id).await {
                    Ok(cert) => this.serve_connection(tcp, cert.server_config().clone()).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(error) = result {
                    tracing::info!(%peer, %error, reason = error.reason(), "HBONE connection failed");
                    // Failures before the first request (no certificate, a
                    // wrong trust domain, a stalled handshake); later ones
                    // end tunnels the handler already accounts for.
                    if matches!(
                        error,
                        Error::Tls { .. }
                            | Error::Timeout { .. }
                            | Error::Certificate(_)
                            | Error::TlsConfig(_)
                    ) {
                        this.handler.refused(Refusal {
                            peer_addr: peer,
                            peer_identity: None,
                            code: error.reason(),
                            reason: error.to_string(),
                        });
                    }
                }
            });
        }
    }

    /// Stops accepting, sends GOAWAY on every connection, and waits up to
    /// the drain timeout for open tunnels to finish.
    pub async fn shutdown(&self) {
        self.drain.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(self.options.drain_timeout * 2, self.tasks.wait()).await;
    }

    /// Serves one accepted TCP connection: TLS with `tls`, then HTTP/2.
    pub async fn serve_connection(
        &self,
        tcp: TcpStream,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<(), Error> {
        let peer_addr = tcp.peer_addr()?;
        let local_addr = tcp.local_addr()?;
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(
            self.options.handshake_timeout,
            TlsAcceptor::from(tls).accept(tcp),
        )
        .await
        .map_err(|_| Error::Timeout {
            what: "TLS handshake",
            addr: peer_addr,
        })?
        .map_err(|source| Error::Tls {
            addr: peer_addr,
            source,
        })?;
        let peer_identity = identity::tls::peer_identity(tls.get_ref().1)
            .expect("the client verifier admits only certificates with one mesh identity");
        let span = tracing::info_span!("hbone_conn", peer = %peer_addr, identity = %peer_identity);
        let conn = ConnContext {
            peer_identity,
            peer_addr,
            local_addr,
        };
        self.drive(tls, conn).instrument(span).await
    }

    async fn drive<IO>(&self, io: IO, ctx: ConnContext) -> Result<(), Error>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // A client that passed TLS but does not speak HTTP/2 (or stalls)
        // is refused like a failed TLS handshake, with its identity.
        let handshake = tokio::time::timeout(
            self.options.handshake_timeout,
            settings::server_builder().handshake(io),
        )
        .await
        .map_err(|_| Error::Timeout {
            what: "HTTP/2 handshake",
            addr: ctx.peer_addr,
        })
        .and_then(|r| r.map_err(Error::from));
        let mut conn = match handshake {
            Ok(conn) => conn,
            Err(error) => {
                tracing::info!(%error, reason = error.reason(), "HBONE connection failed");
                self.handler.refused(Refusal {
                    peer_addr: ctx.peer_addr,
                    peer_identity: Some(ctx.peer_identity.clone()),
                    code: error.reason(),
                    reason: error.to_string(),
                });
                return Ok(());
            }
        };
        let keepalive = self.options.keepalive.run(conn.ping_pong());
        tokio::pin!(keepalive);
        let drain_deadline = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(drain_deadline);
        let mut draining = false;
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((req, respond))) => {
                        let handler = self.handler.clone();
                        let ctx = ctx.clone();
                        let require_ip = self.options.require_authority_ip_match;
                        // Tracked, so that a shutdown waits for the
                        // handler to finish (and log) each tunnel.
                        self.tasks.spawn(serve_stream(handler, ctx, require_ip, req, respond).in_current_span());
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Ok(()),
                },
                failure = &mut keepalive => {
                    tracing::warn!(?failure, "keepalive failed, closing connection");
                    return Ok(());
                }
                () = self.drain.cancelled(), if !draining => {
                    conn.graceful_shutdown();
                    draining = true;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.options.drain_timeout);
                }
                () = &mut drain_deadline, if draining => {
                    tracing::info!("drain deadline passed, closing remaining tunnels");
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    // h2 writes the final GOAWAY only while the connection
                    // is polled; without it the peer sees a bare close.
                    let flushed = async { while conn.accept().await.is_some() {} };
                    let _ = tokio::time::timeout(GOAWAY_FLUSH, flushed).await;
                    return Ok(());
                }
            }
        }
    }
}

/// How long a connection closed at the drain deadline may take to write
/// its final GOAWAY.
const GOAWAY_FLUSH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct ConnContext {
    peer_identity: Identity,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
}

/// Applies HBONE's protocol checks to a request.
fn admit(
    req: &Request<RecvStream>,
    ctx: &ConnContext,
    require_ip: bool,
) -> Result<InboundRequest, Rejection> {
    if req.method() != Method::CONNECT {
        return Err(Rejection::bad_request(format!(
            "method {} is not CONNECT",
            req.method()
        )));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| Rejection::bad_request("CONNECT without :authority"))?;
    let authority: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| Rejection::bad_request(format!("authority {authority} is not an IP:port")))?;
    // An IPv4-mapped IPv6 address names the IPv4 address: the handler
    // sees it as such, as the check below does.
    let authority = SocketAddr::new(authority.ip().to_canonical(), authority.port());
    let local_ip = ctx.local_addr.ip().to_canonical();
    if require_ip && authority.ip() != local_ip {
        return Err(Rejection::bad_request(format!(
            "authority IP {} differs from the connection's destination IP {local_ip}",
            authority.ip()
        )));
    }
    Ok(InboundRequest {
        authority,
        peer_identity: ctx.peer_identity.clone(),
        peer_addr: ctx.peer_addr,
        local_addr: ctx.local_addr,
        metadata: Metadata::from_headers(req.headers()),
    })
}

async fn serve_stream<H: Handler>(
    handler: Arc<H>,
    ctx: ConnContext,
    require_ip: bool,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let started = tokio::time::Instant::now();
    match admit(&req, &ctx, require_ip) {
        Ok(inbound) => {
            let tunnel = Tunnel {
                respond,
                body: req.into_body(),
                ctx,
                authority: inbound.authority,
                started,
            };
            handler.serve(inbound, tunnel).await;
        }
        Err(rejection) => {
            let _ = respond.send_response(status(rejection.status), true);
            handler.refused(Refusal {
                peer_addr: ctx.peer_addr,
                peer_identity: Some(ctx.peer_identity.clone()),
                code: "rejected_bad_request",
                reason: format!(
                    "{} {}: {}",
                    rejection.status.as_u16(),
                    req.uri(),
                    rejection.reason
                ),
            });
        }
    }
}

fn status(code: StatusCode) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = code;
    resp
}
