//! TLS reports (RFC 8460) through the real interfaces: POSTed over HTTPS
//! to the running server's policy hosts (by our TLS client and by curl),
//! ingested from mail messages and stdin by `mtasts tlsrpt ingest`,
//! summarised by `mtasts tlsrpt summary`, published in `_smtp._tls`.
//! Fixtures are written here in the shapes real reporters send.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::ServeProc;
use common::client::{Response, TlsClient, parse_response};

const TOKEN: &str = "tlsrpt-test-admin-token-0123456789";

/// The RFC 8460 §4.4 example.
const RFC_EXAMPLE: &str = r#"{
 "organization-name": "Company-X",
 "date-range": {"start-datetime": "2016-04-01T00:00:00Z", "end-datetime": "2016-04-01T23:59:59Z"},
 "contact-info": "sts-reporting@company-x.example",
 "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
 "policies": [{
   "policy": {"policy-type": "sts",
     "policy-string": ["version: STSv1","mode: testing","mx: *.mail.company-y.example","max_age: 86400"],
     "policy-domain": "company-y.example", "mx-host": ["*.mail.company-y.example"]},
   "summary": {"total-successful-session-count": 5326, "total-failure-session-count": 303},
   "failure-details": [
     {"result-type": "certificate-expired", "sending-mta-ip": "2001:db8:abcd:0012::1",
      "receiving-mx-hostname": "mx1.mail.company-y.example", "failed-session-count": 100},
     {"result-type": "starttls-not-supported", "sending-mta-ip": "2001:db8:abcd:0013::1",
      "receiving-mx-hostname": "mx2.mail.company-y.example", "receiving-ip": "203.0.113.56",
      "failed-session-count": 200,
      "additional-information": "https://reports.company-x.example/report_info?id=5065427c-23d3#StarttlsNotSupported"},
     {"result-type": "validation-failure", "sending-mta-ip": "198.51.100.62", "receiving-ip": "203.0.113.58",
      "receiving-mx-hostname": "mx-backup.mail.company-y.example", "failed-session-count": 3,
      "failure-error-code": "X509_V_ERR_PROXY_PATH_LENGTH_EXCEEDED"}]
 }]
}"#;

/// Google's shape: one day 00:00:00Z-23:59:59Z, `no-policy-found` without
/// a policy-string, mx-host missing.
fn google(domain: &str, day: &str) -> String {
    format!(
        r#"{{"organization-name":"Google Inc.","date-range":{{"start-datetime":"{day}T00:00:00Z","end-datetime":"{day}T23:59:59Z"}},"contact-info":"smtp-tls-reporting@google.com","report-id":"{day}T00:00:00Z_{domain}","policies":[{{"policy":{{"policy-type":"no-policy-found","policy-domain":"{domain}"}},"summary":{{"total-successful-session-count":42,"total-failure-session-count":0}}}}]}}"#
    )
}

/// Microsoft's shape: an `sts` and a `tlsa` policy, the TLSA policy-string
/// a JSON document inside a string, mx-host a plain string.
fn microsoft(domain: &str, day: &str) -> String {
    format!(
        r#"{{"organization-name":"Microsoft Corporation","date-range":{{"start-datetime":"{day}T00:00:00Z","end-datetime":"{day}T23:59:59Z"}},"contact-info":"tlsrpt-noreply@microsoft.com","report-id":"133{day}+{domain}","policies":[{{"policy":{{"policy-type":"sts","policy-string":["version: STSv1","mode: testing","mx: mx.{domain}","max_age: 604800"],"policy-domain":"{domain}","mx-host":"mx.{domain}"}},"summary":{{"total-successful-session-count":17,"total-failure-session-count":2}},"failure-details":[{{"result-type":"sts-webpki-invalid","sending-mta-ip":"40.107.0.1","receiving-mx-hostname":"mx.{domain}","failed-session-count":2}}]}},{{"policy":{{"policy-type":"tlsa","policy-string":["{{\"usage\":3,\"selector\":1,\"mtype\":1}}"],"policy-domain":"{domain}","mx-host":"mx.{domain}"}},"summary":{{"total-successful-session-count":5,"total-failure-session-count":0}}}}]}}"#
    )
}

