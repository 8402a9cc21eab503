//! `dns push` (with `--prune`) and `retire`: what the CLI sends to the
//! `[dns.update]` server and records in the retirement state.

use super::*;

pub(super) fn dns_push(
    path: &Path,
    cfg: &Config,
    side: Option<RecordSide>,
    dry_run: bool,
    prune: bool,
    names: &[String],
) -> anyhow::Result<ExitCode> {
    use dns::update::{Outcome, Pusher};

    let Some(update) = &cfg.dns_update else {
        anyhow::bail!(
            "{} has no [dns.update] section (server, zone, key_name, secret); see docs/DNS.md",
            path.display()
        );
    };
    let only = domain_args(names)?;
    let side = side.map_or_else(|| dns::update::default_side(cfg), dns::Side::from);
    let snapshot = Snapshot::build(cfg);
    let recs = dns::records(&snapshot, &only, side, cfg.delegation.as_ref())?;
    let mut pusher = Pusher::new(update, dry_run)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(pusher.push(&recs));

    if let Some(first) = report.outside_zone.first() {
        eprintln!(
            "note: {} record{} outside zone {} not pushed (e.g. {first})",
            report.outside_zone.len(),
            plural(report.outside_zone.len()),
            update.zone
        );
    }
    let mut unchanged = 0;
    let mut changed = 0;
    for (domain, outcome) in &report.domains {
        match outcome {
            Outcome::Unchanged => unchanged += 1,
            Outcome::Updated(sets) => {
                changed += 1;
                println!("updated {domain}: {}", sets.join(", "));
            }
            Outcome::WouldUpdate(sets) => {
                changed += 1;
                println!("would update {domain}: {}", sets.join(", "));
            }
            Outcome::Failed(e) => eprintln!("error: {domain}: {e}"),
            Outcome::Deleted(_) | Outcome::WouldDelete(_) => {}
        }
    }
    if let Some(e) = &report.aborted {
        eprintln!("error: push stopped: {e}");
    }
    let mut failed = report.failed();
    // The mode none id of a retiring domain is in DNS now: its retirement
    // clock starts (RFC 8461 §8.3). Only the sides that carry the id count.
    if !dry_run && side != dns::Side::Customer {
        let observation = crate::retire::Observation::new(cfg);
        if let Err(e) = observation.record(&recs, &report.published(), &update.zone, update.ttl) {
            eprintln!("error: cannot record retirements: {e}");
            failed += 1;
        }
    }
    if !prune {
        note_prunable(cfg);
    }
    let pruned = if prune && report.aborted.is_none() {
        let (pruned, prune_failed) =
            runtime.block_on(dns_prune(cfg, &mut pusher, &only, dry_run))?;
        failed += prune_failed;
        Some(pruned)
    } else {
        None
    };
    println!(
        "dns push to {} (zone {}): {changed} {}, {unchanged} unchanged, {failed} failed{}",
        update.server,
        update.zone,
        if dry_run { "to update" } else { "updated" },
        match pruned {
            Some(n) if dry_run => format!(", {n} to prune"),
            Some(n) => format!(", {n} pruned"),
            None => String::new(),
        }
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Without `--prune`: mentions retired domains that left the config and
/// whose records are still recorded as published.
pub(super) fn note_prunable(cfg: &Config) {
    let Ok(state) = crate::retire::State::load(&cfg.server.state_dir) else {
        return;
    };
    let removed: Vec<&str> = state
        .domains
        .keys()
        .filter(|d| DomainName::parse(d).is_ok_and(|d| cfg.domain(&d).is_none()))
        .map(String::as_str)
        .collect();
    if let Some(first) = removed.first() {
        let more = match removed.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        eprintln!(
            "note: retired {first}{more} left the config; `mtasts dns push --prune` deletes the records once their period is over (`mtasts retire` shows when)"
        );
    }
}

/// `dns push --prune`: prints what `retire::prune` did. Returns (pruned,
/// failed).
pub(super) async fn dns_prune(
    cfg: &Config,
    pusher: &mut dns::update::Pusher,
    only: &[DomainName],
    dry_run: bool,
) -> anyhow::Result<(usize, usize)> {
    use crate::retire::commands::{Pruned, prune};

    let (mut pruned, mut failed) = (0, 0);
    for (domain, result) in prune(cfg, pusher, only, dry_run).await? {
        match &result {
            Pruned::Deleted(sets) => println!("deleted {domain}: {}", sets.join(", ")),
            Pruned::WouldDelete(sets) => println!("would delete {domain}: {}", sets.join(", ")),
            Pruned::NoneLeft => println!("pruned {domain}: none of its records were left"),
            Pruned::Done => {}
            Pruned::Refused(why) => eprintln!("error: not pruning: {why}"),
            Pruned::Failed(e) => eprintln!("error: {domain}: {e}"),
        }
        if result.pruned() {
            pruned += 1;
        } else {
            failed += 1;
        }
    }
    Ok((pruned, failed))
}

/// `mtasts retire`: records the named retiring domains as published now
/// (unless already recorded) and prints where every retirement stands.
pub(super) fn retire(
    path: &Path,
    cfg: &Config,
    old_max_age: Option<Duration>,
    names: &[String],
) -> anyhow::Result<ExitCode> {
    let only = domain_args(names)?;
    let lines = crate::retire::commands::record_published(path, cfg, &only, old_max_age)?;
    if lines.is_empty() {
        println!("no domain is retiring (set retire = true in its [[domain]] entry)");
    }
    for line in lines {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}
