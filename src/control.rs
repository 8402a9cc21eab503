//! Reloading the configuration, whoever asks: SIGHUP, a change in the config
//! file or `domains_dir` (file watch, debounced), or the admin API. Reloads
//! are serialised; a config that fails validation is logged with
//! `file:line:col` and the running snapshot keeps serving.
//!
//! A reload is one unit: it runs in a task of its own, so a caller that
//! stops waiting (an admin client that disconnects) cannot cut it short
//! between applying a config and recording it (`Control::config`, the log
//! line, the DNS push), and the next reload starts only after it finished:
//! reloads apply in the order they took the lock.
//!
//! Reloads are incremental ([`Loader`]): only the `domains_dir` files that
//! changed are parsed again. A reload that finds nothing changed applies
//! nothing (same snapshot, same generation, no DNS push); it is logged at
//! debug level and counted as `result="unchanged"`. A file-watch event that
//! a reload started after has already covered (a SIGHUP or an admin write
//! for the same change) causes no second reload.
//!
//! The mail server certificates named in `mx_certs` are watched too (their
//! directories, see [`crate::mxcert::watch_dirs`]), so a renewal that
//! changes their names reloads with no signal. Before a reload is applied,
//! an `enforce` shrink of a certificate-derived mx list that live MX hosts
//! still need is held ([`crate::mxhold`]); SIGUSR1 reloads with shrinks
//! forced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, MutexGuard};

use crate::auto_push::AutoPush;
use crate::config::{Config, ConfigErrors, Loader, MxSource, ServerConfig, TlsConfig};
use crate::metrics::{ReloadResult, Trigger};
use crate::server::{ServeError, Server};

/// Why a reload was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the embedded example config has no file to reload")]
    Embedded,
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("reload task failed: {0}")]
    Task(String),
}

/// A reload that was applied, or found nothing to apply.
#[derive(Debug, Clone, Copy)]
pub struct Reloaded {
    pub domains: usize,
    pub generation: u64,
    /// `false`: the config was as applied before; nothing was swapped.
    pub changed: bool,
}

/// Owns reloading for one running server.
pub struct Control {
    server: Arc<Server>,
    path: Option<PathBuf>,
    /// The last configuration that was applied.
    config: ArcSwap<Config>,
    /// `[server]` as the listeners were started with (changes need a restart).
    running: ServerConfig,
    /// `[tls]` as the server was started with (changes need a restart).
    running_tls: TlsConfig,
    /// Held for a whole reload, and by the admin API across its file write
    /// and the reload that validates it.
    lock: Mutex<()>,
    /// Keeps what the last load validated, so a reload re-reads only what
    /// changed. Used under `lock`, on a blocking thread.
    loader: Arc<std::sync::Mutex<Loader>>,
    /// File-watch events seen (counted as they arrive).
    changes: AtomicU64,
    /// `changes` when the latest reload started reading the files: events
    /// up to it are covered by that reload.
    covered: AtomicU64,
    /// `[dns.update] auto_push`: told about every applied snapshot.
    auto_push: Option<AutoPush>,
    /// DNS server asked for MX records before an mx shrink is applied;
    /// `None`: none known, every such shrink is held.
    mx_resolver: Option<SocketAddr>,
    /// Some domain's shrink is held (re-checked periodically by [`watch`]).
    holding: AtomicBool,
    /// Watches the directories of the `mx_certs` files, once [`watch`] runs.
    cert_watch: std::sync::Mutex<Option<CertWatch>>,
    /// The shared store of replicas (`[store] backend = "postgres"`).
    pg: Option<crate::store::pg::PgStore>,
}

/// The watcher of the certificate directories and what it watches
/// (directory → recursively).
struct CertWatch {
    watcher: notify::RecommendedWatcher,
    dirs: HashMap<PathBuf, bool>,
}

/// How often a held shrink is looked at again without any other trigger
/// (the MX record may have been removed since).
const HOLD_RECHECK: Duration = Duration::from_secs(300);

/// Proof that the caller holds the reload lock (for read-modify-reload
/// sequences such as the admin API's file writes).
pub struct ReloadLock<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);

impl Control {
    /// `config` is what `server` serves; `loader`, when given, is the one
    /// that loaded it (so the first reload is incremental too).
    pub fn new(
        server: Arc<Server>,
        path: Option<PathBuf>,
        config: Config,
        loader: Option<Loader>,
    ) -> Control {
        let loader = loader
            .unwrap_or_else(|| Loader::new(path.as_deref().unwrap_or(Path::new("<embedded>"))));
        Control {
            server,
            path,
            running: config.server.clone(),
            running_tls: config.tls.clone(),
            config: ArcSwap::from_pointee(config),
            lock: Mutex::new(()),
            loader: Arc::new(std::sync::Mutex::new(loader)),
            changes: AtomicU64::new(0),
            covered: AtomicU64::new(0),
            auto_push: None,
            mx_resolver: None,
            holding: AtomicBool::new(false),
            cert_watch: std::sync::Mutex::new(None),
            pg: None,
        }
    }

