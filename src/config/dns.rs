//! `[delegation]` and `[dns.update]` (docs/DNS.md): the provider zone of
//! delegated hosting, and where `mtasts dns push` sends RFC 2136 updates.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Report, Source, duration};
use crate::policy::DomainName;

/// `[delegation]`: delegated hosting. Each customer publishes two CNAMEs
/// once; the provider's `zone` carries the TXT with the rotating id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// The provider zone holding one `_mta-sts` TXT per customer.
    pub zone: DomainName,
    /// Where every customer's `mta-sts.<domain>` CNAME points (this server).
    pub policy_host: DomainName,
    /// Addresses of `policy_host`, printed on the provider side if set.
    pub host_a: Vec<Ipv4Addr>,
    pub host_aaaa: Vec<Ipv6Addr>,
    /// TTL of the policy host's address records.
    pub ttl: u32,
    /// `dns_listen`: answer DNS for `zone` here (UDP and TCP).
    pub dns_listen: Option<SocketAddr>,
    /// `nameservers`: the zone's NS records (default: `policy_host`).
    pub nameservers: Vec<DomainName>,
    /// `allow_transfer`: addresses allowed to transfer the zone (AXFR).
    pub allow_transfer: Vec<std::net::IpAddr>,
    /// `notify`: secondaries told (NOTIFY) when the zone changes.
    pub notify: Vec<SocketAddr>,
    /// `dns_rate_limit`: UDP answers per second per client network before
    /// answers are dropped or truncated (0: no limit).
    pub dns_rate_limit: u32,
    /// `[delegation.transfer_tsig]`: zone transfers must be signed with
    /// this key (and are answered signed), on top of `allow_transfer`.
    pub transfer_tsig: Option<TsigKey>,
}

/// TSIG algorithms we sign with (RFC 8945 §6; the HMAC-SHA2 family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsigAlgorithm {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl TsigAlgorithm {
    /// The name used in configs and by BIND/knot (`hmac-sha256`).
    pub fn as_str(self) -> &'static str {
        match self {
            TsigAlgorithm::HmacSha256 => "hmac-sha256",
            TsigAlgorithm::HmacSha384 => "hmac-sha384",
            TsigAlgorithm::HmacSha512 => "hmac-sha512",
        }
    }
}

/// A TSIG shared secret. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct TsigSecret(Vec<u8>);

impl TsigSecret {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for TsigSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TsigSecret(<{} bytes>)", self.0.len())
    }
}

/// `[dns.update]`: one primary DNS server that takes RFC 2136 updates for
/// one zone, authenticated with a TSIG key (RFC 8945).
#[derive(Debug, Clone, PartialEq)]
pub struct DnsUpdate {
    /// The primary's address (port 53 unless given).
    pub server: SocketAddr,
    /// Only records inside this zone are pushed.
    pub zone: DomainName,
    /// TSIG key name, as configured on the server (e.g. `mtasts-key`).
    pub key_name: String,
    pub algorithm: TsigAlgorithm,
    pub secret: TsigSecret,
    /// Overrides the TTL of every pushed record.
    pub ttl: Option<u32>,
    /// Per exchange (connect, send, answer).
    pub timeout: Duration,
    /// Extra attempts after a network failure or SERVFAIL, with backoff.
    pub retries: u32,
    /// `serve` pushes after it starts and after every reload, once the new
    /// snapshot is being served. Off by default: with several replicas,
    /// only one that reloads last may push (docs/DNS.md).
    pub auto_push: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelegation {
    zone: Option<Spanned<String>>,
    policy_host: Option<Spanned<String>>,
    host_a: Option<Spanned<Vec<Spanned<String>>>>,
    host_aaaa: Option<Spanned<Vec<Spanned<String>>>>,
    ttl: Option<Spanned<i64>>,
    dns_listen: Option<Spanned<String>>,
    nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    allow_transfer: Option<Spanned<Vec<Spanned<String>>>>,
    notify: Option<Spanned<Vec<Spanned<String>>>>,
    dns_rate_limit: Option<Spanned<i64>>,
    transfer_tsig: Option<Spanned<RawTsigKey>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTsigKey {
    key_name: Option<Spanned<String>>,
    algorithm: Option<Spanned<String>>,
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) update: Option<Spanned<RawDnsUpdate>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDnsUpdate {
    server: Option<Spanned<String>>,
    zone: Option<Spanned<String>>,
    key_name: Option<Spanned<String>>,
    algorithm: Option<Spanned<String>>,
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    ttl: Option<Spanned<i64>>,
    timeout: Option<Spanned<toml::Value>>,
    retries: Option<Spanned<i64>>,
    auto_push: Option<bool>,
}

/// A required key of a section, or an error at the section.
fn required<'a, T>(
    source: &Source,
    section: &Spanned<impl Sized>,
    value: &'a Option<Spanned<T>>,
    key: &str,
    report: &mut Report,
) -> Option<&'a Spanned<T>> {
    if value.is_none() {
        report
            .errors
            .push(source.at(section.span(), format!("missing `{key}`")));
    }
    value.as_ref()
}

