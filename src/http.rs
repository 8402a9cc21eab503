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

use crate::metrics::{Metrics, RequestOutcome};
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

pub use crate::metrics::Listener;

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

/// Whether a Host header value is a valid `uri-host [":" port]`
/// (RFC 9110 §7.2, RFC 3986 §3.2.2): an IP literal in brackets, or a name of
/// dot-separated labels of 1..=63 letters, digits, `-` or `_` (one trailing
/// dot allowed, 253 characters at most), optionally followed by `:` and
/// digits. Anything else (raw bytes, spaces, empty labels) is a bad request,
/// never a reason to fall back to the TLS server name.
fn valid_host(raw: &[u8]) -> bool {
    let (name, port) = if let Some(rest) = raw.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        (None, &rest[end + 1..])
    } else {
        match raw.iter().rposition(|&b| b == b':') {
            Some(i) => (Some(&raw[..i]), &raw[i..]),
            None => (Some(raw), &raw[raw.len()..]),
        }
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    let Some(name) = name else { return port_ok };
    let name = name.strip_suffix(b".").unwrap_or(name);
    port_ok
        && !name.is_empty()
        && name.len() <= 253
        && name.split(|&b| b == b'.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The request's host as sent: the one Host header (HTTP/1.1), else the
/// URI authority (HTTP/2 `:authority`, absolute-form targets). An empty or
/// absent Host gives `Ok(None)`; two Host headers or one that is not a
/// valid host give `Err` (RFC 9110 §7.2, RFC 9112 §3.2: 400).
fn request_host<B>(req: &axum::http::Request<B>) -> Result<Option<&str>, Reject> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(Reject::BadHost),
        (Some(h), None) if h.is_empty() => Ok(None),
        (Some(h), None) => match h.to_str() {
            Ok(s) if valid_host(h.as_bytes()) => Ok(Some(s)),
            _ => Err(Reject::BadHost),
        },
        (None, _) => Ok(req.uri().authority().map(|a| a.as_str())),
    }
}

/// Why a request gets no policy.
#[derive(Debug)]
enum Reject {
    /// The Host header is not a valid host, or is repeated.
    BadHost,
    UnknownHost,
    NotFound,
    Method,
    /// Host header names another domain than the TLS SNI.
    Misdirected,
    /// A policy request over plain HTTP without a proxy in front.
    HttpsOnly(Arc<Site>),
}

impl Reject {
    fn outcome(&self) -> RequestOutcome {
        match self {
            Reject::BadHost => RequestOutcome::BadHost,
            Reject::UnknownHost => RequestOutcome::UnknownHost,
            Reject::NotFound => RequestOutcome::NotFound,
            Reject::Method => RequestOutcome::MethodNotAllowed,
            Reject::Misdirected => RequestOutcome::Misdirected,
            Reject::HttpsOnly(_) => RequestOutcome::HttpsOnly,
        }
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let (status, body): (StatusCode, Cow<'static, str>) = match self {
            Reject::BadHost => (StatusCode::BAD_REQUEST, "invalid Host header\n".into()),
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
                    site.host(), POLICY_PATH
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
    let resp = match respond(shared, listener, sni, req) {
        Ok((resp, outcome)) => {
            metrics.request(listener, outcome);
            resp
        }
        Err(reject) => {
            metrics.request(listener, reject.outcome());
            reject.into_response()
        }
    };
    if req.method() == Method::HEAD {
        without_body(resp)
    } else {
        resp
    }
}

/// The answer to a HEAD request: the GET response's headers, Content-Length
/// included, and no body (RFC 9110 §9.3.2). hyper drops a HEAD response's
/// body on HTTP/1.1 but sends it as DATA frames on HTTP/2, which clients
/// treat as a protocol error (RFC 9113 §8.1.1); the axum router does the
/// same as this for the routes it serves.
fn without_body(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    if parts.status != StatusCode::NOT_MODIFIED
        && let Some(len) = hyper::body::Body::size_hint(&body).exact()
    {
        parts
            .headers
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(len));
    }
    Response::from_parts(parts, Body::empty())
}

fn respond<B>(
    shared: &Shared,
    listener: Listener,
    sni: Option<&str>,
    req: &axum::http::Request<B>,
) -> Result<(Response, RequestOutcome), Reject> {
    // HTTP/1.1 sends Host; HTTP/2 sends :authority, which hyper puts in the URI.
    let raw_host = request_host(req)?;
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
    if outcome == RequestOutcome::Policy {
        shared.metrics.fetch(site.domain.policy.mode);
    }
    Ok((resp, outcome))
}

/// 200 with the policy; 304 when the client already holds this version.
fn policy_response<B>(site: &Site, req: &axum::http::Request<B>) -> (Response, RequestOutcome) {
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == site.etag.as_bytes() || v.as_bytes() == b"*");
    let (status, body, outcome) = if not_modified {
        (
            StatusCode::NOT_MODIFIED,
            Body::empty(),
            RequestOutcome::NotModified,
        )
    } else {
        (
            StatusCode::OK,
            Body::from(site.body.clone()),
            RequestOutcome::Policy,
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

    #[test]
    fn host_syntax() {
        for ok in [
            "mta-sts.example.com",
            "MTA-STS.Example.COM.",
            "mta-sts.example.com:443",
            "mta-sts.example.com:",
            "_x.example",
            "127.0.0.1:8443",
            "[::1]",
            "[2001:db8::1]:443",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        let long_name = ["a".repeat(63).as_str(); 5].join(".");
        for bad in [
            &b"\xff\xfe.example"[..],
            b"mta-sts.example.com x",
            b" mta-sts.example.com",
            b"mta-sts..example.com",
            b".example.com",
            b"example.com..",
            b".",
            b":443",
            b"mta-sts.example.com:443x",
            b"mta-sts.example.com:1234567",
            b"a:b:c",
            b"[::1",
            b"[]",
            b"[::1]x",
            b"[::1]:443:1",
            b"user@mta-sts.example.com",
            b"mta-sts.example.com/x",
            long_label.as_bytes(),
            long_name.as_bytes(),
        ] {
            assert!(!valid_host(bad), "{}", String::from_utf8_lossy(bad));
        }
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
