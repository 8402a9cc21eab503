//! On-demand onboarding (`[on_demand]`): a provider's customer who points
//! the two CNAMEs at the provider is onboarded on first contact — a TLS
//! ClientHello for `mta-sts.<domain>`, a DNS query for `<domain>.<zone>`, or
//! `POST /v1/onboard/{name}` on the admin API — once DNS proves it asked:
//!
//! - `deny`: the name is not on the deny list;
//! - `policy_host`: `mta-sts.<domain>` is a CNAME to the delegation's
//!   `policy_host` (or resolves only to its configured addresses);
//! - `sts_record`: `_mta-sts.<domain>` is a CNAME to `<domain>.<zone>`;
//! - `mx`: the domain has MX hosts and every one matches `allowed_mx`;
//! - `hourly_limit`: fewer than `max_per_hour` onboardings in the last hour.
//!
//! An onboarded domain is written like an API-managed one (`managed`), with
//! the matching `allowed_mx` patterns as its `mx`, so the ACME manager gets
//! its certificate and the zone answers its TXT only once that is served.
//! Refusals are cached for `refusal_cache`; every decision is logged and
//! counted. Every `recheck`, onboarded domains are looked at again: a new
//! MX set within other patterns updates `mx`; when the CNAMEs (or the MX
//! match) are gone for longer than `grace`, the domain is retired the RFC
//! 8461 §8.3 way (`retire = true`: `mode: none` with a new id, records
//! pruned later), and restored if they come back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::rr::{RData, RecordType};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Delegation, OnDemand};
use crate::control::Control;
use crate::managed::{self, WriteError};
use crate::policy::{DomainName, MxPattern};
use crate::resolve::{Protocol, Resolver};

/// Budget of one DNS exchange of a check.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Checks of first contacts running at once (SNI and DNS triggers).
const CONCURRENT_CHECKS: usize = 4;
/// First contacts waiting to be checked; more are dropped (and seen again
/// at the sender's next attempt).
const QUEUE: usize = 1024;
/// The marker in an onboarded domain's file header.
pub const ONBOARDED_MARK: &str = "; onboarded on demand";
/// The state file (in `state_dir`) of when an onboarded domain's CNAMEs
/// were first seen missing.
pub const STATE_FILE: &str = "onboard.json";

/// What brought a name to onboarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Sni,
    Dns,
    Api,
    Recheck,
}

impl From<crate::server::FirstContact> for Via {
    fn from(f: crate::server::FirstContact) -> Via {
        match f {
            crate::server::FirstContact::Sni => Via::Sni,
            crate::server::FirstContact::Dns => Via::Dns,
        }
    }
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Sni => "sni",
            Via::Dns => "dns",
            Via::Api => "api",
            Via::Recheck => "recheck",
        }
    }
}

/// One check and its result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable name (`deny`, `policy_host`, `sts_record`, `mx`, `hourly_limit`).
    pub check: &'static str,
    pub passed: bool,
    /// What was found, and on failure what is missing.
    pub detail: String,
    /// `false`: the answer could not be had (timeout, SERVFAIL), so the
    /// failure says nothing about what the customer published.
    #[serde(skip)]
    pub definitive: bool,
}

impl Check {
    fn pass(check: &'static str, detail: String) -> Check {
        Check {
            check,
            passed: true,
            detail,
            definitive: true,
        }
    }

    fn fail(check: &'static str, detail: String) -> Check {
        Check {
            check,
            passed: false,
            detail,
            definitive: true,
        }
    }

    fn unknown(check: &'static str, detail: String) -> Check {
        Check {
            check,
            passed: false,
            detail,
            definitive: false,
        }
    }
}