    /// The DNS server that says whether a dropped mx name is still an MX
    /// host (see [`crate::mxhold`]).
    pub fn with_mx_resolver(mut self, resolver: Option<SocketAddr>) -> Control {
        self.mx_resolver = resolver;
        self
    }

    /// After each applied reload, hands the new snapshot to `auto_push`
    /// (which pushes it only if the new config enables it).
    pub fn with_auto_push(mut self, auto_push: AutoPush) -> Control {
        self.auto_push = Some(auto_push);
        self
    }

    /// Admin writes go to the shared store `pg` too (replicas).
    pub fn with_store(mut self, pg: crate::store::pg::PgStore) -> Control {
        self.pg = Some(pg);
        self
    }

    /// The shared store of replicas, if any.
    pub fn pg(&self) -> Option<&crate::store::pg::PgStore> {
        self.pg.as_ref()
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The configuration currently applied.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The reload lock. Whoever holds it across an `.await` should run in a
    /// task of its own (as [`Control::reload`] does), so that it cannot be
    /// dropped half-way.
    pub async fn lock(&self) -> ReloadLock<'_> {
        ReloadLock(self.lock.lock().await)
    }

    /// Re-reads and applies the config, in a task of its own: dropping the
    /// returned future does not stop the reload.
    pub async fn reload(self: &Arc<Self>, trigger: Trigger) -> Result<Reloaded, ReloadError> {
        self.reload_in_task(trigger, false).await
    }

    /// Like [`Control::reload`], applying mx shrinks that live MX hosts
    /// still need (the operator knows better, e.g. the MX is being retired).
    pub async fn reload_forcing_shrinks(
        self: &Arc<Self>,
        trigger: Trigger,
    ) -> Result<Reloaded, ReloadError> {
        self.reload_in_task(trigger, true).await
    }

    /// Takes the lock and reloads in a task of its own, which finishes even
    /// if the caller stops waiting.
    async fn reload_in_task(
        self: &Arc<Self>,
        trigger: Trigger,
        force: bool,
    ) -> Result<Reloaded, ReloadError> {
        let control = Arc::clone(self);
        tokio::spawn(async move {
            let _guard = control.lock().await;
            control.reload_inner(trigger, force).await
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))?
    }

    /// Like [`Control::reload`], for a caller that already holds the lock
    /// (and runs in a task of its own, see [`Control::lock`]).
    pub async fn reload_locked(
        &self,
        _lock: &ReloadLock<'_>,
        trigger: Trigger,
    ) -> Result<Reloaded, ReloadError> {
        self.reload_inner(trigger, false).await
    }

    /// The reload itself; the caller holds the lock.
    async fn reload_inner(&self, trigger: Trigger, force: bool) -> Result<Reloaded, ReloadError> {
        let started = Instant::now();
        let result = self.load_and_apply(force).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let outcome = match &result {
            Ok(r) if r.changed => ReloadResult::Ok,
            Ok(_) => ReloadResult::Unchanged,
            Err(_) => ReloadResult::Error,
        };
        self.server.metrics().reload(trigger, outcome);
        let stats = self.loader.lock().map(|l| l.stats()).unwrap_or_default();
        match &result {
            Ok(r) if r.changed => tracing::info!(
                trigger = trigger.as_str(),
                domains = r.domains,
                generation = r.generation,
                files = stats.files,
                files_parsed = stats.parsed,
                elapsed_ms,
                "reloaded"
            ),
            Ok(r) => tracing::debug!(
                trigger = trigger.as_str(),
                domains = r.domains,
                generation = r.generation,
                files = stats.files,
                files_read = stats.read,
                elapsed_ms,
                "reload: nothing changed"
            ),
            Err(e) => tracing::error!(
                trigger = trigger.as_str(),
                "reload rejected, previous config keeps serving: {e:#}"
            ),
        }
        // A reload frees the previous snapshot's and the parse's memory;
        // glibc keeps freed memory in its arenas unless told otherwise.
        // Trimming a heap of a million domains walks all of it (a fifth of
        // a small reload): after a small change it runs in the background
        // a moment later instead of inside the reload.
        let small = stats.incremental
            && stats.entries_parsed < 10_000
            && self.server.last_change() < 10_000;
        if small {
            crate::memory::release_free_memory_soon();
        } else {
            let _ = tokio::task::spawn_blocking(crate::memory::release_free_memory).await;
        }
        result
    }

