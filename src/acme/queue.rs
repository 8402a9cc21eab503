//! The certificate manager's per-host bookkeeping: every configured host
//! with its due time, which hosts have an attempt under way, and the
//! counters of [`super::Progress`]. No I/O here, so the scheduling cost
//! can be measured apart from the CA (`examples/acme_queue.rs`).

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

/// What the queue needs to know of an entry.
pub trait Queued {
    /// When the next attempt (order, ARI check, retry) is due.
    fn due(&self) -> SystemTime;
    /// The host has a usable certificate.
    fn valid(&self) -> bool;
    /// The host's last attempt failed.
    fn failing(&self) -> bool;
}

/// Host counts for [`super::Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Hosts in the queue (the configured ones).
    pub configured: usize,
    /// Hosts with a usable certificate.
    pub valid: usize,
    /// Hosts whose last attempt failed.
    pub failing: usize,
}

/// The configured hosts and their entries, and the hosts with an attempt
/// under way.
pub struct Queue<E> {
    entries: HashMap<Box<str>, E>,
    /// Hosts with an attempt running (also ones removed meanwhile, so a
    /// removed-and-re-added host never gets two attempts at once).
    busy: HashSet<Box<str>>,
}

impl<E: Queued> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            entries: HashMap::new(),
            busy: HashSet::new(),
        }
    }
}

impl<E: Queued> Queue<E> {
    /// An empty queue.
    pub fn new() -> Queue<E> {
        Queue::default()
    }

    /// Number of configured hosts.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No host configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `host`.
    pub fn get(&self, host: &str) -> Option<&E> {
        self.entries.get(host)
    }

    /// `host` is configured.
    pub fn contains(&self, host: &str) -> bool {
        self.entries.contains_key(host)
    }

    /// The configured hosts, in no particular order.
    pub fn hosts(&self) -> impl Iterator<Item = &Box<str>> {
        self.entries.keys()
    }

    /// Adds `host`, or replaces its entry.
    pub fn insert(&mut self, host: Box<str>, entry: E) {
        self.entries.insert(host, entry);
    }

    /// Forgets `host` (an attempt under way keeps it busy until [`done`]).
    ///
    /// [`done`]: Queue::done
    pub fn remove(&mut self, host: &str) -> Option<E> {
        self.entries.remove(host)
    }

    /// Changes the entry of `host` through `change`, if it is configured.
    pub fn update<R>(&mut self, host: &str, change: impl FnOnce(&mut E) -> R) -> Option<R> {
        self.entries.get_mut(host).map(change)
    }

    /// An attempt for `host` is under way.
    pub fn is_busy(&self, host: &str) -> bool {
        self.busy.contains(host)
    }

    /// Takes up to `limit` hosts due at `now` and not busy, earliest due
    /// first (ties by name), and marks them busy.
    pub fn start(&mut self, now: SystemTime, limit: usize) -> Vec<Box<str>> {
        let mut due: Vec<(&Box<str>, SystemTime)> = self
            .entries
            .iter()
            .filter(|(h, e)| !self.busy.contains(*h) && e.due() <= now)
            .map(|(h, e)| (h, e.due()))
            .collect();
        due.sort_by_key(|(h, t)| (*t, (*h).clone()));
        let launch: Vec<Box<str>> = due
            .into_iter()
            .take(limit)
            .map(|(h, _)| h.clone())
            .collect();
        for host in &launch {
            self.busy.insert(host.clone());
        }
        launch
    }

    /// The attempt for `host` has ended.
    pub fn done(&mut self, host: &str) {
        self.busy.remove(host);
    }

    /// The earliest due time of a host that is not busy.
    pub fn next_due(&mut self) -> Option<SystemTime> {
        self.entries
            .iter()
            .filter(|(h, _)| !self.busy.contains(*h))
            .map(|(_, e)| e.due())
            .min()
    }

    /// The host counts.
    pub fn counts(&self) -> Counts {
        Counts {
            configured: self.entries.len(),
            valid: self.entries.values().filter(|e| e.valid()).count(),
            failing: self.entries.values().filter(|e| e.failing()).count(),
        }
    }
}
