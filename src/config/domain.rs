//! One domain's settings: a `[[domain]]` entry over `[defaults]`, checked
//! and resolved into a [`DomainConfig`] (mode, max_age, mx or mx_certs,
//! tlsrpt_rua, ttl, host records, retire), every error at its
//! `file:line:col`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use toml::Spanned;

use super::loader::CertReader;
use super::{
    DomainConfig, HostAddresses, HostRecord, MxSource, Origin, RawPolicy, Report, Source, duration,
};
use crate::policy::{DomainName, MAX_AGE_LIMIT, MAX_AGE_RECOMMENDED_MIN, Mode, MxPattern, Policy};

/// One layer of policy settings (defaults or a domain) with its source.
pub(super) struct Layer<'a> {
    pub(super) source: &'a Source,
    pub(super) raw: &'a RawPolicy,
    /// `[defaults]` only: its `mx` list parsed, sorted and deduplicated
    /// once, when every item is valid. At a million domains that inherit it,
    /// parsing the same patterns again for each was an eighth of the load.
    pub(super) mx: Option<Arc<[MxPattern]>>,
    /// `[defaults]` only: its `tlsrpt_rua` list, when valid, shared by the
    /// domains that inherit it.
    pub(super) rua: Option<Arc<[String]>>,
    /// `[defaults]` only: `[tlsrpt] receive` is on, so every domain's
    /// `_smtp._tls` record names its own policy host's `/tlsrpt` too.
    pub(super) tlsrpt_receive: bool,
}

impl<'a> Layer<'a> {
    pub(super) fn new(source: &'a Source, raw: &'a RawPolicy) -> Self {
        Self {
            source,
            raw,
            mx: None,
            rua: None,
            tlsrpt_receive: false,
        }
    }

    /// The `[defaults]` layer, with what every inheriting domain would
    /// compute the same way done once.
    pub(super) fn defaults(source: &'a Source, raw: &'a RawPolicy) -> Self {
        let mx = raw.mx.as_ref().and_then(|list| {
            let mut mx = list
                .get_ref()
                .iter()
                .map(|item| MxPattern::parse(item.get_ref()).ok())
                .collect::<Option<Vec<_>>>()?;
            mx.sort();
            mx.dedup();
            Some(Arc::from(mx))
        });
        // Errors are reported by validate_defaults (and by each domain
        // that would inherit an invalid list, which then does not share it).
        let rua = raw.tlsrpt_rua.as_ref().and_then(|v| {
            let mut scratch = Report::default();
            let list = rua_list(source, v, &mut scratch);
            scratch.errors.is_empty().then(|| Arc::from(list))
        });
        Self {
            source,
            raw,
            mx,
            rua,
            tlsrpt_receive: false,
        }
    }
}

/// Picks a field from the domain layer, else from defaults, with the source
/// the value came from (for spans and relative paths).
pub(super) fn pick<'a, T>(
    domain: &'a Layer<'a>,
    defaults: &'a Layer<'a>,
    f: impl Fn(&RawPolicy) -> Option<&T>,
) -> Option<(&'a Source, &'a T)> {
    f(domain.raw)
        .map(|v| (domain.source, v))
        .or_else(|| f(defaults.raw).map(|v| (defaults.source, v)))
}

/// The `name` of a `[[domain]]` entry and where it stands.
pub(super) fn domain_name(
    source: &Source,
    entry: &Spanned<RawPolicy>,
    report: &mut Report,
) -> Option<(DomainName, Origin)> {
    let Some(name_raw) = &entry.get_ref().name else {
        report.errors.push(source.at(
            entry.span(),
            "[[domain]] entry has no `name` (e.g. name = \"example.com\")",
        ));
        return None;
    };
    match DomainName::parse(name_raw.get_ref()) {
        Ok(n) => Some((n, Origin::from(&source.at(name_raw.span(), String::new())))),
        Err(e) => {
            report
                .errors
                .push(source.at(name_raw.span(), format!("domain name: {e}")));
            None
        }
    }
}

