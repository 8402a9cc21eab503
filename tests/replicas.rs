//! Replicas sharing a real PostgreSQL store (`[store] backend = "postgres"`),
//! with a real ACME server (pebble): challenges answered by any replica,
//! one order per domain cluster-wide, a replica killed mid-order replaced,
//! admin writes propagated, a database outage survived. All servers are
//! started by the tests on loopback ports.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::ServeProc;
use common::client::http_call;
use common::pebble::{Pebble, https_get, serial};
use common::postgres::Postgres;

const TOKEN: &str = "replica-test-admin-token-0123456789";

/// One replica's files and ports.
struct Replica {
    dir: PathBuf,
    config: PathBuf,
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
}

impl Replica {
    /// Writes the config of a replica in `root/<name>/` with the given
    /// config-file domains; every replica shares `pg` and (when given) the
    /// ACME server.
    fn new(
        root: &Path,
        name: &str,
        pg: &Postgres,
        pebble: Option<&Pebble>,
        domains: &[&str],
        store_extra: &str,
        ports: Option<(SocketAddr, SocketAddr)>,
    ) -> Replica {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("domains.d")).expect("mkdir");
        let (https, http) = ports.unwrap_or_else(|| (common::loopback(), common::loopback()));
        let admin = common::loopback();
        common::write(&dir, "admin.token", &format!("{TOKEN}\n"));
        let key = common::write(&dir, "store.key", &"ab".repeat(32));
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let mut text = String::from("domains_dir = \"domains.d\"\n");
        text.push_str(&common::server_section(https, http, &dir.join("state")));
        text.push_str("behind_proxy = true\n");
        text.push_str(&format!(
            "[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\nkey_file = \"store.key\"\n{store_extra}\n",
            pg.url()
        ));
        if let Some(pebble) = pebble {
            text.push_str(&pebble.tls_section(
                "orders_per_hour = 1000\nretry_max = \"2s\"\nmax_concurrent_orders = 4",
            ));
        }
        text.push_str(
            "\n[defaults]\nmode = \"testing\"\nmax_age = \"1d\"\nmx = [\"mx.example.net\"]\n",
        );
        for d in domains {
            text.push_str(&format!("\n[[domain]]\nname = \"{d}\"\n"));
        }
        let config = common::write(&dir, "mtasts.toml", &text);
        Replica {
            dir,
            config,
            https,
            http,
            admin,
        }
    }

    fn start(&self) -> ServeProc {
        ServeProc::start(&self.config, self.https, self.http)
    }
}