/// Mail.ru's shape: failure details without IPs, and a failure total that
/// does not match their sum (7 vs 2 + 1).
fn mail_ru(domain: &str, day: &str) -> String {
    format!(
        r#"{{"organization-name":"Mail.Ru","date-range":{{"start-datetime":"{day}T00:00:00Z","end-datetime":"{day}T23:59:59Z"}},"contact-info":"tlsrpt@corp.mail.ru","report-id":"mailru-{day}-{domain}","policies":[{{"policy":{{"policy-type":"sts","policy-domain":"{domain}","mx-host":["mx.{domain}"]}},"summary":{{"total-successful-session-count":100,"total-failure-session-count":7}},"failure-details":[{{"result-type":"certificate-not-trusted","failed-session-count":2}},{{"result-type":"a-type-nobody-registered","failed-session-count":1}}]}}]}}"#
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

fn today() -> String {
    time::OffsetDateTime::now_utc().date().to_string()
}

struct Rig {
    dir: tempfile::TempDir,
    config: PathBuf,
    serve: ServeProc,
    admin: SocketAddr,
    client: TlsClient,
}

impl Rig {
    fn start() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let (https, http, admin) = (common::loopback(), common::loopback(), common::loopback());
        common::write(dir.path(), "admin.token", TOKEN);
        let mut text = common::server_section(https, http, &dir.path().join("state"));
        text.push_str(&format!(
            "[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n[tlsrpt]\nreceive = true\n[defaults]\nmode = \"testing\"\nmx = [\"mx.example.net\"]\ntlsrpt_rua = \"mailto:tls@provider.example\"\n"
        ));
        for d in [
            "company-y.example",
            "google.example",
            "contoso.example",
            "mailru.example",
        ] {
            text.push_str(&format!("[[domain]]\nname = \"{d}\"\n"));
        }
        let config = common::write(dir.path(), "mtasts.toml", &text);
        let serve = ServeProc::start(&config, https, http);
        let client = TlsClient::trusting_pem_file(&dir.path().join("state/ca/ca.pem"));
        Rig {
            dir,
            config,
            serve,
            admin,
            client,
        }
    }

    fn config(&self) -> &str {
        self.config.to_str().expect("utf-8")
    }

    /// POSTs `body` to `https://mta-sts.<domain>/tlsrpt`.
    async fn post(&self, domain: &str, content_type: &str, body: &[u8]) -> Response {
        let host = format!("mta-sts.{domain}");
        self.client
            .post(self.serve.https, &host, "/tlsrpt", content_type, body)
            .await
            .expect("post")
    }

    fn summary(&self, extra: &[&str]) -> serde_json::Value {
        let mut args = vec![
            "tlsrpt",
            "summary",
            "--config",
            self.config(),
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let out = common::mtasts(&args);
        let (stdout, stderr) = common::output_text(&out);
        assert!(out.status.success(), "{stdout}{stderr}");
        serde_json::from_str(&stdout).expect("summary JSON")
    }
}

fn domain<'a>(summary: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    summary["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .find(|d| d["domain"] == name)
        .unwrap_or_else(|| panic!("{name} not in {summary}"))
}

fn text(resp: &Response) -> String {
    String::from_utf8_lossy(&resp.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_of_real_shapes_are_stored_once_and_summarised() {
    let rig = Rig::start();
    let day = today();
    let first = rig
        .post(
            "company-y.example",
            "application/tlsrpt+json",
            RFC_EXAMPLE.as_bytes(),
        )
        .await;
    assert_eq!(first.status, 200, "{}", text(&first));
    assert_eq!(text(&first), "stored\n");
    let again = rig
        .post(
            "company-y.example",
            "application/tlsrpt+gzip",
            &gzip(RFC_EXAMPLE.as_bytes()),
        )
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(text(&again), "already stored\n");
    // gzip recognised by its magic bytes whatever the type says.
    let g = rig
        .post(
            "google.example",
            "application/json",
            &gzip(google("google.example", &day).as_bytes()),
        )
        .await;
    assert_eq!(g.status, 200, "{}", text(&g));
    let m = rig
        .post(
            "contoso.example",
            "application/tlsrpt+json",
            microsoft("contoso.example", &day).as_bytes(),
        )
        .await;
    assert_eq!(m.status, 200, "{}", text(&m));
    let r = rig
        .post(
            "mailru.example",
            "application/tlsrpt+gzip",
            &gzip(mail_ru("mailru.example", &day).as_bytes()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));

    let all = rig.summary(&["--since", "all"]);
    let y = domain(&all, "company-y.example");
    assert_eq!(y["reports"], 1, "stored once: {y}");
    assert_eq!(y["successful"], 5326);
    assert_eq!(y["failed"], 303);
    assert_eq!(y["served"], true);
    assert_eq!(y["by_result_type"]["certificate-expired"], 100);
    assert_eq!(y["by_result_type"]["starttls-not-supported"], 200);
    assert_eq!(y["by_result_type"]["validation-failure"], 3);
    assert_eq!(y["by_organization"]["Company-X"]["successful"], 5326);
    assert_eq!(y["by_organization"]["Company-X"]["failed"], 303);
    assert_eq!(y["by_policy_type"]["sts"]["failed"], 303);
    assert_eq!(
        y["days"],
        serde_json::json!([{"date": "2016-04-01", "successful": 5326, "failed": 303}])
    );
    let g = domain(&all, "google.example");
    assert_eq!(g["by_policy_type"]["no-policy-found"]["successful"], 42);
    let c = domain(&all, "contoso.example");
    assert_eq!(c["successful"], 22);
    assert_eq!(c["by_policy_type"]["tlsa"]["successful"], 5);
    assert_eq!(c["by_result_type"]["sts-webpki-invalid"], 2);
    // Both numbers kept: the total says 7, the details 2 + 1.
    let r = domain(&all, "mailru.example");
    assert_eq!(r["failed"], 7);
    assert_eq!(r["by_result_type"]["certificate-not-trusted"], 2);
    assert_eq!(r["by_result_type"]["a-type-nobody-registered"], 1);
    // The default period (30 days) leaves the 2016 report out.
    let recent = rig.summary(&[]);
    assert!(
        recent["domains"]
            .as_array()
            .expect("domains")
            .iter()
            .all(|d| d["domain"] != "company-y.example"),
        "{recent}"
    );
    // A failure of our own policy host is logged with what we serve.
    let log = rig.serve.log();
    let warn = log
        .lines()
        .find(|l| l.contains("senders failed on our policy host"))
        .unwrap_or_else(|| panic!("no alert in {log}"));
    assert!(
        warn.contains("sts-webpki-invalid") && warn.contains("contoso.example"),
        "{warn}"
    );
    let served = common::served_id(&rig.client, rig.serve.https, "contoso.example").await;
    assert!(
        warn.contains(&served),
        "{warn} should name the served id {served}"
    );
    // Counted in Prometheus, without domain labels.
    let metrics = common::admin_metrics(rig.admin, TOKEN).await;
    assert!(
        metrics.contains("mtasts_tlsrpt_reports_total{result=\"stored\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mtasts_tlsrpt_reports_total{result=\"duplicate\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mtasts_tlsrpt_failed_sessions_total{result=\"sts-webpki-invalid\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mtasts_tlsrpt_failed_sessions_total{result=\"other\"} 1"),
        "{metrics}"
    );
    // The table names the same.
    let out = common::mtasts(&[
        "tlsrpt",
        "summary",
        "--config",
        rig.config(),
        "--since",
        "all",
        "company-y.example",
    ]);
    let (table, _) = common::output_text(&out);
    assert!(
        table.contains("company-y.example")
            && table.contains("5326")
            && table.contains("starttls-not-supported 200"),
        "{table}"
    );
    assert!(!table.contains("contoso.example"), "{table}");
    drop(rig.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reports_get_the_right_answer_and_store_nothing() {
    let rig = Rig::start();
    let day = today();
    // A gzip bomb: 30 MiB of spaces in ~30 KiB.
    let bomb = gzip(&vec![b' '; 30 * 1024 * 1024]);
    assert!(bomb.len() < 1024 * 1024);
    let r = rig
        .post("company-y.example", "application/tlsrpt+gzip", &bomb)
        .await;
    assert_eq!(r.status, 413, "{}", text(&r));
    // Over 1 MiB on the wire.
    let big = vec![b'{'; 1024 * 1024 + 1];
    let r = rig
        .post("company-y.example", "application/tlsrpt+json", &big)
        .await;
    assert_eq!(r.status, 413, "{}", text(&r));
    // Truncated gzip.
    let gz = gzip(google("company-y.example", &day).as_bytes());
    let r = rig
        .post(
            "company-y.example",
            "application/tlsrpt+gzip",
            &gz[..gz.len() - 10],
        )
        .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    // Not JSON, and JSON that is not a report (says where).
    let r = rig
        .post("company-y.example", "application/tlsrpt+json", b"not json")
        .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    let r = rig
        .post("company-y.example", "application/tlsrpt+json", br#"{"organization-name":"X","report-id":"1","date-range":{"start-datetime":"2024-01-01T00:00:00Z","end-datetime":"2024-01-01T23:59:59Z"},"policies":[{"policy":{"policy-type":"sts"},"summary":{}}]}"#)
        .await;
    assert_eq!(r.status, 400);
    assert!(
        text(&r).contains("policies[0].policy.policy-domain"),
        "{}",
        text(&r)
    );
    // Another tenant's domain, posted to this policy host.
    let r = rig
        .post(
            "company-y.example",
            "application/tlsrpt+json",
            google("google.example", &day).as_bytes(),
        )
        .await;
    assert_eq!(r.status, 403, "{}", text(&r));
    // Another content type; another method.
    let r = rig
        .post("company-y.example", "text/plain", RFC_EXAMPLE.as_bytes())
        .await;
    assert_eq!(r.status, 415, "{}", text(&r));
    let get = rig
        .client
        .request(
            rig.serve.https,
            "mta-sts.company-y.example",
            "GET",
            "mta-sts.company-y.example",
            "/tlsrpt",
        )
        .await
        .expect("GET");
    assert_eq!(get.status, 405);
    // Nothing was stored, and the policy is still served.
    let all = rig.summary(&["--since", "all"]);
    assert_eq!(all["domains"], serde_json::json!([]), "{all}");
    let policy = rig
        .client
        .get_policy(rig.serve.https, "company-y.example")
        .await
        .expect("policy");
    assert_eq!(policy.status, 200);
}

#[test]
fn records_name_the_https_endpoint_beside_the_configured_rua() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::write(
        dir.path(),
        "mtasts.toml",
        "[tlsrpt]\nreceive = true\n[defaults]\nmode = \"testing\"\nmx = [\"mx.example.net\"]\ntlsrpt_rua = \"mailto:tls@provider.example\"\n[[domain]]\nname = \"a.example\"\n[[domain]]\nname = \"b.example\"\ntlsrpt_rua = \"mailto:b@b.example\"\n",
    );
    let out = common::mtasts(&[
        "records",
        "--config",
        config.to_str().expect("utf-8"),
        "--format",
        "json",
    ]);
    let (stdout, stderr) = common::output_text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let records: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let tlsrpt: Vec<&str> = records
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| {
            r["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("_smtp._tls."))
        })
        .map(|r| r["value"].as_str().expect("value"))
        .collect();
    assert_eq!(
        tlsrpt,
        [
            "v=TLSRPTv1; rua=mailto:tls@provider.example,https://mta-sts.a.example/tlsrpt;",
            "v=TLSRPTv1; rua=mailto:b@b.example,https://mta-sts.b.example/tlsrpt;",
        ]
    );
}

/// A report as a reporter mails it (RFC 8460 §5.3.1).
fn mail(report_gz: &[u8], domain: &str) -> String {
    let b64 = data_encoding::BASE64.encode(report_gz);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "From: noreply-smtp-tls-reporting@google.com\r\nTo: tls@{domain}\r\nSubject: Report Domain: {domain} Submitter: google.com Report-ID: <x>\r\nTLS-Report-Domain: {domain}\r\nTLS-Report-Submitter: google.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"_b_\"\r\n\r\n--_b_\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThis is an aggregate TLS report from google.com\r\n--_b_\r\nContent-Type: application/tlsrpt+gzip; name=\"google.com!{domain}!1.json.gz\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"google.com!{domain}!1.json.gz\"\r\n\r\n{}\r\n--_b_--\r\n",
        lines.join("\r\n")
    )
}

fn ingest(config: &Path, files: &[&Path], stdin: Option<&[u8]>) -> std::process::Output {
    let mut cmd = std::process::Command::new(common::bin());
    cmd.args(["tlsrpt", "ingest", "--config"])
        .arg(config)
        .args(files);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("stdin");
    }
    drop(input);
    child.wait_with_output().expect("wait")
}

#[test]
fn ingest_takes_mailed_and_bare_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "[server]\nstate_dir = \"{}\"\n[tlsrpt]\ndkim = \"check\"\n[defaults]\nmode = \"testing\"\nmx = [\"mx.example.net\"]\n[[domain]]\nname = \"a.example\"\n",
            dir.path().join("state").display()
        ),
    );
    let day = today();
    let message = common::write(
        dir.path(),
        "report.eml",
        &mail(&gzip(google("a.example", &day).as_bytes()), "a.example"),
    );
    let out = ingest(&config, &[&message], None);
    let (stdout, stderr) = common::output_text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("stored Google Inc."), "{stdout}");
    assert!(
        stdout.contains("no DKIM signature; stored anyway"),
        "dkim = \"check\" says so: {stdout}"
    );
    let again = ingest(&config, &[&message], None);
    let (stdout, stderr) = common::output_text(&again);
    assert!(again.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("already stored"), "{stdout}");
    // Bare JSON on stdin, for a domain we do not serve: kept, marked.
    let bare = microsoft("elsewhere.example", &day);
    let out = ingest(&config, &[], Some(bare.as_bytes()));
    assert!(out.status.success(), "{:?}", common::output_text(&out));
    // Not a report: a clear message and exit 1.
    let junk = common::write(
        dir.path(),
        "junk.eml",
        "Subject: hello\r\n\r\njust text\r\n",
    );
    let out = ingest(&config, &[&junk], None);
    let (_, stderr) = common::output_text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("no application/tlsrpt"), "{stderr}");
    let out = common::mtasts(&[
        "tlsrpt",
        "summary",
        "--config",
        config.to_str().expect("utf-8"),
        "--format",
        "json",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&common::output_text(&out).0).expect("JSON");
    assert_eq!(domain(&summary, "a.example")["served"], true);
    assert_eq!(domain(&summary, "a.example")["reports"], 1);
    assert_eq!(domain(&summary, "elsewhere.example")["served"], false);
    // The store is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("state/tlsrpt.sqlite"))
            .expect("db")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_delivers_a_gzip_report_like_a_reporter_does() {
    let Some(curl) = common::find_binary("curl") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "curl is missing and CI=true"
        );
        return;
    };
    let rig = Rig::start();
    let file = rig.dir.path().join("report.json.gz");
    std::fs::write(
        &file,
        gzip(microsoft("contoso.example", &today()).as_bytes()),
    )
    .expect("write");
    let port = rig.serve.https.port();
    let out = std::process::Command::new(curl)
        .args(["--silent", "--show-error", "--fail-with-body", "--cacert"])
        .arg(rig.dir.path().join("state/ca/ca.pem"))
        .args([
            "--resolve",
            &format!("mta-sts.contoso.example:{port}:127.0.0.1"),
        ])
        .args([
            "-H",
            "Content-Type: application/tlsrpt+gzip",
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(format!("https://mta-sts.contoso.example:{port}/tlsrpt"))
        .output()
        .expect("curl");
    let (stdout, stderr) = common::output_text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout, "stored\n");
    let all = rig.summary(&[]);
    assert_eq!(domain(&all, "contoso.example")["reports"], 1);
}