/// The checks of one domain and the `mx` its policy would get.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub domain: String,
    pub checks: Vec<Check>,
    /// The `allowed_mx` patterns the domain's MX hosts match (in
    /// `allowed_mx` order).
    pub mx: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub fn failed(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed)
    }

    /// The DNS proof the customer asked (both CNAMEs, the MX match) is
    /// definitively gone.
    fn definitively_gone(&self) -> bool {
        self.checks.iter().any(|c| {
            !c.passed && c.definitive && matches!(c.check, "policy_host" | "sts_record" | "mx")
        })
    }

    fn dns_proof_holds(&self) -> bool {
        self.checks
            .iter()
            .filter(|c| matches!(c.check, "policy_host" | "sts_record" | "mx"))
            .all(|c| c.passed)
    }

    /// Plain text, one line per check (`mtasts onboard`).
    pub fn to_text(&self) -> String {
        let mut out = format!("{}\n", self.domain);
        for c in &self.checks {
            out.push_str(&format!(
                "  {} {}: {}\n",
                if c.passed { "ok  " } else { "FAIL" },
                c.check,
                c.detail
            ));
        }
        if self.passed() {
            out.push_str(&format!(
                "  => would be onboarded with mx {}\n",
                self.mx.join(", ")
            ));
        } else {
            let missing: Vec<&str> = self.failed().map(|c| c.check).collect();
            out.push_str(&format!(
                "  => not onboarded: {} failed\n",
                missing.join(", ")
            ));
        }
        out
    }
}

/// The resolver the checks ask (`on_demand.resolver`, else the system's).
pub fn resolver(on_demand: &OnDemand) -> Result<Resolver, String> {
    let server = match on_demand.resolver {
        Some(addr) => addr,
        None => crate::check::system_resolver().map_err(|e| e.to_string())?,
    };
    Ok(Resolver::new(server, Protocol::Udp, DNS_TIMEOUT))
}

/// The DNS checks of `domain` (everything but the hourly limit). Changes
/// nothing; `mtasts onboard` prints the result.
pub async fn check(
    delegation: &Delegation,
    on_demand: &OnDemand,
    resolver: &Resolver,
    domain: &DomainName,
) -> Verdict {
    let mut checks = Vec::new();
    match on_demand.deny.iter().find(|p| p.matches(domain)) {
        Some(p) => checks.push(Check::fail(
            "deny",
            format!("{domain} matches the deny entry {p}"),
        )),
        None => checks.push(Check::pass("deny", "not on the deny list".to_owned())),
    }
    // A denied name is never looked up.
    if checks.iter().any(|c| !c.passed) {
        return Verdict {
            domain: domain.to_string(),
            checks,
            mx: Vec::new(),
        };
    }
    let (host, sts, mx) = tokio::join!(
        policy_host_check(delegation, resolver, domain),
        sts_record_check(delegation, resolver, domain),
        mx_check(on_demand, resolver, domain),
    );
    checks.push(host);
    checks.push(sts);
    let (mx_check, patterns) = mx;
    checks.push(mx_check);
    Verdict {
        domain: domain.to_string(),
        checks,
        mx: patterns.iter().map(ToString::to_string).collect(),
    }
}

fn lower(name: &hickory_proto::rr::Name) -> String {
    let text = name.to_ascii().to_ascii_lowercase();
    text.strip_suffix('.').unwrap_or(&text).to_owned()
}

