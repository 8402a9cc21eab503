//! Record output formats: every built-in format is a minijinja template in
//! `templates/`, embedded in the binary; `--template FILE` renders the
//! user's own with the same context (documented in docs/DNS.md).

use std::collections::HashMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;

use super::Record;

/// The built-in output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Zone-file lines (RFC 1035 master file syntax).
    Bind,
    /// A JSON array of `{domain, name, type, ttl, value}`.
    Json,
    /// CSV with a header line: `domain,name,type,ttl,value`.
    Csv,
    /// octoDNS YAML, one document per zone.
    Octodns,
    /// Cloudflare API bodies, per zone (`POST …/dns_records/batch`).
    Cloudflare,
    /// Route 53 `ChangeBatch` JSON, per zone.
    Route53,
}

impl Format {
    /// Every built-in format.
    pub const ALL: [Format; 6] = [
        Format::Bind,
        Format::Json,
        Format::Csv,
        Format::Octodns,
        Format::Cloudflare,
        Format::Route53,
    ];

    /// Template file name and source.
    fn template(self) -> (&'static str, &'static str) {
        match self {
            Format::Bind => ("bind.zone.j2", include_str!("../../templates/bind.zone.j2")),
            Format::Json => ("json.json.j2", include_str!("../../templates/json.json.j2")),
            Format::Csv => ("csv.csv.j2", include_str!("../../templates/csv.csv.j2")),
            Format::Octodns => (
                "octodns.yaml.j2",
                include_str!("../../templates/octodns.yaml.j2"),
            ),
            Format::Cloudflare => (
                "cloudflare.json.j2",
                include_str!("../../templates/cloudflare.json.j2"),
            ),
            Format::Route53 => (
                "route53.json.j2",
                include_str!("../../templates/route53.json.j2"),
            ),
        }
    }

    /// The embedded template source (a starting point for `--template`).
    pub fn source(self) -> &'static str {
        self.template().1
    }
}

/// A template that failed to parse or render.
#[derive(Debug, thiserror::Error)]
#[error("template {name}: {source:#}")]
pub struct FormatError {
    name: String,
    #[source]
    source: minijinja::Error,
}

/// What a template sees for each record.
#[derive(Debug, Serialize)]
struct TemplateRecord<'a> {
    domain: &'a str,
    /// FQDN, trailing dot.
    name: &'a str,
    /// The zone (FQDN, trailing dot) and the owner relative to it.
    zone: &'a str,
    relative_name: &'a str,
    #[serde(rename = "type")]
    rtype: &'a str,
    ttl: u32,
    value: &'a str,
    zone_value: String,
}

/// Records with the same owner and type (one RRset), for APIs that take
/// RRsets (octoDNS, Route 53).
#[derive(Debug, Clone, Serialize)]
struct TemplateRrset<'a> {
    name: &'a str,
    relative_name: &'a str,
    #[serde(rename = "type")]
    rtype: &'a str,
    ttl: u32,
    values: Vec<&'a str>,
    zone_values: Vec<String>,
}

#[derive(Debug, Serialize)]
struct TemplateZone<'a> {
    /// FQDN, trailing dot.
    zone: &'a str,
    records: Vec<TemplateRecord<'a>>,
    rrsets: Vec<TemplateRrset<'a>>,
    /// The RRsets grouped by owner name (octoDNS keys records by name).
    owners: Vec<TemplateOwner<'a>>,
}

/// All RRsets of one owner name.
#[derive(Debug, Serialize)]
struct TemplateOwner<'a> {
    name: &'a str,
    relative_name: &'a str,
    rrsets: Vec<TemplateRrset<'a>>,
}

#[derive(Debug, Serialize)]
struct Context<'a> {
    records: Vec<TemplateRecord<'a>>,
    zones: Vec<TemplateZone<'a>>,
}

fn template_record(r: &Record) -> TemplateRecord<'_> {
    TemplateRecord {
        domain: &r.domain,
        name: &r.name,
        zone: &r.zone,
        relative_name: r.relative_name(),
        rtype: r.rtype,
        ttl: r.ttl,
        value: &r.value,
        zone_value: r.zone_value(),
    }
}

