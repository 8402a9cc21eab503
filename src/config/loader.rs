//! Incremental loading for reloads: a [`Loader`] keeps, between loads, the
//! validated entries of every `domains_dir` file, and re-reads only what
//! changed.
//!
//! A file is taken as unchanged when its size, mtime, ctime and inode are
//! what they were (one `stat`, which listing the directory needs anyway),
//! unless it was modified within [`RACY`] of being read: a rewrite within the
//! file system's timestamp granularity can leave the stamp as it was, so such
//! a file's content is compared (SHA-256) at the next load, as git does for
//! "racily clean" index entries. A file whose stamp changed is read, and
//! parsed only if its content did. Its entries also depend on
//! - the main file (`[defaults]`, `domains_dir`): when the main file's text
//!   changes, every file is validated again (a full reload);
//! - the mail server certificates its `mx_certs` name: when one changes (its
//!   stamp), expires, or could not be read, the files naming it are
//!   validated again; for a glob entry, also when the set of files it
//!   matches changes.
//!
//! The main file is read and validated at every load (its own sections
//! read other files, e.g. `secret_file`); its `[[domain]]` entries too, so
//! domains belong in `domains_dir` when there are many.
//!
//! Unchanged domains keep their `Arc<DomainConfig>`, which lets the snapshot
//! keep their rendered sites and [`Config::same_as`] compare by pointer.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

use super::{
    Config, ConfigErrors, Diagnostic, DomainConfig, DomainEntry, Domains, Layer, MainParts,
    MxSource, RawDomainFile, collect_diagnostics, domain_source, merge, parse_main, read_limited,
    toml_error, validate_defaults, validate_entries,
};
use crate::mxcert;
use crate::policy::DomainName;
use std::sync::Arc;

/// A file modified this shortly before it was read is compared by content
/// at the next load, whatever its stamp says (coarse or 2 s timestamps).
const RACY: Duration = Duration::from_secs(2);

/// What `stat` says about a file, enough to notice a rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
    ino: u64,
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        #[cfg(unix)]
        let (ino, ctime) = {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), (meta.ctime(), meta.ctime_nsec()))
        };
        #[cfg(not(unix))]
        let (ino, ctime) = (0, (0, 0));
        Stamp {
            len: meta.len(),
            mtime: meta.modified().ok(),
            ino,
            ctime,
        }
    }

    fn of_path(path: &Path) -> Option<Stamp> {
        std::fs::metadata(path).ok().map(|m| Stamp::of(&m))
    }

    /// Modified so shortly before `read_at` that a later rewrite might not
    /// change the stamp.
    fn racy(&self, read_at: SystemTime) -> bool {
        self.mtime
            .is_none_or(|m| m.checked_add(RACY).is_none_or(|t| t >= read_at))
    }
}

/// The first half of a SHA-256 of a file's bytes.
type Digest = [u8; 16];

