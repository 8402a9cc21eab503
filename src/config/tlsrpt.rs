//! `[tlsrpt]`: receiving TLS reports (RFC 8460) on the policy hosts
//! (docs/TLSRPT.md).

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Report, Source, duration};

/// `[tlsrpt]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRptConfig {
    /// Accept `POST https://mta-sts.<domain>/tlsrpt` and publish it in `rua`.
    pub receive: bool,
    /// Largest body accepted on the wire (bytes).
    pub max_body: usize,
    /// Largest report once decompressed (bytes).
    pub max_decompressed: usize,
    /// Reports (and their original bytes) are kept this long.
    pub retention: Duration,
    /// DKIM of mailed reports (`tlsrpt ingest`).
    pub dkim: DkimPolicy,
    /// DNS server asked for DKIM keys (default: the system's resolver).
    pub dkim_resolver: Option<std::net::SocketAddr>,
}

/// What `tlsrpt ingest` does with a mailed report whose DKIM signature
/// does not verify (RFC 8460 §5.3.1 requires one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DkimPolicy {
    /// Refuse it (the default).
    #[default]
    Require,
    /// Store it, saying so.
    Check,
    /// Do not verify.
    Off,
}

pub const MAX_BODY: usize = 1024 * 1024;
pub const MAX_DECOMPRESSED: usize = 20 * 1024 * 1024;
pub const RETENTION: Duration = Duration::from_secs(180 * 86_400);

impl Default for TlsRptConfig {
    fn default() -> Self {
        TlsRptConfig {
            receive: false,
            max_body: MAX_BODY,
            max_decompressed: MAX_DECOMPRESSED,
            retention: RETENTION,
            dkim: DkimPolicy::Require,
            dkim_resolver: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsRpt {
    receive: Option<bool>,
    max_body: Option<Spanned<i64>>,
    max_decompressed: Option<Spanned<i64>>,
    retention: Option<Spanned<toml::Value>>,
    dkim: Option<Spanned<String>>,
    dkim_resolver: Option<Spanned<String>>,
}

pub(super) fn tlsrpt_config(
    source: &Source,
    raw: Option<RawTlsRpt>,
    report: &mut Report,
) -> TlsRptConfig {
    let mut cfg = TlsRptConfig::default();
    let Some(raw) = raw else {
        return cfg;
    };
    cfg.receive = raw.receive.unwrap_or(false);
    let mut bytes = |key: &str, v: &Option<Spanned<i64>>, default: usize, max: usize| match v {
        None => default,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(b) if (1024..=max).contains(&b) => b,
            _ => {
                report.errors.push(source.at(
                    n.span(),
                    format!("tlsrpt.{key} must be between 1024 and {max} bytes"),
                ));
                default
            }
        },
    };
    cfg.max_body = bytes("max_body", &raw.max_body, MAX_BODY, 64 * 1024 * 1024);
    cfg.max_decompressed = bytes(
        "max_decompressed",
        &raw.max_decompressed,
        MAX_DECOMPRESSED,
        1024 * 1024 * 1024,
    );
    if cfg.max_decompressed < cfg.max_body
        && let Some(v) = &raw.max_decompressed
    {
        report.errors.push(source.at(
            v.span(),
            "tlsrpt.max_decompressed must not be smaller than tlsrpt.max_body",
        ));
    }
    if let Some(v) = &raw.dkim {
        match v.get_ref().as_str() {
            "require" => cfg.dkim = DkimPolicy::Require,
            "check" => cfg.dkim = DkimPolicy::Check,
            "off" => cfg.dkim = DkimPolicy::Off,
            other => report.errors.push(source.at(
                v.span(),
                format!("tlsrpt.dkim: {other:?} is not one of \"require\", \"check\", \"off\""),
            )),
        }
    }
    if let Some(v) = &raw.dkim_resolver {
        match v.get_ref().parse() {
            Ok(addr) => cfg.dkim_resolver = Some(addr),
            Err(_) => report.errors.push(source.at(
                v.span(),
                format!("tlsrpt.dkim_resolver: {:?} is not an ip:port", v.get_ref()),
            )),
        }
    }
    if let Some(v) = &raw.retention {
        match duration(v.get_ref()) {
            Ok(d) if d >= Duration::from_secs(86_400) => cfg.retention = d,
            Ok(_) => report.errors.push(source.at(
                v.span(),
                "tlsrpt.retention must be at least one day (reports cover a day each)",
            )),
            Err(e) => report
                .errors
                .push(source.at(v.span(), format!("tlsrpt.retention: {e}"))),
        }
    }
    cfg
}
