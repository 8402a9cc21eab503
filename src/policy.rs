//! The MTA-STS policy model (RFC 8461 §3.2): validated domain names, mx
//! patterns, modes, the rendered policy body and the policy id derived from it.
//!
//! Everything here is pure: values are parsed once into newtypes that can only
//! hold valid data ("parse, don't validate"), and rendering is deterministic.

use std::fmt;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Largest `max_age` RFC 8461 §3.2 allows: 31557600 seconds (about one year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// Below this `max_age` (one day) senders refetch so often that the policy
/// protects little; RFC 8461 recommends weeks once in enforce mode.
pub const MAX_AGE_RECOMMENDED_MIN: u64 = 86_400;

/// Why a name was rejected as a domain name or mx pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("{0:?} is not a valid internationalized domain name")]
    Idna(String),
    #[error("{name:?} is longer than {max} characters")]
    TooLong { name: String, max: usize },
    #[error("{name:?} has an empty label")]
    EmptyLabel { name: String },
    #[error("{name:?} has a label longer than 63 characters")]
    LabelTooLong { name: String },
    #[error(
        "{name:?} has an invalid character {ch:?} (only letters, digits and '-' are allowed in a host name)"
    )]
    InvalidChar { name: String, ch: char },
    #[error("{name:?} has a label that starts or ends with '-'")]
    Hyphen { name: String },
    #[error(
        "{name:?} has the label {label:?}, which starts with \"xn--\" but is not valid punycode for an internationalized label"
    )]
    BadALabel { name: String, label: String },
    #[error("{name:?} needs at least two labels (e.g. example.com)")]
    SingleLabel { name: String },
    #[error("{name:?} looks like an IP address; a host name is required")]
    IpAddress { name: String },
    #[error("{name:?}: a wildcard is only allowed as the whole leftmost label (\"*.example.com\")")]
    Wildcard { name: String },
}

/// Path of the TLS report (RFC 8460) HTTPS endpoint on every policy host.
pub const TLSRPT_PATH: &str = "/tlsrpt";

/// A fully qualified domain name in lowercase A-label (punycode) form, without
/// the trailing dot. Unicode input (IDN) is converted with UTS #46.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(Box<str>);

impl DomainName {
    /// Longest domain whose `mta-sts.` host still fits in 253 characters.
    pub const MAX_LEN: usize = 253 - "mta-sts.".len();

