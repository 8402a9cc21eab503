//! What `check` fetches, parsed the way strict senders parse it: the
//! `_mta-sts` TXT (RFC 8461 §3.1), the policy body (RFC 8461 §3.2), the
//! `_smtp._tls` TXT (RFC 8460 §3) and the MX answer (RFC 5321 §5.1,
//! RFC 7505). Pure functions; the network is in `probe`.

use hickory_proto::rr::RData;
use serde::Serialize;

use crate::policy::{MAX_AGE_LIMIT, Mode, MxPattern, PolicyId};

/// The version field that makes a TXT string an MTA-STS record.
const STS_VERSION: &str = "v=STSv1";

/// The version field that makes a TXT string a TLS-RPT record.
const TLSRPT_VERSION: &str = "v=TLSRPTv1";

/// The policy as a sender parsed it.
#[derive(Debug, Clone, Serialize)]
pub struct FetchedPolicy {
    pub mode: Mode,
    #[serde(serialize_with = "patterns_as_strings")]
    pub mx: Vec<MxPattern>,
    pub max_age: u64,
}

fn patterns_as_strings<S: serde::Serializer>(mx: &[MxPattern], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(mx.iter().map(MxPattern::as_str))
}

/// A policy parsed with what senders tolerate but the RFC does not allow.
#[derive(Debug)]
pub struct ParsedPolicy {
    pub policy: FetchedPolicy,
    pub warnings: Vec<String>,
}

/// Whether a TXT string is a record of `version` at all: its first field is
/// exactly that version (so `v=STSv10` is not a `v=STSv1` record). Senders
/// ignore the others (RFC 8461 §3.1, RFC 8460 §3).
fn has_version(text: &str, version: &str) -> bool {
    text.strip_prefix(version).is_some_and(|rest| {
        rest.trim_start_matches([' ', '\t']).is_empty()
            || rest.trim_start_matches([' ', '\t']).starts_with(';')
    })
}

/// Whether a `_mta-sts` TXT string is an MTA-STS record (RFC 8461 §3.1).
pub fn is_sts_record(text: &str) -> bool {
    has_version(text, STS_VERSION)
}

/// Whether a `_smtp._tls` TXT string is a TLS-RPT record (RFC 8460 §3).
pub fn is_tlsrpt_record(text: &str) -> bool {
    has_version(text, TLSRPT_VERSION)
}

