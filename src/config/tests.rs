use super::diagnostic::line_col;
use super::*;
use crate::policy::{MAX_AGE_LIMIT, Mode, MxPattern};

#[test]
fn two_thread_sort_equals_a_sort() {
    let mut v: Vec<(u32, usize)> = (0..250_000usize)
        .map(|i| (((i * 7919) % 100_003) as u32, i))
        .collect();
    let mut want = v.clone();
    want.sort_unstable();
    sort_on_two_threads(&mut v);
    assert_eq!(v, want);
    let mut short = vec![(3, 0), (1, 1), (2, 2)];
    sort_on_two_threads(&mut short);
    assert_eq!(short, [(1, 1), (2, 2), (3, 0)]);
}

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_source(Path::new("test.toml"), Path::new("."), text.to_owned())
}

fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn eab_hmac_key_is_base64url() {
    let with = |key: &str| {
        format!(
            "[tls]\nmode = \"acme\"\neab_kid = \"kid-1\"\neab_hmac_key = \"{key}\"\n[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\n"
        )
    };
    // base64url without padding, and with the padding some CAs print.
    for (key, bytes) in [("_-8", vec![0xffu8, 0xef]), ("_-8=", vec![0xff, 0xef])] {
        let cfg = load(&with(key)).unwrap_or_else(|e| panic!("{key}: {e:?}"));
        assert_eq!(
            cfg.tls.acme.eab.as_ref().map(|e| e.hmac_key.clone()),
            Some(bytes)
        );
    }
    for key in ["not base64!", "/+8", "", "A"] {
        let errs = errors(&with(key));
        assert!(
            errs.iter()
                .any(|e| e.contains("tls.eab_hmac_key must be the base64url key")),
            "{key}: {errs:?}"
        );
    }
}

#[test]
fn example_config_is_valid() {
    let cfg = Config::example().expect("example config validates");
    assert!(!cfg.domains.is_empty());
    assert_eq!(cfg.server.https.port(), 8443);
    assert!(cfg.server.https.ip().is_loopback());
    assert!(cfg.server.http.ip().is_loopback());
}

#[test]
fn defaults_and_overrides() {
    let cfg = load(
        r#"
[defaults]
mode = "enforce"
max_age = "1w"
mx = ["mx1.example.net", "*.mx.example.net", "mx1.example.net"]
ttl = 300

[[domain]]
name = "Example.COM"

[[domain]]
name = "b.example"
mode = "testing"
max_age = 86400
mx = ["mail.b.example"]
tlsrpt_rua = "mailto:tls@b.example"
host_cname = "mta-sts.provider.example"
"#,
    )
    .expect("valid");
    assert_eq!(cfg.domains.len(), 2);
    let b = &cfg.domains[0];
    assert_eq!(b.name.as_str(), "b.example");
    assert_eq!(b.policy.mode, Mode::Testing);
    assert_eq!(b.policy.max_age, 86_400);
    assert_eq!(b.tlsrpt_rua[..], ["mailto:tls@b.example"]);
    assert!(matches!(&b.host, HostRecord::Cname(t) if t.as_str() == "mta-sts.provider.example"));
    let a = &cfg.domains[1];
    assert_eq!(a.name.as_str(), "example.com");
    assert_eq!(a.policy.mode, Mode::Enforce);
    assert_eq!(a.policy.max_age, 604_800);
    assert_eq!(a.ttl, 300);
    let mx: Vec<&str> = a.policy.mx.iter().map(MxPattern::as_str).collect();
    assert_eq!(mx, ["*.mx.example.net", "mx1.example.net"]);
}

#[test]
fn unknown_key_with_suggestion_and_position() {
    let errs = errors("[defaults]\nmdoe = \"enforce\"\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("test.toml:2:1: unknown field `mdoe`"),
        "{}",
        errs[0]
    );
    assert!(errs[0].contains("did you mean `mode`?"), "{}", errs[0]);
}

