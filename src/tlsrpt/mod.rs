//! TLS reports (RFC 8460): received over HTTPS on every policy host
//! (`POST https://mta-sts.<domain>/tlsrpt`, §5.3.2) or by mail
//! (`mtasts tlsrpt ingest`), stored ([`store`]), summarised, counted in
//! Prometheus, and joined with what this server served when they report a
//! failure of the policy host itself.

pub mod dkim;
pub mod ingest;
pub mod receive;
pub mod report;
pub mod store;

/// Path of the HTTPS delivery endpoint on every policy host.
pub use crate::policy::TLSRPT_PATH as PATH;

/// Result types that report a failure of the policy host itself (fetching
/// or validating the policy, or its certificate): alerts.
pub const OWN_FAILURES: &[&str] = &[
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
];

/// Result types of RFC 8460 §4.3 (and the IANA registry): metric labels;
/// anything else is counted as `other`, so labels stay bounded.
pub const KNOWN_RESULT_TYPES: &[&str] = &[
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
];

/// Removes reports older than `retention` now and every 6 hours.
pub fn spawn_retention(store: store::ReportStore, retention: std::time::Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(6 * 3600));
        loop {
            tick.tick().await;
            let before = time::OffsetDateTime::now_utc().unix_timestamp()
                - i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
            match store.prune(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "TLS reports past their retention removed"),
                Err(e) => tracing::warn!(error = %e, "cannot remove old TLS reports"),
            }
        }
    });
}

/// The last days' TLS reports per policy domain (`check --config` reads
/// them from the config's report store).
pub type RecentReports = std::collections::HashMap<String, store::DomainSummary>;

/// How many days of TLS reports `check` looks at.
pub const REPORT_DAYS: i64 = 7;

/// The last [`REPORT_DAYS`] days' reports by policy domain,
/// when the config's report store exists (`None` when no report was ever
/// stored, or the store cannot be read: said on stderr).
pub async fn recent(config: &crate::config::Config) -> Option<RecentReports> {
    let files = matches!(config.store, crate::config::StoreConfig::Files);
    if files && !config.server.state_dir.join("tlsrpt.sqlite").exists() {
        return None;
    }
    let since = time::OffsetDateTime::now_utc().unix_timestamp() - REPORT_DAYS * 86_400;
    let store = match store::ReportStore::for_config(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("note: TLS reports not read: {e}");
            return None;
        }
    };
    match store.summary(since).await {
        Ok(all) => Some(all.into_iter().map(|s| (s.domain.clone(), s)).collect()),
        Err(e) => {
            eprintln!("note: TLS reports not read: {e}");
            None
        }
    }
}
