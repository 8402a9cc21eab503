//! `mtasts dns push` against a real knotd: TSIG-signed RFC 2136 updates,
//! read back from the server and compared with `mtasts records`; wrong keys,
//! a server that is down, records that are not ours.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Instant;

use common::knot::{KEY_NAME, Knot};
use common::{mtasts, output_text as text};
use hickory_proto::rr::RecordType;
use serde::Deserialize;

const ZONE: &str = "example.test";

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// The usual config (`DOMAINS`) pushing to `knot`'s zone with its key.
    fn for_knot(knot: &Knot) -> Setup {
        Setup::new(
            DOMAINS,
            &knot.addr.to_string(),
            ZONE,
            KEY_NAME,
            &knot.secret,
        )
    }

    /// A config with `body` (domains etc.) and a `[dns.update]` section.
    fn new(body: &str, server: &str, zone: &str, key: &str, secret: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("mtasts.toml");
        let s = Setup { _dir: dir, config };
        s.write(body, server, zone, key, secret);
        s
    }

    fn write(&self, body: &str, server: &str, zone: &str, key: &str, secret: &str) {
        let text = format!(
            "{body}\n[dns.update]\nserver = \"{server}\"\nzone = \"{zone}\"\nkey_name = \"{key}\"\nsecret = \"{secret}\"\nretries = 2\ntimeout = \"2s\"\n"
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    fn path(&self) -> &str {
        self.config.to_str().expect("utf-8 path")
    }

    fn push(&self, extra: &[&str]) -> Output {
        let mut args = vec!["dns", "push", "--config", self.path()];
        args.extend_from_slice(extra);
        mtasts(&args)
    }

    fn records(&self, extra: &[&str]) -> Vec<JsonRecord> {
        let mut args = vec!["records", "--config", self.path(), "--format", "json"];
        args.extend_from_slice(extra);
        let out = mtasts(&args);
        assert!(out.status.success(), "{}", text(&out).1);
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// The id of the body `mtasts policy` prints (what is served).
    fn served_id(&self, domain: &str) -> String {
        let out = mtasts(&["policy", "--config", self.path(), domain]);
        assert!(out.status.success(), "{}", text(&out).1);
        common::policy_id(&out.stdout)
    }
}

#[derive(Debug, Deserialize)]
struct JsonRecord {
    #[allow(dead_code)]
    domain: String,
    name: String,
    #[serde(rename = "type")]
    rtype: String,
    ttl: u32,
    value: String,
}

fn rtype(s: &str) -> RecordType {
    s.parse().expect("record type")
}

/// The RRsets of `recs` inside `zone`, values sorted.
type Sets = std::collections::BTreeMap<(String, String), Vec<(u32, String)>>;

fn wanted_sets(recs: &[JsonRecord], zone: &str) -> Sets {
    let suffix = format!(".{zone}.");
    let mut sets = Sets::new();
    for r in recs.iter().filter(|r| r.name.ends_with(&suffix)) {
        sets.entry((r.name.clone(), r.rtype.clone()))
            .or_default()
            .push((r.ttl, r.value.clone()));
    }
    sets.values_mut().for_each(|v| v.sort());
    sets
}

fn served_sets(knot: &Knot, want: &Sets) -> Sets {
    want.keys()
        .map(|(name, t)| ((name.clone(), t.clone()), knot.rrset(name, rtype(t))))
        .collect()
}

/// Every record of `recs` inside `zone` is on the server exactly: same
/// RRsets (no extra records), same TTLs and values. Returns the RRset count.
fn assert_served(knot: &Knot, recs: &[JsonRecord], zone: &str) -> usize {
    let want = wanted_sets(recs, zone);
    assert_eq!(served_sets(knot, &want), want);
    want.len()
}

/// Like [`assert_served`], for a push running in the background.
fn eventually_served(knot: &Knot, recs: &[JsonRecord], zone: &str) {
    let want = wanted_sets(recs, zone);
    let deadline = Instant::now() + std::time::Duration::from_secs(15);
    while Instant::now() < deadline && served_sets(knot, &want) != want {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(served_sets(knot, &want), want);
}

const DOMAINS: &str = r#"
[defaults]
mx = ["mx1.example.test", "*.mx.example.test"]
host_a = ["127.0.0.1"]
host_aaaa = ["::1"]
ttl = 600
tlsrpt_rua = "mailto:tls@example.test"

[[domain]]
name = "a.example.test"

[[domain]]
name = "b.example.test"
mode = "enforce"

[[domain]]
name = "outside.example"
"#;

#[test]
fn push_publishes_records_and_is_idempotent() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    let setup = Setup::for_knot(&knot);
    let started = Instant::now();
    let out = setup.push(&[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", knot.log());
    assert!(
        stdout.contains("2 updated, 0 unchanged, 0 failed"),
        "{stdout}"
    );
    assert!(stderr.contains("outside zone example.test"), "{stderr}");
    eprintln!("first push: {:?}", started.elapsed());

    let n = assert_served(&knot, &setup.records(&[]), ZONE);
    assert_eq!(n, 8, "TXT, A, AAAA, TLS-RPT for two domains");
    for d in ["a.example.test", "b.example.test"] {
        let txt = knot.rrset(&format!("_mta-sts.{d}."), RecordType::TXT);
        assert_eq!(txt.len(), 1);
        assert_eq!(txt[0].1, format!("v=STSv1; id={};", setup.served_id(d)));
    }
    // Both domains went in one batched UPDATE: one commit on the server.
    assert_eq!(
        knot.log().matches("DDNS, finished").count(),
        1,
        "{}",
        knot.log()
    );

    // Nothing changed: nothing is sent.
    let out = setup.push(&[]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(
        stdout.contains("0 updated, 2 unchanged, 0 failed"),
        "{stdout}"
    );
    assert_eq!(knot.log().matches("DDNS, finished").count(), 1);
}

#[test]
fn policy_change_rotates_only_the_id() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    let server = knot.addr.to_string();
    let setup = Setup::for_knot(&knot);
    assert!(setup.push(&[]).status.success());
    let old = setup.served_id("a.example.test");

    let changed = DOMAINS.replace(
        "name = \"a.example.test\"",
        "name = \"a.example.test\"\nmode = \"enforce\"",
    );
    setup.write(&changed, &server, ZONE, KEY_NAME, &knot.secret);
    let new = setup.served_id("a.example.test");
    assert_ne!(old, new);
    let out = setup.push(&[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("updated a.example.test: _mta-sts.a.example.test. TXT\n"),
        "only the TXT changes: {stdout}"
    );
    assert!(stdout.contains("1 updated, 1 unchanged"), "{stdout}");
    let txt = knot.rrset("_mta-sts.a.example.test.", RecordType::TXT);
    assert_eq!(txt, [(600, format!("v=STSv1; id={new};"))]);
    assert_served(&knot, &setup.records(&[]), ZONE);
}

#[test]
fn dry_run_sends_nothing() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    let setup = Setup::for_knot(&knot);
    let out = setup.push(&["--dry-run", "a.example.test"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("would update a.example.test:"), "{stdout}");
    assert!(stdout.contains("1 to update"), "{stdout}");
    assert!(
        knot.rrset("_mta-sts.a.example.test.", RecordType::TXT)
            .is_empty()
    );
}

#[test]
fn wrong_secret_is_a_clear_error_and_changes_nothing() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    // A valid key of the right length, just not the server's.
    let wrong = data_encoding::BASE64.encode(&[0x5a; 32]);
    assert_ne!(wrong, knot.secret);
    let setup = Setup::new(DOMAINS, &knot.addr.to_string(), ZONE, KEY_NAME, &wrong);
    let out = setup.push(&[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rejected TSIG key \"mtasts-key\": BADSIG"),
        "{stderr}"
    );
    assert!(stdout.contains("1 failed"), "{stdout}");
    // The first rejection stops the push: no point repeating it per domain.
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
    assert!(
        knot.rrset("_mta-sts.a.example.test.", RecordType::TXT)
            .is_empty()
    );
}

#[test]
fn unknown_key_name_is_a_clear_error() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    let setup = Setup::new(
        DOMAINS,
        &knot.addr.to_string(),
        ZONE,
        "nobody-key",
        &knot.secret,
    );
    let out = setup.push(&[]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rejected TSIG key \"nobody-key\": BADKEY"),
        "{stderr}"
    );
}

#[test]
fn server_down_is_retried_then_reported() {
    // Nothing listens on a port we just freed (knotd not needed).
    let port = common::free_port();
    let secret = data_encoding::BASE64.encode(&[1; 32]);
    let setup = Setup::new(
        DOMAINS,
        &format!("127.0.0.1:{port}"),
        ZONE,
        KEY_NAME,
        &secret,
    );
    let started = Instant::now();
    let out = setup.push(&[]);
    let elapsed = started.elapsed();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "cannot reach DNS server 127.0.0.1:{port} (tried 3 times)"
        )),
        "{stderr}"
    );
    assert_eq!(stderr.matches("retrying in").count(), 2, "{stderr}");
    // Backoff 200 ms + 400 ms.
    assert!(elapsed.as_millis() >= 600, "{elapsed:?}");
}

