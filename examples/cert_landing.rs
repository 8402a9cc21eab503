//! Cost of N certificates landing in the SNI index, one at a time (a first
//! issuance of N domains), for docs/PERFORMANCE.md:
//!
//! - `copy`: the former pinned tier, an `ArcSwap<HashMap>` copied whole per
//!   landing certificate (the code this replaced, reproduced here);
//! - `land`: `CertIndex::land`, one insert into the host map and the cache.
//!
//! ```text
//! cert_landing 1000 10000 30000 100000 [--copy-max 30000]
//! ```
//! Prints one line per N and method. The copy method is skipped above
//! `--copy-max` (it is quadratic: 100,000 landings take minutes).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use mtasts::tls::{CertIndex, CertLoader, certified_key};
use rustls::sign::CertifiedKey;

struct NoLoader;

impl CertLoader for NoLoader {
    fn load(&self, _host: &str) -> Result<CertifiedKey, String> {
        Err("not stored".to_owned())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut sizes = Vec::new();
    let mut copy_max = 30_000;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--copy-max" {
            copy_max = it.next().ok_or("--copy-max needs a value")?.parse()?;
        } else {
            sizes.push(a.parse::<usize>()?);
        }
    }
    if sizes.is_empty() {
        sizes = vec![1_000, 10_000, 30_000];
    }
    // One real key, shared: what is measured is the index, not the keys.
    let host = "mta-sts.bench.test";
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![host.to_owned()])?.self_signed(&key)?;
    let key = Arc::new(certified_key(
        host,
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
    )?);
    for n in sizes {
        let hosts: Vec<String> = (0..n).map(|i| format!("mta-sts.d{i}.bench.test")).collect();
        if n <= copy_max {
            let pinned: ArcSwap<HashMap<Box<str>, Arc<CertifiedKey>>> = ArcSwap::default();
            let t = Instant::now();
            for h in &hosts {
                pinned.rcu(|map| {
                    let mut map = HashMap::clone(map);
                    map.insert(h.as_str().into(), Arc::clone(&key));
                    map
                });
            }
            report(n, "copy", t.elapsed());
        }
        let index = CertIndex::lazy(Arc::new(NoLoader), 10_000);
        let t = Instant::now();
        for h in &hosts {
            index.land(h, Arc::clone(&key));
        }
        report(n, "land", t.elapsed());
    }
    Ok(())
}

fn report(n: usize, method: &str, took: std::time::Duration) {
    let secs = took.as_secs_f64();
    println!(
        "n={n} method={method} total_s={secs:.4} per_cert_us={:.2}",
        secs * 1e6 / n as f64
    );
}