fn digest(bytes: &[u8]) -> Digest {
    let full = Sha256::digest(bytes);
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// One `domains_dir` file as last validated.
#[derive(Debug)]
struct CachedFile {
    /// The file's name in `domains_dir`.
    name: OsString,
    /// `None`: the file could not be read; it is tried again every time.
    stamp: Option<Stamp>,
    digest: Digest,
    /// Compare the content at the next load even if the stamp is the same.
    racy: bool,
    /// Certificate files its entries' `mx_certs` named.
    deps: Box<[PathBuf]>,
    /// The file cannot be read or parsed (then there are no entries).
    failed: Option<Box<Diagnostic>>,
    entries: Vec<DomainEntry>,
}

/// A mail server certificate file as last read.
#[derive(Debug)]
struct CertFile {
    stamp: Option<Stamp>,
    /// Read it again at the next load (unreadable or invalid, or racy).
    always: bool,
    /// From then on its names no longer count.
    expires: Option<time::OffsetDateTime>,
    /// For a glob entry: the files it matched (each one a dependency of
    /// its own).
    matches: Option<Vec<PathBuf>>,
}

impl CertFile {
    fn stale(&self, path: &Path, now: time::OffsetDateTime) -> bool {
        if let Some(matches) = &self.matches {
            return mxcert::expand(path).ok().as_ref() != Some(matches);
        }
        self.always || self.expires.is_some_and(|e| now >= e) || Stamp::of_path(path) != self.stamp
    }
}

/// Reads each mail server certificate once per load, and notes which ones
/// the entries of the file being validated used.
pub(super) struct CertReader {
    now: time::OffsetDateTime,
    read: HashMap<PathBuf, (Option<Stamp>, Result<mxcert::CertNames, String>)>,
    /// Glob entries expanded in this load, and what they matched.
    globs: HashMap<PathBuf, Vec<PathBuf>>,
    touched: Vec<PathBuf>,
}

impl CertReader {
    pub(super) fn new(now: time::OffsetDateTime) -> CertReader {
        CertReader {
            now,
            read: HashMap::new(),
            globs: HashMap::new(),
            touched: Vec::new(),
        }
    }

    /// The files an `mx_certs` entry names now (see [`mxcert::expand`]);
    /// a glob's matches are remembered so a new or removed match makes the
    /// entries naming it validated again.
    pub(super) fn expand(&mut self, entry: &Path) -> Result<Vec<PathBuf>, String> {
        if !mxcert::is_glob(entry) {
            return Ok(vec![entry.to_owned()]);
        }
        if !self.touched.iter().any(|p| p == entry) {
            self.touched.push(entry.to_owned());
        }
        if let Some(found) = self.globs.get(entry) {
            return Ok(found.clone());
        }
        let found = mxcert::expand(entry)?;
        self.globs.insert(entry.to_owned(), found.clone());
        Ok(found)
    }

    pub(super) fn read(&mut self, path: &Path) -> &Result<mxcert::CertNames, String> {
        if !self.touched.iter().any(|p| p == path) {
            self.touched.push(path.to_owned());
        }
        let now = self.now;
        &self
            .read
            .entry(path.to_owned())
            .or_insert_with(|| {
                // Stamp first: a change after it shows at the next load.
                let stamp = Stamp::of_path(path);
                (stamp, mxcert::read(path, now).map_err(|e| e.to_string()))
            })
            .1
    }

    fn take_touched(&mut self) -> Box<[PathBuf]> {
        std::mem::take(&mut self.touched).into_boxed_slice()
    }
}

/// What the last load did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// `*.toml` files in `domains_dir`.
    pub files: usize,
    /// Files read and compared by content (stamp changed or racy).
    pub read: usize,
    /// Files parsed and validated (content changed, new, or dependencies changed).
    pub parsed: usize,
    /// Domain entries in the files parsed.
    pub entries_parsed: usize,
    /// The domains were merged by applying the change to the previous
    /// load's list (not by merging every entry).
    pub incremental: bool,
}

/// Loads a config again and again, re-reading only the `domains_dir` files
/// that changed (see the module documentation).
#[derive(Debug)]
pub struct Loader {
    path: PathBuf,
    base: PathBuf,
    /// The main file's text the cached files were validated against.
    main_text: Option<String>,
    main_entries: Vec<DomainEntry>,
    /// Sorted by name, as the directory listing is.
    files: Vec<CachedFile>,
    certs: HashMap<PathBuf, CertFile>,
    stats: LoadStats,
    /// The last load's domains when every entry was valid and no name was
    /// defined twice: a load that changes a few files then applies its
    /// change to this list instead of merging every entry again.
    merged: Option<Domains>,
    /// Some domain of `merged` may use `mx_certs`.
    merged_mx_certs: bool,
}

impl Loader {
    pub fn new(path: &Path) -> Loader {
        Loader {
            path: path.to_owned(),
            base: base_of(path).to_owned(),
            main_text: None,
            main_entries: Vec::new(),
            files: Vec::new(),
            certs: HashMap::new(),
            stats: LoadStats::default(),
            merged: None,
            merged_mx_certs: true,
        }
    }

    /// What the last load read and parsed.
    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    /// Reads and validates the config, like [`Config::load`], reusing what
    /// the previous load of this loader validated for unchanged files.
    pub fn load(&mut self) -> Result<Config, ConfigErrors> {
        let text = read_limited(&self.path).map_err(|message| ConfigErrors {
            errors: vec![Diagnostic {
                file: self.path.clone().into(),
                line: 1,
                col: 1,
                message,
            }],
            warnings: vec![],
        })?;
        let main = parse_main(&self.path, &self.base, text)?;
        self.load_parsed(main)
    }

