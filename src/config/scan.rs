//! One pass over a config for the commands that print and exit
//! (`records`, `check-config`): each `domains_dir` file is read, validated
//! and let go, and of each domain only what the caller keeps stays in
//! memory. A serving config holds a full [`DomainConfig`] per domain (and
//! its file's validated entries, for the next reload); at a million
//! domains that was most of `records`' 431 MB peak (issue 11).
//!
//! The result is exactly [`Config::load`]'s: the same domains in the same
//! (name) order and the same warnings in the same order. Anything that is
//! not clean — an error in any file, a file that cannot be read, a name
//! defined twice — hands over to [`Config::load`], so errors are reported
//! by the one code that reports them for every other command.

use std::path::Path;

use super::loader::{CertReader, base_of, list_dir, on_threads, reader_threads, validate_file};
use super::{
    Config, ConfigErrors, Diagnostic, DomainConfig, DomainEntry, Domains, Layer, MxSource,
    parse_main, read_limited, validate_defaults, validate_entries,
};

/// A config read by [`scan`].
pub struct Scan<T> {
    /// Every setting of the config; its `domains` list is empty (the
    /// domains are in [`Scan::domains`]).
    pub config: Config,
    /// What the keeper made of each domain, sorted by domain name.
    pub domains: Vec<T>,
}

/// What one chunk of files left behind.
struct Chunk<T> {
    kept: Vec<T>,
    warnings: Vec<Diagnostic>,
    mx_certs_used: bool,
    clean: bool,
}

impl<T> Chunk<T> {
    fn new() -> Chunk<T> {
        Chunk {
            kept: Vec::new(),
            warnings: Vec::new(),
            mx_certs_used: false,
            clean: true,
        }
    }
}

/// Reads `path` like [`Config::load`], keeping of each domain what
/// `keeper()`'s function returns (one keeper per thread, so it may hold a
/// cache). `name` is the key the result is sorted by: the domain name.
pub fn scan<T, K>(
    path: &Path,
    keeper: impl Fn() -> K + Sync,
    name: impl Fn(&T) -> &str + Sync,
) -> Result<Scan<T>, ConfigErrors>
where
    T: Send,
    K: FnMut(&DomainConfig) -> T,
{
    match scan_clean(path, &keeper, &name) {
        Some(scan) => Ok(scan),
        None => {
            let mut config = Config::load(path)?;
            let mut keep = keeper();
            let domains = config.domains.iter().map(|d| keep(d)).collect();
            config.domains = Domains::new();
            Ok(Scan { config, domains })
        }
    }
}

/// [`scan`] when every part of the config is clean; `None` otherwise.
fn scan_clean<T, K>(
    path: &Path,
    keeper: &(impl Fn() -> K + Sync),
    name: &(impl Fn(&T) -> &str + Sync),
) -> Option<Scan<T>>
where
    T: Send,
    K: FnMut(&DomainConfig) -> T,
{
    let text = read_limited(path).ok()?;
    let main = parse_main(path, base_of(path), text).ok()?;
    let mut report = main.report;
    let mut defaults = Layer::defaults(&main.source, &main.defaults);
    defaults.tlsrpt_receive = main.tlsrpt.receive;
    let now = time::OffsetDateTime::now_utc();
    let listing = match &main.domains_dir {
        Some((dir, _)) => list_dir(dir).ok()?,
        None => Vec::new(),
    };
    let dir = main
        .domains_dir
        .as_ref()
        .map_or(Path::new("."), |(d, _)| d.as_path());

    let mut certs = CertReader::new(now);
    validate_defaults(&defaults, &mut certs, &mut report);
    if !report.errors.is_empty() {
        return None;
    }
    let keep_entries = |entries: Vec<DomainEntry>, chunk: &mut Chunk<T>, keep: &mut K| {
        for entry in entries {
            match entry {
                DomainEntry::Valid { domain, warnings } => {
                    chunk.mx_certs_used |= matches!(domain.mx_source, MxSource::Certs(_));
                    chunk.warnings.extend(warnings);
                    chunk.kept.push(keep(&domain));
                }
                DomainEntry::Invalid(_) => chunk.clean = false,
            }
        }
    };
    let main_entries = validate_entries(&main.source, &main.entries, &defaults, &mut certs, &[]);
    let mut first = Chunk::new();
    keep_entries(main_entries, &mut first, &mut keeper());

    let read_chunk = |files: Vec<(std::ffi::OsString, _)>| {
        let mut chunk = Chunk::new();
        let mut certs = CertReader::new(now);
        let mut keep = keeper();
        for (file, _stamp) in files {
            let file = dir.join(file);
            let Ok(text) = read_limited(&file) else {
                chunk.clean = false;
                break;
            };
            let Ok(entries) = validate_file(&file, text, &defaults, &mut certs, &[]) else {
                chunk.clean = false;
                break;
            };
            keep_entries(entries, &mut chunk, &mut keep);
            if !chunk.clean {
                break;
            }
        }
        chunk.kept.sort_unstable_by(|a, b| name(a).cmp(name(b)));
        chunk
    };
    let threads = reader_threads();
    let chunks = if threads > 1 && listing.len() >= 2 * threads {
        on_threads(listing, threads, read_chunk)
    } else {
        vec![read_chunk(listing)]
    };
    first.kept.sort_unstable_by(|a, b| name(a).cmp(name(b)));

    let mut runs = Vec::with_capacity(chunks.len() + 1);
    let mut warnings = report.warnings;
    let mut mx_certs_used = false;
    for chunk in std::iter::once(first).chain(chunks) {
        if !chunk.clean {
            return None;
        }
        warnings.extend(chunk.warnings);
        mx_certs_used |= chunk.mx_certs_used;
        runs.push(chunk.kept);
    }
    let domains = merge_runs(runs, name)?;
    let config = Config {
        path: main.source.path.to_path_buf(),
        server: main.server,
        tls: main.tls,
        domains_dir: main.domains_dir.map(|(d, _)| d),
        admin: main.admin,
        domains: Domains::new(),
        warnings,
        delegation: main.delegation,
        dns_update: main.dns_update,
        store: main.store,
        tlsrpt: main.tlsrpt,
        on_demand: main.on_demand,
        mx_certs_used,
    };
    Some(Scan { config, domains })
}

