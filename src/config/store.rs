//! `[store]`: where certificates, keys, ACME state and API-managed domains
//! live. `backend = "files"` (the default) keeps them in `state_dir`;
//! `backend = "postgres"` shares them between replicas (docs/REPLICAS.md).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Report, Source, duration};

/// `[store]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreConfig {
    /// Everything in `state_dir` (one machine).
    #[default]
    Files,
    /// Shared state in PostgreSQL; `state_dir` is a cache.
    Postgres(PgConfig),
}

/// Where the database URL comes from (it may hold a password: never
/// printed).
#[derive(Clone, PartialEq, Eq)]
pub enum PgUrl {
    Inline(String),
    /// Read at start; should be 0600.
    File(PathBuf),
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgUrl::Inline(_) => f.write_str("Inline(<redacted>)"),
            PgUrl::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// `[store]` with `backend = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    pub url: PgUrl,
    /// Connections per replica (besides the LISTEN connection).
    pub pool_size: usize,
    /// Connecting, and each query, give up after this long.
    pub connect_timeout: Duration,
    /// 32 random bytes (hex or base64 text, or raw): private keys and ACME
    /// account credentials are encrypted with it (AES-256-GCM) before they
    /// reach the database. Without it they are stored as they are.
    pub key_file: Option<PathBuf>,
    /// PEM roots that sign the database server's certificate; setting it
    /// (or `sslmode=require` in the URL) makes the connection TLS, always
    /// verified (the platform's roots without it).
    pub ca_file: Option<PathBuf>,
    /// How long an order claim lasts unless its replica renews it: a
    /// replica that dies mid-order is replaced after this long.
    pub lease: Duration,
    /// How often a replica reports what it serves (and renews its claims'
    /// liveness for `auto_push`).
    pub heartbeat: Duration,
    /// A replica silent for longer is not waited for by `auto_push`.
    pub replica_timeout: Duration,
}

/// Defaults of the `[store]` knobs.
pub const POOL_SIZE: usize = 8;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const LEASE: Duration = Duration::from_secs(60);
pub const HEARTBEAT: Duration = Duration::from_secs(2);
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    backend: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    url_file: Option<Spanned<String>>,
    pool_size: Option<Spanned<i64>>,
    connect_timeout: Option<Spanned<toml::Value>>,
    key_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    lease: Option<Spanned<toml::Value>>,
    heartbeat: Option<Spanned<toml::Value>>,
    replica_timeout: Option<Spanned<toml::Value>>,
}

pub(super) fn store_config(
    source: &Source,
    raw: Option<Spanned<RawStore>>,
    report: &mut Report,
) -> StoreConfig {
    let Some(raw) = raw else {
        return StoreConfig::Files;
    };
    let span = raw.span();
    let raw = raw.into_inner();
    let backend = raw
        .backend
        .as_ref()
        .map_or("files", |b| b.get_ref().as_str());
    match backend {
        "files" => {
            let extra = [
                ("url", raw.url.as_ref().map(Spanned::span)),
                ("url_file", raw.url_file.as_ref().map(Spanned::span)),
                ("key_file", raw.key_file.as_ref().map(Spanned::span)),
                ("ca_file", raw.ca_file.as_ref().map(Spanned::span)),
            ];
            for (key, at) in extra {
                if let Some(at) = at {
                    report.errors.push(source.at(
                        at,
                        format!("store.{key} needs backend = \"postgres\" (the files store keeps everything in state_dir)"),
                    ));
                }
            }
            return StoreConfig::Files;
        }
        "postgres" => {}
        other => {
            let at = raw.backend.as_ref().map_or(span.clone(), Spanned::span);
            report.errors.push(source.at(
                at,
                format!("store.backend: {other:?} is not a backend; use \"files\" or \"postgres\""),
            ));
            return StoreConfig::Files;
        }
    }
    let url = match (raw.url, raw.url_file) {
        (Some(_), Some(file)) => {
            report.errors.push(source.at(
                file.span(),
                "store.url and store.url_file are both set; keep one",
            ));
            return StoreConfig::Files;
        }
        (Some(url), None) => {
            if let Err(e) = check_url(url.get_ref()) {
                report
                    .errors
                    .push(source.at(url.span(), format!("store.url: {e}")));
                return StoreConfig::Files;
            }
            PgUrl::Inline(url.into_inner())
        }
        (None, Some(file)) => PgUrl::File(source.resolve(file.get_ref())),
        (None, None) => {
            report.errors.push(source.at(
                span,
                "backend = \"postgres\" needs `url` (postgres://user@host:5432/db) or `url_file` (a 0600 file holding it)",
            ));
            return StoreConfig::Files;
        }
    };
    let mut pool_size = POOL_SIZE;
    if let Some(n) = &raw.pool_size {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if (1..=1000).contains(&v) => pool_size = v,
            _ => report
                .errors
                .push(source.at(n.span(), "store.pool_size must be between 1 and 1000")),
        }
    }
    let mut positive = |key: &str, v: &Option<Spanned<toml::Value>>, default: Duration| match v {
        None => default,
        Some(v) => match duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                report
                    .errors
                    .push(source.at(v.span(), format!("store.{key} must be longer than 0")));
                default
            }
            Err(e) => {
                report
                    .errors
                    .push(source.at(v.span(), format!("store.{key}: {e}")));
                default
            }
        },
    };
    let connect_timeout = positive("connect_timeout", &raw.connect_timeout, CONNECT_TIMEOUT);
    let lease = positive("lease", &raw.lease, LEASE);
    let heartbeat = positive("heartbeat", &raw.heartbeat, HEARTBEAT);
    let replica_timeout = positive("replica_timeout", &raw.replica_timeout, REPLICA_TIMEOUT);
    if replica_timeout <= heartbeat
        && let Some(v) = &raw.replica_timeout
    {
        report.errors.push(source.at(
            v.span(),
            "store.replica_timeout must be longer than store.heartbeat",
        ));
    }
    StoreConfig::Postgres(PgConfig {
        url,
        pool_size,
        connect_timeout,
        key_file: raw.key_file.map(|k| source.resolve(k.get_ref())),
        ca_file: raw.ca_file.map(|k| source.resolve(k.get_ref())),
        lease,
        heartbeat,
        replica_timeout,
    })
}

/// Whether `url` is a PostgreSQL connection URL the client can use; the
/// message never repeats the URL (it may hold a password).
pub fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("expected postgres://user@host:port/database".to_owned());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("not a usable connection URL ({e})"))
}
