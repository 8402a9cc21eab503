//! The built-in record formats written straight to an `io::Write`, one zone
//! at a time, instead of through minijinja with every record in one
//! context: at a million domains that context cost gigabytes and tens of
//! seconds (docs/PERFORMANCE.md). The output is byte for byte what the
//! templates in `templates/` produce (still embedded: they are the
//! documented starting points for `--template`, and `render` uses them);
//! a property test holds the two together.
//!
//! Records must arrive grouped by zone, as [`super::records`] yields them:
//! each site's records are in its own zone, and the provider side puts the
//! policy host's zone first and then the delegation zone.

use std::collections::HashMap;
use std::io::{self, Write};

use super::Record;
use super::format::{Format, csv_field, natural_cmp, yaml_string};

/// Writes `records` in `format` to `out`. Memory is one zone's records at a
/// time (for the provider side, the delegation zone is one zone).
pub fn write_records<W: Write>(
    format: Format,
    records: impl IntoIterator<Item = Record>,
    out: &mut W,
) -> io::Result<()> {
    match format {
        Format::Bind => {
            for r in records {
                writeln!(
                    out,
                    "{} {} IN {} {}",
                    r.name,
                    r.ttl,
                    r.rtype,
                    r.zone_value()
                )?;
            }
            Ok(())
        }
        Format::Csv => {
            out.write_all(b"domain,name,type,ttl,value\n")?;
            for r in records {
                writeln!(
                    out,
                    "{},{},{},{},{}",
                    csv_field(r.domain),
                    csv_field(r.name),
                    r.rtype,
                    r.ttl,
                    csv_field(r.value)
                )?;
            }
            Ok(())
        }
        Format::Json => {
            out.write_all(b"[\n")?;
            let mut first = true;
            for r in records {
                if !first {
                    out.write_all(b",\n")?;
                }
                first = false;
                write!(
                    out,
                    "  {{\"domain\": {}, \"name\": {}, \"type\": {}, \"ttl\": {}, \"value\": {}}}",
                    json(&r.domain),
                    json(&r.name),
                    json(r.rtype),
                    r.ttl,
                    json(&r.value)
                )?;
            }
            if !first {
                out.write_all(b"\n")?;
            }
            out.write_all(b"]\n")
        }
        Format::Octodns => each_zone(records, |zone, recs| octodns_zone(out, zone, recs)),
        Format::Cloudflare => zones_object(out, records, cloudflare_zone),
        Format::Route53 => zones_object(out, records, route53_zone),
    }
}

/// The JSON object the Cloudflare and Route 53 templates wrap around their
/// zones: `{`, one member per zone written by `zone`, comma-separated, `}`.
fn zones_object<W: Write>(
    out: &mut W,
    records: impl IntoIterator<Item = Record>,
    zone: fn(&mut W, &str, &[Record]) -> io::Result<()>,
) -> io::Result<()> {
    out.write_all(b"{\n")?;
    let mut first = true;
    each_zone(records, |name, recs| {
        if !first {
            out.write_all(b",\n")?;
        }
        first = false;
        zone(out, name, recs)
    })?;
    if !first {
        out.write_all(b"\n")?;
    }
    out.write_all(b"}\n")
}

/// Calls `f` with each run of records that share a zone.
fn each_zone(
    records: impl IntoIterator<Item = Record>,
    mut f: impl FnMut(&str, &[Record]) -> io::Result<()>,
) -> io::Result<()> {
    let mut zone: Vec<Record> = Vec::new();
    for r in records {
        if zone.first().is_some_and(|z| z.zone != r.zone) {
            f(&zone[0].zone, &zone)?;
            zone.clear();
        }
        zone.push(r);
    }
    match zone.first() {
        Some(z) => f(&z.zone, &zone),
        None => Ok(()),
    }
}

/// One zone's RRsets: records with the same owner and type, in first-seen
/// order, with the smallest TTL (RFC 2181 §5.2), as the templates see them.
struct Rrset<'a> {
    name: &'a str,
    relative_name: &'a str,
    rtype: &'static str,
    ttl: u32,
    records: Vec<&'a Record>,
}

fn rrsets(records: &[Record]) -> Vec<Rrset<'_>> {
    let mut sets: Vec<Rrset<'_>> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    for r in records {
        match index
            .get(&(r.name.as_str(), r.rtype))
            .and_then(|&i| sets.get_mut(i))
        {
            Some(set) => {
                set.ttl = set.ttl.min(r.ttl);
                set.records.push(r);
            }
            None => {
                index.insert((r.name.as_str(), r.rtype), sets.len());
                sets.push(Rrset {
                    name: &r.name,
                    relative_name: r.relative_name(),
                    rtype: r.rtype,
                    ttl: r.ttl,
                    records: vec![r],
                });
            }
        }
    }
    sets
}

