//! Config validation through the real binary (issue 9 items 4, 8, 11, 12,
//! 13): `check-config` refuses what senders or the server could not use,
//! with file:line:column; a reload that would break keeps what is served;
//! long durations never panic a connection; retiring keeps mx lines.

mod common;

use std::path::Path;

use common::client::TlsClient;
use common::{ServeProc, mtasts, output_text};

/// Writes `text` as `mtasts.toml` in a new directory and runs check-config.
fn check(text: &str) -> (Option<i32>, String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::write(dir.path(), "mtasts.toml", text);
    let out = mtasts(&["check-config", "--config", &path.display().to_string()]);
    let (stdout, stderr) = output_text(&out);
    (out.status.code(), stdout, stderr, dir)
}

fn at(dir: &Path, line: usize, col: usize) -> String {
    format!("{}:{line}:{col}: ", dir.join("mtasts.toml").display())
}

#[test]
fn defaults_are_validated_with_no_domain() {
    let (code, stdout, stderr, dir) =
        check("[defaults]\nmode = \"strict\"\nmax_age = \"forever\"\nttl = -1\n");
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    for want in [
        format!("{}mode \"strict\" is not one of", at(dir.path(), 2, 8)),
        format!(
            "{}max_age: \"forever\" is not a duration",
            at(dir.path(), 3, 11)
        ),
        format!("{}ttl must be between", at(dir.path(), 4, 7)),
        "3 errors".to_owned(),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }

    // Reported once, not once more for each domain that inherits it.
    let (code, _, stderr, _dir) = check(
        "[defaults]\nmax_age = \"forever\"\nmx = [\"mx.example.net\"]\n\
         [[domain]]\nname = \"a.example\"\n[[domain]]\nname = \"b.example\"\n",
    );
    assert_eq!(code, Some(1));
    assert_eq!(stderr.matches("is not a duration").count(), 1, "{stderr}");
    assert!(stderr.contains("1 error"), "{stderr}");

    // Valid defaults with no domain (a provider that adds every domain
    // through the admin API) are fine, and enforce needs no mx there.
    let (code, stdout, stderr, _dir) = check("[defaults]\nmode = \"enforce\"\nmax_age = \"1w\"\n");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok, 0 domains"), "{stdout}");
}

#[test]
fn every_duration_is_bounded() {
    for (section, key) in [
        ("server", "handshake_timeout"),
        ("server", "header_read_timeout"),
        ("server", "idle_timeout"),
        ("server", "max_connection_age"),
        ("server", "shutdown_timeout"),
        ("tls", "retry_initial"),
        ("tls", "retry_max"),
        ("tls", "renew_before"),
    ] {
        for value in ["9223372036854775807", "\"500000000000y\"", "\"11y\""] {
            let (code, stdout, stderr, dir) = check(&format!("[{section}]\n{key} = {value}\n"));
            assert_eq!(code, Some(1), "{section}.{key} = {value}: {stdout}{stderr}");
            let want = format!("{}{section}.{key}: ", at(dir.path(), 2, key.len() + 4));
            assert!(
                stderr.contains(&want) && stderr.contains("longer than ten years"),
                "{section}.{key} = {value}: missing {want:?} in:\n{stderr}"
            );
        }
        // Ten years is the limit and is accepted.
        let max = if key == "retry_initial" {
            "retry_max = 315576000\n"
        } else {
            ""
        };
        let (code, stdout, stderr, _dir) = check(&format!("[{section}]\n{key} = 315576000\n{max}"));
        assert_eq!(code, Some(0), "{section}.{key}: {stdout}{stderr}");
    }
}

