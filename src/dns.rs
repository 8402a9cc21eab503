//! DNS records for each published domain (RFC 8461 §3.1, RFC 8460 §3): the
//! `_mta-sts` TXT with the policy id, the `mta-sts` host record and the
//! `_smtp._tls` TLS-RPT TXT, plus their zone-file and JSON renderings.

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::HostRecord;
use crate::snapshot::{Site, Snapshot};

/// One resource record, value unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// The policy domain the record belongs to.
    pub domain: String,
    /// Owner name, fully qualified with trailing dot.
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: &'static str,
    pub ttl: u32,
    /// TXT text, address, or CNAME target (with trailing dot).
    pub value: String,
}

impl Record {
    /// The value as written in a zone file: TXT quoted, escaped and split
    /// into strings of at most 255 bytes (RFC 1035 §3.3.14); others as is.
    pub fn zone_value(&self) -> String {
        if self.rtype == "TXT" {
            quote_txt(&self.value)
        } else {
            self.value.clone()
        }
    }
}

/// All records of one site.
pub fn site_records(site: &Site) -> Vec<Record> {
    let d = &site.domain;
    let domain = d.name.as_str();
    let rec = |name: String, rtype: &'static str, value: String| Record {
        domain: domain.to_owned(),
        name,
        rtype,
        ttl: d.ttl,
        value,
    };
    let mut out = vec![rec(
        format!("_mta-sts.{domain}."),
        "TXT",
        format!("v=STSv1; id={};", site.id),
    )];
    let host = format!("mta-sts.{domain}.");
    match &d.host {
        HostRecord::Unset => {}
        HostRecord::Cname(target) => out.push(rec(host, "CNAME", format!("{target}."))),
        HostRecord::Addresses { v4, v6 } => {
            out.extend(v4.iter().map(|a| rec(host.clone(), "A", a.to_string())));
            out.extend(v6.iter().map(|a| rec(host.clone(), "AAAA", a.to_string())));
        }
    }
    if !d.tlsrpt_rua.is_empty() {
        out.push(rec(
            format!("_smtp._tls.{domain}."),
            "TXT",
            format!("v=TLSRPTv1; rua={};", d.tlsrpt_rua.join(",")),
        ));
    }
    out
}

/// Records for all sites, or only those whose domain is in `only`.
pub fn records(snapshot: &Snapshot, only: &[crate::policy::DomainName]) -> Vec<Record> {
    snapshot
        .sites()
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.domain.name))
        .flat_map(|s| site_records(s))
        .collect()
}

/// Zone-file lines: `name ttl IN type value`.
pub fn to_bind(records: &[Record]) -> String {
    let mut out = String::new();
    for r in records {
        let _ = writeln!(
            out,
            "{} {} IN {} {}",
            r.name,
            r.ttl,
            r.rtype,
            r.zone_value()
        );
    }
    out
}

/// A JSON array with one object per record.
pub fn to_json(records: &[Record]) -> String {
    let mut s = serde_json::to_string_pretty(records).unwrap_or_else(|_| "[]".to_owned());
    s.push('\n');
    s
}

/// Quotes TXT data for a zone file: `"` and `\` escaped, bytes outside
/// printable ASCII as `\DDD`, split into ≤255-byte character-strings.
pub fn quote_txt(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(bytes.len() + 4);
    for (i, chunk) in bytes.chunks(255).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push('"');
        for &b in chunk {
            match b {
                b'"' | b'\\' => {
                    out.push('\\');
                    out.push(char::from(b));
                }
                0x20..=0x7e => out.push(char::from(b)),
                _ => {
                    let _ = write!(out, "\\{b:03}");
                }
            }
        }
        out.push('"');
    }
    if bytes.is_empty() {
        out.push_str("\"\"");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_txt("v=STSv1; id=abc;"), "\"v=STSv1; id=abc;\"");
        assert_eq!(quote_txt("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(quote_txt("é"), "\"\\195\\169\"");
        assert_eq!(quote_txt(""), "\"\"");
        let long = "x".repeat(300);
        let q = quote_txt(&long);
        assert_eq!(q, format!("\"{}\" \"{}\"", "x".repeat(255), "x".repeat(45)));
    }
}
