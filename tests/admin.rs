//! The admin API, metrics, file-watch reload and reloads under load, against
//! the real binary.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::ServeProc;
use common::client::{self, TlsClient};

const TOKEN: &str = "0123456789abcdef-test-token";

struct Setup {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http, admin) = (common::loopback(), common::loopback(), common::loopback());
    std::fs::create_dir(dir.path().join("domains.d")).expect("mkdir");
    common::write(dir.path(), "admin.token", &format!("{TOKEN}\n"));
    let config = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "domains_dir = \"domains.d\"\n{}[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n[defaults]\nmx = [\"mx.provider.example\"]\n[[domain]]\nname = \"main.example\"\n",
            common::server_section(https, http, &dir.path().join("state"))
        ),
    );
    Setup {
        dir,
        config,
        https,
        http,
        admin,
    }
}

fn auth() -> [(&'static str, &'static str); 1] {
    [("Authorization", "Bearer 0123456789abcdef-test-token")]
}

async fn api(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> client::Response {
    client::http_call(admin, method, path, &auth(), body)
        .await
        .expect("admin call")
}

fn json(resp: &client::Response) -> serde_json::Value {
    serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&resp.body)))
}

async fn wait_until<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::wait_until(what, Duration::from_secs(20), String::new, f).await;
}

#[tokio::test]
async fn admin_requires_the_token() {
    let s = setup();
    let _proc = ServeProc::start(&s.config, s.https, s.http);
    wait_until("admin listener", || async {
        tokio::net::TcpStream::connect(s.admin).await.is_ok()
    })
    .await;
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-token-wrong-token")],
        vec![("Authorization", "Bearer 0123456789abcdef-test-toke")],
        vec![("Authorization", TOKEN)],
    ] {
        let resp = client::http_call(s.admin, "GET", "/v1/domains", &headers, None)
            .await
            .expect("call");
        assert_eq!(resp.status, 401, "{headers:?}");
        assert_eq!(resp.header("www-authenticate"), Some("Bearer"));
        assert!(json(&resp)["error"].is_string());
    }
    let resp = client::http_call(s.admin, "GET", "/metrics", &[], None)
        .await
        .expect("call");
    assert_eq!(resp.status, 401, "metrics are protected too");
}

#[tokio::test]
async fn health_and_readiness_probes_need_no_token_and_say_nothing_else() {
    let s = setup();
    let _proc = ServeProc::start(&s.config, s.https, s.http);
    wait_until("admin listener", || async {
        tokio::net::TcpStream::connect(s.admin).await.is_ok()
    })
    .await;
    for (path, body) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let resp = client::http_call(s.admin, "GET", path, &[], None)
            .await
            .expect("call");
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.body, body.as_bytes(), "{path}");
        assert_eq!(resp.header("cache-control"), Some("no-store"), "{path}");
    }
    // The store (state_dir) gone: not ready, but alive.
    let state = s.dir.path().join("state");
    let moved = s.dir.path().join("state.away");
    std::fs::rename(&state, &moved).expect("move state_dir away");
    let resp = client::http_call(s.admin, "GET", "/readyz", &[], None)
        .await
        .expect("call");
    assert_eq!(resp.status, 503);
    assert_eq!(resp.body, b"not ready: store unreachable\n");
    let resp = client::http_call(s.admin, "GET", "/healthz", &[], None)
        .await
        .expect("call");
    assert_eq!(resp.status, 200);
    std::fs::rename(&moved, &state).expect("move state_dir back");
    let resp = client::http_call(s.admin, "GET", "/readyz", &[], None)
        .await
        .expect("call");
    assert_eq!(resp.status, 200);
    // Everything else still needs the token.
    for path in ["/readyz/x", "/v1/domains", "/metrics", "/healthzz"] {
        let resp = client::http_call(s.admin, "GET", path, &[], None)
            .await
            .expect("call");
        assert_eq!(resp.status, 401, "{path}");
    }
}