async fn policy_host_check(
    delegation: &Delegation,
    resolver: &Resolver,
    domain: &DomainName,
) -> Check {
    const NAME: &str = "policy_host";
    let host = domain.policy_host();
    let want = delegation.policy_host.as_str();
    let cnames = match resolver.lookup(&host, RecordType::CNAME).await {
        Ok(r) => r,
        Err(e) => return Check::unknown(NAME, format!("{host} CNAME: {e}")),
    };
    let target = cnames.iter().find_map(|r| match r {
        RData::CNAME(c) => Some(lower(&c.0)),
        _ => None,
    });
    match target {
        Some(t) if t == want => {
            return Check::pass(NAME, format!("{host} is a CNAME to {want}"));
        }
        Some(t) => {
            return Check::fail(
                NAME,
                format!("{host} is a CNAME to {t}, not to {want} (want: {host}. CNAME {want}.)"),
            );
        }
        None => {}
    }
    // No CNAME: addresses of this server's, when the config names them.
    let ours: HashSet<IpAddr> = delegation
        .host_a
        .iter()
        .map(|a| IpAddr::V4(*a))
        .chain(delegation.host_aaaa.iter().map(|a| IpAddr::V6(*a)))
        .collect();
    let missing = format!("no CNAME at {host} (want: {host}. CNAME {want}.)");
    if ours.is_empty() {
        return Check::fail(NAME, missing);
    }
    match resolver.addresses(&host).await {
        Ok(addrs) if !addrs.is_empty() && addrs.iter().all(|a| ours.contains(a)) => Check::pass(
            NAME,
            format!(
                "{host} resolves to this server's addresses ({})",
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Ok(addrs) if addrs.is_empty() => Check::fail(NAME, missing),
        Ok(addrs) => Check::fail(
            NAME,
            format!(
                "{missing}; its addresses ({}) are not all this server's",
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(e) => Check::unknown(NAME, format!("{host} addresses: {e}")),
    }
}

async fn sts_record_check(
    delegation: &Delegation,
    resolver: &Resolver,
    domain: &DomainName,
) -> Check {
    const NAME: &str = "sts_record";
    let owner = format!("_mta-sts.{domain}");
    let want = crate::dns::delegated_name(domain, &delegation.zone);
    let want = want.strip_suffix('.').unwrap_or(&want);
    match resolver.lookup(&owner, RecordType::CNAME).await {
        Err(e) => Check::unknown(NAME, format!("{owner} CNAME: {e}")),
        Ok(r) => match r.iter().find_map(|r| match r {
            RData::CNAME(c) => Some(lower(&c.0)),
            _ => None,
        }) {
            Some(t) if t == want => Check::pass(NAME, format!("{owner} is a CNAME to {want}")),
            Some(t) => Check::fail(
                NAME,
                format!("{owner} is a CNAME to {t}, not to {want} (want: {owner}. CNAME {want}.)"),
            ),
            None => Check::fail(
                NAME,
                format!("no CNAME at {owner} (want: {owner}. CNAME {want}.)"),
            ),
        },
    }
}

async fn mx_check(
    on_demand: &OnDemand,
    resolver: &Resolver,
    domain: &DomainName,
) -> (Check, Vec<MxPattern>) {
    const NAME: &str = "mx";
    let records = match resolver.lookup(domain.as_str(), RecordType::MX).await {
        Ok(r) => r,
        Err(e) => {
            return (
                Check::unknown(NAME, format!("{domain} MX: {e}")),
                Vec::new(),
            );
        }
    };
    let hosts: Vec<String> = records
        .iter()
        .filter_map(|r| match r {
            RData::MX(mx) => Some(lower(&mx.exchange)),
            _ => None,
        })
        .collect();
    if hosts.is_empty() {
        return (
            Check::fail(NAME, format!("{domain} has no MX records")),
            Vec::new(),
        );
    }
    if hosts.iter().any(String::is_empty) {
        return (
            Check::fail(
                NAME,
                format!("{domain} publishes a null MX (it takes no mail)"),
            ),
            Vec::new(),
        );
    }
    let mut used = vec![false; on_demand.allowed_mx.len()];
    let mut foreign = Vec::new();
    for host in &hosts {
        match on_demand.allowed_mx.iter().position(|p| p.matches(host)) {
            Some(i) => used[i] = true,
            None => foreign.push(host.as_str()),
        }
    }
    if !foreign.is_empty() {
        let allowed: Vec<String> = on_demand
            .allowed_mx
            .iter()
            .map(ToString::to_string)
            .collect();
        return (
            Check::fail(
                NAME,
                format!(
                    "MX {} of {domain} match none of allowed_mx ({})",
                    foreign.join(", "),
                    allowed.join(", ")
                ),
            ),
            Vec::new(),
        );
    }
    let patterns: Vec<MxPattern> = on_demand
        .allowed_mx
        .iter()
        .zip(&used)
        .filter(|(_, u)| **u)
        .map(|(p, _)| p.clone())
        .collect();
    (
        Check::pass(
            NAME,
            format!(
                "every MX of {domain} ({}) matches allowed_mx",
                hosts.join(", ")
            ),
        ),
        patterns,
    )
}

/// The domain file an onboarding writes.
fn domain_file(
    domain: &DomainName,
    on_demand: &OnDemand,
    mx: &[String],
    retire: bool,
    via: Via,
) -> String {
    let mut t = toml::Table::new();
    t.insert("name".into(), domain.to_string().into());
    t.insert("mode".into(), on_demand.mode.as_str().into());
    t.insert(
        "mx".into(),
        toml::Value::Array(mx.iter().map(|m| m.as_str().into()).collect()),
    );
    if retire {
        t.insert("retire".into(), true.into());
    }
    let mut doc = toml::Table::new();
    doc.insert(
        "domain".into(),
        toml::Value::Array(vec![toml::Value::Table(t)]),
    );
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(
        "{}{ONBOARDED_MARK} ({}) at {now}; edits by hand are kept until the next change.\n{}",
        managed::MANAGED_HEADER,
        via.as_str(),
        toml::to_string(&doc).unwrap_or_default()
    )
}

/// Why an onboarding did not happen.
#[derive(Debug)]
pub enum Refusal {
    /// `[on_demand]` is not enabled (or `[delegation]` is missing).
    Disabled,
    /// One or more checks failed (all of them listed).
    Checks(Verdict),
    /// The checks passed but the write was not applied.
    Write(WriteError),
}

/// What an onboarding did.
#[derive(Debug, Clone)]
pub struct Onboarded {
    /// `false`: the domain was configured already; nothing was written.
    pub written: bool,
    pub verdict: Option<Verdict>,
}

#[derive(Default)]
struct State {
    /// Refused names and until when.
    refused: HashMap<DomainName, Instant>,
    /// Names being checked now.
    in_flight: HashSet<DomainName>,
    /// When the onboardings of the last hour happened.
    recent: VecDeque<Instant>,
}

/// When an onboarded domain's DNS proof was first seen gone (persisted).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Missing {
    version: u32,
    /// Domain → Unix seconds.
    since: std::collections::BTreeMap<String, u64>,
}

/// The onboarding engine of one `serve` process.
pub struct Onboarder {
    control: Arc<Control>,
    state: Mutex<State>,
    queue: tokio::sync::mpsc::Sender<(DomainName, Via)>,
}

impl Onboarder {
    /// Starts the engine: the first-contact queue and the recheck loop.
    pub fn start(control: Arc<Control>) -> Arc<Onboarder> {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let onboarder = Arc::new(Onboarder {
            control,
            state: Mutex::new(State::default()),
            queue: tx,
        });
        tokio::spawn(Arc::clone(&onboarder).first_contacts(rx));
        tokio::spawn(Arc::clone(&onboarder).recheck_loop());
        onboarder
    }

    fn settings(&self) -> Option<(Arc<Config>, OnDemand, Delegation)> {
        let config = self.control.config();
        let od = config.on_demand.clone().filter(|o| o.enabled)?;
        let delegation = config.delegation.clone()?;
        Some((config, od, delegation))
    }

    /// A first contact for `name` (the policy host from SNI, or the domain
    /// from a DNS query): queued for the checks unless it is known, being
    /// checked, refused a moment ago, or the queue is full. Never blocks.
    pub fn notice(&self, domain: &str, via: Via) {
        let Ok(domain) = DomainName::parse(domain) else {
            return;
        };
        let Some((config, _, _)) = self.settings() else {
            return;
        };
        if config.domain(&domain).is_some() {
            return;
        }
        {
            let mut state = crate::sync::lock(&self.state);
            let now = Instant::now();
            if state.refused.get(&domain).is_some_and(|until| *until > now) {
                return;
            }
            if state.refused.len() > 100_000 {
                state.refused.retain(|_, until| *until > now);
            }
            if state.in_flight.len() >= QUEUE || !state.in_flight.insert(domain.clone()) {
                return;
            }
        }
        if self.queue.try_send((domain.clone(), via)).is_err() {
            crate::sync::lock(&self.state).in_flight.remove(&domain);
        }
    }

    async fn first_contacts(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<(DomainName, Via)>,
    ) {
        let running = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CHECKS));
        while let Some((domain, via)) = rx.recv().await {
            let Ok(permit) = Arc::clone(&running).acquire_owned().await else {
                return;
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let _permit = permit;
                let _ = me.onboard(&domain, via).await;
                crate::sync::lock(&me.state).in_flight.remove(&domain);
            });
        }
    }

    /// Checks `domain` and onboards it when every check passes.
    pub async fn onboard(&self, domain: &DomainName, via: Via) -> Result<Onboarded, Refusal> {
        let Some((config, od, delegation)) = self.settings() else {
            return Err(Refusal::Disabled);
        };
        if config.domain(domain).is_some() {
            return Ok(Onboarded {
                written: false,
                verdict: None,
            });
        }
        let metrics = Arc::clone(self.control.server().metrics());
        let resolver = match resolver(&od) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(domain = %domain, via = via.as_str(), "on-demand: no resolver for the checks: {e}");
                let verdict = Verdict {
                    domain: domain.to_string(),
                    checks: vec![Check::unknown("resolver", e)],
                    mx: Vec::new(),
                };
                return Err(self.refuse(verdict, via, &od, &metrics));
            }
        };
        let mut verdict = check(&delegation, &od, &resolver, domain).await;
        if verdict.passed() {
            let now = Instant::now();
            let mut state = crate::sync::lock(&self.state);
            while state
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(3600))
            {
                state.recent.pop_front();
            }
            if state.recent.len() >= od.max_per_hour as usize {
                verdict.checks.push(Check::fail(
                    "hourly_limit",
                    format!(
                        "{} domains onboarded in the last hour, the limit (max_per_hour) is {}",
                        state.recent.len(),
                        od.max_per_hour
                    ),
                ));
            } else {
                // Counted now, so concurrent onboardings cannot pass the limit.
                state.recent.push_back(now);
                verdict.checks.push(Check::pass(
                    "hourly_limit",
                    format!(
                        "{} of {} onboardings used in the last hour",
                        state.recent.len(),
                        od.max_per_hour
                    ),
                ));
            }
        }
        if !verdict.passed() {
            return Err(self.refuse(verdict, via, &od, &metrics));
        }
        let content = domain_file(domain, &od, &verdict.mx, false, via);
        match managed::write(&self.control, domain.clone(), Some(content), "onboard").await {
            Ok(_) => {
                tracing::info!(
                    domain = %domain,
                    via = via.as_str(),
                    mx = %verdict.mx.join(","),
                    "on-demand: onboarded"
                );
                metrics.onboard(via.as_str(), "onboarded", "");
                Ok(Onboarded {
                    written: true,
                    verdict: Some(verdict),
                })
            }
            Err(e) => {
                // Not onboarded after all: give the slot back.
                let mut state = crate::sync::lock(&self.state);
                state.recent.pop_back();
                drop(state);
                tracing::warn!(domain = %domain, via = via.as_str(), "on-demand: checks passed but the write failed: {e}");
                metrics.onboard(via.as_str(), "refused", "write");
                Err(Refusal::Write(e))
            }
        }
    }

    fn refuse(
        &self,
        verdict: Verdict,
        via: Via,
        od: &OnDemand,
        metrics: &crate::metrics::Metrics,
    ) -> Refusal {
        let reasons: Vec<String> = verdict
            .failed()
            .map(|c| format!("{}: {}", c.check, c.detail))
            .collect();
        tracing::info!(
            domain = %verdict.domain,
            via = via.as_str(),
            "on-demand: refused: {}",
            reasons.join("; ")
        );
        for c in verdict.failed() {
            metrics.onboard(via.as_str(), "refused", c.check);
        }
        if let Ok(name) = DomainName::parse(&verdict.domain) {
            crate::sync::lock(&self.state)
                .refused
                .insert(name, Instant::now() + od.refusal_cache);
        }
        Refusal::Checks(verdict)
    }

    /// Every `recheck`: onboarded domains whose MX set moved to other
    /// patterns get the new `mx`; those whose DNS proof is gone for longer
    /// than `grace` are retired, and restored when it comes back.
    async fn recheck_loop(self: Arc<Self>) {
        loop {
            // While disabled, look again in a minute (a reload may enable it).
            let wait = self
                .settings()
                .map_or(Duration::from_secs(60), |(_, od, _)| od.recheck);
            tokio::time::sleep(wait).await;
            if let Err(e) = self.recheck_all().await {
                tracing::warn!("on-demand recheck: {e}");
            }
        }
    }

    /// One pass of [`Onboarder::recheck_loop`].
    pub async fn recheck_all(&self) -> Result<(), String> {
        let Some((config, od, delegation)) = self.settings() else {
            return Ok(());
        };
        let resolver = resolver(&od)?;
        let onboarded = {
            let config = Arc::clone(&config);
            tokio::task::spawn_blocking(move || onboarded_domains(&config))
                .await
                .map_err(|e| e.to_string())?
        };
        let state_path = config.server.state_dir.join(STATE_FILE);
        let mut missing = read_missing(&state_path);
        let before = missing.since.clone();
        let metrics = Arc::clone(self.control.server().metrics());
        let now = crate::retire::unix_now();
        for (domain, retired) in onboarded {
            let Some(current) = config.domain(&domain) else {
                continue;
            };
            let verdict = check(&delegation, &od, &resolver, &domain).await;
            if verdict.dns_proof_holds() {
                missing.since.remove(domain.as_str());
                let mx_now: Vec<String> =
                    current.policy.mx.iter().map(ToString::to_string).collect();
                if retired || mx_now != verdict.mx {
                    let action = if retired { "restored" } else { "updated" };
                    let content = domain_file(&domain, &od, &verdict.mx, false, Via::Recheck);
                    match managed::write(&self.control, domain.clone(), Some(content), "recheck")
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(domain = %domain, mx = %verdict.mx.join(","), "on-demand: {action}");
                            metrics.onboard("recheck", action, "");
                        }
                        Err(e) => tracing::warn!(domain = %domain, "on-demand: not {action}: {e}"),
                    }
                }
                continue;
            }
            if !verdict.definitively_gone() || retired {
                continue;
            }
            let since = *missing.since.entry(domain.to_string()).or_insert(now);
            let reasons: Vec<String> = verdict
                .failed()
                .map(|c| format!("{}: {}", c.check, c.detail))
                .collect();
            if now.saturating_sub(since) < od.grace.as_secs() {
                tracing::warn!(
                    domain = %domain,
                    missing_for_s = now.saturating_sub(since),
                    grace_s = od.grace.as_secs(),
                    "on-demand: DNS no longer points here: {}",
                    reasons.join("; ")
                );
                continue;
            }
            let mx: Vec<String> = current.policy.mx.iter().map(ToString::to_string).collect();
            let content = domain_file(&domain, &od, &mx, true, Via::Recheck);
            match managed::write(&self.control, domain.clone(), Some(content), "offboard").await {
                Ok(_) => {
                    tracing::info!(
                        domain = %domain,
                        "on-demand: offboarded (retire = true: mode none with a new id; its records go once senders' caches expired): {}",
                        reasons.join("; ")
                    );
                    metrics.onboard("recheck", "offboarded", "");
                }
                Err(e) => tracing::warn!(domain = %domain, "on-demand: not offboarded: {e}"),
            }
        }
        // Domains no longer onboarded need no entry.
        missing
            .since
            .retain(|d, _| DomainName::parse(d).is_ok_and(|n| config.domain(&n).is_some()));
        if missing.since != before {
            write_missing(&state_path, &missing)?;
        }
        Ok(())
    }
}

