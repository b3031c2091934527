//! Leader election with a `coordination.k8s.io/v1` Lease: the holder
//! renews it; another replica takes it over once it has not been renewed
//! for its duration. Replacements carry the resource version they read, so
//! two replicas never both win. Only the leader writes to the API server
//! (policy status); every replica serves config and certificates.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One replica's side of the election.
#[derive(Debug, Clone)]
pub struct LeaseLock {
    pub api: Api<Lease>,
    pub name: String,
    /// This replica (its pod name).
    pub holder: String,
    pub duration: Duration,
}

fn now() -> MicroTime {
    let micros = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    MicroTime(Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn expired(spec: &LeaseSpec) -> bool {
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    let now = now().0.as_microsecond();
    renewed.0.as_microsecond() + i64::from(seconds) * 1_000_000 < now
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(&self.holder);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now())
            },
            renew_time: Some(now()),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the lease; whether this replica holds it now.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let current = match self.api.get_opt(&self.name).await? {
            Some(lease) => lease,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(&self.holder);
        if !ours && !expired(&spec) {
            return Ok(false);
        }
        let lease = Lease {
            metadata: current.metadata.clone(),
            spec: Some(self.spec(Some(&spec))),
        };
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Campaigns and renews every third of the duration until `stop`,
    /// publishing whether this replica leads. An error (API server away)
    /// counts as losing: a leader that cannot renew must stop writing
    /// before another can take over.
    pub async fn run(self, leader: watch::Sender<bool>, stop: CancellationToken) {
        let period = self.duration / 3;
        loop {
            let leads = match self.try_acquire().await {
                Ok(leads) => leads,
                Err(error) => {
                    tracing::warn!(%error, lease = %self.name, "lease not renewed");
                    false
                }
            };
            leader.send_if_modified(|was| {
                if *was != leads {
                    tracing::info!(holder = %self.holder, leads, "leadership changed");
                    *was = leads;
                    true
                } else {
                    false
                }
            });
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}
