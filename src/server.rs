//! The listeners: accept loops for HTTPS and HTTP with connection limits,
//! handshake/header/idle timeouts, SNI checked before any certificate is
//! shown, and graceful shutdown that lets in-flight requests finish.
//!
//! [`Server`] owns the state; [`Server::run`] takes already bound listeners,
//! so tests bind `127.0.0.1:0` and drive the real server. In
//! `tls.mode = "acme"` it also runs the certificate manager, answers
//! HTTP-01 on the http listener and TLS-ALPN-01 on the https listener.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::acme::challenge::{self, Challenges};
use crate::acme::{Manager, Progress, StoreLoader};
use crate::config::{Config, Limits, TlsMode};
use crate::http::{Listener, Shared};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::store::{AnyStore, DirStore, StoreError};
use crate::tls::{self, CertIndex, LocalCa, TlsError};

mod conn;
use conn::{ConnCtx, PerClient, accept_loop};

/// Why the server could not start or apply a config.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("certificate store: {0}")]
    Store(#[from] StoreError),
}

/// The ACME side of a server (`tls.mode = "acme"`).
struct AcmeParts {
    manager: Arc<Manager<AnyStore>>,
    /// Each applied snapshot goes here; the manager follows it.
    sites: watch::Sender<Arc<Snapshot>>,
    challenges: Arc<Challenges>,
    /// rustls config of TLS-ALPN-01 validation handshakes.
    alpn_config: Arc<rustls::ServerConfig>,
}

/// A running publisher: current snapshot, certificates, limits.
pub struct Server {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    generation: std::sync::atomic::AtomicU64,
    certs: Arc<CertIndex>,
    tls_config: Arc<rustls::ServerConfig>,
    limits: Limits,
    /// Budget of the admin listener, apart from `limits.max_connections`.
    admin_max_connections: usize,
    /// The local CA certificate of self-signed mode (the CA itself lives
    /// on as the index's loader).
    ca_path: PathBuf,
    acme: Option<AcmeParts>,
    /// `[tlsrpt] receive`: reports POSTed to the policy hosts.
    tlsrpt: std::sync::OnceLock<Arc<crate::tlsrpt::receive::Receiver>>,
    /// Told about names asked for that are not served (on-demand onboarding).
    first_contact: Arc<std::sync::OnceLock<FirstContactHook>>,
    /// Sites added, replaced or removed by the last applied snapshot.
    last_change: std::sync::atomic::AtomicUsize,
}

/// Where a name not served was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstContact {
    /// A ClientHello for `mta-sts.<domain>`.
    Sni,
    /// A DNS query for `<domain>.<zone>` in the delegation zone.
    Dns,
}

/// Called with the domain (not the policy host) of a first contact; must
/// not block (it runs on the handshake and DNS paths).
pub type FirstContactHook = Arc<dyn Fn(&str, FirstContact) + Send + Sync>;

impl Server {
    /// Builds the first snapshot. Self-signed mode makes sure every domain
    /// has a certificate; ACME mode serves at once and certificates arrive
    /// when [`Server::run`]'s manager gets them. Blocking (key generation,
    /// file I/O): call it before serving or from `spawn_blocking`.
    pub fn new(config: &Config) -> Result<Server, ServeError> {
        Server::with_store(config, None)
    }

