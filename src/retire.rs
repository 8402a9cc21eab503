//! Retiring MTA-STS for a domain (RFC 8461 §8.3): publish `mode: none` (a
//! small max_age such as one day is fine) with a new id, keep it until every
//! policy served before has expired from senders' caches, and only then
//! remove the records. This module owns the small durable record of each
//! retirement (`state_dir/retire.json`), including the longest `max_age`
//! each domain ever published, and decides when a removed domain's records
//! may be deleted (`mtasts dns push --prune`).
//!
//! The clock starts when the `mode: none` id is *published*: when `dns push`
//! (or `serve` with `auto_push`) has put it in DNS, or when the operator says
//! so with `mtasts retire DOMAIN` after publishing it by hand. A sender may
//! hold the old policy for `max_age` after its last fetch, and resolvers may
//! show it the old id for one TTL after the new one is published (a sender
//! that sees an unchanged id keeps its cached policy), so removal is safe at
//! `since + wait + ttl`, where `wait` is the longest `max_age` the domain
//! ever published (§8.3: earlier policies may have had a longer one than the
//! last), and never less than one day: Stalwart caches a policy whose
//! max_age is under 3600 s for 86400 s.
//!
//! Every change only moves that moment later or drops an entry whose domain
//! serves a real policy again, so a lost concurrent write (CLI and `serve`
//! both recording) can delay a prune, never make one unsafe.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::dns::Record;
use crate::policy::{DomainName, MAX_AGE_LIMIT};
use crate::store;

pub mod commands;

/// The state file's name inside `state_dir`.
pub const FILE_NAME: &str = "retire.json";

/// Format version written to the file; a newer one is refused.
const VERSION: u32 = 1;

/// The shortest retirement wait, whatever the max_age: Stalwart caches a
/// policy whose max_age is under 3600 s for 86400 s.
pub const MIN_WAIT: u64 = 86_400;

/// Why the retirement state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid retirement state file: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One record mtasts published for a retiring domain: what `--prune`
/// deletes once the period is over (the config no longer names it then).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Owner, fully qualified with trailing dot.
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub value: String,
    /// The zone it was published in (trailing dot).
    pub zone: String,
}

/// One retiring domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix seconds when the `mode: none` id was first published.
    pub since: u64,
    /// The longest `max_age` the domain ever published, in seconds: senders
    /// may still cache a policy that old (never lowered while the entry
    /// lives; at most [`MAX_AGE_LIMIT`]).
    pub old_max_age: u64,
    /// TTL of the published `_mta-sts` TXT (the largest seen).
    pub ttl: u32,
    /// Every record published for the domain while retiring.
    pub records: Vec<StoredRecord>,
}

impl Entry {
    /// How long senders may still cache an earlier policy once the mode
    /// none id is published: the longest max_age, at least [`MIN_WAIT`].
    pub fn wait(&self) -> u64 {
        self.old_max_age.max(MIN_WAIT)
    }

    /// Unix seconds from which removing the records is safe.
    pub fn safe_after(&self) -> u64 {
        self.since
            .saturating_add(self.wait())
            .saturating_add(u64::from(self.ttl))
    }

