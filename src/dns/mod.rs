//! DNS records for each published domain (RFC 8461 §3.1, RFC 8460 §3): the
//! `_mta-sts` TXT with the policy id, the `mta-sts` host record and the
//! `_smtp._tls` TLS-RPT TXT — either as one full set per domain or split into
//! the customer and provider sides of delegated hosting.
//!
//! [`format`] renders them (zone file, JSON, CSV, octoDNS, Cloudflare,
//! Route 53, user templates); [`update`] pushes them with RFC 2136;
//! [`resolve`] is the stub resolver of `check` and the ACME precheck.

pub mod format;
pub mod serve;
pub mod update;
pub mod write;

use std::fmt::Write as _;

use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{Delegation, DomainConfig, HostRecord};
use crate::policy::{DomainName, Policy, PolicyId};
use crate::snapshot::{Rendered, Renderings, Site, Snapshot};

/// One resource record, value unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// The policy domain the record belongs to (for the provider's policy
    /// host addresses: the policy host).
    pub domain: String,
    /// Owner name, fully qualified with trailing dot.
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: &'static str,
    pub ttl: u32,
    /// TXT text, address, or CNAME target (with trailing dot).
    pub value: String,
    /// The zone the record is published in (FQDN, trailing dot): the policy
    /// domain itself, or the delegation zone on the provider side. Not part
    /// of the JSON output, whose shape predates it.
    #[serde(skip)]
    pub zone: String,
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

    /// The owner name relative to its zone: `""` at the apex, else the
    /// labels in front of the zone (`_mta-sts`, `mta-sts`).
    pub fn relative_name(&self) -> &str {
        if self.name == self.zone {
            return "";
        }
        self.name
            .strip_suffix(self.zone.as_str())
            .and_then(|s| s.strip_suffix('.'))
            .unwrap_or(&self.name)
    }
}

/// Which records to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Side {
    /// The full set, published in each domain's own zone (no delegation).
    #[default]
    Full,
    /// Delegated hosting, the customer's zone: two CNAMEs (set once, never
    /// changed) and the TLS-RPT TXT.
    Customer,
    /// Delegated hosting, the provider's zone: the TXT with the rotating id
    /// for every customer, plus the policy host's addresses.
    Provider,
}

/// Why records could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    #[error(
        "records for the customer or provider side need a [delegation] section (zone, policy_host) in the config"
    )]
    NoDelegation,
}

/// What one domain's records are made of: a served [`Site`], or the
/// [`Published`] part of a domain that `mtasts records` keeps while it
/// reads a config file by file.
pub trait Publish {
    fn name(&self) -> &DomainName;
    fn ttl(&self) -> u32;
    fn host_record(&self) -> &HostRecord;
    /// The `rua` of the `_smtp._tls` record; empty for none.
    fn rua(&self) -> &[String];
    fn id(&self) -> &PolicyId;
}

impl Publish for Site {
    fn name(&self) -> &DomainName {
        &self.domain.name
    }
    fn ttl(&self) -> u32 {
        self.domain.ttl
    }
    fn host_record(&self) -> &HostRecord {
        &self.domain.host
    }
    fn rua(&self) -> &[String] {
        &self.domain.tlsrpt_rua
    }
    fn id(&self) -> &PolicyId {
        &self.rendered.id
    }
}

/// Of one domain, what its records need and nothing else: its name, and
/// a part shared with the domains configured the same way (no origin, no
/// mx list; the rendering is shared by every domain with the policy).
/// 24 bytes and the name, made by a [`Publisher`].
#[derive(Debug)]
pub struct Published {
    name: DomainName,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    ttl: u32,
    host: HostRecord,
    rua: Arc<[String]>,
    rendered: Arc<Rendered>,
}

/// Makes [`Published`] values for one thread: a domain configured like
/// the one before it (as a provider's domains mostly are) shares its part.
#[derive(Debug, Default)]
pub struct Publisher {
    renderings: Renderings,
    last: Option<(Policy, Arc<Shared>)>,
}