/// Kills a child process when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, secs: u64, done: impl FnMut() -> bool, log: impl Fn() -> String) {
    common::wait_for_logged(what, std::time::Duration::from_secs(secs), log, done);
}

/// The reporting half of Postfix's TLSRPT support (`tlsrpt-reporter` from
/// PyPI): collectd receives a day's results as datagrams (the libtlsrpt
/// protocol), the day is rolled over (SIGUSR2, its development switch),
/// reportd builds the RFC 8460 report and delivers it gzipped over HTTPS
/// with curl (its default `http_script`) to the running server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tlsrpt_reporter_delivers_a_report_to_the_running_server() {
    let bin = std::env::var_os("MTASTS_TLSRPT_REPORTER_BIN").map(PathBuf::from);
    let Some(bin) = bin.filter(|b| b.join("tlsrpt-reportd").is_file()) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "tlsrpt-reporter is missing and CI=true: scripts/test.sh installs it (MTASTS_TLSRPT_REPORTER_BIN)"
        );
        eprintln!(
            "SKIPPING: set MTASTS_TLSRPT_REPORTER_BIN to a virtualenv's bin with tlsrpt-reporter"
        );
        return;
    };
    let rig = Rig::start();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path().display().to_string();
    let ca = rig.dir.path().join("state/ca/ca.pem");
    let port = rig.serve.https.port();
    let cfg = common::write(
        work.path(),
        "tlsrpt.cfg",
        &format!(
            "[tlsrpt_collectd]\nstorage = sqlite://{w}/collectd.sqlite\nsocketname = {w}/collectd.socket\nlogfilename = {w}/collectd.log\npidfilename = {w}/collectd.pid\nlog_level = debug\nsockettimeout = 1\n\n\
             [tlsrpt_fetcher]\nstorage = sqlite://{w}/collectd.sqlite\nlogfilename = {w}/fetcher.log\nlog_level = debug\n\n\
             [tlsrpt_reportd]\norganization_name = Test Reporter Inc.\ncontact_info = tlsrpt@reporter.example\nsender_address = noreply@reporter.example\n\
             dbname = {w}/reportd.sqlite\nlogfilename = {w}/reportd.log\npidfilename = {w}/reportd.pid\nlog_level = debug\n\
             http_script = curl --silent --fail --cacert {ca} --connect-to mta-sts.contoso.example:443:127.0.0.1:{port} --header 'Content-Type: application/tlsrpt+gzip' --data-binary @-\n\
             fetchers = {fetcher} --config_file {w}/tlsrpt.cfg\ninterval_main_loop = 1\nmax_retries_domainlist = 2\nmin_wait_domainlist = 0\nmax_wait_domainlist = 1\n\
             max_retries_domaindetails = 2\nmin_wait_domaindetails = 0\nmax_wait_domaindetails = 1\nspread_out_delivery = 1\n",
            ca = ca.display(),
            fetcher = bin.join("tlsrpt-fetcher").display(),
        ),
    );
    let log = |name: &str| std::fs::read_to_string(work.path().join(name)).unwrap_or_default();
    let spawn = |prog: &str| {
        Kill(
            std::process::Command::new(bin.join(prog))
                .arg("--config_file")
                .arg(&cfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn tlsrpt-reporter"),
        )
    };
    let collectd = spawn("tlsrpt-collectd");
    let socket = work.path().join("collectd.socket");
    wait_until(
        "collectd's socket",
        30,
        || socket.exists(),
        || log("collectd.log"),
    );
    // Two good sessions and one that failed on our policy host's
    // certificate (libtlsrpt's codes: policy type 2 = sts, 303 =
    // sts-webpki-invalid).
    let policy = serde_json::json!({"policy-type": 2, "policy-string": ["version: STSv1", "mode: testing", "mx: mx.example.net", "max_age: 86400"],
        "policy-domain": "contoso.example", "mx-host": ["mx.example.net"]});
    let datagram = |failed: bool| {
        let mut p = policy.clone();
        p["f"] = serde_json::json!(u8::from(failed));
        p["t"] = serde_json::json!(u8::from(failed));
        if failed {
            p["failure-details"] =
                serde_json::json!([{"c": 303, "n": "mx.example.net", "s": "192.0.2.1"}]);
        }
        serde_json::json!({"dpv": "1", "d": "contoso.example",
            "pr": "v=TLSRPTv1; rua=https://mta-sts.contoso.example/tlsrpt;", "policies": [p]})
        .to_string()
    };
    let sock = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    for failed in [false, false, true] {
        sock.send_to(datagram(failed).as_bytes(), &socket)
            .expect("send datagram");
    }
    wait_until(
        "collectd to commit the datagrams",
        30,
        || log("collectd.log").contains("(3 total)"),
        || log("collectd.log"),
    );
    let pid = std::fs::read_to_string(work.path().join("collectd.pid")).expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-USR2", pid.trim()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_until(
        "the day roll-over",
        30,
        || log("collectd.log").contains("FOR DEVELOPMENT"),
        || log("collectd.log"),
    );
    let reportd = spawn("tlsrpt-reportd");
    wait_until(
        "reportd's delivery",
        90,
        || log("reportd.log").contains("succeeded"),
        || format!("{}{}", log("reportd.log"), log("fetcher.log")),
    );
    let mut all = rig.summary(&["--since", "all"]);
    let start = std::time::Instant::now();
    while all["domains"].as_array().is_none_or(|d| d.is_empty()) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "delivered but not stored:\n{}\n{}",
            log("reportd.log"),
            rig.serve.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        all = rig.summary(&["--since", "all"]);
    }
    let c = domain(&all, "contoso.example");
    assert_eq!(c["reports"], 1, "{c}");
    assert_eq!(c["successful"], 2, "{c}");
    assert_eq!(c["failed"], 1, "{c}");
    assert_eq!(c["by_result_type"]["sts-webpki-invalid"], 1, "{c}");
    assert_eq!(
        c["by_organization"]["Test Reporter Inc."]["failed"], 1,
        "{c}"
    );
    assert!(
        rig.serve
            .log()
            .contains("senders failed on our policy host")
    );
    drop((reportd, collectd));
}

