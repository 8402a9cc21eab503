//! On-demand onboarding (`[on_demand]`) with the real parts on loopback:
//! knotd serves the customers' zone (their CNAMEs and MX records), mtasts
//! answers the delegation zone itself (`dns_listen`), and pebble issues
//! the certificates.
//!
//! - A customer with both CNAMEs and a matching MX is onboarded on the first
//!   ClientHello for its policy host, and another on the first DNS query
//!   for its name in the delegation zone: each gets a certificate, its
//!   policy (mx = the matching `allowed_mx` patterns) over HTTPS, and only
//!   then its TXT in the zone.
//! - Without the `_mta-sts` CNAME, with a foreign MX, on the deny list, or
//!   over the hourly limit: refused, with the reason logged and counted.
//! - `POST /v1/onboard/{name}` answers 200 with the domain or 422 with every
//!   failed check; `mtasts onboard` prints the checks and exits 0 or 1.
//! - Recheck: a changed MX set updates mx; CNAMEs gone for longer than
//!   `grace` retire the domain (mode none, new id); back again, restored.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::knot::Knot;
use common::pebble::{Pebble, https_get};
use common::{ServeProc, client};

const TOKEN: &str = "0123456789abcdef-onboard-token";
const ZONE: &str = "customers.test";
const DELEGATION: &str = "sts.provider.example";
const POLICY_HOST: &str = "mta-sts.provider.example";

/// Records (relative to `customers.test`) of a customer who did everything
/// right, with `mx` as its MX hosts.
fn customer(label: &str, mx: &[&str]) -> String {
    let mut out = format!(
        "mta-sts.{label} CNAME {POLICY_HOST}.\n_mta-sts.{label} CNAME {label}.{ZONE}.{DELEGATION}.\n"
    );
    for (i, host) in mx.iter().enumerate() {
        out.push_str(&format!("{label} MX {} {host}.\n", 10 * (i + 1)));
    }
    out
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    dns: SocketAddr,
}

fn setup(
    pebble: &Pebble,
    https: SocketAddr,
    http: SocketAddr,
    resolver: SocketAddr,
    on_demand: &str,
) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (admin, dns) = (common::loopback(), common::loopback());
    common::write(dir.path(), "admin.token", &format!("{TOKEN}\n"));
    std::fs::create_dir_all(dir.path().join("domains.d")).expect("domains.d");
    let mut text = "domains_dir = \"domains.d\"\n".to_owned();
    text.push_str(&common::server_section(
        https,
        http,
        &dir.path().join("state"),
    ));
    text.push_str("behind_proxy = true\n");
    text.push_str(&pebble.tls_section(""));
    text.push_str(&format!(
        "[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n\
         [delegation]\nzone = \"{DELEGATION}\"\npolicy_host = \"{POLICY_HOST}\"\n\
         dns_listen = \"{dns}\"\nnameservers = [\"ns1.provider.example\"]\n\
         [on_demand]\nenabled = true\nmode = \"testing\"\n\
         allowed_mx = [\"*.mx.provider.example\", \"mx.provider.example\"]\n\
         deny = [\"*.denied.{ZONE}\"]\nresolver = \"{resolver}\"\n{on_demand}\n\
         [defaults]\nmode = \"testing\"\nmx = [\"mx.provider.example\"]\n\
         [[domain]]\nname = \"static.example\"\n"
    ));
    let config = common::write(dir.path(), "mtasts.toml", &text);
    Setup {
        dir: dir.path().to_owned(),
        _dir: dir,
        config,
        https,
        http,
        admin,
        dns,
    }
}

fn auth() -> [(&'static str, &'static str); 1] {
    [("Authorization", "Bearer 0123456789abcdef-onboard-token")]
}

async fn api(admin: SocketAddr, method: &str, path: &str) -> client::Response {
    client::http_call(admin, method, path, &auth(), None)
        .await
        .expect("admin call")
}

fn json(resp: &client::Response) -> serde_json::Value {
    serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&resp.body)))
}

fn txt_of(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| l.split_once("\tTXT\t").map(|(_, v)| v.trim().to_owned()))
        .collect()
}

