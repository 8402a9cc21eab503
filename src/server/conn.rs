//! One listener's connections: the accept loop with its limits (slots,
//! per-client counts), the TLS handshake with SNI checked before any
//! certificate is shown (and TLS-ALPN-01 answered), the HTTP service with
//! header and idle timeouts, and the in-flight tracking graceful shutdown
//! waits for.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::LazyConfigAcceptor;

use crate::acme::challenge::{self, Challenges};
use crate::config::Limits;
use crate::http::{self, Listener, Shared};
use crate::idle::IdleTimeout;
use crate::metrics::{Handshake, Metrics};
use crate::tls::{self, CertIndex};

use super::*;

/// What every connection of one listener needs.
pub(super) struct ConnCtx {
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
    /// Open connections per client (policy listeners; `None` for admin).
    per_client: Option<Arc<PerClient>>,
    tlsrpt: Option<Arc<crate::tlsrpt::receive::Receiver>>,
    first_contact: Arc<std::sync::OnceLock<FirstContactHook>>,
}

impl ConnCtx {
    pub(super) fn new(
        server: &Server,
        kind: Listener,
        router: Option<axum::Router>,
        per_client: Option<Arc<PerClient>>,
    ) -> Self {
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
            // A peer that stops answering PINGs while a response is under
            // way is dropped; idle and age limits are serve_io's (a client's
            // own PINGs must not keep a connection open).
            .keep_alive_interval(Some(bounded(limits.idle_timeout / 2)))
            .keep_alive_timeout(bounded(limits.header_read_timeout));
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
            per_client,
            tlsrpt: server.tlsrpt.get().cloned(),
            first_contact: Arc::clone(&server.first_contact),
        }
    }
}

/// Open connections per client address, for `max_connections_per_ip`.
/// IPv6 clients are counted per /64 (one subscriber's usual allocation).
pub(super) struct PerClient {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerClient {
    pub(super) fn new(cap: usize) -> PerClient {
        PerClient {
            cap,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
            },
        }
    }

    /// A slot for one more connection from `ip`, or `None` at the cap.
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = PerClient::key(ip);
        let mut open = crate::sync::lock(&self.open);
        let n = open.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: Arc::clone(self),
            key,
        })
    }
}

/// One connection counted in [`PerClient`]; released on drop.
struct ClientSlot {
    table: Arc<PerClient>,
    key: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = crate::sync::lock(&self.table.open);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// What an accepted connection holds until it is closed: its share of the
/// listener's budget and of its client's, the graceful-shutdown watcher
/// (shutdown waits for it) and the server's stop signal.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _client: Option<ClientSlot>,
    _watcher: Watcher,
    stop: watch::Receiver<bool>,
}

pub(super) async fn accept_loop(
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
        let client = match &ctx.per_client {
            Some(table) => match table.acquire(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    ctx.metrics.connections_refused.inc();
                    tracing::debug!(%peer, "per-client connection limit reached; closing");
                    drop(tcp);
                    continue;
                }
            },
            None => None,
        };
        let _ = tcp.set_nodelay(true);
        let slot = Slot {
            _permit: permit,
            _client: client,
            _watcher: graceful.watcher(),
            stop: stop.clone(),
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            match ctx.kind {
                Listener::Https => serve_tls(ctx, tcp, peer, slot).await,
                Listener::Http if ctx.direct => {
                    let shared = Arc::clone(&ctx.shared);
                    let tlsrpt = proxied_tlsrpt(&ctx);
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            use futures_util::future::Either;
                            let req = match tlsrpt_request(tlsrpt.as_ref(), &shared, None, req) {
                                Routed::Report(report) => return Either::Right(report),
                                Routed::Other(req) => req,
                            };
                            Either::Left(std::future::ready(Ok::<_, std::convert::Infallible>(
                                http::answer(&shared, Listener::Http, None, &req),
                            )))
                        },
                    );
                    serve_io(&ctx, tcp, svc, slot).await;
                }
                Listener::Http => {
                    // Boxed so that the request tracking needs no pinning
                    // (only the admin and ACME-mode http listeners route).
                    let svc = TowerToHyperService::new(ctx.router.clone());
                    let shared = Arc::clone(&ctx.shared);
                    let tlsrpt = proxied_tlsrpt(&ctx);
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            use futures_util::future::Either;
                            let req = match tlsrpt_request(tlsrpt.as_ref(), &shared, None, req) {
                                Routed::Report(report) => return Either::Right(report),
                                Routed::Other(req) => req,
                            };
                            Either::Left(Box::pin(hyper::service::Service::call(&svc, req)))
                        },
                    );
                    serve_io(&ctx, tcp, svc, slot).await;
                }
            }
        });
    }
}

