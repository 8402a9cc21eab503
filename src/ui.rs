//! The dashboard on the admin listener (`/ui/`): every served domain with
//! its mode, policy id, certificate expiry and what senders reported
//! (searchable, paged for 100,000 domains), and a page per domain with
//! successful and failed sessions per day as a server-rendered SVG chart,
//! failures by result type, organization and MX, and the stored reports
//! to download.
//!
//! No script, no CDN: HTML, one stylesheet and inline SVG under a strict
//! Content-Security-Policy. Access: the admin bearer token in the
//! `Authorization` header (scripts, checks), or a login form that sets an
//! HttpOnly, Secure, SameSite=Strict session cookie. The token never
//! appears in a URL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::{Environment, context};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::control::Control;
use crate::tlsrpt::store::{DomainSummary, ReportStore};

/// Domains per overview page.
const PAGE: usize = 100;
/// A session lasts this long after login.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once (the oldest go first).
const MAX_SESSIONS: usize = 1000;
/// Days the pages look back.
const DAYS: i64 = 30;
/// Stored reports listed on a domain page.
const RAW_LIMIT: i64 = 50;

const COOKIE: &str = "mtasts_session";

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[derive(Clone)]
struct Ui {
    control: Arc<Control>,
    token: Arc<[u8]>,
    reports: Option<ReportStore>,
    sessions: Arc<Mutex<HashMap<String, Instant>>>,
    templates: Arc<Environment<'static>>,
}

fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    // `.html` templates escape every value (minijinja's default by name).
    for (name, text) in [
        ("layout.html", include_str!("../templates/ui/layout.html")),
        ("login.html", include_str!("../templates/ui/login.html")),
        (
            "overview.html",
            include_str!("../templates/ui/overview.html"),
        ),
        ("domain.html", include_str!("../templates/ui/domain.html")),
    ] {
        if let Err(e) = env.add_template(name, text) {
            tracing::error!("dashboard template {name}: {e}");
        }
    }
    env
}

/// The `/ui/` routes; `reports` is where TLS reports are read from.
pub fn router(control: Arc<Control>, token: Arc<[u8]>, reports: Option<ReportStore>) -> Router {
    let ui = Ui {
        control,
        token,
        reports,
        sessions: Arc::new(Mutex::new(HashMap::new())),
        templates: Arc::new(templates()),
    };
    let protected = Router::new()
        .route("/ui/", get(overview))
        .route("/ui/domain/{name}", get(domain_page))
        .route("/ui/domain/{name}/reports/{n}", get(download))
        .route("/ui/logout", post(logout))
        .layer(middleware::from_fn_with_state(ui.clone(), authorize));
    Router::new()
        .merge(protected)
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/style.css", get(style))
        .layer(middleware::from_fn(security_headers))
        .with_state(ui)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Ui {
    fn token_ok(&self, presented: &[u8]) -> bool {
        bool::from(presented.ct_eq(&self.token))
    }

    fn session_ok(&self, id: &str) -> bool {
        let mut sessions = crate::sync::lock(&self.sessions);
        match sessions.get(id) {
            Some(expires) if *expires > Instant::now() => true,
            Some(_) => {
                sessions.remove(id);
                false
            }
            None => false,
        }
    }

    fn new_session(&self) -> String {
        let mut id = [0u8; 32];
        let _ = aws_lc_rs::rand::fill(&mut id);
        let id = data_encoding::HEXLOWER.encode(&id);
        let mut sessions = crate::sync::lock(&self.sessions);
        let now = Instant::now();
        sessions.retain(|_, e| *e > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(id.clone(), now + SESSION_TTL);
        id
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Response {
        match self
            .templates
            .get_template(name)
            .and_then(|t| t.render(ctx))
        {
            Ok(html) => {
                ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
            }
            Err(e) => {
                tracing::error!("dashboard: cannot render {name}: {e}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot render the page\n",
                )
                    .into_response()
            }
        }
    }

    async fn summaries(&self) -> (HashMap<String, DomainSummary>, String) {
        let Some(store) = &self.reports else {
            return (
                HashMap::new(),
                "not received ([tlsrpt] receive = false)".to_owned(),
            );
        };
        let since = time::OffsetDateTime::now_utc().unix_timestamp() - DAYS * 86_400;
        match store.summary(since).await {
            Ok(all) => {
                let n = all.len();
                (
                    all.into_iter().map(|s| (s.domain.clone(), s)).collect(),
                    format!(
                        "{n} domain{} reported on in the last {DAYS} days",
                        if n == 1 { "" } else { "s" }
                    ),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "dashboard: cannot read TLS reports");
                (
                    HashMap::new(),
                    "the report store cannot be read now".to_owned(),
                )
            }
        }
    }
}

/// Bearer token or session cookie; a browser without either is sent to
/// the login form, a script gets 401.
async fn authorize(State(ui): State<Ui>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let ok = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| ui.token_ok(t.trim().as_bytes()));
        if ok {
            return next.run(req).await;
        }
        return (StatusCode::UNAUTHORIZED, "wrong token\n").into_response();
    }
    if cookie_value(headers, COOKIE).is_some_and(|id| ui.session_ok(id)) {
        return next.run(req).await;
    }
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        Redirect::to("/ui/login").into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "log in at /ui/login or send Authorization: Bearer <token>\n",
        )
            .into_response()
    }
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../templates/ui/style.css"),
    )
        .into_response()
}

