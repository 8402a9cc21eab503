//! TLS for the HTTPS listener: the SNI → certificate index (the hosts that
//! may complete a handshake, and a bounded cache of their certificates
//! loaded on first use), the rustls server config, and the local CA of
//! `tls.mode = "self-signed"` that issues one certificate per
//! `mta-sts.<domain>` and keeps it in `state_dir` across restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

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

/// `Served::not_after` of a host whose stored certificate exists but has
/// not been read yet (ACME mode right after start): a handshake loads it,
/// and it counts as served only once it proved valid.
const UNVERIFIED: i64 = i64::MIN;
/// `Served::not_after` of a host whose loader makes a certificate whenever
/// asked (self-signed mode, before the first load).
const UNBOUNDED: i64 = i64::MAX;
/// Whether a host is served (see [`CertIndex::serve_lazily`]).
type IsServed = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// The version of a host served through [`CertIndex::serve_lazily`]
/// (versions handed out by the index start at 1).
const LAZY_VERSION: u64 = 0;

/// One host that may complete a handshake.
struct Served {
    /// Changes whenever the host's certificate is replaced or the host is
    /// added again: a cached key of another version is not served.
    version: u64,
    /// Expiry (Unix seconds) of the host's certificate as last seen, or
    /// [`UNVERIFIED`] / [`UNBOUNDED`]. Updated on load under the read lock.
    not_after: AtomicI64,
    /// The loader gave an expired certificate for this version: loading
    /// again would not help (a renewal comes through [`CertIndex::land`]),
    /// so handshakes are refused without touching disk. A loader that
    /// renews on load (the local CA) never sets it.
    expired: AtomicBool,
}

impl Served {
    fn new(version: u64, not_after: i64) -> Served {
        Served {
            version,
            not_after: AtomicI64::new(not_after),
            expired: AtomicBool::new(false),
        }
    }
}

/// A certificate in the cache, with what it was loaded for.
#[derive(Clone)]
struct Cached {
    key: Arc<CertifiedKey>,
    version: u64,
    not_after: i64,
}

/// The SNI index: which hosts may complete a handshake, and a bounded cache
/// of their certificates (host names lowercase, no trailing dot).
///
/// Certificates are loaded on a host's first handshake (through the
/// [`CertLoader`]: the local CA in self-signed mode, the certificate store
/// in ACME mode) into a cache of at most `capacity` entries, so start-up
/// reads no certificate and memory stays flat however many domains there
/// are. The host set is a map behind a `RwLock`: a handshake takes the read
/// lock for one lookup; a certificate that lands ([`CertIndex::land`]) or a
/// host that goes ([`CertIndex::remove`]) costs one insert or remove, never
/// a copy of the whole set.
pub struct CertIndex {
    hosts: RwLock<HashMap<Box<str>, Served>>,
    /// Self-signed mode: every host this says is served is served through
    /// the loader without an entry in `hosts` (one is made when its
    /// certificate is first loaded): a million hosts are not a million
    /// entries.
    lazy: std::sync::OnceLock<IsServed>,
    cache: quick_cache::sync::Cache<String, Cached>,
    loader: Option<Arc<dyn CertLoader>>,
    /// Certificates loaded from the loader since start (cache misses).
    loads: AtomicU64,
    versions: AtomicU64,
}

impl Default for CertIndex {
    /// An index without a loader: it serves only certificates handed to
    /// [`CertIndex::land`].
    fn default() -> CertIndex {
        CertIndex::new(None, DEFAULT_CAPACITY)
    }
}

/// Cache size of an index built with `default()`.
const DEFAULT_CAPACITY: usize = 1024;

impl std::fmt::Debug for CertIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertIndex")
            .field("hosts", &self.len())
            .field("cached", &self.cache.len())
            .field("loader", &self.loader.is_some())
            .finish()
    }
}

