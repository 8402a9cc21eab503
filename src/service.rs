//! `mtasts serve` after its config is loaded: the store (files or
//! PostgreSQL, with the replica's mirror of API-managed domains), the
//! server and its listeners, the delegation zone's DNS listener, reloads
//! (signals, file watch, admin API), the automatic push, on-demand
//! onboarding, and a graceful stop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::admin;
use crate::config::{Config, ConfigErrors, Loader};
use crate::control::{self, Control};
use crate::dns;
use crate::server::Server;
use crate::snapshot::Snapshot;

/// Serves `cfg` (loaded by `loader` from `path`, or the embedded example)
/// until a stop signal; `mx_resolver` answers the mx shrink hold's MX
/// lookups (default: the system's resolver).
pub fn run(
    cfg: Config,
    loader: Option<Loader>,
    path: Option<&Path>,
    mx_resolver: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Without one, mx shrinks under enforce are held (see crate::mxhold).
    let mx_resolver = mx_resolver.or_else(|| crate::check::system_resolver().ok());
    let (cfg, loader, shared) = match &cfg.store {
        crate::config::StoreConfig::Postgres(pg) => {
            let pg = pg.clone();
            runtime.block_on(open_shared(cfg, loader, &pg))?
        }
        crate::config::StoreConfig::Files => (cfg, loader, None),
    };
    runtime.block_on(serve_async(
        cfg,
        loader,
        path.map(Path::to_owned),
        mx_resolver,
        shared,
    ))
}

/// Prints a config's warnings and turns its errors into one error (the
/// errors are printed by `main`).
pub(crate) fn print_config_errors(e: ConfigErrors) -> anyhow::Error {
    for w in &e.warnings {
        eprintln!("{w}");
    }
    anyhow::Error::new(e)
}

pub(crate) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The shared store of a replica, and the mirror of its API-managed domains.
struct Shared {
    store: crate::store::pg::PgStore,
    sync: Option<crate::replica::DomainSync>,
    heartbeat: Duration,
    replica_timeout: Duration,
}

/// Opens the PostgreSQL store and brings `domains_dir` in line with its
/// API-managed domains before the first snapshot (reloading `cfg` if that
/// changed anything). A database that cannot be reached is not fatal: the
/// replica starts from its cache and catches up once it answers.
async fn open_shared(
    cfg: Config,
    loader: Option<Loader>,
    pg: &crate::config::PgConfig,
) -> anyhow::Result<(Config, Option<Loader>, Option<Shared>)> {
    use crate::replica::DomainSync;
    let store = crate::store::pg::PgStore::open(pg, &cfg.server.state_dir)?;
    let mut ready = true;
    if let Err(e) = store.migrate().await {
        ready = false;
        tracing::error!(error = %e, "the shared store cannot be reached; serving from the cache in state_dir and retrying");
        let retry = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if retry.migrate().await.is_ok() {
                    tracing::info!("the shared store answers again");
                    return;
                }
            }
        });
    }
    let mut sync = cfg.domains_dir.as_deref().map(DomainSync::new);
    let (mut cfg, mut loader) = (cfg, loader);
    if ready && let Some(sync) = sync.as_mut() {
        let changed = sync.catch_up(&store).await?;
        if !changed.is_empty()
            && let Some(l) = loader.as_mut()
        {
            tracing::info!(
                changed = changed.len(),
                "mirrored API-managed domains from the shared store"
            );
            match l.load() {
                Ok(c) => cfg = c,
                Err(e) => {
                    tracing::error!(
                        "domains from the shared store are rejected here; starting without those changes:\n{e}"
                    );
                    DomainSync::undo(&changed);
                    cfg = l.load().map_err(print_config_errors)?;
                }
            }
        }
    }
    Ok((
        cfg,
        loader,
        Some(Shared {
            store,
            sync,
            heartbeat: pg.heartbeat,
            replica_timeout: pg.replica_timeout,
        }),
    ))
}

/// Temporary files that an earlier process killed mid-write left in the
/// directories mtasts writes to (see [`crate::store::remove_stale_temps`]).
fn remove_stale_temps(cfg: &Config) {
    let state = &cfg.server.state_dir;
    let mut dirs = vec![state.clone(), state.join("ca")];
    for sub in ["accounts", "certs", "state"] {
        dirs.push(state.join("acme").join(sub));
    }
    dirs.extend(cfg.domains_dir.iter().cloned());
    for dir in dirs {
        let n = crate::store::remove_stale_temps(&dir);
        if n > 0 {
            tracing::info!(dir = %dir.display(), removed = n, "removed temporary files left by an interrupted write");
        }
    }
}

