//! `mtasts check` end to end: knotd is the resolver, `mtasts serve` the
//! real HTTPS listener (self-signed mode, its local CA trusted through
//! `--ca-file`), and small test servers play a misconfigured policy host
//! and an MX with STARTTLS. A correct domain must pass; each broken part
//! must give the matching FAIL or WARN.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::knot::Knot;
use common::mtasts;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const ZONE: &str = "example.test";

/// Labels under ZONE whose policy host is a `fake_policy_host`.
const FAKE_POLICY_DOMAINS: [&str; 6] = ["tdot", "ulabel", "crlfend", "blank", "plus", "nonemx"];

const CONFIG: &str = r#"
[defaults]
mx = ["mx.good.example.test"]
host_a = ["127.0.0.1"]

[[domain]]
name = "good.example.test"
mode = "enforce"

[[domain]]
name = "wrongid.example.test"

[[domain]]
name = "uncovered.example.test"
mode = "enforce"

[[domain]]
name = "testing.example.test"
mode = "testing"

[[domain]]
name = "twotxt.example.test"

[[domain]]
name = "badcert.example.test"
mx = ["mx.badcert.example.test"]

[[domain]]
name = "none.example.test"
mode = "none"
mx = []

[[domain]]
name = "deleg.example.test"

[[domain]]
name = "v10.example.test"
mx = ["mx.v10.example.test"]

[[domain]]
name = "implicit.example.test"
mx = ["implicit.example.test"]
"#;

fn served_id(config: &Path, domain: &str) -> String {
    let out = mtasts(&[
        "policy",
        "--config",
        config.to_str().expect("utf-8"),
        domain,
    ]);
    assert!(out.status.success());
    common::policy_id(&out.stdout)
}

/// A test CA that signs the certificates of the fake servers.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    fn new() -> TestCa {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "check test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA cert");
        let pem = cert.pem();
        let issuer = Issuer::from_ca_cert_pem(&pem, key).expect("issuer");
        TestCa { issuer, pem }
    }

    fn server_config(&self, host: &str) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName(host.try_into().expect("name"))];
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], key)
            .expect("server config");
        Arc::new(config)
    }
}

