//! HTTP/2 against the real listeners (TLS with ALPN h2, and h2c with prior
//! knowledge on the plain listener), spoken by the `h2` crate's client, and
//! the connection budgets: HEAD without DATA frames, PING-only and
//! long-lived connections released, the admin listener's own budget, the
//! per-client cap.

mod common;

use common::inproc::InProcess;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Request, StatusCode};
use common::client;
use mtasts::config::Config;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

const POLICY_PATH: &str = "/.well-known/mta-sts.txt";
const HOST: &str = "mta-sts.example.com";
const DOMAIN: &str = "[[domain]]\nname = \"example.com\"\nmx = [\"mx.example.com\"]\n";

/// The server in this process (`common::inproc`) with its admin listener.
struct Running {
    run: InProcess,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
    tls: TlsConnector,
}

impl std::ops::Deref for Running {
    type Target = InProcess;

    fn deref(&self) -> &InProcess {
        &self.run
    }
}

impl Running {
    async fn stop(self) {
        self.run.stop().await.expect("clean stop");
    }

    /// An HTTP/2 connection over TLS (ALPN h2) with SNI `HOST`.
    async fn h2_tls(&self) -> H2 {
        let tcp = TcpStream::connect(self.https).await.expect("connect https");
        let name = ServerName::try_from(HOST).expect("server name");
        let tls = self.tls.connect(name, tcp).await.expect("TLS handshake");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "server must pick h2"
        );
        H2::handshake(tls, "https").await
    }

    /// An h2c connection (prior knowledge) to the plain listener.
    async fn h2c(&self) -> H2 {
        let tcp = TcpStream::connect(self.http).await.expect("connect http");
        H2::handshake(tcp, "http").await
    }
}

/// The server with one domain, the admin listener on a trivial router (the
/// budget is the listener's, whatever the routes) and `server` lines added.
async fn start(server: &str) -> Running {
    common::init_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nstate_dir = \"{}\"\n{server}\n{DOMAIN}[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\n",
        dir.path().join("state").display()
    );
    let cfg = Config::from_source(&dir.path().join("mtasts.toml"), dir.path(), text)
        .expect("valid test config");
    let https_l = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
    let http_l = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let admin_l = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin = admin_l.local_addr().expect("addr");
    let router = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let run = InProcess::start(cfg, https_l, http_l, Some((admin_l, router))).await;
    let pem = std::fs::read(run.server.ca_path()).expect("read CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("CA PEM")).expect("add root");
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Running {
        run,
        admin,
        _dir: dir,
        tls: TlsConnector::from(Arc::new(config)),
    }
}

/// One client HTTP/2 connection: requests, PINGs, and its driver task,
/// which ends when the server closes the connection.
struct H2 {
    send: h2::client::SendRequest<axum::body::Bytes>,
    ping: Option<h2::PingPong>,
    driver: JoinHandle<Result<(), h2::Error>>,
    scheme: &'static str,
}

/// A response read in full: status, headers and every DATA byte.
struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl H2 {
    async fn handshake<T>(io: T, scheme: &'static str) -> H2
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut conn) = h2::client::handshake(io).await.expect("h2 handshake");
        let ping = conn.ping_pong();
        let driver = tokio::spawn(conn);
        H2 {
            send,
            ping,
            driver,
            scheme,
        }
    }

    /// Sends `method` for the policy path; every frame of the answer must
    /// be valid (a DATA frame on a HEAD stream is a stream error).
    async fn request(&mut self, method: Method) -> Result<Reply, h2::Error> {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}://{HOST}{POLICY_PATH}", self.scheme))
            .body(())
            .expect("request");
        let send = self.send.clone().ready().await?;
        self.send = send;
        let (response, _) = self.send.send_request(req, true)?;
        let (parts, mut recv) = response.await?.into_parts();
        let mut body = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// One PING answered: the server has accepted the connection.
    async fn ping_once(&mut self) {
        let ping = self.ping.as_mut().expect("ping_pong not taken");
        ping.ping(h2::Ping::opaque()).await.expect("PING answered");
    }

    /// Keeps the connection busy with nothing but PING frames, until the
    /// server closes it.
    fn ping_forever(&mut self) -> JoinHandle<usize> {
        let mut ping = self.ping.take().expect("ping_pong taken once");
        tokio::spawn(async move {
            let mut acked = 0;
            while ping.ping(h2::Ping::opaque()).await.is_ok() {
                acked += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            acked
        })
    }

    /// Whether the server has closed the connection, waiting up to `limit`.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, &mut self.driver).await.is_ok()
    }
}

/// A plain HTTP/1.1 GET on `addr` from the loopback address `from`, or the
/// connection being closed without an answer (`None`).
async fn get_from(from: &str, addr: SocketAddr, host: &str, path: &str) -> Option<u16> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("source address"))
        .expect("bind source");
    let mut tcp = socket.connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("answered or closed in time")
        .ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(client::parse_response(&raw, false).status)
}

