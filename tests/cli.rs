//! The `mtasts` binary end to end: check-config, policy, records (parsed back
//! as a zone file and checked against the body actually served), serve with
//! SIGHUP reload and SIGTERM shutdown, and mx taken from certificate files.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::ServeProc;
use common::client::TlsClient;
use common::mtasts;
use hickory_proto::rr::{Name, RData, RecordType, RrKey};
use hickory_proto::serialize::txt::Parser;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The id scheme documented in docs: hex of the first 16 bytes of SHA-256.
fn expected_id(body: &[u8]) -> String {
    common::policy_id(body)
}

fn repo_file(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(name)
        .display()
        .to_string()
}

#[test]
fn check_config_summarises_the_example() {
    let out = mtasts(&[
        "check-config",
        "--config",
        &repo_file("config.example.toml"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("ok, 2 domains, 0 warnings"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_config_reports_every_error_with_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("domains.d")).expect("mkdir");
    common::write(
        &dir.path().join("domains.d"),
        "10-customer.toml",
        "[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\n\n[[domain]]\nname = \"b.example\"\nmode = \"strict\"\n",
    );
    common::write(
        &dir.path().join("domains.d"),
        "20-broken.toml",
        "[[domain]]\nname = \"c.example\"\nmx = [\"mx.c.example\"]\nmax_ag = 5\n",
    );
    let main = common::write(
        dir.path(),
        "mtasts.toml",
        "domains_dir = \"domains.d\"\n[defaults]\nmx = [\"mx.example.net\"]\n[[domain]]\nname = \"a.example\"\n",
    );
    let main_s = main.display().to_string();
    let out = mtasts(&["check-config", "--config", &main_s]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let d = dir.path().join("domains.d");
    for want in [
        format!(
            "{}:7:8: mode \"strict\" is not one of",
            d.join("10-customer.toml").display()
        ),
        format!(
            "{}:4:1: unknown field `max_ag`",
            d.join("20-broken.toml").display()
        ),
        "did you mean `max_age`?".to_owned(),
        format!(
            "{}:2:8: duplicate domain a.example (first defined at {}:5:8)",
            d.join("10-customer.toml").display(),
            main_s
        ),
        "3 errors".to_owned(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    assert!(out.stdout.is_empty());
}

#[test]
fn policy_prints_the_served_body() {
    let out = mtasts(&[
        "policy",
        "--config",
        &repo_file("config.example.toml"),
        "example.org",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        out.stdout,
        b"version: STSv1\r\nmode: enforce\r\nmx: *.mx.example.org\r\nmx: mail.example.org\r\nmax_age: 1209600\r\n"
    );
    let out = mtasts(&[
        "policy",
        "--config",
        &repo_file("config.example.toml"),
        "nope.example",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("nope.example is not configured"));
}

fn zone_txt(
    records: &std::collections::BTreeMap<RrKey, hickory_proto::rr::RecordSet>,
    name: &str,
) -> Vec<String> {
    let key = RrKey::new(
        Name::from_ascii(name).expect("name").into(),
        RecordType::TXT,
    );
    records
        .get(&key)
        .map(|set| {
            set.records_without_rrsigs()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(t.txt_data.iter().map(|b| text(b)).collect::<String>()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn records_ids_match_the_served_bodies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http) = (common::loopback(), common::loopback());
    let example = std::fs::read_to_string(repo_file("config.example.toml")).expect("example");
    // The example with this test's ports and state directory.
    let body = example.split("[tls]").nth(1).expect("example has [tls]");
    let cfg = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "{}\n[tls]{body}",
            common::server_section(https, http, &dir.path().join("state"))
        ),
    );
    let cfg_s = cfg.display().to_string();
    let proc = ServeProc::start(&cfg, https, http);
    let client = TlsClient::trusting_pem_file(&dir.path().join("state/ca/ca.pem"));

    let out = mtasts(&["records", "--config", &cfg_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let zone = text(&out.stdout);
    let (_, records) = Parser::new(zone.as_str(), None, Some(Name::root()))
        .parse()
        .unwrap_or_else(|e| panic!("records output is not a valid zone: {e}\n{zone}"));

    for domain in ["example.com", "example.org"] {
        let served = client.get_policy(https, domain).await.expect("fetch");
        assert_eq!(served.status, 200);
        let txt = zone_txt(&records, &format!("_mta-sts.{domain}."));
        assert_eq!(
            txt,
            [format!("v=STSv1; id={};", expected_id(&served.body))],
            "{domain}"
        );
        // `policy` prints the same bytes that are served.
        let printed = mtasts(&["policy", "--config", &cfg_s, domain]);
        assert_eq!(printed.stdout, served.body);
        let a = RrKey::new(
            Name::from_ascii(format!("mta-sts.{domain}."))
                .expect("name")
                .into(),
            RecordType::A,
        );
        assert!(records.contains_key(&a), "A record for mta-sts.{domain}");
    }
    assert_eq!(
        zone_txt(&records, "_smtp._tls.example.org."),
        ["v=TLSRPTv1; rua=mailto:tlsrpt@example.org,https://reports.example.org/tlsrpt;"]
    );

    // JSON, one domain.
    let out = mtasts(&[
        "records",
        "--config",
        &cfg_s,
        "--format",
        "json",
        "example.com",
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let recs = json.as_array().expect("array");
    assert!(recs.iter().all(|r| r["domain"] == "example.com"));
    let types: Vec<&str> = recs.iter().filter_map(|r| r["type"].as_str()).collect();
    assert_eq!(types, ["TXT", "A", "AAAA", "TXT"]);
    assert_eq!(recs[0]["name"], "_mta-sts.example.com.");
    assert_eq!(recs[0]["ttl"], 3600);
    drop(proc);
}

#[tokio::test]
async fn serve_reloads_on_sighup_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http) = (common::loopback(), common::loopback());
    let domains = dir.path().join("domains.d");
    std::fs::create_dir(&domains).expect("mkdir");
    common::write(&domains, "a.toml", "[[domain]]\nname = \"a.example\"\n");
    let cfg = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "domains_dir = \"domains.d\"\n{}[defaults]\nmx = [\"mx.example.net\"]\n",
            common::server_section(https, http, &dir.path().join("state"))
        ),
    );
    let mut proc = ServeProc::start(&cfg, https, http);
    let client = TlsClient::trusting_pem_file(&dir.path().join("state/ca/ca.pem"));
    assert_eq!(
        client
            .get_policy(https, "a.example")
            .await
            .expect("a")
            .status,
        200
    );
    assert!(client.connect(https, "mta-sts.b.example").await.is_err());

    common::write(
        &domains,
        "b.toml",
        "[[domain]]\nname = \"b.example\"\nmode = \"enforce\"\n",
    );
    proc.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(resp) = client.get_policy(https, "b.example").await {
            assert_eq!(resp.status, 200);
            assert!(text(&resp.body).contains("mode: enforce"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b.example never served: {}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken file is rejected and everything keeps serving.
    common::write(
        &domains,
        "c.toml",
        "[[domain]]\nname = \"c.example\"\nmode = \"bogus\"\n",
    );
    proc.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.log().contains("reload rejected") {
        assert!(
            Instant::now() < deadline,
            "no rejection logged: {}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(proc.log().contains("c.toml:3:8"), "{}", proc.log());
    assert_eq!(
        client
            .get_policy(https, "a.example")
            .await
            .expect("a")
            .status,
        200
    );
    assert_eq!(
        client
            .get_policy(https, "b.example")
            .await
            .expect("b")
            .status,
        200
    );

    proc.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = proc.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit {status}: {}", proc.log());
    assert!(proc.log().contains("stopped"));
}

#[test]
fn mx_from_certificate_sans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![
        "mx2.example.net".to_owned(),
        "*.mx.example.net".to_owned(),
        "MX1.example.net".to_owned(),
    ])
    .expect("params");
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(60);
    let cert = params.self_signed(&key).expect("cert");
    common::write(dir.path(), "mail.pem", &cert.pem());
    let cfg = common::write(
        dir.path(),
        "mtasts.toml",
        "[[domain]]\nname = \"example.net\"\nmode = \"enforce\"\nmx_certs = [\"mail.pem\"]\n\n[[domain]]\nname = \"override.example\"\nmx_certs = [\"mail.pem\"]\nmx = [\"only.example\"]\n",
    );
    let cfg_s = cfg.display().to_string();
    let out = mtasts(&["policy", "--config", &cfg_s, "example.net"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "version: STSv1\r\nmode: enforce\r\nmx: *.mx.example.net\r\nmx: mx1.example.net\r\nmx: mx2.example.net\r\nmax_age: 604800\r\n"
    );
    let out = mtasts(&["policy", "--config", &cfg_s, "override.example"]);
    assert!(
        text(&out.stdout).contains("mx: only.example\r\n"),
        "explicit mx wins"
    );

    // An expired certificate is an error naming the file and the config line.
    let mut params =
        rcgen::CertificateParams::new(vec!["mx.example.net".to_owned()]).expect("params");
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(60);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    common::write(
        dir.path(),
        "mail.pem",
        &params.self_signed(&key).expect("cert").pem(),
    );
    let out = mtasts(&["check-config", "--config", &cfg_s]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{}:4:13:", cfg_s)), "{err}");
    assert!(err.contains("mail.pem expired on"), "{err}");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http) = (common::loopback(), common::loopback());
    let cfg = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "{}[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\n",
            common::server_section(https, http, &dir.path().join("state"))
        ),
    );
    let proc = ServeProc::start_with(&cfg, https, http, &["--log-format", "json"]);
    proc.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.log().contains("stopped") {
        assert!(Instant::now() < deadline, "no stop logged: {}", proc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = proc.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let serving = lines
        .iter()
        .find(|l| l["fields"]["message"] == "serving")
        .expect("a serving line");
    assert_eq!(serving["fields"]["domains"], 1);
    assert_eq!(serving["level"], "INFO");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "stopped"));
}

/// Signals sent the moment a port answers are handled, not left to their
/// default action (which ends the process silently): the handlers are in
/// place before the listeners are bound.
#[tokio::test]
async fn signals_right_after_start_are_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http) = (common::loopback(), common::loopback());
    let config = |mx: &str| {
        format!(
            "{}[[domain]]\nname = \"a.example\"\nmx = [\"{mx}\"]\n",
            common::server_section(https, http, &dir.path().join("state"))
        )
    };
    let cfg = common::write(dir.path(), "mtasts.toml", &config("mx1.a.example"));
    // Signalled the moment the https port answers (SIGHUP's default action
    // ends a process), with a changed config to reload.
    let mut proc = ServeProc::start_at_first_accept(&cfg, https, http);
    common::write(dir.path(), "mtasts.toml", &config("mx2.a.example"));
    proc.signal("HUP");
    let client = TlsClient::trusting_pem_file(&dir.path().join("state/ca/ca.pem"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("SIGHUP ended the process ({status}): {}", proc.log());
        }
        if let Ok(r) = client.get_policy(https, "a.example").await
            && String::from_utf8_lossy(&r.body).contains("mx: mx2.a.example\r\n")
        {
            break;
        }
        assert!(Instant::now() < deadline, "not reloaded: {}", proc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proc.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "SIGTERM ignored: {}", proc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}: {}", proc.log());
    assert!(proc.log().contains("stopped"), "{}", proc.log());
}
