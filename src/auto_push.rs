//! The automatic push of `serve` (`[dns.update] auto_push`): after each
//! snapshot is served, one background task pushes its records with
//! [`crate::dns::update::Pusher`], so a new id never reaches DNS before
//! this server serves its body. With replicas on PostgreSQL only the
//! leader pushes, once every live replica serves the same records, and the
//! retirement state is pulled before and pushed after (docs/REPLICAS.md).
//!
//! Server wiring, apart from `dns`: it depends on `retire`, `replica` and
//! the shared store, which `dns` itself does not.

use std::time::Duration;

use crate::config::{Config, DnsUpdate};
use crate::dns::update::{Outcome, Pusher, default_side};
use crate::dns::{Record, RecordsError};
use crate::snapshot::Snapshot;

/// What the automatic push sends: one config generation's records.
#[derive(Debug)]
struct Job {
    update: DnsUpdate,
    records: Vec<Record>,
    /// Retiring domains: their publication starts the retirement clock.
    retire: crate::retire::Observation,
    /// Digest of `records` (replicas: what every replica must serve first).
    digest: String,
}

/// How long the automatic push waits before trying a failed push again
/// (unless a newer snapshot arrives first).
const AUTO_RETRY: Duration = Duration::from_secs(60);

/// Automatic push from `serve`: [`AutoPush::submit`] is called after a
/// snapshot is being served (at start and after each reload), and one
/// background task pushes the newest submitted snapshot, so a new id never
/// reaches DNS before this server serves its body. Pushes never overlap;
/// a snapshot submitted during a push replaces any that waited.
///
/// Replicas sharing a PostgreSQL store ([`AutoPush::start_gated`]): only
/// the replica holding the leader lock pushes, and only once every live
/// replica reports serving the same records (docs/REPLICAS.md).
#[derive(Debug, Clone)]
pub struct AutoPush {
    tx: std::sync::Arc<tokio::sync::watch::Sender<Option<std::sync::Arc<Job>>>>,
}

/// What gates the push of replicas: the shared store, how long a silent
/// replica is still waited for, and how often to look.
#[derive(Debug)]
pub struct PushGate {
    pub store: crate::store::pg::PgStore,
    pub replica_timeout: Duration,
    pub poll: Duration,
}

/// The claim (lease) that makes a replica the `auto_push` leader; not a
/// host name, so it never collides with an order claim.
const LEADER_CLAIM: &str = "#auto_push";

/// How often a replica that is not the leader tries to become it.
const LEADER_RETRY: Duration = Duration::from_secs(5);

/// How often the leader says which replicas it still waits for.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(60);

impl AutoPush {
    /// Spawns the background task (on the current tokio runtime).
    pub fn start() -> AutoPush {
        let (tx, rx) = tokio::sync::watch::channel(None);
        tokio::spawn(auto_push_worker(rx, None));
        AutoPush {
            tx: std::sync::Arc::new(tx),
        }
    }

    /// [`AutoPush::start`] for one of several replicas.
    pub fn start_gated(gate: PushGate) -> AutoPush {
        let (tx, rx) = tokio::sync::watch::channel(None);
        tokio::spawn(auto_push_worker(rx, Some(gate)));
        AutoPush {
            tx: std::sync::Arc::new(tx),
        }
    }

    /// Queues a push of `snapshot`'s records if `config` enables it.
    pub fn submit(&self, config: &Config, snapshot: &Snapshot) -> Result<(), RecordsError> {
        let Some(update) = config.dns_update.as_ref().filter(|u| u.auto_push) else {
            return Ok(());
        };
        let records = crate::dns::records(
            snapshot,
            &[],
            default_side(config),
            config.delegation.as_ref(),
        )?;
        self.tx.send_replace(Some(std::sync::Arc::new(Job {
            update: update.clone(),
            digest: crate::dns::records_digest(&records),
            records,
            retire: crate::retire::Observation::new(config),
        })));
        Ok(())
    }
}

/// Whether the gated push may go now.
enum Gate {
    Go,
    Wait(Duration),
}

/// The leader's claim (a lease renewed in the background: a replica that
/// dies or freezes loses it) and when it last said whom it waits for.
#[derive(Default)]
struct Leadership {
    claim: Option<crate::store::pg::PgClaim>,
    last_wait_log: Option<std::time::Instant>,
}

