//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Every counter the request path touches is created once at start and held
//! as a direct handle, so counting is one atomic add: no label lookup, no
//! lock. Labels have bounded values (listener, outcome, mode); there is no
//! per-domain label, so 100,000 domains do not mean 100,000 series.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::policy::Mode;

/// Which listener a request arrived on (a label of the request counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Https,
    Http,
}

/// What became of one HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// 200 with a policy.
    Policy,
    /// 304: the client already had this version.
    NotModified,
    UnknownHost,
    NotFound,
    MethodNotAllowed,
    Misdirected,
    /// A policy request over plain HTTP without a proxy in front.
    HttpsOnly,
    /// ACME HTTP-01 challenge answered.
    AcmeChallenge,
    /// 400: the Host header is not a valid host.
    BadHost,
}

const OUTCOMES: [(RequestOutcome, &str); 9] = [
    (RequestOutcome::Policy, "policy"),
    (RequestOutcome::NotModified, "not_modified"),
    (RequestOutcome::UnknownHost, "unknown_host"),
    (RequestOutcome::NotFound, "not_found"),
    (RequestOutcome::MethodNotAllowed, "method_not_allowed"),
    (RequestOutcome::Misdirected, "misdirected"),
    (RequestOutcome::HttpsOnly, "https_only"),
    (RequestOutcome::AcmeChallenge, "acme_challenge"),
    (RequestOutcome::BadHost, "bad_host"),
];

/// Result of a TLS handshake attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Ok,
    /// SNI missing or not a configured domain: refused with unrecognized_name.
    UnknownSni,
    Failed,
    Timeout,
}

const HANDSHAKES: [(Handshake, &str); 4] = [
    (Handshake::Ok, "ok"),
    (Handshake::UnknownSni, "unknown_sni"),
    (Handshake::Failed, "failed"),
    (Handshake::Timeout, "timeout"),
];

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Watch,
    Admin,
    /// Another replica changed API-managed domains in the shared store.
    Store,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::Watch => "watch",
            Trigger::Admin => "admin",
            Trigger::Store => "store",
        }
    }
}

