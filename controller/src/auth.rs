//! Who is calling: data planes present a bearer token (a service account
//! token in Kubernetes, a bootstrap token in local setups) on every gRPC
//! request; an [`Authenticator`] turns it into a [`Caller`].

use std::collections::HashMap;

use serde::Deserialize;
use tonic::Status;

/// Who a caller proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The ztunnel of a node.
    Node(String),
    /// A waypoint running as a service account.
    Waypoint {
        namespace: String,
        service_account: String,
    },
}

/// Turns a bearer token into a caller, or says why not.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, token: &str) -> Result<Caller, String>;
}

impl std::fmt::Debug for dyn Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator")
    }
}

/// Tokens from a file, for setups without Kubernetes:
/// `tokens: [{token: …, node: n1}, {token: …, waypoint: ns/sa}]`.
#[derive(Default)]
pub struct BootstrapTokens(HashMap<String, Caller>);

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("BootstrapTokens")
            .field("callers", &self.0.len())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    waypoint: Option<String>,
}

impl BootstrapTokens {
    pub fn parse(yaml: &str) -> Result<Self, String> {
        let file: TokenFile = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        let mut tokens = HashMap::new();
        for (i, e) in file.tokens.into_iter().enumerate() {
            let caller = match (e.node, e.waypoint) {
                (Some(node), None) => Caller::Node(node),
                (None, Some(wp)) => match wp.split_once('/') {
                    Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => Caller::Waypoint {
                        namespace: ns.into(),
                        service_account: sa.into(),
                    },
                    _ => {
                        return Err(format!(
                            "token {i}: waypoint {wp:?} is not <namespace>/<sa>"
                        ));
                    }
                },
                _ => return Err(format!("token {i}: needs exactly one of node, waypoint")),
            };
            if e.token.len() < 16 {
                return Err(format!("token {i}: shorter than 16 characters"));
            }
            tokens.insert(e.token, caller);
        }
        Ok(Self(tokens))
    }
}

#[async_trait::async_trait]
impl Authenticator for BootstrapTokens {
    async fn authenticate(&self, token: &str) -> Result<Caller, String> {
        self.0
            .get(token)
            .cloned()
            .ok_or_else(|| "unknown token".into())
    }
}

/// The caller of a request, or `UNAUTHENTICATED` with the reason.
pub async fn authenticate(
    auth: &dyn Authenticator,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Caller, Status> {
    let token = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
    auth.authenticate(token)
        .await
        .map_err(Status::unauthenticated)
}