async fn serve_async(
    cfg: Config,
    loader: Option<Loader>,
    path: Option<PathBuf>,
    mx_resolver: Option<std::net::SocketAddr>,
    shared: Option<Shared>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Before anything is bound: whoever sees a port answer may signal us.
    let signals = Signals::register()?;
    remove_stale_temps(&cfg);
    let setup = cfg.clone();
    let store = shared
        .as_ref()
        .map(|s| crate::store::AnyStore::Postgres(s.store.clone()));
    let server = tokio::task::spawn_blocking(move || Server::with_store(&setup, store))
        .await
        .context("certificate setup panicked")??;
    // Where TLS reports are kept (received here, ingested from mail, or
    // both), for the receiver and the dashboard.
    let ui_reports = match &shared {
        Some(shared) => Some(crate::tlsrpt::store::ReportStore::postgres(
            shared.store.clone(),
        )),
        None if cfg.tlsrpt.receive || cfg.server.state_dir.join("tlsrpt.sqlite").exists() => {
            Some(crate::tlsrpt::store::ReportStore::for_config(&cfg).await?)
        }
        None => None,
    };
    if cfg.tlsrpt.receive
        && let Some(store) = &ui_reports
    {
        crate::tlsrpt::spawn_retention(store.clone(), cfg.tlsrpt.retention);
        server.receive_tlsrpt(store.clone(), cfg.tlsrpt.clone());
    }
    let server = Arc::new(server);
    // Bound only now, so that a client that can connect finds every
    // certificate in place.
    let https = tokio::net::TcpListener::bind(cfg.server.https)
        .await
        .with_context(|| format!("cannot listen on https address {}", cfg.server.https))?;
    let http = tokio::net::TcpListener::bind(cfg.server.http)
        .await
        .with_context(|| format!("cannot listen on http address {}", cfg.server.http))?;
    // The admin listener too, before anything is announced: whoever sees
    // the policy listeners up can reach the admin API (connections wait in
    // the backlog until `run` accepts).
    let admin_listener = match &cfg.admin {
        Some(a) => {
            let token = admin::read_token(&a.token_file)?;
            let listener = tokio::net::TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("cannot listen on admin address {}", a.listen))?;
            Some((listener, token))
        }
        None => None,
    };
    // The delegation zone, answered from the snapshots this process serves.
    if let Some(delegation) = &cfg.delegation
        && let Some(addr) = delegation.dns_listen
    {
        dns::serve::spawn(Arc::clone(&server), delegation.clone(), addr)
            .await
            .with_context(|| format!("cannot listen for DNS on {addr}"))?;
    }
    let https_addr = https.local_addr()?;
    let http_addr = http.local_addr()?;
    let snapshot = server.snapshot();
    tracing::info!(
        domains = snapshot.len(),
        https = %https_addr,
        http = %http_addr,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "serving"
    );
    print_banner(&cfg, &server, &snapshot, https_addr, http_addr);

    // The listeners are bound and the snapshot is in place: its ids may go
    // to DNS now (connections wait in the backlog until `run` accepts), and
    // after every reload once the new snapshot is applied.
    let auto_push = match &shared {
        Some(shared) => crate::auto_push::AutoPush::start_gated(crate::auto_push::PushGate {
            store: shared.store.clone(),
            replica_timeout: shared.replica_timeout,
            poll: shared.heartbeat,
        }),
        None => crate::auto_push::AutoPush::start(),
    };
    auto_push.submit(&cfg, &snapshot)?;
    let mut control = Control::new(Arc::clone(&server), path.clone(), cfg.clone(), loader)
        .with_auto_push(auto_push)
        .with_mx_resolver(mx_resolver);
    if let Some(shared) = &shared {
        control = control.with_store(shared.store.clone());
    }
    let control = Arc::new(control);
    // First contacts (unknown SNI, unknown name in the delegation zone)
    // go to onboarding; it acts only while [on_demand] is enabled.
    let onboarder = cfg.delegation.as_ref().map(|_| {
        let onboarder = crate::onboard::Onboarder::start(Arc::clone(&control));
        let hook = Arc::clone(&onboarder);
        server.on_first_contact(Arc::new(move |domain: &str, via| {
            hook.notice(domain, crate::onboard::Via::from(via));
        }));
        onboarder
    });
    let replica = shared.map(|shared| {
        tokio::spawn(crate::replica::run(
            Arc::clone(&control),
            shared.store,
            shared.sync,
            shared.heartbeat,
        ))
    });
    // The first load's parse is freed by now.
    tokio::task::spawn_blocking(crate::memory::release_free_memory).await?;
    let (shutdown, reloads) = signals.split(Arc::clone(&control));
    let reloader = tokio::spawn(reloads);
    // Keep the watcher alive while serving.
    let _watcher = match &path {
        Some(_) => match control::watch(Arc::clone(&control), Duration::from_millis(300)) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("cannot watch the config files ({e}); reload with SIGHUP");
                None
            }
        },
        None => None,
    };
    let admin = match admin_listener {
        Some((listener, token)) => {
            tracing::info!(admin = %listener.local_addr()?, "admin API listening");
            Some((
                listener,
                admin::router(
                    Arc::clone(&control),
                    token,
                    ui_reports.clone(),
                    onboarder.clone(),
                ),
            ))
        }
        None => None,
    };
    let progress_line = tokio::spawn(crate::progress::show(Arc::clone(&server)));
    let result = Arc::clone(&server).run(https, http, admin, shutdown).await;
    reloader.abort();
    if let Some(replica) = replica {
        replica.abort();
        if let Some(pg) = control.pg() {
            // Not waited for by auto_push any more.
            let _ = pg.leave().await;
        }
    }
    progress_line.abort();
    // Stopped for sure (not drawing again) before its line is erased.
    let _ = progress_line.await;
    crate::progress::clear();
    result.context("server failed")?;
    tracing::info!("stopped");
    Ok(())
}