/// The TLS-report receiver of a plain-HTTP policy listener: only behind a
/// TLS-terminating proxy (`behind_proxy`), and not on the admin listener.
fn proxied_tlsrpt(ctx: &ConnCtx) -> Option<Arc<crate::tlsrpt::receive::Receiver>> {
    ctx.tlsrpt
        .clone()
        .filter(|_| ctx.shared.behind_proxy && ctx.per_client.is_some())
}

/// A TLS report being received: the answer to a POST to /tlsrpt.
type ReportAnswer = Pin<
    Box<dyn Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send>,
>;

/// Where a request goes: a TLS report being received, or the usual path.
/// The request is moved, not boxed: boxing it would allocate on every
/// policy fetch to spare a copy the compiler mostly elides.
#[allow(clippy::large_enum_variant)]
enum Routed {
    Report(ReportAnswer),
    Other(hyper::Request<hyper::body::Incoming>),
}

/// `req` as a TLS report for the policy site it is posted to (by the SNI
/// on HTTPS, else by the Host header), or `req` back for the usual path:
/// no receiver, another path, or a host not served.
fn tlsrpt_request(
    receiver: Option<&Arc<crate::tlsrpt::receive::Receiver>>,
    shared: &Shared,
    sni: Option<&str>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Routed {
    let Some(receiver) = receiver else {
        return Routed::Other(req);
    };
    if req.uri().path() != crate::tlsrpt::PATH {
        return Routed::Other(req);
    }
    let site = {
        let host = match sni {
            Some(sni) => Some(std::borrow::Cow::Borrowed(sni)),
            None => req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                .and_then(http::normalize_host),
        };
        host.and_then(|h| shared.snapshot.load().lookup(&h).cloned())
    };
    let Some(site) = site else {
        return Routed::Other(req);
    };
    let receiver = Arc::clone(receiver);
    Routed::Report(Box::pin(
        async move { Ok(receiver.handle(site, req).await) },
    ))
}

async fn serve_tls(ctx: Arc<ConnCtx>, tcp: TcpStream, peer: SocketAddr, slot: Slot) {
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
    let (sni, key) = match (sni, key) {
        (Some(sni), Some(key)) => (sni, key),
        (sni, None) | (sni @ None, _) => {
            // Never fall back to another domain's certificate.
            ctx.metrics.handshake(Handshake::UnknownSni);
            if let Some(hook) = ctx.first_contact.get()
                && let Some(domain) = sni.as_deref().and_then(|h| h.strip_prefix("mta-sts."))
            {
                hook(domain, FirstContact::Sni);
            }
            refuse_unknown_name(start, deadline).await;
            return;
        }
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
    // The hot path: straight to the handler, no router and no boxed future
    // (only a TLS report, POSTed to /tlsrpt, is read asynchronously).
    let shared = Arc::clone(&ctx.shared);
    let tlsrpt = ctx.tlsrpt.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        use futures_util::future::Either;
        let req = match tlsrpt_request(tlsrpt.as_ref(), &shared, Some(&sni), req) {
            Routed::Report(report) => return Either::Right(report),
            Routed::Other(req) => req,
        };
        Either::Left(std::future::ready(Ok::<_, std::convert::Infallible>(
            http::answer(&shared, Listener::Https, Some(&sni), &req),
        )))
    });
    serve_io(&ctx, tls, svc, slot).await;
}