/// A policy host that answers every request with `response`.
async fn fake_policy_host(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    response: String,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        let response = response.clone();
        tokio::spawn(async move {
            let Ok(mut s) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(response.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// The usual EHLO answer of [`fake_mx`].
const EHLO_REPLY: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n";

/// An MX that offers STARTTLS with the given certificate, answering EHLO
/// with `ehlo`.
async fn fake_mx(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ehlo: &'static [u8],
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut s = BufReader::new(tcp);
            let mut line = String::new();
            if s.write_all(b"220 mx.test ESMTP\r\n").await.is_err()
                || s.read_line(&mut line).await.is_err()
                || s.write_all(ehlo).await.is_err()
            {
                return;
            }
            line.clear();
            if s.read_line(&mut line).await.is_err() || !line.starts_with("STARTTLS") {
                return;
            }
            if s.write_all(b"220 go ahead\r\n").await.is_err() {
                return;
            }
            if let Ok(mut tls) = acceptor.accept(s.into_inner()).await {
                let mut rest = Vec::new();
                let _ = tls.read_to_end(&mut rest).await;
            }
        });
    }
}

struct World {
    dir: tempfile::TempDir,
    config: PathBuf,
    knot: Knot,
    https_port: u16,
    ca_bundle: PathBuf,
    serve: common::ServeProc,
    runtime: tokio::runtime::Runtime,
    test_ca: TestCa,
}

impl World {
    /// knotd with the domains' records, `mtasts serve`, a CA bundle.
    fn start() -> Option<World> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("mtasts.toml");
        let (https, http) = (common::loopback(), common::loopback());
        let state = dir.path().join("state");
        std::fs::write(
            &config,
            format!(
                "{}\n[tls]\nmode = \"self-signed\"\n{CONFIG}",
                common::server_section(https, http, &state)
            ),
        )
        .expect("write config");
        let id = |d: &str| served_id(&config, d);
        let mut zone = String::new();
        for d in [
            "good",
            "uncovered",
            "testing",
            "twotxt",
            "badcert",
            "none",
            "redirect",
            "ctype",
        ] {
            let txt = match d {
                "redirect" | "ctype" => "v=STSv1; id=fake1;".to_owned(),
                _ => format!("v=STSv1; id={};", id(&format!("{d}.example.test"))),
            };
            zone.push_str(&format!(
                "_mta-sts.{d} TXT \"{txt}\"\nmta-sts.{d} A 127.0.0.1\n{d} MX 10 mx.{d}\nmx.{d} A 127.0.0.1\n"
            ));
        }
        zone.push_str("_mta-sts.twotxt TXT \"v=STSv1; id=another;\"\n");
        // TLS-RPT: valid for the domains that must pass, broken for twotxt.
        for d in ["good", "deleg", "v10", "implicit"] {
            zone.push_str(&format!(
                "_smtp._tls.{d} TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.test\"\n"
            ));
        }
        zone.push_str("_smtp._tls.twotxt TXT \"v=TLSRPTv1; rua=mailto:x\"\n");
        // v10: beside its v=STSv1 record, a v=STSv10 one, which is no
        // MTA-STS record at all.
        zone.push_str(&format!(
            "_mta-sts.v10 TXT \"v=STSv1; id={};\"\n_mta-sts.v10 TXT \"v=STSv10; id=zzz;\"\n\
             mta-sts.v10 A 127.0.0.1\nv10 MX 10 mx.v10\nmx.v10 A 127.0.0.1\n",
            id("v10.example.test")
        ));
        // implicit: no MX, an address: the domain is its own MX.
        zone.push_str(&format!(
            "_mta-sts.implicit TXT \"v=STSv1; id={};\"\nmta-sts.implicit A 127.0.0.1\nimplicit A 127.0.0.1\n",
            id("implicit.example.test")
        ));
        // nullmx: RFC 7505 null MX.
        zone.push_str("_mta-sts.nullmx TXT \"v=STSv1; id=fake1;\"\nnullmx MX 0 .\n");
        // dblsemi: an empty field in the TXT.
        zone.push_str("_mta-sts.dblsemi TXT \"v=STSv1;; id=a1;\"\n");
        // twoaddr: one MX with two addresses; only 127.0.0.1 listens.
        zone.push_str("twoaddr MX 10 mx.twoaddr\nmx.twoaddr A 127.0.0.1\nmx.twoaddr A 127.0.0.2\n");
        // Domains whose policy host is a fake one serving a given body.
        for d in FAKE_POLICY_DOMAINS {
            zone.push_str(&format!(
                "_mta-sts.{d} TXT \"v=STSv1; id=fake1;\"\nmta-sts.{d} A 127.0.0.1\n"
            ));
        }
        zone.push_str("tdot MX 10 mx.good\ncrlfend MX 10 mx.good\nnonemx MX 10 mx.good\n");
        zone.push_str("blank MX 10 mx.good\nplus MX 10 mx.good\n");
        zone.push_str("ulabel MX 10 mx.xn--bcher-kva\nmx.xn--bcher-kva A 127.0.0.1\n");
        // many: more addresses than fit a 512-byte UDP answer.
        for i in 1..=40 {
            zone.push_str(&format!("many A 127.0.1.{i}\n"));
        }
        zone.push_str("uncovered MX 20 mx.elsewhere\nmx.elsewhere A 127.0.0.1\n");
        zone.push_str("testing MX 20 mx.elsewhere\n");
        // wrongid: the TXT carries an id that is not the served policy's.
        zone.push_str(
            "_mta-sts.wrongid TXT \"v=STSv1; id=0123456789abcdef;\"\nmta-sts.wrongid A 127.0.0.1\nwrongid MX 10 mx.good\n",
        );
        // Delegated hosting: both customer names are CNAMEs into the
        // provider's names (here in the same zone), as `records --for
        // customer` prints them.
        zone.push_str(&format!(
            "_mta-sts.deleg CNAME deleg.example.test.sts\n\
             deleg.example.test.sts TXT \"v=STSv1; id={};\"\n\
             mta-sts.deleg CNAME policy-host\npolicy-host A 127.0.0.1\n\
             deleg MX 10 mx.good\n",
            id("deleg.example.test")
        ));
        let knot = Knot::start(ZONE, &zone)?;

        let serve = common::ServeProc::start(&config, https, http);
        let test_ca = TestCa::new();
        let server_ca = std::fs::read_to_string(state.join("ca/ca.pem")).expect("local CA");
        let ca_bundle = dir.path().join("roots.pem");
        std::fs::write(&ca_bundle, format!("{server_ca}{}", test_ca.pem)).expect("bundle");
        Some(World {
            runtime: tokio::runtime::Runtime::new().expect("runtime"),
            dir,
            config,
            knot,
            https_port: https.port(),
            ca_bundle,
            serve,
            test_ca,
        })
    }

    fn check(&self, extra: &[&str], domain: &str) -> (bool, Report) {
        self.check_port(self.https_port, extra, domain)
    }

    fn check_port(&self, https_port: u16, extra: &[&str], domain: &str) -> (bool, Report) {
        let resolver = self.knot.addr.to_string();
        let port = https_port.to_string();
        let mut args = vec![
            "check",
            "--config",
            self.config.to_str().expect("utf-8"),
            "--resolver",
            &resolver,
            "--ca-file",
            self.ca_bundle.to_str().expect("utf-8"),
            "--https-port",
            &port,
            "--timeout",
            "5s",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        args.push(domain);
        let out = mtasts(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut reports: Vec<Report> = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "check output is not JSON ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(reports.len(), 1);
        (out.status.success(), reports.remove(0))
    }

    /// Spawns a fake policy host; returns its port.
    fn fake_policy_host(&self, host: &str, response: &str) -> u16 {
        let response = response.to_owned();
        let tls = self.test_ca.server_config(host);
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        self.runtime
            .spawn(fake_policy_host(listener, tls, response));
        port
    }

    /// Spawns an MX with a certificate for `cert_host`; returns its port.
    fn fake_mx(&self, cert_host: &str) -> u16 {
        self.fake_mx_with(cert_host, EHLO_REPLY)
    }

    /// Like `fake_mx`, answering EHLO with `ehlo`.
    fn fake_mx_with(&self, cert_host: &str, ehlo: &'static [u8]) -> u16 {
        let tls = self.test_ca.server_config(cert_host);
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        self.runtime.spawn(fake_mx(listener, tls, ehlo));
        port
    }

    /// Serves `body` as the policy of `<label>.example.test` from a fake
    /// policy host; returns its port.
    fn fake_policy(&self, label: &str, body: &str) -> u16 {
        self.fake_policy_host(
            &format!("mta-sts.{label}.example.test"),
            &format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    }

    /// An SMTP listener on 127.0.0.1 that runs `script` on each connection;
    /// returns its port.
    fn raw_smtp<F, Fut>(&self, script: F) -> u16
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        self.runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(script(tcp));
            }
        });
        port
    }

    fn serve_log(&self) -> String {
        self.serve.log()
    }
}