/// Mailed reports must carry a DKIM signature of the reporting domain
/// (RFC 8460 section 5.3.1): signed with an Ed25519 key whose record knot
/// serves, verified through `[tlsrpt] dkim_resolver`.
#[test]
fn mailed_reports_need_a_valid_dkim_signature() {
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::DkimSigner;
    let pkcs8 =
        aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .expect("key");
    let key = mail_auth::common::crypto::Ed25519Key::from_pkcs8_der(pkcs8.as_ref()).expect("key");
    let public = data_encoding::BASE64.encode(&key.public_key());
    let Some(knot) = common::knot::Knot::start(
        "reporter.example",
        &format!("sel._domainkey TXT \"v=DKIM1; k=ed25519; p={public}\""),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "[server]\nstate_dir = \"{}\"\n[tlsrpt]\ndkim_resolver = \"{}\"\n[defaults]\nmode = \"testing\"\nmx = [\"mx.example.net\"]\n[[domain]]\nname = \"a.example\"\n",
            dir.path().join("state").display(),
            knot.addr
        ),
    );
    let day = today();
    let message = mail(&gzip(google("a.example", &day).as_bytes()), "a.example").replace(
        "From: noreply-smtp-tls-reporting@google.com",
        "From: tlsrpt@reporter.example",
    );
    let signer = DkimSigner::from_key(key)
        .domain("reporter.example")
        .selector("sel")
        .headers([
            "From",
            "To",
            "Subject",
            "TLS-Report-Domain",
            "TLS-Report-Submitter",
        ]);
    let signature = signer.sign(message.as_bytes()).expect("sign");
    let signed = format!("{}{message}", signature.to_header());
    let ingest_text = |name: &str, text: &str| {
        let file = common::write(dir.path(), name, text);
        ingest(&config, &[&file], None)
    };
    // Unsigned: refused under the default dkim = "require".
    let out = ingest_text("unsigned.eml", &message);
    let (_, stderr) = common::output_text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no DKIM signature") && stderr.contains("5.3.1"),
        "{stderr}"
    );
    // Signed and untouched: stored, naming the signer.
    let out = ingest_text("signed.eml", &signed);
    let (stdout, stderr) = common::output_text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("DKIM pass (d=reporter.example)"),
        "{stdout}"
    );
    // Signed, then changed in transit (another report id): refused.
    let altered = signed.replace("Subject: Report Domain:", "Subject: Report Domain changed:");
    let out = ingest_text("altered.eml", &altered);
    let (_, stderr) = common::output_text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("DKIM did not verify"), "{stderr}");
    // Bare reports (not mail) carry no signature to check: stored.
    let bare = microsoft("a.example", &day);
    let out = ingest(&config, &[], Some(bare.as_bytes()));
    assert!(out.status.success(), "{:?}", common::output_text(&out));
}

