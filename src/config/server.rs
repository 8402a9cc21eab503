//! `[server]`, `[tls]` and `[admin]`: listeners and limits, how
//! certificates are obtained (self-signed or ACME), and the admin API.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Report, Source, duration};

/// `[server]`: listeners, state and connection limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// HTTPS listener: policies for senders (RFC 8461 requires port 443 in production).
    pub https: SocketAddr,
    /// Plain HTTP listener: ACME HTTP-01 and a hint; policies only when `behind_proxy`.
    pub http: SocketAddr,
    /// Certificates, keys and the local CA live here.
    pub state_dir: PathBuf,
    /// A TLS-terminating proxy forwards to the http listener, which then serves policies.
    pub behind_proxy: bool,
    /// Certificates kept in memory; others are loaded from state_dir on use.
    pub cert_cache: usize,
    pub limits: Limits,
}

/// Resource limits on every connection (slowloris and flood protection).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    /// Open connections from one client address (an IPv6 client: its /64)
    /// on the policy listeners, so one client cannot take every slot.
    pub max_connections_per_ip: usize,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// A connection, however busy, is closed gracefully after this long
    /// (HTTP/2 clients that keep one connection forever release their slot).
    pub max_connection_age: Duration,
    pub max_header_bytes: usize,
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_ip: 256,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(3600),
            max_header_bytes: 16 * 1024,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// `[admin]`: the token-protected admin API and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// File holding the bearer token (read at start, never logged).
    pub token_file: PathBuf,
    /// Open admin connections: a budget of its own, so a flood on the
    /// policy listeners never locks the operator out.
    pub max_connections: usize,
}

/// Default of `admin.max_connections`.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// How the HTTPS listener gets its certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// A local CA in `state_dir` issues a certificate per `mta-sts.<domain>`.
    SelfSigned,
    /// Publicly trusted certificates through ACME (`acme` module, docs/ACME.md).
    Acme,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub mode: TlsMode,
    /// Settings of `mode = "acme"`; read (and checked) in every mode so that
    /// switching modes is a one-line change.
    pub acme: AcmeConfig,
}

/// Let's Encrypt production: the default ACME directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt staging, for trying things out (untrusted certificates).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Which ACME challenge proves control of `mta-sts.<domain>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// RFC 8555 §8.3: a token over plain HTTP on the `http` listener (port 80).
    Http01,
    /// RFC 8737: a special certificate on the `https` listener (port 443),
    /// the port MTA-STS needs anyway.
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }

    /// The fallback after a failed validation, or when the CA does not offer this one.
    pub fn other(self) -> ChallengeKind {
        match self {
            ChallengeKind::Http01 => ChallengeKind::TlsAlpn01,
            ChallengeKind::TlsAlpn01 => ChallengeKind::Http01,
        }
    }
}

/// The private key type of ordered certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    Rsa2048,
}

/// External account binding (RFC 8555 §7.3.4) for CAs that require it.
#[derive(Clone, PartialEq, Eq)]
pub struct Eab {
    pub kid: String,
    /// The raw HMAC key (the config holds it base64url-encoded).
    pub hmac_key: Vec<u8>,
}

impl fmt::Debug for Eab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eab")
            .field("kid", &self.kid)
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