/// Now, in Unix seconds.
fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl CertIndex {
    fn new(loader: Option<Arc<dyn CertLoader>>, capacity: usize) -> CertIndex {
        CertIndex {
            hosts: RwLock::default(),
            lazy: std::sync::OnceLock::new(),
            cache: quick_cache::sync::Cache::new(capacity.max(1)),
            loader,
            loads: AtomicU64::new(0),
            versions: AtomicU64::new(1),
        }
    }

    /// An index that loads certificates on demand, keeping at most
    /// `capacity` of them in memory.
    pub fn lazy(loader: Arc<dyn CertLoader>, capacity: usize) -> CertIndex {
        CertIndex::new(Some(loader), capacity)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Box<str>, Served>> {
        crate::sync::read(&self.hosts)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Box<str>, Served>> {
        crate::sync::write(&self.hosts)
    }

    fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::Relaxed)
    }

    /// `(version, not_after, expired)` of a served host.
    fn served(&self, host: &str) -> Option<(u64, i64, bool)> {
        let entry = self.read().get(host).map(|s| {
            (
                s.version,
                s.not_after.load(Ordering::Relaxed),
                s.expired.load(Ordering::Relaxed),
            )
        });
        entry.or_else(|| {
            self.is_lazy(host)
                .then_some((LAZY_VERSION, UNBOUNDED, false))
        })
    }

    /// Serves, through the loader, every host `is_served` accepts (the
    /// current snapshot's, in self-signed mode) without keeping an entry
    /// per host. Set once; hosts that went are dropped with
    /// [`CertIndex::remove`].
    pub fn serve_lazily(&self, is_served: impl Fn(&str) -> bool + Send + Sync + 'static) {
        let _ = self.lazy.set(Box::new(is_served));
    }

    fn is_lazy(&self, host: &str) -> bool {
        self.lazy.get().is_some_and(|f| f(host))
    }

    /// The expiry (Unix seconds) of the certificate `host` is served with,
    /// when it is known (read from the store or issued; `None` for a host
    /// not served or not read yet).
    pub fn expiry(&self, host: &str) -> Option<i64> {
        let (_, not_after, _) = self.served(host)?;
        (not_after != UNVERIFIED && not_after != UNBOUNDED).then_some(not_after)
    }

    /// The certificate of `host` if it is in memory and current.
    pub fn lookup(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let (version, _, _) = self.served(host)?;
        self.cache
            .get(host)
            .filter(|c| c.version == version && c.not_after > unix_now())
            .map(|c| c.key)
    }

    /// Whether a handshake for `host` gets a certificate: the host is
    /// served and its certificate is known to be valid (or is made on
    /// demand). A stored certificate not read yet does not count until a
    /// handshake or the certificate manager has read it.
    pub fn contains(&self, host: &str) -> bool {
        self.served(host)
            .is_some_and(|(_, t, _)| t != UNVERIFIED && t > unix_now())
    }

    /// The certificate for a handshake: from memory, else loaded (once,
    /// however many handshakes ask at the same time). `None` for a host that
    /// is not served, whose certificate expired, or whose certificate cannot
    /// be loaded (logged).
    pub async fn obtain(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let (version, _, expired) = self.served(host)?;
        if expired {
            // Expired and not renewed (yet): refused without touching disk.
            return None;
        }
        let now = unix_now();
        if let Some(c) = self.cache.get(host) {
            if c.version >= version && c.not_after > now {
                return Some(c.key);
            }
            // Replaced, re-added or expired since it was cached.
            self.cache.remove(host);
        }
        let loader = self.loader.as_ref()?;
        let loaded = self
            .cache
            .get_or_insert_async(host, async {
                let loader = Arc::clone(loader);
                let owned = host.to_owned();
                let key = tokio::task::spawn_blocking(move || loader.load(&owned))
                    .await
                    .map_err(|e| e.to_string())??;
                self.loads.fetch_add(1, Ordering::Relaxed);
                let not_after = not_after(&key).unwrap_or(UNBOUNDED);
                let expired = not_after <= unix_now();
                let recorded = match self.read().get(host) {
                    Some(served) if served.version == version => {
                        served.not_after.store(not_after, Ordering::Relaxed);
                        served.expired.store(expired, Ordering::Relaxed);
                        true
                    }
                    Some(_) => true,
                    None => false,
                };
                // A lazily served host gets its entry now (its expiry is
                // known), while it is still served.
                if !recorded && version == LAZY_VERSION && self.is_lazy(host) {
                    let served = Served::new(LAZY_VERSION, not_after);
                    served.expired.store(expired, Ordering::Relaxed);
                    self.write().entry(host.into()).or_insert(served);
                }
                if expired {
                    return Err("the certificate has expired".to_owned());
                }
                Ok::<_, String>(Cached {
                    key: Arc::new(key),
                    version,
                    not_after,
                })
            })
            .await;
        match loaded {
            Ok(c) => Some(c.key),
            Err(e) => {
                tracing::warn!(host, "cannot load certificate: {e}");
                None
            }
        }
    }

    /// Number of hosts that may complete a handshake (including stored
    /// certificates not read yet).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Certificates loaded on demand since start.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Earliest expiry (Unix seconds) among the served certificates whose
    /// expiry is known: in ACME mode every stored certificate once the
    /// certificate manager has read the store; in self-signed mode those
    /// loaded since start.
    pub fn soonest_expiry(&self) -> Option<i64> {
        self.read()
            .values()
            .map(|s| s.not_after.load(Ordering::Relaxed))
            .filter(|t| *t != UNVERIFIED && *t != UNBOUNDED)
            .min()
    }

    /// A certificate landed for `host` (new or renewed): the host is served
    /// from now on, with this certificate, whatever the cache held. O(1).
    pub fn land(&self, host: &str, key: Arc<CertifiedKey>) {
        let version = self.next_version();
        let not_after = not_after(&key).unwrap_or(UNBOUNDED);
        // The cache first: once the host is visible with the new version,
        // its key is already there.
        self.cache.insert(
            host.to_owned(),
            Cached {
                key,
                version,
                not_after,
            },
        );
        self.write()
            .insert(host.into(), Served::new(version, not_after));
    }

    /// `host`'s stored certificate was read and is valid until `not_after`:
    /// serve the host (added if it was not yet). O(1).
    pub fn verified(&self, host: &str, not_after: i64) {
        let record = |served: &Served| {
            served.not_after.store(not_after, Ordering::Relaxed);
            served
                .expired
                .store(not_after <= unix_now(), Ordering::Relaxed);
        };
        if let Some(served) = self.read().get(host) {
            record(served);
            return;
        }
        let version = self.next_version();
        record(
            self.write()
                .entry(host.into())
                .or_insert_with(|| Served::new(version, UNVERIFIED)),
        );
    }

    /// Hosts whose stored certificate exists but was not read yet: served
    /// through the loader, which checks each certificate on its first
    /// handshake. Hosts already served are left alone.
    pub fn add_unverified(&self, hosts: impl IntoIterator<Item = Box<str>>) {
        let mut map = self.write();
        for host in hosts {
            let version = self.next_version();
            map.entry(host)
                .or_insert_with(|| Served::new(version, UNVERIFIED));
        }
    }

    /// Stops serving `host` and drops its cached certificate. O(1).
    pub fn remove(&self, host: &str) {
        self.write().remove(host);
        self.cache.remove(host);
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
            certified_key(host, cert.pem().as_bytes(), key.serialize_pem().as_bytes())
                .expect("key"),
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
}
