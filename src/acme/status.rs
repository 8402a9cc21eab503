//! `mtasts certs`: each host's certificate state as the store has it
//! (issuer, expiry, next renewal, last error), for people and as JSON.
//! Reads through the `CertStore` trait only; works while the server runs.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::order;
use super::schedule::{self, from_unix, unix};
use crate::config::Config;
use crate::store::{CertState, CertStore, DirStore};

/// RFC 3339 UTC of unix seconds.
pub fn fmt_time(secs: i64) -> String {
    humantime::format_rfc3339_seconds(from_unix(secs)).to_string()
}

/// One host's line.
#[derive(Debug, Clone, Serialize)]
pub struct CertRow {
    pub host: String,
    /// valid | renewal-failing | pending | waiting-dns | failing | removed
    pub state: &'static str,
    /// Still in the config (removed hosts are listed while files exist).
    pub configured: bool,
    pub issuer: Option<String>,
    pub serial: Option<String>,
    pub not_after: Option<String>,
    pub next_renewal: Option<String>,
    pub next_attempt: Option<String>,
    pub failures: u32,
    pub last_error: Option<String>,
}

/// All hosts plus totals.
#[derive(Debug, Clone, Serialize)]
pub struct CertReport {
    pub directory: String,
    pub valid: usize,
    /// Configured hosts without a usable certificate.
    pub pending: usize,
    pub failing: usize,
    /// Time to order every pending certificate at `orders_per_hour`.
    pub eta_seconds: u64,
    pub hosts: Vec<CertRow>,
}

/// Builds the report for `cfg` from its `state_dir` (files store).
pub async fn report(cfg: &Config) -> CertReport {
    // One-shot: the store reads on this thread (DirStore::inline).
    let store = DirStore::existing(&cfg.server.state_dir).map(DirStore::inline);
    report_from(cfg, store.as_ref()).await
}

/// Builds the report for `cfg` from `store` (`None`: nothing stored yet).
pub async fn report_from<S: CertStore>(cfg: &Config, store: Option<&S>) -> CertReport {
    let acme = &cfg.tls.acme;
    let now = unix(SystemTime::now());
    let mut hosts: Vec<(String, bool)> = cfg
        .domains
        .iter()
        .map(|d| (d.name.policy_host(), true))
        .collect();
    if let Some(store) = store {
        // A set, not a scan of the list per stored host: quadratic at
        // 100,000 domains.
        let configured: std::collections::HashSet<String> =
            hosts.iter().map(|(h, _)| h.clone()).collect();
        let stored = store.stored_hosts().await.unwrap_or_else(|e| {
            eprintln!("warning: cannot list the stored hosts: {e}");
            Vec::new()
        });
        for h in stored {
            if !configured.contains(&h) {
                hosts.push((h, false));
            }
        }
    }
    let mut rows = Vec::with_capacity(hosts.len());
    for (host, configured) in hosts {
        rows.push(row(store, &host, configured, acme.renew_before, now).await);
    }
    let valid = rows
        .iter()
        .filter(|r| matches!(r.state, "valid" | "renewal-failing"))
        .count();
    let pending = rows.iter().filter(|r| r.configured).count() - valid;
    let failing = rows
        .iter()
        .filter(|r| r.configured && r.failures > 0)
        .count();
    let eta = schedule::Pacer::new(acme.orders_per_hour).eta(pending);
    CertReport {
        directory: acme.directory.clone(),
        valid,
        pending,
        failing,
        eta_seconds: eta.as_secs(),
        hosts: rows,
    }
}

async fn row<S: CertStore>(
    store: Option<&S>,
    host: &str,
    configured: bool,
    renew_before: Option<Duration>,
    now: i64,
) -> CertRow {
    let mut row = CertRow {
        host: host.to_owned(),
        state: "pending",
        configured,
        issuer: None,
        serial: None,
        not_after: None,
        next_renewal: None,
        next_attempt: None,
        failures: 0,
        last_error: None,
    };
    let Some(store) = store else { return row };
    let state = match store.load_state(host).await {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => CertState {
            last_error: Some(e.to_string()),
            ..CertState::default()
        },
    };
    row.failures = state.failures;
    row.last_error = state.last_error.clone();
    row.next_attempt = state
        .next_attempt
        .filter(|_| state.failures > 0)
        .map(fmt_time);
    let mut usable = false;
    match store.load_cert(host).await {
        Ok(Some(bundle)) => match order::inspect(host, &bundle) {
            Ok((_, info)) => {
                row.issuer = Some(info.issuer.clone());
                row.serial = Some(info.serial.clone());
                row.not_after = Some(fmt_time(info.not_after));
                if info.not_after > now {
                    usable = true;
                    let renew = schedule::renew_at(info.not_before, info.not_after, renew_before);
                    let renew = state
                        .next_attempt
                        .filter(|_| state.failures > 0)
                        .map_or(renew, |r| r.max(renew));
                    row.next_renewal = Some(fmt_time(renew));
                } else {
                    row.last_error
                        .get_or_insert_with(|| "certificate expired".to_owned());
                }
            }
            Err(reason) => {
                let path = store.cert_location(host);
                row.last_error = Some(format!("{path}: unusable, not served: {reason}"));
            }
        },
        Ok(None) => {}
        Err(e) => row.last_error = Some(e.to_string()),
    }
    row.state = match (configured, usable, state.failures > 0) {
        (false, _, _) => "removed",
        (true, true, false) => "valid",
        (true, true, true) => "renewal-failing",
        (true, false, _) if state.waiting_dns => "waiting-dns",
        (true, false, true) => "failing",
        (true, false, false) => "pending",
    };
    row
}