    async fn load_and_apply(&self, force: bool) -> Result<Reloaded, ReloadError> {
        if self.path.is_none() {
            return Err(ReloadError::Embedded);
        }
        // Every change seen so far is read by this reload.
        self.covered
            .store(self.changes.load(Ordering::SeqCst), Ordering::SeqCst);
        let loader = Arc::clone(&self.loader);
        let applied = self.config.load_full();
        let mut cfg = tokio::task::spawn_blocking(move || -> Result<Config, ReloadError> {
            Ok(loader
                .lock()
                .map_err(|_| ReloadError::Task("config loader poisoned".into()))?
                .load()?)
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))??;
        let unchanged = |cfg: &Config| Reloaded {
            domains: cfg.domains.len(),
            generation: self.server.generation(),
            changed: false,
        };
        if cfg.same_as(&applied) {
            return Ok(unchanged(&applied));
        }
        let held = if force {
            Vec::new()
        } else {
            crate::mxhold::hold_shrinks(&applied, &mut cfg, self.mx_resolver).await
        };
        for h in &held {
            tracing::warn!(
                domain = %h.domain,
                previous = %crate::mxhold::list(&h.previous),
                certificates = %crate::mxhold::list(&h.certificates),
                kept = %crate::mxhold::list(&h.kept),
                "mx shrink held in enforce mode ({}): serving the certificates' names plus the kept ones; \
                 it applies once no MX record needs them (or on SIGUSR1)",
                h.reason
            );
            self.server.metrics().mx_shrink_held.inc();
        }
        self.holding.store(!held.is_empty(), Ordering::SeqCst);
        self.server
            .metrics()
            .mx_shrink_held_domains
            .set(held.len() as i64);
        if cfg.same_as(&applied) {
            return Ok(unchanged(&applied));
        }
        // No other reload can load or apply between the load above and this
        // apply: the caller holds the reload lock, in a task that is never
        // dropped half-way (see `Control::lock`).
        let server = Arc::clone(&self.server);
        let cfg = tokio::task::spawn_blocking(move || -> Result<Config, ReloadError> {
            server.apply(&cfg)?;
            Ok(cfg)
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))??;
        self.rewatch_certs(&cfg);
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        if cfg.server != self.running {
            tracing::warn!("[server] settings changed; they take effect after a restart");
        }
        if cfg.tls != self.running_tls {
            tracing::warn!("[tls] settings changed; they take effect after a restart");
        }
        // The new snapshot is being served: only now may its ids reach DNS.
        if let Some(push) = &self.auto_push
            && let Err(e) = push.submit(&cfg, &self.server.snapshot())
        {
            tracing::error!("dns push not queued: {e}");
        }
        let domains = cfg.domains.len();
        self.config.store(Arc::new(cfg));
        Ok(Reloaded {
            domains,
            generation: self.server.generation(),
            changed: true,
        })
    }

    /// Points the certificate watcher (if [`watch`] started one) at the
    /// directories `cfg`'s `mx_certs` entries need, and only those.
    fn rewatch_certs(&self, cfg: &Config) {
        use notify::{RecursiveMode, Watcher};
        let Ok(mut guard) = self.cert_watch.lock() else {
            return;
        };
        let Some(cw) = guard.as_mut() else {
            return;
        };
        if !cfg.mx_certs_used && cw.dirs.is_empty() {
            return;
        }
        // Many domains share the same entries (e.g. from [defaults]).
        let mut entries: Vec<&PathBuf> = cfg
            .domains
            .iter()
            .filter_map(|d| match &d.mx_source {
                MxSource::Certs(paths) => Some(paths),
                MxSource::Explicit => None,
            })
            .flatten()
            .collect();
        entries.sort_unstable();
        entries.dedup();
        let mut want: HashMap<PathBuf, bool> = HashMap::new();
        for entry in entries {
            for (dir, recursive) in crate::mxcert::watch_dirs(entry) {
                *want.entry(dir).or_default() |= recursive;
            }
        }
        let stale: Vec<PathBuf> = cw
            .dirs
            .iter()
            .filter(|(d, r)| want.get(*d) != Some(r))
            .map(|(d, _)| d.clone())
            .collect();
        for dir in stale {
            let _ = cw.watcher.unwatch(&dir);
            cw.dirs.remove(&dir);
        }
        for (dir, recursive) in want {
            if cw.dirs.contains_key(&dir) {
                continue;
            }
            // A recursive watch of the root would see the whole system.
            if recursive && dir.parent().is_none() {
                tracing::warn!(
                    "not watching {} for mx_certs globs; reload with SIGHUP after renewals",
                    dir.display()
                );
                continue;
            }
            let mode = if recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match cw.watcher.watch(&dir, mode) {
                Ok(()) => {
                    cw.dirs.insert(dir, recursive);
                }
                Err(e) => tracing::warn!(
                    "cannot watch {} for mail server certificate changes ({e}); reload with SIGHUP after renewals",
                    dir.display()
                ),
            }
        }
    }

