//! The certificate manager's per-host bookkeeping: every configured host
//! with its due time, which hosts have an attempt under way, and the
//! counters of [`super::Progress`]. No I/O here, so the scheduling cost
//! can be measured apart from the CA (`examples/acme_queue.rs`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
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
///
/// Every manager turn asks for the due hosts, the next due time and the
/// counts; at 100,000 hosts a scan of all entries per turn made a first
/// issuance quadratic. Due times are kept in a heap and the counts are
/// updated as entries change, so a turn costs O(log N) per host it starts.
pub struct Queue<E> {
    entries: HashMap<Box<str>, E>,
    /// Hosts with an attempt running (also ones removed meanwhile, so a
    /// removed-and-re-added host never gets two attempts at once).
    busy: HashSet<Box<str>>,
    /// (due, host), earliest first (ties by name). Every host that is
    /// configured and not busy has an item with its current due time;
    /// other items are stale (the host was removed, started, or its due
    /// time changed) and are dropped when they reach the top.
    heap: BinaryHeap<Reverse<(SystemTime, Box<str>)>>,
    /// Valid and failing hosts, updated on every change of an entry.
    counts: Counts,
}

impl<E: Queued> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            entries: HashMap::new(),
            busy: HashSet::new(),
            heap: BinaryHeap::new(),
            counts: Counts::default(),
        }
    }
}

/// Stale heap items tolerated beyond one per host before the heap is
/// rebuilt (which keeps its size, and the cost of a rebuild, amortized).
/// Small in tests, so that they rebuild it often.
const STALE_SLACK: usize = if cfg!(test) { 16 } else { 1024 };

impl Counts {
    /// Counts one entry's facts in (`add`) or out.
    fn count(&mut self, entry: &impl Queued, add: bool) {
        let change = |n: &mut usize, counts: bool| {
            if counts {
                *n = if add { *n + 1 } else { n.saturating_sub(1) };
            }
        };
        change(&mut self.valid, entry.valid());
        change(&mut self.failing, entry.failing());
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
        let due = entry.due();
        self.counts.count(&entry, true);
        if let Some(old) = self.entries.insert(host.clone(), entry) {
            self.counts.count(&old, false);
        }
        self.push(due, host);
    }

    /// Forgets `host` (an attempt under way keeps it busy until [`done`]).
    ///
    /// [`done`]: Queue::done
    pub fn remove(&mut self, host: &str) -> Option<E> {
        let old = self.entries.remove(host)?;
        self.counts.count(&old, false);
        Some(old)
    }

    /// Changes the entry of `host` through `change`, if it is configured.
    pub fn update<R>(&mut self, host: &str, change: impl FnOnce(&mut E) -> R) -> Option<R> {
        let entry = self.entries.get_mut(host)?;
        let due = entry.due();
        self.counts.count(entry, false);
        let result = change(entry);
        self.counts.count(entry, true);
        let new_due = entry.due();
        if new_due != due {
            self.push(new_due, host.into());
        }
        Some(result)
    }

    /// An attempt for `host` is under way.
    pub fn is_busy(&self, host: &str) -> bool {
        self.busy.contains(host)
    }

    /// Takes up to `limit` hosts due at `now` and not busy, earliest due
    /// first (ties by name), and marks them busy.
    pub fn start(&mut self, now: SystemTime, limit: usize) -> Vec<Box<str>> {
        let mut launch = Vec::new();
        while launch.len() < limit
            && self
                .heap
                .peek()
                .is_some_and(|Reverse((due, _))| *due <= now)
        {
            let Some(Reverse((due, host))) = self.heap.pop() else {
                break;
            };
            if self.is_current(&host, due) {
                self.busy.insert(host.clone());
                launch.push(host);
            }
        }
        launch
    }

    /// The attempt for `host` has ended.
    pub fn done(&mut self, host: &str) {
        if self.busy.remove(host)
            && let Some(entry) = self.entries.get(host)
        {
            self.push(entry.due(), host.into());
        }
    }

    /// The earliest due time of a host that is not busy.
    pub fn next_due(&mut self) -> Option<SystemTime> {
        while let Some(Reverse((due, host))) = self.heap.peek() {
            if self.is_current(host, *due) {
                return Some(*due);
            }
            self.heap.pop();
        }
        None
    }

    /// The host counts.
    pub fn counts(&self) -> Counts {
        Counts {
            configured: self.entries.len(),
            ..self.counts
        }
    }

    /// A heap item for `host` due at `due` is the one it waits on.
    fn is_current(&self, host: &str, due: SystemTime) -> bool {
        !self.busy.contains(host) && self.entries.get(host).is_some_and(|e| e.due() == due)
    }