fn context(records: &[Record]) -> Context<'_> {
    // Zones and RRsets in first-seen order, so output follows the records.
    let mut zones: Vec<TemplateZone<'_>> = Vec::new();
    let mut zone_index: HashMap<&str, usize> = HashMap::new();
    // Indexes instead of linear searches: a provider zone holds one RRset
    // per customer, and 100k customers must not cost 10^10 comparisons.
    let mut set_index: HashMap<(usize, &str, &str), usize> = HashMap::new();
    for r in records {
        let zi = *zone_index.entry(r.zone.as_str()).or_insert_with(|| {
            zones.push(TemplateZone {
                zone: &r.zone,
                records: Vec::new(),
                rrsets: Vec::new(),
                owners: Vec::new(),
            });
            zones.len() - 1
        });
        let Some(zone) = zones.get_mut(zi) else {
            continue;
        };
        zone.records.push(template_record(r));
        let key = (zi, r.name.as_str(), r.rtype);
        match set_index.get(&key).and_then(|&i| zone.rrsets.get_mut(i)) {
            Some(set) => {
                set.values.push(&r.value);
                set.zone_values.push(r.zone_value());
                // One TTL per RRset (RFC 2181 §5.2): the smallest wins.
                set.ttl = set.ttl.min(r.ttl);
            }
            None => {
                set_index.insert(key, zone.rrsets.len());
                zone.rrsets.push(TemplateRrset {
                    name: &r.name,
                    relative_name: r.relative_name(),
                    rtype: r.rtype,
                    ttl: r.ttl,
                    values: vec![&r.value],
                    zone_values: vec![r.zone_value()],
                });
            }
        }
    }
    for zone in &mut zones {
        let mut owner_index: HashMap<&str, usize> = HashMap::new();
        for set in &zone.rrsets {
            match owner_index
                .get(set.name)
                .and_then(|&i| zone.owners.get_mut(i))
            {
                Some(owner) => owner.rrsets.push(set.clone()),
                None => {
                    owner_index.insert(set.name, zone.owners.len());
                    zone.owners.push(TemplateOwner {
                        name: set.name,
                        relative_name: set.relative_name,
                        rrsets: vec![set.clone()],
                    });
                }
            }
        }
    }
    // octoDNS's YamlProvider (default `enforce_order: true`) refuses a zone
    // whose names are not in natural sort order.
    for zone in &mut zones {
        zone.owners
            .sort_by(|a, b| natural_cmp(a.relative_name, b.relative_name));
    }
    Context {
        records: records.iter().map(template_record).collect(),
        zones,
    }
}

/// Natural sort order as octoDNS checks it (Python `natsort`'s default
/// key): the text split into alternating non-digit and digit runs, text
/// runs compared by code point, digit runs by numeric value, a shorter
/// sequence of equal runs first.
pub(super) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (natural_runs(a), natural_runs(b));
    loop {
        return match (a.next(), b.next()) {
            (None, None) => std::cmp::Ordering::Equal,
            (None, Some(_)) => std::cmp::Ordering::Less,
            (Some(_), None) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => {
                let ord = if x.starts_with(|c: char| c.is_ascii_digit()) {
                    // Both are digit runs: runs alternate from a text run
                    // (empty when the name starts with a digit).
                    let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                    x.len().cmp(&y.len()).then_with(|| x.cmp(y))
                } else {
                    x.cmp(y)
                };
                if ord.is_eq() {
                    continue;
                }
                ord
            }
        };
    }
}

/// `s` as alternating runs, text first: "h-12ab" → "h-", "12", "ab";
/// "12ab" → "", "12", "ab".
fn natural_runs(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    let mut digits = false;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let end = rest
            .find(|c: char| c.is_ascii_digit() != digits)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        rest = tail;
        digits = !digits;
        done = rest.is_empty();
        Some(run)
    })
}

/// One environment for built-in and user templates alike: no auto-escaping
/// (formats escape explicitly with `tojson`, `csv`), undefined names are
/// errors (a typo in a user template fails instead of printing nothing),
/// block tags do not leave blank lines, and the final newline is kept.
fn environment() -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()?,
    );
    env.add_filter("csv", csv_field);
    env.add_filter("yaml", yaml_string);
    Ok(env)
}

/// A YAML double-quoted scalar that every YAML parser reads back as
/// `value`: JSON string syntax (a subset of YAML's double-quoted style),
/// with the characters JSON leaves raw but YAML does not take as they are
/// escaped too. YAML 1.1 (PyYAML, which octoDNS uses) reads U+0085, U+2028
/// and U+2029 as line breaks, folding them into a space, and neither 1.1
/// nor 1.2 allows DEL, the C1 controls or U+FFFE/U+FFFF raw in a stream.
pub(super) fn yaml_string(value: String) -> String {
    let json = serde_json::Value::String(value).to_string();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            _ => out.push(c),
        }
    }
    out
}

