//! Durable files in `state_dir`: every write is atomic (temporary file in the
//! same directory, fsync, rename, fsync of the directory), so a crash or
//! `kill -9` at any moment leaves either the old file or the new one, never a
//! half-written certificate or key. Private keys are created 0600.
//!
//! ACME state goes through the [`CertStore`] trait; [`DirStore`] keeps it in
//! `state_dir/acme/` (layout in docs/ACME.md). A shared store for replicas
//! (PostgreSQL) implements the same trait.

use std::fs;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest;

pub mod pg;

#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

/// File mode for private keys: owner read/write only.
pub const KEY_MODE: u32 = 0o600;
/// File mode for certificates and other public data.
pub const PUBLIC_MODE: u32 = 0o644;

/// Creates `dir` (and parents) with mode 0700 where it does not exist yet.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Writes `data` to `path` atomically with the given permission bits.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    // Unique per process and call: two threads writing the same file must
    // not share a temporary file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(tmp_name(file_name, seq));

    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(mode);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        // The mode passed to open() is masked by the umask and ignored for an
        // existing file: set it explicitly.
        #[cfg(unix)]
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Bytes of the target's file name kept in its temporary name: with the
/// `.tmp<pid>.<seq>` suffix that stays well under the 255-byte limit of a
/// file name, however long the target's name (a 250-byte
/// `<domain>.toml` once made every write fail with "File name too long").
const TMP_NAME_KEEP: usize = 200;

/// `.<file name, cut to TMP_NAME_KEEP bytes>.tmp<pid>.<seq>`: hidden, and
/// recognisable as an unfinished write (see [`DirStore::open`]).
fn tmp_name(file_name: &std::ffi::OsStr, seq: u64) -> String {
    let shown = file_name.to_string_lossy();
    let mut cut = shown.len().min(TMP_NAME_KEEP);
    while !shown.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}.tmp{}.{seq}", &shown[..cut], std::process::id())
}

/// Removes the temporary files of [`write_atomic`] that a process killed
/// between writing and renaming left in `dir` (never loaded, since they do
/// not end in `.toml`/`.pem`/`.json`, but they pile up). Only files whose
/// writer is gone are removed: a live process's (e.g. `mtasts retire`
/// running beside `serve`) are left alone. Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_writer) else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
        if !alive && entry.file_type().is_ok_and(|t| t.is_file()) {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), "cannot remove a stale temporary file: {e}")
                }
            }
        }
    }
    removed
}

/// The pid in a [`tmp_name`] (`.<name>.tmp<pid>.<seq>`), if `name` is one.
fn temp_writer(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (head, seq) = rest.rsplit_once('.')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (_, pid) = head.rsplit_once(".tmp")?;
    pid.parse().ok()
}

/// Why the certificate store failed; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid state JSON ({source}); delete the file to start over")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0:?} is not a host name the store can hold")]
    BadName(String),
    #[error("{path}: holds the data of {found:?}, not of {host:?}")]
    WrongHost {
        path: PathBuf,
        host: String,
        found: String,
    },
    #[error("store task failed: {0}")]
    Task(String),
    #[error("PostgreSQL store: {0}")]
    Database(String),
}

/// What the certificate manager remembers about one host between attempts
/// and restarts: why the last attempt failed, when to try again, and when
/// orders were placed (so pacing survives a restart).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CertState {
    /// Failed attempts since the last success.
    pub failures: u32,
    pub last_error: Option<String>,
    /// Unix seconds.
    pub last_error_at: Option<i64>,
    /// The last failure was the DNS precheck, not the CA.
    pub waiting_dns: bool,
    /// Unix seconds: no attempt before this (backoff).
    pub next_attempt: Option<i64>,
    /// Unix seconds of the last new order sent to the CA.
    pub last_order_at: Option<i64>,
    /// Challenge type of the last order ("http-01" / "tls-alpn-01").
    pub last_challenge: Option<String>,
    /// Unix seconds of the last successful issuance.
    pub issued_at: Option<i64>,
    /// ACME directory that issued the stored certificate (a certificate
    /// from another directory, e.g. staging, is replaced).
    pub directory: Option<String>,
    /// Unix seconds: validity of the stored certificate, recorded when it
    /// was stored, so that a restart schedules renewals without reading
    /// every certificate (absent in stores written before: then the
    /// certificate is read).
    pub cert_not_before: Option<i64>,
    pub cert_not_after: Option<i64>,
}

