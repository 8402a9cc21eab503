//! Certificates through ACME (RFC 8555) for every `mta-sts.<domain>` of the
//! current snapshot: one order per host, challenges answered by our own
//! listeners ([`challenge`]), certificates kept in a [`CertStore`] and put
//! into the SNI index the moment they land.
//!
//! Certificates are not kept in memory: the SNI index serves a host once its
//! stored certificate is known, and [`StoreLoader`] reads it from the store
//! on the host's first handshake into the index's bounded cache. A
//! certificate that lands replaces the cached one at once.
//!
//! The [`Manager`] is one task: it keeps a due time per host (missing
//! certificate: now; valid: its renewal time; failed: now + backoff) and
//! runs due hosts with bounded concurrency and a per-hour pacing window.
//! The hosts are kept in a [`Queue`] (due times in a heap, counts kept up
//! to date), so a turn of its loop does not scan every host.
//! Everything it learns goes to the store (`CertState`), so a restart resumes
//! where it stopped and `mtasts certs` shows it.

mod attempt;
pub mod challenge;
pub mod order;
pub mod queue;
pub mod resolve;
pub mod schedule;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, CertificateIdentifier, ExternalAccountKey, NewAccount,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{AcmeConfig, ChallengeKind, HostRecord};
use crate::snapshot::Snapshot;
use crate::store::{CertState, CertStore};
use crate::tls::CertIndex;
use challenge::Challenges;
use order::Issued;
use queue::{Queue, Queued};
use schedule::{AriDecision, Pacer, unix};

/// What went wrong in one attempt, and whose move it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// `mta-sts.<domain>` does not point here (precheck): fix DNS.
    Dns,
    /// The CA was unreachable or refused a request.
    Ca,
    /// The CA could not validate the challenge.
    Validation,
    /// Key generation, the store, or other local trouble.
    Local,
}

/// A failed attempt, with a message for logs and `mtasts certs`.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    /// The CA no longer knows our account (e.g. a test CA restarted).
    account_gone: bool,
}

impl Failure {
    /// A failure of `kind` explained by `message`.
    pub fn new(kind: FailureKind, message: String) -> Failure {
        Failure {
            kind,
            message,
            account_gone: false,
        }
    }

    /// A CA error during step `what`, with its whole cause chain.
    pub fn ca(what: &str, e: &instant_acme::Error) -> Failure {
        let mut message = format!("{what}: {e}");
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        let account_gone = matches!(e, instant_acme::Error::Api(p)
            if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist"));
        Failure {
            kind: FailureKind::Ca,
            message,
            account_gone,
        }
    }
}

/// A host the snapshot wants a certificate for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: Box<str>,
    /// Addresses the DNS precheck accepts (host_a/host_aaaa + server_addresses).
    expected: Vec<IpAddr>,
    /// host_cname: the name must resolve like this target does.
    cname: Option<String>,
}

/// Counters for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Hosts in the current snapshot.
    pub configured: usize,
    /// Hosts with a usable certificate in the SNI index.
    pub valid: usize,
    /// Hosts without a certificate that wait for their turn or retry.
    pub pending: usize,
    /// Hosts whose last attempt failed.
    pub failing: usize,
    pub in_flight: usize,
    /// Most orders ever in flight at once (bounded by max_concurrent_orders).
    pub peak_in_flight: usize,
    /// Certificates issued since start.
    pub issued: u64,
}

/// What a finished attempt reports back to the scheduler.
struct Attempted {
    /// Held until the outcome is stored: no other replica orders the host
    /// before this one's certificate is in the shared store.
    claim: Option<crate::store::Claim>,
    host: Box<str>,
    /// An order reached the CA (counts for pacing).
    ordered: bool,
    kind: ChallengeKind,
    result: Result<Success, Failure>,
}

/// A successful attempt: a new certificate, or "not yet" (ARI check).
enum Success {
    Issued(Box<Issued>),
    /// Nothing to renew yet; look again then.
    Later(SystemTime),
    /// Another replica sharing the store has stored a newer certificate.
    Adopted(Adopted),
}