    pub(super) fn load_parsed(&mut self, main: MainParts) -> Result<Config, ConfigErrors> {
        let read_at = SystemTime::now();
        let t0 = std::time::Instant::now();
        let now = time::OffsetDateTime::now_utc();
        let MainParts {
            source,
            server,
            tls,
            admin,
            delegation,
            dns_update,
            store,
            tlsrpt,
            on_demand,
            domains_dir,
            defaults,
            entries,
            mut report,
        } = main;
        let mut defaults = Layer::defaults(&source, &defaults);
        defaults.tlsrpt_receive = tlsrpt.receive;
        // Cached entries were validated against the main file's [defaults]
        // and domains_dir: any change of its text validates everything again.
        let main_same = self.main_text.as_deref() == Some(source.text.as_str());
        let stale_certs: HashSet<&Path> = self
            .certs
            .iter()
            .filter(|(p, st)| st.stale(p, now))
            .map(|(p, _)| p.as_path())
            .collect();
        let mut certs = CertReader::new(now);
        let mut stats = LoadStats::default();

        let listing = match &domains_dir {
            Some((dir, span)) => match list_dir(dir) {
                Ok(files) => files,
                Err(message) => {
                    report.errors.push(source.at(span.clone(), message));
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        stats.files = listing.len();
        let t_list = t0.elapsed();
        let previous_merge = if main_same { self.merged.take() } else { None };
        self.merged = None;
        let Plan {
            mut slots,
            work,
            mut taken_out,
        } = plan(
            std::mem::take(&mut self.files),
            listing,
            main_same,
            &self.certs,
            &stale_certs,
        );
        // Read again: their previous domains, by slot, for the files that
        // turn out changed (a file read again may be the same).
        let mut previous_names: HashMap<usize, Vec<DomainName>> = HashMap::new();
        for w in &work {
            if let Some(p) = &w.previous {
                previous_names.insert(w.slot, entry_names(&p.entries).collect());
            }
        }
        let mut changed_slots: Vec<usize> = Vec::new();
        stats.read = work.len();
        let dir = domains_dir
            .as_ref()
            .map_or(Path::new("."), |(d, _)| d.as_path());
        let results = read_all(work, dir, &defaults, &mut certs, read_at, now);
        for (slot, (file, parsed)) in results {
            stats.parsed += usize::from(parsed);
            if parsed || file.failed.is_some() {
                stats.entries_parsed += file.entries.len();
                changed_slots.push(slot);
                taken_out.extend(previous_names.remove(&slot).unwrap_or_default());
            }
            if let Some(s) = slots.get_mut(slot) {
                *s = Some(file);
            }
        }
        let files: Vec<CachedFile> = slots.into_iter().flatten().collect();
        let t_files = t0.elapsed();

        validate_defaults(&defaults, &mut certs, &mut report);
        let main_entries =
            validate_entries(&source, &entries, &defaults, &mut certs, &self.main_entries);
        certs.take_touched();

        drop(stale_certs);
        self.remember_certs(certs, &files, read_at);

        for f in &files {
            if let Some(d) = &f.failed {
                report.errors.push(Diagnostic::clone(d));
            }
        }
        let count = main_entries.len() + files.iter().map(|f| f.entries.len()).sum::<usize>();
        let all = std::iter::once(main_entries.as_slice())
            .chain(files.iter().map(|f| f.entries.as_slice()));
        // The files read again, by their position in `files` (a file that
        // could not be read keeps no slot there but holds no entries).
        // Every slot was filled, so `files[slot]` is the file read again.
        let added: Vec<&DomainEntry> = changed_slots
            .iter()
            .filter_map(|slot| files.get(*slot))
            .flat_map(|f| f.entries.iter())
            .collect();
        let incremental = previous_merge.and_then(|previous| {
            apply_change(previous, &taken_out, &added, count, main_entries.len())
        });
        stats.incremental = incremental.is_some();
        let uses_certs = |d: &Arc<DomainConfig>| matches!(d.mx_source, MxSource::Certs(_));
        let (domains, mx_certs_used) = match incremental {
            Some(domains) => {
                collect_diagnostics(all, &mut report);
                // A domain that left may have used them: still counted.
                let incoming = added.iter().any(|e| match e {
                    DomainEntry::Valid { domain, .. } => uses_certs(domain),
                    DomainEntry::Invalid(_) => false,
                });
                (domains, self.merged_mx_certs || incoming)
            }
            None => {
                let domains = merge(all, count, &mut report);
                let used = domains.iter().any(uses_certs);
                (domains, used)
            }
        };
        self.merged_mx_certs = mx_certs_used;
        // Kept for the next load when it is clean: every entry valid, no
        // name twice, no file that failed.
        if domains.len() == count && files.iter().all(|f| f.failed.is_none()) {
            self.merged = Some(domains.clone());
        }
        tracing::debug!(?t_list, ?t_files, t_merge = ?t0.elapsed(), "load phases");

        self.files = files;
        self.main_entries = main_entries;
        self.stats = stats;
        let path = source.path.clone();
        self.main_text = Some(source.text);
        // A bad [defaults] value is reported once, not again for every
        // domain that inherits it.
        let mut seen = HashSet::new();
        report.errors.retain(|d| seen.insert(d.clone()));
        if report.errors.is_empty() {
            Ok(Config {
                path: path.to_path_buf(),
                server,
                tls,
                domains_dir: domains_dir.map(|(d, _)| d),
                admin,
                domains,
                warnings: report.warnings,
                delegation,
                dns_update,
                store,
                tlsrpt,
                on_demand,
                mx_certs_used,
            })
        } else {
            Err(ConfigErrors {
                errors: report.errors,
                warnings: report.warnings,
            })
        }
    }
}

impl Loader {
    /// Certificates read by this load replace what was known of them; only
    /// those that the cached `files` depend on are kept.
    fn remember_certs(&mut self, certs: CertReader, files: &[CachedFile], read_at: SystemTime) {
        for (path, (stamp, result)) in certs.read {
            let state = CertFile {
                always: result.is_err() || stamp.is_none_or(|s| s.racy(read_at)),
                expires: result.ok().map(|n| n.expires),
                stamp,
                matches: None,
            };
            self.certs.insert(path, state);
        }
        for (path, found) in certs.globs {
            let state = CertFile {
                always: false,
                expires: None,
                stamp: None,
                matches: Some(found),
            };
            self.certs.insert(path, state);
        }
        if !self.certs.is_empty() {
            let used: HashSet<&Path> = files
                .iter()
                .flat_map(|f| f.deps.iter().map(PathBuf::as_path))
                .collect();
            self.certs.retain(|p, _| used.contains(p.as_path()));
        }
    }
}

/// Which `domains_dir` files a load keeps as they are and which it reads.
struct Plan {
    /// One per listed file, in listing order: the cached file kept, or
    /// `None` for one of `work`.
    slots: Vec<Option<CachedFile>>,
    work: Vec<Work>,
    /// Domains of files that are gone: what an incremental merge takes out
    /// of the previous list (the load adds those of files read again).
    taken_out: Vec<DomainName>,
}

/// Compares the listing with the files cached by the previous load (both
/// sorted by name): a file is kept when its stamp is the same, it is not
/// racy, the main file is the same and no certificate it depends on is
/// stale; every other listed file is read.
fn plan(
    old_files: Vec<CachedFile>,
    listing: Vec<(OsString, Stamp)>,
    main_same: bool,
    known_certs: &HashMap<PathBuf, CertFile>,
    stale_certs: &HashSet<&Path>,
) -> Plan {
    let mut old = old_files.into_iter().peekable();
    let mut slots: Vec<Option<CachedFile>> = Vec::with_capacity(listing.len());
    let mut work = Vec::new();
    let mut taken_out: Vec<DomainName> = Vec::new();
    for (name, stamp) in listing {
        let mut previous = None;
        while let Some(o) = old.peek() {
            match o.name.cmp(&name) {
                std::cmp::Ordering::Less => {
                    if let Some(gone) = old.next() {
                        taken_out.extend(entry_names(&gone.entries));
                    }
                }
                std::cmp::Ordering::Equal => {
                    previous = old.next();
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        let reusable = previous.as_ref().is_some_and(|f| {
            main_same
                && f.stamp.is_some()
                && f.deps
                    .iter()
                    .all(|d| known_certs.contains_key(d) && !stale_certs.contains(d.as_path()))
        });
        match previous {
            Some(f) if reusable && f.stamp == Some(stamp) && !f.racy => slots.push(Some(f)),
            previous => {
                work.push(Work {
                    slot: slots.len(),
                    name,
                    stamp,
                    previous,
                    reusable,
                });
                slots.push(None);
            }
        }
    }
    for gone in old {
        taken_out.extend(entry_names(&gone.entries));
    }
    Plan {
        slots,
        work,
        taken_out,
    }
}

/// Reads (and parses when changed) the files of `work`, by slot. A full
/// load (start, main file changed) reads every file: spread over the
/// cores, each thread with its own certificate reader, merged into
/// `certs`. A reload of a few files stays on this thread. (Providers keep
/// many domains per file: a million domains in 1,000 files is a full load
/// too.)
fn read_all(
    work: Vec<Work>,
    dir: &Path,
    defaults: &Layer<'_>,
    certs: &mut CertReader,
    read_at: SystemTime,
    now: time::OffsetDateTime,
) -> Vec<(usize, (CachedFile, bool))> {
    let refresh_all = |work: Vec<Work>, certs: &mut CertReader| {
        work.into_iter()
            .map(|w| (w.slot, refresh(w, dir, defaults, certs, read_at)))
            .collect::<Vec<_>>()
    };
    let threads = reader_threads();
    if threads > 1 && work.len() >= 2 * threads {
        let mut results = Vec::new();
        for (done, own) in on_threads(work, threads, |chunk| {
            let mut own = CertReader::new(now);
            let done = refresh_all(chunk, &mut own);
            (done, own)
        }) {
            results.extend(done);
            for (path, state) in own.read {
                certs.read.entry(path).or_insert(state);
            }
            for (path, found) in own.globs {
                certs.globs.entry(path).or_insert(found);
            }
        }
        results
    } else {
        refresh_all(work, certs)
    }
}

/// A `domains_dir` file to read (its stamp changed, it is new, racy, or
/// what it depends on changed).
struct Work {
    slot: usize,
    name: OsString,
    stamp: Stamp,
    previous: Option<CachedFile>,
    /// `previous` still holds if the content is the same.
    reusable: bool,
}

/// Reads one file; parses and validates it unless its content is what
/// `previous` was validated from. `true` when it was parsed.
fn refresh(
    w: Work,
    dir: &Path,
    defaults: &Layer<'_>,
    certs: &mut CertReader,
    read_at: SystemTime,
) -> (CachedFile, bool) {
    let path = dir.join(&w.name);
    let text = match read_limited(&path) {
        Ok(text) => text,
        Err(message) => {
            let file = CachedFile {
                failed: Some(Box::new(Diagnostic {
                    file: path.into(),
                    line: 1,
                    col: 1,
                    message,
                })),
                name: w.name,
                stamp: None,
                digest: [0; 16],
                racy: true,
                deps: Box::default(),
                entries: Vec::new(),
            };
            return (file, false);
        }
    };
    let digest = digest(text.as_bytes());
    let racy = w.stamp.racy(read_at);
    let previous = match w.previous {
        Some(mut f) if w.reusable && f.digest == digest => {
            f.stamp = Some(w.stamp);
            f.racy = racy;
            return (f, false);
        }
        other => other.map(|f| f.entries).unwrap_or_default(),
    };
    let (failed, entries, deps) = match validate_file(&path, text, defaults, certs, &previous) {
        Ok(entries) => (None, entries, certs.take_touched()),
        Err(e) => (Some(e), Vec::new(), Box::default()),
    };
    let file = CachedFile {
        name: w.name,
        stamp: Some(w.stamp),
        digest,
        racy,
        deps,
        failed,
        entries,
    };
    (file, true)
}

/// The `*.toml` files of `domains_dir` (symlinks followed), sorted by name,
/// with their stamps. One `fstatat` per file, relative to the directory.
pub(super) fn list_dir(dir: &Path) -> Result<Vec<(OsString, Stamp)>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read domains_dir {}: {e}", dir.display()))?;
    let entries: Vec<(std::fs::DirEntry, OsString)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            Path::new(&name)
                .extension()
                .is_some_and(|x| x == "toml")
                .then_some((e, name))
        })
        .collect();
    let stat = |entries: Vec<(std::fs::DirEntry, OsString)>| -> Vec<(OsString, Stamp)> {
        entries
            .into_iter()
            .filter_map(|(e, name)| {
                let meta = if e.file_type().ok()?.is_symlink() {
                    std::fs::metadata(e.path()).ok()?
                } else {
                    e.metadata().ok()?
                };
                meta.is_file().then(|| (name, Stamp::of(&meta)))
            })
            .collect()
    };
    // One stat per file is most of a reload's time at 100,000 files (a
    // few µs each): spread it over the cores.
    let threads = reader_threads();
    let mut files = if threads > 1 && entries.len() >= 4096 {
        on_threads(entries, threads, stat).concat()
    } else {
        stat(entries)
    };
    files.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// `f` over `work` cut into `threads` contiguous chunks, one scoped thread
/// each; the results in chunk order (so in `work`'s order). A panic in a
/// chunk is resumed here.
pub(super) fn on_threads<W: Send, R: Send>(
    mut work: Vec<W>,
    threads: usize,
    f: impl Fn(Vec<W>) -> R + Sync,
) -> Vec<R> {
    let chunk = work.len().div_ceil(threads.max(1)).max(1);
    let mut chunks = Vec::new();
    while work.len() > chunk {
        let rest = work.split_off(chunk);
        chunks.push(std::mem::replace(&mut work, rest));
    }
    chunks.push(work);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|c| scope.spawn(move || f(c)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// The directory relative paths in the main file `path` resolve against.
pub(super) fn base_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Threads that read and parse `domains_dir` files: one per core, at most
/// four.
pub(super) fn reader_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// One `domains_dir` file's text (read from `path`) parsed and its entries
/// validated; the TOML error as a located diagnostic when it does not
/// parse.
pub(super) fn validate_file(
    path: &Path,
    text: String,
    defaults: &Layer<'_>,
    certs: &mut CertReader,
    previous: &[DomainEntry],
) -> Result<Vec<DomainEntry>, Box<Diagnostic>> {
    let source = domain_source(path, text);
    match toml::from_str::<RawDomainFile>(&source.text) {
        Ok(raw) => Ok(validate_entries(
            &source,
            &raw.domain,
            defaults,
            certs,
            previous,
        )),
        Err(e) => Err(Box::new(toml_error(&source, &e))),
    }
}

/// The names of a file's valid entries.
fn entry_names(entries: &[DomainEntry]) -> impl Iterator<Item = DomainName> + '_ {
    entries.iter().filter_map(|e| match e {
        DomainEntry::Valid { domain, .. } => Some(domain.name.clone()),
        DomainEntry::Invalid(_) => None,
    })
}

/// The previous load's domains with the change applied: the domains of
/// files gone or read again (`taken_out`) leave, those read now (`added`)
/// come in. `None` when the change is not a plain one — an entry is
/// invalid, a name is defined twice, or the change is large — so the full
/// merge decides (and reports) instead.
fn apply_change(
    previous: Domains,
    taken_out: &[DomainName],
    added: &[&DomainEntry],
    count: usize,
    main_entries: usize,
) -> Option<Domains> {
    // Past an eighth of the domains a full merge costs about the same.
    if main_entries > 0 || (taken_out.len() + added.len()) * 8 > previous.len().max(1) {
        return None;
    }
    let mut incoming: Vec<&Arc<DomainConfig>> = Vec::with_capacity(added.len());
    for e in added {
        match e {
            DomainEntry::Valid { domain, .. } => incoming.push(domain),
            DomainEntry::Invalid(_) => return None,
        }
    }
    incoming.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    if incoming.windows(2).any(|w| w[0].name == w[1].name) {
        return None;
    }
    let position = |name: &DomainName| previous.binary_search_by(|p| p.name.cmp(name));
    // Positions in `previous` that leave, and where each incoming domain
    // goes: k binary searches.
    let mut leaving: Vec<usize> = taken_out.iter().filter_map(|n| position(n).ok()).collect();
    leaving.sort_unstable();
    leaving.dedup();
    // A domain that stays where it was is set in place (nothing at all
    // when its file was read again but it kept its `Arc`); the rest are
    // removes and inserts (see `crate::persistent` for what each costs).
    let mut edits = crate::persistent::Edits::default();
    let mut replaced: Vec<usize> = Vec::new();
    for d in incoming {
        match position(&d.name) {
            // A name coming in may only replace one that leaves.
            Ok(i) if leaving.binary_search(&i).is_ok() => {
                replaced.push(i);
                if !previous.get(i).is_some_and(|p| Arc::ptr_eq(p, d)) {
                    edits.sets.push((i, Arc::clone(d)));
                }
            }
            Ok(_) => return None,
            Err(i) => edits.inserts.push((i, Arc::clone(d))),
        }
    }
    edits.removes = leaving
        .into_iter()
        .filter(|at| replaced.binary_search(at).is_err())
        .collect();
    let out = edits.apply(&previous);
    (out.len() == count).then_some(out)
}

#[cfg(test)]
mod tests;