/// What became of a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// A changed config was applied (new snapshot generation).
    Ok,
    /// The config was as applied before: nothing was swapped.
    Unchanged,
    /// Rejected; the previous snapshot keeps serving.
    Error,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Error => "error",
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// All metrics of one process.
pub struct Metrics {
    registry: Registry,
    tlsrpt_reports: Family<Labels, Counter>,
    tlsrpt_sessions: Family<Labels, Counter>,
    tlsrpt_failures: Family<Labels, Counter>,
    onboard: Family<Labels, Counter>,
    requests: [[Counter; OUTCOMES.len()]; 2],
    fetches: [Counter; 3],
    handshakes: [Counter; HANDSHAKES.len()],
    reloads: Family<Labels, Counter>,
    /// Connections refused because `max_connections` was reached.
    pub connections_refused: Counter,
    /// Open connections.
    pub connections_open: Gauge,
    /// Increases with every snapshot swapped in.
    pub snapshot_generation: Gauge,
    /// Domains in the current snapshot.
    pub domains: Gauge,
    /// Unix time of the earliest certificate expiry among served hosts.
    pub cert_expiry_soonest: Gauge,
    /// Certificates loaded from disk (or issued) on a handshake.
    pub cert_loads: Counter,
    /// Reloads that kept mx names a live MX still needs, per domain
    /// (`crate::mxhold`).
    pub mx_shrink_held: Counter,
    /// Domains whose mx shrink is held after the last reload.
    pub mx_shrink_held_domains: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mtasts");
        let requests_family = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by listener and outcome",
            requests_family.clone(),
        );
        let requests = [Listener::Https, Listener::Http].map(|l| {
            OUTCOMES.map(|(_, name)| {
                requests_family
                    .get_or_create(&vec![("listener", listener_name(l)), ("outcome", name)])
                    .clone()
            })
        });
        let fetches_family = Family::<Labels, Counter>::default();
        registry.register(
            "policy_fetches",
            "Policies served (200), by policy mode",
            fetches_family.clone(),
        );
        let fetches = [Mode::Enforce, Mode::Testing, Mode::None].map(|m| {
            fetches_family
                .get_or_create(&vec![("mode", m.as_str())])
                .clone()
        });
        let handshakes_family = Family::<Labels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes by result",
            handshakes_family.clone(),
        );
        let handshakes = HANDSHAKES.map(|(_, name)| {
            handshakes_family
                .get_or_create(&vec![("result", name)])
                .clone()
        });
        let reloads = Family::<Labels, Counter>::default();
        registry.register(
            "reloads",
            "Configuration reloads by trigger and result (ok: applied, unchanged: nothing to apply, error: rejected)",
            reloads.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because max_connections was reached",
            connections_refused.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Open client connections",
            connections_open.clone(),
        );
        let snapshot_generation = Gauge::default();
        registry.register(
            "snapshot_generation",
            "Number of the snapshot being served",
            snapshot_generation.clone(),
        );
        let domains = Gauge::default();
        registry.register(
            "domains",
            "Domains in the snapshot being served",
            domains.clone(),
        );
        let cert_expiry_soonest = Gauge::default();
        registry.register(
            "cert_expiry_soonest_timestamp_seconds",
            "Unix time at which the first served certificate expires",
            cert_expiry_soonest.clone(),
        );
        let cert_loads = Counter::default();
        registry.register(
            "cert_loads",
            "Certificates loaded into memory on a handshake (cache misses)",
            cert_loads.clone(),
        );
        let mx_shrink_held = Counter::default();
        registry.register(
            "mx_shrink_held",
            "Times a certificate-driven mx shrink of an enforce policy was held because a live MX still needs a dropped name (per domain and reload)",
            mx_shrink_held.clone(),
        );
        let mx_shrink_held_domains = Gauge::default();
        registry.register(
            "mx_shrink_held_domains",
            "Domains whose mx shrink is held after the last reload",
            mx_shrink_held_domains.clone(),
        );
        let tlsrpt_reports = Family::<Labels, Counter>::default();
        registry.register(
            "tlsrpt_reports",
            "TLS reports received, by result (stored, duplicate, rejected)",
            tlsrpt_reports.clone(),
        );
        let tlsrpt_sessions = Family::<Labels, Counter>::default();
        registry.register(
            "tlsrpt_sessions",
            "Sessions counted by stored TLS reports, by outcome (successful, failed)",
            tlsrpt_sessions.clone(),
        );
        let tlsrpt_failures = Family::<Labels, Counter>::default();
        registry.register(
            "tlsrpt_failed_sessions",
            "Failed sessions in stored TLS reports' failure details, by result type (unregistered types: other)",
            tlsrpt_failures.clone(),
        );
        let onboard = Family::<Labels, Counter>::default();
        registry.register(
            "onboard_decisions",
            "On-demand onboarding decisions, by trigger (sni, dns, api, recheck) and result (onboarded, refused, updated, offboarded, restored); a refusal once per failed check",
            onboard.clone(),
        );
        Metrics {
            registry,
            onboard,
            tlsrpt_reports,
            tlsrpt_sessions,
            tlsrpt_failures,
            cert_loads,
            mx_shrink_held,
            mx_shrink_held_domains,
            requests,
            fetches,
            handshakes,
            reloads,
            connections_refused,
            connections_open,
            snapshot_generation,
            domains,
            cert_expiry_soonest,
        }
    }

    /// Counts one request (one atomic add).
    pub fn request(&self, listener: Listener, outcome: RequestOutcome) {
        let l = match listener {
            Listener::Https => 0,
            Listener::Http => 1,
        };
        if let (Some(row), Some(i)) = (
            self.requests.get(l),
            OUTCOMES.iter().position(|(o, _)| *o == outcome),
        ) && let Some(c) = row.get(i)
        {
            c.inc();
        }
    }

    /// Counts one served policy by its mode.
    pub fn fetch(&self, mode: Mode) {
        let i = match mode {
            Mode::Enforce => 0,
            Mode::Testing => 1,
            Mode::None => 2,
        };
        if let Some(c) = self.fetches.get(i) {
            c.inc();
        }
    }

    pub fn handshake(&self, result: Handshake) {
        if let Some(i) = HANDSHAKES.iter().position(|(h, _)| *h == result)
            && let Some(c) = self.handshakes.get(i)
        {
            c.inc();
        }
    }

    /// A TLS report was stored, recognised as a duplicate or rejected.
    pub fn tlsrpt_report(&self, result: &'static str) {
        self.tlsrpt_reports
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    /// One on-demand onboarding decision (`reason`: the failed check of a
    /// refusal, `""` otherwise).
    pub fn onboard(&self, via: &'static str, result: &'static str, reason: &'static str) {
        let mut labels = vec![("trigger", via), ("result", result)];
        if !reason.is_empty() {
            labels.push(("reason", reason));
        }
        self.onboard.get_or_create(&labels).inc();
    }

    /// The session counts of a stored report.
    pub fn tlsrpt_sessions(&self, successful: u64, failed: u64) {
        self.tlsrpt_sessions
            .get_or_create(&vec![("outcome", "successful")])
            .inc_by(successful);
        self.tlsrpt_sessions
            .get_or_create(&vec![("outcome", "failed")])
            .inc_by(failed);
    }

    /// Failed sessions of one result type (a known type, or `other`).
    pub fn tlsrpt_failures(&self, result_type: &'static str, count: u64) {
        self.tlsrpt_failures
            .get_or_create(&vec![("result", result_type)])
            .inc_by(count);
    }

    pub fn reload(&self, trigger: Trigger, result: ReloadResult) {
        self.reloads
            .get_or_create(&vec![
                ("trigger", trigger.as_str()),
                ("result", result.as_str()),
            ])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn listener_name(l: Listener) -> &'static str {
    match l {
        Listener::Https => "https",
        Listener::Http => "http",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_exposition() {
        let m = Metrics::new();
        m.request(Listener::Https, RequestOutcome::Policy);
        m.request(Listener::Https, RequestOutcome::Policy);
        m.request(Listener::Http, RequestOutcome::UnknownHost);
        m.fetch(Mode::Enforce);
        m.handshake(Handshake::UnknownSni);
        m.reload(Trigger::Admin, ReloadResult::Error);
        let text = m.render();
        assert!(
            text.contains("mtasts_http_requests_total{listener=\"https\",outcome=\"policy\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "mtasts_http_requests_total{listener=\"http\",outcome=\"unknown_host\"} 1"
            )
        );
        assert!(text.contains("mtasts_policy_fetches_total{mode=\"enforce\"} 1"));
        assert!(text.contains("mtasts_tls_handshakes_total{result=\"unknown_sni\"} 1"));
        assert!(text.contains("mtasts_reloads_total{trigger=\"admin\",result=\"error\"} 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
