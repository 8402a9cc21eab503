//! The dashboard (`/ui/` on the admin listener) in a real headless browser
//! (Debian's `chromium`, driven over the Chrome DevTools Protocol): log in
//! through the form, open the overview and a domain page, assert on the
//! DOM, keep screenshots in `target/ui-screenshots/`. Plus what scripts
//! see: the bearer token, 401 without it, the security headers.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use common::ServeProc;
use common::client::{TlsClient, http_call};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "ui-test-admin-token-0123456789abcdef";

struct Rig {
    dir: tempfile::TempDir,
    _serve: ServeProc,
    admin: SocketAddr,
}

/// A report for `domain` on `day` with `failed` sessions failing on the
/// policy host's certificate.
fn report(domain: &str, day: &str, ok: u32, failed: u32) -> String {
    format!(
        r#"{{"organization-name":"Reporter {day}","report-id":"{domain}-{day}","date-range":{{"start-datetime":"{day}T00:00:00Z","end-datetime":"{day}T23:59:59Z"}},"policies":[{{"policy":{{"policy-type":"sts","policy-domain":"{domain}"}},"summary":{{"total-successful-session-count":{ok},"total-failure-session-count":{failed}}},"failure-details":[{{"result-type":"sts-webpki-invalid","receiving-mx-hostname":"mx.{domain}","failed-session-count":{failed}}}]}}]}}"#
    )
}

fn day(offset: i64) -> String {
    (time::OffsetDateTime::now_utc() - time::Duration::days(offset))
        .date()
        .to_string()
}