#[test]
fn foreign_txt_is_not_replaced_but_stale_sts_is() {
    let Some(knot) = Knot::start(
        ZONE,
        "_mta-sts.a TXT \"google-site-verification=abc\"\n\
         _mta-sts.b TXT \"v=STSv1; id=old1;\"\n\
         _mta-sts.b TXT \"v=STSv1; id=old2;\"",
    ) else {
        return;
    };
    let setup = Setup::for_knot(&knot);
    let out = setup.push(&[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("error: a.example.test: _mta-sts.a.example.test. TXT: refusing to replace \"google-site-verification=abc\""),
        "{stderr}"
    );
    assert_eq!(
        knot.rrset("_mta-sts.a.example.test.", RecordType::TXT),
        [(300, "google-site-verification=abc".to_owned())]
    );
    // b had two old STSv1 records (invalid per RFC 8461 §3.1): now one.
    assert!(
        stdout.contains("1 updated, 0 unchanged, 1 failed"),
        "{stdout}"
    );
    assert_eq!(
        knot.rrset("_mta-sts.b.example.test.", RecordType::TXT),
        [(
            600,
            format!("v=STSv1; id={};", setup.served_id("b.example.test"))
        )]
    );
}

#[test]
fn delegated_provider_side_is_pushed_to_the_provider_zone() {
    let zone = "sts.provider.test";
    let Some(knot) = Knot::start(zone, "") else {
        return;
    };
    let body = r#"
[defaults]
mx = ["mx.customer.example"]

[[domain]]
name = "customer.example"

[[domain]]
name = "other-customer.example"
mode = "enforce"

[delegation]
zone = "sts.provider.test"
policy_host = "mta-sts.sts.provider.test"
host_a = ["127.0.0.1"]
"#;
    let setup = Setup::new(body, &knot.addr.to_string(), zone, KEY_NAME, &knot.secret);
    let out = setup.push(&[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("3 updated"), "{stdout}");
    let provider = setup.records(&["--for", "provider"]);
    assert_eq!(assert_served(&knot, &provider, zone), 3);
    // Follow each customer's CNAME target to the served id.
    for c in setup.records(&["--for", "customer"]) {
        if c.rtype == "CNAME" && c.name.starts_with("_mta-sts.") {
            let domain = c.name.trim_start_matches("_mta-sts.").trim_end_matches('.');
            let txt = knot.rrset(&c.value, RecordType::TXT);
            assert_eq!(
                txt.iter().map(|t| t.1.clone()).collect::<Vec<_>>(),
                [format!("v=STSv1; id={};", setup.served_id(domain))]
            );
        }
    }
}

fn id_of(body: &[u8]) -> String {
    common::policy_id(body)
}

/// Polls knot until `_mta-sts.<domain>` holds exactly `want`.
fn wait_for_txt(knot: &Knot, domain: &str, want: &str) -> bool {
    let deadline = Instant::now() + std::time::Duration::from_secs(15);
    while Instant::now() < deadline {
        let txt = knot.rrset(&format!("_mta-sts.{domain}."), RecordType::TXT);
        if txt.len() == 1 && txt[0].1 == want {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[test]
fn serve_pushes_after_start_and_after_reload() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    let server = knot.addr.to_string();
    let (https, http) = (common::loopback(), common::loopback());
    let dir = tempfile::tempdir().expect("tempdir");
    let head = format!(
        "{}behind_proxy = true\n\n[tls]\nmode = \"self-signed\"\n",
        common::server_section(https, http, &dir.path().join("state"))
    );
    let setup = Setup::for_knot(&knot);
    let with_auto = |domains: &str| {
        setup.write(
            &format!("{head}{domains}"),
            &server,
            ZONE,
            KEY_NAME,
            &knot.secret,
        );
        let text = std::fs::read_to_string(&setup.config).expect("read");
        std::fs::write(
            &setup.config,
            text.replace("retries = 2\n", "retries = 2\nauto_push = true\n"),
        )
        .expect("write");
    };
    with_auto(DOMAINS);
    let serve = common::ServeProc::start(&setup.config, https, http);
    let serve_log = || serve.log();

    let first = setup.served_id("a.example.test");
    assert!(
        wait_for_txt(&knot, "a.example.test", &format!("v=STSv1; id={first};")),
        "no push after start:\n{}\n{}",
        serve_log(),
        knot.log()
    );
    assert_eq!(
        common::served_body(http.port(), "a.example.test").map(|b| id_of(&b)),
        Some(first.clone())
    );
    eventually_served(&knot, &setup.records(&[]), ZONE);

    // Change a policy and reload: the new id reaches DNS, and by then the
    // new body is what the server serves.
    with_auto(&DOMAINS.replace(
        "name = \"a.example.test\"",
        "name = \"a.example.test\"\nmode = \"enforce\"",
    ));
    let second = setup.served_id("a.example.test");
    assert_ne!(first, second);
    serve.signal("HUP");
    assert!(
        wait_for_txt(&knot, "a.example.test", &format!("v=STSv1; id={second};")),
        "no push after reload:\n{}",
        serve_log()
    );
    assert_eq!(
        common::served_body(http.port(), "a.example.test").map(|b| id_of(&b)),
        Some(second)
    );
    eventually_served(&knot, &setup.records(&[]), ZONE);
    let log = serve_log();
    assert!(log.contains("dns push: updated"), "{log}");
}

/// The prerequisites `dns push` sends, checked by knotd itself: an UPDATE
/// built from a stale read must be refused and change nothing; built from
/// the current state it applies.
#[test]
fn stale_prerequisite_is_refused_by_the_server() {
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record};
    use mtasts::dns::update::{Change, rrsets, update_message};

    let Some(knot) = Knot::start(ZONE, "_mta-sts.a TXT \"v=STSv1; id=current;\"") else {
        return;
    };
    let zone = Name::from_ascii("example.test.").expect("zone");
    let want = mtasts::dns::Record {
        domain: "a.example.test".into(),
        name: "_mta-sts.a.example.test.".into(),
        rtype: "TXT",
        ttl: 300,
        value: "v=STSv1; id=new;".into(),
        zone: "example.test.".into(),
    };
    let (sets, _) = rrsets(&[want], &zone, None).expect("rrsets");
    let (signer, now) = knot.signer();
    let txt = |id: &str| {
        Record::from_rdata(
            sets[0].name.clone(),
            300,
            RData::TXT(hickory_proto::rr::rdata::TXT::new(vec![format!(
                "v=STSv1; id={id};"
            )])),
        )
    };
    let send = |current: Vec<Record>| {
        let mut msg = update_message(
            &zone,
            &[Change {
                want: &sets[0],
                current,
            }],
        );
        let mut verifier = msg.finalize(&signer, now).expect("sign").expect("verifier");
        let resp = knot
            .exchange(&msg.to_vec().expect("wire"))
            .expect("knot answers");
        verifier.verify(&resp).expect("knot signs its answer");
        Message::from_vec(&resp).expect("answer").response_code
    };

    // Someone changed the record after our read of "id=stale".
    assert_eq!(send(vec![txt("stale")]), ResponseCode::NXRRSet);
    // We believed the RRset absent, but it exists.
    assert_eq!(send(vec![]), ResponseCode::YXRRSet);
    assert_eq!(
        knot.rrset("_mta-sts.a.example.test.", RecordType::TXT),
        [(300, "v=STSv1; id=current;".to_owned())],
        "a refused update changes nothing"
    );
    // The read matches the server: applied.
    assert_eq!(send(vec![txt("current")]), ResponseCode::NoError);
    assert_eq!(
        knot.rrset("_mta-sts.a.example.test.", RecordType::TXT),
        [(300, "v=STSv1; id=new;".to_owned())]
    );
}

#[test]
fn oversized_batch_goes_domain_by_domain() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    // Three TLS-RPT records of ~25 KB each: together over one 64 KiB
    // message, so each domain gets its own UPDATE.
    let long = format!("https://reports.example.test/{}", "r".repeat(25_000));
    let body = format!(
        "[defaults]\nmode = \"none\"\nttl = 60\ntlsrpt_rua = \"{long}\"\n\n[[domain]]\nname = \"a.example.test\"\n[[domain]]\nname = \"b.example.test\"\n[[domain]]\nname = \"c.example.test\"\n"
    );
    let setup = Setup::new(&body, &knot.addr.to_string(), ZONE, KEY_NAME, &knot.secret);
    let out = setup.push(&[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("3 updated"), "{stdout}");
    assert!(!stderr.contains("retrying"), "{stderr}");
    assert_eq!(knot.log().matches("DDNS, finished").count(), 3);
    assert_served(&knot, &setup.records(&[]), ZONE);
}