/// A certificate another replica stored, checked and ready to serve.
struct Adopted {
    key: Arc<CertifiedKey>,
    not_before: i64,
    not_after: i64,
    state: CertState,
}

/// Longest wait before looking again at a host another replica is
/// ordering (its certificate usually arrives earlier, announced by the
/// store; a dead replica's claim ends with its lease).
const CLAIMED_RETRY: Duration = Duration::from_secs(30);

/// What the scheduler keeps per host: small, since there is one per
/// configured domain (100,000 of them and more).
struct Scheduled {
    target: Target,
    /// Expiry (unix seconds) of the stored, usable certificate.
    expires: Option<i64>,
    /// Our own renewal time of the stored certificate (unix seconds).
    renew_at: Option<i64>,
    /// The state of a host whose attempts fail (or whose stored files are
    /// broken); `None` for a healthy host, whose state is the stored one
    /// and is read again when it is needed (after an attempt).
    state: Option<Box<CertState>>,
    due: SystemTime,
}

impl Scheduled {
    /// Keeps `state` in memory only where the scheduler needs it.
    fn keep(state: CertState) -> Option<Box<CertState>> {
        (state.failures > 0 || state.last_error.is_some()).then(|| Box::new(state))
    }
}

impl Queued for Scheduled {
    fn due(&self) -> SystemTime {
        self.due
    }

    fn valid(&self) -> bool {
        self.expires.is_some()
    }

    fn failing(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.failures > 0)
    }
}

/// What [`Manager::prepare`] saw, handed to [`Manager::run`]: the snapshot
/// whose hosts `run` reads from the store first, and the hosts with a
/// stored certificate (`None`: the listing failed).
pub struct Prepared(Arc<Snapshot>, Option<HashSet<String>>);

/// A host's stored certificate as [`Manager::load`] sees it.
enum Stored {
    Bundle(Vec<u8>),
    /// (not_before, not_after) recorded in the state when it was stored.
    Recorded((i64, i64)),
}

/// The TLS certificate loader of ACME mode: reads a host's bundle from the
/// store on its first handshake, and refuses one that does not name the
/// host, whose key does not match, or that has expired.
pub struct StoreLoader<S: CertStore> {
    store: Arc<S>,
    /// Hosts whose stored bundle turned out unusable (missing, broken):
    /// the manager reads them again and orders a new certificate.
    unusable: tokio::sync::mpsc::UnboundedSender<Box<str>>,
}

/// The receiving end of [`StoreLoader`]'s reports, for [`Manager::new`].
pub type Unusable = tokio::sync::mpsc::UnboundedReceiver<Box<str>>;

impl<S: CertStore> StoreLoader<S> {
    /// A loader over `store`, and where it reports unusable certificates.
    pub fn new(store: Arc<S>) -> (StoreLoader<S>, Unusable) {
        let (unusable, rx) = tokio::sync::mpsc::unbounded_channel();
        (StoreLoader { store, unusable }, rx)
    }

    fn read(&self, host: &str) -> Result<CertifiedKey, String> {
        let bundle = self
            .store
            .load_cert_blocking(host)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no stored certificate".to_owned())?;
        let (key, _) = order::inspect(host, &bundle)
            .map_err(|reason| format!("stored certificate is unusable: {reason}"))?;
        Ok(key)
    }
}

impl<S: CertStore> crate::tls::CertLoader for StoreLoader<S> {
    /// The stored bundle, checked (name, key). Expiry is checked by the
    /// index, which refuses an expired certificate and remembers it.
    fn load(&self, host: &str) -> Result<CertifiedKey, String> {
        self.read(host).inspect_err(|_| {
            let _ = self.unusable.send(host.into());
        })
    }
}

/// The certificate manager of `tls.mode = "acme"`.
pub struct Manager<S: CertStore> {
    cfg: AcmeConfig,
    store: Arc<S>,
    index: Arc<CertIndex>,
    challenges: Arc<Challenges>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// Orders of the account are created one at a time ([`order::OrderGate`]).
    creating: order::OrderGate,
    /// Create a new account instead of loading the stored one.
    account_gone: std::sync::atomic::AtomicBool,
    /// The CA has no ARI (RFC 9773): renew on our own schedule only.
    ari_unsupported: std::sync::atomic::AtomicBool,
    pacer: Mutex<Pacer>,
    progress: Mutex<Progress>,
    /// Reports of [`StoreLoader`]; taken by [`Manager::run`].
    unusable: Mutex<Option<Unusable>>,
    /// Hosts whose stored certificate another process changed.
    changed_tx: tokio::sync::mpsc::UnboundedSender<Box<str>>,
    changed_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Box<str>>>>,
}

