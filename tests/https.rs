//! The real server on loopback ports, spoken to by a real rustls client that
//! trusts only the local CA: bodies, headers, SNI/Host selection, limits,
//! reload and graceful shutdown.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::client::{self, TlsClient};
use common::inproc::InProcess;
use mtasts::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const POLICY_PATH: &str = "/.well-known/mta-sts.txt";

/// The server in this process (`common::inproc`), its directory and a
/// client that trusts its local CA.
struct Running {
    run: InProcess,
    dir: tempfile::TempDir,
    client: TlsClient,
}

impl std::ops::Deref for Running {
    type Target = InProcess;

    fn deref(&self) -> &InProcess {
        &self.run
    }
}

impl Running {
    async fn stop(self) -> std::io::Result<()> {
        self.run.stop_within(Duration::from_secs(20)).await
    }
}

fn config(dir: &Path, body: &str) -> Config {
    let text = format!(
        "[server]\nstate_dir = \"{}\"\n{body}",
        dir.join("state").display()
    );
    Config::from_source(&dir.join("mtasts.toml"), dir, text).expect("valid test config")
}

async fn start(body: &str) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), body);
    let https_l = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
    let http_l = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let run = InProcess::start(cfg, https_l, http_l, None).await;
    let client = TlsClient::trusting_pem_file(run.server.ca_path());
    Running { run, dir, client }
}

fn many_domains(n: usize) -> String {
    let mut s =
        String::from("[defaults]\nmx = [\"mx1.provider.example\", \"*.mx.provider.example\"]\n");
    for i in 0..n {
        let mode = ["testing", "enforce", "none"][i % 3];
        s.push_str(&format!(
            "[[domain]]\nname = \"customer{i}.example\"\nmode = \"{mode}\"\nmax_age = {}\n",
            86_400 + i
        ));
    }
    s
}

#[tokio::test]
async fn serves_exact_policy_bytes_and_headers() {
    let r = start(
        "[[domain]]\nname = \"example.com\"\nmode = \"enforce\"\nmax_age = \"1w\"\nmx = [\"mx2.example.com\", \"MX1.example.com\", \"*.backup.example.com\"]\n",
    )
    .await;
    let resp = r
        .client
        .get_policy(r.https, "example.com")
        .await
        .expect("fetch");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.body,
        b"version: STSv1\r\nmode: enforce\r\nmx: *.backup.example.com\r\nmx: mx1.example.com\r\nmx: mx2.example.com\r\nmax_age: 604800\r\n"
    );
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        resp.header("content-length"),
        Some(resp.body.len().to_string().as_str())
    );
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    assert!(resp.header("location").is_none());
    let etag = resp.header("etag").expect("etag").to_owned();

    let head = r
        .client
        .request(
            r.https,
            "mta-sts.example.com",
            "HEAD",
            "mta-sts.example.com",
            POLICY_PATH,
        )
        .await
        .expect("head");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(resp.body.len().to_string().as_str())
    );
    assert_eq!(head.header("etag"), Some(etag.as_str()));
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn methods_paths_and_hosts() {
    let r = start("[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n").await;
    let sni = "mta-sts.example.com";
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let resp = r
            .client
            .request(r.https, sni, method, sni, POLICY_PATH)
            .await
            .expect("request");
        assert_eq!(resp.status, 405, "{method}");
        assert_eq!(resp.header("allow"), Some("GET, HEAD"));
    }
    for path in ["/", "/.well-known/mta-sts.txt/", "/.well-known/other.txt"] {
        let resp = r
            .client
            .request(r.https, sni, "GET", sni, path)
            .await
            .expect("request");
        assert_eq!(resp.status, 404, "{path}");
    }
    for host in [
        "MTA-STS.Example.COM",
        "mta-sts.example.com.",
        "mta-sts.example.com:443",
    ] {
        let resp = r
            .client
            .request(r.https, sni, "GET", host, POLICY_PATH)
            .await
            .expect("request");
        assert_eq!(resp.status, 200, "Host {host}");
    }
    // SNI of one domain, Host of another: never the other's policy.
    let resp = r
        .client
        .request(r.https, sni, "GET", "mta-sts.other.example", POLICY_PATH)
        .await
        .expect("request");
    assert_eq!(resp.status, 421);
    assert!(!String::from_utf8_lossy(&resp.body).contains("STSv1"));
    r.stop().await.expect("clean stop");
}

