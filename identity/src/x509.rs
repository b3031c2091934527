//! Reading and verifying X.509 certificates: chain validation with webpki and
//! the few fields the mesh needs (URI SANs, the public key, expiry).

use std::sync::Arc;

use rustls::{CertificateError, OtherError};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::ca::SignedChain;
use crate::tls;

/// Which extended key usage a chain is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usage {
    Server,
    Client,
}

/// Turns DER roots into webpki trust anchors.
pub(crate) fn trust_anchors(
    roots: &[CertificateDer<'static>],
) -> Result<Vec<TrustAnchor<'static>>, String> {
    roots
        .iter()
        .map(|root| {
            webpki::anchor_from_trusted_cert(root)
                .map(|anchor| anchor.to_owned())
                .map_err(|e| format!("root certificate is unusable as a trust anchor: {e}"))
        })
        .collect()
}

/// Verifies that `leaf` chains to one of `anchors` through `intermediates`,
/// is valid at `now` and carries the extended key usage for `usage`.
pub(crate) fn verify_path(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[TrustAnchor<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(pki_error)?;
    let usage = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    cert.verify_for_usage(
        tls::provider().signature_verification_algorithms.all,
        anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(pki_error)
}

/// Verifies an issued chain the way a peer will.
pub(crate) fn verify_leaf(chain: &SignedChain, now: UnixTime, usage: Usage) -> Result<(), String> {
    let anchors = trust_anchors(&chain.roots)?;
    verify_path(&chain.leaf, &chain.intermediates, &anchors, now, usage).map_err(|e| e.to_string())
}

fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let cert_error = match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

fn parse(cert: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, String> {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, parsed)| parsed)
        .map_err(|e| format!("certificate cannot be parsed: {e}"))
}

/// All URI subject alternative names of a certificate.
pub fn uri_sans(cert: &[u8]) -> Result<Vec<String>, String> {
    let parsed = parse(cert)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName cannot be parsed: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The DER SubjectPublicKeyInfo of a certificate.
pub(crate) fn spki(cert: &[u8]) -> Result<Vec<u8>, String> {
    Ok(parse(cert)?.public_key().raw.to_vec())
}

/// The end of a certificate's validity period.
pub(crate) fn not_after(cert: &[u8]) -> Result<OffsetDateTime, String> {
    Ok(parse(cert)?.validity().not_after.to_datetime())
}

/// The validity period of a certificate, as wall-clock times.
pub(crate) fn validity(
    cert: &[u8],
) -> Result<(std::time::SystemTime, std::time::SystemTime), String> {
    let parsed = parse(cert)?;
    let validity = parsed.validity();
    Ok((
        validity.not_before.to_datetime().into(),
        validity.not_after.to_datetime().into(),
    ))
}