/// Behind a TLS-terminating proxy (`behind_proxy = true`) the plain-HTTP
/// listener takes reports too, by the Host header; the same rules hold.
#[test]
fn behind_a_proxy_the_http_listener_takes_reports_by_host() {
    use std::io::{Read, Write as _};
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http) = (common::loopback(), common::loopback());
    let mut text = common::server_section(https, http, &dir.path().join("state"));
    text.push_str("behind_proxy = true\n[tlsrpt]\nreceive = true\n[defaults]\nmode = \"testing\"\nmx = [\"mx.example.net\"]\n[[domain]]\nname = \"proxied.example\"\n");
    let config = common::write(dir.path(), "mtasts.toml", &text);
    let _serve = ServeProc::start(&config, https, http);
    let post = |host: &str, body: &str| -> u16 {
        let mut s = std::net::TcpStream::connect(http).expect("connect");
        write!(
            s,
            "POST /tlsrpt HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/tlsrpt+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        parse_response(&raw, false).status
    };
    let day = today();
    assert_eq!(
        post("mta-sts.proxied.example", &google("proxied.example", &day)),
        200
    );
    assert_eq!(
        post("mta-sts.proxied.example", &google("other.example", &day)),
        403
    );
    assert_eq!(
        post("mta-sts.unknown.example", &google("unknown.example", &day)),
        404
    );
    let out = common::mtasts(&[
        "tlsrpt",
        "summary",
        "--config",
        config.to_str().expect("utf-8"),
        "--format",
        "json",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&common::output_text(&out).0).expect("JSON");
    assert_eq!(domain(&summary, "proxied.example")["reports"], 1);
}
