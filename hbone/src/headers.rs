//! The CONNECT request and the metadata headers HBONE peers exchange:
//! `forwarded` (original client address and dialled service), `baggage`
//! (workload metadata for telemetry) and `traceparent` (W3C trace context).

use std::fmt::{self, Write as _};
use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version};

pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// One tunnel to open: where it goes and what the destination should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// `:authority`: the destination pod IP and target port (service ports
    /// already translated), or the original VIP:port when sent to a waypoint.
    pub authority: SocketAddr,
    pub forwarded: Option<Forwarded>,
    pub baggage: Option<Baggage>,
    pub traceparent: TraceParent,
}

impl ConnectRequest {
    /// A request to `authority` with a fresh trace context and no metadata.
    pub fn new(authority: SocketAddr) -> Self {
        Self {
            authority,
            forwarded: None,
            baggage: None,
            traceparent: TraceParent::random(),
        }
    }

    /// The HTTP/2 request: classic CONNECT, so no `:scheme` and no `:path`.
    pub(crate) fn to_http(&self) -> Request<()> {
        let uri = Uri::builder()
            .authority(self.authority.to_string())
            .build()
            .expect("a socket address is a valid authority");
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        let headers = req.headers_mut();
        let mut put = |name: &'static str, value: String| {
            // Every value is built from addresses, validated identifiers and
            // hex, so it is always a valid header value; skip it otherwise.
            if let Ok(v) = HeaderValue::try_from(value) {
                headers.insert(name, v);
            }
        };
        if let Some(f) = &self.forwarded {
            put(FORWARDED, f.to_string());
        }
        if let Some(b) = &self.baggage {
            put(BAGGAGE, b.to_string());
        }
        put(TRACEPARENT, self.traceparent.to_string());
        req
    }
}

/// `forwarded: for="<ip>:<port>"[;host=<service hostname>]` (RFC 7239).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The original client address.
    pub for_addr: SocketAddr,
    /// The service hostname the client dialled, when it dialled a service.
    pub host: Option<String>,
}

impl fmt::Display for Forwarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "for=\"{}\"", self.for_addr)?;
        if let Some(host) = &self.host {
            write!(f, ";host={host}")?;
        }
        Ok(())
    }
}

impl Forwarded {
    /// Parses the first element of a `forwarded` header.
    pub fn parse(value: &str) -> Option<Self> {
        let first = value.split(',').next()?;
        let mut for_addr = None;
        let mut host = None;
        for pair in first.split(';') {
            let (k, v) = pair.trim().split_once('=')?;
            let v = v.trim_matches('"');
            match k.to_ascii_lowercase().as_str() {
                "for" => for_addr = v.parse().ok(),
                "host" => host = Some(v.to_string()),
                _ => {}
            }
        }
        Some(Self {
            for_addr: for_addr?,
            host,
        })
    }
}

/// Workload metadata in W3C baggage form, as Istio's ztunnel sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub namespace: Option<String>,
    /// Workload kind in lowercase (`deployment`, `pod`, …) and its name.
    pub workload: Option<(String, String)>,
    pub service_name: Option<String>,
    pub service_version: Option<String>,
}

impl fmt::Display for Baggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        let mut add = |k: &str, v: &str| {
            if !out.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "{k}={v}");
        };
        if let Some(ns) = &self.namespace {
            add("k8s.namespace.name", ns);
        }
        if let Some((kind, name)) = &self.workload {
            add(&format!("k8s.{kind}.name"), name);
        }
        if let Some(s) = &self.service_name {
            add("service.name", s);
        }
        if let Some(v) = &self.service_version {
            add("service.version", v);
        }
        f.write_str(&out)
    }
}

