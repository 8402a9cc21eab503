//! The shared store of replicas: PostgreSQL (`[store] backend = "postgres"`).
//!
//! Everything `state_dir` holds in the files store lives in tables here
//! (schema in [`MIGRATIONS`]); `state_dir` keeps a copy of each certificate
//! and state as a cache, read only when the database cannot be reached, so
//! a replica keeps serving through an outage and deleting `state_dir` loses
//! nothing.
//!
//! Replicas coordinate through the database alone:
//! - one order per host cluster-wide: a claim row with a lease
//!   ([`PgStore::claim`]), renewed while the order runs; a replica that dies
//!   mid-order is replaced once its lease ends;
//! - CA pacing counted over every replica's orders ([`PgStore::order_slot`]);
//! - challenge answers in a table, so any replica answers any validation;
//! - changes announced with `NOTIFY mtasts` (`cert:<host>`, `domain`), which
//!   every replica LISTENs to ([`listen`]).
//!
//! Private keys and account credentials are encrypted with `key_file`
//! (AES-256-GCM, the row's key as associated data) before they are sent.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::{DirStore, StoreError};
use crate::config::{PgConfig, PgUrl};

/// Schema versions, applied in order by [`PgStore::migrate`]. A replica of
/// an older version keeps working on a newer schema as long as migrations
/// only add (see docs/REPLICAS.md, upgrades).
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
    "CREATE TABLE mtasts_accounts (
        directory text PRIMARY KEY,
        credentials bytea NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE mtasts_certs (
        host text PRIMARY KEY,
        bundle bytea NOT NULL,
        updated_by text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE mtasts_cert_state (
        host text PRIMARY KEY,
        state text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE mtasts_order_claims (
        host text PRIMARY KEY,
        replica text NOT NULL,
        expires_at timestamptz NOT NULL);
    CREATE TABLE mtasts_orders (
        id bigserial PRIMARY KEY,
        host text NOT NULL,
        replica text NOT NULL,
        at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX mtasts_orders_at ON mtasts_orders (at);
    CREATE TABLE mtasts_challenges (
        kind text NOT NULL,
        key text NOT NULL,
        value text NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (kind, key));
    CREATE SEQUENCE mtasts_domain_seq;
    CREATE TABLE mtasts_domains (
        name text PRIMARY KEY,
        body text,
        seq bigint NOT NULL,
        updated_by text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX mtasts_domains_seq ON mtasts_domains (seq);
    CREATE TABLE mtasts_documents (
        name text PRIMARY KEY,
        body text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE mtasts_replicas (
        id text PRIMARY KEY,
        generation bigint NOT NULL,
        served text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now());",
    ),
    (
        2,
        // TLS reports (src/tlsrpt/store.rs).
        "
CREATE TABLE IF NOT EXISTS mtasts_tlsrpt_reports (
    id bigserial PRIMARY KEY,
    organization text NOT NULL,
    report_id text NOT NULL,
    received_at bigint NOT NULL,
    start_at bigint NOT NULL,
    end_at bigint NOT NULL,
    source text NOT NULL,
    raw bytea NOT NULL,
    UNIQUE (organization, report_id));
CREATE TABLE IF NOT EXISTS mtasts_tlsrpt_results (
    report bigint NOT NULL REFERENCES mtasts_tlsrpt_reports(id) ON DELETE CASCADE,
    start_at bigint NOT NULL,
    day text NOT NULL,
    policy_domain text NOT NULL,
    policy_type text NOT NULL,
    organization text NOT NULL,
    successful bigint NOT NULL,
    failed bigint NOT NULL,
    detailed_failed bigint NOT NULL);
CREATE INDEX IF NOT EXISTS mtasts_tlsrpt_results_domain ON mtasts_tlsrpt_results (policy_domain, start_at);
CREATE TABLE IF NOT EXISTS mtasts_tlsrpt_failures (
    report bigint NOT NULL REFERENCES mtasts_tlsrpt_reports(id) ON DELETE CASCADE,
    start_at bigint NOT NULL,
    policy_domain text NOT NULL,
    organization text NOT NULL,
    result_type text NOT NULL,
    receiving_mx text,
    count bigint NOT NULL);
CREATE INDEX IF NOT EXISTS mtasts_tlsrpt_failures_domain ON mtasts_tlsrpt_failures (policy_domain, start_at);
",
    ),
];

/// The NOTIFY channel.
pub const CHANNEL: &str = "mtasts";

/// Advisory lock key of migrations (any constant; "mtst").
const MIGRATION_LOCK: i64 = 0x6d74_7374;
/// Advisory lock key of the order pacing count.
const PACING_LOCK: i64 = 0x6d74_7375;

/// Prefix of an encrypted value.
const SEALED: &[u8] = b"mtasts-aes256gcm:";

/// Challenge answers older than this are dropped (an order never takes
/// longer: see the manager's attempt timeout).
const CHALLENGE_TTL_SECS: i64 = 600;

/// Why the database could not be used.
fn db_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(format!("{what}: {e}"))
}

/// How connections to the database are made: plain, or TLS verified by
/// rustls (`sslmode=require` in the URL, or `[store] ca_file`).
#[derive(Clone)]
pub enum Tls {
    Off,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    /// The TLS settings of `cfg` for `pg` (whose ssl mode becomes
    /// `require` when a `ca_file` is given).
    pub fn of(cfg: &PgConfig, pg: &mut tokio_postgres::Config) -> Result<Tls, StoreError> {
        use tokio_postgres::config::SslMode;
        if cfg.ca_file.is_none() && pg.get_ssl_mode() != SslMode::Require {
            // `prefer` (the default) stays plain: a server's certificate is
            // only trusted when the config says which roots sign it.
            pg.ssl_mode(SslMode::Disable);
            return Ok(Tls::Off);
        }
        pg.ssl_mode(SslMode::Require);
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })?;
                use rustls_pki_types::pem::PemObject;
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| {
                        StoreError::Database(format!(
                            "{}: not a PEM certificate ({e})",
                            path.display()
                        ))
                    })?;
                    roots.add(cert).map_err(|e| {
                        StoreError::Database(format!(
                            "{}: unusable CA certificate ({e})",
                            path.display()
                        ))
                    })?;
                }
                if roots.is_empty() {
                    return Err(StoreError::Database(format!(
                        "{}: no certificate in the file",
                        path.display()
                    )));
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
            config,
        )))
    }

    fn manager(&self, pg: tokio_postgres::Config, mc: ManagerConfig) -> Manager {
        match self {
            Tls::Off => Manager::from_config(pg, tokio_postgres::NoTls, mc),
            Tls::Rustls(t) => Manager::from_config(pg, t.clone(), mc),
        }
    }
}