async fn admin(
    replica: &Replica,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> common::client::Response {
    let auth = format!("Bearer {TOKEN}");
    http_call(
        replica.admin,
        method,
        path,
        &[("Authorization", auth.as_str())],
        body,
    )
    .await
    .expect("admin call")
}

/// Polls `done` every 20 ms until it holds; returns how long it took.
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> F,
) -> Duration {
    let start = Instant::now();
    loop {
        if done().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The serial of the certificate `addr` shows for `mta-sts.<domain>`,
/// verified against the pebble root.
async fn served_serial(addr: SocketAddr, domain: &str, root: &[u8]) -> Option<String> {
    let host = format!("mta-sts.{domain}");
    let resp = https_get(addr, &host, "/.well-known/mta-sts.txt", root, &[])
        .await
        .ok()?;
    (resp.status == 200).then(|| serial(&resp.chain[0]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_challenges_orders_certificates_and_domains() {
    common::init_crypto();
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    // pebble validates against replica B only.
    let (b_https, b_http) = (common::loopback(), common::loopback());
    let Some(pebble) = Pebble::start(b_http.port(), b_https.port(), 0) else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    // A has a config-file domain B does not: A orders it, B answers the
    // validation from the shared store.
    let a = Replica::new(
        root.path(),
        "a",
        &pg,
        Some(&pebble),
        &["a-only.example"],
        "",
        None,
    );
    let b = Replica::new(
        root.path(),
        "b",
        &pg,
        Some(&pebble),
        &[],
        "",
        Some((b_https, b_http)),
    );
    let proc_b = b.start();
    let proc_a = a.start();
    let ca = pebble.root().await;
    until(
        "A's certificate, validated through B",
        Duration::from_secs(60),
        || async {
            served_serial(a.https, "a-only.example", &ca)
                .await
                .is_some()
        },
    )
    .await;
    let log_b = proc_b.log();
    assert!(
        !log_b.contains("certificate issued"),
        "B ordered nothing: {log_b}"
    );
    assert_eq!(pebble.orders(), 1, "{}", pebble.log());
    // Keys are encrypted with key_file before they reach the database.
    assert_eq!(
        pg.sql("SELECT encode(substring(bundle from 1 for 17), 'escape') FROM mtasts_certs WHERE host = 'mta-sts.a-only.example'"),
        "mtasts-aes256gcm:"
    );
    assert_eq!(
        pg.sql(
            "SELECT count(*) FROM mtasts_certs WHERE position('PRIVATE KEY'::bytea in bundle) > 0"
        ),
        "0"
    );

    // An admin write on A is served by B within a second, and both then
    // want a certificate for it: exactly one order is placed, and both
    // serve the same certificate.
    let put = admin(
        &a,
        "PUT",
        "/v1/domains/shared.example",
        Some(r#"{"mode":"testing","mx":["mx1.shared.example"]}"#),
    )
    .await;
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    let propagated = until("B serving A's write", Duration::from_secs(5), || async {
        common::served_body(b.http.port(), "shared.example")
            .is_some_and(|body| String::from_utf8_lossy(&body).contains("mx1.shared.example"))
    })
    .await;
    assert!(
        propagated < Duration::from_secs(1),
        "propagation took {propagated:?}"
    );
    eprintln!("admin PUT on A served by B after {propagated:?}");
    until(
        "A's certificate for shared.example",
        Duration::from_secs(60),
        || async {
            served_serial(a.https, "shared.example", &ca)
                .await
                .is_some()
        },
    )
    .await;
    let serial_a = served_serial(a.https, "shared.example", &ca)
        .await
        .expect("A serves");
    let serial_b = until(
        "B serving the same certificate",
        Duration::from_secs(30),
        || {
            let ca = ca.clone();
            let serial_a = serial_a.clone();
            async move { served_serial(b_https, "shared.example", &ca).await == Some(serial_a) }
        },
    )
    .await;
    let _ = serial_b;
    assert_eq!(pebble.orders(), 2, "one order per domain: {}", pebble.log());
    assert_eq!(
        pg.sql("SELECT count(*) FROM mtasts_orders WHERE host = 'mta-sts.shared.example'"),
        "1"
    );

    // A delete on B is refused by A within a second.
    let del = admin(&b, "DELETE", "/v1/domains/shared.example", None).await;
    assert_eq!(del.status, 204, "{}", String::from_utf8_lossy(&del.body));
    let gone = until(
        "A refusing the deleted domain",
        Duration::from_secs(5),
        || async { common::served_body(a.http.port(), "shared.example").is_none() },
    )
    .await;
    assert!(gone < Duration::from_secs(1), "delete took {gone:?}");

    // The database goes away: both keep serving, writes answer 503,
    // readiness says so (and `store=optional` does not).
    pg.pause();
    assert!(
        served_serial(a.https, "a-only.example", &ca)
            .await
            .is_some()
    );
    assert!(common::served_body(b.http.port(), "a-only.example").is_none());
    let refused = admin(
        &a,
        "PUT",
        "/v1/domains/during-outage.example",
        Some(r#"{"mx":["mx.outage.example"]}"#),
    )
    .await;
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(
        String::from_utf8_lossy(&refused.body).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    let ready = http_call(a.admin, "GET", "/readyz", &[], None)
        .await
        .expect("readyz");
    assert_eq!(
        ready.status,
        503,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    let optional = http_call(a.admin, "GET", "/readyz?store=optional", &[], None)
        .await
        .expect("readyz");
    assert_eq!(
        optional.status,
        200,
        "{}",
        String::from_utf8_lossy(&optional.body)
    );
    assert!(common::served_body(a.http.port(), "during-outage.example").is_none());

    // Back: writes work again and reach the other replica.
    pg.resume();
    until("writes accepted again", Duration::from_secs(20), || async {
        admin(
            &a,
            "PUT",
            "/v1/domains/after-outage.example",
            Some(r#"{"mx":["mx.after.example"]}"#),
        )
        .await
        .status
            == 201
    })
    .await;
    until(
        "B serving the write after the outage",
        Duration::from_secs(10),
        || async { common::served_body(b.http.port(), "after-outage.example").is_some() },
    )
    .await;
    let ready = http_call(a.admin, "GET", "/readyz", &[], None)
        .await
        .expect("readyz");
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    drop((proc_a, proc_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_order_is_replaced_after_its_lease() {
    common::init_crypto();
    let Some(pg) = Postgres::start() else {
        return;
    };
    let (b_https, b_http) = (common::loopback(), common::loopback());
    let Some(pebble) = Pebble::start(b_http.port(), b_https.port(), 0) else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let lease = "lease = \"3s\"";
    let a = Replica::new(
        root.path(),
        "a",
        &pg,
        Some(&pebble),
        &["lease.example"],
        lease,
        None,
    );
    let b = Replica::new(
        root.path(),
        "b",
        &pg,
        Some(&pebble),
        &["lease.example"],
        lease,
        Some((b_https, b_http)),
    );
    // The CA stops answering: A's order hangs with A holding the claim.
    let pebble_pid = pebble_pid(&pebble);
    signal(pebble_pid, "STOP");
    let mut proc_a = a.start();
    let a_pid = proc_a.child.id();
    let claimed = format!(
        "SELECT count(*) FROM mtasts_order_claims WHERE host = 'mta-sts.lease.example' AND replica LIKE '%-{a_pid}'"
    );
    let start = Instant::now();
    while pg.sql(&claimed) != "1" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "A never claimed: {}",
            proc_a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc_a.signal("KILL");
    let _ = proc_a.child.wait();
    signal(pebble_pid, "CONT");
    let proc_b = b.start();
    let ca = pebble.root().await;
    let took = until(
        "B completing the order A started",
        Duration::from_secs(60),
        || async { served_serial(b_https, "lease.example", &ca).await.is_some() },
    )
    .await;
    eprintln!("B served the certificate {took:?} after start");
    assert!(
        proc_b.log().contains("certificate issued"),
        "{}",
        proc_b.log()
    );
    assert_eq!(
        pg.sql("SELECT count(*) FROM mtasts_order_claims"),
        "0",
        "claims are released once the order is done"
    );
    drop(proc_b);
}

fn pebble_pid(pebble: &Pebble) -> u32 {
    pebble.pid().expect("pebble running")
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn store_migrate_is_safe_concurrently_and_import_is_idempotent() {
    common::init_crypto();
    let Some(pg) = Postgres::start() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let r = Replica::new(root.path(), "r", &pg, None, &["config.example"], "", None);
    let config = r.config.to_str().expect("utf-8").to_owned();
    // Three at once: each succeeds, the schema is applied once.
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(common::bin())
                .args(["store", "migrate", "--config", &config])
                .output_async()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("migrate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        pg.sql("SELECT string_agg(version::text, ',' ORDER BY version) FROM mtasts_schema"),
        "1,2"
    );
    let again = common::mtasts(&["store", "migrate", "--config", &config]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("schema is current"));

    // A files store to import: an account, a certificate with its state,
    // retirement records and an API-managed domain file.
    let old = root.path().join("old-state");
    for sub in ["acme/accounts", "acme/certs", "acme/state"] {
        std::fs::create_dir_all(old.join(sub)).expect("mkdir");
    }
    let directory = "https://ca.example/dir";
    let stem = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(directory.as_bytes());
        d[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    common::write(
        &old.join("acme/accounts"),
        &format!("{stem}.json"),
        &format!(
            r#"{{"id":"https://ca.example/acct/1","key_pkcs8":"AAAA","directory":"{directory}"}}"#
        ),
    );
    let host = "mta-sts.imported.example";
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let bundle = format!("{}{}", key.serialize_pem(), cert.pem());
    common::write(&old.join("acme/certs"), &format!("{host}.pem"), &bundle);
    common::write(
        &old.join("acme/state"),
        &format!("{host}.json"),
        r#"{"failures":0}"#,
    );
    let retire_json = r#"{"version":1,"domains":{}}"#;
    common::write(&old, "retire.json", retire_json);
    common::write(
        &r.dir.join("domains.d"),
        "api.example.toml",
        "# Managed by the mtasts admin API; edits by hand are kept until the next PUT.\n[[domain]]\nname = \"api.example\"\nmx = [\"mx.api.example\"]\n",
    );
    common::write(
        &r.dir.join("domains.d"),
        "hand.example.toml",
        "[[domain]]\nname = \"hand.example\"\nmx = [\"mx.hand.example\"]\n",
    );
    let old_arg = old.to_str().expect("utf-8");
    let first = common::mtasts(&[
        "store",
        "import",
        "--config",
        &config,
        "--from-dir",
        old_arg,
    ]);
    let (out, err) = common::output_text(&first);
    assert!(first.status.success(), "{out}{err}");
    assert!(
        out.contains("1 account, 1 certificate, 1 state, 1 domain, 1 document"),
        "{out}"
    );
    let second = common::mtasts(&[
        "store",
        "import",
        "--config",
        &config,
        "--from-dir",
        old_arg,
    ]);
    let (out, err) = common::output_text(&second);
    assert!(second.status.success(), "{out}{err}");
    assert!(
        out.contains("0 accounts, 0 certificates, 0 states, 0 domains, 0 documents"),
        "{out}"
    );
    assert_eq!(pg.sql("SELECT name FROM mtasts_domains"), "api.example");
    assert_eq!(pg.sql("SELECT host FROM mtasts_certs"), host);
    // Encrypted with key_file; the account too.
    assert_eq!(
        pg.sql(
            "SELECT count(*) FROM mtasts_accounts WHERE position('AAAA'::bytea in credentials) = 0"
        ),
        "1"
    );
    // `certs` reads the shared store (decrypting with key_file).
    let certs = common::mtasts(&["certs", "--config", &config, "--format", "json"]);
    let (out, err) = common::output_text(&certs);
    assert!(certs.status.success(), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let row = report["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("{host} not in {out}"));
    assert!(
        row["not_after"].is_string() || row["not_after"].is_number(),
        "{row}"
    );
    // `retire` works on the shared retirement records: the database's copy
    // comes into state_dir.
    let retire = common::mtasts(&["retire", "--config", &config]);
    let (out, err) = common::output_text(&retire);
    assert!(retire.status.success(), "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(r.dir.join("state/retire.json")).expect("pulled"),
        retire_json
    );
    // A files-backend config is refused with a pointer to the setting.
    let files = common::write(root.path(), "files.toml", "[defaults]\nmode = \"none\"\n");
    let refused = common::mtasts(&[
        "store",
        "migrate",
        "--config",
        files.to_str().expect("utf-8"),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("backend = \\\"postgres\\\"")
            || String::from_utf8_lossy(&refused.stderr).contains("backend = \"postgres\""),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// `Command::spawn` with captured output, for running several at once.
trait OutputAsync {
    fn output_async(&mut self) -> std::process::Child;
}

impl OutputAsync for std::process::Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    }
}

/// Rewrites the mx of `domain` in a replica's config file (a rollout of
/// the git-managed config, one replica at a time).
fn set_mx(replica: &Replica, domain: &str, mx: &str) {
    let text = std::fs::read_to_string(&replica.config).expect("config");
    let head = format!("[[domain]]\nname = \"{domain}\"\n");
    let at = text.find(&head).expect("domain entry") + head.len();
    let rest = &text[at..];
    let end = rest.find("\n[").map_or(text.len(), |e| at + e + 1);
    let mut new = text[..at].to_owned();
    new.push_str(&format!("mx = [\"{mx}\"]\n"));
    new.push_str(&text[end..]);
    let tmp = replica.config.with_extension("toml.new");
    std::fs::write(&tmp, new).expect("write");
    std::fs::rename(&tmp, &replica.config).expect("rename");
}

/// The id in `_mta-sts.<domain>` on `knot`, if exactly one TXT is there.
fn published_id(knot: &common::knot::Knot, domain: &str) -> Option<String> {
    let txt = knot.rrset(
        &format!("_mta-sts.{domain}."),
        hickory_proto::rr::RecordType::TXT,
    );
    match txt.as_slice() {
        [(_, value)] => value
            .strip_prefix("v=STSv1; id=")
            .and_then(|v| v.strip_suffix(';'))
            .map(str::to_owned),
        _ => None,
    }
}

fn served_id(replica: &Replica, domain: &str) -> Option<String> {
    common::served_body(replica.http.port(), domain).map(|b| common::policy_id(&b))
}

#[test]
fn auto_push_publishes_a_new_id_only_once_every_live_replica_serves_it() {
    common::init_crypto();
    let Some(pg) = Postgres::start() else {
        return;
    };
    let Some(knot) = common::knot::Knot::start("example.test", "") else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let domain = "a.example.test";
    let store = "heartbeat = \"200ms\"\nreplica_timeout = \"4s\"\nlease = \"3s\"";
    let replicas: Vec<Replica> = ["a", "b"]
        .iter()
        .map(|name| {
            let r = Replica::new(root.path(), name, &pg, None, &[domain], store, None);
            set_mx(&r, domain, "mx1.example.test");
            let mut text = std::fs::read_to_string(&r.config).expect("config");
            text.push_str(&format!(
                "\n[dns.update]\nserver = \"{}\"\nzone = \"example.test\"\nkey_name = \"{}\"\nsecret = \"{}\"\nauto_push = true\ntimeout = \"2s\"\n",
                knot.addr,
                common::knot::KEY_NAME,
                knot.secret
            ));
            std::fs::write(&r.config, text).expect("write");
            r
        })
        .collect();
    let (a, b) = (&replicas[0], &replicas[1]);
    let proc_a = a.start();
    let proc_b = b.start();
    let first = served_id(a, domain).expect("A serves");
    assert_eq!(served_id(b, domain).as_deref(), Some(first.as_str()));
    common::wait_for("the first push", || {
        published_id(&knot, domain).as_deref() == Some(first.as_str())
    });

    // A rolls out a policy change; B has not yet. The new id must not be
    // published while B serves the old policy.
    set_mx(a, domain, "mx2.example.test");
    proc_a.signal("HUP");
    common::wait_for("A serving the change", || {
        served_id(a, domain).is_some_and(|id| id != first)
    });
    let second = served_id(a, domain).expect("A serves");
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            published_id(&knot, domain).as_deref(),
            Some(first.as_str()),
            "the new id was published while B still served the old policy:\n{}\n{}",
            proc_a.log(),
            proc_b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // B catches up: the new id follows, and both serve its policy.
    set_mx(b, domain, "mx2.example.test");
    proc_b.signal("HUP");
    common::wait_for("the push once every replica serves it", || {
        published_id(&knot, domain).as_deref() == Some(second.as_str())
    });
    assert_eq!(served_id(a, domain).as_deref(), Some(second.as_str()));
    assert_eq!(served_id(b, domain).as_deref(), Some(second.as_str()));

    // A replica that stops reporting (frozen) is not waited for after
    // replica_timeout, and a frozen leader loses its lease.
    proc_b.signal("STOP");
    set_mx(a, domain, "mx3.example.test");
    proc_a.signal("HUP");
    common::wait_for("A serving the third policy", || {
        served_id(a, domain).is_some_and(|id| id != second)
    });
    let third = served_id(a, domain).expect("A serves");
    let start = Instant::now();
    while published_id(&knot, domain).as_deref() != Some(third.as_str()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never published without the frozen replica:\n{}",
            proc_a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    proc_b.signal("CONT");
    // The leader said why it waited.
    let logs = format!("{}{}", proc_a.log(), proc_b.log());
    assert!(logs.contains("waits until every live replica"), "{logs}");
    drop((proc_a, proc_b));
}

#[test]
fn the_database_connection_is_tls_verified_against_ca_file() {
    common::init_crypto();
    let Some(pg) = Postgres::start_tls() else {
        return;
    };
    let ca = pg.ca.clone().expect("test CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |url: &str, ca_file: Option<&Path>| {
        let mut text = format!(
            "[server]\nstate_dir = \"{}\"\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\nconnect_timeout = \"3s\"\n",
            dir.path().join("state").display()
        );
        if let Some(ca) = ca_file {
            text.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
        }
        text.push_str("[defaults]\nmode = \"none\"\n");
        let config = common::write(dir.path(), "mtasts.toml", &text);
        common::mtasts(&[
            "store",
            "migrate",
            "--config",
            config.to_str().expect("utf-8"),
        ])
    };
    let host = format!("localhost:{}", pg.port);
    // The server takes TLS connections only: with the CA it works.
    let ok = run(&format!("postgres://mtasts@{host}/mtasts"), Some(&ca));
    let (out, err) = common::output_text(&ok);
    assert!(ok.status.success(), "{out}{err}");
    assert!(
        out.contains("applied schema versions 1, 2; schema is at version 2"),
        "{out}"
    );
    // Plain (no sslmode, no ca_file): refused by the server, said clearly.
    let plain = run(&format!("postgres://mtasts@{host}/mtasts"), None);
    let (_, err) = common::output_text(&plain);
    assert!(!plain.status.success());
    assert!(
        err.contains("no encryption") || err.contains("pg_hba.conf"),
        "{err}"
    );
    // TLS required, but the server's CA is not trusted: refused by us.
    let untrusted = run(
        &format!("postgres://mtasts@{host}/mtasts?sslmode=require"),
        None,
    );
    let (_, err) = common::output_text(&untrusted);
    assert!(!untrusted.status.success());
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    assert_eq!(pg.sql("SELECT count(*) FROM mtasts_schema"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_is_answered_by_the_replica_that_did_not_order() {
    common::init_crypto();
    let Some(pg) = Postgres::start() else {
        return;
    };
    let (b_https, b_http) = (common::loopback(), common::loopback());
    let Some(pebble) = Pebble::start(b_http.port(), b_https.port(), 0) else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let a = Replica::new(
        root.path(),
        "a",
        &pg,
        Some(&pebble),
        &["alpn.example"],
        "",
        None,
    );
    let text = std::fs::read_to_string(&a.config).expect("config");
    std::fs::write(
        &a.config,
        text.replace("challenge = \"http-01\"", "challenge = \"tls-alpn-01\""),
    )
    .expect("write");
    let b = Replica::new(
        root.path(),
        "b",
        &pg,
        Some(&pebble),
        &[],
        "",
        Some((b_https, b_http)),
    );
    let proc_b = b.start();
    let proc_a = a.start();
    let ca = pebble.root().await;
    until(
        "A's certificate, validated by TLS-ALPN-01 on B",
        Duration::from_secs(60),
        || async { served_serial(a.https, "alpn.example", &ca).await.is_some() },
    )
    .await;
    assert_eq!(
        pg.sql("SELECT state::json->>'last_challenge' FROM mtasts_cert_state WHERE host = 'mta-sts.alpn.example'"),
        "tls-alpn-01"
    );
    assert!(
        !proc_b.log().contains("certificate issued"),
        "{}",
        proc_b.log()
    );
    drop((proc_a, proc_b));
}

/// TLS reports with the PostgreSQL store: a report POSTed to replica A is
/// in the shared tables, so replica B's dashboard and `tlsrpt summary`
/// with B's config show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_reports_received_by_one_replica_are_seen_by_all() {
    common::init_crypto();
    let Some(pg) = Postgres::start() else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let replicas: Vec<Replica> = ["a", "b"]
        .iter()
        .map(|name| {
            let r = Replica::new(
                root.path(),
                name,
                &pg,
                None,
                &["reported.example"],
                "",
                None,
            );
            let text = std::fs::read_to_string(&r.config).expect("config");
            std::fs::write(
                &r.config,
                text.replace("[defaults]", "[tlsrpt]\nreceive = true\n[defaults]"),
            )
            .expect("write");
            r
        })
        .collect();
    let (a, b) = (&replicas[0], &replicas[1]);
    let proc_a = a.start();
    let proc_b = b.start();
    let day = time::OffsetDateTime::now_utc().date().to_string();
    let body = format!(
        r#"{{"organization-name":"Org","report-id":"pg-1","date-range":{{"start-datetime":"{day}T00:00:00Z","end-datetime":"{day}T23:59:59Z"}},"policies":[{{"policy":{{"policy-type":"sts","policy-domain":"reported.example"}},"summary":{{"total-successful-session-count":9,"total-failure-session-count":1}},"failure-details":[{{"result-type":"certificate-expired","failed-session-count":1}}]}}]}}"#
    );
    let client = common::client::TlsClient::trusting_pem_file(&a.dir.join("state/ca/ca.pem"));
    let resp = client
        .post(
            a.https,
            "mta-sts.reported.example",
            "/tlsrpt",
            "application/tlsrpt+json",
            body.as_bytes(),
        )
        .await
        .expect("post");
    assert_eq!(resp.status, 200);
    // B's view: the summary command with B's config, and B's dashboard.
    let out = common::mtasts(&[
        "tlsrpt",
        "summary",
        "--config",
        b.config.to_str().expect("utf-8"),
        "--format",
        "json",
    ]);
    let (stdout, stderr) = common::output_text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        summary["domains"][0]["domain"], "reported.example",
        "{summary}"
    );
    assert_eq!(summary["domains"][0]["failed"], 1);
    let page = admin(b, "GET", "/ui/domain/reported.example", None).await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains("certificate-expired"), "{html}");
    assert_eq!(pg.sql("SELECT count(*) FROM mtasts_tlsrpt_reports"), "1");
    drop((proc_a, proc_b));
}