/// Longest one exchange with the CA (account, order, validation,
/// certificate) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest an ARI check may take.
const ARI_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a CA with ARI is asked whether a certificate should be renewed
/// early (Let's Encrypt suggests about every 6 hours).
const ARI_POLL: Duration = Duration::from_secs(6 * 3600);

/// Logs progress this often while work is queued.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// Longest sleep of the scheduler (so it notices clock jumps).
const MAX_SLEEP: Duration = Duration::from_secs(300);

impl<S: CertStore> Manager<S> {
    /// A manager that fills `index` with certificates kept in `store`,
    /// publishing challenge answers in `challenges`.
    pub fn new(
        cfg: AcmeConfig,
        store: Arc<S>,
        index: Arc<CertIndex>,
        challenges: Arc<Challenges>,
        unusable: Unusable,
    ) -> Manager<S> {
        let (changed_tx, changed_rx) = tokio::sync::mpsc::unbounded_channel();
        Manager {
            changed_tx,
            changed_rx: Mutex::new(Some(changed_rx)),
            unusable: Mutex::new(Some(unusable)),
            pacer: Mutex::new(Pacer::new(cfg.orders_per_hour)),
            cfg,
            store,
            index,
            challenges,
            account: tokio::sync::Mutex::new(None),
            creating: order::OrderGate::default(),
            account_gone: false.into(),
            ari_unsupported: false.into(),
            progress: Mutex::new(Progress::default()),
        }
    }

    /// Another replica stored a certificate for `host`: serve it if it is
    /// newer than ours.
    pub fn store_changed(&self, host: &str) {
        let _ = self.changed_tx.send(host.into());
    }

    /// The counters as of the last scheduler round.
    pub fn progress(&self) -> Progress {
        crate::sync::lock(&self.progress).clone()
    }

    fn targets(&self, snapshot: &Snapshot) -> Vec<Target> {
        snapshot
            .sites()
            .iter()
            .map(|site| {
                let mut expected = self.cfg.server_addresses.clone();
                let mut cname = None;
                match &site.domain.host {
                    HostRecord::Addresses(a) => {
                        expected.extend(a.v4.iter().copied().map(IpAddr::V4));
                        expected.extend(a.v6.iter().copied().map(IpAddr::V6));
                    }
                    HostRecord::Cname(target) => cname = Some(target.as_str().to_owned()),
                    HostRecord::Unset => {}
                }
                Target {
                    host: site.host().into(),
                    expected,
                    cname,
                }
            })
            .collect()
    }

    /// Makes the hosts of `snapshot` with a stored certificate servable
    /// before this returns, so a restarted server serves them from its
    /// first connection. Reads no certificate: one listing of the store
    /// (each certificate is checked by the loader on its host's first
    /// handshake, and by [`Manager::run`] as it reads the store).
    pub async fn prepare(&self, snapshot: Arc<Snapshot>) -> Prepared {
        let listed = match self.store.cert_hosts().await {
            Ok(stored) => {
                let stored: HashSet<String> = stored.into_iter().collect();
                self.index.add_unverified(
                    snapshot
                        .sites()
                        .iter()
                        .filter(|site| stored.contains(site.host().as_str()))
                        .map(|site| site.host().into()),
                );
                Some(stored)
            }
            Err(e) => {
                // Not fatal: each host is served once `run` has read it.
                tracing::error!(error = %e, "cannot list stored certificates");
                None
            }
        };
        Prepared(snapshot, listed)
    }