/// The PostgreSQL store of one replica.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    pg: tokio_postgres::Config,
    tls: Tls,
    cache: DirStore,
    cipher: Option<LessSafeKey>,
    timeout: Duration,
    lease: Duration,
    /// This replica's id (host name, pid, random suffix).
    replica: String,
    /// The last query reached the database.
    reachable: AtomicBool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("replica", &self.inner.replica)
            .finish_non_exhaustive()
    }
}

/// Reads the URL of `cfg` (a `url_file` is read now; it should be 0600).
pub fn connection_config(cfg: &PgConfig) -> Result<tokio_postgres::Config, StoreError> {
    let text = match &cfg.url {
        PgUrl::Inline(url) => url.clone(),
        PgUrl::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
            warn_if_readable(path);
            text.trim().to_owned()
        }
    };
    crate::config::check_pg_url(&text)
        .map_err(|e| StoreError::Database(format!("store.url: {e}")))?;
    let mut config: tokio_postgres::Config = text
        .parse()
        .map_err(|e| StoreError::Database(format!("store.url: {e}")))?;
    config.connect_timeout(cfg.connect_timeout);
    // A replica that vanishes without closing its connections (power, a
    // partition) is noticed by the server within about a minute.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    if config.get_application_name().is_none() {
        config.application_name("mtasts");
    }
    Ok(config)
}

#[cfg(unix)]
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), "secret file is readable by others; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable(_: &Path) {}

/// The AES-256-GCM key in `path`: 32 bytes, raw, hex or base64 text.
pub fn read_key_file(path: &Path) -> Result<LessSafeKey, StoreError> {
    let bytes = std::fs::read(path).map_err(|source| StoreError::Io {
        path: path.to_owned(),
        source,
    })?;
    warn_if_readable(path);
    let key = if bytes.len() == 32 {
        bytes
    } else {
        let text = String::from_utf8_lossy(&bytes).trim().to_owned();
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .or_else(|_| data_encoding::BASE64.decode(text.as_bytes()))
            .or_else(|_| data_encoding::BASE64URL_NOPAD.decode(text.as_bytes()))
            .map_err(|_| {
                StoreError::Database(format!(
                    "{}: not a key: expected 32 bytes, as they are, in hex or in base64 (e.g. `openssl rand -hex 32`)",
                    path.display()
                ))
            })?
    };
    if key.len() != 32 {
        return Err(StoreError::Database(format!(
            "{}: the key has {} bytes, not 32 (e.g. `openssl rand -hex 32`)",
            path.display(),
            key.len()
        )));
    }
    let unbound = UnboundKey::new(&AES_256_GCM, &key)
        .map_err(|_| StoreError::Database("AES-256-GCM key rejected".to_owned()))?;
    Ok(LessSafeKey::new(unbound))
}

