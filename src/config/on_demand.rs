//! `[on_demand]`: onboarding a provider's customer on first contact, once
//! DNS proves the customer asked for it (docs/DNS.md, "Zero-touch
//! onboarding").

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Report, Source, duration};
use crate::policy::{DomainName, Mode, MxPattern};

/// `[on_demand]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDemand {
    /// Off unless `enabled = true`.
    pub enabled: bool,
    /// Policy mode of onboarded domains (`testing` or `enforce`).
    pub mode: Mode,
    /// Every MX of a customer must match one; the matching patterns become
    /// the policy's `mx`.
    pub allowed_mx: Vec<MxPattern>,
    /// Onboardings per rolling hour (per process).
    pub max_per_hour: u32,
    /// Never onboarded: `name` exactly, `*.name` anything below it.
    pub deny: Vec<DenyPattern>,
    /// DNS server asked for the checks (default: the system's resolver).
    pub resolver: Option<SocketAddr>,
    /// A refused name is not checked again for this long.
    pub refusal_cache: Duration,
    /// Onboarded domains are checked again this often (MX set, CNAMEs).
    pub recheck: Duration,
    /// The CNAMEs must be gone this long before a domain is retired.
    pub grace: Duration,
}

/// A `deny` entry: a name, or `*.name` for every name below it (any depth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyPattern {
    name: DomainName,
    below: bool,
}

impl DenyPattern {
    pub fn parse(input: &str) -> Result<DenyPattern, String> {
        let (below, rest) = match input.trim().strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, input.trim()),
        };
        let name = DomainName::parse(rest).map_err(|e| e.to_string())?;
        Ok(DenyPattern { name, below })
    }

    pub fn matches(&self, domain: &DomainName) -> bool {
        let d = domain.as_str();
        let n = self.name.as_str();
        if self.below {
            d.strip_suffix(n).is_some_and(|head| head.ends_with('.'))
        } else {
            d == n
        }
    }
}

impl std::fmt::Display for DenyPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.below {
            f.write_str("*.")?;
        }
        f.write_str(self.name.as_str())
    }
}

pub const MAX_PER_HOUR: u32 = 100;
pub const REFUSAL_CACHE: Duration = Duration::from_secs(300);
pub const RECHECK: Duration = Duration::from_secs(3600);
pub const GRACE: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOnDemand {
    enabled: Option<bool>,
    mode: Option<Spanned<String>>,
    allowed_mx: Option<Spanned<Vec<Spanned<String>>>>,
    max_per_hour: Option<Spanned<i64>>,
    deny: Option<Vec<Spanned<String>>>,
    resolver: Option<Spanned<String>>,
    refusal_cache: Option<Spanned<toml::Value>>,
    recheck: Option<Spanned<toml::Value>>,
    grace: Option<Spanned<toml::Value>>,
}

/// `None` when the section is absent or has errors (reported).
pub(super) fn on_demand_config(
    source: &Source,
    raw: &Spanned<RawOnDemand>,
    report: &mut Report,
) -> Option<OnDemand> {
    let before = report.errors.len();
    let r = raw.get_ref();
    let mode = match &r.mode {
        None => Mode::Testing,
        Some(v) => match Mode::parse(v.get_ref()) {
            Some(m @ (Mode::Testing | Mode::Enforce)) => m,
            _ => {
                report.errors.push(source.at(
                    v.span(),
                    format!(
                        "on_demand.mode: {:?} is not \"testing\" or \"enforce\"",
                        v.get_ref()
                    ),
                ));
                Mode::Testing
            }
        },
    };
    let mut allowed_mx = Vec::new();
    match &r.allowed_mx {
        None => report.errors.push(source.at(
            raw.span(),
            "on_demand needs allowed_mx: the MX hosts (patterns like \"*.mx.provider.example\") a customer's MX must all match",
        )),
        Some(list) if list.get_ref().is_empty() => report.errors.push(source.at(
            list.span(),
            "on_demand.allowed_mx is empty: no customer could ever be onboarded",
        )),
        Some(list) => {
            for item in list.get_ref() {
                match MxPattern::parse(item.get_ref()) {
                    Ok(p) => allowed_mx.push(p),
                    Err(e) => report.errors.push(
                        source.at(item.span(), format!("on_demand.allowed_mx: {e}")),
                    ),
                }
            }
        }
    }
    let max_per_hour = match &r.max_per_hour {
        None => MAX_PER_HOUR,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                report.errors.push(source.at(
                    v.span(),
                    "on_demand.max_per_hour must be a positive number (set enabled = false to stop onboarding)",
                ));
                MAX_PER_HOUR
            }
        },
    };
    let mut deny = Vec::new();
    for item in r.deny.iter().flatten() {
        match DenyPattern::parse(item.get_ref()) {
            Ok(p) => deny.push(p),
            Err(e) => report.errors.push(source.at(
                item.span(),
                format!("on_demand.deny: {:?}: {e}", item.get_ref()),
            )),
        }
    }
    let resolver = r.resolver.as_ref().and_then(|v| {
        let text = v.get_ref();
        let parsed = super::dns::dns_server_addr(text);
        if parsed.is_none() {
            report.errors.push(source.at(
                v.span(),
                format!("on_demand.resolver: {text:?} is not an IP address or ip:port"),
            ));
        }
        parsed
    });
    let mut time =
        |key: &str, v: &Option<Spanned<toml::Value>>, default: Duration, min: Duration| match v {
            None => default,
            Some(v) => match duration(v.get_ref()) {
                Ok(d) if d >= min => d,
                Ok(_) => {
                    report.errors.push(source.at(
                        v.span(),
                        format!(
                            "on_demand.{key} must be at least {}",
                            humantime::format_duration(min)
                        ),
                    ));
                    default
                }
                Err(e) => {
                    report
                        .errors
                        .push(source.at(v.span(), format!("on_demand.{key}: {e}")));
                    default
                }
            },
        };
    let refusal_cache = time(
        "refusal_cache",
        &r.refusal_cache,
        REFUSAL_CACHE,
        Duration::from_secs(1),
    );
    let recheck = time("recheck", &r.recheck, RECHECK, Duration::from_secs(1));
    let grace = time("grace", &r.grace, GRACE, Duration::ZERO);
    if report.errors.len() > before {
        return None;
    }
    Some(OnDemand {
        enabled: r.enabled.unwrap_or(false),
        mode,
        allowed_mx,
        max_per_hour,
        deny,
        resolver,
        refusal_cache,
        recheck,
        grace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_patterns_match_the_name_or_below_it() {
        let p = DenyPattern::parse("*.example.invalid").expect("valid");
        let below = DomainName::parse("a.b.example.invalid").expect("valid");
        let apex = DomainName::parse("example.invalid").expect("valid");
        let other = DomainName::parse("badexample.invalid").expect("valid");
        assert!(p.matches(&below));
        assert!(!p.matches(&apex));
        assert!(!p.matches(&other));
        let exact = DenyPattern::parse("example.invalid").expect("valid");
        assert!(exact.matches(&apex));
        assert!(!exact.matches(&below));
        assert_eq!(p.to_string(), "*.example.invalid");
    }
}