#[derive(Debug, Deserialize)]
struct Report {
    domain: String,
    verdict: String,
    id: Option<String>,
    policy: Option<serde_json::Value>,
    mx: Vec<String>,
    safe_to_enforce: Option<bool>,
    findings: Vec<Finding>,
}

#[derive(Debug, Deserialize)]
struct Finding {
    level: String,
    check: String,
    message: String,
}

impl Report {
    fn has(&self, level: &str, check: &str, text: &str) -> bool {
        self.findings
            .iter()
            .any(|f| f.level == level && f.check == check && f.message.contains(text))
    }
}

#[test]
fn check_finds_each_broken_part() {
    let Some(w) = World::start() else {
        return;
    };
    let started = Instant::now();

    // A correct domain passes, and its id and body match the config.
    let (ok, r) = w.check(&[], "good.example.test");
    assert!(ok, "{r:#?}\n{}", w.serve_log());
    assert_eq!(r.domain, "good.example.test");
    assert_eq!(r.verdict, "OK", "{r:#?}");
    assert_eq!(
        r.id.as_deref(),
        Some(served_id(&w.config, "good.example.test").as_str())
    );
    assert!(r.policy.is_some());
    assert_eq!(r.mx, ["mx.good.example.test"]);
    assert!(r.has("OK", "config", "served body matches"), "{r:#?}");
    assert!(
        r.has("OK", "mx", "mx.good.example.test is covered"),
        "{r:#?}"
    );
    assert!(
        r.has("OK", "tlsrpt", "_smtp._tls.good.example.test"),
        "{r:#?}"
    );

    // Delegated: the TXT and the policy host are reached through CNAMEs;
    // the fetch still uses the customer's name for SNI and Host.
    let (ok, r) = w.check(&[], "deleg.example.test");
    assert!(ok, "{r:#?}");
    assert_eq!(r.verdict, "OK", "{r:#?}");
    assert_eq!(
        r.id.as_deref(),
        Some(served_id(&w.config, "deleg.example.test").as_str())
    );
    assert!(r.has("OK", "config", "served body matches"), "{r:#?}");

    // The DNS id is not the served policy's id.
    let (ok, r) = w.check(&[], "wrongid.example.test");
    assert!(!ok);
    assert_eq!(r.verdict, "FAIL");
    assert!(
        r.has("FAIL", "config", "DNS id 0123456789abcdef is not the id"),
        "{r:#?}"
    );

    // An MX not covered: FAIL in enforce mode, WARN in testing mode.
    let (ok, r) = w.check(&[], "uncovered.example.test");
    assert!(!ok);
    assert!(
        r.has("FAIL", "mx", "mx.elsewhere.example.test is not covered"),
        "{r:#?}"
    );
    let (ok, r) = w.check(&[], "testing.example.test");
    assert!(ok, "a WARN does not fail: {r:#?}");
    assert_eq!(r.verdict, "WARN");
    assert!(
        r.has("WARN", "mx", "mx.elsewhere.example.test is not covered"),
        "{r:#?}"
    );

    // Two STSv1 records.
    let (ok, r) = w.check(&[], "twotxt.example.test");
    assert!(!ok);
    assert!(r.has("FAIL", "txt", "2 v=STSv1 TXT records"), "{r:#?}");
    assert_eq!(r.id, None);
    // Its TLS-RPT record has a rua that is no address.
    assert!(
        r.has("FAIL", "tlsrpt", "is not a mailto: address"),
        "{r:#?}"
    );

    // A policy host that redirects, and one with the wrong content type.
    let port = w.fake_policy_host(
        "mta-sts.redirect.example.test",
        "HTTP/1.1 301 Moved Permanently\r\nLocation: https://example.test/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    let (ok, r) = w.check_port(port, &[], "redirect.example.test");
    assert!(!ok);
    assert!(
        r.has("FAIL", "policy", "senders must not follow redirects"),
        "{r:#?}"
    );
    let port = w.fake_policy_host(
        "mta-sts.ctype.example.test",
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 62\r\nConnection: close\r\n\r\nversion: STSv1\r\nmode: testing\r\nmx: mx.a.test\r\nmax_age: 86400\r\n",
    );
    let (ok, r) = w.check_port(port, &[], "ctype.example.test");
    assert!(!ok);
    assert!(
        r.has("FAIL", "policy", "Content-Type \"text/html\""),
        "{r:#?}"
    );

    // A policy host whose certificate is not trusted: the server's own CA is
    // left out of the roots.
    let (ok, r) = {
        let resolver = w.knot.addr.to_string();
        let port = w.https_port.to_string();
        let only_test_ca = w.dir.path().join("test-ca.pem");
        std::fs::write(&only_test_ca, &w.test_ca.pem).expect("write");
        let out = mtasts(&[
            "check",
            "--resolver",
            &resolver,
            "--ca-file",
            only_test_ca.to_str().expect("utf-8"),
            "--https-port",
            &port,
            "--format",
            "json",
            "good.example.test",
        ]);
        let mut reports: Vec<Report> = serde_json::from_slice(&out.stdout).expect("json");
        (out.status.success(), reports.remove(0))
    };
    assert!(!ok);
    assert!(
        r.has("FAIL", "policy", "TLS with mta-sts.good.example.test"),
        "{r:#?}"
    );

    // Preflight: the MX offers STARTTLS with a certificate for its name.
    let smtp = w.fake_mx("mx.good.example.test").to_string();
    let (ok, r) = w.check(
        &["--preflight-enforce", "--smtp-port", &smtp],
        "good.example.test",
    );
    assert!(ok, "{r:#?}");
    assert_eq!(r.safe_to_enforce, Some(true));
    assert!(
        r.has("OK", "starttls", "mx.good.example.test: STARTTLS"),
        "{r:#?}"
    );
    // TLS reports stored for the domain join the verdict: a clean week
    // is shown; failed sessions make enforce unsafe.
    let day = time::OffsetDateTime::now_utc().date().to_string();
    let report = |id: &str, failed: u32| {
        format!(
            r#"{{"organization-name":"Reporter","report-id":"{id}","date-range":{{"start-datetime":"{day}T00:00:00Z","end-datetime":"{day}T23:59:59Z"}},"policies":[{{"policy":{{"policy-type":"sts","policy-domain":"good.example.test"}},"summary":{{"total-successful-session-count":50,"total-failure-session-count":{failed}}},"failure-details":[{{"result-type":"certificate-expired","receiving-mx-hostname":"mx.good.example.test","failed-session-count":{failed}}}]}}]}}"#
        )
    };
    let ingest = |text: String| {
        let file = w.dir.path().join("report.json");
        std::fs::write(&file, text).expect("report");
        let out = mtasts(&[
            "tlsrpt",
            "ingest",
            "--config",
            w.config.to_str().expect("utf-8"),
            file.to_str().expect("utf-8"),
        ]);
        assert!(out.status.success(), "{:?}", out);
    };
    ingest(report("clean", 0));
    let (ok, r) = w.check(
        &["--preflight-enforce", "--smtp-port", &smtp],
        "good.example.test",
    );
    assert!(ok, "{r:#?}");
    assert_eq!(r.safe_to_enforce, Some(true));
    assert!(
        r.has(
            "OK",
            "reports",
            "last 7 days: 1 report, 50 successful and 0 failed"
        ),
        "{r:#?}"
    );
    ingest(report("failing", 4));
    let (ok, r) = w.check(
        &["--preflight-enforce", "--smtp-port", &smtp],
        "good.example.test",
    );
    assert!(!ok);
    assert_eq!(r.safe_to_enforce, Some(false));
    assert!(
        r.has("FAIL", "reports", "by MX: mx.good.example.test 4"),
        "{r:#?}"
    );
    assert!(r.has("FAIL", "preflight", "do not switch"), "{r:#?}");
    // Without --preflight-enforce the failures are a warning.
    let (_, r) = w.check(&[], "good.example.test");
    assert!(r.has("WARN", "reports", "4 failed"), "{r:#?}");
    // The same MX server for a name its certificate does not cover.
    let (ok, r) = w.check(
        &["--preflight-enforce", "--smtp-port", &smtp],
        "badcert.example.test",
    );
    assert!(!ok);
    assert_eq!(r.safe_to_enforce, Some(false));
    assert!(
        r.has("FAIL", "starttls", "mx.badcert.example.test: TLS"),
        "{r:#?}"
    );
    assert!(r.has("FAIL", "preflight", "do not switch"), "{r:#?}");
    // mode none lists no mx: not ready for enforce, although nothing else fails.
    let (ok, r) = w.check(
        &["--preflight-enforce", "--smtp-port", &smtp],
        "none.example.test",
    );
    assert!(!ok);
    assert_eq!(r.safe_to_enforce, Some(false));
    assert!(r.has("FAIL", "preflight", "lists no mx patterns"), "{r:#?}");
    let (ok, r) = w.check(&[], "none.example.test");
    assert!(ok, "mode none itself is fine: {r:#?}");
    // ... but it is no protection: said, not a plain OK.
    assert_eq!(r.verdict, "WARN", "{r:#?}");
    assert!(r.has("WARN", "policy", "senders apply no policy"), "{r:#?}");
    // Without an MX listening at all.
    let closed = common::free_port().to_string();
    let (ok, r) = w.check(
        &["--preflight-enforce", "--smtp-port", &closed],
        "good.example.test",
    );
    assert!(!ok);
    assert!(r.has("FAIL", "starttls", "connect"), "{r:#?}");
    eprintln!("check scenarios took {:?}", started.elapsed());
}

#[test]
fn check_text_output_and_exit_code() {
    let Some(w) = World::start() else {
        return;
    };
    let resolver = w.knot.addr.to_string();
    let port = w.https_port.to_string();
    let out = mtasts(&[
        "check",
        "--resolver",
        &resolver,
        "--ca-file",
        w.ca_bundle.to_str().expect("utf-8"),
        "--https-port",
        &port,
        "good.example.test",
        "twotxt.example.test",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "one domain fails");
    assert!(text.contains("good.example.test: OK\n"), "{text}");
    assert!(text.contains("twotxt.example.test: FAIL\n"), "{text}");
    assert!(text.contains("  FAIL txt "), "{text}");
}

/// Issue 9 items 19 and 20: records and policies that strict senders
/// (mox, Stalwart, the RFC 8461 grammar) reject must not pass.
#[test]
fn check_parses_as_strictly_as_strict_senders() {
    let Some(w) = World::start() else {
        return;
    };
    // `v=STSv10` is not a v=STSv1 record: the v=STSv1 one is the only one.
    let (ok, r) = w.check(&[], "v10.example.test");
    assert!(ok, "{r:#?}");
    assert_eq!(
        r.id.as_deref(),
        Some(served_id(&w.config, "v10.example.test").as_str())
    );
    assert!(!r.has("FAIL", "txt", "v=STSv1 TXT records"), "{r:#?}");
    // An empty field in the TXT.
    let (ok, r) = w.check(&[], "dblsemi.example.test");
    assert!(!ok);
    assert_eq!(r.id, None, "{r:#?}");
    assert!(r.has("FAIL", "txt", "an empty field"), "{r:#?}");

    let policy = |mx: &str, max_age: &str| {
        format!("version: STSv1\r\nmode: testing\r\nmx: {mx}\r\nmax_age: {max_age}\r\n")
    };
    // Live mx patterns are taken as published: a trailing dot or a U-label
    // is an error, not normalised into a match.
    let port = w.fake_policy("tdot", &policy("mx.good.example.test.", "86400"));
    let (ok, r) = w.check_port(port, &[], "tdot.example.test");
    assert!(!ok, "{r:#?}");
    assert!(r.has("FAIL", "policy", "ends with a dot"), "{r:#?}");
    assert!(!r.has("OK", "mx", "is covered"), "{r:#?}");
    let port = w.fake_policy("ulabel", &policy("mx.bücher.example.test", "86400"));
    let (ok, r) = w.check_port(port, &[], "ulabel.example.test");
    assert!(!ok, "{r:#?}");
    assert!(r.has("FAIL", "policy", "is not ASCII"), "{r:#?}");
    // A blank line; a signed max_age.
    let body = policy("mx.good.example.test", "86400").replacen("\r\n", "\r\n\r\n", 1);
    let port = w.fake_policy("blank", &body);
    let (ok, r) = w.check_port(port, &[], "blank.example.test");
    assert!(!ok, "{r:#?}");
    assert!(r.has("FAIL", "policy", "line 2 is blank"), "{r:#?}");
    let port = w.fake_policy("plus", &policy("mx.good.example.test", "+86400"));
    let (ok, r) = w.check_port(port, &[], "plus.example.test");
    assert!(!ok, "{r:#?}");
    assert!(r.has("FAIL", "policy", "max_age \"+86400\""), "{r:#?}");
    // CRLF throughout, no line end after the last field: valid, no LF warning.
    let body = policy("mx.good.example.test", "86400");
    let port = w.fake_policy("crlfend", body.trim_end());
    let (_, r) = w.check_port(port, &[], "crlfend.example.test");
    assert!(r.policy.is_some(), "{r:#?}");
    assert!(!r.has("WARN", "policy", "LF"), "{r:#?}");
}

/// Issue 9 item 18: a live `mode: none` policy with mx lines is judged on
/// them when asking whether enforce is safe.
#[test]
fn preflight_checks_mx_coverage_under_mode_none() {
    let Some(w) = World::start() else {
        return;
    };
    let port = w.fake_policy(
        "nonemx",
        "version: STSv1\r\nmode: none\r\nmx: mx.other.example.test\r\nmax_age: 86400\r\n",
    );
    let smtp = w.fake_mx("mx.good.example.test").to_string();
    let (ok, r) = w.check_port(
        port,
        &["--preflight-enforce", "--smtp-port", &smtp],
        "nonemx.example.test",
    );
    assert!(!ok, "{r:#?}");
    assert_eq!(r.safe_to_enforce, Some(false), "{r:#?}");
    assert!(
        r.has("FAIL", "mx", "mx.good.example.test is not covered"),
        "{r:#?}"
    );
}

/// Issue 9 item 21: the SMTP reply reader is bounded, a bare final code
/// ends a reply, every failing address is reported, and one domain's check
/// has a deadline.
#[test]
fn check_smtp_probe_is_bounded_and_reports_every_address() {
    let Some(w) = World::start() else {
        return;
    };
    let starttls = |port: u16, extra: &[&str], domain: &str| {
        let port = port.to_string();
        let mut args = vec!["--starttls", "--smtp-port", &port];
        args.extend_from_slice(extra);
        w.check(&args, domain)
    };
    // A greeting line that never ends.
    let endless_line = w.raw_smtp(|mut tcp| async move {
        let _ = tcp.write_all(b"220 ").await;
        let chunk = vec![b'A'; 64 * 1024];
        for _ in 0..1024 {
            if tcp.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let (ok, r) = starttls(endless_line, &[], "good.example.test");
    assert!(!ok);
    assert!(
        r.has("FAIL", "starttls", "an SMTP reply line longer than"),
        "{r:#?}"
    );
    // An EHLO reply that never ends.
    let endless_reply = w.raw_smtp(|tcp| async move {
        let mut s = BufReader::new(tcp);
        let mut line = String::new();
        if s.write_all(b"220 ok\r\n").await.is_err() || s.read_line(&mut line).await.is_err() {
            return;
        }
        let chunk = b"250-PIPELINING\r\n".repeat(4096);
        for _ in 0..1024 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let (ok, r) = starttls(endless_reply, &[], "good.example.test");
    assert!(!ok);
    assert!(
        r.has("FAIL", "starttls", "an SMTP reply longer than"),
        "{r:#?}"
    );
    // `250` alone is the last line of the EHLO reply (RFC 5321 §4.2).
    let bare = w.fake_mx_with(
        "mx.good.example.test",
        b"250-mx.test\r\n250-STARTTLS\r\n250\r\n",
    );
    let (ok, r) = starttls(bare, &[], "good.example.test");
    assert!(ok, "{r:#?}");
    assert!(
        r.has("OK", "starttls", "mx.good.example.test: STARTTLS"),
        "{r:#?}"
    );
    // One MX, two addresses, one of them refusing: both are reported.
    let smtp = w.fake_mx("mx.twoaddr.example.test");
    let (ok, r) = starttls(smtp, &["--preflight-enforce"], "twoaddr.example.test");
    assert!(!ok);
    assert!(
        r.has(
            "FAIL",
            "starttls",
            "mx.twoaddr.example.test: connect 127.0.0.2"
        ),
        "{r:#?}"
    );
    assert!(
        r.has("OK", "starttls", "mx.twoaddr.example.test: STARTTLS"),
        "{r:#?}"
    );
    // An MX that accepts and says nothing: the deadline ends the check
    // before the 5 s network timeout.
    let silent = w.raw_smtp(|tcp| async move {
        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        drop(tcp);
    });
    let (ok, r) = starttls(silent, &["--deadline", "1s"], "good.example.test");
    assert!(!ok);
    assert!(r.has("FAIL", "deadline", "within 1s"), "{r:#?}");
    assert!(r.has("OK", "txt", ""), "earlier findings are kept: {r:#?}");
}

/// Issue 9 item 21: implicit MX, null MX, TLS-RPT record.
#[test]
fn check_handles_implicit_and_null_mx_and_tlsrpt() {
    let Some(w) = World::start() else {
        return;
    };
    let (ok, r) = w.check(&[], "implicit.example.test");
    assert!(ok, "{r:#?}");
    assert_eq!(r.mx, ["implicit.example.test"], "{r:#?}");
    assert!(r.has("OK", "mx", "implicit MX, RFC 5321"), "{r:#?}");
    assert!(
        r.has("OK", "mx", "implicit.example.test is covered"),
        "{r:#?}"
    );
    let (_, r) = w.check(&[], "nullmx.example.test");
    assert!(r.mx.is_empty(), "{r:#?}");
    assert!(r.has("WARN", "mx", "null MX (RFC 7505)"), "{r:#?}");
    let (_, r) = w.check(&[], "testing.example.test");
    assert!(
        r.has("WARN", "tlsrpt", "no v=TLSRPTv1 TXT record"),
        "{r:#?}"
    );
}

/// Issue 9 item 21: without `--ca-file` the platform's store is used, which
/// honours SSL_CERT_FILE (rustls-native-certs), not a fixed Debian path.
#[test]
fn check_trusts_the_platform_store() {
    let Some(w) = World::start() else {
        return;
    };
    let resolver = w.knot.addr.to_string();
    let port = w.https_port.to_string();
    let out = std::process::Command::new(common::bin())
        .env("SSL_CERT_FILE", &w.ca_bundle)
        .env_remove("SSL_CERT_DIR")
        .args([
            "check",
            "--resolver",
            &resolver,
            "--https-port",
            &port,
            "--format",
            "json",
            "good.example.test",
        ])
        .output()
        .expect("run mtasts");
    let reports: Vec<Report> = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        reports[0].has("OK", "policy", "mode enforce"),
        "{:#?}",
        reports[0]
    );
    assert!(out.status.success(), "{:#?}", reports[0]);
}

/// Issue 10: the one stub resolver asks again over TCP when a UDP answer
/// is truncated (the ACME precheck's path).
#[test]
fn resolver_falls_back_to_tcp_on_truncation() {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    use mtasts::resolve::{Protocol, Resolver};
    let Some(w) = World::start() else {
        return;
    };
    // knotd itself truncates this answer over UDP.
    let mut query = Message::query();
    query.add_query(Query::query(
        Name::from_ascii("many.example.test.").expect("name"),
        RecordType::A,
    ));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    socket
        .send_to(&query.to_vec().expect("wire"), w.knot.addr)
        .expect("send");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("answer");
    let answer = Message::from_vec(&buf[..n]).expect("message");
    assert!(answer.metadata.truncation, "knotd did not truncate");

    let resolver = Resolver::new(
        w.knot.addr,
        Protocol::Udp,
        std::time::Duration::from_secs(10),
    );
    let addrs = w
        .runtime
        .block_on(resolver.addresses("many.example.test"))
        .expect("lookup");
    assert_eq!(addrs.len(), 40, "{addrs:?}");
}