fn spanned_domain(
    source: &Source,
    v: &Spanned<String>,
    key: &str,
    report: &mut Report,
) -> Option<DomainName> {
    match DomainName::parse(v.get_ref()) {
        Ok(n) => Some(n),
        Err(e) => {
            report
                .errors
                .push(source.at(v.span(), format!("{key}: {e}")));
            None
        }
    }
}

fn spanned_ttl(source: &Source, v: &Spanned<i64>, key: &str, report: &mut Report) -> Option<u32> {
    match u32::try_from(*v.get_ref()) {
        Ok(t) if t <= 2_147_483_647 => Some(t),
        _ => {
            report.errors.push(source.at(
                v.span(),
                format!("{key} must be between 0 and 2147483647 seconds"),
            ));
            None
        }
    }
}

pub(super) fn delegation_config(
    source: &Source,
    raw: &Spanned<RawDelegation>,
    report: &mut Report,
) -> Option<Delegation> {
    let errors_before = report.errors.len();
    let r = raw.get_ref();
    let zone = required(source, raw, &r.zone, "zone", report)
        .and_then(|v| spanned_domain(source, v, "delegation.zone", report));
    // The hashed form of a customer label (35 characters) must still fit.
    if let (Some(z), Some(v)) = (&zone, &r.zone)
        && z.as_str().len() > 253 - 35
    {
        report.errors.push(source.at(
            v.span(),
            "delegation.zone is too long: customer names below it need 35 more characters",
        ));
    }
    let policy_host = required(source, raw, &r.policy_host, "policy_host", report)
        .and_then(|v| spanned_domain(source, v, "delegation.policy_host", report));
    let mut host_a = Vec::new();
    for item in r.host_a.iter().flat_map(|l| l.get_ref()) {
        match item.get_ref().parse::<Ipv4Addr>() {
            Ok(a) => host_a.push(a),
            Err(_) => report.errors.push(source.at(
                item.span(),
                format!(
                    "delegation.host_a: {:?} is not an IPv4 address",
                    item.get_ref()
                ),
            )),
        }
    }
    let mut host_aaaa = Vec::new();
    for item in r.host_aaaa.iter().flat_map(|l| l.get_ref()) {
        match item.get_ref().parse::<Ipv6Addr>() {
            Ok(a) => host_aaaa.push(a),
            Err(_) => report.errors.push(source.at(
                item.span(),
                format!(
                    "delegation.host_aaaa: {:?} is not an IPv6 address",
                    item.get_ref()
                ),
            )),
        }
    }
    let ttl = match &r.ttl {
        Some(v) => spanned_ttl(source, v, "delegation.ttl", report).unwrap_or(3600),
        None => 3600,
    };
    let dns_listen = r
        .dns_listen
        .as_ref()
        .and_then(|v| match v.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                report.errors.push(source.at(
                    v.span(),
                    format!(
                        "delegation.dns_listen: {:?} is not an address:port (e.g. \"[::]:53\")",
                        v.get_ref()
                    ),
                ));
                None
            }
        });
    let mut nameservers = Vec::new();
    for item in r.nameservers.iter().flat_map(|l| l.get_ref()) {
        match DomainName::parse(item.get_ref()) {
            Ok(n) => nameservers.push(n),
            Err(e) => report.errors.push(source.at(
                item.span(),
                format!("delegation.nameservers: {:?}: {e}", item.get_ref()),
            )),
        }
    }
    let mut allow_transfer = Vec::new();
    for item in r.allow_transfer.iter().flat_map(|l| l.get_ref()) {
        match item.get_ref().parse() {
            Ok(ip) => allow_transfer.push(ip),
            Err(_) => report.errors.push(source.at(
                item.span(),
                format!(
                    "delegation.allow_transfer: {:?} is not an IP address",
                    item.get_ref()
                ),
            )),
        }
    }
    let mut notify = Vec::new();
    for item in r.notify.iter().flat_map(|l| l.get_ref()) {
        match item.get_ref().parse() {
            Ok(addr) => notify.push(addr),
            Err(_) => report.errors.push(source.at(
                item.span(),
                format!(
                    "delegation.notify: {:?} is not an address:port",
                    item.get_ref()
                ),
            )),
        }
    }
    let dns_rate_limit = match &r.dns_rate_limit {
        None => 1000,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) => n,
            Err(_) => {
                report.errors.push(source.at(
                    v.span(),
                    "delegation.dns_rate_limit must be 0 (no limit) or a positive number of answers per second",
                ));
                0
            }
        },
    };
    let transfer_tsig = r.transfer_tsig.as_ref().and_then(|t| {
        let k = t.get_ref();
        tsig_key(
            source,
            t.span(),
            TsigFields {
                key_name: &k.key_name,
                algorithm: &k.algorithm,
                secret: &k.secret,
                secret_file: &k.secret_file,
            },
            "delegation.transfer_tsig",
            report,
        )
    });
    if report.errors.len() > errors_before {
        return None;
    }
    let policy_host = policy_host?;
    if nameservers.is_empty() {
        nameservers.push(policy_host.clone());
    }
    Some(Delegation {
        zone: zone?,
        policy_host,
        host_a,
        host_aaaa,
        ttl,
        dns_listen,
        nameservers,
        allow_transfer,
        notify,
        dns_rate_limit,
        transfer_tsig,
    })
}

