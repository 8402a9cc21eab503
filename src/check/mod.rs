//! `mtasts check`: verifies a domain live, the way a strict sending MTA would
//! (RFC 8461 §3 discovery, §3.3 fetch, §4 MX validation), and compares what
//! it finds with the config this server serves.
//!
//! Every finding has a level; a domain's verdict is the worst of them. Each
//! step below is one function; [`parse`] reads what the network gave as
//! senders do, [`probe`] talks HTTPS and SMTP, and DNS goes through the stub
//! resolver of [`crate::resolve`] over TCP. Certificates are verified
//! against the platform's trusted roots or `--ca-file`. One domain's check
//! is bounded by `--deadline` as a whole.

pub mod parse;
pub mod probe;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::rr::{RData, RecordType};
use rustls::pki_types::pem::PemObject;
use serde::Serialize;

use crate::config::MxSource;
use crate::http::POLICY_PATH;
use crate::policy::{DomainName, MAX_AGE_RECOMMENDED_MIN, Mode, PolicyId};
use crate::resolve::{Protocol, Resolver};
use crate::snapshot::{Site, Snapshot};

pub use parse::{FetchedPolicy, MxHosts};
pub use probe::MAX_POLICY_BYTES;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One observation about a domain.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    /// What was checked: `txt`, `policy`, `config`, `mx`, `mx-shrink`,
    /// `starttls`, `tlsrpt`, `preflight`, `deadline`.
    pub check: &'static str,
    pub message: String,
}

/// Everything `check` found for one domain.
#[derive(Debug, Serialize)]
pub struct DomainReport {
    pub domain: String,
    pub verdict: Level,
    /// The id of the single `v=STSv1` TXT record, if there is one.
    #[serde(serialize_with = "id_as_str")]
    pub id: Option<PolicyId>,
    pub policy: Option<FetchedPolicy>,
    /// The hosts senders deliver to, lowest preference first: the MX hosts,
    /// or the domain itself when it has no MX (RFC 5321 §5.1); empty for a
    /// null MX (RFC 7505).
    pub mx: Vec<String>,
    /// Set with `--preflight-enforce`: whether switching to enforce is safe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safe_to_enforce: Option<bool>,
    pub findings: Vec<Finding>,
}

fn id_as_str<S: serde::Serializer>(id: &Option<PolicyId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_some(id.as_str()),
        None => s.serialize_none(),
    }
}

impl DomainReport {
    fn new(domain: &DomainName) -> Self {
        Self {
            domain: domain.to_string(),
            verdict: Level::Ok,
            id: None,
            policy: None,
            mx: Vec::new(),
            safe_to_enforce: None,
            findings: Vec::new(),
        }
    }

    fn add(&mut self, level: Level, check: &'static str, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            check,
            message: message.into(),
        });
        self.verdict = self.verdict.max(level);
    }
}

/// How to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// The DNS resolver (recursive, or the authoritative server in tests).
    pub resolver: SocketAddr,
    /// Port of the policy host (443 for real senders).
    pub https_port: u16,
    /// Port of the MX hosts (25 for real senders).
    pub smtp_port: u16,
    /// Trusted roots instead of the platform's (e.g. the local CA of
    /// `tls.mode = "self-signed"`).
    pub ca_file: Option<PathBuf>,
    /// Connect to every MX and check STARTTLS and its certificate.
    pub starttls: bool,
    /// Judge whether switching to enforce is safe (implies `starttls`).
    pub preflight_enforce: bool,
    /// Budget of one network exchange.
    pub timeout: Duration,
    /// Budget of one domain's whole check: many addresses or MX hosts times
    /// `timeout` must not make a check run for hours.
    pub deadline: Duration,
}

