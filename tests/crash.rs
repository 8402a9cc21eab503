//! Crash safety: the real `mtasts serve`, in ACME mode against a real
//! pebble, with the admin API on, is killed with SIGKILL at random moments
//! while certificates are being ordered, admin writes are landing and the
//! config is being reloaded, and restarted each time. After every kill:
//!
//! - every file it keeps (certificates and keys, ACME state and accounts,
//!   retire.json, the admin API's domain files) parses, and every stored
//!   key belongs to its certificate;
//! - the next start loads them, removes the temporary files the dead
//!   process left, serves every stored certificate with a chain pebble's
//!   root verifies, and serves every domain whose admin write was answered
//!   with 200/201 with that write's policy (or a later one in flight);
//!
//! and at the end every domain gets its certificate.
//!
//! `MTASTS_CRASH_KILLS` sets the number of kills (default 6; bench/crash.sh
//! runs 60), `MTASTS_CRASH_SEED` the random seed (printed, for replay).
//! Without pebble the test skips loudly; under `CI=true` it fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pebble::{self, Pebble};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const TOKEN: &str = "crash-test-token-0123456789abcdef";
// Names: the admin API creates `a0.example.com`, `a1.example.com`, … and
// updates them; each reload adds `r0.example.com`, `r1.example.com`, … to
// the config file. New names keep certificate orders going in every life.

/// xorshift64*: a small, replayable source of random moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the tests' client knows of the admin writes to one domain.
#[derive(Debug, Default, Clone)]
struct Writes {
    /// The last version answered with 200/201.
    acked: Option<u64>,
    /// Versions sent after it whose answer never came (the kill).
    unanswered: BTreeSet<u64>,
}

impl Writes {
    /// Versions the server may serve now: the acknowledged one, or one
    /// sent after it whose answer the kill cut off.
    fn allowed(&self) -> BTreeSet<u64> {
        let mut ok: BTreeSet<u64> = self.unanswered.clone();
        ok.extend(self.acked);
        ok
    }
}

#[derive(Default)]
struct Ledger {
    api: BTreeMap<String, Writes>,
    /// Config-file domains written (atomically) and signalled.
    config: Vec<String>,
    next_version: u64,
    puts_acked: u64,
    puts_cut: u64,
    reloads: u64,
    /// Writes answered with anything but 200/201 (none expected).
    rejected: Vec<String>,
}

struct Rig {
    pebble: Pebble,
    dir: tempfile::TempDir,
    config: PathBuf,
    https: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    base: String,
}

