//! The mesh config as a set of named resources, the unit of the config
//! stream: each carries the JSON of its model type and a digest of it, so
//! that two ends can tell which resources differ without sending them.

use std::collections::BTreeMap;

use aws_lc_rs::digest::{Context, SHA256};

use crate::config::{MeshConfig, Service, Workload};
use crate::policy::{AuthorizationPolicy, PeerAuthentication};
use crate::proto::config::{Kind, Resource, ResourceKey};
use crate::route::{Route, RouteKind};

/// One resource of a config.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Workload(Workload),
    Service(Service),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    Route(Route),
}

/// A resource's identity in the stream: its kind and name.
pub type Key = (Kind, String);

/// Why a received resource could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("resource {name:?} has no known kind ({kind})")]
    UnknownKind { kind: i32, name: String },
    #[error("{kind:?} {name:?}: {reason}")]
    Invalid {
        kind: Kind,
        name: String,
        reason: String,
    },
}

impl Item {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Workload(_) => Kind::Workload,
            Self::Service(_) => Kind::Service,
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Self::PeerAuthentication(_) => Kind::PeerAuthentication,
            Self::Route(r) => match r.kind {
                RouteKind::Http => Kind::HttpRoute,
                RouteKind::Grpc => Kind::GrpcRoute,
            },
        }
    }

    /// Workloads are named by uid, the rest by `namespace/name`.
    pub fn name(&self) -> String {
        match self {
            Self::Workload(w) => w.uid.clone(),
            Self::Service(s) => s.key(),
            Self::AuthorizationPolicy(p) => p.key(),
            Self::PeerAuthentication(p) => p.key(),
            Self::Route(r) => r.key(),
        }
    }

    pub fn key(&self) -> Key {
        (self.kind(), self.name())
    }

    /// The wire form, with its digest.
    pub fn encode(&self) -> Resource {
        let json = match self {
            Self::Workload(w) => serde_json::to_vec(w),
            Self::Service(s) => serde_json::to_vec(s),
            Self::AuthorizationPolicy(p) => serde_json::to_vec(p),
            Self::PeerAuthentication(p) => serde_json::to_vec(p),
            Self::Route(r) => serde_json::to_vec(r),
        }
        .expect("model types serialize to JSON");
        Resource {
            kind: self.kind().into(),
            name: self.name(),
            digest: digest(&json),
            json: json.into(),
        }
    }

    /// Reads a received resource, checking that its name is its content's.
    pub fn decode(resource: &Resource) -> Result<Self, ResourceError> {
        let kind = Kind::try_from(resource.kind)
            .ok()
            .filter(|k| *k != Kind::Unspecified)
            .ok_or_else(|| ResourceError::UnknownKind {
                kind: resource.kind,
                name: resource.name.clone(),
            })?;
        let invalid = |reason: String| ResourceError::Invalid {
            kind,
            name: resource.name.clone(),
            reason,
        };
        let json = &resource.json;
        let item = match kind {
            Kind::Workload => serde_json::from_slice(json).map(Self::Workload),
            Kind::Service => serde_json::from_slice(json).map(Self::Service),
            Kind::AuthorizationPolicy => {
                serde_json::from_slice(json).map(Self::AuthorizationPolicy)
            }
            Kind::PeerAuthentication => serde_json::from_slice(json).map(Self::PeerAuthentication),
            Kind::HttpRoute | Kind::GrpcRoute => serde_json::from_slice(json).map(Self::Route),
            Kind::Unspecified => unreachable!("filtered above"),
        }
        .map_err(|e| invalid(e.to_string()))?;
        if item.kind() != kind {
            return Err(invalid(format!("its content is a {:?}", item.kind())));
        }
        if item.name() != resource.name {
            return Err(invalid(format!("its content is named {:?}", item.name())));
        }
        Ok(item)
    }
}

/// The first 8 bytes of the SHA-256 of `json`: stable across processes
/// and versions, so a subscriber's digests still mean something to a
/// restarted controller.
pub fn digest(json: &[u8]) -> u64 {
    let mut sha = Context::new(&SHA256);
    sha.update(json);
    first_u64(sha)
}

/// Like [`digest`], over several parts, each preceded by its length so
/// that `("ab", "c")` is not `("a", "bc")`.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut sha = Context::new(&SHA256);
    for part in parts {
        sha.update(&(part.len() as u64).to_le_bytes());
        sha.update(part);
    }
    first_u64(sha)
}

fn first_u64(sha: Context) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&sha.finish().as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// Splits a config into its resources.
pub fn items(config: MeshConfig) -> impl Iterator<Item = Item> {
    config
        .workloads
        .into_iter()
        .map(Item::Workload)
        .chain(config.services.into_iter().map(Item::Service))
        .chain(
            config
                .authorization_policies
                .into_iter()
                .map(Item::AuthorizationPolicy),
        )
        .chain(
            config
                .peer_authentications
                .into_iter()
                .map(Item::PeerAuthentication),
        )
        .chain(config.routes.into_iter().map(Item::Route))
}

/// Puts resources back together into a config, in key order so that the
/// same set always makes the same config.
pub fn assemble<'a>(trust_domain: &str, items: impl IntoIterator<Item = &'a Item>) -> MeshConfig {
    let mut config = MeshConfig {
        trust_domain: trust_domain.to_string(),
        ..MeshConfig::default()
    };
    for item in items {
        match item {
            Item::Workload(w) => config.workloads.push(w.clone()),
            Item::Service(s) => config.services.push(s.clone()),
            Item::AuthorizationPolicy(p) => config.authorization_policies.push(p.clone()),
            Item::PeerAuthentication(p) => config.peer_authentications.push(p.clone()),
            Item::Route(r) => config.routes.push(r.clone()),
        }
    }
    config
}

/// Held resources are summed up in this many buckets: after a reconnect a
/// subscriber says what it holds with one digest per bucket, and only the
/// buckets that differ are sent again.
pub const BUCKETS: usize = 256;

/// The bucket of the resource `(kind, name)`.
pub fn bucket(kind: Kind, name: &str) -> usize {
    (hash(&[&i32::from(kind).to_le_bytes(), name.as_bytes()]) % BUCKETS as u64) as usize
}

/// A resource's share of its bucket's digest. A bucket's digest is the XOR
/// of its resources' marks, so it follows changes one resource at a time.
pub fn mark(kind: Kind, name: &str, digest: u64) -> u64 {
    hash(&[
        &i32::from(kind).to_le_bytes(),
        name.as_bytes(),
        &digest.to_le_bytes(),
    ])
}

/// The [`BUCKETS`] digests of `resources` (kind, name, content digest).
pub fn bucket_digests<'a>(resources: impl IntoIterator<Item = (Kind, &'a str, u64)>) -> Vec<u64> {
    let mut buckets = vec![0; BUCKETS];
    for (kind, name, digest) in resources {
        buckets[bucket(kind, name)] ^= mark(kind, name, digest);
    }
    buckets
}

/// A wire key.
pub fn wire_key((kind, name): &Key) -> ResourceKey {
    ResourceKey {
        kind: (*kind).into(),
        name: name.clone(),
    }
}

/// Resources held by a data plane: key → (digest, item).
pub type Held = BTreeMap<Key, (u64, Item)>;
