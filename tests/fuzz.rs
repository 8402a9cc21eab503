//! Property tests over every parser that reads outside input (issue 9,
//! "figures"): config files, the policy body and TXT records as `check`
//! reads them, zone-file quoting (read back by hickory's zone parser), SMTP
//! replies, DNS answers from a server on loopback, names, Host headers,
//! mail server certificates and the retirement state file.
//!
//! Each property asserts more than "no panic": what we publish parses back
//! under our own strict sender-side parser, quoting round-trips, accepted
//! names are already normal. The number of cases per property is proptest's
//! `PROPTEST_CASES` (256 by default, what CI runs); `bench/fuzz.sh` runs a
//! million and more in a release build and prints the table in
//! docs/RELIABILITY.md. Each property prints `fuzz: <name>: <cases>` so the
//! bench can count what ran.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::txt::Parser;
use mtasts::check::parse::{is_sts_record, parse_policy, parse_sts_txt, parse_tlsrpt};
use mtasts::check::probe::read_reply;
use mtasts::config::Config;
use mtasts::dns::quote_txt;
use mtasts::http::normalize_host;
use mtasts::policy::{DomainName, MAX_BODY_BYTES, MxPattern, PolicyId};
use mtasts::resolve::{Protocol, Resolver};
use proptest::prelude::*;

