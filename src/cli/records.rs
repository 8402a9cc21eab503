//! `check-config` and `records`: read the config file by file
//! (`config::scan`) and print, keeping per domain only what they print.

use super::*;

pub(super) fn check_config(path: &Path) -> ExitCode {
    // Only the names are kept while the files are read (config::scan).
    let scan = crate::config::scan(
        path,
        || |d: &crate::config::DomainConfig| d.name.clone(),
        |name: &DomainName| name.as_str(),
    );
    match scan {
        Ok(scan) => {
            let cfg = &scan.config;
            for w in &cfg.warnings {
                eprintln!("{}", with_severity(w, "warning"));
            }
            println!(
                "{}: ok, {} domain{}, {} warning{}",
                path.display(),
                scan.domains.len(),
                plural(scan.domains.len()),
                cfg.warnings.len(),
                plural(cfg.warnings.len())
            );
            exit_without_freeing(scan);
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

/// For one-shot commands about to exit: leaves `value` to the operating
/// system instead of freeing it piece by piece. A million domains' config
/// is millions of small allocations; freeing them took an eighth of
/// `check-config`. Nothing in it needs a destructor to run (no files or
/// connections are held open by a loaded config).
pub(super) fn exit_without_freeing<T>(value: T) {
    std::mem::forget(value);
}

pub(super) fn with_severity(d: &crate::config::Diagnostic, severity: &str) -> String {
    format!(
        "{}:{}:{}: {severity}: {}",
        d.file.display(),
        d.line,
        d.col,
        d.message
    )
}

pub(super) fn records(
    path: &Path,
    format: RecordFormat,
    template: Option<&Path>,
    side: Option<RecordSide>,
    names: &[String],
) -> anyhow::Result<ExitCode> {
    // Of each domain only what its records need stays in memory while the
    // files are read (config::scan): a million domains in under 200 MB.
    let scan = crate::config::scan(
        path,
        || {
            let mut publisher = dns::Publisher::default();
            move |d: &crate::config::DomainConfig| publisher.publish(d)
        },
        |p: &dns::Published| dns::Publish::name(p).as_str(),
    )
    .map_err(print_config_errors)?;
    for w in &scan.config.warnings {
        eprintln!("{w}");
    }
    let cfg = &scan.config;
    let configured = &scan.domains;
    // Read the template before any output, so a bad path prints nothing else.
    let template = template
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|text| (p, text))
                .with_context(|| format!("cannot read template {}", p.display()))
        })
        .transpose()?;
    let side = side.map_or(dns::Side::Full, dns::Side::from);
    let only = domain_args(names)?;
    for d in &only {
        if configured
            .binary_search_by(|p| dns::Publish::name(p).cmp(d))
            .is_err()
        {
            anyhow::bail!("{d} is not configured in {}", path.display());
        }
    }
    let wanted: std::collections::HashSet<&DomainName> = only.iter().collect();
    let sites = || {
        configured
            .iter()
            .filter(|p| wanted.is_empty() || wanted.contains(dns::Publish::name(*p)))
    };
    let mut hostless = sites()
        .filter(|_| side == dns::Side::Full)
        .filter(|p| *dns::Publish::host_record(*p) == crate::config::HostRecord::Unset);
    if let Some(first) = hostless.next() {
        let more = match hostless.count() {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        eprintln!(
            "note: no host record for {}{more} (set host_a/host_aaaa or host_cname); point it at this server",
            dns::Publish::name(first).policy_host()
        );
    }
    let recs = dns::records_of(sites(), side, cfg.delegation.as_ref())?;
    match &template {
        Some((p, source)) => {
            // A user template sees every record at once (its context).
            let recs: Vec<dns::Record> = recs.collect();
            let text = dns::format::render_source(&p.display().to_string(), source, &recs)?;
            std::io::stdout().write_all(text.as_bytes())?;
        }
        None => {
            // Built-in formats stream, one zone at a time.
            let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            dns::write::write_records(format.into(), recs, &mut out)?;
            out.flush()?;
        }
    }
    exit_without_freeing(scan);
    Ok(ExitCode::SUCCESS)
}
