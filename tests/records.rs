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
    common::policy_id(&out.stdout)
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

/// A stand-in for the three Cloudflare API calls deploy/cloudflare-sync.py
/// makes (there is no Cloudflare here): `GET /zones?name=`, `GET
/// /zones/{id}/dns_records` (paged, 3 per page so that paging is used) and
/// `POST /zones/{id}/dns_records/batch`, applied in Cloudflare's documented
/// order (deletes, patches, puts, posts). Request bodies are checked
/// against the documented shapes; anything else is a 400.
struct FakeCloudflare {
    base: String,
    state: std::sync::Arc<std::sync::Mutex<CfState>>,
}

#[derive(Default)]
struct CfState {
    /// (zone name, zone id).
    zones: Vec<(String, String)>,
    /// (zone id, record as the API returns it).
    records: Vec<(String, serde_json::Value)>,
    next_id: u32,
    batches: u32,
}

const CF_TOKEN: &str = "test-token";

impl FakeCloudflare {
    fn start(zones: &[&str]) -> FakeCloudflare {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}/client/v4", listener.local_addr().expect("addr"));
        let state = std::sync::Arc::new(std::sync::Mutex::new(CfState {
            zones: zones
                .iter()
                .enumerate()
                .map(|(i, z)| ((*z).to_owned(), format!("zone{i}")))
                .collect(),
            ..CfState::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve_cf(stream, &shared);
            }
        });
        FakeCloudflare { base, state }
    }

    fn add(&self, zone_id: &str, rtype: &str, name: &str, content: &str) {
        let mut s = self.state.lock().expect("lock");
        s.next_id += 1;
        let id = format!("rec{}", s.next_id);
        s.records.push((
            zone_id.to_owned(),
            serde_json::json!({"id": id, "type": rtype, "name": name, "content": content, "ttl": 300, "comment": null}),
        ));
    }

    /// (type, name, content, id) of a zone's records, sorted.
    fn records(&self, zone_id: &str) -> Vec<(String, String, String, String)> {
        let s = self.state.lock().expect("lock");
        let mut out: Vec<_> = s
            .records
            .iter()
            .filter(|(z, _)| z == zone_id)
            .map(|(_, r)| {
                let f = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                (f("type"), f("name"), f("content"), f("id"))
            })
            .collect();
        out.sort();
        out
    }

    fn batches(&self) -> u32 {
        self.state.lock().expect("lock").batches
    }
}

fn serve_cf(
    mut stream: std::net::TcpStream,
    state: &std::sync::Mutex<CfState>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 || buf.len() > 1 << 20 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..head_end + length];
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let target = words.next().unwrap_or_default().to_owned();
    let (status, doc) = if header("authorization").as_deref() != Some(&format!("Bearer {CF_TOKEN}"))
    {
        (
            403,
            serde_json::json!({"success": false, "errors": [{"message": "bad token"}]}),
        )
    } else {
        match cf_route(&method, &target, body, &mut state.lock().expect("lock")) {
            Ok(doc) => (200, doc),
            Err(msg) => (
                400,
                serde_json::json!({"success": false, "errors": [{"message": msg}]}),
            ),
        }
    };
    let text = doc.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
}

