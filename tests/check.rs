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
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const ZONE: &str = "example.test";

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
"#;

fn served_id(config: &Path, domain: &str) -> String {
    let out = mtasts(&[
        "policy",
        "--config",
        config.to_str().expect("utf-8"),
        domain,
    ]);
    assert!(out.status.success());
    Sha256::digest(&out.stdout)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
    response: &'static str,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
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

/// An MX that offers STARTTLS with the given certificate.
async fn fake_mx(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut s = BufReader::new(tcp);
            let mut line = String::new();
            if s.write_all(b"220 mx.test ESMTP\r\n").await.is_err()
                || s.read_line(&mut line).await.is_err()
                || s.write_all(b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                    .await
                    .is_err()
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
    fn fake_policy_host(&self, host: &str, response: &'static str) -> u16 {
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
        let tls = self.test_ca.server_config(cert_host);
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        self.runtime.spawn(fake_mx(listener, tls));
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