    /// [`Server::new`] on a given store (`[store] backend = "postgres"`:
    /// opened by the caller, which needs the runtime); `None`: the files
    /// store in `state_dir`.
    pub fn with_store(config: &Config, store: Option<AnyStore>) -> Result<Server, ServeError> {
        let (ca, certs, acme) = match config.tls.mode {
            TlsMode::SelfSigned => {
                let ca = Arc::new(LocalCa::load_or_create(&config.server.state_dir)?);
                let certs = Arc::new(CertIndex::lazy(
                    Arc::clone(&ca) as Arc<dyn tls::CertLoader>,
                    config.server.cert_cache,
                ));
                (Some(ca), certs, None)
            }
            TlsMode::Acme => {
                let challenges = Arc::new(Challenges::default());
                // Loaded from the store on each host's first handshake; the
                // manager says which hosts have one and hands over new ones.
                let store = Arc::new(match store {
                    Some(store) => store,
                    None => AnyStore::Files(DirStore::open(&config.server.state_dir)?),
                });
                if let AnyStore::Postgres(pg) = &*store {
                    challenges.share(pg.clone());
                }
                let (loader, unusable) = StoreLoader::new(Arc::clone(&store));
                let certs = Arc::new(CertIndex::lazy(
                    Arc::new(loader) as Arc<dyn tls::CertLoader>,
                    config.server.cert_cache,
                ));
                let manager = Manager::new(
                    config.tls.acme.clone(),
                    store,
                    Arc::clone(&certs),
                    Arc::clone(&challenges),
                    unusable,
                );
                let acme = AcmeParts {
                    manager: Arc::new(manager),
                    sites: watch::channel(Arc::new(Snapshot::default())).0,
                    alpn_config: challenge::tls_alpn_config(Arc::clone(&challenges)),
                    challenges,
                };
                (None, certs, Some(acme))
            }
        };
        let metrics = Arc::new(Metrics::new());
        let server = Server {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(Snapshot::default()),
                behind_proxy: config.server.behind_proxy,
                metrics: Arc::clone(&metrics),
            }),
            metrics,
            generation: std::sync::atomic::AtomicU64::new(0),
            tls_config: tls::server_config(Arc::clone(&certs)),
            certs,
            limits: config.server.limits.clone(),
            admin_max_connections: config
                .admin
                .as_ref()
                .map_or(crate::config::ADMIN_MAX_CONNECTIONS, |a| a.max_connections),
            ca_path: ca.as_ref().map_or_else(
                || config.server.state_dir.join("ca/ca.pem"),
                |ca| ca.cert_path.clone(),
            ),
            acme,
            tlsrpt: std::sync::OnceLock::new(),
            first_contact: Arc::default(),
            last_change: std::sync::atomic::AtomicUsize::new(0),
        };
        if server.acme.is_none() {
            // Self-signed: every host of the current snapshot is served,
            // with no per-host entry kept until its first handshake.
            let shared = Arc::clone(&server.shared);
            server
                .certs
                .serve_lazily(move |host| shared.snapshot.load().lookup(host).is_some());
        }
        server.apply(config)?;
        Ok(server)
    }

    /// Path of the local CA certificate clients must trust (self-signed
    /// mode; in ACME mode no such file is made).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The ACME manager's counters (`None` in self-signed mode).
    pub fn acme_progress(&self) -> Option<Progress> {
        self.acme.as_ref().map(|a| a.manager.progress())
    }

    /// Receive TLS reports on every policy host (before [`Server::run`]).
    /// Sets who is told about first contacts (once; later calls are
    /// ignored).
    pub fn on_first_contact(&self, hook: FirstContactHook) {
        let _ = self.first_contact.set(hook);
    }

    /// A name not served was asked for: tell the hook, if any.
    pub fn first_contact(&self, domain: &str, via: FirstContact) {
        if let Some(hook) = self.first_contact.get() {
            hook(domain, via);
        }
    }

    pub fn receive_tlsrpt(
        &self,
        store: crate::tlsrpt::store::ReportStore,
        limits: crate::config::TlsRptConfig,
    ) {
        let _ = self.tlsrpt.set(Arc::new(crate::tlsrpt::receive::Receiver {
            store,
            limits,
            metrics: Arc::clone(&self.metrics),
            certs: Arc::clone(&self.certs),
        }));
    }

    /// The SNI index's certificates (expiry per host, for the dashboard).
    pub fn cert_index(&self) -> &Arc<CertIndex> {
        &self.certs
    }

    /// Another replica stored a certificate for `host` (shared store).
    pub fn store_changed(&self, host: &str) {
        if let Some(acme) = &self.acme {
            acme.manager.store_changed(host);
        }
    }

    /// The SNI index (which hosts can complete a handshake right now).
    pub fn certs(&self) -> &CertIndex {
        &self.certs
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Sites added, replaced or removed by the last applied snapshot.
    pub fn last_change(&self) -> usize {
        self.last_change.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Number of the snapshot being served (1 after start, +1 per apply).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a certificate for `host` is loaded (the handshake would succeed).
    pub fn has_certificate(&self, host: &str) -> bool {
        self.certs.contains(host)
    }

    /// Swaps in the snapshot of `config`, certificates first, so that every
    /// host in the new snapshot can complete a handshake the moment it is
    /// served. On error nothing changes.
    ///
    /// In ACME mode the snapshot is served at once: hosts without a
    /// certificate yet fail the handshake cleanly until theirs lands.
    pub fn apply(&self, config: &Config) -> Result<(), ServeError> {
        // Unchanged domains keep their rendered sites.
        let (snapshot, delta) = Snapshot::build_next(config, &self.snapshot());
        self.last_change
            .store(delta.changed, std::sync::atomic::Ordering::Relaxed);
        let domains = snapshot.len();
        let snapshot = Arc::new(snapshot);
        self.shared.snapshot.store(Arc::clone(&snapshot));
        // Self-signed certificates are loaded (or issued) on the first
        // handshake of each host, for every host of the snapshot just
        // stored: only the hosts that went leave the index and its cache.
        // In ACME mode the manager says which hosts have a certificate.
        if self.acme.is_none() {
            for host in &delta.removed {
                self.certs.remove(host);
            }
        }
        if let Some(acme) = &self.acme {
            acme.sites.send_replace(snapshot);
        }
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.metrics
            .snapshot_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.metrics
            .domains
            .set(i64::try_from(domains).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Brings the gauges that are computed rather than counted up to date
    /// (called before metrics are rendered).
    pub fn refresh_metrics(&self) {
        if let Some(t) = self.certs.soonest_expiry() {
            self.metrics.cert_expiry_soonest.set(t);
        }
        let loads = self.certs.loads();
        let counted = self.metrics.cert_loads.get();
        if loads > counted {
            self.metrics.cert_loads.inc_by(loads - counted);
        }
    }

    /// Serves until `shutdown` resolves (with the admin router on its own
    /// listener when given), then stops accepting and waits up to
    /// `shutdown_timeout` for open connections to finish their requests.
    pub async fn run(
        self: Arc<Self>,
        https: TcpListener,
        http: TcpListener,
        admin: Option<(TcpListener, axum::Router)>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        // Accept loops take a watcher per connection (also while it is still
        // handshaking), so shutdown waits for those too.
        let graceful = Arc::new(GracefulShutdown::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        // The policy listeners share one budget; the admin listener has its
        // own, so a flood on the former never locks the operator out.
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let per_client = Some(Arc::new(PerClient::new(self.limits.max_connections_per_ip)));
        let manager = match &self.acme {
            Some(acme) => {
                // Hosts with a stored certificate are in the index before
                // the first accept (their certificates are read on use).
                let mut sites = acme.sites.subscribe();
                let first = Arc::clone(&sites.borrow_and_update());
                let prepared = acme.manager.prepare(first).await;
                let manager = Arc::clone(&acme.manager);
                Some(tokio::spawn(manager.run(prepared, sites, stop_rx.clone())))
            }
            None => None,
        };
        // The policy listeners are served by one thread per core, each with
        // a single-threaded runtime accepting on its own handle of the
        // listening sockets (nginx's model): a connection stays on the
        // thread that accepted it, with no cross-thread wake-ups on the hot
        // path. The admin listener and the background tasks (ACME, reloads)
        // stay on the main runtime.
        let workers = serving_threads();
        let https_ctx = Arc::new(ConnCtx::new(
            &self,
            Listener::Https,
            None,
            per_client.clone(),
        ));
        let http_ctx = Arc::new(ConnCtx::new(&self, Listener::Http, None, per_client));
        let (finish_tx, finish_rx) = watch::channel(false);
        // Never carries a message: closed once every serving thread has left
        // its accept loops and dropped its handles on `graceful`.
        let (accepting_tx, mut accepting_rx) = tokio::sync::mpsc::channel::<()>(1);
        let (https_std, http_std) = (https.into_std()?, http.into_std()?);
        let mut threads = Vec::with_capacity(workers);
        for n in 0..workers {
            let sockets = (https_std.try_clone()?, http_std.try_clone()?);
            let contexts = (Arc::clone(&https_ctx), Arc::clone(&http_ctx));
            let (slots, stop, graceful) =
                (Arc::clone(&slots), stop_rx.clone(), Arc::clone(&graceful));
            let mut finish = finish_rx.clone();
            let accepting = accepting_tx.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("mtasts-serve-{n}"))
                    .spawn(move || {
                        runtime.block_on(async move {
                            let served = async move {
                                let https = TcpListener::from_std(sockets.0)?;
                                let http = TcpListener::from_std(sockets.1)?;
                                tokio::join!(
                                    accept_loop(
                                        https,
                                        contexts.0,
                                        Arc::clone(&slots),
                                        stop.clone(),
                                        Arc::clone(&graceful)
                                    ),
                                    accept_loop(http, contexts.1, slots, stop, graceful),
                                );
                                Ok::<_, std::io::Error>(())
                            }
                            .await;
                            drop(accepting);
                            // Open connections live on this runtime: keep it
                            // running until they finish or are given up on.
                            let _ = finish.wait_for(|done| *done).await;
                            served
                        })
                    })?,
            );
        }
        // The listening sockets close once every thread's handle is gone.
        drop((https_std, http_std, https_ctx, http_ctx, accepting_tx));
        let mut loops = tokio::task::JoinSet::new();
        if let Some((listener, router)) = admin {
            loops.spawn(accept_loop(
                listener,
                Arc::new(ConnCtx::new(&self, Listener::Http, Some(router), None)),
                Arc::new(Semaphore::new(self.admin_max_connections)),
                stop_rx.clone(),
                Arc::clone(&graceful),
            ));
        }
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing open requests");
        let _ = stop_tx.send(true);
        while loops.join_next().await.is_some() {}
        if let Some(mut manager) = manager
            && tokio::time::timeout(std::time::Duration::from_secs(5), &mut manager)
                .await
                .is_err()
        {
            manager.abort();
        }
        while accepting_rx.recv().await.is_some() {}
        // The accept loops, the only other owners, have all ended.
        if let Ok(graceful) = Arc::try_unwrap(graceful)
            && tokio::time::timeout(self.limits.shutdown_timeout, graceful.shutdown())
                .await
                .is_err()
        {
            tracing::warn!(
                "connections still open after {:?}; closing them",
                self.limits.shutdown_timeout
            );
        }
        let _ = finish_tx.send(true);
        let results = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("a serving thread panicked")))
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(std::io::Error::other)?;
        results.into_iter().collect()
    }
}

/// Threads serving the policy listeners: one per core the process may use
/// (std reads the cgroup CPU quota too).
fn serving_threads() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}