#[tokio::test]
async fn admin_crud_is_persisted_and_validated() {
    let s = setup();
    let mut proc = ServeProc::start(&s.config, s.https, s.http);
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));
    wait_until("admin listener", || async {
        tokio::net::TcpStream::connect(s.admin).await.is_ok()
    })
    .await;

    let list = api(s.admin, "GET", "/v1/domains", None).await;
    assert_eq!(list.status, 200);
    let list = json(&list);
    assert_eq!(list[0]["name"], "main.example");
    assert_eq!(list[0]["managed"], false);
    assert_eq!(list[0]["certificate"]["loaded"], true);

    // Create.
    let resp = api(
        s.admin,
        "PUT",
        "/v1/domains/Customer.Example",
        Some(r#"{"mode": "enforce", "max_age": "2w", "mx": ["mx1.customer.example", "*.mx.customer.example"]}"#),
    )
    .await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    let created = json(&resp);
    assert_eq!(created["name"], "customer.example");
    assert_eq!(created["managed"], true);
    let served = client
        .get_policy(s.https, "customer.example")
        .await
        .expect("new domain served");
    assert_eq!(
        served.body,
        b"version: STSv1\r\nmode: enforce\r\nmx: *.mx.customer.example\r\nmx: mx1.customer.example\r\nmax_age: 1209600\r\n"
    );
    assert_eq!(
        served.header("etag"),
        Some(format!("\"{}\"", created["id"].as_str().expect("id")).as_str())
    );
    assert!(
        s.dir
            .path()
            .join("domains.d/customer.example.toml")
            .exists()
    );

    // Update.
    let resp = api(
        s.admin,
        "PUT",
        "/v1/domains/customer.example",
        Some(r#"{"mode": "testing", "mx": ["mx1.customer.example"]}"#),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_ne!(
        json(&resp)["id"],
        created["id"],
        "a changed policy gets a new id"
    );

    // Invalid: rejected with diagnostics, nothing changes.
    let before = std::fs::read(s.dir.path().join("domains.d/customer.example.toml")).expect("file");
    let resp = api(
        s.admin,
        "PUT",
        "/v1/domains/customer.example",
        Some(r#"{"mode": "strict", "mx": ["mx1.customer.example"]}"#),
    )
    .await;
    assert_eq!(resp.status, 422);
    let err = json(&resp);
    let details = err["details"][0].as_str().expect("detail");
    assert!(
        details.contains("customer.example.toml:") && details.contains("mode \"strict\""),
        "{details}"
    );
    assert_eq!(
        std::fs::read(s.dir.path().join("domains.d/customer.example.toml")).expect("file"),
        before
    );
    let served = client
        .get_policy(s.https, "customer.example")
        .await
        .expect("still served");
    assert!(String::from_utf8_lossy(&served.body).contains("mode: testing"));

    // Retire (RFC 8461 §8.3): mode none without mx, a new id.
    let resp = api(
        s.admin,
        "PUT",
        "/v1/domains/customer.example",
        Some(r#"{"mode": "testing", "mx": ["mx1.customer.example"], "retire": true}"#),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let retired = json(&resp);
    assert_eq!(retired["retire"], true);
    assert_eq!(retired["mode"], "none");
    let served = client
        .get_policy(s.https, "customer.example")
        .await
        .expect("retiring domain served");
    assert_eq!(
        served.body,
        b"version: STSv1\r\nmode: none\r\nmx: mx1.customer.example\r\nmax_age: 604800\r\n",
        "a retiring domain keeps its mx lines (issue 9 item 13)"
    );

    // Bad requests.
    assert_eq!(
        api(
            s.admin,
            "PUT",
            "/v1/domains/customer.example",
            Some(r#"{"colour": "blue"}"#)
        )
        .await
        .status,
        400
    );
    assert_eq!(
        api(s.admin, "PUT", "/v1/domains/not%20a%20domain", Some("{}"))
            .await
            .status,
        400
    );
    let resp = api(
        s.admin,
        "PUT",
        "/v1/domains/main.example",
        Some(r#"{"mode": "none"}"#),
    )
    .await;
    assert_eq!(
        resp.status, 409,
        "domains from other files are not the API's"
    );
    assert_eq!(
        api(s.admin, "DELETE", "/v1/domains/main.example", None)
            .await
            .status,
        409
    );
    assert_eq!(
        api(s.admin, "GET", "/v1/domains/nope.example", None)
            .await
            .status,
        404
    );

    // Restart keeps the API's domain.
    proc.signal("TERM");
    let _ = proc.child.wait();
    drop(proc);
    let proc = ServeProc::start(&s.config, s.https, s.http);
    let served = client
        .get_policy(s.https, "customer.example")
        .await
        .expect("after restart");
    assert_eq!(served.status, 200);

    // Delete.
    wait_until("admin listener", || async {
        tokio::net::TcpStream::connect(s.admin).await.is_ok()
    })
    .await;
    assert_eq!(
        api(s.admin, "DELETE", "/v1/domains/customer.example", None)
            .await
            .status,
        204
    );
    assert!(
        client
            .connect(s.https, "mta-sts.customer.example")
            .await
            .is_err()
    );
    assert!(
        !s.dir
            .path()
            .join("domains.d/customer.example.toml")
            .exists()
    );
    assert_eq!(
        api(s.admin, "DELETE", "/v1/domains/customer.example", None)
            .await
            .status,
        404
    );
    drop(proc);
}

fn metric(text: &str, series: &str) -> f64 {
    common::metric_value(text, series).unwrap_or_else(|| panic!("no {series} in metrics:\n{text}"))
}

#[tokio::test]
async fn metrics_count_requests_handshakes_and_reloads() {
    let s = setup();
    let _proc = ServeProc::start(&s.config, s.https, s.http);
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));
    wait_until("admin listener", || async {
        tokio::net::TcpStream::connect(s.admin).await.is_ok()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            client
                .get_policy(s.https, "main.example")
                .await
                .expect("fetch")
                .status,
            200
        );
    }
    assert!(
        client
            .connect(s.https, "mta-sts.unknown.example")
            .await
            .is_err()
    );
    let _ = client::http_request(s.http, "GET", "mta-sts.unknown.example", "/").await;
    assert_eq!(api(s.admin, "POST", "/v1/reload", None).await.status, 200);

    let resp = api(s.admin, "GET", "/metrics", None).await;
    assert_eq!(resp.status, 200);
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    assert_eq!(
        metric(
            &text,
            "mtasts_http_requests_total{listener=\"https\",outcome=\"policy\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(&text, "mtasts_policy_fetches_total{mode=\"testing\"}"),
        3.0
    );
    assert_eq!(
        metric(&text, "mtasts_tls_handshakes_total{result=\"unknown_sni\"}"),
        1.0
    );
    assert!(
        metric(&text, "mtasts_tls_handshakes_total{result=\"ok\"}") >= 3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "mtasts_http_requests_total{listener=\"http\",outcome=\"unknown_host\"}"
        ),
        1.0
    );
    // Nothing changed: counted, but no new snapshot.
    assert_eq!(
        metric(
            &text,
            "mtasts_reloads_total{trigger=\"admin\",result=\"unchanged\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "mtasts_domains"), 1.0);
    assert_eq!(metric(&text, "mtasts_snapshot_generation"), 1.0);
    let expiry = metric(&text, "mtasts_cert_expiry_soonest_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        expiry > now + 30.0 * 86400.0,
        "self-signed certificates last 90 days"
    );
}

#[tokio::test]
async fn domains_dir_changes_reload_without_signal() {
    let s = setup();
    let _proc = ServeProc::start(&s.config, s.https, s.http);
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));
    common::write(
        &s.dir.path().join("domains.d"),
        "watched.toml",
        "[[domain]]\nname = \"watched.example\"\nmode = \"enforce\"\n",
    );
    wait_until("watched.example served", || async {
        client
            .get_policy(s.https, "watched.example")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    // Regression: the reload reads the watched files, and reads must not
    // count as changes (that reloaded forever, once per second).
    let watch_reloads = || async {
        let resp = api(s.admin, "GET", "/metrics", None).await;
        metric(
            &String::from_utf8_lossy(&resp.body),
            "mtasts_reloads_total{trigger=\"watch\",result=\"ok\"}",
        )
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let settled = watch_reloads().await;
    assert!(settled >= 1.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(watch_reloads().await, settled, "reloads without any change");

    // A broken file is rejected; the rest keeps serving.
    common::write(
        &s.dir.path().join("domains.d"),
        "broken.toml",
        "[[domain]]\nname = \"broken.example\"\nmx = [\"10.0.0.1\"]\n",
    );
    wait_until("broken.toml rejected", || async {
        _proc.log().contains("broken.toml:3:7")
    })
    .await;
    assert_eq!(
        client
            .get_policy(s.https, "watched.example")
            .await
            .expect("still")
            .status,
        200
    );
    assert!(
        client
            .connect(s.https, "mta-sts.broken.example")
            .await
            .is_err()
    );
}

/// Ten reloads in a row while clients fetch policies over new and kept-alive
/// connections: not one request may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_during_reloads() {
    let s = setup();
    let _proc = ServeProc::start(&s.config, s.https, s.http);
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));
    wait_until("admin listener", || async {
        tokio::net::TcpStream::connect(s.admin).await.is_ok()
    })
    .await;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, ok, failed, errors, stop, https) = (
            client.clone(),
            Arc::clone(&ok),
            Arc::clone(&failed),
            Arc::clone(&errors),
            Arc::clone(&stop),
            s.https,
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let what = match client.get_policy(https, "main.example").await {
                    Ok(r) if r.status == 200 && r.body.starts_with(b"version: STSv1") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(r) => format!("status {}: {}", r.status, String::from_utf8_lossy(&r.body)),
                    Err(e) => format!("{:?}: {e}", e.kind()),
                };
                failed.fetch_add(1, Ordering::Relaxed);
                errors.lock().expect("errors").push(what);
            }
        }));
    }
    let domains = s.dir.path().join("domains.d");
    for i in 0..10 {
        // Alternate the triggers; every reload changes the domain set.
        common::write(
            &domains,
            &format!("r{i}.toml"),
            &format!("[[domain]]\nname = \"r{i}.example\"\n"),
        );
        let resp = api(s.admin, "POST", "/v1/reload", None).await;
        assert_eq!(resp.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 40, "too few requests to mean anything: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during reloads: {:?}\nserver log:\n{}",
        ok + failed,
        errors.lock().expect("errors"),
        _proc.log()
    );
    assert_eq!(
        client
            .get_policy(s.https, "r9.example")
            .await
            .expect("last added")
            .status,
        200
    );
}

#[test]
fn admin_needs_listen_and_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = common::write(dir.path(), "m.toml", "[admin]\nlisten = \"127.0.0.1:1\"\n");
    let out = std::process::Command::new(common::bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("m.toml:1:1: [admin] needs `token_file`")
    );
}

