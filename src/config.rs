//! Configuration: TOML files (the main file plus `domains_dir/*.toml`) parsed
//! into raw serde structs that keep source spans, then validated into a
//! [`Config`] in which every policy is complete and correct.
//!
//! Validation collects *every* problem of every file as a [`Diagnostic`] with
//! `file:line:col`, so an operator fixes a broken config in one pass.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod diagnostic;
mod dns;
mod domain;
mod loader;
mod on_demand;
mod scan;
mod server;
mod store;
mod tlsrpt;
pub use diagnostic::{ConfigErrors, Diagnostic, Origin};
use diagnostic::{Report, Source, line_starts, toml_error};
pub use dns::{Delegation, DnsUpdate, TsigAlgorithm, TsigKey, TsigSecret};
use dns::{RawDelegation, RawDns, delegation_config, dns_update_config};
use domain::{Layer, domain_config, domain_name, validate_defaults};
use loader::CertReader;
pub use loader::Loader;
pub use on_demand::{DenyPattern, OnDemand};
pub use scan::{Scan, scan};
pub use server::{
    ADMIN_MAX_CONNECTIONS, AcmeConfig, AdminConfig, ChallengeKind, Eab, KeyType, LETS_ENCRYPT,
    LETS_ENCRYPT_STAGING, Limits, ServerConfig, TlsConfig, TlsMode,
};
use server::{RawAdmin, RawServer, RawTls, admin_config, server_config, tls_config};
pub use store::{PgConfig, PgUrl, StoreConfig, check_url as check_pg_url};
pub use tlsrpt::{DkimPolicy, TlsRptConfig};

use crate::policy::{DomainName, Policy};

/// The example configuration, embedded so `mtasts serve` runs without any
/// file (README command 1).
pub const EXAMPLE_CONFIG: &str = include_str!("../config.example.toml");

/// Largest config file we read: a provider's domain file is big, but not this big.
const MAX_CONFIG_BYTES: u64 = 64 * 1024 * 1024;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The main file, as given (used in messages).
    pub path: PathBuf,
    pub server: ServerConfig,
    pub tls: TlsConfig,
    /// `domains_dir`, resolved; the admin API writes its domains here.
    pub domains_dir: Option<PathBuf>,
    /// The admin API listener; `None` (the default) keeps it off.
    pub admin: Option<AdminConfig>,
    /// Sorted by domain name; names are unique. Shared with the snapshot
    /// (no copy of 100,000 domain configs per reload), and a persistent
    /// vector: a reload that changes a few domains shares the rest of the
    /// list with the previous config.
    pub domains: Domains,
    /// Non-fatal findings (e.g. a short `max_age`, skipped certificate names).
    pub warnings: Vec<Diagnostic>,
    /// `[delegation]`: customers CNAME to the provider (docs/DNS.md).
    pub delegation: Option<Delegation>,
    /// `[dns.update]`: where `mtasts dns push` sends RFC 2136 updates.
    pub dns_update: Option<DnsUpdate>,
    /// `[store]`: files in `state_dir` (default) or PostgreSQL.
    pub store: StoreConfig,
    /// `[tlsrpt]`: receiving TLS reports.
    pub tlsrpt: TlsRptConfig,
    /// `[on_demand]`: onboarding customers on first contact (needs
    /// `[delegation]` and `domains_dir`).
    pub on_demand: Option<OnDemand>,
    /// Some domain may take its mx from certificates (`mx_certs`); `false`
    /// means none does, so the certificate watch has nothing to do.
    pub mx_certs_used: bool,
}

/// The domains of a [`Config`], sorted by name.
pub type Domains = imbl::Vector<Arc<DomainConfig>>;

/// Where a domain's `mx` list came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxSource {
    Explicit,
    /// The listed certificate files or globs (absolute paths).
    Certs(Vec<PathBuf>),
}

/// How the `mta-sts.<domain>` host record is published.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HostRecord {
    /// Not configured: records output says how to set it.
    #[default]
    Unset,
    /// A and AAAA records (boxed: most domains have none, and the enum
    /// is in every domain's config).
    Addresses(Arc<HostAddresses>),
    /// A CNAME to a provider's policy host (absolute name, no trailing dot).
    Cname(DomainName),
}

