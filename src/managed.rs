//! Domains kept in `domains_dir`, one file each (`<name>.toml`), written by
//! the admin API and by on-demand onboarding: a write and the reload that
//! validates it are one unit under the reload lock, undone when the reload
//! rejects it, and shared with the other replicas through the database.
//!
//! A file is changed or deleted only while it holds its one domain alone:
//! a hand-written file that also holds other domains is left as it is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::control::{Control, ReloadError, ReloadLock};
use crate::metrics::Trigger;
use crate::policy::DomainName;
use crate::store;

/// The first line of every file written here (replicas and `store import`
/// recognise managed files by it).
pub const MANAGED_HEADER: &str = crate::replica::MANAGED_HEADER;

/// What kind of failure a write met (the admin API maps it to a status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteErrorKind {
    /// Not ours to change (no `domains_dir`, a hand-written file, a domain
    /// defined elsewhere).
    Conflict,
    /// Delete of a domain that is not configured.
    NotFound,
    /// The config with the change is invalid; nothing was changed.
    Invalid,
    /// The shared store cannot be reached; nothing was changed.
    Unavailable,
    /// Anything else (disk, a failed task); the log says more.
    Internal,
}

impl WriteErrorKind {
    /// The HTTP status the admin API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            WriteErrorKind::Conflict => 409,
            WriteErrorKind::NotFound => 404,
            WriteErrorKind::Invalid => 422,
            WriteErrorKind::Unavailable => 503,
            WriteErrorKind::Internal => 500,
        }
    }
}

/// Why a write was not applied (nothing was changed).
#[derive(Debug, Clone)]
pub struct WriteError {
    pub kind: WriteErrorKind,
    pub message: String,
    /// Config diagnostics of an [`WriteErrorKind::Invalid`] write.
    pub details: Vec<String>,
}

impl WriteError {
    fn new(kind: WriteErrorKind, message: impl Into<String>) -> WriteError {
        WriteError {
            kind,
            message: message.into(),
            details: Vec::new(),
        }
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        for d in &self.details {
            write!(f, "; {d}")?;
        }
        Ok(())
    }
}

impl From<ReloadError> for WriteError {
    fn from(e: ReloadError) -> Self {
        match e {
            ReloadError::Config(errs) => WriteError {
                kind: WriteErrorKind::Invalid,
                message: "the configuration is invalid; nothing was changed".to_owned(),
                details: errs.errors.iter().map(ToString::to_string).collect(),
            },
            ReloadError::Embedded => WriteError::new(WriteErrorKind::Conflict, e.to_string()),
            other => {
                tracing::error!("reload after a domain write failed: {other:#}");
                WriteError::new(
                    WriteErrorKind::Internal,
                    "reload failed; see the server log",
                )
            }
        }
    }
}

/// What a write did.
#[derive(Clone)]
pub struct Written {
    /// The domain was configured before the write.
    pub existed: bool,
    /// The snapshot generation serving the write.
    pub generation: u64,
    /// The snapshot right after the write (taken under the reload lock).
    pub snapshot: Arc<crate::snapshot::Snapshot>,
}

/// The file `name` is kept in, when a `domains_dir` is configured.
pub fn managed_file(control: &Control, name: &DomainName) -> Option<PathBuf> {
    control
        .config()
        .domains_dir
        .as_ref()
        .map(|d| d.join(format!("{name}.toml")))
}

/// Replaces (`Some`) or removes (`None`) the file of `name` and reloads, as
/// one unit in a task of its own: if the caller goes away, the write still
/// finishes (applied, or undone) and its outcome is logged. `action` names
/// the writer in the log (`put`, `delete`, `onboard`, `offboard`).
pub async fn write(
    control: &Arc<Control>,
    name: DomainName,
    content: Option<String>,
    action: &'static str,
) -> Result<Written, WriteError> {
    let control = Arc::clone(control);
    tokio::spawn(async move {
        let lock = control.lock().await;
        let result = write_and_reload(&control, &lock, &name, content).await;
        let writer = match action {
            "put" | "delete" => "admin",
            _ => "on-demand",
        };
        // Logged before the next write may start: the log shows the order.
        match &result {
            Ok(w) => tracing::info!(
                domain = %name,
                action,
                generation = w.generation,
                "{writer} write applied"
            ),
            Err(e) => tracing::warn!(
                domain = %name,
                action,
                status = e.kind.http_status(),
                "{writer} write not applied: {}",
                e.message
            ),
        }
        drop(lock);
        result
    })
    .await
    .map_err(|e| {
        tracing::error!("domain write task failed: {e}");
        WriteError::new(
            WriteErrorKind::Internal,
            "the write failed; see the server log",
        )
    })?
}

