//! The HTTP side: an axum router whose one handler maps Host (and, over TLS,
//! SNI) to a pre-rendered policy (RFC 8461 §3.3). No per-request rendering,
//! locking or disk I/O: one normalisation, one map lookup, reference-counted
//! bytes out.

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::metrics::{Metrics, Outcome};
use crate::snapshot::{Site, Snapshot};

/// The only path senders fetch (RFC 8461 §3.3).
pub const POLICY_PATH: &str = "/.well-known/mta-sts.txt";

/// State shared by all listeners.
#[derive(Debug)]
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// The plain-HTTP listener serves policies too (TLS ends at a proxy).
    pub behind_proxy: bool,
    pub metrics: Arc<Metrics>,
}

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Https,
    Http,
}

/// The SNI of the TLS connection a request came over (normalised).
#[derive(Debug, Clone)]
pub struct Sni(pub Arc<str>);

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    listener: Listener,
}

/// The router of one listener.
pub fn app(shared: Arc<Shared>, listener: Listener) -> Router {
    Router::new()
        .fallback(handle)
        .with_state(AppState { shared, listener })
}

/// Lowercases a Host header or SNI value and strips `:port` and a trailing
/// dot; `None` for IP literals and empty names. Borrows when nothing changes.
pub fn normalize_host(raw: &str) -> Option<Cow<'_, str>> {
    if raw.starts_with('[') {
        return None;
    }
    let name = match raw.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => raw,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(name))
    }
}

/// Why a request gets no policy.
#[derive(Debug)]
enum Reject {
    UnknownHost,
    NotFound,
    Method,
    /// Host header names another domain than the TLS SNI.
    Misdirected,
    /// A policy request over plain HTTP without a proxy in front.
    HttpsOnly(Arc<Site>),
}

impl Reject {
    fn outcome(&self) -> Outcome {
        match self {
            Reject::UnknownHost => Outcome::UnknownHost,
            Reject::NotFound => Outcome::NotFound,
            Reject::Method => Outcome::MethodNotAllowed,
            Reject::Misdirected => Outcome::Misdirected,
            Reject::HttpsOnly(_) => Outcome::HttpsOnly,
        }
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let (status, body): (StatusCode, Cow<'static, str>) = match self {
            Reject::UnknownHost => (StatusCode::NOT_FOUND, "unknown host\n".into()),
            Reject::NotFound => (StatusCode::NOT_FOUND, "not found\n".into()),
            Reject::Method => (
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are allowed\n".into(),
            ),
            Reject::Misdirected => (
                StatusCode::MISDIRECTED_REQUEST,
                "Host header does not match the TLS server name\n".into(),
            ),
            Reject::HttpsOnly(site) => (
                StatusCode::NOT_FOUND,
                format!(
                    "MTA-STS policies are served over HTTPS only (RFC 8461 section 3.3): https://{}{}\n",
                    site.host, POLICY_PATH
                )
                .into(),
            ),
        };
        let mut resp = (status, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        resp
    }
}

async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let sni = req.extensions().get::<Sni>().map(|s| &*s.0);
    answer(&state.shared, state.listener, sni, &req)
}

/// Answers one request: what the router's handler does, callable without
/// the router (the HTTPS listener calls it directly: no routing, no boxed
/// future per request). `sni` is the TLS server name of the connection.
pub fn answer<B>(
    shared: &Shared,
    listener: Listener,
    sni: Option<&str>,
    req: &axum::http::Request<B>,
) -> Response {
    let metrics = &shared.metrics;
    match respond(shared, listener, sni, req) {
        Ok((resp, outcome)) => {
            metrics.request(listener, outcome);
            resp
        }
        Err(reject) => {
            metrics.request(listener, reject.outcome());
            reject.into_response()
        }
    }
}

