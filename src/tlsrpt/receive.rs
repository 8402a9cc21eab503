//! `POST https://mta-sts.<domain>/tlsrpt`: TLS reports delivered over
//! HTTPS (RFC 8460 §5.3.2) to the policy host of the domain they are about.
//!
//! Answers: 200 stored (or already stored: same organization and report
//! id); 400 not a report (bad gzip, JSON or fields, with where); 403 a
//! report about another domain than this policy host's (no tenant writes
//! into another's data); 413 over `max_body` on the wire or
//! `max_decompressed` once unpacked; 415 another content type; 503 the
//! report store failed. Every read is bounded in size and time.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::report::{self, Report, ReportError};
use super::store::ReportStore;
use super::{KNOWN_RESULT_TYPES, OWN_FAILURES};
use crate::config::TlsRptConfig;
use crate::metrics::Metrics;
use crate::snapshot::Site;
use crate::tls::CertIndex;

/// Longest a report's body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Content types a report may come with (RFC 8460 §6.4 and §6.5, plus the
/// generic ones some reporters send); a gzip body is recognised by its
/// magic bytes whatever the type says.
const ACCEPTED_TYPES: &[&str] = &[
    "application/tlsrpt+json",
    "application/tlsrpt+gzip",
    "application/json",
    "application/gzip",
    "application/x-gzip",
    "application/octet-stream",
];

/// The HTTPS receiver of one server.
pub struct Receiver {
    pub store: ReportStore,
    pub limits: TlsRptConfig,
    pub metrics: Arc<Metrics>,
    pub certs: Arc<CertIndex>,
}

/// What became of one report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Stored,
    Duplicate,
}

impl Receiver {
    /// Handles a request for [`super::PATH`] on the policy host `site`.
    pub async fn handle(
        self: Arc<Self>,
        site: Arc<Site>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Response {
        if req.method() != Method::POST {
            let mut resp = answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "TLS reports are POSTed here (RFC 8460 section 5.3.2)\n",
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        if !content_type
            .as_deref()
            .is_some_and(|t| ACCEPTED_TYPES.contains(&t))
        {
            self.metrics.tlsrpt_report("rejected");
            return answer(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send application/tlsrpt+json or application/tlsrpt+gzip\n",
            );
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limits.max_body as u64) {
            self.metrics.tlsrpt_report("rejected");
            return too_large(self.limits.max_body);
        }
        let limited = http_body_util::Limited::new(req.into_body(), self.limits.max_body);
        let body = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => {
                self.metrics.tlsrpt_report("rejected");
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return too_large(self.limits.max_body);
                }
                return answer(StatusCode::BAD_REQUEST, "the body could not be read\n");
            }
            Err(_) => {
                self.metrics.tlsrpt_report("rejected");
                return answer(StatusCode::REQUEST_TIMEOUT, "the body took too long\n");
            }
        };
        let domain = site.domain.name.as_str().to_owned();
        match self
            .accept(&domain, &site, &body, &format!("https:{}", site.host()))
            .await
        {
            Ok(Received::Stored) => answer(StatusCode::OK, "stored\n"),
            Ok(Received::Duplicate) => answer(StatusCode::OK, "already stored\n"),
            Err((status, message)) => answer(status, &format!("{message}\n")),
        }
    }

    /// Checks, stores and counts one report body for `domain` (whose
    /// served site is `site`).
    pub async fn accept(
        &self,
        domain: &str,
        site: &Site,
        body: &[u8],
        source: &str,
    ) -> Result<Received, (StatusCode, String)> {
        let reject = |status: StatusCode, message: String| {
            self.metrics.tlsrpt_report("rejected");
            tracing::info!(
                domain,
                status = status.as_u16(),
                "TLS report refused: {message}"
            );
            Err((status, message))
        };
        let json = match report::decode(body, self.limits.max_decompressed) {
            Ok(json) => json,
            Err(e @ ReportError::TooLarge { .. }) => {
                return reject(StatusCode::PAYLOAD_TOO_LARGE, e.to_string());
            }
            Err(e) => return reject(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let parsed = match Report::parse(&json) {
            Ok(r) => r,
            Err(e) => return reject(StatusCode::BAD_REQUEST, e.to_string()),
        };
        if let Some(other) = parsed.domains().into_iter().find(|d| *d != domain) {
            return reject(
                StatusCode::FORBIDDEN,
                format!("the report is about {other}, not {domain}: post it to mta-sts.{other}"),
            );
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match self.store.insert(&parsed, body, source, now).await {
            Ok(true) => {
                self.metrics.tlsrpt_report("stored");
                count(&self.metrics, &parsed);
                alert(&parsed, Some(site), Some(&self.certs));
                tracing::info!(
                    domain,
                    organization = %parsed.organization,
                    report_id = %parsed.report_id,
                    "TLS report stored"
                );
                Ok(Received::Stored)
            }
            Ok(false) => {
                self.metrics.tlsrpt_report("duplicate");
                Ok(Received::Duplicate)
            }
            Err(e) => {
                tracing::error!(domain, error = %e, "cannot store a TLS report");
                Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the report store is unavailable; send it again later".to_owned(),
                ))
            }
        }
    }
}

/// Counts a stored report's sessions and failure types.
pub fn count(metrics: &Metrics, report: &Report) {
    for p in &report.policies {
        metrics.tlsrpt_sessions(p.successful, p.failed);
        for f in &p.failures {
            let label = KNOWN_RESULT_TYPES
                .iter()
                .find(|t| **t == f.result_type)
                .copied()
                .unwrap_or("other");
            metrics.tlsrpt_failures(label, f.count);
        }
    }
}

/// Logs a WARN for every failure of our own service in `report` (policy
/// fetch, policy validity, the policy host's certificate), with what this
/// server serves for the domain: the policy id and the certificate's
/// expiry.
pub fn alert(report: &Report, site: Option<&Site>, certs: Option<&CertIndex>) {
    for p in &report.policies {
        for f in p
            .failures
            .iter()
            .filter(|f| OWN_FAILURES.contains(&f.result_type.as_str()))
        {
            let served_id = site.map(|s| s.id.to_string());
            let cert_not_after = site
                .zip(certs)
                .and_then(|(s, certs)| certs.lookup(&s.host()))
                .and_then(|k| crate::tls::not_after(&k))
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .map(|t| t.to_string());
            tracing::warn!(
                domain = %p.policy_domain,
                organization = %report.organization,
                report_id = %report.report_id,
                result_type = %f.result_type,
                failed_sessions = f.count,
                receiving_mx = f.receiving_mx_hostname.as_deref().unwrap_or("-"),
                served_policy_id = served_id.as_deref().unwrap_or("not served"),
                served_cert_not_after = cert_not_after.as_deref().unwrap_or("not loaded"),
                "TLS report: senders failed on our policy host"
            );
        }
    }
}

fn answer(status: StatusCode, message: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        message.to_owned(),
    )
        .into_response()
}

fn too_large(limit: usize) -> Response {
    answer(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("a report may have at most {limit} bytes\n"),
    )
}