/// The longest accepted durations do not overflow an instant: connections
/// are served, over HTTP/1.1 and HTTP/2, and the server stops cleanly.
#[tokio::test]
async fn the_longest_durations_serve_without_panicking() {
    common::init_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http) = (common::loopback(), common::loopback());
    let ten_years = "\"3652d\"";
    let config = common::write(
        dir.path(),
        "mtasts.toml",
        &format!(
            "{}handshake_timeout = {ten_years}\nheader_read_timeout = {ten_years}\n\
             idle_timeout = {ten_years}\nmax_connection_age = {ten_years}\n\
             [defaults]\nmx = [\"mx.example.net\"]\n[[domain]]\nname = \"a.example\"\n",
            common::server_section(https, http, &dir.path().join("state"))
        ),
    );
    let serve = ServeProc::start(&config, https, http);
    let client = TlsClient::trusting_pem_file(&dir.path().join("state/ca/ca.pem"));
    for _ in 0..3 {
        let r = client
            .get_policy(https, "a.example")
            .await
            .expect("policy over HTTPS");
        assert_eq!(r.status, 200);
        assert!(String::from_utf8_lossy(&r.body).contains("mx: mx.example.net\r\n"));
    }
    let log = serve.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn tlsrpt_rua_follows_rfc_8460() {
    let entry = |rua: &str| {
        format!("[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\ntlsrpt_rua = {rua}\n")
    };
    for (rua, why) in [
        ("\"https://\"", "has no host after https://"),
        ("\"https:///reports\"", "has no host after https://"),
        ("\"mailto:x\"", "expected mailto:local@domain"),
        ("\"mailto:@a.example\"", "empty local part"),
        ("\"mailto:tls@a\"", "mail domain"),
        ("\"mailto:tls!x@a.example\"", "contains '!'"),
        ("\"https://r.example/a,b\"", "contains ','"),
        ("\"mailto:tlś@a.example\"", "non-ASCII"),
        ("\"https://r.example/%zz\"", "two hex digits"),
        ("\"https://r.example:99999/\"", "invalid port"),
        ("\"https://xn--zz.example/\"", "not valid punycode"),
        (
            "[\"mailto:tls@a.example\", 7]",
            "item 2 is a integer, not a string URI",
        ),
        ("[\"mailto:tls@a.example\", true]", "item 2 is a boolean"),
        ("\"ftp://r.example\"", "must start with"),
    ] {
        let (code, stdout, stderr, dir) = check(&entry(rua));
        assert_eq!(code, Some(1), "{rua}: {stdout}{stderr}");
        let want = format!("{}tlsrpt_rua", at(dir.path(), 4, 14));
        assert!(
            stderr.contains(&want) && stderr.contains(why),
            "{rua}: missing {want:?} and {why:?} in:\n{stderr}"
        );
    }
    for rua in [
        "\"mailto:tls@a.example\"",
        "\"mailto:tls%21x@a.example\"",
        "\"https://r.example/tlsrpt\"",
        "\"https://r.example:8443/v1/a%2Cb?x=1\"",
        "\"https://[2001:db8::1]:443/r\"",
        "[\"mailto:a@b.example\", \"https://192.0.2.1/r\"]",
    ] {
        let (code, stdout, stderr, _dir) = check(&entry(rua));
        assert_eq!(code, Some(0), "{rua}: {stdout}{stderr}");
    }
}

#[test]
fn bad_a_labels_are_refused_and_mx_with_mx_certs_warns() {
    let (code, _, stderr, dir) =
        check("[[domain]]\nname = \"xn--zz.example\"\nmx = [\"mx.example.net\"]\n");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&at(dir.path(), 2, 8)) && stderr.contains("not valid punycode"),
        "{stderr}"
    );
    let (code, _, stderr, dir) =
        check("[[domain]]\nname = \"a.example\"\nmx = [\"mx.xn--a.example\"]\n");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&at(dir.path(), 3, 7)) && stderr.contains("not valid punycode"),
        "{stderr}"
    );
    // A real A-label is fine.
    let (code, stdout, stderr, _dir) = check(
        "[[domain]]\nname = \"xn--bcher-kva.example\"\nmx = [\"mx.xn--bcher-kva.example\"]\n",
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    let (code, stdout, stderr, dir) = check(
        "[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\nmx_certs = [\"/nonexistent.pem\"]\n",
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains(&at(dir.path(), 4, 12))
            && all.contains("both mx and mx_certs are set; mx wins and mx_certs is ignored"),
        "{all}"
    );
    assert!(stdout.contains("1 warning"), "{stdout}");
}