/// `[tls]` keys of ACME mode (docs/ACME.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// ACME directory URL (https only).
    pub directory: String,
    /// Account contact URIs (`mailto:`), where the CA sends expiry warnings.
    pub contact: Vec<String>,
    pub eab: Option<Eab>,
    /// PEM file whose first certificate is the only trust anchor for the
    /// ACME server's own HTTPS (a private CA such as pebble); `None` = system roots.
    pub ca_roots: Option<PathBuf>,
    pub challenge: ChallengeKind,
    pub key_type: KeyType,
    /// Renew when this much validity is left; `None` = at 2/3 of the lifetime.
    pub renew_before: Option<Duration>,
    /// Orders in flight at once.
    pub max_concurrent_orders: usize,
    /// New orders started per sliding hour (Let's Encrypt allows 300 per 3 h).
    pub orders_per_hour: u32,
    /// First retry delay after a failure; doubles per failure (with jitter).
    pub retry_initial: Duration,
    /// Upper bound of the retry delay.
    pub retry_max: Duration,
    /// Check that `mta-sts.<domain>` resolves to this server before ordering.
    pub precheck_dns: bool,
    /// DNS server (ip:port) the precheck asks, e.g. a public resolver when
    /// the local one sees internal addresses; `None` = the system resolver.
    pub precheck_resolver: Option<SocketAddr>,
    /// This server's public addresses, accepted by the DNS precheck in
    /// addition to a domain's `host_a`/`host_aaaa` (or its `host_cname` target).
    pub server_addresses: Vec<std::net::IpAddr>,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            directory: LETS_ENCRYPT.to_owned(),
            contact: Vec::new(),
            eab: None,
            ca_roots: None,
            challenge: ChallengeKind::TlsAlpn01,
            key_type: KeyType::EcdsaP256,
            renew_before: None,
            max_concurrent_orders: 4,
            orders_per_hour: 100,
            retry_initial: Duration::from_secs(300),
            retry_max: Duration::from_secs(86_400),
            precheck_dns: true,
            precheck_resolver: None,
            server_addresses: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    https: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    behind_proxy: Option<bool>,
    cert_cache: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    max_connections_per_ip: Option<Spanned<i64>>,
    handshake_timeout: Option<Spanned<toml::Value>>,
    header_read_timeout: Option<Spanned<toml::Value>>,
    idle_timeout: Option<Spanned<toml::Value>>,
    max_connection_age: Option<Spanned<toml::Value>>,
    max_header_bytes: Option<Spanned<i64>>,
    shutdown_timeout: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    mode: Option<Spanned<String>>,
    directory: Option<Spanned<String>>,
    contact: Option<Spanned<toml::Value>>,
    eab_kid: Option<Spanned<String>>,
    eab_hmac_key: Option<Spanned<String>>,
    ca_roots: Option<Spanned<String>>,
    challenge: Option<Spanned<String>>,
    key_type: Option<Spanned<String>>,
    renew_before: Option<Spanned<toml::Value>>,
    max_concurrent_orders: Option<Spanned<i64>>,
    orders_per_hour: Option<Spanned<i64>>,
    retry_initial: Option<Spanned<toml::Value>>,
    retry_max: Option<Spanned<toml::Value>>,
    precheck_dns: Option<bool>,
    precheck_resolver: Option<Spanned<String>>,
    server_addresses: Option<Spanned<Vec<Spanned<String>>>>,
}

pub(super) fn server_config(
    source: &Source,
    raw: Option<RawServer>,
    report: &mut Report,
) -> ServerConfig {
    let mut cfg = ServerConfig {
        https: SocketAddr::from((Ipv6Addr::UNSPECIFIED, 443)),
        http: SocketAddr::from((Ipv6Addr::UNSPECIFIED, 80)),
        state_dir: PathBuf::from("/var/lib/mtasts"),
        behind_proxy: false,
        cert_cache: 10_000,
        limits: Limits::default(),
    };
    let Some(raw) = raw else { return cfg };
    let addr = |v: &Option<Spanned<String>>, report: &mut Report, key: &str| {
        let v = v.as_ref()?;
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                report.errors.push(source.at(
                    v.span(),
                    format!(
                        "server.{key}: {:?} is not an address:port (e.g. \"127.0.0.1:8443\" or \"[::]:443\")",
                        v.get_ref()
                    ),
                ));
                None
            }
        }
    };
    if let Some(a) = addr(&raw.https, report, "https") {
        cfg.https = a;
    }
    if let Some(a) = addr(&raw.http, report, "http") {
        cfg.http = a;
    }
    if cfg.https == cfg.http
        && let Some(v) = &raw.http
    {
        report.errors.push(source.at(
            v.span(),
            "server.http and server.https must be different addresses",
        ));
    }
    if let Some(dir) = &raw.state_dir {
        if dir.get_ref().is_empty() {
            report
                .errors
                .push(source.at(dir.span(), "server.state_dir must not be empty"));
        }
        cfg.state_dir = source.resolve(dir.get_ref());
    }
    cfg.behind_proxy = raw.behind_proxy.unwrap_or(false);
    if let Some(n) = &raw.cert_cache {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if v > 0 => cfg.cert_cache = v,
            _ => report
                .errors
                .push(source.at(n.span(), "server.cert_cache must be a positive integer")),
        }
    }
    let limits = &mut cfg.limits;
    if let Some(n) = &raw.max_connections {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if v > 0 => limits.max_connections = v,
            _ => report.errors.push(source.at(
                n.span(),
                "server.max_connections must be a positive integer",
            )),
        }
    }
    if let Some(n) = &raw.max_connections_per_ip {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if v > 0 => limits.max_connections_per_ip = v,
            _ => report.errors.push(source.at(
                n.span(),
                "server.max_connections_per_ip must be a positive integer",
            )),
        }
    }
    if let Some(n) = &raw.max_header_bytes {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if (8192..=1024 * 1024).contains(&v) => limits.max_header_bytes = v,
            _ => report.errors.push(source.at(
                n.span(),
                "server.max_header_bytes must be between 8192 and 1048576",
            )),
        }
    }
    let durations = [
        (
            &raw.handshake_timeout,
            &mut limits.handshake_timeout,
            "handshake_timeout",
        ),
        (
            &raw.header_read_timeout,
            &mut limits.header_read_timeout,
            "header_read_timeout",
        ),
        (&raw.idle_timeout, &mut limits.idle_timeout, "idle_timeout"),
        (
            &raw.max_connection_age,
            &mut limits.max_connection_age,
            "max_connection_age",
        ),
        (
            &raw.shutdown_timeout,
            &mut limits.shutdown_timeout,
            "shutdown_timeout",
        ),
    ];
    for (value, slot, key) in durations {
        if let Some(v) = value {
            match duration(v.get_ref()) {
                Ok(d) if !d.is_zero() => *slot = d,
                Ok(_) => report
                    .errors
                    .push(source.at(v.span(), format!("server.{key} must be more than 0"))),
                Err(msg) => report
                    .errors
                    .push(source.at(v.span(), format!("server.{key}: {msg}"))),
            }
        }
    }
    cfg
}

