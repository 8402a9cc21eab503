//! Command line: parses arguments and runs one function per subcommand.
//! Errors end here, printed with their whole chain; the exit code says
//! whether the command did its job.

mod push;
mod records;
mod tlsrpt;

use push::{dns_push, retire};
use records::{check_config, records};

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, Loader};
use crate::dns;
use crate::policy::DomainName;
use crate::service::{plural, print_config_errors};
use crate::snapshot::Snapshot;

#[derive(Debug, Parser)]
#[command(
    name = "mtasts",
    version,
    about = "Publish MTA-STS policies, certificates and DNS records for many mail domains"
)]
pub struct Cli {
    /// Log line format (logs go to stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve policies over HTTPS (and HTTP for ACME and proxies).
    Serve {
        /// Config file; without it the embedded example config runs on local ports.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// DNS resolver asked whether an mx name dropped from a renewed
        /// mail server certificate is still an MX host (default: first
        /// nameserver in /etc/resolv.conf).
        #[arg(long, value_name = "IP:PORT")]
        mx_resolver: Option<std::net::SocketAddr>,
    },
    /// Print the DNS records for all (or the named) domains.
    Records {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = RecordFormat::Bind)]
        format: RecordFormat,
        /// Render with your own minijinja template instead (see docs/DNS.md).
        #[arg(long, value_name = "FILE", conflicts_with = "format")]
        template: Option<PathBuf>,
        /// Delegated hosting: the records of one side only (needs [delegation]).
        #[arg(long = "for", value_enum, value_name = "SIDE")]
        side: Option<RecordSide>,
        /// Only these domains.
        domains: Vec<String>,
    },
    /// Print exactly the policy body served for DOMAIN.
    Policy {
        #[arg(long, short)]
        config: PathBuf,
        domain: String,
    },
    /// Validate the config: a summary and exit 0, or every error and exit 1.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show each domain's ACME certificate: issuer, expiry, next renewal,
    /// last error (read from state_dir; works while the server runs).
    Certs {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = CertsFormat::Table)]
        format: CertsFormat,
    },
    /// Verify domains live, like a sending MTA: TXT, policy over HTTPS,
    /// MX coverage, optionally STARTTLS. Exit 1 if any check FAILs.
    Check {
        /// Compare the live id and body with this config.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// DNS resolver (default: first nameserver in /etc/resolv.conf).
        #[arg(long, value_name = "IP:PORT")]
        resolver: Option<std::net::SocketAddr>,
        #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
        format: CheckFormat,
        /// Also connect to every MX and check STARTTLS and its certificate.
        #[arg(long)]
        starttls: bool,
        /// Is switching to mode = "enforce" safe? (implies --starttls)
        #[arg(long)]
        preflight_enforce: bool,
        /// Trust this PEM bundle instead of the platform's roots (e.g. the
        /// local CA at <state_dir>/ca/ca.pem).
        #[arg(long, value_name = "PEM")]
        ca_file: Option<PathBuf>,
        /// Port of the policy host (senders use 443).
        #[arg(long, default_value_t = 443)]
        https_port: u16,
        /// Port of the MX hosts for --starttls (senders use 25).
        #[arg(long, default_value_t = 25)]
        smtp_port: u16,
        /// Per network operation.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// For each domain's whole check (all lookups, fetches and MX
        /// probes together); what is left is reported as a FAIL.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        deadline: std::time::Duration,
        #[arg(required = true)]
        domains: Vec<String>,
    },
    /// On-demand onboarding: run the checks `serve` would run for DOMAIN
    /// (deny list, the two CNAMEs, every MX within allowed_mx) and print
    /// each with what is missing. Changes nothing; exit 0 when all pass.
    Onboard {
        #[arg(long, short)]
        config: PathBuf,
        /// Ask this DNS server (default: [on_demand] resolver, else the
        /// first nameserver in /etc/resolv.conf).
        #[arg(long, value_name = "IP:PORT")]
        resolver: Option<std::net::SocketAddr>,
        /// Print JSON (the checks and the mx the policy would get).
        #[arg(long)]
        json: bool,
        domain: String,
    },
    /// Retiring domains (retire = true): when each retirement started and
    /// when its records may be removed (RFC 8461 §8.3). Naming DOMAINs
    /// records that their mode none id is published now (when you publish
    /// DNS yourself; `dns push` records it by itself).
    Retire {
        #[arg(long, short)]
        config: PathBuf,
        /// The named domains' previous policy had a longer max_age than
        /// their configured one (e.g. "2w"): wait at least this long. At
        /// most 31557600 s (RFC 8461 §3.2's limit for max_age).
        #[arg(long, value_name = "DURATION", requires = "domains", value_parser = parse_old_max_age)]
        old_max_age: Option<Duration>,
        /// Retiring domains whose new TXT you have just published.
        domains: Vec<String>,
    },
    /// Keep records current on a DNS server.
    Dns {
        #[command(subcommand)]
        command: DnsCommand,
    },
    /// The shared store of replicas ([store] backend = "postgres").
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// TLS reports (RFC 8460) about the served domains.
    Tlsrpt {
        #[command(subcommand)]
        command: TlsrptCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TlsrptCommand {
    /// Store reports: RFC 5322 messages (multipart/report; report-type=
    /// tlsrpt) or bare JSON/gzip reports, from FILEs or stdin (a Postfix
    /// pipe transport, procmail, fetchmail). Exit 0 when each was stored or
    /// already there.
    Ingest {
        #[arg(long, short)]
        config: PathBuf,
        files: Vec<PathBuf>,
    },
    /// Sessions, failures by result type, organization, policy type and
    /// day, per policy domain.
    Summary {
        #[arg(long, short)]
        config: PathBuf,
        /// Reports that start within this long ago ("30d", "2w"), or `all`.
        #[arg(long, default_value = "30d")]
        since: String,
        #[arg(long, value_enum, default_value_t = CertsFormat::Table)]
        format: CertsFormat,
        /// Only these policy domains.
        domains: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Apply the PostgreSQL schema (serve does it too, at start; safe while
    /// replicas run and when several start at once).
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Copy a files store (ACME account, certificates, keys, state,
    /// retirement records) and the API-managed files of domains_dir into
    /// PostgreSQL. Idempotent; newer data in the database is kept.
    Import {
        #[arg(long, short)]
        config: PathBuf,
        /// The state_dir to read.
        #[arg(long, value_name = "STATE_DIR")]
        from_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DnsCommand {
    /// Send the records to the [dns.update] server once (RFC 2136 UPDATE,
    /// TSIG-signed). Only RRsets that differ are sent; see docs/DNS.md.
    Push {
        #[arg(long, short)]
        config: PathBuf,
        /// Which records (default: provider with [delegation], else full).
        #[arg(long = "for", value_enum, value_name = "SIDE")]
        side: Option<RecordSide>,
        /// Read and compare only; send no update.
        #[arg(long)]
        dry_run: bool,
        /// Also delete the records of domains removed from the config, once
        /// their retirement period is over (see `mtasts retire`).
        #[arg(long)]
        prune: bool,
        /// Only these domains.
        domains: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CertsFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RecordFormat {
    /// Zone-file lines.
    Bind,
    /// A JSON array of {domain, name, type, ttl, value}.
    Json,
    /// CSV: domain,name,type,ttl,value.
    Csv,
    /// octoDNS YAML, one document per zone.
    Octodns,
    /// Cloudflare API bodies per zone (dns_records/batch).
    Cloudflare,
    /// Route 53 ChangeBatch JSON per zone.
    Route53,
}

impl From<RecordFormat> for dns::format::Format {
    fn from(f: RecordFormat) -> Self {
        use dns::format::Format;
        match f {
            RecordFormat::Bind => Format::Bind,
            RecordFormat::Json => Format::Json,
            RecordFormat::Csv => Format::Csv,
            RecordFormat::Octodns => Format::Octodns,
            RecordFormat::Cloudflare => Format::Cloudflare,
            RecordFormat::Route53 => Format::Route53,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
}

/// The two sides of delegated hosting.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RecordSide {
    /// No delegation: every record in each domain's own zone.
    Full,
    /// The customer's zone: CNAMEs to the provider (set once) and TLS-RPT.
    Customer,
    /// The provider's zone: the TXT with the rotating id per customer.
    Provider,
}

impl From<RecordSide> for dns::Side {
    fn from(s: RecordSide) -> Self {
        match s {
            RecordSide::Full => dns::Side::Full,
            RecordSide::Customer => dns::Side::Customer,
            RecordSide::Provider => dns::Side::Provider,
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One process-wide crypto provider (aws-lc-rs); if it is already set,
    // the one set is the same.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::progress::log_writer);
    // Colours only for a person: a journal or a file would keep the escape
    // codes. On a terminal, NO_COLOR still turns them off.
    let builder = if std::io::stderr().is_terminal() {
        builder
    } else {
        builder.with_ansi(false)
    };
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            config,
            mx_resolver,
        } => serve(config.as_deref(), mx_resolver),
        Command::Records {
            config,
            format,
            template,
            side,
            domains,
        } => records(&config, format, template.as_deref(), side, &domains),
        Command::Policy { config, domain } => policy(&config, &domain),
        Command::CheckConfig { config } => Ok(check_config(&config)),
        Command::Certs { config, format } => certs(&config, format),
        Command::Check {
            config,
            resolver,
            format,
            starttls,
            preflight_enforce,
            ca_file,
            https_port,
            smtp_port,
            timeout,
            deadline,
            domains,
        } => {
            let options = crate::check::Options {
                resolver: match resolver {
                    Some(r) => r,
                    None => crate::check::system_resolver()?,
                },
                https_port,
                smtp_port,
                ca_file,
                starttls,
                preflight_enforce,
                timeout,
                deadline,
            };
            check(config.as_deref(), &options, format, &domains)
        }
        Command::Onboard {
            config,
            resolver,
            json,
            domain,
        } => onboard(&config, resolver, json, &domain),
        Command::Retire {
            config,
            old_max_age,
            domains,
        } => {
            let cfg = load(&config)?;
            crate::documents::with_shared_documents(&cfg, || {
                retire(&config, &cfg, old_max_age, &domains)
            })
        }
        Command::Dns {
            command:
                DnsCommand::Push {
                    config,
                    side,
                    dry_run,
                    prune,
                    domains,
                },
        } => {
            let cfg = load(&config)?;
            crate::documents::with_shared_documents(&cfg, || {
                dns_push(&config, &cfg, side, dry_run, prune, &domains)
            })
        }
        Command::Store { command } => store_command(command),
        Command::Tlsrpt { command } => tlsrpt::run(command),
    }
}

/// `mtasts onboard`: the on-demand checks of one domain, printed.
fn onboard(
    path: &Path,
    resolver: Option<std::net::SocketAddr>,
    json: bool,
    domain: &str,
) -> anyhow::Result<ExitCode> {
    let cfg = load(path)?;
    let (Some(delegation), Some(on_demand)) = (&cfg.delegation, &cfg.on_demand) else {
        anyhow::bail!(
            "{}: onboarding needs [delegation] and [on_demand] sections (docs/DNS.md)",
            path.display()
        );
    };
    let name = crate::policy::DomainName::parse(domain)
        .map_err(|e| anyhow::anyhow!("{domain:?} is not a domain name: {e}"))?;
    let mut on_demand = on_demand.clone();
    if resolver.is_some() {
        on_demand.resolver = resolver;
    }
    let resolver = crate::onboard::resolver(&on_demand).map_err(|e| anyhow::anyhow!(e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let verdict = runtime.block_on(crate::onboard::check(
        delegation, &on_demand, &resolver, &name,
    ));
    if json {
        println!("{}", serde_json::to_string_pretty(&verdict)?);
    } else {
        print!("{}", verdict.to_text());
        if cfg.domain(&name).is_some() {
            println!("  (already configured: serve would not onboard it again)");
        }
        if !on_demand.enabled {
            println!("  (on_demand.enabled is false: serve onboards nobody)");
        }
    }
    Ok(if verdict.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `mtasts store migrate|import`.
fn store_command(command: StoreCommand) -> anyhow::Result<ExitCode> {
    let config = match &command {
        StoreCommand::Migrate { config } | StoreCommand::Import { config, .. } => config,
    };
    let cfg = load(config)?;
    let crate::config::StoreConfig::Postgres(pg) = &cfg.store else {
        anyhow::bail!(
            "{}: [store] backend is \"files\"; set backend = \"postgres\" and url (docs/REPLICAS.md)",
            config.display()
        );
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let store = crate::store::pg::PgStore::open(pg, &cfg.server.state_dir)?;
        let applied = store.migrate().await?;
        let newest = crate::store::pg::MIGRATIONS.last().map_or(0, |m| m.0);
        match applied.as_slice() {
            [] => println!("schema is current (version {newest})"),
            versions => println!(
                "applied schema version{} {}; schema is at version {newest}",
                if versions.len() == 1 { "" } else { "s" },
                versions
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
        if let StoreCommand::Import { from_dir, .. } = &command {
            let done = crate::store_import::import(
                &store,
                from_dir,
                cfg.domains_dir.as_deref(),
                &cfg.tls.acme.directory,
            )
            .await?;
            println!(
                "imported from {}: {} account{}, {} certificate{}, {} state{}, {} domain{}, {} document{}",
                from_dir.display(),
                done.accounts,
                plural(done.accounts),
                done.certs,
                plural(done.certs),
                done.states,
                plural(done.states),
                done.domains,
                plural(done.domains),
                done.documents,
                plural(done.documents),
            );
            for (path, why) in &done.skipped {
                eprintln!("skipped {}: {why}", path.display());
            }
            if !done.skipped.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })
}

fn certs(path: &Path, format: CertsFormat) -> anyhow::Result<ExitCode> {
    let cfg = load(path)?;
    if cfg.tls.mode != crate::config::TlsMode::Acme {
        eprintln!("note: tls.mode is not \"acme\"; showing what the ACME store holds");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = match &cfg.store {
        crate::config::StoreConfig::Files => runtime.block_on(crate::acme::status::report(&cfg)),
        crate::config::StoreConfig::Postgres(pg) => {
            // The shared store, copied in one pass into a private temporary
            // directory store (never into state_dir, which the server owns)
            // and read from there: two queries per host would be 200,000 at
            // 100,000 domains.
            let tmp = tempfile::tempdir().context("temporary directory")?;
            let export = crate::store::DirStore::open(tmp.path())?;
            runtime.block_on(async {
                let store = crate::store::pg::PgStore::open(pg, tmp.path())?;
                store.export(&export).await?;
                Ok::<_, crate::store::StoreError>(
                    crate::acme::status::report_from(&cfg, Some(&export.inline())).await,
                )
            })?
        }
    };
    let text = match format {
        CertsFormat::Table => crate::acme::status::table(&report),
        CertsFormat::Json => {
            let mut json = serde_json::to_string_pretty(&report)?;
            json.push('\n');
            json
        }
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Loads a config, printing warnings; errors become one anyhow error that
/// lists them all.
pub(crate) fn load(path: &Path) -> anyhow::Result<Config> {
    match Config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                eprintln!("{w}");
            }
            Ok(cfg)
        }
        Err(e) => Err(print_config_errors(e)),
    }
}

fn domain_args(names: &[String]) -> anyhow::Result<Vec<DomainName>> {
    names
        .iter()
        .map(|n| DomainName::parse(n).with_context(|| format!("domain argument {n:?}")))
        .collect()
}

fn check(
    path: Option<&Path>,
    options: &crate::check::Options,
    format: CheckFormat,
    names: &[String],
) -> anyhow::Result<ExitCode> {
    let cfg = path.map(load).transpose()?;
    let snapshot = cfg.as_ref().map(Snapshot::build);
    let domains = domain_args(names)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let recent = match &cfg {
        Some(cfg) => runtime.block_on(crate::tlsrpt::recent(cfg)),
        None => None,
    };
    let reports = runtime.block_on(crate::check::check(
        &domains,
        options,
        snapshot.as_ref(),
        recent.as_ref(),
    ))?;
    let text = match format {
        CheckFormat::Text => crate::check::to_text(&reports),
        CheckFormat::Json => {
            let mut s = serde_json::to_string_pretty(&reports)?;
            s.push('\n');
            s
        }
    };
    std::io::stdout().write_all(text.as_bytes())?;
    let failed = reports
        .iter()
        .any(|r| r.verdict == crate::check::Level::Fail);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn policy(path: &Path, name: &str) -> anyhow::Result<ExitCode> {
    let cfg = load(path)?;
    let domain = DomainName::parse(name).with_context(|| format!("domain argument {name:?}"))?;
    let Some(d) = cfg.domain(&domain) else {
        anyhow::bail!("{domain} is not configured in {}", path.display());
    };
    std::io::stdout().write_all(&d.policy.render())?;
    Ok(ExitCode::SUCCESS)
}

fn serve(
    path: Option<&Path>,
    mx_resolver: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let (cfg, loader) = match path {
        Some(p) => {
            // The loader keeps what it validated: reloads re-read only what changed.
            let mut loader = Loader::new(p);
            match loader.load() {
                Ok(cfg) => {
                    for w in &cfg.warnings {
                        eprintln!("{w}");
                    }
                    (cfg, Some(loader))
                }
                Err(e) => return Err(print_config_errors(e)),
            }
        }
        None => {
            eprintln!(
                "no --config given: running the embedded example config (config.example.toml)"
            );
            (Config::example().map_err(print_config_errors)?, None)
        }
    };
    crate::service::run(cfg, loader, path, mx_resolver)?;
    Ok(ExitCode::SUCCESS)
}

/// `--old-max-age`: a duration no longer than a policy's max_age may be
/// (RFC 8461 §3.2), so that nothing out of range reaches `retire.json`.
fn parse_old_max_age(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.as_secs() > crate::policy::MAX_AGE_LIMIT {
        return Err(format!(
            "{} s is longer than a policy's max_age may be (at most {} s, RFC 8461 §3.2)",
            d.as_secs(),
            crate::policy::MAX_AGE_LIMIT
        ));
    }
    Ok(d)
}