/// Counts the cases of one property and prints the count when dropped (at
/// the end of the test, pass or fail).
struct Cases(&'static str, AtomicU64);

impl Cases {
    fn new(name: &'static str) -> Self {
        Cases(name, AtomicU64::new(0))
    }
    fn one(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Cases {
    fn drop(&mut self) {
        println!("fuzz: {}: {}", self.0, self.1.load(Ordering::Relaxed));
    }
}

// ---------------------------------------------------------------------------
// Generators.

/// A value for one config key: mostly plausible, often at or past an edge.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"enforce\"".to_owned()),
        Just("\"testing\"".to_owned()),
        Just("\"none\"".to_owned()),
        Just("\"forever\"".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("31557600".to_owned()),
        Just("31557601".to_owned()),
        Just("\"500000000000y\"".to_owned()),
        Just("\"10y\"".to_owned()),
        Just("true".to_owned()),
        Just("[]".to_owned()),
        Just("[1, \"a\", true]".to_owned()),
        Just("\"https://\"".to_owned()),
        Just("\"mailto:x\"".to_owned()),
        Just("\"mailto:tls@example.com\"".to_owned()),
        Just("[\"mx.example.com\", \"*.mx.example.com\"]".to_owned()),
        Just("[\"xn--zz.example\"]".to_owned()),
        Just("[\"*.*.example\", \"192.0.2.1\", \"mx.\"]".to_owned()),
        Just("[\"/dev/zero\"]".to_owned()),
        Just("[\"/nonexistent/*.pem\"]".to_owned()),
        Just("[\"192.0.2.1\", \"::1\", \"nope\"]".to_owned()),
        any::<i64>().prop_map(|i| i.to_string()),
        "[a-z0-9 .*:/@!,%-]{0,40}".prop_map(|s| format!("{s:?}")),
        "\\PC{0,20}".prop_map(|s| format!("{s:?}")),
        proptest::collection::vec("[a-z0-9*.-]{1,30}", 0..6).prop_map(|v| format!("{v:?}")),
    ]
}

const POLICY_KEYS: &[&str] = &[
    "mode",
    "max_age",
    "mx",
    "mx_certs",
    "tlsrpt_rua",
    "ttl",
    "host_a",
    "host_aaaa",
    "host_cname",
    "retire",
    "name",
    "mdoe",
];

const SERVER_KEYS: &[&str] = &[
    "handshake_timeout",
    "header_read_timeout",
    "idle_timeout",
    "max_connection_age",
    "shutdown_timeout",
    "max_connections",
    "max_connections_per_ip",
    "https",
];

fn section(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::collection::vec((proptest::sample::select(keys), toml_value()), 0..6).prop_map(
        |pairs| {
            let mut seen = std::collections::HashSet::new();
            pairs
                .into_iter()
                .filter(|(k, _)| seen.insert(*k))
                .map(|(k, v)| format!("{k} = {v}\n"))
                .collect()
        },
    )
}

/// A config file close to a real one: a server section, defaults and a few
/// domains whose keys and values come from the edges above.
fn near_valid_config() -> impl Strategy<Value = String> {
    (
        section(SERVER_KEYS),
        section(POLICY_KEYS),
        proptest::collection::vec(("[a-z0-9.-]{1,20}", section(POLICY_KEYS)), 0..4),
        "[a-z]{0,3}[=\\[\\]\"]{0,2}",
    )
        .prop_map(|(server, defaults, domains, junk)| {
            let mut out = format!("[server]\n{server}\n[defaults]\n{defaults}\n");
            for (name, body) in domains {
                out.push_str(&format!("[[domain]]\nname = {name:?}\n{body}\n"));
            }
            out.push_str(&junk);
            out
        })
}

fn load(text: String) -> Result<Config, mtasts::config::ConfigErrors> {
    Config::from_source(Path::new("/fuzz/mtasts.toml"), Path::new("/fuzz"), text)
}

/// What every loaded config must satisfy: each policy fits in what senders
/// read, and our own strict sender-side parser accepts it as it is.
fn published_policies_parse_back(cfg: &Config) {
    for d in &cfg.domains {
        let body = d.policy.render();
        assert!(
            body.len() <= MAX_BODY_BYTES,
            "{}: {} bytes",
            d.name,
            body.len()
        );
        assert_eq!(body.len(), d.policy.rendered_len());
        let parsed = parse_policy(&body).unwrap_or_else(|e| panic!("{}: {e}: {body:?}", d.name));
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        assert_eq!(parsed.policy.mode, d.policy.mode);
        assert_eq!(parsed.policy.mx[..], d.policy.mx[..]);
        assert_eq!(parsed.policy.max_age, d.policy.max_age);
        let id = PolicyId::for_body(&body);
        let txt = format!("v=STSv1; id={id};");
        assert!(is_sts_record(&txt));
        assert_eq!(parse_sts_txt(&txt).expect("our TXT"), id);
    }
}

// ---------------------------------------------------------------------------
// Properties.

/// Cases per property: `PROPTEST_CASES`, else 256.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256)
}

/// Runs `test` on `cases()` values of `strategy`, prints the count, and
/// fails with proptest's minimal failing input.
fn run<S: Strategy>(
    name: &'static str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let counter = Cases::new(name);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: cases(),
        failure_persistence: None,
        ..Default::default()
    });
    let result = runner.run(&strategy, |v| {
        counter.one();
        test(v)
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn config_from_arbitrary_text() {
    run("config_from_arbitrary_text", "\\PC{0,300}", |text| {
        if let Ok(cfg) = load(text) {
            published_policies_parse_back(&cfg);
        }
        Ok(())
    });
}

#[test]
fn config_near_valid() {
    run("config_near_valid", near_valid_config(), |text| {
        match load(text.clone()) {
            Ok(cfg) => published_policies_parse_back(&cfg),
            Err(errs) => {
                // Every error is located inside the file it names.
                prop_assert!(!errs.errors.is_empty());
                let lines = text.lines().count().max(1) + 1;
                for e in &errs.errors {
                    prop_assert!(e.line <= lines, "{e} beyond {lines} lines:\n{text}");
                }
            }
        }
        Ok(())
    });
}

#[test]
fn policy_body_parser() {
    run(
        "policy_body_parser",
        proptest::collection::vec(any::<u8>(), 0..400),
        |body| {
            if let Ok(p) = parse_policy(&body) {
                prop_assert!(p.policy.max_age <= 31_557_600);
            }
            Ok(())
        },
    );
}

#[test]
fn policy_body_near_valid() {
    let line = prop_oneof![
        Just("version: STSv1".to_owned()),
        Just("mode: enforce".to_owned()),
        Just("mode: testing".to_owned()),
        Just("mode: none".to_owned()),
        Just("max_age: 86400".to_owned()),
        Just("max_age: +86400".to_owned()),
        Just("max_age: 99999999999999999999999".to_owned()),
        Just(String::new()),
        "mx: [a-z0-9*.-]{0,30}",
        "[a-z_]{1,8}: \\PC{0,20}",
    ];
    let end = prop_oneof![Just("\r\n"), Just("\n"), Just("")];
    let body = proptest::collection::vec((line, end), 0..10).prop_map(|v| {
        v.into_iter()
            .map(|(l, e)| format!("{l}{e}"))
            .collect::<String>()
    });
    run("policy_body_near_valid", body, |body| {
        if let Ok(p) = parse_policy(body.as_bytes()) {
            // Rendering what was parsed gives a body that parses the same.
            let again = mtasts::policy::Policy {
                mode: p.policy.mode,
                mx: p.policy.mx.clone().into(),
                max_age: p.policy.max_age,
            };
            let q = parse_policy(&again.render()).expect("rendered policy");
            prop_assert_eq!(q.policy.mx, p.policy.mx);
            prop_assert_eq!(q.policy.max_age, p.policy.max_age);
            prop_assert_eq!(q.policy.mode, p.policy.mode);
        }
        Ok(())
    });
}

#[test]
fn txt_record_parsers() {
    let text = prop_oneof![
        "\\PC{0,80}",
        "v=STSv1;[ ;a-z0-9=]{0,40}",
        "v=TLSRPTv1;[ ;a-z0-9=:@/.,!%]{0,60}",
    ];
    run("txt_record_parsers", text, |text| {
        if let Ok(id) = parse_sts_txt(&text) {
            let s = id.to_string();
            prop_assert!(
                (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
            );
            prop_assert!(is_sts_record(&text));
        }
        if let Ok(uris) = parse_tlsrpt(&text) {
            prop_assert!(!uris.is_empty());
        }
        Ok(())
    });
}

/// TXT data of a one-record zone, as hickory's zone parser reads it.
fn hickory_txt(zone: &str) -> Result<Vec<u8>, TestCaseError> {
    let (_, records) = Parser::new(zone, None, Some(Name::root()))
        .parse()
        .map_err(|e| TestCaseError::fail(format!("{e}: {zone}")))?;
    Ok(records
        .values()
        .flat_map(|set| set.records_without_rrsigs())
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .flat_map(|b| b.iter().copied())
                    .collect::<Vec<u8>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect())
}

/// RFC 1035 §5.1 character-strings of a quoted TXT value, decoded: `\X`
/// is X, `\DDD` is the octet DDD (decimal).
fn rfc1035_strings(quoted: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut bytes = quoted.bytes().peekable();
    loop {
        match bytes.next() {
            None => return Ok(out),
            Some(b' ') => continue,
            Some(b'"') => {}
            Some(b) => return Err(format!("unquoted byte {b}")),
        }
        let mut s = Vec::new();
        loop {
            match bytes.next().ok_or("unterminated")? {
                b'"' => break,
                b'\\' => {
                    let c = bytes.next().ok_or("dangling escape")?;
                    if c.is_ascii_digit() {
                        let d2 = bytes.next().ok_or("short \\DDD")?;
                        let d3 = bytes.next().ok_or("short \\DDD")?;
                        let v = [c, d2, d3]
                            .iter()
                            .try_fold(0u32, |acc, d| {
                                d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
                            })
                            .ok_or("bad \\DDD")?;
                        s.push(u8::try_from(v).map_err(|_| "\\DDD over 255")?);
                    } else {
                        s.push(c);
                    }
                }
                b if (0x20..=0x7e).contains(&b) => s.push(b),
                b => return Err(format!("raw byte {b} inside quotes")),
            }
        }
        out.push(s);
    }
}

#[test]
fn zone_quoting_round_trips() {
    run("zone_quoting_round_trips", "\\PC{0,600}", |value| {
        let quoted = quote_txt(&value);
        let strings = rfc1035_strings(&quoted).map_err(TestCaseError::fail)?;
        prop_assert!(strings.iter().all(|s| s.len() <= 255), "{quoted}");
        prop_assert_eq!(strings.concat(), value.as_bytes().to_vec());
        Ok(())
    });
}

/// hickory's zone parser reads what we quote back to the same bytes. It
/// decodes `\DDD` wrongly (hickory-proto 0.26.3 zone_lex.rs builds a
/// `char` from `(d1 << 16) + (d2 << 8) + d3`), so this property covers
/// printable ASCII, quotes and backslashes included; the one above covers
/// every byte against RFC 1035 itself.
#[test]
fn zone_quoting_round_trips_through_hickory() {
    run(
        "zone_quoting_round_trips_through_hickory",
        "[ -~]{0,600}",
        |value| {
            let zone = format!("t.example. 300 IN TXT {}\n", quote_txt(&value));
            prop_assert_eq!(hickory_txt(&zone)?, value.as_bytes().to_vec());
            Ok(())
        },
    );
}

#[test]
fn names_and_patterns() {
    let text = prop_oneof![
        "\\PC{0,70}",
        "[a-zA-Z0-9*.-]{0,70}",
        "(xn--)?[a-z0-9-]{0,20}\\.[a-z]{2,5}\\.?",
    ];
    run("names_and_patterns", text, |text| {
        if let Ok(d) = DomainName::parse(&text) {
            prop_assert!(d.as_str().len() <= DomainName::MAX_LEN);
            prop_assert_eq!(
                DomainName::parse(d.as_str()).ok(),
                Some(d.clone()),
                "normal form is stable"
            );
        }
        if let Ok(p) = MxPattern::parse(&text) {
            prop_assert!(p.as_str().len() <= 253);
            prop_assert_eq!(MxPattern::parse(p.as_str()).ok(), Some(p.clone()));
        }
        if let Some(h) = normalize_host(&text) {
            prop_assert!(!h.is_empty() && !h.bytes().any(|b| b.is_ascii_uppercase()));
        }
        Ok(())
    });
}

#[test]
fn smtp_reply_reader() {
    let input = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        proptest::collection::vec(
            prop_oneof![
                "2[0-5]0[ -][ -~]{0,30}\r\n",
                "250\r\n",
                "[0-9]{0,4}[ -]?\\PC{0,10}\n",
            ],
            0..8
        )
        .prop_map(|v| v.concat().into_bytes()),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    run("smtp_reply_reader", input, |input| {
        let mut reader = tokio::io::BufReader::new(input.as_slice());
        if let Ok(reply) = rt.block_on(read_reply(&mut reader)) {
            // RFC 5321 §4.2.1: 2yz..5yz with y in 0..=5.
            prop_assert!((200..=559).contains(&reply.code) && reply.code / 10 % 10 <= 5);
            prop_assert!(!reply.lines.is_empty());
        }
        Ok(())
    });
}

#[test]
fn mail_server_certificates() {
    let pem = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|der| {
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                data_encoding::BASE64.encode(&der)
            )
            .into_bytes()
        }),
    ];
    let now = time::OffsetDateTime::now_utc();
    run("mail_server_certificates", pem, |pem| {
        // Random bytes are never a certificate with names.
        prop_assert!(mtasts::mxcert::names_from_pem(Path::new("/fuzz.pem"), &pem, now).is_err());
        Ok(())
    });
}