/// A DNS server's `ip:port`, or a bare IP address meaning port 53.
pub(super) fn dns_server_addr(text: &str) -> Option<SocketAddr> {
    text.parse::<SocketAddr>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// A TSIG key name: DNS labels of letters, digits, `-` and `_`, with or
/// without a trailing dot; one label is fine (`mtasts-key`).
fn key_name_ok(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

pub(super) fn dns_update_config(
    source: &Source,
    raw: &Spanned<RawDnsUpdate>,
    report: &mut Report,
) -> Option<DnsUpdate> {
    let errors_before = report.errors.len();
    let r = raw.get_ref();
    let server = required(source, raw, &r.server, "server", report).and_then(|v| {
        let text = v.get_ref().trim();
        let parsed = dns_server_addr(text);
        if parsed.is_none() {
            report.errors.push(source.at(
                v.span(),
                format!(
                    "dns.update.server: {text:?} is not an IP address or address:port (e.g. \"192.0.2.53\" or \"[2001:db8::53]:5353\")"
                ),
            ));
        }
        parsed
    });
    let zone = required(source, raw, &r.zone, "zone", report)
        .and_then(|v| spanned_domain(source, v, "dns.update.zone", report));
    let key = tsig_key(
        source,
        raw.span(),
        TsigFields {
            key_name: &r.key_name,
            algorithm: &r.algorithm,
            secret: &r.secret,
            secret_file: &r.secret_file,
        },
        "dns.update",
        report,
    );
    let ttl = r
        .ttl
        .as_ref()
        .and_then(|v| spanned_ttl(source, v, "dns.update.ttl", report));
    let timeout = match &r.timeout {
        None => Duration::from_secs(5),
        Some(v) => match duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                report
                    .errors
                    .push(source.at(v.span(), "dns.update.timeout must be more than 0"));
                Duration::from_secs(5)
            }
            Err(m) => {
                report
                    .errors
                    .push(source.at(v.span(), format!("dns.update.timeout: {m}")));
                Duration::from_secs(5)
            }
        },
    };
    let retries = match &r.retries {
        None => 3,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) if n <= 10 => n,
            _ => {
                report
                    .errors
                    .push(source.at(v.span(), "dns.update.retries must be between 0 and 10"));
                3
            }
        },
    };
    if report.errors.len() > errors_before {
        return None;
    }
    Some(DnsUpdate {
        server: server?,
        zone: zone?,
        key_name: key.as_ref()?.key_name.clone(),
        algorithm: key.as_ref()?.algorithm,
        secret: key?.secret,
        ttl,
        timeout,
        retries,
        auto_push: r.auto_push.unwrap_or(false),
    })
}

