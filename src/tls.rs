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
mod tests;
