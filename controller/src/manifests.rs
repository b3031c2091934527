//! Local manifests mode: the same kinds the controller watches, read from
//! YAML files in a directory (one or more objects per file), for setups
//! without an API server such as `ambit lab`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::cluster::Cluster;

/// Why the directory could not be read; names the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
}

/// Just enough of an object to know its kind.
#[derive(Deserialize)]
struct TypeMeta {
    #[serde(default)]
    kind: String,
}

fn parse<T: DeserializeOwned>(path: &Path, value: serde_yaml::Value) -> Result<T, ManifestError> {
    serde_yaml::from_value(value).map_err(|e| ManifestError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Like [`parse`], but a field the type does not know is an error naming
/// its path. For policies: here no API server prunes or refuses such a
/// field, and one dropped silently could widen what a policy allows.
fn parse_strict<T: DeserializeOwned>(
    path: &Path,
    value: serde_yaml::Value,
) -> Result<T, ManifestError> {
    let mut unknown = Vec::new();
    let object = serde_ignored::deserialize(value, |field| {
        let field = field_path(&field);
        // Read by `read_dir` to pick the type, not by the type itself.
        if field != "apiVersion" && field != "kind" {
            unknown.push(field);
        }
    })
    .map_err(|e| ManifestError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if unknown.is_empty() {
        return Ok(object);
    }
    Err(ManifestError::Parse {
        path: path.to_path_buf(),
        reason: format!("unknown field {}", unknown.join(", ")),
    })
}

/// `spec.rules[0].when`: the path as written in the manifest.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        P::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            field_path(parent)
        }
    }
}

/// Reads every `*.yaml` / `*.yml` file of `dir` into a [`Cluster`]. Kinds
/// the controller does not use (ConfigMaps, ReplicaSets…) are
/// skipped; a file that is not YAML, an object of a known kind that does
/// not parse, or a policy with a field its type does not know, is an error
/// naming the file.
pub fn read_dir(dir: &Path, trust_domain: &str) -> Result<Cluster, ManifestError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Read { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut cluster = Cluster {
        trust_domain: trust_domain.to_string(),
        ..Cluster::default()
    };
    for path in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // Deleted since it was listed: as if it had not been there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(read_err(&path)(e)),
        };
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).map_err(|e| ManifestError::Parse {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if value.is_null() {
                continue;
            }
            let kind = parse::<TypeMeta>(&path, value.clone())?.kind;
            match kind.as_str() {
                "Namespace" => cluster.namespaces.push(Arc::new(parse(&path, value)?)),
                "Node" => cluster.nodes.push(Arc::new(parse(&path, value)?)),
                "Pod" => cluster.pods.push(Arc::new(parse(&path, value)?)),
                "Service" => cluster.services.push(Arc::new(parse(&path, value)?)),
                "EndpointSlice" => cluster.endpoint_slices.push(Arc::new(parse(&path, value)?)),
                "AuthorizationPolicy" => cluster
                    .authorization_policies
                    .push(Arc::new(parse_strict(&path, value)?)),
                "PeerAuthentication" => cluster
                    .peer_authentications
                    .push(Arc::new(parse_strict(&path, value)?)),
                "ServiceAccount" => cluster
                    .service_accounts
                    .push(Arc::new(parse(&path, value)?)),
                "Gateway" => cluster.gateways.push(Arc::new(parse(&path, value)?)),
                "Deployment" => cluster.deployments.push(Arc::new(parse(&path, value)?)),
                "HTTPRoute" => cluster.http_routes.push(Arc::new(parse(&path, value)?)),
                "GRPCRoute" => cluster.grpc_routes.push(Arc::new(parse(&path, value)?)),
                _ => {}
            }
        }
    }
    Ok(cluster)
}