fn cf_route(
    method: &str,
    target: &str,
    body: &[u8],
    s: &mut CfState,
) -> Result<serde_json::Value, String> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: std::collections::HashMap<&str, &str> =
        query.split('&').filter_map(|p| p.split_once('=')).collect();
    let path = path
        .strip_prefix("/client/v4")
        .ok_or_else(|| format!("unknown path {path}"))?;
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("GET", ["zones"]) => {
            let name = query.get("name").ok_or("zones: name missing")?;
            let result: Vec<_> = s
                .zones
                .iter()
                .filter(|(z, _)| z == name)
                .map(|(z, id)| serde_json::json!({"id": id, "name": z}))
                .collect();
            Ok(serde_json::json!({"success": true, "errors": [], "result": result}))
        }
        ("GET", ["zones", zone, "dns_records"]) => {
            let page: usize = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
            let per_page = 3;
            let all: Vec<_> = s
                .records
                .iter()
                .filter(|(z, _)| z == zone)
                .map(|(_, r)| r.clone())
                .collect();
            let total_pages = all.len().div_ceil(per_page).max(1);
            let result: Vec<_> = all
                .iter()
                .skip((page - 1) * per_page)
                .take(per_page)
                .cloned()
                .collect();
            Ok(
                serde_json::json!({"success": true, "errors": [], "result": result,
                "result_info": {"page": page, "per_page": per_page, "count": result.len(), "total_count": all.len(), "total_pages": total_pages}}),
            )
        }
        ("POST", ["zones", zone, "dns_records", "batch"]) => {
            let zone = (*zone).to_owned();
            let doc: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
            let obj = doc.as_object().ok_or("body is not an object")?;
            let list = |k: &str| {
                obj.get(k)
                    .and_then(|v| v.as_array())
                    .cloned()
                    .unwrap_or_default()
            };
            for k in obj.keys() {
                if !["deletes", "patches", "puts", "posts"].contains(&k.as_str()) {
                    return Err(format!("unknown key {k}"));
                }
            }
            let shape = |r: &serde_json::Value, with_id: bool| -> Result<(), String> {
                let mut keys: Vec<&str> = r
                    .as_object()
                    .ok_or("not an object")?
                    .keys()
                    .map(String::as_str)
                    .collect();
                keys.sort_unstable();
                let mut want = vec!["comment", "content", "name", "ttl", "type"];
                if with_id {
                    want.push("id");
                    want.sort_unstable();
                }
                if keys != want {
                    return Err(format!("record keys {keys:?}, want {want:?}"));
                }
                if r["type"] == "TXT" && !r["content"].as_str().is_some_and(|c| c.starts_with('"'))
                {
                    return Err(format!("TXT content not quoted: {r}"));
                }
                Ok(())
            };
            let find = |s: &CfState, id: &serde_json::Value| {
                s.records
                    .iter()
                    .position(|(z, r)| *z == zone && r["id"] == *id)
            };
            // A transaction: check everything first.
            for d in list("deletes") {
                if d.as_object().map(|o| o.len()) != Some(1) || find(s, &d["id"]).is_none() {
                    return Err(format!("bad delete {d}"));
                }
            }
            for p in list("puts") {
                shape(&p, true)?;
                if find(s, &p["id"]).is_none() {
                    return Err(format!("put of unknown record {p}"));
                }
            }
            for p in list("posts") {
                shape(&p, false)?;
            }
            if !list("patches").is_empty() {
                return Err("patches are not expected".into());
            }
            for d in list("deletes") {
                if let Some(i) = find(s, &d["id"]) {
                    s.records.remove(i);
                }
            }
            for p in list("puts") {
                if let Some(i) = find(s, &p["id"]) {
                    s.records[i].1 = p;
                }
            }
            for mut p in list("posts") {
                s.next_id += 1;
                p["id"] = format!("rec{}", s.next_id).into();
                s.records.push((zone.clone(), p));
            }
            s.batches += 1;
            Ok(serde_json::json!({"success": true, "errors": [], "result": {}}))
        }
        _ => Err(format!("unexpected {method} {path}")),
    }
}