    /// Queues `host` at `due` (the host must be in `entries` already, or
    /// a rebuild here would lose it).
    fn push(&mut self, due: SystemTime, host: Box<str>) {
        self.heap.push(Reverse((due, host)));
        if self.heap.len() > 2 * self.entries.len() + STALE_SLACK {
            self.heap = self
                .entries
                .iter()
                .filter(|(h, _)| !self.busy.contains(*h))
                .map(|(h, e)| Reverse((e.due(), h.clone())))
                .collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Entry {
        due: SystemTime,
        valid: bool,
        failures: u32,
    }

    impl Queued for Entry {
        fn due(&self) -> SystemTime {
            self.due
        }
        fn valid(&self) -> bool {
            self.valid
        }
        fn failing(&self) -> bool {
            self.failures > 0
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn entry(due: u64) -> Entry {
        Entry {
            due: at(due),
            valid: false,
            failures: 0,
        }
    }

    /// The counts by a scan of every entry.
    fn recount(q: &Queue<Entry>) -> Counts {
        let entries = || q.hosts().filter_map(|h| q.get(h));
        Counts {
            configured: q.len(),
            valid: entries().filter(|e| e.valid).count(),
            failing: entries().filter(|e| e.failures > 0).count(),
        }
    }

    /// What `start` must return, by a scan (the scheduler's former way):
    /// due and not busy, sorted by (due, host), the first `limit`.
    fn due_by_scan(q: &Queue<Entry>, now: SystemTime, limit: usize) -> Vec<Box<str>> {
        let mut due: Vec<(SystemTime, Box<str>)> = q
            .hosts()
            .filter(|h| !q.is_busy(h))
            .filter_map(|h| q.get(h).map(|e| (e.due, h.clone())))
            .filter(|(t, _)| *t <= now)
            .collect();
        due.sort();
        due.into_iter().take(limit).map(|(_, h)| h).collect()
    }

    fn next_due_by_scan(q: &Queue<Entry>) -> Option<SystemTime> {
        q.hosts()
            .filter(|h| !q.is_busy(h))
            .filter_map(|h| q.get(h).map(|e| e.due))
            .min()
    }

    #[test]
    fn counts_and_due_hosts_match_a_full_scan_after_random_changes() {
        let mut rng = fastrand::Rng::with_seed(8461);
        let mut q = Queue::new();
        let mut now = 1000;
        for round in 0..20_000 {
            let host: Box<str> = format!("mta-sts.d{}.example", rng.usize(0..200)).into();
            match rng.u8(0..8) {
                0 => q.insert(host, entry(now + rng.u64(0..50))),
                1 => {
                    q.remove(&host);
                }
                2 | 3 => {
                    let (valid, failures, due) = (rng.bool(), rng.u32(0..3), rng.u64(0..100));
                    q.update(&host, |e| {
                        e.valid = valid;
                        e.failures = failures;
                        e.due = at(now + due);
                    });
                }
                4 => {
                    let limit = rng.usize(0..6);
                    let expected = due_by_scan(&q, at(now), limit);
                    assert_eq!(q.start(at(now), limit), expected, "round {round}");
                }
                5 => q.done(&host),
                6 => now += rng.u64(0..20),
                _ => assert_eq!(q.next_due(), next_due_by_scan(&q), "round {round}"),
            }
            assert_eq!(q.counts(), recount(&q), "round {round}");
        }
        // The heap stays bounded however many items went stale.
        assert!(q.heap.len() <= 2 * q.len() + STALE_SLACK);
    }

    #[test]
    fn a_busy_host_is_not_started_again_until_done() {
        let mut q = Queue::new();
        q.insert("a".into(), entry(10));
        q.insert("b".into(), entry(5));
        assert_eq!(q.start(at(10), 1), vec![Box::<str>::from("b")]);
        assert_eq!(q.next_due(), Some(at(10)));
        // Removed and re-added while its attempt runs: still busy.
        q.remove("b");
        q.insert("b".into(), entry(0));
        assert_eq!(q.start(at(10), 5), vec![Box::<str>::from("a")]);
        assert_eq!(q.next_due(), None);
        q.done("b");
        assert_eq!(q.next_due(), Some(at(0)));
        assert_eq!(q.start(at(10), 5), vec![Box::<str>::from("b")]);
    }

    #[test]
    fn a_changed_due_time_takes_effect() {
        let mut q = Queue::new();
        q.insert("a".into(), entry(10));
        q.update("a", |e| e.due = at(100));
        assert!(q.start(at(50), 5).is_empty());
        assert_eq!(q.next_due(), Some(at(100)));
        q.update("a", |e| e.due = at(20));
        assert_eq!(q.next_due(), Some(at(20)));
        assert_eq!(q.start(at(50), 5).len(), 1);
        // A removed host is neither started nor counted.
        q.insert("c".into(), entry(1));
        q.remove("c");
        assert!(q.start(at(50), 5).is_empty());
        assert_eq!(q.counts().configured, 1);
    }
}
