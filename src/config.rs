//! Configuration: TOML files (the main file plus `domains_dir/*.toml`) parsed
//! into raw serde structs that keep source spans, then validated into a
//! [`Config`] in which every policy is complete and correct.
//!
//! Validation collects *every* problem of every file as a [`Diagnostic`] with
//! `file:line:col`, so an operator fixes a broken config in one pass.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod dns;
mod domain;
mod loader;
mod on_demand;
mod scan;
mod server;
mod store;
mod tlsrpt;
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

/// One located problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Diagnostic {
    /// Shared by every diagnostic (and domain origin) of one file.
    pub file: Arc<Path>,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Where something is defined: a file, line and column (a diagnostic
/// without a message, kept in every domain's config, so a third of the
/// size of a [`Diagnostic`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub file: Arc<Path>,
    pub line: u32,
    pub col: u32,
}

impl Origin {
    /// A diagnostic at this place.
    pub fn diagnostic(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: Arc::clone(&self.file),
            line: self.line as usize,
            col: self.col as usize,
            message: message.into(),
        }
    }
}

impl From<&Diagnostic> for Origin {
    fn from(d: &Diagnostic) -> Origin {
        Origin {
            file: Arc::clone(&d.file),
            line: u32::try_from(d.line).unwrap_or(u32::MAX),
            col: u32::try_from(d.col).unwrap_or(u32::MAX),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every error found in a config, plus the warnings seen on the way.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{n} config error{}", if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            write!(f, "\n{e}")?;
        }
        Ok(())
    }
}

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
    /// `crate::retire` for when its records may go.
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

/// The text of one config file and how to report positions in it.
struct Source {
    path: Arc<Path>,
    /// Relative paths inside the file are resolved against this directory.
    base: PathBuf,
    text: String,
    line_starts: Vec<usize>,
}

impl Source {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = line_col(&self.text, &self.line_starts, span.start);
        Diagnostic {
            file: self.path.clone(),
            line,
            col,
            message: message.into(),
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base.join(path)
        }
    }
}

/// Byte offsets at which lines start, so positions are found by binary
/// search: a 100,000-domain file needs 100,000 positions, and scanning from
/// the start for each would be quadratic.
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, starts: &[usize], offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let line = starts.partition_point(|&s| s <= offset).max(1);
    let start = starts.get(line - 1).copied().unwrap_or(0);
    let col = text.get(start..offset).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// Collects diagnostics while validating.