/// A TSIG key, validated: `[dns.update]` and `[delegation.transfer_tsig]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsigKey {
    pub key_name: String,
    pub algorithm: TsigAlgorithm,
    pub secret: TsigSecret,
}

/// The raw key settings of a section (`key_name`, `algorithm`, `secret`
/// or `secret_file`).
pub(super) struct TsigFields<'a> {
    pub key_name: &'a Option<Spanned<String>>,
    pub algorithm: &'a Option<Spanned<String>>,
    pub secret: &'a Option<Spanned<String>>,
    pub secret_file: &'a Option<Spanned<String>>,
}

/// The TSIG key of a section (`prefix` names it in errors).
pub(super) fn tsig_key(
    source: &Source,
    section: std::ops::Range<usize>,
    f: TsigFields<'_>,
    prefix: &str,
    report: &mut Report,
) -> Option<TsigKey> {
    let key_name = match f.key_name {
        Some(v) => Some(v),
        None => {
            report
                .errors
                .push(source.at(section.clone(), format!("missing `key_name` in {prefix}")));
            None
        }
    }
    .and_then(|v| {
        if key_name_ok(v.get_ref()) {
            Some(v.get_ref().clone())
        } else {
            report.errors.push(source.at(
                v.span(),
                format!(
                    "{prefix}.key_name {:?} is not a DNS name (letters, digits, '-', '_', dots)",
                    v.get_ref()
                ),
            ));
            None
        }
    });
    let algorithm = match f.algorithm {
        None => Some(TsigAlgorithm::HmacSha256),
        Some(v) => match v.get_ref().to_ascii_lowercase().as_str() {
            "hmac-sha256" => Some(TsigAlgorithm::HmacSha256),
            "hmac-sha384" => Some(TsigAlgorithm::HmacSha384),
            "hmac-sha512" => Some(TsigAlgorithm::HmacSha512),
            other => {
                report.errors.push(source.at(
                    v.span(),
                    format!(
                        "{prefix}.algorithm {other:?} is not one of \"hmac-sha256\", \"hmac-sha384\", \"hmac-sha512\""
                    ),
                ));
                None
            }
        },
    };
    let secret = match (f.secret, f.secret_file) {
        (Some(_), Some(f)) => {
            report.errors.push(source.at(
                f.span(),
                format!("{prefix}: set `secret` or `secret_file`, not both"),
            ));
            None
        }
        (None, None) => {
            report.errors.push(source.at(
                section.clone(),
                "missing `secret` (base64) or `secret_file` (a file holding it)",
            ));
            None
        }
        (Some(v), None) => decode_secret(v.get_ref())
            .map_err(|m| {
                report
                    .errors
                    .push(source.at(v.span(), format!("{prefix}.secret: {m}")))
            })
            .ok(),
        (None, Some(f)) => {
            let path = source.resolve(f.get_ref());
            std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|text| decode_secret(&text))
                .map_err(|m| {
                    report
                        .errors
                        .push(source.at(f.span(), format!("{prefix}.secret_file: {m}")))
                })
                .ok()
        }
    };
    Some(TsigKey {
        key_name: key_name?,
        algorithm: algorithm?,
        secret: secret?,
    })
}

/// A base64 TSIG secret (what `keymgr -t` and `tsig-keygen` print).
fn decode_secret(text: &str) -> Result<TsigSecret, String> {
    let bytes = data_encoding::BASE64
        .decode(text.trim().as_bytes())
        .map_err(|e| format!("not valid base64 ({e})"))?;
    if bytes.len() < 16 {
        return Err(format!(
            "the key is only {} bytes; use at least 16 (e.g. `keymgr -t mtasts-key hmac-sha256`)",
            bytes.len()
        ));
    }
    Ok(TsigSecret(bytes))
}
