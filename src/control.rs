//! Reloading the configuration, whoever asks: SIGHUP, a change in the config
//! file or `domains_dir` (file watch, debounced), or the admin API. Reloads
//! are serialised; a config that fails validation is logged with
//! `file:line:col` and the running snapshot keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, MutexGuard};

use crate::config::{Config, ConfigErrors, ServerConfig, TlsConfig};
use crate::dns::update::AutoPush;
use crate::metrics::Trigger;
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

/// A reload that was applied.
#[derive(Debug, Clone, Copy)]
pub struct Reloaded {
    pub domains: usize,
    pub generation: u64,
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
    lock: Mutex<()>,
    /// `[dns.update] auto_push`: told about every applied snapshot.
    auto_push: Option<AutoPush>,
}

/// Proof that the caller holds the reload lock (for read-modify-reload
/// sequences such as the admin API's file writes).
pub struct ReloadLock<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);

impl Control {
    pub fn new(server: Arc<Server>, path: Option<PathBuf>, config: Config) -> Control {
        Control {
            server,
            path,
            running: config.server.clone(),
            running_tls: config.tls.clone(),
            config: ArcSwap::from_pointee(config),
            lock: Mutex::new(()),
            auto_push: None,
        }
    }

    /// After each applied reload, hands the new snapshot to `auto_push`
    /// (which pushes it only if the new config enables it).
    pub fn with_auto_push(mut self, auto_push: AutoPush) -> Control {
        self.auto_push = Some(auto_push);
        self
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The configuration currently applied.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub async fn lock(&self) -> ReloadLock<'_> {
        ReloadLock(self.lock.lock().await)
    }

    /// Re-reads and applies the config.
    pub async fn reload(&self, trigger: Trigger) -> Result<Reloaded, ReloadError> {
        let guard = self.lock().await;
        self.reload_locked(&guard, trigger).await
    }

    /// Like [`Control::reload`], for a caller that already holds the lock.
    pub async fn reload_locked(
        &self,
        _lock: &ReloadLock<'_>,
        trigger: Trigger,
    ) -> Result<Reloaded, ReloadError> {
        let result = self.load_and_apply().await;
        self.server.metrics().reload(trigger, result.is_ok());
        match &result {
            Ok(r) => tracing::info!(
                trigger = trigger.as_str(),
                domains = r.domains,
                generation = r.generation,
                "reloaded"
            ),
            Err(e) => tracing::error!(
                trigger = trigger.as_str(),
                "reload rejected, previous config keeps serving: {e:#}"
            ),
        }
        result
    }

    async fn load_and_apply(&self) -> Result<Reloaded, ReloadError> {
        let path = self.path.clone().ok_or(ReloadError::Embedded)?;
        let server = Arc::clone(&self.server);
        let cfg = tokio::task::spawn_blocking(move || -> Result<Config, ReloadError> {
            let cfg = Config::load(&path)?;
            server.apply(&cfg)?;
            Ok(cfg)
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))??;
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
        })
    }
}

/// Reloads on SIGHUP until the process ends.
pub async fn reload_on_sighup(control: Arc<Control>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            // The outcome is logged and counted by reload itself.
            let _ = control.reload(Trigger::Signal).await;
        }
    }
}

/// Watches the config file and `domains_dir`; a burst of changes (an editor
/// save, a deploy tool writing many files) becomes one reload once the files
/// have been quiet for `debounce`. The returned watcher must be kept.
///
/// Only changes count: inotify also reports every open and read of the
/// files, and the reload itself reads them, so counting those would reload
/// forever.
pub fn watch(
    control: Arc<Control>,
    debounce: Duration,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let cfg = control.config();
    let config_path = control.path.clone();
    let domains_dir = cfg.domains_dir.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
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
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            )
            && event.paths.iter().any(|p| relevant(p))
        {
            let _ = tx.send(());
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
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until no change arrived for `debounce`.
            loop {
                tokio::time::sleep(debounce).await;
                let mut more = false;
                while rx.try_recv().is_ok() {
                    more = true;
                }
                if !more {
                    break;
                }
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
