//! The listeners: accept loops for HTTPS and HTTP with connection limits,
//! handshake/header/idle timeouts, SNI checked before any certificate is
//! shown, and graceful shutdown that lets in-flight requests finish.
//!
//! [`Server`] owns the state; [`Server::run`] takes already bound listeners,
//! so tests bind `127.0.0.1:0` and drive the real server. In
//! `tls.mode = "acme"` it also runs the certificate manager, answers
//! HTTP-01 on the http listener and TLS-ALPN-01 on the https listener.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::LazyConfigAcceptor;

use crate::acme::challenge::{self, Challenges};
use crate::acme::{Manager, Progress, StoreLoader};
use crate::config::{Config, Limits, TlsMode};
use crate::http::{self, Listener, Shared};
use crate::idle::IdleTimeout;
use crate::metrics::{Handshake, Metrics};
use crate::snapshot::Snapshot;
use crate::store::{DirStore, StoreError};
use crate::tls::{self, CertIndex, LocalCa, TlsError};

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
    manager: Arc<Manager<DirStore>>,
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
    /// The local CA certificate of self-signed mode (the CA itself lives
    /// on as the index's loader).
    ca_path: PathBuf,
    acme: Option<AcmeParts>,
}

impl Server {
    /// Builds the first snapshot. Self-signed mode makes sure every domain
    /// has a certificate; ACME mode serves at once and certificates arrive
    /// when [`Server::run`]'s manager gets them. Blocking (key generation,
    /// file I/O): call it before serving or from `spawn_blocking`.
    pub fn new(config: &Config) -> Result<Server, ServeError> {
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
                // Loaded from the store on each host's first handshake; the
                // manager says which hosts have one and hands over new ones.
                let store = Arc::new(DirStore::open(&config.server.state_dir)?);
                let (loader, unusable) = StoreLoader::new(Arc::clone(&store));
                let certs = Arc::new(CertIndex::lazy(
                    Arc::new(loader) as Arc<dyn tls::CertLoader>,
                    config.server.cert_cache,
                ));
                let challenges = Arc::new(Challenges::default());
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
            ca_path: ca.as_ref().map_or_else(
                || config.server.state_dir.join("ca/ca.pem"),
                |ca| ca.cert_path.clone(),
            ),
            acme,
        };
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

    /// The SNI index (which hosts can complete a handshake right now).
    pub fn certs(&self) -> &CertIndex {
        &self.certs
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
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
        let snapshot = Snapshot::build_from(config, &self.snapshot());
        // Self-signed certificates are loaded (or issued) on the first
        // handshake of each host: nothing to read here, however many hosts.
        // In ACME mode the manager says which hosts have a certificate.
        if self.acme.is_none() {
            self.certs.set_lazy_hosts(
                snapshot
                    .sites()
                    .iter()
                    .map(|s| s.host.clone())
                    .collect::<HashSet<_>>(),
            );
        }
        let domains = snapshot.len();
        let snapshot = Arc::new(snapshot);
        self.shared.snapshot.store(Arc::clone(&snapshot));
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
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
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
        let https_ctx = Arc::new(ConnCtx::new(&self, Listener::Https, None));
        let http_ctx = Arc::new(ConnCtx::new(&self, Listener::Http, None));
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
                Arc::new(ConnCtx::new(&self, Listener::Http, Some(router))),
                Arc::clone(&slots),
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

/// What every connection of one listener needs.
struct ConnCtx {
    kind: Listener,
    metrics: Arc<Metrics>,
    /// For the hot path, which answers without the router.
    shared: Arc<Shared>,
    /// Answer with `http::answer` directly: the policy listeners when no
    /// other route (admin API, ACME HTTP-01) is mounted.
    direct: bool,
    router: axum::Router,
    certs: Arc<CertIndex>,
    tls_config: Arc<rustls::ServerConfig>,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    /// ACME mode: challenge answers and the TLS-ALPN-01 config.
    acme: Option<(Arc<Challenges>, Arc<rustls::ServerConfig>)>,
}

impl ConnCtx {
    fn new(server: &Server, kind: Listener, router: Option<axum::Router>) -> Self {
        let limits = server.limits.clone();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(100)
            .keep_alive_interval(None);
        let acme = server
            .acme
            .as_ref()
            .map(|a| (Arc::clone(&a.challenges), Arc::clone(&a.alpn_config)));
        let direct = router.is_none() && (kind == Listener::Https || acme.is_none());
        // The admin listener brings its own router; the public http
        // listener also answers HTTP-01 in ACME mode.
        let router = router.unwrap_or_else(|| {
            let app = http::app(Arc::clone(&server.shared), kind);
            match (&acme, kind) {
                (Some((challenges, _)), Listener::Http) => {
                    app.merge(challenge::http01_router(Arc::clone(challenges)))
                }
                _ => app,
            }
        });
        ConnCtx {
            kind,
            metrics: Arc::clone(&server.metrics),
            shared: Arc::clone(&server.shared),
            direct,
            router,
            acme,
            certs: Arc::clone(&server.certs),
            tls_config: Arc::clone(&server.tls_config),
            builder,
            limits,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ConnCtx>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    graceful: Arc<GracefulShutdown>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            ctx.metrics.connections_refused.inc();
            tracing::debug!(%peer, "connection limit reached; closing");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            match ctx.kind {
                Listener::Https => serve_tls(ctx, tcp, peer, watcher, permit).await,
                Listener::Http if ctx.direct => {
                    let shared = Arc::clone(&ctx.shared);
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            std::future::ready(Ok::<_, std::convert::Infallible>(http::answer(
                                &shared,
                                Listener::Http,
                                None,
                                &req,
                            )))
                        },
                    );
                    serve_io(&ctx, tcp, svc, watcher, permit).await;
                }
                Listener::Http => {
                    let svc = TowerToHyperService::new(ctx.router.clone());
                    serve_io(&ctx, tcp, svc, watcher, permit).await;
                }
            }
        });
    }
}

