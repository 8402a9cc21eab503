//! mtasts publishes MTA-STS (RFC 8461) for many receiving mail domains.
//!
//! Data flows one way:
//!
//! - [`config`]: TOML files → validated [`config::Config`], every error with
//!   `file:line:col`.
//! - [`mxcert`]: `mx` patterns from the mail servers' certificates;
//!   [`mxhold`]: an enforce shrink of them waits while a live MX needs it.
//! - [`policy`]: the policy model, its CRLF rendering and the id derived from it.
//! - [`snapshot`]: the immutable host → pre-rendered policy map, swapped whole.
//! - [`http`]: the axum handler (Host/SNI → bytes); [`server`]: listeners,
//!   limits, graceful shutdown; [`tls`]: SNI index and the local CA.
//! - [`dns`]: the `_mta-sts`, host and `_smtp._tls` records (`dns::write`
//!   streams the built-in formats), the authoritative listener
//!   (`dns::serve`) and RFC 2136 pushes (`dns::update`); [`resolve`]: the
//!   one stub resolver of `check`, onboarding and the ACME precheck.
//! - [`metrics`]: Prometheus counters (one atomic add per request).
//! - [`acme`]: certificates for every policy host through ACME (orders,
//!   challenges, renewals, pacing); [`store`]: atomic, permission-correct
//!   files in `state_dir` behind the `CertStore` trait, or PostgreSQL
//!   shared by replicas (`store::pg`); [`store_import`]: `mtasts store
//!   import`, a files store into PostgreSQL; [`replica`]: what
//!   a replica follows and reports there (domains, certificates, heartbeat);
//!   [`documents`]: `state_dir` files shared through the database.
//! - [`tlsrpt`]: TLS reports (RFC 8460) received on the policy hosts or
//!   by mail, stored (SQLite or PostgreSQL) and summarised.
//! - [`retire`]: retiring a domain (RFC 8461 §8.3): when its records may go.
//! - [`check`]: live verification of a domain, like a strict sending MTA
//!   (`check::parse` reads what `check::probe` fetches).
//! - [`control`]: reloads (SIGHUP, file watch, admin API), serialised;
//!   [`auto_push`]: `serve`'s push of each served snapshot's records.
//! - [`onboard`]: on-demand onboarding of a provider's customers.
//! - [`managed`]: domains kept one file each in `domains_dir` (written by
//!   the admin API and onboarding, applied or undone as one unit).
//! - [`admin`]: the token-protected admin API and `/metrics`; [`ui`]: the
//!   dashboard on the same listener.
//! - [`cli`]: the subcommands; [`service`]: `serve`'s wiring once the
//!   config is loaded; [`progress`]: the issuance progress line on
//!   a terminal, kept apart from the log lines.
//! - [`sync`]: the one rule for `std::sync` locks (a poisoned lock is used
//!   as it is); [`persistent`]: editing the persistent lists of domains and
//!   sites by position at a reload.

pub mod acme;
pub mod admin;
pub mod auto_push;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod dns;
pub mod documents;
pub mod http;
pub mod idle;
pub mod managed;
pub mod memory;
pub mod metrics;
pub mod mxcert;
pub mod mxhold;
pub mod onboard;
pub mod persistent;
pub mod policy;
pub mod progress;
pub mod replica;
pub mod resolve;
pub mod retire;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod store_import;
pub mod sync;
pub mod tls;
pub mod tlsrpt;
pub mod ui;