/// The sorted `runs` as one sorted list; `None` when a name is in it twice.
/// The order is found on indices (a k-way merge, k ≤ 5) and applied in
/// place, so the kept values are never sorted into a second list.
fn merge_runs<T>(runs: Vec<Vec<T>>, name: impl Fn(&T) -> &str) -> Option<Vec<T>> {
    let total = runs.iter().map(Vec::len).sum();
    // One list of all runs, grown from the longest (its block is extended,
    // mostly in place): the kept values are at most once and a half in
    // memory while the shorter runs move over, not twice.
    let longest = (0..runs.len()).max_by_key(|&i| runs[i].len()).unwrap_or(0);
    let mut runs = runs;
    runs.rotate_left(longest);
    let mut runs = runs.into_iter();
    let mut all: Vec<T> = runs.next().unwrap_or_default();
    all.reserve_exact(total - all.len());
    let mut starts = vec![(0, all.len())];
    for run in runs {
        starts.push((all.len(), all.len() + run.len()));
        all.extend(run);
    }
    // order[k] = the position in `all` of the k-th smallest name.
    let mut order: Vec<u32> = Vec::with_capacity(total);
    let mut heads = starts;
    loop {
        let mut best: Option<usize> = None;
        for (r, &(at, end)) in heads.iter().enumerate() {
            if at < end
                && best.is_none_or(|b| {
                    let (bat, _) = heads[b];
                    name(&all[at]) < name(&all[bat])
                })
            {
                best = Some(r);
            }
        }
        let Some(b) = best else { break };
        let at = heads[b].0;
        if let Some(&last) = order.last()
            && name(&all[last as usize]) == name(&all[at])
        {
            return None;
        }
        order.push(u32::try_from(at).ok()?);
        heads[b].0 += 1;
    }
    apply_order(&mut all, &mut order);
    Some(all)
}

