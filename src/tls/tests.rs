use super::*;

#[test]
fn ca_and_leaf_persist_across_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let first = ca.leaf("mta-sts.example.com").expect("leaf");
    let ca_pem = std::fs::read(&ca.cert_path).expect("ca pem");

    let again = LocalCa::load_or_create(dir.path()).expect("ca again");
    assert_eq!(std::fs::read(&again.cert_path).expect("ca pem"), ca_pem);
    let second = again.leaf("mta-sts.example.com").expect("leaf again");
    assert_eq!(first.cert, second.cert, "stored leaf is reused");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [
            dir.path().join("ca/ca-key.pem"),
            dir.path().join("self-signed/mta-sts.example.com/key.pem"),
        ] {
            let mode = std::fs::metadata(&key).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
    }
}

#[test]
fn leaf_for_other_name_or_corrupt_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let first = ca.leaf("mta-sts.example.com").expect("leaf");
    let cert_path = dir.path().join("self-signed/mta-sts.example.com/cert.pem");
    std::fs::write(&cert_path, b"garbage").expect("corrupt");
    let second = ca.leaf("mta-sts.example.com").expect("reissued");
    assert_ne!(first.cert, second.cert);
}

/// A ClientHello for `sni`, as bytes on the wire.
fn client_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).expect("hello");
    wire
}

/// Whether a server with `config` accepts the ClientHello for `sni`,
/// i.e. its resolver found a certificate.
fn accepts(config: &Arc<rustls::ServerConfig>, sni: &str) -> bool {
    let mut acceptor = rustls::server::Acceptor::default();
    acceptor
        .read_tls(&mut client_hello(sni).as_slice())
        .expect("read");
    let accepted = acceptor.accept().expect("parse").expect("complete hello");
    accepted.into_connection(Arc::clone(config)).is_ok()
}

#[test]
fn handshake_key_is_used_only_for_its_host_and_only_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let key = Arc::new(ca.leaf("mta-sts.a.example").expect("leaf"));
    // An index that holds nothing, as after an eviction.
    let config = server_config(Arc::new(CertIndex::default()));
    let host: Arc<str> = Arc::from("mta-sts.a.example");
    assert!(!accepts(&config, "mta-sts.a.example"));
    assert!(with_handshake_key(&host, Arc::clone(&key), || accepts(
        &config,
        "mta-sts.a.example"
    )));
    // Never handed to another name, and gone once the closure returns.
    assert!(!with_handshake_key(&host, Arc::clone(&key), || accepts(
        &config,
        "mta-sts.b.example"
    )));
    assert!(!accepts(&config, "mta-sts.a.example"));
    // Cleared even when the closure unwinds.
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        with_handshake_key(&host, Arc::clone(&key), || panic!("boom"))
    }));
    assert!(unwound.is_err());
    assert!(!accepts(&config, "mta-sts.a.example"));
}

#[test]
fn index_lookup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let index = CertIndex::default();
    index.land(
        "mta-sts.a.example",
        Arc::new(ca.leaf("mta-sts.a.example").expect("leaf")),
    );
    assert!(index.contains("mta-sts.a.example"));
    assert!(index.lookup("mta-sts.a.example").is_some());
    assert!(index.lookup("mta-sts.b.example").is_none());
}

/// A loader over a map that counts its loads; a host it does not have
/// fails like a missing file.
#[derive(Default)]
struct MapLoader {
    keys: std::sync::Mutex<HashMap<String, Arc<CertifiedKey>>>,
    loads: AtomicU64,
}

impl MapLoader {
    fn put(&self, host: &str, key: Arc<CertifiedKey>) {
        self.keys.lock().expect("lock").insert(host.to_owned(), key);
    }
}

impl CertLoader for MapLoader {
    fn load(&self, host: &str) -> Result<CertifiedKey, String> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let keys = self.keys.lock().expect("lock");
        let key = keys.get(host).ok_or("no stored certificate")?;
        Ok(CertifiedKey::clone(key))
    }
}

/// A certificate for `host` from `ca` valid until `days` from now
/// (negative: expired).
fn leaf_until(ca: &LocalCa, host: &str, days: i64) -> Arc<CertifiedKey> {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![host.to_owned()]).expect("params");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(100);
    params.not_after = now + time::Duration::days(days);
    let cert = params.signed_by(&key, &ca.issuer).expect("cert");
    Arc::new(
        certified_key(host, cert.pem().as_bytes(), key.serialize_pem().as_bytes()).expect("key"),
    )
}

#[tokio::test]
async fn stored_hosts_are_loaded_on_use_evicted_and_reloaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let loader = Arc::new(MapLoader::default());
    let hosts: Vec<String> = (0..5).map(|i| format!("mta-sts.d{i}.example")).collect();
    for h in &hosts {
        loader.put(h, leaf_until(&ca, h, 30));
    }
    // A cache of 2 for 5 hosts: every round evicts and reloads.
    let index = CertIndex::lazy(Arc::clone(&loader) as Arc<dyn CertLoader>, 2);
    index.add_unverified(hosts.iter().map(|h| Box::<str>::from(h.as_str())));
    assert_eq!(index.len(), 5);
    // Stored but not read yet: served, yet not counted as valid.
    assert!(!index.contains(&hosts[0]));
    assert_eq!(index.soonest_expiry(), None);
    for _ in 0..2 {
        for h in &hosts {
            let key = index.obtain(h).await.expect("served");
            let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).expect("x509");
            assert!(names_host(&cert, h), "{h} got another host's certificate");
            assert!(index.contains(h));
        }
    }
    let loads = loader.loads.load(Ordering::Relaxed);
    assert!(loads > 5, "evicted certificates are loaded again ({loads})");
    assert_eq!(index.loads(), loads);
    assert!(index.soonest_expiry().is_some());
    // Unknown names never reach the loader.
    assert!(index.obtain("mta-sts.unknown.example").await.is_none());
    assert_eq!(loader.loads.load(Ordering::Relaxed), loads);
}

