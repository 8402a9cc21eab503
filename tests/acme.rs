//! ACME mode against a real ACME server: pebble validates HTTP-01 and
//! TLS-ALPN-01 by connecting to our real listeners, and a rustls client
//! that trusts only pebble's root fetches the policy. No validation is
//! skipped (never PEBBLE_VA_ALWAYS_VALID).

mod common;

use common::inproc::InProcess;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pebble::{self, Pebble, https_get, serial};
use mtasts::config::Config;
use tokio::net::TcpListener;

const POLICY: &str = "/.well-known/mta-sts.txt";

fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mtasts=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Our two listeners, bound first so pebble can be pointed at their ports.
struct Listeners {
    https: TcpListener,
    http: TcpListener,
}

impl Listeners {
    async fn bind() -> Listeners {
        Listeners {
            https: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            http: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        }
    }

    /// The same ports again, after a stopped server released them.
    async fn rebind(http_port: u16, tls_port: u16) -> Listeners {
        Listeners {
            https: TcpListener::bind(("127.0.0.1", tls_port))
                .await
                .expect("rebind https"),
            http: TcpListener::bind(("127.0.0.1", http_port))
                .await
                .expect("rebind http"),
        }
    }

    fn ports(&self) -> (u16, u16) {
        let port = |l: &TcpListener| l.local_addr().expect("addr").port();
        (port(&self.http), port(&self.https))
    }
}

/// Writes an ACME-mode config for `domains` and loads it.
fn config(
    dir: &Path,
    pebble_dir: &str,
    ca_roots: &Path,
    tls_extra: &str,
    domains: &[String],
) -> (PathBuf, Config) {
    let mut text = format!(
        r#"[server]
https = "127.0.0.1:1"
http = "127.0.0.1:2"
state_dir = "{state}"

[tls]
mode = "acme"
directory = "{pebble_dir}"
ca_roots = "{roots}"
contact = "hostmaster@example.com"
retry_initial = "1s"
retry_max = "3s"
{tls_extra}

[defaults]
mode = "testing"
mx = ["mx.example.net"]
"#,
        state = dir.join("state").display(),
        roots = ca_roots.display(),
    );
    if !tls_extra.contains("precheck_dns") {
        // Test names do not resolve through the system resolver.
        text = text.replacen("[defaults]", "precheck_dns = false\n\n[defaults]", 1);
    }
    for d in domains {
        text.push_str(&format!("\n[[domain]]\nname = \"{d}\"\n"));
    }
    let path = dir.join("mtasts.toml");
    std::fs::write(&path, text).expect("write config");
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    (path, cfg)
}

/// A server running in this process until `stop` (`common::inproc`).
struct Running {
    run: InProcess,
}

impl std::ops::Deref for Running {
    type Target = InProcess;

    fn deref(&self) -> &InProcess {
        &self.run
    }
}

impl Running {
    async fn start(cfg: &Config, listeners: Listeners) -> Running {
        let run = InProcess::start(cfg.clone(), listeners.https, listeners.http, None).await;
        Running { run }
    }

    /// Stops the server; it must end cleanly (an order in flight is
    /// abandoned at shutdown, so this is bounded generously).
    async fn stop(self) {
        self.run
            .stop_within(Duration::from_secs(120))
            .await
            .expect("the server ran and stopped cleanly");
    }

    /// Waits until every host has a certificate in the SNI index.
    async fn wait_issued(&self, hosts: &[String], within: Duration, pebble: &Pebble) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if hosts.iter().all(|h| self.server.certs().contains(h)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let missing: Vec<&String> = hosts
            .iter()
            .filter(|h| !self.server.certs().contains(h))
            .collect();
        panic!(
            "no certificate within {within:?} for {missing:?}; progress {:?}\npebble log tail:\n{}",
            self.server.acme_progress(),
            tail(&pebble.log(), 40)
        );
    }