/// `[defaults]` checked on its own, whether or not a domain uses it: a
/// provider that starts with no domains and adds them through the admin API
/// learns of a bad default from `check-config`, not from its first domain.
/// Only errors count here (a domain that inherits a value reports its own
/// warnings); the rule that a policy needs an mx belongs to domains.
pub(super) fn validate_defaults(defaults: &Layer<'_>, certs: &mut CertReader, report: &mut Report) {
    let empty = RawPolicy::default();
    let none = Layer::new(defaults.source, &empty);
    let Ok(name) = DomainName::parse("defaults.invalid") else {
        return;
    };
    // Errors about the entry as a whole are placed at its origin; there is
    // no entry here, so the origin is line 0 and such errors are dropped.
    let origin = Origin {
        file: defaults.source.path.clone(),
        line: 0,
        col: 0,
    };
    let mut own = Report::default();
    let _ = domain_config(
        defaults.source,
        defaults.raw,
        name,
        origin,
        &none,
        certs,
        &mut own,
    );
    report
        .errors
        .extend(own.errors.into_iter().filter(|e| e.line != 0));
}

/// A domain's mx list while it is validated: `[defaults]`' shared one, or
/// its own (sorted and deduplicated at the end).
enum MxList {
    Shared(Arc<[MxPattern]>),
    Own(Vec<MxPattern>),
}

/// One domain's settings over `defaults`. On an error the name and origin
/// come back (the errors are in `report`).
pub(super) fn domain_config(
    source: &Source,
    raw: &RawPolicy,
    name: DomainName,
    origin: Origin,
    defaults: &Layer<'_>,
    certs: &mut CertReader,
    report: &mut Report,
) -> Result<DomainConfig, (DomainName, Origin)> {
    let domain = Layer::new(source, raw);
    let errors_before = report.errors.len();
    // RFC 8461 §8.3: a retiring domain serves `mode: none` (new id). It
    // keeps its mx lines (Stalwart refuses a policy without one and reports
    // sts-policy-invalid); a source that cannot be read any more (the mail
    // server may be gone) is only a warning then.
    let retire = raw.retire.as_ref().is_some_and(|r| *r.get_ref());

    let mode = match pick(&domain, defaults, |r| r.mode.as_ref()) {
        Some((src, m)) => match Mode::parse(m.get_ref()) {
            Some(mode) => mode,
            None => {
                report.errors.push(src.at(
                    m.span(),
                    format!(
                        "mode {:?} is not one of \"enforce\", \"testing\", \"none\"",
                        m.get_ref()
                    ),
                ));
                Mode::Testing
            }
        },
        None => Mode::Testing,
    };

    let max_age = max_age_of(&domain, defaults, &name, report);

    let mode = if retire { Mode::None } else { mode };

    // Explicit mx wins over mx_certs at the same level; a domain's own
    // setting wins over [defaults].
    if let (Some(_), Some(certs_list)) = (&raw.mx, &raw.mx_certs) {
        report.warnings.push(source.at(
            certs_list.span(),
            format!(
                "{name}: both mx and mx_certs are set; mx wins and mx_certs is ignored (remove one)"
            ),
        ));
    }
    let errors_before_mx = report.errors.len();
    let (mx, mx_source) =
        if raw.mx.is_some() || (raw.mx_certs.is_none() && defaults.raw.mx.is_some()) {
            let Some((src, list)) = pick(&domain, defaults, |r| r.mx.as_ref()) else {
                return Err((name, origin));
            };
            let inherited = raw.mx.is_none().then_some(defaults.mx.as_ref()).flatten();
            if let Some(parsed) = inherited {
                // Already sorted and deduplicated: every inheriting domain
                // shares the one list.
                (MxList::Shared(Arc::clone(parsed)), MxSource::Explicit)
            } else {
                let mut mx = Vec::new();
                for item in list.get_ref() {
                    match MxPattern::parse(item.get_ref()) {
                        Ok(p) => mx.push(p),
                        Err(e) => report.errors.push(src.at(item.span(), format!("mx: {e}"))),
                    }
                }
                (MxList::Own(mx), MxSource::Explicit)
            }
        } else if let Some((src, list)) = pick(&domain, defaults, |r| r.mx_certs.as_ref()) {
            let (mx, paths) = mx_from_certs(src, list, &name, certs, report);
            (MxList::Own(mx), MxSource::Certs(paths))
        } else {
            (MxList::Own(Vec::new()), MxSource::Explicit)
        };
    if retire && report.errors.len() > errors_before_mx {
        for mut e in report.errors.split_off(errors_before_mx) {
            e.message = format!(
                "{name} is retiring, so this is not an error, but its policy loses these mx lines: {}",
                e.message
            );
            report.warnings.push(e);
        }
    }
    let mx: Arc<[MxPattern]> = match mx {
        MxList::Shared(list) => list,
        MxList::Own(mut list) => {
            list.sort();
            list.dedup();
            list.into()
        }
    };
    if mx.is_empty() && mode != Mode::None && report.errors.len() == errors_before {
        report.errors.push(origin.diagnostic(format!(
            "{name}: mode {mode} needs at least one mx (set `mx` or `mx_certs` here or in [defaults])"
        )));
    }

    let tlsrpt_rua = rua_of(&domain, defaults, &name, report);

    let ttl = match pick(&domain, defaults, |r| r.ttl.as_ref()) {
        Some((src, v)) => match u32::try_from(*v.get_ref()) {
            Ok(t) if t <= 2_147_483_647 => t,
            _ => {
                report
                    .errors
                    .push(src.at(v.span(), "ttl must be between 0 and 2147483647 seconds"));
                3600
            }
        },
        None => 3600,
    };

    let host = host_record(&domain, defaults, report);

    let policy = Policy { mode, mx, max_age };
    let body_len = policy.rendered_len();
    if body_len > crate::policy::MAX_BODY_BYTES {
        report.errors.push(origin.diagnostic(format!(
            "{name}: the policy body would be {body_len} bytes ({} mx); senders read at most {} bytes (RFC 8461 §3.3), so use wildcard mx patterns or fewer hosts",
            policy.mx.len(),
            crate::policy::MAX_BODY_BYTES
        )));
    }
    if report.errors.len() > errors_before {
        return Err((name, origin));
    }
    Ok(DomainConfig {
        name,
        policy,
        mx_source,
        tlsrpt_rua,
        ttl,
        host,
        origin,
        retire,
    })
}

