//! Incremental reloads against the real binary: many domains in
//! `domains_dir` (one file per domain, as the admin API writes them, plus a
//! big file), one of them changed, broken or duplicated; reloads that find
//! nothing changed; a SIGHUP and a file-watch event for the same change.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::ServeProc;
use common::client::{self, TlsClient};

const TOKEN: &str = "reload-test-token-0123456789";
/// Domains in files of their own (`s<i>.example`).
const SINGLE: usize = 200;
/// Domains in one big file (`b<i>.example`).
const BIG: usize = 300;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    domains: PathBuf,
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http, admin) = (common::loopback(), common::loopback(), common::loopback());
    let domains = dir.path().join("domains.d");
    std::fs::create_dir(&domains).expect("mkdir");
    common::write(dir.path(), "admin.token", &format!("{TOKEN}\n"));
    let config = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "domains_dir = \"domains.d\"\n{}[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n[defaults]\nmode = \"enforce\"\nmx = [\"mx.provider.example\"]\n",
            common::server_section(https, http, &dir.path().join("state"))
        ),
    );
    for i in 0..SINGLE {
        common::write(
            &domains,
            &format!("s{i}.example.toml"),
            &format!("[[domain]]\nname = \"s{i}.example\"\n"),
        );
    }
    let big: String = (0..BIG)
        .map(|i| format!("[[domain]]\nname = \"b{i}.example\"\n\n"))
        .collect();
    common::write(&domains, "big.toml", &big);
    Setup {
        dir,
        config,
        domains,
        https,
        http,
        admin,
    }
}

impl Setup {
    fn start(&self) -> (ServeProc, TlsClient) {
        let proc = ServeProc::start_with(
            &self.config,
            self.https,
            self.http,
            &["--log-format", "json"],
        );
        let client = TlsClient::trusting_pem_file(&self.dir.path().join("state/ca/ca.pem"));
        (proc, client)
    }

    async fn metrics(&self) -> String {
        common::admin_metrics(self.admin, TOKEN).await
    }
}

/// A series' value, 0 when it was never counted.
fn metric(text: &str, series: &str) -> f64 {
    common::metric_value(text, series).unwrap_or(0.0)
}

fn reloads(text: &str, trigger: &str, result: &str) -> f64 {
    metric(
        text,
        &format!("mtasts_reloads_total{{trigger=\"{trigger}\",result=\"{result}\"}}"),
    )
}

async fn wait_until<F, Fut>(what: &str, proc: &ServeProc, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::wait_until(what, Duration::from_secs(30), || proc.log(), f).await;
}

async fn etag(client: &TlsClient, https: SocketAddr, domain: &str) -> String {
    let resp = client.get_policy(https, domain).await.expect(domain);
    assert_eq!(resp.status, 200, "{domain}");
    resp.header("etag").expect("etag").to_owned()
}

fn rewrite(path: &Path, text: &str) {
    std::fs::write(path, text).expect("rewrite");
}

#[tokio::test]
async fn changing_one_domain_keeps_the_others() {
    let s = setup();
    let (proc, client) = s.start();
    let s7 = etag(&client, s.https, "s7.example").await;
    let s8 = etag(&client, s.https, "s8.example").await;
    let b5 = etag(&client, s.https, "b5.example").await;

    rewrite(
        &s.domains.join("s7.example.toml"),
        "[[domain]]\nname = \"s7.example\"\nmode = \"testing\"\n",
    );
    proc.signal("HUP");
    wait_until("s7.example in testing", &proc, || async {
        client
            .get_policy(s.https, "s7.example")
            .await
            .is_ok_and(|r| String::from_utf8_lossy(&r.body).contains("mode: testing"))
    })
    .await;
    assert_ne!(etag(&client, s.https, "s7.example").await, s7, "new id");
    assert_eq!(etag(&client, s.https, "s8.example").await, s8, "same id");
    assert_eq!(etag(&client, s.https, "b5.example").await, b5, "same id");
    // Only the changed file was parsed again.
    assert!(
        proc.log().contains("\"files_parsed\":1,"),
        "not an incremental reload:\n{}",
        proc.log()
    );
    let m = s.metrics().await;
    assert_eq!(metric(&m, "mtasts_domains"), (SINGLE + BIG) as f64);

    // A change inside the big file: its domains are validated again, and
    // the unchanged ones keep their ids.
    let big: String = (0..BIG)
        .map(|i| {
            let extra = if i == 5 { "mode = \"none\"\n" } else { "" };
            format!("[[domain]]\nname = \"b{i}.example\"\n{extra}\n")
        })
        .collect();
    rewrite(&s.domains.join("big.toml"), &big);
    proc.signal("HUP");
    wait_until("b5.example in none", &proc, || async {
        client
            .get_policy(s.https, "b5.example")
            .await
            .is_ok_and(|r| String::from_utf8_lossy(&r.body).contains("mode: none"))
    })
    .await;
    assert_ne!(etag(&client, s.https, "b5.example").await, b5);
    assert_eq!(etag(&client, s.https, "s8.example").await, s8);
}

