//! `mtasts check`: verifies a domain live, the way a sending MTA would
//! (RFC 8461 §3 discovery, §3.3 fetch, §4 MX validation), and compares what
//! it finds with the config this server serves.
//!
//! Every finding has a level; a domain's verdict is the worst of them.
//! DNS goes to one resolver over TCP; HTTPS and STARTTLS verify
//! certificates against the system roots or `--ca-file`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::MxSource;
use crate::dns::update::Transport;
use crate::policy::{DomainName, MAX_AGE_LIMIT, MAX_AGE_RECOMMENDED_MIN, Mode, MxPattern};
use crate::snapshot::Snapshot;

/// Senders cap policy bodies around 64 KiB (RFC 8461 §3.3 leaves the limit
/// to them); a bigger one is as good as absent.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Where the system's trusted roots live on Debian and friends.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// CNAME chains longer than this are treated as broken.
const MAX_CNAME_HOPS: usize = 8;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One observation about a domain.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    /// What was checked: `txt`, `policy`, `mx`, `starttls`, `config`, `preflight`.
    pub check: &'static str,
    pub message: String,
}

/// The policy as fetched and parsed like a sender parses it.
#[derive(Debug, Clone, Serialize)]
pub struct FetchedPolicy {
    pub mode: Mode,
    pub mx: Vec<String>,
    pub max_age: u64,
}

/// Everything `check` found for one domain.
#[derive(Debug, Serialize)]
pub struct DomainReport {
    pub domain: String,
    pub verdict: Level,
    /// The id of the single `v=STSv1` TXT record, if there is one.
    pub id: Option<String>,
    pub policy: Option<FetchedPolicy>,
    /// The domain's MX hosts, lowest preference first.
    pub mx: Vec<String>,
    /// Set with `--preflight-enforce`: whether switching to enforce is safe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safe_to_enforce: Option<bool>,
    pub findings: Vec<Finding>,
}

impl DomainReport {
    fn add(&mut self, level: Level, check: &'static str, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            check,
            message: message.into(),
        });
        self.verdict = self.verdict.max(level);
    }
}

/// How to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// The DNS resolver (recursive, or the authoritative server in tests).
    pub resolver: SocketAddr,
    /// Port of the policy host (443 for real senders).
    pub https_port: u16,
    /// Port of the MX hosts (25 for real senders).
    pub smtp_port: u16,
    /// Extra trusted root (e.g. the local CA of `tls.mode = "self-signed"`);
    /// replaces the system roots.
    pub ca_file: Option<PathBuf>,
    /// Connect to every MX and check STARTTLS and its certificate.
    pub starttls: bool,
    /// Judge whether switching to enforce is safe (implies `starttls`).
    pub preflight_enforce: bool,
    pub timeout: Duration,
}

/// Why `check` could not run at all (not a finding about a domain).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read trusted roots from {path}: {detail}")]
    Roots { path: PathBuf, detail: String },
    #[error("no nameserver in /etc/resolv.conf; use --resolver IP:PORT")]
    NoResolver,
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The first `nameserver` of /etc/resolv.conf, port 53.
pub fn system_resolver() -> Result<SocketAddr, CheckError> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
        .ok_or(CheckError::NoResolver)
}

