//! Where TLS reports are kept: SQLite in `state_dir/tlsrpt.sqlite` (the
//! embedded default, through rusqlite with its bundled library), or the
//! PostgreSQL store of replicas, so that every replica sees every report.
//!
//! Each report is stored once (organization, report id), with its original
//! bytes (for download, kept for the retention period) and one row per
//! policy and per failure detail, so summaries are SQL aggregates.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::report::Report;
use crate::store::pg::PgStore;

/// Why the report store failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportStoreError {
    #[error("TLS report store (SQLite): {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Postgres(#[from] crate::store::StoreError),
    #[error("TLS report store: {0}")]
    Other(String),
}

const SQLITE_SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,
    organization TEXT NOT NULL,
    report_id TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    start_at INTEGER NOT NULL,
    end_at INTEGER NOT NULL,
    source TEXT NOT NULL,
    raw BLOB NOT NULL,
    UNIQUE (organization, report_id));
CREATE TABLE IF NOT EXISTS results (
    report INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    start_at INTEGER NOT NULL,
    day TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    policy_type TEXT NOT NULL,
    organization TEXT NOT NULL,
    successful INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    detailed_failed INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS results_domain ON results (policy_domain, start_at);
CREATE TABLE IF NOT EXISTS failures (
    report INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    start_at INTEGER NOT NULL,
    policy_domain TEXT NOT NULL,
    organization TEXT NOT NULL,
    result_type TEXT NOT NULL,
    receiving_mx TEXT,
    count INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS failures_domain ON failures (policy_domain, start_at);
";

/// Counts of successful and failed sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub successful: u64,
    pub failed: u64,
}

/// One day of a domain's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Day {
    pub date: String,
    pub successful: u64,
    pub failed: u64,
}

/// What `tlsrpt summary` prints per policy domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainSummary {
    pub domain: String,
    /// Whether the running config serves this domain (filled by the caller).
    pub served: bool,
    pub reports: u64,
    pub successful: u64,
    pub failed: u64,
    pub by_result_type: BTreeMap<String, u64>,
    pub by_organization: BTreeMap<String, Counts>,
    pub by_policy_type: BTreeMap<String, Counts>,
    pub days: Vec<Day>,
    /// Failed sessions by receiving MX host (from failure details).
    pub by_mx: BTreeMap<String, u64>,
}

impl DomainSummary {
    fn new(domain: &str) -> DomainSummary {
        DomainSummary {
            domain: domain.to_owned(),
            served: false,
            reports: 0,
            successful: 0,
            failed: 0,
            by_result_type: BTreeMap::new(),
            by_organization: BTreeMap::new(),
            by_policy_type: BTreeMap::new(),
            days: Vec::new(),
            by_mx: BTreeMap::new(),
        }
    }

    /// Failed sessions as a share of all sessions (0 without sessions).
    pub fn failure_rate(&self) -> f64 {
        let total = self.successful + self.failed;
        if total == 0 {
            0.0
        } else {
            self.failed as f64 / total as f64
        }
    }
}

/// A stored report's original bytes, for download.
#[derive(Debug, Clone)]
pub struct RawReport {
    pub organization: String,
    pub report_id: String,
    pub raw: Vec<u8>,
}

/// The report store.
#[derive(Clone)]
pub enum ReportStore {
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    Postgres(PgStore),
}

/// Rows of the aggregate queries, the same for both engines:
/// (domain, key, reports, successful, failed).
type Agg = Vec<(String, String, i64, i64, i64)>;

fn day_of(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| "1970-01-01".to_owned())
}

impl ReportStore {
    /// `state_dir/tlsrpt.sqlite`, created (0600) if missing.
    pub fn open_sqlite(state_dir: &Path) -> Result<ReportStore, ReportStoreError> {
        crate::store::ensure_private_dir(state_dir)
            .map_err(|e| ReportStoreError::Other(format!("{}: {e}", state_dir.display())))?;
        let path = state_dir.join("tlsrpt.sqlite");
        let conn = rusqlite::Connection::open(&path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SQLITE_SCHEMA)?;
        Ok(ReportStore::Sqlite(Arc::new(Mutex::new(conn))))
    }