/// Splits `version *(delim field) [delim]` into its `key=value` fields,
/// where delim is `*WSP ";" *WSP` (RFC 8461 §3.1 and RFC 8460 §3 share
/// the shape). Empty fields (`;;`) and missing fields are errors.
fn fields<'a>(text: &'a str, version: &str) -> Result<Vec<(&'a str, &'a str)>, String> {
    let rest = text
        .strip_prefix(version)
        .ok_or_else(|| format!("does not start with {version}"))?;
    let rest = rest.trim_start_matches([' ', '\t']);
    let rest = rest
        .strip_prefix(';')
        .ok_or_else(|| format!("{version} is not followed by `;`"))?;
    let pieces: Vec<&str> = rest.split(';').collect();
    let last = pieces.len() - 1;
    let mut out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let field = piece.trim_matches([' ', '\t']);
        if field.is_empty() {
            // Only one trailing delimiter is allowed.
            if i == last && i > 0 {
                break;
            }
            return Err("an empty field (`;;` or `;` without a field)".to_owned());
        }
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("field {field:?} is not key=value"))?;
        let key_ok = (1..=32).contains(&key.len())
            && key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !key_ok {
            return Err(format!("field name {key:?} is not valid"));
        }
        if value.is_empty()
            || value
                .bytes()
                .any(|b| !(0x21..=0x7e).contains(&b) || b == b';')
        {
            return Err(format!("field {key:?} has an empty or invalid value"));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Parses a `_mta-sts` TXT (RFC 8461 §3.1): `v=STSv1`, then `;`-separated
/// fields, exactly one of them `id` (1 to 32 letters and digits).
pub fn parse_sts_txt(text: &str) -> Result<PolicyId, String> {
    let mut id = None;
    for (key, value) in fields(text, STS_VERSION)? {
        if key == "id" {
            if id.is_some() {
                return Err("more than one id field".to_owned());
            }
            id = Some(
                PolicyId::parse(value)
                    .ok_or_else(|| format!("id {value:?} is not 1 to 32 letters and digits"))?,
            );
        }
    }
    id.ok_or_else(|| "no id field".to_owned())
}

/// Parses a `_smtp._tls` TXT (RFC 8460 §3): `v=TLSRPTv1; rua=URI[,URI]`;
/// returns the report URIs (`mailto:` or `https:`).
pub fn parse_tlsrpt(text: &str) -> Result<Vec<String>, String> {
    let mut rua = None;
    for (key, value) in fields(text, TLSRPT_VERSION)? {
        if key == "rua" {
            if rua.is_some() {
                return Err("more than one rua field".to_owned());
            }
            rua = Some(value);
        }
    }
    let rua = rua.ok_or("no rua field: senders do not know where to report")?;
    let mut out = Vec::new();
    for uri in rua.split(',') {
        let uri = uri.trim_matches([' ', '\t']);
        let ok = if let Some(addr) = uri.strip_prefix("mailto:") {
            addr.split_once('@')
                .is_some_and(|(local, host)| !local.is_empty() && host.contains('.'))
        } else if let Some(rest) = uri.strip_prefix("https://") {
            rest.split(['/', '?', '#'])
                .next()
                .is_some_and(|host| host.contains('.'))
        } else {
            false
        };
        if !ok {
            return Err(format!(
                "rua {uri:?} is not a mailto: address or an https:// URL"
            ));
        }
        out.push(uri.to_owned());
    }
    Ok(out)
}

/// Parses an `mx` value of a live policy as strict senders do: a pattern
/// as published, no trailing dot (mox rejects it) and no U-labels (the
/// grammar is ASCII; Stalwart never matches them). Case does not matter.
fn parse_live_mx(value: &str) -> Result<MxPattern, String> {
    if value.ends_with('.') {
        return Err(format!(
            "mx {value:?} ends with a dot: senders reject or never match it"
        ));
    }
    if !value.is_ascii() {
        return Err(format!(
            "mx {value:?} is not ASCII: write its A-label (xn--) form; senders never match it"
        ));
    }
    MxPattern::parse(value).map_err(|e| format!("mx {value:?}: {e}"))
}

/// Parses a policy body as strict senders do (RFC 8461 §3.2 grammar):
/// one `key: value` field per line, lines ended by CRLF or LF, no blank
/// lines. What senders tolerate but the RFC does not allow comes back as
/// warnings.
pub fn parse_policy(body: &[u8]) -> Result<ParsedPolicy, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the policy is not UTF-8 text")?;
    let mut warnings = Vec::new();
    let mut lf_lines = 0;
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    let mut rest = text;
    let mut number = 0;
    while !rest.is_empty() {
        number += 1;
        let line = match rest.split_once('\n') {
            Some((line, next)) => {
                rest = next;
                line.strip_suffix('\r').unwrap_or_else(|| {
                    lf_lines += 1;
                    line
                })
            }
            // The last field needs no line end (sts-policy-term is optional).
            None => std::mem::take(&mut rest),
        };
        if line.contains('\r') {
            return Err(format!("line {number} holds a CR that does not end it"));
        }
        if line.trim_matches([' ', '\t']).is_empty() {
            return Err(format!(
                "line {number} is blank; the policy grammar has none (RFC 8461 §3.2)"
            ));
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line {number} {line:?} is not `key: value`"));
        };
        let value = value.trim_matches([' ', '\t']);
        match key {
            "version" => {
                if number != 1 {
                    warnings.push("`version` is not the first line".into());
                }
                version.get_or_insert(value);
            }
            "mode" => {
                if mode.is_some() {
                    warnings.push("`mode` appears more than once".into());
                }
                mode.get_or_insert(value);
            }
            "max_age" => {
                if max_age.is_some() {
                    warnings.push("`max_age` appears more than once".into());
                }
                max_age.get_or_insert(value);
            }
            "mx" => mx.push(parse_live_mx(value)?),
            // Extension fields are ignored by senders (RFC 8461 §3.2), but
            // their name must still be a field name.
            other => {
                let name_ok = (1..=32).contains(&other.len())
                    && other
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
                if !name_ok {
                    return Err(format!("line {number}: {other:?} is not a field name"));
                }
            }
        }
    }
    if lf_lines > 0 {
        warnings.push("lines end in LF, not CRLF (RFC 8461 §3.2; most senders tolerate it)".into());
    }
    match version {
        Some("STSv1") => {}
        Some(v) => return Err(format!("version is {v:?}, not STSv1")),
        None => return Err("no `version: STSv1` line".into()),
    }
    let mode_text = mode.ok_or("no `mode` line")?;
    let mode = Mode::parse(mode_text)
        .ok_or_else(|| format!("mode {mode_text:?} is not enforce, testing or none"))?;
    let max_age_text = max_age.ok_or("no `max_age` line")?;
    // 1*10DIGIT: no sign, no spaces, no more than ten digits.
    let max_age = Some(max_age_text)
        .filter(|t| (1..=10).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|n| *n <= MAX_AGE_LIMIT)
        .ok_or_else(|| format!("max_age {max_age_text:?} is not 0..={MAX_AGE_LIMIT} in digits"))?;
    if mx.is_empty() && mode != Mode::None {
        return Err(format!("mode {mode} without any `mx` line"));
    }
    Ok(ParsedPolicy {
        policy: FetchedPolicy { mode, mx, max_age },
        warnings,
    })
}