pub(super) fn tls_config(source: &Source, raw: Option<RawTls>, report: &mut Report) -> TlsConfig {
    let mut cfg = TlsConfig {
        mode: TlsMode::SelfSigned,
        acme: AcmeConfig::default(),
    };
    let Some(raw) = raw else { return cfg };
    if let Some(mode) = &raw.mode {
        match mode.get_ref().as_str() {
            "self-signed" => cfg.mode = TlsMode::SelfSigned,
            "acme" => cfg.mode = TlsMode::Acme,
            other => report.errors.push(source.at(
                mode.span(),
                format!("tls.mode {other:?} is not one of \"self-signed\", \"acme\""),
            )),
        }
    }
    cfg.acme = acme_config(source, raw, report);
    cfg
}

pub(super) fn acme_config(source: &Source, raw: RawTls, report: &mut Report) -> AcmeConfig {
    let mut cfg = AcmeConfig::default();
    if let Some(dir) = &raw.directory {
        let url = dir.get_ref().trim();
        let host_part = url.strip_prefix("https://").unwrap_or("");
        if host_part.is_empty() || host_part.starts_with('/') || url.contains(char::is_whitespace) {
            report.errors.push(source.at(
                dir.span(),
                format!(
                    "tls.directory {url:?} must be an https:// URL (e.g. {LETS_ENCRYPT_STAGING:?})"
                ),
            ));
        } else {
            cfg.directory = url.to_owned();
        }
    }
    if let Some(contact) = &raw.contact {
        let items: Vec<&str> = match contact.get_ref() {
            toml::Value::String(s) => vec![s.as_str()],
            toml::Value::Array(a) if a.iter().all(toml::Value::is_str) => {
                a.iter().filter_map(toml::Value::as_str).collect()
            }
            _ => {
                report.errors.push(source.at(
                    contact.span(),
                    "tls.contact must be a string or a list of strings",
                ));
                Vec::new()
            }
        };
        for item in items {
            let item = item.trim();
            let uri = if item.contains(':') {
                item.to_owned()
            } else {
                format!("mailto:{item}")
            };
            let ok = uri
                .strip_prefix("mailto:")
                .is_some_and(|a| a.contains('@') && !a.contains(char::is_whitespace));
            if ok {
                cfg.contact.push(uri);
            } else {
                report.errors.push(source.at(
                    contact.span(),
                    format!("tls.contact {item:?} is not an e-mail address or mailto: URI"),
                ));
            }
        }
    }
    match (&raw.eab_kid, &raw.eab_hmac_key) {
        (Some(kid), Some(key)) => {
            let text = key.get_ref().trim().trim_end_matches('=');
            match data_encoding::BASE64URL_NOPAD.decode(text.as_bytes()) {
                Ok(bytes) if !bytes.is_empty() => {
                    cfg.eab = Some(Eab {
                        kid: kid.get_ref().trim().to_owned(),
                        hmac_key: bytes,
                    })
                }
                _ => report.errors.push(source.at(
                    key.span(),
                    "tls.eab_hmac_key must be the base64url key the CA gave you",
                )),
            }
        }
        (Some(one), None) | (None, Some(one)) => report.errors.push(source.at(
            one.span(),
            "tls.eab_kid and tls.eab_hmac_key must be given together",
        )),
        (None, None) => {}
    }
    if let Some(roots) = &raw.ca_roots {
        let path = source.resolve(roots.get_ref());
        match std::fs::read(&path) {
            Ok(pem) if pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => {
                cfg.ca_roots = Some(path);
            }
            Ok(_) => report.errors.push(source.at(
                roots.span(),
                format!("tls.ca_roots {} holds no PEM certificate", path.display()),
            )),
            Err(e) => report.errors.push(source.at(
                roots.span(),
                format!("tls.ca_roots {}: {e}", path.display()),
            )),
        }
    }
    if let Some(ch) = &raw.challenge {
        match ch.get_ref().as_str() {
            "http-01" => cfg.challenge = ChallengeKind::Http01,
            "tls-alpn-01" => cfg.challenge = ChallengeKind::TlsAlpn01,
            other => report.errors.push(source.at(
                ch.span(),
                format!("tls.challenge {other:?} is not one of \"tls-alpn-01\", \"http-01\""),
            )),
        }
    }
    if let Some(kt) = &raw.key_type {
        match kt.get_ref().as_str() {
            "ecdsa-p256" => cfg.key_type = KeyType::EcdsaP256,
            "rsa2048" => cfg.key_type = KeyType::Rsa2048,
            other => report.errors.push(source.at(
                kt.span(),
                format!("tls.key_type {other:?} is not one of \"ecdsa-p256\", \"rsa2048\""),
            )),
        }
    }
    let positive = |v: &Option<Spanned<i64>>, key: &str, report: &mut Report| {
        let v = v.as_ref()?;
        match u32::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                report
                    .errors
                    .push(source.at(v.span(), format!("tls.{key} must be a positive integer")));
                None
            }
        }
    };
    if let Some(n) = positive(&raw.max_concurrent_orders, "max_concurrent_orders", report) {
        cfg.max_concurrent_orders = n as usize;
    }
    if let Some(n) = positive(&raw.orders_per_hour, "orders_per_hour", report) {
        cfg.orders_per_hour = n;
    }
    let mut span_of_max = None;
    let durations = [
        (&raw.renew_before, "renew_before"),
        (&raw.retry_initial, "retry_initial"),
        (&raw.retry_max, "retry_max"),
    ];
    for (value, key) in durations {
        let Some(v) = value else { continue };
        match duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => match key {
                "renew_before" => cfg.renew_before = Some(d),
                "retry_initial" => cfg.retry_initial = d,
                _ => {
                    cfg.retry_max = d;
                    span_of_max = Some(v.span());
                }
            },
            Ok(_) => report
                .errors
                .push(source.at(v.span(), format!("tls.{key} must be more than 0"))),
            Err(msg) => report
                .errors
                .push(source.at(v.span(), format!("tls.{key}: {msg}"))),
        }
    }
    if cfg.retry_max < cfg.retry_initial {
        let span = span_of_max
            .or_else(|| raw.retry_initial.as_ref().map(Spanned::span))
            .unwrap_or(0..0);
        report.errors.push(source.at(
            span,
            "tls.retry_max must not be shorter than tls.retry_initial",
        ));
    }
    cfg.precheck_dns = raw.precheck_dns.unwrap_or(true);
    if let Some(r) = &raw.precheck_resolver {
        let text = r.get_ref().trim();
        let parsed = text.parse::<SocketAddr>().or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        });
        match parsed {
            Ok(a) => cfg.precheck_resolver = Some(a),
            Err(_) => report.errors.push(source.at(
                r.span(),
                format!("tls.precheck_resolver {text:?} is not an ip or ip:port"),
            )),
        }
    }
    for item in raw.server_addresses.iter().flat_map(|l| l.get_ref()) {
        match item.get_ref().parse::<std::net::IpAddr>() {
            Ok(a) => cfg.server_addresses.push(a),
            Err(_) => report.errors.push(source.at(
                item.span(),
                format!(
                    "tls.server_addresses: {:?} is not an IP address",
                    item.get_ref()
                ),
            )),
        }
    }
    cfg
}

