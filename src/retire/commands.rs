//! What `mtasts retire` and `mtasts dns push --prune` do to the retirement
//! records, as functions that return what happened: the CLI parses, calls
//! and prints.

use std::path::Path;
use std::time::Duration;

use super::{Observation, State, may_prune, status, unix_now};
use crate::config::Config;
use crate::dns;
use crate::dns::update::{Outcome, Pusher};
use crate::policy::DomainName;
use crate::snapshot::Snapshot;

/// What became of one domain `prune` looked at.
#[derive(Debug)]
pub enum Pruned {
    /// Its record sets were deleted (named).
    Deleted(Vec<String>),
    /// A dry run: these would be deleted.
    WouldDelete(Vec<String>),
    /// None of its records were left in the zone.
    NoneLeft,
    /// Pruned without a deletion to report (the server changed records
    /// instead of deleting them).
    Done,
    /// Not pruned: its retirement period is not over, or it is not
    /// recorded (why).
    Refused(String),
    /// The server failed the deletion.
    Failed(String),
}

impl Pruned {
    /// Counted as pruned (its retirement record goes, unless a dry run).
    pub fn pruned(&self) -> bool {
        !matches!(self, Pruned::Refused(_) | Pruned::Failed(_))
    }
}

/// `dns push --prune`: deletes the records of domains that left the config
/// after their retirement period (all recorded ones, or those of `only`
/// that are not configured), and forgets their retirement records unless
/// `dry_run`.
pub async fn prune(
    cfg: &Config,
    pusher: &mut Pusher,
    only: &[DomainName],
    dry_run: bool,
) -> anyhow::Result<Vec<(DomainName, Pruned)>> {
    let state_dir = &cfg.server.state_dir;
    let mut state = State::load(state_dir)?;
    let candidates: Vec<DomainName> = if only.is_empty() {
        state
            .domains
            .keys()
            .filter_map(|d| DomainName::parse(d).ok())
            .filter(|d| cfg.domain(d).is_none())
            .collect()
    } else {
        // Named domains that are configured are pushed, not pruned.
        only.iter()
            .filter(|d| cfg.domain(d).is_none())
            .cloned()
            .collect()
    };
    let now = unix_now();
    let mut results = Vec::with_capacity(candidates.len());
    let mut changed = false;
    for domain in candidates {
        let records = match may_prune(&state, state_dir, cfg, &domain, now) {
            Ok(entry) => entry.records(domain.as_str()),
            Err(refusal) => {
                results.push((domain, Pruned::Refused(refusal.to_string())));
                continue;
            }
        };
        let result = match pusher.prune(domain.as_str(), &records).await {
            Outcome::Deleted(sets) => Pruned::Deleted(sets),
            Outcome::WouldDelete(sets) => Pruned::WouldDelete(sets),
            Outcome::Unchanged => Pruned::NoneLeft,
            Outcome::Failed(e) => Pruned::Failed(e.to_string()),
            Outcome::Updated(_) | Outcome::WouldUpdate(_) => Pruned::Done,
        };
        if result.pruned() && !dry_run {
            state.domains.remove(domain.as_str());
            changed = true;
        }
        results.push((domain, result));
    }
    if changed {
        state.save(state_dir)?;
    }
    Ok(results)
}

/// `mtasts retire`: records the named retiring domains (`only`) as
/// published now, unless already recorded; `old_max_age` raises their
/// recorded longest max_age. Returns where every retirement stands, one
/// line each. `path` is the config file (named in errors).
pub fn record_published(
    path: &Path,
    cfg: &Config,
    only: &[DomainName],
    old_max_age: Option<Duration>,
) -> anyhow::Result<Vec<String>> {
    let mut state = State::load(&cfg.server.state_dir)?;
    for d in only {
        match cfg.domain(d) {
            Some(c) if c.retire => {}
            Some(_) => anyhow::bail!(
                "{d} is configured without retire = true: add it to its [[domain]] entry, reload, publish the new TXT (`mtasts records`), then run this again"
            ),
            None if state.domains.contains_key(d.as_str()) => {}
            None => anyhow::bail!("{d} is not configured in {}", path.display()),
        }
    }
    let started: Vec<DomainName> = only
        .iter()
        .filter(|d| cfg.domain(d).is_some())
        .cloned()
        .collect();
    let records = if started.is_empty() {
        Vec::new()
    } else {
        let snapshot = Snapshot::build(cfg);
        let side = dns::update::default_side(cfg);
        let ttl = cfg.dns_update.as_ref().and_then(|u| u.ttl);
        dns::records(&snapshot, &started, side, cfg.delegation.as_ref())?
            .into_iter()
            .map(|r| dns::Record {
                ttl: ttl.unwrap_or(r.ttl),
                ..r
            })
            .collect()
    };
    let mut changed = Observation::new(cfg).apply(&mut state, &records, unix_now());
    if let Some(longer) = old_max_age {
        for d in only {
            if let Some(entry) = state.domains.get_mut(d.as_str())
                && entry.old_max_age < longer.as_secs()
            {
                entry.old_max_age = longer.as_secs();
                changed = true;
            }
        }
    }
    if changed {
        state.save(&cfg.server.state_dir)?;
    }
    Ok(status(&state, cfg, unix_now()))
}
