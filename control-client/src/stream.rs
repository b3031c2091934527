//! The config stream, data plane side.

use std::time::Duration;

use async_trait::async_trait;
use model::proto::config::config_service_client::ConfigServiceClient;
use model::proto::config::subscribe_request::Request as Message;
use model::proto::config::{Ack, ConfigUpdate, Hello, Nack, SubscribeRequest};
use model::resources::{Held, Item, bucket, bucket_digests};
use model::{ConfigSink, ConfigSource};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::channel::{ClientError, Controller};

/// One open subscription: updates in, answers out.
#[derive(Debug)]
pub struct Subscription {
    controller: Controller,
    answers: mpsc::Sender<SubscribeRequest>,
    updates: tonic::Streaming<ConfigUpdate>,
}

/// Held resources per Hello message: about 16 KiB.
const HELLO_PART: usize = 256;

/// `hello` as messages of at most [`HELLO_PART`] resources, all but the
/// last saying `more`; bucket digests go in the first.
fn hello_parts(hello: Hello) -> impl Iterator<Item = Hello> {
    let version = hello.version;
    let mut held = hello.held.into_iter().peekable();
    let mut buckets = Some(hello.buckets);
    std::iter::from_fn(move || {
        let first = buckets.take();
        if first.is_none() && held.peek().is_none() {
            return None;
        }
        let part: Vec<_> = held.by_ref().take(HELLO_PART).collect();
        Some(Hello {
            held: part,
            version,
            more: held.peek().is_some(),
            buckets: first.unwrap_or_default(),
        })
    })
}

impl Subscription {
    /// Connects and says hello (in parts of 256 resources);
    /// the first update follows.
    pub async fn open(controller: &Controller, hello: Hello) -> Result<Self, ClientError> {
        let channel = controller.channel().await?;
        // The controller waits for each answer before the next update:
        // a few slots are plenty.
        let (answers, rx) = mpsc::channel(4);
        let parts = hello_parts(hello).map(|hello| SubscribeRequest {
            request: Some(Message::Hello(hello)),
        });
        let requests =
            tokio_stream::iter(parts).chain(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = controller.request(requests)?;
        // Updates come in parts of about 1 MiB; one resource may be larger.
        let updates = ConfigServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .subscribe(req)
            .await
            .map_err(|s| controller.status(s))?
            .into_inner();
        Ok(Self {
            controller: controller.clone(),
            answers,
            updates,
        })
    }

    /// The next message, which may be one part of an update; `None` when
    /// the controller ended the stream.
    pub async fn next(&mut self) -> Result<Option<ConfigUpdate>, ClientError> {
        self.updates
            .message()
            .await
            .map_err(|s| self.controller.status(s))
    }

    /// The next whole update, its parts joined.
    pub async fn next_update(&mut self) -> Result<Option<ConfigUpdate>, ClientError> {
        let Some(mut update) = self.next().await? else {
            return Ok(None);
        };
        while update.more {
            let Some(part) = self.next().await? else {
                return Ok(None);
            };
            if part.version != update.version {
                return Err(ClientError::Protocol {
                    addr: self.controller.addr().to_string(),
                    reason: format!(
                        "part of version {} inside update {}",
                        part.version, update.version
                    ),
                });
            }
            update.upserts.extend(part.upserts);
            update.removals.extend(part.removals);
            update.replaced_buckets.extend(part.replaced_buckets);
            update.more = part.more;
        }
        Ok(Some(update))
    }

    pub async fn ack(&self, version: u64) -> Result<(), ClientError> {
        self.answer(Message::Ack(Ack { version })).await
    }

    pub async fn nack(&self, version: u64, reason: String) -> Result<(), ClientError> {
        self.answer(Message::Nack(Nack { version, reason })).await
    }

    async fn answer(&self, message: Message) -> Result<(), ClientError> {
        self.answers
            .send(SubscribeRequest {
                request: Some(message),
            })
            .await
            .map_err(|_| ClientError::Protocol {
                addr: self.controller.addr().to_string(),
                reason: "the stream closed".into(),
            })
    }
}

/// The first update after a Hello of bucket digests. A controller that
/// knows buckets answers with the buckets it replaces (or nothing when all
/// agree); one from before them takes the Hello for an empty one and sends
/// everything the subscriber needs, without removals: that update is a
/// whole config, and is applied as one so that nothing deleted meanwhile
/// stays behind.
fn whole_if_buckets_ignored(update: &mut ConfigUpdate) {
    let sends_something = !update.upserts.is_empty() || !update.removals.is_empty();
    if sends_something && update.replaced_buckets.is_empty() {
        update.full = true;
    }
}

/// Applies `update` to a copy of `held`; the result, or why it cannot be
/// read.
fn apply_update(held: &Held, update: &ConfigUpdate) -> Result<Held, String> {
    let mut next = if update.full {
        Held::new()
    } else {
        held.clone()
    };
    for key in &update.removals {
        let kind = model::proto::config::Kind::try_from(key.kind)
            .map_err(|_| format!("removal of {:?}: unknown kind {}", key.name, key.kind))?;
        next.remove(&(kind, key.name.clone()));
    }
    if !update.replaced_buckets.is_empty() {
        let replaced: std::collections::HashSet<usize> = update
            .replaced_buckets
            .iter()
            .map(|b| *b as usize)
            .collect();
        next.retain(|(kind, name), _| !replaced.contains(&bucket(*kind, name)));
    }
    for resource in &update.upserts {
        let item = Item::decode(resource).map_err(|e| e.to_string())?;
        next.insert(item.key(), (resource.digest, item));
    }
    Ok(next)
}

/// [`apply_update`], with a failure counted and logged by `sink` like any
/// refused config: an update that cannot even be decoded is one too.
fn decoded(held: &Held, update: &ConfigUpdate, sink: &ConfigSink) -> Result<Held, String> {
    apply_update(held, update).map_err(|reason| {
        let _ = sink.refuse(model::ConfigError::Parse(format!(
            "update {}: {reason}",
            update.version
        )));
        reason
    })
}

/// The controller's config stream as a config source. Each update is
/// validated whole by the sink and acknowledged, or refused with the
/// reason while the last good config keeps serving. When the controller
/// is unreachable the data plane keeps its config and reconnects with
/// backoff, telling the controller what it holds (per bucket) so that only
/// the buckets that differ come back.
#[derive(Debug)]
pub struct StreamSource {
    controller: Controller,
    held: Held,
    version: u64,
}

/// The largest message accepted: one resource (a Service with very many
/// endpoints) may exceed the usual part size.
const MAX_MESSAGE: usize = 64 << 20;

/// Backoff between reconnections.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl StreamSource {
    pub fn new(controller: Controller) -> Self {
        Self {
            controller,
            held: Held::new(),
            version: 0,
        }
    }