pub(super) fn admin_config(
    source: &Source,
    raw: Option<Spanned<RawAdmin>>,
    report: &mut Report,
) -> Option<AdminConfig> {
    let raw = raw?;
    let span = raw.span();
    let raw = raw.into_inner();
    let Some(listen) = raw.listen else {
        report.errors.push(source.at(
            span,
            "[admin] needs `listen` (e.g. \"127.0.0.1:8081\"); remove the section to keep the admin API off",
        ));
        return None;
    };
    let addr = match listen.get_ref().parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            report.errors.push(source.at(
                listen.span(),
                format!(
                    "admin.listen: {:?} is not an address:port",
                    listen.get_ref()
                ),
            ));
            return None;
        }
    };
    let Some(token_file) = raw.token_file else {
        report.errors.push(source.at(
            span,
            "[admin] needs `token_file`: the admin API is never open without a token",
        ));
        return None;
    };
    let mut max_connections = ADMIN_MAX_CONNECTIONS;
    if let Some(n) = &raw.max_connections {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if v > 0 => max_connections = v,
            _ => {
                report
                    .errors
                    .push(source.at(n.span(), "admin.max_connections must be a positive integer"));
                return None;
            }
        }
    }
    Some(AdminConfig {
        listen: addr,
        token_file: source.resolve(token_file.get_ref()),
        max_connections,
    })
}