/// `max_age` in seconds (a week when unset); a warning below one day.
fn max_age_of(
    domain: &Layer<'_>,
    defaults: &Layer<'_>,
    name: &DomainName,
    report: &mut Report,
) -> u64 {
    match pick(domain, defaults, |r| r.max_age.as_ref()) {
        Some((src, v)) => match duration(v.get_ref()) {
            Ok(d) if d.as_secs() <= MAX_AGE_LIMIT && d.subsec_nanos() == 0 => {
                if d.as_secs() < MAX_AGE_RECOMMENDED_MIN {
                    report.warnings.push(src.at(
                        v.span(),
                        format!(
                            "{name}: max_age {} s is below one day (86400 s); senders will refetch the policy very often",
                            d.as_secs()
                        ),
                    ));
                }
                d.as_secs()
            }
            Ok(d) => {
                report.errors.push(src.at(
                    v.span(),
                    format!(
                        "max_age {} s is outside 0..={MAX_AGE_LIMIT} whole seconds (RFC 8461 §3.2)",
                        d.as_secs_f64()
                    ),
                ));
                0
            }
            Err(msg) => {
                report
                    .errors
                    .push(src.at(v.span(), format!("max_age: {msg}")));
                0
            }
        },
        None => 604_800,
    }
}

/// The mx patterns of the mail server certificates an `mx_certs` list
/// names (files or globs), and the paths as resolved.
fn mx_from_certs(
    src: &Source,
    list: &Spanned<Vec<Spanned<String>>>,
    name: &DomainName,
    certs: &mut CertReader,
    report: &mut Report,
) -> (Vec<MxPattern>, Vec<std::path::PathBuf>) {
    let mut mx = Vec::new();
    let mut paths = Vec::new();
    for item in list.get_ref() {
        let path = src.resolve(item.get_ref());
        // A glob (crate::mxcert::expand) may match nothing, and a file
        // it matches that gives no names is skipped with a warning; a
        // file named as such must give names.
        let glob = crate::mxcert::is_glob(&path);
        let files = certs.expand(&path).unwrap_or_else(|msg| {
            report.errors.push(src.at(item.span(), msg));
            Vec::new()
        });
        if glob && files.is_empty() {
            report.warnings.push(src.at(
                item.span(),
                format!("{name}: mx_certs glob {} matches no file", path.display()),
            ));
        }
        for file in files {
            match certs.read(&file) {
                Ok(names) => {
                    mx.extend(names.patterns.iter().cloned());
                    for (skipped, why) in &names.skipped {
                        report.warnings.push(src.at(
                            item.span(),
                            format!(
                                "{name}: skipping {skipped:?} from {}: {why}",
                                file.display()
                            ),
                        ));
                    }
                }
                Err(msg) if glob => report
                    .warnings
                    .push(src.at(item.span(), format!("{name}: skipping {msg}"))),
                Err(msg) => report.errors.push(src.at(item.span(), msg.clone())),
            }
        }
        paths.push(path);
    }
    (mx, paths)
}

