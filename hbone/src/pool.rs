//! The client connection pool. Connections are keyed by (source identity,
//! expected destination identities, destination, source IP) so that a
//! connection is only ever shared by tunnels that would have made exactly the
//! same handshake. Each carries streams up to the peer's limit (and ours);
//! only one handshake per key runs at a time and callers waiting for it share
//! its result; idle connections are released.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use identity::{CertManager, Identity};
use tokio::io::AsyncRead;
use tokio::time::Instant;

use crate::client::{Connection, Dialer, Timeouts};
use crate::headers::ConnectRequest;
use crate::{EarlyData, Error, H2Stream};

/// Pool limits.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams per connection before another connection is opened (the
    /// server's own limit applies too if lower).
    pub max_streams_per_connection: usize,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    pub timeouts: Timeouts,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            timeouts: Timeouts::default(),
        }
    }
}

/// What makes two tunnels able to share a connection.
#[derive(Debug, Clone)]
pub struct PoolKey {
    src_identity: Identity,
    dst_identities: Vec<Identity>,
    dst: SocketAddr,
    src_ip: Option<IpAddr>,
    /// How to make the TCP connection; not part of the key's identity:
    /// keys with the same source IP must dial from the same place.
    dialer: Option<Arc<dyn Dialer>>,
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.src_identity == other.src_identity
            && self.dst_identities == other.dst_identities
            && self.dst == other.dst
            && self.src_ip == other.src_ip
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.src_identity.hash(state);
        self.dst_identities.hash(state);
        self.dst.hash(state);
        self.src_ip.hash(state);
    }
}

impl PoolKey {
    /// `dst_identities` is normalised (sorted, deduplicated) so that the same
    /// set in another order maps to the same connections.
    pub fn new(
        src_identity: Identity,
        mut dst_identities: Vec<Identity>,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> Self {
        dst_identities.sort();
        dst_identities.dedup();
        Self {
            src_identity,
            dst_identities,
            dst,
            src_ip,
            dialer: None,
        }
    }

    /// Connections for this key are made by `dialer` (which connects from
    /// `src_ip`'s network namespace) instead of from the caller's.
    pub fn via(mut self, dialer: Arc<dyn Dialer>) -> Self {
        self.dialer = Some(dialer);
        self
    }
}

type PendingHandshake = Shared<BoxFuture<'static, Result<Arc<Pooled>, Arc<Error>>>>;

struct Pooled {
    conn: Connection,
    active: AtomicUsize,
    /// Milliseconds since the pool's epoch when the last stream ended.
    idle_since_ms: AtomicU64,
}

#[derive(Default)]
struct KeyState {
    conns: Vec<Arc<Pooled>>,
    handshake: Option<PendingHandshake>,
}

/// Told about every handshake the pool makes (telemetry).
pub trait PoolObserver: Send + Sync + 'static {
    /// A handshake for `key` ended after `elapsed`, failed with `error`
    /// when set.
    fn handshake(&self, key: &PoolKey, elapsed: Duration, error: Option<&Error>);
}

struct Inner {
    certs: CertManager,
    config: PoolConfig,
    observer: Option<Arc<dyn PoolObserver>>,
    epoch: Instant,
    keys: Mutex<HashMap<PoolKey, KeyState>>,
}

/// A stream's claim on a pooled connection; released when the tunnel drops.
pub(crate) struct Lease {
    pooled: Arc<Pooled>,
    epoch: Instant,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("peer", &self.pooled.conn.peer())
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.pooled.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = self.epoch.elapsed().as_millis() as u64;
            self.pooled.idle_since_ms.store(now, Ordering::Release);
        }
    }
}

/// HBONE client connections shared by tunnels. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.inner.config)
            .field("connections", &self.connection_count())
            .finish()
    }
}

impl Pool {
    /// A pool whose handshakes use certificates from `certs`. Starts a
    /// background task that closes idle connections.
    pub fn new(certs: CertManager, config: PoolConfig) -> Self {
        Self::build(certs, config, None)
    }

    /// A pool that reports its handshakes to `observer`.
    pub fn with_observer(
        certs: CertManager,
        config: PoolConfig,
        observer: Arc<dyn PoolObserver>,
    ) -> Self {
        Self::build(certs, config, Some(observer))
    }

