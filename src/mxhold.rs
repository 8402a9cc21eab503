//! "Never shrink under live mail": when a reload would drop names from an
//! `enforce` policy whose `mx` list comes from the mail servers'
//! certificates (`mx_certs`), the names that a live MX host of the domain
//! still depends on are kept, so a renewal that lost a name cannot make
//! enforcing senders refuse to deliver to a server that still takes mail.
//!
//! A name is kept while an MX record of the domain matches it (RFC 8461
//! §4.1 rules, wildcards included) and no name of the new list covers that
//! host. Growing a list, and dropping names no MX points to, apply at once.
//! A failed MX lookup keeps the names (it cannot show they are unused).
//! Forcing: `Control::reload_forcing_shrinks` (SIGUSR1 in `mtasts serve`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, DomainConfig, MxSource};
use crate::policy::{Mode, MxPattern};

/// Budget for one domain's MX lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Budget for all lookups of one reload (it holds the reload lock); a
/// domain not looked up in time keeps its names until the next reload.
const TOTAL_BUDGET: Duration = Duration::from_secs(30);

/// One domain whose shrink was held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub domain: String,
    /// What was served before.
    pub previous: Vec<MxPattern>,
    /// What the certificates name now.
    pub certificates: Vec<MxPattern>,
    /// The names kept in addition to `certificates`.
    pub kept: Vec<MxPattern>,
    /// Why: the live MX hosts that need `kept`, or the lookup error.
    pub reason: String,
}

/// Keeps, in `new`, the names of `applied` that live MX hosts still need
/// (see the module documentation). `resolver`: the DNS server asked for
/// MX records; `None` = none is known, so every such shrink is held.
pub async fn hold_shrinks(
    applied: &Config,
    new: &mut Config,
    resolver: Option<SocketAddr>,
) -> Vec<Held> {
    let started = Instant::now();
    let mut held = Vec::new();
    // Unchanged domains (the same `Arc`, the common case of a reload)
    // cannot shrink: both lists are in name order, so one walk compares
    // pointers, and names only where the lists differ.
    if !new.mx_certs_used {
        // Only mx lists taken from certificates are held.
        return held;
    }
    // Replaced after the walk, by position (the list is persistent: a
    // mutable walk would copy all of it).
    let mut replace: Vec<(usize, Arc<DomainConfig>)> = Vec::new();
    let mut old_walk = applied.domains.iter().peekable();
    for (at, slot) in new.domains.iter().enumerate() {
        if old_walk.next_if(|o| Arc::ptr_eq(o, slot)).is_some() {
            continue;
        }
        while old_walk.next_if(|o| o.name < slot.name).is_some() {}
        let _ = old_walk.next_if(|o| o.name == slot.name);
        let Some((old, dropped)) = shrink_of(applied, slot) else {
            continue;
        };
        let live = match resolver {
            _ if started.elapsed() > TOTAL_BUDGET => Err(format!(
                "MX lookups of this reload took over {TOTAL_BUDGET:?}; not looked up"
            )),
            Some(server) => tokio::time::timeout(
                LOOKUP_TIMEOUT,
                crate::check::mx_hosts(server, slot.name.as_str(), LOOKUP_TIMEOUT),
            )
            .await
            .unwrap_or_else(|_| Err(format!("MX lookup via {server} timed out"))),
            None => Err("no DNS resolver to look up MX records".to_owned()),
        };
        let (kept, reason) = match live {
            Ok(hosts) => {
                let needed: Vec<&String> = hosts
                    .iter()
                    .filter(|h| !slot.policy.mx.iter().any(|p| p.matches(h)))
                    .collect();
                let kept: Vec<MxPattern> = dropped
                    .into_iter()
                    .filter(|p| needed.iter().any(|h| p.matches(h)))
                    .collect();
                let hosts: Vec<&str> = needed.iter().map(|h| h.as_str()).collect();
                (kept, format!("still MX: {}", hosts.join(", ")))
            }
            Err(e) => (dropped, format!("MX lookup failed: {e}")),
        };
        if kept.is_empty() {
            continue;
        }
        let mut mx = slot.policy.mx.to_vec();
        mx.extend(kept.iter().cloned());
        mx.sort();
        mx.dedup();
        let mut domain = DomainConfig::clone(slot);
        domain.policy.mx = mx.into();
        held.push(Held {
            domain: slot.name.to_string(),
            previous: old.policy.mx.to_vec(),
            certificates: slot.policy.mx.to_vec(),
            kept,
            reason,
        });
        // Held as it was: the same `Arc`, so nothing is swapped for it.
        let domain = if domain == **old {
            Arc::clone(old)
        } else {
            Arc::new(domain)
        };
        replace.push((at, domain));
    }
    for (at, domain) in replace {
        new.domains.set(at, domain);
    }
    held
}

/// The applied entry of `new`'s domain and the names `new` drops from it,
/// when this is a shrink the hold applies to: `enforce`, the mx list from
/// certificates before and now, and at least one name gone.
fn shrink_of<'a>(
    applied: &'a Config,
    new: &Arc<DomainConfig>,
) -> Option<(&'a Arc<DomainConfig>, Vec<MxPattern>)> {
    if new.policy.mode != Mode::Enforce || !matches!(new.mx_source, MxSource::Certs(_)) {
        return None;
    }
    let i = applied
        .domains
        .binary_search_by(|d| d.name.cmp(&new.name))
        .ok()?;
    let old = applied.domains.get(i)?;
    if Arc::ptr_eq(old, new) || !matches!(old.mx_source, MxSource::Certs(_)) {
        return None;
    }
    let dropped: Vec<MxPattern> = old
        .policy
        .mx
        .iter()
        .filter(|p| !new.policy.mx.contains(p))
        .cloned()
        .collect();
    (!dropped.is_empty()).then_some((old, dropped))
}

/// `a, b, c` for logs.
pub fn list(mx: &[MxPattern]) -> String {
    let names: Vec<&str> = mx.iter().map(MxPattern::as_str).collect();
    names.join(", ")
}