#[test]
fn every_error_is_reported_with_position() {
    let errs = errors(
        r#"[defaults]
mx = ["mx.example.com"]

[[domain]]
name = "a.example"
mode = "enforcing"

[[domain]]
name = "b.example"
max_age = 40000000

[[domain]]
name = "c.example"
mx = ["10.0.0.1", "mx.*.example"]

[[domain]]
name = "not a domain"

[[domain]]
name = "a.example"
"#,
    );
    let expected = [
        "test.toml:6:8: mode \"enforcing\"",
        "test.toml:10:11: max_age 40000000 s",
        "test.toml:14:7: mx: \"10.0.0.1\" looks like an IP",
        "test.toml:14:19: mx: \"mx.*.example\": a wildcard",
        "test.toml:17:8: domain name:",
        "test.toml:20:8: duplicate domain a.example (first defined at test.toml:5:8)",
    ];
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    for (e, want) in errs.iter().zip(expected) {
        assert!(e.starts_with(want), "{e:?} should start with {want:?}");
    }
}

#[test]
fn mx_required_unless_mode_none() {
    let errs = errors("[[domain]]\nname = \"a.example\"\nmode = \"enforce\"\n");
    assert!(errs[0].contains("needs at least one mx"), "{errs:?}");
    let cfg =
        load("[[domain]]\nname = \"a.example\"\nmode = \"none\"\n").expect("none needs no mx");
    assert!(cfg.domains[0].policy.mx.is_empty());
}

#[test]
fn retire_serves_mode_none_keeping_mx() {
    let cfg = load(
            "[[domain]]\nname = \"a.example\"\nmx_certs = [\"/nonexistent/mx.pem\"]\nmax_age = \"2d\"\nmode = \"enforce\"\nretire = true\n",
        )
        .expect("a retiring domain's unreadable mx source is only a warning");
    let a = &cfg.domains[0];
    assert!(a.retire);
    assert_eq!(a.policy.mode, Mode::None);
    assert!(a.policy.mx.is_empty());
    assert_eq!(a.policy.max_age, 172_800, "max_age as configured");
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.message.contains("a.example is retiring")),
        "{:?}",
        cfg.warnings
    );
    let cfg = load(
            "[[domain]]\nname = \"a.example\"\nmx = [\"mx2.example\", \"mx1.example\"]\nmode = \"enforce\"\nretire = true\n",
        )
        .expect("retiring");
    let mx: Vec<&str> = cfg.domains[0]
        .policy
        .mx
        .iter()
        .map(|m| m.as_str())
        .collect();
    assert_eq!(mx, ["mx1.example", "mx2.example"], "mx lines kept");
    assert_eq!(cfg.domains[0].policy.mode, Mode::None);
    let errs = errors("[defaults]\nretire = true\nmode = \"none\"\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("test.toml:2:10: `retire` belongs in the [[domain]]"),
        "{errs:?}"
    );
}

#[test]
fn short_max_age_is_a_warning() {
    let cfg = load("[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\nmax_age = \"1h\"\n")
        .expect("valid");
    assert_eq!(cfg.domains[0].policy.max_age, 3600);
    assert_eq!(cfg.warnings.len(), 1);
    assert!(
        cfg.warnings[0].to_string().starts_with("test.toml:4:11:"),
        "{}",
        cfg.warnings[0]
    );
}

#[test]
fn max_age_bounds() {
    let ok = load("[[domain]]\nname = \"a.example\"\nmode = \"none\"\nmax_age = 31557600\n")
        .expect("upper bound ok");
    assert_eq!(ok.domains[0].policy.max_age, MAX_AGE_LIMIT);
    let errs = errors("[[domain]]\nname = \"a.example\"\nmode = \"none\"\nmax_age = -1\n");
    assert!(errs[0].contains("negative"), "{errs:?}");
}

#[test]
fn idn_domain_to_a_label() {
    let cfg = load("[[domain]]\nname = \"bücher.example\"\nmode = \"none\"\n").expect("idn");
    assert_eq!(cfg.domains[0].name.as_str(), "xn--bcher-kva.example");
}