/// `[#######-------------]  35% ` while a batch is under way; empty when
/// everything is valid.
pub(crate) fn bar(done: usize, total: usize) -> String {
    const WIDTH: usize = 20;
    if total == 0 || done >= total {
        return String::new();
    }
    let filled = done * WIDTH / total;
    format!(
        "[{}{}] {:>3}% ",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        done * 100 / total
    )
}

/// Plain-text table for people.
pub fn table(report: &CertReport) -> String {
    let mut out = String::new();
    let header = [
        "HOST",
        "STATE",
        "ISSUER",
        "NOT AFTER",
        "NEXT RENEWAL",
        "LAST ERROR",
    ];
    let lines: Vec<[String; 6]> = report
        .hosts
        .iter()
        .map(|r| {
            let next = r
                .next_renewal
                .clone()
                .or_else(|| r.next_attempt.as_ref().map(|t| format!("retry {t}")))
                .unwrap_or_else(|| "-".to_owned());
            [
                r.host.clone(),
                r.state.to_owned(),
                r.issuer.clone().unwrap_or_else(|| "-".to_owned()),
                r.not_after.clone().unwrap_or_else(|| "-".to_owned()),
                next,
                r.last_error
                    .as_ref()
                    .map(|e| match r.failures {
                        0 => e.clone(),
                        n => format!("({n}x) {e}"),
                    })
                    .unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l.iter()).take(5) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut push = |cells: [&str; 6]| {
        for (i, cell) in cells.iter().enumerate() {
            if i == 5 {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    push(header);
    for l in &lines {
        push([&l[0], &l[1], &l[2], &l[3], &l[4], &l[5]]);
    }
    out.push_str(&format!(
        "{}{} valid, {} pending, {} failing; directory {}",
        bar(report.valid, report.valid + report.pending),
        report.valid,
        report.pending,
        report.failing,
        report.directory
    ));
    if report.pending > 0 {
        out.push_str(&format!(
            "; queue ETA ~{}",
            humantime::format_duration(Duration::from_secs(report.eta_seconds))
        ));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[tokio::test]
    async fn report_from_store_and_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[server]\nstate_dir = \"{}\"\n[tls]\nmode = \"acme\"\norders_per_hour = 2\n[defaults]\nmode = \"none\"\n[[domain]]\nname = \"a.example\"\n[[domain]]\nname = \"b.example\"\n",
            dir.path().display()
        );
        let cfg = Config::from_source(Path::new("t.toml"), dir.path(), text).expect("config");
        let store = DirStore::open(dir.path()).expect("store");
        let state = CertState {
            failures: 2,
            waiting_dns: true,
            last_error: Some("mta-sts.b.example has no A/AAAA record".into()),
            next_attempt: Some(unix(SystemTime::now()) + 60),
            ..CertState::default()
        };
        store
            .write_state("mta-sts.b.example", &state)
            .expect("state");
        store
            .write_state("mta-sts.gone.example", &CertState::default())
            .expect("state");
        let report = report(&cfg).await;
        let states: Vec<(&str, &str)> = report
            .hosts
            .iter()
            .map(|r| (r.host.as_str(), r.state))
            .collect();
        assert_eq!(
            states,
            [
                ("mta-sts.a.example", "pending"),
                ("mta-sts.b.example", "waiting-dns"),
                ("mta-sts.gone.example", "removed"),
            ]
        );
        assert_eq!((report.valid, report.pending, report.failing), (0, 2, 1));
        assert_eq!(report.eta_seconds, 3600, "2 pending at 2 per hour");
        let text = table(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("HOST "), "{text}");
        assert!(
            lines[2].contains("(2x) mta-sts.b.example has no A/AAAA record"),
            "{text}"
        );
        assert!(lines[2].contains("retry "), "{text}");
        assert!(lines[4].contains("queue ETA ~1h"), "{text}");
        assert!(
            lines[4].starts_with("[--------------------]   0% 0 valid"),
            "{text}"
        );
        assert_eq!(bar(1, 4), "[#####---------------]  25% ");
        assert_eq!(bar(4, 4), "");
        // Columns line up.
        let col = lines[0].find("STATE").expect("STATE");
        assert!(
            lines
                .iter()
                .skip(1)
                .take(3)
                .all(|l| l.get(col..col + 1) != Some(" "))
        );
    }
}