/// The `host_a` and `host_aaaa` of a domain.
#[derive(Debug, PartialEq, Eq)]
pub struct HostAddresses {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// One hosted domain, fully resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainConfig {
    pub name: DomainName,
    pub policy: Policy,
    pub mx_source: MxSource,
    /// RFC 8460 report URIs (`mailto:` or `https:`); empty = no TLS-RPT
    /// record. Shared by the domains that inherit one `[defaults]` list.
    pub tlsrpt_rua: Arc<[String]>,
    /// TTL of the DNS records printed for this domain.
    pub ttl: u32,
    pub host: HostRecord,
    /// Where the domain was defined, for duplicate and later messages.
    pub origin: Origin,
    /// `retire = true`: MTA-STS is being withdrawn (RFC 8461 §8.3), so the
    /// policy is `mode: none` without mx, whatever `mode`/`mx` say; see
    /// the retire module for when its records may go.
    pub retire: bool,
}

// ---------------------------------------------------------------------------
// Raw, span-carrying serde structures.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMain {
    domains_dir: Option<Spanned<String>>,
    server: Option<RawServer>,
    tls: Option<RawTls>,
    admin: Option<Spanned<RawAdmin>>,
    defaults: Option<Spanned<RawPolicy>>,
    #[serde(default)]
    domain: Vec<Spanned<RawPolicy>>,
    delegation: Option<Spanned<RawDelegation>>,
    dns: Option<RawDns>,
    store: Option<Spanned<store::RawStore>>,
    tlsrpt: Option<tlsrpt::RawTlsRpt>,
    on_demand: Option<Spanned<on_demand::RawOnDemand>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomainFile {
    #[serde(default)]
    domain: Vec<Spanned<RawPolicy>>,
}

/// `[defaults]` and each `[[domain]]` share this shape; `name` is required
/// in a domain and refused in defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    max_age: Option<Spanned<toml::Value>>,
    mx: Option<Spanned<Vec<Spanned<String>>>>,
    mx_certs: Option<Spanned<Vec<Spanned<String>>>>,
    tlsrpt_rua: Option<Spanned<toml::Value>>,
    ttl: Option<Spanned<i64>>,
    host_a: Option<Spanned<Vec<Spanned<String>>>>,
    host_aaaa: Option<Spanned<Vec<Spanned<String>>>>,
    host_cname: Option<Spanned<String>>,
    retire: Option<Spanned<bool>>,
}

// ---------------------------------------------------------------------------
// Loading.