fn print_banner(
    cfg: &Config,
    server: &Server,
    snapshot: &Snapshot,
    https: std::net::SocketAddr,
    http: std::net::SocketAddr,
) {
    let connect_ip = if https.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        https.ip().to_string()
    };
    let connect_ip = if https.is_ipv6() && !https.ip().is_unspecified() {
        format!("[{connect_ip}]")
    } else {
        connect_ip
    };
    let mut out = format!(
        "mtasts: serving {} domain{} on https://{https} (http: {http})\n",
        snapshot.len(),
        plural(snapshot.len()),
    );
    if cfg.tls.mode == crate::config::TlsMode::Acme {
        out.push_str(&format!(
            "certificates via ACME from {}; they are served as they arrive (see `mtasts certs --config ...`)\n",
            cfg.tls.acme.directory
        ));
    } else {
        out.push_str(&format!(
            "local CA certificate (trust it to verify): {}\n",
            server.ca_path().display()
        ));
    }
    if let (Some(site), crate::config::TlsMode::SelfSigned) =
        (snapshot.sites().front(), cfg.tls.mode)
    {
        out.push_str(&format!(
            "fetch a policy:\n  curl --cacert {} --resolve {host}:{port}:{connect_ip} https://{host}:{port}{path}\n",
            server.ca_path().display(),
            host = site.host(),
            port = https.port(),
            path = crate::http::POLICY_PATH,
        ));
    }
    if cfg.server.behind_proxy {
        out.push_str("behind_proxy = true: the http listener serves policies too\n");
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// The process's signal handlers, registered at the start of `serve`. Tokio
/// installs a handler only when its stream is created, so creating them
/// lazily (when the server loop first polls them) left a window after the
/// ports were bound in which SIGTERM or SIGHUP took its default action and
/// ended the process without a "stopped" line.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
    #[cfg(unix)]
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn register() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot install the {name} handler"))
        };
        Ok(Signals {
            term: handler(SignalKind::terminate(), "SIGTERM")?,
            int: handler(SignalKind::interrupt(), "SIGINT")?,
            hup: handler(SignalKind::hangup(), "SIGHUP")?,
            usr1: handler(SignalKind::user_defined1(), "SIGUSR1")?,
        })
    }

    #[cfg(not(unix))]
    fn register() -> anyhow::Result<Signals> {
        Ok(Signals {})
    }

    /// The future that resolves on SIGTERM or SIGINT, and the task that
    /// reloads on each SIGHUP (and with mx shrinks forced on each SIGUSR1).
    #[cfg(unix)]
    fn split(
        self,
        control: Arc<Control>,
    ) -> (
        impl std::future::Future<Output = ()> + Send + 'static,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let Signals {
            mut term,
            mut int,
            hup,
            usr1,
        } = self;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        let reloads = async move {
            tokio::join!(
                control::reload_on_sighup(Arc::clone(&control), hup),
                control::force_shrinks_on_sigusr1(control, usr1)
            );
        };
        (shutdown, reloads)
    }

    #[cfg(not(unix))]
    fn split(
        self,
        _control: Arc<Control>,
    ) -> (
        impl std::future::Future<Output = ()> + Send + 'static,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        (shutdown, std::future::pending::<()>())
    }
}