    /// Parses and normalises a policy domain (e.g. `Bücher.Example.` →
    /// `xn--bcher-kva.example`).
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let ascii = to_ascii(input)?;
        check_host(&ascii, Self::MAX_LEN)?;
        Ok(Self(ascii.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The policy host `mta-sts.<domain>` (RFC 8461 §3.3).
    pub fn policy_host(&self) -> String {
        format!("mta-sts.{}", self.0)
    }

    /// The `rua` URI of the TLS report endpoint on the policy host.
    pub fn tlsrpt_rua(&self) -> String {
        format!("https://mta-sts.{}{TLSRPT_PATH}", self.0)
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An `mx` pattern of a policy (RFC 8461 §3.2): a host name, or `*.` followed
/// by a host name, where the wildcard matches exactly one leftmost label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MxPattern(Box<str>);

impl MxPattern {
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let trimmed = input.trim();
        let (wild, rest) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        if rest.contains('*') {
            return Err(NameError::Wildcard {
                name: input.to_owned(),
            });
        }
        let ascii = to_ascii(rest)?;
        check_host(&ascii, if wild { 253 - 2 } else { 253 })?;
        let text = if wild { format!("*.{ascii}") } else { ascii };
        Ok(Self(text.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a sender would accept `host` as an MX under this pattern
    /// (RFC 8461 §4.1): exact match, or the wildcard standing for exactly one
    /// leftmost label. `host` must already be lowercase without trailing dot.
    pub fn matches(&self, host: &str) -> bool {
        match self.0.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
            None => *self.0 == *host,
        }
    }
}

impl fmt::Display for MxPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Converts a possibly Unicode, possibly mixed-case name with an optional
/// trailing dot to lowercase ASCII (A-labels).
fn to_ascii(input: &str) -> Result<String, NameError> {
    let trimmed = input.trim();
    let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Err(NameError::Empty);
    }
    if trimmed.is_ascii() {
        return Ok(trimmed.to_ascii_lowercase());
    }
    idna::domain_to_ascii(trimmed).map_err(|_| NameError::Idna(input.to_owned()))
}

/// Host name syntax (RFC 1123 letters-digits-hyphen labels), at least two
/// labels, not an IP address.
fn check_host(name: &str, max: usize) -> Result<(), NameError> {
    let owned = || name.to_owned();
    if name.len() > max {
        return Err(NameError::TooLong { name: owned(), max });
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(NameError::IpAddress { name: owned() });
    }
    let mut labels = 0;
    let mut last = "";
    for label in name.split('.') {
        labels += 1;
        last = label;
        if label.is_empty() {
            return Err(NameError::EmptyLabel { name: owned() });
        }
        if label.len() > 63 {
            return Err(NameError::LabelTooLong { name: owned() });
        }
        if let Some(ch) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            if ch == '*' {
                return Err(NameError::Wildcard { name: owned() });
            }
            return Err(NameError::InvalidChar { name: owned(), ch });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(NameError::Hyphen { name: owned() });
        }
        if !a_label_ok(label) {
            return Err(NameError::BadALabel {
                name: owned(),
                label: label.to_owned(),
            });
        }
    }
    if labels < 2 {
        return Err(NameError::SingleLabel { name: owned() });
    }
    // A numeric top-level label means an IPv4 address or garbage, never a host.
    if last.chars().all(|c| c.is_ascii_digit()) {
        return Err(NameError::IpAddress { name: owned() });
    }
    Ok(())
}

/// An ASCII label is fine unless it claims to be an A-label (`xn--`): then
/// it must decode as punycode to a valid U-label that encodes back to the
/// same text (RFC 5890 §2.3.2.1). Senders that convert names (mox, Stalwart)
/// fail on `xn--zz`, so it is refused here, not published.
fn a_label_ok(label: &str) -> bool {
    if !label
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("xn--"))
    {
        return true;
    }
    let (unicode, result) = idna::domain_to_unicode(label);
    if result.is_err() || unicode.is_ascii() {
        return false;
    }
    idna::domain_to_ascii(&unicode).is_ok_and(|back| back.eq_ignore_ascii_case(label))
}

/// The policy mode (RFC 8461 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Senders must refuse MX hosts that fail the policy.
    Enforce,
    /// Senders deliver anyway and report failures (TLS-RPT).
    Testing,
    /// The domain has no active policy; used to retire MTA-STS.
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }

    pub fn parse(input: &str) -> Option<Self> {
        match input {
            "enforce" => Some(Mode::Enforce),
            "testing" => Some(Mode::Testing),
            "none" => Some(Mode::None),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated policy: what `/.well-known/mta-sts.txt` says for one domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    pub mode: Mode,
    /// Sorted, deduplicated. Empty only with `Mode::None`. Shared by the
    /// domains that inherit one `[defaults]` list.
    pub mx: std::sync::Arc<[MxPattern]>,
    /// Seconds, `0..=MAX_AGE_LIMIT`.
    pub max_age: u64,
}

/// Largest policy body senders fetch: RFC 8461 §3.3 lets them stop reading
/// after 64 KiB (postfix-mta-sts-resolver, mailauth and Stalwart do), so a
/// longer body is no policy at all.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

impl Policy {
    /// Length in bytes of [`Policy::render`]'s output, without rendering.
    pub fn rendered_len(&self) -> usize {
        let digits = self.max_age.checked_ilog10().map_or(1, |d| d as usize + 1);
        "version: STSv1\r\nmode: ".len()
            + self.mode.as_str().len()
            + 2
            + self
                .mx
                .iter()
                .map(|mx| "mx: ".len() + mx.as_str().len() + 2)
                .sum::<usize>()
            + "max_age: ".len()
            + digits
            + 2
    }

    /// Renders the policy body (RFC 8461 §3.2): `version: STSv1` first, then
    /// mode, every mx, max_age; CRLF line ends. The output is a pure function
    /// of the policy, so the id derived from it is stable across runs.
    pub fn render(&self) -> Bytes {
        let mut out = String::with_capacity(64 + self.mx.len() * 32);
        out.push_str("version: STSv1\r\nmode: ");
        out.push_str(self.mode.as_str());
        out.push_str("\r\n");
        for mx in self.mx.iter() {
            out.push_str("mx: ");
            out.push_str(mx.as_str());
            out.push_str("\r\n");
        }
        out.push_str("max_age: ");
        out.push_str(&self.max_age.to_string());
        out.push_str("\r\n");
        Bytes::from(out)
    }
}

/// The `id` of the `_mta-sts` TXT record (RFC 8461 §3.1): 1..32 characters of
/// `[A-Za-z0-9]`.
///
/// Derived as the first 128 bits of SHA-256 over the exact served body bytes,
/// written as 32 lowercase hex digits. SHA-256 is specified (FIPS 180-4), so
/// the id is identical on every machine, replica, Rust version and restart,
/// and it changes whenever a single byte of the body changes. Two different
/// bodies share an id with probability 2^-128 per pair; even across 10^6
/// policy versions the birthday bound stays below 10^-26.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyId(Box<str>);

impl PolicyId {
    pub fn for_body(body: &[u8]) -> Self {
        let digest = Sha256::digest(body);
        Self(
            data_encoding::HEXLOWER
                .encode(&digest[..16])
                .into_boxed_str(),
        )
    }

    /// Accepts any id a publisher may have written (RFC 8461 §3.1 syntax).
    pub fn parse(input: &str) -> Option<Self> {
        let ok =
            (1..=32).contains(&input.len()) && input.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| Self(input.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(s: &str) -> MxPattern {
        MxPattern::parse(s).expect("valid pattern")
    }

    #[test]
    fn render_is_crlf_and_ordered() {
        let policy = Policy {
            mode: Mode::Enforce,
            mx: vec![mx("mx1.example.com"), mx("*.backup.example.com")].into(),
            max_age: 604_800,
        };
        assert_eq!(
            &policy.render()[..],
            b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.backup.example.com\r\nmax_age: 604800\r\n"
        );
    }

    #[test]
    fn render_none_without_mx() {
        let policy = Policy {
            mode: Mode::None,
            mx: Vec::new().into(),
            max_age: 86_400,
        };
        assert_eq!(
            &policy.render()[..],
            b"version: STSv1\r\nmode: none\r\nmax_age: 86400\r\n"
        );
    }

    #[test]
    fn id_is_stable_and_changes_with_body() {
        let a = PolicyId::for_body(b"version: STSv1\r\nmode: testing\r\n");
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(
            a,
            PolicyId::for_body(b"version: STSv1\r\nmode: testing\r\n")
        );
        assert_ne!(
            a,
            PolicyId::for_body(b"version: STSv1\r\nmode: testing\r\n ")
        );
        assert!(PolicyId::parse(a.as_str()).is_some());
    }

    #[test]
    fn id_matches_known_sha256_prefix() {
        // Pinned: SHA-256 is specified, so ids never change between releases
        // (Stalwart's DefaultHasher-based ids did).
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(
            PolicyId::for_body(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223"
        );
    }

    #[test]
    fn id_syntax() {
        assert!(PolicyId::parse("20210803T010101").is_some());
        assert!(PolicyId::parse("").is_none());
        assert!(PolicyId::parse(&"a".repeat(33)).is_none());
        assert!(PolicyId::parse("abc-def").is_none());
    }

    #[test]
    fn rendered_len_is_the_length_of_the_body() {
        for (mode, n, max_age) in [
            (Mode::Enforce, 3, 604_800),
            (Mode::None, 0, 0),
            (Mode::Testing, 1, 9),
            (Mode::Testing, 2, 10),
            (Mode::Enforce, 40, 31_557_600),
        ] {
            let mx = (0..n)
                .map(|i| MxPattern::parse(&format!("mx{i}.example.com")).expect("mx"))
                .collect();
            let p = Policy { mode, mx, max_age };
            assert_eq!(p.rendered_len(), p.render().len(), "{p:?}");
        }
    }

    #[test]
    fn domain_names() {
        assert_eq!(
            DomainName::parse("Example.COM.").map(|d| d.to_string()),
            Ok("example.com".to_owned())
        );
        assert_eq!(
            DomainName::parse("bücher.example").map(|d| d.to_string()),
            Ok("xn--bcher-kva.example".to_owned())
        );
        assert!(matches!(
            DomainName::parse("localhost"),
            Err(NameError::SingleLabel { .. })
        ));
        // A-labels are checked: punycode that decodes, to a valid U-label,
        // that encodes back the same way.
        assert_eq!(
            DomainName::parse("XN--BCHER-KVA.example").map(|d| d.to_string()),
            Ok("xn--bcher-kva.example".to_owned())
        );
        for bad in [
            "xn--zz.example",
            "xn--.example",
            "xn--abc-.example",
            "mx.xn--a.example",
        ] {
            assert!(
                matches!(
                    DomainName::parse(bad),
                    Err(NameError::BadALabel { .. } | NameError::Hyphen { .. })
                ),
                "{bad}: {:?}",
                DomainName::parse(bad)
            );
        }
        assert!(matches!(
            MxPattern::parse("*.xn--zz.example"),
            Err(NameError::BadALabel { .. })
        ));
        assert!(matches!(
            DomainName::parse("192.0.2.1"),
            Err(NameError::IpAddress { .. })
        ));
        assert!(matches!(
            DomainName::parse("a..example"),
            Err(NameError::EmptyLabel { .. })
        ));
        assert!(matches!(
            DomainName::parse("-a.example"),
            Err(NameError::Hyphen { .. })
        ));
        assert!(matches!(
            DomainName::parse("a_b.example"),
            Err(NameError::InvalidChar { ch: '_', .. })
        ));
        assert!(matches!(
            DomainName::parse(&format!("{}.example", "a".repeat(64))),
            Err(NameError::LabelTooLong { .. })
        ));
        let long = format!("{}.example", ["abcdefghi"; 24].join("."));
        assert!(matches!(
            DomainName::parse(&long),
            Err(NameError::TooLong { .. })
        ));
        assert_eq!(DomainName::parse(""), Err(NameError::Empty));
    }

    #[test]
    fn mx_patterns() {
        assert_eq!(mx("*.Mail.Example.com").as_str(), "*.mail.example.com");
        assert!(matches!(
            MxPattern::parse("mx.*.example.com"),
            Err(NameError::Wildcard { .. })
        ));
        assert!(matches!(
            MxPattern::parse("*mx.example.com"),
            Err(NameError::Wildcard { .. })
        ));
        assert!(matches!(
            MxPattern::parse("*.*.example.com"),
            Err(NameError::Wildcard { .. })
        ));
        assert!(matches!(
            MxPattern::parse("2001:db8::1"),
            Err(NameError::InvalidChar { .. }) | Err(NameError::IpAddress { .. })
        ));
        assert!(matches!(
            MxPattern::parse("10.0.0.1"),
            Err(NameError::IpAddress { .. })
        ));
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let p = mx("*.mx.example");
        assert!(p.matches("a.mx.example"));
        assert!(!p.matches("a.b.mx.example"));
        assert!(!p.matches("mx.example"));
        assert!(mx("mx.example").matches("mx.example"));
        assert!(!mx("mx.example").matches("a.mx.example"));
    }
}
