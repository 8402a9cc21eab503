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
    by_host: HashSet<ByHost>,
    /// Sites in domain-name order (for records output and listings).
    ordered: Vec<Arc<Site>>,
    /// Shared with the snapshots built from this one.
    renderings: Arc<Mutex<Renderings>>,
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

    /// [`Snapshot::build_from`], and which hosts came and went. The host
    /// index is the previous one with the change applied (when the change
    /// is small): a reload that changes one domain of a million does not
    /// hash a million hosts again.
    pub fn build_next(config: &Config, previous: &Snapshot) -> (Snapshot, Delta) {
        let mut old = previous.ordered.iter().peekable();
        let shared = Arc::clone(&previous.renderings);
        let mut renderings = crate::sync::lock(&shared);
        let mut delta = Delta::default();
        let mut replaced: Vec<Arc<Site>> = Vec::new();
        let ordered: Vec<Arc<Site>> = config
            .domains
            .iter()
            .map(|d| {
                // The same config `Arc`: the same site (no name compared).
                if let Some(same) = old.next_if(|s| Arc::ptr_eq(&s.domain, d)) {
                    return Arc::clone(same);
                }
                while let Some(gone) = old.next_if(|s| s.domain.name < d.name) {
                    delta.removed.push(gone.host().into_boxed_str());
                }
                match old.next_if(|s| s.domain.name == d.name) {
                    Some(prev) => {
                        let site = Site::renew(d, prev, &mut renderings);
                        if !Arc::ptr_eq(&site, prev) {
                            replaced.push(Arc::clone(&site));
                        }
                        site
                    }
                    None => {
                        let site = Arc::new(Site::with(Arc::clone(d), &mut renderings));
                        replaced.push(Arc::clone(&site));
                        site
                    }
                }
            })
            .collect();
        drop(renderings);
        delta.removed.extend(old.map(|s| s.host().into_boxed_str()));
        delta.changed = replaced.len() + delta.removed.len();
        // Applying the change to a copy of the index is cheaper than a new
        // index until about a quarter of the sites changed.
        let by_host = if delta.changed < ordered.len() / 4 {
            let mut by_host = previous.by_host.clone();
            for host in &delta.removed {
                if let Some(name) = host.strip_prefix("mta-sts.") {
                    by_host.remove(name);
                }
            }
            for site in replaced {
                by_host.replace(ByHost(site));
            }
            by_host
        } else {
            ordered.iter().map(|s| ByHost(Arc::clone(s))).collect()
        };
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
        self.by_host.get(name).map(|s| &s.0)
    }

    pub fn sites(&self) -> &[Arc<Site>] {
        &self.ordered
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}