/// Starts the binary for `s` and waits for its admin listener.
async fn serve(s: &Setup) -> ServeProc {
    let proc = ServeProc::start(&s.config, s.https, s.http);
    wait_until("admin listener", || async {
        tokio::net::TcpStream::connect(s.admin).await.is_ok()
    })
    .await;
    proc
}

/// Sends a request to the admin API and closes the connection at once,
/// without reading the answer: a client that goes away mid-request.
async fn send_and_hang_up(admin: SocketAddr, method: &str, path: &str, body: &str) {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.expect("send");
    drop(tcp);
}

/// Lines of the server log that report an admin write of `domain`.
fn write_lines(log: &str, domain: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("admin write") && l.contains(&format!("domain={domain} ")))
        .map(str::to_owned)
        .collect()
}

/// Regression (issue 9 item 5): PUT and DELETE replaced or removed the
/// whole `domains_dir/<name>.toml` even when it also held other domains.
#[tokio::test]
async fn admin_leaves_files_holding_other_domains_alone() {
    let s = setup();
    let domains = s.dir.path().join("domains.d");
    let shared = "# by hand\n[[domain]]\nname = \"y.example\"\n\n[[domain]]\nname = \"z.example\"\nmode = \"enforce\"\n";
    common::write(&domains, "y.example.toml", shared);
    common::write(
        &domains,
        "w.example.toml",
        "[[domain]]\nname = \"v.example\"\n[[domain]]\nname = \"W.example\"\n",
    );
    let _proc = serve(&s).await;
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));

    let resp = api(s.admin, "GET", "/v1/domains/y.example", None).await;
    assert_eq!(
        json(&resp)["managed"],
        false,
        "a file shared with z.example"
    );
    let resp = api(
        s.admin,
        "PUT",
        "/v1/domains/y.example",
        Some(r#"{"mode": "enforce"}"#),
    )
    .await;
    assert_eq!(resp.status, 409, "{}", String::from_utf8_lossy(&resp.body));
    let message = json(&resp)["error"].as_str().expect("error").to_owned();
    assert!(
        message.contains("y.example.toml") && message.contains("also holds z.example"),
        "{message}"
    );
    let resp = api(s.admin, "DELETE", "/v1/domains/y.example", None).await;
    assert_eq!(resp.status, 409, "{}", String::from_utf8_lossy(&resp.body));
    let resp = api(s.admin, "DELETE", "/v1/domains/w.example", None).await;
    assert_eq!(resp.status, 409, "{}", String::from_utf8_lossy(&resp.body));
    assert!(
        json(&resp)["error"]
            .as_str()
            .is_some_and(|e| e.contains("also holds v.example"))
    );

    assert_eq!(
        std::fs::read_to_string(domains.join("y.example.toml")).expect("file"),
        shared
    );
    assert!(domains.join("w.example.toml").exists());
    for (domain, mode) in [
        ("y.example", "testing"),
        ("z.example", "enforce"),
        ("v.example", "testing"),
        ("w.example", "testing"),
    ] {
        let served = client
            .get_policy(s.https, domain)
            .await
            .unwrap_or_else(|e| panic!("{domain}: {e}"));
        assert_eq!(served.status, 200, "{domain}");
        assert!(
            String::from_utf8_lossy(&served.body).contains(&format!("mode: {mode}\r\n")),
            "{domain}"
        );
    }

    // A hand edit that puts a second domain into an API file, not yet
    // reloaded (here: rejected as invalid), is not wiped either.
    let resp = api(s.admin, "PUT", "/v1/domains/x.example", Some("{}")).await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    let edited = format!(
        "{}[[domain]]\nname = \"xx.example\"\nmode = \"bogus\"\n",
        std::fs::read_to_string(domains.join("x.example.toml")).expect("file")
    );
    common::write(&domains, "x.example.toml", &edited);
    let resp = api(s.admin, "DELETE", "/v1/domains/x.example", None).await;
    assert_eq!(resp.status, 409, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(
        std::fs::read_to_string(domains.join("x.example.toml")).expect("file"),
        edited
    );
}

/// Makes every reload slow enough to hang up in the middle of one: the main
/// file's `[[domain]]` entries are validated at every reload.
fn slow_reloads(s: &Setup, domains: usize) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&s.config)
        .expect("config");
    for i in 0..domains {
        writeln!(f, "[[domain]]\nname = \"slow{i}.example\"").expect("append");
    }
}

