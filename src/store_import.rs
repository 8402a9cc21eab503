//! `mtasts store import`: moves a files store (`state_dir`) and the API's
//! domain files into PostgreSQL. Idempotent: running it again changes
//! nothing, and it never replaces newer data in the database (a
//! certificate that expires later, a state or domain already there).

use std::path::{Path, PathBuf};

use crate::store::pg::{Imported, PgStore};
use crate::store::{CertStore, DirStore, StoreError};

/// Imports `from` (a `state_dir`) and the API-managed files of
/// `domains_dir` into `pg`; `directory` is the configured ACME directory
/// (an account file whose credentials do not name theirs belongs to it
/// when its file name says so).
pub async fn import(
    pg: &PgStore,
    from: &Path,
    domains_dir: Option<&Path>,
    directory: &str,
) -> Result<Imported, StoreError> {
    let mut done = Imported::default();
    let Some(dir) = DirStore::existing(from) else {
        if !from.is_dir() {
            return Err(StoreError::Io {
                path: from.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            });
        }
        return import_rest(pg, from, domains_dir, done).await;
    };
    // Accounts: `accounts/<hash of the directory URL>.json`.
    let accounts = dir.root().join("accounts");
    for (path, bytes) in json_files(&accounts) {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let named = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("directory")?.as_str().map(str::to_owned));
        let candidates = named.into_iter().chain([directory.to_owned()]);
        let Some(url) = candidates.into_iter().find(|d| account_stem(d) == stem) else {
            done.skipped.push((
                path,
                "the ACME directory of this account is not known (not the configured one)"
                    .to_owned(),
            ));
            continue;
        };
        if pg.load_account(&url).await?.is_some() {
            continue;
        }
        pg.save_account(&url, bytes).await?;
        done.accounts += 1;
    }
    // Certificates: a stored one that expires later wins.
    for host in dir.cert_hosts()? {
        let path = dir.cert_path(&host)?;
        let bundle = match dir.read_cert(&host) {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) => {
                done.skipped.push((path, e.to_string()));
                continue;
            }
        };
        let ours = match crate::acme::order::inspect(&host, &bundle) {
            Ok((_, info)) => info.not_after,
            Err(why) => {
                done.skipped
                    .push((path, format!("not a usable certificate: {why}")));
                continue;
            }
        };
        let theirs = pg
            .load_cert(&host)
            .await?
            .and_then(|b| crate::acme::order::inspect(&host, &b).ok())
            .map(|(_, info)| info.not_after);
        if theirs.is_some_and(|t| t >= ours) {
            continue;
        }
        pg.save_cert(&host, bundle).await?;
        done.certs += 1;
    }
    for host in dir.hosts() {
        let state = match dir.read_state(&host) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                done.skipped
                    .push((dir.root().join("state").join(&host), e.to_string()));
                continue;
            }
        };
        if pg.load_state(&host).await?.is_some() {
            continue;
        }
        pg.save_state(&host, &state).await?;
        done.states += 1;
    }
    import_rest(pg, from, domains_dir, done).await
}

/// Documents (`retire.json`) and API-managed domains.
async fn import_rest(
    pg: &PgStore,
    from: &Path,
    domains_dir: Option<&Path>,
    mut done: Imported,
) -> Result<Imported, StoreError> {
    let retire = crate::retire::path(from);
    if let Ok(text) = std::fs::read_to_string(&retire) {
        if serde_json::from_str::<serde_json::Value>(&text).is_err() {
            done.skipped.push((retire, "not valid JSON".to_owned()));
        } else if pg.document(crate::retire::FILE_NAME).await?.is_none() {
            pg.put_document(crate::retire::FILE_NAME, &text).await?;
            done.documents += 1;
        }
    }
    if let Some(domains_dir) = domains_dir {
        let known: std::collections::HashMap<String, Option<String>> = pg
            .domains_since(0)
            .await?
            .into_iter()
            .map(|r| (r.name, r.body))
            .collect();
        let mut files: Vec<PathBuf> = std::fs::read_dir(domains_dir)
            .map_err(|source| StoreError::Io {
                path: domains_dir.to_owned(),
                source,
            })?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for path in files {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if !text.starts_with(crate::replica::MANAGED_HEADER) {
                continue;
            }
            let Some(name) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| crate::policy::DomainName::parse(s).ok())
            else {
                done.skipped
                    .push((path, "file name is not a domain name".to_owned()));
                continue;
            };
            // Already there (deleted or not): the database's version wins.
            if known.contains_key(name.as_str()) {
                continue;
            }
            pg.put_domain(name.as_str(), Some(&text)).await?;
            done.domains += 1;
        }
    }
    Ok(done)
}

fn account_stem(directory: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(directory.as_bytes());
    data_encoding::HEXLOWER.encode(&digest[..8])
}

fn json_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "json").then_some(())?;
            let bytes = std::fs::read(&path).ok()?;
            Some((path, bytes))
        })
        .collect();
    out.sort();
    out
}
