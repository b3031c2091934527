//! The certificate manager caches, shares requests in flight, rotates at half
//! life and never hands out an expired certificate. Time is paused: rotation
//! is driven by `tokio::time`, so hours pass instantly and deterministically.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use identity::ca::DEFAULT_LEAF_TTL;
use identity::{
    CaClient, CaClientError, CertError, CertManager, CertificateAuthority, Identity, InProcessCa,
    SignedChain, TrustDomain,
};

/// Wraps the in-process CA: counts requests, can be made slow or failing.
#[derive(Debug)]
struct TestCa {
    inner: InProcessCa,
    calls: AtomicUsize,
    failing: AtomicBool,
    delay: Duration,
}

#[async_trait::async_trait]
impl CaClient for TestCa {
    async fn sign(
        &self,
        csr_der: Vec<u8>,
        identity: &Identity,
    ) -> Result<SignedChain, CaClientError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if self.failing.load(Ordering::SeqCst) {
            return Err(CaClientError::Unavailable("test CA is down".into()));
        }
        self.inner.sign(csr_der, identity).await
    }
}

fn test_ca(delay: Duration) -> Arc<TestCa> {
    let td = TrustDomain::new("cluster.local").unwrap();
    let ca = CertificateAuthority::self_signed(td, DEFAULT_LEAF_TTL).unwrap();
    Arc::new(TestCa {
        inner: InProcessCa::new(Arc::new(ca)),
        calls: AtomicUsize::new(0),
        failing: AtomicBool::new(false),
        delay,
    })
}

fn id(sa: &str) -> Identity {
    Identity::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap()
}

/// Lets spawned tasks (issuance, refresher) run to their next long wait: a
/// short sleep parks the runtime, which fires due timers on the paused clock.
async fn settle() {
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn caches_and_shares_one_request_per_identity() {
    let ca = test_ca(Duration::from_millis(50));
    let manager = CertManager::new(ca.clone());
    let a = id("a");
    let fetches = (0..50).map(|_| manager.fetch(&a));
    let certs = futures_util::future::try_join_all(fetches).await.unwrap();
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1, "one CSR for 50 callers");
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
    assert_eq!(certs[0].identity(), &a);

    let again = manager.fetch(&a).await.unwrap();
    assert!(Arc::ptr_eq(&again, &certs[0]), "served from cache");
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1);

    let b = manager.fetch(&id("b")).await.unwrap();
    assert_eq!(b.identity(), &id("b"));
    assert_eq!(
        ca.calls.load(Ordering::SeqCst),
        2,
        "identities are independent"
    );
    assert_eq!(manager.certificates().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn rotates_at_half_life_and_new_handshakes_use_the_new_cert() {
    let ca = test_ca(Duration::ZERO);
    let manager = CertManager::new(ca.clone());
    let a = id("a");
    let first = manager.fetch(&a).await.unwrap();
    let half_life = first.refresh_at() - tokio::time::Instant::now();
    assert!(
        half_life > Duration::from_secs(11 * 3600) && half_life <= Duration::from_secs(12 * 3600),
        "half of 24 h, got {half_life:?}"
    );

    tokio::time::advance(half_life - Duration::from_secs(60)).await;
    settle().await;
    assert!(Arc::ptr_eq(&manager.fetch(&a).await.unwrap(), &first));
    assert_eq!(
        ca.calls.load(Ordering::SeqCst),
        1,
        "no renewal before half life"
    );

    tokio::time::advance(Duration::from_secs(120)).await;
    settle().await;
    assert_eq!(
        ca.calls.load(Ordering::SeqCst),
        2,
        "renewed at half life without a caller"
    );
    let second = manager.fetch(&a).await.unwrap();
    assert!(!Arc::ptr_eq(&second, &first));
    assert!(second.not_after() > first.not_after() || second.expires_at() > first.expires_at());
    assert!(!Arc::ptr_eq(second.server_config(), first.server_config()));

    // And again at the second certificate's half life.
    tokio::time::advance(
        second.refresh_at() - tokio::time::Instant::now() + Duration::from_secs(1),
    )
    .await;
    settle().await;
    assert_eq!(ca.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn never_hands_out_an_expired_certificate() {
    let ca = test_ca(Duration::ZERO);
    let manager = CertManager::new(ca.clone());
    let a = id("a");
    let first = manager.fetch(&a).await.unwrap();
    ca.failing.store(true, Ordering::SeqCst);

    // Past half life the renewal fails, but the current certificate is still valid.
    tokio::time::advance(first.refresh_at() - tokio::time::Instant::now() + Duration::from_secs(1))
        .await;
    settle().await;
    assert!(ca.calls.load(Ordering::SeqCst) >= 2, "renewal attempted");
    assert!(Arc::ptr_eq(&manager.fetch(&a).await.unwrap(), &first));

    // Past expiry with the CA still down: an error, never the expired certificate.
    tokio::time::advance(first.expires_at() - tokio::time::Instant::now() + Duration::from_secs(1))
        .await;
    assert!(first.is_expired());
    let err = manager.fetch(&a).await.unwrap_err();
    assert!(matches!(err, CertError::Ca { .. }), "{err}");
    assert!(err.to_string().contains("test CA is down"), "{err}");

    // The CA comes back: the refresher's retry (or the next fetch) recovers.
    ca.failing.store(false, Ordering::SeqCst);
    let renewed = manager.fetch(&a).await.unwrap();
    assert!(!renewed.is_expired());
    assert!(!Arc::ptr_eq(&renewed, &first));
}

#[tokio::test(start_paused = true)]
async fn forget_stops_rotation() {
    let ca = test_ca(Duration::ZERO);
    let manager = CertManager::new(ca.clone());
    let a = id("a");
    let first = manager.fetch(&a).await.unwrap();
    manager.forget(&a);
    assert!(manager.certificates().is_empty());
    tokio::time::advance(first.refresh_at() - tokio::time::Instant::now() + Duration::from_secs(1))
        .await;
    settle().await;
    assert_eq!(
        ca.calls.load(Ordering::SeqCst),
        1,
        "no renewal after forget"
    );
}

#[tokio::test(start_paused = true)]
async fn short_lived_certificates_do_not_make_the_manager_hammer_the_ca() {
    let td = TrustDomain::new("cluster.local").unwrap();
    let ca = CertificateAuthority::self_signed(td, Duration::from_millis(500)).unwrap();
    let ca = Arc::new(TestCa {
        inner: InProcessCa::new(Arc::new(ca)),
        calls: AtomicUsize::new(0),
        failing: AtomicBool::new(false),
        delay: Duration::ZERO,
    });
    let manager = CertManager::new(ca.clone());
    manager.fetch(&id("a")).await.unwrap();
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
    }
    let calls = ca.calls.load(Ordering::SeqCst);
    // At most one renewal per identity::workload::MIN_REFRESH (1 s).
    assert!((2..=12).contains(&calls), "{calls} CA calls in 10 s");
}
