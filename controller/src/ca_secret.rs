//! The mesh root in Kubernetes: a Secret (`ca-cert.pem`, `ca-key.pem`,
//! `root-cert.pem`, optional `cert-chain.pem`, the plugged-in layout)
//! created on first start, or provided by the operator for a plugged-in
//! root or intermediate. Replicas starting together race to create it;
//! the loser reads the winner's.

use std::collections::BTreeMap;

use identity::ca::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, DEFAULT_LEAF_TTL, ROOT_CERT_FILE};
use identity::{CertificateAuthority, PluggedCa, TrustDomain};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> anyhow::Result<Option<String>> {
    data.get(key)
        .map(|b| String::from_utf8(b.0.clone()))
        .transpose()
        .map_err(|_| anyhow::anyhow!("{key} is not UTF-8 PEM"))
}

fn plugged(secret: &Secret) -> anyhow::Result<PluggedCa> {
    let data = secret.data.clone().unwrap_or_default();
    let need =
        |key: &str| text(&data, key)?.ok_or_else(|| anyhow::anyhow!("the CA secret has no {key}"));
    Ok(PluggedCa {
        ca_cert_pem: need(CA_CERT_FILE)?,
        ca_key_pem: need(CA_KEY_FILE)?,
        root_cert_pem: need(ROOT_CERT_FILE)?,
        cert_chain_pem: text(&data, CERT_CHAIN_FILE)?,
    })
}

/// Loads the CA from Secret `name`, creating it with a new root if absent.
pub async fn load_or_create(
    api: &Api<Secret>,
    name: &str,
    trust_domain: &TrustDomain,
) -> anyhow::Result<CertificateAuthority> {
    let secret = match api.get_opt(name).await? {
        Some(secret) => secret,
        None => {
            let root = CertificateAuthority::generate_root(trust_domain)?;
            let data = [
                (CA_CERT_FILE, root.ca_cert_pem),
                (CA_KEY_FILE, root.ca_key_pem),
                (ROOT_CERT_FILE, root.root_cert_pem),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
            .collect();
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(secret = name, "mesh root CA created");
                    created
                }
                Err(kube::Error::Api(s)) if s.code == 409 => api.get(name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let ca = plugged(&secret).map_err(|e| anyhow::anyhow!("secret {name}: {e}"))?;
    Ok(CertificateAuthority::plugged(
        trust_domain.clone(),
        DEFAULT_LEAF_TTL,
        &ca,
    )?)
}