impl Config {
    /// Reads and validates `path` and every `*.toml` in its `domains_dir`.
    ///
    /// A server that reloads keeps a [`Loader`] instead, which re-reads
    /// only the files that changed.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Loader::new(path).load()
    }

    /// Validates config text as if it were the file `path`, resolving
    /// relative paths against `base`.
    pub fn from_source(path: &Path, base: &Path, text: String) -> Result<Config, ConfigErrors> {
        let mut loader = Loader::new(path);
        let main = parse_main(path, base, text)?;
        loader.load_parsed(main)
    }

    /// The embedded example config; relative paths resolve against the
    /// current directory.
    pub fn example() -> Result<Config, ConfigErrors> {
        Self::from_source(
            Path::new("<embedded config.example.toml>"),
            Path::new("."),
            EXAMPLE_CONFIG.to_owned(),
        )
    }

    pub fn domain(&self, name: &DomainName) -> Option<&DomainConfig> {
        self.domains
            .binary_search_by(|d| d.name.cmp(name))
            .ok()
            .and_then(|i| self.domains.get(i))
            .map(|d| &**d)
    }

    /// Whether `other` would serve and publish exactly what `self` does:
    /// every setting and every domain equal (warnings aside). Domains shared
    /// between the two (the same `Arc`, as an incremental reload leaves
    /// them) compare by pointer, so this is cheap for 100,000 domains.
    pub fn same_as(&self, other: &Config) -> bool {
        self.server == other.server
            && self.tls == other.tls
            && self.domains_dir == other.domains_dir
            && self.admin == other.admin
            && self.delegation == other.delegation
            && self.dns_update == other.dns_update
            && self.store == other.store
            && self.tlsrpt == other.tlsrpt
            && self.on_demand == other.on_demand
            && self.domains.len() == other.domains.len()
            && self
                .domains
                .iter()
                .zip(&other.domains)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

/// The main file, parsed, with its own sections validated; its `[[domain]]`
/// entries and `domains_dir` are left to the [`Loader`].
struct MainParts {
    source: Source,
    server: ServerConfig,
    tls: TlsConfig,
    admin: Option<AdminConfig>,
    delegation: Option<Delegation>,
    dns_update: Option<DnsUpdate>,
    store: StoreConfig,
    tlsrpt: TlsRptConfig,
    on_demand: Option<OnDemand>,
    /// `domains_dir`, resolved, and where the main file names it.
    domains_dir: Option<(PathBuf, Range<usize>)>,
    defaults: RawPolicy,
    entries: Vec<Spanned<RawPolicy>>,
    report: Report,
}

fn parse_main(path: &Path, base: &Path, text: String) -> Result<MainParts, ConfigErrors> {
    let main = Source {
        path: path.into(),
        base: if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base.to_owned()
        },
        line_starts: line_starts(&text),
        text,
    };
    let mut report = Report::default();
    let raw: RawMain = match toml::from_str(&main.text) {
        Ok(raw) => raw,
        Err(e) => {
            report.errors.push(toml_error(&main, &e));
            return Err(ConfigErrors {
                errors: report.errors,
                warnings: report.warnings,
            });
        }
    };

    let server = server_config(&main, raw.server, &mut report);
    let tls = tls_config(&main, raw.tls, &mut report);
    let delegation = raw
        .delegation
        .as_ref()
        .and_then(|d| delegation_config(&main, d, &mut report));
    let dns_update = raw
        .dns
        .as_ref()
        .and_then(|d| d.update.as_ref())
        .and_then(|u| dns_update_config(&main, u, &mut report));
    let admin = admin_config(&main, raw.admin, &mut report);
    let store = store::store_config(&main, raw.store, &mut report);
    let tlsrpt = tlsrpt::tlsrpt_config(&main, raw.tlsrpt, &mut report);
    let on_demand = raw
        .on_demand
        .as_ref()
        .and_then(|o| on_demand::on_demand_config(&main, o, &mut report));
    if let (Some(od), Some(raw_od)) = (&on_demand, &raw.on_demand)
        && od.enabled
    {
        if raw.delegation.is_none() {
            report.errors.push(main.at(
                raw_od.span(),
                "on_demand needs a [delegation] section: onboarding checks the customers' CNAMEs against its zone and policy_host",
            ));
        }
        if raw.domains_dir.is_none() {
            report.errors.push(main.at(
                raw_od.span(),
                "on_demand needs domains_dir: onboarded domains are kept there, one file each",
            ));
        }
    }

    let defaults = match raw.defaults {
        Some(d) => {
            if let Some(name) = &d.get_ref().name {
                report.errors.push(main.at(
                    name.span(),
                    "`name` belongs in a [[domain]] entry, not in [defaults]",
                ));
            }
            if let Some(retire) = &d.get_ref().retire {
                report.errors.push(main.at(
                    retire.span(),
                    "`retire` belongs in the [[domain]] entry of the domain to retire, not in [defaults] (it would retire every domain)",
                ));
            }
            d.into_inner()
        }
        None => RawPolicy::default(),
    };
    let domains_dir = raw
        .domains_dir
        .as_ref()
        .map(|d| (main.resolve(d.get_ref()), d.span()));
    Ok(MainParts {
        source: main,
        server,
        tls,
        admin,
        delegation,
        dns_update,
        store,
        tlsrpt,
        on_demand,
        domains_dir,
        defaults,
        entries: raw.domain,
        report,
    })
}