impl Rig {
    async fn start() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let (https, http, admin) = (common::loopback(), common::loopback(), common::loopback());
        common::write(dir.path(), "admin.token", TOKEN);
        let mut text = common::server_section(https, http, &dir.path().join("state"));
        text.push_str(&format!(
            "[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n[tlsrpt]\nreceive = true\n[defaults]\nmode = \"testing\"\nmx = [\"mx.example.net\"]\n"
        ));
        for i in 0..150 {
            text.push_str(&format!("[[domain]]\nname = \"customer{i:03}.example\"\n"));
        }
        text.push_str("[[domain]]\nname = \"contoso.example\"\n");
        let config = common::write(dir.path(), "mtasts.toml", &text);
        let serve = ServeProc::start(&config, https, http);
        let client = TlsClient::trusting_pem_file(&dir.path().join("state/ca/ca.pem"));
        // Three days of reports for contoso.example; the middle one failing.
        for (offset, ok, failed) in [(3, 40, 0), (2, 30, 10), (1, 50, 0)] {
            let body = report("contoso.example", &day(offset), ok, failed);
            let resp = client
                .post(
                    serve.https,
                    "mta-sts.contoso.example",
                    "/tlsrpt",
                    "application/tlsrpt+json",
                    body.as_bytes(),
                )
                .await
                .expect("post");
            assert_eq!(resp.status, 200);
        }
        Rig {
            dir,
            _serve: serve,
            admin,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_use_the_bearer_token_and_nothing_else() {
    let rig = Rig::start().await;
    let auth = format!("Bearer {TOKEN}");
    let none = http_call(rig.admin, "GET", "/ui/", &[], None)
        .await
        .expect("call");
    assert_eq!(none.status, 401);
    let wrong = http_call(
        rig.admin,
        "GET",
        "/ui/",
        &[("Authorization", "Bearer nope-nope-nope-nope")],
        None,
    )
    .await
    .expect("call");
    assert_eq!(wrong.status, 401);
    let ok = http_call(
        rig.admin,
        "GET",
        "/ui/?q=contoso",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .expect("call");
    assert_eq!(ok.status, 200);
    let csp = ok.header("content-security-policy").expect("CSP");
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert_eq!(ok.header("x-frame-options"), Some("DENY"));
    let html = String::from_utf8_lossy(&ok.body);
    assert!(html.contains("contoso.example"), "{html}");
    assert!(!html.contains("customer000.example"), "the search filters");
    // A browser without a session is sent to the login form.
    let browser = http_call(rig.admin, "GET", "/ui/", &[("Accept", "text/html")], None)
        .await
        .expect("call");
    assert_eq!(browser.status, 303);
    assert_eq!(browser.header("location"), Some("/ui/login"));
    // A wrong token in the form: 401 and no cookie.
    let form = http_call(
        rig.admin,
        "POST",
        "/ui/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some("token=wrong-token-wrong-token"),
    )
    .await
    .expect("login");
    assert_eq!(form.status, 401);
    assert!(form.header("set-cookie").is_none());
    // Raw reports download with the token.
    let dl = http_call(
        rig.admin,
        "GET",
        "/ui/domain/contoso.example/reports/0",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .expect("download");
    assert_eq!(dl.status, 200);
    assert!(
        dl.header("content-disposition")
            .is_some_and(|d| d.contains("attachment"))
    );
    let report: Value = serde_json::from_slice(&dl.body).expect("the stored report");
    assert_eq!(
        report["policies"][0]["policy"]["policy-domain"],
        "contoso.example"
    );
    drop(rig.dir);
}

/// A Chrome DevTools Protocol session on one page.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).await.expect("send");
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("CDP answer in time")
                .expect("CDP open")
                .expect("CDP message");
            if let Message::Text(text) = msg {
                let v: Value = serde_json::from_str(&text).expect("CDP JSON");
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Waits until the page at `path` has loaded.
    async fn loaded(&mut self, path: &str) {
        self.loaded_at(path, "").await;
    }

    /// Waits until the page at `path` with `query` (`location.search`, ""
    /// for any) has loaded: a form submitted on the same path is told apart
    /// from the page it was submitted on by its query.
    async fn loaded_at(&mut self, path: &str, query: &str) {
        for _ in 0..150 {
            let state = self
                .eval("document.readyState + ' ' + location.pathname + ' ' + location.search")
                .await;
            let state = state.as_str().unwrap_or("");
            if state.starts_with(&format!("complete {path} ")) && state.ends_with(query) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "page {path} did not load: {}",
            self.eval("location.href").await
        );
    }

    async fn screenshot(&mut self, file: &Path) {
        use data_encoding::BASE64;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = BASE64
            .decode(shot["data"].as_str().expect("data").as_bytes())
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(file, png).expect("write screenshot");
    }
}

/// `GET /json/list` of Chromium's DevTools server (which keeps the
/// connection open: read by Content-Length).
async fn devtools_targets(port: u16) -> Value {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("devtools");
    // The page URLs it answers are built from this Host.
    tcp.write_all(format!("GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("devtools answer")
            .expect("read");
        raw.extend_from_slice(&buf[..n]);
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if raw.len() >= split + 4 + len {
                return serde_json::from_slice(&raw[split + 4..split + 4 + len])
                    .expect("targets JSON");
            }
        }
        assert!(n > 0, "devtools closed early");
    }
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|c| common::find_binary(c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logs_in_and_reads_the_dashboard_in_chromium() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is missing and CI=true: scripts/test.sh installs it"
        );
        eprintln!("SKIPPING: chromium is not installed (apt-get install chromium)");
        return;
    };
    let rig = Rig::start().await;
    let profile = tempfile::tempdir().expect("profile");
    let mut child = std::process::Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--window-size=1200,900",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromium");
    // Chromium writes its DevTools port into the profile.
    let port_file = profile.path().join("DevToolsActivePort");
    let mut port = None;
    for _ in 0..300 {
        if let Ok(text) = std::fs::read_to_string(&port_file)
            && let Some(p) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u16>().ok())
        {
            port = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let port = port.expect("chromium's DevTools port");
    let targets = devtools_targets(port).await;
    let page = targets
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["type"] == "page")
        .expect("a page");
    // It names `localhost`, and listens on 127.0.0.1 only.
    let url = page["webSocketDebuggerUrl"]
        .as_str()
        .expect("ws url")
        .replace("ws://localhost:", "ws://127.0.0.1:");
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("CDP connect");
    let mut cdp = Cdp { ws, next: 0 };
    cdp.call("Page.enable", json!({})).await;
    let base = format!("http://localhost:{}", rig.admin.port());

    // Not logged in: the overview sends the browser to the login form.
    cdp.call("Page.navigate", json!({"url": format!("{base}/ui/")}))
        .await;
    cdp.loaded("/ui/login").await;
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../ui-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    cdp.screenshot(&shots.join("login.png")).await;
    cdp.eval(&format!(
        "document.querySelector('#token').value = '{TOKEN}'; document.querySelector('#login').submit(); true"
    ))
    .await;
    cdp.loaded("/ui/").await;
    // The session cookie is not readable by scripts (HttpOnly).
    assert_eq!(cdp.eval("document.cookie").await, json!(""));
    let rows = cdp
        .eval("document.querySelectorAll('#domains tr.domain').length")
        .await;
    assert_eq!(rows, json!(100), "paged: 100 of 151 domains");
    let totals = cdp
        .eval("document.querySelector('#totals').textContent")
        .await;
    assert!(
        totals
            .as_str()
            .is_some_and(|t| t.starts_with("151 domains served")),
        "{totals}"
    );
    // Search, then the domain with reports is listed with its alert.
    cdp.eval("document.querySelector('input[name=q]').value = 'contoso'; document.querySelector('form.search').submit(); true")
        .await;
    cdp.loaded_at("/ui/", "?q=contoso").await;
    let listed = cdp
        .eval("[...document.querySelectorAll('#domains tr.domain td:first-child')].map(td => td.textContent)")
        .await;
    assert_eq!(listed, json!(["contoso.example"]));
    let alert_row = cdp
        .eval("document.querySelector('#domains tr.domain').classList.contains('alert')")
        .await;
    assert_eq!(alert_row, json!(true));
    cdp.screenshot(&shots.join("overview.png")).await;

    // The domain page: one bar per reported day, the failing day's red part.
    cdp.eval("document.querySelector('#domains a').click(); true")
        .await;
    cdp.loaded("/ui/domain/contoso.example").await;
    let bars = cdp
        .eval("document.querySelectorAll('#chart g.day').length")
        .await;
    assert_eq!(bars, json!(3));
    let failed = cdp
        .eval("[...document.querySelectorAll('#chart g.day')].map(g => [g.dataset.date, Number(g.dataset.failed), g.querySelector('rect.failed').getBBox().height > 0])")
        .await;
    assert_eq!(
        failed,
        json!([[day(3), 0, false], [day(2), 10, true], [day(1), 0, false]])
    );
    let by_result = cdp
        .eval("document.querySelector('#by-result tbody').textContent")
        .await;
    assert!(
        by_result
            .as_str()
            .is_some_and(|t| t.contains("sts-webpki-invalid") && t.contains("10")),
        "{by_result}"
    );
    let orgs = cdp
        .eval("document.querySelectorAll('#by-organization tbody tr').length")
        .await;
    assert_eq!(orgs, json!(3));
    let raw = cdp
        .eval("document.querySelectorAll('#raw-reports a[download]').length")
        .await;
    assert_eq!(raw, json!(3));
    // The stylesheet loaded under the CSP (a blocked one leaves no rules).
    let styled = cdp
        .eval("document.styleSheets.length > 0 && document.styleSheets[0].cssRules.length > 0")
        .await;
    assert_eq!(styled, json!(true));
    cdp.screenshot(&shots.join("domain.png")).await;

    // Log out: the session is gone.
    cdp.eval("document.querySelector('form.logout').submit(); true")
        .await;
    cdp.loaded("/ui/login").await;
    cdp.call("Page.navigate", json!({"url": format!("{base}/ui/")}))
        .await;
    cdp.loaded("/ui/login").await;
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("screenshots in {}", shots.display());
}