async fn login_form(State(ui): State<Ui>) -> Response {
    ui.render("login.html", context! { logged_in => false })
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(ui): State<Ui>,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let ok = form
        .as_ref()
        .is_ok_and(|f| ui.token_ok(f.token.trim().as_bytes()));
    if !ok {
        // Slows down guessing; the token has at least 16 characters anyway.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tracing::warn!("dashboard: failed login");
        let mut resp = ui.render(
            "login.html",
            context! { logged_in => false, error => "That is not the admin token." },
        );
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return resp;
    }
    let id = ui.new_session();
    let cookie = format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    let mut resp = Redirect::to("/ui/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn logout(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_value(&headers, COOKIE) {
        crate::sync::lock(&ui.sessions).remove(id);
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "mtasts_session=; Path=/ui; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    resp
}

#[derive(Deserialize)]
struct OverviewQuery {
    #[serde(default)]
    q: String,
    page: Option<usize>,
}

#[derive(Serialize)]
struct Row {
    name: String,
    mode: &'static str,
    id: String,
    cert: String,
    last_report: String,
    failure_rate: String,
    alerts: u64,
}

fn fmt_time(unix: Option<i64>) -> String {
    unix.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .map(|t| format!("{} {:02}:{:02} UTC", t.date(), t.hour(), t.minute()))
        .unwrap_or_else(|| "—".to_owned())
}

fn own_failures(s: &DomainSummary) -> u64 {
    crate::tlsrpt::OWN_FAILURES
        .iter()
        .filter_map(|t| s.by_result_type.get(*t))
        .sum()
}

fn rate(s: &DomainSummary) -> String {
    if s.successful + s.failed == 0 {
        "—".to_owned()
    } else {
        format!("{:.2}%", s.failure_rate() * 100.0)
    }
}

async fn overview(State(ui): State<Ui>, Query(q): Query<OverviewQuery>) -> Response {
    let snapshot = ui.control.server().snapshot();
    let certs = ui.control.server().cert_index();
    let needle = q.q.trim().to_ascii_lowercase();
    let matching: Vec<_> = snapshot
        .sites()
        .iter()
        .filter(|s| needle.is_empty() || s.domain.name.as_str().contains(needle.as_str()))
        .collect();
    let pages = matching.len().div_ceil(PAGE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let (summaries, reports_note) = ui.summaries().await;
    let rows: Vec<Row> = matching
        .iter()
        .skip((page - 1) * PAGE)
        .take(PAGE)
        .map(|site| {
            let name = site.domain.name.as_str();
            let s = summaries.get(name);
            Row {
                name: name.to_owned(),
                mode: site.domain.policy.mode.as_str(),
                id: site.id.to_string(),
                cert: fmt_time(certs.expiry(&site.host())),
                last_report: s
                    .and_then(|s| s.days.last())
                    .map_or_else(|| "—".to_owned(), |d| d.date.clone()),
                failure_rate: s.map_or_else(|| "—".to_owned(), rate),
                alerts: s.map_or(0, own_failures),
            }
        })
        .collect();
    ui.render(
        "overview.html",
        context! {
            logged_in => true,
            total => snapshot.len(),
            matching => matching.len(),
            q => q.q.trim(),
            page => page,
            pages => pages,
            rows => minijinja::Value::from(minijinja::value::Serde(&rows)),
            reports_note => reports_note,
        },
    )
}

#[derive(Serialize)]
struct Bar {
    date: String,
    successful: u64,
    failed: u64,
    x: f64,
    w: f64,
    ok_y: f64,
    ok_h: f64,
    fail_y: f64,
    fail_h: f64,
}

#[derive(Serialize)]
struct Label {
    x: f64,
    text: String,
}

#[derive(Serialize)]
struct Chart {
    width: u32,
    height: u32,
    base: f64,
    bars: Vec<Bar>,
    labels: Vec<Label>,
}

/// Stacked bars (successful below, failed on top) per day, scaled to the
/// busiest day.
fn chart(days: &[crate::tlsrpt::store::Day]) -> Chart {
    let (width, height) = (720u32, 220u32);
    let base = f64::from(height) - 16.0;
    let top = 8.0;
    let max = days
        .iter()
        .map(|d| d.successful + d.failed)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let slot = f64::from(width) / days.len().max(1) as f64;
    let w = (slot * 0.8).max(1.0);
    let scale = (base - top) / max;
    let bars = days
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let x = i as f64 * slot + (slot - w) / 2.0;
            let ok_h = d.successful as f64 * scale;
            let fail_h = d.failed as f64 * scale;
            Bar {
                date: d.date.clone(),
                successful: d.successful,
                failed: d.failed,
                x,
                w,
                ok_y: base - ok_h,
                ok_h,
                fail_y: base - ok_h - fail_h,
                fail_h,
            }
        })
        .collect();
    let every = days.len().div_ceil(8).max(1);
    let labels = days
        .iter()
        .enumerate()
        .filter(|(i, _)| i % every == 0)
        .map(|(i, d)| Label {
            x: i as f64 * slot,
            text: d.date.get(5..).unwrap_or(&d.date).to_owned(),
        })
        .collect();
    Chart {
        width,
        height,
        base,
        bars,
        labels,
    }
}

