//! Deriving a policy's `mx` patterns from the mail servers' own TLS
//! certificates: the leaf certificate's dNSName SANs (the CN only when the
//! certificate has no SAN extension), wildcards kept, deduplicated, sorted.
//!
//! Parsing is a pure function of the PEM bytes and the current time; reading
//! the file is a thin wrapper with a size limit.

use std::path::{Path, PathBuf};

use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::policy::{MxPattern, NameError};

/// A mail server certificate file is a leaf plus a few intermediates; anything
/// this large is not one.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why a certificate file gave no names.
#[derive(Debug, thiserror::Error)]
pub enum MxCertError {
    #[error("cannot read mail server certificate {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mail server certificate {path} is larger than {MAX_PEM_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} holds no PEM CERTIFICATE block")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the first certificate cannot be parsed: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("mail server certificate {path} expired on {not_after}")]
    Expired { path: PathBuf, not_after: String },
    #[error("mail server certificate {path} is not valid before {not_before}")]
    NotYetValid { path: PathBuf, not_before: String },
}

/// The names a certificate yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertNames {
    /// Valid mx patterns, sorted and deduplicated.
    pub patterns: Vec<MxPattern>,
    /// Names present in the certificate that cannot be mx patterns.
    pub skipped: Vec<(String, NameError)>,
    /// RFC 3339 expiry of the leaf, for logs and `check`.
    pub not_after: String,
    /// The same instant: from then on the names no longer count (a reload
    /// re-reads the file).
    pub expires: time::OffsetDateTime,
}

/// Reads `path` (at most 1 MiB) and extracts the leaf's names.
pub fn read(path: &Path, now: time::OffsetDateTime) -> Result<CertNames, MxCertError> {
    let meta = std::fs::metadata(path).map_err(|source| MxCertError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(MxCertError::TooLarge {
            path: path.to_owned(),
        });
    }
    let pem = std::fs::read(path).map_err(|source| MxCertError::Read {
        path: path.to_owned(),
        source,
    })?;
    names_from_pem(path, &pem, now)
}

/// Extracts the names of the first (leaf) certificate in a PEM buffer.
/// `path` is only used in error messages.
pub fn names_from_pem(
    path: &Path,
    pem: &[u8],
    now: time::OffsetDateTime,
) -> Result<CertNames, MxCertError> {
    let parse_err = |reason: String| MxCertError::Parse {
        path: path.to_owned(),
        reason,
    };
    let leaf_pem: Pem = Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .ok_or_else(|| MxCertError::NoCertificate {
            path: path.to_owned(),
        })?;
    let cert = leaf_pem
        .parse_x509()
        .map_err(|e| parse_err(e.to_string()))?;

    let validity = cert.validity();
    if validity.not_after.to_datetime() < now {
        return Err(MxCertError::Expired {
            path: path.to_owned(),
            not_after: rfc3339(validity.not_after.to_datetime()),
        });
    }
    if validity.not_before.to_datetime() > now {
        return Err(MxCertError::NotYetValid {
            path: path.to_owned(),
            not_before: rfc3339(validity.not_before.to_datetime()),
        });
    }

    let san = cert
        .subject_alternative_name()
        .map_err(|e| parse_err(format!("bad subjectAltName extension: {e}")))?;
    let raw_names: Vec<String> = match san {
        Some(ext) => ext
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
            .collect(),
        // RFC 6125 §6.4.4: the CN is only consulted without a SAN extension.
        None => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect(),
    };

    let mut patterns = Vec::new();
    let mut skipped = Vec::new();
    for raw in raw_names {
        match MxPattern::parse(&raw) {
            Ok(p) => patterns.push(p),
            Err(e) => skipped.push((raw, e)),
        }
    }
    patterns.sort();
    patterns.dedup();
    Ok(CertNames {
        patterns,
        skipped,
        not_after: rfc3339(validity.not_after.to_datetime()),
        expires: validity.not_after.to_datetime(),
    })
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert_pem(sans: &[&str], cn: Option<&str>, days: (i64, i64)) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans
            .iter()
            .map(|s| SanType::DnsName((*s).try_into().expect("ia5")))
            .collect();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").pem()
    }

    fn names(pem: &str) -> Result<CertNames, MxCertError> {
        names_from_pem(
            Path::new("mx.pem"),
            pem.as_bytes(),
            time::OffsetDateTime::now_utc(),
        )
    }

    fn strs(n: &CertNames) -> Vec<&str> {
        n.patterns.iter().map(MxPattern::as_str).collect()
    }

    #[test]
    fn multi_san_sorted_deduped_lowercased() {
        let pem = cert_pem(
            &["mx2.example.com", "MX1.example.com", "mx2.example.com"],
            Some("ignored.example.com"),
            (-1, 30),
        );
        let n = names(&pem).expect("names");
        assert_eq!(strs(&n), ["mx1.example.com", "mx2.example.com"]);
        assert!(n.skipped.is_empty());
    }

    #[test]
    fn wildcard_kept() {
        let pem = cert_pem(&["*.mx.example.com", "mx.example.com"], None, (-1, 30));
        assert_eq!(
            strs(&names(&pem).expect("names")),
            ["*.mx.example.com", "mx.example.com"]
        );
    }

    #[test]
    fn cn_only_when_no_san() {
        let pem = cert_pem(&[], Some("mail.example.org"), (-1, 30));
        assert_eq!(strs(&names(&pem).expect("names")), ["mail.example.org"]);
    }

    #[test]
    fn invalid_names_skipped_and_reported() {
        let pem = cert_pem(
            &["mx.example.com", "mx.*.example.com", "localhost"],
            None,
            (-1, 30),
        );
        let n = names(&pem).expect("names");
        assert_eq!(strs(&n), ["mx.example.com"]);
        let skipped: Vec<&str> = n.skipped.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(skipped, ["mx.*.example.com", "localhost"]);
    }

    #[test]
    fn expired_is_an_error_naming_the_file() {
        let pem = cert_pem(&["mx.example.com"], None, (-30, -1));
        let err = names(&pem).expect_err("expired");
        assert!(matches!(err, MxCertError::Expired { .. }));
        assert!(err.to_string().contains("mx.pem"), "{err}");
    }

    #[test]
    fn not_a_certificate() {
        let err = names("hello").expect_err("no cert");
        assert!(matches!(err, MxCertError::NoCertificate { .. }));
        let err = names("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .expect_err("garbage");
        assert!(matches!(err, MxCertError::Parse { .. }), "{err}");
    }

    #[test]
    fn leaf_is_first_of_chain() {
        let leaf = cert_pem(&["mx.example.com"], None, (-1, 30));
        let ca = cert_pem(&["ca.example.com"], None, (-1, 300));
        let n = names(&format!("{leaf}{ca}")).expect("names");
        assert_eq!(strs(&n), ["mx.example.com"]);
    }

    #[test]
    fn unreadable_file() {
        let err = read(
            Path::new("/nonexistent/mx.pem"),
            time::OffsetDateTime::now_utc(),
        )
        .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/mx.pem"));
    }
}