/// Checks every entry of one file on its own (all but the cross-file rule
/// that names are unique). An entry whose domain is equal to one in
/// `previous` (the same file's entries last time) gets that `Arc` back, so
/// an unchanged domain stays one shared value across reloads.
fn validate_entries(
    source: &Source,
    raw: &[Spanned<RawPolicy>],
    defaults: &Layer<'_>,
    certs: &mut CertReader,
    previous: &[DomainEntry],
) -> Vec<DomainEntry> {
    let by_name: HashMap<&DomainName, &Arc<DomainConfig>> = if previous.len() > 8 {
        previous
            .iter()
            .filter_map(|e| match e {
                DomainEntry::Valid { domain, .. } => Some((&domain.name, domain)),
                DomainEntry::Invalid(_) => None,
            })
            .collect()
    } else {
        HashMap::new()
    };
    let reuse = |d: &DomainConfig| -> Option<Arc<DomainConfig>> {
        let old = if previous.len() > 8 {
            by_name.get(&d.name).copied()
        } else {
            previous.iter().find_map(|e| match e {
                DomainEntry::Valid { domain, .. } if domain.name == d.name => Some(domain),
                _ => None,
            })
        };
        old.filter(|o| ***o == *d).cloned()
    };
    let mut out = Vec::with_capacity(raw.len());
    for entry in raw {
        let mut report = Report::default();
        let Some((name, origin)) = domain_name(source, entry, &mut report) else {
            out.push(DomainEntry::Invalid(Box::new(InvalidEntry {
                name: None,
                errors: report.errors,
                warnings: report.warnings,
            })));
            continue;
        };
        match domain_config(
            source,
            entry.get_ref(),
            name,
            origin,
            defaults,
            certs,
            &mut report,
        ) {
            Ok(domain) if report.errors.is_empty() => {
                let domain = reuse(&domain).unwrap_or_else(|| Arc::new(domain));
                out.push(DomainEntry::Valid {
                    domain,
                    warnings: report.warnings.into_boxed_slice(),
                });
            }
            Ok(DomainConfig { name, origin, .. }) | Err((name, origin)) => {
                out.push(DomainEntry::Invalid(Box::new(InvalidEntry {
                    name: Some((name, origin)),
                    errors: report.errors,
                    warnings: report.warnings,
                })))
            }
        }
    }
    out
}

/// One `[[domain]]` entry after [`validate_entries`] (kept small: a
/// reloading server keeps one per domain).
#[derive(Debug)]
enum DomainEntry {
    Valid {
        domain: Arc<DomainConfig>,
        warnings: Box<[Diagnostic]>,
    },
    Invalid(Box<InvalidEntry>),
}

/// Errors (and the name, when it could be read, for the duplicate check).
#[derive(Debug)]
struct InvalidEntry {
    name: Option<(DomainName, Origin)>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl DomainEntry {
    fn name(&self) -> Option<(&DomainName, &Origin)> {
        match self {
            DomainEntry::Valid { domain, .. } => Some((&domain.name, &domain.origin)),
            DomainEntry::Invalid(e) => e.name.as_ref().map(|(n, o)| (n, o)),
        }
    }
}

/// Sorts a long list on two threads (each half, then one merge pass); a
/// short one in place. The full merge of a million domains spent a tenth
/// of the load sorting their names.
fn sort_on_two_threads<T: Ord + Copy + Send>(v: &mut Vec<T>) {
    const PARALLEL_FROM: usize = 100_000;
    if v.len() < PARALLEL_FROM {
        v.sort_unstable();
        return;
    }
    let mid = v.len() / 2;
    let (left, right) = v.split_at_mut(mid);
    std::thread::scope(|scope| {
        scope.spawn(|| left.sort_unstable());
        right.sort_unstable();
    });
    let (left, right) = v.split_at(mid);
    let mut out = Vec::with_capacity(v.len());
    let (mut l, mut r) = (left.iter().peekable(), right.iter().peekable());
    while let (Some(a), Some(b)) = (l.peek(), r.peek()) {
        if a <= b {
            out.push(**a);
            l.next();
        } else {
            out.push(**b);
            r.next();
        }
    }
    out.extend(l.copied());
    out.extend(r.copied());
    *v = out;
}

/// The errors and warnings of every entry, in file order, when no name is
/// defined twice (what [`merge`] reports then).
fn collect_diagnostics<'a>(files: impl Iterator<Item = &'a [DomainEntry]>, report: &mut Report) {
    for entry in files.flat_map(|f| f.iter()) {
        match entry {
            DomainEntry::Valid { warnings, .. } => report.warnings.extend(warnings.iter().cloned()),
            DomainEntry::Invalid(e) => {
                report.errors.extend(e.errors.iter().cloned());
                report.warnings.extend(e.warnings.iter().cloned());
            }
        }
    }
}

