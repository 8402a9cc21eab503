//! Files of `state_dir` that replicas share as documents in the database
//! (the retirement records): copied from the database before a command or
//! a leader's push reads them, and back after a change.

use std::path::Path;

use crate::config::Config;
use crate::store::pg::PgStore;
use crate::store::{self as files, StoreError};

/// Files in `state_dir` that replicas share as documents in the database:
/// the retirement records (written by `auto_push`'s leader and by
/// `mtasts retire` / `dns push` on any machine).
const SHARED_DOCUMENTS: &[&str] = &[crate::retire::FILE_NAME];

/// Copies the shared documents from the database into `state_dir` (the
/// database's copy wins; one missing there is left alone here).
pub async fn pull_documents(store: &PgStore, state_dir: &Path) -> Result<(), StoreError> {
    for name in SHARED_DOCUMENTS {
        let Some(body) = store.document(name).await? else {
            continue;
        };
        let path = state_dir.join(name);
        if std::fs::read(&path).ok().as_deref() == Some(body.as_bytes()) {
            continue;
        }
        files::ensure_private_dir(state_dir).map_err(|source| StoreError::Io {
            path: state_dir.to_owned(),
            source,
        })?;
        files::write_atomic(&path, body.as_bytes(), files::KEY_MODE)
            .map_err(|source| StoreError::Io { path, source })?;
    }
    Ok(())
}

/// Copies the shared documents of `state_dir` into the database (after a
/// local change).
pub async fn push_documents(store: &PgStore, state_dir: &Path) -> Result<(), StoreError> {
    for name in SHARED_DOCUMENTS {
        let path = state_dir.join(name);
        let Ok(body) = std::fs::read_to_string(&path) else {
            continue;
        };
        if store.document(name).await?.as_deref() != Some(body.as_str()) {
            store.put_document(name, &body).await?;
        }
    }
    Ok(())
}

/// For commands that read and write the shared documents (`retire`, `dns
/// push`): pulls them before `work` and pushes them after, when `config`
/// uses the PostgreSQL store. Runs the database calls on a thread of its
/// own, so `work` may run its own runtime.
pub fn with_shared_documents<R>(
    config: &Config,
    work: impl FnOnce() -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let crate::config::StoreConfig::Postgres(pg) = &config.store else {
        return work();
    };
    let state_dir = config.server.state_dir.clone();
    let run = |push: bool| -> Result<(), StoreError> {
        let (pg, state_dir) = (pg.clone(), state_dir.clone());
        std::thread::scope(|s| {
            s.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StoreError::Task(e.to_string()))?;
                runtime.block_on(async {
                    let store = PgStore::open(&pg, &state_dir)?;
                    if push {
                        push_documents(&store, &state_dir).await
                    } else {
                        pull_documents(&store, &state_dir).await
                    }
                })
            })
            .join()
            .unwrap_or_else(|_| Err(StoreError::Task("document sync panicked".to_owned())))
        })
    };
    run(false).map_err(|e| anyhow::anyhow!("cannot read the shared retirement records: {e}"))?;
    let result = work()?;
    run(true).map_err(|e| anyhow::anyhow!("cannot share the retirement records: {e}"))?;
    Ok(result)
}
