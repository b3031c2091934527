//! Data planes in Kubernetes authenticate with their service account
//! token, checked by the API server (TokenReview, with the mesh's
//! audience). ztunnel's service account stands for a node: the node is
//! the one the token is bound to (projected tokens of a pod carry
//! `authentication.kubernetes.io/node-name`). Any other service account is
//! a waypoint running as itself, which can obtain only its own identity.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;

use crate::auth::{Authenticator, Caller};

/// The extra field of a pod-bound token naming its node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// How long a review is reused: tokens are checked again after this.
const CACHE_FOR: Duration = Duration::from_secs(60);

/// A review's outcome and when it was made.
type Reviewed = (Instant, Result<Caller, String>);

/// Authenticates by TokenReview.
#[derive(Debug)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audiences: Vec<String>,
    /// ztunnel's `namespace/serviceaccount`.
    ztunnel: (String, String),
    cache: Mutex<HashMap<String, Reviewed>>,
}

impl TokenReviewer {
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        ztunnel_namespace: String,
        ztunnel_service_account: String,
    ) -> Self {
        Self {
            api: Api::all(client),
            audiences,
            ztunnel: (ztunnel_namespace, ztunnel_service_account),
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let review = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("token review failed: {e}"))?;
        let status = review.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(format!(
                "token not authenticated: {}",
                status.error.as_deref().unwrap_or("no reason given")
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(format!("{username} is not a service account"));
        };
        if (namespace, service_account) == (self.ztunnel.0.as_str(), self.ztunnel.1.as_str()) {
            let node = user
                .extra
                .as_ref()
                .and_then(|e| e.get(NODE_NAME_EXTRA))
                .and_then(|v| v.first())
                .ok_or_else(|| {
                    format!("the token of {username} is not bound to a pod on a node (no {NODE_NAME_EXTRA}); use a projected service account token")
                })?;
            return Ok(Caller::Node(node.clone()));
        }
        Ok(Caller::Waypoint {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }
}

#[async_trait::async_trait]
impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<Caller, String> {
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .get(token)
                .filter(|(at, _)| at.elapsed() < CACHE_FOR)
                .map(|(_, r)| r.clone())
        };
        if let Some(result) = cached {
            return result;
        }
        let result = self.review(token).await;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
        cache.insert(token.to_string(), (Instant::now(), result.clone()));
        result
    }
}