    /// Runs until `stop` turns true: follows `sites` (each new snapshot is a
    /// new wanted set) and keeps every wanted host's certificate current.
    pub async fn run(
        self: Arc<Self>,
        prepared: Prepared,
        mut sites: watch::Receiver<Arc<Snapshot>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let Prepared(first, listed) = prepared;
        let unusable = crate::sync::lock(&self.unusable).take();
        // A second `run` (not done) would get no reports: a channel that
        // stays open and empty.
        let (_open, empty) = tokio::sync::mpsc::unbounded_channel();
        let mut unusable = unusable.unwrap_or(empty);
        let (_open, empty) = tokio::sync::mpsc::unbounded_channel();
        let mut changed = crate::sync::lock(&self.changed_rx).take().unwrap_or(empty);
        // Everything the store holds for the configured hosts: their state
        // (backoff, order times) and each certificate's validity.
        let mut entries = Queue::new();
        let started = std::time::Instant::now();
        let seed = self.reconcile(&mut entries, &first, listed.as_ref()).await;
        drop((first, listed));
        tracing::info!(
            hosts = entries.len(),
            valid = entries.counts().valid,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "read the certificate store"
        );
        self.pacer_lock().seed(seed, unix(SystemTime::now()));
        let mut tasks: JoinSet<Attempted> = JoinSet::new();
        // Which host a task works on, to recover if it panics.
        let mut task_hosts: HashMap<tokio::task::Id, Box<str>> = HashMap::new();
        let mut last_log = tokio::time::Instant::now();
        loop {
            let now = SystemTime::now();
            let free = self.cfg.max_concurrent_orders.saturating_sub(tasks.len());
            for host in entries.start(now, free) {
                if let Some(entry) = entries.get(&host) {
                    let me = Arc::clone(&self);
                    let target = entry.target.clone();
                    let kind = entry.state.as_deref().map_or(self.cfg.challenge, |state| {
                        schedule::challenge_for(self.cfg.challenge, state)
                    });
                    let renew_at = entry.renew_at;
                    let expires = entry.expires;
                    let handle = tasks.spawn(async move {
                        // The served leaf (for ARI): from the SNI index's
                        // cache, else from the store.
                        let leaf = match renew_at {
                            Some(renew_at) => {
                                me.served_leaf(&target.host).await.map(|l| (l, renew_at))
                            }
                            None => None,
                        };
                        let (claim, ordered, result) =
                            me.attempt(&target, kind, leaf, expires).await;
                        Attempted {
                            claim,
                            host: target.host,
                            ordered,
                            kind,
                            result,
                        }
                    });
                    task_hosts.insert(handle.id(), host.clone());
                }
            }
            self.update_progress(&entries, tasks.len());
            if last_log.elapsed() >= PROGRESS_EVERY {
                last_log = tokio::time::Instant::now();
                self.log_progress();
            }
            let next_due = entries
                .next_due()
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or(MAX_SLEEP);
            let capacity_full = tasks.len() >= self.cfg.max_concurrent_orders;
            let sleep = if capacity_full { MAX_SLEEP } else { next_due }
                .min(MAX_SLEEP)
                .min(PROGRESS_EVERY);
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
                changed = sites.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = Arc::clone(&sites.borrow_and_update());
                    let _ = self.reconcile(&mut entries, &snapshot, None).await;
                }
                Some(host) = unusable.recv() => {
                    // A handshake found the stored certificate broken or
                    // gone: read it again; if it is, stop serving it and
                    // order a new one now (an attempt under way lands its
                    // own).
                    if !entries.is_busy(&host)
                        && let Some(entry) = entries.get(&host)
                        && entry.expires.is_some()
                    {
                        let target = entry.target.clone();
                        let (entry, _) = self.load(target, SystemTime::now(), None).await;
                        if entry.expires.is_none() {
                            self.index.remove(&host);
                        }
                        entries.insert(host, entry);
                    }
                }
                Some(host) = changed.recv() => {
                    if !entries.is_busy(&host)
                        && let Some(entry) = entries.get(&host)
                        && let Some(adopted) = self.stored_newer(&host, entry.expires).await
                    {
                        self.adopt(&mut entries, &host, adopted);
                    }
                }
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    match done {
                        Ok((id, done)) => {
                            task_hosts.remove(&id);
                            entries.done(&done.host);
                            self.finish(&mut entries, done).await;
                        }
                        Err(e) => {
                            // A bug, not the CA: retry this host with backoff.
                            tracing::error!(error = %e, "certificate task failed");
                            if let Some(host) = task_hosts.remove(&e.id()) {
                                entries.done(&host);
                                let done = Attempted {
                                    claim: None,
                                    host,
                                    ordered: false,
                                    kind: self.cfg.challenge,
                                    result: Err(Failure::new(
                                        FailureKind::Local,
                                        format!("internal error: {e}"),
                                    )),
                                };
                                self.finish(&mut entries, done).await;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        tasks.abort_all();
    }

    fn pacer_lock(&self) -> std::sync::MutexGuard<'_, Pacer> {
        crate::sync::lock(&self.pacer)
    }

    /// Brings `entries` in line with the snapshot: loads newly wanted hosts
    /// from the store, forgets removed ones (their files stay). Returns the
    /// stored order times of the newly loaded hosts (for pacing).
    ///
    /// `listed`: the hosts with a stored certificate (from the start-up
    /// listing); a host with its certificate's validity recorded in its
    /// state is then not read. Without it every certificate is read.
    async fn reconcile(
        &self,
        entries: &mut Queue<Scheduled>,
        snapshot: &Snapshot,
        listed: Option<&HashSet<String>>,
    ) -> Vec<i64> {
        let targets = self.targets(snapshot);
        let wanted: std::collections::HashSet<&str> = targets.iter().map(|t| &*t.host).collect();
        let removed: Vec<Box<str>> = entries
            .hosts()
            .filter(|h| !wanted.contains(&***h))
            .cloned()
            .collect();
        for host in &removed {
            entries.remove(host);
            self.index.remove(host);
            tracing::info!(host = %host, "no longer configured: not renewing; stored files kept");
        }
        let now = SystemTime::now();
        let mut orders = Vec::new();
        for target in targets {
            if entries.contains(&target.host) {
                let Target {
                    host,
                    expected,
                    cname,
                } = target;
                entries.update(&host, |entry| {
                    entry.target.expected = expected;
                    entry.target.cname = cname;
                });
                continue;
            }
            let (entry, last_order) = self.load(target, now, listed).await;
            orders.extend(last_order);
            // Served from now on only if its stored certificate is usable
            // (the index may have it as "stored, not read yet").
            match entry.expires {
                Some(not_after) => self.index.verified(&entry.target.host, not_after),
                None => self.index.remove(&entry.target.host),
            }
            entries.insert(entry.target.host.clone(), entry);
        }
        orders
    }

    /// The DER leaf of the certificate `host` is served with: from the SNI
    /// index's cache, else read from the store.
    async fn served_leaf(&self, host: &str) -> Option<Vec<u8>> {
        if let Some(key) = self.index.lookup(host) {
            return key.cert.first().map(|c| c.to_vec());
        }
        let bundle = self.store.load_cert(host).await.ok()??;
        rustls_pki_types::CertificateDer::pem_slice_iter(&bundle)
            .next()?
            .ok()
            .map(|c| c.to_vec())
    }

    /// A host's entry from the store: a usable stored certificate is
    /// recorded (and served); a broken one is reported and replaced.
    /// Also returns the stored time of its last order.
    async fn load(
        &self,
        target: Target,
        now: SystemTime,
        listed: Option<&HashSet<String>>,
    ) -> (Scheduled, Option<i64>) {
        let host = &*target.host;
        let mut state = match self.store.load_state(host).await {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::error!(host, error = %e, "ignoring unreadable certificate state");
                CertState::default()
            }
        };
        // (not_before, not_after) of a usable stored certificate.
        let mut cert = None;
        let recorded = state.cert_not_before.zip(state.cert_not_after);
        let stored = match (listed, recorded) {
            // Recorded when stored, and the file is there: not read now
            // (the loader checks it on its first handshake, and reports it
            // if it is unusable).
            (Some(listed), Some(validity)) if listed.contains(host) => {
                Ok(Some(Stored::Recorded(validity)))
            }
            (Some(listed), _) if !listed.contains(host) => Ok(None),
            _ => self
                .store
                .load_cert(host)
                .await
                .map(|b| b.map(Stored::Bundle)),
        };
        let inspected = |stored: Stored| match stored {
            Stored::Bundle(bundle) => {
                order::inspect(host, &bundle).map(|(_, i)| (i.not_before, i.not_after))
            }
            Stored::Recorded(validity) => Ok(validity),
        };
        match stored {
            Ok(None) => {}
            Ok(Some(bundle)) => match inspected(bundle) {
                Ok((not_before, not_after)) if not_after > unix(now) => {
                    cert = Some((not_before, not_after));
                }
                Ok((_, not_after)) => {
                    let msg = format!(
                        "stored certificate expired at {}; ordering a new one",
                        status::fmt_time(not_after)
                    );
                    tracing::warn!(host, "{msg}");
                    state.last_error = Some(msg);
                }
                Err(reason) => {
                    let msg = format!(
                        "stored certificate is unusable ({reason}); not serving it, ordering a new one"
                    );
                    tracing::error!(host, "{msg}");
                    state.last_error = Some(msg);
                    state.last_error_at = Some(unix(now));
                }
            },
            Err(e) => {
                let msg = format!("cannot read stored certificate: {e}");
                tracing::error!(host, "{msg}");
                state.last_error = Some(msg);
                state.last_error_at = Some(unix(now));
            }
        }
        let retry_at = state
            .next_attempt
            .filter(|_| state.failures > 0)
            .map(schedule::from_unix);
        let foreign = state
            .directory
            .as_ref()
            .is_some_and(|d| *d != self.cfg.directory);
        let renew_at = cert.map(|(not_before, not_after)| {
            if foreign {
                unix(now)
            } else {
                schedule::renew_at(not_before, not_after, self.cfg.renew_before)
            }
        });
        let due = match &cert {
            Some(_) if foreign => {
                tracing::info!(
                    host,
                    "stored certificate comes from another ACME directory; serving it until a new one is issued"
                );
                retry_at.unwrap_or(now)
            }
            Some(_) => {
                let renew = self.first_check(renew_at.unwrap_or(0), now, fastrand::f64());
                retry_at.map_or(renew, |r| r.max(renew))
            }
            // Restart mid-batch: hosts that failed keep their backoff.
            None => retry_at.unwrap_or(now),
        };
        let last_order = state.last_order_at;
        let entry = Scheduled {
            target,
            expires: cert.map(|(_, not_after)| not_after),
            renew_at,
            state: Scheduled::keep(state),
            due,
        };
        (entry, last_order)
    }

    /// When to look at a stored certificate first: its renewal time, or
    /// (CA with ARI, or not known yet) an ARI check spread over the next
    /// [`ARI_POLL`] so that many certificates do not all ask at once.
    fn first_check(&self, renew_at: i64, now: SystemTime, unit: f64) -> SystemTime {
        let renew = schedule::from_unix(renew_at);
        if self
            .ari_unsupported
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return renew;
        }
        renew.min(now + ARI_POLL.mul_f64(unit.clamp(0.0, 1.0)))
    }

    fn progress_lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        crate::sync::lock(&self.progress)
    }

    fn update_progress(&self, entries: &Queue<Scheduled>, in_flight: usize) {
        let counts = entries.counts();
        let mut p = self.progress_lock();
        p.configured = counts.configured;
        p.valid = counts.valid;
        p.pending = counts.configured - counts.valid;
        p.failing = counts.failing;
        p.in_flight = in_flight;
        p.peak_in_flight = p.peak_in_flight.max(in_flight);
    }

    fn log_progress(&self) {
        let p = self.progress();
        if p.pending == 0 && p.in_flight == 0 {
            return;
        }
        let eta = self.pacer_lock().eta(p.pending);
        tracing::info!(
            valid = p.valid,
            configured = p.configured,
            pending = p.pending,
            in_flight = p.in_flight,
            failing = p.failing,
            eta = %humantime::format_duration(Duration::from_secs(eta.as_secs())),
            "certificates: {}/{} valid, {} waiting (ETA ~{} at {} orders/hour)",
            p.valid,
            p.configured,
            p.pending,
            humantime::format_duration(Duration::from_secs(eta.as_secs())),
            self.cfg.orders_per_hour
        );
    }
}