    /// The stored records as [`Record`]s of `domain`, limited to what
    /// mtasts publishes for it, so that even a damaged or edited state file
    /// cannot make `--prune` delete anything else: the `_mta-sts` TXT
    /// (`v=STSv1`, in the domain's zone or a delegation zone), the
    /// `_smtp._tls` TXT (`v=TLSRPTv1`) and the `mta-sts` A/AAAA/CNAME.
    pub fn records(&self, domain: &str) -> Vec<Record> {
        let sts = format!("_mta-sts.{domain}.");
        let tlsrpt = format!("_smtp._tls.{domain}.");
        let host = format!("mta-sts.{domain}.");
        let delegated = format!("{domain}.");
        self.records
            .iter()
            .filter_map(|r| {
                let name = r.name.to_ascii_lowercase();
                let is_sts = r.value.starts_with("v=STSv1");
                let rtype = match r.rtype.as_str() {
                    "TXT" if name == sts && is_sts => "TXT",
                    "TXT" if name == tlsrpt && r.value.starts_with("v=TLSRPTv1") => "TXT",
                    // Delegated hosting: `<domain>.<zone>` or `h-<hash>.<zone>`.
                    "TXT"
                        if is_sts
                            && name != delegated
                            && (name.starts_with(&delegated) || name.starts_with("h-")) =>
                    {
                        "TXT"
                    }
                    "A" if name == host => "A",
                    "AAAA" if name == host => "AAAA",
                    "CNAME" if name == host => "CNAME",
                    _ => return None,
                };
                Some(Record {
                    domain: domain.to_owned(),
                    name: r.name.clone(),
                    rtype,
                    ttl: self.ttl,
                    value: r.value.clone(),
                    zone: r.zone.clone(),
                })
            })
            .collect()
    }
}

/// The contents of `retire.json`: retiring domains by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    version: u32,
    pub domains: BTreeMap<String, Entry>,
    /// Domains that serve a real policy → the longest `max_age` (seconds)
    /// they published so far, so that a retirement that also lowers
    /// `max_age` still waits for the longest one (RFC 8461 §8.3).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub max_age_published: BTreeMap<String, u64>,
}

/// `state_dir/retire.json`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

impl State {
    /// Reads the state; a missing file is an empty state. A damaged file is
    /// an error: silently starting over would lose retirement clocks.
    pub fn load(state_dir: &Path) -> Result<State, RetireError> {
        let path = path(state_dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => return Err(RetireError::Read { path, source }),
        };
        let corrupt = |detail: String| RetireError::Corrupt {
            path: path.clone(),
            detail,
        };
        let state: State = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if state.version > VERSION {
            return Err(corrupt(format!(
                "version {} is newer than this mtasts understands ({VERSION})",
                state.version
            )));
        }
        let mut state = state;
        for (name, entry) in &mut state.domains {
            DomainName::parse(name).map_err(|e| corrupt(format!("domain {name:?}: {e}")))?;
            clamp_max_age(&path, name, &mut entry.old_max_age);
        }
        for (name, max_age) in &mut state.max_age_published {
            clamp_max_age(&path, name, max_age);
        }
        Ok(state)
    }

    /// Writes the state atomically (`store::write_atomic`).
    pub fn save(&self, state_dir: &Path) -> Result<(), RetireError> {
        let path = path(state_dir);
        let write_err = |source| RetireError::Write {
            path: path.clone(),
            source,
        };
        store::ensure_private_dir(state_dir).map_err(write_err)?;
        let mut state = self.clone();
        state.version = VERSION;
        let mut json = serde_json::to_vec_pretty(&state)
            .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
        json.push(b'\n');
        store::write_atomic(&path, &json, store::PUBLIC_MODE).map_err(write_err)
    }
}

/// A stored max_age over RFC 8461's limit (a hand edit, or a file written
/// before `--old-max-age` was bounded) is read as the limit: no policy can
/// be cached longer, and the arithmetic on it stays in range.
fn clamp_max_age(path: &Path, domain: &str, max_age: &mut u64) {
    if *max_age > MAX_AGE_LIMIT {
        tracing::warn!(
            "{}: {domain}: max_age {} s is over RFC 8461's limit of {MAX_AGE_LIMIT} s; using {MAX_AGE_LIMIT} s",
            path.display(),
            *max_age
        );
        *max_age = MAX_AGE_LIMIT;
    }
}

/// What a config says about retirement, detached from it so that the
/// automatic push can carry it to its background task.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Where `retire.json` lives.
    pub state_dir: PathBuf,
    /// Retiring domains → their configured `max_age` (the old policy's:
    /// `retire = true` keeps it).
    retiring: HashMap<String, u64>,
    /// Domains configured without `retire` → their `max_age`: they serve a
    /// real policy, so an entry of theirs is an abandoned retirement.
    active: HashMap<String, u64>,
}