impl Publisher {
    pub fn publish(&mut self, d: &DomainConfig) -> Published {
        let shared = match &self.last {
            Some((policy, shared))
                if *policy == d.policy
                    && shared.ttl == d.ttl
                    && shared.host == d.host
                    && shared.rua == d.tlsrpt_rua =>
            {
                Arc::clone(shared)
            }
            _ => {
                let shared = Arc::new(Shared {
                    ttl: d.ttl,
                    host: d.host.clone(),
                    rua: Arc::clone(&d.tlsrpt_rua),
                    rendered: self.renderings.get(&d.policy),
                });
                self.last = Some((d.policy.clone(), Arc::clone(&shared)));
                shared
            }
        };
        Published {
            name: d.name.clone(),
            shared,
        }
    }
}

impl Publish for Published {
    fn name(&self) -> &DomainName {
        &self.name
    }
    fn ttl(&self) -> u32 {
        self.shared.ttl
    }
    fn host_record(&self) -> &HostRecord {
        &self.shared.host
    }
    fn rua(&self) -> &[String] {
        &self.shared.rua
    }
    fn id(&self) -> &PolicyId {
        &self.shared.rendered.id
    }
}

/// The `_mta-sts` TXT text: `v=STSv1; id=<id>;` (RFC 8461 §3.1).
fn sts_txt(site: &(impl Publish + ?Sized)) -> String {
    format!("v=STSv1; id={};", site.id())
}

/// All records of one site, published in its own zone.
pub fn site_records(site: &(impl Publish + ?Sized)) -> Vec<Record> {
    let domain = site.name().as_str();
    let ttl = site.ttl();
    let zone = format!("{domain}.");
    let rec = |name: String, rtype: &'static str, value: String| Record {
        domain: domain.to_owned(),
        name,
        rtype,
        ttl,
        value,
        zone: zone.clone(),
    };
    let mut out = vec![rec(format!("_mta-sts.{domain}."), "TXT", sts_txt(site))];
    let host = format!("mta-sts.{domain}.");
    match site.host_record() {
        HostRecord::Unset => {}
        HostRecord::Cname(target) => out.push(rec(host, "CNAME", format!("{target}."))),
        HostRecord::Addresses(addrs) => {
            out.extend(
                addrs
                    .v4
                    .iter()
                    .map(|a| rec(host.clone(), "A", a.to_string())),
            );
            out.extend(
                addrs
                    .v6
                    .iter()
                    .map(|a| rec(host.clone(), "AAAA", a.to_string())),
            );
        }
    }
    if let Some(tlsrpt) = tlsrpt_record(site, &zone) {
        out.push(tlsrpt);
    }
    out
}

fn tlsrpt_record(site: &(impl Publish + ?Sized), zone: &str) -> Option<Record> {
    let rua = site.rua();
    (!rua.is_empty()).then(|| Record {
        domain: site.name().to_string(),
        name: format!("_smtp._tls.{}.", site.name()),
        rtype: "TXT",
        ttl: site.ttl(),
        value: format!("v=TLSRPTv1; rua={};", rua.join(",")),
        zone: zone.to_owned(),
    })
}

/// Delegated hosting, customer side: `mta-sts.<domain>` → the provider's
/// policy host and `_mta-sts.<domain>` → [`delegated_name`]. Senders follow
/// the CNAME at `_mta-sts` (RFC 8461 §3.1) and still connect to
/// `mta-sts.<domain>` with that name as SNI, so the certificate stays the
/// customer's name.
pub fn customer_records(site: &(impl Publish + ?Sized), delegation: &Delegation) -> Vec<Record> {
    let domain = site.name().as_str();
    let ttl = site.ttl();
    let zone = format!("{domain}.");
    let cname = |name: String, value: String| Record {
        domain: domain.to_owned(),
        name,
        rtype: "CNAME",
        ttl,
        value,
        zone: zone.clone(),
    };
    let mut out = vec![
        cname(
            format!("_mta-sts.{domain}."),
            delegated_name(site.name(), &delegation.zone),
        ),
        cname(
            format!("mta-sts.{domain}."),
            format!("{}.", delegation.policy_host),
        ),
    ];
    if let Some(tlsrpt) = tlsrpt_record(site, &zone) {
        out.push(tlsrpt);
    }
    out
}