/// Regression (issue 9, serving 2): a Host header that is not a valid host
/// (raw bytes, spaces, empty labels, two Host lines) got 200 and the SNI's
/// policy. RFC 9110 §7.2 / RFC 9112 §3.2: 400. A valid Host with a port
/// still works, and an HTTP/1.0 request without Host still gets the SNI's
/// policy.
#[tokio::test]
async fn invalid_host_header_is_a_bad_request() {
    let r = start("[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n").await;
    let sni = "mta-sts.example.com";
    async fn raw(r: &Running, head: &[u8]) -> client::Response {
        let mut tls = r
            .client
            .connect(r.https, "mta-sts.example.com")
            .await
            .expect("connect");
        tls.write_all(head).await.expect("write");
        let mut out = Vec::new();
        match tls.read_to_end(&mut out).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
            Err(e) => panic!("read: {e}"),
        }
        client::parse_response(&out, false)
    }
    for host in [
        &b"\xff\xfe.example"[..],
        b"mta-sts.example.com x",
        b"mta-sts..example.com",
        b".mta-sts.example.com",
        b"mta-sts.example.com:https",
    ] {
        let mut head = format!("GET {POLICY_PATH} HTTP/1.1\r\nHost: ").into_bytes();
        head.extend_from_slice(host);
        head.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let resp = raw(&r, &head).await;
        assert_eq!(resp.status, 400, "Host {}", String::from_utf8_lossy(host));
        assert!(!String::from_utf8_lossy(&resp.body).contains("STSv1"));
    }
    let twice = format!(
        "GET {POLICY_PATH} HTTP/1.1\r\nHost: {sni}\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        raw(&r, twice.as_bytes()).await.status,
        400,
        "two Host lines"
    );
    let resp = r
        .client
        .request(r.https, sni, "GET", "mta-sts.example.com:443", POLICY_PATH)
        .await
        .expect("request");
    assert_eq!(resp.status, 200);
    let old = raw(&r, format!("GET {POLICY_PATH} HTTP/1.0\r\n\r\n").as_bytes()).await;
    assert_eq!(old.status, 200, "HTTP/1.0 without Host: the SNI's policy");
    assert!(old.body.starts_with(b"version: STSv1\r\n"));
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unknown_sni_is_refused_with_unrecognized_name() {
    let r = start("[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n").await;
    let err = r
        .client
        .connect(r.https, "mta-sts.unknown.example")
        .await
        .expect_err("handshake must fail");
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {err:?}"));
    assert_eq!(
        *inner,
        rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName)
    );
    // A client that sends no SNI at all (IP address) is refused the same way.
    let err = r
        .client
        .connect(r.https, "127.0.0.1")
        .await
        .expect_err("no SNI must fail");
    assert!(
        err.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .is_some_and(
                |e| *e == rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName)
            ),
        "{err:?}"
    );
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn many_domains_in_one_process() {
    let n = 60;
    let r = start(&many_domains(n)).await;
    for i in (0..n).step_by(7) {
        let domain = format!("customer{i}.example");
        let resp = r.client.get_policy(r.https, &domain).await.expect("fetch");
        assert_eq!(resp.status, 200, "{domain}");
        let mode = ["testing", "enforce", "none"][i % 3];
        let expected = format!(
            "version: STSv1\r\nmode: {mode}\r\nmx: *.mx.provider.example\r\nmx: mx1.provider.example\r\nmax_age: {}\r\n",
            86_400 + i
        );
        assert_eq!(String::from_utf8_lossy(&resp.body), expected, "{domain}");
        // The certificate presented is the one for this very name.
        let tls = r
            .client
            .connect(r.https, &format!("mta-sts.{domain}"))
            .await
            .expect("handshake");
        let (_, conn) = tls.get_ref();
        let leaf = &conn.peer_certificates().expect("certs")[0];
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("parse");
        let san = cert
            .subject_alternative_name()
            .expect("san ext")
            .expect("san");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, [format!("DNSName(mta-sts.{domain})")]);
    }
    assert_eq!(r.server.snapshot().len(), n);
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn plain_http_hints_and_never_redirects() {
    let r = start("[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n").await;
    let resp = client::http_request(r.http, "GET", "mta-sts.example.com", POLICY_PATH)
        .await
        .expect("http");
    assert_eq!(resp.status, 404);
    assert!(resp.header("location").is_none());
    let text = String::from_utf8_lossy(&resp.body);
    assert!(
        text.contains("https://mta-sts.example.com/.well-known/mta-sts.txt"),
        "{text}"
    );
    assert!(!text.contains("version: STSv1"));
    let resp = client::http_request(r.http, "GET", "mta-sts.unknown.example", POLICY_PATH)
        .await
        .expect("http");
    assert_eq!(resp.status, 404);
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn behind_proxy_serves_policy_over_http() {
    let r = start(
        "behind_proxy = true\n[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n",
    )
    .await;
    let resp = client::http_request(r.http, "GET", "mta-sts.example.com", POLICY_PATH)
        .await
        .expect("http");
    assert_eq!(resp.status, 200);
    assert!(resp.body.starts_with(b"version: STSv1\r\n"));
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reload_adds_and_removes_domains_without_restart() {
    let r = start("[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\n").await;
    assert!(
        r.client
            .connect(r.https, "mta-sts.b.example")
            .await
            .is_err()
    );
    let cfg = config(
        r.dir.path(),
        "[[domain]]\nname = \"b.example\"\nmode = \"enforce\"\nmx = [\"mx.b.example\"]\n",
    );
    let server = Arc::clone(&r.server);
    tokio::task::spawn_blocking(move || server.apply(&cfg))
        .await
        .expect("join")
        .expect("apply");
    let resp = r
        .client
        .get_policy(r.https, "b.example")
        .await
        .expect("new domain");
    assert_eq!(resp.status, 200);
    assert!(String::from_utf8_lossy(&resp.body).contains("mode: enforce"));
    assert!(
        r.client
            .connect(r.https, "mta-sts.a.example")
            .await
            .is_err(),
        "removed domain must no longer complete a handshake"
    );
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn connection_limit_closes_extra_connections() {
    let r = start(
        "max_connections = 2\n[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n",
    )
    .await;
    // Two idle connections hold both slots.
    let _a = TcpStream::connect(r.http).await.expect("a");
    let _b = TcpStream::connect(r.http).await.expect("b");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = TcpStream::connect(r.http)
        .await
        .expect("c connects at TCP level");
    let _ = c
        .write_all(b"GET / HTTP/1.1\r\nHost: mta-sts.example.com\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "third connection must be closed without a response");
    drop((_a, _b));
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let r = start(
        "idle_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n",
    )
    .await;
    // Silent client.
    let mut idle = TcpStream::connect(r.http).await.expect("connect");
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("server closes an idle connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Slowloris: headers started, never finished.
    let mut slow = TcpStream::connect(r.http).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: mta-sts.example.com\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "slow header sender must be cut off");
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn oversized_headers_are_rejected() {
    let r = start("[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n").await;
    let mut tcp = TcpStream::connect(r.http).await.expect("connect");
    let big = "a".repeat(64 * 1024);
    let req =
        format!("GET {POLICY_PATH} HTTP/1.1\r\nHost: mta-sts.example.com\r\nX-Big: {big}\r\n\r\n");
    let _ = tcp.write_all(req.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "expected 431 or a closed connection, got {text:?}"
    );
    assert!(!text.contains("STSv1"));
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn shutdown_lets_in_flight_request_finish() {
    let r = start("[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n").await;
    let mut tls = r
        .client
        .connect(r.https, "mta-sts.example.com")
        .await
        .expect("handshake");
    // Half a request is in flight when shutdown starts.
    tls.write_all(
        format!("GET {POLICY_PATH} HTTP/1.1\r\nHost: mta-sts.example.com\r\n").as_bytes(),
    )
    .await
    .expect("write");
    tls.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let https = r.https;
    let Running { mut run, dir, .. } = r;
    run.begin_stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are no longer accepted...
    assert!(TcpStream::connect(https).await.is_err(), "listener closed");
    // ...but the open request completes.
    tls.write_all(b"\r\n").await.expect("finish request");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw)).await;
    let resp = client::parse_response(&raw, false);
    assert_eq!(resp.status, 200);
    assert!(resp.body.starts_with(b"version: STSv1"));
    run.stop_within(Duration::from_secs(20))
        .await
        .expect("clean stop");
    drop(dir);
}

/// The certificate a handshake for `host` is shown.
async fn served_cert(r: &Running, host: &str) -> Vec<u8> {
    let tls = r.client.connect(r.https, host).await.expect("handshake");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().expect("certs")[0].to_vec()
}

#[tokio::test]
async fn certificates_persist_across_restarts() {
    let body = "[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n";
    let first = start(body).await;
    let cert = served_cert(&first, "mta-sts.example.com").await;
    let stored = first
        .dir
        .path()
        .join("state/self-signed/mta-sts.example.com/cert.pem");
    assert!(stored.exists(), "issued on first use and stored");
    // A second server on the same state directory shows the same certificate.
    let cfg = config(first.dir.path(), body);
    let https_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let second = InProcess::start(cfg, https_l, http_l, None).await;
    let https = second.https;
    let tls = first
        .client
        .connect(https, "mta-sts.example.com")
        .await
        .expect("handshake with the restarted server");
    assert_eq!(
        tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec(),
        cert
    );
    second.stop().await.expect("stop");
    first.stop().await.expect("clean stop");
}

#[tokio::test]
async fn bounded_certificate_cache_reloads_evicted_certificates() {
    let mut body = String::from("cert_cache = 2\n[defaults]\nmx = [\"mx.example.net\"]\n");
    for i in 0..6 {
        body.push_str(&format!("[[domain]]\nname = \"d{i}.example\"\n"));
    }
    let r = start(&body).await;
    let mut first = Vec::new();
    for i in 0..6 {
        first.push(served_cert(&r, &format!("mta-sts.d{i}.example")).await);
    }
    // With room for two, the early ones were evicted; they come back from
    // disk unchanged, and every handshake still succeeds.
    for round in 0..2 {
        for (i, want) in first.iter().enumerate() {
            let again = served_cert(&r, &format!("mta-sts.d{i}.example")).await;
            assert_eq!(&again, want, "round {round}, d{i}");
        }
    }
    let resp = r
        .client
        .get_policy(r.https, "d0.example")
        .await
        .expect("fetch");
    assert_eq!(resp.status, 200);
    r.stop().await.expect("clean stop");
}