/// This process's replica id: `$MTASTS_REPLICA`, else the host name (a
/// Kubernetes pod's name) with the pid.
fn replica_id() -> String {
    if let Ok(id) = std::env::var("MTASTS_REPLICA")
        && !id.trim().is_empty()
    {
        return id.trim().to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mtasts".to_owned());
    format!("{host}-{}", std::process::id())
}

/// A held order claim: renewed in the background, released when dropped.
pub struct PgClaim {
    renew: tokio::task::JoinHandle<()>,
    store: PgStore,
    host: String,
}

impl Drop for PgClaim {
    fn drop(&mut self) {
        self.renew.abort();
        let store = self.store.clone();
        let host = std::mem::take(&mut self.host);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = store.release(&host).await {
                    tracing::debug!(host, error = %e, "cannot release the order claim; it ends with its lease");
                }
            });
        }
    }
}

impl PgStore {
    /// Connects (checking the database answers within `connect_timeout`)
    /// and applies the schema. `state_dir` becomes the cache.
    pub async fn connect(cfg: &PgConfig, state_dir: &Path) -> Result<PgStore, StoreError> {
        let store = PgStore::open(cfg, state_dir)?;
        store.migrate().await?;
        Ok(store)
    }

    /// The store of `cfg`, without connecting yet (connections are made on
    /// use): a replica starts from its cache while the database is down.
    pub fn open(cfg: &PgConfig, state_dir: &Path) -> Result<PgStore, StoreError> {
        let mut pg = connection_config(cfg)?;
        let tls = Tls::of(cfg, &mut pg)?;
        let cipher = match &cfg.key_file {
            Some(path) => Some(read_key_file(path)?),
            None => {
                tracing::warn!(
                    "[store] has no key_file: private keys and ACME account credentials are stored in PostgreSQL unencrypted (docs/REPLICAS.md)"
                );
                None
            }
        };
        let cache = DirStore::open(state_dir)?;
        let manager = tls.manager(
            pg.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.connect_timeout))
            .create_timeout(Some(cfg.connect_timeout))
            .recycle_timeout(Some(cfg.connect_timeout))
            .build()
            .map_err(|e| db_err("connection pool", e))?;
        let store = PgStore {
            inner: Arc::new(Inner {
                pool,
                pg,
                tls,
                cache,
                cipher,
                timeout: cfg.connect_timeout.max(Duration::from_secs(1)) * 2,
                lease: cfg.lease,
                replica: replica_id(),
                reachable: AtomicBool::new(false),
            }),
        };
        Ok(store)
    }

    /// This replica's id in the tables.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// The local cache in `state_dir`.
    pub fn cache(&self) -> &DirStore {
        &self.inner.cache
    }

    /// Whether the last query reached the database.
    pub fn reachable(&self) -> bool {
        self.inner.reachable.load(Ordering::Relaxed)
    }

    /// The connection settings (for the LISTEN connection).
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.inner.pg
    }

    /// How connections are made (for the LISTEN connection).
    pub fn tls(&self) -> &Tls {
        &self.inner.tls
    }

    /// Runs `fut` with the query timeout, recording whether the database
    /// answered.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.inner.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(db_err(what, pg_message(&e))),
            Err(_) => Err(db_err(
                what,
                format!("no answer within {} s", self.inner.timeout.as_secs()),
            )),
        };
        self.inner.reachable.store(
            match &result {
                Ok(_) => true,
                // An SQL error is an answer; a broken connection is not.
                Err(StoreError::Database(m)) => {
                    !m.contains("no answer") && !m.contains("connection")
                }
                Err(_) => true,
            },
            Ordering::Relaxed,
        );
        result
    }

    /// A pooled connection (for tables outside this module: TLS reports).
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        match self.inner.pool.get().await {
            Ok(c) => Ok(c),
            Err(e) => {
                self.inner.reachable.store(false, Ordering::Relaxed);
                let why = match &e {
                    deadpool_postgres::PoolError::Backend(pe) => pg_message(pe),
                    deadpool_postgres::PoolError::Timeout(_) => {
                        format!("no connection within {} s", self.inner.timeout.as_secs())
                    }
                    other => other.to_string(),
                };
                Err(db_err("cannot connect to PostgreSQL", why))
            }
        }
    }

    /// Applies the missing schema versions, one transaction each, under an
    /// advisory lock: replicas starting at once apply each version once.
    /// Returns the versions applied now.
    pub async fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        let mut client = self.client().await?;
        let tx = self.timed("migrate", client.transaction()).await?;
        self.timed(
            "migrate",
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]),
        )
        .await?;
        self.timed(
            "migrate",
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS mtasts_schema (
                    version integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now())",
            ),
        )
        .await?;
        let rows = self
            .timed(
                "migrate",
                tx.query("SELECT version FROM mtasts_schema", &[]),
            )
            .await?;
        let have: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        let mut applied = Vec::new();
        for (version, sql) in MIGRATIONS {
            if have.contains(version) {
                continue;
            }
            self.timed("migrate", tx.batch_execute(sql)).await?;
            self.timed(
                "migrate",
                tx.execute(
                    "INSERT INTO mtasts_schema (version) VALUES ($1)",
                    &[version],
                ),
            )
            .await?;
            applied.push(*version);
        }
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if let Some(max) = have.iter().max()
            && *max > newest
        {
            tracing::warn!(
                schema = max,
                known = newest,
                "the database schema is newer than this mtasts; running on the tables it knows"
            );
        }
        self.timed("migrate", tx.commit()).await?;
        for v in &applied {
            tracing::info!(version = v, "applied PostgreSQL schema migration");
        }
        Ok(applied)
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.timed("ping", client.simple_query("SELECT 1")).await?;
        Ok(())
    }

    fn seal(&self, aad: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let Some(key) = &self.inner.cipher else {
            return Ok(plain.to_vec());
        };
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| db_err("encrypt", "no randomness"))?;
        let mut buf = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut buf,
        )
        .map_err(|_| db_err("encrypt", "sealing failed"))?;
        let mut out = Vec::with_capacity(SEALED.len() + NONCE_LEN + buf.len());
        out.extend_from_slice(SEALED);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    fn unseal(&self, aad: &str, stored: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let Some(rest) = stored.strip_prefix(SEALED) else {
            // Stored before a key_file was set: used as it is (re-encrypted
            // at its next write).
            return Ok(stored);
        };
        let Some(key) = &self.inner.cipher else {
            return Err(StoreError::Database(format!(
                "{aad}: stored encrypted, and [store] has no key_file to decrypt it"
            )));
        };
        if rest.len() < NONCE_LEN {
            return Err(StoreError::Database(format!(
                "{aad}: encrypted value is truncated"
            )));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| db_err("decrypt", "bad nonce"))?;
        let mut buf = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| {
                StoreError::Database(format!(
                    "{aad}: cannot decrypt (another key_file, or the value was altered)"
                ))
            })?;
        Ok(plain.to_vec())
    }

    async fn fetch_cert(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = self
            .timed(
                "load certificate",
                client.query_opt("SELECT bundle FROM mtasts_certs WHERE host = $1", &[&host]),
            )
            .await?;
        row.map(|r| self.unseal(host, r.get(0))).transpose()
    }

    async fn notify(
        &self,
        client: &deadpool_postgres::Object,
        payload: &str,
    ) -> Result<(), StoreError> {
        self.timed(
            "notify",
            client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]),
        )
        .await?;
        Ok(())
    }

    /// Claims the right to order for `host` for one lease; `Err(left)`
    /// when another replica holds a claim for `left` more. The claim is
    /// renewed every third of the lease until it is dropped.
    pub async fn claim(&self, host: &str) -> Result<Result<PgClaim, Duration>, StoreError> {
        let client = self.client().await?;
        let lease = self.inner.lease.as_secs_f64();
        let row = self
            .timed(
                "claim order",
                client.query_opt(
                    "INSERT INTO mtasts_order_claims (host, replica, expires_at)
                     VALUES ($1, $2, now() + make_interval(secs => $3))
                     ON CONFLICT (host) DO UPDATE
                       SET replica = EXCLUDED.replica, expires_at = EXCLUDED.expires_at
                       WHERE mtasts_order_claims.expires_at < now()
                          OR mtasts_order_claims.replica = EXCLUDED.replica
                     RETURNING replica",
                    &[&host, &self.inner.replica, &lease],
                ),
            )
            .await?;
        if row.is_none() {
            let left = self
                .timed(
                    "claim order",
                    client.query_opt(
                        "SELECT extract(epoch FROM expires_at - now())::float8
                         FROM mtasts_order_claims WHERE host = $1",
                        &[&host],
                    ),
                )
                .await?
                .map_or(1.0, |r| r.get::<_, f64>(0));
            return Ok(Err(Duration::from_secs_f64(left.clamp(0.5, lease + 1.0))));
        }
        let store = self.clone();
        let renew_host = host.to_owned();
        let every = self.inner.lease / 3;
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let renewed = async {
                    let client = store.client().await?;
                    store
                        .timed(
                            "renew claim",
                            client.execute(
                                "UPDATE mtasts_order_claims SET expires_at = now() + make_interval(secs => $3)
                                 WHERE host = $1 AND replica = $2",
                                &[&renew_host, &store.inner.replica, &lease],
                            ),
                        )
                        .await
                };
                if let Err(e) = renewed.await {
                    tracing::warn!(host = %renew_host, error = %e, "cannot renew the order claim");
                }
            }
        });
        Ok(Ok(PgClaim {
            renew,
            store: self.clone(),
            host: host.to_owned(),
        }))
    }

    /// Whether this replica still holds the claim on `key` (its lease did
    /// not end, e.g. while the process was frozen).
    pub async fn holds(&self, key: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = self
            .timed(
                "check claim",
                client.query_opt(
                    "SELECT 1 FROM mtasts_order_claims
                     WHERE host = $1 AND replica = $2 AND expires_at > now()",
                    &[&key, &self.inner.replica],
                ),
            )
            .await?;
        Ok(row.is_some())
    }

    async fn release(&self, host: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.timed(
            "release claim",
            client.execute(
                "DELETE FROM mtasts_order_claims WHERE host = $1 AND replica = $2",
                &[&host, &self.inner.replica],
            ),
        )
        .await?;
        Ok(())
    }

    /// Takes one of `per_hour` order slots counted over every replica:
    /// `None` when taken (the order is recorded), else how long until one
    /// frees up.
    pub async fn order_slot(
        &self,
        host: &str,
        per_hour: u32,
    ) -> Result<Option<Duration>, StoreError> {
        let mut client = self.client().await?;
        let tx = self.timed("order pacing", client.transaction()).await?;
        self.timed(
            "order pacing",
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PACING_LOCK]),
        )
        .await?;
        let row = self
            .timed(
                "order pacing",
                tx.query_one(
                    "SELECT count(*), extract(epoch FROM (min(at) + interval '1 hour' - now()))::float8
                     FROM mtasts_orders WHERE at > now() - interval '1 hour'",
                    &[],
                ),
            )
            .await?;
        let count: i64 = row.get(0);
        if count >= i64::from(per_hour) {
            let wait: Option<f64> = row.get(1);
            self.timed("order pacing", tx.rollback()).await?;
            return Ok(Some(Duration::from_secs_f64(
                wait.unwrap_or(60.0).clamp(1.0, 3600.0),
            )));
        }
        self.timed(
            "order pacing",
            tx.execute(
                "INSERT INTO mtasts_orders (host, replica) VALUES ($1, $2)",
                &[&host, &self.inner.replica],
            ),
        )
        .await?;
        // Kept for a day, for `mtasts certs` and debugging.
        self.timed(
            "order pacing",
            tx.execute(
                "DELETE FROM mtasts_orders WHERE at < now() - interval '1 day'",
                &[],
            ),
        )
        .await?;
        self.timed("order pacing", tx.commit()).await?;
        Ok(None)
    }

    /// Publishes a challenge answer for every replica.
    pub async fn put_challenge(
        &self,
        kind: &str,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.timed(
            "publish challenge",
            client.execute(
                "INSERT INTO mtasts_challenges (kind, key, value, expires_at)
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4))
                 ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at",
                &[&kind, &key, &value, &(CHALLENGE_TTL_SECS as f64)],
            ),
        )
        .await?;
        Ok(())
    }

    /// Withdraws challenge answers (and any expired ones).
    pub async fn remove_challenges(&self, kind: &str, keys: &[String]) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.timed(
            "withdraw challenge",
            client.execute(
                "DELETE FROM mtasts_challenges WHERE (kind = $1 AND key = ANY($2)) OR expires_at < now()",
                &[&kind, &keys],
            ),
        )
        .await?;
        Ok(())
    }

    /// A challenge answer another replica published.
    pub async fn challenge(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = self
            .timed(
                "look up challenge",
                client.query_opt(
                    "SELECT value FROM mtasts_challenges WHERE kind = $1 AND key = $2 AND expires_at > now()",
                    &[&kind, &key],
                ),
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}

/// The message of a database error, with the server's detail when there is
/// one (tokio-postgres' Display says only "db error").
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut m = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                m.push_str(&format!(": {s}"));
                source = s.source();
            }
            if e.is_closed() {
                m.push_str(" (connection closed)");
            }
            m
        }
    }
}

mod certs;
mod replicas;
pub use replicas::{DomainRow, Event, Imported, ReplicaRow, listen};