impl Observation {
    pub fn new(config: &Config) -> Observation {
        let mut retiring = HashMap::new();
        let mut active = HashMap::new();
        for d in &config.domains {
            if d.retire {
                retiring.insert(d.name.to_string(), d.policy.max_age);
            } else {
                active.insert(d.name.to_string(), d.policy.max_age);
            }
        }
        Observation {
            state_dir: config.server.state_dir.clone(),
            retiring,
            active,
        }
    }

    /// Whether `domain` is configured with `retire = true`.
    pub fn is_retiring(&self, domain: &str) -> bool {
        self.retiring.contains_key(domain)
    }

    /// Whether any domain retires or the state may need cleaning.
    pub fn is_empty(&self) -> bool {
        self.retiring.is_empty()
    }

    /// After a push to `zone`: records the retiring domains among
    /// `published` (domains whose records are now in DNS, updated or
    /// already there) with the records of them inside the zone, TTLs as
    /// pushed (`ttl` overrides), and the max_age every other published
    /// domain serves, and saves the state if it changed. Also drops entries
    /// of domains that serve a real policy again.
    pub fn record(
        &self,
        records: &[Record],
        published: &std::collections::HashSet<&str>,
        zone: &DomainName,
        ttl: Option<u32>,
    ) -> Result<bool, RetireError> {
        let apex = format!("{zone}.");
        let suffix = format!(".{zone}.");
        let mine: Vec<Record> = records
            .iter()
            .filter(|r| published.contains(r.domain.as_str()))
            .filter(|r| self.is_retiring(&r.domain) || self.active.contains_key(&r.domain))
            .filter(|r| {
                let name = r.name.to_ascii_lowercase();
                name == apex || name.ends_with(&suffix)
            })
            .map(|r| Record {
                ttl: ttl.unwrap_or(r.ttl),
                ..r.clone()
            })
            .collect();
        let path = path(&self.state_dir);
        if mine.is_empty() && !path.exists() {
            return Ok(false);
        }
        let mut state = State::load(&self.state_dir)?;
        let changed = self.apply(&mut state, &mine, unix_now());
        if changed {
            state.save(&self.state_dir)?;
        }
        Ok(changed)
    }

    /// Records that `published` (records of configured domains, TTLs as
    /// they went to DNS) are in DNS as of `now`: a retiring domain's clock
    /// starts, any other domain's max_age counts towards the longest it
    /// published. Drops the entries of domains that serve a real policy
    /// again (keeping their longest max_age). Returns whether anything
    /// changed.
    pub fn apply(&self, state: &mut State, published: &[Record], now: u64) -> bool {
        let mut changed = false;
        for name in self.active.keys() {
            if let Some(entry) = state.domains.remove(name) {
                raise(&mut state.max_age_published, name, entry.old_max_age);
                changed = true;
            }
        }
        for r in published {
            if let Some(&max_age) = self.active.get(&r.domain) {
                changed |= raise(&mut state.max_age_published, &r.domain, max_age);
                continue;
            }
            let Some(&configured) = self.retiring.get(&r.domain) else {
                continue;
            };
            // RFC 8461 §8.3: earlier policies may have had a longer max_age
            // than the one configured now.
            let max_age = match state.max_age_published.remove(&r.domain) {
                Some(earlier) => {
                    changed = true;
                    earlier.max(configured)
                }
                None => configured,
            };
            let entry = state.domains.entry(r.domain.clone()).or_insert_with(|| {
                changed = true;
                Entry {
                    since: now,
                    old_max_age: max_age,
                    ttl: 0,
                    records: Vec::new(),
                }
            });
            if entry.old_max_age < max_age {
                entry.old_max_age = max_age;
                changed = true;
            }
            if entry.ttl < r.ttl {
                entry.ttl = r.ttl;
                changed = true;
            }
            let stored = StoredRecord {
                name: r.name.clone(),
                rtype: r.rtype.to_owned(),
                value: r.value.clone(),
                zone: r.zone.clone(),
            };
            if !entry.records.contains(&stored) {
                entry.records.push(stored);
                changed = true;
            }
        }
        changed
    }
}

