//! HTTP connections from the waypoint to endpoints, reused across requests:
//! per endpoint and HTTP version, HTTP/2 connections are shared by all
//! requests and HTTP/1.1 connections go back to an idle list once their
//! response has been read to its end. A reused connection that turns out
//! closed gives the request back, which then goes on a new connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body as _, Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::proxy::Upstream;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 32;

/// (endpoint, HTTP/2).
type Key = (SocketAddr, bool);

#[derive(Debug, Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<Key, Vec<http1::SendRequest<Body>>>>,
    shared: Mutex<HashMap<Key, http2::SendRequest<Body>>>,
}

/// A connection to send one request on.
enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Upstreams {
    /// A connection to `endpoint` for `version` that is still open.
    fn take(&self, endpoint: SocketAddr, version: Version) -> Option<Sender> {
        if version == Version::HTTP_2 {
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            let key = (endpoint, true);
            match shared.get(&key) {
                Some(s) if !s.is_closed() => return Some(Sender::H2(s.clone())),
                Some(_) => {
                    shared.remove(&key);
                }
                None => {}
            }
            return None;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&(endpoint, false))?;
        list.retain(|s| !s.is_closed());
        // Each has finished its last response; one may still be settling
        // (`ready` below waits for it).
        list.pop().map(Sender::H1)
    }

    fn put_h1(&self, endpoint: SocketAddr, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry((endpoint, false)).or_default();
        list.retain(|s| !s.is_closed());
        if list.len() < MAX_IDLE {
            list.push(sender);
        }
    }

    /// Sends `req` on a kept connection to `endpoint`, if one is open;
    /// otherwise (or if it closed meanwhile) gives the request back.
    pub async fn send_reused(
        self: &Arc<Self>,
        endpoint: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Body>, ReuseError> {
        let Some(sender) = self.take(endpoint, req.version()) else {
            return Err(ReuseError::NoConnection(Box::new(req)));
        };
        let sent = match sender {
            Sender::H1(mut s) => {
                // A connection that has just finished a response takes
                // the next one a moment later; one that closed meanwhile
                // leaves the request for a new connection.
                if s.ready().await.is_err() {
                    return Err(ReuseError::NoConnection(Box::new(req)));
                }
                match s.try_send_request(req).await {
                    Ok(resp) => Ok(self.recycle(endpoint, s, resp)),
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

    /// Sends `req` on a new connection over `upstream`, which is kept for
    /// the next requests to `endpoint`.
    pub async fn send_new(
        self: &Arc<Self>,
        endpoint: SocketAddr,
        upstream: Upstream,
        req: Request<Body>,
    ) -> Result<Response<Body>, hyper::Error> {
        let io = TokioIo::new(upstream);
        if req.version() == Version::HTTP_2 {
            let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            self.shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert((endpoint, true), sender.clone());
            Ok(sender.send_request(req).await?.map(|b| b.boxed()))
        } else {
            let (mut sender, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            let resp = sender.send_request(req).await?;
            Ok(self.recycle(endpoint, sender, resp))
        }
    }

    /// The response, whose end gives the HTTP/1.1 connection back.
    fn recycle(
        self: &Arc<Self>,
        endpoint: SocketAddr,
        sender: http1::SendRequest<Body>,
        resp: Response<Incoming>,
    ) -> Response<Body> {
        let pool = Arc::downgrade(self);
        resp.map(|inner| {
            let mut body = Recycle {
                inner,
                back: Some((sender, endpoint, pool)),
            };
            body.give_back_if_done();
            body.boxed()
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

type GiveBack = (http1::SendRequest<Body>, SocketAddr, Weak<Upstreams>);

/// A response body that returns its connection to the pool once read to
/// its end (dropped before that, the connection closes with it).
struct Recycle {
    inner: Incoming,
    back: Option<GiveBack>,
}

impl Recycle {
    fn give_back_if_done(&mut self) {
        if self.inner.is_end_stream()
            && let Some((sender, endpoint, pool)) = self.back.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.put_h1(endpoint, sender);
        }
    }
}

impl hyper::body::Body for Recycle {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some((sender, endpoint, pool)) = this.back.take()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.put_h1(endpoint, sender);
                }
            }
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => this.give_back_if_done(),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
