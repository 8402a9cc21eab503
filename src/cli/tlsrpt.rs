//! `mtasts tlsrpt ingest` and `mtasts tlsrpt summary`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use super::{CertsFormat, TlsrptCommand};
use crate::config::Config;
use crate::snapshot::Site;
use crate::tlsrpt::report::{self, Report};
use crate::tlsrpt::store::{DomainSummary, ReportStore};

pub fn run(command: TlsrptCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match command {
        TlsrptCommand::Ingest { config, files } => {
            let cfg = super::load(&config)?;
            runtime.block_on(ingest(&cfg, &files))
        }
        TlsrptCommand::Summary {
            config,
            since,
            format,
            domains,
        } => {
            let cfg = super::load(&config)?;
            let since = parse_since(&since)?;
            runtime.block_on(summary(&cfg, since, format, &domains))
        }
    }
}

fn parse_since(text: &str) -> anyhow::Result<i64> {
    if text == "all" {
        return Ok(i64::MIN);
    }
    let d = humantime::parse_duration(text)
        .with_context(|| format!("--since {text:?}: not a duration (e.g. \"30d\") or `all`"))?;
    Ok(time::OffsetDateTime::now_utc().unix_timestamp()
        - i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Reads at most `limit` bytes of `input` (more is an error).
fn read_limited(mut input: impl Read, limit: usize, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    input
        .by_ref()
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("{name}: cannot read"))?;
    if buf.len() > limit {
        anyhow::bail!("{name}: larger than {limit} bytes (tlsrpt.max_decompressed)");
    }
    Ok(buf)
}

async fn ingest(cfg: &Config, files: &[std::path::PathBuf]) -> anyhow::Result<ExitCode> {
    let store = ReportStore::for_config(cfg).await?;
    let limit = cfg.tlsrpt.max_decompressed;
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    if files.is_empty() {
        inputs.push((
            "stdin".to_owned(),
            read_limited(std::io::stdin().lock(), limit, "stdin")?,
        ));
    } else {
        for f in files {
            let name = f.display().to_string();
            let file = std::fs::File::open(f).with_context(|| format!("{name}: cannot open"))?;
            inputs.push((name.clone(), read_limited(file, limit, &name)?));
        }
    }
    let verifier = match cfg.tlsrpt.dkim {
        crate::config::DkimPolicy::Off => None,
        _ => Some(
            crate::tlsrpt::dkim::Verifier::new(cfg.tlsrpt.dkim_resolver)
                .map_err(anyhow::Error::msg)?,
        ),
    };
    let mut failed = 0;
    for (name, input) in inputs {
        match ingest_one(cfg, &store, verifier.as_ref(), &name, &input).await {
            Ok(line) => println!("{name}: {line}"),
            Err(e) => {
                eprintln!("{name}: {e:#}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn ingest_one(
    cfg: &Config,
    store: &ReportStore,
    verifier: Option<&crate::tlsrpt::dkim::Verifier>,
    name: &str,
    input: &[u8],
) -> anyhow::Result<String> {
    let (body, mail) =
        crate::tlsrpt::ingest::extract_with_kind(input).map_err(anyhow::Error::msg)?;
    let mut dkim_note = None;
    if mail && let Some(verifier) = verifier {
        let verdict = verifier.verify(input).await;
        dkim_note =
            crate::tlsrpt::dkim::accept(cfg.tlsrpt.dkim, &verdict).map_err(anyhow::Error::msg)?;
    }
    let json = report::decode(&body, cfg.tlsrpt.max_decompressed)?;
    let parsed = Report::parse(&json)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let stored = store
        .insert(&parsed, &body, &format!("mail:{name}"), now)
        .await?;
    let domains = parsed.domains().join(", ");
    if !stored {
        return Ok(format!(
            "already stored: {} {} ({domains})",
            parsed.organization, parsed.report_id
        ));
    }
    // What this config serves for each domain, for the alert log lines.
    for d in parsed.domains() {
        let site = crate::policy::DomainName::parse(d)
            .ok()
            .and_then(|n| cfg.domain(&n).cloned())
            .map(|c| Site::new(Arc::new(c)));
        let only: Report = Report {
            policies: parsed
                .policies
                .iter()
                .filter(|p| p.policy_domain == d)
                .cloned()
                .collect(),
            ..parsed.clone()
        };
        crate::tlsrpt::receive::alert(&only, site.as_ref(), None);
    }
    Ok(format!(
        "stored {} {} ({domains}){}",
        parsed.organization,
        parsed.report_id,
        dkim_note.map(|n| format!("; {n}")).unwrap_or_default()
    ))
}

async fn summary(
    cfg: &Config,
    since: i64,
    format: CertsFormat,
    only: &[String],
) -> anyhow::Result<ExitCode> {
    let store = ReportStore::for_config(cfg).await?;
    let mut summaries = store.summary(since).await?;
    let only: Vec<String> = only.iter().map(|d| report::normalise_domain(d)).collect();
    if !only.is_empty() {
        summaries.retain(|s| only.contains(&s.domain));
    }
    for s in &mut summaries {
        s.served = crate::policy::DomainName::parse(&s.domain)
            .ok()
            .is_some_and(|n| cfg.domain(&n).is_some());
    }
    let text = match format {
        CertsFormat::Json => {
            let mut json =
                serde_json::to_string_pretty(&serde_json::json!({ "domains": summaries }))?;
            json.push('\n');
            json
        }
        CertsFormat::Table => table(&summaries),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn table(summaries: &[DomainSummary]) -> String {
    if summaries.is_empty() {
        return "no TLS reports in this period\n".to_owned();
    }
    let mut out = format!(
        "{:<40} {:<6} {:>7} {:>12} {:>10} {:>7}  top failures\n",
        "domain", "served", "reports", "successful", "failed", "failed%"
    );
    for s in summaries {
        let mut top: Vec<(&String, &u64)> = s.by_result_type.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let top: Vec<String> = top
            .iter()
            .take(3)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        out.push_str(&format!(
            "{:<40} {:<6} {:>7} {:>12} {:>10} {:>6.2}%  {}\n",
            s.domain,
            if s.served { "yes" } else { "no" },
            s.reports,
            s.successful,
            s.failed,
            s.failure_rate() * 100.0,
            if top.is_empty() {
                "-".to_owned()
            } else {
                top.join(", ")
            }
        ));
    }
    out
}
