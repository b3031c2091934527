use std::io;
use std::net::SocketAddr;

use http::StatusCode;
use identity::tls::PeerIdentityError;

/// Why a tunnel could not be opened or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no certificate for the source identity: {0}")]
    Certificate(#[from] identity::CertError),
    #[error("cannot build the TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    #[error("TCP connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr} failed: {}", tls_detail(.source))]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{what} with {addr} timed out")]
    Timeout {
        what: &'static str,
        addr: SocketAddr,
    },
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    #[error("peer answered {status} to CONNECT {authority}")]
    Status {
        status: StatusCode,
        authority: SocketAddr,
    },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The outcome of a handshake shared by every caller that waited for it.
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
}

/// The identity error inside a TLS handshake failure, if that was the cause.
fn identity_error_of(source: &io::Error) -> Option<&PeerIdentityError> {
    source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(identity::tls::peer_identity_error)
}

/// rustls shows identity errors with `Debug`; show ours with their message.
fn tls_detail(source: &io::Error) -> String {
    identity_error_of(source).map_or_else(|| source.to_string(), ToString::to_string)
}

impl Error {
    /// If the handshake failed because the peer's identity was wrong, which
    /// identity was expected and which was presented.
    pub fn peer_identity_error(&self) -> Option<&PeerIdentityError> {
        let source = match self {
            Error::Tls { source, .. } => source,
            Error::Shared(inner) => return inner.peer_identity_error(),
            _ => return None,
        };
        identity_error_of(source)
    }

    /// Whether the server certainly did not act on the CONNECT, so that it
    /// and its early data may go to another server or connection without
    /// being delivered twice: the request never went out (no certificate,
    /// no connection, no handshake), the server refused it (a status other
    /// than `200`, `REFUSED_STREAM`), or its GOAWAY left the stream out
    /// (RFC 9113, section 6.8). Any other HTTP/2 or I/O error may have
    /// come after the server had connected and forwarded the data.
    pub fn not_processed(&self) -> bool {
        match self {
            Error::H2(e) => refused_unprocessed(e),
            Error::Io(_) => false,
            Error::Shared(inner) => inner.not_processed(),
            Error::Certificate(_)
            | Error::TlsConfig(_)
            | Error::Connect { .. }
            | Error::Tls { .. }
            | Error::Timeout { .. }
            | Error::Status { .. } => true,
        }
    }

    /// A short, stable label for metrics and access logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Certificate(_) | Error::TlsConfig(_) => "certificate_unavailable",
            Error::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused => {
                "connect_refused"
            }
            Error::Connect { .. } => "connect_failed",
            Error::Tls { .. } if self.peer_identity_error().is_some() => "identity_mismatch",
            Error::Tls { .. } => "tls_failed",
            Error::Timeout { .. } => "timeout",
            Error::H2(_) => "http2_error",
            Error::Status { status, .. } => match status.as_u16() {
                400 => "rejected_bad_request",
                401 => "rejected_unauthorized",
                503 => "rejected_unavailable",
                _ => "rejected",
            },
            Error::Io(_) => "io_error",
            Error::Shared(inner) => inner.reason(),
        }
    }
}

/// A stream error from the server saying it did not process the stream:
/// its `REFUSED_STREAM`, or its GOAWAY, which h2 reports only on streams
/// above the GOAWAY's last stream (and on streams opened after it).
pub(crate) fn refused_unprocessed(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only failures that prove the server did not act on the CONNECT let
    /// its early data go elsewhere.
    #[test]
    fn only_refusals_and_failures_before_the_request_are_not_processed() {
        let addr: SocketAddr = "10.0.0.1:15008".parse().expect("address");
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(
            Error::Connect {
                addr,
                source: refused
            }
            .not_processed()
        );
        assert!(
            Error::Timeout {
                what: "TLS handshake",
                addr
            }
            .not_processed()
        );
        let status = Error::Status {
            status: StatusCode::SERVICE_UNAVAILABLE,
            authority: addr,
        };
        assert!(status.not_processed());
        assert!(Error::Shared(std::sync::Arc::new(status)).not_processed());
        // The connection broke after the request went out: the server may
        // have forwarded the data.
        assert!(!Error::Io(io::Error::from(io::ErrorKind::UnexpectedEof)).not_processed());
        // A reset of our own making says nothing about the server.
        assert!(!Error::H2(h2::Error::from(h2::Reason::REFUSED_STREAM)).not_processed());
    }
}