/// Runs deploy/cloudflare-sync.py on `input` against the fake API.
fn cloudflare_sync(cf: &FakeCloudflare, input: &str, extra: &[&str]) -> (bool, String) {
    use std::io::Write;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cloudflare-sync.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .args(extra)
        .env("CLOUDFLARE_API_TOKEN", CF_TOKEN)
        .env("CLOUDFLARE_API_BASE", &cf.base)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Issue 9 item 16: after an id change, `--format cloudflare` through
/// deploy/cloudflare-sync.py replaces the `v=STSv1` TXT instead of adding a
/// second one (two make senders apply no policy, RFC 8461 §3.1), removes a
/// duplicate left by posting twice, replaces the host records, and leaves
/// other records at the same names alone.
#[test]
fn cloudflare_sync_replaces_the_sts_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mtasts.toml");
    let write = |mode: &str, a: &str| {
        std::fs::write(
            &config,
            format!("[[domain]]\nname = \"example.com\"\nmode = \"{mode}\"\nmx = [\"mx1.example.com\"]\nhost_a = [{a}]\ntlsrpt_rua = \"mailto:tls@example.com\"\n"),
        )
        .expect("write config");
    };
    let config_str = config.to_str().expect("utf-8");
    let output = || stdout_ok(&["records", "--config", config_str, "--format", "cloudflare"]);
    let sts_txts = |cf: &FakeCloudflare| -> Vec<(String, String)> {
        cf.records("zone0")
            .into_iter()
            .filter(|r| r.0 == "TXT" && r.2.contains("v=STSv1"))
            .map(|r| (r.2, r.3))
            .collect()
    };
    let cf = FakeCloudflare::start(&["example.com"]);
    cf.add(
        "zone0",
        "TXT",
        "_mta-sts.example.com",
        "\"google-site-verification=abc\"",
    );
    cf.add("zone0", "TXT", "example.com", "\"v=spf1 -all\"");

    // First run: creates the three records (two A).
    write("testing", "\"192.0.2.1\", \"192.0.2.2\"");
    let first = output();
    let (ok, out) = cloudflare_sync(&cf, &first, &[]);
    assert!(ok, "{out}");
    let sts = sts_txts(&cf);
    assert_eq!(sts.len(), 1, "{sts:?}");
    let id = expected_id(
        &Fixture {
            _dir: tempfile::tempdir().expect("tempdir"),
            config: config.clone(),
        },
        "example.com",
    );
    assert_eq!(sts[0].0, format!("\"v=STSv1; id={id};\""));
    let record_id = sts[0].1.clone();
    assert_eq!(
        cf.records("zone0").len(),
        2 + 4,
        "{:?}",
        cf.records("zone0")
    );

    // Unchanged input: nothing to send.
    let batches = cf.batches();
    let (ok, out) = cloudflare_sync(&cf, &first, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("0 batch(es)"), "{out}");
    assert_eq!(cf.batches(), batches);

    // The policy changes (new id), one address goes, another comes.
    write("enforce", "\"192.0.2.3\"");
    let second = output();
    assert_ne!(first, second);
    // A dry run changes nothing.
    let before = cf.records("zone0");
    let (ok, out) = cloudflare_sync(&cf, &second, &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(out.contains("replace TXT _mta-sts.example.com"), "{out}");
    assert_eq!(cf.records("zone0"), before);
    let (ok, out) = cloudflare_sync(&cf, &second, &[]);
    assert!(ok, "{out}");
    let sts = sts_txts(&cf);
    let new_id = expected_id(
        &Fixture {
            _dir: tempfile::tempdir().expect("tempdir"),
            config: config.clone(),
        },
        "example.com",
    );
    assert_ne!(new_id, id);
    assert_eq!(
        sts,
        [(format!("\"v=STSv1; id={new_id};\""), record_id.clone())],
        "replaced in place"
    );
    let a: Vec<String> = cf
        .records("zone0")
        .into_iter()
        .filter(|r| r.0 == "A")
        .map(|r| r.2)
        .collect();
    assert_eq!(a, ["192.0.2.3"]);

    // What the posts-only way leaves after an id change: two STSv1 TXT.
    // The script makes it one again.
    cf.add(
        "zone0",
        "TXT",
        "_mta-sts.example.com",
        &format!("\"v=STSv1; id={id};\""),
    );
    assert_eq!(sts_txts(&cf).len(), 2);
    let (ok, out) = cloudflare_sync(&cf, &second, &[]);
    assert!(ok, "{out}");
    assert_eq!(
        sts_txts(&cf),
        [(format!("\"v=STSv1; id={new_id};\""), record_id)]
    );

    // Records mtasts does not manage stay.
    let all = cf.records("zone0");
    assert!(
        all.iter()
            .any(|r| r.2 == "\"google-site-verification=abc\""),
        "{all:?}"
    );
    assert!(all.iter().any(|r| r.2 == "\"v=spf1 -all\""), "{all:?}");
    assert_eq!(all.len(), 2 + 3, "{all:?}");

    // A wrong token is an error, not a silent success.
    let mut bad = std::process::Command::new("python3");
    bad.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cloudflare-sync.py"))
        .env("CLOUDFLARE_API_TOKEN", "wrong")
        .env("CLOUDFLARE_API_BASE", &cf.base)
        .arg(dir.path().join("out.json"));
    std::fs::write(dir.path().join("out.json"), &second).expect("write");
    let out = bad.output().expect("python3 runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 403"));
}