    /// What it holds, summed up per bucket: a few kilobytes however much
    /// it holds (nothing when it holds nothing).
    fn hello(&self) -> Hello {
        let buckets = if self.held.is_empty() {
            Vec::new()
        } else {
            bucket_digests(
                self.held
                    .iter()
                    .map(|((kind, name), (digest, _))| (*kind, name.as_str(), *digest)),
            )
        };
        Hello {
            buckets,
            version: self.version,
            ..Hello::default()
        }
    }

    /// Follows one subscription until it ends; whether any update came.
    async fn session(&mut self, sink: &ConfigSink) -> (bool, ClientError) {
        let mut updated = false;
        let hello = self.hello();
        let mut by_bucket = !hello.buckets.is_empty();
        let mut sub = match Subscription::open(&self.controller, hello).await {
            Ok(sub) => sub,
            Err(error) => return (updated, error),
        };
        tracing::info!(controller = %self.controller.addr(), held = self.held.len(), "subscribed to the controller");
        loop {
            let mut update = match sub.next_update().await {
                Ok(Some(update)) => update,
                Ok(None) => {
                    let error = ClientError::Protocol {
                        addr: self.controller.addr().to_string(),
                        reason: "the controller ended the stream".into(),
                    };
                    return (updated, error);
                }
                Err(error) => return (updated, error),
            };
            updated = true;
            if std::mem::take(&mut by_bucket) {
                whole_if_buckets_ignored(&mut update);
            }
            let answer = match self.apply(sink, &update) {
                Ok(()) => sub.ack(update.version).await,
                Err(reason) => {
                    tracing::warn!(version = update.version, %reason, "config update refused");
                    sub.nack(update.version, reason).await
                }
            };
            if let Err(error) = answer {
                return (updated, error);
            }
        }
    }

