//! `mtasts records` in every format, run as the real binary and parsed back
//! with a real parser for that format: zone file (hickory), JSON
//! (serde_json), CSV (csv), YAML (serde_norway). Every format must carry the
//! same records, and the `_mta-sts` id must be the one derived from the body
//! `mtasts policy` prints.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::mtasts;
use hickory_proto::rr::{Name, RData};
use hickory_proto::serialize::txt::Parser;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// (owner FQDN with dot, type, ttl, value unquoted).
type Rr = (String, String, u32, String);

const CONFIG: &str = r#"
[defaults]
mx = ["mx1.example.com", "*.mx.example.com"]
ttl = 600
host_a = ["192.0.2.1", "192.0.2.2"]
host_aaaa = ["2001:db8::1"]

[[domain]]
name = "example.com"
mode = "enforce"
tlsrpt_rua = ["mailto:tls@example.com", "https://reports.example.com/PLACEHOLDER"]

[[domain]]
name = "b.example"
max_age = "2w"
host_cname = "mta-sts.provider.example"

[[domain]]
name = "bücher.example"
mode = "none"

[delegation]
zone = "sts.provider.example"
policy_host = "mta-sts.provider.example"
host_a = ["198.51.100.7"]
host_aaaa = ["2001:db8::7"]
ttl = 300
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    config: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mtasts.toml");
    // A report URI long enough to push the TLS-RPT TXT past 255 bytes, so
    // every format has to split (zone) or carry (JSON) a long value.
    let long = "r".repeat(300);
    std::fs::write(&config, CONFIG.replace("PLACEHOLDER", &long)).expect("write config");
    Fixture { _dir: dir, config }
}