async fn serve_tls(
    ctx: Arc<ConnCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    watcher: Watcher,
    permit: OwnedSemaphorePermit,
) {
    // One budget for reading the ClientHello and finishing the handshake.
    let deadline = tokio::time::Instant::now() + ctx.limits.handshake_timeout;
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let Some(start) = handshake_step(
        &ctx,
        peer,
        "reading the ClientHello",
        tokio::time::timeout_at(deadline, acceptor).await,
    ) else {
        return;
    };
    if let Some((challenges, alpn_config)) = &ctx.acme
        && challenge::offers_acme_alpn(&start.client_hello())
    {
        answer_tls_alpn01(challenges, alpn_config, start, peer, deadline).await;
        return;
    }
    let sni = start
        .client_hello()
        .server_name()
        .and_then(http::normalize_host)
        .map(|s| Arc::<str>::from(&*s));
    let key = match &sni {
        Some(name) => ctx.certs.obtain(name).await,
        None => None,
    };
    let (Some(sni), Some(key)) = (sni, key) else {
        // Never fall back to another domain's certificate.
        ctx.metrics.handshake(Handshake::UnknownSni);
        let mut io = start.io;
        let _ = tokio::time::timeout_at(deadline, async {
            let _ = io.write_all(&tls::UNRECOGNIZED_NAME_ALERT).await;
            let _ = io.shutdown().await;
        })
        .await;
        return;
    };
    // The shared config's resolver hands out exactly the key obtained above
    // (tls::with_handshake_key), not whatever the cache holds by now. A
    // per-connection ServerConfig holding the key would do the same, but
    // cloning it per connection cost a third of the handshake rate (10,000
    // names, new connection per request: 1,946-2,361/s with the clone,
    // 3,041-3,054/s without).
    let accept =
        tls::with_handshake_key(&sni, key, || start.into_stream(Arc::clone(&ctx.tls_config)));
    let Some(tls) = handshake_step(
        &ctx,
        peer,
        "TLS handshake",
        tokio::time::timeout_at(deadline, accept).await,
    ) else {
        return;
    };
    ctx.metrics.handshake(Handshake::Ok);
    // The hot path: straight to the handler, no router and no boxed future.
    let shared = Arc::clone(&ctx.shared);
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(http::answer(
            &shared,
            Listener::Https,
            Some(&sni),
            &req,
        )))
    });
    serve_io(&ctx, tls, svc, watcher, permit).await;
}

/// The value of a handshake step that succeeded in time; a failure or a
/// timeout is counted and logged (at debug: clients fail handshakes all day).
fn handshake_step<T, E: std::fmt::Display>(
    ctx: &ConnCtx,
    peer: SocketAddr,
    what: &str,
    result: Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> Option<T> {
    match result {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            ctx.metrics.handshake(Handshake::Failed);
            tracing::debug!(%peer, error = %e, "{what} failed");
            None
        }
        Err(_) => {
            ctx.metrics.handshake(Handshake::Timeout);
            tracing::debug!(%peer, "{what} timed out");
            None
        }
    }
}

/// A TLS-ALPN-01 validation (RFC 8737 §3): show the challenge certificate
/// for the SNI, finish the handshake, close. No certificate for that name →
/// `unrecognized_name`, as for any unknown host.
async fn answer_tls_alpn01(
    challenges: &Challenges,
    config: &Arc<rustls::ServerConfig>,
    start: tokio_rustls::StartHandshake<TcpStream>,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) {
    let armed = start
        .client_hello()
        .server_name()
        .and_then(http::normalize_host)
        .is_some_and(|host| challenges.tls_alpn01(&host).is_some());
    if !armed {
        let mut io = start.io;
        let _ = tokio::time::timeout_at(deadline, async {
            let _ = io.write_all(&tls::UNRECOGNIZED_NAME_ALERT).await;
            let _ = io.shutdown().await;
        })
        .await;
        return;
    }
    match tokio::time::timeout_at(deadline, start.into_stream(Arc::clone(config))).await {
        Ok(Ok(mut tls)) => {
            tracing::debug!(%peer, "answered a TLS-ALPN-01 validation");
            let _ = tokio::time::timeout_at(deadline, tls.shutdown()).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS-ALPN-01 handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS-ALPN-01 handshake timed out"),
    }
}

async fn serve_io<I, S>(
    ctx: &ConnCtx,
    io: I,
    svc: S,
    watcher: Watcher,
    permit: OwnedSemaphorePermit,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    // Idle limit: a connection on which no byte moves for idle_timeout is
    // closed, between keep-alive requests, mid-request, or while the client
    // does not read its response.
    let io = TokioIo::new(IdleTimeout::new(io, ctx.limits.idle_timeout));
    let conn = ctx.builder.serve_connection(io, svc).into_owned();
    ctx.metrics.connections_open.inc();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    ctx.metrics.connections_open.dec();
    drop(permit);
}