#[test]
fn server_addresses_and_limits() {
    let cfg = load(
            "[server]\nhttps = \"127.0.0.1:9443\"\nhttp = \"127.0.0.1:9080\"\nidle_timeout = \"30s\"\nmax_connections = 5\n",
        )
        .expect("valid");
    assert_eq!(cfg.server.https.port(), 9443);
    assert_eq!(cfg.server.limits.idle_timeout, Duration::from_secs(30));
    assert_eq!(cfg.server.limits.max_connections, 5);
    let errs = errors("[server]\nhttps = \"localhost\"\n");
    assert!(
        errs[0].starts_with("test.toml:2:9: server.https"),
        "{errs:?}"
    );
}

#[test]
fn connection_budget_keys() {
    let cfg = load(
            "[server]\nmax_connections_per_ip = 7\nmax_connection_age = \"10m\"\n[admin]\nlisten = \"127.0.0.1:8081\"\ntoken_file = \"t\"\nmax_connections = 3\n",
        )
        .expect("valid");
    assert_eq!(cfg.server.limits.max_connections_per_ip, 7);
    assert_eq!(
        cfg.server.limits.max_connection_age,
        Duration::from_secs(600)
    );
    assert_eq!(cfg.admin.as_ref().map(|a| a.max_connections), Some(3));
    let errs = errors(
        "[server]\nmax_connections_per_ip = 0\n[admin]\nlisten = \"127.0.0.1:8081\"\ntoken_file = \"t\"\nmax_connections = -1\n",
    );
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].starts_with("test.toml:2:26: server.max_connections_per_ip"),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("test.toml:6:19: admin.max_connections"),
        "{errs:?}"
    );
}

#[test]
fn tls_mode_values() {
    let errs = errors("[tls]\nmode = \"letsencrypt\"\n");
    assert!(errs[0].contains("tls.mode"), "{errs:?}");
}

#[test]
fn acme_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roots = dir.path().join("roots.pem");
    std::fs::write(
        &roots,
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let cfg = Config::from_source(
        Path::new("t.toml"),
        dir.path(),
        r#"
[tls]
mode = "acme"
directory = "https://127.0.0.1:14000/dir"
contact = "admin@example.com"
eab_kid = "kid-1"
eab_hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
ca_roots = "roots.pem"
challenge = "http-01"
key_type = "rsa2048"
renew_before = "30d"
max_concurrent_orders = 2
orders_per_hour = 50
retry_initial = "1s"
retry_max = "1m"
precheck_dns = false
precheck_resolver = "192.0.2.53"
server_addresses = ["192.0.2.1", "2001:db8::1"]
"#
        .to_owned(),
    )
    .expect("valid");
    let acme = &cfg.tls.acme;
    assert_eq!(cfg.tls.mode, TlsMode::Acme);
    assert_eq!(acme.contact, ["mailto:admin@example.com"]);
    assert_eq!(acme.eab.as_ref().map(|e| e.hmac_key.len()), Some(48));
    assert_eq!(acme.ca_roots.as_deref(), Some(roots.as_path()));
    assert_eq!(acme.challenge, ChallengeKind::Http01);
    assert_eq!(acme.key_type, KeyType::Rsa2048);
    assert_eq!(acme.renew_before, Some(Duration::from_secs(30 * 86_400)));
    assert_eq!(acme.max_concurrent_orders, 2);
    assert_eq!(acme.orders_per_hour, 50);
    assert!(!acme.precheck_dns);
    assert_eq!(acme.precheck_resolver, Some(([192, 0, 2, 53], 53).into()));
    assert_eq!(acme.server_addresses.len(), 2);

    let defaults = Config::example().expect("example").tls.acme;
    assert_eq!(defaults.directory, LETS_ENCRYPT);
    assert_eq!(defaults.challenge, ChallengeKind::TlsAlpn01);
    assert!(defaults.precheck_dns);
}