    fn build(
        certs: CertManager,
        config: PoolConfig,
        observer: Option<Arc<dyn PoolObserver>>,
    ) -> Self {
        let inner = Arc::new(Inner {
            certs,
            config,
            observer,
            epoch: Instant::now(),
            keys: Mutex::new(HashMap::new()),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Opens a tunnel for `req` on a connection matching `key`.
    pub async fn connect(&self, key: &PoolKey, req: &ConnectRequest) -> Result<H2Stream, Error> {
        self.connect_with(key, req, &mut tokio::io::empty(), &mut EarlyData::new(0))
            .await
    }

    /// Opens a tunnel for `client` on a connection matching `key`, sending
    /// its bytes ahead of the answer ([`Connection::open_with`]).
    pub async fn connect_with<R: AsyncRead + Unpin + ?Sized>(
        &self,
        key: &PoolKey,
        req: &ConnectRequest,
        client: &mut R,
        early: &mut EarlyData,
    ) -> Result<H2Stream, Error> {
        let lease = self.checkout(key).await?;
        match lease.pooled.conn.open_with(req, client, early).await {
            Ok(stream) => Ok(H2Stream {
                lease: Some(lease),
                ..stream
            }),
            // The server is going away or refused the stream before acting
            // on it: safe to retry once. The connection takes no new
            // streams (after a GOAWAY, h2 fails every one), so it leaves
            // the pool and the retry makes a new connection; its open
            // streams keep it alive until they end.
            Err(Error::H2(e)) if crate::error::refused_unprocessed(&e) => {
                let refused = lease.pooled.clone();
                drop(lease);
                self.retire(key, &refused);
                let lease = self.checkout(key).await?;
                let stream = lease.pooled.conn.open_with(req, client, early).await?;
                Ok(H2Stream {
                    lease: Some(lease),
                    ..stream
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Open connections across all keys.
    pub fn connection_count(&self) -> usize {
        self.inner.lock().values().map(|k| k.conns.len()).sum()
    }

    /// Open connections for one key.
    pub fn connections_for(&self, key: &PoolKey) -> usize {
        self.inner.lock().get(key).map_or(0, |k| k.conns.len())
    }

    /// Closes every connection without streams now.
    pub fn close_idle(&self) {
        self.inner.sweep(Duration::ZERO);
    }

    async fn checkout(&self, key: &PoolKey) -> Result<Lease, Error> {
        loop {
            let pending = {
                let mut keys = self.inner.lock();
                let state = keys.entry(key.clone()).or_default();
                if let Some(lease) = self.inner.try_lease(state) {
                    return Ok(lease);
                }
                match &state.handshake {
                    Some(pending) => pending.clone(),
                    None => {
                        let pending = self.start_handshake(key);
                        state.handshake = Some(pending.clone());
                        pending
                    }
                }
            };
            // Everyone waiting shares the handshake's outcome; on success the
            // loop competes for the new connection's streams (and starts
            // another handshake if it is already full).
            pending.await.map_err(Error::Shared)?;
        }
    }

    fn start_handshake(&self, key: &PoolKey) -> PendingHandshake {
        let inner = self.inner.clone();
        let key = key.clone();
        let task = tokio::spawn(async move {
            let result = inner.handshake(&key).await;
            let mut keys = inner.lock();
            let state = keys.entry(key).or_default();
            state.handshake = None;
            match result {
                Ok(conn) => {
                    let pooled = Arc::new(Pooled {
                        conn,
                        active: AtomicUsize::new(0),
                        idle_since_ms: AtomicU64::new(inner.epoch.elapsed().as_millis() as u64),
                    });
                    state.conns.push(pooled.clone());
                    Ok(pooled)
                }
                Err(e) => Err(Arc::new(e)),
            }
        });
        async move {
            task.await.unwrap_or_else(|join| {
                Err(Arc::new(Error::Io(std::io::Error::other(format!(
                    "handshake task failed: {join}"
                )))))
            })
        }
        .boxed()
        .shared()
    }

    /// Takes `pooled` out of the pool, and any connection that has closed.
    fn retire(&self, key: &PoolKey, pooled: &Arc<Pooled>) {
        if let Some(state) = self.inner.lock().get_mut(key) {
            state
                .conns
                .retain(|p| !Arc::ptr_eq(p, pooled) && !p.conn.is_closed());
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, KeyState>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A stream slot on an open connection with room, if any.
    fn try_lease(&self, state: &mut KeyState) -> Option<Lease> {
        state.conns.retain(|p| !p.conn.is_closed());
        let limit = self.config.max_streams_per_connection;
        state.conns.iter().find_map(|pooled| {
            let cap = limit.min(pooled.conn.peer_max_streams());
            pooled
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < cap).then_some(n + 1)
                })
                .ok()
                .map(|_| Lease {
                    pooled: pooled.clone(),
                    epoch: self.epoch,
                })
        })
    }

    /// Fetches the source's certificate, then connects: the observer sees
    /// the connect and the TLS and HTTP/2 handshakes, not a certificate
    /// signed for the occasion (a CA's round trip, whose failure is no
    /// handshake's).
    async fn handshake(&self, key: &PoolKey) -> Result<Connection, Error> {
        let cert = self.certs.fetch(&key.src_identity).await?;
        let started = Instant::now();
        let result = match &key.dialer {
            Some(dialer) => {
                Connection::establish_over(
                    dialer.dial(key.dst),
                    &cert,
                    key.dst_identities.clone(),
                    key.dst,
                    self.config.timeouts,
                )
                .await
            }
            None => {
                Connection::establish(
                    &cert,
                    key.dst_identities.clone(),
                    key.dst,
                    key.src_ip,
                    self.config.timeouts,
                )
                .await
            }
        };
        if let Some(observer) = &self.observer {
            observer.handshake(key, started.elapsed(), result.as_ref().err());
        }
        result
    }

    /// Drops connections that are closed or have had no stream for `idle`.
    fn sweep(&self, idle: Duration) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle_ms = idle.as_millis() as u64;
        let mut keys = self.lock();
        keys.retain(|_, state| {
            state.conns.retain(|p| {
                !p.conn.is_closed()
                    && (p.active.load(Ordering::Acquire) > 0
                        || now.saturating_sub(p.idle_since_ms.load(Ordering::Acquire)) < idle_ms)
            });
            !state.conns.is_empty() || state.handshake.is_some()
        });
    }
}

async fn reap_idle(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(inner) => (inner.config.idle_timeout / 4).max(Duration::from_secs(1)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        inner.sweep(inner.config.idle_timeout);
    }
}