/// Sends a request to the admin API and hangs up as soon as `started` says
/// the server is working on it, without reading the answer.
async fn hang_up_once(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    started: impl Fn() -> bool,
) {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.expect("send");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started() {
        assert!(
            Instant::now() < deadline,
            "the server never started the write"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(tcp);
}

/// Regression (issue 9 item 6): a PUT whose client hung up mid-reload was
/// cut short: applied without a log line and without `Control.config`
/// (so the next reload applied it again), or, when rejected, the bad file
/// was never taken back.
#[tokio::test]
async fn admin_write_finishes_when_the_client_hangs_up() {
    let s = setup();
    slow_reloads(&s, 20_000);
    let proc = serve(&s).await;
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));
    let file = s.dir.path().join("domains.d/gone.example.toml");

    // Hang up once the file is written: the reload has begun.
    hang_up_once(
        s.admin,
        "PUT",
        "/v1/domains/gone.example",
        r#"{"mode": "enforce"}"#,
        || file.exists(),
    )
    .await;
    wait_until("the write logged", || async {
        write_lines(&proc.log(), "gone.example")
            .iter()
            .any(|l| l.contains("admin write applied"))
    })
    .await;
    let served = client
        .get_policy(s.https, "gone.example")
        .await
        .expect("served");
    assert!(String::from_utf8_lossy(&served.body).contains("mode: enforce\r\n"));
    // The applied config was recorded: reloading finds nothing new.
    let resp = api(s.admin, "POST", "/v1/reload", None).await;
    assert_eq!(
        json(&resp)["changed"],
        false,
        "{}\n{}",
        String::from_utf8_lossy(&resp.body),
        proc.log()
    );

    // A rejected write is undone, though nobody waits for the answer.
    let before = std::fs::read(&file).expect("file");
    hang_up_once(
        s.admin,
        "PUT",
        "/v1/domains/gone.example",
        r#"{"mode": "strict"}"#,
        || std::fs::read(&file).is_ok_and(|now| now != before),
    )
    .await;
    wait_until("the rejected write logged", || async {
        write_lines(&proc.log(), "gone.example")
            .iter()
            .any(|l| l.contains("admin write not applied") && l.contains("status=422"))
    })
    .await;
    assert_eq!(std::fs::read(&file).expect("file"), before, "restored");
    let served = client
        .get_policy(s.https, "gone.example")
        .await
        .expect("still served");
    assert!(String::from_utf8_lossy(&served.body).contains("mode: enforce\r\n"));
}