/// The cross-file part of validation: names are unique over the main file
/// and every `domains_dir` file (first definition wins, in file order), and
/// the errors and warnings of every entry, in file order.
fn merge<'a>(
    files: impl Iterator<Item = &'a [DomainEntry]>,
    count: usize,
    report: &mut Report,
) -> Domains {
    let entries: Vec<&DomainEntry> = files.flat_map(|f| f.iter()).collect();
    // Names with their position in file order, sorted by name then
    // position: the first of a run of equal names is the definition that
    // wins, the others are duplicates. One sort of a million pairs instead
    // of a million hash-map inserts and a second sort of the result.
    let mut named: Vec<(&DomainName, usize)> = Vec::with_capacity(count);
    named.extend(
        entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.name().map(|(name, _)| (name, i))),
    );
    sort_on_two_threads(&mut named);
    // Position of a duplicate → position of the definition that wins.
    let mut duplicate_of: HashMap<usize, usize> = HashMap::new();
    for pair in named.windows(2) {
        if let [(a, first), (b, dup)] = pair
            && a == b
        {
            let winner = duplicate_of.get(first).copied().unwrap_or(*first);
            duplicate_of.insert(*dup, winner);
        }
    }
    for (i, entry) in entries.iter().enumerate() {
        if let Some(&winner) = duplicate_of.get(&i) {
            if let (Some((name, origin)), Some((_, first))) =
                (entry.name(), entries.get(winner).and_then(|w| w.name()))
            {
                report.errors.push(origin.diagnostic(format!(
                    "duplicate domain {name} (first defined at {}:{}:{})",
                    first.file.display(),
                    first.line,
                    first.col
                )));
            }
            continue;
        }
        match entry {
            DomainEntry::Valid { warnings, .. } => report.warnings.extend(warnings.iter().cloned()),
            DomainEntry::Invalid(e) => {
                report.errors.extend(e.errors.iter().cloned());
                report.warnings.extend(e.warnings.iter().cloned());
            }
        }
    }
    // Already in name order: the winners that are valid.
    named
        .iter()
        .filter(|(_, i)| !duplicate_of.contains_key(i))
        .filter_map(|&(_, i)| match entries.get(i) {
            Some(DomainEntry::Valid { domain, .. }) => Some(Arc::clone(domain)),
            _ => None,
        })
        .collect()
}

fn read_limited(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read config: {e}"))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "config file is larger than {MAX_CONFIG_BYTES} bytes"
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read config: {e}"))
}

/// A `domains_dir` file's text as a [`Source`].
fn domain_source(path: &Path, text: String) -> Source {
    Source {
        path: path.into(),
        base: path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from(".")),
        line_starts: line_starts(&text),
        text,
    }
}

/// A duration given as seconds (integer) or humane text ("7d", "1w", "90s").
/// Longest duration any setting accepts: ten years. Longer values mean
/// "never" anyway, and adding them to an `Instant` or `SystemTime` could
/// overflow and panic on every connection or ACME turn.
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000);

fn duration(v: &toml::Value) -> Result<Duration, String> {
    let d = match v {
        toml::Value::Integer(i) => u64::try_from(*i)
            .map(Duration::from_secs)
            .map_err(|_| format!("{i} is negative"))?,
        toml::Value::String(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            format!("{s:?} is not a duration ({e}); use seconds or e.g. \"7d\", \"1w\"")
        })?,
        other => {
            return Err(format!(
                "expected seconds or a duration string, found a {}",
                other.type_str()
            ));
        }
    };
    if d > MAX_DURATION {
        return Err(format!(
            "{} s is longer than ten years ({} s), the longest duration accepted",
            d.as_secs(),
            MAX_DURATION.as_secs()
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests;