/// Why `check` could not run at all (not a finding about a domain).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read trusted roots from {path}: {detail}")]
    Roots { path: PathBuf, detail: String },
    #[error(
        "no usable trusted roots in the platform's store ({detail}); use --ca-file or SSL_CERT_FILE"
    )]
    PlatformRoots { detail: String },
    #[error("no nameserver in /etc/resolv.conf; use --resolver IP:PORT")]
    NoResolver,
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The first `nameserver` of /etc/resolv.conf, port 53.
pub fn system_resolver() -> Result<SocketAddr, CheckError> {
    use std::io::Read as _;
    // resolv.conf is a few lines; a bounded read keeps an odd file harmless.
    let mut text = String::new();
    if let Ok(file) = std::fs::File::open("/etc/resolv.conf") {
        let _ = file.take(64 * 1024).read_to_string(&mut text);
    }
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
        .ok_or(CheckError::NoResolver)
}

/// The trusted roots: `--ca-file` alone when given, else the platform's
/// store (rustls-native-certs: the OpenSSL locations on Unix, honouring
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`; the system store on macOS and Windows).
fn roots(options: &Options) -> Result<rustls::RootCertStore, CheckError> {
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        Some(path) => {
            let roots_err = |detail: String| CheckError::Roots {
                path: path.clone(),
                detail,
            };
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| roots_err(e.to_string()))?;
            for cert in certs {
                let cert = cert.map_err(|e| roots_err(e.to_string()))?;
                // A bundle may hold certificates rustls cannot use; skip those.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(roots_err("no usable certificate".to_owned()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let detail = found
                    .errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(CheckError::PlatformRoots {
                    detail: if detail.is_empty() {
                        "none found".to_owned()
                    } else {
                        detail
                    },
                });
            }
        }
    }
    Ok(roots)
}

fn tls_config(options: &Options) -> Result<Arc<rustls::ClientConfig>, CheckError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CheckError::Tls(e.to_string()))?
        .with_root_certificates(roots(options)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The MX hosts of `domain` (lowercase, no trailing dot, lowest preference
/// first) asked of `resolver`, for callers outside `check` (the mx shrink
/// hold in the mxhold module). NXDOMAIN, NODATA and a null MX give an empty
/// list.
pub async fn mx_hosts(
    resolver: SocketAddr,
    domain: &str,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let records = Resolver::new(resolver, Protocol::Tcp, timeout)
        .lookup(domain, RecordType::MX)
        .await
        .map_err(|e| e.to_string())?;
    Ok(match parse::mx_hosts(&records) {
        MxHosts::Hosts(hosts) | MxHosts::NullAmong(hosts) => hosts,
        MxHosts::Null | MxHosts::Implicit => Vec::new(),
    })
}

pub use crate::tlsrpt::{REPORT_DAYS, RecentReports};

/// Checks every domain; `snapshot` is the config to compare with, if any,
/// and `reports` the recent TLS reports, if any are stored.
pub async fn check(
    domains: &[DomainName],
    options: &Options,
    snapshot: Option<&Snapshot>,
    reports: Option<&RecentReports>,
) -> Result<Vec<DomainReport>, CheckError> {
    let checker = Checker {
        options,
        tls: tls_config(options)?,
        resolver: Resolver::new(options.resolver, Protocol::Tcp, options.timeout),
    };
    let mut out = Vec::new();
    for domain in domains {
        let site = snapshot.and_then(|s| s.lookup(&domain.policy_host()));
        let mut report = DomainReport::new(domain);
        let site = site.map(|s| s.as_ref());
        let recent = reports.map(|r| r.get(domain.as_str()));
        let steps = checker.run(domain, snapshot.is_some(), site, recent, &mut report);
        if tokio::time::timeout(options.deadline, steps).await.is_err() {
            report.add(
                Level::Fail,
                "deadline",
                format!(
                    "the check did not finish within {:?} (--deadline); the findings above are what it got to",
                    options.deadline
                ),
            );
            if options.preflight_enforce {
                preflight(&mut report);
            }
        }
        out.push(report);
    }
    Ok(out)
}

/// What every step needs.
struct Checker<'a> {
    options: &'a Options,
    tls: Arc<rustls::ClientConfig>,
    resolver: Resolver,
}

impl Checker<'_> {
    /// Every step, in the order a sender meets them.
    async fn run(
        &self,
        domain: &DomainName,
        have_config: bool,
        site: Option<&Site>,
        recent: Option<Option<&crate::tlsrpt::store::DomainSummary>>,
        report: &mut DomainReport,
    ) {
        self.sts_txt(domain, report).await;
        let body = self.policy(domain, report).await;
        compare_config(have_config, site, body.as_ref(), report);
        self.mx(domain, report).await;
        coverage(self.options, report);
        if let Some(site) = site {
            shrink_held(site, report);
        }
        if self.options.starttls || self.options.preflight_enforce {
            self.starttls(report).await;
        }
        self.tlsrpt(domain, report).await;
        if let Some(recent) = recent {
            tls_reports(recent, self.options.preflight_enforce, report);
        }
        if self.options.preflight_enforce {
            preflight(report);
        }
    }

    /// The `_mta-sts` TXT record (RFC 8461 §3.1): exactly one `v=STSv1`.
    async fn sts_txt(&self, domain: &DomainName, report: &mut DomainReport) {
        let name = format!("_mta-sts.{domain}");
        let texts = match self.resolver.lookup(&name, RecordType::TXT).await {
            Ok(records) => txt_strings(&records),
            Err(e) => return report.add(Level::Fail, "txt", format!("DNS lookup failed: {e}")),
        };
        let sts: Vec<&String> = texts.iter().filter(|t| parse::is_sts_record(t)).collect();
        match sts.as_slice() {
            [] => report.add(
                Level::Fail,
                "txt",
                format!("no v=STSv1 TXT record at {name}: senders do not look for a policy"),
            ),
            [one] => match parse::parse_sts_txt(one) {
                Ok(id) => {
                    report.add(Level::Ok, "txt", format!("{name}: {one:?}"));
                    report.id = Some(id);
                }
                Err(e) => report.add(
                    Level::Fail,
                    "txt",
                    format!("{name} {one:?}: {e}; senders ignore the policy"),
                ),
            },
            many => report.add(
                Level::Fail,
                "txt",
                format!(
                    "{} v=STSv1 TXT records at {name}: RFC 8461 §3.1 requires exactly one, senders treat this as no policy",
                    many.len()
                ),
            ),
        }
    }

    /// Fetches and parses the policy (RFC 8461 §3.2, §3.3); returns the
    /// body as served, if there was one.
    async fn policy(&self, domain: &DomainName, report: &mut DomainReport) -> Option<Bytes> {
        let body = self.fetch(&domain.policy_host(), report).await?;
        match parse::parse_policy(&body) {
            Ok(parsed) => {
                for w in parsed.warnings {
                    report.add(Level::Warn, "policy", w);
                }
                let p = &parsed.policy;
                report.add(
                    Level::Ok,
                    "policy",
                    format!("mode {}, {} mx, max_age {}", p.mode, p.mx.len(), p.max_age),
                );
                if p.mode == Mode::Enforce && p.max_age < MAX_AGE_RECOMMENDED_MIN {
                    let msg = format!("max_age {} is below one day in enforce mode", p.max_age);
                    report.add(Level::Warn, "policy", msg);
                }
                if p.mode == Mode::None {
                    report.add(
                        Level::Warn,
                        "policy",
                        "mode none: senders apply no policy to this domain (RFC 8461 §5); fine while retiring MTA-STS",
                    );
                }
                report.policy = Some(parsed.policy);
            }
            Err(e) => report.add(Level::Fail, "policy", format!("senders reject it: {e}")),
        }
        Some(body)
    }

    /// The HTTPS part of the policy fetch; `None` (with a finding) if no
    /// address gives a usable answer.
    async fn fetch(&self, host: &str, report: &mut DomainReport) -> Option<Bytes> {
        let url = format!("https://{host}{POLICY_PATH}");
        let addrs = match self.resolver.addresses(host).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                let msg = format!("{host} has no A/AAAA record");
                report.add(Level::Fail, "policy", msg);
                return None;
            }
            Err(e) => {
                report.add(Level::Fail, "policy", format!("{host}: {e}"));
                return None;
            }
        };
        let mut errors = Vec::new();
        for ip in addrs {
            let addr = SocketAddr::new(ip, self.options.https_port);
            match probe::fetch_policy(host, addr, Arc::clone(&self.tls), self.options.timeout).await
            {
                Ok(fetched) => return judge_fetch(&url, fetched, report),
                Err(e) => errors.push(e),
            }
        }
        let msg = format!("cannot fetch {url}: {}", errors.join("; "));
        report.add(Level::Fail, "policy", msg);
        None
    }

    /// The hosts senders deliver to: MX hosts, the implicit MX, or none for
    /// a null MX.
    async fn mx(&self, domain: &DomainName, report: &mut DomainReport) {
        let records = match self.resolver.lookup(domain.as_str(), RecordType::MX).await {
            Ok(records) => records,
            Err(e) => return report.add(Level::Fail, "mx", format!("MX lookup failed: {e}")),
        };
        match parse::mx_hosts(&records) {
            MxHosts::Hosts(hosts) => report.mx = hosts,
            MxHosts::Null => report.add(
                Level::Warn,
                "mx",
                format!(
                    "{domain} has a null MX (RFC 7505): it accepts no mail, so a policy protects nothing"
                ),
            ),
            MxHosts::NullAmong(hosts) => {
                report.add(
                    Level::Fail,
                    "mx",
                    "a null MX beside other MX records (RFC 7505 §3 forbids it); senders may bounce mail",
                );
                report.mx = hosts;
            }
            MxHosts::Implicit => match self.resolver.addresses(domain.as_str()).await {
                Ok(addrs) if !addrs.is_empty() => {
                    report.add(
                        Level::Ok,
                        "mx",
                        format!(
                            "no MX records: senders deliver to {domain} itself (implicit MX, RFC 5321 §5.1)"
                        ),
                    );
                    report.mx = vec![domain.to_string()];
                }
                Ok(_) => report.add(
                    Level::Fail,
                    "mx",
                    format!("{domain} has neither MX nor address records: it receives no mail"),
                ),
                Err(e) => report.add(Level::Fail, "mx", format!("{domain}: {e}")),
            },
        }
    }

    /// STARTTLS with a valid certificate on every address of every MX
    /// (RFC 8461 §4.2). A sender may reach any address, so each failing
    /// one is reported, also when another address of the MX works.
    async fn starttls(&self, report: &mut DomainReport) {
        let level = if enforce_like(self.options, report) {
            Level::Fail
        } else {
            Level::Warn
        };
        for host in report.mx.clone() {
            let addrs = match self.resolver.addresses(&host).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    report.add(level, "starttls", format!("{host} has no address"));
                    continue;
                }
                Err(e) => {
                    report.add(level, "starttls", format!("{host}: {e}"));
                    continue;
                }
            };
            let mut good = Vec::new();
            for ip in &addrs {
                let addr = SocketAddr::new(*ip, self.options.smtp_port);
                let tls = Arc::clone(&self.tls);
                match probe::starttls(&host, addr, tls, self.options.timeout).await {
                    Ok(()) => good.push(ip.to_string()),
                    Err(e) => report.add(level, "starttls", format!("{host}: {e} (at {ip})")),
                }
            }
            if !good.is_empty() {
                report.add(
                    Level::Ok,
                    "starttls",
                    format!(
                        "{host}: STARTTLS with a valid certificate for the name at {} of {} addresses ({})",
                        good.len(),
                        addrs.len(),
                        good.join(", ")
                    ),
                );
            }
        }
    }

    /// The TLS-RPT record (RFC 8460 §3): without one, nobody hears about
    /// the deliveries a policy fails.
    async fn tlsrpt(&self, domain: &DomainName, report: &mut DomainReport) {
        let name = format!("_smtp._tls.{domain}");
        let texts = match self.resolver.lookup(&name, RecordType::TXT).await {
            Ok(records) => txt_strings(&records),
            Err(e) => return report.add(Level::Fail, "tlsrpt", format!("DNS lookup failed: {e}")),
        };
        let records: Vec<&String> = texts
            .iter()
            .filter(|t| parse::is_tlsrpt_record(t))
            .collect();
        match records.as_slice() {
            [] => report.add(
                Level::Warn,
                "tlsrpt",
                format!(
                    "no v=TLSRPTv1 TXT record at {name}: senders report no TLS failures (RFC 8460)"
                ),
            ),
            [one] => match parse::parse_tlsrpt(one) {
                Ok(_) => report.add(Level::Ok, "tlsrpt", format!("{name}: {one:?}")),
                Err(e) => report.add(
                    Level::Fail,
                    "tlsrpt",
                    format!("{name} {one:?}: {e}; senders send no reports"),
                ),
            },
            many => report.add(
                Level::Fail,
                "tlsrpt",
                format!(
                    "{} v=TLSRPTv1 TXT records at {name}: senders use none of them (RFC 8460 §3)",
                    many.len()
                ),
            ),
        }
    }
}

/// Whether a failure would stop delivery: the live policy enforces, or the
/// user asks whether it may.
fn enforce_like(options: &Options, report: &DomainReport) -> bool {
    options.preflight_enforce
        || report
            .policy
            .as_ref()
            .is_some_and(|p| p.mode == Mode::Enforce)
}

/// The TXT strings of an answer, each record's strings joined (RFC 7208
/// §3.3 style, as senders read them).
fn txt_strings(records: &[RData]) -> Vec<String> {
    records.iter().filter_map(crate::dns::txt_text).collect()
}

/// What a sender makes of the HTTP answer (RFC 8461 §3.3): 200, no
/// redirect, `text/plain`, a body within [`MAX_POLICY_BYTES`].
fn judge_fetch(url: &str, fetched: probe::Fetched, report: &mut DomainReport) -> Option<Bytes> {
    if (300..400).contains(&fetched.status) {
        report.add(
            Level::Fail,
            "policy",
            format!(
                "{url} redirects ({} to {}): senders must not follow redirects (RFC 8461 §3.3)",
                fetched.status,
                fetched.location.as_deref().unwrap_or("?")
            ),
        );
        return None;
    }
    if fetched.status != 200 {
        let msg = format!("{url} answered HTTP {}, not 200", fetched.status);
        report.add(Level::Fail, "policy", msg);
        return None;
    }
    let media = fetched
        .content_type
        .as_deref()
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    if media.as_deref() != Some("text/plain") {
        report.add(
            Level::Fail,
            "policy",
            format!(
                "{url} has Content-Type {:?}; senders require text/plain (RFC 8461 §3.2)",
                fetched.content_type.as_deref().unwrap_or("(none)")
            ),
        );
        return None;
    }
    match fetched.body {
        Ok(body) => Some(body),
        Err(e) => {
            report.add(
                Level::Fail,
                "policy",
                format!("{url}: body unreadable or over {MAX_POLICY_BYTES} bytes ({e})"),
            );
            None
        }
    }
}

/// Compares the live id and body with what this server is configured to
/// serve.
fn compare_config(
    have_config: bool,
    site: Option<&Site>,
    body: Option<&Bytes>,
    report: &mut DomainReport,
) {
    let Some(site) = site else {
        if have_config {
            report.add(Level::Warn, "config", "domain is not in the config");
        }
        return;
    };
    match body {
        Some(b) if *b == site.body => {
            report.add(Level::Ok, "config", "served body matches the config")
        }
        Some(_) => report.add(
            Level::Fail,
            "config",
            "the served body differs from the config (is the server running an older config? reload it)",
        ),
        None => {}
    }
    match &report.id {
        Some(id) if *id == site.id => {
            report.add(Level::Ok, "config", "DNS id matches the configured policy")
        }
        Some(id) => {
            let msg = format!(
                "DNS id {id} is not the id of the configured policy ({}): senders that cached the old policy keep it; publish the new id (mtasts records / dns push)",
                site.id
            );
            report.add(Level::Fail, "config", msg);
        }
        None => {}
    }
}

/// Every delivery host against the policy's mx patterns (RFC 8461 §4.1).
/// Skipped for a live `mode: none` unless the user asks whether enforce
/// would be safe: then the patterns it lists are what enforce would use.
fn coverage(options: &Options, report: &mut DomainReport) {
    let Some(policy) = report.policy.clone() else {
        return;
    };
    if policy.mode == Mode::None && !options.preflight_enforce {
        return;
    }
    let level = if enforce_like(options, report) {
        Level::Fail
    } else {
        Level::Warn
    };
    for host in report.mx.clone() {
        if policy.mx.iter().any(|p| p.matches(&host)) {
            report.add(Level::Ok, "mx", format!("{host} is covered by the policy"));
        } else {
            report.add(
                level,
                "mx",
                format!(
                    "{host} is not covered by any mx pattern: in enforce mode senders do not deliver to it"
                ),
            );
        }
    }
}

/// A certificate-driven mx shrink the server holds (the mxhold module): the
/// config's names no longer cover a live MX that the served policy does.
fn shrink_held(site: &Site, report: &mut DomainReport) {
    let Some(policy) = report.policy.clone() else {
        return;
    };
    if site.domain.policy.mode != Mode::Enforce
        || !matches!(site.domain.mx_source, MxSource::Certs(_))
    {
        return;
    }
    for host in report.mx.clone() {
        if policy.mx.iter().any(|p| p.matches(&host))
            && !site.domain.policy.mx.iter().any(|p| p.matches(&host))
        {
            report.add(
                Level::Warn,
                "mx-shrink",
                format!(
                    "mx shrink held: the mail server certificates no longer name {host}, which is still an MX; \
                     `mtasts serve` keeps serving it until the MX record is gone (SIGUSR1 forces the shrink; docs/OPERATIONS.md)"
                ),
            );
        }
    }
}

/// What senders reported over the last [`REPORT_DAYS`] days: the failure
/// rate, the failures by MX and result type. With `--preflight-enforce`,
/// failed sessions make enforce unsafe: those deliveries would fail.
fn tls_reports(
    recent: Option<&crate::tlsrpt::store::DomainSummary>,
    preflight: bool,
    report: &mut DomainReport,
) {
    let Some(s) = recent else {
        report.add(
            Level::Warn,
            "reports",
            format!("no TLS reports in the last {REPORT_DAYS} days: nothing says how senders fare"),
        );
        return;
    };
    let rate = s.failure_rate() * 100.0;
    let mut line = format!(
        "last {REPORT_DAYS} days: {} report{}, {} successful and {} failed sessions ({rate:.2}% failed)",
        s.reports,
        if s.reports == 1 { "" } else { "s" },
        s.successful,
        s.failed
    );
    if !s.by_result_type.is_empty() {
        let types: Vec<String> = s
            .by_result_type
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        line.push_str(&format!("; by result: {}", types.join(", ")));
    }
    if !s.by_mx.is_empty() {
        let mx: Vec<String> = s.by_mx.iter().map(|(k, v)| format!("{k} {v}")).collect();
        line.push_str(&format!("; by MX: {}", mx.join(", ")));
    }
    let level = if s.failed == 0 {
        Level::Ok
    } else if preflight {
        Level::Fail
    } else {
        Level::Warn
    };
    report.add(level, "reports", line);
    if preflight && s.failed > 0 {
        report.add(
            Level::Fail,
            "reports",
            "senders reported failed TLS sessions: under enforce those messages would not be delivered; fix the MX hosts named above first",
        );
    }
}

/// The `--preflight-enforce` verdict.
fn preflight(report: &mut DomainReport) {
    if report.policy.as_ref().is_some_and(|p| p.mx.is_empty()) {
        report.add(
            Level::Fail,
            "preflight",
            "the served policy lists no mx patterns; enforce needs every MX listed",
        );
    }
    let safe = report.verdict != Level::Fail && report.policy.is_some() && !report.mx.is_empty();
    report.safe_to_enforce = Some(safe);
    if safe {
        report.add(
            Level::Ok,
            "preflight",
            "switching to mode = \"enforce\" is safe: every MX is covered and presents a valid certificate",
        );
    } else {
        report.add(
            Level::Fail,
            "preflight",
            "do not switch to enforce yet: fix the failures above first",
        );
    }
}

/// Human-readable report.
pub fn to_text(reports: &[DomainReport]) -> String {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!("{}: {}\n", r.domain, r.verdict.as_str()));
        for f in &r.findings {
            out.push_str(&format!(
                "  {:<4} {:<9} {}\n",
                f.level.as_str(),
                f.check,
                f.message
            ));
        }
    }
    out
}
