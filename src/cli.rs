//! Command line: parses arguments and runs one function per subcommand.
//! Errors end here, printed with their whole chain; the exit code says
//! whether the command did its job.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::admin;
use crate::config::{Config, ConfigErrors};
use crate::control::{self, Control};
use crate::dns;
use crate::policy::DomainName;
use crate::server::Server;
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
    },
    /// Print the DNS records for all (or the named) domains.
    Records {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = RecordFormat::Bind)]
        format: RecordFormat,
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
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::Records {
            config,
            format,
            domains,
        } => records(&config, format, &domains),
        Command::Policy { config, domain } => policy(&config, &domain),
        Command::CheckConfig { config } => Ok(check_config(&config)),
        Command::Certs { config, format } => certs(&config, format),
    }
}

fn certs(path: &Path, format: CertsFormat) -> anyhow::Result<ExitCode> {
    let cfg = load(path)?;
    if cfg.tls.mode != crate::config::TlsMode::Acme {
        eprintln!("note: tls.mode is not \"acme\"; showing what the ACME store holds");
    }
    let report = crate::acme::status::report(&cfg);
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
fn load(path: &Path) -> anyhow::Result<Config> {
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

fn print_config_errors(e: ConfigErrors) -> anyhow::Error {
    for w in &e.warnings {
        eprintln!("{w}");
    }
    anyhow::Error::new(e)
}

fn domain_args(names: &[String]) -> anyhow::Result<Vec<DomainName>> {
    names
        .iter()
        .map(|n| DomainName::parse(n).with_context(|| format!("domain argument {n:?}")))
        .collect()
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                eprintln!("{}", with_severity(w, "warning"));
            }
            println!(
                "{}: ok, {} domain{}, {} warning{}",
                path.display(),
                cfg.domains.len(),
                plural(cfg.domains.len()),
                cfg.warnings.len(),
                plural(cfg.warnings.len())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for w in &e.warnings {
                eprintln!("{}", with_severity(w, "warning"));
            }
            for err in &e.errors {
                eprintln!("{err}");
            }
            eprintln!(
                "{}: {} error{}",
                path.display(),
                e.errors.len(),
                plural(e.errors.len())
            );
            ExitCode::FAILURE
        }
    }
}

fn with_severity(d: &crate::config::Diagnostic, severity: &str) -> String {
    format!(
        "{}:{}:{}: {severity}: {}",
        d.file.display(),
        d.line,
        d.col,
        d.message
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn records(path: &Path, format: RecordFormat, names: &[String]) -> anyhow::Result<ExitCode> {
    let cfg = load(path)?;
    let only = domain_args(names)?;
    for d in &only {
        if cfg.domain(d).is_none() {
            anyhow::bail!("{d} is not configured in {}", path.display());
        }
    }
    let snapshot = Snapshot::build(&cfg);
    for site in snapshot.sites() {
        if (only.is_empty() || only.contains(&site.domain.name))
            && site.domain.host == crate::config::HostRecord::Unset
        {
            eprintln!(
                "note: no host record for {} (set host_a/host_aaaa or host_cname); point it at this server",
                site.host
            );
        }
    }
    let recs = dns::records(&snapshot, &only);
    let text = match format {
        RecordFormat::Bind => dns::to_bind(&recs),
        RecordFormat::Json => dns::to_json(&recs),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
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

fn serve(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = match path {
        Some(p) => load(p)?,
        None => {
            eprintln!(
                "no --config given: running the embedded example config (config.example.toml)"
            );
            Config::example().map_err(print_config_errors)?
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve_async(cfg, path.map(Path::to_owned)))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve_async(cfg: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let setup = cfg.clone();
    let server = tokio::task::spawn_blocking(move || Server::new(&setup))
        .await
        .context("certificate setup panicked")??;
    let server = Arc::new(server);
    // Bound only now, so that a client that can connect finds every
    // certificate in place.
    let https = tokio::net::TcpListener::bind(cfg.server.https)
        .await
        .with_context(|| format!("cannot listen on https address {}", cfg.server.https))?;
    let http = tokio::net::TcpListener::bind(cfg.server.http)
        .await
        .with_context(|| format!("cannot listen on http address {}", cfg.server.http))?;
    let https_addr = https.local_addr()?;
    let http_addr = http.local_addr()?;
    let snapshot = server.snapshot();
    tracing::info!(
        domains = snapshot.len(),
        https = %https_addr,
        http = %http_addr,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "serving"
    );
    print_banner(&cfg, &server, &snapshot, https_addr, http_addr);

    let control = Arc::new(Control::new(Arc::clone(&server), path.clone(), cfg.clone()));
    let reloader = tokio::spawn(control::reload_on_sighup(Arc::clone(&control)));
    // Keep the watcher alive while serving.
    let _watcher = match &path {
        Some(_) => match control::watch(Arc::clone(&control), Duration::from_millis(300)) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("cannot watch the config files ({e}); reload with SIGHUP");
                None
            }
        },
        None => None,
    };
    let admin = match &cfg.admin {
        Some(a) => {
            let token = admin::read_token(&a.token_file)?;
            let listener = tokio::net::TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("cannot listen on admin address {}", a.listen))?;
            tracing::info!(admin = %listener.local_addr()?, "admin API listening");
            Some((listener, admin::router(Arc::clone(&control), token)))
        }
        None => None,
    };
    let result = Arc::clone(&server)
        .run(https, http, admin, shutdown_signal())
        .await;
    reloader.abort();
    result.context("server failed")?;
    tracing::info!("stopped");
    Ok(())
}

fn print_banner(
    cfg: &Config,
    server: &Server,
    snapshot: &Snapshot,
    https: std::net::SocketAddr,
    http: std::net::SocketAddr,
) {
    let connect_ip = if https.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        https.ip().to_string()
    };
    let connect_ip = if https.is_ipv6() && !https.ip().is_unspecified() {
        format!("[{connect_ip}]")
    } else {
        connect_ip
    };
    let mut out = format!(
        "mtasts: serving {} domain{} on https://{https} (http: {http})\n",
        snapshot.len(),
        plural(snapshot.len()),
    );
    if cfg.tls.mode == crate::config::TlsMode::Acme {
        out.push_str(&format!(
            "certificates via ACME from {}; they are served as they arrive (see `mtasts certs --config ...`)\n",
            cfg.tls.acme.directory
        ));
    } else {
        out.push_str(&format!(
            "local CA certificate (trust it to verify): {}\n",
            server.ca_path().display()
        ));
    }
    if let (Some(site), crate::config::TlsMode::SelfSigned) =
        (snapshot.sites().first(), cfg.tls.mode)
    {
        out.push_str(&format!(
            "fetch a policy:\n  curl --cacert {} --resolve {host}:{port}:{connect_ip} https://{host}:{port}{path}\n",
            server.ca_path().display(),
            host = site.host,
            port = https.port(),
            path = crate::http::POLICY_PATH,
        ));
    }
    if cfg.server.behind_proxy {
        out.push_str("behind_proxy = true: the http listener serves policies too\n");
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
