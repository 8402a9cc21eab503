//! What replicas share besides certificates: the API-managed domains,
//! documents (retire state), heartbeats, the export to a files store,
//! and the LISTEN connection that hears the others' changes.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use super::*;
use crate::store::{CertState, DirStore, StoreError};

/// One API-managed domain row: `body` is `None` once deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRow {
    pub name: String,
    pub body: Option<String>,
    pub seq: i64,
}

/// A replica as the `mtasts_replicas` table shows it.
#[derive(Debug, Clone)]
pub struct ReplicaRow {
    pub id: String,
    pub generation: i64,
    pub served: String,
    /// Seconds since its last heartbeat (database clock).
    pub silent_secs: f64,
}

impl PgStore {
    /// API-managed domain rows changed after `after` (every row for 0),
    /// deletions included, in change order.
    pub async fn domains_since(&self, after: i64) -> Result<Vec<DomainRow>, StoreError> {
        let client = self.client().await?;
        let rows = self
            .timed(
                "read domains",
                client.query(
                    "SELECT name, body, seq FROM mtasts_domains WHERE seq > $1 ORDER BY seq",
                    &[&after],
                ),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| DomainRow {
                name: r.get(0),
                body: r.get(1),
                seq: r.get(2),
            })
            .collect())
    }

    /// Records an API write of `name` (`None`: deleted) and tells every
    /// replica. Returns the row's sequence number.
    pub async fn put_domain(&self, name: &str, body: Option<&str>) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = self
            .timed(
                "write domain",
                client.query_one(
                    "INSERT INTO mtasts_domains (name, body, seq, updated_by)
                     VALUES ($1, $2, nextval('mtasts_domain_seq'), $3)
                     ON CONFLICT (name) DO UPDATE
                       SET body = EXCLUDED.body, seq = EXCLUDED.seq,
                           updated_by = EXCLUDED.updated_by, updated_at = now()
                     RETURNING seq",
                    &[&name, &body, &self.inner.replica],
                ),
            )
            .await?;
        self.notify(&client, "domain").await?;
        Ok(row.get(0))
    }

    /// A stored document (e.g. `retire.json`).
    pub async fn document(&self, name: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = self
            .timed(
                "read document",
                client.query_opt(
                    "SELECT body FROM mtasts_documents WHERE name = $1",
                    &[&name],
                ),
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn put_document(&self, name: &str, body: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.timed(
            "write document",
            client.execute(
                "INSERT INTO mtasts_documents (name, body) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, updated_at = now()",
                &[&name, &body],
            ),
        )
        .await?;
        Ok(())
    }

    /// Records what this replica serves (heartbeat).
    pub async fn heartbeat(&self, generation: u64, served: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let generation = i64::try_from(generation).unwrap_or(i64::MAX);
        self.timed(
            "heartbeat",
            client.execute(
                "INSERT INTO mtasts_replicas (id, generation, served) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE
                   SET generation = EXCLUDED.generation, served = EXCLUDED.served, heartbeat_at = now()",
                &[&self.inner.replica, &generation, &served],
            ),
        )
        .await?;
        Ok(())
    }

    /// Every replica that reported within `within`, with what it serves.
    pub async fn replicas(&self, within: Duration) -> Result<Vec<ReplicaRow>, StoreError> {
        let client = self.client().await?;
        let rows = self
            .timed(
                "list replicas",
                client.query(
                    "SELECT id, generation, served, extract(epoch FROM now() - heartbeat_at)::float8
                     FROM mtasts_replicas WHERE heartbeat_at > now() - make_interval(secs => $1)
                     ORDER BY id",
                    &[&within.as_secs_f64()],
                ),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ReplicaRow {
                id: r.get(0),
                generation: r.get(1),
                served: r.get(2),
                silent_secs: r.get(3),
            })
            .collect())
    }

    /// Removes this replica's heartbeat row (clean shutdown).
    pub async fn leave(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.timed(
            "leave",
            client.execute(
                "DELETE FROM mtasts_replicas WHERE id = $1",
                &[&self.inner.replica],
            ),
        )
        .await?;
        Ok(())
    }

    /// Writes every certificate (decrypted) and state of the database into
    /// `to` (for `mtasts certs`, which reads a directory store). Returns
    /// how many certificates were written.
    pub async fn export(&self, to: &DirStore) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let rows = self
            .timed(
                "export certificates",
                client.query("SELECT host, bundle FROM mtasts_certs", &[]),
            )
            .await?;
        let mut n = 0;
        for row in &rows {
            let host: String = row.get(0);
            match self.unseal(&host, row.get(1)) {
                Ok(bundle) => {
                    to.write_cert(&host, &bundle)?;
                    n += 1;
                }
                Err(e) => tracing::warn!(host, error = %e, "certificate not exported"),
            }
        }
        let rows = self
            .timed(
                "export state",
                client.query("SELECT host, state FROM mtasts_cert_state", &[]),
            )
            .await?;
        for row in &rows {
            let host: String = row.get(0);
            let text: String = row.get(1);
            match serde_json::from_str::<CertState>(&text) {
                Ok(state) => to.write_state(&host, &state)?,
                Err(e) => tracing::warn!(host, error = %e, "state not exported"),
            }
        }
        Ok(n)
    }
}

/// What a LISTEN connection hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// (Re)connected: anything may have changed while not listening.
    Resync,
    /// Another replica stored a certificate for this host.
    Cert(String),
    /// API-managed domains changed.
    Domains,
}

/// Keeps a LISTEN connection open (reconnecting with backoff) and sends
/// what it hears to `events` until the receiver is gone.
pub async fn listen(
    config: tokio_postgres::Config,
    tls: Tls,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if events.is_closed() {
            return;
        }
        let connected = match &tls {
            Tls::Off => match config.connect(tokio_postgres::NoTls).await {
                Ok((client, connection)) => Ok(session(client, connection, &events).await),
                Err(e) => Err(e),
            },
            Tls::Rustls(t) => match config.connect(t.clone()).await {
                Ok((client, connection)) => Ok(session(client, connection, &events).await),
                Err(e) => Err(e),
            },
        };
        match connected {
            Ok(false) => return,
            Ok(true) => delay = Duration::from_millis(200),
            Err(e) => tracing::debug!(error = %pg_message(&e), "cannot open the LISTEN connection"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// One LISTEN session until its connection ends; `false` once nobody
/// receives the events any more.
async fn session<S, T>(
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<S, T>,
    events: &mpsc::UnboundedSender<Event>,
) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::StreamExt;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let pump = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(message) = stream.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %pg_message(&e), "PostgreSQL LISTEN connection failed");
                    return;
                }
            }
        }
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
        tracing::warn!(error = %pg_message(&e), "cannot LISTEN");
        pump.abort();
        return true;
    }
    tracing::info!("listening for changes from other replicas");
    if events.send(Event::Resync).is_err() {
        return false;
    }
    while let Some(payload) = rx.recv().await {
        let event = match payload.strip_prefix("cert:") {
            Some(host) => Event::Cert(host.to_owned()),
            None if payload == "domain" => Event::Domains,
            None => continue,
        };
        if events.send(event).is_err() {
            return false;
        }
    }
    tracing::warn!("lost the PostgreSQL LISTEN connection; reconnecting");
    true
}

/// The files a `store import` reads, for its report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    pub accounts: usize,
    pub certs: usize,
    pub states: usize,
    pub domains: usize,
    pub documents: usize,
    /// (file, why) of what could not be imported.
    pub skipped: Vec<(PathBuf, String)>,
}
