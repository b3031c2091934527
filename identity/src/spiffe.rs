//! SPIFFE IDs as the SPIFFE ID specification defines them, and the mesh's
//! own form of them, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The longest SPIFFE ID the specification allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain the specification allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID, trust domain or mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {len} bytes long, the limit is {MAX_SPIFFE_ID_LEN}")]
    TooLong { len: usize },
    #[error("SPIFFE ID must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain after \"spiffe://\"")]
    MissingTrustDomain,
    #[error("trust domain is {len} bytes long, the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong { len: usize },
    #[error(
        "trust domain contains {found:?}: only lowercase letters, digits, '.', '-' and '_' are allowed (no port, no user info)"
    )]
    BadTrustDomainChar { found: char },
    #[error("SPIFFE ID must not contain a query or a fragment ({found:?})")]
    QueryOrFragment { found: char },
    #[error("path segment {index} is empty (a doubled or trailing '/')")]
    EmptySegment { index: usize },
    #[error("path segment {index} is {segment:?}: '.' and '..' segments are not allowed")]
    DotSegment { index: usize, segment: String },
    #[error(
        "path segment {index} contains {found:?}: only letters, digits, '.', '-' and '_' are allowed"
    )]
    BadPathChar { index: usize, found: char },
    #[error("{id} is not a mesh identity: the path must be /ns/<namespace>/sa/<service-account>")]
    NotMeshForm { id: String },
}

/// A validated SPIFFE trust domain such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Validates a trust domain name.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.into()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(found) => Err(SpiffeIdError::BadTrustDomainChar { found }),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The path starts with '/', so the first split element is always empty.
    path.split('/')
        .skip(1)
        .enumerate()
        .try_for_each(|(index, segment)| validate_segment(index, segment))
}

fn validate_segment(index: usize, segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment { index });
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment {
            index,
            segment: segment.to_string(),
        });
    }
    match segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(found) => Err(SpiffeIdError::BadPathChar { index, found }),
        None => Ok(()),
    }
}

/// Any valid SPIFFE ID: a trust domain and a (possibly empty) path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: Arc<str>,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID per the SPIFFE ID specification.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        if id.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: id.len() });
        }
        let rest = id.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        if let Some(found) = rest.chars().find(|c| matches!(c, '?' | '#')) {
            return Err(SpiffeIdError::QueryOrFragment { found });
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            trust_domain: TrustDomain(td.into()),
            path: path.into(),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, empty or starting with '/'.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A workload identity in the mesh: one per Kubernetes service account,
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: TrustDomain,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

impl Identity {
    /// Builds an identity from its parts, validating each as a SPIFFE path segment.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_segment(1, namespace)?;
        validate_segment(3, service_account)?;
        Ok(Self {
            trust_domain,
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    /// Parses a mesh identity from its SPIFFE URI form.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        Self::try_from(SpiffeId::parse(id)?)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The general SPIFFE ID form.
    pub fn to_spiffe_id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.trust_domain.clone(),
            path: format!("/ns/{}/sa/{}", self.namespace, self.service_account).into(),
        }
    }
}

impl TryFrom<SpiffeId> for Identity {
    type Error = SpiffeIdError;
    fn try_from(id: SpiffeId) -> Result<Self, Self::Error> {
        let mut segments = id.path.split('/').skip(1);
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Ok(Self {
                namespace: ns.into(),
                service_account: sa.into(),
                trust_domain: id.trust_domain,
            }),
            _ => Err(SpiffeIdError::NotMeshForm { id: id.to_string() }),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_spiffe_ids() {
        let table: &[(&str, &str, &str)] = &[
            ("spiffe://cluster.local", "cluster.local", ""),
            (
                "spiffe://cluster.local/ns/shop/sa/checkout",
                "cluster.local",
                "/ns/shop/sa/checkout",
            ),
            ("spiffe://a-b_c.9/x", "a-b_c.9", "/x"),
            (
                "spiffe://td/Path.With-Mixed_Case",
                "td",
                "/Path.With-Mixed_Case",
            ),
            ("spiffe://td/a/..b/c.", "td", "/a/..b/c."),
        ];
        for (input, td, path) in table {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.trust_domain().as_str(), *td, "{input}");
            assert_eq!(id.path(), *path, "{input}");
            assert_eq!(id.to_string(), *input);
        }
        let longest = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 12));
        assert_eq!(longest.len(), MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::parse(&longest).is_ok());
    }

    #[test]
    fn invalid_spiffe_ids() {
        use SpiffeIdError as E;
        let too_long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let table: Vec<(&str, E)> = vec![
            ("", E::Empty),
            (
                &too_long,
                E::TooLong {
                    len: too_long.len(),
                },
            ),
            ("http://cluster.local/ns/a", E::WrongScheme),
            ("SPIFFE://cluster.local", E::WrongScheme),
            ("spiffe:/cluster.local", E::WrongScheme),
            ("spiffe://", E::MissingTrustDomain),
            ("spiffe:///ns/a", E::MissingTrustDomain),
            (&long_td, E::TrustDomainTooLong { len: 256 }),
            (
                "spiffe://Cluster.local",
                E::BadTrustDomainChar { found: 'C' },
            ),
            ("spiffe://td:8080/a", E::BadTrustDomainChar { found: ':' }),
            ("spiffe://user@td/a", E::BadTrustDomainChar { found: '@' }),
            ("spiffe://td/a?x=1", E::QueryOrFragment { found: '?' }),
            ("spiffe://td/a#frag", E::QueryOrFragment { found: '#' }),
            ("spiffe://td/", E::EmptySegment { index: 0 }),
            ("spiffe://td/a//b", E::EmptySegment { index: 1 }),
            ("spiffe://td/a/", E::EmptySegment { index: 1 }),
            (
                "spiffe://td/a/./b",
                E::DotSegment {
                    index: 1,
                    segment: ".".into(),
                },
            ),
            (
                "spiffe://td/..",
                E::DotSegment {
                    index: 0,
                    segment: "..".into(),
                },
            ),
            (
                "spiffe://td/a%20b",
                E::BadPathChar {
                    index: 0,
                    found: '%',
                },
            ),
            (
                "spiffe://td/ns/ü",
                E::BadPathChar {
                    index: 1,
                    found: 'ü',
                },
            ),
        ];
        for (input, want) in table {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input}");
        }
    }

    #[test]
    fn mesh_identities() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/checkout").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "checkout");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/checkout");
        assert_eq!(id.to_spiffe_id().to_string(), id.to_string());

        let built = Identity::new(
            TrustDomain::new("cluster.local").unwrap(),
            "shop",
            "checkout",
        );
        assert_eq!(built.unwrap(), id);

        for not_mesh in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa",
            "spiffe://cluster.local/ns/shop/sa/x/extra",
            "spiffe://cluster.local/sa/x/ns/shop",
        ] {
            assert!(
                matches!(
                    Identity::parse(not_mesh),
                    Err(SpiffeIdError::NotMeshForm { .. })
                ),
                "{not_mesh}"
            );
        }
        assert!(matches!(
            Identity::new(TrustDomain::new("td").unwrap(), "a/b", "sa"),
            Err(SpiffeIdError::BadPathChar { .. })
        ));
        assert!(TrustDomain::new("UPPER").is_err());
    }
}