fn refused_line<'a>(log: &'a str, domain: &str) -> Option<&'a str> {
    log.lines()
        .find(|l| l.contains("on-demand: refused") && l.contains(&format!("domain={domain}")))
}

fn start() -> Option<(Pebble, Knot, SocketAddr, SocketAddr)> {
    let (https, http) = (common::loopback(), common::loopback());
    let pebble = Pebble::start(http.port(), https.port(), 0)?;
    let records = [
        customer("good", &["a.mx.provider.example", "mx.provider.example"]),
        customer("dnsfirst", &["b.mx.provider.example"]),
        customer("apione", &["mx.provider.example"]),
        customer("apitwo", &["mx.provider.example"]),
        customer("foreign", &["mail.elsewhere.example"]),
        customer("x.denied", &["mx.provider.example"]),
        // Only the policy host's CNAME: the customer did not delegate _mta-sts.
        format!("mta-sts.nocname CNAME {POLICY_HOST}.\nnocname MX 10 mx.provider.example.\n"),
    ]
    .concat();
    let knot = Knot::start(ZONE, &records)?;
    Some((pebble, knot, https, http))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_are_onboarded_on_first_contact_and_refused_without_proof() {
    common::init_crypto();
    if common::find_binary("kdig").is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kdig is missing and CI=true"
        );
        return;
    }
    let Some((pebble, knot, https, http)) = start() else {
        return;
    };
    let s = setup(
        &pebble,
        https,
        http,
        knot.addr,
        "max_per_hour = 3\nrefusal_cache = \"1s\"\n",
    );
    let serve = ServeProc::start(&s.config, s.https, s.http);
    let root = pebble.root().await;
    let log = || format!("{}\n--- knot:\n{}", serve.log(), knot.log());

    // First contact over TLS: the handshake fails (no certificate yet),
    // the customer is onboarded, and the certificate follows.
    let host = format!("mta-sts.good.{ZONE}");
    let first = https_get(s.https, &host, "/.well-known/mta-sts.txt", &root, &[]).await;
    assert!(
        first.is_err(),
        "no certificate before onboarding: {first:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Ok(r) = https_get(s.https, &host, "/.well-known/mta-sts.txt", &root, &[]).await
            && r.status == 200
        {
            break r.body;
        }
        assert!(
            Instant::now() < deadline,
            "good not onboarded and served over HTTPS:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.contains("mode: testing\r\n"), "{body}");
    // The customer's MX set, as the provider's patterns, in allowed_mx order.
    assert!(
        body.contains("mx: *.mx.provider.example\r\nmx: mx.provider.example\r\n"),
        "{body}"
    );
    let id = common::policy_id(body.as_bytes());
    let owner = format!("good.{ZONE}.{DELEGATION}");
    let txt = common::kdig(s.dns, &[&owner, "TXT"]);
    assert_eq!(txt_of(&txt), [format!("\"v=STSv1; id={id};\"")], "{txt}");
    let file = std::fs::read_to_string(s.dir.join(format!("domains.d/good.{ZONE}.toml")))
        .expect("onboarded file");
    assert!(file.contains("onboarded on demand (sni)"), "{file}");

    // First contact over DNS: NXDOMAIN now, the TXT once the policy and its
    // certificate are served.
    let owner = format!("dnsfirst.{ZONE}.{DELEGATION}");
    let nx = common::kdig(s.dns, &[&owner, "TXT"]);
    assert_eq!(common::dns_status(&nx), "NXDOMAIN", "{nx}");
    let dns = s.dns;
    common::wait_until(
        "dnsfirst answered in the zone",
        Duration::from_secs(60),
        log,
        || {
            let owner = owner.clone();
            async move { !txt_of(&common::kdig(dns, &[&owner, "TXT"])).is_empty() }
        },
    )
    .await;
    let resp = https_get(
        s.https,
        &format!("mta-sts.dnsfirst.{ZONE}"),
        "/.well-known/mta-sts.txt",
        &root,
        &[],
    )
    .await
    .expect("dnsfirst served over HTTPS once its TXT is answered");
    assert_eq!(resp.status, 200);
    assert!(
        resp.body.contains("mx: *.mx.provider.example\r\n"),
        "{}",
        resp.body
    );
    assert!(
        !resp.body.contains("mx: mx.provider.example\r\n"),
        "{}",
        resp.body
    );
    assert_eq!(
        txt_of(&common::kdig(s.dns, &[&owner, "TXT"])),
        [format!(
            "\"v=STSv1; id={};\"",
            common::policy_id(resp.body.as_bytes())
        )]
    );

    // Without proof: refused with the reason, nothing written.
    let _ = https_get(
        s.https,
        &format!("mta-sts.nocname.{ZONE}"),
        "/.well-known/mta-sts.txt",
        &root,
        &[],
    )
    .await;
    let _ = common::kdig(s.dns, &[&format!("foreign.{ZONE}.{DELEGATION}"), "TXT"]);
    let _ = https_get(
        s.https,
        &format!("mta-sts.x.denied.{ZONE}"),
        "/.well-known/mta-sts.txt",
        &root,
        &[],
    )
    .await;
    common::wait_until(
        "three refusals logged",
        Duration::from_secs(20),
        log,
        || {
            let l = serve.log();
            async move {
                ["nocname", "foreign", "x.denied"]
                    .iter()
                    .all(|d| refused_line(&l, &format!("{d}.{ZONE}")).is_some())
            }
        },
    )
    .await;
    let l = serve.log();
    let nocname = refused_line(&l, &format!("nocname.{ZONE}")).expect("logged");
    assert!(
        nocname.contains("sts_record: no CNAME at _mta-sts.nocname.customers.test"),
        "{nocname}"
    );
    assert!(
        nocname.contains("via=\"sni\"") || nocname.contains("via=sni"),
        "{nocname}"
    );
    let foreign = refused_line(&l, &format!("foreign.{ZONE}")).expect("logged");
    assert!(
        foreign.contains("mx: MX mail.elsewhere.example"),
        "{foreign}"
    );
    let denied = refused_line(&l, &format!("x.denied.{ZONE}")).expect("logged");
    assert!(denied.contains("deny: "), "{denied}");
    for d in ["nocname", "foreign", "x.denied"] {
        assert!(!s.dir.join(format!("domains.d/{d}.{ZONE}.toml")).exists());
    }

    // The admin API: 422 with every failed check, 200 with the domain.
    let resp = api(s.admin, "POST", &format!("/v1/onboard/foreign.{ZONE}")).await;
    assert_eq!(resp.status, 422, "{}", String::from_utf8_lossy(&resp.body));
    let body = json(&resp);
    let failed: Vec<&str> = body["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["check"].as_str().expect("name"))
        .collect();
    assert_eq!(failed, ["mx"], "{body}");
    assert!(
        body["details"][0]
            .as_str()
            .expect("detail")
            .contains("mail.elsewhere.example")
    );
    let resp = api(s.admin, "POST", &format!("/v1/onboard/apione.{ZONE}")).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let body = json(&resp);
    assert_eq!(body["name"], format!("apione.{ZONE}"));
    assert_eq!(body["mode"], "testing");
    assert_eq!(body["mx"], serde_json::json!(["mx.provider.example"]));
    // Already configured: 200 again, nothing counted.
    let resp = api(s.admin, "POST", &format!("/v1/onboard/apione.{ZONE}")).await;
    assert_eq!(resp.status, 200);
    // Three onboarded this hour (good, dnsfirst, apione): the limit holds.
    let resp = api(s.admin, "POST", &format!("/v1/onboard/apitwo.{ZONE}")).await;
    assert_eq!(resp.status, 422, "{}", String::from_utf8_lossy(&resp.body));
    let body = json(&resp);
    assert!(
        body["details"]
            .as_array()
            .expect("details")
            .iter()
            .any(|d| d
                .as_str()
                .is_some_and(|d| d.starts_with("hourly_limit: 3 domains onboarded"))),
        "{body}"
    );
    assert!(!s.dir.join(format!("domains.d/apitwo.{ZONE}.toml")).exists());

    // Counted by trigger and result.
    let metrics = String::from_utf8_lossy(&api(s.admin, "GET", "/metrics").await.body).into_owned();
    for want in [
        "mtasts_onboard_decisions_total{trigger=\"sni\",result=\"onboarded\"} 1",
        "mtasts_onboard_decisions_total{trigger=\"dns\",result=\"onboarded\"} 1",
        "mtasts_onboard_decisions_total{trigger=\"api\",result=\"onboarded\"} 1",
        "mtasts_onboard_decisions_total{trigger=\"sni\",result=\"refused\",reason=\"sts_record\"} 1",
        "mtasts_onboard_decisions_total{trigger=\"api\",result=\"refused\",reason=\"hourly_limit\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }

    // `mtasts onboard`: the same checks from the command line, nothing changed.
    let cfg = s.config.to_str().expect("utf-8");
    let out = common::mtasts(&["onboard", "--config", cfg, &format!("apitwo.{ZONE}")]);
    let (stdout, stderr) = common::output_text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("ok   sts_record: _mta-sts.apitwo.customers.test is a CNAME to apitwo.customers.test.sts.provider.example"), "{stdout}");
    assert!(
        stdout.contains("=> would be onboarded with mx mx.provider.example"),
        "{stdout}"
    );
    let out = common::mtasts(&["onboard", "--config", cfg, &format!("nocname.{ZONE}")]);
    let (stdout, _) = common::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL sts_record: no CNAME at _mta-sts.nocname.customers.test (want: _mta-sts.nocname.customers.test. CNAME nocname.customers.test.sts.provider.example.)"), "{stdout}");
    assert!(!s.dir.join(format!("domains.d/apitwo.{ZONE}.toml")).exists());
    drop(serve);
}

/// Recheck: MX moved within the provider's patterns → new mx; CNAMEs gone
/// for longer than `grace` → retired (mode none, new id, still answered);
/// CNAMEs back → restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarded_domains_follow_their_dns_and_are_retired_when_it_goes() {
    common::init_crypto();
    let Some((pebble, knot, https, http)) = start() else {
        return;
    };
    let s = setup(
        &pebble,
        https,
        http,
        knot.addr,
        "recheck = \"1s\"\ngrace = \"2s\"\n",
    );
    let serve = ServeProc::start(&s.config, s.https, s.http);
    let log = || format!("{}\n--- knot:\n{}", serve.log(), knot.log());
    let resp = api(s.admin, "POST", &format!("/v1/onboard/good.{ZONE}")).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let served = |port: u16| {
        common::served_body(port, &format!("good.{ZONE}"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let first = served(s.http.port());
    assert!(first.contains("mx: mx.provider.example\r\n"), "{first}");

    // The customer drops mx.provider.example: mx follows.
    let others = [customer("dnsfirst", &["b.mx.provider.example"])].concat();
    knot.replace_records(
        ZONE,
        &format!("{}{others}", customer("good", &["a.mx.provider.example"])),
        2,
    );
    let port = s.http.port();
    common::wait_until("mx updated", Duration::from_secs(20), log, || async move {
        let b = served(port);
        b.contains("mx: *.mx.provider.example\r\n") && !b.contains("mx: mx.provider.example\r\n")
    })
    .await;
    assert!(
        serve.log().contains("on-demand: updated"),
        "{}",
        serve.log()
    );

    // The customer removes both CNAMEs: after the grace period the domain
    // is retired (mode none with a new id), not dropped.
    knot.replace_records(
        ZONE,
        &format!("good MX 10 a.mx.provider.example.\n{others}"),
        3,
    );
    common::wait_until("retired", Duration::from_secs(30), log, || async move {
        served(port).contains("mode: none\r\n")
    })
    .await;
    let file =
        std::fs::read_to_string(s.dir.join(format!("domains.d/good.{ZONE}.toml"))).expect("file");
    assert!(file.contains("retire = true"), "{file}");
    assert!(
        serve.log().contains("on-demand: offboarded"),
        "{}",
        serve.log()
    );
    assert!(
        serve.log().contains("DNS no longer points here"),
        "{}",
        serve.log()
    );

    // Back again: restored to the configured mode.
    knot.replace_records(
        ZONE,
        &format!("{}{others}", customer("good", &["a.mx.provider.example"])),
        4,
    );
    common::wait_until("restored", Duration::from_secs(30), log, || async move {
        served(port).contains("mode: testing\r\n")
    })
    .await;
    assert!(
        serve.log().contains("on-demand: restored"),
        "{}",
        serve.log()
    );
    drop(serve);
}