impl Rig {
    fn new() -> Option<Rig> {
        let (https, http, admin) = (common::loopback(), common::loopback(), common::loopback());
        let pebble = Pebble::start(http.port(), https.port(), 0)?;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("domains.d")).expect("mkdir");
        common::write(dir.path(), "admin.token", &format!("{TOKEN}\n"));
        let mut base = String::from("domains_dir = \"domains.d\"\n");
        base.push_str(&common::server_section(
            https,
            http,
            &dir.path().join("state"),
        ));
        // Policies over plain HTTP too: domains without a certificate yet
        // are checked there.
        base.push_str("behind_proxy = true\n");
        base.push_str(&format!(
            r#"
[admin]
listen = "{admin}"
token_file = "admin.token"

{tls}
[defaults]
mode = "testing"
max_age = "1d"
mx = ["mx.example.net"]

[[domain]]
name = "base0.example.com"

[[domain]]
name = "base1.example.com"
"#,
            tls = pebble.tls_section(
                "max_concurrent_orders = 2\norders_per_hour = 100000\nretry_max = \"2s\"",
            ),
        ));
        let config = common::write(dir.path(), "mtasts.toml", &base);
        Some(Rig {
            pebble,
            dir,
            config,
            https,
            http,
            admin,
            base,
        })
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts `mtasts serve`, its stderr in `serve<life>.log`.
    fn spawn(&self, life: usize) -> (Child, PathBuf) {
        let log = self.dir.path().join(format!("serve{life}.log"));
        let child = Command::new(common::bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn mtasts serve");
        (child, log)
    }

    /// Rewrites the config file (atomically: the kill is aimed at mtasts,
    /// not at the editor) with `config` domains appended.
    fn write_config(&self, config: &[String]) {
        let mut text = self.base.clone();
        for name in config {
            text.push_str(&format!("\n[[domain]]\nname = \"{name}\"\n"));
        }
        let tmp = self.dir.path().join("mtasts.toml.new");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
    }
}

/// Waits until `addr` accepts, the child dies, or 30 s pass.
fn wait_listening(child: &mut Child, addrs: &[SocketAddr], log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "mtasts exited with {status} at start-up:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let up = addrs
            .iter()
            .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok());
        if up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "mtasts did not start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `PUT /v1/domains/<name>` on the admin API: `Some(status)`, or `None`
/// when no answer came (the connection failed or was cut).
fn admin_put(admin: SocketAddr, name: &str, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(
        s,
        "PUT /v1/domains/{name} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let head = std::str::from_utf8(resp.get(..12)?).ok()?;
    head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The mx host of the version-`v` policy of `name`.
fn mx_of(name: &str, v: u64) -> String {
    format!("mx{v}.{name}")
}

/// One admin write or one reload, at random, until `stop`.
fn workload(rig: &Rig, pid: u32, rng: &mut Rng, ledger: &Mutex<Ledger>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let pick = rng.below(12);
        if pick == 0 {
            let mut l = ledger.lock().expect("ledger");
            let name = format!("r{}.example.com", l.config.len());
            l.config.push(name);
            rig.write_config(&l.config);
            l.reloads += 1;
            drop(l);
            let _ = Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        } else {
            let (name, v) = {
                let mut l = ledger.lock().expect("ledger");
                let known = l.api.len() as u64;
                // One write in six (or the first) creates a new domain.
                let index = if known == 0 || pick <= 2 {
                    known
                } else {
                    rng.below(known)
                };
                l.next_version += 1;
                (format!("a{index}.example.com"), l.next_version)
            };
            let mode = if v % 2 == 0 { "enforce" } else { "testing" };
            let body = format!(
                r#"{{"mode": "{mode}", "max_age": "1d", "mx": ["{}"]}}"#,
                mx_of(&name, v)
            );
            let answer = admin_put(rig.admin, &name, &body);
            let mut l = ledger.lock().expect("ledger");
            let w = l.api.entry(name.clone()).or_default();
            match answer {
                Some(200 | 201) => {
                    w.acked = Some(v);
                    w.unanswered.clear();
                    l.puts_acked += 1;
                }
                Some(other) => l.rejected.push(format!("PUT {name} v{v}: {other}")),
                None => {
                    w.unanswered.insert(v);
                    l.puts_cut += 1;
                    // The server is gone; wait for the next life.
                    drop(l);
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(60)));
    }
}

/// Every file under `dir` (recursively).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A `write_atomic` temporary file (`.<name>.tmp<pid>.<seq>`)'s writer.
fn temp_writer(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?.strip_prefix('.')?;
    let (head, seq) = name.rsplit_once('.')?;
    seq.parse::<u64>().ok()?;
    head.rsplit_once(".tmp")?.1.parse().ok()
}

/// Why a kept file is damaged, if it is.
fn damage(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let name = path.file_name()?.to_str()?;
    let in_certs = path.parent()?.ends_with("acme/certs");
    if name.ends_with(".json") {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .err()
            .map(|e| format!("JSON: {e}"))
    } else if name.ends_with(".toml") {
        let text = std::str::from_utf8(&bytes).ok()?;
        toml::from_str::<toml::Table>(text)
            .err()
            .map(|e| format!("TOML: {e}"))
    } else if name.ends_with(".pem") && in_certs {
        let chain: Result<Vec<CertificateDer<'static>>, _> =
            CertificateDer::pem_slice_iter(&bytes).collect();
        let chain = match chain {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => return Some("no certificate".into()),
            Err(e) => return Some(format!("PEM: {e:?}")),
        };
        let key = match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(k) => k,
            Err(e) => return Some(format!("key: {e:?}")),
        };
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let signer = match provider.key_provider.load_private_key(key) {
            Ok(s) => s,
            Err(e) => return Some(format!("key: {e}")),
        };
        rustls::sign::CertifiedKey::new(chain, signer)
            .keys_match()
            .err()
            .map(|e| format!("key does not match the certificate: {e}"))
    } else {
        None
    }
}

/// The policy host a stored certificate file is for.
fn cert_host(path: &Path) -> Option<String> {
    Some(path.file_name()?.to_str()?.strip_suffix(".pem")?.to_owned())
}

#[derive(Default, Debug)]
struct Tally {
    kills: usize,
    kills_before_ready: usize,
    kills_with_order_open: usize,
    temps_left: usize,
    temps_after_restart: usize,
    damaged: Vec<String>,
    lost: Vec<String>,
    bad_tls: Vec<String>,
    files_checked: usize,
    certs_served: usize,
}

#[test]
fn sigkill_at_random_moments_never_leaves_a_damaged_or_lost_file() {
    common::init_crypto();
    let Some(rig) = Rig::new() else { return };
    let kills: usize = std::env::var("MTASTS_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("MTASTS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("crash: seed {seed} (MTASTS_CRASH_SEED replays it), {kills} kills");
    let mut rng = Rng(seed);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let root = rt.block_on(rig.pebble.root());
    let ledger = Mutex::new(Ledger::default());
    let mut tally = Tally::default();
    let state = rig.state();
    let kept = |t: &mut Tally| -> Vec<PathBuf> {
        let mut all = files(&state);
        all.extend(files(&rig.dir.path().join("domains.d")));
        t.files_checked += all.len();
        all
    };

    for life in 0..=kills {
        let orders_before = rig.pebble.orders();
        let (mut child, log) = rig.spawn(life);
        let pid = child.id();
        let last = life == kills;
        // One life in five dies during start-up (its first 300 ms).
        let early = !last && rng.below(5) == 0;
        if early {
            std::thread::sleep(Duration::from_millis(rng.below(300)));
        } else {
            wait_listening(&mut child, &[rig.https, rig.http, rig.admin], &log);
            check_restart(&rig, &rt, &root, pid, &ledger, &mut tally);
        }
        if last {
            finish(&rig, &rt, &root, &ledger, &log);
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        if !early {
            // Admin writes and reloads until the kill, at a random moment.
            let stop = Arc::new(AtomicBool::new(false));
            let mut wrng = Rng(rng.next() | 1);
            std::thread::scope(|scope| {
                let worker = scope.spawn(|| workload(&rig, pid, &mut wrng, &ledger, &stop));
                std::thread::sleep(Duration::from_millis(100 + rng.below(2500)));
                child.kill().expect("SIGKILL");
                let _ = child.wait();
                stop.store(true, Ordering::Relaxed);
                worker.join().expect("workload");
            });
        } else {
            child.kill().expect("SIGKILL");
            let _ = child.wait();
            tally.kills_before_ready += 1;
        }
        tally.kills += 1;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let opened = rig.pebble.orders().saturating_sub(orders_before);
        if opened > text.matches("certificate issued").count() {
            tally.kills_with_order_open += 1;
        }
        for path in kept(&mut tally) {
            if temp_writer(&path).is_some() {
                tally.temps_left += 1;
            } else if let Some(why) = damage(&path) {
                tally
                    .damaged
                    .push(format!("life {life}: {}: {why}", path.display()));
            }
        }
    }

    let l = ledger.lock().expect("ledger");
    let rows: [(&str, String); 14] = [
        ("SIGKILLs", tally.kills.to_string()),
        (
            "… in the first 300 ms of start-up",
            tally.kills_before_ready.to_string(),
        ),
        (
            "… with an ACME order open",
            tally.kills_with_order_open.to_string(),
        ),
        ("admin writes answered 200/201", l.puts_acked.to_string()),
        ("admin writes cut off by a kill", l.puts_cut.to_string()),
        ("config reloads (file + SIGHUP)", l.reloads.to_string()),
        (
            "kept files checked after kills",
            tally.files_checked.to_string(),
        ),
        (
            "temporary files left by kills",
            tally.temps_left.to_string(),
        ),
        (
            "… still there after restart",
            tally.temps_after_restart.to_string(),
        ),
        (
            "stored certificates served and verified",
            tally.certs_served.to_string(),
        ),
        ("damaged files", tally.damaged.len().to_string()),
        ("lost acknowledged writes", tally.lost.len().to_string()),
        (
            "stored certificates not served",
            tally.bad_tls.len().to_string(),
        ),
        ("seed", seed.to_string()),
    ];
    println!("| crash-safety measure | value |\n|---|---:|");
    for (what, value) in rows {
        println!("| {what} | {value} |");
    }
    assert!(
        tally.damaged.is_empty(),
        "damaged files: {:#?}",
        tally.damaged
    );
    assert!(tally.lost.is_empty(), "lost writes: {:#?}", tally.lost);
    assert!(tally.bad_tls.is_empty(), "bad TLS: {:#?}", tally.bad_tls);
    assert_eq!(tally.temps_after_restart, 0, "stale temporary files");
    assert!(l.rejected.is_empty(), "rejected writes: {:#?}", l.rejected);
    assert!(l.puts_acked > 0, "no admin write was ever answered");
}

/// After a restart: no stale temporary file, every stored certificate is
/// served and verifies, every acknowledged write is served.
fn check_restart(
    rig: &Rig,
    rt: &tokio::runtime::Runtime,
    root: &[u8],
    pid: u32,
    ledger: &Mutex<Ledger>,
    tally: &mut Tally,
) {
    let mut all = files(&rig.state());
    all.extend(files(&rig.dir.path().join("domains.d")));
    for path in &all {
        if temp_writer(path).is_some_and(|w| w != pid) {
            tally.temps_after_restart += 1;
        }
    }
    let certs = files(&rig.state().join("acme/certs"));
    for path in certs.iter().filter(|p| temp_writer(p).is_none()) {
        let Some(host) = cert_host(path) else {
            continue;
        };
        match rt.block_on(pebble::https_get(
            rig.https,
            &host,
            "/.well-known/mta-sts.txt",
            root,
            &[],
        )) {
            Ok(r) if r.status == 200 => tally.certs_served += 1,
            Ok(r) => tally.bad_tls.push(format!("{host}: status {}", r.status)),
            Err(e) => tally.bad_tls.push(format!("{host}: {e}")),
        }
    }
    let l = ledger.lock().expect("ledger");
    for (name, w) in &l.api {
        let allowed = w.allowed();
        let served = common::served_body(rig.http.port(), name);
        let version = served.as_ref().and_then(|b| {
            let text = String::from_utf8_lossy(b);
            allowed
                .iter()
                .copied()
                .find(|v| text.contains(&format!("mx: {}\r\n", mx_of(name, *v))))
        });
        match (version, w.acked) {
            (Some(_), _) => {}
            (None, None) if served.is_none() => {}
            _ => tally.lost.push(format!(
                "{name}: acknowledged {:?}, unanswered {:?}, served {:?}",
                w.acked,
                w.unanswered,
                served.map(|b| String::from_utf8_lossy(&b).into_owned())
            )),
        }
    }
    for name in &l.config {
        if common::served_body(rig.http.port(), name).is_none() {
            tally
                .lost
                .push(format!("{name}: in the config file, not served"));
        }
    }
}

/// The last life: every domain gets a certificate that pebble's root
/// verifies, served with its policy.
fn finish(
    rig: &Rig,
    rt: &tokio::runtime::Runtime,
    root: &[u8],
    ledger: &Mutex<Ledger>,
    log: &Path,
) {
    let l = ledger.lock().expect("ledger");
    let mut names: Vec<String> = vec!["base0.example.com".into(), "base1.example.com".into()];
    names.extend(l.config.iter().cloned());
    names.extend(
        l.api
            .iter()
            .filter(|(name, _)| common::served_body(rig.http.port(), name).is_some())
            .map(|(name, _)| name.clone()),
    );
    drop(l);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut waiting: Vec<String> = names;
    while !waiting.is_empty() {
        waiting.retain(|name| {
            let host = format!("mta-sts.{name}");
            !rt.block_on(pebble::https_get(
                rig.https,
                &host,
                "/.well-known/mta-sts.txt",
                root,
                &[],
            ))
            .is_ok_and(|r| r.status == 200 && r.body.starts_with("version: STSv1\r\n"))
        });
        assert!(
            Instant::now() < deadline,
            "no certificate for {waiting:?} within 180 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
