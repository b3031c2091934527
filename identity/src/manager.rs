//! Workload certificates for data planes: one key and certificate per
//! identity, obtained from the CA through [`CaClient`], cached, rotated at
//! half life, never handed out once expired, and with at most one request in
//! flight per identity.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::task::AbortHandle;

use crate::ca::{CertificateAuthority, SignedChain, generate_csr};
use crate::spiffe::Identity;
use crate::workload::{InvalidCertError, WorkloadCert};

/// How a data plane asks the CA to sign a CSR.
#[async_trait::async_trait]
pub trait CaClient: Send + Sync + fmt::Debug {
    /// Signs a DER CSR requesting `identity`.
    async fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: &Identity,
    ) -> Result<SignedChain, CaClientError>;
}

/// Why the CA did not return a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("the CA refused to sign: {0}")]
    Refused(#[source] Box<dyn StdError + Send + Sync>),
    #[error("the CA could not be reached: {0}")]
    Unavailable(#[source] Box<dyn StdError + Send + Sync>),
}

/// A CA running in the same process; the caller is trusted to ask only for
/// identities it serves.
#[derive(Debug, Clone)]
pub struct InProcessCa(Arc<CertificateAuthority>);

impl InProcessCa {
    pub fn new(ca: Arc<CertificateAuthority>) -> Self {
        Self(ca)
    }
}

#[async_trait::async_trait]
impl CaClient for InProcessCa {
    async fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: &Identity,
    ) -> Result<SignedChain, CaClientError> {
        self.0
            .sign(&csr_der, identity)
            .map_err(|e| CaClientError::Refused(Box::new(e)))
    }
}

/// Why no certificate could be provided for an identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate a key and CSR for {identity}: {reason}")]
    KeyGen { identity: Identity, reason: String },
    #[error("certificate request for {identity} failed: {source}")]
    Ca {
        identity: Identity,
        #[source]
        source: Arc<CaClientError>,
    },
    #[error("certificate issued for {identity} is unusable: {source}")]
    Invalid {
        identity: Identity,
        #[source]
        source: InvalidCertError,
    },
    #[error("certificate request for {identity} was cancelled (runtime shutting down)")]
    Cancelled { identity: Identity },
}

type PendingFetch = Shared<BoxFuture<'static, Result<Arc<WorkloadCert>, CertError>>>;

#[derive(Default)]
struct Slot {
    current: Option<Arc<WorkloadCert>>,
    pending: Option<PendingFetch>,
    refresher: Option<AbortHandle>,
}

struct Inner {
    ca: Arc<dyn CaClient>,
    slots: Mutex<HashMap<Identity, Slot>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let slots = self.slots.get_mut().unwrap_or_else(PoisonError::into_inner);
        for refresher in slots.values().filter_map(|slot| slot.refresher.as_ref()) {
            refresher.abort();
        }
    }
}

/// Caches and rotates workload certificates. Cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("ca", &self.inner.ca)
            .field("identities", &self.inner.lock().len())
            .finish()
    }
}

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

impl CertManager {
    /// A manager obtaining certificates from `ca`.
    pub fn new(ca: Arc<dyn CaClient>) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A valid certificate for `identity`: the cached one while it is
    /// valid, otherwise the result of the (shared) request in flight.
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let pending = {
            let mut slots = self.inner.lock();
            let slot = slots.entry(identity.clone()).or_default();
            match &slot.current {
                Some(cert) if !cert.is_expired() => return Ok(cert.clone()),
                _ => Inner::pending_for(&self.inner, slot, identity),
            }
        };
        pending.await
    }

    /// Stops caching and rotating `identity` (its workloads left the node).
    pub fn forget(&self, identity: &Identity) {
        if let Some(slot) = self.inner.lock().remove(identity)
            && let Some(refresher) = slot.refresher
        {
            refresher.abort();
        }
    }

    /// The certificates currently cached, for config dumps.
    pub fn certificates(&self) -> Vec<Arc<WorkloadCert>> {
        self.inner
            .lock()
            .values()
            .filter_map(|slot| slot.current.clone())
            .collect()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the request in flight for `identity`, or starts one. The request
    /// runs as its own task so that it completes (and the refresher is
    /// scheduled) even if every caller gives up waiting.
    fn pending_for(this: &Arc<Self>, slot: &mut Slot, identity: &Identity) -> PendingFetch {
        if let Some(pending) = &slot.pending {
            return pending.clone();
        }
        let task = tokio::spawn(Self::issue_and_store(
            Arc::downgrade(this),
            this.ca.clone(),
            identity.clone(),
        ));
        let id = identity.clone();
        let pending = async move {
            task.await
                .unwrap_or_else(|_| Err(CertError::Cancelled { identity: id }))
        }
        .boxed()
        .shared();
        slot.pending = Some(pending.clone());
        pending
    }

    async fn issue_and_store(
        this: Weak<Self>,
        ca: Arc<dyn CaClient>,
        identity: Identity,
    ) -> Result<Arc<WorkloadCert>, CertError> {
        let result = issue(ca.as_ref(), &identity).await.map(Arc::new);
        let Some(inner) = this.upgrade() else {
            return result;
        };
        let mut slots = inner.lock();
        // The identity may have been forgotten while the request was in flight.
        let Some(slot) = slots.get_mut(&identity) else {
            return result;
        };
        slot.pending = None;
        match &result {
            Ok(cert) => {
                tracing::info!(%identity, not_after = ?cert.not_after(), "workload certificate issued");
                slot.current = Some(cert.clone());
                if slot.refresher.is_none() {
                    let task =
                        tokio::spawn(refresh_loop(this.clone(), identity.clone(), cert.clone()));
                    slot.refresher = Some(task.abort_handle());
                }
            }
            Err(error) => tracing::warn!(%identity, %error, "workload certificate request failed"),
        }
        result
    }
}

async fn issue(ca: &dyn CaClient, identity: &Identity) -> Result<WorkloadCert, CertError> {
    let (csr, key) = generate_csr(identity).map_err(|e| CertError::KeyGen {
        identity: identity.clone(),
        reason: e.to_string(),
    })?;
    let chain = ca
        .sign(csr, identity)
        .await
        .map_err(|source| CertError::Ca {
            identity: identity.clone(),
            source: Arc::new(source),
        })?;
    WorkloadCert::new(identity.clone(), key, chain).map_err(|source| CertError::Invalid {
        identity: identity.clone(),
        source,
    })
}

/// Renews `identity` at each certificate's half life; on failure retries
/// with capped exponential backoff until a renewal succeeds.
async fn refresh_loop(inner: Weak<Inner>, identity: Identity, mut cert: Arc<WorkloadCert>) {
    loop {
        tokio::time::sleep_until(cert.refresh_at()).await;
        let mut backoff = RETRY_MIN;
        cert = loop {
            let pending = {
                let Some(inner) = inner.upgrade() else { return };
                let mut slots = inner.lock();
                let Some(slot) = slots.get_mut(&identity) else {
                    return;
                };
                Inner::pending_for(&inner, slot, &identity)
            };
            match pending.await {
                Ok(renewed) => break renewed,
                Err(_) => {
                    // issue_and_store already logged the reason.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        };
    }
}