fn octodns_zone<W: Write>(out: &mut W, zone: &str, records: &[Record]) -> io::Result<()> {
    write!(out, "# {zone}yaml\n---\n")?;
    let sets = rrsets(records);
    // Owners in first-seen order, then (stably) in octoDNS's natural order.
    let mut owners: Vec<(&str, Vec<&Rrset<'_>>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for set in &sets {
        match index.get(set.name).and_then(|&i| owners.get_mut(i)) {
            Some((_, list)) => list.push(set),
            None => {
                index.insert(set.name, owners.len());
                owners.push((set.relative_name, vec![set]));
            }
        }
    }
    owners.sort_by(|a, b| natural_cmp(a.0, b.0));
    for (relative, sets) in owners {
        writeln!(out, "{}:", yaml_string(relative.to_owned()))?;
        for s in sets {
            write!(out, "- ttl: {}\n  type: {}\n", s.ttl, s.rtype)?;
            if s.rtype == "CNAME" {
                let first = s.records.first().map_or("", |r| r.value.as_str());
                writeln!(out, "  value: {}", yaml_string(first.to_owned()))?;
            } else {
                out.write_all(b"  values:\n")?;
                for r in &s.records {
                    let v = if s.rtype == "TXT" {
                        r.value.replace(';', "\\;")
                    } else {
                        r.value.clone()
                    };
                    writeln!(out, "  - {}", yaml_string(v))?;
                }
            }
        }
    }
    Ok(())
}

fn cloudflare_zone<W: Write>(out: &mut W, zone: &str, records: &[Record]) -> io::Result<()> {
    writeln!(out, "  {}: {{\"posts\": [", json(trim_dots(zone)))?;
    for (i, r) in records.iter().enumerate() {
        let content = if r.rtype == "TXT" {
            r.zone_value()
        } else {
            trim_dots(&r.value).to_owned()
        };
        writeln!(
            out,
            "    {{\"type\": {}, \"name\": {}, \"content\": {}, \"ttl\": {}, \"comment\": \"mtasts\"}}{}",
            json(r.rtype),
            json(trim_dots(&r.name)),
            json(&content),
            r.ttl,
            if i + 1 < records.len() { "," } else { "" }
        )?;
    }
    out.write_all(b"  ]}")
}

fn route53_zone<W: Write>(out: &mut W, zone: &str, records: &[Record]) -> io::Result<()> {
    write!(
        out,
        "  {}: {{\n    \"Comment\": {},\n    \"Changes\": [\n",
        json(trim_dots(zone)),
        json(&format!("mtasts records for {zone}"))
    )?;
    let sets = rrsets(records);
    for (i, s) in sets.iter().enumerate() {
        write!(
            out,
            "      {{\"Action\": \"UPSERT\", \"ResourceRecordSet\": {{\"Name\": {}, \"Type\": {}, \"TTL\": {}, \"ResourceRecords\": [",
            json(s.name),
            json(s.rtype),
            s.ttl
        )?;
        for (j, r) in s.records.iter().enumerate() {
            if j > 0 {
                out.write_all(b", ")?;
            }
            write!(out, "{{\"Value\": {}}}", json(&r.zone_value()))?;
        }
        writeln!(out, "]}}}}{}", if i + 1 < sets.len() { "," } else { "" })?;
    }
    out.write_all(b"    ]\n  }")
}

/// `value` without leading and trailing dots (the templates' `trim(".")`).
fn trim_dots(value: &str) -> &str {
    value.trim_matches('.')
}

/// A JSON string as the templates' `tojson` writes it (minijinja's
/// HTML-safe style): `"`, `\` and control characters escaped, and `<`,
/// `>`, `&`, `'` as `\u00XX`; everything else as it is.
fn json(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0'..='\u{1f}' | '<' | '>' | '&' | '\'' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::dns::format::render;

    fn record() -> impl Strategy<Value = (usize, usize, usize, u32, String)> {
        (
            0..3usize,
            0..5usize,
            0..4usize,
            prop_oneof![Just(300u32), Just(3600), 0..90_000u32],
            prop_oneof![
                "[ -~]{0,40}",
                "\\PC{0,20}",
                Just("v=STSv1; id=abc;".to_owned()),
                Just("a\"b\\c<d>e&f'g;h\n\t\u{2028}\u{85}".to_owned()),
                Just(String::new()),
            ],
        )
    }

    /// Records grouped by zone, as `dns::records` yields them.
    fn records() -> impl Strategy<Value = Vec<Record>> {
        proptest::collection::vec(record(), 0..12).prop_map(|mut picks| {
            picks.sort_by_key(|p| p.0);
            let zones = ["a.example.", "sts.provider.example.", "10.x.example."];
            let owners = ["", "_mta-sts.", "mta-sts.", "_smtp._tls.", "h-2."];
            let types = ["TXT", "A", "AAAA", "CNAME"];
            picks
                .into_iter()
                .map(|(z, o, t, ttl, value)| Record {
                    domain: zones[z].trim_end_matches('.').to_owned(),
                    name: format!("{}{}", owners[o], zones[z]),
                    rtype: types[t],
                    ttl,
                    value,
                    zone: zones[z].to_owned(),
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn native_writers_match_the_templates(recs in records()) {
            for format in Format::ALL {
                let mut native = Vec::new();
                write_records(format, recs.clone(), &mut native).expect("write");
                let template = render(format, &recs).expect("render");
                prop_assert_eq!(
                    String::from_utf8(native).expect("UTF-8"),
                    template,
                    "{:?}",
                    format
                );
            }
        }
    }

    #[test]
    fn empty_input_matches_the_templates() {
        for format in Format::ALL {
            let mut native = Vec::new();
            write_records(format, Vec::new(), &mut native).expect("write");
            assert_eq!(
                String::from_utf8(native).expect("UTF-8"),
                render(format, &[]).expect("render"),
                "{format:?}"
            );
        }
    }
}