fn many_mx(n: usize) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| format!("\"mx{i:04}.a-rather-long-mail-host-name.example.net\""))
        .collect();
    format!("[{}]", list.join(", "))
}

#[tokio::test]
async fn a_policy_over_64_kib_is_refused_and_the_served_one_kept() {
    let (code, _, stderr, dir) = check(&format!(
        "[[domain]]\nname = \"a.example\"\nmx = {}\n",
        many_mx(1_500)
    ));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&at(dir.path(), 2, 8))
            && stderr.contains("a.example: the policy body would be")
            && stderr.contains("(1500 mx); senders read at most 65536 bytes"),
        "{stderr}"
    );
    let (code, stdout, stderr, _dir) = check(&format!(
        "[[domain]]\nname = \"a.example\"\nmx = {}\n",
        many_mx(1_000)
    ));
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    // On reload: the error is logged and the last good policy stays served.
    common::init_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http) = (common::loopback(), common::loopback());
    let head = common::server_section(https, http, &dir.path().join("state"));
    let good = format!("{head}[[domain]]\nname = \"a.example\"\nmx = [\"mx.a.example\"]\n");
    let config = common::write(dir.path(), "mtasts.toml", &good);
    let serve = ServeProc::start(&config, https, http);
    let client = TlsClient::trusting_pem_file(&dir.path().join("state/ca/ca.pem"));
    let before = client
        .get_policy(https, "a.example")
        .await
        .expect("served")
        .body;
    std::fs::write(
        &config,
        format!(
            "{head}[[domain]]\nname = \"a.example\"\nmx = {}\n",
            many_mx(1_500)
        ),
    )
    .expect("write");
    serve.signal("HUP");
    common::wait_for("the reload error in the log", || {
        serve.log().contains("the policy body would be")
    });
    let after = client
        .get_policy(https, "a.example")
        .await
        .expect("still served");
    assert_eq!((after.status, after.body), (200, before));
}

#[test]
fn mode_none_and_retirement_keep_mx_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::write(
        dir.path(),
        "mtasts.toml",
        "[defaults]\nmx = [\"mx2.example.net\", \"mx1.example.net\"]\nmax_age = \"1d\"\n\
         [[domain]]\nname = \"none.example\"\nmode = \"none\"\n\
         [[domain]]\nname = \"retiring.example\"\nmode = \"enforce\"\nretire = true\n\
         [[domain]]\nname = \"bare.example\"\nmode = \"none\"\nmx = []\n\
         [[domain]]\nname = \"gone.example\"\nmode = \"enforce\"\nretire = true\n\
         mx_certs = [\"/nonexistent/mx.pem\"]\n",
    );
    let config = config.display().to_string();
    let policy = |name: &str| {
        let out = mtasts(&["policy", "--config", &config, name]);
        let (stdout, stderr) = output_text(&out);
        assert!(out.status.success(), "{name}: {stderr}");
        stdout
    };
    let kept = "version: STSv1\r\nmode: none\r\nmx: mx1.example.net\r\nmx: mx2.example.net\r\nmax_age: 86400\r\n";
    assert_eq!(policy("none.example"), kept);
    assert_eq!(policy("retiring.example"), kept);
    assert_eq!(
        policy("bare.example"),
        "version: STSv1\r\nmode: none\r\nmax_age: 86400\r\n",
        "no mx configured, none published"
    );
    // A retiring domain whose certificate file is gone still loads (with a
    // warning) and serves mode none without mx lines.
    assert_eq!(
        policy("gone.example"),
        "version: STSv1\r\nmode: none\r\nmax_age: 86400\r\n"
    );
    let out = mtasts(&["check-config", "--config", &config]);
    let (stdout, stderr) = output_text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("gone.example is retiring, so this is not an error"),
        "{stdout}{stderr}"
    );
}