fn respond<B>(
    shared: &Shared,
    listener: Listener,
    sni: Option<&str>,
    req: &axum::http::Request<B>,
) -> Result<(Response, Outcome), Reject> {
    // HTTP/1.1 sends Host; HTTP/2 sends :authority, which hyper puts in the URI.
    let raw_host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let host = match (raw_host.and_then(normalize_host), sni) {
        (Some(host), Some(sni)) if *host != *sni => return Err(Reject::Misdirected),
        (Some(host), _) => host,
        (None, Some(sni)) => Cow::Borrowed(sni),
        (None, None) => return Err(Reject::UnknownHost),
    };
    let snapshot = shared.snapshot.load();
    let site = snapshot.lookup(&host).ok_or(Reject::UnknownHost)?;
    if req.uri().path() != POLICY_PATH {
        return Err(Reject::NotFound);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(Reject::Method);
    }
    if listener == Listener::Http && !shared.behind_proxy {
        return Err(Reject::HttpsOnly(Arc::clone(site)));
    }
    let (resp, outcome) = policy_response(site, req);
    if outcome == Outcome::Policy {
        shared.metrics.fetch(site.domain.policy.mode);
    }
    Ok((resp, outcome))
}

/// 200 with the policy; 304 when the client already holds this version.
fn policy_response<B>(site: &Site, req: &axum::http::Request<B>) -> (Response, Outcome) {
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == site.etag.as_bytes() || v.as_bytes() == b"*");
    let (status, body, outcome) = if not_modified {
        (
            StatusCode::NOT_MODIFIED,
            Body::empty(),
            Outcome::NotModified,
        )
    } else {
        (
            StatusCode::OK,
            Body::from(site.body.clone()),
            Outcome::Policy,
        )
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // `no-cache`: a cache may keep the policy but must revalidate (ETag) on
    // every use, so no intermediary ever serves an old body under a new id.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::ETAG, site.etag.clone());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    (resp, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;
    use tower::ServiceExt;

    fn shared(behind_proxy: bool) -> Arc<Shared> {
        let cfg = Config::from_source(
            Path::new("t.toml"),
            Path::new("."),
            "[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n".to_owned(),
        )
        .expect("config");
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::build(&cfg)),
            behind_proxy,
            metrics: Arc::new(Metrics::new()),
        })
    }

    async fn call(app: Router, method: &str, host: &str, path: &str) -> Response {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .body(Body::empty())
            .expect("request");
        app.oneshot(req).await.expect("infallible")
    }

    async fn body(resp: Response) -> Vec<u8> {
        axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("body")
            .to_vec()
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(
            normalize_host("MTA-STS.Example.COM.:8443").as_deref(),
            Some("mta-sts.example.com")
        );
        assert!(matches!(
            normalize_host("mta-sts.example.com"),
            Some(Cow::Borrowed(_))
        ));
        assert_eq!(normalize_host("[::1]:443"), None);
        assert_eq!(normalize_host(":443"), None);
        assert_eq!(normalize_host("a:b"), None);
    }

    #[tokio::test]
    async fn policy_over_https_router() {
        let app = app(shared(false), Listener::Https);
        let resp = call(app.clone(), "GET", "Mta-Sts.Example.com.:8443", POLICY_PATH).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            body(resp).await,
            b"version: STSv1\r\nmode: testing\r\nmx: mx.example.com\r\nmax_age: 604800\r\n"
        );
        assert_eq!(
            call(app.clone(), "GET", "mta-sts.other.com", POLICY_PATH)
                .await
                .status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            call(app.clone(), "GET", "mta-sts.example.com", "/")
                .await
                .status(),
            StatusCode::NOT_FOUND
        );
        let post = call(app, "POST", "mta-sts.example.com", POLICY_PATH).await;
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
    }

    #[tokio::test]
    async fn http_listener_hints_unless_behind_proxy() {
        let resp = call(
            app(shared(false), Listener::Http),
            "GET",
            "mta-sts.example.com",
            POLICY_PATH,
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(resp.headers().get(header::LOCATION).is_none());
        let text = String::from_utf8(body(resp).await).expect("utf8");
        assert!(
            text.contains("https://mta-sts.example.com/.well-known/mta-sts.txt"),
            "{text}"
        );
        let resp = call(
            app(shared(true), Listener::Http),
            "GET",
            "mta-sts.example.com",
            POLICY_PATH,
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn misdirected_when_host_differs_from_sni() {
        let app = app(shared(false), Listener::Https);
        let mut req = Request::builder()
            .uri(POLICY_PATH)
            .header(header::HOST, "mta-sts.example.com")
            .body(Body::empty())
            .expect("request");
        req.extensions_mut()
            .insert(Sni(Arc::from("mta-sts.other.com")));
        let resp = app.oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
    }
}
