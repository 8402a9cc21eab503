//! Writes an ACME-mode setup with N domains whose certificates are already
//! in the store, for measuring start-up, memory and the lazy certificate
//! loader without a CA (docs/PERFORMANCE.md).
//!
//! ```text
//! acme_store --dir /tmp/acme100k --domains 100000 [--https 29443] [--http 29080]
//!            [--cert-cache 10000] [--threads 2] [--no-record]
//! ```
//!
//! `--no-record` writes state files as stores from before the certificate's
//! validity was recorded in them (the manager then reads every certificate).
//!
//! Layout written under `--dir`:
//! - `mtasts.toml` (ACME mode; the directory URL points at a closed port,
//!   so nothing is ever ordered) and `domains.d/base.toml` with
//!   `d<i>.bench.test` for i in 0..N;
//! - `state/acme/certs/mta-sts.d<i>.bench.test.pem` (key + leaf + CA, 0600)
//!   and `state/acme/state/<host>.json`, exactly what `DirStore` keeps;
//! - `ca.pem`: the CA that signed the leaves, for `loadgen --ca`.
//!
//! Files are written directly (no fsync): this is a fixture, not a store
//! that must survive a crash.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};

struct Args {
    dir: PathBuf,
    domains: usize,
    https: u16,
    http: u16,
    cert_cache: usize,
    threads: usize,
    record: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: PathBuf::new(),
        domains: 1000,
        https: 29443,
        http: 29080,
        cert_cache: 10_000,
        threads: 2,
        record: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--dir" => args.dir = PathBuf::from(val()?),
            "--domains" => args.domains = val()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--https" => args.https = val()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--http" => args.http = val()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--cert-cache" => args.cert_cache = val()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--threads" => args.threads = val()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--no-record" => args.record = false,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.dir.as_os_str().is_empty() {
        return Err("--dir is required".to_owned());
    }
    Ok(args)
}

/// A closed port: the manager never reaches a CA, so it never orders.
const DIRECTORY: &str = "https://127.0.0.1:9/dir";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let dir = &args.dir;
    let certs = dir.join("state/acme/certs");
    let states = dir.join("state/acme/state");
    for d in [&certs, &states, &dir.join("state/acme/accounts")] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::create_dir_all(dir.join("domains.d"))?;

    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "acme_store fixture CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    std::fs::write(dir.join("ca.pem"), &ca_pem)?;
    let issuer = Arc::new(Issuer::new(params, ca_key));

    let mut config = format!(
        r#"domains_dir = "domains.d"

[server]
https = "127.0.0.1:{https}"
http = "127.0.0.1:{http}"
state_dir = "state"
cert_cache = {cache}
max_connections = 100000

[tls]
mode = "acme"
directory = "{DIRECTORY}"
ca_roots = "ca.pem"
contact = "hostmaster@example.com"
precheck_dns = false

[defaults]
mode = "enforce"
max_age = "1w"
mx = ["mx1.provider.example"]
"#,
        https = args.https,
        http = args.http,
        cache = args.cert_cache,
    );
    config.push('\n');
    std::fs::write(dir.join("mtasts.toml"), config)?;
    let mut domains = String::new();
    for i in 0..args.domains {
        let _ = writeln!(domains, "[[domain]]\nname = \"d{i}.bench.test\"");
    }
    std::fs::write(dir.join("domains.d/base.toml"), domains)?;

    let now = time::OffsetDateTime::now_utc();
    let threads = args.threads.max(1);
    let started = std::time::Instant::now();
    std::thread::scope(|scope| -> Result<(), String> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let issuer = Arc::clone(&issuer);
                let (certs, states, ca_pem) = (&certs, &states, &ca_pem);
                let n = args.domains;
                let record = args.record;
                scope.spawn(move || -> Result<(), String> {
                    for i in (t..n).step_by(threads) {
                        write_one(i, &issuer, ca_pem, certs, states, now, record)
                            .map_err(|e| format!("domain {i}: {e}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "worker panicked".to_owned())??;
        }
        Ok(())
    })?;
    println!(
        "wrote {} certificates under {} in {:.1} s",
        args.domains,
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn write_one(
    i: usize,
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
    certs: &Path,
    states: &Path,
    now: time::OffsetDateTime,
    record: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::unix::fs::OpenOptionsExt;
    let host = format!("mta-sts.d{i}.bench.test");
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![host.clone()])?;
    // Issued 10 days ago, 90-day lifetime: nothing is due for renewal.
    let (not_before, not_after) = (
        now - time::Duration::days(10),
        now + time::Duration::days(80),
    );
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, issuer)?;
    let bundle = format!("{}{}{}", key.serialize_pem(), cert.pem(), ca_pem);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(certs.join(format!("{host}.pem")))?;
    std::io::Write::write_all(&mut file, bundle.as_bytes())?;
    let issued = not_before.unix_timestamp();
    let validity = if record {
        format!(
            r#","cert_not_before":{issued},"cert_not_after":{}"#,
            not_after.unix_timestamp()
        )
    } else {
        String::new()
    };
    let state = format!(
        r#"{{"failures":0,"last_order_at":{issued},"last_challenge":"http-01","issued_at":{issued},"directory":"{DIRECTORY}"{validity}}}"#
    );
    std::fs::write(states.join(format!("{host}.json")), state)?;
    Ok(())
}
