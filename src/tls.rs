//! TLS for the HTTPS listener: the SNI → certificate index (lock-free reads
//! over an `ArcSwap` map), the rustls server config, and the local CA of
//! `tls.mode = "self-signed"` that issues one certificate per
//! `mta-sts.<domain>` and keeps it in `state_dir` across restarts.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::store;

/// A fatal `unrecognized_name` alert (RFC 6066 §3, alert 112) as a plaintext
/// TLS record: what a client with an SNI we do not serve receives, instead of
/// another domain's certificate.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// ALPN protocols offered to clients.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Errors of certificate handling; each names the file or host involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("cannot generate a certificate for {host}: {source}")]
    Generate { host: String, source: rcgen::Error },
    #[error("certificate for {host} is unusable: {source}")]
    Key { host: String, source: rustls::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads (or creates) the certificate of one host; blocking, called from
/// `spawn_blocking` on the first handshake for a host not in memory.
pub trait CertLoader: Send + Sync {
    fn load(&self, host: &str) -> Result<CertifiedKey, String>;
}

/// The SNI index: which hosts may complete a handshake, and their
/// certificates (host names lowercase, no trailing dot).
///
/// Two tiers: `pinned` certificates are always in memory (ACME hands them
/// over as they land); `lazy` hosts have their certificate loaded from disk
/// on first use into a bounded cache, so start-up reads no certificate and
/// memory stays flat however many domains there are.
#[derive(Default)]
pub struct CertIndex {
    pinned: ArcSwap<HashMap<Box<str>, Arc<CertifiedKey>>>,
    lazy: Option<LazyTier>,
}

struct LazyTier {
    /// Hosts the loader may be asked for (the current snapshot's hosts).
    hosts: ArcSwap<HashSet<Box<str>>>,
    cache: quick_cache::sync::Cache<String, Arc<CertifiedKey>>,
    loader: Arc<dyn CertLoader>,
    /// Certificates loaded from the loader since start (cache misses).
    loads: std::sync::atomic::AtomicU64,
    /// Earliest expiry (Unix seconds) of any certificate loaded so far.
    soonest: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for CertIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertIndex")
            .field("pinned", &self.pinned.load().len())
            .field("lazy", &self.lazy.is_some())
            .finish()
    }
}

impl CertIndex {
    /// An index that loads certificates on demand, keeping at most
    /// `capacity` of them in memory.
    pub fn lazy(loader: Arc<dyn CertLoader>, capacity: usize) -> CertIndex {
        CertIndex {
            pinned: ArcSwap::default(),
            lazy: Some(LazyTier {
                hosts: ArcSwap::default(),
                cache: quick_cache::sync::Cache::new(capacity.max(1)),
                loader,
                loads: std::sync::atomic::AtomicU64::new(0),
                soonest: std::sync::atomic::AtomicI64::new(i64::MAX),
            }),
        }
    }

    /// The certificate of `host` if it is in memory.
    pub fn lookup(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(ck) = self.pinned.load().get(host) {
            return Some(Arc::clone(ck));
        }
        self.lazy.as_ref()?.cache.get(host)
    }

    /// Whether a handshake for `host` can get a certificate.
    pub fn contains(&self, host: &str) -> bool {
        self.pinned.load().contains_key(host)
            || self
                .lazy
                .as_ref()
                .is_some_and(|l| l.hosts.load().contains(host))
    }

    /// The certificate for a handshake: from memory, else loaded (once,
    /// however many handshakes ask at the same time). `None` for a host that
    /// is not served or whose certificate cannot be loaded (logged).
    pub async fn obtain(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(ck) = self.pinned.load().get(host) {
            return Some(Arc::clone(ck));
        }
        let lazy = self.lazy.as_ref()?;
        if !lazy.hosts.load().contains(host) {
            return None;
        }
        let loaded = lazy
            .cache
            .get_or_insert_async(host, async {
                let loader = Arc::clone(&lazy.loader);
                let owned = host.to_owned();
                let ck = tokio::task::spawn_blocking(move || loader.load(&owned))
                    .await
                    .map_err(|e| e.to_string())??;
                lazy.loads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(t) = not_after(&ck) {
                    lazy.soonest
                        .fetch_min(t, std::sync::atomic::Ordering::Relaxed);
                }
                Ok::<_, String>(Arc::new(ck))
            })
            .await;
        match loaded {
            Ok(ck) => Some(ck),
            Err(e) => {
                tracing::error!(host, "cannot load certificate: {e}");
                None
            }
        }
    }