/// Raises `map[domain]` to `max_age`; whether it changed.
fn raise(map: &mut BTreeMap<String, u64>, domain: &str, max_age: u64) -> bool {
    match map.get_mut(domain) {
        Some(m) if *m >= max_age => false,
        Some(m) => {
            *m = max_age;
            true
        }
        None => {
            map.insert(domain.to_owned(), max_age);
            true
        }
    }
}

/// Why `dns push --prune` will not delete a domain's records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{domain} is still configured; remove its [[domain]] entry once `mtasts retire` says it is safe, then prune"
    )]
    Configured { domain: String },
    #[error(
        "{domain} is not recorded as retired in {path}: mtasts deletes only records of domains it retired (retire = true, published with `dns push` or confirmed with `mtasts retire`); add it back with retire = true, or delete its records by hand"
    )]
    NotRetired { domain: String, path: String },
    #[error(
        "{domain}: retirement period not over (mode none published {since}, wait {wait} + TTL {ttl} s): safe after {safe} (in {left}); until then keep it configured with retire = true"
    )]
    TooEarly {
        domain: String,
        since: String,
        wait: String,
        ttl: u32,
        safe: String,
        left: String,
    },
}

/// Checks that `domain`'s records may be deleted at `now`: it is not
/// configured, it is recorded as retiring, and its period is over.
pub fn may_prune<'s>(
    state: &'s State,
    state_dir: &Path,
    config: &Config,
    domain: &DomainName,
    now: u64,
) -> Result<&'s Entry, Refusal> {
    let name = domain.to_string();
    if config.domain(domain).is_some() {
        return Err(Refusal::Configured { domain: name });
    }
    let Some(entry) = state.domains.get(&name) else {
        return Err(Refusal::NotRetired {
            domain: name,
            path: path(state_dir).display().to_string(),
        });
    };
    if now < entry.safe_after() {
        return Err(Refusal::TooEarly {
            domain: name,
            since: rfc3339(entry.since),
            wait: wait_text(entry),
            ttl: entry.ttl,
            safe: rfc3339(entry.safe_after()),
            left: left(entry.safe_after() - now),
        });
    }
    Ok(entry)
}

