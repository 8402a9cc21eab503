//! The immutable view the server answers from: policy host → pre-rendered
//! site. Built once per validated config and swapped in whole, so a request
//! only does a map lookup and clones reference-counted bytes.
//!
//! A reload builds the next snapshot from the previous one: a domain whose
//! config is the same `Arc` keeps its site (rendered body, id, ETag), one
//! whose policy is equal keeps the rendered bytes, so a reload renders and
//! allocates in proportion to the change, not to the number of domains.
//!
//! Equal policies share one rendering ([`Rendered`]): a provider's domains
//! mostly serve the same body, so a million domains hold a handful of
//! bodies, ids and ETags instead of a million (about 280 bytes a domain).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

use axum::http::HeaderValue;
use bytes::Bytes;

use crate::config::{Config, DomainConfig};
use crate::persistent::Edits;
use crate::policy::{Policy, PolicyId};

/// A policy as served: shared by every site whose policy is equal.
#[derive(Debug)]
pub struct Rendered {
    /// The exact policy bytes served (RFC 8461 §3.2).
    pub body: Bytes,
    /// Derived from `body`; published in the `_mta-sts` TXT record.
    pub id: PolicyId,
    /// `"<id>"`, so caches and people can tell policy versions apart.
    pub etag: HeaderValue,
}

impl Rendered {
    fn new(policy: &Policy) -> Rendered {
        let body = policy.render();
        let id = PolicyId::for_body(&body);
        // The id is 32 hex digits, always a valid header value.
        let etag = HeaderValue::from_str(&format!("\"{id}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"\""));
        Rendered { body, id, etag }
    }
}

/// Renderings by policy, shared by the snapshots of one process: a policy
/// is rendered once while any site serves it. Entries whose rendering is
/// gone are dropped when the table has doubled since the last sweep.
#[derive(Debug, Default)]
pub struct Renderings {
    by_policy: HashMap<Policy, Weak<Rendered>>,
    sweep_at: usize,
}

impl Renderings {
    /// `policy` rendered: the rendering already made, when one is alive.
    pub fn get(&mut self, policy: &Policy) -> Arc<Rendered> {
        if let Some(r) = self.by_policy.get(policy).and_then(Weak::upgrade) {
            return r;
        }
        let r = Arc::new(Rendered::new(policy));
        self.by_policy.insert(policy.clone(), Arc::downgrade(&r));
        if self.by_policy.len() > self.sweep_at {
            self.by_policy.retain(|_, w| w.strong_count() > 0);
            self.sweep_at = (self.by_policy.len() * 2).max(1024);
        }
        r
    }
}

/// Everything served for one domain, rendered ahead of time. The rendered
/// policy (`body`, `id`, `etag`) is reached through `Deref`.
#[derive(Debug)]
pub struct Site {
    pub domain: Arc<DomainConfig>,
    pub rendered: Arc<Rendered>,
}

impl std::ops::Deref for Site {
    type Target = Rendered;

    fn deref(&self) -> &Rendered {
        &self.rendered
    }
}

impl Site {
    /// `mta-sts.<domain>` (made when asked: not stored, a million of them
    /// were 64 MB).
    pub fn host(&self) -> String {
        self.domain.name.policy_host()
    }

    /// `domain`'s site, reusing `previous`'s rendering when the policy is the same.
    fn renew(
        domain: &Arc<DomainConfig>,
        previous: &Arc<Site>,
        renderings: &mut Renderings,
    ) -> Arc<Site> {
        if Arc::ptr_eq(domain, &previous.domain) {
            Arc::clone(previous)
        } else if domain.name == previous.domain.name && domain.policy == previous.domain.policy {
            Arc::new(Site {
                domain: Arc::clone(domain),
                rendered: Arc::clone(&previous.rendered),
            })
        } else {
            Arc::new(Site::with(Arc::clone(domain), renderings))
        }
    }

    /// A site rendered on its own (not shared with other sites).
    pub fn new(domain: Arc<DomainConfig>) -> Site {
        Site {
            rendered: Arc::new(Rendered::new(&domain.policy)),
            domain,
        }
    }

    fn with(domain: Arc<DomainConfig>, renderings: &mut Renderings) -> Site {
        Site {
            rendered: renderings.get(&domain.policy),
            domain,
        }
    }
}

/// A site in the host index, found by its domain name (the host without
/// `mta-sts.`; no second copy of the name).
#[derive(Debug, Clone)]
struct ByHost(Arc<Site>);

impl Borrow<str> for ByHost {
    fn borrow(&self) -> &str {
        self.0.domain.name.as_str()
    }
}

impl PartialEq for ByHost {
    fn eq(&self, other: &Self) -> bool {
        self.0.domain.name == other.0.domain.name
    }
}

impl Eq for ByHost {}

impl Hash for ByHost {
    // Must hash as the `str` it borrows as.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.domain.name.as_str().hash(state);
    }
}

/// What a new snapshot changed against the one it was built from.
#[derive(Debug, Default)]
pub struct Delta {
    /// Hosts served before and not now.
    pub removed: Vec<Box<str>>,
    /// Sites added, replaced or removed.
    pub changed: usize,
}