/// The onboarded domains of `config` (their file's header says so) and
/// whether each is retired.
fn onboarded_domains(config: &Config) -> Vec<(DomainName, bool)> {
    use std::io::Read as _;
    let Some(dir) = &config.domains_dir else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for d in &config.domains {
        let file = dir.join(format!("{}.toml", d.name));
        if *d.origin.file != *file {
            continue;
        }
        let mut head = [0u8; 512];
        let n = std::fs::File::open(&file)
            .and_then(|mut f| f.read(&mut head))
            .unwrap_or(0);
        let first = head[..n].split(|b| *b == b'\n').next().unwrap_or_default();
        if first.starts_with(managed::MANAGED_HEADER.as_bytes())
            && String::from_utf8_lossy(first).contains(ONBOARDED_MARK)
        {
            out.push((d.name.clone(), d.retire));
        }
    }
    out
}

fn read_missing(path: &std::path::Path) -> Missing {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() < 64 * 1024 * 1024 => match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(file = %path.display(), "unreadable, starting the grace periods again: {e}");
                Missing::default()
            }
        },
        _ => Missing::default(),
    }
}

fn write_missing(path: &std::path::Path, missing: &Missing) -> Result<(), String> {
    let mut m = serde_json::to_vec_pretty(&Missing {
        version: 1,
        since: missing.since.clone(),
    })
    .map_err(|e| e.to_string())?;
    m.push(b'\n');
    crate::store::write_atomic(path, &m, crate::store::PUBLIC_MODE)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