/// `tlsrpt_rua`: the domain's own list, or the one `[defaults]` list shared,
/// plus the policy host's own endpoint with `[tlsrpt] receive`.
fn rua_of(
    domain: &Layer<'_>,
    defaults: &Layer<'_>,
    name: &DomainName,
    report: &mut Report,
) -> Arc<[String]> {
    let inherited_rua = domain
        .raw
        .tlsrpt_rua
        .is_none()
        .then_some(defaults.rua.as_ref())
        .flatten();
    match inherited_rua {
        Some(shared) if !defaults.tlsrpt_receive => Arc::clone(shared),
        _ => {
            let mut own_list = match pick(domain, defaults, |r| r.tlsrpt_rua.as_ref()) {
                Some((src, v)) => rua_list(src, v, report),
                None => Vec::new(),
            };
            if defaults.tlsrpt_receive {
                let own = name.tlsrpt_rua();
                if !own_list.contains(&own) {
                    own_list.push(own);
                }
            }
            if own_list.is_empty() {
                // Most domains have none: one shared empty list, not an
                // allocation each (16 MB at a million domains).
                Arc::clone(&NO_RUA)
            } else {
                own_list.into()
            }
        }
    }
}

/// The `tlsrpt_rua` of every domain without one.
static NO_RUA: std::sync::LazyLock<Arc<[String]>> =
    std::sync::LazyLock::new(|| Arc::from(Vec::new()));