/// One consistent generation of all sites.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The host index, cut into [`SHARDS`] tables by a hash of the name: a
    /// reload copies only the tables its change touches and shares the
    /// others with the previous snapshot. Empty until the first build.
    by_host: Box<[Arc<HashSet<ByHost>>]>,
    /// Sites in domain-name order (for records output and listings); a
    /// persistent vector shared, outside the change, with the previous
    /// snapshot.
    ordered: imbl::Vector<Arc<Site>>,
    /// Shared with the snapshots built from this one.
    renderings: Arc<Mutex<Renderings>>,
}

/// Tables of the host index. At a million domains about a thousand sites
/// each: a one-domain reload copies one of them (tens of µs), not the
/// million-entry index (19% of a reload's time before, issue 11).
const SHARDS: usize = 1024;

/// Which table of the host index holds `name` (FNV-1a: a few ns for a
/// domain name; the table hashes it again with its own keys).
fn shard(name: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize % SHARDS
}

/// A new host index of `sites`. The sites are put in their tables' buckets
/// first (FNV, one pass); the tables (SipHash inserts, most of the work)
/// are then built on two threads when there are many: at a million
/// domains that is a tenth of the start.
fn new_index(sites: &imbl::Vector<Arc<Site>>) -> Box<[Arc<HashSet<ByHost>>]> {
    let mut buckets: Vec<Vec<Arc<Site>>> = vec![Vec::new(); SHARDS];
    for site in sites.iter() {
        buckets[shard(site.domain.name.as_str())].push(Arc::clone(site));
    }
    let build = |buckets: Vec<Vec<Arc<Site>>>| -> Vec<Arc<HashSet<ByHost>>> {
        buckets
            .into_iter()
            .map(|b| Arc::new(b.into_iter().map(ByHost).collect()))
            .collect()
    };
    if sites.len() < 100_000 {
        return build(buckets).into_boxed_slice();
    }
    let second = buckets.split_off(SHARDS / 2);
    let (first, second) = std::thread::scope(|scope| {
        let other = scope.spawn(|| build(second));
        let first = build(buckets);
        (first, other.join())
    });
    match second {
        Ok(second) => first.into_iter().chain(second).collect(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

impl Snapshot {
    pub fn build(config: &Config) -> Snapshot {
        Self::build_from(config, &Snapshot::default())
    }

    /// The snapshot of `config`, keeping `previous`'s sites of unchanged
    /// domains. Both are in domain-name order, so this is one merge walk.
    pub fn build_from(config: &Config, previous: &Snapshot) -> Snapshot {
        Self::build_next(config, previous).0
    }

    /// [`Snapshot::build_from`], and which hosts came and went. The site
    /// list and the host index are the previous ones with the change
    /// applied (when the change is small): a reload that changes one domain
    /// of a million neither hashes nor copies a million sites.
    pub fn build_next(config: &Config, previous: &Snapshot) -> (Snapshot, Delta) {
        let mut old = previous.ordered.iter().enumerate().peekable();
        let shared = Arc::clone(&previous.renderings);
        let mut renderings = crate::sync::lock(&shared);
        let mut delta = Delta::default();
        // By position in the previous list.
        let mut edits: Edits<Arc<Site>> = Edits::default();
        for d in config.domains.iter() {
            // The same config `Arc`: the same site (no name compared).
            if old.next_if(|(_, s)| Arc::ptr_eq(&s.domain, d)).is_some() {
                continue;
            }
            while let Some((at, gone)) = old.next_if(|(_, s)| s.domain.name < d.name) {
                delta.removed.push(gone.host().into_boxed_str());
                edits.removes.push(at);
            }
            match old.next_if(|(_, s)| s.domain.name == d.name) {
                Some((at, prev)) => {
                    let site = Site::renew(d, prev, &mut renderings);
                    if !Arc::ptr_eq(&site, prev) {
                        edits.sets.push((at, site));
                    }
                }
                None => {
                    let at = old.peek().map_or(previous.ordered.len(), |(at, _)| *at);
                    let site = Arc::new(Site::with(Arc::clone(d), &mut renderings));
                    edits.inserts.push((at, site));
                }
            }
        }
        drop(renderings);
        for (at, gone) in old {
            delta.removed.push(gone.host().into_boxed_str());
            edits.removes.push(at);
        }
        delta.changed = edits.len();
        let end = config.domains.len();
        // Applying the change to the previous index is cheaper than a new
        // one until about a quarter of the sites changed.
        let by_host = if delta.changed < end / 4 && !previous.by_host.is_empty() {
            let mut by_host = previous.by_host.clone();
            for host in &delta.removed {
                if let Some(name) = host.strip_prefix("mta-sts.") {
                    Arc::make_mut(&mut by_host[shard(name)]).remove(name);
                }
            }
            for (_, site) in edits.sets.iter().chain(&edits.inserts) {
                let table = Arc::make_mut(&mut by_host[shard(site.domain.name.as_str())]);
                table.replace(ByHost(Arc::clone(site)));
            }
            Some(by_host)
        } else {
            None
        };
        let ordered = edits.apply(&previous.ordered);
        let by_host = by_host.unwrap_or_else(|| new_index(&ordered));
        debug_assert_eq!(ordered.len(), end);
        let snapshot = Snapshot {
            by_host,
            ordered,
            renderings: shared,
        };
        (snapshot, delta)
    }

    /// Looks up a normalised policy host (`mta-sts.<domain>`, lowercase).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Site>> {
        let name = host.strip_prefix("mta-sts.")?;
        self.by_host.get(shard(name))?.get(name).map(|s| &s.0)
    }

    pub fn sites(&self) -> &imbl::Vector<Arc<Site>> {
        &self.ordered
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A config of the domains `d<i>.example` for `i` in `range`, those in
    /// `testing` with mode testing.
    fn config(range: impl Iterator<Item = usize>, testing: &[usize]) -> Config {
        let mut text = String::from(
            "[defaults]\nmode = \"enforce\"\nmx = [\"mx.example.net\"]\nmax_age = \"1w\"\n",
        );
        for i in range {
            text.push_str(&format!("[[domain]]\nname = \"d{i}.example\"\n"));
            if testing.contains(&i) {
                text.push_str("mode = \"testing\"\n");
            }
        }
        Config::from_source(Path::new("t.toml"), Path::new("."), text).expect("valid config")
    }

    /// Names, ids and what every host of `hosts` looks up to.
    fn view(s: &Snapshot, hosts: &[String]) -> (Vec<String>, Vec<String>, Vec<Option<String>>) {
        (
            s.sites()
                .iter()
                .map(|x| x.domain.name.to_string())
                .collect(),
            s.sites().iter().map(|x| x.id.to_string()).collect(),
            hosts
                .iter()
                .map(|h| s.lookup(h).map(|x| format!("{} {}", x.domain.name, x.id)))
                .collect(),
        )
    }

    /// `base` with the domains of `all` picked by `keep` (by number), the
    /// changed ones from `alt`: shared `Arc`s, as the loader leaves them.
    fn pick(
        base: &Config,
        all: &Config,
        alt: &Config,
        keep: impl Fn(usize) -> bool,
        changed: &[usize],
    ) -> Config {
        let number = |d: &DomainConfig| -> usize {
            d.name
                .as_str()
                .trim_start_matches('d')
                .trim_end_matches(".example")
                .parse()
                .expect("number")
        };
        let mut cfg = base.clone();
        cfg.domains = all
            .domains
            .iter()
            .zip(alt.domains.iter())
            .filter(|(d, _)| keep(number(d)))
            .map(|(d, a)| Arc::clone(if changed.contains(&number(d)) { a } else { d }))
            .collect();
        cfg
    }

    #[test]
    fn a_snapshot_built_from_the_previous_one_equals_a_fresh_one() {
        let hosts: Vec<String> = (0..260).map(|i| format!("mta-sts.d{i}.example")).collect();
        let all = config(0..260, &[]);
        let alt = config(0..260, &[7, 150, 151]);
        let first_cfg = pick(&all, &all, &alt, |i| i < 200, &[]);
        let first = Snapshot::build(&first_cfg);
        // Small change (edits applied to the shared list and index): three
        // removed (first, middle, last), two added (inside, at the end),
        // one changed.
        let next = pick(
            &all,
            &all,
            &alt,
            |i| (1..199).contains(&i) && i != 50 || i == 205 || i == 201,
            &[7],
        );
        let (built, delta) = Snapshot::build_next(&next, &first);
        assert_eq!(view(&built, &hosts), view(&Snapshot::build(&next), &hosts));
        assert_eq!(delta.changed, 6);
        let mut removed: Vec<&str> = delta.removed.iter().map(|h| &**h).collect();
        removed.sort_unstable();
        assert_eq!(
            removed,
            [
                "mta-sts.d0.example",
                "mta-sts.d199.example",
                "mta-sts.d50.example"
            ]
        );
        assert!(built.lookup("mta-sts.d50.example").is_none());
        assert!(built.lookup("mta-sts.d205.example").is_some());
        // The unchanged sites are the previous snapshot's.
        let same = |s: &Snapshot, h: &str| s.lookup(h).map(Arc::as_ptr);
        assert_eq!(
            same(&built, "mta-sts.d8.example"),
            same(&first, "mta-sts.d8.example")
        );
        assert_ne!(
            same(&built, "mta-sts.d7.example"),
            same(&first, "mta-sts.d7.example")
        );
        // The previous snapshot still serves what it served.
        assert_eq!(
            view(&first, &hosts),
            view(&Snapshot::build(&first_cfg), &hosts)
        );

        // A large change (a new list and index, replayed in one pass).
        let other = pick(&all, &all, &alt, |i| i >= 100, &[150, 151]);
        let (built, delta) = Snapshot::build_next(&other, &first);
        assert_eq!(view(&built, &hosts), view(&Snapshot::build(&other), &hosts));
        assert_eq!(delta.removed.len(), 100);
    }
}