#[test]
fn acme_key_errors_are_located() {
    let errs =
        errors("[tls]\nmode = \"acme\"\ndirectory = \"http://x/dir\"\nchalenge = \"http-01\"\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("test.toml:4:1: unknown field `chalenge`"),
        "{errs:?}"
    );
    assert!(errs[0].contains("did you mean `challenge`?"), "{errs:?}");
    let errs = errors(
        "[tls]\ndirectory = \"http://x/dir\"\nkey_type = \"ed25519\"\neab_kid = \"k\"\nmax_concurrent_orders = 0\nretry_initial = \"2h\"\nretry_max = \"1h\"\n",
    );
    let expected = [
        "test.toml:2:13: tls.directory",
        "test.toml:4:11: tls.eab_kid and tls.eab_hmac_key",
        "test.toml:3:12: tls.key_type",
        "test.toml:5:25: tls.max_concurrent_orders",
        "test.toml:7:13: tls.retry_max must not be shorter",
    ];
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    for (e, want) in errs.iter().zip(expected) {
        assert!(e.starts_with(want), "{e:?} should start with {want:?}");
    }
}

#[test]
fn rua_validation() {
    let errs = errors(
        "[[domain]]\nname = \"a.example\"\nmode = \"none\"\ntlsrpt_rua = [\"ftp://x\", \"mailto:a b@c\"]\n",
    );
    assert_eq!(errs.len(), 2, "{errs:?}");
}

#[test]
fn cname_and_addresses_conflict() {
    let errs = errors(
        "[[domain]]\nname = \"a.example\"\nmode = \"none\"\nhost_a = [\"192.0.2.1\"]\nhost_cname = \"x.example\"\n",
    );
    assert!(
        errs[0].contains("host_cname cannot be combined"),
        "{errs:?}"
    );
}

#[test]
fn delegation_section() {
    let cfg = load(
            "[delegation]\nzone = \"STS.Provider.example.\"\npolicy_host = \"mta-sts.provider.example\"\nhost_a = [\"192.0.2.1\"]\n",
        )
        .expect("valid");
    let d = cfg.delegation.expect("delegation");
    assert_eq!(d.zone.as_str(), "sts.provider.example");
    assert_eq!(d.host_a.len(), 1);
    assert_eq!(d.ttl, 3600);
    let errs = errors("[delegation]\nzone = \"sts.provider.example\"\nhost_a = [\"x\"]\n");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].starts_with("test.toml:1:1: missing `policy_host`"),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("test.toml:3:11: delegation.host_a"),
        "{errs:?}"
    );
}

#[test]
fn dns_update_section() {
    let cfg = load(
            "[dns.update]\nserver = \"127.0.0.1\"\nzone = \"example.test\"\nkey_name = \"mtasts-key\"\nsecret = \"qk1fGdIKEse3NGRAi3HOSyfkEgen5rqe+m6KbTKax+U=\"\n",
        )
        .expect("valid");
    let u = cfg.dns_update.expect("dns.update");
    assert_eq!(u.server, "127.0.0.1:53".parse().expect("addr"));
    assert_eq!(u.algorithm, TsigAlgorithm::HmacSha256);
    assert_eq!(u.secret.bytes().len(), 32);
    assert!(!format!("{u:?}").contains("qk1f"), "secret never in Debug");
    let errs = errors(
        "[dns.update]\nserver = \"ns1:53\"\nzone = \"example.test\"\nkey_name = \"k\"\nalgorithm = \"hmac-md5\"\nsecret = \"!!\"\n",
    );
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs[0].starts_with("test.toml:2:10: dns.update.server"),
        "{errs:?}"
    );
    assert!(errs[1].contains("hmac-md5"), "{errs:?}");
    assert!(
        errs[2].contains("dns.update.secret: not valid base64"),
        "{errs:?}"
    );
}

#[test]
fn line_col_counts_chars() {
    let lc = |t: &str, o| line_col(t, &line_starts(t), o);
    assert_eq!(lc("ab\ncd", 4), (2, 2));
    assert_eq!(lc("ä\nx", 3), (2, 1));
    assert_eq!(lc("äb", 2), (1, 2));
    assert_eq!(lc("ab\n", 3), (2, 1));
    assert_eq!(lc("", 0), (1, 1));
}