#[derive(Default)]
struct Report {
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

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
    previous: &[Entry],
) -> Vec<Entry> {
    let by_name: HashMap<&DomainName, &Arc<DomainConfig>> = if previous.len() > 8 {
        previous
            .iter()
            .filter_map(|e| match e {
                Entry::Valid { domain, .. } => Some((&domain.name, domain)),
                Entry::Invalid(_) => None,
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
                Entry::Valid { domain, .. } if domain.name == d.name => Some(domain),
                _ => None,
            })
        };
        old.filter(|o| ***o == *d).cloned()
    };
    let mut out = Vec::with_capacity(raw.len());
    for entry in raw {
        let mut report = Report::default();
        let Some((name, origin)) = domain_name(source, entry, &mut report) else {
            out.push(Entry::Invalid(Box::new(InvalidEntry {
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
                out.push(Entry::Valid {
                    domain,
                    warnings: report.warnings.into_boxed_slice(),
                });
            }
            Ok(DomainConfig { name, origin, .. }) | Err((name, origin)) => {
                out.push(Entry::Invalid(Box::new(InvalidEntry {
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
enum Entry {
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

impl Entry {
    fn name(&self) -> Option<(&DomainName, &Origin)> {
        match self {
            Entry::Valid { domain, .. } => Some((&domain.name, &domain.origin)),
            Entry::Invalid(e) => e.name.as_ref().map(|(n, o)| (n, o)),
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
fn collect_diagnostics<'a>(files: impl Iterator<Item = &'a [Entry]>, report: &mut Report) {
    for entry in files.flat_map(|f| f.iter()) {
        match entry {
            Entry::Valid { warnings, .. } => report.warnings.extend(warnings.iter().cloned()),
            Entry::Invalid(e) => {
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
    files: impl Iterator<Item = &'a [Entry]>,
    count: usize,
    report: &mut Report,
) -> Domains {
    let entries: Vec<&Entry> = files.flat_map(|f| f.iter()).collect();
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
            Entry::Valid { warnings, .. } => report.warnings.extend(warnings.iter().cloned()),
            Entry::Invalid(e) => {
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
            Some(Entry::Valid { domain, .. }) => Some(Arc::clone(domain)),
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

/// Turns a TOML/serde error into a located diagnostic, with a "did you mean"
/// for misspelt keys.
fn toml_error(source: &Source, e: &toml::de::Error) -> Diagnostic {
    let span = e.span().unwrap_or(0..0);
    let mut message = e.message().trim().to_owned();
    if let Some(hint) = did_you_mean(&message) {
        message.push_str(&format!("; did you mean `{hint}`?"));
    }
    source.at(span, message)
}

/// serde's unknown-field message is "unknown field `x`, expected one of `a`, `b`".
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (strsim::damerau_levenshtein(unknown, cand), cand))
        .filter(|(dist, cand)| *dist <= 2.max(cand.len() / 4) && *dist < cand.len())
        .min_by_key(|(dist, _)| *dist)
        .map(|(_, cand)| cand.to_owned())
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
mod tests {
    use super::*;
    use crate::policy::{MAX_AGE_LIMIT, Mode, MxPattern};

    #[test]
    fn two_thread_sort_equals_a_sort() {
        let mut v: Vec<(u32, usize)> = (0..250_000usize)
            .map(|i| (((i * 7919) % 100_003) as u32, i))
            .collect();
        let mut want = v.clone();
        want.sort_unstable();
        sort_on_two_threads(&mut v);
        assert_eq!(v, want);
        let mut short = vec![(3, 0), (1, 1), (2, 2)];
        sort_on_two_threads(&mut short);
        assert_eq!(short, [(1, 1), (2, 2), (3, 0)]);
    }

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_source(Path::new("test.toml"), Path::new("."), text.to_owned())
    }

    fn errors(text: &str) -> Vec<String> {
        match load(text) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn eab_hmac_key_is_base64url() {
        let with = |key: &str| {
            format!(
                "[tls]\nmode = \"acme\"\neab_kid = \"kid-1\"\neab_hmac_key = \"{key}\"\n[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\n"
            )
        };
        // base64url without padding, and with the padding some CAs print.
        for (key, bytes) in [("_-8", vec![0xffu8, 0xef]), ("_-8=", vec![0xff, 0xef])] {
            let cfg = load(&with(key)).unwrap_or_else(|e| panic!("{key}: {e:?}"));
            assert_eq!(
                cfg.tls.acme.eab.as_ref().map(|e| e.hmac_key.clone()),
                Some(bytes)
            );
        }
        for key in ["not base64!", "/+8", "", "A"] {
            let errs = errors(&with(key));
            assert!(
                errs.iter()
                    .any(|e| e.contains("tls.eab_hmac_key must be the base64url key")),
                "{key}: {errs:?}"
            );
        }
    }

    #[test]
    fn example_config_is_valid() {
        let cfg = Config::example().expect("example config validates");
        assert!(!cfg.domains.is_empty());
        assert_eq!(cfg.server.https.port(), 8443);
        assert!(cfg.server.https.ip().is_loopback());
        assert!(cfg.server.http.ip().is_loopback());
    }

    #[test]
    fn defaults_and_overrides() {
        let cfg = load(
            r#"
[defaults]
mode = "enforce"
max_age = "1w"
mx = ["mx1.example.net", "*.mx.example.net", "mx1.example.net"]
ttl = 300

[[domain]]
name = "Example.COM"

[[domain]]
name = "b.example"
mode = "testing"
max_age = 86400
mx = ["mail.b.example"]
tlsrpt_rua = "mailto:tls@b.example"
host_cname = "mta-sts.provider.example"
"#,
        )
        .expect("valid");
        assert_eq!(cfg.domains.len(), 2);
        let b = &cfg.domains[0];
        assert_eq!(b.name.as_str(), "b.example");
        assert_eq!(b.policy.mode, Mode::Testing);
        assert_eq!(b.policy.max_age, 86_400);
        assert_eq!(b.tlsrpt_rua[..], ["mailto:tls@b.example"]);
        assert!(
            matches!(&b.host, HostRecord::Cname(t) if t.as_str() == "mta-sts.provider.example")
        );
        let a = &cfg.domains[1];
        assert_eq!(a.name.as_str(), "example.com");
        assert_eq!(a.policy.mode, Mode::Enforce);
        assert_eq!(a.policy.max_age, 604_800);
        assert_eq!(a.ttl, 300);
        let mx: Vec<&str> = a.policy.mx.iter().map(MxPattern::as_str).collect();
        assert_eq!(mx, ["*.mx.example.net", "mx1.example.net"]);
    }

    #[test]
    fn unknown_key_with_suggestion_and_position() {
        let errs = errors("[defaults]\nmdoe = \"enforce\"\n");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("test.toml:2:1: unknown field `mdoe`"),
            "{}",
            errs[0]
        );
        assert!(errs[0].contains("did you mean `mode`?"), "{}", errs[0]);
    }

    #[test]
    fn every_error_is_reported_with_position() {
        let errs = errors(
            r#"[defaults]
mx = ["mx.example.com"]

[[domain]]
name = "a.example"
mode = "enforcing"

[[domain]]
name = "b.example"
max_age = 40000000

[[domain]]
name = "c.example"
mx = ["10.0.0.1", "mx.*.example"]

[[domain]]
name = "not a domain"

[[domain]]
name = "a.example"
"#,
        );
        let expected = [
            "test.toml:6:8: mode \"enforcing\"",
            "test.toml:10:11: max_age 40000000 s",
            "test.toml:14:7: mx: \"10.0.0.1\" looks like an IP",
            "test.toml:14:19: mx: \"mx.*.example\": a wildcard",
            "test.toml:17:8: domain name:",
            "test.toml:20:8: duplicate domain a.example (first defined at test.toml:5:8)",
        ];
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
        for (e, want) in errs.iter().zip(expected) {
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn mx_required_unless_mode_none() {
        let errs = errors("[[domain]]\nname = \"a.example\"\nmode = \"enforce\"\n");
        assert!(errs[0].contains("needs at least one mx"), "{errs:?}");
        let cfg =
            load("[[domain]]\nname = \"a.example\"\nmode = \"none\"\n").expect("none needs no mx");
        assert!(cfg.domains[0].policy.mx.is_empty());
    }

    #[test]
    fn retire_serves_mode_none_keeping_mx() {
        let cfg = load(
            "[[domain]]\nname = \"a.example\"\nmx_certs = [\"/nonexistent/mx.pem\"]\nmax_age = \"2d\"\nmode = \"enforce\"\nretire = true\n",
        )
        .expect("a retiring domain's unreadable mx source is only a warning");
        let a = &cfg.domains[0];
        assert!(a.retire);
        assert_eq!(a.policy.mode, Mode::None);
        assert!(a.policy.mx.is_empty());
        assert_eq!(a.policy.max_age, 172_800, "max_age as configured");
        assert!(
            cfg.warnings
                .iter()
                .any(|w| w.message.contains("a.example is retiring")),
            "{:?}",
            cfg.warnings
        );
        let cfg = load(
            "[[domain]]\nname = \"a.example\"\nmx = [\"mx2.example\", \"mx1.example\"]\nmode = \"enforce\"\nretire = true\n",
        )
        .expect("retiring");
        let mx: Vec<&str> = cfg.domains[0]
            .policy
            .mx
            .iter()
            .map(|m| m.as_str())
            .collect();
        assert_eq!(mx, ["mx1.example", "mx2.example"], "mx lines kept");
        assert_eq!(cfg.domains[0].policy.mode, Mode::None);
        let errs = errors("[defaults]\nretire = true\nmode = \"none\"\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("test.toml:2:10: `retire` belongs in the [[domain]]"),
            "{errs:?}"
        );
    }

    #[test]
    fn short_max_age_is_a_warning() {
        let cfg =
            load("[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\nmax_age = \"1h\"\n")
                .expect("valid");
        assert_eq!(cfg.domains[0].policy.max_age, 3600);
        assert_eq!(cfg.warnings.len(), 1);
        assert!(
            cfg.warnings[0].to_string().starts_with("test.toml:4:11:"),
            "{}",
            cfg.warnings[0]
        );
    }

    #[test]
    fn max_age_bounds() {
        let ok = load("[[domain]]\nname = \"a.example\"\nmode = \"none\"\nmax_age = 31557600\n")
            .expect("upper bound ok");
        assert_eq!(ok.domains[0].policy.max_age, MAX_AGE_LIMIT);
        let errs = errors("[[domain]]\nname = \"a.example\"\nmode = \"none\"\nmax_age = -1\n");
        assert!(errs[0].contains("negative"), "{errs:?}");
    }

    #[test]
    fn idn_domain_to_a_label() {
        let cfg = load("[[domain]]\nname = \"bücher.example\"\nmode = \"none\"\n").expect("idn");
        assert_eq!(cfg.domains[0].name.as_str(), "xn--bcher-kva.example");
    }

    #[test]
    fn server_addresses_and_limits() {
        let cfg = load(
            "[server]\nhttps = \"127.0.0.1:9443\"\nhttp = \"127.0.0.1:9080\"\nidle_timeout = \"30s\"\nmax_connections = 5\n",
        )
        .expect("valid");
        assert_eq!(cfg.server.https.port(), 9443);
        assert_eq!(cfg.server.limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(cfg.server.limits.max_connections, 5);
        let errs = errors("[server]\nhttps = \"localhost\"\n");
        assert!(
            errs[0].starts_with("test.toml:2:9: server.https"),
            "{errs:?}"
        );
    }

    #[test]
    fn connection_budget_keys() {
        let cfg = load(
            "[server]\nmax_connections_per_ip = 7\nmax_connection_age = \"10m\"\n[admin]\nlisten = \"127.0.0.1:8081\"\ntoken_file = \"t\"\nmax_connections = 3\n",
        )
        .expect("valid");
        assert_eq!(cfg.server.limits.max_connections_per_ip, 7);
        assert_eq!(
            cfg.server.limits.max_connection_age,
            Duration::from_secs(600)
        );
        assert_eq!(cfg.admin.as_ref().map(|a| a.max_connections), Some(3));
        let errs = errors(
            "[server]\nmax_connections_per_ip = 0\n[admin]\nlisten = \"127.0.0.1:8081\"\ntoken_file = \"t\"\nmax_connections = -1\n",
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("test.toml:2:26: server.max_connections_per_ip"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("test.toml:6:19: admin.max_connections"),
            "{errs:?}"
        );
    }

    #[test]
    fn tls_mode_values() {
        let errs = errors("[tls]\nmode = \"letsencrypt\"\n");
        assert!(errs[0].contains("tls.mode"), "{errs:?}");
    }

    #[test]
    fn acme_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = dir.path().join("roots.pem");
        std::fs::write(
            &roots,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let cfg = Config::from_source(
            Path::new("t.toml"),
            dir.path(),
            r#"
[tls]
mode = "acme"
directory = "https://127.0.0.1:14000/dir"
contact = "admin@example.com"
eab_kid = "kid-1"
eab_hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
ca_roots = "roots.pem"
challenge = "http-01"
key_type = "rsa2048"
renew_before = "30d"
max_concurrent_orders = 2
orders_per_hour = 50
retry_initial = "1s"
retry_max = "1m"
precheck_dns = false
precheck_resolver = "192.0.2.53"
server_addresses = ["192.0.2.1", "2001:db8::1"]
"#
            .to_owned(),
        )
        .expect("valid");
        let acme = &cfg.tls.acme;
        assert_eq!(cfg.tls.mode, TlsMode::Acme);
        assert_eq!(acme.contact, ["mailto:admin@example.com"]);
        assert_eq!(acme.eab.as_ref().map(|e| e.hmac_key.len()), Some(48));
        assert_eq!(acme.ca_roots.as_deref(), Some(roots.as_path()));
        assert_eq!(acme.challenge, ChallengeKind::Http01);
        assert_eq!(acme.key_type, KeyType::Rsa2048);
        assert_eq!(acme.renew_before, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(acme.max_concurrent_orders, 2);
        assert_eq!(acme.orders_per_hour, 50);
        assert!(!acme.precheck_dns);
        assert_eq!(acme.precheck_resolver, Some(([192, 0, 2, 53], 53).into()));
        assert_eq!(acme.server_addresses.len(), 2);

        let defaults = Config::example().expect("example").tls.acme;
        assert_eq!(defaults.directory, LETS_ENCRYPT);
        assert_eq!(defaults.challenge, ChallengeKind::TlsAlpn01);
        assert!(defaults.precheck_dns);
    }

    #[test]
    fn acme_key_errors_are_located() {
        let errs = errors(
            "[tls]\nmode = \"acme\"\ndirectory = \"http://x/dir\"\nchalenge = \"http-01\"\n",
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("test.toml:4:1: unknown field `chalenge`"),
            "{errs:?}"
        );
        assert!(errs[0].contains("did you mean `challenge`?"), "{errs:?}");
        let errs = errors(
            "[tls]\ndirectory = \"http://x/dir\"\nkey_type = \"ed25519\"\neab_kid = \"k\"\nmax_concurrent_orders = 0\nretry_initial = \"2h\"\nretry_max = \"1h\"\n",
        );
        let expected = [
            "test.toml:2:13: tls.directory",
            "test.toml:4:11: tls.eab_kid and tls.eab_hmac_key",
            "test.toml:3:12: tls.key_type",
            "test.toml:5:25: tls.max_concurrent_orders",
            "test.toml:7:13: tls.retry_max must not be shorter",
        ];
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
        for (e, want) in errs.iter().zip(expected) {
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn rua_validation() {
        let errs = errors(
            "[[domain]]\nname = \"a.example\"\nmode = \"none\"\ntlsrpt_rua = [\"ftp://x\", \"mailto:a b@c\"]\n",
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn cname_and_addresses_conflict() {
        let errs = errors(
            "[[domain]]\nname = \"a.example\"\nmode = \"none\"\nhost_a = [\"192.0.2.1\"]\nhost_cname = \"x.example\"\n",
        );
        assert!(
            errs[0].contains("host_cname cannot be combined"),
            "{errs:?}"
        );
    }

    #[test]
    fn delegation_section() {
        let cfg = load(
            "[delegation]\nzone = \"STS.Provider.example.\"\npolicy_host = \"mta-sts.provider.example\"\nhost_a = [\"192.0.2.1\"]\n",
        )
        .expect("valid");
        let d = cfg.delegation.expect("delegation");
        assert_eq!(d.zone.as_str(), "sts.provider.example");
        assert_eq!(d.host_a.len(), 1);
        assert_eq!(d.ttl, 3600);
        let errs = errors("[delegation]\nzone = \"sts.provider.example\"\nhost_a = [\"x\"]\n");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("test.toml:1:1: missing `policy_host`"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("test.toml:3:11: delegation.host_a"),
            "{errs:?}"
        );
    }

    #[test]
    fn dns_update_section() {
        let cfg = load(
            "[dns.update]\nserver = \"127.0.0.1\"\nzone = \"example.test\"\nkey_name = \"mtasts-key\"\nsecret = \"qk1fGdIKEse3NGRAi3HOSyfkEgen5rqe+m6KbTKax+U=\"\n",
        )
        .expect("valid");
        let u = cfg.dns_update.expect("dns.update");
        assert_eq!(u.server, "127.0.0.1:53".parse().expect("addr"));
        assert_eq!(u.algorithm, TsigAlgorithm::HmacSha256);
        assert_eq!(u.secret.bytes().len(), 32);
        assert!(!format!("{u:?}").contains("qk1f"), "secret never in Debug");
        let errs = errors(
            "[dns.update]\nserver = \"ns1:53\"\nzone = \"example.test\"\nkey_name = \"k\"\nalgorithm = \"hmac-md5\"\nsecret = \"!!\"\n",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("test.toml:2:10: dns.update.server"),
            "{errs:?}"
        );
        assert!(errs[1].contains("hmac-md5"), "{errs:?}");
        assert!(
            errs[2].contains("dns.update.secret: not valid base64"),
            "{errs:?}"
        );
    }

    #[test]
    fn line_col_counts_chars() {
        let lc = |t: &str, o| line_col(t, &line_starts(t), o);
        assert_eq!(lc("ab\ncd", 4), (2, 2));
        assert_eq!(lc("ä\nx", 3), (2, 1));
        assert_eq!(lc("äb", 2), (1, 2));
        assert_eq!(lc("ab\n", 3), (2, 1));
        assert_eq!(lc("", 0), (1, 1));
    }
}