    /// The PostgreSQL store's report tables (schema version 2 of
    /// [`crate::store::pg::MIGRATIONS`]).
    pub fn postgres(store: PgStore) -> ReportStore {
        ReportStore::Postgres(store)
    }

    /// The store `config` uses: PostgreSQL with `[store] backend =
    /// "postgres"`, else SQLite in `state_dir`.
    pub async fn for_config(
        config: &crate::config::Config,
    ) -> Result<ReportStore, ReportStoreError> {
        match &config.store {
            crate::config::StoreConfig::Postgres(pg) => {
                let store = PgStore::open(pg, &config.server.state_dir)?;
                store.migrate().await?;
                Ok(ReportStore::postgres(store))
            }
            crate::config::StoreConfig::Files => {
                let dir = config.server.state_dir.clone();
                tokio::task::spawn_blocking(move || ReportStore::open_sqlite(&dir))
                    .await
                    .map_err(|e| ReportStoreError::Other(e.to_string()))?
            }
        }
    }

    async fn sqlite<T: Send + 'static>(
        conn: &Arc<Mutex<rusqlite::Connection>>,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, ReportStoreError> {
        let conn = Arc::clone(conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = crate::sync::lock(&conn);
            f(&mut guard).map_err(ReportStoreError::from)
        })
        .await
        .map_err(|e| ReportStoreError::Other(e.to_string()))?
    }

    /// Stores `report` (with its original bytes); `false` when a report
    /// with the same organization and id is already stored (nothing is
    /// written then).
    pub async fn insert(
        &self,
        report: &Report,
        raw: &[u8],
        source: &str,
        now: i64,
    ) -> Result<bool, ReportStoreError> {
        let report = report.clone();
        let raw = raw.to_vec();
        let source = source.to_owned();
        match self {
            ReportStore::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    let tx = c.transaction()?;
                    let inserted = tx.execute(
                        "INSERT OR IGNORE INTO reports (organization, report_id, received_at, start_at, end_at, source, raw)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        rusqlite::params![report.organization, report.report_id, now, report.start, report.end, source, raw],
                    )?;
                    if inserted == 0 {
                        return Ok(false);
                    }
                    let id = tx.last_insert_rowid();
                    let day = day_of(report.start);
                    for p in &report.policies {
                        tx.execute(
                            "INSERT INTO results (report, start_at, day, policy_domain, policy_type, organization, successful, failed, detailed_failed)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                            rusqlite::params![id, report.start, day, p.policy_domain, p.policy_type, report.organization,
                                to_i64(p.successful), to_i64(p.failed), to_i64(p.detailed_failures())],
                        )?;
                        for f in &p.failures {
                            tx.execute(
                                "INSERT INTO failures (report, start_at, policy_domain, organization, result_type, receiving_mx, count)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                                rusqlite::params![id, report.start, p.policy_domain, report.organization,
                                    f.result_type, f.receiving_mx_hostname, to_i64(f.count)],
                            )?;
                        }
                    }
                    tx.commit()?;
                    Ok(true)
                })
                .await
            }
            ReportStore::Postgres(store) => {
                let mut client = store.client().await?;
                let pg = |e: tokio_postgres::Error| ReportStoreError::Other(format!("PostgreSQL: {}", crate::store::pg::pg_message(&e)));
                let tx = client.transaction().await.map_err(pg)?;
                let row = tx
                    .query_opt(
                        "INSERT INTO mtasts_tlsrpt_reports (organization, report_id, received_at, start_at, end_at, source, raw)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (organization, report_id) DO NOTHING RETURNING id",
                        &[&report.organization, &report.report_id, &now, &report.start, &report.end, &source, &raw],
                    )
                    .await
                    .map_err(pg)?;
                let Some(row) = row else {
                    return Ok(false);
                };
                let id: i64 = row.get(0);
                let day = day_of(report.start);
                for p in &report.policies {
                    tx.execute(
                        "INSERT INTO mtasts_tlsrpt_results (report, start_at, day, policy_domain, policy_type, organization, successful, failed, detailed_failed)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        &[&id, &report.start, &day, &p.policy_domain, &p.policy_type, &report.organization,
                          &to_i64(p.successful), &to_i64(p.failed), &to_i64(p.detailed_failures())],
                    )
                    .await
                    .map_err(pg)?;
                    for f in &p.failures {
                        tx.execute(
                            "INSERT INTO mtasts_tlsrpt_failures (report, start_at, policy_domain, organization, result_type, receiving_mx, count)
                             VALUES ($1, $2, $3, $4, $5, $6, $7)",
                            &[&id, &report.start, &p.policy_domain, &report.organization, &f.result_type,
                              &f.receiving_mx_hostname, &to_i64(f.count)],
                        )
                        .await
                        .map_err(pg)?;
                    }
                }
                tx.commit().await.map_err(pg)?;
                Ok(true)
            }
        }
    }

    /// Runs one aggregate query: `group` is the extra grouping column
    /// (`''` for none), `table` `results` or `failures`.
    async fn aggregate(
        &self,
        table: &str,
        group: &str,
        since: i64,
    ) -> Result<Agg, ReportStoreError> {
        let (sum_ok, sum_failed, reports) = if table == "failures" {
            ("0", "sum(count)", "count(DISTINCT report)")
        } else {
            ("sum(successful)", "sum(failed)", "count(DISTINCT report)")
        };
        match self {
            ReportStore::Sqlite(conn) => {
                let sql = format!(
                    "SELECT policy_domain, CAST({group} AS TEXT), {reports}, {sum_ok}, {sum_failed}
                     FROM {table} WHERE start_at >= ?1 GROUP BY policy_domain, {group}"
                );
                Self::sqlite(conn, move |c| {
                    let mut stmt = c.prepare(&sql)?;
                    let rows = stmt.query_map([since], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, i64>(4)?,
                        ))
                    })?;
                    rows.collect()
                })
                .await
            }
            ReportStore::Postgres(store) => {
                let sql = format!(
                    "SELECT policy_domain, CAST({group} AS text), {reports}, CAST({sum_ok} AS bigint), CAST({sum_failed} AS bigint)
                     FROM mtasts_tlsrpt_{table} WHERE start_at >= $1 GROUP BY policy_domain, {group}"
                );
                let client = store.client().await?;
                let rows = client.query(&sql, &[&since]).await.map_err(|e| {
                    ReportStoreError::Other(format!(
                        "PostgreSQL: {}",
                        crate::store::pg::pg_message(&e)
                    ))
                })?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (
                            r.get(0),
                            r.get::<_, Option<String>>(1).unwrap_or_default(),
                            r.get(2),
                            r.get(3),
                            r.get(4),
                        )
                    })
                    .collect())
            }
        }
    }

    /// Summaries of every policy domain with reports starting at or after
    /// `since` (unix seconds), sorted by domain.
    pub async fn summary(&self, since: i64) -> Result<Vec<DomainSummary>, ReportStoreError> {
        let mut by: BTreeMap<String, DomainSummary> = BTreeMap::new();
        // Grouped by the domain alone (PostgreSQL refuses a constant in
        // GROUP BY, so the key column repeats it).
        for (domain, _, reports, ok, failed) in
            self.aggregate("results", "policy_domain", since).await?
        {
            let s = by
                .entry(domain.clone())
                .or_insert_with(|| DomainSummary::new(&domain));
            s.reports = to_u64(reports);
            s.successful = to_u64(ok);
            s.failed = to_u64(failed);
        }
        for (domain, org, _, ok, failed) in self.aggregate("results", "organization", since).await?
        {
            if let Some(s) = by.get_mut(&domain) {
                s.by_organization.insert(
                    org,
                    Counts {
                        successful: to_u64(ok),
                        failed: to_u64(failed),
                    },
                );
            }
        }
        for (domain, kind, _, ok, failed) in self.aggregate("results", "policy_type", since).await?
        {
            if let Some(s) = by.get_mut(&domain) {
                s.by_policy_type.insert(
                    kind,
                    Counts {
                        successful: to_u64(ok),
                        failed: to_u64(failed),
                    },
                );
            }
        }
        for (domain, day, _, ok, failed) in self.aggregate("results", "day", since).await? {
            if let Some(s) = by.get_mut(&domain) {
                s.days.push(Day {
                    date: day,
                    successful: to_u64(ok),
                    failed: to_u64(failed),
                });
            }
        }
        for (domain, kind, _, _, count) in self.aggregate("failures", "result_type", since).await? {
            if let Some(s) = by.get_mut(&domain) {
                s.by_result_type.insert(kind, to_u64(count));
            }
        }
        for (domain, mx, _, _, count) in self.aggregate("failures", "receiving_mx", since).await? {
            if let Some(s) = by.get_mut(&domain)
                && !mx.is_empty()
            {
                s.by_mx.insert(mx, to_u64(count));
            }
        }
        let mut out: Vec<DomainSummary> = by.into_values().collect();
        for s in &mut out {
            s.days.sort_by(|a, b| a.date.cmp(&b.date));
        }
        Ok(out)
    }

    /// Removes reports received before `before` (retention).
    pub async fn prune(&self, before: i64) -> Result<u64, ReportStoreError> {
        match self {
            ReportStore::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    c.execute("DELETE FROM reports WHERE received_at < ?1", [before])
                        .map(|n| n as u64)
                })
                .await
            }
            ReportStore::Postgres(store) => {
                let client = store.client().await?;
                client
                    .execute(
                        "DELETE FROM mtasts_tlsrpt_reports WHERE received_at < $1",
                        &[&before],
                    )
                    .await
                    .map_err(|e| {
                        ReportStoreError::Other(format!(
                            "PostgreSQL: {}",
                            crate::store::pg::pg_message(&e)
                        ))
                    })
            }
        }
    }

    /// The stored reports of `domain` (newest first, at most `limit`),
    /// with their original bytes.
    pub async fn raw_reports(
        &self,
        domain: &str,
        limit: i64,
    ) -> Result<Vec<RawReport>, ReportStoreError> {
        let domain = domain.to_owned();
        match self {
            ReportStore::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    let mut stmt = c.prepare(
                        "SELECT organization, report_id, raw FROM reports WHERE id IN
                           (SELECT report FROM results WHERE policy_domain = ?1)
                         ORDER BY start_at DESC LIMIT ?2",
                    )?;
                    let rows = stmt.query_map(rusqlite::params![domain, limit], |r| {
                        Ok(RawReport {
                            organization: r.get(0)?,
                            report_id: r.get(1)?,
                            raw: r.get(2)?,
                        })
                    })?;
                    rows.collect()
                })
                .await
            }
            ReportStore::Postgres(store) => {
                let client = store.client().await?;
                let rows = client
                    .query(
                        "SELECT organization, report_id, raw FROM mtasts_tlsrpt_reports WHERE id IN
                           (SELECT report FROM mtasts_tlsrpt_results WHERE policy_domain = $1)
                         ORDER BY start_at DESC LIMIT $2",
                        &[&domain, &limit],
                    )
                    .await
                    .map_err(|e| {
                        ReportStoreError::Other(format!(
                            "PostgreSQL: {}",
                            crate::store::pg::pg_message(&e)
                        ))
                    })?;
                Ok(rows
                    .iter()
                    .map(|r| RawReport {
                        organization: r.get(0),
                        report_id: r.get(1),
                        raw: r.get(2),
                    })
                    .collect())
            }
        }
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