fn stdout_ok(args: &[&str]) -> String {
    let out = mtasts(args);
    assert!(
        out.status.success(),
        "mtasts {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn records(f: &Fixture, extra: &[&str]) -> String {
    let config = f.config.to_str().expect("utf-8 path");
    let mut args = vec!["records", "--config", config];
    args.extend_from_slice(extra);
    stdout_ok(&args)
}

/// The id a sender would expect: first 128 bits of SHA-256 over the exact
/// body `mtasts policy` prints (the one served), in hex.
fn expected_id(f: &Fixture, domain: &str) -> String {
    let config = f.config.to_str().expect("utf-8 path");
    let out = mtasts(&["policy", "--config", config, domain]);
    assert!(out.status.success());
    assert!(out.stdout.starts_with(b"version: STSv1\r\n"));
    Sha256::digest(&out.stdout)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    domain: String,
    name: String,
    #[serde(rename = "type")]
    rtype: String,
    ttl: u32,
    value: String,
}

fn json_records(f: &Fixture, extra: &[&str]) -> Vec<JsonRecord> {
    let mut args = vec!["--format", "json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&records(f, &args)).expect("json output parses")
}

fn json_set(recs: &[JsonRecord]) -> BTreeSet<Rr> {
    recs.iter()
        .map(|r| (r.name.clone(), r.rtype.clone(), r.ttl, r.value.clone()))
        .collect()
}

/// Parses zone-file text with hickory's master-file parser.
fn parse_zone(text: &str) -> BTreeSet<Rr> {
    let origin = Name::root();
    let (_, sets) = Parser::new(text, None, Some(origin))
        .parse()
        .unwrap_or_else(|e| panic!("zone output does not parse: {e}\n{text}"));
    let mut out = BTreeSet::new();
    for set in sets.values() {
        for rec in set.records_without_rrsigs() {
            let value = match &rec.data {
                // RFC 8461 §3.1: strings of one TXT record are concatenated.
                RData::TXT(t) => t
                    .txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<String>(),
                RData::CNAME(c) => c.0.to_ascii(),
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => panic!("unexpected record {other:?}"),
            };
            out.insert((
                rec.name.to_ascii(),
                rec.record_type().to_string(),
                rec.ttl,
                value,
            ));
        }
    }
    out
}

fn sts_id(value: &str) -> &str {
    value
        .strip_prefix("v=STSv1; id=")
        .and_then(|s| s.strip_suffix(';'))
        .unwrap_or_else(|| panic!("not an STSv1 record: {value:?}"))
}

#[test]
fn bind_parses_and_carries_the_served_id() {
    let f = fixture();
    let text = records(&f, &[]);
    let zone = parse_zone(&text);
    assert_eq!(zone, json_set(&json_records(&f, &[])), "bind == json");
    for domain in ["example.com", "b.example", "xn--bcher-kva.example"] {
        let owner = format!("_mta-sts.{domain}.");
        let txt: Vec<&Rr> = zone
            .iter()
            .filter(|r| r.0 == owner && r.1 == "TXT")
            .collect();
        assert_eq!(txt.len(), 1, "exactly one STSv1 record for {domain}");
        assert_eq!(sts_id(&txt[0].3), expected_id(&f, domain), "{domain}");
    }
    // The long TLS-RPT value was split into ≤255-byte strings and joins back.
    let tlsrpt = zone
        .iter()
        .find(|r| r.0 == "_smtp._tls.example.com.")
        .expect("tlsrpt record");
    assert!(tlsrpt.3.len() > 255);
    assert!(tlsrpt.3.ends_with(&format!("{};", "r".repeat(300))));
    assert!(text.lines().any(|l| l.contains("\" \"")), "split:\n{text}");
}

#[test]
fn json_shape_is_domain_name_type_ttl_value() {
    let f = fixture();
    let recs = json_records(&f, &[]);
    assert!(recs.iter().all(|r| r.name.ends_with('.')));
    let b: Vec<&JsonRecord> = recs.iter().filter(|r| r.domain == "b.example").collect();
    assert_eq!(b.len(), 2, "{b:?}");
    assert!(
        b.iter()
            .any(|r| r.rtype == "CNAME" && r.value == "mta-sts.provider.example.")
    );
    assert!(recs.iter().all(|r| r.ttl == 600));
}

#[test]
fn csv_matches_json() {
    let f = fixture();
    let text = records(&f, &["--format", "csv"]);
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().expect("header").clone();
    assert_eq!(
        headers.iter().collect::<Vec<_>>(),
        ["domain", "name", "type", "ttl", "value"]
    );
    let rows: Vec<JsonRecord> = reader
        .deserialize()
        .collect::<Result<_, _>>()
        .expect("csv rows");
    let json = json_records(&f, &[]);
    assert_eq!(json_set(&rows), json_set(&json));
    assert_eq!(
        rows.iter().map(|r| &r.domain).collect::<Vec<_>>(),
        json.iter().map(|r| &r.domain).collect::<Vec<_>>()
    );
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OctoRecord {
    #[serde(rename = "type")]
    rtype: String,
    ttl: u32,
    value: Option<String>,
    values: Option<Vec<String>>,
}

#[test]
fn octodns_yaml_matches_json() {
    let f = fixture();
    let text = records(&f, &["--format", "octodns"]);
    // One YAML document per zone, each preceded by "# <zone>.yaml".
    let zones: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# ")?.strip_suffix("yaml"))
        .collect();
    let mut got = BTreeSet::new();
    let docs = serde_norway::Deserializer::from_str(&text);
    let mut n = 0;
    for (doc, zone) in docs.zip(&zones) {
        n += 1;
        let map: std::collections::BTreeMap<String, Vec<OctoRecord>> =
            serde::Deserialize::deserialize(doc).expect("octodns document");
        for (rel, recs) in map {
            let name = if rel.is_empty() {
                zone.to_string()
            } else {
                format!("{rel}.{zone}")
            };
            for r in recs {
                let values = match (r.value, r.values) {
                    (Some(v), None) => vec![v],
                    (None, Some(vs)) => vs,
                    other => panic!("value or values: {other:?}"),
                };
                for v in values {
                    // octoDNS escapes ';' in TXT values; no unescaped one may remain.
                    let v = if r.rtype == "TXT" {
                        assert!(!v.replace("\\;", "").contains(';'), "{v}");
                        v.replace("\\;", ";")
                    } else {
                        v
                    };
                    got.insert((name.clone(), r.rtype.clone(), r.ttl, v));
                }
            }
        }
    }
    assert_eq!(n, zones.len());
    assert_eq!(n, 3, "one document per domain zone");
    assert_eq!(got, json_set(&json_records(&f, &[])));
}

/// Unquotes zone-file TXT text as Cloudflare and Route 53 take it.
fn unquote_txt(quoted: &str) -> String {
    let line = format!("x. 1 IN TXT {quoted}\n");
    let set = parse_zone(&line);
    set.into_iter().next().expect("one record").3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudflareBatch {
    posts: Vec<CloudflareRecord>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudflareRecord {
    #[serde(rename = "type")]
    rtype: String,
    name: String,
    content: String,
    ttl: u32,
    comment: String,
}

#[test]
fn cloudflare_bodies_match_json() {
    let f = fixture();
    let text = records(&f, &["--format", "cloudflare"]);
    let zones: std::collections::BTreeMap<String, CloudflareBatch> =
        serde_json::from_str(&text).expect("cloudflare json");
    assert_eq!(zones.len(), 3);
    let mut got = BTreeSet::new();
    for (zone, batch) in zones {
        for r in batch.posts {
            assert!(
                r.name == zone || r.name.ends_with(&format!(".{zone}")),
                "{r:?}"
            );
            assert!(!r.name.ends_with('.'));
            assert_eq!(r.comment, "mtasts");
            let value = match r.rtype.as_str() {
                "TXT" => unquote_txt(&r.content),
                "CNAME" => format!("{}.", r.content),
                _ => r.content,
            };
            got.insert((format!("{}.", r.name), r.rtype, r.ttl, value));
        }
    }
    assert_eq!(got, json_set(&json_records(&f, &[])));
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ChangeBatch {
    comment: String,
    changes: Vec<Change>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct Change {
    action: String,
    resource_record_set: RecordSet,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordSet {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Type")]
    rtype: String,
    #[serde(rename = "TTL")]
    ttl: u32,
    #[serde(rename = "ResourceRecords")]
    records: Vec<ResourceRecord>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceRecord {
    #[serde(rename = "Value")]
    value: String,
}

#[test]
fn route53_change_batches_match_json() {
    let f = fixture();
    let text = records(&f, &["--format", "route53"]);
    let zones: std::collections::BTreeMap<String, ChangeBatch> =
        serde_json::from_str(&text).expect("route53 json");
    assert_eq!(zones.len(), 3);
    let mut got = BTreeSet::new();
    for (zone, batch) in zones {
        assert!(batch.comment.contains(&zone));
        let mut seen = BTreeSet::new();
        for c in batch.changes {
            assert_eq!(c.action, "UPSERT");
            let s = c.resource_record_set;
            assert!(
                seen.insert((s.name.clone(), s.rtype.clone())),
                "one change per RRset"
            );
            for r in s.records {
                let value = if s.rtype == "TXT" {
                    unquote_txt(&r.value)
                } else {
                    r.value
                };
                got.insert((s.name.clone(), s.rtype.clone(), s.ttl, value));
            }
        }
    }
    assert_eq!(got, json_set(&json_records(&f, &[])));
}

#[test]
fn user_template_gets_every_field() {
    let f = fixture();
    let dir = f.config.parent().map(Path::to_owned).expect("dir");
    let template = dir.join("mine.j2");
    std::fs::write(
        &template,
        "{% for r in records %}{{ r.domain }}|{{ r.name }}|{{ r.type }}|{{ r.ttl }}|{{ r.value }}|{{ r.zone_value }}\n{% endfor %}",
    )
    .expect("write template");
    let text = records(&f, &["--template", template.to_str().expect("utf-8")]);
    let json = json_records(&f, &[]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), json.len());
    for (line, r) in lines.iter().zip(&json) {
        let want = format!("{}|{}|{}|{}|{}|", r.domain, r.name, r.rtype, r.ttl, r.value);
        assert!(line.starts_with(&want), "{line:?} vs {want:?}");
        let zone_value = &line[want.len()..];
        if r.rtype == "TXT" {
            assert_eq!(unquote_txt(zone_value), r.value);
        } else {
            assert_eq!(zone_value, r.value);
        }
    }
}

#[test]
fn bad_user_template_fails_with_its_name() {
    let f = fixture();
    let dir = f.config.parent().map(Path::to_owned).expect("dir");
    let template = dir.join("typo.j2");
    std::fs::write(&template, "{% for r in records %}{{ r.nmae }}{% endfor %}").expect("write");
    let config = f.config.to_str().expect("utf-8");
    let out = mtasts(&[
        "records",
        "--config",
        config,
        "--template",
        template.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("typo.j2"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn only_named_domains() {
    let f = fixture();
    let recs = json_records(&f, &["bücher.example"]);
    assert!(!recs.is_empty());
    assert!(recs.iter().all(|r| r.domain == "xn--bcher-kva.example"));
}

#[test]
fn delegation_customer_and_provider_sides_fit_together() {
    let f = fixture();
    let customer = parse_zone(&records(&f, &["--for", "customer"]));
    let provider = parse_zone(&records(&f, &["--for", "provider"]));
    // The same through JSON, to be sure both renderings agree.
    assert_eq!(
        customer,
        json_set(&json_records(&f, &["--for", "customer"]))
    );
    assert_eq!(
        provider,
        json_set(&json_records(&f, &["--for", "provider"]))
    );

    for domain in ["example.com", "b.example", "xn--bcher-kva.example"] {
        let find = |set: &BTreeSet<Rr>, name: &str, rtype: &str| -> Vec<Rr> {
            set.iter()
                .filter(|r| r.0 == name && r.1 == rtype)
                .cloned()
                .collect()
        };
        let sts = find(&customer, &format!("_mta-sts.{domain}."), "CNAME");
        assert_eq!(sts.len(), 1, "{domain}: {customer:?}");
        let target = &sts[0].3;
        assert!(target.ends_with(".sts.provider.example."), "{target}");
        let host = find(&customer, &format!("mta-sts.{domain}."), "CNAME");
        assert_eq!(host.len(), 1);
        assert_eq!(host[0].3, "mta-sts.provider.example.");
        assert!(find(&customer, &format!("_mta-sts.{domain}."), "TXT").is_empty());

        // Following the CNAME on the provider side gives the served id.
        let txt = find(&provider, target, "TXT");
        assert_eq!(txt.len(), 1, "{target}: {provider:?}");
        assert_eq!(sts_id(&txt[0].3), expected_id(&f, domain));
    }
    // The customer keeps its own TLS-RPT record.
    assert!(customer.iter().any(|r| r.0 == "_smtp._tls.example.com."));
    assert!(!provider.iter().any(|r| r.0.starts_with("_smtp._tls.")));
    // The policy host's addresses appear once, on the provider side.
    let host: Vec<&Rr> = provider
        .iter()
        .filter(|r| r.0 == "mta-sts.provider.example.")
        .collect();
    assert_eq!(host.len(), 2, "{host:?}");
    assert!(host.iter().all(|r| r.2 == 300));
}

#[test]
fn delegation_side_without_section_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\n",
    )
    .expect("write");
    let out = mtasts(&[
        "records",
        "--config",
        config.to_str().expect("utf-8"),
        "--for",
        "provider",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[delegation]"), "{err}");
}

/// The `octodns-validate` of the real octoDNS package (PyPI): from
/// `MTASTS_OCTODNS_VALIDATE` (scripts/test.sh sets it after installing
/// octoDNS into target/octodns-venv), else that venv. Missing: a failure
/// under CI=true, a skip otherwise.
fn octodns_validate() -> Option<PathBuf> {
    let path = std::env::var_os("MTASTS_OCTODNS_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/octodns-venv/bin/octodns-validate")
        });
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "octodns-validate not found at {} (scripts/test.sh installs it)",
        path.display()
    );
    eprintln!(
        "skipping: octodns-validate not found at {} (run scripts/test.sh)",
        path.display()
    );
    None
}

/// Saves each `# <zone>.yaml` document of `yaml` as that file in a new
/// directory, writes an octoDNS config with a YamlProvider (default
/// settings: enforce_order on, natural order) as the source of every zone,
/// and runs `octodns-validate` on it. Returns (success, output).
fn octodns_accepts(validate: &Path, yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let zones_dir = dir.path().join("zones");
    std::fs::create_dir(&zones_dir).expect("mkdir");
    let mut config = format!(
        "providers:\n  mtasts:\n    class: octodns.provider.yaml.YamlProvider\n    directory: {}\nzones:\n",
        zones_dir.display()
    );
    let mut zone: Option<(String, String)> = None;
    let mut files = Vec::new();
    for line in yaml.split_inclusive('\n') {
        match line
            .strip_prefix("# ")
            .and_then(|l| l.trim_end().strip_suffix("yaml"))
        {
            Some(name) => {
                files.extend(zone.take());
                zone = Some((name.to_owned(), String::new()));
            }
            None => {
                let (_, text) = zone.as_mut().expect("a document starts with # <zone>.yaml");
                text.push_str(line);
            }
        }
    }
    files.extend(zone);
    assert!(!files.is_empty(), "no zone in {yaml}");
    for (name, text) in &files {
        std::fs::write(zones_dir.join(format!("{name}yaml")), text).expect("write zone");
        config.push_str(&format!("  {name}:\n    sources: [mtasts]\n"));
    }
    let config_file = dir.path().join("octodns.yaml");
    std::fs::write(&config_file, config).expect("write config");
    let out = std::process::Command::new(validate)
        .arg("--config-file")
        .arg(&config_file)
        .output()
        .expect("run octodns-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Issue 9 item 15: octoDNS's YamlProvider with default settings
/// (enforce_order) loads every side of our output, including a provider
/// zone whose names need natural (not byte) order.
#[test]
fn octodns_validate_accepts_our_yaml() {
    let Some(validate) = octodns_validate() else {
        return;
    };
    // The check itself refuses keys out of natural order.
    let (ok, out) = octodns_accepts(
        &validate,
        "# example.com.yaml\n---\nmta-sts:\n  type: A\n  ttl: 60\n  value: 192.0.2.1\n",
    );
    assert!(!ok, "out of order accepted: {out}");
    assert!(out.contains("keys out of order"), "{out}");

    let f = fixture();
    for side in [&[][..], &["--for", "customer"], &["--for", "provider"]] {
        let mut args = vec!["--format", "octodns"];
        args.extend_from_slice(side);
        let yaml = records(&f, &args);
        let (ok, out) = octodns_accepts(&validate, &yaml);
        assert!(ok, "{side:?}: octodns-validate refused:\n{out}\n{yaml}");
    }

    // Names whose natural order differs from byte order (d10 after d9).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = String::from(
        "[defaults]\nmx = [\"mx.example.net\"]\nhost_a = [\"192.0.2.1\"]\n\n[delegation]\nzone = \"sts.example.net\"\npolicy_host = \"mta-sts.example.net\"\n",
    );
    for n in [10, 9, 1, 100, 2] {
        config.push_str(&format!("\n[[domain]]\nname = \"d{n}.example\"\n"));
    }
    let path = dir.path().join("mtasts.toml");
    std::fs::write(&path, config).expect("write config");
    let path = path.to_str().expect("utf-8");
    for side in ["provider", "customer"] {
        let yaml = stdout_ok(&[
            "records", "--config", path, "--format", "octodns", "--for", side,
        ]);
        let (ok, out) = octodns_accepts(&validate, &yaml);
        assert!(ok, "{side}: octodns-validate refused:\n{out}\n{yaml}");
    }
}