/// The body of [`write`]; the caller holds the reload lock throughout.
async fn write_and_reload(
    control: &Control,
    lock: &ReloadLock<'_>,
    name: &DomainName,
    content: Option<String>,
) -> Result<Written, WriteError> {
    let Some(file) = managed_file(control, name) else {
        return Err(WriteError::new(
            WriteErrorKind::Conflict,
            "no domains_dir is configured; the API has nowhere to keep domains",
        ));
    };
    let configured = control.config().domain(name).map(|d| d.origin.clone());
    if let Some(origin) = &configured
        && *origin.file != *file
    {
        return Err(WriteError::new(
            WriteErrorKind::Conflict,
            format!(
                "{name} is defined in {}:{}, which the API does not manage",
                origin.file.display(),
                origin.line
            ),
        ));
    }
    // Replicas: the write is shared through the database, so it is refused
    // up front while the database cannot be reached.
    if let Some(pg) = control.pg()
        && let Err(e) = pg.ping().await
    {
        tracing::warn!(error = %e, "domain write refused: the shared store is unreachable");
        return Err(WriteError::new(
            WriteErrorKind::Unavailable,
            "the shared store (PostgreSQL) is unreachable; nothing was changed, try again later",
        ));
    }
    // The file as it is now, which may differ from what was last applied
    // (a hand edit not reloaded yet, or rejected).
    let previous = owned_file(&file, name)?;
    if content.is_none() && previous.is_none() {
        return Err(WriteError::new(
            WriteErrorKind::NotFound,
            format!("{name} is not configured"),
        ));
    }
    let io_err = |e: std::io::Error| {
        tracing::error!("cannot write {}: {e}", file.display());
        WriteError::new(
            WriteErrorKind::Internal,
            "cannot write the domain file; see the server log",
        )
    };
    match &content {
        Some(text) => {
            store::write_atomic(&file, text.as_bytes(), store::PUBLIC_MODE).map_err(io_err)?
        }
        None => std::fs::remove_file(&file).map_err(io_err)?,
    }
    let restore = || {
        let restored = match &previous {
            Some(old) => store::write_atomic(&file, old, store::PUBLIC_MODE),
            None => std::fs::remove_file(&file),
        };
        match restored {
            Ok(()) => tracing::info!(file = %file.display(), "domain write undone"),
            Err(re) => tracing::error!("cannot restore {}: {re}", file.display()),
        }
    };
    let reloaded = match control.reload_locked(lock, Trigger::Admin).await {
        Ok(r) => r,
        Err(e) => {
            restore();
            return Err(e.into());
        }
    };
    // Shared with the other replicas once it is known to be valid.
    if let Some(pg) = control.pg()
        && let Err(e) = pg.put_domain(name.as_str(), content.as_deref()).await
    {
        tracing::error!(error = %e, "domain write could not be shared; undoing it here");
        restore();
        if let Err(e) = control.reload_locked(lock, Trigger::Admin).await {
            tracing::error!("reload after undoing the domain write failed: {e}");
        }
        return Err(WriteError::new(
            WriteErrorKind::Unavailable,
            "the shared store (PostgreSQL) failed during the write; nothing was changed, try again later",
        ));
    }
    Ok(Written {
        existed: configured.is_some(),
        generation: reloaded.generation,
        snapshot: control.server().snapshot(),
    })
}

/// Largest `domains_dir` file read back before replacing it.
const MAX_DOMAIN_FILE: u64 = 1024 * 1024;

/// The current bytes of `file` (`None`: no such file) when it may be
/// replaced or deleted: it holds `name` and no other domain. Anything else
/// (other domains, text that is not a domain file, not a regular file) is a
/// conflict and the file is left alone.
pub fn owned_file(file: &Path, name: &DomainName) -> Result<Option<Vec<u8>>, WriteError> {
    use std::io::Read as _;
    let refuse = |why: String| {
        WriteError::new(
            WriteErrorKind::Conflict,
            format!(
                "{} {why}; the API only changes a file that holds nothing but the one domain \
                 it is named after, so edit this file by hand (or move {name} into a file \
                 of its own)",
                file.display()
            ),
        )
    };
    let meta = match std::fs::metadata(file) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(refuse(format!("cannot be read ({e})"))),
    };
    if !meta.is_file() {
        return Err(refuse("is not a regular file".to_owned()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_DOMAIN_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| refuse(format!("cannot be read ({e})")))?;
    if bytes.len() as u64 > MAX_DOMAIN_FILE {
        return Err(refuse(format!("is larger than {MAX_DOMAIN_FILE} bytes")));
    }
    let table: toml::Table = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| refuse("is not a valid domain file".to_owned()))?;
    let mut names = Vec::new();
    for (key, value) in &table {
        let entries = match (key.as_str(), value) {
            ("domain", toml::Value::Array(entries)) => entries,
            _ => return Err(refuse(format!("holds `{key}`, which is not a domain"))),
        };
        for entry in entries {
            let raw = entry
                .get("name")
                .and_then(toml::Value::as_str)
                .unwrap_or("");
            names.push(
                DomainName::parse(raw).map_or_else(|_| format!("{raw:?}"), |n| n.to_string()),
            );
        }
    }
    let others: Vec<&String> = names.iter().filter(|n| **n != name.as_str()).collect();
    if !others.is_empty() {
        let list = others
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(refuse(format!("also holds {list}")));
    }
    if names.len() > 1 {
        return Err(refuse(format!("holds {name} {} times", names.len())));
    }
    Ok(Some(bytes))
}