/// RFC 8460 §3: `rua` is one or more `mailto:` or `https:` URIs, joined by
/// commas in the TXT record, so a literal `,` or `!` inside one must be
/// percent-encoded; the record is ASCII.
pub(super) fn rua_list(src: &Source, v: &Spanned<toml::Value>, report: &mut Report) -> Vec<String> {
    let items: Vec<&str> = match v.get_ref() {
        toml::Value::String(s) => vec![s.as_str()],
        toml::Value::Array(a) => {
            let mut items = Vec::with_capacity(a.len());
            for (i, item) in a.iter().enumerate() {
                match item.as_str() {
                    Some(s) => items.push(s),
                    None => report.errors.push(src.at(
                        v.span(),
                        format!(
                            "tlsrpt_rua item {} is a {}, not a string URI",
                            i + 1,
                            item.type_str()
                        ),
                    )),
                }
            }
            items
        }
        _ => {
            report
                .errors
                .push(src.at(v.span(), "tlsrpt_rua must be a string or a list of strings"));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for item in items {
        let item = item.trim();
        match rua_uri(item) {
            Ok(()) => out.push(item.to_owned()),
            Err(why) => report
                .errors
                .push(src.at(v.span(), format!("tlsrpt_rua {item:?}: {why}"))),
        }
    }
    if out.is_empty() && matches!(v.get_ref(), toml::Value::Array(a) if a.is_empty()) {
        report
            .errors
            .push(src.at(v.span(), "tlsrpt_rua is empty; remove it or add a URI"));
    }
    out
}

/// Why one `rua` URI would not be usable by a reporter, if it would not.
fn rua_uri(item: &str) -> Result<(), String> {
    if let Some(c) = item.chars().find(|c| !c.is_ascii()) {
        return Err(format!(
            "contains the non-ASCII character {c:?}; percent-encode it (or use the A-label of a domain)"
        ));
    }
    if let Some(c) = item.chars().find(|c| {
        c.is_ascii_whitespace() || c.is_ascii_control() || matches!(c, ';' | ',' | '!' | '"' | '\\')
    }) {
        return Err(format!(
            "contains {c:?}; percent-encode it (RFC 8460 §3: `,` and `!` separate URIs in the record)"
        ));
    }
    let bytes = item.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
        {
            return Err("has a `%` that is not followed by two hex digits".to_owned());
        }
    }
    if let Some(rest) = item.strip_prefix("mailto:") {
        let addr = rest.split('?').next().unwrap_or_default();
        let Some((local, domain)) = addr.rsplit_once('@') else {
            return Err("is not a mailto: address (expected mailto:local@domain)".to_owned());
        };
        if local.is_empty() {
            return Err("has an empty local part before `@`".to_owned());
        }
        DomainName::parse(domain).map_err(|e| format!("mail domain: {e}"))?;
        return Ok(());
    }
    if let Some(rest) = item.strip_prefix("https://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(
                "has user information in the URI; reporters post to a plain host".to_owned(),
            );
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => {
                let (addr, port) = v6
                    .split_once(']')
                    .ok_or_else(|| "has an unclosed `[` in the host".to_owned())?;
                addr.parse::<std::net::Ipv6Addr>()
                    .map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
                if !(port.is_empty() || port.strip_prefix(':').is_some_and(port_ok)) {
                    return Err(format!("has an invalid port {port:?}"));
                }
                return Ok(());
            }
            None => match authority.rsplit_once(':') {
                Some((h, port)) if port_ok(port) => h,
                Some((_, port)) => return Err(format!("has an invalid port {port:?}")),
                None => authority,
            },
        };
        if host.is_empty() {
            return Err("has no host after https://".to_owned());
        }
        if host.parse::<std::net::Ipv4Addr>().is_err() {
            DomainName::parse(host).map_err(|e| format!("host: {e}"))?;
        }
        return Ok(());
    }
    Err("must start with \"mailto:\" or \"https://\" (RFC 8460 §3)".to_owned())
}

fn port_ok(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.parse::<u16>().is_ok_and(|p| p > 0)
}

pub(super) fn host_record(
    domain: &Layer<'_>,
    defaults: &Layer<'_>,
    report: &mut Report,
) -> HostRecord {
    // The domain's own host settings replace the defaults' as a whole: mixing
    // a default CNAME with a domain's addresses would be an invalid RRset.
    let layer = if domain.raw.host_a.is_some()
        || domain.raw.host_aaaa.is_some()
        || domain.raw.host_cname.is_some()
    {
        domain
    } else {
        defaults
    };
    let src = layer.source;
    let raw = &layer.raw;
    if let Some(cname) = &raw.host_cname {
        if raw.host_a.is_some() || raw.host_aaaa.is_some() {
            report.errors.push(src.at(
                cname.span(),
                "host_cname cannot be combined with host_a/host_aaaa (a CNAME stands alone)",
            ));
            return HostRecord::Unset;
        }
        return match DomainName::parse(cname.get_ref()) {
            Ok(target) => HostRecord::Cname(target),
            Err(e) => {
                report
                    .errors
                    .push(src.at(cname.span(), format!("host_cname: {e}")));
                HostRecord::Unset
            }
        };
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for item in raw.host_a.iter().flat_map(|l| l.get_ref()) {
        match item.get_ref().parse::<Ipv4Addr>() {
            Ok(a) => v4.push(a),
            Err(_) => report.errors.push(src.at(
                item.span(),
                format!("host_a: {:?} is not an IPv4 address", item.get_ref()),
            )),
        }
    }
    for item in raw.host_aaaa.iter().flat_map(|l| l.get_ref()) {
        match item.get_ref().parse::<Ipv6Addr>() {
            Ok(a) => v6.push(a),
            Err(_) => report.errors.push(src.at(
                item.span(),
                format!("host_aaaa: {:?} is not an IPv6 address", item.get_ref()),
            )),
        }
    }
    if v4.is_empty() && v6.is_empty() {
        HostRecord::Unset
    } else {
        HostRecord::Addresses(Arc::new(HostAddresses { v4, v6 }))
    }
}