/// Regression (issue 9, serving 1): HEAD over HTTP/2 carried the body as
/// DATA frames, and curl/nghttp2 and the h2 crate reset the stream with
/// PROTOCOL_ERROR. Now: GET's headers, Content-Length included, no DATA.
#[tokio::test]
async fn head_over_h2_has_get_headers_and_no_body() {
    let r = start("behind_proxy = true").await;
    for mut conn in [r.h2_tls().await, r.h2c().await] {
        let get = conn.request(Method::GET).await.expect("GET over h2");
        assert_eq!(get.status, StatusCode::OK);
        assert!(
            get.body.starts_with(b"version: STSv1\r\n"),
            "{:?}",
            get.body
        );
        let head = conn
            .request(Method::HEAD)
            .await
            .unwrap_or_else(|e| panic!("HEAD over h2 ({}): {e}", conn.scheme));
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.body.is_empty());
        for name in ["content-type", "etag", "cache-control", "content-length"] {
            assert_eq!(
                head.headers.get(name),
                get.headers.get(name),
                "{name} ({})",
                conn.scheme
            );
        }
        assert_eq!(
            head.headers
                .get("content-length")
                .and_then(|v| v.to_str().ok()),
            Some(get.body.len().to_string().as_str())
        );
        // A HEAD answered with an error status has no DATA frames either.
        let req = Request::builder()
            .method(Method::HEAD)
            .uri(format!("{}://{HOST}/nothing-here", conn.scheme))
            .body(())
            .expect("request");
        let (response, _) = conn.send.send_request(req, true).expect("send");
        let (parts, mut recv) = response.await.expect("response").into_parts();
        assert_eq!(parts.status, StatusCode::NOT_FOUND);
        assert!(recv.data().await.is_none(), "no DATA on a HEAD stream");
    }
    r.stop().await;
}

/// Regression (issue 9, serving 3): with `max_connections = 3`, three h2c
/// connections sending only PING frames held every slot forever, and
/// HTTPS and the admin API (same pool) were locked out. Now the admin
/// listener has its own budget, and a connection without requests is
/// closed after `header_read_timeout` / `idle_timeout` whatever frames it
/// sends.
#[tokio::test]
async fn ping_only_h2c_connections_do_not_lock_out_https_or_admin() {
    let r = start("max_connections = 3\nidle_timeout = \"2s\"\nheader_read_timeout = \"1s\"").await;
    let mut pingers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut conn = r.h2c().await;
        // Answered: the server holds the connection in one of its slots.
        conn.ping_once().await;
        pingers.push(conn.ping_forever());
        conns.push(conn);
    }
    // The admin listener answers while the policy listeners are full.
    assert_eq!(
        get_from("127.0.0.1", r.admin, "admin", "/healthz").await,
        Some(200),
        "admin API locked out by policy-listener connections"
    );
    // The PING-only connections are closed, and HTTPS is served again.
    for conn in &mut conns {
        assert!(
            conn.closed_within(Duration::from_secs(30)).await,
            "a PING-only connection stayed open"
        );
    }
    for pinger in pingers {
        let acked = pinger.await.expect("pinger");
        assert!(acked > 0);
    }
    let mut https = r.h2_tls().await;
    let reply = https.request(Method::GET).await.expect("GET after release");
    assert_eq!(reply.status, StatusCode::OK);
    drop(https);
    r.stop().await;
}

/// A silent h2c connection (preface and SETTINGS, then nothing) is closed
/// after `header_read_timeout`, as an HTTP/1.1 one is; before, only the
/// byte-level idle limit applied.
#[tokio::test]
async fn h2c_connection_without_a_request_is_closed_after_header_read_timeout() {
    let r = start("idle_timeout = \"10m\"\nheader_read_timeout = \"1s\"").await;
    let mut conn = r.h2c().await;
    assert!(
        conn.closed_within(Duration::from_secs(30)).await,
        "h2c connection without a request stayed open"
    );
    r.stop().await;
}

/// A busy HTTP/2 connection is closed gracefully (GOAWAY) once it reaches
/// `max_connection_age`; every request on it up to then is answered.
#[tokio::test]
async fn busy_h2_connection_is_closed_at_max_connection_age() {
    let r = start("idle_timeout = \"10m\"\nmax_connection_age = \"2s\"").await;
    let mut conn = r.h2_tls().await;
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !conn.driver.is_finished() && tokio::time::Instant::now() < deadline {
        match conn.request(Method::GET).await {
            Ok(reply) => {
                assert_eq!(reply.status, StatusCode::OK);
                answered += 1;
            }
            // GOAWAY: the client may not start new streams. Any other
            // error is a request cut off by the server, a failure.
            Err(e) if e.is_go_away() || e.reason() == Some(h2::Reason::NO_ERROR) => {}
            Err(e) if conn.driver.is_finished() && e.is_io() => {}
            Err(e) => panic!("request failed before the connection closed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        conn.closed_within(Duration::from_secs(30)).await,
        "busy connection outlived max_connection_age"
    );
    assert!(answered > 0);
    r.stop().await;
}

/// `max_connections_per_ip`: one address cannot hold more; another address
/// still gets in, and a closed connection gives the slot back.
#[tokio::test]
async fn per_client_connection_cap() {
    let r =
        start("max_connections_per_ip = 2\nidle_timeout = \"10m\"\nheader_read_timeout = \"10m\"")
            .await;
    let held: Vec<TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(TcpStream::connect(r.http).await.expect("connect"));
        }
        v
    };
    // Accepted: the server has counted them once it answers on a third.
    let mut refused = false;
    for _ in 0..100 {
        if get_from("127.0.0.1", r.http, HOST, POLICY_PATH)
            .await
            .is_none()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "a third connection from 127.0.0.1 was served");
    assert_eq!(
        get_from("127.0.0.2", r.http, HOST, POLICY_PATH).await,
        Some(404),
        "another client address is not limited by 127.0.0.1's connections"
    );
    drop(held);
    let mut served = false;
    for _ in 0..200 {
        if get_from("127.0.0.1", r.http, HOST, POLICY_PATH)
            .await
            .is_some()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "closed connections did not give their slots back");
    r.stop().await;
}
