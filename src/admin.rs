//! The admin API (off unless `[admin]` is configured): its own listener,
//! every route behind a bearer token compared in constant time, JSON in and
//! out, errors as `{"error": "...", "details": [...]}`.
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/v1/domains` | every domain with mode, id, max_age, mx, certificate state, source |
//! | GET | `/v1/domains/{name}` | one domain |
//! | PUT | `/v1/domains/{name}` | create or replace a domain (written to `domains_dir/<name>.toml`, then reloaded) |
//! | DELETE | `/v1/domains/{name}` | remove a domain the API manages |
//! | POST | `/v1/reload` | re-read the config now |
//! | POST | `/v1/onboard/{name}` | on-demand onboarding: 200 with the domain once onboarded (or already configured), 422 with every failed check |
//! | GET | `/metrics` | Prometheus text exposition |
//!
//! Domains written by the API live in `domains_dir`, one file each, so a
//! restart keeps them and operators can read them. A write that makes the
//! config invalid is undone and answered 422 with the diagnostics. The API
//! changes or deletes `domains_dir/<name>.toml` only while that file holds
//! `name` alone: a hand-written file that also holds other domains is
//! answered 409 and left as it is.
//!
//! A write and the reload that validates it are one unit, run in a task of
//! its own under the reload lock: it finishes (applied, or undone) and is
//! logged whatever the client does, and writes apply in the order they
//! took the lock.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::control::{Control, ReloadError};
use crate::managed::{self, WriteError, managed_file};
use crate::metrics::Trigger;
use crate::policy::DomainName;
use crate::snapshot::Site;

/// Shortest token accepted: a guessable token makes the API an open door.
const MIN_TOKEN_LEN: usize = 16;

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read admin token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token in {path} is shorter than {MIN_TOKEN_LEN} characters")]
    TooShort { path: PathBuf },
}

/// Reads the bearer token (surrounding whitespace ignored).
pub fn read_token(path: &Path) -> Result<Vec<u8>, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort {
            path: path.to_owned(),
        });
    }
    Ok(token.as_bytes().to_vec())
}

#[derive(Clone)]
struct AdminState {
    control: Arc<Control>,
    token: Arc<[u8]>,
    /// On-demand onboarding (`None`: no `[delegation]`).
    onboarder: Option<Arc<crate::onboard::Onboarder>>,
}

/// The admin router.
pub fn router(
    control: Arc<Control>,
    token: Vec<u8>,
    reports: Option<crate::tlsrpt::store::ReportStore>,
    onboarder: Option<Arc<crate::onboard::Onboarder>>,
) -> Router {
    let state = AdminState {
        control,
        token: token.into(),
        onboarder,
    };
    let ui = crate::ui::router(
        Arc::clone(&state.control),
        Arc::clone(&state.token),
        reports,
    );
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/domains", get(list))
        .route("/v1/domains/{name}", get(show).put(put).delete(delete))
        .route("/v1/reload", post(reload))
        .route("/v1/onboard/{name}", post(onboard))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        // Probes for load balancers and Kubernetes: no token (they cannot
        // send one), and they say nothing beyond up / ready.
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
        // The dashboard has its own access rule (token or session cookie).
        .merge(ui)
}

/// An API error: status, message, and optional details (config diagnostics).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    details: Vec<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            details: Vec::new(),
        }
    }
}

impl From<ReloadError> for ApiError {
    fn from(e: ReloadError) -> Self {
        WriteError::from(e).into()
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.kind.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: e.message,
            details: e.details,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            details: Vec<String>,
        }
        let mut resp = (
            self.status,
            Json(Body {
                error: self.message,
                details: self.details,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

async fn authorize(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or(b"");
    // Constant time in the token's content; only its length can leak.
    if bool::from(presented.ct_eq(&state.token)) {
        next.run(req).await
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response()
    }
}

/// `GET /healthz`: the process is alive and answering (liveness).
async fn healthz() -> Response {
    probe_answer(StatusCode::OK, "ok\n")
}

/// `GET /readyz`: a policy snapshot is being served and the store it keeps
/// certificates and state in is reachable (readiness): `state_dir` is a
/// directory this process can still list. 503 otherwise, without details
/// (the log says more); the policy listeners keep serving either way.
///
/// With the shared store (PostgreSQL) the database must answer too. A
/// replica keeps serving policies through a database outage, so a load
/// balancer that should keep sending it traffic then asks
/// `/readyz?store=optional`, which leaves the database out (used by
/// deploy/kubernetes: otherwise a database outage would take every
/// replica out of the Service at once).
async fn readyz(
    State(state): State<AdminState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let server = state.control.server();
    if server.generation() == 0 {
        return probe_answer(StatusCode::SERVICE_UNAVAILABLE, "not ready: no snapshot\n");
    }
    let store_optional = query.as_deref() == Some("store=optional");
    if let Some(pg) = state.control.pg()
        && !store_optional
        && let Err(e) = pg.ping().await
    {
        tracing::warn!(error = %e, "readyz: the shared store is unreachable; answering 503");
        return probe_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store unreachable\n",
        );
    }
    let dir = state.control.config().server.state_dir.clone();
    let reachable = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::task::spawn_blocking(move || std::fs::read_dir(&dir).is_ok()),
    )
    .await;
    match reachable {
        Ok(Ok(true)) => probe_answer(StatusCode::OK, "ready\n"),
        _ => {
            tracing::warn!("readyz: state_dir cannot be listed; answering 503");
            probe_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: store unreachable\n",
            )
        }
    }
}

fn probe_answer(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    state.control.server().refresh_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.control.server().metrics().render(),
    )
        .into_response()
}

/// A domain as the API shows it.
#[derive(Debug, Serialize)]
struct DomainView {
    name: String,
    policy_host: String,
    mode: String,
    max_age: u64,
    mx: Vec<String>,
    /// The id published in `_mta-sts` TXT.
    id: String,
    certificate: CertView,
    /// `file:line:col` where the domain is defined.
    source: String,
    /// Whether the API may change or delete it (its own file in domains_dir).
    managed: bool,
    /// `retire = true`: served as `mode: none` until its records may go.
    retire: bool,
}

#[derive(Debug, Serialize)]
struct CertView {
    /// A certificate is loaded: handshakes for the policy host succeed.
    loaded: bool,
}

/// The `domains_dir` files that hold more than one domain: none of their
/// domains is the API's.
fn shared_files(control: &Control) -> HashSet<PathBuf> {
    let config = control.config();
    let mut count: HashMap<&Path, usize> = HashMap::new();
    for d in &config.domains {
        *count.entry(&*d.origin.file).or_default() += 1;
    }
    count
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(f, _)| f.to_owned())
        .collect()
}

fn view(control: &Control, site: &Site, shared: &HashSet<PathBuf>) -> DomainView {
    let d = &site.domain;
    DomainView {
        name: d.name.to_string(),
        policy_host: site.host(),
        mode: d.policy.mode.to_string(),
        max_age: d.policy.max_age,
        mx: d.policy.mx.iter().map(ToString::to_string).collect(),
        id: site.id.to_string(),
        certificate: CertView {
            loaded: control.server().has_certificate(&site.host()),
        },
        source: format!(
            "{}:{}:{}",
            d.origin.file.display(),
            d.origin.line,
            d.origin.col
        ),
        managed: managed_file(control, &d.name)
            .is_some_and(|f| *d.origin.file == *f && !shared.contains(&f)),
        retire: d.retire,
    }
}

async fn list(State(state): State<AdminState>) -> Json<Vec<DomainView>> {
    let snapshot = state.control.server().snapshot();
    let shared = shared_files(&state.control);
    Json(
        snapshot
            .sites()
            .iter()
            .map(|s| view(&state.control, s, &shared))
            .collect(),
    )
}

fn parse_name(raw: &str) -> Result<DomainName, ApiError> {
    DomainName::parse(raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("domain name: {e}")))
}

async fn show(
    State(state): State<AdminState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<DomainView>, ApiError> {
    let name = parse_name(&name)?;
    let snapshot = state.control.server().snapshot();
    let site = snapshot
        .lookup(&name.policy_host())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("{name} is not configured")))?;
    Ok(Json(view(
        &state.control,
        site,
        &shared_files(&state.control),
    )))
}

/// Body of PUT: any `[[domain]]` key except `name` (taken from the URL).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainSpec {
    mode: Option<String>,
    max_age: Option<serde_json::Value>,
    mx: Option<Vec<String>>,
    mx_certs: Option<Vec<String>>,
    tlsrpt_rua: Option<serde_json::Value>,
    ttl: Option<i64>,
    host_a: Option<Vec<String>>,
    host_aaaa: Option<Vec<String>>,
    host_cname: Option<String>,
    retire: Option<bool>,
}

impl DomainSpec {
    /// The `[[domain]]` file the API writes.
    fn to_toml(&self, name: &DomainName) -> Result<String, ApiError> {
        let mut t = toml::Table::new();
        t.insert("name".into(), name.to_string().into());
        let strings =
            |v: &[String]| toml::Value::Array(v.iter().map(|s| s.as_str().into()).collect());
        if let Some(v) = &self.mode {
            t.insert("mode".into(), v.as_str().into());
        }
        if let Some(v) = &self.max_age {
            t.insert("max_age".into(), json_scalar(v, "max_age")?);
        }
        if let Some(v) = &self.mx {
            t.insert("mx".into(), strings(v));
        }
        if let Some(v) = &self.mx_certs {
            t.insert("mx_certs".into(), strings(v));
        }
        if let Some(v) = &self.tlsrpt_rua {
            let value = match v {
                serde_json::Value::Array(items) => toml::Value::Array(
                    items
                        .iter()
                        .map(|i| json_scalar(i, "tlsrpt_rua"))
                        .collect::<Result<_, _>>()?,
                ),
                other => json_scalar(other, "tlsrpt_rua")?,
            };
            t.insert("tlsrpt_rua".into(), value);
        }
        if let Some(v) = self.ttl {
            t.insert("ttl".into(), v.into());
        }
        if let Some(v) = &self.host_a {
            t.insert("host_a".into(), strings(v));
        }
        if let Some(v) = &self.host_aaaa {
            t.insert("host_aaaa".into(), strings(v));
        }
        if let Some(v) = &self.host_cname {
            t.insert("host_cname".into(), v.as_str().into());
        }
        if let Some(v) = self.retire {
            t.insert("retire".into(), v.into());
        }
        let mut doc = toml::Table::new();
        doc.insert(
            "domain".into(),
            toml::Value::Array(vec![toml::Value::Table(t)]),
        );
        let body = toml::to_string(&doc).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("cannot write domain: {e}"))
        })?;
        Ok(format!(
            "{}; edits by hand are kept until the next PUT.\n{body}",
            crate::managed::MANAGED_HEADER
        ))
    }
}

fn json_scalar(v: &serde_json::Value, key: &str) -> Result<toml::Value, ApiError> {
    match v {
        serde_json::Value::String(s) => Ok(s.as_str().into()),
        serde_json::Value::Number(n) => n.as_i64().map(toml::Value::from).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{key}: {n} is not a whole number"),
            )
        }),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{key} must be a string or a number"),
        )),
    }
}

async fn put(
    State(state): State<AdminState>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<DomainSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<DomainView>), ApiError> {
    let name = parse_name(&name)?;
    let Json(spec) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let content = spec.to_toml(&name)?;
    let written = managed::write(&state.control, name.clone(), Some(content), "put").await?;
    let site = written
        .snapshot
        .lookup(&name.policy_host())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "domain missing after reload",
            )
        })?;
    let view = view(&state.control, site, &shared_files(&state.control));
    let status = if written.existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(view)))
}

async fn delete(
    State(state): State<AdminState>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let name = parse_name(&name)?;
    managed::write(&state.control, name, None, "delete").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct ReloadView {
    domains: usize,
    generation: u64,
    /// `false`: nothing changed since the last applied reload; nothing was swapped.
    changed: bool,
}

async fn reload(State(state): State<AdminState>) -> Result<Json<ReloadView>, ApiError> {
    let r = state.control.reload(Trigger::Admin).await?;
    Ok(Json(ReloadView {
        domains: r.domains,
        generation: r.generation,
        changed: r.changed,
    }))
}

/// `POST /v1/onboard/{name}`: the on-demand checks, and the domain written
/// when they all pass (`crate::onboard`).
async fn onboard(State(state): State<AdminState>, UrlPath(name): UrlPath<String>) -> Response {
    use crate::onboard::{Refusal, Via};
    let name = match parse_name(&name) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let Some(onboarder) = &state.onboarder else {
        return ApiError::new(
            StatusCode::CONFLICT,
            "on-demand onboarding needs [delegation] and [on_demand] enabled = true",
        )
        .into_response();
    };
    match onboarder.onboard(&name, Via::Api).await {
        Ok(_) => {
            let snapshot = state.control.server().snapshot();
            match snapshot.lookup(&name.policy_host()) {
                Some(site) => {
                    Json(view(&state.control, site, &shared_files(&state.control))).into_response()
                }
                None => ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "domain missing after onboarding",
                )
                .into_response(),
            }
        }
        Err(Refusal::Disabled) => ApiError::new(
            StatusCode::CONFLICT,
            "on-demand onboarding is not enabled ([on_demand] enabled = true)",
        )
        .into_response(),
        Err(Refusal::Write(e)) => ApiError::from(e).into_response(),
        Err(Refusal::Checks(verdict)) => {
            #[derive(Serialize)]
            struct Body<'a> {
                error: String,
                details: Vec<String>,
                checks: &'a [crate::onboard::Check],
            }
            let details: Vec<String> = verdict
                .failed()
                .map(|c| format!("{}: {}", c.check, c.detail))
                .collect();
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(Body {
                    error: format!(
                        "{name} was not onboarded: {} check(s) failed",
                        details.len()
                    ),
                    details,
                    checks: &verdict.checks,
                }),
            )
                .into_response()
        }
    }
}