/// Where a domain's mail goes, from its MX answer.
#[derive(Debug, PartialEq, Eq)]
pub enum MxHosts {
    /// MX hosts, lowest preference first, lowercase, no trailing dot.
    Hosts(Vec<String>),
    /// A null MX (`0 .`, RFC 7505): the domain accepts no mail.
    Null,
    /// A null MX beside other MX records (RFC 7505 §3 forbids it); the
    /// other hosts.
    NullAmong(Vec<String>),
    /// No MX at all: senders use the domain itself (RFC 5321 §5.1).
    Implicit,
}

/// Reads the MX records of an answer.
pub fn mx_hosts(records: &[RData]) -> MxHosts {
    let mut null = false;
    let mut hosts: Vec<(u16, String)> = Vec::new();
    for record in records {
        if let RData::MX(m) = record {
            if m.exchange.is_root() {
                null = true;
            } else {
                let name = m.exchange.to_ascii();
                let name = name.strip_suffix('.').unwrap_or(&name);
                hosts.push((m.preference, name.to_ascii_lowercase()));
            }
        }
    }
    hosts.sort();
    hosts.dedup();
    let hosts: Vec<String> = hosts.into_iter().map(|(_, h)| h).collect();
    match (null, hosts.is_empty()) {
        (true, true) => MxHosts::Null,
        (true, false) => MxHosts::NullAmong(hosts),
        (false, true) => MxHosts::Implicit,
        (false, false) => MxHosts::Hosts(hosts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Result<String, String> {
        parse_sts_txt(s).map(|i| i.as_str().to_owned())
    }

    #[test]
    fn sts_txt_parsing() {
        assert_eq!(id("v=STSv1; id=abc123;"), Ok("abc123".into()));
        assert_eq!(id("v=STSv1;id=abc"), Ok("abc".into()));
        assert_eq!(
            id("v=STSv1; id=a; ext=1;"),
            Ok("a".into()),
            "extension fields are allowed"
        );
        assert!(id("v=STSv2; id=a;").is_err());
        assert!(id("v=STSv1;").is_err());
        assert!(id("v=STSv1; id=a-b;").is_err());
        assert!(id(&format!("v=STSv1; id={};", "a".repeat(33))).is_err());
        assert!(id("v=STSv1;; id=a1;").is_err(), "empty field");
        assert!(id("v=STSv1; id=a1;;").is_err(), "two trailing delimiters");
        assert!(id("v=STSv1 id=a1;").is_err(), "no delimiter");
        assert!(id("v=STSv1; id = a1;").is_err(), "spaces around =");
    }

    #[test]
    fn sts_version_must_be_the_whole_first_field() {
        assert!(is_sts_record("v=STSv1; id=a;"));
        assert!(is_sts_record("v=STSv1 ; id=a;"));
        assert!(!is_sts_record("v=STSv10; id=zzz;"));
        assert!(!is_sts_record("v=STSv1x; id=a;"));
        assert!(!is_sts_record(" v=STSv1; id=a;"));
        assert!(!is_tlsrpt_record("v=TLSRPTv10; rua=mailto:a@b.example"));
    }

    #[test]
    fn tlsrpt_parsing() {
        assert_eq!(
            parse_tlsrpt("v=TLSRPTv1; rua=mailto:tls@example.com"),
            Ok(vec!["mailto:tls@example.com".to_owned()])
        );
        assert_eq!(
            parse_tlsrpt("v=TLSRPTv1;rua=mailto:a@x.example,https://r.example/tlsrpt;")
                .map(|v| v.len()),
            Ok(2)
        );
        assert!(parse_tlsrpt("v=TLSRPTv1;").is_err());
        assert!(
            parse_tlsrpt("v=TLSRPTv1; ext=1").is_err(),
            "rua is required"
        );
        assert!(parse_tlsrpt("v=TLSRPTv1; rua=mailto:x").is_err());
        assert!(parse_tlsrpt("v=TLSRPTv1; rua=https://").is_err());
        assert!(parse_tlsrpt("v=TLSRPTv1; rua=http://r.example/").is_err());
    }

    fn policy(body: &[u8]) -> Result<ParsedPolicy, String> {
        parse_policy(body)
    }

    #[test]
    fn policy_parsing_like_a_sender() {
        let p = policy(
            b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n",
        )
        .expect("valid");
        assert_eq!(p.policy.mode, Mode::Enforce);
        assert_eq!(p.policy.mx.len(), 2);
        assert!(p.warnings.is_empty());
        let p = policy(b"version: STSv1\nmode: none\nmax_age: 0\n").expect("LF ok");
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(policy(b"mode: testing\r\nmx: a.example\r\nmax_age: 1\r\n").is_err());
        assert!(policy(b"version: STSv1\r\nmode: testing\r\nmax_age: 1\r\n").is_err());
        assert!(
            policy(b"version: STSv1\r\nmode: strict\r\nmx: a.example\r\nmax_age: 1\r\n").is_err()
        );
        assert!(policy(b"version: STSv1\r\nmode: none\r\nmax_age: 99999999999\r\n").is_err());
    }

    #[test]
    fn policy_grammar_is_strict() {
        let base = "version: STSv1\r\nmode: testing\r\nmx: mx.example\r\n";
        for bad in [
            format!("{base}\r\nmax_age: 86400\r\n"),
            format!("{base}max_age: 86400\r\n\r\n"),
            format!("{base}max_age: +86400\r\n"),
            format!("{base}max_age: 0x10\r\n"),
            format!("{base}max_age: 00000000086400\r\n"),
            "version: STSv1\r\nmode: testing\r\nmx: mx.example.\r\nmax_age: 1\r\n".to_owned(),
            "version: STSv1\r\nmode: testing\r\nmx: mx.bücher.example\r\nmax_age: 1\r\n".to_owned(),
            "version: STSv1\r\nmode: testing\r\nmx: mx.example\rmax_age: 1\r\n".to_owned(),
            "Version: STSv1\r\nmode: testing\r\nmx: mx.example\r\nmax_age: 1\r\n".to_owned(),
        ] {
            assert!(policy(bad.as_bytes()).is_err(), "{bad:?} must fail");
        }
        let p = policy(b"version: STSv1\r\nmode: testing\r\nmx: MX.Example\r\nmax_age: 86400")
            .expect("CRLF without a final line end");
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert!(p.policy.mx[0].matches("mx.example"));
    }

    #[test]
    fn mx_answers() {
        use hickory_proto::rr::Name;
        use hickory_proto::rr::rdata::MX;
        let mx = |pref, name: &str| RData::MX(MX::new(pref, Name::from_ascii(name).expect("name")));
        assert_eq!(mx_hosts(&[]), MxHosts::Implicit);
        assert_eq!(mx_hosts(&[mx(0, ".")]), MxHosts::Null);
        assert_eq!(
            mx_hosts(&[mx(20, "B.example."), mx(10, "a.example.")]),
            MxHosts::Hosts(vec!["a.example".into(), "b.example".into()])
        );
        assert_eq!(
            mx_hosts(&[mx(0, "."), mx(10, "a.example.")]),
            MxHosts::NullAmong(vec!["a.example".into()])
        );
    }
}
