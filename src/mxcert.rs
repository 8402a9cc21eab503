//! Deriving a policy's `mx` patterns from the mail servers' own TLS
//! certificates: the leaf certificate's dNSName SANs (the CN only when the
//! certificate has no SAN extension), wildcards kept, deduplicated, sorted.
//!
//! Parsing is a pure function of the PEM bytes and the current time; reading
//! the file is a thin wrapper that takes only regular files, opens them
//! without blocking and reads at most [`MAX_PEM_BYTES`]. An `mx_certs` entry
//! may be a glob ([`expand`]); [`watch_dirs`] says which directories show a
//! change of its files.

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

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
    #[error("mail server certificate {path} is not a regular file ({kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
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
    let pem = read_limited(path)?;
    names_from_pem(path, &pem, now)
}

/// The bytes of a regular file (symlinks followed), at most
/// [`MAX_PEM_BYTES`]. The cap holds on the read itself, not on what the
/// metadata says (a device such as `/dev/zero` reports 0 bytes and never
/// ends), and the open does not block: a FIFO would otherwise hold the
/// reload lock until someone writes to it.
fn read_limited(path: &Path) -> Result<Vec<u8>, MxCertError> {
    let read_err = |source| MxCertError::Read {
        path: path.to_owned(),
        source,
    };
    // Refuse before opening: opening some devices has effects.
    check_regular(path, &std::fs::metadata(path).map_err(read_err)?)?;
    let file = open_nonblocking(path).map_err(read_err)?;
    // The file may have been swapped between the stat and the open.
    check_regular(path, &file.metadata().map_err(read_err)?)?;
    let mut pem = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(read_err)?;
    if pem.len() as u64 > MAX_PEM_BYTES {
        return Err(MxCertError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(pem)
}

fn check_regular(path: &Path, meta: &std::fs::Metadata) -> Result<(), MxCertError> {
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    let kind = if t.is_dir() {
        "a directory"
    } else {
        special_kind(&t)
    };
    Err(MxCertError::NotRegular {
        path: path.to_owned(),
        kind,
    })
}

#[cfg(unix)]
fn special_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "not a file"
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    Ok(std::fs::File::from(fd))
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// Whether an `mx_certs` entry is a glob pattern (`*`, `?` or `[`).
pub fn is_glob(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.contains(['*', '?', '[']))
}

/// The files a glob entry matches now, sorted; a path that is not a glob
/// is returned as it is. Directories the walk cannot read are skipped.
pub fn expand(pattern: &Path) -> Result<Vec<PathBuf>, String> {
    if !is_glob(pattern) {
        return Ok(vec![pattern.to_owned()]);
    }
    let text = pattern
        .to_str()
        .ok_or_else(|| format!("mx_certs glob {} is not UTF-8", pattern.display()))?;
    let options = glob::MatchOptions {
        case_sensitive: true,
        // `*` does not match a leading dot: certbot's live/README stays
        // out, and so do editors' hidden temporary files.
        require_literal_leading_dot: true,
        require_literal_separator: true,
    };
    let paths = glob::glob_with(text, options).map_err(|e| format!("mx_certs glob {text}: {e}"))?;
    let mut found: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
    found.sort();
    Ok(found)
}

/// The directories to watch so that a change of `entry`'s certificates is
/// seen, with whether to watch them recursively:
/// - a plain path: its directory (an atomic rename or a symlink swap
///   replaces the directory entry, not the file), and the directory of the
///   file it resolves to (a symlink into `archive/` rewritten in place);
/// - a glob: its longest directory without glob characters, recursively,
///   so new matching files (a new `live/<name>/` directory) are seen.
pub fn watch_dirs(entry: &Path) -> Vec<(PathBuf, bool)> {
    if is_glob(entry) {
        let mut base = PathBuf::new();
        for c in entry.components() {
            if matches!(c, Component::Normal(n) if is_glob(Path::new(n))) {
                break;
            }
            base.push(c);
        }
        return vec![(base, true)];
    }
    let mut dirs = Vec::new();
    if let Some(parent) = entry.parent().filter(|p| !p.as_os_str().is_empty()) {
        dirs.push((parent.to_owned(), false));
    }
    if let Ok(target) = std::fs::canonicalize(entry)
        && let Some(parent) = target.parent()
        && !dirs.iter().any(|(d, _)| d == parent)
    {
        dirs.push((parent.to_owned(), false));
    }
    dirs
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
    fn special_files_are_refused_without_blocking_or_reading() {
        let now = time::OffsetDateTime::now_utc();
        // /dev/zero never ends: refused before a byte is read.
        let err = read(Path::new("/dev/zero"), now).expect_err("device");
        assert!(matches!(err, MxCertError::NotRegular { .. }), "{err}");
        assert!(err.to_string().contains("/dev/zero"), "{err}");
        // A FIFO without a writer would block a plain open forever.
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("mx.pem");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).expect("mkfifo");
        let err = read(&fifo, now).expect_err("fifo");
        assert!(err.to_string().contains("a FIFO"), "{err}");
        let err = read(dir.path(), now).expect_err("dir");
        assert!(err.to_string().contains("a directory"), "{err}");
    }

    #[test]
    fn the_cap_holds_on_the_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'A'; MAX_PEM_BYTES as usize + 1]).expect("write");
        let err = read(&big, time::OffsetDateTime::now_utc()).expect_err("too large");
        assert!(matches!(err, MxCertError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn globs_expand_sorted_and_watch_their_fixed_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["b", "a", ".hidden"] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            std::fs::write(dir.path().join(name).join("fullchain.pem"), "x").expect("write");
        }
        let pattern = dir.path().join("*").join("fullchain.pem");
        assert!(is_glob(&pattern));
        let found = expand(&pattern).expect("glob");
        assert_eq!(
            found,
            [
                dir.path().join("a/fullchain.pem"),
                dir.path().join("b/fullchain.pem")
            ]
        );
        assert_eq!(watch_dirs(&pattern), [(dir.path().to_owned(), true)]);
        let plain = dir.path().join("a/fullchain.pem");
        assert_eq!(expand(&plain).expect("plain"), std::slice::from_ref(&plain));
        assert_eq!(watch_dirs(&plain), [(dir.path().join("a"), false)]);
        assert!(
            expand(&dir.path().join("*/none.pem"))
                .expect("glob")
                .is_empty()
        );
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