fn tls_config(options: &Options) -> Result<Arc<rustls::ClientConfig>, CheckError> {
    let path = options
        .ca_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(SYSTEM_ROOTS));
    let roots_err = |detail: String| CheckError::Roots {
        path: path.clone(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&path)
        .map_err(|e| roots_err(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| roots_err(e.to_string()))?;
        // The system bundle may hold certificates rustls cannot use; skip those.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(roots_err("no usable certificate".to_owned()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CheckError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A stub resolver: recursive queries over TCP to one server.
struct Resolver {
    transport: Transport,
}

impl Resolver {
    fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            transport: Transport::new(addr, timeout, 1),
        }
    }

    async fn query(&mut self, name: &Name, rtype: RecordType) -> Result<Message, String> {
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(name.clone(), rtype));
        let wire = msg.to_vec().map_err(|e| e.to_string())?;
        let mut last = String::new();
        for _ in 0..2 {
            match self.transport.exchange_once(&wire).await {
                Ok(resp) => {
                    let answer = Message::from_vec(&resp).map_err(|e| e.to_string())?;
                    if answer.id != msg.id {
                        return Err("answer id does not match the query".to_owned());
                    }
                    return Ok(answer);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("resolver does not answer: {last}"))
    }

    /// The records of `rtype` at `name`, following CNAMEs (in the answer
    /// or by asking again). NXDOMAIN/NODATA give an empty list.
    async fn lookup(&mut self, name: &str, rtype: RecordType) -> Result<Vec<RData>, String> {
        let mut target = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
            .map_err(|e| format!("{name}: {e}"))?;
        for _ in 0..MAX_CNAME_HOPS {
            let msg = self.query(&target, rtype).await?;
            match msg.response_code {
                ResponseCode::NoError => {}
                ResponseCode::NXDomain => return Ok(Vec::new()),
                other => return Err(format!("{target} {rtype}: {other}")),
            }
            // Walk the chain inside this answer.
            let mut name = target.clone();
            let mut hops = 0;
            loop {
                let next = msg.answers.iter().find_map(|r| match &r.data {
                    RData::CNAME(c) if r.name == name && rtype != RecordType::CNAME => {
                        Some(c.0.clone())
                    }
                    _ => None,
                });
                match next {
                    Some(n) if hops < MAX_CNAME_HOPS => {
                        name = n;
                        hops += 1;
                    }
                    Some(_) => return Err(format!("{target}: CNAME loop")),
                    None => break,
                }
            }
            let found: Vec<RData> = msg
                .answers
                .iter()
                .filter(|r| r.name == name && r.record_type() == rtype)
                .map(|r| r.data.clone())
                .collect();
            if !found.is_empty() || name == target {
                return Ok(found);
            }
            // The chain leaves what this answer covers: ask for the target.
            target = name;
        }
        Err(format!("{name}: CNAME chain longer than {MAX_CNAME_HOPS}"))
    }

    async fn addresses(&mut self, host: &str) -> Result<Vec<IpAddr>, String> {
        let mut out = Vec::new();
        for rtype in [RecordType::A, RecordType::AAAA] {
            for data in self.lookup(host, rtype).await? {
                match data {
                    RData::A(a) => out.push(IpAddr::V4(a.0)),
                    RData::AAAA(a) => out.push(IpAddr::V6(a.0)),
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

/// The MX hosts of `domain` (lowercase, no trailing dot) asked of
/// `resolver`, for callers outside `check` (the mx shrink hold in
/// `crate::mxhold`). NXDOMAIN and NODATA give an empty list.
pub async fn mx_hosts(
    resolver: SocketAddr,
    domain: &str,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let records = Resolver::new(resolver, timeout)
        .lookup(domain, RecordType::MX)
        .await?;
    Ok(records
        .iter()
        .filter_map(|r| match r {
            RData::MX(m) => Some(
                m.exchange
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase(),
            ),
            _ => None,
        })
        .collect())
}

/// Parses a `_mta-sts` TXT (RFC 8461 §3.1): `v=STSv1` first, then
/// `;`-separated `key=value` fields, one of them `id` (1..32 alphanumerics).
pub fn parse_sts_txt(text: &str) -> Result<String, String> {
    let mut fields = text.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next() != Some("v=STSv1") {
        return Err("does not start with v=STSv1".to_owned());
    }
    let mut id = None;
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            return Err(format!("field {field:?} is not key=value"));
        };
        if key.trim() == "id" {
            if id.is_some() {
                return Err("more than one id field".to_owned());
            }
            id = Some(value.trim());
        }
    }
    let id = id.ok_or("no id field")?;
    if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("id {id:?} is not 1 to 32 letters and digits"));
    }
    Ok(id.to_owned())
}

/// Parses a policy body as senders do (RFC 8461 §3.2); warnings for what
/// senders tolerate but the RFC does not allow.
pub fn parse_policy(body: &[u8]) -> Result<(FetchedPolicy, Vec<String>), String> {
    let text = std::str::from_utf8(body).map_err(|_| "the policy is not UTF-8 text")?;
    let mut warnings = Vec::new();
    if text.contains('\n')
        && text
            .split('\n')
            .any(|l| !l.is_empty() && !l.ends_with('\r'))
    {
        warnings.push("lines end in LF, not CRLF (RFC 8461 §3.2; most senders tolerate it)".into());
    }
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line {} {line:?} is not `key: value`", i + 1));
        };
        let value = value.trim();
        match key.trim() {
            "version" => {
                if i != 0 {
                    warnings.push("`version` is not the first line".into());
                }
                version.get_or_insert(value.to_owned());
            }
            "mode" => {
                if mode.is_some() {
                    warnings.push("`mode` appears more than once".into());
                }
                mode.get_or_insert(value.to_owned());
            }
            "max_age" => {
                if max_age.is_some() {
                    warnings.push("`max_age` appears more than once".into());
                }
                max_age.get_or_insert(value.to_owned());
            }
            "mx" => mx.push(value.to_owned()),
            // Extension fields are ignored by senders (RFC 8461 §3.2).
            _ => {}
        }
    }
    match version.as_deref() {
        Some("STSv1") => {}
        Some(v) => return Err(format!("version is {v:?}, not STSv1")),
        None => return Err("no `version: STSv1` line".into()),
    }
    let mode_text = mode.ok_or("no `mode` line")?;
    let mode = Mode::parse(&mode_text)
        .ok_or_else(|| format!("mode {mode_text:?} is not enforce, testing or none"))?;
    let max_age_text = max_age.ok_or("no `max_age` line")?;
    let max_age: u64 = max_age_text
        .parse()
        .ok()
        .filter(|n| *n <= MAX_AGE_LIMIT)
        .ok_or_else(|| format!("max_age {max_age_text:?} is not 0..={MAX_AGE_LIMIT}"))?;
    for m in &mx {
        MxPattern::parse(m).map_err(|e| format!("mx {m:?}: {e}"))?;
    }
    if mx.is_empty() && mode != Mode::None {
        return Err(format!("mode {mode} without any `mx` line"));
    }
    Ok((FetchedPolicy { mode, mx, max_age }, warnings))
}

