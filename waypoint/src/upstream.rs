//! HTTP connections from the waypoint to endpoints, reused across requests
//! of the same client connection: the tunnel under them carries that
//! client's address and Service in its `forwarded` header, so they are not
//! shared between clients. Per endpoint and HTTP version, HTTP/2
//! connections are shared by the client's requests and HTTP/1.1
//! connections go back to an idle list once both the request and the
//! response bodies have ended. Idle connections are closed after
//! [`IDLE_TIMEOUT`], before common servers' keep-alive timeouts would close
//! them under a request. A kept connection that closed meanwhile gives the
//! request back, which then goes on a new connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::body::{Seen, Watched};
use crate::proxy::Upstream;

pub type Body = BoxBody<Bytes, hyper::Error>;

type H1 = http1::SendRequest<Body>;

/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE: usize = 8;
/// How long a connection stays idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a kept HTTP/1.1 connection may take to be ready again.
const READY_WAIT: Duration = Duration::from_millis(100);

/// What a connection may be reused for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub endpoint: SocketAddr,
    pub http2: bool,
    /// The client connection (its tunnel's `forwarded: for=`).
    pub client: SocketAddr,
    /// The Service addressed (`forwarded: host=`).
    pub host: Option<String>,
}

#[derive(Debug, Default)]
pub struct Upstreams {
    /// Idle HTTP/1.1 connections and since when.
    idle: Mutex<Kept<Vec<(H1, Instant)>>>,
    /// HTTP/2 connections and when they were last used.
    shared: Mutex<Kept<(http2::SendRequest<Body>, Instant)>>,
}

#[derive(Debug)]
struct Kept<T> {
    by_key: HashMap<Key, T>,
    swept: Option<Instant>,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            swept: None,
        }
    }
}

impl<T> Kept<T> {
    /// Keeps what `keep` says (closed and expired connections go), at
    /// most once a second.
    fn sweep(&mut self, now: Instant, mut keep: impl FnMut(&mut T) -> bool) {
        if self
            .swept
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.swept = Some(now);
        self.by_key.retain(|_, v| keep(v));
    }
}

fn fresh(since: Instant, now: Instant) -> bool {
    now.duration_since(since) < IDLE_TIMEOUT
}

/// A connection to send one request on.
enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Upstreams {
    /// A kept connection for `key` that is still open.
    fn take(&self, key: &Key) -> Option<Sender> {
        let now = Instant::now();
        if key.http2 {
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            shared.sweep(now, |(s, used)| !s.is_closed() && fresh(*used, now));
            let (s, used) = shared.by_key.get_mut(key)?;
            if s.is_closed() {
                shared.by_key.remove(key);
                return None;
            }
            *used = now;
            return Some(Sender::H2(s.clone()));
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.sweep(now, |list| {
            list.retain(|(s, since)| !s.is_closed() && fresh(*since, now));
            !list.is_empty()
        });
        let list = idle.by_key.get_mut(key)?;
        while let Some((s, since)) = list.pop() {
            if !s.is_closed() && fresh(since, now) {
                return Some(Sender::H1(s));
            }
        }
        None
    }

    fn put_h1(&self, key: Key, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.sweep(now, |list| {
            list.retain(|(s, since)| !s.is_closed() && fresh(*since, now));
            !list.is_empty()
        });
        let list = idle.by_key.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push((sender, now));
        }
    }

    /// Sends `req` on a kept connection for `key`, if one is open;
    /// otherwise (or if it closed meanwhile) gives the request back.
    pub async fn send_reused(
        self: &Arc<Self>,
        key: &Key,
        req: Request<Body>,
    ) -> Result<Response<Body>, ReuseError> {
        let Some(sender) = self.take(key) else {
            return Err(ReuseError::NoConnection(Box::new(req)));
        };
        let sent = match sender {
            Sender::H1(mut s) => {
                // A connection that has just finished an exchange takes the
                // next request a moment later; one that does not, or that
                // closed meanwhile, leaves it for a new connection.
                if !matches!(
                    tokio::time::timeout(READY_WAIT, s.ready()).await,
                    Ok(Ok(()))
                ) {
                    return Err(ReuseError::NoConnection(Box::new(req)));
                }
                let (req, sent) = track(req);
                match s.try_send_request(req).await {
                    Ok(resp) => Ok(self.recycle(key.clone(), s, sent, resp)),
                    Err(e) => Err(e),
                }
            }
            Sender::H2(mut s) => s.try_send_request(req).await.map(|r| r.map(|b| b.boxed())),
        };
        sent.map_err(|mut e| match e.take_message() {
            Some(req) => ReuseError::NoConnection(Box::new(req)),
            None => ReuseError::Failed(e.into_error()),
        })
    }

    /// Sends `req` on a new connection over `upstream`, kept for the next
    /// requests with the same `key`.
    pub async fn send_new(
        self: &Arc<Self>,
        key: Key,
        upstream: Upstream,
        req: Request<Body>,
    ) -> Result<Response<Body>, hyper::Error> {
        let io = TokioIo::new(upstream);
        if key.http2 {
            let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            self.shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_key
                .insert(key, (sender.clone(), Instant::now()));
            Ok(sender.send_request(req).await?.map(|b| b.boxed()))
        } else {
            let (mut sender, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            let (req, sent) = track(req);
            let resp = sender.send_request(req).await?;
            Ok(self.recycle(key, sender, sent, resp))
        }
    }

    /// The response, whose end gives the HTTP/1.1 connection back if the
    /// request body has been sent whole by then.
    fn recycle(
        self: &Arc<Self>,
        key: Key,
        sender: http1::SendRequest<Body>,
        sent: Arc<AtomicBool>,
        resp: Response<Incoming>,
    ) -> Response<Body> {
        let mut back = Some(GiveBack {
            sender,
            key,
            pool: Arc::downgrade(self),
            sent,
        });
        // Dropped before its end, the body closes the connection with it.
        resp.map(|inner| {
            Watched::new(inner, move |seen| match seen {
                Seen::End => {
                    if let Some(back) = back.take() {
                        back.give();
                    }
                }
                Seen::Error => back = None,
                Seen::Data(_) | Seen::Trailers => {}
            })
            .boxed()
        })
    }
}

/// Why a kept connection did not carry the request.
#[derive(Debug)]
pub enum ReuseError {
    /// None open (the request is given back, untouched).
    NoConnection(Box<Request<Body>>),
    /// The request was sent and failed.
    Failed(hyper::Error),
}

/// The request with a flag set once its body has been sent whole.
fn track(req: Request<Body>) -> (Request<Body>, Arc<AtomicBool>) {
    let sent = Arc::new(AtomicBool::new(false));
    let flag = sent.clone();
    let req = req.map(|inner| {
        Watched::new(inner, move |seen| {
            if matches!(seen, Seen::End) {
                flag.store(true, Ordering::Release);
            }
        })
        .boxed()
    });
    (req, sent)
}

struct GiveBack {
    sender: http1::SendRequest<Body>,
    key: Key,
    pool: Weak<Upstreams>,
    /// The request body has been sent whole.
    sent: Arc<AtomicBool>,
}

impl GiveBack {
    fn give(self) {
        // A connection still sending its request body is not idle.
        if self.sent.load(Ordering::Acquire)
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put_h1(self.key, self.sender);
        }
    }
}