async fn domain_page(State(ui): State<Ui>, Path(name): Path<String>) -> Response {
    let name = crate::tlsrpt::report::normalise_domain(&name);
    let snapshot = ui.control.server().snapshot();
    let site = snapshot.lookup(&format!("mta-sts.{name}")).cloned();
    let (mut summaries, _) = ui.summaries().await;
    let summary = summaries.remove(&name);
    if site.is_none() && summary.is_none() {
        return (
            StatusCode::NOT_FOUND,
            "no such domain (not served, no reports)\n",
        )
            .into_response();
    }
    let raw = match &ui.reports {
        Some(store) => store
            .raw_reports(&name, RAW_LIMIT)
            .await
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let s = summary.unwrap_or_else(|| empty_summary(&name));
    let mut by_result: Vec<(String, u64)> = s.by_result_type.clone().into_iter().collect();
    by_result.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let by_org: Vec<(String, u64, u64)> = s
        .by_organization
        .iter()
        .map(|(k, v)| (k.clone(), v.successful, v.failed))
        .collect();
    let mut by_mx: Vec<(String, u64)> = s.by_mx.clone().into_iter().collect();
    by_mx.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let raw_list: Vec<HashMap<&str, String>> = raw
        .iter()
        .map(|r| {
            HashMap::from([
                ("organization", r.organization.clone()),
                ("report_id", r.report_id.clone()),
            ])
        })
        .collect();
    let certs = ui.control.server().cert_index();
    ui.render(
        "domain.html",
        context! {
            logged_in => true,
            name => name,
            served => site.is_some(),
            mode => site.as_ref().map(|s| s.domain.policy.mode.as_str()),
            id => site.as_ref().map(|s| s.id.to_string()),
            cert => fmt_time(site.as_ref().and_then(|s| certs.expiry(&s.host()))),
            reports => s.reports,
            successful => s.successful,
            failed => s.failed,
            failure_rate => rate(&s),
            alerts => own_failures(&s),
            days => !s.days.is_empty(),
            chart => minijinja::Value::from(minijinja::value::Serde(chart(&s.days))),
            by_result => minijinja::Value::from(minijinja::value::Serde(&by_result)),
            by_org => minijinja::Value::from(minijinja::value::Serde(&by_org)),
            by_mx => minijinja::Value::from(minijinja::value::Serde(&by_mx)),
            raw => minijinja::Value::from(minijinja::value::Serde(&raw_list)),
        },
    )
}

fn empty_summary(name: &str) -> DomainSummary {
    DomainSummary {
        domain: name.to_owned(),
        served: true,
        reports: 0,
        successful: 0,
        failed: 0,
        by_result_type: Default::default(),
        by_organization: Default::default(),
        by_policy_type: Default::default(),
        days: Vec::new(),
        by_mx: Default::default(),
    }
}

async fn download(State(ui): State<Ui>, Path((name, n)): Path<(String, usize)>) -> Response {
    let name = crate::tlsrpt::report::normalise_domain(&name);
    let Some(store) = &ui.reports else {
        return (StatusCode::NOT_FOUND, "no report store\n").into_response();
    };
    let raw = store
        .raw_reports(&name, RAW_LIMIT)
        .await
        .unwrap_or_default();
    let Some(r) = raw.into_iter().nth(n) else {
        return (StatusCode::NOT_FOUND, "no such report\n").into_response();
    };
    let gz = r.raw.starts_with(&[0x1f, 0x8b]);
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let file = format!(
        "{}!{}!{}.json{}",
        safe(&r.organization),
        safe(&name),
        safe(&r.report_id),
        if gz { ".gz" } else { "" }
    );
    (
        [
            (
                header::CONTENT_TYPE,
                if gz {
                    "application/tlsrpt+gzip"
                } else {
                    "application/tlsrpt+json"
                }
                .to_owned(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        r.raw,
    )
        .into_response()
}
