//! The `CertStore` of PostgreSQL: accounts, certificates and their states,
//! each certificate also kept in the `state_dir` cache.

use super::*;
use crate::store::{CertState, CertStore, StoreError};

impl CertStore for PgStore {
    async fn load_account(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = self
            .timed(
                "load account",
                client.query_opt(
                    "SELECT credentials FROM mtasts_accounts WHERE directory = $1",
                    &[&directory],
                ),
            )
            .await?;
        row.map(|r| self.unseal(directory, r.get(0))).transpose()
    }

    async fn save_account(&self, directory: &str, credentials: Vec<u8>) -> Result<(), StoreError> {
        let sealed = self.seal(directory, &credentials)?;
        let client = self.client().await?;
        self.timed(
            "save account",
            client.execute(
                "INSERT INTO mtasts_accounts (directory, credentials) VALUES ($1, $2)
                 ON CONFLICT (directory) DO UPDATE SET credentials = EXCLUDED.credentials, updated_at = now()",
                &[&directory, &sealed],
            ),
        )
        .await?;
        Ok(())
    }

    async fn load_cert(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.fetch_cert(host).await {
            Ok(bundle) => {
                if let Some(b) = &bundle {
                    self.refresh_cache(host, b);
                }
                Ok(bundle)
            }
            Err(e) if !self.reachable() => {
                tracing::debug!(host, error = %e, "database unreachable; reading the cached certificate");
                self.inner.cache.read_cert(host)
            }
            Err(e) => Err(e),
        }
    }

    async fn save_cert(&self, host: &str, bundle: Vec<u8>) -> Result<(), StoreError> {
        let sealed = self.seal(host, &bundle)?;
        let client = self.client().await?;
        self.timed(
            "save certificate",
            client.execute(
                "INSERT INTO mtasts_certs (host, bundle, updated_by) VALUES ($1, $2, $3)
                 ON CONFLICT (host) DO UPDATE
                   SET bundle = EXCLUDED.bundle, updated_by = EXCLUDED.updated_by, updated_at = now()",
                &[&host, &sealed, &self.inner.replica],
            ),
        )
        .await?;
        self.notify(&client, &format!("cert:{host}")).await?;
        self.refresh_cache(host, &bundle);
        Ok(())
    }

    fn load_cert_blocking(&self, host: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::Task(format!("no runtime for a database read: {e}")))?;
        handle.block_on(self.load_cert(host))
    }

    async fn cert_hosts(&self) -> Result<Vec<String>, StoreError> {
        let result = async {
            let client = self.client().await?;
            let rows = self
                .timed(
                    "list certificates",
                    client.query("SELECT host FROM mtasts_certs", &[]),
                )
                .await?;
            Ok::<Vec<String>, StoreError>(rows.iter().map(|r| r.get(0)).collect())
        }
        .await;
        match result {
            Ok(hosts) => Ok(hosts),
            Err(e) => {
                tracing::warn!(error = %e, "database unreachable; listing the cached certificates");
                self.inner.cache.cert_hosts()
            }
        }
    }

    async fn stored_hosts(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = self
            .timed(
                "list stored hosts",
                client.query(
                    "SELECT host FROM mtasts_certs UNION SELECT host FROM mtasts_cert_state ORDER BY 1",
                    &[],
                ),
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn cert_location(&self, host: &str) -> String {
        format!("{host} in the shared store (mtasts_certs)")
    }

    async fn load_state(&self, host: &str) -> Result<Option<CertState>, StoreError> {
        let result = async {
            let client = self.client().await?;
            self.timed(
                "load state",
                client.query_opt(
                    "SELECT state FROM mtasts_cert_state WHERE host = $1",
                    &[&host],
                ),
            )
            .await
        }
        .await;
        match result {
            Ok(Some(row)) => {
                let text: String = row.get(0);
                serde_json::from_str(&text).map(Some).map_err(|e| {
                    StoreError::Database(format!("state of {host} is not valid JSON ({e})"))
                })
            }
            Ok(None) => Ok(None),
            Err(_) if !self.reachable() => self.inner.cache.read_state(host),
            Err(e) => Err(e),
        }
    }

    async fn save_state(&self, host: &str, state: &CertState) -> Result<(), StoreError> {
        let text = serde_json::to_string(state)
            .map_err(|e| StoreError::Database(format!("state of {host}: {e}")))?;
        let cache = self.inner.cache.clone();
        let (h, s) = (host.to_owned(), state.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = cache.write_state(&h, &s) {
                tracing::debug!(host = %h, error = %e, "cannot cache certificate state");
            }
        })
        .await;
        let client = self.client().await?;
        self.timed(
            "save state",
            client.execute(
                "INSERT INTO mtasts_cert_state (host, state) VALUES ($1, $2)
                 ON CONFLICT (host) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
                &[&host, &text],
            ),
        )
        .await?;
        Ok(())
    }
}

impl PgStore {
    /// Keeps the cache's copy of `host` equal to `bundle` (best effort:
    /// the cache is only read while the database is unreachable).
    fn refresh_cache(&self, host: &str, bundle: &[u8]) {
        let cache = &self.inner.cache;
        if cache.read_cert(host).ok().flatten().as_deref() == Some(bundle) {
            return;
        }
        if let Err(e) = cache.write_cert(host, bundle) {
            tracing::debug!(host, error = %e, "cannot cache the certificate");
        }
    }
}