#[tokio::test]
async fn landed_certificate_replaces_cached_one_and_removal_stops_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let loader = Arc::new(MapLoader::default());
    let host = "mta-sts.a.example";
    let old = leaf_until(&ca, host, 10);
    loader.put(host, Arc::clone(&old));
    let index = CertIndex::lazy(Arc::clone(&loader) as Arc<dyn CertLoader>, 10);
    // Not issued yet: nothing served, the loader is not asked.
    assert!(index.obtain(host).await.is_none());
    index.add_unverified([Box::<str>::from(host)]);
    assert_eq!(index.obtain(host).await.expect("stored").cert, old.cert);
    assert_eq!(index.soonest_expiry(), not_after(&old));

    // A renewal lands: served at once, without a load.
    let new = leaf_until(&ca, host, 80);
    let loads = loader.loads.load(Ordering::Relaxed);
    index.land(host, Arc::clone(&new));
    assert_eq!(index.obtain(host).await.expect("renewed").cert, new.cert);
    assert_eq!(index.lookup(host).expect("cached").cert, new.cert);
    assert_eq!(loader.loads.load(Ordering::Relaxed), loads);
    assert_eq!(index.soonest_expiry(), not_after(&new));

    // Removed: not served, whatever the cache held; added again as
    // stored, it is read again rather than served from the old entry.
    index.remove(host);
    assert!(!index.contains(host));
    assert!(index.obtain(host).await.is_none());
    assert!(index.lookup(host).is_none());
    index.add_unverified([Box::<str>::from(host)]);
    assert_eq!(index.obtain(host).await.expect("reloaded").cert, old.cert);
    assert_eq!(loader.loads.load(Ordering::Relaxed), loads + 1);
}

#[tokio::test]
async fn expired_or_missing_stored_certificate_is_not_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let loader = Arc::new(MapLoader::default());
    loader.put(
        "mta-sts.old.example",
        leaf_until(&ca, "mta-sts.old.example", -1),
    );
    let index = CertIndex::lazy(Arc::clone(&loader) as Arc<dyn CertLoader>, 10);
    index.add_unverified(["mta-sts.old.example", "mta-sts.gone.example"].map(Box::<str>::from));
    assert!(index.obtain("mta-sts.old.example").await.is_none());
    assert!(index.obtain("mta-sts.gone.example").await.is_none());
    assert!(!index.contains("mta-sts.old.example"));
    // Once seen expired, it is refused without going to disk again.
    let loads = loader.loads.load(Ordering::Relaxed);
    assert!(index.obtain("mta-sts.old.example").await.is_none());
    assert_eq!(loader.loads.load(Ordering::Relaxed), loads);
    // The manager's verdict from the store counts too.
    index.verified("mta-sts.gone.example", unix_now() - 10);
    assert!(!index.contains("mta-sts.gone.example"));
}

/// A cached certificate that expires is loaded again (the local CA
/// issues a new one then), not refused for good.
#[tokio::test]
async fn expired_cached_certificate_is_loaded_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let loader = Arc::new(MapLoader::default());
    let host = "mta-sts.a.example";
    let fresh = leaf_until(&ca, host, 30);
    loader.put(host, Arc::clone(&fresh));
    let index = CertIndex::lazy(Arc::clone(&loader) as Arc<dyn CertLoader>, 10);
    index.land(host, leaf_until(&ca, host, -1));
    assert!(!index.contains(host));
    assert_eq!(index.obtain(host).await.expect("reloaded").cert, fresh.cert);
    assert!(index.contains(host));
    assert_eq!(loader.loads.load(Ordering::Relaxed), 1);
}

/// With `serve_lazily`, hosts are served as the predicate says, with no
/// entry until a certificate is loaded; a host that goes is dropped
/// from the entries and the cache.
#[tokio::test]
async fn lazily_served_hosts_need_no_entry_until_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::load_or_create(dir.path()).expect("ca");
    let loader = Arc::new(MapLoader::default());
    for h in ["mta-sts.a.example", "mta-sts.b.example"] {
        loader.put(h, leaf_until(&ca, h, 30));
    }
    let served = Arc::new(std::sync::Mutex::new(std::collections::HashSet::from([
        "mta-sts.a.example".to_owned(),
        "mta-sts.b.example".to_owned(),
    ])));
    let index = CertIndex::lazy(Arc::clone(&loader) as Arc<dyn CertLoader>, 10);
    let view = Arc::clone(&served);
    index.serve_lazily(move |h| view.lock().expect("lock").contains(h));
    assert!(index.contains("mta-sts.a.example"));
    assert!(!index.contains("mta-sts.c.example"));
    assert_eq!(index.len(), 0, "no entry before a handshake");
    assert!(index.obtain("mta-sts.a.example").await.is_some());
    assert_eq!(index.len(), 1, "an entry once loaded");
    assert!(index.expiry("mta-sts.a.example").is_some());
    assert!(index.obtain("mta-sts.c.example").await.is_none());
    // a.example goes: no entry, not served, not in the cache.
    served.lock().expect("lock").remove("mta-sts.a.example");
    index.remove("mta-sts.a.example");
    assert_eq!(index.len(), 0);
    assert!(!index.contains("mta-sts.a.example"));
    assert!(index.obtain("mta-sts.a.example").await.is_none());
    assert!(index.lookup("mta-sts.a.example").is_none());
    assert!(index.obtain("mta-sts.b.example").await.is_some());
}