#[tokio::test]
async fn a_broken_file_among_many_is_rejected_and_the_rest_keeps_serving() {
    let s = setup();
    let (proc, client) = s.start();
    let generation = metric(&s.metrics().await, "mtasts_snapshot_generation");
    let s3 = etag(&client, s.https, "s3.example").await;

    // One file broken, another valid change in the same reload: nothing of
    // it is applied.
    rewrite(
        &s.domains.join("s3.example.toml"),
        "[[domain]]\nname = \"s3.example\"\nmode = \"none\"\n",
    );
    common::write(
        &s.domains,
        "broken.toml",
        "[[domain]]\nname = \"broken.example\"\nmx = [\"10.0.0.1\"]\n",
    );
    proc.signal("HUP");
    wait_until("the rejection", &proc, || async {
        reloads(&s.metrics().await, "sighup", "error") >= 1.0
    })
    .await;
    let log = proc.log();
    assert!(log.contains("reload rejected"), "{log}");
    assert!(log.contains("broken.toml:3:7: mx:"), "{log}");
    assert_eq!(etag(&client, s.https, "s3.example").await, s3, "old policy");
    assert!(
        client
            .connect(s.https, "mta-sts.broken.example")
            .await
            .is_err()
    );
    let m = s.metrics().await;
    assert_eq!(metric(&m, "mtasts_snapshot_generation"), generation);

    // Fixed: both changes are applied.
    rewrite(
        &s.domains.join("broken.toml"),
        "[[domain]]\nname = \"broken.example\"\nmx = [\"mx.broken.example\"]\n",
    );
    proc.signal("HUP");
    wait_until("broken.example served", &proc, || async {
        client
            .get_policy(s.https, "broken.example")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert_ne!(etag(&client, s.https, "s3.example").await, s3, "new policy");
}

#[tokio::test]
async fn duplicates_across_an_unchanged_and_a_changed_file_are_reported() {
    let s = setup();
    let (proc, client) = s.start();
    let sighup_errors = || async { reloads(&s.metrics().await, "sighup", "error") };

    // A new file that sorts after the unchanged s42.example.toml.
    common::write(
        &s.domains,
        "zz.toml",
        "[[domain]]\nname = \"zz.example\"\n\n[[domain]]\nname = \"S42.example\"\n",
    );
    proc.signal("HUP");
    wait_until("the first rejection", &proc, || async {
        sighup_errors().await >= 1.0
    })
    .await;
    let first = s.domains.join("s42.example.toml");
    let expected = format!(
        "zz.toml:5:8: duplicate domain s42.example (first defined at {}:2:8)",
        first.display()
    );
    assert!(proc.log().contains(&expected), "{}", proc.log());

    // A changed file that sorts before the unchanged big.toml: the entry in
    // big.toml is now the duplicate.
    std::fs::remove_file(s.domains.join("zz.toml")).expect("rm");
    common::write(
        &s.domains,
        "a-first.toml",
        "[[domain]]\nname = \"b9.example\"\n",
    );
    proc.signal("HUP");
    wait_until("the second rejection", &proc, || async {
        sighup_errors().await >= 2.0
    })
    .await;
    let expected = format!(
        "big.toml:29:8: duplicate domain b9.example (first defined at {}:2:8)",
        s.domains.join("a-first.toml").display()
    );
    assert!(proc.log().contains(&expected), "{}", proc.log());
    assert_eq!(
        client
            .get_policy(s.https, "b9.example")
            .await
            .expect("b9")
            .status,
        200,
        "still served"
    );
}

#[tokio::test]
async fn a_reload_without_changes_keeps_the_generation() {
    let s = setup();
    let (proc, client) = s.start();
    let m = s.metrics().await;
    assert_eq!(metric(&m, "mtasts_snapshot_generation"), 1.0);
    let s1 = etag(&client, s.https, "s1.example").await;

    proc.signal("HUP");
    wait_until("the unchanged reload", &proc, || async {
        reloads(&s.metrics().await, "sighup", "unchanged") >= 1.0
    })
    .await;
    // Touched, same content: still nothing to apply.
    let file = s.domains.join("s1.example.toml");
    let text = std::fs::read_to_string(&file).expect("read");
    rewrite(&file, &text);
    let resp = client::http_call(
        s.admin,
        "POST",
        "/v1/reload",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        None,
    )
    .await
    .expect("admin reload");
    assert_eq!(resp.status, 200);
    let m = s.metrics().await;
    assert_eq!(reloads(&m, "admin", "unchanged"), 1.0, "{m}");
    assert_eq!(
        reloads(&m, "sighup", "ok") + reloads(&m, "admin", "ok"),
        0.0
    );
    assert_eq!(metric(&m, "mtasts_snapshot_generation"), 1.0, "{m}");
    assert_eq!(etag(&client, s.https, "s1.example").await, s1);
}

/// A SIGHUP sent right after a change, and the file-watch event of the
/// same change, apply it once.
#[tokio::test]
async fn a_sighup_and_a_watch_event_for_one_change_reload_once() {
    let s = setup();
    let (proc, client) = s.start();
    common::write(
        &s.domains,
        "new.example.toml",
        "[[domain]]\nname = \"new.example\"\n",
    );
    proc.signal("HUP");
    wait_until("new.example served", &proc, || async {
        client
            .get_policy(s.https, "new.example")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    // Let the watcher's debounce (300 ms) run out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = s.metrics().await;
    assert_eq!(
        reloads(&m, "sighup", "ok") + reloads(&m, "watch", "ok"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "mtasts_snapshot_generation"), 2.0, "{m}");
    let _ = &s.http;
}

/// A file written the moment the server's ports answer (before its file
/// watch may be in place) is still picked up: the watch looks once when it
/// starts.
#[tokio::test]
async fn change_made_while_starting_is_picked_up() {
    let s = setup();
    let proc = ServeProc::start_at_first_accept(&s.config, s.https, s.http);
    common::write(
        &s.domains,
        "early.toml",
        "[[domain]]\nname = \"early.example\"\n",
    );
    let client = TlsClient::trusting_pem_file(&s.dir.path().join("state/ca/ca.pem"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get_policy(s.https, "early.example").await
            && r.status == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "early.example never served: {}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