/// Delegated hosting, provider side for one customer: the TXT with the
/// current id at [`delegated_name`] in the delegation zone.
pub fn provider_records(site: &(impl Publish + ?Sized), delegation: &Delegation) -> Vec<Record> {
    vec![Record {
        domain: site.name().to_string(),
        name: delegated_name(site.name(), &delegation.zone),
        rtype: "TXT",
        ttl: site.ttl(),
        value: sts_txt(site),
        zone: format!("{}.", delegation.zone),
    }]
}

/// The policy host's own A/AAAA records (provider side, once).
pub fn policy_host_records(delegation: &Delegation) -> Vec<Record> {
    let host = &delegation.policy_host;
    let zone = if host.as_str() == delegation.zone.as_str()
        || host
            .as_str()
            .strip_suffix(delegation.zone.as_str())
            .is_some_and(|s| s.ends_with('.'))
    {
        format!("{}.", delegation.zone)
    } else {
        // Outside the delegation zone: assume the host's parent is a zone.
        let parent = host.as_str().split_once('.').map_or(host.as_str(), |p| p.1);
        format!("{parent}.")
    };
    let rec = |rtype: &'static str, value: String| Record {
        domain: host.to_string(),
        name: format!("{host}."),
        rtype,
        ttl: delegation.ttl,
        value,
        zone: zone.clone(),
    };
    let mut out: Vec<Record> = delegation
        .host_a
        .iter()
        .map(|a| rec("A", a.to_string()))
        .collect();
    out.extend(
        delegation
            .host_aaaa
            .iter()
            .map(|a| rec("AAAA", a.to_string())),
    );
    out
}

/// Where a customer's `_mta-sts` CNAME points in the delegation zone
/// (FQDN, trailing dot): `<customer domain>.<zone>` keeps every label of
/// the customer domain, so it is readable and never shared by two customers
/// (replacing dots with `-` would map `a-b.example` and `a.b-example` to the
/// same label). If that name would exceed 253 characters, it is
/// `h-<32 hex digits of SHA-256(domain)>.<zone>` instead. Both forms depend
/// only on the two names, so the CNAME the customer sets never changes.
pub fn delegated_name(domain: &DomainName, zone: &DomainName) -> String {
    let name = format!("{domain}.{zone}");
    if name.len() <= 253 {
        return format!("{name}.");
    }
    let digest = Sha256::digest(domain.as_str().as_bytes());
    let hex = data_encoding::HEXLOWER.encode(&digest[..16]);
    format!("h-{hex}.{zone}.")
}

/// Records for all sites, or only those whose domain is in `only`.
pub fn records(
    snapshot: &Snapshot,
    only: &[DomainName],
    side: Side,
    delegation: Option<&Delegation>,
) -> Result<Vec<Record>, RecordsError> {
    Ok(each_record(snapshot, only, side, delegation)?.collect())
}

/// [`records`] one at a time, grouped by zone (what [`write`] needs): a
/// million domains never hold all their records in memory at once.
pub fn each_record<'a>(
    snapshot: &'a Snapshot,
    only: &'a [DomainName],
    side: Side,
    delegation: Option<&'a Delegation>,
) -> Result<impl Iterator<Item = Record> + 'a, RecordsError> {
    let wanted: std::collections::HashSet<&DomainName> = only.iter().collect();
    let sites = snapshot
        .sites()
        .iter()
        .map(|s| &**s)
        .filter(move |s| wanted.is_empty() || wanted.contains(&s.domain.name));
    records_of(sites, side, delegation)
}

/// The records of `sites` (in zone order: the order of their names), for
/// `side`.
pub fn records_of<'a, P: Publish + 'a>(
    sites: impl Iterator<Item = &'a P> + 'a,
    side: Side,
    delegation: Option<&'a Delegation>,
) -> Result<impl Iterator<Item = Record> + 'a, RecordsError> {
    let head: Vec<Record> = match (side, delegation) {
        (Side::Provider, Some(del)) => policy_host_records(del),
        (Side::Full, _) | (Side::Customer, Some(_)) => Vec::new(),
        (Side::Customer | Side::Provider, None) => return Err(RecordsError::NoDelegation),
    };
    let per_site = move |s: &'a P| match (side, delegation) {
        (Side::Customer, Some(del)) => customer_records(s, del),
        (Side::Provider, Some(del)) => provider_records(s, del),
        _ => site_records(s),
    };
    Ok(head.into_iter().chain(sites.flat_map(per_site)))
}