/// `[on_demand]`: every bad key says where and why; enabled needs
/// `[delegation]` and `domains_dir`; a complete section is accepted.
#[test]
fn on_demand_is_validated() {
    let (code, stdout, stderr, dir) = check(
        "[on_demand]\nenabled = true\nmode = \"none\"\nallowed_mx = [\"*.*.mx.example\"]\n\
         max_per_hour = 0\ndeny = [\"not a name\"]\nresolver = \"dns.example\"\ngrace = \"soon\"\n",
    );
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    for want in [
        format!(
            "{}on_demand.mode: \"none\" is not \"testing\" or \"enforce\"",
            at(dir.path(), 3, 8)
        ),
        format!("{}on_demand.allowed_mx: ", at(dir.path(), 4, 15)),
        format!(
            "{}on_demand.max_per_hour must be a positive number",
            at(dir.path(), 5, 16)
        ),
        format!("{}on_demand.deny: \"not a name\"", at(dir.path(), 6, 9)),
        format!(
            "{}on_demand.resolver: \"dns.example\" is not an IP address",
            at(dir.path(), 7, 12)
        ),
        format!("{}on_demand.grace: ", at(dir.path(), 8, 9)),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }

    let (code, _, stderr, dir) =
        check("[on_demand]\nenabled = true\nallowed_mx = [\"mx.example.net\"]\n");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!(
            "{}on_demand needs a [delegation] section",
            at(dir.path(), 1, 1)
        )),
        "{stderr}"
    );
    assert!(stderr.contains("on_demand needs domains_dir"), "{stderr}");

    let (code, stdout, stderr, dir) = check(
        "domains_dir = \"d\"\n[delegation]\nzone = \"sts.provider.example\"\n\
         policy_host = \"mta-sts.provider.example\"\n[on_demand]\nenabled = true\n",
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!(
            "{}on_demand needs allowed_mx",
            at(dir.path(), 5, 1)
        )),
        "{stdout}{stderr}"
    );

    let (code, stdout, stderr, dir) = check(
        "domains_dir = \"d\"\n[delegation]\nzone = \"sts.provider.example\"\n\
         policy_host = \"mta-sts.provider.example\"\n[on_demand]\nenabled = true\n\
         allowed_mx = [\"*.mx.provider.example\"]\nresolver = \"127.0.0.1\"\n",
    );
    std::fs::create_dir_all(dir.path().join("d")).expect("d");
    let _ = (code, stdout, stderr);
    let out = mtasts(&[
        "check-config",
        "--config",
        &dir.path().join("mtasts.toml").display().to_string(),
    ]);
    let (stdout, stderr) = output_text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
}

/// `[delegation.transfer_tsig]` takes `[dns.update]`'s key settings, with
/// the same errors.
#[test]
fn transfer_tsig_is_validated() {
    let (code, stdout, stderr, dir) = check(
        "[delegation]\nzone = \"sts.provider.example\"\npolicy_host = \"mta-sts.provider.example\"\n\
         [delegation.transfer_tsig]\nkey_name = \"bad key\"\nalgorithm = \"hmac-md5\"\nsecret = \"c2hvcnQ=\"\n",
    );
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    for want in [
        format!(
            "{}delegation.transfer_tsig.key_name \"bad key\" is not a DNS name",
            at(dir.path(), 5, 12)
        ),
        format!(
            "{}delegation.transfer_tsig.algorithm \"hmac-md5\" is not one of",
            at(dir.path(), 6, 13)
        ),
        format!(
            "{}delegation.transfer_tsig.secret: the key is only 5 bytes",
            at(dir.path(), 7, 10)
        ),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }
}