/// One line per retiring domain (configured with `retire = true` or
/// recorded): where it stands and what to do next.
pub fn status(state: &State, config: &Config, now: u64) -> Vec<String> {
    let mut names: Vec<&str> = state.domains.keys().map(String::as_str).collect();
    names.extend(
        config
            .domains
            .iter()
            .filter(|d| d.retire && !state.domains.contains_key(d.name.as_str()))
            .map(|d| d.name.as_str()),
    );
    names.sort_unstable();
    names
        .into_iter()
        .map(|name| {
            let configured = DomainName::parse(name)
                .ok()
                .and_then(|d| config.domain(&d).map(|c| c.retire));
            match (state.domains.get(name), configured) {
                (None, _) => format!(
                    "{name}: retire = true, but the mode none id is not recorded as published: run `mtasts dns push`, or publish the TXT `mtasts records` prints and run `mtasts retire {name}`"
                ),
                (Some(_), Some(false)) => format!(
                    "{name}: serves a real policy again (retire removed); its retirement record is dropped at the next push"
                ),
                (Some(e), Some(true)) if now < e.safe_after() => format!(
                    "{name}: retiring since {} (wait {} + TTL {} s): keep it configured until {} (in {})",
                    rfc3339(e.since),
                    wait_text(e),
                    e.ttl,
                    rfc3339(e.safe_after()),
                    left(e.safe_after() - now)
                ),
                (Some(e), Some(_)) => format!(
                    "{name}: retired since {}, safe to remove now: delete its [[domain]] entry, reload, then `mtasts dns push --prune`",
                    rfc3339(e.safe_after())
                ),
                (Some(e), None) if now < e.safe_after() => format!(
                    "{name}: removed from the config too early: senders may cache the old policy until {} (in {}); add it back with retire = true",
                    rfc3339(e.safe_after()),
                    left(e.safe_after() - now)
                ),
                (Some(_), None) => format!(
                    "{name}: removed from the config, period over: `mtasts dns push --prune` deletes its records"
                ),
            }
        })
        .collect()
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The wait and why: "longest max_age 1209600 s" or "one day (longest
/// max_age 300 s)".
fn wait_text(entry: &Entry) -> String {
    if entry.old_max_age >= MIN_WAIT {
        format!("longest max_age {} s", entry.old_max_age)
    } else {
        format!(
            "{MIN_WAIT} s, at least one day (longest max_age {} s)",
            entry.old_max_age
        )
    }
}

/// A Unix time as RFC 3339; one beyond what the platform's clock holds
/// (only a damaged state file gets there) prints as seconds.
fn rfc3339(secs: u64) -> String {
    match UNIX_EPOCH.checked_add(Duration::from_secs(secs)) {
        Some(t) if secs < 253_402_300_800 => humantime::format_rfc3339_seconds(t).to_string(),
        _ => format!("{secs} s after 1970"),
    }
}

fn left(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_source(Path::new("t.toml"), Path::new("."), text.to_owned()).expect("valid")
    }

    fn txt(domain: &str, ttl: u32) -> Record {
        Record {
            domain: domain.into(),
            name: format!("_mta-sts.{domain}."),
            rtype: "TXT",
            ttl,
            value: "v=STSv1; id=abc;".into(),
            zone: format!("{domain}."),
        }
    }

    const CFG: &str = "[[domain]]\nname = \"a.example\"\nretire = true\nmax_age = 100\n\n[[domain]]\nname = \"b.example\"\nmode = \"none\"\n";

    #[test]
    fn publication_starts_the_clock_once() {
        let cfg = config(CFG);
        let obs = Observation::new(&cfg);
        let mut state = State::default();
        assert!(obs.apply(
            &mut state,
            &[txt("a.example", 60), txt("b.example", 60)],
            1000
        ));
        assert_eq!(state.domains.len(), 1, "only retiring domains");
        let a = &state.domains["a.example"];
        assert_eq!((a.since, a.old_max_age, a.ttl), (1000, 100, 60));
        // max_age 100 s, but never less than a day.
        assert_eq!(a.safe_after(), 1000 + 86_400 + 60);
        // Later pushes keep the start; nothing changes.
        assert!(!obs.apply(&mut state, &[txt("a.example", 60)], 2000));
        assert_eq!(state.domains["a.example"].since, 1000);
    }

    #[test]
    fn unretired_domain_loses_its_entry() {
        let mut state = State::default();
        Observation::new(&config(CFG)).apply(&mut state, &[txt("a.example", 1)], 5);
        let back = config("[[domain]]\nname = \"a.example\"\nmode = \"none\"\n");
        assert!(Observation::new(&back).apply(&mut state, &[], 6));
        assert!(state.domains.is_empty());
    }

    #[test]
    fn prune_needs_removal_record_and_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = State::default();
        Observation::new(&config(CFG)).apply(&mut state, &[txt("a.example", 10)], 1000);
        let a = DomainName::parse("a.example").expect("name");
        let still = config(CFG);
        assert!(matches!(
            may_prune(&state, dir.path(), &still, &a, 9999),
            Err(Refusal::Configured { .. })
        ));
        let removed = config("[[domain]]\nname = \"b.example\"\nmode = \"none\"\n");
        let early = may_prune(&state, dir.path(), &removed, &a, 87_409);
        assert!(matches!(early, Err(Refusal::TooEarly { .. })), "{early:?}");
        let msg = early.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("wait 86400 s, at least one day (longest max_age 100 s) + TTL 10 s): safe after 1970-01-02T00:16:50Z (in 1s)"),
            "{msg}"
        );
        assert!(may_prune(&state, dir.path(), &removed, &a, 87_410).is_ok());
        let c = DomainName::parse("c.example").expect("name");
        assert!(matches!(
            may_prune(&state, dir.path(), &removed, &c, 9999),
            Err(Refusal::NotRetired { .. })
        ));
    }

    #[test]
    fn only_records_mtasts_publishes_are_pruned() {
        let stored = |name: &str, rtype: &str, value: &str| StoredRecord {
            name: name.into(),
            rtype: rtype.into(),
            value: value.into(),
            zone: "a.example.".into(),
        };
        let entry = Entry {
            since: 0,
            old_max_age: 0,
            ttl: 1,
            records: vec![
                stored("_mta-sts.a.example.", "TXT", "v=STSv1; id=1;"),
                stored("mta-sts.a.example.", "A", "192.0.2.1"),
                stored(
                    "_smtp._tls.a.example.",
                    "TXT",
                    "v=TLSRPTv1; rua=mailto:x@a.example;",
                ),
                stored("a.example.sts.provider.example.", "TXT", "v=STSv1; id=1;"),
                // Not ours to delete, whatever the file says:
                stored("a.example.", "TXT", "v=spf1 -all"),
                stored("a.example.", "TXT", "v=STSv1; id=1;"),
                stored("_mta-sts.a.example.", "TXT", "google-site-verification=x"),
                stored("www.a.example.", "A", "192.0.2.1"),
                stored("mta-sts.a.example.", "MX", "10 mx.a.example."),
            ],
        };
        let names: Vec<String> = entry
            .records("a.example")
            .iter()
            .map(|r| format!("{} {}", r.name, r.rtype))
            .collect();
        assert_eq!(
            names,
            [
                "_mta-sts.a.example. TXT",
                "mta-sts.a.example. A",
                "_smtp._tls.a.example. TXT",
                "a.example.sts.provider.example. TXT"
            ]
        );
    }

    #[test]
    fn status_says_what_to_do_next() {
        let cfg = config(CFG);
        let mut state = State::default();
        let lines = status(&state, &cfg, 1000);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("not recorded as published"), "{lines:?}");
        Observation::new(&cfg).apply(&mut state, &[txt("a.example", 60)], 1000);
        let lines = status(&state, &cfg, 1000);
        assert!(
            lines[0].starts_with("a.example: retiring since 1970-01-01T00:16:40Z (wait 86400 s, at least one day (longest max_age 100 s) + TTL 60 s): keep it configured until 1970-01-02T00:17:40Z (in 1day 1m)"),
            "{lines:?}"
        );
        let safe = 1000 + 86_400 + 60;
        assert!(status(&state, &cfg, safe)[0].contains("safe to remove now"));
        let removed = config("[[domain]]\nname = \"b.example\"\nmode = \"none\"\n");
        assert!(
            status(&state, &removed, safe - 1)[0].contains("removed from the config too early")
        );
        assert!(status(&state, &removed, safe)[0].contains("`mtasts dns push --prune` deletes"));
    }

    #[test]
    fn state_round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(State::load(dir.path()).expect("missing"), State::default());
        let mut state = State::default();
        Observation::new(&config(CFG)).apply(&mut state, &[txt("a.example", 10)], 7);
        state.save(dir.path()).expect("save");
        let back = State::load(dir.path()).expect("load");
        assert_eq!(back.domains, state.domains);
        assert_eq!(
            back.domains["a.example"].records("a.example"),
            [txt("a.example", 10)]
        );
        std::fs::write(path(dir.path()), b"{").expect("write");
        assert!(matches!(
            State::load(dir.path()),
            Err(RetireError::Corrupt { .. })
        ));
    }

    /// Issue 9 item 14: a domain that published 2 weeks and then retires
    /// with max_age "1d" waits 2 weeks, not 1 day.
    #[test]
    fn retirement_waits_for_the_longest_max_age_ever_published() {
        let active = config(
            "[[domain]]\nname = \"a.example\"\nmode = \"enforce\"\nmx = [\"mx.a.example\"]\nmax_age = \"2w\"\n",
        );
        let mut state = State::default();
        assert!(Observation::new(&active).apply(&mut state, &[txt("a.example", 60)], 500));
        assert!(state.domains.is_empty(), "nothing retires yet");
        assert_eq!(state.max_age_published["a.example"], 1_209_600);
        // A shorter max_age later does not lower the record.
        let shorter = config(
            "[[domain]]\nname = \"a.example\"\nmode = \"enforce\"\nmx = [\"mx.a.example\"]\nmax_age = \"1w\"\n",
        );
        assert!(!Observation::new(&shorter).apply(&mut state, &[txt("a.example", 60)], 600));

        let retiring =
            config("[[domain]]\nname = \"a.example\"\nretire = true\nmax_age = \"1d\"\n");
        assert!(Observation::new(&retiring).apply(&mut state, &[txt("a.example", 60)], 1000));
        let a = &state.domains["a.example"];
        assert_eq!(a.old_max_age, 1_209_600);
        assert_eq!(a.safe_after(), 1000 + 1_209_600 + 60);
        let lines = status(&state, &retiring, 1000);
        assert!(
            lines[0].contains("(wait longest max_age 1209600 s + TTL 60 s)"),
            "{lines:?}"
        );
        // Saved and loaded again, the longest max_age survives.
        let dir = tempfile::tempdir().expect("tempdir");
        state.save(dir.path()).expect("save");
        assert_eq!(
            State::load(dir.path()).expect("load").domains,
            state.domains
        );

        // Retirement abandoned: the longest max_age is kept for the next.
        Observation::new(&shorter).apply(&mut state, &[], 2000);
        assert!(state.domains.is_empty());
        assert_eq!(state.max_age_published["a.example"], 1_209_600);
    }

    /// Issue 9 item 9: a stored max_age beyond RFC 8461's limit (written by
    /// `--old-max-age 500000000000y` before it was bounded) is read as the
    /// limit, and nothing panics on it or on a far-future start.
    #[test]
    fn out_of_range_stored_values_are_clamped_not_panicking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = r#"{"version":1,"domains":{
            "a.example":{"since":1000,"old_max_age":15778800000000000000,"ttl":60,"records":[]},
            "c.example":{"since":18446744073709551615,"old_max_age":18446744073709551615,"ttl":4294967295,"records":[]}},
            "max_age_published":{"b.example":18446744073709551615}}"#;
        std::fs::write(path(dir.path()), json).expect("write");
        let state = State::load(dir.path()).expect("loads");
        assert_eq!(state.domains["a.example"].old_max_age, MAX_AGE_LIMIT);
        assert_eq!(state.max_age_published["b.example"], MAX_AGE_LIMIT);
        let cfg = config(CFG);
        let lines = status(&state, &cfg, 2000);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("longest max_age 31557600 s")),
            "{lines:?}"
        );
        let c = DomainName::parse("c.example").expect("name");
        let refusal = may_prune(
            &state,
            dir.path(),
            &config("[[domain]]\nname = \"b.example\"\nmode = \"none\"\n"),
            &c,
            2000,
        );
        assert!(
            matches!(refusal, Err(Refusal::TooEarly { .. })),
            "{refusal:?}"
        );
        assert!(
            refusal
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
                .contains("s after 1970")
        );
    }
}