/// Compares `got` with the golden file `tests/golden/<rel>` byte for byte,
/// or writes it when UPDATE_GOLDEN=1 (then review the diff in git).
fn golden(rel: &str, got: &[u8]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(rel);
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, got).expect("write golden");
        return;
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (create it with UPDATE_GOLDEN=1 cargo test --test records golden)",
            path.display()
        )
    });
    if want != got {
        let (want, got) = (String::from_utf8_lossy(&want), String::from_utf8_lossy(got));
        let line = want
            .split_inclusive('\n')
            .zip(got.split_inclusive('\n'))
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| want.lines().count().min(got.lines().count()));
        panic!(
            "{} differs from the output, first at line {}:\n  golden: {:?}\n  output: {:?}\n\
             If the change is intended: UPDATE_GOLDEN=1 cargo test --test records golden, then review `git diff tests/golden`",
            path.display(),
            line + 1,
            want.split_inclusive('\n').nth(line).unwrap_or(""),
            got.split_inclusive('\n').nth(line).unwrap_or(""),
        );
    }
}

/// Issue 9 item 17: the served policy body of each mode and every built-in
/// `records` format (one per template in templates/, each side of
/// delegation and the plain full set) against golden files, so that a
/// field wrong in every format alike is caught too.
#[test]
fn golden_policies_and_every_records_format() {
    let f = fixture();
    let config = f.config.to_str().expect("utf-8");
    for (mode, domain) in [
        ("enforce", "example.com"),
        ("testing", "b.example"),
        ("none", "bücher.example"),
    ] {
        let body = stdout_ok(&["policy", "--config", config, domain]);
        assert!(body.contains(&format!("\r\nmode: {mode}\r\n")), "{body:?}");
        golden(&format!("policy-{mode}.txt"), body.as_bytes());
    }

    // Every template is a format: `bind.zone.j2` is `--format bind`.
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    let mut names: Vec<String> = std::fs::read_dir(&templates)
        .expect("templates/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".j2").map(str::to_owned))
        .collect();
    names.sort();
    let formats: Vec<&str> = names
        .iter()
        .map(|n| n.split('.').next().unwrap_or(n))
        .collect();
    assert_eq!(
        formats,
        ["bind", "cloudflare", "csv", "json", "octodns", "route53"],
        "a new format needs its golden files (UPDATE_GOLDEN=1)"
    );
    for side in ["full", "customer", "provider"] {
        for (name, format) in names.iter().zip(&formats) {
            let out = records(&f, &["--format", format, "--for", side]);
            golden(&format!("records/{side}/{name}"), out.as_bytes());
        }
    }
    // Without --for and --format: the full set as a zone file.
    let out = records(&f, &[]);
    golden("records/full/bind.zone", out.as_bytes());
}