    async fn policy(&self, host: &str, root: &[u8]) -> pebble::Response {
        https_get(self.https, host, POLICY, root, &[b"http/1.1"])
            .await
            .unwrap_or_else(|e| panic!("GET https://{host}{POLICY}: {e}"))
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn policy_hosts(domains: &[String]) -> Vec<String> {
    domains.iter().map(|d| format!("mta-sts.{d}")).collect()
}

fn state_json(dir: &Path, host: &str) -> serde_json::Value {
    let path = dir.join(format!("state/acme/state/{host}.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("state file")).expect("state json")
}

fn cert_file(dir: &Path, host: &str) -> PathBuf {
    dir.join(format!("state/acme/certs/{host}.pem"))
}

/// Runs `mtasts certs --format json` (the real binary).
fn certs_json(config: &Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtasts"))
        .args(["certs", "--format", "json", "--config"])
        .arg(config)
        .output()
        .expect("run mtasts certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("certs json")
}

/// What most tests start with: our listeners bound, pebble validating
/// against them (certificates valid `validity` seconds, 0 for pebble's
/// default) and a fresh state directory. None only when pebble is missing
/// outside CI (`Pebble::start` fails the test under `CI=true`).
async fn setup(validity: u64) -> Option<(Listeners, Pebble, tempfile::TempDir)> {
    init();
    let listeners = Listeners::bind().await;
    let (http_port, tls_port) = listeners.ports();
    let pebble = Pebble::start(http_port, tls_port, validity)?;
    let dir = tempfile::tempdir().expect("tempdir");
    Some((listeners, pebble, dir))
}

async fn issue_and_fetch(challenge: &str) {
    let Some((listeners, pebble, dir)) = setup(0).await else {
        return;
    };
    let domains = vec!["a.example.com".to_owned(), "b.example.org".to_owned()];
    let (path, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        &format!("challenge = \"{challenge}\""),
        &domains,
    );
    let started = Instant::now();
    let running = Running::start(&cfg, listeners).await;
    let hosts = policy_hosts(&domains);
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    eprintln!(
        "{challenge}: {} certificates in {:?}",
        hosts.len(),
        started.elapsed()
    );

    let root = pebble.root().await;
    for host in &hosts {
        let resp = running.policy(host, &root).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert!(resp.body.starts_with("version: STSv1\r\n"), "{}", resp.body);
        let state = state_json(dir.path(), host);
        assert_eq!(state["last_challenge"], challenge, "{state}");
        assert_eq!(state["failures"], 0, "{state}");
    }
    // Only pebble's root verifies it: our listener shows the ACME chain.
    assert_eq!(pebble.orders(), hosts.len(), "one order per domain");

    let report = certs_json(&path);
    assert_eq!(report["valid"], 2, "{report}");
    for row in report["hosts"].as_array().expect("hosts") {
        assert_eq!(row["state"], "valid", "{row}");
        assert!(
            row["issuer"].as_str().is_some_and(|i| i.contains("Pebble")),
            "{row}"
        );
        assert!(row["next_renewal"].is_string(), "{row}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issuance_then_policy_over_https() {
    issue_and_fetch("http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issuance_then_policy_over_https() {
    issue_and_fetch("tls-alpn-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reuses_stored_certificate_and_new_domain_needs_no_restart() {
    let Some((listeners, pebble, dir)) = setup(0).await else {
        return;
    };
    let (http_port, tls_port) = listeners.ports();
    let domains = vec!["a.example.com".to_owned()];
    let (_, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "",
        &domains,
    );
    let hosts = policy_hosts(&domains);
    let running = Running::start(&cfg, listeners).await;
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    let root = pebble.root().await;
    let first = running.policy(&hosts[0], &root).await;
    let file_before = std::fs::read(cert_file(dir.path(), &hosts[0])).expect("cert file");
    let state_before = state_json(dir.path(), &hosts[0]);
    running.stop().await;
    let orders_before = pebble.orders();

    // Restart on the same ports (pebble validates there).
    let listeners = Listeners::rebind(http_port, tls_port).await;
    let running = Running::start(&cfg, listeners).await;
    // The very first connection gets the stored certificate.
    let again = running.policy(&hosts[0], &root).await;
    assert_eq!(
        serial(&again.chain[0]),
        serial(&first.chain[0]),
        "same certificate after restart"
    );

    // A new domain: no certificate yet → the handshake fails cleanly
    // (unrecognized_name, never another domain's certificate)...
    let mut more = domains.clone();
    more.push("new.example.net".to_owned());
    let more_hosts = policy_hosts(&more);
    let (_, cfg2) = config(dir.path(), &pebble.directory, &pebble.ca_roots, "", &more);
    running.server.apply(&cfg2).expect("apply");
    let early = https_get(running.https, &more_hosts[1], POLICY, &root, &[]).await;
    let err = early.expect_err("no certificate yet");
    assert!(err.contains("handshake"), "{err}");
    // ...and it is served as soon as its certificate lands, without a restart.
    running
        .wait_issued(&more_hosts, Duration::from_secs(60), &pebble)
        .await;
    let resp = running.policy(&more_hosts[1], &root).await;
    assert_eq!(resp.status, 200);

    assert_eq!(
        pebble.orders(),
        orders_before + 1,
        "only the new domain was ordered"
    );
    assert_eq!(
        std::fs::read(cert_file(dir.path(), &hosts[0])).expect("cert"),
        file_before
    );
    assert_eq!(
        state_json(dir.path(), &hosts[0])["last_order_at"],
        state_before["last_order_at"]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_renewal_window_renews_and_serves_new_certificate() {
    // One-hour certificates renewed with 3594 s left: six seconds after issue.
    let Some((listeners, pebble, dir)) = setup(3600).await else {
        return;
    };
    let domains = vec!["renew.example.com".to_owned()];
    let (_, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "renew_before = \"3594s\"",
        &domains,
    );
    let hosts = policy_hosts(&domains);
    let running = Running::start(&cfg, listeners).await;
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    let root = pebble.root().await;
    let first = serial(&running.policy(&hosts[0], &root).await.chain[0]);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let now = serial(&running.policy(&hosts[0], &root).await.chain[0]);
        if now != first {
            break;
        }
        assert!(Instant::now() < deadline, "not renewed within 40 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(pebble.orders() >= 2);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_backs_off_keeps_serving_and_recovers() {
    let Some((listeners, mut pebble, dir)) = setup(3600).await else {
        return;
    };
    let domains = vec!["down.example.com".to_owned()];
    let (path, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "renew_before = \"3594s\"",
        &domains,
    );
    let hosts = policy_hosts(&domains);
    let running = Running::start(&cfg, listeners).await;
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    let root1 = pebble.root().await;
    let first = serial(&running.policy(&hosts[0], &root1).await.chain[0]);

    pebble.pause();
    // Renewal is due after ~6 s; wait for two failed attempts (backoff 1-3 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let state = state_json(dir.path(), &hosts[0]);
        if state["failures"].as_u64().unwrap_or(0) >= 2 {
            assert!(state["next_attempt"].is_i64(), "{state}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed renewal recorded: {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The current certificate keeps being served, and the failure is visible.
    let still = running.policy(&hosts[0], &root1).await;
    assert_eq!(serial(&still.chain[0]), first);
    let report = certs_json(&path);
    let row = &report["hosts"][0];
    assert_eq!(row["state"], "renewal-failing", "{row}");
    assert!(
        row["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{row}"
    );

    // pebble returns (new root, no memory of our account): we re-register
    // and renew.
    pebble.resume();
    let root2 = pebble.root().await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Ok(resp) = https_get(running.https, &hosts[0], POLICY, &root2, &[]).await {
            assert_eq!(resp.status, 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal after pebble came back; state {}\n{}",
            state_json(dir.path(), &hosts[0]),
            tail(&pebble.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(state_json(dir.path(), &hosts[0])["failures"], 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_domains_with_bounded_concurrency() {
    const N: usize = 200;
    const MAX: usize = 6;
    let Some((listeners, pebble, dir)) = setup(0).await else {
        return;
    };
    let domains: Vec<String> = (0..N).map(|i| format!("d{i:03}.example.com")).collect();
    let (path, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        &format!("max_concurrent_orders = {MAX}\norders_per_hour = 10000\nchallenge = \"http-01\""),
        &domains,
    );
    let hosts = policy_hosts(&domains);
    let started = Instant::now();
    let running = Running::start(&cfg, listeners).await;
    // About 30 s on an idle 2-core machine. The margin is for a loaded
    // machine, where pebble (and we) answer slower; a single order that
    // stalls is bounded by the ACME request timeout, not this deadline.
    running
        .wait_issued(&hosts, Duration::from_secs(480), &pebble)
        .await;
    eprintln!("{N} certificates in {:?}", started.elapsed());
    let progress = running.server.acme_progress().expect("acme");
    assert!(progress.peak_in_flight <= MAX, "{progress:?}");
    assert!(
        progress.peak_in_flight >= 2,
        "orders ran one by one: {progress:?}"
    );
    assert_eq!(progress.issued, N as u64);
    assert_eq!(pebble.orders(), N);
    let root = pebble.root().await;
    for host in [&hosts[0], &hosts[N / 2], &hosts[N - 1]] {
        assert_eq!(running.policy(host, &root).await.status, 200);
    }
    assert_eq!(certs_json(&path)["valid"], N);
    running.stop().await;
}

/// Regression: pebble (2.4 and its master) deadlocks for good when a new
/// order overlaps an authorization fetch of the same account and a third
/// request writes its store (lock-order inversion, see `OrderGate`). With
/// six orders at once, `many_domains_with_bounded_concurrency` hit it now
/// and then (more often on a loaded machine): every later request hung and
/// the test ran into its 480 s deadline. An order is now created (new
/// order, authorizations, challenge answers) only while it holds the
/// account's gate: held here, no order reaches pebble; released, it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_created_one_at_a_time() {
    use mtasts::acme::challenge::{Challenges, http01_router};
    use mtasts::acme::order::{self, OrderGate};
    use mtasts::config::{ChallengeKind, KeyType};

    init();
    let listeners = Listeners::bind().await;
    let (http_port, tls_port) = listeners.ports();
    let Some(pebble) = Pebble::start(http_port, tls_port, 0) else {
        return;
    };
    let challenges = Arc::new(Challenges::default());
    let http = tokio::spawn(
        axum::serve(listeners.http, http01_router(Arc::clone(&challenges))).into_future(),
    );
    let (account, _) = instant_acme::Account::builder_with_root(&pebble.ca_roots)
        .expect("client")
        .create(
            &instant_acme::NewAccount {
                contact: &[],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            pebble.directory.clone(),
            None,
        )
        .await
        .expect("account");
    let gate = Arc::new(OrderGate::default());
    let held = gate.hold().await;
    let issuing = tokio::spawn({
        let gate = Arc::clone(&gate);
        async move {
            order::issue(
                &account,
                &gate,
                "mta-sts.gate.example.com",
                ChallengeKind::Http01,
                KeyType::EcdsaP256,
                &challenges,
                None,
            )
            .await
            .map(|issued| issued.info)
            .map_err(|f| f.message)
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!issuing.is_finished());
    assert_eq!(
        pebble.orders(),
        0,
        "an order was created while the gate was held"
    );
    drop(held);
    let info = tokio::time::timeout(Duration::from_secs(60), issuing)
        .await
        .expect("issued within 60 s")
        .expect("task")
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&pebble.log(), 40)));
    assert!(info.not_after > info.not_before);
    assert_eq!(pebble.orders(), 1);
    http.abort();
}

/// The real binary: `mtasts serve` in ACME mode on the ports from its
/// config brings up a certificate pebble validated, and `mtasts certs`
/// reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_binary_in_acme_mode() {
    init();
    let (http_port, tls_port) = (common::free_port(), common::free_port());
    let Some(pebble) = Pebble::start(http_port, tls_port, 0) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let domains = vec!["bin.example.com".to_owned()];
    let (path, _) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "key_type = \"rsa2048\"",
        &domains,
    );
    let text = std::fs::read_to_string(&path)
        .expect("config")
        .replace(
            "https = \"127.0.0.1:1\"",
            &format!("https = \"127.0.0.1:{tls_port}\""),
        )
        .replace(
            "http = \"127.0.0.1:2\"",
            &format!("http = \"127.0.0.1:{http_port}\""),
        );
    std::fs::write(&path, text).expect("config");
    let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mtasts"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start mtasts serve");
    let root = pebble.root().await;
    let https: SocketAddr = ([127, 0, 0, 1], tls_port).into();
    let host = format!("mta-sts.{}", domains[0]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let resp = loop {
        match https_get(https, &host, POLICY, &root, &[]).await {
            Ok(resp) => break resp,
            Err(e) if Instant::now() > deadline => {
                let _ = child.kill();
                panic!(
                    "no certificate from `mtasts serve`: {e}\n{}",
                    std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(resp.status, 200);
    assert!(resp.body.starts_with("version: STSv1\r\n"));
    let (_, leaf) = x509_parser::parse_x509_certificate(&resp.chain[0]).expect("leaf");
    assert_eq!(
        leaf.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION,
        "key_type = rsa2048"
    );
    let report = certs_json(&path);
    assert_eq!(report["hosts"][0]["state"], "valid", "{report}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Switching `directory` (staging → production) re-orders stored
/// certificates; the old one is served until its replacement lands.
/// pebble answers on `localhost` too, which is another directory URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_directory_replaces_certificates() {
    let Some((listeners, pebble, dir)) = setup(0).await else {
        return;
    };
    let (http_port, tls_port) = listeners.ports();
    let domains = vec!["switch.example.com".to_owned()];
    let hosts = policy_hosts(&domains);
    let (_, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "",
        &domains,
    );
    let running = Running::start(&cfg, listeners).await;
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    let root = pebble.root().await;
    let first = serial(&running.policy(&hosts[0], &root).await.chain[0]);
    running.stop().await;

    let other = pebble.directory.replace("127.0.0.1", "localhost");
    let (_, cfg) = config(dir.path(), &other, &pebble.ca_roots, "", &domains);
    let listeners = Listeners::rebind(http_port, tls_port).await;
    let running = Running::start(&cfg, listeners).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = serial(&running.policy(&hosts[0], &root).await.chain[0]);
        if now != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not replaced after the directory changed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        state_json(dir.path(), &hosts[0])["directory"],
        other.as_str()
    );
    assert_eq!(pebble.orders(), 2);
    running.stop().await;
}

/// A restart in the middle of a batch keeps what was issued and orders
/// only the rest; `orders_per_hour` holds the batch back, and `mtasts
/// certs` shows the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_batch_resumes_after_restart() {
    let Some((listeners, pebble, dir)) = setup(0).await else {
        return;
    };
    let (http_port, tls_port) = listeners.ports();
    let domains: Vec<String> = (0..8).map(|i| format!("b{i}.example.com")).collect();
    let hosts = policy_hosts(&domains);
    let paced = "orders_per_hour = 3\nmax_concurrent_orders = 2";
    let (path, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        paced,
        &domains,
    );
    let running = Running::start(&cfg, listeners).await;
    // Three orders per hour: three certificates, then the queue waits.
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.server.acme_progress().map_or(0, |p| p.valid) < 3 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            running.server.acme_progress()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pebble.orders(), 3, "the pacing window allows three orders");
    let report = certs_json(&path);
    assert_eq!(report["valid"], 3, "{report}");
    assert_eq!(report["pending"], 5, "{report}");
    assert_eq!(
        report["eta_seconds"], 6000,
        "5 orders at 3 per hour: {report}"
    );
    running.stop().await;

    // A restart does not reset the hourly window (order times are stored).
    let running = Running::start(&cfg, Listeners::rebind(http_port, tls_port).await).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pebble.orders(), 3, "no new order within the same hour");
    assert_eq!(running.server.acme_progress().map(|p| p.valid), Some(3));
    running.stop().await;

    // Restart with a budget for the rest: only the five missing are ordered
    // (the stored order times still count against the hour, so raise it).
    let (_, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "orders_per_hour = 8\nmax_concurrent_orders = 2",
        &domains,
    );
    let running = Running::start(&cfg, Listeners::rebind(http_port, tls_port).await).await;
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    assert_eq!(pebble.orders(), 8, "each domain ordered exactly once");
    running.stop().await;
}

/// A CA that requires external account binding: without `eab_*` the
/// registration fails visibly; with them the certificate is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding() {
    init();
    const KID: &str = "kid-mtasts";
    const KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let listeners = Listeners::bind().await;
    let (http_port, tls_port) = listeners.ports();
    let Some(pebble) = Pebble::start_eab(http_port, tls_port, KID, KEY) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let domains = vec!["eab.example.com".to_owned()];
    let hosts = policy_hosts(&domains);
    let (path, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "",
        &domains,
    );
    let running = Running::start(&cfg, listeners).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = certs_json(&path);
        let err = report["hosts"][0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if !err.is_empty() {
            assert!(err.contains("externalAccountRequired"), "{err}");
            break;
        }
        assert!(Instant::now() < deadline, "no registration error: {report}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;

    let eab = format!("eab_kid = \"{KID}\"\neab_hmac_key = \"{KEY}\"");
    let (_, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        &eab,
        &domains,
    );
    let running = Running::start(&cfg, Listeners::rebind(http_port, tls_port).await).await;
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    let root = pebble.root().await;
    assert_eq!(running.policy(&hosts[0], &root).await.status, 200);
    running.stop().await;
}

/// Port 80 blocked: pebble's HTTP-01 validation goes to a closed port and
/// fails; the next attempt falls back to TLS-ALPN-01 on the https listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_http01_falls_back_to_tls_alpn01() {
    init();
    let listeners = Listeners::bind().await;
    let (_, tls_port) = listeners.ports();
    let closed = common::free_port();
    let Some(pebble) = Pebble::start(closed, tls_port, 0) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let domains = vec!["fallback.example.com".to_owned()];
    let (_, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "challenge = \"http-01\"",
        &domains,
    );
    let hosts = policy_hosts(&domains);
    let running = Running::start(&cfg, listeners).await;
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    let state = state_json(dir.path(), &hosts[0]);
    assert_eq!(state["last_challenge"], "tls-alpn-01", "{state}");
    assert_eq!(
        pebble.orders(),
        2,
        "one failed http-01 order, one tls-alpn-01 order"
    );
    let root = pebble.root().await;
    assert_eq!(running.policy(&hosts[0], &root).await.status, 200);
    running.stop().await;
}

/// The DNS precheck asks pebble's DNS (challtestsrv: every name is
/// 127.0.0.1): a domain whose host_a says 127.0.0.1 is ordered, one that
/// expects another address waits with the reason and is never ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_precheck_holds_back_domains_pointing_elsewhere() {
    let Some((listeners, pebble, dir)) = setup(0).await else {
        return;
    };
    let domains = vec![
        "elsewhere.example.com".to_owned(),
        "here.example.com".to_owned(),
    ];
    let (path, _) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        &format!(
            "precheck_dns = true\nprecheck_resolver = \"{}\"",
            pebble.dns
        ),
        &domains,
    );
    // host_a per domain (what `mtasts records` publishes).
    let text = std::fs::read_to_string(&path).expect("config");
    let text = text
        .replace(
            "name = \"elsewhere.example.com\"",
            "name = \"elsewhere.example.com\"\nhost_a = [\"192.0.2.1\"]",
        )
        .replace(
            "name = \"here.example.com\"",
            "name = \"here.example.com\"\nhost_a = [\"127.0.0.1\"]",
        );
    std::fs::write(&path, text).expect("config");
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let hosts = policy_hosts(&domains);
    let running = Running::start(&cfg, listeners).await;
    running
        .wait_issued(&hosts[1..], Duration::from_secs(60), &pebble)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        if let Ok(bytes) = std::fs::read(
            dir.path()
                .join(format!("state/acme/state/{}.json", hosts[0])),
        ) {
            break serde_json::from_slice::<serde_json::Value>(&bytes).expect("json");
        }
        assert!(Instant::now() < deadline, "no precheck result");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state["waiting_dns"], true, "{state}");
    assert!(!running.server.certs().contains(&hosts[0]));
    assert_eq!(
        pebble.orders(),
        1,
        "nothing ordered for the name pointing elsewhere"
    );
    let report = certs_json(&path);
    let row = &report["hosts"][0];
    assert_eq!(row["host"], hosts[0].as_str());
    assert_eq!(row["state"], "waiting-dns", "{row}");
    let reason = row["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("127.0.0.1") && reason.contains("192.0.2.1"),
        "{reason}"
    );
    running.stop().await;
}

/// Broken store files: a truncated bundle, a certificate for another name,
/// garbage. None is served, each is reported with its path and reason, and
/// a good stored certificate is still served (no CA needed for that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_store_files_are_reported_and_never_served() {
    init();
    let dir = tempfile::tempdir().expect("tempdir");
    let domains: Vec<String> = ["good", "half", "wrong", "junk"]
        .iter()
        .map(|d| format!("{d}.example.com"))
        .collect();
    let hosts = policy_hosts(&domains);
    // Our own little CA stands in for the ACME CA.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let bundle = |name: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("cert");
        format!("{}{}", key.serialize_pem(), cert.pem())
    };
    let certs = dir.path().join("state/acme/certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let good = bundle(&hosts[0]);
    std::fs::write(certs.join(format!("{}.pem", hosts[0])), &good).expect("write");
    let half = bundle(&hosts[1]);
    std::fs::write(
        certs.join(format!("{}.pem", hosts[1])),
        &half[..half.len() - 200],
    )
    .expect("write");
    std::fs::write(
        certs.join(format!("{}.pem", hosts[2])),
        bundle("mta-sts.other.example"),
    )
    .expect("write");
    std::fs::write(certs.join(format!("{}.pem", hosts[3])), b"not a PEM file").expect("write");
    // A crash mid-write leaves a temp file: ignored and cleaned up.
    std::fs::write(certs.join(format!(".{}.pem.tmp999", hosts[0])), "half").expect("write");

    let roots = dir.path().join("unused-roots.pem");
    std::fs::write(&roots, ca_cert.pem()).expect("write");
    // Nothing listens on port 9: orders fail fast.
    let (path, cfg) = config(dir.path(), "https://127.0.0.1:9/dir", &roots, "", &domains);
    let running = Running::start(&cfg, Listeners::bind().await).await;
    // Stored certificates are loaded before the first connection is served.
    let ok = running.policy(&hosts[0], ca_cert.pem().as_bytes()).await;
    assert_eq!(ok.status, 200);
    assert!(running.server.certs().contains(&hosts[0]));
    // A TLS-ALPN-01 handshake for a name with no challenge armed gets
    // unrecognized_name, not the served certificate.
    let probe = https_get(
        running.https,
        &hosts[0],
        POLICY,
        ca_cert.pem().as_bytes(),
        &[b"acme-tls/1"],
    )
    .await
    .expect_err("no challenge armed");
    assert!(probe.contains("UnrecognisedName"), "{probe}");
    for host in &hosts[1..] {
        assert!(
            !running.server.certs().contains(host),
            "{host} must not be served"
        );
        let err = https_get(running.https, host, POLICY, ca_cert.pem().as_bytes(), &[])
            .await
            .expect_err("no certificate");
        assert!(err.contains("handshake"), "{host}: {err}");
    }
    let ok = running.policy(&hosts[0], ca_cert.pem().as_bytes()).await;
    assert_eq!(ok.status, 200);
    assert!(!certs.join(format!(".{}.pem.tmp999", hosts[0])).exists());

    // `mtasts certs` names each broken file and why it is not served.
    let report = certs_json(&path);
    let row = |host: &str| {
        report["hosts"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["host"] == host))
            .cloned()
            .unwrap_or_else(|| panic!("no row for {host}: {report}"))
    };
    assert_eq!(row(&hosts[0])["state"], "valid");
    let reasons = [
        (&hosts[1], "truncated PEM"),
        (&hosts[2], "does not name mta-sts.wrong.example.com"),
        (&hosts[3], "no certificate"),
    ];
    for (host, reason) in reasons {
        let r = row(host);
        assert_ne!(r["state"], "valid", "{r}");
        let err = r["last_error"].as_str().unwrap_or_default();
        assert!(err.contains("unusable, not served"), "{r}");
        assert!(err.contains(&format!("certs/{host}.pem")), "{r}");
        assert!(err.contains(reason), "{reason}: {r}");
    }
    running.stop().await;
}

/// ACME certificates are not kept in memory: after a restart every stored
/// certificate is read from the store on its host's first handshake, into a
/// cache smaller than the number of domains, so serving them all twice
/// evicts and reloads. Each host always gets its own certificate, nothing
/// is ordered again, and a removed domain stops being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_stored_certificates_through_a_small_cache() {
    const N: usize = 10;
    let Some((listeners, pebble, dir)) = setup(0).await else {
        return;
    };
    let (http_port, tls_port) = listeners.ports();
    let domains: Vec<String> = (0..N).map(|i| format!("c{i}.example.com")).collect();
    let hosts = policy_hosts(&domains);
    let (path, _) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "max_concurrent_orders = 4\nchallenge = \"http-01\"",
        &domains,
    );
    // Room for 3 certificates in memory, for 10 domains.
    let text = std::fs::read_to_string(&path).expect("config").replacen(
        "[tls]",
        "cert_cache = 3\n\n[tls]",
        1,
    );
    std::fs::write(&path, text).expect("config");
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let running = Running::start(&cfg, listeners).await;
    running
        .wait_issued(&hosts, Duration::from_secs(120), &pebble)
        .await;
    let root = pebble.root().await;
    let mut serials = Vec::new();
    for host in &hosts {
        let resp = running.policy(host, &root).await;
        assert_eq!(resp.status, 200);
        serials.push(serial(&resp.chain[0]));
    }
    running.stop().await;
    let orders = pebble.orders();
    assert_eq!(orders, N);

    let running = Running::start(&cfg, Listeners::rebind(http_port, tls_port).await).await;
    for round in 0..2 {
        for (host, want) in hosts.iter().zip(&serials) {
            let resp = running.policy(host, &root).await;
            assert_eq!(resp.status, 200, "{host} round {round}");
            let (_, leaf) = x509_parser::parse_x509_certificate(&resp.chain[0]).expect("leaf");
            assert!(
                mtasts::tls::names_host(&leaf, host),
                "{host} was shown another host's certificate"
            );
            assert_eq!(
                &serial(&resp.chain[0]),
                want,
                "{host}: the stored certificate"
            );
        }
    }
    let loads = running.server.certs().loads();
    assert!(
        loads > N as u64,
        "a cache of 3 for {N} hosts reloads on the second round (loads: {loads})"
    );
    assert!(
        loads <= 2 * N as u64,
        "one load per handshake at most: {loads}"
    );
    assert_eq!(pebble.orders(), orders, "nothing ordered again");
    // The certificate manager read every stored certificate: all valid.
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.server.acme_progress().map_or(0, |p| p.valid) < N {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            running.server.acme_progress()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The expiry metric covers every stored certificate, loaded or not.
    running.server.refresh_metrics();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let soonest = running.server.metrics().cert_expiry_soonest.get();
    assert!(
        u64::try_from(soonest).is_ok_and(|t| t > now),
        "soonest expiry {soonest}"
    );

    // A removed domain stops being served (unrecognized_name), the rest go on.
    let (_, fewer) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "max_concurrent_orders = 4\nchallenge = \"http-01\"",
        &domains[1..],
    );
    running.server.apply(&fewer).expect("apply");
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.server.certs().contains(&hosts[0]) {
        assert!(Instant::now() < deadline, "{} still served", hosts[0]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = https_get(running.https, &hosts[0], POLICY, &root, &[])
        .await
        .expect_err("removed domain");
    assert!(err.contains("UnrecognisedName"), "{err}");
    assert_eq!(running.policy(&hosts[1], &root).await.status, 200);
    running.stop().await;
}

/// A restart does not read the certificates (their validity is recorded in
/// the state), so one broken behind the server's back is found by the
/// first handshake that loads it: that handshake gets unrecognized_name,
/// never another certificate, and the manager orders a replacement, which
/// is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_broken_after_restart_is_refused_and_replaced() {
    let Some((listeners, pebble, dir)) = setup(0).await else {
        return;
    };
    let (http_port, tls_port) = listeners.ports();
    let domains = vec![
        "broken.example.com".to_owned(),
        "fine.example.com".to_owned(),
    ];
    let hosts = policy_hosts(&domains);
    let (_, cfg) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "",
        &domains,
    );
    let running = Running::start(&cfg, listeners).await;
    running
        .wait_issued(&hosts, Duration::from_secs(60), &pebble)
        .await;
    let root = pebble.root().await;
    let first = serial(&running.policy(&hosts[0], &root).await.chain[0]);
    running.stop().await;
    let state = state_json(dir.path(), &hosts[0]);
    assert!(state["cert_not_after"].is_i64(), "{state}");

    // The key of another host: the bundle parses, but the key does not
    // match the certificate.
    let bundle = std::fs::read_to_string(cert_file(dir.path(), &hosts[0])).expect("bundle");
    let other = std::fs::read_to_string(cert_file(dir.path(), &hosts[1])).expect("bundle");
    let key_end = |b: &str| b.find("-----BEGIN CERTIFICATE-----").expect("chain");
    let swapped = format!(
        "{}{}",
        &other[..key_end(&other)],
        &bundle[key_end(&bundle)..]
    );
    std::fs::write(cert_file(dir.path(), &hosts[0]), swapped).expect("break");

    let running = Running::start(&cfg, Listeners::rebind(http_port, tls_port).await).await;
    assert_eq!(running.policy(&hosts[1], &root).await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match https_get(running.https, &hosts[0], POLICY, &root, &[]).await {
            Ok(resp) => {
                assert_eq!(resp.status, 200);
                assert_ne!(serial(&resp.chain[0]), first, "a new certificate");
                break;
            }
            Err(e) => assert!(e.contains("UnrecognisedName"), "{e}"),
        }
        assert!(
            Instant::now() < deadline,
            "not replaced; progress {:?}\n{}",
            running.server.acme_progress(),
            tail(&pebble.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(pebble.orders(), 3, "two first orders, one replacement");
    running.stop().await;
}

/// Regression (issue 9 item 10): the longest valid domain (245 characters,
/// a 253-character policy host) added through the admin API of the real
/// binary gets its certificate from pebble, is served with it, and the
/// stored certificate is served again after a restart. The store's file
/// names for such a host used to be too long: PUT answered 500, and an
/// issued certificate could not be saved (and was ordered again forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_domain_through_admin_api_gets_a_certificate() {
    init();
    let (http_port, tls_port) = (common::free_port(), common::free_port());
    // Every name of the zone resolves to our listeners.
    let Some(knot) = common::knot::Knot::start("example", "* A 127.0.0.1") else {
        return;
    };
    let Some(pebble) = Pebble::start_resolving_with(http_port, tls_port, knot.addr) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = config(
        dir.path(),
        &pebble.directory,
        &pebble.ca_roots,
        "",
        &["short.example".to_owned()],
    );
    let admin = common::loopback();
    let token = "0123456789abcdef-acme-token";
    std::fs::create_dir(dir.path().join("domains.d")).expect("domains.d");
    std::fs::write(dir.path().join("admin.token"), token).expect("token");
    let text = std::fs::read_to_string(&path)
        .expect("config")
        .replace(
            "https = \"127.0.0.1:1\"",
            &format!("https = \"127.0.0.1:{tls_port}\""),
        )
        .replace(
            "http = \"127.0.0.1:2\"",
            &format!("http = \"127.0.0.1:{http_port}\""),
        );
    let text = format!(
        "domains_dir = \"{}\"\n{text}\n[admin]\nlisten = \"{admin}\"\ntoken_file = \"{}\"\n",
        dir.path().join("domains.d").display(),
        dir.path().join("admin.token").display()
    );
    std::fs::write(&path, text).expect("config");
    let https: SocketAddr = ([127, 0, 0, 1], tls_port).into();
    let http: SocketAddr = ([127, 0, 0, 1], http_port).into();
    let proc = common::ServeProc::start(&path, https, http);

    let label = "q".repeat(63);
    let long = format!("{label}.{label}.{label}.{}.example", "r".repeat(45));
    let host = format!("mta-sts.{long}");
    assert_eq!(host.len(), 253);
    let auth = format!("Bearer {token}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let put = loop {
        match common::client::http_call(
            admin,
            "PUT",
            &format!("/v1/domains/{long}"),
            &[("Authorization", auth.as_str())],
            Some(r#"{"mode": "enforce"}"#),
        )
        .await
        {
            Ok(resp) => break resp,
            Err(e) if Instant::now() > deadline => panic!("admin API: {e}\n{}", proc.log()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(
        put.status,
        201,
        "{}\n{}",
        String::from_utf8_lossy(&put.body),
        proc.log()
    );

    let root = pebble.root().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let first = loop {
        match https_get(https, &host, POLICY, &root, &[]).await {
            Ok(resp) => break resp,
            Err(e) if Instant::now() > deadline => panic!(
                "no certificate for the 253-character host: {e}\n{}\npebble log tail:\n{}",
                proc.log(),
                tail(&pebble.log(), 40)
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(first.status, 200);
    assert!(first.body.contains("mode: enforce\r\n"), "{}", first.body);
    let (_, leaf) = x509_parser::parse_x509_certificate(&first.chain[0]).expect("leaf");
    let san = leaf
        .subject_alternative_name()
        .expect("san")
        .expect("san present");
    assert!(
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if *d == host)),
        "the certificate names the 253-character host"
    );
    // Every stored file name fits; `mtasts certs` finds the host by the
    // name written inside its files.
    for sub in ["certs", "state"] {
        for e in std::fs::read_dir(dir.path().join("state/acme").join(sub)).expect("dir") {
            let name = e.expect("entry").file_name();
            assert!(name.len() <= 255, "{name:?}");
        }
    }
    let report = certs_json(&path);
    let row = report["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|r| r["host"] == host.as_str())
        .unwrap_or_else(|| panic!("{host} not in {report}"))
        .clone();
    assert_eq!(row["state"], "valid", "{row}");

    // Restart: the stored certificate is read back and served, not ordered
    // again.
    let orders = pebble.orders();
    drop(proc);
    let proc = common::ServeProc::start(&path, https, http);
    let again = https_get(https, &host, POLICY, &root, &[])
        .await
        .unwrap_or_else(|e| panic!("after restart: {e}\n{}", proc.log()));
    assert_eq!(serial(&again.chain[0]), serial(&first.chain[0]));
    assert_eq!(pebble.orders(), orders, "no new order after the restart");
}