/// RFC 4180 field: quoted when it holds a comma, quote, CR or LF.
pub(super) fn csv_field(value: String) -> String {
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// Renders `records` in a built-in format.
pub fn render(format: Format, records: &[Record]) -> Result<String, FormatError> {
    let (name, source) = format.template();
    render_source(name, source, records)
}

/// Renders `records` with a user template (`name` is used in errors).
pub fn render_source(name: &str, source: &str, records: &[Record]) -> Result<String, FormatError> {
    let wrap = |source| FormatError {
        name: name.to_owned(),
        source,
    };
    let env = environment().map_err(wrap)?;
    let template = env.template_from_str(source).map_err(wrap)?;
    template
        .render(minijinja::value::Serde(context(records)))
        .map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, rtype: &'static str, value: &str) -> Record {
        Record {
            domain: "example.com".into(),
            name: name.into(),
            rtype,
            ttl: 300,
            value: value.into(),
            zone: "example.com.".into(),
        }
    }

    #[test]
    fn every_builtin_template_renders() {
        let recs = vec![
            rec("_mta-sts.example.com.", "TXT", "v=STSv1; id=abc;"),
            rec("mta-sts.example.com.", "A", "192.0.2.1"),
            rec("mta-sts.example.com.", "A", "192.0.2.2"),
        ];
        for f in Format::ALL {
            let out = render(f, &recs).unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert!(out.ends_with('\n'), "{f:?}: {out:?}");
            assert!(out.contains("192.0.2.2"), "{f:?}: {out}");
        }
    }

    #[test]
    fn empty_record_list_renders() {
        for f in Format::ALL {
            render(f, &[]).unwrap_or_else(|e| panic!("{f:?}: {e}"));
        }
    }

    #[test]
    fn user_template_and_strict_undefined() {
        let recs = vec![rec("_mta-sts.example.com.", "TXT", "v=STSv1; id=abc;")];
        let out = render_source(
            "t",
            "{% for r in records %}{{ r.name }} {{ r.type }} {{ r.value }}\n{% endfor %}",
            &recs,
        )
        .expect("renders");
        assert_eq!(out, "_mta-sts.example.com. TXT v=STSv1; id=abc;\n");
        let err = render_source("t", "{{ records[0].nmae }}", &recs).expect_err("typo");
        assert!(err.to_string().starts_with("template t:"), "{err}");
    }

    #[test]
    fn yaml_strings_read_back_unchanged() {
        let tricky = [
            "v=STSv1; id=abc;",
            "quote \" backslash \\ tab \t",
            "line\u{2028}separator\u{2029}paragraph\u{85}next-line",
            "del\u{7f} c1\u{9b} bom\u{feff} nonchars\u{fffe}\u{ffff}",
            "b\u{fc}cher \u{1f600} \u{a0}",
        ];
        for value in tricky {
            let quoted = yaml_string(value.to_owned());
            assert!(
                !quoted.contains(['\u{7f}', '\u{85}', '\u{2028}', '\u{2029}', '\u{fffe}']),
                "{quoted}"
            );
            let back: String =
                serde_norway::from_str(&quoted).unwrap_or_else(|e| panic!("{quoted}: {e}"));
            assert_eq!(back, value, "{quoted}");
        }
        // Through the octoDNS template: the value is one YAML string.
        let recs = vec![rec(
            "_mta-sts.example.com.",
            "TXT",
            "v=STSv1;\u{2028}id=abc;",
        )];
        let out = render(Format::Octodns, &recs).expect("renders");
        assert!(!out.contains('\u{2028}'), "{out}");
        let docs: serde_norway::Value =
            serde_norway::from_str(out.split_once("---\n").expect("document start").1)
                .expect("YAML");
        assert_eq!(
            docs["_mta-sts"][0]["values"][0].as_str(),
            Some("v=STSv1\\;\u{2028}id=abc\\;")
        );
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("a b".into()), "a b");
        assert_eq!(csv_field("a,b".into()), "\"a,b\"");
        assert_eq!(csv_field("a\"b".into()), "\"a\"\"b\"");
    }

    #[test]
    fn rrsets_group_by_name_and_type() {
        let recs = vec![
            rec("mta-sts.example.com.", "A", "192.0.2.1"),
            rec("mta-sts.example.com.", "AAAA", "2001:db8::1"),
            rec("mta-sts.example.com.", "A", "192.0.2.2"),
        ];
        let ctx = context(&recs);
        assert_eq!(ctx.zones.len(), 1);
        let sets = &ctx.zones[0].rrsets;
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0].values, ["192.0.2.1", "192.0.2.2"]);
        assert_eq!(sets[0].relative_name, "mta-sts");
    }

    #[test]
    fn natural_order_is_octodns_order() {
        let mut names = vec![
            "mta-sts",
            "h-10",
            "",
            "_smtp._tls",
            "h-9",
            "h-09x",
            "_mta-sts",
            "2a",
            "10a",
            "a",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "",
                "2a",
                "10a",
                "_mta-sts",
                "_smtp._tls",
                "a",
                "h-9",
                "h-09x",
                "h-10",
                "mta-sts"
            ]
        );
    }
}
