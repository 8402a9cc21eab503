//! One replica among several sharing a PostgreSQL store
//! (`[store] backend = "postgres"`, docs/REPLICAS.md):
//! - API-managed domains are rows; each replica mirrors them into its
//!   `domains_dir` ([`DomainSync`]) and reloads, within a second of the
//!   write (LISTEN/NOTIFY, with a periodic catch-up as a safety net);
//! - a certificate another replica stored is served here at once;
//! - a heartbeat records what this replica publishes, so the `auto_push`
//!   leader pushes a new id only once every live replica serves it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::control::Control;
use crate::metrics::Trigger;
use crate::policy::DomainName;
use crate::snapshot::Snapshot;
use crate::store::pg::{self, DomainRow, Event, PgStore};
use crate::store::{self as files, StoreError};

/// First line of every file the admin API writes into `domains_dir`.
pub const MANAGED_HEADER: &str = "# Managed by the mtasts admin API";

/// How often the rows are looked at without a notification (a missed
/// NOTIFY, e.g. during a reconnect, is caught up within this).
const CATCH_UP_EVERY: Duration = Duration::from_secs(30);

/// Mirrors the API-managed domain rows into `domains_dir`.
pub struct DomainSync {
    dir: PathBuf,
    /// Highest row sequence number applied.
    seen: i64,
}

/// A file [`DomainSync`] changed, with what it held before (to undo).
pub struct Changed {
    pub path: PathBuf,
    pub name: String,
    pub previous: Option<Vec<u8>>,
}

impl DomainSync {
    pub fn new(dir: &Path) -> DomainSync {
        DomainSync {
            dir: dir.to_owned(),
            seen: 0,
        }
    }

    /// Applies every row changed since the last call (every row the first
    /// time): writes files whose text differs, removes API files of deleted
    /// domains. Returns what it changed.
    pub async fn catch_up(&mut self, store: &PgStore) -> Result<Vec<Changed>, StoreError> {
        let rows = store.domains_since(self.seen).await?;
        let dir = self.dir.clone();
        let (changed, seen) = tokio::task::spawn_blocking(move || apply_rows(&dir, &rows))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        self.seen = self.seen.max(seen);
        Ok(changed)
    }

    /// Puts back what [`DomainSync::catch_up`] changed (its reload was
    /// rejected); the rows stay, so a later catch-up does not retry them
    /// until they change again.
    pub fn undo(changed: &[Changed]) {
        for c in changed {
            let result = match &c.previous {
                Some(bytes) => files::write_atomic(&c.path, bytes, files::PUBLIC_MODE),
                None => std::fs::remove_file(&c.path).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }),
            };
            if let Err(e) = result {
                tracing::error!(file = %c.path.display(), "cannot undo a replicated domain change: {e}");
            }
        }
    }
}

fn apply_rows(dir: &Path, rows: &[DomainRow]) -> (Vec<Changed>, i64) {
    let mut changed = Vec::new();
    let mut seen = 0;
    for row in rows {
        seen = seen.max(row.seq);
        // The name becomes a file name: only a valid domain name does.
        let name = match DomainName::parse(&row.name) {
            Ok(n) if n.as_str() == row.name => n,
            _ => {
                tracing::error!(name = %row.name, "ignoring a stored domain whose name is not a domain");
                continue;
            }
        };
        let path = dir.join(format!("{name}.toml"));
        let previous = match std::fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::error!(file = %path.display(), "cannot read: {e}");
                continue;
            }
        };
        let result = match (&row.body, &previous) {
            (Some(body), Some(old)) if body.as_bytes() == old.as_slice() => continue,
            (Some(body), _) => files::write_atomic(&path, body.as_bytes(), files::PUBLIC_MODE),
            (None, None) => continue,
            (None, Some(old)) => {
                if !old.starts_with(MANAGED_HEADER.as_bytes()) {
                    tracing::warn!(
                        file = %path.display(),
                        "a replica deleted {name} through the API, but this file was not written by the API; left alone"
                    );
                    continue;
                }
                std::fs::remove_file(&path)
            }
        };
        match result {
            Ok(()) => changed.push(Changed {
                path,
                name: name.to_string(),
                previous,
            }),
            Err(e) => tracing::error!(file = %path.display(), "cannot mirror a stored domain: {e}"),
        }
    }
    (changed, seen)
}

/// What a replica publishes: a digest of every DNS record of `snapshot`
/// (so two replicas with equal digests publish the same ids, and serve the
/// same policy bodies).
pub fn served_digest(config: &Config, snapshot: &Snapshot) -> String {
    let side = crate::dns::update::default_side(config);
    match crate::dns::records(snapshot, &[], side, config.delegation.as_ref()) {
        Ok(records) => crate::dns::records_digest(&records),
        Err(e) => format!("error: {e}"),
    }
}

/// Runs the replica's side of the shared store until the process ends:
/// follows other replicas' changes and sends heartbeats.
pub async fn run(
    control: Arc<Control>,
    store: PgStore,
    mut sync: Option<DomainSync>,
    heartbeat: Duration,
) {
    let (tx, mut events) = mpsc::unbounded_channel();
    tokio::spawn(pg::listen(
        store.pg_config().clone(),
        store.tls().clone(),
        tx,
    ));
    let beat = tokio::spawn(heartbeats(Arc::clone(&control), store.clone(), heartbeat));
    let mut catch_up = tokio::time::interval(CATCH_UP_EVERY);
    catch_up.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let domains = tokio::select! {
            event = events.recv() => match event {
                None => break,
                Some(Event::Cert(host)) => {
                    control.server().store_changed(&host);
                    false
                }
                Some(Event::Domains | Event::Resync) => true,
            },
            _ = catch_up.tick() => true,
        };
        if domains && let Some(sync) = sync.as_mut() {
            apply(&control, &store, sync).await;
        }
    }
    beat.abort();
}

/// One catch-up of the domain rows, reloaded if anything changed (undone
/// if the reload is rejected).
async fn apply(control: &Arc<Control>, store: &PgStore, sync: &mut DomainSync) {
    let lock = control.lock().await;
    let changed = match sync.catch_up(store).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the shared domains; serving what is loaded");
            return;
        }
    };
    if changed.is_empty() {
        return;
    }
    let names: Vec<&str> = changed.iter().map(|c| c.name.as_str()).collect();
    match control.reload_locked(&lock, Trigger::Store).await {
        Ok(r) => tracing::info!(
            domains = ?names,
            generation = r.generation,
            "applied domain changes of another replica"
        ),
        Err(e) => {
            tracing::error!(domains = ?names, "domain changes of another replica rejected here: {e}");
            DomainSync::undo(&changed);
        }
    }
}

/// Records this replica's generation and served digest every `every`.
async fn heartbeats(control: Arc<Control>, store: PgStore, every: Duration) {
    let mut digest: Option<(u64, String)> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let generation = control.server().generation();
        if digest.as_ref().is_none_or(|(g, _)| *g != generation) {
            let config = control.config();
            let snapshot = control.server().snapshot();
            let generation = control.server().generation();
            let d = tokio::task::spawn_blocking(move || served_digest(&config, &snapshot))
                .await
                .unwrap_or_default();
            digest = Some((generation, d));
        }
        if let Some((generation, d)) = &digest
            && let Err(e) = store.heartbeat(*generation, d).await
        {
            tracing::debug!(error = %e, "heartbeat not recorded");
        }
    }
}