/// Quotes TXT data for a zone file: `"` and `\` escaped, bytes outside
/// printable ASCII as `\DDD`, split into ≤255-byte character-strings.
pub fn quote_txt(value: &str) -> String {
    txt_strings(value)
        .iter()
        .map(|chunk| {
            let mut out = String::with_capacity(chunk.len() + 2);
            out.push('"');
            for &b in *chunk {
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
            out
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// TXT data as RFC 1035 character-strings of at most 255 bytes each (one
/// empty string for empty data).
pub fn txt_strings(value: &str) -> Vec<&[u8]> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return vec![bytes];
    }
    bytes.chunks(255).collect()
}

/// TSIG fudge (RFC 8945 §5.2.3): how far the clocks of the two sides may
/// differ, in seconds; RFC 8945 recommends 300.
pub const TSIG_FUDGE: u16 = 300;

/// A TSIG signer (and verifier) for a configured key (`[dns.update]`,
/// `[delegation.transfer_tsig]`); the error says which part is wrong.
pub fn tsig_signer(
    key_name: &str,
    algorithm: crate::config::TsigAlgorithm,
    secret: &crate::config::TsigSecret,
) -> Result<hickory_proto::rr::TSigner, String> {
    use crate::config::TsigAlgorithm as Config;
    use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
    let name = hickory_proto::rr::Name::from_ascii(key_name)
        .map_err(|e| format!("key name {key_name:?}: {e}"))?;
    let algorithm = match algorithm {
        Config::HmacSha256 => TsigAlgorithm::HmacSha256,
        Config::HmacSha384 => TsigAlgorithm::HmacSha384,
        Config::HmacSha512 => TsigAlgorithm::HmacSha512,
    };
    hickory_proto::rr::TSigner::new(secret.bytes().to_vec(), algorithm, name, TSIG_FUDGE)
        .map_err(|e| format!("TSIG key: {e}"))
}

/// A TXT record's strings as one text (RFC 8461 §3.1 and RFC 7208 §3.3:
/// the strings are concatenated); `None` for other records.
pub fn txt_text(data: &hickory_proto::rr::RData) -> Option<String> {
    match data {
        hickory_proto::rr::RData::TXT(t) => Some(
            t.txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s))
                .collect(),
        ),
        _ => None,
    }
}

/// Now in Unix seconds, as TSIG timestamps count.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A digest of records (what a replica reports it serves, see
/// `replica::served_digest`).
pub fn records_digest(records: &[Record]) -> String {
    let mut hasher = sha2::Sha256::new();
    for r in records {
        hasher.update(format!("{r:?}\n").as_bytes());
    }
    data_encoding::HEXLOWER.encode(&hasher.finalize()[..16])
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

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).expect("valid name")
    }

    #[test]
    fn delegated_names_are_readable_and_distinct() {
        let zone = name("sts.provider.example");
        assert_eq!(
            delegated_name(&name("a-b.example"), &zone),
            "a-b.example.sts.provider.example."
        );
        assert_eq!(
            delegated_name(&name("a.b-example"), &zone),
            "a.b-example.sts.provider.example."
        );
    }

    #[test]
    fn delegated_name_hashes_when_too_long() {
        let zone = name("sts.provider.example");
        let long = name(&format!(
            "{}.abcdefghijkl.example",
            ["abcdefghijklmnopqrstu"; 10].join(".")
        ));
        let n = delegated_name(&long, &zone);
        assert!(n.starts_with("h-"), "{n}");
        assert_eq!(n.len(), "h-".len() + 32 + ".sts.provider.example.".len());
        assert_eq!(n, delegated_name(&long, &zone), "stable");
    }

    #[test]
    fn relative_names() {
        let r = Record {
            domain: "example.com".into(),
            name: "_mta-sts.example.com.".into(),
            rtype: "TXT",
            ttl: 1,
            value: String::new(),
            zone: "example.com.".into(),
        };
        assert_eq!(r.relative_name(), "_mta-sts");
        let apex = Record {
            name: "example.com.".into(),
            ..r
        };
        assert_eq!(apex.relative_name(), "");
    }
}