/// The HTTP part of a policy fetch.
struct Fetched {
    status: u16,
    content_type: Option<String>,
    location: Option<String>,
    body: Result<Bytes, String>,
}

async fn fetch_policy(
    host: &str,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Fetched, String> {
    let server_name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS with {host} at {addr}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(crate::http::POLICY_PATH)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "mtasts-check")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| format!("HTTP request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = resp.status().as_u16();
        let content_type = header(hyper::header::CONTENT_TYPE);
        let location = header(hyper::header::LOCATION);
        let body = http_body_util::Limited::new(resp.into_body(), MAX_POLICY_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        driver.abort();
        Ok(Fetched {
            status,
            content_type,
            location,
            body,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// Reads one (possibly multi-line) SMTP reply; returns its code and text.
async fn smtp_reply<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<(u16, String), String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if n == 0 || line.len() < 4 {
            return Err(format!("unexpected SMTP reply {line:?}"));
        }
        all.push_str(&line);
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("unexpected SMTP reply {line:?}"))?;
        if line.as_bytes().get(3) == Some(&b' ') {
            return Ok((code, all));
        }
        if all.len() > 64 * 1024 {
            return Err("SMTP reply too long".into());
        }
    }
}

/// Connects to an MX, upgrades with STARTTLS and verifies its certificate
/// chain and that it is valid for `host` — what an enforcing sender needs
/// (RFC 8461 §4.2).
async fn check_starttls(
    host: &str,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<(), String> {
    let server_name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut stream = BufReader::new(tcp);
        let (code, _) = smtp_reply(&mut stream).await?;
        if code != 220 {
            return Err(format!("greeting {code}"));
        }
        stream
            .write_all(b"EHLO mtasts-check.invalid\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let (code, text) = smtp_reply(&mut stream).await?;
        if code != 250 {
            return Err(format!("EHLO answered {code}"));
        }
        if !text.lines().any(|l| {
            l.get(4..)
                .is_some_and(|k| k.trim().eq_ignore_ascii_case("STARTTLS"))
        }) {
            return Err("does not offer STARTTLS".into());
        }
        stream
            .write_all(b"STARTTLS\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let (code, _) = smtp_reply(&mut stream).await?;
        if code != 220 {
            return Err(format!("STARTTLS answered {code}"));
        }
        let mut tls_stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, stream.into_inner())
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let _ = tls_stream.write_all(b"QUIT\r\n").await;
        Ok(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// Checks every domain; `snapshot` is the config to compare with, if any.
pub async fn check(
    domains: &[DomainName],
    options: &Options,
    snapshot: Option<&Snapshot>,
) -> Result<Vec<DomainReport>, CheckError> {
    let tls = tls_config(options)?;
    let mut resolver = Resolver::new(options.resolver, options.timeout);
    let mut out = Vec::new();
    for d in domains {
        out.push(check_domain(d, options, snapshot, &tls, &mut resolver).await);
    }
    Ok(out)
}

async fn check_domain(
    domain: &DomainName,
    options: &Options,
    snapshot: Option<&Snapshot>,
    tls: &Arc<rustls::ClientConfig>,
    resolver: &mut Resolver,
) -> DomainReport {
    let mut report = DomainReport {
        domain: domain.to_string(),
        verdict: Level::Ok,
        id: None,
        policy: None,
        mx: Vec::new(),
        safe_to_enforce: None,
        findings: Vec::new(),
    };
    let site = snapshot.and_then(|s| s.lookup(&domain.policy_host()));

    // 1. The TXT record (RFC 8461 §3.1).
    let txt_name = format!("_mta-sts.{domain}");
    match resolver.lookup(&txt_name, RecordType::TXT).await {
        Err(e) => report.add(Level::Fail, "txt", format!("DNS lookup failed: {e}")),
        Ok(records) => {
            let sts: Vec<String> = records
                .iter()
                .filter_map(|r| match r {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .filter(|t| t.starts_with("v=STSv1"))
                .collect();
            match sts.as_slice() {
                [] => report.add(
                    Level::Fail,
                    "txt",
                    format!("no v=STSv1 TXT record at {txt_name}: senders do not look for a policy"),
                ),
                [one] => match parse_sts_txt(one) {
                    Ok(id) => {
                        report.add(Level::Ok, "txt", format!("{txt_name}: {one:?}"));
                        report.id = Some(id);
                    }
                    Err(e) => report.add(
                        Level::Fail,
                        "txt",
                        format!("{txt_name} {one:?}: {e}; senders ignore the policy"),
                    ),
                },
                many => report.add(
                    Level::Fail,
                    "txt",
                    format!(
                        "{} v=STSv1 TXT records at {txt_name}: RFC 8461 §3.1 requires exactly one, senders treat this as no policy",
                        many.len()
                    ),
                ),
            }
        }
    }

    // 2. The policy (RFC 8461 §3.3).
    let host = domain.policy_host();
    let body = fetch(&host, options, tls, resolver, &mut report).await;
    if let Some(body) = &body {
        match parse_policy(body) {
            Ok((policy, warnings)) => {
                for w in warnings {
                    report.add(Level::Warn, "policy", w);
                }
                report.add(
                    Level::Ok,
                    "policy",
                    format!(
                        "mode {}, {} mx, max_age {}",
                        policy.mode,
                        policy.mx.len(),
                        policy.max_age
                    ),
                );
                if policy.mode == Mode::Enforce && policy.max_age < MAX_AGE_RECOMMENDED_MIN {
                    report.add(
                        Level::Warn,
                        "policy",
                        format!(
                            "max_age {} is below one day in enforce mode",
                            policy.max_age
                        ),
                    );
                }
                report.policy = Some(policy);
            }
            Err(e) => report.add(Level::Fail, "policy", format!("senders reject it: {e}")),
        }
    }

    // 3. Compare with what this server is configured to serve.
    if let Some(site) = site {
        match &body {
            Some(b) if *b == site.body => {
                report.add(Level::Ok, "config", "served body matches the config")
            }
            Some(_) => report.add(
                Level::Fail,
                "config",
                "the served body differs from the config (is the server running an older config? reload it)",
            ),
            None => {}
        }
        match &report.id {
            Some(id) if *id == site.id.as_str() => {
                report.add(Level::Ok, "config", "DNS id matches the configured policy")
            }
            Some(id) => {
                let msg = format!(
                    "DNS id {id} is not the id of the configured policy ({}): senders that cached the old policy keep it; publish the new id (mtasts records / dns push)",
                    site.id
                );
                report.add(Level::Fail, "config", msg);
            }
            None => {}
        }
    } else if snapshot.is_some() {
        report.add(Level::Warn, "config", "domain is not in the config");
    }

    // 4. MX hosts against the policy (RFC 8461 §4.1).
    let enforce_like = options.preflight_enforce
        || report
            .policy
            .as_ref()
            .is_some_and(|p| p.mode == Mode::Enforce);
    match resolver.lookup(domain.as_str(), RecordType::MX).await {
        Err(e) => report.add(Level::Fail, "mx", format!("MX lookup failed: {e}")),
        Ok(records) => {
            let mut mx: Vec<(u16, String)> = records
                .iter()
                .filter_map(|r| match r {
                    RData::MX(m) => Some((
                        m.preference,
                        m.exchange
                            .to_ascii()
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                    )),
                    _ => None,
                })
                .collect();
            mx.sort();
            report.mx = mx.into_iter().map(|(_, h)| h).collect();
            if report.mx.is_empty() {
                report.add(Level::Warn, "mx", "no MX records");
            }
        }
    }
    if let Some(policy) = report.policy.clone()
        && policy.mode != Mode::None
    {
        let patterns: Vec<MxPattern> = policy
            .mx
            .iter()
            .filter_map(|m| MxPattern::parse(m).ok())
            .collect();
        for host in report.mx.clone() {
            if patterns.iter().any(|p| p.matches(&host)) {
                report.add(Level::Ok, "mx", format!("{host} is covered by the policy"));
            } else {
                let level = if enforce_like {
                    Level::Fail
                } else {
                    Level::Warn
                };
                report.add(
                    level,
                    "mx",
                    format!(
                        "{host} is not covered by any mx pattern: in enforce mode senders do not deliver to it"
                    ),
                );
            }
        }
    }

    // A certificate-driven shrink the server holds (crate::mxhold): the
    // config's names no longer cover a live MX that the served policy does.
    if let (Some(site), Some(policy)) = (site, report.policy.clone())
        && site.domain.policy.mode == Mode::Enforce
        && matches!(site.domain.mx_source, MxSource::Certs(_))
    {
        let served: Vec<MxPattern> = policy
            .mx
            .iter()
            .filter_map(|m| MxPattern::parse(m).ok())
            .collect();
        for host in report.mx.clone() {
            if served.iter().any(|p| p.matches(&host))
                && !site.domain.policy.mx.iter().any(|p| p.matches(&host))
            {
                report.add(
                    Level::Warn,
                    "mx-shrink",
                    format!(
                        "mx shrink held: the mail server certificates no longer name {host}, which is still an MX; \
                         `mtasts serve` keeps serving it until the MX record is gone (SIGUSR1 forces the shrink; docs/OPERATIONS.md)"
                    ),
                );
            }
        }
    }

    // 5. STARTTLS on every MX (RFC 8461 §4.2).
    if options.starttls || options.preflight_enforce {
        let level = if enforce_like {
            Level::Fail
        } else {
            Level::Warn
        };
        for host in report.mx.clone() {
            let addrs = match resolver.addresses(&host).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    report.add(level, "starttls", format!("{host} has no address"));
                    continue;
                }
                Err(e) => {
                    report.add(level, "starttls", format!("{host}: {e}"));
                    continue;
                }
            };
            let mut result = Err(String::new());
            for ip in addrs {
                let addr = SocketAddr::new(ip, options.smtp_port);
                result = check_starttls(&host, addr, Arc::clone(tls), options.timeout).await;
                if result.is_ok() {
                    break;
                }
            }
            match result {
                Ok(()) => report.add(
                    Level::Ok,
                    "starttls",
                    format!("{host}: STARTTLS with a valid certificate for the name"),
                ),
                Err(e) => report.add(level, "starttls", format!("{host}: {e}")),
            }
        }
    }

    if options.preflight_enforce {
        if report.policy.as_ref().is_some_and(|p| p.mx.is_empty()) {
            report.add(
                Level::Fail,
                "preflight",
                "the served policy lists no mx patterns; enforce needs every MX listed",
            );
        }
        let safe =
            report.verdict != Level::Fail && report.policy.is_some() && !report.mx.is_empty();
        report.safe_to_enforce = Some(safe);
        if safe {
            report.add(
                Level::Ok,
                "preflight",
                "switching to mode = \"enforce\" is safe: every MX is covered and presents a valid certificate",
            );
        } else {
            report.add(
                Level::Fail,
                "preflight",
                "do not switch to enforce yet: fix the failures above first",
            );
        }
    }
    report
}

/// Fetches the policy body, adding findings; `None` if there is none.
async fn fetch(
    host: &str,
    options: &Options,
    tls: &Arc<rustls::ClientConfig>,
    resolver: &mut Resolver,
    report: &mut DomainReport,
) -> Option<Bytes> {
    let url = format!("https://{host}{}", crate::http::POLICY_PATH);
    let addrs = match resolver.addresses(host).await {
        Ok(a) if !a.is_empty() => a,
        Ok(_) => {
            report.add(
                Level::Fail,
                "policy",
                format!("{host} has no A/AAAA record"),
            );
            return None;
        }
        Err(e) => {
            report.add(Level::Fail, "policy", format!("{host}: {e}"));
            return None;
        }
    };
    let mut errors = Vec::new();
    for ip in addrs {
        let addr = SocketAddr::new(ip, options.https_port);
        let fetched = match fetch_policy(host, addr, Arc::clone(tls), options.timeout).await {
            Ok(f) => f,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if (300..400).contains(&fetched.status) {
            report.add(
                Level::Fail,
                "policy",
                format!(
                    "{url} redirects ({} to {}): senders must not follow redirects (RFC 8461 §3.3)",
                    fetched.status,
                    fetched.location.as_deref().unwrap_or("?")
                ),
            );
            return None;
        }
        if fetched.status != 200 {
            report.add(
                Level::Fail,
                "policy",
                format!("{url} answered HTTP {}, not 200", fetched.status),
            );
            return None;
        }
        let media = fetched
            .content_type
            .as_deref()
            .and_then(|c| c.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase());
        if media.as_deref() != Some("text/plain") {
            report.add(
                Level::Fail,
                "policy",
                format!(
                    "{url} has Content-Type {:?}; senders require text/plain (RFC 8461 §3.2)",
                    fetched.content_type.as_deref().unwrap_or("(none)")
                ),
            );
            return None;
        }
        return match fetched.body {
            Ok(body) => Some(body),
            Err(e) => {
                report.add(
                    Level::Fail,
                    "policy",
                    format!("{url}: body unreadable or over {MAX_POLICY_BYTES} bytes ({e})"),
                );
                None
            }
        };
    }
    report.add(
        Level::Fail,
        "policy",
        format!("cannot fetch {url}: {}", errors.join("; ")),
    );
    None
}

/// Human-readable report.
pub fn to_text(reports: &[DomainReport]) -> String {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!("{}: {}\n", r.domain, r.verdict.as_str()));
        for f in &r.findings {
            out.push_str(&format!(
                "  {:<4} {:<9} {}\n",
                f.level.as_str(),
                f.check,
                f.message
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_txt_parsing() {
        assert_eq!(parse_sts_txt("v=STSv1; id=abc123;"), Ok("abc123".into()));
        assert_eq!(parse_sts_txt("v=STSv1;id=abc"), Ok("abc".into()));
        assert_eq!(
            parse_sts_txt("v=STSv1; id=a; ext=1;"),
            Ok("a".into()),
            "extension fields are allowed"
        );
        assert!(parse_sts_txt("v=STSv2; id=a;").is_err());
        assert!(parse_sts_txt("v=STSv1;").is_err());
        assert!(parse_sts_txt("v=STSv1; id=a-b;").is_err());
        assert!(parse_sts_txt(&format!("v=STSv1; id={};", "a".repeat(33))).is_err());
    }

    #[test]
    fn policy_parsing_like_a_sender() {
        let (p, w) = parse_policy(
            b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n",
        )
        .expect("valid");
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx.len(), 2);
        assert!(w.is_empty());
        let (_, w) = parse_policy(b"version: STSv1\nmode: none\nmax_age: 0\n").expect("LF ok");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(parse_policy(b"mode: testing\r\nmx: a.example\r\nmax_age: 1\r\n").is_err());
        assert!(parse_policy(b"version: STSv1\r\nmode: testing\r\nmax_age: 1\r\n").is_err());
        assert!(
            parse_policy(b"version: STSv1\r\nmode: strict\r\nmx: a.example\r\nmax_age: 1\r\n")
                .is_err()
        );
        assert!(parse_policy(b"version: STSv1\r\nmode: none\r\nmax_age: 99999999999\r\n").is_err());
    }
}