/// Storage of ACME account credentials, certificates (private key + chain in
/// one PEM blob, so they change together) and per-host state.
///
/// Writes must be atomic: a reader sees the old value or the new one.
pub trait CertStore: Send + Sync + 'static {
    /// Serialised account credentials for an ACME directory URL.
    fn load_account(
        &self,
        directory: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;
    fn save_account(
        &self,
        directory: &str,
        credentials: Vec<u8>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The PEM bundle (private key, then leaf, then intermediates) of `host`.
    fn load_cert(
        &self,
        host: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;
    fn save_cert(
        &self,
        host: &str,
        bundle: Vec<u8>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// [`CertStore::load_cert`] for the TLS certificate loader, which runs
    /// on a blocking thread (`spawn_blocking`) during a handshake.
    fn load_cert_blocking(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every host with a stored certificate, from names alone (nothing is
    /// read or parsed): what a restarted server may serve before the
    /// certificates themselves are looked at.
    fn cert_hosts(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Every host with a stored certificate or state, sorted: what `mtasts
    /// certs` lists (hosts no longer configured included).
    fn stored_hosts(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Where `host`'s certificate is kept, for messages about it.
    fn cert_location(&self, host: &str) -> String;
    fn load_state(
        &self,
        host: &str,
    ) -> impl Future<Output = Result<Option<CertState>, StoreError>> + Send;
    fn save_state(
        &self,
        host: &str,
        state: &CertState,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The right to order a certificate for `host` now, held until the
    /// claim is dropped; `Err(wait)` while another replica orders it (its
    /// claim lasts `wait` unless renewed). One process alone (the files
    /// store) always gets it.
    fn claim(
        &self,
        host: &str,
    ) -> impl Future<Output = Result<Result<Claim, std::time::Duration>, StoreError>> + Send {
        let _ = host;
        std::future::ready(Ok(Ok(Claim(None))))
    }
    /// One of `per_hour` order slots counted over every process sharing
    /// the store: `None` when taken, else how long until one frees up. One
    /// process alone paces itself (and answers `None`).
    fn order_slot(
        &self,
        host: &str,
        per_hour: u32,
    ) -> impl Future<Output = Result<Option<std::time::Duration>, StoreError>> + Send {
        let _ = (host, per_hour);
        std::future::ready(Ok(None))
    }
}

/// A held order claim (see [`CertStore::claim`]).
pub struct Claim(#[allow(dead_code)] Option<pg::PgClaim>);

/// The store a server runs on: `[store] backend`.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Files(DirStore),
    Postgres(pg::PgStore),
}

impl AnyStore {
    /// The PostgreSQL store, when that is the backend.
    pub fn postgres(&self) -> Option<&pg::PgStore> {
        match self {
            AnyStore::Postgres(p) => Some(p),
            AnyStore::Files(_) => None,
        }
    }
}

impl CertStore for AnyStore {
    async fn load_account(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            AnyStore::Files(s) => s.load_account(directory).await,
            AnyStore::Postgres(s) => s.load_account(directory).await,
        }
    }
    async fn save_account(&self, directory: &str, credentials: Vec<u8>) -> Result<(), StoreError> {
        match self {
            AnyStore::Files(s) => s.save_account(directory, credentials).await,
            AnyStore::Postgres(s) => s.save_account(directory, credentials).await,
        }
    }
    async fn load_cert(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            AnyStore::Files(s) => s.load_cert(host).await,
            AnyStore::Postgres(s) => s.load_cert(host).await,
        }
    }
    async fn save_cert(&self, host: &str, bundle: Vec<u8>) -> Result<(), StoreError> {
        match self {
            AnyStore::Files(s) => s.save_cert(host, bundle).await,
            AnyStore::Postgres(s) => s.save_cert(host, bundle).await,
        }
    }
    fn load_cert_blocking(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            AnyStore::Files(s) => s.load_cert_blocking(host),
            AnyStore::Postgres(s) => s.load_cert_blocking(host),
        }
    }
    async fn cert_hosts(&self) -> Result<Vec<String>, StoreError> {
        match self {
            AnyStore::Files(s) => CertStore::cert_hosts(s).await,
            AnyStore::Postgres(s) => s.cert_hosts().await,
        }
    }
    async fn stored_hosts(&self) -> Result<Vec<String>, StoreError> {
        match self {
            AnyStore::Files(s) => s.stored_hosts().await,
            AnyStore::Postgres(s) => s.stored_hosts().await,
        }
    }
    fn cert_location(&self, host: &str) -> String {
        match self {
            AnyStore::Files(s) => s.cert_location(host),
            AnyStore::Postgres(s) => s.cert_location(host),
        }
    }
    async fn load_state(&self, host: &str) -> Result<Option<CertState>, StoreError> {
        match self {
            AnyStore::Files(s) => s.load_state(host).await,
            AnyStore::Postgres(s) => s.load_state(host).await,
        }
    }
    async fn save_state(&self, host: &str, state: &CertState) -> Result<(), StoreError> {
        match self {
            AnyStore::Files(s) => s.save_state(host, state).await,
            AnyStore::Postgres(s) => s.save_state(host, state).await,
        }
    }
    async fn claim(&self, host: &str) -> Result<Result<Claim, std::time::Duration>, StoreError> {
        match self {
            AnyStore::Files(_) => Ok(Ok(Claim(None))),
            AnyStore::Postgres(s) => Ok(s.claim(host).await?.map(|c| Claim(Some(c)))),
        }
    }
    async fn order_slot(
        &self,
        host: &str,
        per_hour: u32,
    ) -> Result<Option<std::time::Duration>, StoreError> {
        match self {
            AnyStore::Files(_) => Ok(None),
            AnyStore::Postgres(s) => s.order_slot(host, per_hour).await,
        }
    }
}

/// The directory store: `<state_dir>/acme/{accounts,certs,state}/`.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: Arc<Path>,
    /// Trait calls read and write on the calling thread (see
    /// [`DirStore::inline`]).
    inline: bool,
}

impl DirStore {
    /// Opens (creating, 0700) `state_dir/acme`, and removes temporary files
    /// a crash left behind mid-write.
    pub fn open(state_dir: &Path) -> Result<DirStore, StoreError> {
        let root = state_dir.join("acme");
        for sub in ["accounts", "certs", "state"] {
            let dir = root.join(sub);
            ensure_private_dir(&dir).map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.filter_map(Result::ok) {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with('.') && name.contains(".tmp") {
                        tracing::info!(file = %e.path().display(), "removing unfinished write");
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(DirStore {
            root: root.into(),
            inline: false,
        })
    }

    /// Opens an existing store for reading only (`mtasts certs`); `None` when
    /// nothing was ever stored.
    pub fn existing(state_dir: &Path) -> Option<DirStore> {
        let root = state_dir.join("acme");
        root.is_dir().then(|| DirStore {
            root: root.into(),
            inline: false,
        })
    }

    /// `state_dir/acme`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `certs/<host>.pem` (`certs/<prefix>_<hash>.pem` for a long host:
    /// see [`StoredName`]).
    pub fn cert_path(&self, host: &str) -> Result<PathBuf, StoreError> {
        Ok(self
            .root
            .join("certs")
            .join(format!("{}.pem", StoredName::of(host)?.stem)))
    }

    fn state_path(&self, host: &str) -> Result<PathBuf, StoreError> {
        Ok(self
            .root
            .join("state")
            .join(format!("{}.json", StoredName::of(host)?.stem)))
    }

    fn account_path(&self, directory: &str) -> PathBuf {
        let digest = sha2::Sha256::digest(directory.as_bytes());
        let hex = data_encoding::HEXLOWER.encode(&digest[..8]);
        self.root.join("accounts").join(format!("{hex}.json"))
    }

    /// The stored bundle of `host` (blocking; see [`CertStore::load_cert`]).
    /// A hashed file's first line must name `host`; it is not returned.
    pub fn read_cert(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let name = StoredName::of(host)?;
        let path = self.cert_path(host)?;
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        if !name.hashed {
            return Ok(Some(bytes));
        }
        match split_host_line(&bytes) {
            Some((found, rest)) if found == host => Ok(Some(rest.to_vec())),
            other => Err(StoreError::WrongHost {
                path,
                host: host.to_owned(),
                found: other.map_or_else(|| "no host line".to_owned(), |(f, _)| f.to_owned()),
            }),
        }
    }

    /// Stores the bundle of `host` atomically, 0600 (a hashed file starts
    /// with a `# host: <host>` line, which PEM readers skip).
    pub fn write_cert(&self, host: &str, bundle: &[u8]) -> Result<(), StoreError> {
        let name = StoredName::of(host)?;
        let path = self.cert_path(host)?;
        let data = if name.hashed {
            let mut data = format!("{HOST_LINE}{host}\n").into_bytes();
            data.extend_from_slice(bundle);
            data
        } else {
            bundle.to_vec()
        };
        write_atomic(&path, &data, KEY_MODE).map_err(|source| StoreError::Io { path, source })
    }

    /// The stored state of `host`; a broken file is an error naming it. A
    /// hashed file's `"host"` field must name `host`.
    pub fn read_state(&self, host: &str) -> Result<Option<CertState>, StoreError> {
        let name = StoredName::of(host)?;
        let path = self.state_path(host)?;
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        let json = |source| StoreError::Json {
            path: path.clone(),
            source,
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(json)?;
        if name.hashed {
            let found = value.get("host").and_then(serde_json::Value::as_str);
            if found != Some(host) {
                return Err(StoreError::WrongHost {
                    path: path.clone(),
                    host: host.to_owned(),
                    found: found.unwrap_or("no \"host\" field").to_owned(),
                });
            }
        }
        CertState::deserialize(value).map(Some).map_err(json)
    }

    /// Stores the state of `host` atomically (a hashed file names `host` in
    /// a `"host"` field).
    pub fn write_state(&self, host: &str, state: &CertState) -> Result<(), StoreError> {
        let name = StoredName::of(host)?;
        let path = self.state_path(host)?;
        let json = |source| StoreError::Json {
            path: path.clone(),
            source,
        };
        let mut value = serde_json::to_value(state).map_err(json)?;
        if name.hashed
            && let Some(fields) = value.as_object_mut()
        {
            fields.insert("host".to_owned(), host.into());
        }
        let bytes = serde_json::to_vec_pretty(&value).map_err(json)?;
        write_atomic(&path, &bytes, PUBLIC_MODE).map_err(|source| StoreError::Io { path, source })
    }

    /// The stored account credentials for `directory`.
    pub fn read_account(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError> {
        read_optional(&self.account_path(directory))
    }

    /// Stores the account credentials for `directory` atomically, 0600.
    pub fn write_account(&self, directory: &str, credentials: &[u8]) -> Result<(), StoreError> {
        let path = self.account_path(directory);
        write_atomic(&path, credentials, KEY_MODE).map_err(|source| StoreError::Io { path, source })
    }

    /// Every host with a stored certificate (`certs/<host>.pem`), unsorted:
    /// one directory listing; no file is opened but the hashed ones of long
    /// hosts, whose first line names their host.
    pub fn cert_hosts(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("certs");
        let entries = fs::read_dir(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut hosts = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if let Some(host) = self.host_of("certs", &name) {
                hosts.push(host);
            }
        }
        Ok(hosts)
    }

    /// The host whose data file `sub/<file>` is: from the name, or, for a
    /// hashed name, from the file's first line (`.pem`) or `"host"` field
    /// (`.json`). `None` for anything else (unfinished writes, strays).
    fn host_of(&self, sub: &str, file: &str) -> Option<String> {
        let pem = sub == "certs";
        let stem = file.strip_suffix(if pem { ".pem" } else { ".json" })?;
        if let Ok(host) = file_stem(stem) {
            return Some(host.to_owned());
        }
        if !StoredName::is_hashed(stem) {
            return None;
        }
        let path = self.root.join(sub).join(file);
        let host = if pem {
            let mut head = Vec::with_capacity(300);
            let file = fs::File::open(&path).ok()?;
            std::io::Read::read_to_end(&mut std::io::Read::take(file, 300), &mut head).ok()?;
            split_host_line(&head)?.0.to_owned()
        } else {
            let value: serde_json::Value = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
            value.get("host")?.as_str()?.to_owned()
        };
        // The name must be the one this host is stored under.
        (StoredName::of(&host).ok()?.stem == stem).then_some(host)
    }

    /// Every host with a stored certificate or state, sorted (includes hosts
    /// no longer configured: their files stay until removed by hand).
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = ["certs", "state"]
            .iter()
            .filter_map(|sub| Some((*sub, fs::read_dir(self.root.join(sub)).ok()?)))
            .flat_map(|(sub, entries)| entries.filter_map(Result::ok).map(move |e| (sub, e)))
            .filter_map(|(sub, e)| self.host_of(sub, &e.file_name().into_string().ok()?))
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// This store with its `CertStore` calls done on the calling thread,
    /// not handed to a blocking thread: for one-shot commands whose runtime
    /// has nothing else to run (`mtasts certs` reads 200,000 files at
    /// 100,000 hosts; a thread hop each tripled its time).
    pub fn inline(mut self) -> DirStore {
        self.inline = true;
        self
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DirStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if self.inline {
            return f(self);
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl CertStore for DirStore {
    async fn load_account(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let directory = directory.to_owned();
        self.blocking(move |s| s.read_account(&directory)).await
    }

    async fn save_account(&self, directory: &str, credentials: Vec<u8>) -> Result<(), StoreError> {
        let directory = directory.to_owned();
        self.blocking(move |s| s.write_account(&directory, &credentials))
            .await
    }

    async fn load_cert(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let host = host.to_owned();
        self.blocking(move |s| s.read_cert(&host)).await
    }

    async fn save_cert(&self, host: &str, bundle: Vec<u8>) -> Result<(), StoreError> {
        let host = host.to_owned();
        self.blocking(move |s| s.write_cert(&host, &bundle)).await
    }

    fn load_cert_blocking(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_cert(host)
    }

    async fn cert_hosts(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(DirStore::cert_hosts).await
    }

    async fn stored_hosts(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(|s| Ok(s.hosts())).await
    }

    fn cert_location(&self, host: &str) -> String {
        self.cert_path(host)
            .map_or_else(|_| host.to_owned(), |p| p.display().to_string())
    }

    async fn load_state(&self, host: &str) -> Result<Option<CertState>, StoreError> {
        let host = host.to_owned();
        self.blocking(move |s| s.read_state(&host)).await
    }

    async fn save_state(&self, host: &str, state: &CertState) -> Result<(), StoreError> {
        let host = host.to_owned();
        let state = state.clone();
        self.blocking(move |s| s.write_state(&host, &state)).await
    }
}

/// First line of a hashed certificate file; the host follows.
const HOST_LINE: &str = "# host: ";

/// `(host, rest)` of a hashed certificate file.
fn split_host_line(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    let host = std::str::from_utf8(&bytes[..end])
        .ok()?
        .strip_prefix(HOST_LINE)?;
    Some((host, &bytes[end + 1..]))
}

/// Longest host stored under its own name: `<host>.json` has to fit in a
/// file name (255 bytes). Every store written before hashed names existed
/// keeps working, since no longer host could be stored then.
const PLAIN_MAX: usize = 255 - ".json".len();
/// Bytes of a long host kept readable in its hashed name.
const HASHED_KEEP: usize = 200;

/// The file name stem a host's data is stored under: the host itself when
/// it fits, else `<first 200 bytes>_<32 hex digits of its SHA-256>` (a
/// policy host may have 253 characters), with the host written inside the
/// file so that listings still know it and a read can check it.
struct StoredName {
    stem: String,
    hashed: bool,
}

impl StoredName {
    fn of(host: &str) -> Result<StoredName, StoreError> {
        let host = file_stem(host)?;
        if host.len() <= PLAIN_MAX {
            return Ok(StoredName {
                stem: host.to_owned(),
                hashed: false,
            });
        }
        let digest = sha2::Sha256::digest(host.as_bytes());
        let hex = data_encoding::HEXLOWER.encode(&digest[..16]);
        // `file_stem` allows ASCII only: any byte offset is a char boundary.
        Ok(StoredName {
            stem: format!("{}_{hex}", &host[..HASHED_KEEP]),
            hashed: true,
        })
    }

    /// Whether `stem` has the shape of a hashed name (`_` is never in a host).
    fn is_hashed(stem: &str) -> bool {
        stem.split_once('_').is_some_and(|(prefix, hex)| {
            prefix.len() == HASHED_KEEP
                && file_stem(prefix).is_ok()
                && hex.len() == 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
    }
}

/// A host name is used as a file name: only `[a-z0-9.-]`, no leading dot.
fn file_stem(host: &str) -> Result<&str, StoreError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('.')
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if ok {
        Ok(host)
    } else {
        Err(StoreError::BadName(host.to_owned()))
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests;
