//! `[delegation] dns_listen`: mtasts answers the delegation zone itself.
//! Checked with `kdig` (Debian's knot-dnsutils) against the running server:
//! SOA and NS with the AA bit, each customer's TXT equal to what `records
//! --for provider` prints and what is served, NXDOMAIN and NODATA with the
//! SOA, REFUSED outside the zone, TC over UDP then the full answer over
//! TCP, and a new id and serial after a reload.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::ServeProc;

fn kdig(server: SocketAddr, args: &[&str]) -> String {
    let Some(kdig) = common::find_binary("kdig") else {
        panic!("kdig is missing: install knot-dnsutils (scripts/test.sh does)");
    };
    let out = std::process::Command::new(kdig)
        .arg(format!("@{}", server.ip()))
        .args([
            "-p",
            &server.port().to_string(),
            "+norec",
            "+timeout=3",
            "+retry=0",
        ])
        .args(args)
        .output()
        .expect("run kdig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn flags(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(";; Flags: "))
        .map(|l| l.split(';').next().unwrap_or("").trim().to_owned())
        .unwrap_or_default()
}

fn status(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
        .unwrap_or_default()
}

/// Records of `rtype` in the answer or authority sections.
fn records(out: &str, rtype: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == rtype)?;
            (at >= 2 && fields.get(at - 1) == Some(&"IN")).then(|| fields[at + 1..].join(" "))
        })
        .collect()
}

fn config(dir: &Path, dns: SocketAddr, mx: &str, nameservers: &[String]) -> std::path::PathBuf {
    let (https, http) = (common::loopback(), common::loopback());
    let ns: Vec<String> = nameservers.iter().map(|n| format!("\"{n}\"")).collect();
    let mut text = common::server_section(https, http, &dir.join("state"));
    text.push_str(&format!(
        "behind_proxy = true\n[delegation]\nzone = \"sts.provider.example\"\npolicy_host = \"mta-sts.provider.example\"\ndns_listen = \"{dns}\"\nnameservers = [{}]\n[defaults]\nmode = \"testing\"\nmx = [\"{mx}\"]\n[[domain]]\nname = \"customer-a.example\"\n[[domain]]\nname = \"customer-b.example\"\n",
        ns.join(", ")
    ));
    common::write(dir, "mtasts.toml", &text)
}

#[test]
fn the_delegation_zone_is_answered_from_what_is_served() {
    if common::find_binary("kdig").is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kdig is missing and CI=true"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let dns = common::loopback();
    // Enough long nameserver names that the NS answer exceeds 512 bytes.
    let nameservers: Vec<String> = (0..20)
        .map(|i| format!("ns{i}-{}.provider{i}.example", "x".repeat(40)))
        .collect();
    let cfg = config(dir.path(), dns, "mx.provider.example", &nameservers);
    let (https, http) = {
        let text = std::fs::read_to_string(&cfg).expect("config");
        let addr = |key: &str| -> SocketAddr {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
                .and_then(|v| v.strip_suffix('"'))
                .and_then(|v| v.parse().ok())
                .expect("address")
        };
        (addr("https"), addr("http"))
    };
    let serve = ServeProc::start(&cfg, https, http);
    common::wait_for("the DNS listener", || {
        status(&kdig(dns, &["sts.provider.example", "SOA"])) == "NOERROR"
    });

    // SOA and NS at the apex, authoritative.
    let soa = kdig(dns, &["+edns", "sts.provider.example", "SOA"]);
    assert!(flags(&soa).split_whitespace().any(|f| f == "aa"), "{soa}");
    assert!(!flags(&soa).split_whitespace().any(|f| f == "ra"), "{soa}");
    let serial1: u64 = records(&soa, "SOA")[0]
        .split_whitespace()
        .nth(2)
        .expect("serial")
        .parse()
        .expect("number");
    let ns = kdig(dns, &["+tcp", "sts.provider.example", "NS"]);
    assert_eq!(records(&ns, "NS").len(), 20, "{ns}");

    // Each customer's TXT is the id served and the one `records` prints.
    let printed = common::mtasts(&[
        "records",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--for",
        "provider",
        "--format",
        "json",
    ]);
    let printed: serde_json::Value = serde_json::from_slice(&printed.stdout).expect("records JSON");
    for customer in ["customer-a.example", "customer-b.example"] {
        let owner = format!("{customer}.sts.provider.example");
        let txt = kdig(dns, &[&owner, "TXT"]);
        assert_eq!(status(&txt), "NOERROR", "{txt}");
        let answered = records(&txt, "TXT");
        let id = common::policy_id(&common::served_body(http.port(), customer).expect("served"));
        assert_eq!(answered, [format!("\"v=STSv1; id={id};\"")], "{txt}");
        let want = printed
            .as_array()
            .expect("records")
            .iter()
            .find(|r| r["name"] == format!("{owner}.") && r["type"] == "TXT")
            .expect("printed TXT");
        assert_eq!(
            format!("\"{}\"", want["value"].as_str().expect("value")),
            answered[0]
        );
    }

    // Names that do not exist, and types a name does not have: the SOA
    // for negative caching.
    let nx = kdig(dns, &["unknown.example.sts.provider.example", "TXT"]);
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    assert_eq!(records(&nx, "SOA").len(), 1, "{nx}");
    let nodata = kdig(dns, &["customer-a.example.sts.provider.example", "A"]);
    assert_eq!(status(&nodata), "NOERROR", "{nodata}");
    assert!(records(&nodata, "A").is_empty());
    assert_eq!(records(&nodata, "SOA").len(), 1, "{nodata}");
    // Outside the zone: refused, no recursion.
    let outside = kdig(dns, &["example.com", "A"]);
    assert_eq!(status(&outside), "REFUSED", "{outside}");

    // A big answer over UDP without EDNS is truncated; TCP gets it whole.
    let udp = kdig(
        dns,
        &["+notcp", "+noedns", "+ignore", "sts.provider.example", "NS"],
    );
    assert!(flags(&udp).split_whitespace().any(|f| f == "tc"), "{udp}");
    assert!(records(&udp, "NS").is_empty(), "{udp}");

    // A policy change: new id and a higher serial.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .expect("read")
            .replace("mx.provider.example", "mx2.provider.example"),
    )
    .expect("write");
    serve.signal("HUP");
    common::wait_for("the new policy served", || {
        common::served_body(http.port(), "customer-a.example")
            .is_some_and(|b| String::from_utf8_lossy(&b).contains("mx2.provider.example"))
    });
    let id =
        common::policy_id(&common::served_body(http.port(), "customer-a.example").expect("served"));
    let txt = kdig(dns, &["customer-a.example.sts.provider.example", "TXT"]);
    assert_eq!(
        records(&txt, "TXT"),
        [format!("\"v=STSv1; id={id};\"")],
        "{txt}"
    );
    let soa = kdig(dns, &["sts.provider.example", "SOA"]);
    let serial2: u64 = records(&soa, "SOA")[0]
        .split_whitespace()
        .nth(2)
        .expect("serial")
        .parse()
        .expect("number");
    assert!(serial2 > serial1, "{serial1} -> {serial2}");
}