impl Baggage {
    /// Parses the members this mesh uses; others are ignored.
    pub fn parse(value: &str) -> Self {
        let mut b = Baggage::default();
        for member in value.split(',') {
            let Some((k, v)) = member.split(';').next().and_then(|kv| kv.split_once('=')) else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim().to_string());
            match k {
                "k8s.namespace.name" => b.namespace = Some(v),
                "service.name" => b.service_name = Some(v),
                "service.version" => b.service_version = Some(v),
                _ => {
                    if let Some(kind) = k
                        .strip_prefix("k8s.")
                        .and_then(|rest| rest.strip_suffix(".name"))
                        .filter(|kind| !kind.contains('.'))
                    {
                        b.workload = Some((kind.to_string(), v));
                    }
                }
            }
        }
        b
    }
}

/// W3C trace context: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// A new, unsampled trace.
    pub fn random() -> Self {
        Self {
            trace_id: rand::random::<u128>().max(1),
            span_id: rand::random::<u64>().max(1),
            flags: 0,
        }
    }

    /// Parses a version-00 traceparent; all-zero ids are invalid per the spec.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" || trace.len() != 32 || span.len() != 16 {
            return None;
        }
        let tp = Self {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (tp.trace_id != 0 && tp.span_id != 0).then_some(tp)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// The metadata headers of a received CONNECT, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub forwarded: Option<Forwarded>,
    pub baggage: Option<Baggage>,
    pub traceparent: Option<TraceParent>,
}

impl Metadata {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            forwarded: get(FORWARDED).and_then(Forwarded::parse),
            baggage: get(BAGGAGE).map(Baggage::parse),
            traceparent: get(TRACEPARENT).and_then(TraceParent::parse),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_has_the_hbone_shape() {
        let mut req = ConnectRequest::new("10.77.0.2:7000".parse().unwrap());
        req.forwarded = Some(Forwarded {
            for_addr: "10.77.1.5:41000".parse().unwrap(),
            host: Some("echo.demo.svc.cluster.local".into()),
        });
        req.baggage = Some(Baggage {
            namespace: Some("demo".into()),
            workload: Some(("deployment".into(), "client".into())),
            service_name: Some("client".into()),
            service_version: Some("v1".into()),
        });
        let http = req.to_http();
        assert_eq!(http.method(), Method::CONNECT);
        assert_eq!(http.uri().to_string(), "10.77.0.2:7000");
        assert_eq!(http.uri().scheme(), None);
        assert_eq!(http.uri().path_and_query(), None);
        let h = http.headers();
        assert_eq!(
            h[FORWARDED],
            "for=\"10.77.1.5:41000\";host=echo.demo.svc.cluster.local"
        );
        assert_eq!(
            h[BAGGAGE],
            "k8s.namespace.name=demo,k8s.deployment.name=client,service.name=client,service.version=v1"
        );
        let tp = h[TRACEPARENT].to_str().unwrap();
        assert_eq!(tp.len(), 55);
        assert!(tp.starts_with("00-") && tp.ends_with("-00"));

        let parsed = Metadata::from_headers(h);
        assert_eq!(parsed.forwarded, req.forwarded);
        assert_eq!(parsed.baggage, req.baggage);
        assert_eq!(parsed.traceparent, Some(req.traceparent));
    }

    #[test]
    fn ipv6_authority_and_forwarded() {
        let req = ConnectRequest {
            forwarded: Some(Forwarded {
                for_addr: "[fd00::5]:40000".parse().unwrap(),
                host: None,
            }),
            ..ConnectRequest::new("[fd00::1]:80".parse().unwrap())
        };
        let http = req.to_http();
        assert_eq!(http.uri().to_string(), "[fd00::1]:80");
        assert_eq!(http.headers()[FORWARDED], "for=\"[fd00::5]:40000\"");
        assert_eq!(
            Forwarded::parse("for=\"[fd00::5]:40000\"")
                .unwrap()
                .for_addr,
            "[fd00::5]:40000".parse().unwrap()
        );
    }

    #[test]
    fn malformed_metadata_is_ignored() {
        assert_eq!(Forwarded::parse("for=unknown"), None);
        assert_eq!(Forwarded::parse("garbage"), None);
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "00-xyz7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(TraceParent::parse(good).unwrap().to_string(), good);
        assert_eq!(Baggage::parse("junk,,=,a=b"), Baggage::default());
    }
}