/// Rearranges `v` so that `v[k]` is the old `v[order[k]]`, by following
/// the permutation's cycles with swaps (`order` is used up).
fn apply_order<T>(v: &mut [T], order: &mut [u32]) {
    const DONE: u32 = u32::MAX;
    for start in 0..order.len() {
        if order[start] == DONE {
            continue;
        }
        let mut k = start;
        loop {
            let from = order[k] as usize;
            order[k] = DONE;
            if from == start {
                break;
            }
            v.swap(k, from);
            k = from;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{self, Publish as _, Publisher};

    /// A main file with `[defaults]` and one entry, and `files` domain
    /// files of four domains each (enough files for the threaded path),
    /// configured in several ways; `extra` is appended to the last file.
    fn write_config(dir: &Path, files: usize, extra: &str) -> std::path::PathBuf {
        let main = dir.join("m.toml");
        std::fs::write(
            &main,
            "domains_dir = \"d\"\n[defaults]\nmode = \"enforce\"\nmx = [\"mx.example.net\"]\nmax_age = \"1w\"\n\
             tlsrpt_rua = \"mailto:tls@example.net\"\n\
             [[domain]]\nname = \"main.example\"\nmode = \"testing\"\n",
        )
        .expect("write main");
        std::fs::create_dir(dir.join("d")).expect("mkdir");
        for f in 0..files {
            let mut text = String::new();
            // Names out of order within a file and across files.
            for i in [3, 1, 0, 2] {
                let n = (files - f) * 10 + i;
                text.push_str(&format!("[[domain]]\nname = \"z{n}.example\"\n"));
                match i {
                    1 => text.push_str("mx = [\"*.mx.example.org\"]\nttl = 300\n"),
                    2 => text.push_str("host_cname = \"policy.example.net\"\nmax_age = 600\n"),
                    3 => text.push_str(
                        "host_a = [\"192.0.2.1\"]\ntlsrpt_rua = \"mailto:other@example.org\"\n",
                    ),
                    _ => {}
                }
            }
            if f + 1 == files {
                text.push_str(extra);
            }
            std::fs::write(dir.join("d").join(format!("f{f:02}.toml")), text).expect("write");
        }
        main
    }

    #[test]
    fn a_scan_equals_a_load_and_publishes_the_same_records() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let main = write_config(tmp.path(), 9, "");
        let loaded = Config::load(&main).expect("valid config");
        let scanned = scan(&main, || |d: &DomainConfig| d.clone(), |d| d.name.as_str())
            .expect("valid config");
        assert_eq!(scanned.domains.len(), 37);
        let loaded_domains: Vec<DomainConfig> = loaded
            .domains
            .iter()
            .map(|d| DomainConfig::clone(d))
            .collect();
        assert_eq!(scanned.domains, loaded_domains);
        // Nine short max_age warnings, in file order, as the load gives them.
        assert_eq!(scanned.config.warnings.len(), 9);
        assert_eq!(scanned.config.warnings, loaded.warnings);
        assert_eq!(scanned.config.mx_certs_used, loaded.mx_certs_used);
        assert!(scanned.config.domains.is_empty());

        let published = scan(
            &main,
            || {
                let mut p = Publisher::default();
                move |d: &DomainConfig| p.publish(d)
            },
            |p: &dns::Published| p.name().as_str(),
        )
        .expect("valid config");
        let snapshot = crate::snapshot::Snapshot::build(&loaded);
        let from_snapshot = dns::records(&snapshot, &[], dns::Side::Full, None).expect("records");
        let from_scan: Vec<dns::Record> =
            dns::records_of(published.domains.iter(), dns::Side::Full, None)
                .expect("records")
                .collect();
        assert_eq!(from_scan, from_snapshot);
        // Each kind of record is there: TXT, TLSRPT, CNAME, A.
        for rtype in ["TXT", "CNAME", "A"] {
            assert!(from_scan.iter().any(|r| r.rtype == rtype), "{rtype}");
        }
    }

    #[test]
    fn a_config_with_errors_is_reported_as_a_load_reports_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A name defined twice (across files) and an invalid entry.
        let main = write_config(
            tmp.path(),
            6,
            "[[domain]]\nname = \"z13.example\"\n[[domain]]\nname = \"bad.example\"\nmode = \"enforcing\"\n",
        );
        let loaded = Config::load(&main).expect_err("invalid config");
        let Err(scanned) = scan(&main, || |d: &DomainConfig| d.name.clone(), |n| n.as_str()) else {
            panic!("the scan accepted an invalid config");
        };
        assert_eq!(scanned.errors, loaded.errors);
        assert_eq!(scanned.warnings, loaded.warnings);
        let text: Vec<String> = scanned.errors.iter().map(|d| d.message.clone()).collect();
        assert!(
            text.iter()
                .any(|m| m.contains("duplicate domain z13.example")),
            "{text:?}"
        );
        assert!(text.iter().any(|m| m.contains("enforcing")), "{text:?}");

        // A name twice and nothing else wrong: found by the merge of the
        // sorted runs, then reported by the load.
        let tmp = tempfile::tempdir().expect("tempdir");
        let main = write_config(tmp.path(), 6, "[[domain]]\nname = \"z13.example\"\n");
        let loaded = Config::load(&main).expect_err("invalid config");
        let Err(scanned) = scan(&main, || |d: &DomainConfig| d.name.clone(), |n| n.as_str()) else {
            panic!("the scan accepted a name twice");
        };
        assert_eq!(scanned.errors, loaded.errors);
        assert_eq!(scanned.errors.len(), 1);
    }

    #[test]
    fn order_is_applied_in_place() {
        let mut v: Vec<char> = "dacbe".chars().collect();
        // The sorted order of "dacbe" by position.
        let mut order = vec![1, 3, 2, 0, 4];
        apply_order(&mut v, &mut order);
        assert_eq!(v.iter().collect::<String>(), "abcde");
    }

    #[test]
    fn runs_merge_and_a_name_twice_is_refused() {
        let runs = vec![vec!["b", "d", "f"], vec!["a", "c"], vec![], vec!["e", "g"]];
        let merged = merge_runs(runs, |s| s).expect("no duplicate");
        assert_eq!(merged, ["a", "b", "c", "d", "e", "f", "g"]);
        assert!(merge_runs(vec![vec!["a", "c"], vec!["c"]], |s| s).is_none());
    }
}