/// Concurrent writes of one domain, half of them by clients that hang up:
/// every write is logged, and what is served at the end is what the last
/// one wrote (the file), never an older write applied late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admin_writes_end_in_the_last_state() {
    let s = setup();
    let proc = serve(&s).await;
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));
    const WRITES: u64 = 12;
    let mut tasks = Vec::new();
    for i in 0..WRITES {
        let admin = s.admin;
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"mode": "enforce", "max_age": {}}}"#, 86_400 + i);
            if i % 2 == 0 {
                send_and_hang_up(admin, "PUT", "/v1/domains/race.example", &body).await;
            } else {
                let status = api(admin, "PUT", "/v1/domains/race.example", Some(&body))
                    .await
                    .status;
                assert!(status == 200 || status == 201, "{status}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    // A request whose client hung up before the server took it is never
    // run (it was not answered either); one the server took is run and
    // logged. Wait until the answered ones are logged and no more come.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = write_lines(&proc.log(), "race.example").len();
        if n == seen && n as u64 >= WRITES / 2 {
            break;
        }
        seen = n;
        assert!(
            Instant::now() < deadline,
            "writes not logged:\n{}",
            proc.log()
        );
    }
    let lines = write_lines(&proc.log(), "race.example");
    assert!(
        lines.iter().all(|l| l.contains("admin write applied")),
        "{lines:#?}"
    );
    // Applied one after the other: each write has a newer snapshot.
    let generations: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.split("generation=").nth(1)?.trim().parse().ok())
        .collect();
    assert_eq!(generations.len(), lines.len(), "{lines:#?}");
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "{generations:?}"
    );
    let file =
        std::fs::read_to_string(s.dir.path().join("domains.d/race.example.toml")).expect("file");
    let max_age: u64 = file
        .lines()
        .find_map(|l| l.strip_prefix("max_age = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no max_age in {file}"));
    let served = client
        .get_policy(s.https, "race.example")
        .await
        .expect("served");
    assert!(
        String::from_utf8_lossy(&served.body).contains(&format!("max_age: {max_age}\r\n")),
        "served {:?}, file {file}",
        String::from_utf8_lossy(&served.body)
    );
    let shown = json(&api(s.admin, "GET", "/v1/domains/race.example", None).await);
    assert_eq!(shown["max_age"], max_age);
    let resp = api(s.admin, "POST", "/v1/reload", None).await;
    assert_eq!(json(&resp)["changed"], false, "the last write was recorded");
}