    fn apply(&mut self, sink: &ConfigSink, update: &ConfigUpdate) -> Result<(), String> {
        let next = decoded(&self.held, update, sink)?;
        let config =
            model::resources::assemble(&update.trust_domain, next.values().map(|(_, i)| i));
        sink.apply(config).map_err(|e| e.to_string())?;
        tracing::debug!(
            version = update.version,
            upserts = update.upserts.len(),
            removals = update.removals.len(),
            "config update applied"
        );
        self.held = next;
        self.version = update.version;
        Ok(())
    }
}

#[async_trait]
impl ConfigSource for StreamSource {
    async fn run(mut self: Box<Self>, sink: ConfigSink, stop: CancellationToken) {
        let mut retry = RETRY_MIN;
        loop {
            let (updated, error) = tokio::select! {
                ended = self.session(&sink) => ended,
                () = stop.cancelled() => return,
            };
            if updated {
                retry = RETRY_MIN;
            }
            tracing::warn!(%error, retry_in = ?retry, "config stream lost; serving the last good config");
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                () = stop.cancelled() => return,
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use model::proto::config::Kind;
    use model::resources::{Held, Item, bucket};

    use super::*;

    fn workload(uid: &str, rev: &str) -> Item {
        Item::Workload(
            serde_json::from_value(serde_json::json!({
                "uid": uid, "name": uid, "namespace": "shop", "ips": [],
                "labels": {"rev": rev},
            }))
            .unwrap(),
        )
    }

    fn held(items: &[Item]) -> Held {
        items
            .iter()
            .map(|i| (i.key(), (i.encode().digest, i.clone())))
            .collect()
    }

    /// A resource that does not decode refuses the update, counted with
    /// the configs the sink refused.
    #[test]
    fn an_update_that_does_not_decode_is_counted_as_refused() {
        let sink = ConfigSink::new();
        let mut garbled = workload("w-1", "1").encode();
        garbled.json = b"{not json".to_vec().into();
        let update = ConfigUpdate {
            version: 7,
            upserts: vec![garbled],
            ..ConfigUpdate::default()
        };
        let reason = decoded(&Held::new(), &update, &sink).unwrap_err();
        assert!(reason.contains("w-1"), "{reason}");
        assert_eq!(sink.rejected(), 1);
    }

    #[test]
    fn a_replaced_bucket_keeps_only_what_the_update_sends_of_it() {
        // Two workloads sharing a bucket, one elsewhere.
        let a = "w-0".to_string();
        let same = (1..)
            .map(|i| format!("w-{i}"))
            .find(|n| bucket(Kind::Workload, n) == bucket(Kind::Workload, &a))
            .unwrap();
        let other = (1..)
            .map(|i| format!("w-{i}"))
            .find(|n| bucket(Kind::Workload, n) != bucket(Kind::Workload, &a))
            .unwrap();
        let before = held(&[
            workload(&a, "1"),
            workload(&same, "1"),
            workload(&other, "1"),
        ]);
        // The controller has a's new version and no longer `same`.
        let update = ConfigUpdate {
            version: 2,
            upserts: vec![workload(&a, "2").encode()],
            replaced_buckets: vec![bucket(Kind::Workload, &a) as u32],
            ..ConfigUpdate::default()
        };
        let after = apply_update(&before, &update).unwrap();
        let names: Vec<&str> = after.keys().map(|(_, n)| n.as_str()).collect();
        let mut expected = vec![a.as_str(), other.as_str()];
        expected.sort_unstable();
        assert_eq!(names, expected);
        assert_eq!(after[&(Kind::Workload, a.clone())].1, workload(&a, "2"));

        // A controller that ignored the buckets sent everything, with no
        // removals: applied whole, `same` (gone meanwhile) does not stay.
        let mut old_style = ConfigUpdate {
            version: 2,
            upserts: vec![workload(&a, "2").encode(), workload(&other, "1").encode()],
            ..ConfigUpdate::default()
        };
        whole_if_buckets_ignored(&mut old_style);
        let after = apply_update(&before, &old_style).unwrap();
        assert_eq!(
            after.keys().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
            expected
        );
        // An answer that knows buckets is applied as it says.
        let mut nothing = ConfigUpdate::default();
        whole_if_buckets_ignored(&mut nothing);
        assert!(!nothing.full);
        let mut replaced = update.clone();
        whole_if_buckets_ignored(&mut replaced);
        assert!(!replaced.full);
    }
}