/// Ends a handshake for a name not served: the unrecognized_name alert.
async fn refuse_unknown_name(
    start: tokio_rustls::StartHandshake<TcpStream>,
    deadline: tokio::time::Instant,
) {
    let mut io = start.io;
    let _ = tokio::time::timeout_at(deadline, async {
        let _ = io.write_all(&tls::UNRECOGNIZED_NAME_ALERT).await;
        let _ = io.shutdown().await;
    })
    .await;
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
    let host = start
        .client_hello()
        .server_name()
        .and_then(http::normalize_host)
        .map(|h| h.into_owned());
    let armed = match host {
        Some(host) => challenges.tls_alpn01_anywhere(&host).await.is_some(),
        None => false,
    };
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

/// Serves one connection until it ends or one of its limits closes it.
///
/// Limits at two levels: the byte level ([`IdleTimeout`]: nothing moved for
/// `idle_timeout`), and the request level here, which HTTP/2 needs because
/// PING, SETTINGS or WINDOW_UPDATE frames move bytes without a request:
/// - no first request within `header_read_timeout`, or no new request (and
///   none in flight) for `idle_timeout` afterwards;
/// - open longer than `max_connection_age`, however busy.
///
/// Each closes gracefully (HTTP/2 GOAWAY, HTTP/1.1 after the response in
/// flight); a client that does not finish within `shutdown_timeout` after
/// that is cut off.
async fn serve_io<I, S, F>(ctx: &ConnCtx, io: I, svc: S, mut slot: Slot)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future = F,
        > + Clone
        + Send
        + 'static,
    F: Future<Output = Result<axum::response::Response, std::convert::Infallible>>
        + Send
        + Unpin
        + 'static,
{
    use tokio::time::Instant;
    let limits = &ctx.limits;
    let activity = Arc::new(Activity::default());
    let svc = Tracked {
        inner: svc,
        activity: Arc::clone(&activity),
    };
    let io = TokioIo::new(IdleTimeout::new(io, limits.idle_timeout));
    let conn = ctx.builder.serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    ctx.metrics.connections_open.inc();
    let opened = Instant::now();
    let age = tokio::time::sleep_until(opened + bounded(limits.max_connection_age));
    let mut age = std::pin::pin!(age);
    // Checked a few times per limit, not per request (the hot path only
    // counts): closes between the limit and 1.25 times the limit.
    let check = tokio::time::sleep_until(opened + bounded(limits.header_read_timeout / 4));
    let mut check = std::pin::pin!(check);
    let (mut seen, mut quiet_since) = (0u64, opened);
    let mut cutoff: Option<Instant> = None;
    let why = loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break None;
            }
            () = async { tokio::time::sleep_until(cutoff.unwrap_or(opened)).await }, if cutoff.is_some() => {
                break Some("did not close in time after being asked to");
            }
            _ = slot.stop.wait_for(|stop| *stop), if cutoff.is_none() => {
                // Server shutdown: Server::run bounds the wait.
                conn.as_mut().graceful_shutdown();
                cutoff = Some(Instant::now() + bounded(limits.shutdown_timeout));
            }
            () = &mut age, if cutoff.is_none() => {
                tracing::debug!("connection reached max_connection_age; closing");
                conn.as_mut().graceful_shutdown();
                cutoff = Some(Instant::now() + bounded(limits.shutdown_timeout));
            }
            () = &mut check, if cutoff.is_none() => {
                let now = Instant::now();
                let started = activity.started.load(Ordering::Relaxed);
                if started != seen || activity.in_flight.load(Ordering::Relaxed) > 0 {
                    (seen, quiet_since) = (started, now);
                }
                let limit = if seen == 0 {
                    limits.header_read_timeout
                } else {
                    limits.idle_timeout
                };
                if now.saturating_duration_since(quiet_since) >= limit {
                    tracing::debug!(requests = seen, "no request for {limit:?}; closing");
                    conn.as_mut().graceful_shutdown();
                    cutoff = Some(now + bounded(limits.shutdown_timeout));
                } else {
                    check.as_mut().reset(now + bounded(limit / 4));
                }
            }
        }
    };
    if let Some(why) = why {
        tracing::debug!("connection closed: {why}");
    }
    ctx.metrics.connections_open.dec();
    drop(slot);
}

/// A configured duration capped at a year, so that adding it to an instant
/// can never overflow (a year is "never" for a connection).
fn bounded(d: std::time::Duration) -> std::time::Duration {
    d.min(std::time::Duration::from_secs(366 * 86_400))
}

/// Requests of one connection, for the request-level idle limit.
#[derive(Default)]
struct Activity {
    /// Requests started on the connection so far.
    started: AtomicU64,
    /// Requests whose response is not ready yet.
    in_flight: AtomicUsize,
}

/// A service that counts its requests in an [`Activity`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, R> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        self.activity.started.fetch_add(1, Ordering::Relaxed);
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        TrackedFuture {
            inner: self.inner.call(req),
            _in_flight: InFlight(Arc::clone(&self.activity)),
        }
    }
}

/// A response future counted as in flight until it is dropped.
struct TrackedFuture<F> {
    inner: F,
    _in_flight: InFlight,
}

impl<F: Future + Unpin> Future for TrackedFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