impl PushGate {
    async fn check(&self, lead: &mut Leadership, digest: &str) -> Gate {
        if lead.claim.is_some() {
            match self.store.holds(LEADER_CLAIM).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("no longer the auto_push leader (the lease ended)");
                    lead.claim = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dns push waits: cannot check the leader lease");
                    return Gate::Wait(self.poll);
                }
            }
        }
        if lead.claim.is_none() {
            match self.store.claim(LEADER_CLAIM).await {
                Ok(Ok(claim)) => {
                    tracing::info!("this replica runs auto_push for the cluster");
                    lead.claim = Some(claim);
                }
                Ok(Err(left)) => return Gate::Wait(left.min(LEADER_RETRY)),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot claim the auto_push leadership");
                    return Gate::Wait(LEADER_RETRY);
                }
            }
        }
        let replicas = match self.store.replicas(self.replica_timeout).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "dns push waits: cannot read the replicas' heartbeats");
                return Gate::Wait(self.poll);
            }
        };
        let me = self.store.replica();
        let behind: Vec<String> = replicas
            .iter()
            .filter(|r| r.served != digest)
            .map(|r| format!("{} (generation {})", r.id, r.generation))
            .collect();
        if behind.is_empty() && replicas.iter().any(|r| r.id == me) {
            lead.last_wait_log = None;
            return Gate::Go;
        }
        let now = std::time::Instant::now();
        if lead
            .last_wait_log
            .is_none_or(|t| now.duration_since(t) >= WAIT_LOG_EVERY)
        {
            lead.last_wait_log = Some(now);
            tracing::info!(
                waiting_for = ?behind,
                "dns push waits until every live replica serves the new policies"
            );
        }
        Gate::Wait(self.poll)
    }
}

async fn auto_push_worker(
    mut rx: tokio::sync::watch::Receiver<Option<std::sync::Arc<Job>>>,
    gate: Option<PushGate>,
) {
    let mut lead = Leadership::default();
    while rx.changed().await.is_ok() {
        loop {
            let Some(job) = rx.borrow_and_update().clone() else {
                break;
            };
            if let Some(gate) = &gate
                && let Gate::Wait(wait) = gate.check(&mut lead, &job.digest).await
            {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            // The retirement records are shared between replicas: the
            // leader works on the database's copy.
            let state_dir = &job.retire.state_dir;
            if let Some(gate) = &gate
                && let Err(e) = crate::documents::pull_documents(&gate.store, state_dir).await
            {
                tracing::warn!(error = %e, "dns push: cannot read the shared retirement records; using the local copy");
            }
            let done = run_auto_push(&job).await;
            if let Some(gate) = &gate
                && let Err(e) = crate::documents::push_documents(&gate.store, state_dir).await
            {
                tracing::error!(error = %e, "dns push: cannot share the retirement records");
            }
            if done {
                break;
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(AUTO_RETRY) => {}
            }
        }
    }
}

/// One automatic push, logged; `true` when nothing failed.
async fn run_auto_push(job: &Job) -> bool {
    let mut pusher = match Pusher::new(&job.update, false) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("dns push: {e}");
            return false;
        }
    };
    let report = pusher.push(&job.records).await;
    for (domain, outcome) in &report.domains {
        match outcome {
            Outcome::Updated(sets) => {
                tracing::info!(domain = %domain, rrsets = %sets.join(", "), "dns push: updated")
            }
            Outcome::Failed(e) => tracing::error!(domain = %domain, "dns push: {e}"),
            Outcome::Deleted(sets) => {
                tracing::info!(domain = %domain, rrsets = %sets.join(", "), "dns push: deleted")
            }
            Outcome::Unchanged | Outcome::WouldUpdate(_) | Outcome::WouldDelete(_) => {}
        }
    }
    let published = report.published();
    match job
        .retire
        .record(&job.records, &published, &job.update.zone, job.update.ttl)
    {
        Ok(true) => tracing::info!("dns push: retirement state updated"),
        Ok(false) => {}
        // A retirement whose start is not recorded cannot be pruned later:
        // safe, but say so.
        Err(e) => tracing::error!("dns push: cannot record retirements: {e}"),
    }
    if let Some(e) = &report.aborted {
        tracing::error!(
            "dns push stopped: {e}; retrying in {} s unless the config changes",
            AUTO_RETRY.as_secs()
        );
    }
    tracing::info!(
        server = %job.update.server,
        failed = report.failed(),
        "dns push finished"
    );
    report.failed() == 0
}
