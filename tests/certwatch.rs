//! The policy follows the mail server certificates by itself (issue 15),
//! against the real binary over real HTTPS: a renewal by atomic rename or
//! by a certbot-style symlink swap, a new file matching a glob, and the
//! enforce-mode shrink that waits while knotd still serves the dropped name
//! as an MX. Also: `mx_certs` naming a device or a FIFO is refused without
//! reading or blocking, and reloads keep working (issue 9 item 7).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::ServeProc;
use common::client::TlsClient;
use common::knot::{KEY_NAME, Knot};

const TOKEN: &str = "certwatch-test-token-0123456789";
/// Generous on a loaded machine; the expectation is about a second.
const PATIENCE: Duration = Duration::from_secs(20);

struct World {
    dir: tempfile::TempDir,
    config: PathBuf,
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
}

impl World {
    /// A config with an admin listener and `body` (domains).
    fn new(body: &str) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let (https, http, admin) = (common::loopback(), common::loopback(), common::loopback());
        common::write(dir.path(), "admin.token", &format!("{TOKEN}\n"));
        let config = dir.path().join("mtasts.toml");
        let w = World {
            dir,
            config,
            https,
            http,
            admin,
        };
        w.write_config(body);
        w
    }

    fn write_config(&self, body: &str) {
        let text = format!(
            "{}[admin]\nlisten = \"{}\"\ntoken_file = \"admin.token\"\n\n{body}",
            common::server_section(self.https, self.http, &self.path("state")),
            self.admin
        );
        // Atomic, so the config watcher never reads half a file.
        let tmp = self.path(".mtasts.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Starts the server and waits for the one look its file watch takes
    /// at the start (a change made before that look would be picked up by
    /// it, with or without watching the certificates).
    async fn start(&self, serve_args: &[&str]) -> (ServeProc, TlsClient) {
        let proc = ServeProc::start_args(&self.config, self.https, self.http, &[], serve_args);
        let client = TlsClient::trusting_pem_file(&self.path("state/ca/ca.pem"));
        let started = Instant::now();
        let series = "mtasts_reloads_total{trigger=\"watch\",result=\"unchanged\"}";
        while metric(&self.metrics().await, series) < 1.0 {
            assert!(
                started.elapsed() < PATIENCE,
                "no first look: {}",
                proc.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (proc, client)
    }

    async fn metrics(&self) -> String {
        common::admin_metrics(self.admin, TOKEN).await
    }

    /// The `_mta-sts` id `mtasts records` prints for `domain`.
    fn records_id(&self, domain: &str) -> String {
        let out = common::mtasts(&[
            "records",
            "--config",
            self.config.to_str().expect("utf-8"),
            "--format",
            "json",
            domain,
        ]);
        let (stdout, stderr) = common::output_text(&out);
        assert!(out.status.success(), "{stderr}");
        let records: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("json");
        records
            .iter()
            .filter(|r| {
                r["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("_mta-sts."))
            })
            .find_map(|r| {
                let value = r["value"].as_str()?;
                let id = value.split("id=").nth(1)?;
                Some(id.trim_end_matches(';').to_owned())
            })
            .unwrap_or_else(|| panic!("no _mta-sts record: {stdout}"))
    }
}

/// A series' value, 0 when it was never counted.
fn metric(text: &str, series: &str) -> f64 {
    common::metric_value(text, series).unwrap_or(0.0)
}

/// A PEM certificate (leaf only) naming `sans`, valid now.
fn cert_pem(sans: &[&str]) -> String {
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut params = rcgen::CertificateParams::new(sans).expect("params");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(60);
    let key = rcgen::KeyPair::generate().expect("key");
    params.self_signed(&key).expect("sign").pem()
}

/// Replaces `path` as acme.sh and most tools do: write aside, rename over.
fn replace_by_rename(path: &Path, sans: &[&str]) {
    let tmp = path.with_extension("pem.new");
    std::fs::write(&tmp, cert_pem(sans)).expect("write new cert");
    std::fs::rename(&tmp, path).expect("rename cert");
}

/// The served policy body and its id (the ETag without quotes).
async fn policy(client: &TlsClient, https: SocketAddr, domain: &str) -> (String, String) {
    let resp = client.get_policy(https, domain).await.expect(domain);
    assert_eq!(resp.status, 200, "{domain}");
    let id = resp
        .header("etag")
        .expect("etag")
        .trim_matches('"')
        .to_owned();
    (String::from_utf8_lossy(&resp.body).into_owned(), id)
}

/// The `mx:` lines of a policy body, in order.
fn mx_lines(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("mx: "))
        .map(str::to_owned)
        .collect()
}

/// Polls the served policy until its mx lines are `want`; returns how long
/// that took.
async fn wait_for_mx(
    client: &TlsClient,
    proc: &ServeProc,
    https: SocketAddr,
    domain: &str,
    want: &[&str],
) -> Duration {
    let started = Instant::now();
    loop {
        let (body, _) = policy(client, https, domain).await;
        if mx_lines(&body) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{domain} still serves {body:?}, want mx {want:?}\n{}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_log(proc: &ServeProc, what: &str) {
    let started = Instant::now();
    while !proc.log().contains(what) {
        assert!(
            started.elapsed() < PATIENCE,
            "no {what:?} in the log:\n{}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_certificate_replaced_by_atomic_rename_changes_the_policy_without_a_signal() {
    let w = World::new(
        "[[domain]]\nname = \"rename.example\"\nmode = \"testing\"\nmx_certs = [\"certs/mx.pem\"]\n",
    );
    std::fs::create_dir(w.path("certs")).expect("mkdir");
    std::fs::write(w.path("certs/mx.pem"), cert_pem(&["mx1.rename.example"])).expect("pem");
    let (proc, client) = w.start(&[]).await;
    let (body, id_before) = policy(&client, w.https, "rename.example").await;
    assert_eq!(mx_lines(&body), ["mx1.rename.example"]);
    assert_eq!(w.records_id("rename.example"), id_before);

    replace_by_rename(&w.path("certs/mx.pem"), &["mx2.rename.example"]);
    let took = wait_for_mx(
        &client,
        &proc,
        w.https,
        "rename.example",
        &["mx2.rename.example"],
    )
    .await;
    eprintln!("atomic rename: new policy served after {took:?}");

    let (_, id_after) = policy(&client, w.https, "rename.example").await;
    assert_ne!(id_after, id_before, "the id changes with the body");
    assert_eq!(w.records_id("rename.example"), id_after);
    let m = w.metrics().await;
    assert!(
        metric(&m, "mtasts_reloads_total{trigger=\"watch\",result=\"ok\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "mtasts_reloads_total{trigger=\"sighup\",result=\"ok\"}"),
        0.0
    );
}

#[tokio::test]
async fn a_certbot_symlink_swap_with_new_names_changes_the_policy_without_a_signal() {
    let w = World::new(
        "[[domain]]\nname = \"swap.example\"\nmode = \"testing\"\nmx_certs = [\"le/live/mail/fullchain.pem\"]\n",
    );
    // certbot's layout: live/<name>/fullchain.pem -> ../../archive/<name>/fullchainN.pem
    std::fs::create_dir_all(w.path("le/live/mail")).expect("mkdir");
    std::fs::create_dir_all(w.path("le/archive/mail")).expect("mkdir");
    std::fs::write(
        w.path("le/archive/mail/fullchain1.pem"),
        cert_pem(&["mx1.swap.example"]),
    )
    .expect("pem");
    let link = w.path("le/live/mail/fullchain.pem");
    std::os::unix::fs::symlink("../../archive/mail/fullchain1.pem", &link).expect("symlink");
    let (proc, client) = w.start(&[]).await;
    let (body, id_before) = policy(&client, w.https, "swap.example").await;
    assert_eq!(mx_lines(&body), ["mx1.swap.example"]);

    // A renewal: the next archive file, then the link replaced (certbot
    // removes the old link and creates the new one).
    std::fs::write(
        w.path("le/archive/mail/fullchain2.pem"),
        cert_pem(&["mx1.swap.example", "mx2.swap.example"]),
    )
    .expect("pem");
    std::fs::remove_file(&link).expect("unlink");
    std::os::unix::fs::symlink("../../archive/mail/fullchain2.pem", &link).expect("symlink");
    let took = wait_for_mx(
        &client,
        &proc,
        w.https,
        "swap.example",
        &["mx1.swap.example", "mx2.swap.example"],
    )
    .await;
    eprintln!("symlink swap: new policy served after {took:?}");
    let (_, id_after) = policy(&client, w.https, "swap.example").await;
    assert_ne!(id_after, id_before);
    assert_eq!(w.records_id("swap.example"), id_after);
}

#[tokio::test]
async fn a_glob_picks_up_the_certificate_of_a_new_mx_host() {
    let w = World::new(
        "[[domain]]\nname = \"glob.example\"\nmode = \"testing\"\nmx_certs = [\"live/*/fullchain.pem\"]\n",
    );
    let put = |host: &str| {
        let dir = w.path(&format!("live/{host}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        replace_by_rename(&dir.join("fullchain.pem"), &[host]);
    };
    put("mx1.glob.example");
    let (proc, client) = w.start(&[]).await;
    let (body, id_before) = policy(&client, w.https, "glob.example").await;
    assert_eq!(mx_lines(&body), ["mx1.glob.example"]);

    put("mx2.glob.example");
    let took = wait_for_mx(
        &client,
        &proc,
        w.https,
        "glob.example",
        &["mx1.glob.example", "mx2.glob.example"],
    )
    .await;
    eprintln!("glob: new host's certificate served after {took:?}");
    let (_, id_after) = policy(&client, w.https, "glob.example").await;
    assert_ne!(id_after, id_before);
    assert_eq!(w.records_id("glob.example"), id_after);
}

/// Runs knsupdate (knot-dnsutils) with the server's TSIG key.
fn nsupdate(knot: &Knot, commands: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("knsupdate")
        .arg("-y")
        .arg(format!("hmac-sha256:{KEY_NAME}:{}", knot.secret))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("knsupdate (Debian knot-dnsutils)");
    let script = format!(
        "server {} {}\n{commands}\nsend\nquit\n",
        knot.addr.ip(),
        knot.addr.port()
    );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write script");
    let out = child.wait_with_output().expect("knsupdate");
    assert!(
        out.status.success(),
        "knsupdate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_enforce_shrink_waits_while_the_dropped_name_is_still_an_mx() {
    const ZONE: &str = "shrink.example";
    let Some(knot) = Knot::start(
        ZONE,
        "@ MX 10 mx1\n@ MX 20 mx2\nmx1 A 127.0.0.1\nmx2 A 127.0.0.1\nmta-sts A 127.0.0.1\n_mta-sts TXT \"v=STSv1; id=1;\"\n",
    ) else {
        return;
    };
    let w = World::new(&format!(
        "[[domain]]\nname = \"{ZONE}\"\nmode = \"enforce\"\nmx_certs = [\"certs/mx.pem\"]\n"
    ));
    std::fs::create_dir(w.path("certs")).expect("mkdir");
    let cert = w.path("certs/mx.pem");
    std::fs::write(
        &cert,
        cert_pem(&["mx1.shrink.example", "mx2.shrink.example"]),
    )
    .expect("pem");
    let resolver = knot.addr.to_string();
    let (proc, client) = w.start(&["--mx-resolver", &resolver]).await;
    let (_, id_start) = policy(&client, w.https, ZONE).await;

    // The renewed certificate lost mx1 (still an MX) and gained mx3: mx3 is
    // added at once, mx1 stays.
    replace_by_rename(&cert, &["mx2.shrink.example", "mx3.shrink.example"]);
    let took = wait_for_mx(
        &client,
        &proc,
        w.https,
        ZONE,
        &[
            "mx1.shrink.example",
            "mx2.shrink.example",
            "mx3.shrink.example",
        ],
    )
    .await;
    eprintln!("held shrink with growth: served after {took:?}");
    let (_, id_held) = policy(&client, w.https, ZONE).await;
    assert_ne!(id_held, id_start, "growing the list is a new policy");
    let m = w.metrics().await;
    assert!(metric(&m, "mtasts_mx_shrink_held_total") >= 1.0, "{m}");
    assert_eq!(metric(&m, "mtasts_mx_shrink_held_domains"), 1.0, "{m}");
    wait_for_log(&proc, "mx shrink held").await;
    let log = proc.log();
    let line = log
        .lines()
        .find(|l| l.contains("mx shrink held"))
        .expect("warning");
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("previous=mx1.shrink.example, mx2.shrink.example"),
        "{line}"
    );
    assert!(
        line.contains("certificates=mx2.shrink.example, mx3.shrink.example"),
        "{line}"
    );
    assert!(line.contains("kept=mx1.shrink.example"), "{line}");

    // `mtasts check --config` says so.
    let port = w.https.port().to_string();
    let out = common::mtasts(&[
        "check",
        "--config",
        w.config.to_str().expect("utf-8"),
        "--resolver",
        &resolver,
        "--ca-file",
        w.path("state/ca/ca.pem").to_str().expect("utf-8"),
        "--https-port",
        &port,
        "--timeout",
        "5s",
        ZONE,
    ]);
    let (stdout, stderr) = common::output_text(&out);
    let finding = stdout
        .lines()
        .find(|l| l.contains("mx-shrink"))
        .unwrap_or_else(|| panic!("no mx-shrink finding:\n{stdout}\n{stderr}"));
    assert!(finding.contains("WARN"), "{finding}");
    assert!(finding.contains("mx1.shrink.example"), "{finding}");

    // Once mx1 is no MX any more, a reload applies the shrink.
    nsupdate(
        &knot,
        &format!("zone {ZONE}.\nupdate delete {ZONE}. MX 10 mx1.{ZONE}."),
    );
    proc.signal("HUP");
    wait_for_mx(
        &client,
        &proc,
        w.https,
        ZONE,
        &["mx2.shrink.example", "mx3.shrink.example"],
    )
    .await;
    let (_, id_shrunk) = policy(&client, w.https, ZONE).await;
    assert_eq!(w.records_id(ZONE), id_shrunk);
    assert_eq!(
        metric(&w.metrics().await, "mtasts_mx_shrink_held_domains"),
        0.0
    );

    // A wildcard that still covers a live MX is kept the same way: the
    // certificate moves to `*.shrink.example` (covers mx2: applies), then
    // to mx3 alone (mx2 needs the wildcard: held).
    replace_by_rename(&cert, &["*.shrink.example"]);
    wait_for_mx(&client, &proc, w.https, ZONE, &["*.shrink.example"]).await;
    let held_before = metric(&w.metrics().await, "mtasts_mx_shrink_held_total");
    replace_by_rename(&cert, &["mx3.shrink.example"]);
    let started = Instant::now();
    loop {
        let m = w.metrics().await;
        if metric(&m, "mtasts_mx_shrink_held_total") > held_before {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "not held: {}", proc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (body, _) = policy(&client, w.https, ZONE).await;
    assert_eq!(mx_lines(&body), ["*.shrink.example", "mx3.shrink.example"]);

    // SIGUSR1 forces the shrink (docs/OPERATIONS.md).
    proc.signal("USR1");
    wait_for_mx(&client, &proc, w.https, ZONE, &["mx3.shrink.example"]).await;
}

#[tokio::test]
async fn mx_certs_naming_a_device_or_a_fifo_is_refused_and_reloads_go_on() {
    let domain = |path: &str| {
        format!(
            "[[domain]]\nname = \"special.example\"\nmode = \"testing\"\nmx_certs = [\"{path}\"]\n"
        )
    };
    let w = World::new(&domain("certs/mx.pem"));
    std::fs::create_dir(w.path("certs")).expect("mkdir");
    std::fs::write(w.path("certs/mx.pem"), cert_pem(&["mx1.special.example"])).expect("pem");
    let fifo = w.path("certs/fifo.pem");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).expect("mkfifo");

    // `check-config` answers at once, naming the file and why.
    for (path, why) in [
        ("/dev/zero", "a character device"),
        ("certs/fifo.pem", "a FIFO"),
    ] {
        w.write_config(&domain(path));
        let out = common::mtasts(&[
            "check-config",
            "--config",
            w.config.to_str().expect("utf-8"),
        ]);
        let (stdout, stderr) = common::output_text(&out);
        assert!(!out.status.success(), "{stdout}");
        assert!(
            stderr.contains("is not a regular file") && stderr.contains(why),
            "{stderr}"
        );
    }

    w.write_config(&domain("certs/mx.pem"));
    let (proc, client) = w.start(&[]).await;
    wait_for_mx(
        &client,
        &proc,
        w.https,
        "special.example",
        &["mx1.special.example"],
    )
    .await;
    for (path, why) in [
        ("/dev/zero", "a character device"),
        ("certs/fifo.pem", "a FIFO"),
    ] {
        w.write_config(&domain(path));
        proc.signal("HUP");
        wait_for_log(&proc, why).await;
        // Still serving the last good policy.
        let (body, _) = policy(&client, w.https, "special.example").await;
        assert_eq!(mx_lines(&body), ["mx1.special.example"]);
    }
    // The reload lock is free: a good config applies.
    std::fs::write(w.path("certs/mx2.pem"), cert_pem(&["mx2.special.example"])).expect("pem");
    w.write_config(&domain("certs/mx2.pem"));
    proc.signal("HUP");
    wait_for_mx(
        &client,
        &proc,
        w.https,
        "special.example",
        &["mx2.special.example"],
    )
    .await;
}