#[test]
fn retirement_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::example().expect("example");
    let input = (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        "\\PC{0,40}",
    );
    run(
        "retirement_state_file",
        input,
        |(since, old, ttl, published, now, junk)| {
            for text in [
                format!(
                    r#"{{"version": 1, "domains": {{"a.example": {{"since": {since}, "old_max_age": {old}, "ttl": {ttl}, "records": []}}}}, "max_age_published": {{"a.example": {published}}}}}"#
                ),
                junk,
            ] {
                std::fs::write(mtasts::retire::path(dir.path()), &text).expect("write");
                if let Ok(state) = mtasts::retire::State::load(dir.path()) {
                    let lines = mtasts::retire::status(&state, &cfg, now);
                    prop_assert!(lines.len() >= state.domains.len());
                    for e in state.domains.values() {
                        prop_assert!(e.safe_after() >= e.since);
                    }
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// DNS answers: a UDP server on loopback answers every query of a case with
// that case's answer (the query's id and question kept, so it reaches the
// parser): either records built with hickory (CNAME chains, loops, MX, A,
// any response code, TC set) or random bytes after the question. The real
// resolver reads them; a bad answer is an error or a timeout, never a
// panic or a hang.

#[derive(Debug, Clone)]
enum Answer {
    Records {
        rcode: u16,
        truncated: bool,
        records: Vec<(usize, u8, usize)>,
    },
    Raw(Vec<u8>),
}

const OWNERS: &[&str] = &[
    "q.fuzz.example.",
    "a.fuzz.example.",
    "b.fuzz.example.",
    "Q.FUZZ.example.",
    "other.example.",
];

fn dns_answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => (0u16..24, proptest::bool::weighted(0.1), proptest::collection::vec((0..OWNERS.len(), 0u8..4, 0..OWNERS.len()), 0..12))
            .prop_map(|(rcode, truncated, records)| Answer::Records { rcode, truncated, records }),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Answer::Raw),
    ]
}

fn answer_bytes(query: &[u8], answer: &Answer) -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, CNAME, MX};
    let q = Message::from_vec(query).ok()?;
    match answer {
        Answer::Raw(tail) => {
            let mut out = q.to_vec().ok()?;
            out[2] |= 0x80;
            out.extend_from_slice(tail);
            if let (Some(count), Some(first)) = (out.get_mut(6..8), tail.first()) {
                count.copy_from_slice(&[0, *first % 8]);
            }
            Some(out)
        }
        Answer::Records {
            rcode,
            truncated,
            records,
        } => {
            let mut m = Message::response(q.metadata.id, q.metadata.op_code);
            m.metadata.message_type = MessageType::Response;
            m.metadata.response_code =
                ResponseCode::from_low(u8::try_from(*rcode % 16).unwrap_or(0));
            m.metadata.truncation = *truncated;
            m.add_queries(q.queries.clone());
            for (owner, kind, target) in records {
                let owner = Name::from_ascii(OWNERS[*owner]).ok()?;
                let target = Name::from_ascii(OWNERS[*target]).ok()?;
                let data = match kind {
                    0 => RData::CNAME(CNAME(target)),
                    1 | 2 => RData::MX(MX::new(u16::from(*kind), target)),
                    _ => RData::A(A::new(192, 0, 2, 1)),
                };
                m.add_answer(Record::from_rdata(owner, 60, data));
            }
            m.to_vec().ok()
        }
    }
}

#[test]
fn dns_answers_from_a_server() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256u32);
    let counter = Cases::new("dns_answers_from_a_server");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let current: std::sync::Arc<std::sync::Mutex<Option<Answer>>> = Default::default();
    let addr: SocketAddr = rt.block_on(async {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = server.local_addr().expect("addr");
        let current = current.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1232];
            loop {
                let Ok((n, from)) = server.recv_from(&mut buf).await else {
                    continue;
                };
                let answer = current.lock().ok().and_then(|a| a.clone());
                if let Some(bytes) = answer.and_then(|a| answer_bytes(&buf[..n], &a)) {
                    let _ = server.send_to(&bytes, from).await;
                }
            }
        });
        addr
    });
    let resolver = Resolver::new(addr, Protocol::Udp, Duration::from_millis(50));
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..Default::default()
    });
    let result = runner.run(&dns_answer(), |answer| {
        counter.one();
        if let Ok(mut slot) = current.lock() {
            *slot = Some(answer);
        }
        match rt.block_on(resolver.lookup("q.fuzz.example", RecordType::MX)) {
            Ok(records) => {
                // Only records of the type asked for, at the end of the chain.
                prop_assert!(records.iter().all(|r| r.record_type() == RecordType::MX));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
