//! Retiring a domain (RFC 8461 §8.3) end to end, against a real knotd and
//! the real binary: `retire = true` serves `mode: none` with a new id that
//! reaches DNS; `dns push --prune` refuses before the longest published
//! `max_age` (at least one day) has passed and then deletes only the records
//! mtasts published. The binary reads the real clock; the day that must pass
//! is simulated by moving the recorded start (`since` in retire.json) back,
//! exactly what the file would hold had the push been a day earlier.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Instant;

use common::knot::{KEY_NAME, Knot};
use common::{mtasts, output_text as text};
use hickory_proto::rr::RecordType;

const ZONE: &str = "example.test";

/// `a` retires (max_age 3 s, so the one-day minimum wait + TTL 2 s); `b`
/// stays.
const DOMAINS: &str = r#"
[defaults]
mx = ["mx1.example.test"]
host_a = ["127.0.0.1"]
tlsrpt_rua = "mailto:tls@example.test"
ttl = 2

[[domain]]
name = "a.example.test"
mode = "enforce"
max_age = 3

[[domain]]
name = "b.example.test"
"#;

const A: &str = "a.example.test";

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    head: String,
    tail: String,
}

impl Setup {
    fn new(knot: &Knot, https: std::net::SocketAddr, http: std::net::SocketAddr) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let head = format!(
            "{}behind_proxy = true\n",
            common::server_section(https, http, &dir.path().join("state"))
        );
        let tail = format!(
            "\n[dns.update]\nserver = \"{}\"\nzone = \"{ZONE}\"\nkey_name = \"{KEY_NAME}\"\nsecret = \"{}\"\nretries = 1\ntimeout = \"2s\"\n",
            knot.addr, knot.secret
        );
        let config = dir.path().join("mtasts.toml");
        let s = Setup {
            dir,
            config,
            head,
            tail,
        };
        s.write(DOMAINS);
        s
    }

    fn write(&self, domains: &str) {
        let text = format!("{}{domains}{}", self.head, self.tail);
        std::fs::write(&self.config, text).expect("write config");
    }

    fn path(&self) -> &str {
        self.config.to_str().expect("utf-8 path")
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", self.path()]);
        mtasts(&all)
    }

    fn state(&self) -> Option<serde_json::Value> {
        let text = std::fs::read(self.dir.path().join("state/retire.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Rewrites retire.json as if `a`'s mode none id had been published
    /// `ago` seconds before now.
    fn backdate(&self, ago: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let mut state = self.state().expect("state");
        state["domains"][A]["since"] = (now - ago).into();
        let path = self.dir.path().join("state/retire.json");
        std::fs::write(path, serde_json::to_vec(&state).expect("json")).expect("write");
    }

    /// The `_mta-sts` TXT value `mtasts records` prints for `domain`.
    fn records_txt(&self, domain: &str) -> String {
        let out = self.run(&["records", "--format", "json", domain]);
        assert!(out.status.success(), "{}", text(&out).1);
        let recs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
        recs.iter()
            .find(|r| r["name"] == format!("_mta-sts.{domain}."))
            .and_then(|r| r["value"].as_str())
            .expect("an _mta-sts record")
            .to_owned()
    }
}

fn id_of(body: &[u8]) -> String {
    common::policy_id(body)
}

/// GET the policy over the plain listener (behind_proxy = true serves it).
fn txt(knot: &Knot, name: &str) -> Vec<String> {
    knot.rrset(name, RecordType::TXT)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Adds a TXT record someone else owns (a TSIG-signed RFC 2136 UPDATE).
fn add_foreign_txt(knot: &Knot, name: &str, value: &str) {
    use hickory_proto::op::{Message, OpCode, Query, ResponseCode, UpdateMessage};
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::rr::{DNSClass, Name, RData, Record};

    let mut msg = Message::query();
    msg.metadata.op_code = OpCode::Update;
    let mut zone = Query::new();
    zone.set_name(Name::from_ascii(format!("{ZONE}.")).expect("zone"))
        .set_query_class(DNSClass::IN)
        .set_query_type(RecordType::SOA);
    msg.add_zone(zone);
    msg.add_update(Record::from_rdata(
        Name::from_ascii(name).expect("name"),
        300,
        RData::TXT(TXT::new(vec![value.to_owned()])),
    ));
    let (signer, now) = knot.signer();
    msg.finalize(&signer, now).expect("sign");
    let resp = knot
        .exchange(&msg.to_vec().expect("wire"))
        .expect("knot answers");
    let resp = Message::from_vec(&resp).expect("answer");
    assert_eq!(resp.response_code, ResponseCode::NoError);
}

fn retiring(domains: &str) -> String {
    domains.replace(
        "name = \"a.example.test\"\n",
        "name = \"a.example.test\"\nretire = true\n",
    )
}

fn without_a(domains: &str) -> String {
    let start = domains
        .find("[[domain]]\nname = \"a.example.test\"")
        .expect("a");
    let end = domains
        .find("[[domain]]\nname = \"b.example.test\"")
        .expect("b");
    format!("{}{}", &domains[..start], &domains[end..])
}

#[test]
fn retire_publishes_mode_none_then_prune_waits_for_the_old_max_age() {
    let Some(knot) = Knot::start(ZONE, "a TXT \"v=spf1 -all\"") else {
        return;
    };
    let started = Instant::now();
    let (https, http) = (common::loopback(), common::loopback());
    let setup = Setup::new(&knot, https, http);

    // Before: a is in enforce mode, its records are in DNS.
    let out = setup.run(&["dns", "push"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let old_txt = setup.records_txt(A);
    assert_eq!(
        txt(&knot, "_mta-sts.a.example.test."),
        std::slice::from_ref(&old_txt)
    );
    let state = setup
        .state()
        .expect("dns push records the max_age published");
    assert!(
        state["domains"].as_object().is_some_and(|d| d.is_empty()),
        "nothing retires yet: {state}"
    );
    assert_eq!(state["max_age_published"][A], 3, "{state}");

    // retire = true, served by `serve`, whose automatic push publishes the
    // new id and starts the retirement clock.
    let auto = setup
        .tail
        .replace("retries = 1", "retries = 1\nauto_push = true");
    std::fs::write(
        &setup.config,
        format!("{}{}{auto}", setup.head, retiring(DOMAINS)),
    )
    .expect("write config");
    let serve = common::ServeProc::start(&setup.config, https, http);
    let body = common::served_body(http.port(), A).expect("policy served");
    assert_eq!(
        body, b"version: STSv1\r\nmode: none\r\nmx: mx1.example.test\r\nmax_age: 3\r\n",
        "mode none, mx lines kept (issue 9 item 13)"
    );
    let new_txt = format!("v=STSv1; id={};", id_of(&body));
    assert_ne!(new_txt, old_txt, "a new id");
    assert_eq!(setup.records_txt(A), new_txt, "records print the new id");
    common::wait_for("the new id in DNS", || {
        txt(&knot, "_mta-sts.a.example.test.") == [new_txt.clone()]
    });
    common::wait_for("retire.json", || {
        setup
            .state()
            .is_some_and(|s| s["domains"][A]["since"].is_u64())
    });
    let state = setup.state().expect("state");
    assert_eq!(state["domains"][A]["old_max_age"], 3);
    assert_eq!(state["domains"][A]["ttl"], 2);
    assert!(
        state["domains"].get("b.example.test").is_none(),
        "b does not retire: {state}"
    );
    let out = setup.run(&["retire"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(
        stdout.contains("a.example.test: retiring since ")
            && stdout.contains("keep it configured until"),
        "{stdout}"
    );
    drop(serve);

    // Removed from the config at once: too early to delete anything.
    setup.write(&without_a(DOMAINS));
    let out = setup.run(&["dns", "push"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out).1.contains(
            "note: retired a.example.test left the config; `mtasts dns push --prune` deletes"
        ),
        "{:?}",
        text(&out)
    );
    let out = setup.run(&["dns", "push", "--prune"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("error: not pruning: a.example.test: retirement period not over")
            && stderr.contains("safe after "),
        "{stderr}"
    );
    assert!(stdout.contains("1 failed, 0 pruned"), "{stdout}");
    assert_eq!(
        txt(&knot, "_mta-sts.a.example.test."),
        std::slice::from_ref(&new_txt)
    );
    let out = setup.run(&["retire"]);
    assert!(
        text(&out)
            .0
            .contains("a.example.test: removed from the config too early"),
        "{:?}",
        text(&out)
    );

    // Meanwhile someone puts a verification token next to our record.
    add_foreign_txt(
        &knot,
        "_mta-sts.a.example.test.",
        "google-site-verification=abc",
    );

    // A minute short of one day (max_age 3 s is below the minimum) + TTL
    // after the start: still too early.
    setup.backdate(86_400 + 2 - 60);
    let out = setup.run(&["dns", "push", "--prune"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("wait 86400 s, at least one day (longest max_age 3 s) + TTL 2 s)"),
        "{stderr}"
    );

    // After since + one day + TTL: pruned, and only our records.
    setup.backdate(86_400 + 2);
    let out = setup.run(&["dns", "push", "--prune", "--dry-run"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("would delete a.example.test:"), "{stdout}");
    assert_eq!(txt(&knot, "_mta-sts.a.example.test.").len(), 2, "dry run");

    let out = setup.run(&["dns", "push", "--prune"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", knot.log());
    assert!(
        stdout.contains("deleted a.example.test: _mta-sts.a.example.test. TXT, mta-sts.a.example.test. A, _smtp._tls.a.example.test. TXT"),
        "{stdout}"
    );
    assert!(stdout.contains("0 failed, 1 pruned"), "{stdout}");
    assert_eq!(
        txt(&knot, "_mta-sts.a.example.test."),
        ["google-site-verification=abc"],
        "the foreign TXT stays"
    );
    assert!(
        knot.rrset("mta-sts.a.example.test.", RecordType::A)
            .is_empty()
    );
    assert!(txt(&knot, "_smtp._tls.a.example.test.").is_empty());
    assert_eq!(txt(&knot, "a.example.test."), ["v=spf1 -all"]);
    // b is untouched.
    assert_eq!(
        txt(&knot, "_mta-sts.b.example.test."),
        [setup.records_txt("b.example.test")]
    );
    assert_eq!(
        knot.rrset("mta-sts.b.example.test.", RecordType::A),
        [(2, "127.0.0.1".to_owned())]
    );
    let state = setup.state().expect("state");
    assert!(state["domains"].get(A).is_none(), "{state}");

    // Nothing left to prune: a no-op.
    let out = setup.run(&["dns", "push", "--prune"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("0 failed, 0 pruned"), "{stdout}");
    eprintln!("retire end to end: {:?}", started.elapsed());
}

#[test]
fn prune_refuses_a_domain_that_never_retired() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    let (https, http) = (common::loopback(), common::loopback());
    let setup = Setup::new(&knot, https, http);
    let out = setup.run(&["dns", "push"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let before = txt(&knot, "_mta-sts.a.example.test.");

    // Removed without retiring: named explicitly, still refused.
    setup.write(&without_a(DOMAINS));
    let out = setup.run(&["dns", "push", "--prune", A]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("error: not pruning: a.example.test is not recorded as retired"),
        "{stderr}"
    );
    assert_eq!(txt(&knot, "_mta-sts.a.example.test."), before);
    assert!(
        !knot
            .rrset("mta-sts.a.example.test.", RecordType::A)
            .is_empty()
    );
}

#[test]
fn cli_push_starts_the_clock_and_unretiring_drops_it() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    let (https, http) = (common::loopback(), common::loopback());
    let setup = Setup::new(&knot, https, http);
    setup.write(&retiring(DOMAINS));
    // `mtasts retire` before anything is published: says what to do.
    let out = setup.run(&["retire"]);
    assert!(
        text(&out)
            .0
            .contains("not recorded as published: run `mtasts dns push`"),
        "{:?}",
        text(&out)
    );
    let out = setup.run(&["dns", "push", "--dry-run"]);
    assert!(out.status.success());
    assert!(setup.state().is_none(), "a dry run records nothing");
    let out = setup.run(&["dns", "push"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let state = setup.state().expect("recorded by dns push");
    let since = state["domains"][A]["since"].as_u64().expect("since");
    assert!(
        state["domains"][A]["records"]
            .as_array()
            .is_some_and(|r| r.len() == 3),
        "{state}"
    );
    // A second push keeps the start.
    assert!(setup.run(&["dns", "push"]).status.success());
    assert_eq!(setup.state().expect("state")["domains"][A]["since"], since);
    // The previous policy had a longer max_age than the configured one.
    let out = setup.run(&["retire", "--old-max-age", "2w", A]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out)
            .0
            .contains("(wait longest max_age 1209600 s + TTL 2 s)"),
        "{:?}",
        text(&out)
    );
    let state = setup.state().expect("state");
    assert_eq!(state["domains"][A]["old_max_age"], 1_209_600);
    assert_eq!(state["domains"][A]["since"], since, "the start stays");

    // Changed our mind: a serves a real policy again, the clock is gone.
    setup.write(DOMAINS);
    assert!(setup.run(&["dns", "push"]).status.success());
    let state = setup.state().expect("state");
    assert!(state["domains"].get(A).is_none(), "{state}");

    // `mtasts retire DOMAIN` refuses a domain that does not retire.
    let out = setup.run(&["retire", A]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("configured without retire = true"),
        "{:?}",
        text(&out)
    );
}

/// Issue 9 item 14 (RFC 8461 §8.3): `a` published max_age 2 weeks, then
/// retires with max_age "1d" as §8.3 suggests: the wait is 2 weeks, not one
/// day, because senders may hold the 2-week policy that long.
#[test]
fn retiring_with_a_shorter_max_age_waits_for_the_longest_published() {
    let Some(knot) = Knot::start(ZONE, "") else {
        return;
    };
    let (https, http) = (common::loopback(), common::loopback());
    let setup = Setup::new(&knot, https, http);
    let two_weeks = DOMAINS.replace("max_age = 3", "max_age = \"2w\"");
    setup.write(&two_weeks);
    let out = setup.run(&["dns", "push"]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        setup.state().expect("state")["max_age_published"][A],
        1_209_600
    );

    let one_day = retiring(&DOMAINS.replace("max_age = 3", "max_age = \"1d\""));
    setup.write(&one_day);
    let out = setup.run(&["dns", "push"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let state = setup.state().expect("state");
    assert_eq!(state["domains"][A]["old_max_age"], 1_209_600, "{state}");
    let out = setup.run(&["retire"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(
        stdout.contains("a.example.test: retiring since ")
            && stdout.contains("(wait longest max_age 1209600 s + TTL 2 s)")
            && (stdout.contains("(in 14days") || stdout.contains("(in 13days 23h 59m")),
        "{stdout}"
    );

    // Removed a day (the configured max_age) + TTL later: still refused.
    setup.backdate(86_400 + 2);
    setup.write(&without_a(&one_day));
    let out = setup.run(&["dns", "push", "--prune"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("a.example.test: retirement period not over")
            && stderr.contains("(in 13days"),
        "{stderr}"
    );
    assert!(!txt(&knot, "_mta-sts.a.example.test.").is_empty());
    // Two weeks + TTL later: pruned.
    setup.backdate(1_209_600 + 2);
    let out = setup.run(&["dns", "push", "--prune"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("0 failed, 1 pruned"), "{stdout}");
    assert!(txt(&knot, "_mta-sts.a.example.test.").is_empty());
}

/// Issue 9 item 9: `--old-max-age` beyond RFC 8461's max_age limit is
/// refused before anything is saved, and a retire.json holding such a value
/// (written by an older mtasts or by hand) is clamped with a warning instead
/// of panicking every later `mtasts retire`.
#[test]
fn out_of_range_old_max_age_is_refused_and_a_stored_one_clamped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    let config = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "{}\n[[domain]]\nname = \"{A}\"\nretire = true\n",
            common::server_section(common::loopback(), common::loopback(), &state_dir)
        ),
    );
    let config = config.to_str().expect("utf-8 path");
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--config", config]);
        mtasts(&all)
    };
    let out = run(&["retire", A]);
    assert!(out.status.success(), "{:?}", text(&out));
    let file = state_dir.join("retire.json");
    let before = std::fs::read(&file).expect("recorded");

    let out = run(&["retire", "--old-max-age", "500000000000y", A]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("longer than a policy's max_age may be (at most 31557600 s"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&file).expect("still there"),
        before,
        "nothing saved"
    );
    // The limit itself is accepted.
    let out = run(&["retire", "--old-max-age", "31557600s", A]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out).0.contains("longest max_age 31557600 s"),
        "{:?}",
        text(&out)
    );

    // A file written before the bound: 500000000000 years in seconds.
    let mut state: serde_json::Value = serde_json::from_slice(&before).expect("json");
    state["domains"][A]["old_max_age"] = 15_778_800_000_000_000_000u64.into();
    std::fs::write(&file, serde_json::to_vec(&state).expect("json")).expect("write");
    for _ in 0..2 {
        let out = run(&["retire"]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("max_age 15778800000000000000 s is over RFC 8461's limit of 31557600 s; using 31557600 s"),
            "{stderr}"
        );
        assert!(
            stdout.contains("(wait longest max_age 31557600 s + TTL"),
            "{stdout}"
        );
    }
}