    /// Number of hosts that can complete a handshake.
    pub fn len(&self) -> usize {
        self.pinned.load().len() + self.lazy.as_ref().map_or(0, |l| l.hosts.load().len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Certificates loaded on demand since start.
    pub fn loads(&self) -> u64 {
        self.lazy
            .as_ref()
            .map_or(0, |l| l.loads.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Earliest expiry (Unix seconds) among the certificates in memory or
    /// loaded since start.
    pub fn soonest_expiry(&self) -> Option<i64> {
        let pinned = self
            .pinned
            .load()
            .values()
            .filter_map(|ck| not_after(ck))
            .min();
        let lazy = self
            .lazy
            .as_ref()
            .map(|l| l.soonest.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|t| *t != i64::MAX);
        pinned.into_iter().chain(lazy).min()
    }

    /// Adds or replaces one host's certificate (ACME: a certificate landed).
    /// Copies the map: fine at the rate certificates arrive.
    pub fn insert(&self, host: &str, key: Arc<CertifiedKey>) {
        self.pinned.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(host.into(), Arc::clone(&key));
            map
        });
    }

    /// Adds (or replaces) and removes many hosts in one map copy.
    pub fn update(&self, insert: Vec<(Box<str>, Arc<CertifiedKey>)>, remove: &[Box<str>]) {
        if insert.is_empty() && remove.is_empty() {
            return;
        }
        self.pinned.rcu(|map| {
            let mut map = HashMap::clone(map);
            for host in remove {
                map.remove(host);
            }
            map.extend(insert.iter().map(|(h, k)| (h.clone(), Arc::clone(k))));
            map
        });
    }

    /// Sets the hosts served through the loader; certificates of hosts that
    /// are no longer served leave the cache.
    pub fn set_lazy_hosts(&self, hosts: HashSet<Box<str>>) {
        if let Some(lazy) = &self.lazy {
            let old = lazy.hosts.swap(Arc::new(hosts));
            let new = lazy.hosts.load();
            for gone in old.iter().filter(|h| !new.contains(*h)) {
                lazy.cache.remove(&**gone);
            }
        }
    }

    /// The pinned map, for building the next one.
    pub fn snapshot(&self) -> Arc<HashMap<Box<str>, Arc<CertifiedKey>>> {
        self.pinned.load_full()
    }

    /// Replaces all pinned certificates.
    pub fn replace(&self, map: HashMap<Box<str>, Arc<CertifiedKey>>) {
        self.pinned.store(Arc::new(map));
    }
}

/// Whether a certificate's subjectAltName lists `host` as a DNS name.
pub fn names_host(cert: &x509_parser::certificate::X509Certificate<'_>, host: &str) -> bool {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(|n| {
                matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if d.eq_ignore_ascii_case(host))
            })
        })
}

/// Expiry (Unix seconds) of a certificate's leaf.
pub fn not_after(ck: &CertifiedKey) -> Option<i64> {
    let leaf = ck.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.validity().not_after.timestamp())
}