    /// Notes a file-watch event (called as events arrive).
    fn saw_change(&self) -> u64 {
        self.changes.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Whether a reload started after file-watch event number `seen`.
    fn covers(&self, seen: u64) -> bool {
        self.covered.load(Ordering::SeqCst) >= seen
    }
}

/// Reloads on each SIGHUP until the process ends. The handler is registered
/// by the caller before the listeners are bound: a SIGHUP sent as soon as a
/// port answers must reload, not end the process (SIGHUP's default action).
#[cfg(unix)]
pub async fn reload_on_sighup(control: Arc<Control>, mut hup: tokio::signal::unix::Signal) {
    while hup.recv().await.is_some() {
        // The outcome is logged and counted by reload itself.
        let _ = control.reload(Trigger::Signal).await;
    }
}

/// Reloads with mx shrinks forced on each SIGUSR1 (see [`crate::mxhold`]).
#[cfg(unix)]
pub async fn force_shrinks_on_sigusr1(
    control: Arc<Control>,
    mut usr1: tokio::signal::unix::Signal,
) {
    while usr1.recv().await.is_some() {
        tracing::info!("SIGUSR1: reloading with mx shrinks forced");
        let _ = control.reload_forcing_shrinks(Trigger::Signal).await;
    }
}

/// Watches the config file and `domains_dir`; a burst of changes (an editor
/// save, a deploy tool writing many files) becomes one reload once the files
/// have been quiet for `debounce`. One look follows the start of the watch,
/// for changes made before it. The returned watcher must be kept.
///
/// Only changes count: inotify also reports every open and read of the
/// files, and the reload itself reads them, so counting those would reload
/// forever.
///
/// The directories of the `mx_certs` files are watched the same way (any
/// change in them counts: a reload whose certificates did not change
/// applies nothing), and while an mx shrink is held it is looked at again
/// every [`HOLD_RECHECK`].
pub fn watch(
    control: Arc<Control>,
    debounce: Duration,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let cfg = control.config();
    let config_path = control.path.clone();
    let domains_dir = cfg.domains_dir.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let relevant = {
        let config_path = config_path.clone();
        let domains_dir = domains_dir.clone();
        move |p: &Path| {
            config_path.as_deref().is_some_and(|c| same_file(c, p))
                || domains_dir.as_deref().is_some_and(|d| {
                    p.parent().is_some_and(|parent| same_file(parent, d))
                        && p.extension().is_some_and(|e| e == "toml")
                })
        }
    };
    let counter = Arc::clone(&control);
    let look = tx.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            )
            && event.paths.iter().any(|p| relevant(p))
        {
            let _ = tx.send(counter.saw_change());
        }
    })?;
    if let Some(dir) = config_path.as_deref().and_then(Path::parent).map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    }) {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    if let Some(dir) = &domains_dir {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    let certs_counter = Arc::clone(&control);
    let certs_tx = look.clone();
    let cert_watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            )
        {
            let _ = certs_tx.send(certs_counter.saw_change());
        }
    })?;
    if let Ok(mut slot) = control.cert_watch.lock() {
        *slot = Some(CertWatch {
            watcher: cert_watcher,
            dirs: HashMap::new(),
        });
    }
    control.rewatch_certs(&cfg);
    let recheck = Arc::clone(&control);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(HOLD_RECHECK).await;
            if recheck.holding.load(Ordering::SeqCst) {
                let _ = recheck.reload(Trigger::Watch).await;
            }
        }
    });
    // A file changed between the last load and now (e.g. while the server
    // started) sent no event: look once. Only files whose stat changed are
    // re-read, and a look that finds nothing changed applies nothing.
    let _ = look.send(control.saw_change());
    tokio::spawn(async move {
        while let Some(mut last) = rx.recv().await {
            // Debounce: wait until no change arrived for `debounce`.
            loop {
                tokio::time::sleep(debounce).await;
                let mut more = false;
                while let Ok(n) = rx.try_recv() {
                    last = n;
                    more = true;
                }
                if !more {
                    break;
                }
            }
            // A reload (SIGHUP, admin API) that started after the last
            // event has read these changes already.
            if control.covers(last) {
                tracing::debug!("file change already reloaded");
                continue;
            }
            let _ = control.reload(Trigger::Watch).await;
        }
    });
    Ok(watcher)
}

/// Path equality that tolerates `./x` versus `/abs/x`.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        // A removed file cannot be canonicalised: compare by name within
        // canonical parents.
        _ => {
            let parent = |p: &Path| {
                p.parent()
                    .map(|d| {
                        if d.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            d
                        }
                    })
                    .and_then(|d| std::fs::canonicalize(d).ok())
            };
            a.file_name() == b.file_name() && parent(a).is_some() && parent(a) == parent(b)
        }
    }
}