/// Regression (issue 9 item 10): the longest valid domain (245 characters,
/// a 253-character policy host) got 500 "File name too long" from PUT.
#[tokio::test]
async fn admin_serves_the_longest_domain_name() {
    let s = setup();
    let _proc = serve(&s).await;
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));
    let label = "l".repeat(63);
    let long = format!("{label}.{label}.{label}.{}.example", "m".repeat(45));
    assert_eq!(long.len(), 245);
    assert_eq!(format!("mta-sts.{long}").len(), 253);

    let resp = api(
        s.admin,
        "PUT",
        &format!("/v1/domains/{long}"),
        Some(r#"{"mode": "enforce"}"#),
    )
    .await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(json(&resp)["policy_host"], format!("mta-sts.{long}"));
    let served = client.get_policy(s.https, &long).await.expect("served");
    assert_eq!(served.status, 200);
    assert!(String::from_utf8_lossy(&served.body).contains("mode: enforce\r\n"));
    assert_eq!(
        api(s.admin, "DELETE", &format!("/v1/domains/{long}"), None)
            .await
            .status,
        204
    );
    assert!(
        client
            .connect(s.https, &format!("mta-sts.{long}"))
            .await
            .is_err()
    );

    // One character more has no valid policy host: a clear 400, not a 500.
    let resp = api(
        s.admin,
        "PUT",
        &format!("/v1/domains/m{long}"),
        Some(r#"{"mode": "enforce"}"#),
    )
    .await;
    assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));
}