thread_local! {
    /// The certificate chosen for the handshake being set up on this thread
    /// (see [`with_handshake_key`]).
    static HANDSHAKE_KEY: std::cell::RefCell<Option<(Arc<str>, Arc<CertifiedKey>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Clears the slot even when the closure unwinds, so a key can never be
/// handed to a later handshake of another host.
struct SlotGuard;

impl Drop for SlotGuard {
    fn drop(&mut self) {
        HANDSHAKE_KEY.with(|slot| slot.borrow_mut().take());
    }
}

/// Runs `f` with `key` as the certificate the resolver returns for `host`.
///
/// `f` is rustls' `Accepted::into_connection` (through tokio-rustls'
/// `StartHandshake::into_stream`), which resolves the certificate
/// synchronously, on this thread. The resolver must not depend on the cache
/// still holding the key `CertIndex::obtain` returned a moment before: the
/// cache may evict it, and quick_cache wakes the handshakes that waited for
/// a load before the loaded value replaces its placeholder — a woken
/// handshake on the other worker thread then found nothing and failed with
/// `access_denied` (1 to 5 of ~1,000 first handshakes, seen in CI).
pub fn with_handshake_key<R>(host: &Arc<str>, key: Arc<CertifiedKey>, f: impl FnOnce() -> R) -> R {
    HANDSHAKE_KEY.with(|slot| *slot.borrow_mut() = Some((Arc::clone(host), key)));
    let _clear = SlotGuard;
    f()
}

impl ResolvesServerCert for CertIndex {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = crate::http::normalize_host(hello.server_name()?)?;
        let chosen = HANDSHAKE_KEY.with(|slot| {
            slot.borrow_mut()
                .take_if(|(host, _)| **host == *name)
                .map(|(_, key)| key)
        });
        chosen.or_else(|| self.lookup(&name))
    }
}

/// The rustls config of the HTTPS listener: certificates from `index`, ALPN
/// h2 and http/1.1.
pub fn server_config(index: Arc<CertIndex>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(index);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Builds a rustls key from PEM text (certificate chain + private key).
pub fn certified_key(host: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in PEM".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("bad key PEM: {e}"))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported key for {host}: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| format!("key does not match certificate for {host}: {e}"))?;
    Ok(ck)
}

/// The local CA of self-signed mode, stored as `state_dir/ca/ca.pem` and
/// `state_dir/ca/ca-key.pem` (0600).
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// Path of the CA certificate that clients (curl --cacert) must trust.
    pub cert_path: PathBuf,
    /// DER of the CA certificate, to recognise leaves it issued.
    subject_der: Vec<u8>,
    leaf_dir: PathBuf,
}

/// A leaf is regenerated at start when it has less than this left.
const RENEW_BEFORE: time::Duration = time::Duration::days(30);

impl LocalCa {
    /// Loads the CA from `state_dir`, creating it on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<LocalCa, TlsError> {
        let dir = state_dir.join("ca");
        store::ensure_private_dir(&dir).map_err(io_err(&dir))?;
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        let leaf_dir = state_dir.join("self-signed");
        store::ensure_private_dir(&leaf_dir).map_err(io_err(&leaf_dir))?;

        let existing = cert_path.exists() && key_path.exists();
        let (cert_pem, key) = if existing {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::BadFile {
                path: key_path.clone(),
                reason: format!("not a usable private key: {e}"),
            })?;
            (cert_pem, key)
        } else {
            let key = KeyPair::generate().map_err(|source| TlsError::Generate {
                host: "local CA".to_owned(),
                source,
            })?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "mtasts local CA");
            dn.push(DnType::OrganizationName, "mtasts self-signed mode");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(3650);
            let cert = params
                .self_signed(&key)
                .map_err(|source| TlsError::Generate {
                    host: "local CA".to_owned(),
                    source,
                })?;
            store::write_atomic(&key_path, key.serialize_pem().as_bytes(), store::KEY_MODE)
                .map_err(io_err(&key_path))?;
            store::write_atomic(&cert_path, cert.pem().as_bytes(), store::PUBLIC_MODE)
                .map_err(io_err(&cert_path))?;
            (cert.pem(), key)
        };
        let subject_der = ca_subject(&cert_path, cert_pem.as_bytes())?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::BadFile {
            path: cert_path.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
        Ok(LocalCa {
            issuer,
            cert_path,
            subject_der,
            leaf_dir,
        })
    }

    /// The certificate for `host`: reused from `state_dir/self-signed/<host>/`
    /// when it is ours, for this name and not close to expiry; else issued
    /// anew and stored.
    pub fn leaf(&self, host: &str) -> Result<CertifiedKey, TlsError> {
        let dir = self.leaf_dir.join(host);
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        if let (Ok(cert), Ok(key)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) {
            if self.reusable(host, &cert)
                && let Ok(ck) = certified_key(host, &cert, &key)
            {
                return Ok(ck);
            }
            tracing::info!(host, "replacing stored self-signed certificate");
        }
        store::ensure_private_dir(&dir).map_err(io_err(&dir))?;
        let generate = |source| TlsError::Generate {
            host: host.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName(host.try_into().map_err(generate)?)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(90);
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        // Key first: a crash between the two writes leaves a key without a
        // matching certificate, which the reuse check rejects.
        store::write_atomic(&key_path, key_pem.as_bytes(), store::KEY_MODE)
            .map_err(io_err(&key_path))?;
        store::write_atomic(&cert_path, cert_pem.as_bytes(), store::PUBLIC_MODE)
            .map_err(io_err(&cert_path))?;
        certified_key(host, cert_pem.as_bytes(), key_pem.as_bytes()).map_err(|reason| {
            TlsError::BadFile {
                path: cert_path,
                reason,
            }
        })
    }

    fn reusable(&self, host: &str, cert_pem: &[u8]) -> bool {
        let Some(pem) = x509_parser::pem::Pem::iter_from_buffer(cert_pem)
            .filter_map(Result::ok)
            .next()
        else {
            return false;
        };
        let Ok(cert) = pem.parse_x509() else {
            return false;
        };
        let fresh = cert.validity().not_after.to_datetime()
            > time::OffsetDateTime::now_utc() + RENEW_BEFORE;
        let ours = cert.issuer().as_raw() == self.subject_der.as_slice();
        let named = names_host(&cert, host);
        fresh && ours && named
    }
}

impl CertLoader for LocalCa {
    fn load(&self, host: &str) -> Result<CertifiedKey, String> {
        self.leaf(host).map_err(|e| e.to_string())
    }
}

fn ca_subject(path: &Path, pem: &[u8]) -> Result<Vec<u8>, TlsError> {
    let bad = |reason: String| TlsError::BadFile {
        path: path.to_owned(),
        reason,
    };
    let pem = x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .next()
        .ok_or_else(|| bad("no certificate".to_owned()))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    Ok(cert.subject().as_raw().to_vec())
}

#[cfg(test)]
mod tests {
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
        let mut map = HashMap::new();
        map.insert(
            Box::<str>::from("mta-sts.a.example"),
            Arc::new(ca.leaf("mta-sts.a.example").expect("leaf")),
        );
        index.replace(map);
        assert!(index.contains("mta-sts.a.example"));
        assert!(index.lookup("mta-sts.b.example").is_none());
    }
}
